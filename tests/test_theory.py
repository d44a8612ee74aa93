"""Appendix B numerically: tabular softmax policies, one expected REINFORCE update from samples of pi^T.

- Lemma B.5 first part: Delta H(T) = -eta sum_{a* in A*} pi^T(a*) Cov_pi(z, delta_{a,a*} - pi) is the
  first-order entropy change of the update z <- z + eta E_{a ~ pi^T}[R(a) grad log pi(a)]
  (tabular logits, so Assumption B.4 holds with c = 1).
- Theorem 4.3: Delta H(1) < 0 implies d Delta H / dT at T = 1 >= 0, checked over 20,000 random policies.
- Corollary 4.4: Delta H(1.2) > Delta H(1) > Delta H(0.8) holds for the large majority of policies
  (not all: asserted as fractions, as the paper's "relative" statement warrants).
The closed forms are vectorised NumPy in float64; the project's own code is checked against them:
the log-prob/entropy head (entropy at temperature T), the ``aepo`` loss's gradient (the sampled
REINFORCE update of Eq. 4) and the entropy controller's choice of T (Corollary 4.4's direction).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aepo_jax.entropy_control import ControllerConfig, EntropyController
from aepo_jax.logprobs import chunked_logprobs_entropy
from aepo_jax.losses import LossConfig, policy_loss

NEG = -1e9  # logit of padded (non-existent) actions: probability exactly 0


def softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def entropy(z):
    p = softmax(z)
    return -np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0), -1)


def random_policies(n_pol, seed, max_actions=30):
    """Random tabular policies: 2..max_actions actions, logit scale 0.5..4, 1..n-1 correct actions."""
    rng = np.random.default_rng(seed)
    n = rng.integers(2, max_actions, size=n_pol)
    scale = rng.uniform(0.5, 4.0, size=n_pol)
    z = rng.normal(size=(n_pol, max_actions)) * scale[:, None]
    exists = np.arange(max_actions)[None, :] < n[:, None]
    z = np.where(exists, z, NEG)
    k = rng.integers(1, n)  # number of correct actions, at least one wrong one
    ranks = np.argsort(rng.random((n_pol, max_actions)) + (~exists) * 2.0, axis=1)
    correct = np.zeros_like(exists)
    for i in range(n_pol):
        correct[i, ranks[i, : k[i]]] = True
    return z, correct


def _cov_terms(z, p):
    """Cov_pi(z(a'), delta_{a',a} - pi(a')) for every a: p_a z_a - sum p^2 z - E[z] (p_a - sum p^2)."""
    zz = np.where(p > 0, z, 0.0)
    ez = np.sum(p * zz, -1, keepdims=True)
    s2 = np.sum(p * p, -1, keepdims=True)
    s2z = np.sum(p * p * zz, -1, keepdims=True)
    return p * zz - s2z - ez * (p - s2)


def delta_h(z, correct, T, eta=1.0):
    p, pT = softmax(z), softmax(z / T)
    return -eta * np.sum(correct * pT * _cov_terms(z, p), -1)


def d_delta_h_dT(z, correct, T=1.0, eta=1.0):
    p, pT = softmax(z), softmax(z / T)
    zz = np.where(p > 0, z, 0.0)
    dpT = -pT * (zz - np.sum(pT * zz, -1, keepdims=True)) / T**2
    return -eta * np.sum(correct * dpT * _cov_terms(z, p), -1)


def expected_update(z, correct, T):
    """E_{a ~ pi^T}[R(a) grad_z log pi(a)] = sum_{a*} pi^T(a*) (e_{a*} - pi)."""
    p, pT = softmax(z), softmax(z / T)
    w = correct * pT
    return w - np.sum(w, -1, keepdims=True) * p


def test_lemma_first_order_entropy_change():
    z, correct = random_policies(500, seed=1)
    eta = 1e-4
    for T in (0.8, 1.0, 1.2):
        actual = entropy(z + eta * expected_update(z, correct, T)) - entropy(z)
        predicted = delta_h(z, correct, T, eta)
        err = np.abs(actual - predicted)
        # the remainder is second order: O(eta^2), far below the first-order term where that is not ~0
        assert np.all(err <= 1e-2 * np.abs(predicted) + 10 * eta**2), T
        assert np.median(err / np.abs(predicted)) < 1e-4
        # and halving eta quarters it
        half = np.abs(entropy(z + eta / 2 * expected_update(z, correct, T)) - entropy(z) - predicted / 2)
        big = err > 1e-13
        assert np.median(half[big] / err[big]) == pytest.approx(0.25, abs=0.05)


def _head(z, targets, temperature=1.0):
    """The project's head on tabular policies: hidden = identity, LM head = the logits z [P, n]."""
    p = z.shape[0]
    return chunked_logprobs_entropy(jnp.eye(p, dtype=jnp.float32)[None], jnp.asarray(z, jnp.float32),
                                    jnp.asarray(targets, jnp.int32)[None], temperature=temperature, chunk_size=64)


def test_aepo_loss_gradient_is_the_expected_reinforce_update():
    """-grad of the project's ``aepo`` loss on samples of pi^T (REINFORCE term, R = 1 on correct
    answers) converges to the expected update of Eq. (4)."""
    rng = np.random.default_rng(2)
    z, correct = random_policies(3, seed=2)
    for i in range(3):
        n = int(np.sum(z[i] > NEG / 2))
        zi, ci = z[i, :n], correct[i, :n]
        a = rng.choice(n, size=100_000, p=softmax(zi / 1.2))

        def loss(logits):
            # one row per sample, one token each: hidden [M, 1, 1] = 1, LM head [1, n] = the logits
            logp, _ = chunked_logprobs_entropy(jnp.ones((len(a), 1, 1)), logits[None], jnp.asarray(a)[:, None])
            batch = {"logp": logp, "old_logp": jax.lax.stop_gradient(logp), "mask": jnp.ones_like(logp),
                     "advantages": jnp.zeros(len(a)), "rewards": jnp.asarray(ci[a], jnp.float32),
                     "is_reg": jnp.ones(len(a))}
            return policy_loss("aepo", batch, LossConfig(reg_norm="reg"))[0]

        grad = -np.asarray(jax.grad(loss)(jnp.asarray(zi, jnp.float32)))
        np.testing.assert_allclose(grad, expected_update(zi[None], ci[None], 1.2)[0], atol=6e-3)


def test_project_entropy_matches_closed_form_and_rises_with_temperature():
    """Lemma 4.1 with the learner's entropy head: H(pi^T) is the closed form, increasing in T."""
    z, _ = random_policies(500, seed=6)
    targets = np.zeros(len(z), np.int32)
    hs = []
    for T in (0.8, 1.0, 1.2):
        _, h = _head(z, targets, temperature=T)
        h = np.asarray(h)[0]
        np.testing.assert_allclose(h, entropy(z / T), atol=2e-5)
        hs.append(h)
    assert np.all(hs[0] <= hs[1] + 1e-5) and np.all(hs[1] <= hs[2] + 1e-5)


def test_delta_h_derivative_matches_finite_difference():
    z, correct = random_policies(300, seed=3)
    h = 1e-5
    fd = (delta_h(z, correct, 1 + h) - delta_h(z, correct, 1 - h)) / (2 * h)
    np.testing.assert_allclose(d_delta_h_dT(z, correct), fd, rtol=1e-4, atol=1e-9)


def test_theorem_4_3_over_random_policies():
    z, correct = random_policies(20_000, seed=4)
    d1 = delta_h(z, correct, 1.0)
    deriv = d_delta_h_dT(z, correct)
    collapsing = d1 < 0
    assert collapsing.sum() > 5_000  # the premise is common, so the check has teeth
    # Every collapsing policy has a non-negative derivative; only degenerate policies (all mass on
    # correct actions) sit at 0 up to round-off.
    assert np.all(deriv[collapsing] >= -1e-12)
    degenerate = collapsing & (np.abs(deriv) <= 1e-12)
    assert degenerate.sum() <= 0.001 * collapsing.sum()


def test_corollary_4_4_fractions():
    z, correct = random_policies(20_000, seed=5)
    d1 = delta_h(z, correct, 1.0)
    hi = np.mean(delta_h(z, correct, 1.2) > d1)
    lo = np.mean(delta_h(z, correct, 0.8) < d1)
    # measured here: about 0.993 and 0.995; the issue reports about 0.98 and 0.99 on its sample
    assert hi >= 0.97, hi
    assert lo >= 0.97, lo
    # ...and it is a statement about most policies, not all of them
    assert hi < 1.0 or lo < 1.0


def test_lemma_4_1_temperature_raises_entropy():
    z, _ = random_policies(2_000, seed=6)
    h = [entropy(z / T) for T in (0.8, 1.0, 1.2)]
    assert np.all(h[0] <= h[1] + 1e-12) and np.all(h[1] <= h[2] + 1e-12)


def test_controller_choice_moves_entropy_toward_the_target():
    """Corollary 4.4 through the project's controller: fed the policy's entropy (from the learner's
    head), it picks T_high below the target and T_low above, and that T changes the entropy of the
    REINFORCE update in the target's direction relative to T = 1 for the large majority of policies."""
    z, correct = random_policies(4_000, seed=7)
    _, h = _head(z, np.zeros(len(z), np.int32))
    h = np.asarray(h, np.float64)[0]
    rng = np.random.default_rng(7)
    offsets = rng.choice([-0.1, 0.1], size=len(z))
    ok = []
    for i in range(len(z)):
        ctl = EntropyController(ControllerConfig(target=float(h[i] + offsets[i])))
        ctl.observe(entropy_full=float(h[i]))
        d = ctl.decide(0)
        assert d.temperature == (1.2 if offsets[i] > 0 else 0.8)
        change = delta_h(z[i : i + 1], correct[i : i + 1], d.temperature) - delta_h(z[i : i + 1], correct[i : i + 1], 1.0)
        ok.append(np.sign(change[0]) == np.sign(offsets[i]))
    assert np.mean(ok) >= 0.97, np.mean(ok)
