"""Disk sync from a learner of several processes without a full gather: each process writes the
shards it holds into the checkpoint process 0 laid out; the checkpoint is byte for byte the one
``save_pretrained`` writes from one process."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from _procs import collect_results
from aepo_jax.rollout.testing import make_tiny_model_dir


ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model_dir(str(tmp_path_factory.mktemp("shw") / "m"), seed=3, vocab_size=96, hidden_size=32,
                               intermediate_size=64, num_heads=4, num_kv_heads=2)


def _same_tree(a: Path, b: Path) -> None:
    names = sorted(os.listdir(a))
    assert names == sorted(os.listdir(b))
    for n in names:
        assert (a / n).read_bytes() == (b / n).read_bytes(), n


@pytest.mark.parametrize("mesh,dtype,max_shard", [("4x2", "float32", 10**9), ("2x4", "bfloat16", 20_000),
                                                   ("8x1", "float32", 30_000)])
def test_per_process_write_is_the_save_pretrained_checkpoint(model_dir, tmp_path, mesh, dtype, max_shard):
    from aepo_jax.models import load_pretrained, save_pretrained
    from aepo_jax.rollout.weight_sync import write_weights_per_process

    model = load_pretrained(model_dir, dtype="float32", mesh=mesh)
    save_pretrained(model, tmp_path / "ref", dtype=dtype, max_shard_size=max_shard)
    res = write_weights_per_process(model, "7", str(tmp_path / "sync"), dtype=dtype, max_shard_size=max_shard)
    assert res.path == str(tmp_path / "sync" / "weights_v7")
    assert sorted(os.listdir(tmp_path / "sync")) == ["weights_v7"]  # no partial directory left
    _same_tree(Path(res.path), tmp_path / "ref")
    assert res.bytes_written == res.bytes_total  # one process holds (and writes) every block once
    if max_shard < 10**9:
        assert (Path(res.path) / "model.safetensors.index.json").exists()


_CHILD = textwrap.dedent(
    """
    import json, os, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    os.environ["JAX_PLATFORMS"] = "cpu"
    pid, port, model_dir, sync_dir, mesh = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5]
    from aepo_jax.trainer import distributed as d
    d.initialize_distributed(f"localhost:{port}", num_processes=2, process_id=pid)
    from aepo_jax.models import load_pretrained
    from aepo_jax.rollout.weight_sync import shared_by_all_processes, write_weights_per_process
    model = load_pretrained(model_dir, dtype="float32", mesh=mesh)
    shared = shared_by_all_processes(sync_dir)
    res = write_weights_per_process(model, "3", sync_dir, dtype="float32", max_shard_size=20_000)
    print("RESULT " + json.dumps({"shared": shared, "path": res.path, "written": res.bytes_written,
                                  "total": res.bytes_total}), flush=True)
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("mesh", ["2x2", pytest.param("4x1", marks=pytest.mark.slow)])
def test_two_processes_each_write_their_shards(model_dir, tmp_path, mesh):
    from aepo_jax.models import load_pretrained, save_pretrained

    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    sync_dir = str(tmp_path / "sync")
    procs = [subprocess.Popen([sys.executable, "-c", _CHILD, str(pid), str(port), model_dir, sync_dir, mesh],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for pid in (0, 1)]
    r0, r1 = collect_results(procs, timeout=240)
    assert r0["shared"] and r1["shared"] and r0["path"] == r1["path"]
    # every tensor byte written exactly once, and neither process wrote (or held) the whole model
    assert r0["written"] + r1["written"] == r0["total"]
    assert 0 < r0["written"] < r0["total"] and 0 < r1["written"] < r1["total"]
    ref = tmp_path / "ref"
    save_pretrained(load_pretrained(model_dir, dtype="float32"), ref, dtype="float32", max_shard_size=20_000)
    _same_tree(Path(r0["path"]), ref)
