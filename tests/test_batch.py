"""Host-side batch building: which rows each method trains on, packing, fixed-shape mini-batches."""

import numpy as np
import pytest

from aepo_jax.trainer.batch import Rollout, build_rows, group_advantages, pack, split_minibatches


def _rollouts(rewards, group_size, temperature=1.0, start=0):
    return [
        Rollout(prompt_index=start + i // group_size, prompt_ids=[1, 2 + i % 3], output_ids=[5] * (1 + i % 4),
                finish_reason="stop", temperature=temperature, reward=float(r))
        for i, r in enumerate(rewards)
    ]


def test_group_advantages_match_definition():
    r = np.array([1, 0, 0, 1, 1, 1, 1, 1, 0, 0, 0, 1], np.float32)
    ids = np.repeat(np.arange(3), 4)
    adv = group_advantages(r, ids)
    g0 = r[:4]
    np.testing.assert_allclose(adv[:4], (g0 - g0.mean()) / (g0.std(ddof=1) + 1e-6), rtol=1e-6)
    assert np.all(adv[4:8] == 0)  # equal rewards -> 0


def test_positive_selection_follows_the_reading_and_budget():
    grpo = _rollouts([1, 0, 1, 0], 2)
    reg = _rollouts([1, 1, 1, 1, 0, 1, 0, 0], 4, temperature=1.2)  # group 0 all right, group 1 mixed
    rows, stats = build_rows("aepo", "paper", grpo, reg, 10, np.random.default_rng(0))
    assert stats["aepo/positives_available"] == 5 and stats["aepo/positives_used"] == 5
    # the authors' rule: group advantage > 0.05, so an all-correct group contributes nothing
    rows, stats = build_rows("aepo", "mix", grpo, reg, 10, np.random.default_rng(0))
    assert stats["aepo/positives_available"] == 1 and rows.rollouts[0] is reg[5]
    rows, stats = build_rows("aepo", "paper", grpo, reg, 2, np.random.default_rng(0))
    assert stats["aepo/positives_used"] == 2
    assert all(r in [reg[i] for i in (0, 1, 2, 3, 5)] for r in rows.rollouts[4:])


@pytest.mark.parametrize("method", ["grpo", "entropy_reg", "entropy_adv", "reinforce"])
def test_methods_without_regulariser_ignore_reg_rollout(method):
    grpo = _rollouts([1, 0, 1, 1], 2)
    reg = _rollouts([1, 1], 2, temperature=1.2)
    rows, stats = build_rows(method, "paper", grpo, reg, 60, np.random.default_rng(0))
    assert len(rows.rollouts) == 4 and not rows.is_reg.any()
    if method == "reinforce":
        np.testing.assert_array_equal(rows.advantages, [1, 0, 1, 1])
    else:
        assert rows.advantages[2] == 0 and rows.advantages[0] > 0 > rows.advantages[1]


def test_aepo_paper_appends_positives_with_weight_one():
    grpo = _rollouts([1, 0, 0, 0], 2)
    reg = _rollouts([1, 0, 1, 1, 0, 0], 3, temperature=1.2)
    rows, stats = build_rows("aepo", "paper", grpo, reg, 2, np.random.default_rng(0))
    assert stats == {"aepo/positives_available": 3.0, "aepo/positives_used": 2.0}
    assert rows.is_reg.tolist() == [False] * 4 + [True] * 2
    assert all(r.reward == 1.0 and r.temperature == 1.2 for r in rows.rollouts[4:])
    p = pack(rows, prompt_len=4, response_len=6, pad_id=0)
    np.testing.assert_array_equal(p.rewards[4:], [1, 1])


def test_aepo_mix_replaces_first_k():
    grpo = _rollouts([1, 0, 0, 1, 1, 0], 2)
    reg = _rollouts([1, 0, 1, 0], 2, temperature=0.8)
    rows, stats = build_rows("aepo", "mix", grpo, reg, 60, np.random.default_rng(0))
    assert len(rows.rollouts) == 6 and not rows.is_reg.any()
    assert rows.source.tolist() == [1, 1, 0, 0, 0, 0]
    assert rows.rollouts[0].temperature == 0.8 and rows.advantages[:2].tolist() == [1.0, 1.0]


def test_zero_positives_is_a_normal_step():
    grpo = _rollouts([1, 0], 2)
    reg = _rollouts([0, 0, 0, 0], 2, temperature=1.2)
    rows, stats = build_rows("aepo", "paper", grpo, reg, 60, np.random.default_rng(0))
    assert stats["aepo/positives_used"] == 0 and len(rows.rollouts) == 2


def test_eq3_keeps_negatives_with_grpo_advantages():
    grpo = _rollouts([1, 0], 2)
    reg = _rollouts([1, 0, 1, 1], 2, temperature=1.2)
    rows, _ = build_rows("ablation_eq3", "paper", grpo, reg, 60, np.random.default_rng(0))
    w = rows.advantages[rows.is_reg]
    assert len(w) == 2 and w.min() < 0 < w.max()


def test_pack_layout_and_minibatches():
    grpo = _rollouts([1, 0, 1, 0, 1, 1, 0, 0], 2)
    reg = _rollouts([1, 1, 1], 3, temperature=1.2)
    rows, _ = build_rows("aepo", "paper", grpo, reg, 60, np.random.default_rng(0))
    p = pack(rows, prompt_len=3, response_len=5, pad_id=0)
    r0 = rows.rollouts[0]
    assert p.input_ids[0, 1:3].tolist() == r0.prompt_ids and p.attention_mask[0, 0] == 0
    assert p.response_mask[0].sum() == len(r0.output_ids)
    assert p.position_ids[0, 1] == 0 and p.position_ids[0, 3] == 2
    mbs = split_minibatches(p, 2, reg_rows_cap=2, pad_id=0, rng=np.random.default_rng(1))
    assert len(mbs) == 2 and all(m.input_ids.shape == (4 + 2, 8) for m in mbs)
    with pytest.raises(ValueError, match="exceed"):
        split_minibatches(p, 2, reg_rows_cap=1, pad_id=0, rng=np.random.default_rng(1))
    assert sum(int(m.row_valid.sum()) for m in mbs) == 11
    assert sum(int((m.is_reg & m.row_valid).sum()) for m in mbs) == 3
    pad = ~mbs[0].row_valid
    assert np.all(mbs[0].response_mask[pad] == 0)
