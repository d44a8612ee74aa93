"""The built-in reasoning task: follow a chain of links, writing each hop, answer in ``\\boxed{}``.

A problem (the user turn) and its worked solution (the response) look like::

    Start at 3 and follow the links sevenone threeseven fivethree onefour .
    okay so now 3 threeseven=7 sevenone=>1 onefour=4 \\boxed{4}

The prompt lists links between digits in a shuffled order (``sevenone`` means 7 -> 1), some of
them distractors off the path that lead to dead ends. The response copies the start, then for
every hop writes the link it follows and the digit it lands on, and stops at the digit that has no
outgoing link. The three filler words that open the response and the separator of each hop are
free choices among 32 equivalent spellings each (see ``FILLERS``). The answer depends on a short multi-step computation written in the response: one
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

import functools
import json
import math
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


# Free choices of wording. A response opens with three filler words and writes each hop as
# ``<link><separator><digit>``, e.g. ``okay so now 3 threeseven=7 ...`` or
# ``then hence go 3 threeseven~>7 ...``: 32 words per filler slot and 32 separators, all equally
# correct. Why the task has them: AEPO moves entropy by REINFORCE on positive samples drawn at
# T != 1, which can only change the policy's entropy where *correct* responses differ. A task with
# one correct token sequence has no such room (its entropy only ever falls, as the reasoning tokens
# sharpen); an LLM's free choices of wording are what these stand for. The warm-start data writes
# the plain choice (``okay so now``, ``=``) with probability FREE_CHOICE_MAIN and each other one
# with an equal share of the rest: 0.67 nats a choice, against ln 32 = 3.47 for a uniform pick, so
# the entropy of correct responses can move well below and well above the base model's
# (:func:`max_correct_entropy`, :func:`data_entropy`). The fillers open the response (rather than
# sitting between a digit and the next link) so that each hop stays the two-step lookup a 2-layer
# model learns quickly: the link right after the digit it starts from, the digit two tokens after
# its link.
FILLERS = (
    "okay", "so", "now", "then", "thus", "hence", "next", "also",
    "again", "onward", "later", "go", "well", "right", "sure", "fine",
    "therefore", "first", "indeed", "clearly", "simply", "here", "alright", "begin",
    "start", "look", "see", "note", "yes", "good", "hmm", "ready",
)
FILLER_SLOTS = 3  # filler words at the start of every response
SEPARATORS = (
    "=", ":", ">", "~", "-", "|", "/", ";", "^", "*", "+", "!", "?", "<", "&", "@",
    "->", "=>", ":=", "~>", "==", "::", ">>", "--", "|>", "//", ";;", "^^", "**", "++", "!!", "<>",
)
FREE_CHOICE_MAIN = 0.9  # probability of the plain choice in the warm-start data


def free_choice_weights(n: int, plain: int = 0) -> tuple[float, ...]:
    """The warm-start data's distribution over ``n`` equivalent choices, ``plain`` the likely one."""
    rest = (1.0 - FREE_CHOICE_MAIN) / (n - 1)
    return tuple(FREE_CHOICE_MAIN if i == plain else rest for i in range(n))


def random_wording(n_hops: int, rng: random.Random) -> tuple[list[str], list[str]]:
    """Filler words and ``n_hops`` separators, drawn as the warm-start data draws them."""
    fillers = [rng.choices(FILLERS, weights=free_choice_weights(len(FILLERS), slot))[0] for slot in range(FILLER_SLOTS)]
    seps = rng.choices(SEPARATORS, weights=free_choice_weights(len(SEPARATORS)), k=n_hops)
    return fillers, seps


PLAIN_FILLERS = FILLERS[:FILLER_SLOTS]


def solution_text(p: ToyProblem, wrong_values: dict[int, int] | None = None,
                  separators: Sequence[str] | None = None, fillers: Sequence[str] | None = None,
                  variant: str = "default") -> str:
    """The worked solution. ``wrong_values[i] = d`` writes ``d`` after hop ``i`` instead of the
    digit the link leads to (a misread) and goes on from ``d``: a self-consistent wrong chain,
    like a model's. It opens with ``fillers`` (default ``okay so now``) and writes hop ``i`` with
    ``separators[i]`` (default ``=``). ``variant``: the task's response grammar (:data:`VARIANTS`);
    ``default`` opens with exactly :data:`FILLER_SLOTS` fillers, ``length`` with any number from 0
    to :data:`LENGTH_MAX_FILLERS`."""
    wrong_values = wrong_values or {}
    separators = list(separators or [])
    fillers = list(fillers) if fillers is not None else list(PLAIN_FILLERS)
    check_fillers(fillers, variant)
    table = dict(p.links)
    value = p.start
    words = [*fillers, str(value)]
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


# --- the length variant -------------------------------------------------------------------------
# The default grammar fixes the length of a correct answer: three fillers, three tokens a hop, so
# answers to one question differ by a token or two (the separators) and a length target has nothing
# to move. The ``length`` variant is the same task (the same problems, answers and reward) whose
# responses open with a FREE NUMBER of filler words, 0 to LENGTH_MAX_FILLERS, every count equally
# correct: ``okay 3 threeseven=7 ...`` and ``okay hmm okay okay okay 3 threeseven=7 ...`` both answer
# right. Its base model (``aepo_jax.toy``, recipe variant ``length``) learns a spread of counts, so the
# mean correct length can move well below and well above the base's while every answer stays right.
#
# Why the extra words open the response (and not between hops): each hop stays the two-step lookup
# the 2-layer model learns quickly (the link right after the digit it starts from), so the variant's
# base reads hops as well as the default's. Why a geometric count: whether to write one more word is
# then the same choice at every position (a constant stop probability, which a tiny model learns
# exactly, with no counting), and the base draws short and long answers alike.
VARIANTS = ("default", "length")
LENGTH_MAX_FILLERS = 32  # the warm-start data never writes more (the reward accepts any count)
LENGTH_FILLER_CONTINUE = 0.94  # warm-start data: P(one more filler word); the count is geometric, capped


def check_variant(variant: str) -> str:
    if variant not in VARIANTS:
        raise ValueError(f"toy task: variant {variant!r} is not one of {list(VARIANTS)}")
    return variant


def check_fillers(fillers: Sequence[str], variant: str = "default") -> None:
    """The opening filler words the grammar of ``variant`` allows (ValueError naming them otherwise)."""
    if check_variant(variant) == "default":
        if len(fillers) != FILLER_SLOTS:
            raise ValueError(f"toy task: expected {FILLER_SLOTS} filler words, got {list(fillers)}")
    elif not 0 <= len(fillers) <= LENGTH_MAX_FILLERS:
        raise ValueError(f"toy task (length variant): expected 0 to {LENGTH_MAX_FILLERS} filler words, got {len(fillers)}")
    bad = [w for w in fillers if w not in FILLERS]
    if bad:
        raise ValueError(f"toy task: {bad} are not filler words (see FILLERS)")


def length_filler_weights() -> tuple[float, ...]:
    """The length variant's warm-start distribution over the number of filler words, 0 to
    :data:`LENGTH_MAX_FILLERS`: geometric (one more word with probability LENGTH_FILLER_CONTINUE),
    renormalised over the allowed counts."""
    w = [(1.0 - LENGTH_FILLER_CONTINUE) * LENGTH_FILLER_CONTINUE ** k for k in range(LENGTH_MAX_FILLERS + 1)]
    total = sum(w)
    return tuple(x / total for x in w)


def length_variant_wording(n_hops: int, rng: random.Random) -> tuple[list[str], list[str]]:
    """Filler words (a free count, each word drawn as the default's first slot) and ``n_hops``
    separators, as the length variant's warm-start data draws them."""
    count = rng.choices(range(LENGTH_MAX_FILLERS + 1), weights=length_filler_weights())[0]
    fillers = rng.choices(FILLERS, weights=free_choice_weights(len(FILLERS)), k=count)
    seps = rng.choices(SEPARATORS, weights=free_choice_weights(len(SEPARATORS)), k=n_hops)
    return fillers, seps


def response_length_range(p: ToyProblem, variant: str = "default") -> tuple[int, int]:
    """Shortest and longest correct response to ``p`` (tokens, EOS included) under ``variant``'s grammar."""
    if check_variant(variant) == "default":
        return response_tokens(p), response_tokens(p)
    # with no filler the start digit opens the response, and the space before it goes too
    base = response_tokens(p) - FILLER_SLOTS
    return base - 1, base + LENGTH_MAX_FILLERS


# Tokens of a worked solution (every task word is one token, see toy_tokenizer): the fillers, a space
# and the start digit (Qwen2's pre-tokenizer never joins a space to a digit), three per hop (link,
# separator, digit), five for `` \\boxed{d}``, and EOS.
TOKENS_PER_HOP = 3
FIXED_RESPONSE_TOKENS = FILLER_SLOTS + 2 + 5 + 1
# The length variant's longest correct answer on the built-in problems (the most hops, every filler):
# a rollout budget below it cuts correct answers off (the trainer's config check refuses it).
LENGTH_MIN_NEW_TOKENS = FIXED_RESPONSE_TOKENS - FILLER_SLOTS + TOKENS_PER_HOP * ToyTaskConfig().max_hops + LENGTH_MAX_FILLERS


def response_tokens(p: ToyProblem) -> int:
    """Tokens of a correct response to ``p``, EOS included (the same for every correct wording)."""
    return TOKENS_PER_HOP * p.hops + FIXED_RESPONSE_TOKENS


def _entropy(weights: Sequence[float]) -> float:
    return -sum(w * math.log(w) for w in weights if w > 0)


def max_correct_entropy(p: ToyProblem) -> float:
    """The largest token-mean entropy (nats/token) of a policy that only writes correct responses
    to ``p``, exactly: every correct response has :func:`response_tokens` tokens and its only free
    tokens are the fillers and each hop's separator, so the maximum is the uniform pick,
    ``(FILLER_SLOTS * ln |FILLERS| + hops * ln |SEPARATORS|) / response_tokens``."""
    return (FILLER_SLOTS * math.log(len(FILLERS)) + p.hops * math.log(len(SEPARATORS))) / response_tokens(p)


def data_entropy(p: ToyProblem, noise: float) -> float:
    """Token-mean entropy (nats/token) of the warm-start data's next-token distribution along the
    correct path of ``p``: what a base model that fits its data exactly shows on ``p`` (the
    entropy the RL run starts from). The fillers; per hop the separator and the digit, misread
    with probability ``q = link_noise`` into one of the digits off the path."""
    off_path = NUM_NODES - len(p.path)
    total = sum(_entropy(free_choice_weights(len(FILLERS), slot)) for slot in range(FILLER_SLOTS))
    for a, b in zip(p.path, p.path[1:]):
        q = link_noise(a, b, noise)
        total += _entropy(free_choice_weights(len(SEPARATORS))) + _entropy((1.0 - q, q)) + q * math.log(off_path)
    return total / response_tokens(p)


# Some links are harder to read than others (a fixed function of the link), so problems differ in
# difficulty and pass@k climbs gradually instead of saturating at k = 4.
LINK_DIFFICULTY = (0.3, 1.0, 1.8)  # mean 1.03: a hop's misread probability is noise * this


def link_noise(a: int, b: int, noise: float) -> float:
    return min(0.95, noise * LINK_DIFFICULTY[(3 * a + 7 * b) % len(LINK_DIFFICULTY)])


def noisy_solution_text(p: ToyProblem, noise: float, rng: random.Random, variant: str = "default") -> str:
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
    if check_variant(variant) == "default":
        fillers, separators = random_wording(2 * len(p.links) + 1, rng)
    else:
        fillers, separators = length_variant_wording(2 * len(p.links) + 1, rng)
    return solution_text(p, wrong, separators, fillers, variant)


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


HELD_OUT_SIZE = 256  # the held-out split's size (eval, validation and the reproduction study score on it)


@functools.lru_cache(maxsize=8)
def _held_out(cfg: "ToyTaskConfig") -> frozenset:
    """Seed 0's first :data:`HELD_OUT_SIZE` distinct test problems: the held-out split."""
    rng = random.Random("toy-test-0")
    out: set[ToyProblem] = set()
    for _ in range(100 * HELD_OUT_SIZE + 100):
        if len(out) == HELD_OUT_SIZE:
            break
        out.add(random_problem(rng, cfg))
    return frozenset(out)


def make_splits(
    seed: int = 0, n_train: int = 4096, n_test: int = 256, cfg: ToyTaskConfig = ToyTaskConfig()
) -> tuple[list[ToyProblem], list[ToyProblem]]:
    """Disjoint train and test problems, deterministic given ``seed``.

    The test split is drawn first from its own stream, so it does not change when ``n_train``
    does; train problems that collide with a test problem are redrawn. Whatever the seed, train
    also never holds a problem of the held-out split every evaluation uses (seed 0's first
    :data:`HELD_OUT_SIZE` test problems), so a model trained under any seed is scored on unseen problems.
    """
    test_rng = random.Random(f"toy-test-{seed}")
    train_rng = random.Random(f"toy-train-{seed}")
    test: list[ToyProblem] = []
    seen: set[ToyProblem] = set(_held_out(cfg))
    drawn: set[ToyProblem] = set()
    for _ in range(100 * n_test + 100):
        if len(test) == n_test:
            break
        p = random_problem(test_rng, cfg)
        if p not in drawn:
            drawn.add(p)
            test.append(p)
    seen |= drawn
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
                i = a * NUM_NODES + b
                fill = " ".join(FILLERS[(i + k) % len(FILLERS)] for k in range(FILLER_SLOTS))
                sep = SEPARATORS[i % len(SEPARATORS)]
                texts.append(f"{fill} {a} {link_word(a, b)}{sep}{(a + b) % NUM_NODES} \\boxed{{{b}}}")
    return texts
