"""Chunked log-prob / entropy head against the naive full-softmax computation (value and gradient)."""

import numpy as np
import pytest


def _inputs(seed, B=2, S=37, H=16, V=61, dtype="float32"):
    import jax
    import jax.numpy as jnp

    k = jax.random.split(jax.random.PRNGKey(seed), 5)
    h = jax.random.normal(k[0], (B, S, H)).astype(dtype)
    w = (jax.random.normal(k[1], (H, V)) * 0.6).astype(dtype)
    t = jax.random.randint(k[2], (B, S), 0, V)
    g1 = jax.random.normal(k[3], (B, S))
    g2 = jax.random.normal(k[4], (B, S))
    return h, w, t, g1, g2


def _value_and_grads(fn, h, w, t, g1, g2, **kw):
    import jax
    import jax.numpy as jnp

    def f(h, w):
        lp, e = fn(h, w, t, **kw)
        return jnp.sum(lp * g1) + jnp.sum(e * g2), (lp, e)

    (_, (lp, e)), (gh, gw) = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(h, w)
    return [np.asarray(x, np.float64) for x in (lp, e, gh, gw)]


@pytest.mark.parametrize("chunk", [3, 8, 256])  # 256 > S: one chunk
@pytest.mark.parametrize("entropy_grad", [False, True])
def test_chunked_matches_naive(chunk, entropy_grad):
    from aepo_jax.logprobs import chunked_logprobs_entropy, naive_logprobs_entropy

    h, w, t, g1, g2 = _inputs(0)
    for temp in (1.0, 0.7):
        got = _value_and_grads(
            chunked_logprobs_entropy, h, w, t, g1, g2, chunk_size=chunk, temperature=temp, entropy_grad=entropy_grad
        )
        want = _value_and_grads(naive_logprobs_entropy, h, w, t, g1, g2, temperature=temp, entropy_grad=entropy_grad)
        for name, a, b in zip(("logp", "entropy", "d hidden", "d lm_head"), got, want):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5, err_msg=f"{name} chunk={chunk} T={temp}")


def test_entropy_gradient_flag():
    """entropy_grad=False: the entropy carries no gradient; True: it equals the naive autodiff gradient."""
    import jax
    import jax.numpy as jnp

    from aepo_jax.logprobs import chunked_logprobs_entropy, naive_logprobs_entropy

    h, w, t, _, g2 = _inputs(1)
    ent_only = lambda fn, **kw: jax.grad(lambda h: jnp.sum(fn(h, w, t, **kw)[1] * g2))(h)  # noqa: E731
    assert np.all(np.asarray(ent_only(chunked_logprobs_entropy, chunk_size=8)) == 0)
    got = ent_only(chunked_logprobs_entropy, chunk_size=8, entropy_grad=True)
    want = ent_only(naive_logprobs_entropy, entropy_grad=True)
    assert np.abs(np.asarray(want)).max() > 1e-3
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)


def test_values_against_numpy_and_sampled_estimator():
    from aepo_jax.logprobs import chunked_logprobs_entropy, sampled_entropy

    h, w, t, _, _ = _inputs(2, B=1, S=9, H=4, V=7)
    lp, ent = chunked_logprobs_entropy(h, w, t, chunk_size=4)
    z = np.asarray(h, np.float64)[0] @ np.asarray(w, np.float64)
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    np.testing.assert_allclose(np.asarray(lp)[0], np.log(p[np.arange(9), np.asarray(t)[0]]), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(ent)[0], -(p * np.log(p)).sum(1), rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(sampled_entropy(lp)), -np.asarray(lp))


def test_sampled_estimator_is_unbiased_for_full_entropy():
    """E_{o ~ pi}[-log pi(o)] = H: the two estimators agree on average on tokens sampled from pi."""
    import jax
    import jax.numpy as jnp

    from aepo_jax.logprobs import chunked_logprobs_entropy

    h, w, _, _, _ = _inputs(3, B=1, S=4, H=8, V=11)
    n = 20000
    hh = jnp.broadcast_to(h, (n, 4, 8))
    z = jnp.einsum("bsh,hv->bsv", h, w)
    t = jax.random.categorical(jax.random.PRNGKey(9), jnp.broadcast_to(z, (n, 4, 11)))
    lp, ent = chunked_logprobs_entropy(hh, w, t, chunk_size=4)
    np.testing.assert_allclose(np.asarray(-lp.mean(0)), np.asarray(ent[0]), rtol=0.05)


def test_bfloat16_inputs_and_padding_targets():
    import jax.numpy as jnp

    from aepo_jax.logprobs import chunked_logprobs_entropy, naive_logprobs_entropy

    h, w, t, g1, g2 = _inputs(4, dtype="bfloat16")
    t = t.at[:, -3:].set(-100)  # ignore-index style padding: clipped, finite
    got = _value_and_grads(chunked_logprobs_entropy, h, w, t, g1, g2, chunk_size=16)
    want = _value_and_grads(naive_logprobs_entropy, h, w, t, g1, g2)
    for a, b in zip(got, want):
        assert np.all(np.isfinite(a))
        np.testing.assert_allclose(a, b, rtol=2e-2, atol=2e-2)
    lp, _ = chunked_logprobs_entropy(h, w, t)
    assert lp.dtype == jnp.float32


def test_sharded_hidden_under_jit():
    """Batch sharded over a 'data' axis (as the trainer does): same values and gradients."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    from aepo_jax.logprobs import chunked_logprobs_entropy

    n_dev = min(4, len(jax.devices()))
    h, w, t, g1, _ = _inputs(5, B=n_dev, S=20)

    @jax.jit
    def f(h, w, t):
        return jax.value_and_grad(lambda h, w: jnp.sum(chunked_logprobs_entropy(h, w, t, chunk_size=8)[0] * g1),
                                  argnums=(0, 1))(h, w)

    want = f(h, w, t)
    mesh = Mesh(np.array(jax.devices()[:n_dev]), ("data",))
    got = f(jax.device_put(h, NamedSharding(mesh, P("data"))), w, jax.device_put(t, NamedSharding(mesh, P("data"))))
    np.testing.assert_allclose(float(got[0]), float(want[0]), rtol=1e-5)
    for a, b in zip(got[1], want[1]):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("groups", [2, 4])
def test_batch_groups_same_result(groups):
    from aepo_jax.logprobs import chunked_logprobs_entropy, naive_logprobs_entropy

    h, w, t, g1, g2 = _inputs(7, B=4, S=19)
    got = _value_and_grads(chunked_logprobs_entropy, h, w, t, g1, g2, chunk_size=8, batch_groups=groups,
                           entropy_grad=True)
    want = _value_and_grads(naive_logprobs_entropy, h, w, t, g1, g2, entropy_grad=True)
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_batch_groups_moves_lm_head_reduction_out_of_the_loop():
    """Batch over 'data' (2) and vocab over 'tensor' (4): with batch_groups=2 the [H, V/4] gradient
    accumulator is all-reduced once in the entry computation, not inside the scan's loop body."""
    import re

    import jax
    import jax.numpy as jnp
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    from aepo_jax.logprobs import chunked_logprobs_entropy

    if len(jax.devices()) < 8:
        pytest.skip("needs 8 host devices (tests/conftest.py sets them)")
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("data", "tensor"))
    B, S, H, V = 4, 64, 32, 1024
    h = jax.device_put(jnp.ones((B, S, H)), NamedSharding(mesh, P("data")))
    w = jax.device_put(jnp.ones((H, V)), NamedSharding(mesh, P(None, "tensor")))
    t = jax.device_put(jnp.zeros((B, S), jnp.int32), NamedSharding(mesh, P("data")))

    def where_dw_reduced(groups):
        f = jax.jit(jax.grad(lambda h, w: jnp.sum(chunked_logprobs_entropy(h, w, t, chunk_size=16,
                                                                          batch_groups=groups)[0]), argnums=1))
        txt = f.lower(h, w).compile().as_text()
        places, comp = [], None
        for line in txt.splitlines():
            if line and not line.startswith(" ") and "{" in line:
                comp = line.split()[0 if not line.startswith("ENTRY") else 1]
            if re.search(r"all-reduce(-start)?\(", line) and re.search(rf"f32\[(1,)?{H},{V // 4}\]", line):
                places.append(comp)
        return places

    grouped = where_dw_reduced(2)
    assert grouped and all(c.startswith("%main") for c in grouped)
    # without groups XLA reduces the accumulator inside the loop body (what batch_groups avoids)
    plain = where_dw_reduced(1)
    assert plain and not any(c.startswith("%main") for c in plain)


def test_bad_input():
    import jax.numpy as jnp

    from aepo_jax.logprobs import chunked_logprobs_entropy

    h, w, t, _, _ = _inputs(6)
    with pytest.raises(ValueError, match="lm_head"):
        chunked_logprobs_entropy(h, w.T, t)
    with pytest.raises(ValueError, match="targets"):
        chunked_logprobs_entropy(h, w, t[:, 1:])
    with pytest.raises(ValueError, match="targets"):
        chunked_logprobs_entropy(h, w, t.astype(jnp.float32))
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_logprobs_entropy(h, w, t, chunk_size=0)
    with pytest.raises(ValueError, match="temperature"):
        chunked_logprobs_entropy(h, w, t, temperature=0.0)
    with pytest.raises(ValueError, match="batch_groups"):
        chunked_logprobs_entropy(h, w, t, batch_groups=3)
