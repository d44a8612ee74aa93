"""tools/control_summary.py on a written metrics.jsonl: the held share counts only the second half
and only steps within the band; start / end windows average the right steps."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
import control_summary  # noqa: E402


def test_summary_of_a_written_run(tmp_path):
    rows = []
    for step in range(1, 21):
        signal = 30.0 if step <= 10 else (20.0 if step % 2 else 25.0)  # 2nd half: half the steps in +-10% of 20
        rows.append({"step": step, "control/signal": signal, "control/target": 20.0, "reward_mean": step / 20,
                     "rollout/correct_length_mean": signal if step != 3 else None})
    rows.append({"step": 20, "control/signal": 20.0, "control/target": 20.0, "reward_mean": 1.0,
                 "rollout/correct_length_mean": 20.0})  # a resumed run's rewrite of step 20 wins
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    s = control_summary.summarise(tmp_path, band=0.1, window=5)
    assert s["steps"] == 20 and s["signal_first"] == 30.0 and s["target_end"] == 20.0
    assert s["held_second_half"] == pytest.approx(6 / 10)  # steps 11, 13, 15, 17, 19 and the rewritten 20
    assert s["reward_start"] == pytest.approx(sum(range(1, 6)) / 5 / 20)
    assert s["reward_end"] == pytest.approx((16 + 17 + 18 + 19) / 20 / 5 + 1.0 / 5)
    assert s["length_start"] == pytest.approx(30.0)  # the null at step 3 is skipped
    assert control_summary.main([str(tmp_path)]) == 0
