"""Rewards: math answer checking on tricky cases, the exact-match reward, the registry, and the
process pool (timeouts and crashes score 0 and are counted, never hidden)."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from aepo_jax.rewards import (
    RewardPool,
    exact_match_reward,
    extract_boxed,
    list_rewards,
    math_reward,
    register_reward,
    resolve_reward,
    reward_spec,
)

# (response, ground truth, expected reward): equivalent forms, near misses, nested braces, no
# boxed answer, malformed LaTeX. The pathological input is in the pool tests below.
MATH_CASES = [
    (r"so \boxed{\frac{1}{2}}", "0.5", 1.0),
    (r"\boxed{\dfrac{3}{4}}", r"\frac34", 1.0),
    (r"\boxed{0.75}", "3/4", 1.0),
    (r"\boxed{\{1,2,3\}}", r"\{3,2,1\}", 1.0),
    (r"\boxed{(1,2]}", "(1,2]", 1.0),
    (r"\boxed{(1,2)}", "[1,2]", 0.0),
    (r"\boxed{x=3}", "3", 1.0),
    (r"\boxed{3.0}", "3", 1.0),
    (r"\boxed{10\%}", "10", 1.0),
    (r"\boxed{\sqrt{2}/2}", r"\frac{\sqrt{2}}{2}", 1.0),
    (r"\boxed{2\sqrt{2}}", r"\sqrt{8}", 1.0),
    (r"\boxed{\pi}", "3.14", 0.0),
    (r"\boxed{1,000}", "1000", 1.0),
    (r"\boxed{\text{(B)}}", "B", 1.0),
    (r"\boxed{\frac{\sqrt{3}}{\sqrt{\frac{1}{4}}}}", r"2\sqrt{3}", 1.0),
    (r"first \boxed{1} then \boxed{2}", "2", 1.0),
    (r"first \boxed{1} then \boxed{2}", "1", 0.0),
    ("Adding them up, the final answer is 7.", "7", 1.0),
    ("48/2 = 24\n#### 72", "72", 1.0),
    ("I think it's about seven", "7", 0.0),
    ("", "1", 0.0),
    (r"\boxed{\frac{1}{2}", "1/2", 0.0),
    (r"\boxed{\frac{1}{}}", "1", 0.0),
    (r"\boxed{}", "0", 0.0),
    (r"\boxed{0.333}", r"\frac{1}{3}", 0.0),
    (r"\boxed{-3}", "3", 0.0),
    (r"\boxed{3}", "-3", 0.0),
    (r"\boxed{x^2+2x+1}", "(x+1)^2", 1.0),
    (r"\boxed{x^2+2x}", "(x+1)^2", 0.0),
    (r"\boxed{5}", r"\boxed{5}", 1.0),
    (r"\boxed{5}", "$5$", 1.0),
    (r"\fbox{12}", "12", 1.0),
    (r"so it is \boxed 7.", "7", 1.0),
    (r"\boxed{\left(1, 2\right)}", "(1,2)", 1.0),
    (r"\boxed{\infty}", r"\infty", 1.0),
    (r"\boxed{(-\infty, 0)}", r"(-\infty,0)", 1.0),
    (r"\boxed{12}", "12.0", 1.0),
    (r"\boxed{5\text{ cm}}", "5", 1.0),
    (r"\boxed{\frac{2}{4}}", r"\frac{1}{2}", 1.0),
    (r"\boxed{\begin{pmatrix}1\\2\end{pmatrix}}", r"\begin{pmatrix}1\\2\end{pmatrix}", 1.0),
    (r"\boxed{3\sqrt{2}}", r"3\sqrt{3}", 0.0),
    (r"\boxed{1.5}", r"\frac{3}{2}", 1.0),
    (r"\boxed{4} and then \boxed{5", "4", 1.0),
    (r"\boxed{\text{Yes}}", "Yes", 1.0),
    (r"\boxed{2}", "3", 0.0),
    ("x" * 20000, "1", 0.0),
    (r"\boxed{\boxed{6}}", "6", 1.0),
    (r"The answer is: $\frac{5}{6}$", r"\frac{5}{6}", 1.0),
    (r"\boxed{1/2}\boxed{\}", "1/2", 1.0),
    (r"\boxed{2, 3}", r"3, 2", 1.0),
    (r"\boxed{a+b}", "b+a", 1.0),
    (r"\boxed{0.5000001}", "0.5", 1.0),  # math-verify rounds to 6 decimals
    (r"\boxed{0.51}", "0.5", 0.0),
]


@pytest.mark.parametrize("response,ground_truth,expected", MATH_CASES)
def test_math_reward_table(response, ground_truth, expected):
    assert math_reward(response, ground_truth) == expected


def test_math_reward_table_is_large_and_balanced():
    assert len(MATH_CASES) >= 40
    assert sum(e == 0.0 for *_, e in MATH_CASES) >= 12  # enough near misses to catch a reward that says yes


@pytest.mark.parametrize(
    "text,expected",
    [
        (r"\boxed{a{b{c}}d}", "a{b{c}}d"),
        (r"\boxed{\{1\}}", r"\{1\}"),
        (r"x \boxed{1} y \fbox{2}", "2"),
        (r"\boxedx{1}", None),  # a different command, not a box
        (r"\boxed{1} \boxed{", "1"),
        ("no box", None),
    ],
)
def test_extract_boxed(text, expected):
    assert extract_boxed(text) == expected


def test_math_reward_rejects_non_string():
    with pytest.raises(TypeError, match="response"):
        math_reward(None, "1")  # type: ignore[arg-type]


def test_exact_match_reward():
    assert exact_match_reward(r"3+4=7 \boxed{7}", "7") == 1.0
    assert exact_match_reward(r"\boxed{ 7 }", "7") == 1.0
    assert exact_match_reward(r"\boxed{7.0}", "7") == 0.0  # exact, not numeric
    assert exact_match_reward(r"\boxed{7} \boxed{8}", "7") == 0.0
    assert exact_match_reward("7", "7") == 0.0


def test_registry_names_paths_and_errors():
    assert {"math", "exact_match"} <= set(list_rewards())
    assert resolve_reward("math") is math_reward
    assert resolve_reward("aepo_jax.rewards.exact:exact_match_reward") is exact_match_reward
    register_reward("my_exact", "aepo_jax.rewards.exact:exact_match_reward")
    assert reward_spec("my_exact") == "aepo_jax.rewards.exact:exact_match_reward"
    with pytest.raises(KeyError, match="unknown name 'nope'"):
        resolve_reward("nope")
    with pytest.raises(ImportError, match="no_such_module"):
        register_reward("bad", "no_such_module:fn")
    with pytest.raises(AttributeError, match="missing_fn"):
        resolve_reward("aepo_jax.rewards.exact:missing_fn")
    with pytest.raises(ValueError, match="not importable"):
        register_reward("lam", lambda r, g: 1.0)


# --- process pool --------------------------------------------------------------------------------


def crashing_reward(response: str, ground_truth: str) -> float:
    """A user reward with a bug on some inputs (module level so workers can import it)."""
    if response == "boom":
        raise RuntimeError("user reward bug")
    if response == "nan":
        return float("nan")
    if response == "die":
        import os

        os._exit(3)  # the worker process dies outright
    return float(response == ground_truth)


@pytest.fixture(scope="module")
def math_pool():
    with RewardPool("math", num_workers=2, timeout_s=3.0) as pool:
        yield pool


def test_pool_matches_direct_calls(math_pool):
    responses = [r for r, _, _ in MATH_CASES[:20]]
    gts = [g for _, g, _ in MATH_CASES[:20]]
    out = math_pool.score(responses, gts)
    assert out.status == ["ok"] * 20
    np.testing.assert_array_equal(out.scores, [e for *_, e in MATH_CASES[:20]])


def test_pool_pathological_input_times_out_scores_zero_and_is_counted(math_pool, caplog):
    before = math_pool.stats.timeouts
    # 9^(9^9) has ~370 million digits: sympy computes it in C, no signal interrupts it.
    responses = [r"\boxed{9^{9^{9}}}", r"\boxed{4}", r"\boxed{\frac{1}{2}}"]
    with caplog.at_level(logging.WARNING, logger="aepo_jax.rewards.pool"):
        out = math_pool.score(responses, ["1", "4", "0.5"])
    assert out.status == ["timeout", "ok", "ok"]
    np.testing.assert_array_equal(out.scores, [0.0, 1.0, 1.0])
    assert out.timeouts == 1 and math_pool.stats.timeouts == before + 1
    assert "sample 0 timeout" in caplog.text
    # The pool replaced the killed worker and keeps working.
    assert math_pool.score([r"\boxed{2}"] * 4, ["2"] * 4).scores.tolist() == [1.0] * 4


def test_pool_crashes_score_zero_and_are_counted(caplog):
    path = f"{__name__}:crashing_reward"
    with RewardPool(path, num_workers=1, timeout_s=20.0) as pool:
        with caplog.at_level(logging.WARNING, logger="aepo_jax.rewards.pool"):
            out = pool.score(["a", "boom", "nan", "die", "b"], ["a", "x", "x", "x", "c"])
        assert out.status == ["ok", "crash", "crash", "crash", "ok"]
        np.testing.assert_array_equal(out.scores, [1.0, 0.0, 0.0, 0.0, 0.0])
        assert pool.stats.crashes == 3 and pool.stats.worker_restarts == 1
        assert "user reward bug" in out.errors[1] and "non-finite" in out.errors[2] and "exit code 3" in out.errors[3]
    assert caplog.text.count("crash, scored 0") == 3


def test_pool_in_process_mode_counts_crashes():
    with RewardPool(crashing_reward, num_workers=0) as pool:
        out = pool.score(["a", "boom"], ["a", "a"])
    assert out.status == ["ok", "crash"] and out.scores.tolist() == [1.0, 0.0]


def test_pool_rejects_bad_arguments():
    with pytest.raises(ValueError, match="timeout_s"):
        RewardPool("math", num_workers=0, timeout_s=0)
    with RewardPool("exact_match", num_workers=0) as pool:
        with pytest.raises(ValueError, match="2 responses but 1 ground truths"):
            pool.score(["a", "b"], ["a"])
