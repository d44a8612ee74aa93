"""JAX generation engine for the embedded SGLang-compatible server.

Per (batch, prompt, generation) bucket, two compiled programs run a generation: a batched prefill
of the left-padded prompts, then a ``lax.while_loop`` of one-token KV-cache decode steps that
exits as soon as every row has finished, called once per ``STEPS_PER_CALL`` steps so that
cancelled requests can be dropped in between (no Python work per token). Both go through the model's own
``Decoder.init_cache`` / ``Decoder.decode``; the token draw of each step is
``sampling.sample_step`` (SGLang's sampling semantics, exact inverse-CDF draws).

Each row's uniforms come from its own key, ``fold_in(fold_in(fold_in(key(0), seed_hi), seed_lo),
step)``, so the *draw* depends only on the row's seed. What the row's logits are depends on the
floating-point reductions of the forward pass, which XLA may order differently for another batch
or prompt-bucket shape; see ``Sampler.generate`` for exactly what is guaranteed.
"""

from __future__ import annotations

import json
import os
import secrets
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from aepo_jax.models import load_pretrained
from aepo_jax.models.hf_layout import host_all_finite
from aepo_jax.rollout.protocol import SamplingRequest, check_request
from aepo_jax.rollout.sampling import GREEDY_EPS, sample_step


@dataclass
class SampleResult:
    output_ids: list[int]
    finish_reason: dict  # SGLang: {"type": "stop", "matched": id} | {"type": "length", "length": n}
    logprobs: list[float]  # log softmax(logits / T) of each sampled token (T = 1 when greedy)
    logprobs_t1: list[float]  # log softmax(logits) of each sampled token
    seed: int = 0


def bucket_of(n: int, buckets: Sequence[int]) -> int:
    """The compiled size that holds ``n``: the smallest bucket >= n (beyond the last: n itself)."""
    for b in buckets:
        if n <= b:
            return b
    return n  # beyond the last bucket: exact size (one more compile)


_bucket = bucket_of


def prompt_bucket_representatives(prompt_lengths: Sequence[int], buckets: Sequence[int]) -> dict[int, int]:
    """{prompt bucket: the longest of ``prompt_lengths`` in it} for every bucket those lengths reach.

    A batch's prompt bucket is the bucket of its longest prompt, so a set of prompts can only ever
    run in these buckets; one request per representative length compiles every one of them (the
    trainer's start-up warm-up, so that no later step compiles)."""
    out: dict[int, int] = {}
    for n in prompt_lengths:
        b = bucket_of(int(n), buckets)
        out[b] = max(out.get(b, 0), int(n))
    return dict(sorted(out.items()))


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


# --------------------------------------------------------------------------- the jitted generation

Cancelled = Callable[[], Sequence[bool]]  # polled between decode calls: True = stop this request


STEPS_PER_CALL = 16  # decode steps per jitted call; between calls cancelled rows are dropped


class _Carry(NamedTuple):
    """The decode loop's state between jitted calls (device arrays; the cache is donated)."""

    step: jax.Array  # scalar int32: tokens generated so far (the loop index)
    logits: jax.Array  # [B, V] f32: the next token's logits
    cache: Any  # the model's KV cache
    cache_mask: jax.Array  # [B, T] bool
    tokens: jax.Array  # [B, G] int32
    logprobs: jax.Array  # [B, G] f32, at the sampling temperature
    logprobs_t1: jax.Array  # [B, G] f32
    done: jax.Array  # [B] bool
    stopped: jax.Array  # [B] bool: finished on a stop token
    n_gen: jax.Array  # [B] int32


def _build_generate_fns(graphdef):
    """(prefill, decode_steps), jitted; shapes (buckets) select the compiled versions.

    ``prefill`` runs the left-padded prompts through the cache and returns the first carry;
    ``decode_steps`` runs the one-token decode ``lax.while_loop`` up to step ``until`` or until
    every row is done, whichever comes first. The host calls it again until the batch is
    finished, and can mark rows done in between (``cancel``): a batch whose requests were all
    abandoned stops within ``STEPS_PER_CALL`` steps instead of running to the end."""

    def prefill(state, prompt_ids, prompt_mask, max_new, gen_len):
        model = nnx.merge(graphdef, state)
        b, plen = prompt_ids.shape
        pos = jnp.maximum(jnp.cumsum(prompt_mask.astype(jnp.int32), axis=-1) - 1, 0)
        cache = model.init_cache(b, plen + gen_len)
        cache_mask = jnp.concatenate([prompt_mask, jnp.zeros((b, gen_len), jnp.bool_)], axis=1)
        # Prefill all but the last prompt token without using their logits (XLA drops the LM
        # head for them: [B, P, V] logits would be GBs at a 150k vocabulary), then the last one.
        if plen > 1:
            _, cache = model.decode(prompt_ids[:, :-1], pos[:, :-1], cache, 0, cache_mask)
        logits, cache = model.decode(prompt_ids[:, -1:], pos[:, -1:], cache, plen - 1, cache_mask)
        return _Carry(jnp.int32(0), logits[:, 0], cache, cache_mask, jnp.zeros((b, gen_len), jnp.int32),
                      jnp.zeros((b, gen_len), jnp.float32), jnp.zeros((b, gen_len), jnp.float32),
                      max_new <= 0, jnp.zeros((b,), jnp.bool_), jnp.zeros((b,), jnp.int32))

    def decode_steps(state, carry, until, cancel, lengths, temps, top_p, top_k, min_p, max_new, stop_ids,
                     seed_hi, seed_lo):
        model = nnx.merge(graphdef, state)
        gen_len = carry.tokens.shape[1]
        plen = carry.cache_mask.shape[1] - gen_len
        greedy = temps < GREEDY_EPS
        need_trunc = (top_k < model.cfg.vocab_size) | (top_p < 1.0)
        keys = jax.vmap(lambda h, l: jax.random.fold_in(jax.random.fold_in(jax.random.key(0), h), l))(seed_hi, seed_lo)

        def cond(c):
            return (c.step < until) & ~jnp.all(c.done)

        def body(c):
            i = c.step
            tok, lpt, lp1 = sample_step(c.logits, temps, greedy, top_k, top_p, min_p, need_trunc, keys, i)
            live = ~c.done
            n_gen = c.n_gen + live.astype(jnp.int32)
            hit = jnp.any(tok[:, None] == stop_ids, axis=-1) & live
            slot = plen + i
            cache_mask = c.cache_mask.at[:, slot].set(True)
            logits, cache = model.decode(tok[:, None], (lengths + i)[:, None], c.cache, slot, cache_mask)
            return _Carry(i + 1, logits[:, 0], cache, cache_mask,
                          c.tokens.at[:, i].set(jnp.where(live, tok, 0)),
                          c.logprobs.at[:, i].set(jnp.where(live, lpt, 0.0)),
                          c.logprobs_t1.at[:, i].set(jnp.where(live, lp1, 0.0)),
                          c.done | hit | (n_gen >= max_new), c.stopped | hit, n_gen)

        return jax.lax.while_loop(cond, body, carry._replace(done=carry.done | cancel))

    return (jax.jit(prefill, static_argnames=("gen_len",)),
            jax.jit(decode_steps, donate_argnums=(1,)))


def _restricted(cancelled: Cancelled | None, idx: list[int]) -> Cancelled | None:
    """``cancelled`` for the requests ``idx`` only, in that order."""
    if cancelled is None:
        return None

    def flags() -> list[bool]:
        every = cancelled()
        return [bool(every[i]) for i in idx]

    return flags


@jax.jit
def _finite_flags(leaves: list) -> jax.Array:
    return jnp.stack([jnp.all(jnp.isfinite(x)) if jnp.issubdtype(x.dtype, jnp.floating) else jnp.bool_(True)
                      for x in leaves])


def _check_finite(state, path: str) -> None:
    """ValueError naming the first parameter with a NaN or an infinity (one compiled check and one
    device-to-host transfer for all of them: it runs on every weight sync)."""
    keyed = jax.tree_util.tree_leaves_with_path(state)
    if all(getattr(x, "sharding", None) is not None and len(x.sharding.device_set) == 1
           and next(iter(x.sharding.device_set)).platform == "cpu" for _, x in keyed):
        flags = [host_all_finite(np.asarray(x)) for _, x in keyed]  # in place on the host, ~10x faster
    else:
        flags = np.asarray(_finite_flags([x for _, x in keyed]))
    for (key, x), ok in zip(keyed, flags):
        if not ok:
            if getattr(key[0], "key", None) == "layers":  # stacked [layers, ...]: name the layer too
                bad = ~np.asarray(jnp.all(jnp.isfinite(x).reshape(x.shape[0], -1), axis=1))
                key = (key[0], jax.tree_util.SequenceKey(int(np.argmax(bad))), *key[1:])
            raise ValueError(f"{path}: parameter {jax.tree_util.keystr(key)} has non-finite values (NaN or inf)")


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
        self._prefill, self._decode_steps = _build_generate_fns(self._graphdef)
        c = self.config
        self._pb = c.prompt_buckets or tuple(_pow2_buckets(16, self.context_len))
        self._gb = c.gen_buckets or tuple(_pow2_buckets(16, self.context_len))

    @classmethod
    def from_pretrained(cls, path: str, *, dtype: Any = "float32", mesh: Any = None,
                        config: SamplerConfig | None = None, context_len: int | None = None) -> "Sampler":
        model = load_pretrained(path, dtype=dtype, mesh=mesh)
        _check_finite(nnx.state(model), path)
        s = cls(model, eos_token_ids=read_eos_token_ids(path), context_len=context_len,
                config=config, dtype=dtype, model_path=path)
        s.mesh = mesh
        return s

    @property
    def buckets(self) -> dict[str, list[int]]:
        """The compiled shapes' sizes: every generation runs in one (batch, prompt, gen, stop)
        bucket combination, and each new combination is one compilation."""
        c = self.config
        return {"batch": list(c.batch_buckets), "prompt": list(self._pb), "gen": list(self._gb),
                "stop": list(c.stop_buckets)}

    # ---------------------------------------------------------------- weights
    def model(self):
        """The served weights as a Decoder (the learner's layout), e.g. for a reference forward."""
        return nnx.merge(self._graphdef, self._weights[0])

    def weights(self) -> tuple:
        """The served weights as ``(graphdef, state)``, the form the jitted functions take."""
        return self._graphdef, self._weights[0]

    @property
    def weight_version(self) -> str:
        return self._weights[1]

    def set_weight_version(self, version: str) -> None:
        self._weights = (self._weights[0], str(version))

    def load_weights(self, path: str, weight_version: str | None = None, mesh: Any = None) -> None:
        """Swap in the weights of the HF checkpoint at ``path`` (same architecture).

        Raises ValueError naming the first parameter whose shape or dtype differs or that holds a
        NaN or an infinity; the current weights stay in place on any failure."""
        model = load_pretrained(path, dtype=self.dtype, mesh=mesh if mesh is not None else self.mesh)
        self.swap_model(model, weight_version, what=path)
        self.model_path = path

    def swap_model(self, model, weight_version: str | None = None, *, what: str = "new weights") -> None:
        """Serve ``model``'s weights from the next ``generate`` call on (one atomic swap; a call
        in progress finishes on the old ones). The same checks as :meth:`load_weights`, with
        ``what`` naming the source in the error (the distributed weight sync passes its request)."""
        path = what
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
        _check_finite(new_state, path)
        version = self._weights[1] if weight_version is None else str(weight_version)
        self._weights = (new_state, version)

    # ---------------------------------------------------------------- generation
    def _fresh_seed(self) -> int:
        return secrets.randbits(63)

    def generate(self, requests: Sequence[SamplingRequest], cancelled: Cancelled | None = None) -> list[SampleResult]:
        """Generate for every request (split into chunks of ``max_batch``); results in order.

        ``cancelled() -> [bool per request]`` (polled every ``STEPS_PER_CALL`` steps, from this
        thread) stops the requests marked True early; their results are then partial, with finish_reason
        ``{"type": "abort", "message": "Cancelled", ...}``.

        What a seed guarantees: a request's draws come only from its own seed, so its output
        is a function of (seed, prompt, sampling parameters, weights) *and the compiled shape it
        runs in*: the batch, prompt and generation buckets. In the same buckets, the output is
        bit-for-bit the same whatever the other rows are and wherever the row sits. In other
        buckets the logits differ by float rounding (XLA:CPU picks its matmul kernel by the
        number of rows, and the attention reductions run over another key length), so log-probs
        agree to ~1e-5 and the tokens agree until a draw lands within that rounding of a
        boundary of the cumulative distribution; from there the continuation differs. For
        batch-independent outputs, serve with one bucket per kind (e.g. ``--batch-buckets 64
        --prompt-buckets 256 --gen-buckets 1024``): every request then runs in the same shape.
        """
        state, _ = self._weights  # one read: the whole call uses these weights
        return self.generate_with(state, requests, cancelled)

    def generate_versioned(self, requests: Sequence[SamplingRequest], cancelled: Cancelled | None = None
                           ) -> tuple[list[SampleResult], str]:
        """Like ``generate`` and also returns the weight version every result came from."""
        state, version = self._weights
        return self.generate_with(state, requests, cancelled), version

    def generate_with(self, state, requests: Sequence[SamplingRequest],
                      cancelled: Cancelled | None = None) -> list[SampleResult]:
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
            rows = [reqs[i] for i in chunk]
            for i, res in zip(chunk, self._run_chunk(state, rows, [seeds[i] for i in chunk],
                                                     _restricted(cancelled, chunk))):
                results[i] = res
        return results  # type: ignore[return-value]

    def _check(self, i: int, r: SamplingRequest) -> None:
        try:
            check_request(r, self.vocab_size, self.context_len)
        except ValueError as e:
            raise ValueError(f"request {i}: {e}") from None

    def _run_chunk(self, state, reqs: list[SamplingRequest], seeds: list[int],
                   cancelled: Cancelled | None) -> list[SampleResult]:
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
        lengths = mask.sum(axis=-1, dtype=np.int32)
        carry = self._prefill(state, ids, mask, max_new, gen_len=glen)
        cancel = np.zeros((b,), bool)
        for until in range(STEPS_PER_CALL, glen + STEPS_PER_CALL, STEPS_PER_CALL):
            if cancelled is not None:
                cancel[:n] = cancelled()
            carry = self._decode_steps(state, carry, np.int32(min(until, glen)), cancel, lengths, temps, top_p,
                                       top_k, min_p, max_new, stop_ids, hi, lo)
            if bool(np.all(carry.done)):
                break
        tok, lpt, lp1, n_gen, stopped = (np.asarray(x) for x in (carry.tokens, carry.logprobs, carry.logprobs_t1,
                                                                carry.n_gen, carry.stopped))
        results = []
        for row, r in enumerate(reqs):
            m = int(n_gen[row])
            toks = tok[row, :m].tolist()
            if stopped[row]:
                fr = {"type": "stop", "matched": int(toks[-1])}
            elif cancel[row] and m < r.max_new_tokens:
                fr = {"type": "abort", "message": "Cancelled", "status_code": None, "err_type": None}
            else:
                fr = {"type": "length", "length": int(r.max_new_tokens)}
            results.append(SampleResult(toks, fr, lpt[row, :m].tolist(), lp1[row, :m].tolist(), seeds[row]))
        return results
