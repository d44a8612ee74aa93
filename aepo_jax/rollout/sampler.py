"""JAX generation engine for the embedded SGLang-compatible server.

One ``jit`` per (batch, prompt, generation) bucket runs the whole generation: a batched prefill of
the left-padded prompts, then a ``lax.while_loop`` of one-token KV-cache decode steps that exits
as soon as every row has finished (no Python loop per token). The KV cache is preallocated for
``prompt_bucket + gen_bucket`` slots in the decoder's ``[L, B, KV, T, D]`` layout.

Sampling, per row, follows SGLang (``srt/layers/sampler.py``):

* ``temperature < 1e-6`` is greedy (argmax); its returned log-prob is at temperature 1.
* otherwise ``p = softmax(logits / T)``; ``top_k``, ``top_p`` and ``min_p`` cut ``p`` to a support
  (thresholds on the un-renormalised ``p``, as SGLang's torch path) and the token is drawn from
  ``p`` restricted to that support.
* the log-prob returned "under the sampling distribution" is ``log_softmax(logits / T)`` over the
  full vocabulary (before truncation), SGLang's default; ``logprobs_t1`` is ``log_softmax(logits)``.

Draws are exact inverse-CDF samples with one uniform per row and step (``jax.random.categorical``
draws a Gumbel per vocabulary entry and is ~15x slower on CPU). The uniform comes from the row's
own key, ``fold_in(fold_in(fold_in(key(0), seed_hi), seed_lo), step)``, so a request's output
depends only on its seed, its prompt and the weights, never on what else is in the batch.
``top_k``/``top_p`` need an order statistic; sorting the vocabulary (and ``lax.top_k``) is very
slow on CPU, so the threshold is found by an exact 32-step bisection on the float bit pattern,
and only when some row in the step asks for it (``lax.cond``). Ties at the threshold are all kept.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import threading
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

GREEDY_EPS = 1e-6
_BLOCK = 256  # inverse-CDF block size (two-level search: blocks, then inside one block)


@dataclass(frozen=True)
class SamplingRequest:
    """One sequence to generate."""

    input_ids: tuple[int, ...]
    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1 or >= vocab: whole vocabulary
    min_p: float = 0.0
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False  # disables every token stop (EOS and stop_token_ids), as SGLang
    seed: int | None = None  # None: a fresh random seed

    def __post_init__(self):
        object.__setattr__(self, "input_ids", tuple(int(t) for t in self.input_ids))
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))


@dataclass
class SampleResult:
    output_ids: list[int]
    finish_reason: dict  # SGLang: {"type": "stop", "matched": id} | {"type": "length", "length": n}
    logprobs: list[float]  # log softmax(logits / T) of each sampled token (T = 1 when greedy)
    logprobs_t1: list[float]  # log softmax(logits) of each sampled token
    seed: int = 0


def _bucket(n: int, buckets: Sequence[int]) -> int:
    for b in buckets:
        if n <= b:
            return b
    return n  # beyond the last bucket: exact size (one more compile)


def _pow2_buckets(lo: int, hi: int) -> list[int]:
    out, b = [], lo
    while b < hi:
        out.append(b)
        b *= 2
    out.append(hi)
    return out


def read_eos_token_ids(model_dir: str) -> tuple[int, ...]:
    """EOS ids from config.json and generation_config.json (union), as SGLang merges them."""
    ids: list[int] = []
    for name in ("config.json", "generation_config.json"):
        p = os.path.join(model_dir, name)
        if not os.path.exists(p):
            continue
        with open(p) as f:
            v = json.load(f).get("eos_token_id")
        if v is None:
            continue
        for t in (v if isinstance(v, list) else [v]):
            if int(t) not in ids:
                ids.append(int(t))
    return tuple(ids)


def split_seed(seed: int) -> tuple[int, int]:
    """A signed/unsigned 64-bit seed -> (hi, lo) uint32 words."""
    s = int(seed) % (1 << 64)
    return s >> 32, s & 0xFFFFFFFF


# --------------------------------------------------------------------------- jax pieces


def _layer_cache_decode(model, input_ids, position_ids, caches, cache_index, cache_mask):
    """``Decoder.decode`` with one K/V array per layer instead of one [L, ...] array.

    Same math, built from the decoder's own pieces (projection, attention, MLP, norms, RoPE);
    the tests compare it with the learner's full forward. Per-layer arrays let the attention
    read each layer's cache in place: slicing layer l out of the updated [L, B, KV, T, D] array
    makes XLA copy it every step (8 copies of 2.4 MB per step for 4 layers at B=32, T=144).
    caches: list of (k [B, KV, T, D], v [B, KV, T, D]); returns (logits [B, S, V] f32, caches).
    """
    import jax
    import jax.numpy as jnp

    from aepo_jax.models.decoder import cached_attention, rms_norm, rope_cos_sin

    cfg = model.cfg
    s = input_ids.shape[1]
    t = caches[0][0].shape[2]
    causal = jnp.arange(t)[None, :] <= (jnp.asarray(cache_index, jnp.int32) + jnp.arange(s))[:, None]
    visible = cache_mask[:, None, :] & causal[None]
    cos, sin = rope_cos_sin(position_ids, cfg.inv_freq())
    x = model._embed(input_ids)
    eps = cfg.rms_norm_eps
    zero = jnp.zeros((), jnp.int32)
    at = (zero, zero, jnp.asarray(cache_index, jnp.int32), zero)
    out = []
    for layer, (kc, vc) in zip(model.layers, caches):
        q, k, v = layer.attn.project(rms_norm(x, layer.attn_norm[...], eps), cos, sin)
        kc = jax.lax.dynamic_update_slice(kc, k.transpose(0, 2, 1, 3).astype(kc.dtype), at)
        vc = jax.lax.dynamic_update_slice(vc, v.transpose(0, 2, 1, 3).astype(vc.dtype), at)
        a = cached_attention(q, kc.astype(q.dtype), vc.astype(q.dtype), visible)
        x = x + layer.attn.out(a)
        x = x + layer.mlp(rms_norm(x, layer.mlp_norm[...], eps))
        out.append((kc, vc))
    h = rms_norm(x, model.norm[...], eps)
    return model.logits_from_hidden(h), out


def _build_generate_fn(graphdef, vocab_size: int):
    """The jitted whole-generation function; shapes (buckets) select the compiled version."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    V = vocab_size
    nblk = -(-V // _BLOCK)
    vpad = nblk * _BLOCK

    def _bits(x):
        return jax.lax.bitcast_convert_type(x, jnp.int32)

    def _from_bits(b):
        return jax.lax.bitcast_convert_type(b, jnp.float32)

    def truncation_threshold(p, top_k, top_p):
        """Largest t with count(p >= t) >= top_k OR mass(p >= t) >= top_p, exact (bit bisection).

        p may be unnormalised (then top_p is the mass to reach, i.e. top_p * sum(p)).

        The kept set {p >= t} is then top-k-set ∩ top-p-set (ties kept), as SGLang's
        sort-based torch path up to ties."""
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
        """Exact draw from q/sum(q) (q >= 0, [B, V]) with one uniform per row; two-level search."""
        b = q.shape[0]
        qp = jnp.pad(q, ((0, 0), (0, vpad - V))).reshape(b, nblk, _BLOCK)
        bs = jnp.sum(qp, axis=-1)  # [B, nblk]
        cbs = jnp.cumsum(bs, axis=-1)
        target = u * cbs[:, -1]
        blk = jnp.minimum(jnp.sum(cbs <= target[:, None], axis=-1), nblk - 1)
        blk = nearest_positive(bs, blk)
        base = jnp.take_along_axis(cbs - bs, blk[:, None], axis=-1)[:, 0]
        qb = jnp.take_along_axis(qp, blk[:, None, None], axis=1)[:, 0]  # [B, BLOCK]
        cq = base[:, None] + jnp.cumsum(qb, axis=-1)
        j = jnp.minimum(jnp.sum(cq <= target[:, None], axis=-1), _BLOCK - 1)
        j = nearest_positive(qb, j)
        return blk * _BLOCK + j

    def sample_step(logits, temps, greedy, top_k, top_p, min_p, need_trunc, keys, step):
        """logits [B, V] f32 -> (token, logprob at T, logprob at 1).

        Few passes over [B, V] (this runs every decode step): one max, one pass for both
        normalisers, one for the inverse-CDF block sums; argmax and the top-k/top-p bisection
        only run when some row needs them."""
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

    def generate(state, prompt_ids, prompt_mask, temps, top_p, top_k, min_p, max_new, stop_ids,
                 seed_hi, seed_lo, gen_len):
        model = nnx.merge(graphdef, state)
        b, plen = prompt_ids.shape
        tlen = plen + gen_len
        greedy = temps < GREEDY_EPS
        need_trunc = (top_k < V) | (top_p < 1.0)
        keys = jax.vmap(lambda h, l: jax.random.fold_in(jax.random.fold_in(jax.random.key(0), h), l))(seed_hi, seed_lo)
        lengths = jnp.sum(prompt_mask, axis=-1, dtype=jnp.int32)
        pos = jnp.maximum(jnp.cumsum(prompt_mask.astype(jnp.int32), axis=-1) - 1, 0)
        full = model.init_cache(b, tlen)  # the decoder's dtype and layout, split per layer
        cache = [(full["k"][i], full["v"][i]) for i in range(full["k"].shape[0])]
        cache_mask = jnp.concatenate([prompt_mask, jnp.zeros((b, gen_len), jnp.bool_)], axis=1)
        # Prefill all but the last prompt token without using their logits (XLA drops the LM
        # head for them: [B, P, V] logits would be GBs at a 150k vocabulary), then the last one.
        if plen > 1:
            _, cache = _layer_cache_decode(model, prompt_ids[:, :-1], pos[:, :-1], cache, 0, cache_mask)
        logits, cache = _layer_cache_decode(model, prompt_ids[:, -1:], pos[:, -1:], cache, plen - 1, cache_mask)
        logits = logits[:, 0]

        out_tok = jnp.zeros((b, gen_len), jnp.int32)
        out_lpt = jnp.zeros((b, gen_len), jnp.float32)
        out_lp1 = jnp.zeros((b, gen_len), jnp.float32)
        done = max_new <= 0
        stopped = jnp.zeros((b,), jnp.bool_)
        n_gen = jnp.zeros((b,), jnp.int32)

        def cond(c):
            i, done = c[0], c[7]
            return (i < gen_len) & ~jnp.all(done)

        def body(c):
            i, logits, cache, cache_mask, out_tok, out_lpt, out_lp1, done, stopped, n_gen = c
            tok, lpt, lp1 = sample_step(logits, temps, greedy, top_k, top_p, min_p, need_trunc, keys, i)
            live = ~done
            out_tok = out_tok.at[:, i].set(jnp.where(live, tok, 0))
            out_lpt = out_lpt.at[:, i].set(jnp.where(live, lpt, 0.0))
            out_lp1 = out_lp1.at[:, i].set(jnp.where(live, lp1, 0.0))
            n_gen = n_gen + live.astype(jnp.int32)
            hit = jnp.any(tok[:, None] == stop_ids, axis=-1) & live
            stopped = stopped | hit
            done = done | hit | (n_gen >= max_new)
            slot = plen + i
            cache_mask = cache_mask.at[:, slot].set(True)
            logits, cache = _layer_cache_decode(model, tok[:, None], (lengths + i)[:, None], cache, slot, cache_mask)
            return (i + 1, logits[:, 0], cache, cache_mask, out_tok, out_lpt, out_lp1, done, stopped, n_gen)

        c = (jnp.int32(0), logits, cache, cache_mask, out_tok, out_lpt, out_lp1, done, stopped, n_gen)
        c = jax.lax.while_loop(cond, body, c)
        return c[4], c[5], c[6], c[9], c[8]

    return jax.jit(generate, static_argnames=("gen_len",))


# --------------------------------------------------------------------------- engine


@dataclass
class SamplerConfig:
    max_batch: int = 64
    batch_buckets: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)
    prompt_buckets: tuple[int, ...] = ()  # () = powers of two from 16 to the context length
    gen_buckets: tuple[int, ...] = ()  # () = powers of two from 16 to the context length
    stop_buckets: tuple[int, ...] = (4, 8, 16, 32, 64)


class Sampler:
    """Batched generation with a fixed architecture; weights can be swapped (``load_weights``).

    ``generate`` is thread-safe against ``load_weights``: each call reads the weights once, so
    every result of one call comes from one set of weights (``weight_version`` tells which).
    """

    def __init__(self, model, *, eos_token_ids: Sequence[int] = (), context_len: int | None = None,
                 config: SamplerConfig | None = None, dtype: Any = None, model_path: str | None = None):
        from flax import nnx

        self.cfg = model.cfg
        self.vocab_size = int(self.cfg.vocab_size)
        self.context_len = int(context_len or self.cfg.max_position_embeddings)
        self.eos_token_ids = tuple(int(t) for t in eos_token_ids)
        self.config = config or SamplerConfig()
        self.dtype = dtype if dtype is not None else getattr(model, "param_dtype", "float32")
        self.model_path = model_path
        self.mesh = None  # new weights are loaded onto this mesh (from_pretrained's)
        self._graphdef, state = nnx.split(model)
        self._weights = (state, "default")  # replaced atomically as one tuple
        self._fn = _build_generate_fn(self._graphdef, self.vocab_size)
        self._seed_lock = threading.Lock()
        c = self.config
        self._pb = c.prompt_buckets or tuple(_pow2_buckets(16, self.context_len))
        self._gb = c.gen_buckets or tuple(_pow2_buckets(16, self.context_len))

    @classmethod
    def from_pretrained(cls, path: str, *, dtype: Any = "float32", mesh: Any = None,
                        config: SamplerConfig | None = None, context_len: int | None = None) -> "Sampler":
        from aepo_jax.models import load_pretrained

        model = load_pretrained(path, dtype=dtype, mesh=mesh)
        s = cls(model, eos_token_ids=read_eos_token_ids(path), context_len=context_len,
                config=config, dtype=dtype, model_path=path)
        s.mesh = mesh
        return s

    # ---------------------------------------------------------------- weights
    def model(self):
        """The served weights as a Decoder (the learner's layout), e.g. for a reference forward."""
        from flax import nnx

        return nnx.merge(self._graphdef, self._weights[0])

    @property
    def weight_version(self) -> str:
        return self._weights[1]

    def set_weight_version(self, version: str) -> None:
        self._weights = (self._weights[0], str(version))

    def load_weights(self, path: str, weight_version: str | None = None, mesh: Any = None) -> None:
        """Swap in the weights of the HF checkpoint at ``path`` (same architecture).

        Raises ValueError naming the first parameter whose shape or dtype differs; the current
        weights stay in place on any failure."""
        import jax
        from flax import nnx

        from aepo_jax.models import load_pretrained

        model = load_pretrained(path, dtype=self.dtype, mesh=mesh if mesh is not None else self.mesh)
        _, new_state = nnx.split(model)
        old_state = self._weights[0]
        old_leaves = jax.tree_util.tree_leaves_with_path(old_state)
        new_leaves = jax.tree_util.tree_leaves_with_path(new_state)
        if len(old_leaves) != len(new_leaves):
            raise ValueError(f"{path}: {len(new_leaves)} parameter arrays, the served model has {len(old_leaves)}")
        for (pa, a), (pb, b) in zip(old_leaves, new_leaves):
            if pa != pb or a.shape != b.shape or a.dtype != b.dtype:
                raise ValueError(
                    f"{path}: parameter {jax.tree_util.keystr(pb)} is {b.dtype}{list(b.shape)}, "
                    f"the served model has {jax.tree_util.keystr(pa)} {a.dtype}{list(a.shape)}"
                )
        version = self._weights[1] if weight_version is None else str(weight_version)
        self._weights = (new_state, version)
        self.model_path = path

    # ---------------------------------------------------------------- generation
    def _fresh_seed(self) -> int:
        return secrets.randbits(63)

    def generate(self, requests: Sequence[SamplingRequest]) -> list[SampleResult]:
        """Generate for every request (split into chunks of ``max_batch``); results in order."""
        state, _ = self._weights  # one read: the whole call uses these weights
        return self.generate_with(state, requests)

    def generate_versioned(self, requests: Sequence[SamplingRequest]) -> tuple[list[SampleResult], str]:
        """Like ``generate`` and also returns the weight version every result came from."""
        state, version = self._weights
        return self.generate_with(state, requests), version

    def generate_with(self, state, requests: Sequence[SamplingRequest]) -> list[SampleResult]:
        reqs = list(requests)
        for i, r in enumerate(reqs):
            self._check(i, r)
        seeds = [r.seed if r.seed is not None else self._fresh_seed() for r in reqs]
        results: list[SampleResult | None] = [None] * len(reqs)
        todo = [i for i, r in enumerate(reqs) if r.max_new_tokens > 0]
        for i, r in enumerate(reqs):
            if r.max_new_tokens == 0:
                results[i] = SampleResult([], {"type": "length", "length": 0}, [], [], seeds[i])
        # Group by similar length so short prompts do not pay for a long one's bucket.
        todo.sort(key=lambda i: len(reqs[i].input_ids))
        mb = self.config.max_batch
        for s in range(0, len(todo), mb):
            chunk = todo[s:s + mb]
            for i, res in zip(chunk, self._run_chunk(state, [reqs[i] for i in chunk], [seeds[i] for i in chunk])):
                results[i] = res
        return results  # type: ignore[return-value]

    def _check(self, i: int, r: SamplingRequest) -> None:
        if not r.input_ids:
            raise ValueError(f"request {i}: input_ids is empty")
        bad = [t for t in r.input_ids if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"request {i}: token id {bad[0]} outside the vocabulary [0, {self.vocab_size})")
        if r.max_new_tokens < 0:
            raise ValueError(f"request {i}: max_new_tokens must be >= 0, got {r.max_new_tokens}")
        if len(r.input_ids) + r.max_new_tokens > self.context_len:
            raise ValueError(f"request {i}: prompt ({len(r.input_ids)}) + max_new_tokens "
                             f"({r.max_new_tokens}) exceeds the context length {self.context_len}")
        if not (math.isfinite(r.temperature) and r.temperature >= 0):
            raise ValueError(f"request {i}: temperature must be finite and >= 0, got {r.temperature}")
        if not 0 < r.top_p <= 1:
            raise ValueError(f"request {i}: top_p must be in (0, 1], got {r.top_p}")
        if not 0 <= r.min_p <= 1:
            raise ValueError(f"request {i}: min_p must be in [0, 1], got {r.min_p}")
        if r.top_k == 0 or r.top_k < -1:
            raise ValueError(f"request {i}: top_k must be -1 or >= 1, got {r.top_k}")

    def _run_chunk(self, state, reqs: list[SamplingRequest], seeds: list[int]) -> list[SampleResult]:
        c = self.config
        n = len(reqs)
        b = _bucket(n, c.batch_buckets)
        plen = _bucket(max(len(r.input_ids) for r in reqs), self._pb)
        glen = _bucket(max(r.max_new_tokens for r in reqs), self._gb)
        stops = [() if r.ignore_eos else tuple(dict.fromkeys(self.eos_token_ids + r.stop_token_ids)) for r in reqs]
        k = _bucket(max(1, max(len(s) for s in stops)), c.stop_buckets)

        ids = np.zeros((b, plen), np.int32)
        mask = np.zeros((b, plen), bool)
        temps = np.ones((b,), np.float32)
        top_p = np.ones((b,), np.float32)
        top_k = np.full((b,), self.vocab_size, np.int32)
        min_p = np.zeros((b,), np.float32)
        max_new = np.zeros((b,), np.int32)  # padding rows: 0 -> done from the start
        stop_ids = np.full((b, k), -1, np.int32)
        hi = np.zeros((b,), np.uint32)
        lo = np.zeros((b,), np.uint32)
        for row, (r, s, sd) in enumerate(zip(reqs, stops, seeds)):
            L = len(r.input_ids)
            ids[row, plen - L:] = r.input_ids  # left padding: every row's last token at plen-1
            mask[row, plen - L:] = True
            temps[row] = r.temperature
            top_p[row] = r.top_p
            top_k[row] = self.vocab_size if (r.top_k == -1 or r.top_k >= self.vocab_size) else r.top_k
            min_p[row] = r.min_p
            max_new[row] = r.max_new_tokens
            stop_ids[row, :len(s)] = s
            hi[row], lo[row] = split_seed(sd)
        ids[n:, -1] = 0
        mask[n:, -1] = True
        out = self._fn(state, ids, mask, temps, top_p, top_k, min_p, max_new, stop_ids, hi, lo, gen_len=glen)
        tok, lpt, lp1, n_gen, stopped = (np.asarray(x) for x in out)
        results = []
        for row, r in enumerate(reqs):
            m = int(n_gen[row])
            toks = tok[row, :m].tolist()
            if stopped[row]:
                fr = {"type": "stop", "matched": int(toks[-1])}
            else:
                fr = {"type": "length", "length": int(r.max_new_tokens)}
            results.append(SampleResult(toks, fr, lpt[row, :m].tolist(), lp1[row, :m].tolist(), seeds[row]))
        return results
