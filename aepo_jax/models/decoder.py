"""The decoder: one Flax NNX model for the Qwen2 / Qwen2.5 / Qwen3 / Llama families.

Read top to bottom: dtypes and a linear layer with a hand-written backward, RMSNorm, RoPE,
attention (a block-causal kernel for whole sequences and a KV-cache kernel for decoding),
the SwiGLU MLP, a transformer block, rematerialisation policies, the decoder, and init_model.

The layers are one stacked block (as MaxText's ``scan_layers``): every Param of ``Decoder.layers``
has a leading ``[num_hidden_layers]`` dimension (logical axis "layers", never sharded), and the
forward pass and KV-cache decoding run one ``lax.scan`` over it. XLA then compiles one layer,
whatever the depth: compile time and program size do not grow with the number of layers.

Family differences are config flags: ``qkv_bias`` (Qwen2, or Llama/Qwen3 ``attention_bias``),
``o_bias``, ``qk_norm`` (Qwen3: RMSNorm over head_dim on q and k before RoPE), ``head_dim``,
``rope_scaling`` (llama3 / linear) and ``tie_word_embeddings``.

Weight layouts (input dimension first; every Param carries ``logical_axes`` for sharding; the
per-layer ones below are stored with a leading [num_hidden_layers] dimension):
  embed    [V, H]               ("vocab", "embed")
  qkv      [H, KV, G+2, D]      q heads of kv-group j are slots 0..G-1, then k, then v
  o        [KV, G, D, H]        HF head order is kv-major (head = kv * G + g), as repeat_kv assumes
  gate_up  [H, 2, I]            gate then up
  down     [I, H]
  lm_head  [H, V]               absent when tied (then embed.T)
Fusing q/k/v and gate/up into one matmul each, and folding the G query heads of a KV head into
the rows of one attention matmul, are what make this run as fast as torch on CPU
(see docs/models.md and tools/bench_model.py).
"""

from __future__ import annotations

from typing import Any

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from aepo_jax.models.config import REMAT_POLICIES, ModelConfig, remat_policy

F32 = jnp.float32
_DTYPES = {"float32": jnp.float32, "fp32": jnp.float32, "bfloat16": jnp.bfloat16, "bf16": jnp.bfloat16,
           "float16": jnp.float16, "fp16": jnp.float16}


def as_dtype(d: Any) -> jnp.dtype:
    """'float32' | 'bfloat16' | a jnp dtype -> jnp dtype (ValueError naming the value otherwise)."""
    if isinstance(d, str):
        if d not in _DTYPES:
            raise ValueError(f"dtype: {d!r} is not supported (use 'float32' or 'bfloat16')")
        return jnp.dtype(_DTYPES[d])
    return jnp.dtype(d)


# --------------------------------------------------------------------------- linear
@jax.custom_vjp
def linear(x: jax.Array, w: jax.Array) -> jax.Array:
    """x [..., K] @ w [K, N]. Same math as jnp.dot, with a backward that XLA:CPU runs well."""
    return jnp.dot(x, w)


def _linear_fwd(x, w):
    return jnp.dot(x, w), (x, w)


def _linear_bwd(res, dy):
    # Autodiff of dot over a [B, L, K] input makes XLA emit large transposed copies; as 2-D
    # matmuls the weight gradient is a single x2d.T @ dy2d (MLP fwd+bwd 490 -> 359 ms on CPU).
    x, w = res
    k, n = w.shape
    x2 = x.reshape(-1, k)
    dy2 = dy.reshape(-1, n)
    dx = jnp.dot(dy2, w.T).reshape(x.shape)
    dw = jnp.dot(x2.T, dy2)
    return dx.astype(x.dtype), dw.astype(w.dtype)


linear.defvjp(_linear_fwd, _linear_bwd)


# --------------------------------------------------------------------------- norms and RoPE
def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """RMSNorm as transformers computes it: statistics in float32, output in x's dtype."""
    xf = x.astype(F32)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return y.astype(x.dtype) * weight.astype(x.dtype)


def rope_cos_sin(position_ids: jax.Array, inv_freq: np.ndarray) -> tuple[jax.Array, jax.Array]:
    """cos, sin [B, L, D/2] in float32 for integer positions [B, L]."""
    freqs = position_ids.astype(F32)[..., None] * jnp.asarray(inv_freq, F32)
    return jnp.cos(freqs), jnp.sin(freqs)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate-half RoPE on x [B, L, ..., D]; cos/sin [B, L, D/2] broadcast over the head axes."""
    extra = x.ndim - cos.ndim
    c = cos.reshape(cos.shape[:2] + (1,) * extra + cos.shape[2:])
    s = sin.reshape(sin.shape[:2] + (1,) * extra + sin.shape[2:])
    xf = x.astype(F32)
    x1, x2 = jnp.split(xf, 2, axis=-1)
    return jnp.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1).astype(x.dtype)


# --------------------------------------------------------------------------- attention kernels
_NEG = float(np.finfo(np.float32).min)  # finite: a fully masked (padding) row gives uniform, not NaN


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, key_valid: jax.Array,
                     block: int = 128) -> jax.Array:
    """Causal GQA attention over whole sequences, block by block.

    q [B, Lq, KV, G, D] (already scaled), k/v [B, L, KV, D], key_valid [B, L] bool -> [B, Lq, KV, G, D].
    The queries are the last Lq of the L positions (Lq = L for a whole sequence; Lq < L when the
    first L - Lq keys are a prefix computed elsewhere, see ``Decoder.continuation_hidden_states``).
    Query block i only meets key blocks 0..i (the blocks above the diagonal are skipped, not
    masked), and the G query heads that share a KV head are folded into the rows of one matmul,
    so there is no repeat_kv copy. Softmax in float32.
    """
    b, length, kvh, g, d = q.shape
    offset = k.shape[1] - length  # key index of query 0
    if offset < 0:
        raise ValueError(f"causal_attention: {length} queries but only {k.shape[1]} keys")
    qt = q.transpose(0, 2, 1, 3, 4)  # [B, KV, Lq, G, D]
    kt = k.transpose(0, 2, 1, 3)  # [B, KV, L, D]
    vt = v.transpose(0, 2, 1, 3)
    outs = []
    for start in range(0, length, block):
        stop = min(start + block, length)
        n, seen = stop - start, offset + stop
        qi = qt[:, :, start:stop].reshape(b, kvh, n * g, d)
        s = jnp.einsum("bhqd,bhkd->bhqk", qi, kt[:, :, :seen], preferred_element_type=F32)
        q_pos = offset + start + jnp.arange(n * g) // g
        ok = (q_pos[:, None] >= jnp.arange(seen)[None, :])[None, None] & key_valid[:, None, None, :seen]
        p = jax.nn.softmax(jnp.where(ok, s, _NEG), axis=-1)
        o = jnp.einsum("bhqk,bhkd->bhqd", p.astype(v.dtype), vt[:, :, :seen])
        outs.append(o.reshape(b, kvh, n, g, d))
    out = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=2)
    return out.transpose(0, 2, 1, 3, 4)


def cached_attention(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, visible: jax.Array) -> jax.Array:
    """q [B, S, KV, G, D] against a cache k/v [B, KV, T, D]; visible [B, S, T] bool -> [B, S, KV, G, D]."""
    b, s, kvh, g, d = q.shape
    qt = q.transpose(0, 2, 1, 3, 4).reshape(b, kvh, s * g, d)
    sc = jnp.einsum("bhqd,bhkd->bhqk", qt, k_cache, preferred_element_type=F32)
    vis = jnp.repeat(visible, g, axis=1)[:, None]  # rows are (s, g) pairs, s-major
    p = jax.nn.softmax(jnp.where(vis, sc, _NEG), axis=-1)
    o = jnp.einsum("bhqk,bhkd->bhqd", p.astype(v_cache.dtype), v_cache)
    return o.reshape(b, kvh, s, g, d).transpose(0, 2, 1, 3, 4)


# --------------------------------------------------------------------------- modules
def _param(rngs: nnx.Rngs, shape, axes, dtype, init: str = "normal", std: float = 0.02,
           stack: int = 0) -> nnx.Param:
    """A Param with logical axes; stack > 0 prepends a [stack] "layers" dimension."""
    if stack:
        shape, axes = (stack, *shape), ("layers", *axes)
    if init == "normal":
        value = (std * jax.random.normal(rngs.params(), shape, F32)).astype(dtype)
    elif init == "ones":
        value = jnp.ones(shape, dtype)
    else:
        value = jnp.zeros(shape, dtype)
    return nnx.Param(value, logical_axes=tuple(axes), init=init)


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, param_dtype, stack: int = 0):
        h, kv, g, d = cfg.hidden_size, cfg.num_key_value_heads, cfg.num_groups, cfg.head_dim
        p = functools.partial(_param, rngs, dtype=param_dtype, stack=stack)
        self.cfg = cfg
        self.qkv = p((h, kv, g + 2, d), ("embed", "kv_heads", "qkv", "head_dim"))
        self.qkv_bias = p((kv, g + 2, d), ("kv_heads", "qkv", "head_dim"), init="zeros") if cfg.qkv_bias else None
        self.q_norm = p((d,), ("norm",), init="ones") if cfg.qk_norm else None
        self.k_norm = p((d,), ("norm",), init="ones") if cfg.qk_norm else None
        self.o = p((kv, g, d, h), ("kv_heads", "q_group", "head_dim", "embed"))
        self.o_bias = p((h,), ("norm",), init="zeros") if cfg.o_bias else None

    def project(self, x: jax.Array, cos: jax.Array, sin: jax.Array):
        """x [B, L, H] -> q [B, L, KV, G, D] (RoPE'd, scaled by 1/sqrt(D)), k [B, L, KV, D] (RoPE'd), v."""
        cfg = self.cfg
        kv, g, d = cfg.num_key_value_heads, cfg.num_groups, cfg.head_dim
        w = self.qkv[...].astype(x.dtype)
        y = linear(x, w.reshape(w.shape[0], -1)).reshape(x.shape[:2] + (kv, g + 2, d))
        if self.qkv_bias is not None:
            y = y + self.qkv_bias[...].astype(x.dtype)
        y = checkpoint_name(y, "qkv_proj")
        q, k, v = y[..., :g, :], y[..., g, :], y[..., g + 1, :]
        if self.q_norm is not None:
            q = rms_norm(q, self.q_norm[...], cfg.rms_norm_eps)
            k = rms_norm(k, self.k_norm[...], cfg.rms_norm_eps)
        q = apply_rope(q, cos, sin) * jnp.asarray(d ** -0.5, x.dtype)
        k = apply_rope(k, cos, sin)
        return q, k, v

    def out(self, a: jax.Array) -> jax.Array:
        """a [B, L, KV, G, D] -> [B, L, H]."""
        a = checkpoint_name(a, "context")
        w = self.o[...].astype(a.dtype)
        y = linear(a.reshape(a.shape[:2] + (-1,)), w.reshape(-1, w.shape[-1]))
        if self.o_bias is not None:
            y = y + self.o_bias[...].astype(a.dtype)
        return checkpoint_name(y, "out_proj")

    def __call__(self, x, cos, sin, key_valid):
        q, k, v = self.project(x, cos, sin)
        return self.out(causal_attention(q, k, v, key_valid))


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, param_dtype, stack: int = 0):
        h, i = cfg.hidden_size, cfg.intermediate_size
        self.gate_up = _param(rngs, (h, 2, i), ("embed", "gate_up", "mlp"), param_dtype, stack=stack)
        self.down = _param(rngs, (i, h), ("mlp", "embed"), param_dtype, stack=stack)

    def __call__(self, x: jax.Array) -> jax.Array:
        w = self.gate_up[...].astype(x.dtype)
        gu = linear(x, w.reshape(w.shape[0], -1)).reshape(x.shape[:-1] + (2, w.shape[-1]))
        gu = checkpoint_name(gu, "mlp_up")
        y = linear(jax.nn.silu(gu[..., 0, :]) * gu[..., 1, :], self.down[...].astype(x.dtype))
        return checkpoint_name(y, "mlp_down")


class Block(nnx.Module):
    """One transformer layer; built with stack=N, it holds N layers' weights stacked (the Decoder
    scans over them, calling a Block whose Params are one layer's slices)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, param_dtype, stack: int = 0):
        self.cfg = cfg
        self.attn_norm = _param(rngs, (cfg.hidden_size,), ("norm",), param_dtype, "ones", stack=stack)
        self.attn = Attention(cfg, rngs=rngs, param_dtype=param_dtype, stack=stack)
        self.mlp_norm = _param(rngs, (cfg.hidden_size,), ("norm",), param_dtype, "ones", stack=stack)
        self.mlp = MLP(cfg, rngs=rngs, param_dtype=param_dtype, stack=stack)

    def __call__(self, x, cos, sin, key_valid):
        eps = self.cfg.rms_norm_eps
        x = x + self.attn(rms_norm(x, self.attn_norm[...], eps), cos, sin, key_valid)
        return x + self.mlp(rms_norm(x, self.mlp_norm[...], eps))

    def continuation(self, x, cos, sin, split, prefix_valid, valid, prefix_index):
        """This layer on U shared prefixes and the N rows that continue them, all tokens in one
        row x [1, U * Lp + N * Ls, H] (prefixes first; ``split`` = (U, Lp, N, Ls)) so the
        projections and the MLP are single matmuls. Row n continues prefix prefix_index[n]: its
        tokens attend to that prefix's keys (where prefix_valid) and causally to its own (where
        valid): the numbers of ``__call__`` on the concatenated sequences."""
        eps = self.cfg.rms_norm_eps
        u, lp, n, ls = split
        q, k, v = self.attn.project(rms_norm(x, self.attn_norm[...], eps), cos, sin)

        def parts(t):  # [1, T, ...] -> prefixes [U, Lp, ...], continuations [N, Ls, ...]
            return t[0, : u * lp].reshape((u, lp) + t.shape[2:]), t[0, u * lp :].reshape((n, ls) + t.shape[2:])

        (qp, qs), (kp, ks), (vp, vs) = parts(q), parts(k), parts(v)
        ap = causal_attention(qp, kp, vp, prefix_valid)
        # each row's keys: its prefix's (gathered: the gradient sums over the rows sharing it), then its own
        k_rows = jnp.concatenate([jnp.take(kp, prefix_index, axis=0), ks], axis=1)
        v_rows = jnp.concatenate([jnp.take(vp, prefix_index, axis=0), vs], axis=1)
        valid_rows = jnp.concatenate([jnp.take(prefix_valid, prefix_index, axis=0), valid], axis=1)
        a_s = causal_attention(qs, k_rows, v_rows, valid_rows)
        a = jnp.concatenate([ap.reshape((1, u * lp) + ap.shape[2:]), a_s.reshape((1, n * ls) + a_s.shape[2:])], axis=1)
        x = x + self.attn.out(a)
        return x + self.mlp(rms_norm(x, self.mlp_norm[...], eps))

    def decode(self, x, cos, sin, cache, layer, cache_index, visible):
        """This layer on S new tokens. cache {"k", "v"} holds every layer's keys/values stacked
        ([layers, B, KV, T, D] each); the new K/V go into slots cache_index.. of row ``layer`` (only
        those slots are written), then the tokens attend over that layer's row. Returns (x, cache)."""
        eps = self.cfg.rms_norm_eps
        q, k, v = self.attn.project(rms_norm(x, self.attn_norm[...], eps), cos, sin)
        zero = jnp.zeros((), jnp.int32)
        at = (jnp.asarray(layer, jnp.int32), zero, zero, jnp.asarray(cache_index, jnp.int32), zero)
        new = {}
        for name, val in (("k", k), ("v", v)):
            c = cache[name]
            new[name] = jax.lax.dynamic_update_slice(c, val.transpose(0, 2, 1, 3)[None].astype(c.dtype), at)
        kc, vc = (jax.lax.dynamic_index_in_dim(new[n], layer, 0, keepdims=False) for n in ("k", "v"))
        a = cached_attention(q, kc.astype(q.dtype), vc.astype(q.dtype), visible)
        x = x + self.attn.out(a)
        return x + self.mlp(rms_norm(x, self.mlp_norm[...], eps)), new


# --------------------------------------------------------------------------- rematerialisation
# The policies (``model.remat``) are named in models/config.py: REMAT_POLICIES.


def _rematerialised(fn, policy: str):
    names = REMAT_POLICIES[policy]
    if names is None:
        return fn
    saveable = (jax.checkpoint_policies.nothing_saveable if not names
                else jax.checkpoint_policies.save_only_these_names(*names))
    # prevent_cse=False: inside a scan the loop already keeps XLA from merging the recomputation.
    return jax.checkpoint(fn, policy=saveable, prevent_cse=False)


def default_position_ids(attention_mask: jax.Array) -> jax.Array:
    """cumsum(mask) - 1 clipped at 0: position 0 is the first real token (left padding works)."""
    return jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=-1) - 1, 0)


class Decoder(nnx.Module):
    """Decoder-only LM. ``model(ids, attention_mask=m)`` -> float32 logits [B, L, V]."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, param_dtype: Any = "float32",
                 compute_dtype: Any = None, remat: Any = "none", mesh: Any = None):
        self.cfg = cfg
        # With a mesh, activations are pinned batch-over-"data" (else FSDP-sharded weights could
        # drag activations onto their "embed" sharding); None = leave it to the compiler.
        self.mesh = mesh
        self.param_dtype = as_dtype(param_dtype).name
        self.compute_dtype = as_dtype(compute_dtype if compute_dtype is not None else param_dtype).name
        self.remat = remat_policy(remat)  # a REMAT_POLICIES name
        pdt = as_dtype(param_dtype)
        self.embed = _param(rngs, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), pdt)
        # Every layer's weights in one stacked Block ([num_hidden_layers, ...] each), scanned over.
        self.layers = Block(cfg, rngs=rngs, param_dtype=pdt, stack=cfg.num_hidden_layers)
        self.norm = _param(rngs, (cfg.hidden_size,), ("norm",), pdt, "ones")
        self.lm_head = (None if cfg.tie_word_embeddings else
                        _param(rngs, (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"), pdt))

    # ---------------------------------------------------------------- pieces
    def _constrain(self, x: jax.Array) -> jax.Array:
        if self.mesh is None:
            return x
        from aepo_jax.models.sharding import logical_to_spec

        spec = logical_to_spec(("batch", "length", "act_embed"), tuple(x.shape), self.mesh)
        return jax.lax.with_sharding_constraint(x, jax.sharding.NamedSharding(self.mesh, spec))

    def _scan_layers(self, step, carry, xs=None):
        """lax.scan of ``step(weights, carry, x) -> (carry, y)`` over the stacked layers:
        ``weights`` is one layer's slice of the layers' state (``self._layer(weights)`` makes it a
        Block) and x the matching slice of xs."""
        _, stacked = nnx.split(self.layers)
        return jax.lax.scan(lambda c, per_layer: step(per_layer[0], c, per_layer[1]), carry, (stacked, xs))

    def _layer(self, weights) -> Block:
        return nnx.merge(nnx.graphdef(self.layers), weights)

    def _embed(self, input_ids: jax.Array) -> jax.Array:
        return jnp.take(self.embed[...], input_ids, axis=0).astype(as_dtype(self.compute_dtype))

    def lm_head_kernel(self) -> jax.Array:
        """The LM-head matrix [H, V] in the parameter dtype (tied: the embedding transposed)."""
        return self.embed[...].T if self.lm_head is None else self.lm_head[...]

    def logits_from_hidden(self, hidden: jax.Array) -> jax.Array:
        """hidden [..., H] -> float32 logits [..., V]."""
        w = self.lm_head_kernel().astype(hidden.dtype)
        return jnp.dot(hidden, w, preferred_element_type=F32)

    # ---------------------------------------------------------------- whole sequences
    def hidden_states(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
                      position_ids: jax.Array | None = None) -> jax.Array:
        """[B, L] token ids -> hidden states [B, L, H] after the final norm (compute dtype)."""
        return _compiled_unless_tracing(self, "_hidden_states", input_ids, attention_mask, position_ids)

    def _hidden_states(self, input_ids, attention_mask, position_ids):
        input_ids = jnp.asarray(input_ids)
        if attention_mask is None:
            attention_mask = jnp.ones(input_ids.shape, jnp.bool_)
        attention_mask = jnp.asarray(attention_mask).astype(jnp.bool_)
        if position_ids is None:
            position_ids = default_position_ids(attention_mask)
        cos, sin = rope_cos_sin(jnp.asarray(position_ids), self.cfg.inv_freq())
        x = self._constrain(self._embed(input_ids))

        def layer_fn(weights, x):  # arrays in, arrays out: what jax.checkpoint needs
            return self._constrain(self._layer(weights)(x, cos, sin, attention_mask))

        layer_fn = _rematerialised(layer_fn, remat_policy(self.remat))
        x, _ = self._scan_layers(lambda weights, x, _: (layer_fn(weights, x), None), x)
        return rms_norm(x, self.norm[...], self.cfg.rms_norm_eps)

    def continuation_hidden_states(self, prefix_ids: jax.Array, prefix_mask: jax.Array, prefix_position_ids: jax.Array,
                                   input_ids: jax.Array, attention_mask: jax.Array, position_ids: jax.Array,
                                   prefix_index: jax.Array) -> jax.Array:
        """Hidden states after the final norm [N, Ls, H] of N rows that continue U shared prefixes.

        prefix_* [U, Lp]; input_ids, attention_mask, position_ids [N, Ls]; prefix_index [N] int:
        row n is the sequence ``prefix[prefix_index[n]] + input_ids[n]`` (position ids given for
        both parts). The result is ``hidden_states`` of those concatenated rows at their last Ls
        positions (up to float rounding), but every prefix goes through the layers once however
        many rows continue it: the G samples of a GRPO prompt share their prompt's forward and
        backward pass instead of repeating it G times.
        """
        return _compiled_unless_tracing(self, "_continuation_hidden_states", prefix_ids, prefix_mask,
                                        prefix_position_ids, input_ids, attention_mask, position_ids, prefix_index)

    def _continuation_hidden_states(self, prefix_ids, prefix_mask, prefix_position_ids, input_ids, attention_mask,
                                    position_ids, prefix_index):
        prefix_ids, input_ids = jnp.asarray(prefix_ids), jnp.asarray(input_ids)
        (u, lp), (n, ls) = prefix_ids.shape, input_ids.shape
        prefix_valid = jnp.asarray(prefix_mask).astype(jnp.bool_)
        valid = jnp.asarray(attention_mask).astype(jnp.bool_)
        prefix_index = jnp.asarray(prefix_index, jnp.int32)
        # One token row [1, U*Lp + N*Ls]: prefixes first, then the continuations.
        joined = lambda a, b: jnp.concatenate([jnp.reshape(a, (1, u * lp) + a.shape[2:]),  # noqa: E731
                                               jnp.reshape(b, (1, n * ls) + b.shape[2:])], axis=1)
        positions = joined(jnp.asarray(prefix_position_ids), jnp.asarray(position_ids))
        cos, sin = rope_cos_sin(positions, self.cfg.inv_freq())
        x = self._embed(joined(prefix_ids, input_ids))

        def layer_fn(weights, x):
            return self._layer(weights).continuation(x, cos, sin, (u, lp, n, ls), prefix_valid, valid, prefix_index)

        layer_fn = _rematerialised(layer_fn, remat_policy(self.remat))
        x, _ = self._scan_layers(lambda weights, x, _: (layer_fn(weights, x), None), x)
        x = x[0, u * lp :].reshape((n, ls) + x.shape[2:])
        return rms_norm(x, self.norm[...], self.cfg.rms_norm_eps)

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
                 position_ids: jax.Array | None = None) -> jax.Array:
        """[B, L] token ids -> float32 logits [B, L, V]."""
        return _compiled_unless_tracing(self, "_logits", input_ids, attention_mask, position_ids)

    def _logits(self, input_ids, attention_mask, position_ids):
        return self.logits_from_hidden(self._hidden_states(input_ids, attention_mask, position_ids))

    # ---------------------------------------------------------------- KV-cache decoding
    def init_cache(self, batch_size: int, max_len: int, dtype: Any = None) -> dict[str, jax.Array]:
        """Zeroed KV cache {"k", "v"}: [layers, B, KV heads, max_len, head_dim] each (compute dtype).

        Stacked like the weights, so decoding is one scan over layers; each step writes only the
        new tokens' slots. Treat it as an opaque pytree (pass it back to :meth:`decode`)."""
        cfg = self.cfg
        shape = (cfg.num_hidden_layers, batch_size, cfg.num_key_value_heads, max_len, cfg.head_dim)
        dt = as_dtype(dtype if dtype is not None else self.compute_dtype)
        return {"k": jnp.zeros(shape, dt), "v": jnp.zeros(shape, dt)}

    def decode(self, input_ids: jax.Array, position_ids: jax.Array, cache: dict[str, jax.Array],
               cache_index: Any, cache_mask: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Run S new tokens against the cache; returns (float32 logits [B, S, V], new cache).

        input_ids, position_ids [B, S]; their K/V go to slots cache_index .. cache_index+S-1
        (cache_index may be traced: all shapes are static, so this works under jit and in a
        lax.while_loop). cache_mask [B, T] bool marks the valid key slots, including the slots
        being written now (False for padding); new token s sees slot t iff cache_mask[b, t] and
        t <= cache_index + s. Under jit, logits nobody reads (a prefill's) are never computed.
        """
        return _compiled_unless_tracing(self, "_decode", input_ids, position_ids, cache, cache_index, cache_mask)

    def _decode(self, input_ids, position_ids, cache, cache_index, cache_mask):
        input_ids = jnp.asarray(input_ids)
        s = input_ids.shape[1]
        t = cache["k"].shape[3]
        cache_mask = jnp.asarray(cache_mask).astype(jnp.bool_)
        causal = jnp.arange(t)[None, :] <= (jnp.asarray(cache_index, jnp.int32) + jnp.arange(s))[:, None]
        visible = cache_mask[:, None, :] & causal[None]  # [B, S, T]
        cos, sin = rope_cos_sin(jnp.asarray(position_ids), self.cfg.inv_freq())
        x = self._constrain(self._embed(input_ids))

        def step(weights, carry, index):
            x, cache = self._layer(weights).decode(carry[0], cos, sin, carry[1], index, cache_index, visible)
            return (self._constrain(x), cache), None

        # The cache rides in the carry (updated in place, only the new slots written), not in xs/ys,
        # which would copy every layer's whole cache into a fresh output on every step.
        (x, cache), _ = self._scan_layers(step, (x, cache), jnp.arange(self.cfg.num_hidden_layers))
        h = rms_norm(x, self.norm[...], self.cfg.rms_norm_eps)
        return self.logits_from_hidden(h), cache


@functools.partial(jax.jit, static_argnames=("graphdef", "method"))
def _run_compiled(graphdef, state, method, args):
    return getattr(nnx.merge(graphdef, state), method)(*args)


def _compiled_unless_tracing(model: Decoder, method: str, *args):
    """Inside jit (traced weights or inputs) run the method as is; called eagerly, run it as one
    compiled program (cached per shape) instead of hundreds of op-by-op dispatches."""
    traced = isinstance(model.embed[...], jax.core.Tracer) or any(
        isinstance(a, jax.core.Tracer) for a in jax.tree.leaves(args))
    if traced:
        return getattr(model, method)(*args)
    graphdef, state = nnx.split(model)
    return _run_compiled(graphdef, state, method, args)


# --------------------------------------------------------------------------- construction
def resolve_mesh(mesh: Any):
    """None | jax Mesh | "DxT" -> None | Mesh."""
    if mesh is None:
        return None
    from aepo_jax.models.sharding import make_mesh

    return make_mesh(mesh)


def abstract_model(cfg: ModelConfig, dtype: Any = "float32", compute_dtype: Any = None,
                   remat: Any = "none", mesh: Any = None) -> Decoder:
    """A Decoder whose Params are ShapeDtypeStructs (no memory), for loading into.

    A fresh module every call (``materialize`` fills it in place), copied from one traced per
    configuration: tracing the constructor costs 40-80 ms, and a rollout server builds one on every
    weight load."""
    compute = None if compute_dtype is None else as_dtype(compute_dtype).name
    graphdef, state = _abstract_split(cfg, as_dtype(dtype).name, compute, remat_policy(remat), mesh)
    return nnx.merge(graphdef, state, copy=True)


@functools.lru_cache(maxsize=8)
def _abstract_split(cfg: ModelConfig, dtype: str, compute_dtype: str | None, remat: str, mesh: Any):
    return nnx.split(nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0), param_dtype=dtype,
                                                    compute_dtype=compute_dtype, remat=remat, mesh=mesh)))


def param_paths(model: Decoder) -> list[tuple[tuple, nnx.Param]]:
    """(attribute path, Param) for every parameter, in a fixed order."""
    return [(tuple(p), v) for p, v in nnx.iter_graph(model) if isinstance(v, nnx.Param)]


def stack_legacy_layers(flat: dict[tuple[str, ...], Any]) -> dict[tuple[str, ...], Any]:
    """Parameters saved before the layers became one stacked block are named per layer,
    ("layers", "<n>", *rest); stack them into ("layers", *rest) ([layers, ...] arrays), the
    layout of today's Decoder. Other keys pass through; a tree without such keys is returned as is."""
    out: dict[tuple[str, ...], Any] = {}
    per_layer: dict[tuple[str, ...], dict[int, Any]] = {}
    for key, x in flat.items():
        if len(key) > 2 and key[0] == "layers" and str(key[1]).isdigit():
            per_layer.setdefault(("layers", *key[2:]), {})[int(key[1])] = x
        else:
            out[key] = x
    for key, layers in per_layer.items():
        if sorted(layers) != list(range(len(layers))):
            raise ValueError(f"{'/'.join(key)}: layers {sorted(layers)} saved, not 0..{len(layers) - 1}")
        out[key] = np.stack([np.asarray(layers[n]) for n in range(len(layers))])
    return out


def materialize(model: Decoder, mesh: Any, read_block: Any) -> Decoder:
    """Fill an abstract model in place: each device shard of each Param comes from
    read_block(path, var, index) -> numpy block of the global array, so the host only ever holds
    one parameter (blocks asked for by several devices are read once)."""
    from aepo_jax.models.sharding import state_shardings

    single = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    shardings = None if mesh is None else state_shardings(nnx.state(model), mesh)
    for path, var in param_paths(model):
        value = var.get_value()
        shape, dtype = tuple(value.shape), value.dtype
        sharding = single
        if shardings is not None:
            sharding = functools.reduce(lambda o, k: o[k], path, shardings).get_value()
        memo: dict[tuple, np.ndarray] = {}

        def cb(index, path=path, var=var, shape=shape, dtype=dtype, memo=memo):
            idx = tuple(slice(*s.indices(n)[:2]) for s, n in zip(tuple(index) + (slice(None),) * len(shape), shape))
            key = tuple((s.start, s.stop) for s in idx)
            if key not in memo:
                memo[key] = np.ascontiguousarray(np.asarray(read_block(path, var, idx)).astype(dtype, copy=False))
            return memo[key]

        var.set_value(jax.make_array_from_callback(shape, sharding, cb))
    return model


def init_model(cfg: ModelConfig, seed: int = 0, dtype: Any = "float32", mesh: Any = None, *,
               compute_dtype: Any = None, remat: Any = "none") -> Decoder:
    """Random weights (normal(0.02), norms 1, biases 0), created directly in their sharding.

    dtype is the parameter dtype; compute_dtype defaults to it (e.g. dtype="float32",
    compute_dtype="bfloat16" for fp32 master weights with bf16 matmuls). The values depend only
    on (cfg, seed), never on the mesh. They are drawn on the host with numpy, one parameter at a
    time: XLA:CPU takes about a second to compile each threefry normal, numpy none.
    """
    mesh = resolve_mesh(mesh)
    model = abstract_model(cfg, dtype=dtype, compute_dtype=compute_dtype, remat=remat, mesh=mesh)
    stream = _init_streams(model)
    full: dict[tuple, np.ndarray] = {}

    def draw(path, layer, shape, init):
        if init != "normal":
            return (np.ones if init == "ones" else np.zeros)(shape, np.float32)
        rng = np.random.default_rng([seed, stream[path if layer is None else (path[0], layer, *path[1:])]])
        return 0.02 * rng.standard_normal(shape, dtype=np.float32)

    def read_block(path, var, index):
        if path not in full:
            full.clear()
            shape, init = tuple(var.get_value().shape), var.get_metadata().get("init", "normal")
            if path[0] == "layers":  # stacked: layer n drawn from its own stream, as when unstacked
                full[path] = np.stack([draw(path, n, shape[1:], init) for n in range(shape[0])])
            else:
                full[path] = draw(path, None, shape, init)
        return full[path][index]

    return materialize(model, mesh, read_block)


def _init_streams(model: Decoder) -> dict[tuple, int]:
    """Random stream of each parameter (and of each layer of a stacked one): its index in the order
    of per-layer paths ("layers", n, ...), so init_model's values did not change when the layers
    became one stacked block (the toy base model is built from them)."""
    paths: list[tuple] = []
    stacked = [p[1:] for p, _ in param_paths(model) if p[0] == "layers"]
    for p, _ in param_paths(model):
        if p[0] != "layers":
            paths.append(p)
        elif p[1:] == stacked[0]:
            paths += [("layers", n, *rest) for n in range(model.cfg.num_hidden_layers) for rest in stacked]
    return {p: j for j, p in enumerate(paths)}
