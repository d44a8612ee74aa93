"""Multi-host helpers with 2 real CPU processes on localhost (jax.distributed + gloo collectives)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap

import pytest

from _procs import collect_results
from aepo_jax.trainer import distributed


_CHILD = textwrap.dedent(
    """
    import json, os, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    os.environ["JAX_PLATFORMS"] = "cpu"
    pid, port, ckpt = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    import numpy as np
    from aepo_jax.trainer import distributed as d
    info = d.initialize_distributed(f"localhost:{port}", num_processes=2, process_id=pid)
    again = d.initialize_distributed(f"localhost:{port}", num_processes=2, process_id=pid)  # idempotent
    import jax, jax.numpy as jnp
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    out = {"info": info.__dict__, "again_same": again == info, "main": d.is_main_process()}

    # process 0's rollout results reach every process; other processes' arguments are ignored
    payload = {"ids": np.arange(7, dtype=np.int32) * 3, "text": "sampled", "rewards": [1.0, 0.0]} if pid == 0 else "junk"
    got = d.broadcast_object(payload)
    out["broadcast"] = {"ids": got["ids"].tolist(), "dtype": str(got["ids"].dtype), "text": got["text"],
                        "rewards": got["rewards"]}
    out["allgather"] = d.allgather_object({"pid": pid, "blob": "z" * (10 + 100 * pid)})
    d.sync("after-gather")

    # each process feeds its own rows; the global array holds both, in process order
    mesh = Mesh(np.array(jax.devices()).reshape(4, 1), ("data", "tensor"))
    global_rows = lambda x: jax.make_array_from_process_local_data(NamedSharding(mesh, P("data")), x)  # noqa: E731
    local = np.arange(pid * 6, pid * 6 + 6, dtype=np.float32).reshape(2, 3)
    batch = {"x": global_rows(local), "mask": global_rows(np.full((2,), pid, np.int32))}
    out["global_shape"] = list(batch["x"].shape)
    out["global_sum"] = float(jax.jit(lambda x: x.sum())(batch["x"]))
    # a fully replicated result is readable on every process
    out["row_sums"] = np.asarray(jax.jit(lambda x: x.sum(axis=1), out_shardings=NamedSharding(mesh, P()))(batch["x"])).tolist()
    out["mask"] = np.asarray(jax.experimental.multihost_utils.process_allgather(batch["mask"], tiled=True)).tolist()
    out["local_rows"] = sorted(int(s.index[0].start) for s in batch["x"].addressable_shards)

    # collective orbax save/restore of a state sharded across both processes
    import grain
    from aepo_jax.trainer.checkpoint import CheckpointManager, NonFiniteStateError
    sharding = NamedSharding(mesh, P("data"))
    w = global_rows(np.arange(pid * 8, pid * 8 + 8, dtype=np.float32).reshape(4, 2))
    it = iter(grain.MapDataset.range(100).to_iter_dataset())
    for _ in range(3 * (pid + 1)):  # each process at its own position
        next(it)
    with CheckpointManager(ckpt, async_save=True, data_iterator=it) as m:
        m.save(3, {"params": {"w": w}}, {"shared": 1})
        m.wait()
        for _ in range(5):
            next(it)
        mesh22 = Mesh(np.array(jax.devices()).reshape(2, 2), ("data", "tensor"))  # another layout
        target = {"params": {"w": jax.ShapeDtypeStruct((8, 2), jnp.float32, sharding=NamedSharding(mesh22, P("tensor", "data")))}}
        r = m.restore(target=target)
        out["restored_step"] = r.step
        out["restored_extras"] = r.extras
        out["iterator_next"] = next(it)
        full = jax.experimental.multihost_utils.process_allgather(r.state["params"]["w"], tiled=True)
        out["restored_ok"] = bool(np.array_equal(np.asarray(full), np.arange(16, dtype=np.float32).reshape(8, 2)))
        out["restored_sharding"] = list(r.state["params"]["w"].sharding.spec)
        # a NaN in only process 1's shard: both processes refuse (no one enters orbax alone)
        bad_local = np.zeros((4, 2), np.float32)
        if pid == 1:
            bad_local[1, 1] = np.nan
        try:
            m.save(4, {"params": {"w": global_rows(bad_local)}})
            out["nan_refused"] = False
        except NonFiniteStateError as e:
            out["nan_refused"] = "['params']['w']" in str(e)
        # bad extras on one process only: every process raises, naming that process
        try:
            m.save(5, {"params": {"w": w}}, {"bad": object()} if pid == 1 else {})
            out["extras_refused"] = None
        except TypeError as e:
            out["extras_refused"] = str(e)
        # extras that differ between processes (per-process state outside the data iterator): refused
        try:
            m.save(6, {"params": {"w": w}}, {"shared": pid})
            out["differing_refused"] = None
        except ValueError as e:
            out["differing_refused"] = str(e)
        out["steps"] = m.all_steps()
        # A damaged latest step: both processes skip it together and restore step 3.
        m.save(7, {"params": {"w": w}}, {"shared": 7})
        m.wait()
        d.sync("saved-7")
        if pid == 0:
            import pathlib
            for f in pathlib.Path(ckpt, "7", "state").rglob("d/*"):
                os.truncate(f, f.stat().st_size // 2)
        d.sync("damaged-7")
        r = m.restore(target=target)
        out["fallback"] = [r.step, r.extras, m.all_steps()]
    print("RESULT " + json.dumps(out), flush=True)
    d.shutdown_distributed()
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_broadcast_gather_global_rows_and_checkpoint(tmp_path):
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _CHILD, str(pid), str(port), str(tmp_path / "ckpt")],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        )
        for pid in (0, 1)
    ]
    results = collect_results(procs, timeout=120)
    r0, r1 = results
    assert r0["info"] == {"process_index": 0, "process_count": 2, "local_device_count": 2,
                          "global_device_count": 4, "initialized": True}
    assert r1["info"]["process_index"] == 1 and r0["again_same"] and r1["again_same"]
    assert r0["main"] and not r1["main"]
    for r in results:
        assert r["broadcast"] == {"ids": [0, 3, 6, 9, 12, 15, 18], "dtype": "int32", "text": "sampled",
                                  "rewards": [1.0, 0.0]}
        assert r["allgather"] == [{"pid": 0, "blob": "z" * 10}, {"pid": 1, "blob": "z" * 110}]
        assert r["global_shape"] == [4, 3] and r["global_sum"] == float(sum(range(12)))
        assert r["row_sums"] == [3.0, 12.0, 21.0, 30.0]
        assert r["mask"] == [0, 0, 1, 1]
        assert r["restored_step"] == 3 and r["restored_ok"] and r["restored_sharding"] == ["tensor", "data"]
        assert r["nan_refused"] is True
        assert r["extras_refused"] is not None and "(process 1)" in r["extras_refused"]
        assert "extras differ between process 0 and process 1; step 6 not saved" in r["differing_refused"]
        assert r["steps"] == [3]
        assert r["fallback"] == [3, {"shared": 1}, [3]]
    assert r0["local_rows"] == [0, 1] and r1["local_rows"] == [2, 3]
    # the shared extras, and each process its own data-iterator position (grain's per-process files)
    assert r0["restored_extras"] == r1["restored_extras"] == {"shared": 1}
    assert r0["iterator_next"] == 3 and r1["iterator_next"] == 6
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["3", "damaged-7"]

    # One process cannot take over two processes' differing iterator states: a clear refusal.
    import grain

    from aepo_jax.trainer.checkpoint import CheckpointError, CheckpointManager

    it = iter(grain.MapDataset.range(100).to_iter_dataset())
    with CheckpointManager(tmp_path / "ckpt", read_only=True, data_iterator=it) as m:
        with pytest.raises(CheckpointError, match="saved by 2 processes .* this run has 1; resume with 2"):
            m.restore()


def test_single_process_shortcuts():
    info = distributed.initialize_distributed()  # nothing configured, no cluster: stays single-process
    assert info.process_count == 1 and info.process_index == 0 and not info.initialized
    assert distributed.is_main_process()
    obj = {"a": [1, 2]}
    assert distributed.broadcast_object(obj) is obj
    assert distributed.allgather_object(obj) == [obj]
    distributed.sync("noop")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"coordinator_address": "localhost:1"}, "num_processes, process_id not given"),
        ({"coordinator_address": "localhost:1", "num_processes": 2, "process_id": 2}, r"process_id=2 must be in \[0, num_processes=2\)"),
    ],
)
def test_bad_explicit_arguments_are_named(kwargs, match, monkeypatch):
    for k in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        monkeypatch.delenv(k, raising=False)
    with pytest.raises(ValueError, match=match):
        distributed.initialize_distributed(**kwargs)


def test_bad_environment_value_is_named(monkeypatch):
    monkeypatch.setenv("JAX_NUM_PROCESSES", "two")
    with pytest.raises(ValueError, match="JAX_NUM_PROCESSES='two'"):
        distributed.initialize_distributed()
