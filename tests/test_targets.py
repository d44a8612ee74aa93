"""The controller on a signal other than entropy (response length) and the length target
distribution: how its regularising samples are drawn and chosen on each side of the target."""

import math

import numpy as np
import pytest

from aepo_jax.entropy_control import ControllerConfig, Decision, EntropyController
from aepo_jax.methods import method_spec
from aepo_jax.trainer.batch import pack
from aepo_jax.trainer.targets import TARGETS, LengthTarget, correct_length_mean, reg_rows_by_target, target_for


def decision(mode, budget=5):
    return Decision(step=0, temperature=1.2 if mode == "raise" else 0.8, budget=budget, target=10.0, entropy=None,
                    mode=mode)


def _reg_batch(lengths, rewards, truncated, group=None):
    outputs = [[5] * int(n) for n in lengths]
    group = list(group) if group is not None else [0] * len(lengths)
    return pack([[1, 2]] * len(lengths), outputs, list(rewards), group, list(truncated),
                main_rollout=False, prompt_len=4, response_len=int(max(lengths)), pad_id=0)


def test_correct_length_mean_counts_only_correct_responses():
    assert correct_length_mean([5, 7, 100, 9], [1, 1, 0, 1]) == pytest.approx(7.0)
    assert correct_length_mean([5, 7], [0, 0]) is None


@pytest.mark.parametrize("seed", range(5))
def test_length_selection_keeps_the_right_side_of_each_prompt_most_extreme_first(seed):
    """Positives are shorter (longer) than the mean correct length of their own prompt's samples:
    a hard question's long answer is not 'long', and an easy question's short one not 'short'."""
    rng = np.random.default_rng(seed)
    groups, per = 8, 8
    group = np.repeat(np.arange(groups), per)
    base = rng.integers(8, 30, size=groups)[group]  # each prompt has its own answer length
    lengths = (base + rng.integers(-4, 5, size=group.size)).astype(float)
    rewards = (rng.random(group.size) < 0.6).astype(float)
    truncated = rng.random(group.size) < 0.1
    reg = _reg_batch(lengths, rewards, truncated, group)
    t = LengthTarget()
    assert t.measure(reg) == pytest.approx(correct_length_mean(lengths, rewards))
    ok = (rewards > 0) & ~truncated
    rel = np.zeros(group.size)
    for g in range(groups):
        own = ok & (group == g)
        rel[own] = lengths[own] - lengths[own].mean()
    for mode, side in (("lower", rel < 0), ("raise", rel > 0)):
        for budget in (0, 3, 1000):
            idx = t.select(reg, decision(mode, budget), None, budget, np.random.default_rng(seed))
            eligible = np.flatnonzero(ok & side)
            assert len(idx) == min(budget, len(eligible)) and len(set(idx)) == len(idx)
            assert set(idx) <= set(eligible)
            if len(idx) and len(idx) < len(eligible):  # the kept ones are the most extreme
                rest = np.setdiff1d(eligible, idx)
                if mode == "lower":
                    assert rel[idx].max() <= rel[rest].min()
                else:
                    assert rel[idx].min() >= rel[rest].max()
    signal = correct_length_mean(lengths, rewards)
    assert len(t.select(reg, decision("idle", 0), signal, 0, rng)) == 0


def test_length_sampling_is_the_rollouts_own():
    t = LengthTarget()
    for mode in ("lower", "raise"):
        assert t.sampling(decision(mode), 12.3, 1.0, 48) == (1.0, 48)
    assert TARGETS["entropy"].sampling(decision("raise"), None, 1.0, 48) == (1.2, 48)
    with pytest.raises(ValueError, match="signal 'width'"):
        target_for("width")


def test_controller_on_length_signal():
    ctl = EntropyController(ControllerConfig(target="20", signal="length"))
    assert ctl.decide(0).mode == "raise"  # nothing observed yet
    ctl.observe(entropy_full=0.5, entropy_sampled=0.6)  # entropy does not drive a length controller
    assert ctl.signal() is None
    ctl.observe(length=25.0)
    d = ctl.decide(1)
    assert (d.mode, d.entropy, d.target) == ("lower", 25.0, 20.0)
    ctl.observe(length=15.0, entropy_full=0.4)
    assert ctl.decide(2).mode == "raise"
    again = EntropyController.from_dict(ctl.to_dict())  # checkpointed with its signal
    assert again.config.signal == "length" and again.signal() == 15.0 and again.decide(3).mode == "raise"
    rel = EntropyController(ControllerConfig(target="0.7", signal="length", target_relative=True))
    rel.observe(entropy_full=0.5)
    rel.observe(length=30.0)  # the first length is L0
    rel.observe(length=25.0)
    d = rel.decide(0)
    assert d.target == pytest.approx(21.0) and d.mode == "lower"
    with pytest.raises(ValueError, match="signal"):
        ControllerConfig(signal="speed")
    with pytest.raises(ValueError, match="length is not finite"):
        ctl.observe(length=math.nan)


def test_entropy_controller_state_ignores_length():
    """The entropy path: a length observation changes neither its signal nor H0."""
    a, b = EntropyController(ControllerConfig(target="0.5", target_relative=True)), EntropyController(
        ControllerConfig(target="0.5", target_relative=True))
    a.observe(entropy_full=0.4, entropy_sampled=0.5)
    b.observe(entropy_full=0.4, entropy_sampled=0.5)
    b.observe(length=30.0)
    assert a.decide(1) == b.decide(1) and a.state.initial_signal == b.state.initial_signal == 0.4


@pytest.mark.parametrize("reading", ["paper", "mix"])
def test_reg_rows_by_length(reading):
    lengths = [4, 9, 6, 12, 3, 7, 30, 40, 20]
    rewards = [1, 1, 0, 1, 1, 1, 1, 0, 0]
    truncated = [False, False, False, False, True, False, False, False, False]
    group = [0, 0, 0, 0, 0, 0, 1, 1, 1]  # prompt 1 has one correct sample: no contrast, no positive
    reg = _reg_batch(lengths, rewards, truncated, group)
    spec = method_spec("aepo", reading)
    rows, stats = reg_rows_by_target(TARGETS["length"], spec, reg, decision("lower", 1), 8.0, np.random.default_rng(0))
    # prompt 0's correct, finished samples: 4, 9, 12, 7 (mean 8); shorter: 4 and 7; the shortest kept
    assert stats == {"aepo/positives_available": 2.0, "aepo/positives_used": 1.0}
    assert rows.mask.sum(axis=1).tolist() == [4] and rows.advantages.tolist() == [1.0]
    assert rows.is_reg.tolist() == [reading == "paper"]
    rows, stats = reg_rows_by_target(TARGETS["length"], spec, reg, decision("raise", 5), 8.0, np.random.default_rng(0))
    assert sorted(rows.mask.sum(axis=1).tolist()) == [9, 12] and stats["aepo/positives_used"] == 2.0
    with pytest.raises(ValueError, match="positive regulariser rows"):
        reg_rows_by_target(TARGETS["length"], method_spec("ablation_eq3"), reg, decision("raise"), 8.0,
                           np.random.default_rng(0))


def test_config_signal_key():
    from aepo_jax.config import ConfigError, build_config
    from aepo_jax.trainer.config import ALIASES, RunConfig, controller_config, validate

    cfg = validate(build_config(RunConfig, ["--algorithm.controller.signal=length",
                                            "--algorithm.controller.target=14"], aliases=ALIASES))
    assert controller_config(cfg).signal == "length"
    validate(build_config(RunConfig, ["--algorithm.controller.signal=length", "--method=grpo"], aliases=ALIASES))
    with pytest.raises(ConfigError, match="algorithm.controller.signal"):
        validate(build_config(RunConfig, ["--algorithm.controller.signal=speed"], aliases=ALIASES))
    with pytest.raises(ConfigError, match="algorithm.controller.signal.*ablation_eq3"):
        validate(build_config(RunConfig, ["--algorithm.controller.signal=length", "--method=ablation_eq3"],
                              aliases=ALIASES))


def test_length_positives_on_the_length_variant():
    """On the toy task's length variant, with the true lengths of its responses: lowering keeps right
    answers with fewer opening fillers than their prompt's other right answers, raising more; a wrong
    answer never counts however short or long, and the most extreme ones come first."""
    import random

    from aepo_jax.data import toy_task

    rng = random.Random(3)
    _, problems = toy_task.make_splits(seed=0, n_train=10, n_test=6)
    lengths, rewards, group, fillers = [], [], [], []
    for g, p in enumerate(problems):
        lo = toy_task.response_length_range(p, "length")[0]
        for _ in range(8):
            k = rng.randrange(toy_task.LENGTH_MAX_FILLERS + 1)
            right = rng.random() < 0.7
            # tokens: the shortest correct answer, + 1 per filler (+ the space before the start digit)
            lengths.append(lo + k + (k > 0) - (0 if right else 1))  # a wrong answer: a digit box elsewhere
            rewards.append(float(right))
            group.append(g)
            fillers.append(k)
    lengths, rewards, group, fillers = map(np.asarray, (lengths, rewards, group, fillers))
    reg = _reg_batch(lengths, rewards, [False] * len(lengths), group)
    for mode in ("lower", "raise"):
        idx = LengthTarget().select(reg, decision(mode, 1000), None, 1000, np.random.default_rng(0))
        assert len(idx) and (rewards[idx] > 0).all()
        for i in idx:
            own = (group == group[i]) & (rewards > 0)
            mean_k = fillers[own].mean()
            assert fillers[i] < mean_k if mode == "lower" else fillers[i] > mean_k
        few = LengthTarget().select(reg, decision(mode, 3), None, 3, np.random.default_rng(0))
        rel = [lengths[i] - lengths[(group == group[i]) & (rewards > 0)].mean() for i in range(len(lengths))]
        chosen = sorted(rel[i] for i in few)
        others = [rel[i] for i in idx if i not in set(few)]
        assert (max(chosen) <= min(others)) if mode == "lower" else (min(chosen) >= max(others))
