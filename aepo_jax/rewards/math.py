"""Binary math reward: extract the final answer of a response and check it with math-verify.

``math_reward(response, ground_truth) -> 1.0 | 0.0``.

Extraction: the last ``\\boxed{...}`` / ``\\fbox{...}`` (braces matched, so ``\\boxed{\\frac{1}{2}}``
works), else the last "final answer is X" / "answer: X" / "#### X" phrase. A response with no
extractable answer scores 0.

Checking: a normalised string comparison first (cheap, and it covers answers math-verify cannot
parse, such as words), then math-verify's symbolic/numeric equivalence (fractions, decimals,
percentages, sets, intervals, equations such as ``x=3`` against ``3``).

Timeouts: math-verify's own timeouts use ``signal.alarm``, which raises in any non-main thread and
the exception used to be swallowed as a silent reward of 0 (verl PR #5635). We turn them off and
put a wall clock outside: :class:`aepo_jax.rewards.pool.RewardPool` runs this function in worker
processes and kills a worker that overruns (the robust path, used by the trainer and eval). A
direct call from the main thread still gets a best-effort ``SIGALRM`` guard; a timeout there
scores 0, is counted in :data:`DIRECT_CALL_STATS` and logged. Pure-C work (a huge integer power)
cannot be interrupted by a signal, which is why the pool kills processes instead.
"""

from __future__ import annotations

import logging
import re
import signal
import threading
from contextlib import contextmanager
from dataclasses import dataclass

logger = logging.getLogger(__name__)

_BOX_COMMANDS = ("\\boxed", "\\fbox")


def _matching_brace(text: str, open_idx: int) -> int | None:
    """Index of the ``}`` closing the ``{`` at ``open_idx``; None if unbalanced."""
    depth = 0
    i = open_idx
    while i < len(text):
        ch = text[i]
        if ch == "\\" and i + 1 < len(text) and text[i + 1] in "{}":
            i += 2  # an escaped brace \{ or \} is content, not structure
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    return None


def extract_boxed(text: str) -> str | None:
    """Content of the last complete ``\\boxed{...}`` (or ``\\fbox{...}``, ``\\boxed 5``) in ``text``.

    Returns None when there is no complete box. An unbalanced last box falls back to the last
    balanced one before it (a model cut off mid-box still gets credit for an earlier box only if it
    wrote one).
    """
    starts = sorted(
        (m.start(), m.end()) for cmd in _BOX_COMMANDS for m in re.finditer(re.escape(cmd) + r"(?![A-Za-z])", text)
    )
    for start, end in reversed(starts):
        j = end
        while j < len(text) and text[j] == " ":
            j += 1
        if j < len(text) and text[j] == "{":
            close = _matching_brace(text, j)
            if close is not None:
                return text[j + 1 : close].strip()
        elif end < len(text) and text[end] == " ":
            # "\boxed 5": TeX takes the next single token as the argument.
            m = re.match(r"\s*([^\s$]+)", text[end:])
            if m:
                return m.group(1).rstrip(".")
    return None


_FINAL_ANSWER_PATTERNS = [
    re.compile(r"####\s*([^\n]+)"),
    # "answer is X" / "final answer: $X$" / "The answer is X." -- X is a $...$ span if there is
    # one, else the rest of the sentence (up to ". ", a newline or the end).
    re.compile(
        r"\banswer\s*(?:is\s*:?|:)\s*(?:\$([^$\n]+)\$|([^\n$]+?)(?=\.\s|\.?\s*$|\n))",
        re.IGNORECASE | re.MULTILINE,
    ),
]


def extract_answer(text: str) -> str | None:
    """The response's final answer: last box, else the last final-answer phrase, else None."""
    boxed = extract_boxed(text)
    if boxed is not None:
        return boxed
    best: tuple[int, str] | None = None
    for pattern in _FINAL_ANSWER_PATTERNS:
        for m in pattern.finditer(text):
            value = next(g for g in m.groups() if g is not None)
            if best is None or m.start() > best[0]:
                best = (m.start(), value.strip())
    if best is None or not best[1]:
        return None
    return best[1]


def normalize_answer(ans: str) -> str:
    """Cheap canonical form for the string fast path (never used to decide a mismatch)."""
    s = ans.strip()
    s = s.strip("$").strip()
    s = re.sub(r"\\(?:left|right|displaystyle|!|,|;|:)", "", s)
    s = re.sub(r"\\[dt]frac", r"\\frac", s)
    s = re.sub(r"\\text\{\s*([^{}]*?)\s*\}", r"\1", s)
    s = re.sub(r"\s+", "", s)
    s = s.rstrip(".")
    return s


def normalize_ground_truth(ground_truth: str) -> str:
    """Dataset answers sometimes come boxed or in ``$...$``; reduce them to the bare answer."""
    gt = str(ground_truth).strip()
    boxed = extract_boxed(gt)
    if boxed is not None:
        gt = boxed
    return gt.strip().strip("$").strip()


# --- math-verify -------------------------------------------------------------------------------


def _math_verify():
    """Import math-verify lazily (sympy is slow to import) with its internal timeouts off."""
    import math_verify  # noqa: PLC0415
    import math_verify.grader as grader  # noqa: PLC0415
    import math_verify.parser as parser  # noqa: PLC0415

    # We pass parsing_timeout=None / timeout_seconds=None on purpose (the wall clock is ours, see
    # the module docstring); math-verify would otherwise log a warning about that on first use.
    parser.TIMEOUT_WARNING_SHOWN = True
    grader.TIMEOUT_WARNING_SHOWN = True
    return math_verify


_EXTRACTION_CONFIG = None


def _parse_boxed(answer: str):
    global _EXTRACTION_CONFIG
    mv = _math_verify()
    if _EXTRACTION_CONFIG is None:
        _EXTRACTION_CONFIG = [mv.LatexExtractionConfig(boxed_match_priority=0), mv.ExprExtractionConfig()]
    return mv.parse("\\boxed{" + answer + "}", _EXTRACTION_CONFIG, parsing_timeout=None)


def answers_equivalent(pred: str, gold: str) -> bool:
    """True when two bare answers are the same value (string fast path, then math-verify)."""
    if not pred.strip() or not gold.strip():
        return False
    if normalize_answer(pred) == normalize_answer(gold):
        return True
    mv = _math_verify()
    gold_parsed = _parse_boxed(gold)
    if not gold_parsed:
        logger.warning("math_reward: math-verify could not parse the ground truth %r; only exact strings match", gold[:200])
        return False
    pred_parsed = _parse_boxed(pred)
    if not pred_parsed:
        return False
    return bool(mv.verify(gold_parsed, pred_parsed, timeout_seconds=None))


# --- direct-call guard -------------------------------------------------------------------------


class RewardTimeout(Exception):
    """Raised inside :func:`math_reward` by its main-thread wall-clock guard."""


@dataclass
class DirectCallStats:
    """Counts for calls of :func:`math_reward` made outside a :class:`RewardPool`."""

    calls: int = 0
    timeouts: int = 0


DIRECT_CALL_STATS = DirectCallStats()


@contextmanager
def _alarm(timeout_s: float | None):
    """SIGALRM guard when it is safe to install one (main thread, no other interval timer)."""
    usable = (
        timeout_s is not None
        and timeout_s > 0
        and hasattr(signal, "setitimer")
        and threading.current_thread() is threading.main_thread()
        and signal.getitimer(signal.ITIMER_REAL)[0] == 0.0  # e.g. pytest-timeout owns it: leave it
    )
    if not usable:
        yield
        return

    def _raise(signum, frame):
        raise RewardTimeout(f"math_reward exceeded {timeout_s} s")

    previous = signal.signal(signal.SIGALRM, _raise)
    signal.setitimer(signal.ITIMER_REAL, timeout_s)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0.0)
        signal.signal(signal.SIGALRM, previous)


def math_reward(response: str, ground_truth: str, timeout_s: float | None = 10.0) -> float:
    """1.0 if the response's final answer equals ``ground_truth`` mathematically, else 0.0.

    ``timeout_s`` only applies to direct calls from the main thread (best effort, see the module
    docstring); use :class:`aepo_jax.rewards.pool.RewardPool` for a hard wall clock.
    """
    if not isinstance(response, str):
        raise TypeError(f"math_reward: response must be str, got {type(response).__name__}")
    DIRECT_CALL_STATS.calls += 1
    pred = extract_answer(response)
    if pred is None:
        return 0.0
    gold = normalize_ground_truth(ground_truth)
    try:
        with _alarm(timeout_s):
            return 1.0 if answers_equivalent(pred, gold) else 0.0
    except RewardTimeout:
        DIRECT_CALL_STATS.timeouts += 1
        logger.warning(
            "math_reward: timed out after %s s (scored 0; %d direct-call timeouts so far); answer %r",
            timeout_s,
            DIRECT_CALL_STATS.timeouts,
            pred[:200],
        )
        return 0.0
