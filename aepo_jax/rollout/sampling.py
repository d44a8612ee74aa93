"""One decode step's token draw, as pure jitted-friendly functions on float32 logits [B, V].

Sampling, per row, follows SGLang (``srt/layers/sampler.py``):

* ``temperature < GREEDY_EPS`` is greedy (argmax); its returned log-prob is at temperature 1.
* otherwise ``p = softmax(logits / T)``; ``top_k``, ``top_p`` and ``min_p`` cut ``p`` to a support
  (thresholds on the un-renormalised ``p``, as SGLang's torch path) and the token is drawn from
  ``p`` restricted to that support.
* the log-prob returned "under the sampling distribution" is ``log_softmax(logits / T)`` over the
  full vocabulary (before truncation), SGLang's default; ``logprobs_t1`` is ``log_softmax(logits)``.

Draws are exact inverse-CDF samples with one uniform per row and step (``jax.random.categorical``
draws a Gumbel per vocabulary entry and is ~15x slower on CPU). ``top_k``/``top_p`` need an order
statistic; sorting the vocabulary (and ``lax.top_k``) is very slow on CPU, so the threshold is
found by an exact 32-step bisection on the float bit pattern, and only when some row in the step
asks for it (``lax.cond``). Ties at the threshold are all kept.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

GREEDY_EPS = 1e-6  # SGLang: 0 <= temperature < 1e-6 means greedy
BLOCK = 256  # inverse-CDF block size (two-level search: blocks, then inside one block)


def _bits(x):
    return jax.lax.bitcast_convert_type(x, jnp.int32)


def _from_bits(b):
    return jax.lax.bitcast_convert_type(b, jnp.float32)


def truncation_threshold(p, top_k, top_p):
    """Largest t with count(p >= t) >= top_k OR mass(p >= t) >= top_p, exact (bit bisection).

    p may be unnormalised (then top_p is the mass to reach, i.e. top_p * sum(p)). The kept set
    {p >= t} is then top-k-set ∩ top-p-set (ties kept), as SGLang's sort-based torch path up to
    ties."""
    pmax = jnp.max(p, axis=-1)
    lo = jnp.zeros(p.shape[0], jnp.int32)  # pred(0) holds: count = V >= k
    hi = _bits(pmax) + 1  # pred(just above pmax) fails: count 0, mass 0

    def body(_, lohi):
        lo, hi = lohi
        mid = lo + (hi - lo) // 2
        t = _from_bits(mid)[:, None]
        keep = p >= t
        cnt = jnp.sum(keep, axis=-1, dtype=jnp.int32)
        mass = jnp.sum(jnp.where(keep, p, 0.0), axis=-1)
        ok = (cnt >= top_k) | (mass >= top_p)
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)

    lo, _ = jax.lax.fori_loop(0, 32, body, (lo, hi))
    return _from_bits(lo)


def nearest_positive(q, idx):
    """Index of q > 0 nearest to idx (at or below first, else above); idx when q[idx] > 0."""
    n = q.shape[-1]
    ar = jnp.arange(n)[None, :]
    pos = q > 0
    below = jnp.max(jnp.where(pos & (ar <= idx[:, None]), ar, -1), axis=-1)
    above = jnp.min(jnp.where(pos & (ar >= idx[:, None]), ar, n), axis=-1)
    return jnp.where(below >= 0, below, jnp.minimum(above, n - 1))


def inverse_cdf(q, u):
    """Exact draw from q/sum(q) (q >= 0, [B, V]) with one uniform u [B] per row; two-level search."""
    b, v = q.shape
    nblk = -(-v // BLOCK)
    qp = jnp.pad(q, ((0, 0), (0, nblk * BLOCK - v))).reshape(b, nblk, BLOCK)
    bs = jnp.sum(qp, axis=-1)  # [B, nblk]
    cbs = jnp.cumsum(bs, axis=-1)
    target = u * cbs[:, -1]
    blk = jnp.minimum(jnp.sum(cbs <= target[:, None], axis=-1), nblk - 1)
    blk = nearest_positive(bs, blk)
    base = jnp.take_along_axis(cbs - bs, blk[:, None], axis=-1)[:, 0]
    qb = jnp.take_along_axis(qp, blk[:, None, None], axis=1)[:, 0]  # [B, BLOCK]
    cq = base[:, None] + jnp.cumsum(qb, axis=-1)
    j = jnp.minimum(jnp.sum(cq <= target[:, None], axis=-1), BLOCK - 1)
    j = nearest_positive(qb, j)
    # q without positive mass (NaN logits from overflowing weights) lands in the padding:
    # clamp, so a token id is always inside the vocabulary
    return jnp.minimum(blk * BLOCK + j, v - 1)


def sample_step(logits, temps, greedy, top_k, top_p, min_p, need_trunc, keys, step):
    """logits [B, V] f32 -> (token, logprob at T, logprob at 1), each [B].

    temps, top_p, min_p [B] f32; top_k [B] int (V = whole vocabulary); greedy, need_trunc [B]
    bool; keys [B] PRNG keys (one per row), folded with ``step``. Few passes over [B, V] (this
    runs every decode step): one max, one pass for both normalisers, one for the inverse-CDF
    block sums; argmax and the top-k/top-p bisection only run when some row needs them."""
    t = jnp.where(greedy, 1.0, temps)
    m = jnp.max(logits, axis=-1, keepdims=True)
    z = logits - m
    zt = z / t[:, None]
    et = jnp.exp(zt)  # unnormalised p; p = et / st, max(et) = 1
    st = jnp.sum(et, axis=-1)
    # the temperature-1 normaliser costs another exp pass, unless every row samples at T = 1
    s1 = jax.lax.cond(jnp.all(t == 1.0), lambda: st, lambda: jnp.sum(jnp.exp(z), axis=-1))

    def trunc_threshold():  # on the et scale itself: a rescaled threshold could miss a tie by rounding
        return jnp.where(need_trunc, truncation_threshold(et, top_k, top_p * st), 0.0)

    thr = jax.lax.cond(jnp.any(need_trunc & ~greedy), trunc_threshold,
                       lambda: jnp.zeros(et.shape[0], jnp.float32))
    thr = jnp.maximum(thr, min_p)  # min_p * max(p) on the et scale is min_p * 1
    q = jnp.where(et >= thr[:, None], et, 0.0)
    u = jax.vmap(lambda k: jax.random.uniform(jax.random.fold_in(k, step), (), jnp.float32))(keys)
    sampled = inverse_cdf(q, u)
    argmax = jax.lax.cond(jnp.any(greedy), lambda: jnp.argmax(logits, axis=-1).astype(jnp.int32),
                          lambda: jnp.zeros(logits.shape[0], jnp.int32))
    tok = jnp.where(greedy, argmax, sampled).astype(jnp.int32)
    zk = jnp.take_along_axis(z, tok[:, None], axis=-1)[:, 0]
    lp1 = zk - jnp.log(s1)
    lpt = jnp.where(greedy, lp1, zk / t - jnp.log(st))
    return tok, lpt, lp1
