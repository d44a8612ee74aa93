"""Memory-lean log-prob / entropy head: hidden states + LM-head matrix -> log pi(target), H.

Why this exists: with Qwen's vocabulary (151,936) the fp32 logits of one 8,192-token response are
about 5 GB, and autodiff of ``log_softmax(h @ W)`` keeps several [B, S, V] buffers alive for the
backward pass. Here the sequence is cut into chunks of ``chunk_size`` positions and a ``lax.scan``
walks over them, so the largest live buffers are [B, chunk, V] and peak memory does not grow with S.

The gradient is a hand-written custom VJP rather than ``jax.checkpoint`` around the scan body:
the backward pass recomputes one chunk's logits (the only rematerialisation), forms
``d logits = g_logp * (onehot - p) [+ g_H * (-p * (log p + H))]`` in one fused elementwise pass,
and accumulates ``dW += h^T d logits`` in the scan carry. This avoids the elementwise work that
autodiff of softmax/log_softmax would replay (see tools/bench_loss.py for the measured ratios).

Temperature: ``log pi^T = log_softmax(h @ W / T)``. The trainer always uses T = 1 (all learner
log-probs are recomputed at temperature 1); the argument exists for analysis and tests.

Entropy: the full-distribution entropy ``H_t = logsumexp(z) - sum_v softmax(z)_v z_v`` comes out of
the same pass. It carries a gradient only when ``entropy_grad=True`` (Entropy-Reg needs it); with
``entropy_grad=False`` its cotangent is ignored, i.e. it behaves like ``stop_gradient(H)``.
The sampled estimator of the same quantity is ``-log pi(o_t)`` (:func:`sampled_entropy`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

__all__ = [
    "chunked_logprobs_entropy",
    "naive_logprobs_entropy",
    "sampled_entropy",
]


def _check_inputs(hidden, lm_head, targets, temperature, chunk_size):
    if hidden.ndim != 3:
        raise ValueError(f"hidden: expected [B, S, H], got shape {tuple(hidden.shape)}")
    if lm_head.ndim != 2 or lm_head.shape[0] != hidden.shape[-1]:
        raise ValueError(
            f"lm_head: expected [H, V] with H = {hidden.shape[-1]} (hidden's last dim), "
            f"got shape {tuple(lm_head.shape)}"
        )
    if targets.shape != hidden.shape[:2]:
        raise ValueError(
            f"targets: expected shape {tuple(hidden.shape[:2])} (hidden's [B, S]), got {tuple(targets.shape)}"
        )
    if not jnp.issubdtype(targets.dtype, jnp.integer):
        raise ValueError(f"targets: expected an integer dtype, got {targets.dtype}")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size: expected a positive int, got {chunk_size!r}")
    if not float(temperature) > 0:
        raise ValueError(f"temperature: expected > 0, got {temperature!r}")


def _logits(h, w, inv_t):
    """[..., H] x [H, V] -> fp32 [..., V] (accumulated in fp32 whatever the input dtype)."""
    z = jnp.einsum("...h,hv->...v", h, w, preferred_element_type=jnp.float32)
    return z if inv_t == 1.0 else z * inv_t


def _to_chunks(x, n_chunks, chunk):
    """[B, S_pad, ...] -> [n_chunks, B, chunk, ...] (scan axis first; batch sharding is kept)."""
    b = x.shape[0]
    x = x.reshape((b, n_chunks, chunk) + x.shape[2:])
    return jnp.moveaxis(x, 1, 0)


def _from_chunks(x, seq_len):
    """[n_chunks, B, chunk, ...] -> [B, seq_len, ...]."""
    x = jnp.moveaxis(x, 0, 1)
    b, n, c = x.shape[:3]
    return x.reshape((b, n * c) + x.shape[3:])[:, :seq_len]


def _pad_seq(x, pad):
    if pad == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[1] = (0, pad)
    return jnp.pad(x, widths)


@functools.lru_cache(maxsize=None)
def _make_head(inv_t: float, chunk: int, entropy_grad: bool, groups: int):
    """Build the custom-VJP head for one (temperature, chunk, entropy_grad, batch_groups) setting.

    Cached so that eager calls reuse the same function (and its compiled scan bodies).
    """

    def forward(hidden, lm_head, targets):
        b, s, _ = hidden.shape
        n_chunks = -(-s // chunk)
        pad = n_chunks * chunk - s
        hc = _to_chunks(_pad_seq(hidden, pad), n_chunks, chunk)
        tc = _to_chunks(_pad_seq(targets, pad), n_chunks, chunk)

        def body(_, xs):
            h, t = xs
            z = _logits(h, lm_head, inv_t)
            m = jnp.max(z, axis=-1, keepdims=True)
            zs = z - m
            e = jnp.exp(zs)
            se = jnp.sum(e, axis=-1)
            log_se = jnp.log(se)
            z_t = jnp.take_along_axis(zs, t[..., None], axis=-1)[..., 0]
            logp = z_t - log_se
            # H = lse - E_p[z]  (both relative to the max, which cancels)
            ent = log_se - jnp.sum(e * zs, axis=-1) / se
            lse = log_se + m[..., 0]
            return None, (logp, ent, lse)

        _, (logp, ent, lse) = jax.lax.scan(body, None, (hc, tc))
        return _from_chunks(logp, s), _from_chunks(ent, s), _from_chunks(lse, s)

    @jax.custom_vjp
    def head(hidden, lm_head, targets):
        logp, ent, _ = forward(hidden, lm_head, targets)
        return logp, ent

    def head_fwd(hidden, lm_head, targets):
        logp, ent, lse = forward(hidden, lm_head, targets)
        # Residuals are O(B*S): the inputs plus the per-position log-normaliser and entropy.
        return (logp, ent), (hidden, lm_head, targets, lse, ent)

    def head_bwd(res, cts):
        hidden, lm_head, targets, lse, ent = res
        g_logp, g_ent = cts
        b, s, _ = hidden.shape
        v = lm_head.shape[1]
        n_chunks = -(-s // chunk)
        pad = n_chunks * chunk - s
        cdt = jnp.result_type(hidden.dtype, lm_head.dtype)
        xs = [
            _to_chunks(_pad_seq(hidden, pad), n_chunks, chunk),
            _to_chunks(_pad_seq(targets, pad), n_chunks, chunk),
            _to_chunks(_pad_seq(lse, pad), n_chunks, chunk),
            _to_chunks(_pad_seq(g_logp.astype(jnp.float32), pad), n_chunks, chunk),
        ]
        if entropy_grad:
            xs += [
                _to_chunks(_pad_seq(ent, pad), n_chunks, chunk),
                _to_chunks(_pad_seq(g_ent.astype(jnp.float32), pad), n_chunks, chunk),
            ]
        vocab_ids = jnp.arange(v, dtype=targets.dtype)
        # [n, B, c, ...] -> [n, G, B/G, c, ...]: the LM-head gradient is accumulated per row group
        # (one partial per data shard when G = data-axis size), summed once after the scan.
        xs = [x.reshape((x.shape[0], groups, b // groups) + x.shape[2:]) for x in xs]

        def body(dw, xs):
            h, t, lse_c, g1 = xs[:4]
            z = _logits(h, lm_head, inv_t)
            logp_all = z - lse_c[..., None]
            p = jnp.exp(logp_all)
            onehot = (vocab_ids == t[..., None]).astype(jnp.float32)
            dz = g1[..., None] * (onehot - p)
            if entropy_grad:
                ent_c, g2 = xs[4:]
                # dH/dz_v = -p_v (log p_v + H)
                dz = dz - g2[..., None] * p * (logp_all + ent_c[..., None])
            if inv_t != 1.0:
                dz = dz * inv_t
            dz = dz.astype(cdt)
            dh = jnp.einsum("gbcv,hv->gbch", dz, lm_head, preferred_element_type=jnp.float32)
            dw = dw + jnp.einsum("gbch,gbcv->ghv", h, dz, preferred_element_type=jnp.float32)
            return dw, dh.astype(hidden.dtype)

        dw0 = jnp.zeros((groups,) + lm_head.shape, jnp.float32)
        dw, dh = jax.lax.scan(body, dw0, tuple(xs))
        dh = dh.reshape((dh.shape[0], b) + dh.shape[3:])
        return _from_chunks(dh, s), jnp.sum(dw, axis=0).astype(lm_head.dtype), None

    head.defvjp(head_fwd, head_bwd)
    return head


def chunked_logprobs_entropy(
    hidden: jax.Array,
    lm_head: jax.Array,
    targets: jax.Array,
    *,
    temperature: float = 1.0,
    chunk_size: int = 256,
    entropy_grad: bool = False,
    batch_groups: int = 1,
) -> tuple[jax.Array, jax.Array]:
    """Log-probs of ``targets`` and full-distribution entropy, chunk by chunk over the sequence.

    Args:
      hidden: [B, S, H] final hidden states, already shifted so ``hidden[:, t]`` predicts
        ``targets[:, t]`` (e.g. ``model.hidden_states(ids)[:, :-1]`` with ``ids[:, 1:]``).
        Any float dtype; the logits are accumulated in fp32.
      lm_head: [H, V] LM-head matrix (``model.lm_head_kernel()``).
      targets: [B, S] integer token ids. Ids outside [0, V) (e.g. padding) are clipped into range;
        mask those positions in the loss.
      temperature: python float > 0; logits are divided by it. The learner always uses 1.
      chunk_size: positions per chunk (need not divide S). Peak memory is about three
        [B, chunk, V] fp32 buffers plus the LM head and its gradient.
      entropy_grad: if False (default) the entropy output carries no gradient.
      batch_groups: G must divide B. The LM-head gradient is accumulated separately for G equal
        groups of rows and summed once after the scan. When the batch is sharded over a data axis
        of size D, pass G = D: each device then keeps its own partial sum, and the cross-device
        reduction happens once instead of once per chunk (XLA otherwise all-reduces the [H, V]
        accumulator inside the loop). With G > 1 on one device it costs G accumulators.

    Returns:
      ``(logp, entropy)``, both float32 [B, S]. Gradients of ``logp`` with respect to ``hidden``
      and ``lm_head`` are exact; ``targets`` gets none.
    """
    hidden = jnp.asarray(hidden)
    lm_head = jnp.asarray(lm_head)
    targets = jnp.asarray(targets)
    _check_inputs(hidden, lm_head, targets, temperature, chunk_size)
    targets = jnp.clip(targets, 0, lm_head.shape[1] - 1)
    if not isinstance(batch_groups, int) or batch_groups < 1 or hidden.shape[0] % batch_groups:
        raise ValueError(f"batch_groups: expected a positive int dividing the batch {hidden.shape[0]}, got {batch_groups!r}")
    chunk = max(1, min(int(chunk_size), hidden.shape[1]))
    head = _make_head(1.0 / float(temperature), chunk, bool(entropy_grad), int(batch_groups))
    logp, ent = head(hidden, lm_head, targets)
    if not entropy_grad:
        ent = jax.lax.stop_gradient(ent)
    return logp, ent


def naive_logprobs_entropy(
    hidden: jax.Array,
    lm_head: jax.Array,
    targets: jax.Array,
    *,
    temperature: float = 1.0,
    entropy_grad: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """Reference: full [B, S, V] fp32 logits, ``log_softmax`` and autodiff. Tests and benchmarks only."""
    hidden = jnp.asarray(hidden)
    lm_head = jnp.asarray(lm_head)
    targets = jnp.asarray(targets)
    _check_inputs(hidden, lm_head, targets, temperature, 1)
    targets = jnp.clip(targets, 0, lm_head.shape[1] - 1)
    z = jnp.einsum("bsh,hv->bsv", hidden, lm_head, preferred_element_type=jnp.float32) / float(temperature)
    logp_all = jax.nn.log_softmax(z, axis=-1)
    logp = jnp.take_along_axis(logp_all, targets[..., None], axis=-1)[..., 0]
    ent = -jnp.sum(jnp.exp(logp_all) * logp_all, axis=-1)
    if not entropy_grad:
        ent = jax.lax.stop_gradient(ent)
    return logp, ent


def sampled_entropy(logp: jax.Array) -> jax.Array:
    """Per-token sampled (NLL) entropy estimator ``-log pi(o_t)``; unbiased for H_t only when o_t ~ pi at T=1.

    This is what the authors' controller reads (their ``actor/entropy_loss``); it carries the gradient of
    ``logp`` (wrap in ``stop_gradient`` for a metric).
    """
    return -logp
