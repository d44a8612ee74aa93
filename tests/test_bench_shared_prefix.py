"""tools/bench_shared_prefix.py: both learners run the same update (the tool checks their gradient
norms agree and says so in its exit status) and the JSON line has the ratios."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


@pytest.mark.slow  # two learners compiled: 20-80 s on 2 busy cores
def test_bench_shared_prefix_runs_and_agrees(capsys):
    from tools.bench_shared_prefix import main

    rc = main(["--prompts", "3", "--group", "2", "--prompt-len", "7", "--response-len", "6", "--repeats", "1"])
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rc == 0, out["grad_norm"]
    assert out["grad_norm"]["whole"] > 0 and out["cpu_ratio"] > 0 and out["wall_ratio"] > 0
