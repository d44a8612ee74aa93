#!/usr/bin/env python
"""Plot entropy (with its target), reward and temperature against step for one or more runs.

    python tools/plot_run.py RUN [RUN ...] --out FILE.png [--title TEXT]

Each RUN is a run directory holding ``metrics.jsonl`` (written by the trainer). Runs share one
figure with three panels; each run has one colour, its entropy target is the dashed line in that
colour. Missing keys or null values leave gaps; torn or foreign lines are skipped with a note.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.jsonl"
# Each panel's metric, with the alternative names the loop may use (first present wins).
ENTROPY_KEYS = ("entropy", "actor/entropy_full")
TARGET_KEYS = ("entropy_target", "aepo/entropy_target")
REWARD_KEYS = ("reward_mean", "reward/mean")
TEMPERATURE_KEYS = ("temperature", "aepo/temperature")


class PlotError(ValueError):
    pass


def controller_active(records) -> bool:
    """Whether the entropy controller acted in this run (some step sampled at T != 1)."""
    _, temps = series(records, TEMPERATURE_KEYS)
    return any(abs(t - 1.0) > 1e-9 for t in temps)


def read_metrics(run_dir: str | Path) -> tuple[list[dict[str, Any]], int]:
    """Records of ``RUN/metrics.jsonl`` that have an integer step, and the count of skipped lines."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        what = "is not a directory" if not Path(run_dir).is_dir() else f"has no {METRICS_FILE}"
        raise PlotError(f"plot_run: run {run_dir} {what} (looked for {path})")
    records, skipped = [], 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            skipped += 1
            continue
        if isinstance(rec, dict) and isinstance(rec.get("step"), int) and not isinstance(rec["step"], bool):
            records.append(rec)
        else:
            skipped += 1
    return records, skipped


def series(records: Sequence[dict[str, Any]], keys: Sequence[str]) -> tuple[list[int], list[float]]:
    """(steps, values) of the first key in ``keys`` present in each record; null -> NaN (a gap)."""
    steps, values = [], []
    for rec in records:
        for k in keys:
            if k in rec:
                v = rec[k]
                ok = isinstance(v, (int, float)) and not isinstance(v, bool)
                steps.append(rec["step"])
                values.append(float(v) if ok else math.nan)
                break
    return steps, values


def run_labels(runs: Sequence[str | Path]) -> list[str]:
    """Run names for the legend: the directory name, or more of the path where names collide."""
    parts = [Path(r).resolve().parts for r in runs]
    for depth in range(1, max(len(p) for p in parts) + 1):
        labels = ["/".join(p[-depth:]) for p in parts]
        if len(set(labels)) == len(labels):
            return labels
    return [str(r) for r in runs]


def plot_runs(runs: Sequence[str | Path], out: str | Path, title: str | None = None) -> Any:
    """Draw the figure, save it to ``out`` and return it (all runs are read before drawing)."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    loaded = []
    for run in runs:
        records, skipped = read_metrics(run)
        if skipped:
            print(f"plot_run: {run}: skipped {skipped} unreadable line(s)", file=sys.stderr)
        loaded.append(records)
    fig, axes = plt.subplots(3, 1, sharex=True, figsize=(8, 9), constrained_layout=True)
    ax_h, ax_r, ax_t = axes
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (label, records) in enumerate(zip(run_labels(runs), loaded, strict=True)):
        c = colours[i % len(colours)]
        for ax, keys, style, name in (
            (ax_h, ENTROPY_KEYS, "-", label),
            (ax_h, TARGET_KEYS, "--", f"{label} target"),
            (ax_r, REWARD_KEYS, "-", label),
            (ax_t, TEMPERATURE_KEYS, "-", label),
        ):
            x, y = series(records, keys)
            if keys is TARGET_KEYS and not controller_active(records):
                continue  # a run that never left T = 1 (GRPO, baselines) has no target to follow
            if x:
                ax.plot(x, y, style, color=c, label=name, linewidth=1.5 if style == "-" else 1.2)
    for ax, ylabel in ((ax_h, "entropy"), (ax_r, "reward mean"), (ax_t, "temperature")):
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize="small", loc="best")
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="gray")
    ax_t.set_xlabel("step")
    if title:
        fig.suptitle(title)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    return fig


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", metavar="RUN", help="run directories (each with metrics.jsonl)")
    ap.add_argument("--out", required=True, help="output image (PNG, PDF or SVG by extension)")
    ap.add_argument("--title", default=None, help="figure title")
    args = ap.parse_args(argv)
    try:
        plot_runs(args.runs, args.out, args.title)
    except PlotError as e:
        print(str(e), file=sys.stderr)
        return 2
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
