"""Host-side batch building: which rows each method trains on, packing, fixed-shape mini-batches."""

import dataclasses

import numpy as np
import pytest

from aepo_jax.methods import METHODS, method_spec
from aepo_jax.trainer.batch import assemble, group_advantages, pack, select_reg_rows, split_minibatches


def _batch(rewards, group_size, *, main=True, start=0):
    n = len(rewards)
    return pack([[1, 2 + i % 3] for i in range(n)], [[5 + i] * (1 + i % 4) for i in range(n)], rewards,
                [start + i // group_size for i in range(n)], [i % 5 == 0 for i in range(n)],
                main_rollout=main, prompt_len=3, response_len=5, pad_id=0)


def test_group_advantages_match_definition():
    r = np.array([1, 0, 0, 1, 1, 1, 1, 1, 0, 0, 0, 1], np.float32)
    ids = np.repeat(np.arange(3), 4)
    adv = group_advantages(r, ids)
    g0 = r[:4]
    np.testing.assert_allclose(adv[:4], (g0 - g0.mean()) / (g0.std(ddof=1) + 1e-6), rtol=1e-6)
    assert np.all(adv[4:8] == 0)  # equal rewards -> 0


def test_pack_layout():
    b = _batch([1, 0, 1], 3)
    assert b.input_ids.shape == (3, 8) and b.mask.shape == (3, 5)
    assert b.input_ids[0, 1:3].tolist() == [1, 2] and b.attention_mask[0, 0] == 0
    assert b.input_ids[1, 3:5].tolist() == [6, 6] and b.mask[1].tolist() == [1, 1, 0, 0, 0]
    assert b.position_ids[0, 1] == 0 and b.position_ids[0, 3] == 2
    assert b.truncated.tolist() == [True, False, False] and b.main_rollout.all()
    assert b.old_logp is None and not b.is_reg.any()
    with pytest.raises(ValueError, match="row 0"):
        pack([[1] * 9], [[2]], [1.0], [0], [False], main_rollout=True, prompt_len=3, response_len=5, pad_id=0)


def test_batch_is_immutable():
    b = _batch([1, 0], 2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        b.advantages = np.ones(2)


def test_positive_selection_follows_the_reading_and_budget():
    reg = _batch([1, 1, 1, 1, 0, 1, 0, 0], 4, main=False)  # group 0 all right, group 1 mixed
    paper, mix = method_spec("aepo", "paper"), method_spec("aepo", "mix")
    rows, stats = select_reg_rows(paper, reg, 10, np.random.default_rng(0))
    assert stats["aepo/positives_available"] == 5 and stats["aepo/positives_used"] == 5
    # the authors' rule: group advantage > 0.05, so an all-correct group contributes nothing
    rows, stats = select_reg_rows(mix, reg, 10, np.random.default_rng(0))
    assert stats["aepo/positives_available"] == 1 and rows.input_ids[0].tolist() == reg.input_ids[5].tolist()
    rows, stats = select_reg_rows(paper, reg, 2, np.random.default_rng(0))
    assert stats["aepo/positives_used"] == 2 and rows.num_rows == 2 and rows.is_reg.all()
    assert (rows.rewards == 1).all() and (rows.advantages == 1).all() and not rows.main_rollout.any()


@pytest.mark.parametrize("method", [m for m, s in METHODS.items() if not s.uses_reg_rollout])
def test_methods_without_regulariser_train_on_the_main_rows(method):
    main = _batch([1, 0, 1, 1], 2)
    b = assemble(METHODS[method], main, None)
    assert b.num_rows == 4 and not b.is_reg.any()
    if method == "reinforce":
        np.testing.assert_array_equal(b.advantages, [1, 0, 1, 1])
    else:
        assert b.advantages[2] == 0 and b.advantages[0] > 0 > b.advantages[1]
    np.testing.assert_array_equal(b.rewards, [1, 0, 1, 1])  # advantages never overwrite rewards


def test_aepo_paper_appends_positives_with_their_reward_as_advantage():
    spec = method_spec("aepo")
    main = _batch([1, 0, 0, 0], 2)
    reg = _batch([1, 0, 1, 1, 0, 0], 3, main=False)
    rows, stats = select_reg_rows(spec, reg, 2, np.random.default_rng(0))
    assert stats == {"aepo/positives_available": 3.0, "aepo/positives_used": 2.0}
    b = assemble(spec, main, rows)
    assert b.is_reg.tolist() == [False] * 4 + [True] * 2
    assert b.main_rollout.tolist() == [True] * 4 + [False] * 2
    np.testing.assert_array_equal(b.rewards[4:], [1, 1])
    np.testing.assert_array_equal(b.advantages[4:], [1, 1])
    np.testing.assert_allclose(b.advantages[:4], group_advantages(main.rewards, main.group))


def test_aepo_mix_replaces_first_k():
    spec = method_spec("aepo", "mix")
    main = _batch([1, 0, 0, 1, 1, 0], 2)
    reg = _batch([1, 0, 1, 0], 2, main=False)
    rows, _ = select_reg_rows(spec, reg, 60, np.random.default_rng(0))
    b = assemble(spec, main, rows)
    assert b.num_rows == 6 and not b.is_reg.any()
    assert b.main_rollout.tolist() == [False, False, True, True, True, True]
    assert b.advantages[:2].tolist() == [1.0, 1.0]
    assert b.input_ids[0].tolist() == reg.input_ids[0].tolist()


def test_zero_positives_is_a_normal_step():
    spec = method_spec("aepo")
    rows, stats = select_reg_rows(spec, _batch([0, 0, 0, 0], 2, main=False), 60, np.random.default_rng(0))
    assert stats["aepo/positives_used"] == 0
    assert assemble(spec, _batch([1, 0], 2), rows).num_rows == 2


def test_eq3_keeps_negatives_with_grpo_advantages():
    spec = method_spec("ablation_eq3")
    reg = _batch([1, 0, 1, 1], 2, main=False)
    rows, _ = select_reg_rows(spec, reg, 60, np.random.default_rng(0))
    assert rows.num_rows == 2 and rows.advantages.min() < 0 < rows.advantages.max()
    np.testing.assert_array_equal(rows.rewards, [1, 0])


def test_minibatches_have_one_shape_and_padding_counts_nowhere():
    spec = method_spec("aepo")
    main = _batch([1, 0, 1, 0, 1, 1, 0, 0], 2)
    rows, _ = select_reg_rows(spec, _batch([1, 1, 1], 3, main=False), 60, np.random.default_rng(0))
    b = assemble(spec, main, rows)
    mbs = split_minibatches(b, 2, reg_rows_cap=2, pad_id=0, rng=np.random.default_rng(1))
    assert len(mbs) == 2 and all(m.input_ids.shape == (4 + 2, 8) for m in mbs)
    with pytest.raises(ValueError, match="exceed"):
        split_minibatches(b, 2, reg_rows_cap=1, pad_id=0, rng=np.random.default_rng(1))
    real = [m.mask.sum(axis=1) > 0 for m in mbs]
    assert sum(int(r.sum()) for r in real) == 11
    assert sum(int((m.is_reg & r).sum()) for m, r in zip(mbs, real)) == 3
    assert sum(float(m.mask.sum()) for m in mbs) == float(b.mask.sum())
    pad = [~r & m.is_reg for m, r in zip(mbs, real)]
    assert all(float(m.advantages[p].sum()) == 0 for m, p in zip(mbs, pad))
