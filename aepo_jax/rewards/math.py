"""Binary math reward: extract the final answer of a response and check it with math-verify.

``math_reward(response, ground_truth) -> 1.0 | 0.0``.

Extraction: the last ``\\boxed{...}`` / ``\\fbox{...}`` (braces matched, so ``\\boxed{\\frac{1}{2}}``
works), else the last "final answer is X" / "answer: X" / "#### X" phrase that has an answer. A
response with no extractable answer scores 0. Extraction takes time linear in the response's length
whatever it contains (``'\\boxed{' * 20000`` included).

Checking: a normalised string comparison first (cheap, and it covers answers math-verify cannot
parse, such as words), then math-verify's symbolic/numeric equivalence (fractions, decimals,
percentages, sets, intervals, equations such as ``x=3`` against ``3``).

Timeouts: math-verify's own timeouts use ``signal.alarm``, which raises in any non-main thread and
the exception used to be swallowed as a silent reward of 0 (verl PR #5635). We turn them off and
put a wall clock outside: :class:`aepo_jax.rewards.pool.RewardPool` runs this function in worker
processes and kills a worker that overruns (the robust path, used by the trainer and eval). A
direct call from the main thread still gets a best-effort ``SIGALRM`` guard
(:mod:`aepo_jax.rewards.clock`); a timeout there scores 0, is counted in :data:`DIRECT_CALL_STATS`
and logged. Pure-C work (a huge integer power)
cannot be interrupted by a signal, which is why the pool kills processes instead.
"""

from __future__ import annotations

import bisect
import logging
import re
from dataclasses import dataclass

from aepo_jax.rewards.clock import wall_clock_limit

logger = logging.getLogger(__name__)

# Every extractor below runs in time linear in the response (one regex pass or one scan each):
# responses are model output, and a quadratic scan of '\boxed{' * 20000 took minutes.
_BOX_COMMAND = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
_BRACE_TOKEN = re.compile(r"\\[{}]|[{}]")  # an escaped brace \{ or \} is content, not structure
_BARE_BOX_ARG = re.compile(r"\s*([^\s$]+)")


def _brace_partners(text: str) -> dict[int, int]:
    """``{index of "{": index of the "}" closing it}`` for every balanced brace, in one pass."""
    partners: dict[int, int] = {}
    stack: list[int] = []
    for m in _BRACE_TOKEN.finditer(text):
        tok = m.group()
        if len(tok) == 2:
            continue
        if tok == "{":
            stack.append(m.start())
        elif stack:
            partners[stack.pop()] = m.start()
    return partners


def extract_boxed(text: str) -> str | None:
    """Content of the last complete ``\\boxed{...}`` (or ``\\fbox{...}``, ``\\boxed 5``) in ``text``.

    Returns None when there is no complete box. An unbalanced last box falls back to the last
    balanced one before it (a model cut off mid-box still gets credit for an earlier box only if it
    wrote one). Linear in ``len(text)``.
    """
    ends = [m.end() for m in _BOX_COMMAND.finditer(text)]
    partners: dict[int, int] | None = None
    n = len(text)
    for end in reversed(ends):
        j = end
        while j < n and text[j] == " ":  # runs after different boxes are disjoint: linear overall
            j += 1
        if j < n and text[j] == "{":
            if partners is None:
                partners = _brace_partners(text)
            close = partners.get(j)
            if close is not None:
                return text[j + 1 : close].strip()
        elif end < n and text[end] == " ":
            # "\boxed 5": TeX takes the next single token as the argument.
            m = _BARE_BOX_ARG.match(text, end)
            if m:
                return m.group(1).rstrip(".")
    return None


_HASH_ANSWER = re.compile(r"####\s*([^\n]+)")
# "answer is X" / "final answer: $X$" / "The answer is X." -- X is a $...$ span if there is one,
# else the rest of the sentence: up to ". ", a newline or the end, a final "." dropped; a "$"
# before that end means no answer here.
_ANSWER_MARKER = re.compile(r"\banswer\s*(?:is\s*:?|:)\s*", re.IGNORECASE)
_PERIOD_THEN_SPACE = re.compile(r"\.(?=\s)")


def _last_answer_phrase(text: str) -> tuple[int, str] | None:
    """(start, answer) of the last "answer is X" phrase that has an answer, in one pass."""
    markers = list(_ANSWER_MARKER.finditer(text))
    if not markers:
        return None
    n = len(text)
    newlines = [m.start() for m in re.finditer(r"\n", text)]
    dollars = [m.start() for m in re.finditer(r"\$", text)]
    periods = [m.start() for m in _PERIOD_THEN_SPACE.finditer(text)]

    def first_at_or_after(positions: list[int], i: int, default: int) -> int:
        k = bisect.bisect_left(positions, i)
        return positions[k] if k < len(positions) else default

    content_end: dict[int, int] = {}  # line end -> end of the line without trailing whitespace

    def line_content_end(eol: int) -> int:
        if eol not in content_end:
            start = text.rfind("\n", 0, eol) + 1
            k = eol
            while k > start and text[k - 1].isspace():
                k -= 1
            content_end[eol] = k  # each line scanned once
        return content_end[eol]

    for m in reversed(markers):
        p = m.end()
        if p >= n:
            continue
        eol = first_at_or_after(newlines, p, n)
        if text[p] == "$":
            close = first_at_or_after(dollars, p + 1, n)
            if p + 1 < close < eol:
                return m.start(), text[p + 1 : close].strip()
            continue
        # The sentence ends at the first ". " after p, or at the line's end (less trailing
        # whitespace and one final ".").
        tail = max(p + 1, line_content_end(eol))
        if tail - 1 >= p + 1 and text[tail - 1] == ".":
            tail -= 1
        stop = min(first_at_or_after(periods, p + 1, n), tail)
        if first_at_or_after(dollars, p, n) < stop:
            continue
        return m.start(), text[p:stop].strip()
    return None


def extract_answer(text: str) -> str | None:
    """The response's final answer: last box, else the last final-answer phrase ("#### X",
    "answer is X", "answer: $X$"), else None. Linear in ``len(text)``."""
    boxed = extract_boxed(text)
    if boxed is not None:
        return boxed
    best: tuple[int, str] | None = None
    for m in _HASH_ANSWER.finditer(text):
        best = (m.start(), m.group(1).strip())
    phrase = _last_answer_phrase(text)
    if phrase is not None and (best is None or phrase[0] > best[0]):
        best = phrase
    if best is None or not best[1]:
        return None
    return best[1]


def normalize_answer(ans: str) -> str:
    """Cheap canonical form for the string fast path (never used to decide a mismatch)."""
    s = ans.strip()
    s = s.strip("$").strip()
    s = re.sub(r"\\(?:left|right|displaystyle|!|,|;|:)", "", s)
    s = re.sub(r"\\[dt]frac", r"\\frac", s)
    s = re.sub(r"\\text\{([^{}]*)\}", lambda m: m.group(1).strip(), s)
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


class RewardTimeout(BaseException):
    """Raised inside :func:`math_reward` by its main-thread wall-clock guard (a BaseException, so
    math-verify's and sympy's own ``except Exception`` blocks cannot swallow it)."""


@dataclass
class DirectCallStats:
    """Counts for calls of :func:`math_reward` made outside a :class:`RewardPool`."""

    calls: int = 0
    timeouts: int = 0


DIRECT_CALL_STATS = DirectCallStats()


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
        # SIGALRM guard when one can be armed (main thread; an earlier outer alarm stays in charge).
        with wall_clock_limit(timeout_s, lambda: RewardTimeout(f"math_reward exceeded {timeout_s} s")):
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
