"""avg@n, the unbiased pass@k estimator, and the per-benchmark summary and table: pure, no I/O.

``python -m aepo_jax.eval`` (:mod:`aepo_jax.eval`, which re-exports every name here) samples and
scores; this module turns per-problem correct counts into the numbers it reports.

* ``avg@n``: mean accuracy over the n samples (the pass@1 estimate the paper reports as e.g.
  AIME24x32);
* ``pass@k`` for each requested k <= n: the unbiased estimator of Chen et al. (2021),
  ``1 - C(n-c, k) / C(n, k)`` averaged over problems, computed as ``1 - prod_{i=n-c+1}^{n} (1 - k/i)``
  in log space (exact to float precision for n = 1024, where the binomials overflow a float).
  verl's ``best@k`` bootstrap is biased low (verl PR #7240); this is not that.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

__all__ = ["BenchmarkResult", "average_row", "avg_at_n", "default_ks", "format_table", "parse_ks", "pass_at_k",
           "summarize"]


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for one problem with ``c`` correct among ``n`` samples: ``1 - C(n-c,k)/C(n,k)``.

    Computed as ``1 - prod_{i=n-c+1}^{n} (1 - k/i)`` with log1p/expm1, so it stays accurate where
    the binomials are astronomically large (n = 1024) and where the result is tiny.
    """
    for name, v in (("n", n), ("c", c), ("k", k)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise TypeError(f"pass_at_k: {name} must be an int, got {v!r}")
    if n < 1 or not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k: need n >= 1, 0 <= c <= n, 1 <= k <= n; got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0  # every k-subset holds a correct sample
    if c == 0:
        return 0.0
    i = np.arange(n - c + 1, n + 1, dtype=np.float64)
    return float(-np.expm1(np.sum(np.log1p(-k / i))))


def avg_at_n(n: int, c: int) -> float:
    """Mean accuracy over the n samples of one problem (``c / n``)."""
    if n < 1 or not 0 <= c <= n:
        raise ValueError(f"avg_at_n: need n >= 1 and 0 <= c <= n; got n={n}, c={c}")
    return c / n


def default_ks(n: int) -> list[int]:
    """1, 2, 4, ... up to n (and n itself)."""
    ks = [1 << p for p in range(int(math.log2(n)) + 1)]
    return ks if ks[-1] == n else [*ks, n]


def parse_ks(spec: str | None, n: int) -> list[int]:
    if not spec:
        return default_ks(n)
    try:
        ks = sorted({int(s) for s in spec.split(",") if s.strip()})
    except ValueError:
        raise ValueError(f"--k: expected comma-separated integers, got {spec!r}") from None
    bad = [k for k in ks if not 1 <= k <= n]
    if bad or not ks:
        raise ValueError(f"--k: every k must be in [1, n={n}], got {spec!r}")
    return ks


@dataclass
class BenchmarkResult:
    name: str
    num_problems: int
    n: int
    avg_at_n: float
    pass_at_k: dict[int, float]
    files: list[str] = field(default_factory=list)
    skipped_rows: int = 0
    dropped_prompts: int = 0
    truncated_fraction: float = 0.0
    mean_response_tokens: float = 0.0
    # Mean -log p of the sampled tokens under the sampling distribution: at T = 1 an unbiased
    # estimate of the policy's token entropy (nats); NaN when the servers return no log-probs.
    mean_token_nll: float = float("nan")
    reward_timeouts: int = 0
    reward_crashes: int = 0
    per_problem_correct: list[int] = field(default_factory=list, repr=False)


def summarize(name: str, correct: Sequence[int], n: int, ks: Sequence[int], **extra) -> BenchmarkResult:
    """Per-benchmark avg@n and pass@k (means over problems) from per-problem correct counts."""
    correct = [int(c) for c in correct]
    if not correct:
        raise ValueError(f"benchmark {name!r}: no problems to summarise")
    return BenchmarkResult(
        name=name,
        num_problems=len(correct),
        n=n,
        avg_at_n=float(np.mean([avg_at_n(n, c) for c in correct])),
        pass_at_k={k: float(np.mean([pass_at_k(n, c, k) for c in correct])) for k in ks},
        per_problem_correct=correct,
        **extra,
    )


def average_row(results: Sequence[BenchmarkResult], ks: Sequence[int]) -> dict:
    """Unweighted mean over benchmarks (the paper's "Average" column)."""
    return {
        "avg_at_n": float(np.mean([r.avg_at_n for r in results])),
        "pass_at_k": {k: float(np.mean([r.pass_at_k[k] for r in results])) for k in ks},
    }


def format_table(results: Sequence[BenchmarkResult], ks: Sequence[int], n: int) -> str:
    """Plain-text table: one row per benchmark plus the average, values in percent."""
    head = ["benchmark", "problems", f"avg@{n}"] + [f"pass@{k}" for k in ks]
    rows = [[r.name, str(r.num_problems), f"{100 * r.avg_at_n:.2f}"] + [f"{100 * r.pass_at_k[k]:.2f}" for k in ks] for r in results]
    if len(results) > 1:
        avg = average_row(results, ks)
        rows.append(["average", str(sum(r.num_problems for r in results)), f"{100 * avg['avg_at_n']:.2f}"]
                    + [f"{100 * avg['pass_at_k'][k]:.2f}" for k in ks])
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(head)]
    line = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    return "\n".join([line(head), line(["-" * w for w in widths]), *map(line, rows)])
