"""Evaluation: the unbiased pass@k estimator (against enumeration and exact fractions up to
n = 1024), the summary table and JSON, benchmark file layouts, and one end-to-end run through the
embedded server."""

from __future__ import annotations

import itertools
import json
import math
from fractions import Fraction

import numpy as np
import pytest

from aepo_jax.eval import (
    BENCHMARK_ALIASES,
    EvalConfig,
    _load_benchmark,
    average_row,
    benchmark_name,
    config_from_args,
    default_ks,
    format_table,
    parse_ks,
    pass_at_k,
    summarize,
)


def _enumerate(n: int, c: int, k: int) -> float:
    """Fraction of all k-subsets of n samples (c of them correct) that hold a correct one."""
    samples = [1] * c + [0] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(samples[i] for i in s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n", [1, 2, 5, 8])
def test_pass_at_k_matches_enumeration(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == pytest.approx(_enumerate(n, c, k), abs=1e-12), (n, c, k)


def _exact(n: int, c: int, k: int) -> Fraction:
    return 1 - Fraction(math.comb(n - c, k), math.comb(n, k))


@pytest.mark.parametrize("n", [64, 1024])
def test_pass_at_k_stable_for_large_n(n):
    rng = np.random.default_rng(n)
    cases = [(0, 1), (1, 1), (1, n), (n, 1), (n - 1, n - 1), (2, n // 2), (1, 2)]
    cases += [(int(rng.integers(0, n + 1)), int(rng.integers(1, n + 1))) for _ in range(40)]
    for c, k in cases:
        got, want = pass_at_k(n, c, k), _exact(n, c, k)
        assert 0.0 <= got <= 1.0
        # Relative accuracy on both tails: the estimate and its complement.
        assert got == pytest.approx(float(want), rel=1e-9, abs=1e-300), (n, c, k)
        assert 1 - got == pytest.approx(float(1 - want), rel=1e-9, abs=1e-15), (n, c, k)
    # A tiny value is not flushed to 0 (1 correct of 1024, k = 1: 1/1024 exactly).
    assert pass_at_k(1024, 1, 1) == pytest.approx(1 / 1024, rel=1e-12)
    # Monotone in k and in c.
    vals = [pass_at_k(n, 3, k) for k in default_ks(n)]
    assert all(a <= b for a, b in zip(vals, vals[1:]))
    assert [pass_at_k(n, c, 8) for c in range(0, 20)] == sorted(pass_at_k(n, c, 8) for c in range(0, 20))


def test_pass_at_k_rejects_bad_arguments():
    for args in [(0, 0, 1), (4, 5, 1), (4, -1, 1), (4, 2, 0), (4, 2, 5)]:
        with pytest.raises(ValueError, match="pass_at_k"):
            pass_at_k(*args)
    with pytest.raises(TypeError, match="k must be an int"):
        pass_at_k(4, 2, 1.0)


def test_ks_parsing():
    assert default_ks(32) == [1, 2, 4, 8, 16, 32]
    assert default_ks(24) == [1, 2, 4, 8, 16, 24]
    assert parse_ks("4,1, 2", 8) == [1, 2, 4]
    with pytest.raises(ValueError, match=r"every k must be in \[1, n=8\]"):
        parse_ks("1,16", 8)
    with pytest.raises(ValueError, match="comma-separated integers"):
        parse_ks("1,two", 8)


def test_summary_average_and_table():
    a = summarize("aime24", [0, 4, 2], n=4, ks=[1, 2, 4])
    assert a.avg_at_n == pytest.approx((0 + 1 + 0.5) / 3)
    assert a.pass_at_k[1] == pytest.approx(a.avg_at_n)  # pass@1 is avg@n
    assert a.pass_at_k[4] == pytest.approx(2 / 3)
    assert a.pass_at_k[2] == pytest.approx((0 + 1 + (1 - 1 / 6)) / 3)
    b = summarize("math500", [4, 4], n=4, ks=[1, 2, 4])
    avg = average_row([a, b], [1, 2, 4])
    assert avg["avg_at_n"] == pytest.approx((a.avg_at_n + 1.0) / 2)  # unweighted over benchmarks
    table = format_table([a, b], [1, 2, 4], 4)
    lines = table.splitlines()
    assert lines[0].split() == ["benchmark", "problems", "avg@4", "pass@1", "pass@2", "pass@4"]
    assert lines[-1].split()[0] == "average" and lines[2].split()[-1] == "66.67"


@pytest.mark.parametrize(
    "path,name",
    [
        ("data/aime24/test.jsonl", "aime24"),
        ("AIME_2024.parquet", "aime24"),
        ("aime25.jsonl", "aime25"),
        ("amc23/test.jsonl", "amc"),
        ("aimo-validation-amc.parquet", "amc"),
        ("gsm8k_test.parquet", "gsm8k"),
        ("math500.jsonl", "math500"),
        ("minerva_math/test.jsonl", "minerva"),
        ("OlympiadBench.jsonl", "olympiadbench"),
        ("my_set.jsonl", "my_set"),
    ],
)
def test_benchmark_names(path, name):
    assert benchmark_name(path) == name


# Rows in the common public layouts of the seven benchmarks (field names as those files have them).
LAYOUTS = {
    "aime24": [{"id": 60, "problem": "Find $x$.", "solution": "... $\\boxed{204}$", "answer": "204", "url": "u", "year": "2024"}],
    "AIME_2024": [{"ID": "2024-I-1", "Problem": "Find $x$.", "Solution": "...", "Answer": 204}],
    "aime25": [{"question": "Find $y$.", "answer": "70"}],
    "aimo-validation-amc": [{"id": 0, "problem": "Compute.", "answer": 142.0, "url": "u"}],
    "gsm8k": [{"question": "Natalia sold clips...", "answer": "She sold 48/2 = 24 clips.\n#### 72"}],
    "math500": [{"problem": "What is $\\frac12$?", "solution": "...", "answer": "\\frac{1}{2}", "subject": "Algebra", "level": 1, "unique_id": "x"}],
    "minerva_math": [{"problem": "Compute the mass.", "solution": "So $m=\\boxed{4.5e3}$ kg.", "type": "Physics", "idx": 0}],
    "olympiadbench": [{"id": 1, "question": "Find all $n$.", "final_answer": ["$3$", "$5$"], "is_multiple_answer": True}],
}
EXPECTED = {
    "aime24": "204", "AIME_2024": "204", "aime25": "70", "aimo-validation-amc": "142", "gsm8k": "72",
    "math500": "\\frac{1}{2}", "minerva_math": "4.5e3", "olympiadbench": "3, 5",
}


@pytest.fixture(scope="module")
def toy_tokenizer(tmp_path_factory):
    from aepo_jax.data.toy_tokenizer import build_tokenizer

    return build_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.mark.parametrize("stem", sorted(LAYOUTS))
def test_benchmark_layouts_load(tmp_path, toy_tokenizer, stem):
    path = tmp_path / f"{stem}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in LAYOUTS[stem]))
    name, examples, skipped, dropped = _load_benchmark(str(path), toy_tokenizer, EvalConfig(model_path="", data=[]))
    assert name in BENCHMARK_ALIASES and skipped == 0 and dropped == 0
    assert examples[0].answer == EXPECTED[stem]
    assert examples[0].prompt_text.endswith("Answer:")  # the tokenizer's chat template was used


def test_bad_rows_are_skipped_and_counted_or_fail_in_strict_mode(tmp_path, toy_tokenizer):
    path = tmp_path / "olympiadbench.jsonl"
    rows = [{"question": "Prove it.", "final_answer": None}, {"question": "Find n.", "final_answer": ["4"]}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    _, examples, skipped, _ = _load_benchmark(str(path), toy_tokenizer, EvalConfig(model_path="", data=[]))
    assert skipped == 1 and [e.answer for e in examples] == ["4"]
    from aepo_jax.data import DataError

    with pytest.raises(DataError, match="row 0: field 'final_answer' is null"):
        _load_benchmark(str(path), toy_tokenizer, EvalConfig(model_path="", data=[], strict=True))


def test_cli_defaults_follow_appendix_a():
    cfg = config_from_args(["--model-path", "m", "--data", "a.jsonl,b.parquet"])
    assert cfg.data == ["a.jsonl", "b.parquet"] and cfg.n == 32 and cfg.ks == [1, 2, 4, 8, 16, 32]
    assert cfg.top_p == 0.95 and cfg.max_new_tokens == 8192 and cfg.resolved_temperature() == 1.0
    pass1 = config_from_args(["--model-path", "m", "--data", "a.jsonl", "--k", "1"])
    assert pass1.resolved_temperature() == 0.1
    custom = config_from_args(["--model-path", "m", "--data", "a.jsonl", "--n", "1024", "--temperature", "0.6"])
    assert custom.ks[-1] == 1024 and custom.resolved_temperature() == 0.6


def test_end_to_end_through_the_embedded_server(tmp_path, small_toy_base):
    """Sample through the real embedded server with a (barely trained) toy model: the report's
    numbers must equal a rescoring of the written samples, for every k."""
    from aepo_jax.data import toy_task
    from aepo_jax.eval import main
    from aepo_jax.rewards import exact_match_reward

    model = small_toy_base
    data = toy_task.write_toy_dataset(tmp_path / "mybench", seed=0, n_train=8, n_test=6)["test"]
    out, samples = tmp_path / "report.json", tmp_path / "samples.jsonl"
    rc = main(["--model-path", str(model), "--data", str(data), "--n", "4", "--k", "1,2,4", "--max-new-tokens", "40",
               "--output", str(out), "--samples-output", str(samples), "--reward", "exact_match"])
    assert rc == 0
    report = json.loads(out.read_text())
    assert report["settings"]["temperature"] == 1.0 and report["settings"]["top_p"] == 0.95
    res = report["benchmarks"]["mybench"]  # "test.jsonl" is named after its folder
    assert res["num_problems"] == 6 and res["n"] == 4
    rows = [json.loads(line) for line in samples.read_text().splitlines()]
    assert len(rows) == 24
    correct = {}
    for r in rows:
        assert r["score"] == exact_match_reward(r["response"], r["answer"])
        correct[r["uid"]] = correct.get(r["uid"], 0) + int(r["score"] > 0.5)
    counts = list(correct.values())
    assert res["per_problem_correct"] == counts
    for k in (1, 2, 4):
        assert res["pass_at_k"][str(k)] == pytest.approx(np.mean([pass_at_k(4, c, k) for c in counts]))
    assert res["mean_response_tokens"] > 0 and res["mean_token_nll"] > 0
