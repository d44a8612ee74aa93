"""Weight sync: learner parameters -> save_pretrained -> /update_weights_from_disk -> verified
version; afterwards the server's log-probs are the learner's own to 1e-4."""

from __future__ import annotations

import asyncio
import os

import numpy as np
import pytest

from aepo_jax.rollout.testing import make_tiny_model_dir

VOCAB = 256
SERVER_ARGS = ["--max-batch", "8", "--batch-buckets", "8", "--prompt-buckets", "16", "--gen-buckets", "16"]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    base = tmp_path_factory.mktemp("ws")
    return (make_tiny_model_dir(str(base / "served"), seed=0, vocab_size=VOCAB, init_std=0.3),
            make_tiny_model_dir(str(base / "learner"), seed=7, vocab_size=VOCAB, init_std=0.3))


@pytest.fixture(scope="module")
def server(dirs, tmp_path_factory):
    from aepo_jax.rollout.launch import launch_server

    sp = launch_server(dirs[0], extra_args=SERVER_ARGS, wait_s=240,
                       log_path=str(tmp_path_factory.mktemp("ws_log") / "server.log"))
    yield sp
    sp.stop()


def _learner_logprobs(model, prompt, output, temperature=1.0):
    import jax
    import jax.numpy as jnp

    logits = np.asarray(model(jnp.asarray([list(prompt) + list(output)], jnp.int32))[0], np.float64)
    logits = logits[len(prompt) - 1:-1] / temperature
    lp = logits - logits.max(-1, keepdims=True)
    lp = lp - np.log(np.exp(lp).sum(-1, keepdims=True))
    return lp[np.arange(len(output)), output]


def test_sync_then_server_logprobs_equal_learner(server, dirs, tmp_path):
    from aepo_jax.models import load_pretrained
    from aepo_jax.rollout.client import RolloutClient, run_sync
    from aepo_jax.rollout.weight_sync import sync_weights_to_sampler

    learner = load_pretrained(dirs[1], dtype="float32")
    client = RolloutClient(server.url, backoff_s=0.05)
    sync_dir = str(tmp_path / "sync")
    res = sync_weights_to_sampler(learner, client, 3, sync_dir=sync_dir)
    assert res.weight_version == "3" and res.servers == [server.url]
    assert res.path == os.path.join(sync_dir, "weights_v3") and os.path.exists(os.path.join(res.path, "config.json"))
    assert res.total_s > 0 and min(res.save_s, res.update_s, res.verify_s) >= 0

    prompts = [[1, 5, 9, 13], [200, 3]]

    async def go():
        async with client:
            return await client.generate(prompts, n=2, sampling_params={"max_new_tokens": 8, "ignore_eos": True},
                                         seed=11, temperature=1.0)

    out = asyncio.run(go())
    for i, row in enumerate(out):
        for s in row:
            assert s.weight_version == "3"
            np.testing.assert_allclose(s.logprobs, _learner_logprobs(learner, prompts[i], s.output_ids), atol=1e-4)

    # a second sync replaces the first; older sync directories are pruned
    res2 = sync_weights_to_sampler(learner, client, "step-4", sync_dir=sync_dir)
    assert res2.weight_version == "step-4"
    assert sorted(os.listdir(sync_dir)) == ["weights_vstep-4"]
    versions = run_sync(client.weight_versions(), client)
    assert versions == {server.url: "step-4"}


def test_sync_fails_loudly_when_a_server_is_unreachable(server, dirs, tmp_path):
    from aepo_jax.models import load_pretrained
    from aepo_jax.rollout.client import RolloutClient, RolloutError
    from aepo_jax.rollout.launch import free_port
    from aepo_jax.rollout.weight_sync import sync_weights_to_sampler

    dead = f"http://127.0.0.1:{free_port()}"
    learner = load_pretrained(dirs[1], dtype="float32")
    client = RolloutClient(server.url, weight_update_urls=[server.url, dead])
    with pytest.raises(RolloutError, match=dead):
        sync_weights_to_sampler(learner, client, 9, sync_dir=str(tmp_path / "s"))


def test_default_sync_dir_prefers_dev_shm():
    from aepo_jax.rollout.weight_sync import default_sync_dir

    d = default_sync_dir()
    if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK):
        assert d.startswith("/dev/shm/")
    assert str(os.getpid()) in d


def test_default_sync_dir_is_removed_at_exit(dirs, tmp_path):
    """A learner process that syncs to the default (RAM) dir leaves nothing behind in /dev/shm."""
    import subprocess
    import sys

    code = f"""
import os
from aepo_jax.rollout import weight_sync as ws
d = ws.default_sync_dir()
ws._remove_at_exit(d)
os.makedirs(os.path.join(d, "weights_v1"))
print(d)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    d = out.stdout.strip().splitlines()[-1]
    assert "aepo_jax_sync_" in d and not os.path.exists(d)


def test_stale_default_sync_dirs_of_dead_processes_are_removed(tmp_path):
    """A killed learner never runs its exit hook: the next one removes its RAM-disk sync dir, and
    only dirs of processes that no longer exist (live ones, other names untouched)."""
    import subprocess
    import sys

    from aepo_jax.rollout.weight_sync import remove_stale_sync_dirs

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        names = [f"aepo_jax_sync_{dead.pid}", f"aepo_jax_sync_{live.pid}", f"aepo_jax_sync_{os.getpid()}",
                 "aepo_jax_sync_notapid", "other_dir_1"]
        for n in names:
            os.makedirs(tmp_path / n / "weights_v3")
        removed = remove_stale_sync_dirs(str(tmp_path))
        assert removed == [str(tmp_path / names[0])]
        assert sorted(os.listdir(tmp_path)) == sorted(names[1:])
    finally:
        live.kill()
        live.wait()
    # once the live one is gone, its dir is stale too
    assert remove_stale_sync_dirs(str(tmp_path)) == [str(tmp_path / names[1])]
