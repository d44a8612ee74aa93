"""The built-in task: answers checked by recomputation, seeded splits, disjoint train/test, and the
worked solutions the base model learns from."""

from __future__ import annotations

import random

import pytest

from aepo_jax.data import toy_problems, toy_task
from aepo_jax.data.toy_task import ToyProblem, ToyTaskConfig
from aepo_jax.rewards import exact_match_reward, math_reward


def _recompute(text: str) -> int:
    """Independent of the module: read the words and do the arithmetic here."""
    words = text.split()
    value = int(words[2])
    for w in words[4:-3]:
        op, x = w[1], int(w[2:])
        value = {"+": value + x, "-": value - x, "*": value * x}[op] % 10
    return value


def test_answers_are_right_by_recomputation():
    train, test = toy_task.make_splits(seed=0, n_train=2000, n_test=200)
    for p in train + test:
        text = toy_task.problem_text(p)
        assert _recompute(text) == p.answer == toy_task.solve(text)
        assert toy_task.parse_problem(text) == p


def test_worked_solution_format_and_rewards():
    p = ToyProblem(start=3, steps=(("+", 5), ("*", 2), ("-", 4)))
    assert toy_task.problem_text(p) == "Start at 3 then a+5 b*2 c-4 modulo 10 ."
    sol = toy_task.solution_text(p)
    assert sol == "3 a+5 8 b*2 6 c-4 2 \\boxed{2}"
    assert exact_match_reward(sol, "2") == 1.0 and math_reward(sol, "2") == 1.0
    wrong = toy_task.solution_text(p, {1: 7})  # a mistake at step 1 is carried forward
    assert wrong == "3 a+5 8 b*2 7 c-4 3 \\boxed{3}"
    assert exact_match_reward(wrong, "2") == 0.0


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
    steps = {len(p.steps) for p in tr1}
    assert steps == {2, 3, 4, 5}
    answers = [p.answer for p in tr1]
    assert len(set(answers)) == 10  # every residue occurs


def test_problems_and_jsonl_rows(tmp_path):
    probs = toy_problems("test", seed=0, n_test=50)
    assert len(probs) == 50 and probs[0].uid == "toy-test:0"
    assert all(int(p.answer) == toy_task.solve(p.prompt) for p in probs)
    paths = toy_task.write_toy_dataset(tmp_path, seed=0, n_train=64, n_test=16)
    from aepo_jax.data import load_problems

    loaded, stats = load_problems(paths["test"])
    assert stats.loaded == 16 and [p.prompt for p in loaded] == [p.prompt for p in toy_problems("test", n_train=64, n_test=16)]
    with pytest.raises(ValueError, match="train' or 'test"):
        toy_problems("dev")


def test_bad_inputs():
    with pytest.raises(ValueError, match="not a toy problem"):
        toy_task.parse_problem("Start at 3 then a+5 modulo 7 .")
    with pytest.raises(ValueError, match="labelled 'c', expected 'b'"):
        toy_task.parse_problem("Start at 3 then a+5 c+1 modulo 10 .")
    with pytest.raises(ValueError, match="min_steps"):
        ToyTaskConfig(min_steps=3, max_steps=2)


def test_vocabulary_covers_every_problem_and_solution():
    vocab = set(toy_task.vocabulary_words())
    rng = random.Random(0)
    for _ in range(300):
        p = toy_task.random_problem(rng, ToyTaskConfig())
        wrong = {i: rng.randrange(10) for i in range(len(p.steps)) if rng.random() < 0.3}
        assert set(toy_task.problem_text(p).split()) <= vocab
        assert set(toy_task.solution_text(p, wrong).split()) <= vocab
