"""tools/plot_run.py: several runs on one figure, tolerant reading, clear errors."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOOL = ROOT / "tools" / "plot_run.py"


@pytest.fixture(scope="module")
def plot_run():
    spec = importlib.util.spec_from_file_location("plot_run", TOOL)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _write_run(d: Path, records, tail: str = ""):
    d.mkdir(parents=True)
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + tail)
    return d


def test_two_runs_on_one_figure(tmp_path, plot_run):
    a = _write_run(tmp_path / "aepo", [
        {"step": s, "entropy": 0.1 * s, "entropy_target": 0.5, "reward_mean": 0.2, "temperature": 1.0 + 0.01 * s}
        for s in range(1, 6)
    ])
    # second run: another key spelling, no temperature at all, a null and a torn last line
    b = _write_run(tmp_path / "grpo", [
        {"step": 1, "actor/entropy_full": 0.9, "reward_mean": 0.1},
        {"step": 2, "actor/entropy_full": None, "reward_mean": 0.3},
        {"step": 3, "actor/entropy_full": 0.7},
    ], tail='{"step": 4, "ent')
    fig = plot_run.plot_runs([a, b], tmp_path / "out" / "fig.png", title="t")
    assert (tmp_path / "out" / "fig.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ax_h, ax_r, ax_t = fig.axes
    lines = {ln.get_label(): ln for ln in ax_h.lines}
    assert set(lines) == {"aepo", "aepo target", "grpo"}
    assert lines["aepo target"].get_linestyle() == "--"
    assert lines["aepo target"].get_color() == lines["aepo"].get_color() != lines["grpo"].get_color()
    assert list(lines["aepo"].get_xdata()) == [1, 2, 3, 4, 5]
    y = list(lines["grpo"].get_ydata())
    assert y[0] == 0.9 and math.isnan(y[1]) and y[2] == 0.7
    assert [ln.get_label() for ln in ax_r.lines] == ["aepo", "grpo"]
    assert list(ax_r.lines[1].get_xdata()) == [1, 2]
    assert [ln.get_label() for ln in ax_t.lines] == ["aepo"]


def test_cli_and_missing_metrics_error(tmp_path):
    a = _write_run(tmp_path / "run1", [{"step": 1, "entropy": 0.3}])
    empty = tmp_path / "run2"
    empty.mkdir()
    out = tmp_path / "f.png"
    r = subprocess.run([sys.executable, str(TOOL), str(a), str(empty), "--out", str(out)], capture_output=True, text=True)
    assert r.returncode == 2 and f"run {empty} has no metrics.jsonl" in r.stderr and not out.exists()
    r = subprocess.run([sys.executable, str(TOOL), str(a), str(tmp_path / "nope"), "--out", str(out)],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "nope is not a directory" in r.stderr
    r = subprocess.run([sys.executable, str(TOOL), str(a), "--out", str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert out.stat().st_size > 1000


def test_labels_disambiguate_same_names(plot_run, tmp_path):
    assert plot_run.run_labels([tmp_path / "x" / "run", tmp_path / "y" / "run"]) == ["x/run", "y/run"]
    assert plot_run.run_labels([tmp_path / "a", tmp_path / "b"]) == ["a", "b"]


def test_empty_panels_say_no_data(tmp_path, plot_run):
    a = _write_run(tmp_path / "r", [{"step": 1, "other": 2}, {"no_step": 1}, [1, 2]])
    records, skipped = plot_run.read_metrics(a)
    assert [r["step"] for r in records] == [1] and skipped == 2
    fig = plot_run.plot_runs([a], tmp_path / "f.svg")
    assert all(not ax.lines and ax.texts[0].get_text() == "no data" for ax in fig.axes)


def test_target_line_only_for_runs_whose_controller_acted(plot_run, tmp_path):
    aepo = _write_run(tmp_path / "aepo", [{"step": s, "entropy": 0.3, "entropy_target": 0.15, "temperature": 0.8,
                                           "reward_mean": 0.5} for s in (1, 2, 3)])
    grpo = _write_run(tmp_path / "grpo", [{"step": s, "entropy": 0.3, "entropy_target": 0.15, "temperature": 1.0,
                                           "reward_mean": 0.5} for s in (1, 2, 3)])
    fig = plot_run.plot_runs([aepo, grpo], tmp_path / "out.png")
    labels = [line.get_label() for line in fig.axes[0].lines]
    assert "aepo target" in labels and "grpo target" not in labels and "grpo" in labels
