"""The built-in reasoning task: follow a chain of links, writing each hop, answer in ``\\boxed{}``.

A problem (the user turn) and its worked solution (the response) look like::

    Start at 3 and follow the links sevenone threeseven fivethree onefour .
    3 threeseven=7 sevenone=1 onefour=4 \\boxed{4}

The prompt lists links between digits in a shuffled order (``sevenone`` means 7 -> 1), some of
them distractors off the path that lead to dead ends. The response copies the start, then for
every hop writes the link it follows and the digit it lands on, and stops at the digit that has no
outgoing link. The answer depends on a short multi-step computation written in the response: one
misread hop sends the rest of the chain off the path, so pass@1 falls with the number of hops
while pass@k rises with k, the shape RL on math shows.

Why this task and these spellings: the toy tokenizer is a Qwen2-style byte-level BPE (so that
``transformers`` loads it as the Qwen2 tokenizer it forces on ``model_type: qwen2``); its
pre-tokenizer splits digits and punctuation into single pieces while a letters-only word such as
``threeseven`` is one piece and, after BPE, one token. Each hop is then two retrievals a 2-layer
model learns in a minute of CPU training: find the link whose first digit is the current one (by
content), and read its second digit. (Arithmetic steps such as ``8*2 mod 10`` need a learned
two-token interaction that a model this small does not pick up in that time.)

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

NUM_NODES = 10  # digits 0-9
NUMBER_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
PROBLEM_PREFIX = "Start at"
PROBLEM_MIDDLE = "and follow the links"


@dataclass(frozen=True)
class ToyTaskConfig:
    """Shape of the generated problems."""

    min_hops: int = 2
    max_hops: int = 4
    distractors: int = 2  # links from digits off the path (each points into the path)

    def __post_init__(self):
        if not 1 <= self.min_hops <= self.max_hops <= 6:
            raise ValueError(
                f"ToyTaskConfig: need 1 <= min_hops <= max_hops <= 6, got min_hops={self.min_hops}, max_hops={self.max_hops}"
            )
        if not 0 <= self.distractors <= NUM_NODES - self.max_hops - 2:  # at least one dead end left
            raise ValueError(f"ToyTaskConfig: distractors must be in [0, {NUM_NODES - self.max_hops - 2}], got {self.distractors}")


@dataclass(frozen=True)
class ToyProblem:
    start: int
    links: tuple[tuple[int, int], ...]  # (from, to) in the order the prompt lists them

    def __post_init__(self):
        sources = [a for a, _ in self.links]
        if len(set(sources)) != len(sources):
            raise ValueError(f"toy task: a digit has two outgoing links: {self.links}")

    @property
    def path(self) -> list[int]:
        """Digits visited from the start until one without an outgoing link."""
        table = dict(self.links)
        out = [self.start]
        while out[-1] in table:
            out.append(table[out[-1]])
            if len(out) > len(self.links) + 1:
                raise ValueError(f"toy task: the links form a cycle: {self.links}")
        return out

    @property
    def answer(self) -> int:
        return self.path[-1]

    @property
    def hops(self) -> int:
        return len(self.path) - 1


def link_word(a: int, b: int) -> str:
    """``(3, 7) -> "threeseven"``: a link as one letters-only word."""
    return f"{NUMBER_NAMES[a]}{NUMBER_NAMES[b]}"


def problem_text(p: ToyProblem) -> str:
    links = " ".join(link_word(a, b) for a, b in p.links)
    return f"{PROBLEM_PREFIX} {p.start} {PROBLEM_MIDDLE} {links} ."


# Equivalent ways to write a hop ("threeseven=7", "threeseven:7", ...), with the frequencies the
# warm-start data uses them. Why the task has them: AEPO moves entropy by REINFORCE on positive
# samples drawn at T != 1, which can only change the policy's entropy where *correct* responses
# differ. A task with one correct token sequence has no such room (its entropy only ever falls, as
# the reasoning tokens sharpen); an LLM's free choices of wording are what these stand for. The
# skew leaves room both ways: uniform over the four is ln 4 = 1.39 nats a hop, these give 1.13.
SEPARATORS = ("=", ":", ">", "~")
SEPARATOR_WEIGHTS = (0.55, 0.25, 0.12, 0.08)


def random_separators(n: int, rng: random.Random) -> list[str]:
    return rng.choices(SEPARATORS, weights=SEPARATOR_WEIGHTS, k=n)


def solution_text(p: ToyProblem, wrong_values: dict[int, int] | None = None,
                  separators: Sequence[str] | None = None) -> str:
    """The worked solution. ``wrong_values[i] = d`` writes ``d`` after hop ``i`` instead of the
    digit the link leads to (a misread) and goes on from ``d``: a self-consistent wrong chain,
    like a model's. ``separators[i]`` writes hop ``i`` with that symbol (default ``=``)."""
    wrong_values = wrong_values or {}
    separators = list(separators or [])
    table = dict(p.links)
    value = p.start
    words = [str(value)]
    # Misreads can revisit digits, but only the first len(links) hops may be misread (see
    # noisy_solution_text) and a correct walk from anywhere ends within len(links) hops.
    for i in range(2 * len(p.links) + 1):
        if value not in table:
            break
        nxt = table[value]
        written = wrong_values.get(i, nxt)
        sep = separators[i] if i < len(separators) else SEPARATORS[0]
        words.append(f"{link_word(value, nxt)}{sep}{written}")
        value = written
    words.append(f"\\boxed{{{value}}}")
    return " ".join(words)


# Some links are harder to read than others (a fixed function of the link), so problems differ in
# difficulty and pass@k climbs gradually instead of saturating at k = 4.
LINK_DIFFICULTY = (0.3, 1.0, 1.8)  # mean 1.03: a hop's misread probability is noise * this


def link_noise(a: int, b: int, noise: float) -> float:
    return min(0.95, noise * LINK_DIFFICULTY[(3 * a + 7 * b) % len(LINK_DIFFICULTY)])


def noisy_solution_text(p: ToyProblem, noise: float, rng: random.Random) -> str:
    """A worked solution in which the hop over link (a, b) is misread with probability
    ``link_noise(a, b, noise)``. A misread writes a digit off the path (so it never reaches the
    answer by luck) and the walk goes on from there: into a distractor's dead end, or it stops."""
    table = dict(p.links)
    path = p.path
    off_path = [d for d in range(NUM_NODES) if d not in path]
    wrong: dict[int, int] = {}
    value = p.start
    for i in range(p.hops):
        if value not in table:
            break
        nxt = table[value]
        if rng.random() < link_noise(value, nxt, noise):
            nxt = rng.choice(off_path)
            wrong[i] = nxt
        value = nxt
    return solution_text(p, wrong, random_separators(2 * len(p.links) + 1, rng))


_NAME_RE = "|".join(NUMBER_NAMES)
_LINK_RE = re.compile(rf"({_NAME_RE})({_NAME_RE})")
_PROBLEM_RE = re.compile(rf"^{PROBLEM_PREFIX} (\d) {PROBLEM_MIDDLE} ((?:[a-z]+ )+)\.$")


def parse_problem(text: str) -> ToyProblem:
    """Inverse of :func:`problem_text`; raises ValueError naming the text on anything else."""
    m = _PROBLEM_RE.match(text.strip())
    if not m:
        raise ValueError(f"toy task: not a toy problem: {text!r}")
    links = []
    for word in m.group(2).split():
        w = _LINK_RE.fullmatch(word)
        if not w:
            raise ValueError(f"toy task: {word!r} is not a link <digit name><digit name>: {text!r}")
        links.append((NUMBER_NAMES.index(w.group(1)), NUMBER_NAMES.index(w.group(2))))
    return ToyProblem(start=int(m.group(1)), links=tuple(links))


def solve(text: str) -> int:
    """Recompute the answer of a problem from its text."""
    return parse_problem(text).answer


def random_problem(rng: random.Random, cfg: ToyTaskConfig) -> ToyProblem:
    hops = rng.randint(cfg.min_hops, cfg.max_hops)
    nodes = rng.sample(range(NUM_NODES), NUM_NODES)
    path = nodes[: hops + 1]
    links = [(path[i], path[i + 1]) for i in range(hops)]
    # Distractors leave digits off the path and end in dead ends off the path: "which link starts
    # here" is a real lookup, and a walk that left the path never finds its way back.
    sources = nodes[hops + 1 : hops + 1 + cfg.distractors]
    dead_ends = nodes[hops + 1 + cfg.distractors :]
    for d in sources:
        links.append((d, rng.choice(dead_ends)))
    rng.shuffle(links)
    return ToyProblem(start=path[0], links=tuple(links))


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


def corpus_texts() -> list[str]:
    """Texts that together contain every word and symbol the task can produce (the toy
    tokenizer is trained on them, so each of these pieces becomes a single token)."""
    texts = []
    for a in range(NUM_NODES):
        for b in range(NUM_NODES):
            if a != b:
                texts.append(f"{PROBLEM_PREFIX} {a} {PROBLEM_MIDDLE} {link_word(a, b)} .")
                sep = SEPARATORS[(a + b) % len(SEPARATORS)]
                texts.append(f"{a} {link_word(a, b)}{sep}{(a + b) % NUM_NODES} \\boxed{{{b}}}")
    return texts
