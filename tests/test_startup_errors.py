"""Start-up errors of ``python -m aepo_jax.train``: one line on stderr naming the key and the file,
row or URL, exit status 2, no traceback, and before the model is loaded or a server started."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent


def _start(args, tmp_path, timeout=300, **env_extra):
    env = dict(os.environ, AEPO_JAX_CACHE=str(tmp_path / "cache"), **env_extra)  # nothing may be built there
    r = subprocess.run([sys.executable, "-m", "aepo_jax.train", f"--run-dir={tmp_path / 'run'}", *args],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    return r


def _assert_one_line_error(r, *names):
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2, (r.returncode, r.stderr[-3000:])
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr[-3000:]
    for name in names:
        assert name in lines[0], (name, lines[0])
    return lines[0]


def _rows(n, rng):
    return [{"prompt": f"What is {a} + {b}?", "answer": str(a + b)}
            for a, b in rng.integers(0, 1000, size=(n, 2))]


# --------------------------------------------------------------------------- config values

@pytest.mark.parametrize(("arg", "key"), [
    ("--optim.lr=nan", "optim.lr"),
    ("--optim.lr=-1e-4", "optim.lr"),
    ("--rollout.temperature=nan", "rollout.temperature"),
    ("--rollout.temperature=0", "rollout.temperature"),
    ("--algorithm.controller.target=-5", "algorithm.controller.target"),
    ("--algorithm.controller.target=nan", "algorithm.controller.target"),
    ("--algorithm.controller.target=linear:0.6:inf:0:60", "algorithm.controller.target"),
    ("--algorithm.controller.target=piecewise:0=0.15,60=-0.3", "algorithm.controller.target"),
    ("--algorithm.controller.t_high=inf", "algorithm.controller.t_high"),
    ("--algorithm.controller.t_low=-0.8", "algorithm.controller.t_low"),
    ("--algorithm.clip_low=1.0", "algorithm.clip_low"),
    ("--algorithm.clip_high=nan", "algorithm.clip_high"),
    ("--algorithm.clip_dual=0.5", "algorithm.clip_dual"),
    ("--algorithm.alpha=-1", "algorithm.alpha"),
    ("--algorithm.entropy_coef=inf", "algorithm.entropy_coef"),
    ("--algorithm.adv_beta=-0.4", "algorithm.adv_beta"),
    ("--algorithm.adv_kappa=0", "algorithm.adv_kappa"),
    ("--mesh=axb", "train.mesh"),
    ("--mesh=0x1", "train.mesh"),
    ("--rollout.urls=localhost:30000", "rollout.urls"),
])
def test_bad_config_values_are_refused_by_key(arg, key, tmp_path):
    _assert_one_line_error(_start([arg], tmp_path), key)
    assert not (tmp_path / "run").exists()


def test_mesh_that_does_not_match_the_devices(tmp_path):
    flags = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    line = _assert_one_line_error(_start(["--mesh=3x1"], tmp_path, **flags), "train.mesh", "3x1", "8")
    assert "needs 3x1 = 3 devices" in line


# --------------------------------------------------------------------------- data files

def test_missing_data_file(tmp_path):
    missing = tmp_path / "nonexistent.jsonl"
    _assert_one_line_error(_start([f"--data.train_files={missing}"], tmp_path), "data.train_files", str(missing))


def test_malformed_row_is_named_with_its_file_and_row(tmp_path):
    rng = np.random.default_rng()
    rows = [json.dumps(r) for r in _rows(40, rng)]
    bad = int(rng.integers(0, len(rows)))
    rows[bad] = rows[bad][: int(rng.integers(1, len(rows[bad]) - 1))]  # a line cut short
    f = tmp_path / "train.jsonl"
    f.write_text("\n".join(rows) + "\n")
    _assert_one_line_error(_start([f"--data.train_files={f}"], tmp_path), str(f), f"row {bad}")


def test_wrong_parquet_column(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    f = tmp_path / "train.parquet"
    pq.write_table(pa.Table.from_pylist(_rows(32, np.random.default_rng())), f)
    _assert_one_line_error(_start([f"--data.train_files={f}", "--data.answer_key=solution"], tmp_path),
                           str(f), "'solution'", "row 0")
    _assert_one_line_error(_start([f"--data.train_files={f}", "--data.prompt_key=question"], tmp_path),
                           str(f), "'question'")


def test_empty_and_non_utf8_files_are_named(tmp_path):
    rng = np.random.default_rng()
    good = tmp_path / "good.jsonl"
    good.write_text("".join(json.dumps(r) + "\n" for r in _rows(32, rng)))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    _assert_one_line_error(_start([f"--data.train_files={good},{empty}"], tmp_path), str(empty), "empty")

    raw = bytearray("".join(json.dumps(r) + "\n" for r in _rows(32, rng)).encode())
    at = int(rng.integers(0, len(raw)))
    raw[at:at + 1] = bytes([int(rng.integers(0x80, 0x100))])  # a byte no UTF-8 text has there alone
    latin = tmp_path / "latin1.jsonl"
    latin.write_bytes(bytes(raw))
    _assert_one_line_error(_start([f"--data.train_files={latin}"], tmp_path), str(latin), "UTF-8")


def test_too_few_problems_for_one_step(tmp_path):
    f = tmp_path / "small.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in _rows(5, np.random.default_rng())))
    _assert_one_line_error(_start([f"--data.train_files={f}", "--data.prompts_per_step=8"], tmp_path),
                           "data.prompts_per_step", "5 usable problems")


# --------------------------------------------------------------------------- model, servers

def test_model_path_that_is_not_a_model(tmp_path):
    _assert_one_line_error(_start(["--model.path=/etc"], tmp_path), "model.path", "/etc/config.json")
    _assert_one_line_error(_start([f"--model.path={tmp_path / 'nowhere'}"], tmp_path), "model.path", "nowhere")


def test_truncated_model_file_is_named(tmp_path):
    from aepo_jax.rollout.testing import make_tiny_model_dir

    model = Path(make_tiny_model_dir(str(tmp_path / "model")))
    weights = model / "model.safetensors"
    size = weights.stat().st_size
    os.truncate(weights, int(np.random.default_rng().integers(0, size)))
    _assert_one_line_error(_start([f"--model.path={model}"], tmp_path), "model.path", str(weights))


def test_model_whose_tensors_do_not_fit_its_config_is_named(tmp_path):
    """A config.json that disagrees with the weights (headers only: caught before any load)."""
    from aepo_jax.rollout.testing import make_tiny_model_dir

    rng = np.random.default_rng()
    model = Path(make_tiny_model_dir(str(tmp_path / "model"), with_tokenizer=True))
    cfg = json.loads((model / "config.json").read_text())
    key, tensor = [("intermediate_size", "mlp.gate_proj.weight"), ("num_hidden_layers", "layers.2."),
                   ("hidden_size", "embed_tokens.weight")][int(rng.integers(0, 3))]
    cfg[key] += {"intermediate_size": 32, "num_hidden_layers": 1, "hidden_size": 16}[key]
    (model / "config.json").write_text(json.dumps(cfg))
    line = _assert_one_line_error(_start([f"--model.path={model}"], tmp_path), "model.path", tensor)
    assert ("shape mismatch" in line) == (key != "num_hidden_layers") and not (tmp_path / "run").exists(), line


def test_unreachable_rollout_server_is_named(tmp_path):
    url = "http://127.0.0.1:9"  # the discard port: nothing listens there
    line = _assert_one_line_error(_start([f"--rollout.urls={url}", "--rollout.startup_timeout_s=1"], tmp_path),
                                  "rollout.urls", url)
    assert "rollout.startup_timeout_s=1s" in line


def test_unknown_reward_and_unwritable_run_dir(tmp_path):
    _assert_one_line_error(_start(["--algorithm.reward=exact"], tmp_path), "algorithm.reward", "'exact'")
    _assert_one_line_error(_start(["--algorithm.reward=aepo_jax.nowhere:fn"], tmp_path), "algorithm.reward",
                           "aepo_jax.nowhere")
    blocker = tmp_path / "file"
    blocker.write_text("")
    r = subprocess.run([sys.executable, "-m", "aepo_jax.train", f"--run-dir={blocker / 'run'}"], cwd=ROOT,
                       env=dict(os.environ, AEPO_JAX_CACHE=str(tmp_path / "cache")), capture_output=True, text=True,
                       timeout=300)
    _assert_one_line_error(r, "train.run_dir", str(blocker / "run"))


@pytest.mark.slow
def test_checkpoint_that_does_not_fit_the_model_is_one_line(tmp_path):
    """Resuming a run directory whose checkpoints were written for another model: exit 2, the
    checkpoint directory named, and the checkpoint left as it was."""
    from aepo_jax.rollout.testing import make_tiny_model_dir
    from aepo_jax.trainer.checkpoint import CheckpointManager

    import grain

    model = make_tiny_model_dir(str(tmp_path / "model"), with_tokenizer=True)
    ckpt = tmp_path / "run" / "checkpoints"
    it = iter(grain.MapDataset.range(10).to_iter_dataset())
    with CheckpointManager(ckpt, data_iterator=it) as m:
        m.save(1, {"params": {"other": np.zeros((3, 5), np.float32)}}, {"num_updates": 1})
    r = _start([f"--model.path={model}", "--data.template=plain"], tmp_path)
    # The run had started (its log lines come first); the error itself is one line, the last.
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    line = r.stderr.strip().splitlines()[-1]
    assert line.startswith("error: checkpoint: restoring step 1 from " + str(ckpt)), r.stderr[-3000:]
    assert "structure/shapes" in line
    assert sorted(p.name for p in ckpt.iterdir()) == ["1"]


@pytest.mark.slow
@pytest.mark.parametrize("failure", ["port in use", "unknown server flag"])
def test_embedded_server_that_fails_to_start_is_one_line(failure, tmp_path):
    """The embedded server exits during start-up (after the start-up checks passed): exit 2, one
    line naming the model path, the server's own last words and RUN_DIR/server.log."""
    import socket

    from aepo_jax.rollout.testing import make_tiny_model_dir

    model = make_tiny_model_dir(str(tmp_path / "model"), with_tokenizer=True)
    with socket.socket() as held:  # a port another process already listens on
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        server_args, said = {"port in use": (f"--port {port}", str(port)),
                             "unknown server flag": ("--no-such-flag 3", "--no-such-flag")}[failure]
        r = _start([f"--model.path={model}", "--data.template=plain", f"--rollout.server_args={server_args}"],
                   tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    line = r.stderr.strip().splitlines()[-1]  # the run's own log lines come first
    assert line.startswith(f"error: the rollout server for model {model} exited with status"), r.stderr[-3000:]
    assert said in line and line.endswith(f"the full log is {tmp_path / 'run' / 'server.log'}"), line
