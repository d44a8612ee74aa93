"""The trainer end to end on the built-in task: every method, resume after SIGKILL, a dying rollout
server, export to transformers, and a 2-process run.

A small base model is built once per module with the toy recipe (fewer warm-start steps than the
default, so it is quick) and served by one embedded SGLang-compatible server that the in-process
runs share (each run syncs its own weights to it first, as it would with a long-lived server).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from aepo_jax.methods import method_spec

ROOT = Path(__file__).resolve().parent.parent
METHODS = ["aepo", "grpo", "entropy_reg", "entropy_adv", "ablation_eq2", "ablation_eq3", "reinforce", "clip_cov",
           "kl_cov"]
METHOD_SPECS = {m: method_spec(m) for m in METHODS}
# compiles: the process's, not the run's; server_compiles: logged at a run's last step only
NONDETERMINISTIC = ("timing_s/", "perf/tokens_per_s", "perf/compiles", "perf/server_compiles")


@pytest.fixture(scope="module")
def base_model(tmp_path_factory):
    from aepo_jax.toy import ToyBaseConfig, build_toy_base

    out = tmp_path_factory.mktemp("toy_base")
    build_toy_base(out, ToyBaseConfig(steps=150))
    return str(out)


@pytest.fixture(scope="module")
def server(base_model, tmp_path_factory):
    from aepo_jax.rollout.launch import launch_server

    log = tmp_path_factory.mktemp("server") / "server.log"
    sp = launch_server(base_model, log_path=str(log), wait_s=300)
    yield sp
    sp.stop()


def _args(base_model, url, run_dir, *extra):
    return [
        f"--model.path={base_model}", f"--rollout.urls={url}", f"--run-dir={run_dir}",
        "--data.prompts_per_step=8", "--rollout.n=4", "--rollout.max_new_tokens=24",
        "--logging.console=false", "--logging.tensorboard=false", "--checkpoint.every=1",
        "--optim.lr=1e-3", *extra,
    ]


def _metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in Path(run_dir, "metrics.jsonl").read_text().splitlines() if line.strip()]


def _comparable(m: dict) -> dict:
    return {k: v for k, v in m.items() if not k.startswith(NONDETERMINISTIC)}


def _run_cli(args, env_extra=None, **kw):
    env = dict(os.environ)
    env.update(env_extra or {})
    return subprocess.Popen([sys.executable, "-m", "aepo_jax.train", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def _check_method_semantics(method: str, ms: list[dict]) -> None:
    """What distinguishes each method in its logged metrics (routing a method to another's rows,
    temperature or loss fails here). The update is on-policy (ratio 1), so the policy-gradient
    term is -mean(advantage) over sequences: 0 for GRPO advantages (each group sums to 0)."""
    for m in ms:
        pg, reg, ent = m["loss/pg"], m["loss/reg"], m["loss/entropy"]
        kl = m.get("loss/kl", 0.0)
        assert ("loss/kl" in m) == (method == "kl_cov"), method
        assert m["loss/total"] == pytest.approx(pg + reg + ent + kl, abs=1e-6), method
        assert m["actor/ratio_mean"] == pytest.approx(1.0, abs=1e-5), method
        assert (ent < 0) == (method == "entropy_reg"), (method, ent)  # -lambda * H only for Entropy-Reg
        if method in ("grpo", "entropy_reg", "aepo", "ablation_eq2", "ablation_eq3"):
            assert pg == pytest.approx(0.0, abs=1e-5), (method, pg)
        elif method == "entropy_adv":
            assert pg < -1e-4, pg  # A + min(beta H, |A| / kappa): the shaping only adds
        elif method == "reinforce":
            assert pg == pytest.approx(-m["rollout/reward_mean"], abs=1e-5)  # advantage = reward
        elif method == "kl_cov":
            # on-policy |log ratio| = 0: the penalty is 0 and the surrogate is -mean(A) = 0; verl's
            # share 0.0002 of a few hundred tokens selects exactly one
            assert pg == pytest.approx(0.0, abs=1e-5) and kl == 0.0
            assert m["cov/selected_token_frac"] * m["count/tokens"] == pytest.approx(1.0)
        elif method == "clip_cov":
            # ratio 1: the PPO clip cuts nothing; one token of the covariance band (1, 5), if any, is
            # detached, so the surrogate is -mean(A) without it
            band = m["cov/band_token_frac"] * m["count/tokens"]
            assert m["cov/selected_token_frac"] * m["count/tokens"] == pytest.approx(min(1.0, band))
            if band == 0:
                assert pg == pytest.approx(0.0, abs=1e-5)
        if method not in ("clip_cov", "kl_cov"):
            assert "cov/selected_token_frac" not in m, method
        used = m.get("aepo/positives_used", 0.0)
        assert m["aepo/num_reg_samples"] == used
        if method in ("aepo", "ablation_eq2"):
            assert (reg < 0) == (used > 0), (method, reg, used)  # REINFORCE with R = 1 on each positive
        elif method == "ablation_eq3":
            # every informative sample fits the budget: whole groups, whose GRPO advantages sum to 0
            assert used > 0 and reg == pytest.approx(0.0, abs=1e-5), (reg, used)
        else:
            assert reg == 0 and "reg_rollout/num_samples" not in m, method
        if method in ("aepo", "ablation_eq3"):
            # target 8.0 is above any entropy of this vocabulary (ln V < 8), so the controller raises: T_high.
            assert m["temperature"] == pytest.approx(1.2) and m["aepo/budget"] == 60
        else:  # Eq. (2) draws its second rollout from pi_old itself
            assert m["temperature"] == 1.0, method
        if method == "ablation_eq2":
            assert m["reg_rollout/num_samples"] > 0 and m["aepo/budget"] == 60


@pytest.mark.parametrize("method", METHODS)
def test_every_method_runs_end_to_end(method, base_model, server, tmp_path):
    from aepo_jax.train import main

    # shared_prefix=on: the single-device default (auto), here on the simulated 8-device mesh
    rc = main(_args(base_model, server.url, tmp_path, f"--method={method}", "--steps=2", "--mesh=8x1",
                    "--algorithm.controller.target=8.0", "--model.shared_prefix=on"))
    assert rc == 0
    ms = _metrics(tmp_path)
    assert [m["step"] for m in ms] == [1, 2]
    for m in ms:
        for key in ("entropy", "entropy_target", "temperature", "reward_mean", "loss/total", "actor/grad_norm",
                    "actor/entropy_full", "actor/entropy_nll", "policy/entropy_full", "policy/entropy_nll",
                    "timing_s/rollout", "timing_s/update", "timing_s/sync"):
            assert key in m and m[key] is not None and np.isfinite(m[key]), (method, key)
        assert m["actor/update_skipped"] == 0
        assert 0 < m["policy/entropy_full"] and m["entropy"] == m["policy/entropy_full"]
        # the controller's generic keys, every step, every method (entropy: the same numbers)
        assert m["control/signal"] == m["entropy"] and m["control/target"] == m["entropy_target"] == 8.0
        assert m["control/side"] == 1.0 and "rollout/correct_length_mean" in m
        # on-policy: no separate old-log-prob pass
        assert "timing_s/old_logp" not in m
    if METHOD_SPECS[method].uses_reg_rollout:
        # the second rollout depends on the decision: entropy measured on this step's rollout first
        assert all(m["aepo/entropy_signal"] == m["entropy"] and m["timing_s/entropy"] > 0 for m in ms)
    else:  # nothing extra runs: the controller reads the previous update's forward pass
        assert "aepo/entropy_signal" not in ms[0] and ms[1]["aepo/entropy_signal"] == ms[0]["entropy"]
        assert all("timing_s/entropy" not in m for m in ms)
    assert ms[1]["perf/compiles"] == 0, "the learner compiled again after step 1"
    # the start-up warm-up compiled every sampler shape the run's rollouts reach
    assert ms[1]["perf/server_compiles"] == 0 and "perf/server_compiles" not in ms[0]
    _check_method_semantics(method, ms)
    assert (tmp_path / "config.yaml").exists() and (tmp_path / "checkpoints" / "2").is_dir()


def test_length_signal_runs_end_to_end(base_model, server, tmp_path):
    """--algorithm.controller.signal=length: the signal is this step's mean correct length, a target
    below it lowers with the lowering budget, at the rollout's own temperature and token budget."""
    from aepo_jax.train import main

    rc = main(_args(base_model, server.url, tmp_path, "--method=aepo", "--steps=2", "--algorithm.controller.signal=length",
                    "--algorithm.controller.target=2"))
    assert rc == 0
    ms = _metrics(tmp_path)
    for m in ms:
        length = m["rollout/correct_length_mean"]
        assert length is not None and m["control/signal"] == length and m["control/target"] == 2.0
        assert m["control/side"] == -1.0 and m["aepo/budget"] == 30 and m["temperature"] == 1.0
        assert m["aepo/reg_max_new_tokens"] == 24
        assert m["aepo/positives_used"] <= min(30, m["aepo/positives_available"])
        assert "entropy_target" not in m and "aepo/entropy_signal" not in m and m["entropy"] > 0


def test_aepo_mix_reading_runs_end_to_end(base_model, server, tmp_path):
    """The authors' reading: the kept positives replace GRPO rows (no is_reg rows in the loss); and
    the paper-exact path: old log-probs recomputed, the controller reads this step's entropy."""
    from aepo_jax.train import main

    rc = main(_args(base_model, server.url, tmp_path, "--method=aepo", "--algorithm.reading=mix", "--steps=2",
                    "--mesh=8x1", "--algorithm.controller.target=8.0", "--algorithm.agg=token-mean",
                    "--algorithm.clip_dual=3.0", "--algorithm.controller.estimator=sampled",
                    "--train.old_logp=recompute"))
    assert rc == 0
    ms = _metrics(tmp_path)
    assert [m["step"] for m in ms] == [1, 2]
    for m in ms:
        assert m["temperature"] == pytest.approx(1.2) and m["actor/update_skipped"] == 0
        assert m["aepo/num_reg_samples"] == 0  # mixed into the GRPO rows, not a separate term
        assert m["loss/reg"] == 0 and np.isfinite(m["loss/total"])
        assert m["entropy"] == m["policy/entropy_nll"]  # the sampled estimator drives the controller
        assert m["aepo/entropy_signal"] == m["entropy"] and m["timing_s/old_logp"] > 0
    assert ms[1]["perf/compiles"] == 0


def test_aepo_reuse_reads_the_previous_update(base_model, server, tmp_path):
    """train.old_logp=reuse: no forward pass besides the update; the controller decides from the
    entropy the previous step's update measured (one step behind, as the authors' code)."""
    from aepo_jax.train import main

    rc = main(_args(base_model, server.url, tmp_path, "--method=aepo", "--steps=2", "--mesh=8x1",
                    "--train.old_logp=reuse", "--algorithm.controller.target=8.0"))
    assert rc == 0
    ms = _metrics(tmp_path)
    assert all("timing_s/old_logp" not in m and "timing_s/entropy" not in m for m in ms)
    assert "aepo/entropy_signal" not in ms[0] and ms[1]["aepo/entropy_signal"] == ms[0]["entropy"]
    _check_method_semantics("aepo", ms)


def test_help_lists_options_and_bad_config_is_rejected(capsys):
    from aepo_jax.train import main

    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "--algorithm.controller.target=" in out and "--train.mesh=" in out
    assert main(["--algorithm.contrller.target=0.3"]) == 2
    assert "algorithm.controller.target" in capsys.readouterr().err


def test_importing_the_trainer_starts_no_backend():
    """train.py imports jax and the whole package at the top; the device flags main() sets for
    --mesh on a CPU-only host still take effect because no import starts a backend."""
    code = ("import aepo_jax.train as t\n"
            "from jax._src import xla_bridge\n"
            "assert not xla_bridge.backends_are_initialized(), 'an import started a jax backend'\n"
            "t.setup_host_devices('8x1')\n"
            "import jax\n"
            "print('devices', jax.device_count())\n")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "devices 8" in r.stdout


def test_export_reloads_in_transformers_with_learner_logits(base_model, server, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from aepo_jax.models import load_pretrained
    from aepo_jax.train import main
    run = tmp_path / "run"
    assert main(_args(base_model, server.url, run, "--steps=1", "--mesh=8x1")) == 0
    out = tmp_path / "hf"
    r = subprocess.run([sys.executable, "tools/export_hf.py", "--checkpoint", str(run), "--out", str(out),
                        "--dtype", "float32"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    # The learner's parameters after the update, straight from the checkpoint.
    import importlib.util

    from aepo_jax.models import read_config
    from aepo_jax.trainer.checkpoint import restore_params_numpy

    spec = importlib.util.spec_from_file_location("export_hf", ROOT / "tools" / "export_hf.py")
    export_hf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(export_hf)
    step, params = restore_params_numpy(run / "checkpoints")
    assert step == 1
    learner = export_hf.fill_model(read_config(base_model), params)
    ours = load_pretrained(base_model, dtype="float32")
    ids = np.array([[5, 9, 13, 7, 21, 4, 8, 30]], np.int32)
    want = np.asarray(learner(ids))
    hf = AutoModelForCausalLM.from_pretrained(out, torch_dtype=torch.float32)
    with torch.no_grad():
        got = hf(torch.tensor(ids, dtype=torch.long)).logits.numpy()
    assert np.abs(got - want).max() < 1e-4
    base = np.asarray(ours(ids))
    assert np.abs(base - want).max() > 1e-6  # the exported model is the trained one, not the base


@pytest.mark.slow
def test_resume_after_sigkill_logs_identical_metrics(base_model, server, tmp_path):
    args = lambda d: _args(base_model, server.url, d, "--steps=4", "--mesh=1x1")  # noqa: E731
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    ref = _run_cli(args(tmp_path / "ref"), env)
    assert ref.wait(timeout=900) == 0, ref.stdout.read()

    run = tmp_path / "killed"
    p = _run_cli(args(run), env)
    deadline = time.time() + 900
    while not (run / "checkpoints" / "2").is_dir():
        assert p.poll() is None, p.stdout.read()
        assert time.time() < deadline
        time.sleep(0.05)
    time.sleep(0.3)  # somewhere inside step 3
    p.send_signal(signal.SIGKILL)
    p.wait()
    p = _run_cli(args(run), env)
    assert p.wait(timeout=900) == 0, p.stdout.read()

    want, got = _metrics(tmp_path / "ref"), _metrics(run)
    assert [m["step"] for m in got] == [1, 2, 3, 4]
    for a, b in zip(want, got):
        assert _comparable(a) == _comparable(b), a["step"]


@pytest.mark.slow
def test_resume_skips_a_damaged_latest_checkpoint(base_model, server, tmp_path, caplog):
    """The latest checkpoint's files truncated: the run warns, resumes from the one before and
    redoes the lost step with the same metrics."""
    from aepo_jax.train import main

    run = tmp_path / "run"
    args = _args(base_model, server.url, run, "--steps=2", "--mesh=8x1")  # 8 devices: resume re-shards
    assert main(args) == 0
    first = _metrics(run)
    rng = np.random.default_rng()
    for f in (run / "checkpoints" / "2").rglob("*"):
        if f.is_file() and f.stat().st_size:
            with open(f, "r+b") as fh:
                fh.truncate(int(rng.integers(0, f.stat().st_size)))
    with caplog.at_level("WARNING", logger="aepo_jax.trainer.checkpoint"):
        assert main(args) == 0
    assert f"{run / 'checkpoints' / '2'} is damaged" in caplog.text and "resuming from step 1" in caplog.text
    again = _metrics(run)
    assert [m["step"] for m in again] == [1, 2]
    for a, b in zip(first, again):
        assert _comparable(a) == _comparable(b), a["step"]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["1", "2", "damaged-2"]


def test_dying_server_stops_the_run_with_checkpoint_intact(base_model, tmp_path):
    from aepo_jax.rollout.launch import launch_server
    from aepo_jax.trainer.checkpoint import CheckpointManager, checkpoint_dir

    sp = launch_server(base_model, log_path=str(tmp_path / "server.log"), wait_s=300)
    run = tmp_path / "run"
    p = _run_cli(_args(base_model, sp.url, run, "--steps=50", "--mesh=1x1", "--rollout.max_retries=2"),
                 {"XLA_FLAGS": "--xla_force_host_platform_device_count=1"})
    try:
        deadline = time.time() + 600
        while not (run / "checkpoints" / "1").is_dir():
            assert p.poll() is None, p.stdout.read()
            assert time.time() < deadline
            time.sleep(0.05)
        sp.kill()
        rc = p.wait(timeout=300)
        out = p.stdout.read()
    finally:
        sp.kill()
        if p.poll() is None:
            p.kill()
    assert rc == 3, out
    assert "rollout servers failed" in out and "last checkpoint" in out
    with CheckpointManager(checkpoint_dir(run), read_only=True) as ck:
        step = ck.latest_step()
        assert step >= 1
        restored = ck.restore(step)
    assert "params" in restored.state and restored.extras["num_updates"] >= 1


@pytest.mark.slow
def test_two_process_run_matches_one_process(base_model, server, tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    common = ["--steps=2", "--mesh=2x1"]
    procs = [
        _run_cli(_args(base_model, server.url, tmp_path / "multi", *common,
                       f"--train.coordinator_address=127.0.0.1:{port}", "--train.num_processes=2",
                       f"--train.process_id={i}"), env)
        for i in range(2)
    ]
    outs = [p.communicate(timeout=900)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    single = _run_cli(_args(base_model, server.url, tmp_path / "single", *common),
                      {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"})
    assert single.wait(timeout=900) == 0, single.stdout.read()
    multi, one = _metrics(tmp_path / "multi"), _metrics(tmp_path / "single")
    assert [m["step"] for m in multi] == [1, 2]
    for a, b in zip(multi, one):
        for k in ("loss/total", "actor/grad_norm", "entropy", "reward_mean"):
            assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-6), k
    assert (tmp_path / "multi" / "checkpoints" / "2").is_dir()


def test_a_swallowed_ctrl_c_still_stops_the_run():
    """A KeyboardInterrupt that some code catches and drops (an event loop's callback, a library's
    ``except BaseException``) is still seen at the next step boundary."""
    from aepo_jax import train  # noqa: PLC0415

    saved = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    try:
        for sig in (signal.SIGINT, signal.SIGTERM):
            train._install_signal_handlers()
            train.raise_if_interrupted()  # nothing has arrived: no-op
            try:
                os.kill(os.getpid(), sig)
                time.sleep(0.5)  # the handler runs here, between two bytecodes
            except BaseException:  # noqa: BLE001 - the swallowing this test is about
                pass
            with pytest.raises(KeyboardInterrupt, match=f"signal {int(sig)}"):
                train.raise_if_interrupted()
        train._install_signal_handlers()  # a new run starts uninterrupted
        train.raise_if_interrupted()
    finally:
        signal.signal(signal.SIGINT, saved[0])
        signal.signal(signal.SIGTERM, saved[1])


def _child_pids(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses /proc and PR_SET_PDEATHSIG")
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["sigkill", "ctrl-c"])
def test_embedded_server_stops_with_its_trainer(base_model, tmp_path, sig):
    p = _run_cli([f"--model.path={base_model}", f"--run-dir={tmp_path}", "--data.prompts_per_step=8",
                  "--rollout.n=4", "--rollout.max_new_tokens=24", "--logging.console=false",
                  "--logging.tensorboard=false", "--steps=50", "--mesh=1x1"],
                 {"XLA_FLAGS": "--xla_force_host_platform_device_count=1"})
    try:
        deadline = time.time() + 600
        while not (tmp_path / "metrics.jsonl").exists() or not (tmp_path / "metrics.jsonl").read_text().strip():
            assert p.poll() is None, p.stdout.read()
            assert time.time() < deadline
            time.sleep(0.1)
        servers = [c for c in _child_pids(p.pid)
                   if b"aepo_jax.rollout.server" in Path(f"/proc/{c}/cmdline").read_bytes()]
        assert servers, "the trainer started no embedded server"
    finally:
        p.send_signal(sig)  # SIGKILL: the trainer runs no cleanup at all; SIGINT: Ctrl-C
        rc = p.wait(timeout=120)
    if sig == signal.SIGINT:
        assert rc == 130, p.stdout.read()
    deadline = time.time() + 60
    while any(_alive(s) for s in servers) and time.time() < deadline:
        time.sleep(0.2)
    assert not any(_alive(s) for s in servers), "embedded server outlived its trainer"
