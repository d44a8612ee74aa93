"""MetricsLogger: metrics.jsonl durability and resume truncation, TensorBoard, console, Timer."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import warnings

import numpy as np
import pytest

from aepo_jax.trainer.metrics import (
    DROPPED_FILE,
    METRICS_FILE,
    MetricsLogger,
    Timer,
    split_for_resume,
    to_json_value,
)


def _lines(run_dir):
    return [json.loads(x) for x in (run_dir / METRICS_FILE).read_text().splitlines()]


def test_values_of_every_scalar_kind(tmp_path):
    import jax.numpy as jnp

    with MetricsLogger(tmp_path, use_tensorboard=False, console=False) as m:
        rec = m.log(
            3,
            {
                "entropy": 0.5,
                "i": np.int64(7),
                "f32": np.float32(0.25),
                "jax": jnp.float32(1.5),
                "jax_int": jnp.int32(4),
                "arr1": np.array([2.0]),
                "flag": True,
                "method": "aepo",
                "none": None,
            },
        )
    assert rec == {"step": 3, "entropy": 0.5, "i": 7, "f32": 0.25, "jax": 1.5, "jax_int": 4,
                   "arr1": 2.0, "flag": True, "method": "aepo", "none": None}
    (line,) = _lines(tmp_path)
    assert line == rec and list(line)[0] == "step"
    assert isinstance(line["i"], int) and isinstance(line["jax_int"], int)


def test_nonfinite_become_null_and_are_named(tmp_path):
    import jax.numpy as jnp

    with MetricsLogger(tmp_path, use_tensorboard=False, console=False) as m:
        with pytest.warns(RuntimeWarning, match=r"step 1 logged as null: loss, grad_norm") as w:
            m.log(1, {"loss": float("nan"), "grad_norm": jnp.float32(jnp.inf), "ok": 1.0})
        assert "ok" not in str(w[0].message)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a finite step must not warn
            m.log(2, {"loss": 0.1})
    text = (tmp_path / METRICS_FILE).read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert _lines(tmp_path)[0] == {"step": 1, "loss": None, "grad_norm": None, "ok": 1.0}


@pytest.mark.parametrize(
    ("value", "match"),
    [(np.zeros(3), r"'bad' at step 5 is an array of shape \(3,\)"), ([1.0], "'bad' at step 5 has type list"),
     ({"a": 1}, "type dict")],
)
def test_bad_values_name_key_and_step_and_write_nothing(tmp_path, value, match):
    with MetricsLogger(tmp_path, use_tensorboard=False, console=False) as m:
        with pytest.raises(TypeError, match=match):
            m.log(5, {"good": 1.0, "bad": value})
        m.log(5, {"good": 1.0})  # the failed call consumed nothing: step 5 is still free
    assert _lines(tmp_path) == [{"step": 5, "good": 1.0}]


def test_steps_must_increase(tmp_path):
    with MetricsLogger(tmp_path, use_tensorboard=False, console=False) as m:
        m.log(1, {})
        m.log(4, {})  # gaps are fine
        with pytest.raises(ValueError, match="step 4 logged after step 4"):
            m.log(4, {})
        with pytest.raises(ValueError, match="step 2 logged after step 4"):
            m.log(2, {})
        with pytest.raises(ValueError, match="non-negative int"):
            m.log(-1, {})
        with pytest.raises(ValueError, match=r"metrics\['step'\]=9 disagrees"):
            m.log(5, {"step": 9})
    assert [r["step"] for r in _lines(tmp_path)] == [1, 4]


def test_resume_truncates_orphans_and_keeps_them_aside(tmp_path):
    with MetricsLogger(tmp_path, use_tensorboard=False, console=False) as m:
        for s in range(1, 8):
            m.log(s, {"x": float(s)})
    with open(tmp_path / METRICS_FILE, "a") as f:
        f.write('{"step": 8, "x": 8.')  # torn line from a SIGKILL mid-write
    with pytest.warns(RuntimeWarning, match=r"moved 4 line\(s\).*after step 4"):
        m = MetricsLogger(tmp_path, use_tensorboard=False, console=False, resume_step=4)
    with pytest.raises(ValueError, match="step 4 logged after step 4"):
        m.log(4, {"x": 0.0})
    m.log(5, {"x": 50.0})
    m.close()
    assert [(r["step"], r["x"]) for r in _lines(tmp_path)] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0), (5, 50.0)]
    dropped = (tmp_path / DROPPED_FILE).read_text().splitlines()
    assert [json.loads(x)["step"] for x in dropped[:3]] == [5, 6, 7] and dropped[3].startswith('{"step": 8')


def test_fresh_start_drops_lines_of_a_run_that_never_checkpointed(tmp_path):
    (tmp_path / METRICS_FILE).write_text('{"step": 1}\n{"step": 2}\n')
    with pytest.warns(RuntimeWarning, match="fresh start"):
        m = MetricsLogger(tmp_path, use_tensorboard=False, console=False, resume_step=None)
    m.log(1, {"y": 1})
    m.close()
    assert _lines(tmp_path) == [{"step": 1, "y": 1}]


def test_resume_without_orphans_rewrites_nothing(tmp_path):
    (tmp_path / METRICS_FILE).write_text('{"step": 1}\n{"step": 2}\n')
    before = os.stat(tmp_path / METRICS_FILE).st_ino
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        MetricsLogger(tmp_path, use_tensorboard=False, console=False, resume_step=2).close()
    assert os.stat(tmp_path / METRICS_FILE).st_ino == before
    assert not (tmp_path / DROPPED_FILE).exists()


def test_split_for_resume_edge_cases():
    lines = ['{"step": 1}', "", "garbage", '{"step": 3}', '{"step": 2}', '{"step": true}', '[1]', '{"x": 1}',
             '{"step": 3}', '{"step": 9}']
    kept, dropped = split_for_resume(lines, 5)
    assert kept == ['{"step": 1}', '{"step": 3}']
    assert dropped == ["garbage", '{"step": 2}', '{"step": true}', "[1]", '{"x": 1}', '{"step": 3}', '{"step": 9}']
    assert split_for_resume(lines, None)[0] == []


def test_killed_process_keeps_every_logged_line(tmp_path):
    # A child logs as fast as it can; SIGKILL it; every line it reported as logged must be on disk, whole.
    script = textwrap.dedent(
        f"""
        import sys
        from aepo_jax.trainer.metrics import MetricsLogger
        m = MetricsLogger({str(tmp_path)!r}, use_tensorboard=False, console=False)
        s = 0
        while True:
            s += 1
            m.log(s, {{"x": s * 0.5, "pad": "y" * 200}})
            print(s, flush=True)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    last = 0
    t0 = time.time()
    while last < 50 and time.time() - t0 < 30:
        last = int(proc.stdout.readline())
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    raw = (tmp_path / METRICS_FILE).read_text().split("\n")
    complete = [json.loads(x) for x in raw[:-1]]  # everything before the last newline parses
    assert len(complete) >= last and [r["step"] for r in complete] == list(range(1, len(complete) + 1))


@pytest.fixture
def tb_reader():
    def read(logdir):
        from tensorboardX.event_file_writer import EventFileWriter  # noqa: F401  (ensures tensorboardX)
        from tensorboardX.proto import event_pb2

        out: dict[str, list[tuple[int, float]]] = {}
        for name in sorted(os.listdir(logdir)):
            data = open(os.path.join(logdir, name), "rb").read()
            pos = 0
            while pos < len(data):  # TFRecord framing: len(8) crc(4) payload crc(4)
                n = int.from_bytes(data[pos : pos + 8], "little")
                ev = event_pb2.Event.FromString(data[pos + 12 : pos + 12 + n])
                pos += 12 + n + 4
                if ev.HasField("session_log") and ev.session_log.status == ev.session_log.START:
                    # purge_step: drop earlier-written events at or after the restart step
                    for tag in out:
                        out[tag] = [(s, v) for s, v in out[tag] if s < ev.step]
                for v in ev.summary.value:
                    out.setdefault(v.tag, []).append((ev.step, v.simple_value))
        return out

    return read


def test_tensorboard_scalars(tmp_path, tb_reader):
    with MetricsLogger(tmp_path, console=False) as m, pytest.warns(RuntimeWarning, match="null: bad"):
        for s in (1, 2, 3):
            m.log(s, {"actor/entropy_full": 0.1 * s, "flag": s == 2, "name": "skip-me", "bad": float("inf")})
    with pytest.warns(RuntimeWarning):
        with MetricsLogger(tmp_path, console=False, resume_step=1) as m:
            m.log(2, {"actor/entropy_full": 9.0})
    tb = tb_reader(tmp_path / "tensorboard")
    assert tb["actor/entropy_full"] == [(1, pytest.approx(0.1)), (2, 9.0)]
    assert tb["flag"] == [(1, 0.0)]  # steps 2 and 3 of the first run were purged by the resume
    assert "name" not in tb and "bad" not in tb


def test_only_main_process_writes(tmp_path):
    m = MetricsLogger(tmp_path / "run", wandb={"project": "x"}, is_main_process=False)
    assert m.log(1, {"a": 1.0}) == {"step": 1, "a": 1.0}
    with pytest.raises(ValueError):
        m.log(1, {})  # still validates
    m.close()
    assert not (tmp_path / "run").exists()


def test_wandb_configured_but_missing_is_a_clear_error(tmp_path):
    try:
        import wandb  # noqa: F401

        pytest.skip("wandb is installed here")
    except ImportError:
        pass
    with pytest.raises(ImportError, match=r"wandb=\{'project': 'aepo'\}.*not installed"):
        MetricsLogger(tmp_path, wandb={"project": "aepo"})
    assert not (tmp_path / METRICS_FILE).exists()


def test_console_bar_shows_key_figures(tmp_path, capsys):
    with MetricsLogger(tmp_path, use_tensorboard=False, total_steps=10) as m:
        rec = m.log(1, {"entropy": 0.5123, "entropy_target": 0.6, "temperature": 1.05, "reward_mean": 0.31})
        assert m.console_summary(rec) == "H=0.512 H*=0.600 T=1.050 R=0.310"
        assert m.console_summary({"entropy": None, "temperature": 2}) == "T=2.000"
        m.log(2, {"entropy": 0.4})
    err = capsys.readouterr().err
    assert "2/10" in err and "H=0.400" in err


def test_timer_accumulates():
    metrics: dict = {}
    with Timer("rollout", metrics) as t:
        time.sleep(0.01)
    first = metrics["timing_s/rollout"]
    assert first == t.seconds >= 0.01
    with Timer("rollout", metrics):
        pass
    assert metrics["timing_s/rollout"] >= first
    with Timer("update") as t2:
        pass
    assert "timing_s/update" not in metrics and t2.seconds >= 0.0


def test_to_json_value_bool_array_and_numpy_bool():
    assert to_json_value("a", np.bool_(True)) == (True, False)
    assert to_json_value("a", np.array(3, np.int8)) == (3, False)
    assert to_json_value("a", np.float64("-inf")) == (None, True)
