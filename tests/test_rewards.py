"""Rewards: math answer checking on tricky cases, the exact-match reward, extraction in linear time
on adversarial responses, the registry, and the process pool and in-process scoring (timeouts and
crashes score 0 and are counted, never hidden)."""

from __future__ import annotations

import logging
import signal
import threading
import time

import numpy as np
import pytest

from aepo_jax.rewards import (
    RewardPool,
    exact_match_reward,
    extract_answer,
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


@pytest.mark.parametrize(
    "text,expected",
    [
        ("The answer is 5. But wait, the answer is 6.", "6"),
        ("so the final answer is: $x^2$. done", "x^2"),
        ("Answer: 12\nthanks", "12"),
        ("answer is\n\n42", "42"),
        ("the answer is 7.\n#### 8", "8"),
        ("#### 8\nthe answer is 7.", "7"),
        ("the answer is $x and then", None),  # a "$" before the sentence ends: no answer there
        ("the answer is 3. the answer is $y", "3"),  # ... so the previous phrase counts
        ("answer: $$", None),
        ("the answer is 4.   \n", "4"),
    ],
)
def test_extract_answer_phrases(text, expected):
    assert extract_answer(text) == expected


# Responses a model (or an attacker) can write; each ~100k characters. A quadratic scan takes
# minutes on these (the old extractor: 92 s on '\boxed{' * 20000), a linear one milliseconds.
N = 100_000
ADVERSARIAL = {
    "open boxes": ("\\boxed{" * (N // 7), None),
    "open boxes then one closed": ("\\boxed{" * (N // 7) + "7}", "7"),
    "a box then open boxes": ("\\boxed{1}" + "\\boxed{" * (N // 7), "1"),
    "boxes before spaces": ("\\boxed " * (N // 7), "\\boxed"),  # a bare box takes the next token
    "bare boxes before $": ("\\boxed $" * (N // 8), None),
    "one box, deep braces": ("\\boxed" + "{" * N, None),
    "closing and opening": ("\\boxed{" + "}{" * (N // 2), ""),
    "escaped braces": ("\\fbox{\\{" * (N // 8), None),
    "phrases then $": ("answer is " * (N // 10) + "$", None),
    "phrase, spaces, word": ("answer is x" + " " * N + "y", "x" + " " * N + "y"),
    "phrases with $": ("answer: $" * (N // 9), "answer:"),  # the $...$ after the last-but-one
    "hashes": ("#### " * (N // 5), ("#### " * (N // 5))[5:].strip()),  # one match: the rest of the line
    "hash then spaces": ("####" + " " * N, None),
    "phrase lines then $": ("answer is x\n" * (N // 12) + "$", "x"),
    "text braces": ("\\text{a" + " " * N + "b", None),
}


@pytest.mark.parametrize("name", list(ADVERSARIAL))
def test_extraction_is_linear_on_adversarial_responses(name):
    text, expected = ADVERSARIAL[name]
    t0 = time.perf_counter()
    got = extract_answer(text)
    exact_match_reward(text, "1")
    extract_boxed(text)
    took = time.perf_counter() - t0
    assert got == expected
    # Generous: the linear extractors take ~0.1 s here on a loaded 2-core machine, quadratic ones minutes.
    assert took < 5.0, f"{name}: {took:.1f} s"


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


def stubborn_reward(response: str, ground_truth: str) -> float:
    """A user reward that overruns on some inputs, in the ways a signal can and cannot stop."""
    if response == "spin":
        while True:  # pure Python: interruptible
            pass
    if response == "swallow":
        try:
            while True:
                pass
        except Exception:  # noqa: BLE001 - a broad handler must not hide the timeout
            return 1.0
    if response == "late":
        try:
            time.sleep(3.0)
        except BaseException:  # noqa: BLE001 - swallows even the interruption, then returns late
            time.sleep(0.5)
            return 1.0
    return float(response == ground_truth)


INPUTS = (["a", "spin", "b", "swallow", "late", "c"], ["a", "x", "b", "x", "x", "x"])


def _assert_stubborn_scored(out, pool, before=0):
    assert out.status == ["ok", "timeout", "ok", "timeout", "timeout", "ok"], out.errors
    np.testing.assert_array_equal(out.scores, [1.0, 0.0, 1.0, 0.0, 0.0, 0.0])
    assert out.timeouts == 3 and pool.stats.timeouts == before + 3 and pool.stats.crashes == 0


def test_in_process_rewards_are_under_the_time_limit(caplog):
    """num_workers=0 (how the trainer scores toy / exact_match) still stops a reward that overruns:
    it scores 0 and counts as a timeout, and an alarm set by someone else survives."""
    fired = []
    previous = signal.signal(signal.SIGALRM, lambda *a: fired.append(1))
    outer_left = signal.getitimer(signal.ITIMER_REAL)[0]
    signal.setitimer(signal.ITIMER_REAL, 60.0)
    try:
        with RewardPool(f"{__name__}:stubborn_reward", num_workers=0, timeout_s=0.5) as pool:
            t0 = time.monotonic()
            with caplog.at_level(logging.WARNING, logger="aepo_jax.rewards.pool"):
                out = pool.score(*INPUTS)
            took = time.monotonic() - t0
            _assert_stubborn_scored(out, pool)
            assert took < 10, took
            assert "sample 1 timeout" in caplog.text and "returned late" in out.errors[4]
        left = signal.getitimer(signal.ITIMER_REAL)[0]
        assert 60.0 - took - 5 < left <= 60.0 - took + 0.1 and not fired  # the outer alarm kept its time
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        if outer_left:
            signal.setitimer(signal.ITIMER_REAL, outer_left)


def test_in_process_rewards_off_the_main_thread_use_a_worker():
    with RewardPool(f"{__name__}:stubborn_reward", num_workers=0, timeout_s=1.0) as pool:
        result = {}
        t = threading.Thread(target=lambda: result.setdefault("out", pool.score(*INPUTS)))
        t.start()
        t.join(120)
        assert not t.is_alive()
        _assert_stubborn_scored(result["out"], pool)
        assert pool.score(["a"], ["a"]).scores.tolist() == [1.0]  # the main thread scores in-process again


def test_toy_reward_on_adversarial_boxes_is_fast_in_process():
    """The probe: '\\boxed{' * 20000 through the trainer's in-process toy reward took 92 s."""
    with RewardPool("toy", num_workers=0, timeout_s=10.0) as pool:
        t0 = time.monotonic()
        out = pool.score(["\\boxed{" * 20000, "\\boxed{" * 20000 + "3}"], ["3", "3"])
        assert time.monotonic() - t0 < 5
    assert out.status == ["ok", "ok"] and out.scores.tolist() == [0.0, 1.0]


@pytest.mark.parametrize("workers", [0, 1])
def test_a_closed_pool_refuses_to_score(workers):
    from aepo_jax.rewards.pool import RewardPoolError

    pool = RewardPool("toy", num_workers=workers, timeout_s=10.0)
    assert pool.score(["\\boxed{3}"], ["3"]).scores.tolist() == [1.0]
    pool.close()
    with pytest.raises(RewardPoolError, match="after close"):
        pool.score(["\\boxed{3}"], ["3"])


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
