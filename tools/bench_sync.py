"""Weight sync time: the disk path (HF checkpoint on a RAM disk + /update_weights_from_disk) vs the
distributed path (torch.distributed broadcast of flattened buckets + /update_weights_from_distributed),
learner -> one embedded server on this machine, each beside its physical limit measured in the
same run (memory-copy bandwidth for the disk path, a raw loopback TCP transfer for the gloo path).

    flock /tmp/aepo_heavy.lock python tools/bench_sync.py [--shapes toy,4x1024] [--repeats 3] [--bucket-mb 512]

Shapes: ``toy`` (the toy task's model: 2 layers, hidden 64), ``4x1024`` (4 layers, hidden 1024,
vocab 32000: ~115M parameters), ``0.5b`` / ``1.5b`` (Qwen2.5's shapes; several GB of RAM).
Each sync is the whole round trip the trainer waits for: disk = write + load + /model_info
check; distributed = pause + every bucket + /model_info check + continue (joining the group is
once per run, reported as ``connect_s``). After one untimed warm-up of each, both paths alternate ``--repeats`` times;
the best time of each counts. GB/s = parameter bytes / sync time. The last line is JSON: per shape the times,
``ratio`` = disk time / distributed time, and for the largest shape ``disk_gbps``,
``memcpy_gbps``, ``distributed_gbps``, ``socket_gbps`` and ``broadcast_gbps`` (the bytes over the
time spent inside the broadcasts alone: the transfer, to hold against ``socket_gbps``).
"""

from __future__ import annotations

import argparse
import asyncio
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

SHAPES = {  # layers, hidden, intermediate, heads, kv heads, vocab
    "toy": (2, 64, 256, 4, 2, 64),
    "4x1024": (4, 1024, 2816, 16, 4, 32000),
    "0.5b": (24, 896, 4864, 14, 2, 151936),
    "1.5b": (28, 1536, 8960, 12, 2, 151936),
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


def build(shape: str, out_dir: str):
    from aepo_jax.models import ModelConfig, init_model, save_pretrained

    layers, hidden, inter, heads, kv, vocab = SHAPES[shape]
    cfg = ModelConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv, head_dim=hidden // heads,
                      max_position_embeddings=256, extra_json=json.dumps({"eos_token_id": 2}))
    served = init_model(cfg, seed=0)
    save_pretrained(served, out_dir, dtype="float32")
    del served
    return init_model(cfg, seed=1)  # the learner: other weights than the server starts with


async def bench_shape(shape: str, repeats: int, bucket_mb: float, work: str) -> dict:
    import numpy as np

    from aepo_jax.models.decoder import param_paths
    from aepo_jax.rollout.client import RolloutClient
    from aepo_jax.rollout.dist_sync import DistributedWeightSync
    from aepo_jax.rollout.launch import launch_server
    from aepo_jax.rollout.weight_sync import sync_weights_async

    model_dir = os.path.join(work, shape)
    learner = build(shape, model_dir)
    nbytes = sum(int(np.prod(v.get_value().shape)) * 4 for _, v in param_paths(learner))
    server = launch_server(model_dir, extra_args=["--max-batch", "1", "--batch-buckets", "1", "--prompt-buckets", "16",
                                                  "--gen-buckets", "16"],
                           wait_s=900, log_path=os.path.join(work, f"{shape}-server.log"))
    disk, dist = [], []
    try:
        async with RolloutClient(server.url, timeout_s=900) as client:
            sync = DistributedWeightSync(client, bucket_mb=bucket_mb, timeout_s=900)
            t = time.perf_counter()
            await sync.connect()
            connect_s = time.perf_counter() - t
            # untimed warm-up of both paths (their jitted transforms compile on first use)
            await sync_weights_async(learner, client, "warm-d", os.path.join(work, "sync"), dtype="float32")
            await sync.sync(learner, "warm-n", dtype="float32")
            v = 0
            for _ in range(repeats):
                v += 1
                t = time.perf_counter()
                r = await sync_weights_async(learner, client, f"d{v}", os.path.join(work, "sync"), dtype="float32")
                disk.append((time.perf_counter() - t, r.save_s, r.update_s))
                v += 1
                t = time.perf_counter()
                r2 = await sync.sync(learner, f"n{v}", dtype="float32")
                dist.append((time.perf_counter() - t, r2.send_s, r2.buckets, r2.broadcast_s))
            await sync.close()
    finally:
        server.stop()
    d, n = min(disk), min(dist)
    return {"params_bytes": nbytes, "disk_s": round(d[0], 4), "disk_write_s": round(d[1], 4),
            "disk_load_s": round(d[2], 4), "distributed_s": round(n[0], 4), "distributed_send_s": round(n[1], 4),
            "buckets": n[2], "broadcast_s": round(n[3], 4), "broadcast_gbps": round(nbytes / n[3] / 1e9, 3),
            "connect_s": round(connect_s, 3), "disk_gbps": round(nbytes / d[0] / 1e9, 3),
            "distributed_gbps": round(nbytes / n[0] / 1e9, 3), "ratio": round(d[0] / n[0], 3)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", default="toy,4x1024")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--bucket-mb", type=float, default=512.0)
    a = p.parse_args(argv)
    shapes = [s for s in a.shapes.split(",") if s]
    bad = [s for s in shapes if s not in SHAPES]
    if bad:
        p.error(f"--shapes: unknown {bad}; one of {list(SHAPES)}")
    base = "/dev/shm" if os.path.isdir("/dev/shm") else None
    out = {"machine": machine(), "bucket_mb": a.bucket_mb, "shapes": {}}
    with tempfile.TemporaryDirectory(prefix="bench_sync_", dir=base) as work:
        for s in shapes:
            r = asyncio.run(bench_shape(s, a.repeats, a.bucket_mb, work))
            out["shapes"][s] = r
            print(f"{s}: {r['params_bytes'] / 1e6:.1f} MB  disk {r['disk_s']:.3f} s ({r['disk_gbps']} GB/s)  "
                  f"distributed {r['distributed_s']:.3f} s ({r['distributed_gbps']} GB/s, {r['buckets']} buckets)  "
                  f"disk/distributed {r['ratio']}x", flush=True)
    big = out["shapes"][shapes[-1]]
    out.update(shape=shapes[-1], ratio=big["ratio"], disk_gbps=big["disk_gbps"],
               distributed_gbps=big["distributed_gbps"], broadcast_gbps=big["broadcast_gbps"],
               memcpy_gbps=round(memcpy_gbps(big["params_bytes"]), 3), socket_gbps=round(socket_gbps(big["params_bytes"]), 3))
    print(f"limits: memcpy {out['memcpy_gbps']} GB/s, loopback socket {out['socket_gbps']} GB/s")
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
