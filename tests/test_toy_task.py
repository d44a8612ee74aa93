"""The built-in task: answers checked by recomputation, seeded splits, disjoint train/test, and the
worked solutions the base model learns from."""

from __future__ import annotations

import random
import re
from collections import Counter

import pytest

from aepo_jax.data import load_problems, toy_problems, toy_task
from aepo_jax.data.toy_task import ToyProblem, ToyTaskConfig
from aepo_jax.rewards import exact_match_reward, math_reward

NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def _recompute(text: str) -> int:
    """Independent of the module: read the words and follow the links here."""
    words = text.split()
    current = int(words[2])
    table = {}
    for w in words[7:-1]:
        m = re.fullmatch(f"({'|'.join(NAMES)})({'|'.join(NAMES)})", w)
        table[NAMES.index(m.group(1))] = NAMES.index(m.group(2))
    for _ in range(20):
        if current not in table:
            return current
        current = table[current]
    raise AssertionError(f"cycle in {text}")


def test_answers_are_right_by_recomputation():
    train, test = toy_task.make_splits(seed=0, n_train=2000, n_test=200)
    for p in train + test:
        text = toy_task.problem_text(p)
        assert _recompute(text) == p.answer == toy_task.solve(text)
        assert toy_task.parse_problem(text) == p
        # The worked solution ends in the answer and passes both rewards.
        sol = toy_task.solution_text(p)
        assert exact_match_reward(sol, str(p.answer)) == 1.0


def test_worked_solution_format_and_rewards():
    p = ToyProblem(start=3, links=((7, 1), (3, 7), (5, 3), (1, 4)))
    assert toy_task.problem_text(p) == "Start at 3 and follow the links sevenone threeseven fivethree onefour ."
    sol = toy_task.solution_text(p)
    assert sol == "okay so now 3 threeseven=7 sevenone=1 onefour=4 \\boxed{4}"
    assert p.hops == 3 and p.path == [3, 7, 1, 4]
    assert exact_match_reward(sol, "4") == 1.0 and math_reward(sol, "4") == 1.0
    worded = toy_task.solution_text(p, separators=["~>", ":", "<>"], fillers=["hmm", "well", "go"])
    assert worded == "hmm well go 3 threeseven~>7 sevenone:1 onefour<>4 \\boxed{4}"
    assert exact_match_reward(worded, "4") == 1.0
    # A misread is carried forward along the links that exist.
    assert toy_task.solution_text(p, {0: 5}) == (
        "okay so now 3 threeseven=5 fivethree=3 threeseven=7 sevenone=1 onefour=4 \\boxed{4}")
    assert toy_task.solution_text(p, {1: 9}) == "okay so now 3 threeseven=7 sevenone=9 \\boxed{9}"
    assert exact_match_reward(toy_task.solution_text(p, {1: 9}), "4") == 0.0
    with pytest.raises(ValueError, match="filler"):
        toy_task.solution_text(p, fillers=["okay"])


_HOP_RE = re.compile(r"([a-z]+?)(\W+)(\d)")


def test_noisy_solutions_follow_the_links_and_end():
    rng = random.Random(0)
    train, _ = toy_task.make_splits(seed=3, n_train=300, n_test=10)
    wrong = 0
    slot_counts, sep_counts = [Counter() for _ in range(toy_task.FILLER_SLOTS)], Counter()
    for p in train:
        sol = toy_task.noisy_solution_text(p, 0.3, rng)
        words = sol.split()
        fillers, start = words[: toy_task.FILLER_SLOTS], words[toy_task.FILLER_SLOTS]
        assert all(w in toy_task.FILLERS for w in fillers) and int(start) == p.start
        for counts, w in zip(slot_counts, fillers):
            counts[w] += 1
        hops = [_HOP_RE.fullmatch(w).groups() for w in words[toy_task.FILLER_SLOTS + 1: -1]]
        digits = [int(h[2]) for h in hops]
        final_wrong = int(sol.split("boxed{")[1][0]) != p.answer
        misread = digits[: p.hops] != p.path[1:]
        assert final_wrong == misread  # a misread never reaches the answer by luck
        wrong += final_wrong
        table = dict(p.links)
        cur = p.start
        for link, sep, d in hops:
            assert link == f"{NAMES[cur]}{NAMES[table[cur]]}"  # always the right link
            assert sep in toy_task.SEPARATORS
            sep_counts[sep] += 1
            cur = int(d)
        assert cur not in table  # the walk stops where no link leaves
    assert 0.2 < wrong / len(train) < 0.9
    # The plain wording dominates; the others occur (the free choices the base model learns).
    for counts, plain in [*zip(slot_counts, toy_task.PLAIN_FILLERS), (sep_counts, "=")]:
        assert 0.85 < counts[plain] / sum(counts.values()) < 0.95
        assert len(counts) > 16


def test_wordings_are_distinct_single_pieces():
    assert len(set(toy_task.FILLERS)) == len(toy_task.FILLERS) == 32
    assert len(set(toy_task.SEPARATORS)) == len(toy_task.SEPARATORS) == 32
    assert all(w.isalpha() and w.islower() for w in toy_task.FILLERS)
    # Separators are punctuation runs with no brace, backslash or dot (the answer box's and the
    # prompt's characters), so each is one pre-token piece between a link word and a digit.
    assert all(not any(c.isalnum() or c.isspace() or c in "{}\\.," for c in s) for s in toy_task.SEPARATORS)
    names = "|".join(NAMES)
    assert not any(re.fullmatch(f"({names})({names})", w) for w in toy_task.FILLERS)


def test_reachable_entropy_range_from_the_grammar():
    """The entropy AEPO can move: every correct response to a problem has the same length and
    differs only in its free choices, so the largest token-mean entropy of a policy that is always
    right is the uniform pick over them. It must leave room for targets well above the base
    model's entropy (>= 2 x, the issue's range; the data's entropy is what a base model that fits
    its warm-start data shows) and the base must have entropy to lose below it."""
    import math
    import statistics

    _, test = toy_task.make_splits(seed=0, n_train=64, n_test=256)
    p = ToyProblem(start=3, links=((7, 1), (3, 7), (5, 3), (1, 4)))
    assert toy_task.response_tokens(p) == 3 + 2 + 3 * 3 + 5 + 1
    assert toy_task.max_correct_entropy(p) == pytest.approx(6 * math.log(32) / 20)
    for q in test[:20]:  # recounted from the text: words, + (separator, digit) per hop, + the box's 4 more,
        # + the space token before the start digit, + EOS
        assert toy_task.response_tokens(q) == len(toy_task.solution_text(q).split()) + 2 * q.hops + 4 + 1 + 1
    h_max = statistics.mean(toy_task.max_correct_entropy(q) for q in test)
    h_data = statistics.mean(toy_task.data_entropy(q, 0.3) for q in test)
    assert h_max >= 2.5 * h_data, (h_max, h_data)
    assert 0.25 < h_data < 0.5
    # The free choices of the data sit far below their maximum (room to raise), and the digits
    # carry a real share of the data's entropy (room for GRPO and AEPO to lower).
    plain = -sum(w * math.log(w) for w in toy_task.free_choice_weights(32))
    assert plain < 0.25 * math.log(32)
    assert all(toy_task.data_entropy(q, 0.3) > toy_task.data_entropy(q, 0.0) + 0.05 for q in test[:20])


def test_splits_are_seeded_disjoint_and_stable():
    tr1, te1 = toy_task.make_splits(seed=1, n_train=500, n_test=100)
    tr2, te2 = toy_task.make_splits(seed=1, n_train=500, n_test=100)
    assert (tr1, te1) == (tr2, te2)
    assert not set(tr1) & set(te1)
    assert len(set(te1)) == 100
    _, te_more = toy_task.make_splits(seed=1, n_train=900, n_test=100)
    assert te_more == te1  # the test split does not depend on the train size
    tr3, _ = toy_task.make_splits(seed=2, n_train=500, n_test=100)
    assert tr3 != tr1
    assert set(Counter(p.hops for p in tr1)) == {2, 3, 4}
    assert len({p.answer for p in tr1}) == 10
    assert all(len(p.links) == p.hops + 2 for p in tr1)  # path links + 2 distractors


def test_problems_and_jsonl_rows(tmp_path):
    probs = toy_problems("test", seed=0, n_test=50)
    assert len(probs) == 50 and probs[0].uid == "toy-test:0"
    assert all(int(p.answer) == toy_task.solve(p.prompt) for p in probs)
    paths = toy_task.write_toy_dataset(tmp_path, seed=0, n_train=64, n_test=16)
    loaded, stats = load_problems(paths["test"])
    assert stats.loaded == 16 and [p.prompt for p in loaded] == [p.prompt for p in toy_problems("test", n_train=64, n_test=16)]
    with pytest.raises(ValueError, match="train' or 'test"):
        toy_problems("dev")


def test_bad_inputs():
    with pytest.raises(ValueError, match="not a toy problem"):
        toy_task.parse_problem("Start at 3 then a+5 modulo 7 .")
    with pytest.raises(ValueError, match="not a link"):
        toy_task.parse_problem("Start at 3 and follow the links threeseven sevenelevenish .")
    with pytest.raises(ValueError, match="two outgoing links"):
        ToyProblem(start=1, links=((1, 2), (1, 3)))
    with pytest.raises(ValueError, match="min_hops"):
        ToyTaskConfig(min_hops=3, max_hops=2)


@pytest.mark.parametrize("seed", [1, 2, 7, 12345])
def test_no_seed_trains_on_the_held_out_split(seed):
    """Every evaluation scores seed 0's test split; a train split of any seed must not contain it,
    even where seed S's own stream draws one of those problems (forced here with a small space)."""
    small = ToyTaskConfig(min_hops=1, max_hops=2, distractors=0)  # 1530 problems: collisions are certain
    held_out = toy_task._held_out(small)
    train, test = toy_task.make_splits(seed, 2000, 16, small)
    assert not set(train) & held_out
    assert not set(train) & set(test)
    _, test0 = toy_task.make_splits(0, 64, toy_task.HELD_OUT_SIZE, small)
    assert set(test0) == held_out  # seed 0's test split is the held-out split


def test_seed_zero_splits_are_unchanged_by_the_held_out_rule():
    train, test = toy_task.make_splits(0, 4096, 256)
    assert set(test) == toy_task._held_out(toy_task.ToyTaskConfig())
    assert len(train) == 4096 and not set(train) & set(test)


# --- the length variant (data.toy_variant=length) ---------------------------------------------------------


def test_default_grammar_and_recipe_are_pinned():
    """The default task, its warm-start data and its base recipe are what build version 7's bytes were
    made from: a variant must not change any of them (the default run's results depend on it)."""
    import dataclasses
    import hashlib

    from aepo_jax.toy.recipe import BUILD_VERSION, ToyBaseConfig

    train, _ = toy_task.make_splits(0, 4096, 256)
    rng = random.Random("toy-base-noise-0")  # the recipe's stream
    text = "\n".join(toy_task.noisy_solution_text(train[i % len(train)], 0.3, rng) for i in range(2000))
    assert hashlib.sha256(text.encode()).hexdigest() == "da0faa2de82d6861c22138cf82a48c22059b5a3a2c1b34040f45f0af0b982445"
    assert BUILD_VERSION == 7
    assert dataclasses.asdict(ToyBaseConfig()) == {
        "seed": 0, "noise": 0.3, "n_train_problems": 4096, "steps": 700, "batch_size": 32, "lr": 0.01, "warmup_steps": 50,
        "hidden_size": 64, "intermediate_size": 256, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2,
        "max_position_embeddings": 128}


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from aepo_jax.data.toy_tokenizer import build_tokenizer

    return build_tokenizer(tmp_path_factory.mktemp("tok"))


def test_length_variant_every_count_is_correct(tokenizer):
    """Every number of opening fillers in 0..LENGTH_MAX_FILLERS writes a right answer that both rewards
    accept, with the token count response_length_range promises (so the range is the real one)."""
    from aepo_jax.data.toy_tokenizer import encode_responses

    rng = random.Random(7)
    _, test = toy_task.make_splits(seed=0, n_train=10, n_test=40)
    for p in test[:12]:
        lo, hi = toy_task.response_length_range(p, "length")
        assert hi - lo == toy_task.LENGTH_MAX_FILLERS + 1 and hi <= toy_task.LENGTH_MIN_NEW_TOKENS
        texts = []
        for k in range(toy_task.LENGTH_MAX_FILLERS + 1):
            fillers = rng.choices(toy_task.FILLERS, k=k)
            seps = rng.choices(toy_task.SEPARATORS, k=p.hops)
            sol = toy_task.solution_text(p, separators=seps, fillers=fillers, variant="length")
            assert _recompute_answer_of(sol, p) and sol.split()[k] == str(p.start)
            assert exact_match_reward(sol, str(p.answer)) == 1.0 and math_reward(sol, str(p.answer)) == 1.0
            texts.append(sol)
        lengths = [len(ids) + 1 for ids in encode_responses(tokenizer, texts)]  # + EOS
        # no filler: the start digit opens the response without the space before it (one token less)
        assert lengths == [lo, *range(lo + 2, hi + 1)]
    # the default grammar allows exactly three fillers; the variant none beyond its range
    p = test[0]
    with pytest.raises(ValueError, match="filler"):
        toy_task.solution_text(p, fillers=["okay"] * 5)
    with pytest.raises(ValueError, match="0 to 32"):
        toy_task.solution_text(p, fillers=["okay"] * 33, variant="length")
    with pytest.raises(ValueError, match="not filler words"):
        toy_task.solution_text(p, fillers=["okay", "banana"], variant="length")
    with pytest.raises(ValueError, match="variant"):
        toy_task.solution_text(p, variant="short")
    assert toy_task.response_length_range(p) == (toy_task.response_tokens(p),) * 2


def _recompute_answer_of(solution: str, p: ToyProblem) -> bool:
    """Independent reading: the last boxed digit is the end of the chain of links from the start."""
    table = dict(p.links)
    d = p.start
    while d in table:
        d = table[d]
    return solution.endswith(f"\\boxed{{{d}}}")


def test_length_variant_warm_start_draws_a_spread_of_lengths():
    """The variant's warm-start data: the filler count follows length_filler_weights (geometric,
    capped), so short and long answers are both common; hops are read as the default's."""
    weights = toy_task.length_filler_weights()
    assert len(weights) == toy_task.LENGTH_MAX_FILLERS + 1 and abs(sum(weights) - 1) < 1e-12
    assert all(a > b for a, b in zip(weights, weights[1:]))  # memoryless: each extra word less likely
    train, _ = toy_task.make_splits(seed=3, n_train=300, n_test=10)
    rng = random.Random(0)
    counts = Counter()
    n = 6000
    for i in range(n):
        p = train[i % len(train)]
        sol = toy_task.noisy_solution_text(p, 0.0, rng, "length")
        k = sol.split().index(str(p.start))  # words before the start digit
        counts[k] += 1
        assert exact_match_reward(sol, str(p.answer)) == 1.0  # no noise: every one is right
    mean = sum(k * c for k, c in counts.items()) / n
    expected = sum(k * w for k, w in enumerate(weights))
    assert abs(mean - expected) < 0.5 and 8 < expected < 14
    assert counts[0] > 0.04 * n and sum(c for k, c in counts.items() if k >= 20) > 0.1 * n
    assert max(counts) <= toy_task.LENGTH_MAX_FILLERS
