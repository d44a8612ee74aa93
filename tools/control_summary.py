#!/usr/bin/env python
"""How well runs held their controlled statistic: one line per run directory, from metrics.jsonl.

    python tools/control_summary.py runs/len-0p7 runs/len-1p3 runs/grpo [--band 0.1] [--window 10]

For each run: the signal's first value (the base model's, step 1), the target at the end, the share
of the second half of the run within +-band of the target, the signal's mean over the first and
last ``window`` steps, and the reward's (``reward_mean``) over the same windows. Works for any
``algorithm.controller.signal`` (it reads ``control/signal`` and ``control/target``); for a run
without a length target, ``rollout/correct_length_mean`` shows its length drift beside them.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path


def _load(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        raise SystemExit(f"{path}: no metrics.jsonl")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    by_step = {r["step"]: r for r in rows if "step" in r}  # a resumed run rewrites steps: keep the last
    return [by_step[s] for s in sorted(by_step)]


def _mean(xs) -> float:
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    return sum(xs) / len(xs) if xs else float("nan")


def summarise(run_dir: Path, band: float, window: int) -> dict:
    ms = _load(run_dir)
    if not ms:
        raise SystemExit(f"{run_dir}: metrics.jsonl has no steps")
    half = ms[len(ms) // 2:]
    held = [m for m in half if m.get("control/signal") is not None and m.get("control/target")
            and abs(m["control/signal"] - m["control/target"]) <= band * m["control/target"]]
    length = [m.get("rollout/correct_length_mean") for m in ms]
    return {
        "run": str(run_dir), "steps": len(ms), "signal_first": ms[0].get("control/signal"),
        "target_end": ms[-1].get("control/target"),
        "held_second_half": len(held) / len(half),
        "signal_start": _mean(m.get("control/signal") for m in ms[:window]),
        "signal_end": _mean(m.get("control/signal") for m in ms[-window:]),
        "length_start": _mean(length[:window]), "length_end": _mean(length[-window:]),
        "reward_start": _mean(m.get("reward_mean") for m in ms[:window]),
        "reward_end": _mean(m.get("reward_mean") for m in ms[-window:]),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", type=Path)
    p.add_argument("--band", type=float, default=0.1, help="relative half-width of 'held' (default 0.1)")
    p.add_argument("--window", type=int, default=10, help="steps averaged at the start and the end (default 10)")
    a = p.parse_args(argv)
    print(f"{'run':<28} {'steps':>5} {'first':>7} {'target':>7} {'held 2nd half':>13} {'signal start->end':>18} "
          f"{'corr.len start->end':>20} {'reward start->end':>18}")
    for r in a.runs:
        s = summarise(r, a.band, a.window)
        print(f"{Path(s['run']).name:<28} {s['steps']:>5} {s['signal_first'] or float('nan'):>7.3f} "
              f"{s['target_end'] or float('nan'):>7.3f} {100 * s['held_second_half']:>12.0f}% "
              f"{s['signal_start']:>8.3f} -> {s['signal_end']:<7.3f} {s['length_start']:>9.2f} -> {s['length_end']:<7.2f} "
              f"{s['reward_start']:>8.3f} -> {s['reward_end']:<7.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
