"""Advantage estimators against direct NumPy computations and their edge cases."""

import numpy as np
import pytest


def _np_grpo(r, G, eps=1e-6):
    out = np.zeros(len(r))
    for s in range(0, len(r), G):
        g = np.asarray(r[s : s + G], np.float64)
        if G > 1 and not np.all(g == g[0]):
            out[s : s + G] = (g - g.mean()) / (g.std(ddof=1) + eps)
    return out


@pytest.mark.parametrize("G", [1, 2, 5, 8])
def test_grpo_matches_numpy(G):
    from aepo_jax.advantages import grpo_advantages, grpo_advantages_by_id

    rng = np.random.default_rng(G)
    for rewards in (rng.integers(0, 2, 6 * G).astype(np.float32), rng.random(6 * G).astype(np.float32)):
        rewards[:G] = 0.7  # one all-equal group (non-binary value: float round-off must not leak)
        want = _np_grpo(rewards, G)
        np.testing.assert_allclose(np.asarray(grpo_advantages(rewards, G)), want, rtol=1e-5, atol=1e-6)
        assert np.all(np.asarray(grpo_advantages(rewards, G))[:G] == 0)
        # the same groups given by id, shuffled
        ids = np.repeat(np.arange(6), G)
        perm = rng.permutation(6 * G)
        got = np.asarray(grpo_advantages_by_id(rewards[perm], ids[perm], 6))
        np.testing.assert_allclose(got, want[perm], rtol=1e-5, atol=1e-6)


def test_grpo_binary_values_and_zero_sum():
    from aepo_jax.advantages import grpo_advantages

    a = np.asarray(grpo_advantages(np.array([1, 0, 0, 0], np.float32), 4))
    # mean 0.25, unbiased std 0.5
    np.testing.assert_allclose(a, [1.5, -0.5, -0.5, -0.5], rtol=1e-5)
    r = np.random.default_rng(0).integers(0, 2, 64).astype(np.float32)
    np.testing.assert_allclose(np.asarray(grpo_advantages(r, 8)).reshape(8, 8).sum(1), 0, atol=1e-5)


def test_grpo_by_id_uneven_groups():
    from aepo_jax.advantages import grpo_advantages_by_id

    r = np.array([1, 0, 1, 1, 0, 5], np.float32)
    ids = np.array([0, 0, 0, 1, 1, 2])
    got = np.asarray(grpo_advantages_by_id(r, ids, 3))
    g0 = np.array([1, 0, 1.0])
    np.testing.assert_allclose(got[:3], (g0 - g0.mean()) / (g0.std(ddof=1) + 1e-6), rtol=1e-5)
    np.testing.assert_allclose(got[3:5], [np.sqrt(0.5), -np.sqrt(0.5)], rtol=1e-5)
    assert got[5] == 0  # a group of one


def test_reinforce_is_reward():
    from aepo_jax.advantages import reinforce_advantages

    r = np.array([0, 1, 1, 0], np.float32)
    np.testing.assert_array_equal(np.asarray(reinforce_advantages(r)), r)


def test_entropy_adv_shaping():
    import jax
    import jax.numpy as jnp

    from aepo_jax.advantages import entropy_adv_shaping

    rng = np.random.default_rng(1)
    A = rng.normal(size=7).astype(np.float32)
    A[2] = 0
    H = rng.gamma(1.0, 1.0, size=(7, 5)).astype(np.float32)
    got = np.asarray(entropy_adv_shaping(A, H, 0.4, 2.0))
    want = A[:, None] + np.minimum(0.4 * H, np.abs(A)[:, None] / 2.0)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert np.all(got[2] == 0)
    assert np.all(np.sign(got[A != 0]) == np.sign(A[A != 0])[:, None])  # kappa > 1 never flips a sign
    # per-token advantages work too, and the entropy is detached
    got2 = np.asarray(entropy_adv_shaping(np.repeat(A[:, None], 5, 1), H))
    np.testing.assert_allclose(got2, want, rtol=1e-6)
    g = jax.grad(lambda h: jnp.sum(entropy_adv_shaping(A, h)))(jnp.asarray(H))
    assert np.all(np.asarray(g) == 0)


def test_bad_input():
    from aepo_jax.advantages import entropy_adv_shaping, grpo_advantages

    with pytest.raises(ValueError, match="group_size"):
        grpo_advantages(np.zeros(10, np.float32), 4)
    with pytest.raises(ValueError, match="rewards"):
        grpo_advantages(np.zeros((2, 4), np.float32), 4)
    with pytest.raises(ValueError, match="advantages"):
        entropy_adv_shaping(np.zeros(3), np.zeros((4, 2)))
