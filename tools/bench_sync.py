"""Weight sync time: the disk path (HF checkpoint on a RAM disk + /update_weights_from_disk) vs the
distributed path (torch.distributed broadcast of flattened buckets + /update_weights_from_distributed),
learner -> one embedded server on this machine, each beside its physical limit measured in the
same run (memory-copy bandwidth for the disk path, a raw loopback TCP transfer for the gloo path).

    flock /tmp/aepo_heavy.lock nice -n 10 python tools/bench_sync.py [--shapes 0.5b,1.5b] [--repeats 3] \
        [--bucket-mb 512] [--dtype bfloat16]

Shapes: ``toy`` (2 layers, hidden 64), ``4x1024`` (4 layers, hidden 1024, vocab 32000), ``0.5b`` /
``1.5b`` (Qwen2.5-0.5B / -1.5B: their config.json fields, built with the project's ModelConfig;
random weights). Parameters in ``--dtype`` (bf16, as the paper's runs), on the learner and the
server; the server starts from the learner's own weights (its start-up checkpoint is deleted once
it serves, so the RAM disk holds one checkpoint at a time).
Each sync is the whole round trip the trainer waits for, ending with the server serving the new
``weight_version`` (checked with /model_info): disk = write + load + check; distributed = pause +
every bucket + check + continue (joining the group is once per run, reported as ``connect_s``).
After one untimed warm-up of each (compiles), both paths alternate ``--repeats`` times; the best
time of each counts, with its phases: disk ``write_s`` (learner layout transform + file write) and
``load_s`` (server: map the file, convert to its layout on its devices, finite check, swap);
distributed ``wait_s`` (learner layout work not hidden behind the transfer), ``broadcast_s`` (inside
the broadcasts), ``tail_s`` (after the last broadcast until the server has swapped), and the
``pause_s``/``verify_s`` round trips. GB/s = parameter bytes / sync time. The last line is JSON: per
shape all of it, and for the last shape ``disk_gbps``, ``memcpy_gbps``, ``distributed_gbps``,
``socket_gbps`` (plus ``disk_vs_memcpy`` and ``distributed_vs_socket``), ``transpose_gbps`` (the
speed of the layout change itself: one [intermediate, hidden] weight transposed as both ends do it
on CPU; each sync transposes most of the bytes once on each side), and ``peak_rss_gib`` of the
bench and the server processes; the figures of the other shapes as ``<key>_<shape>``.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_QWEN2 = {"model_type": "qwen2", "vocab_size": 151936, "max_position_embeddings": 256, "rope_theta": 1000000.0,
          "rms_norm_eps": 1e-6, "tie_word_embeddings": True, "eos_token_id": 2}
SHAPES = {  # config.json fields (Qwen2.5-0.5B / -1.5B as published on the hub; two small ones)
    "toy": {**_QWEN2, "vocab_size": 64, "hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2},
    "4x1024": {**_QWEN2, "vocab_size": 32000, "hidden_size": 1024, "intermediate_size": 2816,
               "num_hidden_layers": 4, "num_attention_heads": 16, "num_key_value_heads": 4},
    "0.5b": {**_QWEN2, "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
             "num_attention_heads": 14, "num_key_value_heads": 2},
    "1.5b": {**_QWEN2, "hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28,
             "num_attention_heads": 12, "num_key_value_heads": 2},
}


def machine() -> dict:
    model, avx512 = platform.processor() or "unknown", False
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
            if line.startswith("Flags:"):
                avx512 = "avx512f" in line.split()
    except (OSError, subprocess.CalledProcessError):
        pass
    return {"cpu": model, "avx512": avx512, "cores": os.cpu_count(), "load_avg_1m": round(os.getloadavg()[0], 2)}


def memcpy_gbps(nbytes: int, repeats: int = 3) -> float:
    """One-thread memory copy of ``nbytes`` (numpy copyto), the disk path's ceiling on a RAM disk."""
    import numpy as np

    src = np.ones(nbytes, np.uint8)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t)
    return nbytes / best / 1e9


def socket_gbps(nbytes: int, repeats: int = 3) -> float:
    """A raw loopback TCP transfer of ``nbytes`` between two threads: gloo's ceiling here."""
    chunk = memoryview(bytearray(4 << 20))
    best = float("inf")
    for _ in range(repeats):
        srv = socket.socket()
        srv.bind(("127.0.0.1", 0))
        srv.listen(1)
        got = [0]

        def recv():
            conn, _ = srv.accept()
            buf = bytearray(4 << 20)
            while got[0] < nbytes:
                n = conn.recv_into(buf)
                if not n:
                    break
                got[0] += n
            conn.close()

        th = threading.Thread(target=recv)
        th.start()
        cli = socket.create_connection(srv.getsockname())
        t = time.perf_counter()
        sent = 0
        while sent < nbytes:
            sent += cli.send(chunk[:min(len(chunk), nbytes - sent)])
        th.join()
        best = min(best, time.perf_counter() - t)
        cli.close()
        srv.close()
    return nbytes / best / 1e9


def peak_rss_gib(pid: int | str = "self") -> float:
    """The process's peak resident memory (VmHWM)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 2**20, 2)
    except OSError:
        pass
    return float("nan")


def transpose_gbps(shape: str, dtype: str, repeats: int = 3) -> float:
    """The layout change's own speed here: one MLP weight of the shape ([intermediate, hidden])
    transposed into a reused buffer as both sync ends do it on CPU (hf_layout._t_into). Each sync
    pays about one such pass over most of the bytes on each side."""
    import jax.numpy as jnp
    import numpy as np

    from aepo_jax.models.hf_layout import _t_into

    cfg = SHAPES[shape]
    src = np.ones((cfg["intermediate_size"], cfg["hidden_size"]), jnp.dtype(dtype))
    dst = np.empty(src.shape[::-1], src.dtype)
    best = float("inf")
    for _ in range(repeats + 1):
        t = time.perf_counter()
        _t_into(dst, src)
        best = min(best, time.perf_counter() - t)
    return src.nbytes / best / 1e9


def build(shape: str, out_dir: str, dtype: str):
    """The learner (random weights) and the server's start-up checkpoint (the same weights)."""
    from aepo_jax.models import ModelConfig, init_model, save_pretrained

    cfg = ModelConfig.from_hf_dict(SHAPES[shape])
    learner = init_model(cfg, seed=1, dtype=dtype)
    save_pretrained(learner, out_dir, dtype=dtype)
    return learner


async def bench_shape(shape: str, repeats: int, bucket_mb: float, work: str, dtype: str) -> dict:
    import shutil

    import numpy as np

    from aepo_jax.models.decoder import param_paths
    from aepo_jax.rollout.client import RolloutClient
    from aepo_jax.rollout.dist_sync import DistributedWeightSync
    from aepo_jax.rollout.launch import launch_server
    from aepo_jax.models import load_pretrained
    from aepo_jax.rollout.weight_sync import publish_weights, write_weights

    model_dir, sync_dir = os.path.join(work, shape), os.path.join(work, "sync")
    learner = build(shape, model_dir, dtype)
    nbytes = sum(int(np.prod(v.get_value().shape)) * np.dtype(v.get_value().dtype).itemsize
                 for _, v in param_paths(learner))
    learner = None  # while the server starts: checkpoint + server copy only (memory)
    gc.collect()
    # no generation here: without the warm-up compiles the server's start-up needs far less memory
    server = launch_server(model_dir, extra_args=["--dtype", dtype, "--skip-server-warmup", "--max-batch", "1",
                                                  "--batch-buckets", "1", "--prompt-buckets", "16", "--gen-buckets", "16"],
                           wait_s=1800, log_path=os.path.join(work, f"{shape}-server.log"))
    learner = load_pretrained(model_dir, dtype=dtype)
    shutil.rmtree(model_dir)  # the server holds its weights; one checkpoint at a time on the RAM disk
    disk, dist = [], []

    async def disk_sync(v):
        """write + load + check; between write and load the learner's copy is dropped and afterwards
        read back from the checkpoint (untimed), so three copies of the weights exist at once
        (checkpoint, server's old and new), not four: 1.5B in bf16 stays under 12 GiB."""
        nonlocal learner
        shutil.rmtree(sync_dir, ignore_errors=True)  # (untimed) the previous checkpoint: RAM for one only
        t = time.perf_counter()
        path = await asyncio.to_thread(write_weights, learner, v, sync_dir, dtype=dtype)
        write_s = time.perf_counter() - t
        learner = None
        gc.collect()
        t1 = time.perf_counter()
        load_s, verify_s, _ = await publish_weights(client, path, v, timeout_s=1800)
        total = write_s + time.perf_counter() - t1
        learner = load_pretrained(path, dtype=dtype)
        return total, write_s, load_s, verify_s

    try:
        async with RolloutClient(server.url, timeout_s=1800) as client:
            sync = DistributedWeightSync(client, bucket_mb=bucket_mb, timeout_s=1800)
            t = time.perf_counter()
            await sync.connect()
            connect_s = time.perf_counter() - t
            # untimed warm-up of both paths (their jitted transforms compile on first use)
            await disk_sync("warm-d")
            shutil.rmtree(sync_dir, ignore_errors=True)
            await sync.sync(learner, "warm-n", dtype=dtype)
            for i in range(repeats):
                disk.append(await disk_sync(f"d{i}"))
                shutil.rmtree(sync_dir, ignore_errors=True)
                t = time.perf_counter()
                r = await sync.sync(learner, f"n{i}", dtype=dtype)
                dist.append((time.perf_counter() - t, r))
                versions = await client.weight_versions()
                assert set(versions.values()) == {f"n{i}"}, versions
            await sync.close()
        server_rss = peak_rss_gib(server.proc.pid)
    finally:
        server.stop()
        shutil.rmtree(sync_dir, ignore_errors=True)
    d, n = min(disk), min(dist, key=lambda x: x[0])
    nr = n[1]
    r4 = lambda x: round(x, 4)  # noqa: E731
    return {"params_bytes": nbytes, "dtype": dtype,
            "disk_s": r4(d[0]), "disk_write_s": r4(d[1]), "disk_load_s": r4(d[2]), "disk_verify_s": r4(d[3]),
            "distributed_s": r4(n[0]), "distributed_pause_s": r4(nr.pause_s), "distributed_wait_s": r4(nr.wait_s),
            "broadcast_s": r4(nr.broadcast_s), "distributed_tail_s": r4(nr.tail_s),
            "distributed_verify_s": r4(nr.verify_s), "buckets": nr.buckets,
            "broadcast_gbps": round(nbytes / nr.broadcast_s / 1e9, 3), "connect_s": round(connect_s, 3),
            "disk_gbps": round(nbytes / d[0] / 1e9, 3), "distributed_gbps": round(nbytes / n[0] / 1e9, 3),
            "ratio": round(d[0] / n[0], 3), "all_disk_s": [r4(x[0]) for x in disk], "all_distributed_s": [r4(x[0]) for x in dist],
            "peak_rss_gib": {"bench": peak_rss_gib(), "server": server_rss}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", default="0.5b,1.5b")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--bucket-mb", type=float, default=512.0)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    a = p.parse_args(argv)
    shapes = [s for s in a.shapes.split(",") if s]
    bad = [s for s in shapes if s not in SHAPES]
    if bad or not shapes:
        p.error(f"--shapes: unknown {bad}; one or more of {list(SHAPES)}")
    if a.repeats < 1:
        p.error("--repeats must be >= 1")
    base = "/dev/shm" if os.path.isdir("/dev/shm") else None
    out = {"machine": machine(), "bucket_mb": a.bucket_mb, "dtype": a.dtype, "shapes": {}}
    with tempfile.TemporaryDirectory(prefix="bench_sync_", dir=base) as work:
        for s in shapes:
            r = asyncio.run(bench_shape(s, a.repeats, a.bucket_mb, work, a.dtype))
            # the limits with the same byte count, right after the shape's syncs
            r["memcpy_gbps"] = round(memcpy_gbps(min(r["params_bytes"], 1 << 30)), 3)
            r["socket_gbps"] = round(socket_gbps(r["params_bytes"]), 3)
            r["transpose_gbps"] = round(transpose_gbps(s, a.dtype), 3)
            r["disk_vs_memcpy"] = round(r["disk_gbps"] / r["memcpy_gbps"], 3)
            r["distributed_vs_socket"] = round(r["distributed_gbps"] / r["socket_gbps"], 3)
            out["shapes"][s] = r
            print(f"{s}: {r['params_bytes'] / 1e6:.1f} MB {a.dtype}  disk {r['disk_s']:.3f} s ({r['disk_gbps']} GB/s = "
                  f"{r['disk_vs_memcpy']:.0%} of memcpy {r['memcpy_gbps']})  distributed {r['distributed_s']:.3f} s "
                  f"({r['distributed_gbps']} GB/s = {r['distributed_vs_socket']:.0%} of socket {r['socket_gbps']}, "
                  f"{r['buckets']} buckets)", flush=True)
    big = out["shapes"][shapes[-1]]
    out["machine"]["load_avg_1m_end"] = round(os.getloadavg()[0], 2)
    out.update(shape=shapes[-1], **{k: big[k] for k in ("ratio", "disk_gbps", "memcpy_gbps", "distributed_gbps",
                                                          "socket_gbps", "broadcast_gbps", "disk_vs_memcpy",
                                                          "distributed_vs_socket", "transpose_gbps", "peak_rss_gib")})
    for s in shapes[:-1]:
        out.update({f"{k}_{s}": out["shapes"][s][k] for k in ("disk_gbps", "memcpy_gbps", "distributed_gbps",
                                                              "socket_gbps")})
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
