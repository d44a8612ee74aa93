"""The start-up's phases (timed, printed once) and the embedded server's early start."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from aepo_jax.trainer.startup_clock import StartupClock, process_age_s

ROOT = Path(__file__).resolve().parent.parent


def test_clock_phases_summary_and_metrics_once(caplog):
    clock = StartupClock()
    time.sleep(0.02)
    assert clock.mark("model load") >= 0.02
    clock.mark("server start")
    with caplog.at_level("INFO", logger="aepo_jax.trainer.startup_clock"):
        m = clock.report_once("first step")
    assert [p for p, _ in clock.phases] == ["model load", "server start", "first step"]
    assert set(m) == {"timing_s/startup/model_load", "timing_s/startup/server_start", "timing_s/startup/first_step",
                      "timing_s/startup_total", "timing_s/startup_compile", "timing_s/startup_trace"}
    assert m["timing_s/startup_total"] == pytest.approx(sum(dt for _, dt in clock.phases))
    assert caplog.text.count("start-up") == 1 and "model load" in caplog.text and "first step" in caplog.text
    assert clock.report_once("first step") == {} and caplog.text.count("start-up") == 1


def test_process_age_is_this_process():
    age = process_age_s()
    out = subprocess.run([sys.executable, "-c", "from aepo_jax.trainer.startup_clock import process_age_s; print(process_age_s())"],
                         capture_output=True, text=True, cwd=ROOT, check=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    child = float(out.stdout)
    assert 0 <= child < 60 and child < age  # the child is younger than this test process


def _processes_with(text: str) -> list[int]:
    out = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if text.encode() in Path(f"/proc/{pid}/cmdline").read_bytes() and \
                    Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                out.append(int(pid))
        except OSError:
            continue
    return out


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_failed_trainer_start_stops_the_server_it_started_early(tmp_path):
    """The embedded server starts while the learner initialises; if that fails, the server goes too.
    Here every prompt is longer than data.max_prompt_length: the data file passes the start-up
    checks, and the trainer fails only when it tokenizes the prompts, after starting the server."""
    import json

    from aepo_jax.rollout.testing import make_tiny_model_dir
    from aepo_jax.train import main

    model = make_tiny_model_dir(str(tmp_path / "model"), with_tokenizer=True)
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"what is {i} + {i}?", "answer": str(2 * i)}) + "\n"
                            for i in range(20)))
    run = tmp_path / "run"
    args = [f"--model.path={model}", f"--data.train_files={data}", "--data.max_prompt_length=1",
            f"--run-dir={run}", "--steps=1", "--logging.tensorboard=false", "--logging.console=false"]
    try:
        rc = main(args)
    except ValueError as e:  # the pipeline's error: no prompt is short enough
        assert "fewer than one batch" in str(e)
        rc = 1
    assert rc != 0
    assert (run / "server.log").exists(), "the server was not started before the learner initialised"
    assert _processes_with(model) == [], "the embedded server outlived the failed start"
