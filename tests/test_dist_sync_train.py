"""The trainer with ``--rollout.sync=distributed`` logs the same metrics as with ``--rollout.sync=disk``
(the same weights reach the same server, by broadcast instead of a checkpoint)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("torch")

NONDETERMINISTIC = ("timing_s/", "perf/")


@pytest.fixture(scope="module")
def base_model(small_toy_base):
    return str(small_toy_base)


@pytest.fixture(scope="module")
def server(base_model, tmp_path_factory):
    from aepo_jax.rollout.launch import launch_server

    sp = launch_server(base_model, log_path=str(tmp_path_factory.mktemp("server") / "server.log"), wait_s=300)
    yield sp
    sp.stop()


def _metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in Path(run_dir, "metrics.jsonl").read_text().splitlines() if line.strip()]


@pytest.mark.slow
def test_distributed_sync_trains_like_disk_sync(base_model, server, tmp_path):
    from aepo_jax.train import main

    def run(sync, *extra):
        rc = main([f"--model.path={base_model}", f"--rollout.urls={server.url}", f"--run-dir={tmp_path / sync}",
                   "--data.prompts_per_step=4", "--rollout.n=4", "--rollout.max_new_tokens=16", "--steps=3",
                   "--logging.console=false", "--logging.tensorboard=false", "--checkpoint.every=100",
                   "--optim.lr=1e-2", "--method=entropy_reg", f"--rollout.sync={sync}", *extra])
        assert rc == 0
        return _metrics(tmp_path / sync)

    disk = run("disk")
    dist = run("distributed", "--rollout.sync_bucket_mb=0.1")
    assert [m["step"] for m in dist] == [1, 2, 3]
    for a, b in zip(disk, dist):
        a = {k: v for k, v in a.items() if not k.startswith(NONDETERMINISTIC)}
        b = {k: v for k, v in b.items() if not k.startswith(NONDETERMINISTIC)}
        assert a.keys() == b.keys()
        assert a == b
    # the policy changed between steps (each sync carried new weights; the samples, and so every
    # metric above, depend on the weights the server held)
    assert disk[0]["loss/total"] != 0 and disk[0]["policy/entropy_full"] != disk[1]["policy/entropy_full"]


def test_distributed_sync_without_torch_is_a_config_error(monkeypatch):
    import importlib.util

    from aepo_jax.config import ConfigError
    from aepo_jax.trainer.config import RunConfig, validate

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torch" else real(name, *a))
    cfg = RunConfig()
    cfg.rollout.sync = "distributed"
    with pytest.raises(ConfigError, match=r"rollout\.sync.*torch.*distributed"):
        validate(cfg)
    monkeypatch.undo()
    cfg.train.num_processes = 2
    with pytest.raises(ConfigError, match=r"rollout\.sync.*single-process.*num_processes=2"):
        validate(cfg)
    cfg.train.num_processes = 0
    cfg.rollout.sync = "nfs"
    with pytest.raises(ConfigError, match=r"rollout\.sync"):
        validate(cfg)
