"""The built-in reasoning task: a chain of modular arithmetic steps with a worked answer.

A problem (the user turn) and its worked solution (the response) look like::

    Start at 3 then a+5 b*2 c-4 modulo 10 .
    3 a+5 8 b*2 6 c-4 2 \\boxed{2}

The response copies the start value, then for each lettered step writes the operation and the
running value after it (mod 10), and ends with the final value in ``\\boxed{}``. The answer therefore depends
on a short multi-step computation written in the response: one wrong step makes the rest of the
chain (and the box) wrong, so pass@1 falls with the number of steps while pass@k rises with k, the
shape RL on math shows. Each whitespace-separated word is one token of the toy tokenizer
(:mod:`aepo_jax.data.toy_base`); the operation words carry their step letter (``b*2``), which lets
a 2-layer model find "the next step" by content instead of by counting.

Everything is generated from a seed; :func:`solve` recomputes an answer from the problem text
(what the tests use to check every answer).
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

MODULUS = 10
STEP_LETTERS = "abcde"
OPS = "+-*"
PROBLEM_PREFIX = "Start at"
PROBLEM_SUFFIX = f"modulo {MODULUS} ."


@dataclass(frozen=True)
class ToyTaskConfig:
    """Shape of the generated problems."""

    min_steps: int = 2
    max_steps: int = 5

    def __post_init__(self):
        if not 1 <= self.min_steps <= self.max_steps <= len(STEP_LETTERS):
            raise ValueError(
                f"ToyTaskConfig: need 1 <= min_steps <= max_steps <= {len(STEP_LETTERS)}, "
                f"got min_steps={self.min_steps}, max_steps={self.max_steps}"
            )


@dataclass(frozen=True)
class ToyProblem:
    start: int
    steps: tuple[tuple[str, int], ...]  # (op, operand) per step

    @property
    def answer(self) -> int:
        return chain_values(self.start, self.steps)[-1]


def apply_op(value: int, op: str, operand: int) -> int:
    if op == "+":
        return (value + operand) % MODULUS
    if op == "-":
        return (value - operand) % MODULUS
    if op == "*":
        return (value * operand) % MODULUS
    raise ValueError(f"toy task: unknown op {op!r}")


def chain_values(start: int, steps: Sequence[tuple[str, int]]) -> list[int]:
    """Running values: ``[start, after step 1, ..., after the last step]``."""
    values = [start]
    for op, operand in steps:
        values.append(apply_op(values[-1], op, operand))
    return values


def op_word(step_index: int, op: str, operand: int) -> str:
    return f"{STEP_LETTERS[step_index]}{op}{operand}"


def problem_text(p: ToyProblem) -> str:
    ops = " ".join(op_word(i, op, x) for i, (op, x) in enumerate(p.steps))
    return f"{PROBLEM_PREFIX} {p.start} then {ops} {PROBLEM_SUFFIX}"


def solution_text(p: ToyProblem, wrong_values: dict[int, int] | None = None) -> str:
    """The worked solution; ``wrong_values[i] = v`` writes ``v`` after step ``i`` instead of the
    right value and carries the mistake forward (a self-consistent wrong chain, like a model's)."""
    wrong_values = wrong_values or {}
    value = p.start
    words = [str(value)]
    for i, (op, x) in enumerate(p.steps):
        value = wrong_values.get(i, apply_op(value, op, x))
        words += [op_word(i, op, x), str(value)]
    words.append(f"\\boxed{{{value}}}")
    return " ".join(words)


_PROBLEM_RE = re.compile(
    rf"^{PROBLEM_PREFIX} (\d) then ((?:[{STEP_LETTERS}][{re.escape(OPS)}]\d ?)+) {re.escape(PROBLEM_SUFFIX)}$"
)


def parse_problem(text: str) -> ToyProblem:
    """Inverse of :func:`problem_text`; raises ValueError naming the text on anything else."""
    m = _PROBLEM_RE.match(text.strip())
    if not m:
        raise ValueError(f"toy task: not a toy problem: {text!r}")
    steps = []
    for i, word in enumerate(m.group(2).split()):
        if word[0] != STEP_LETTERS[i]:
            raise ValueError(f"toy task: step {i} is labelled {word[0]!r}, expected {STEP_LETTERS[i]!r}: {text!r}")
        steps.append((word[1], int(word[2])))
    return ToyProblem(start=int(m.group(1)), steps=tuple(steps))


def solve(text: str) -> int:
    """Recompute the answer of a problem from its text."""
    return parse_problem(text).answer


def random_problem(rng: random.Random, cfg: ToyTaskConfig) -> ToyProblem:
    n = rng.randint(cfg.min_steps, cfg.max_steps)
    steps = tuple((rng.choice(OPS), rng.randrange(MODULUS)) for _ in range(n))
    return ToyProblem(start=rng.randrange(MODULUS), steps=steps)


def make_splits(
    seed: int = 0, n_train: int = 4096, n_test: int = 256, cfg: ToyTaskConfig = ToyTaskConfig()
) -> tuple[list[ToyProblem], list[ToyProblem]]:
    """Disjoint train and test problems, deterministic given ``seed``.

    The test split is drawn first from its own stream, so it does not change when ``n_train``
    does; train problems that collide with a test problem are redrawn.
    """
    test_rng = random.Random(f"toy-test-{seed}")
    train_rng = random.Random(f"toy-train-{seed}")
    test: list[ToyProblem] = []
    seen: set[ToyProblem] = set()
    for _ in range(100 * n_test + 100):
        if len(test) == n_test:
            break
        p = random_problem(test_rng, cfg)
        if p not in seen:
            seen.add(p)
            test.append(p)
    train: list[ToyProblem] = []
    for _ in range(100 * n_train + 100):
        if len(train) == n_train:
            break
        p = random_problem(train_rng, cfg)
        if p not in seen:  # train may repeat itself (as real data does) but never holds a test problem
            train.append(p)
    if len(test) < n_test or len(train) < n_train:
        raise ValueError(f"toy task: could not draw {n_train} train / {n_test} test distinct problems with {cfg}")
    return train, test


def to_records(problems: Sequence[ToyProblem]) -> list[dict]:
    """Rows in the common ``{"prompt", "answer"}`` layout the dataset loader reads."""
    return [{"prompt": problem_text(p), "answer": str(p.answer), "data_source": "toy"} for p in problems]


def write_jsonl(records: Sequence[dict], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    tmp.replace(path)
    return path


def write_toy_dataset(out_dir: str | Path, seed: int = 0, n_train: int = 4096, n_test: int = 256) -> dict[str, Path]:
    """Write ``train.jsonl`` and ``test.jsonl`` under ``out_dir``; returns their paths."""
    train, test = make_splits(seed, n_train, n_test)
    out = Path(out_dir)
    return {"train": write_jsonl(to_records(train), out / "train.jsonl"), "test": write_jsonl(to_records(test), out / "test.jsonl")}


def vocabulary_words() -> list[str]:
    """Every word the task can produce, in a fixed order (the toy tokenizer's core vocabulary)."""
    words = PROBLEM_PREFIX.split() + ["then"] + PROBLEM_SUFFIX.split()
    words += [str(d) for d in range(MODULUS)]
    words += [op_word(i, op, x) for i in range(len(STEP_LETTERS)) for op in OPS for x in range(MODULUS)]
    words += [f"\\boxed{{{d}}}" for d in range(MODULUS)]
    out: list[str] = []
    for w in words:  # "10" in the suffix is not a digit word; keep first occurrences only
        if w not in out:
            out.append(w)
    return out
