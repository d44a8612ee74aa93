"""The decoder: one Flax NNX model for the Qwen2 / Qwen2.5 / Qwen3 / Llama families.

Read top to bottom: dtypes and a linear layer with a hand-written backward, RMSNorm, RoPE,
attention (a block-causal kernel for whole sequences and a KV-cache kernel for decoding),
the SwiGLU MLP, a transformer block, the decoder, and init_model.

Family differences are config flags: ``qkv_bias`` (Qwen2, or Llama/Qwen3 ``attention_bias``),
``o_bias``, ``qk_norm`` (Qwen3: RMSNorm over head_dim on q and k before RoPE), ``head_dim``,
``rope_scaling`` (llama3 / linear) and ``tie_word_embeddings``.

Weight layouts (input dimension first; every Param carries ``logical_axes`` for sharding):
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

from aepo_jax.models.config import ModelConfig

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

    q [B, L, KV, G, D] (already scaled), k/v [B, L, KV, D], key_valid [B, L] bool -> [B, L, KV, G, D].
    Query block i only meets key blocks 0..i (the blocks above the diagonal are skipped, not
    masked), and the G query heads that share a KV head are folded into the rows of one matmul,
    so there is no repeat_kv copy. Softmax in float32.
    """
    b, length, kvh, g, d = q.shape
    qt = q.transpose(0, 2, 1, 3, 4)  # [B, KV, L, G, D]
    kt = k.transpose(0, 2, 1, 3)  # [B, KV, L, D]
    vt = v.transpose(0, 2, 1, 3)
    outs = []
    for start in range(0, length, block):
        stop = min(start + block, length)
        n = stop - start
        qi = qt[:, :, start:stop].reshape(b, kvh, n * g, d)
        s = jnp.einsum("bhqd,bhkd->bhqk", qi, kt[:, :, :stop], preferred_element_type=F32)
        q_pos = start + jnp.arange(n * g) // g
        ok = (q_pos[:, None] >= jnp.arange(stop)[None, :])[None, None] & key_valid[:, None, None, :stop]
        p = jax.nn.softmax(jnp.where(ok, s, _NEG), axis=-1)
        o = jnp.einsum("bhqk,bhkd->bhqd", p.astype(v.dtype), vt[:, :, :stop])
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
def _param(rngs: nnx.Rngs, shape, axes, dtype, init: str = "normal", std: float = 0.02) -> nnx.Param:
    if init == "normal":
        value = (std * jax.random.normal(rngs.params(), shape, F32)).astype(dtype)
    elif init == "ones":
        value = jnp.ones(shape, dtype)
    else:
        value = jnp.zeros(shape, dtype)
    return nnx.Param(value, logical_axes=tuple(axes), init=init)


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, param_dtype):
        h, kv, g, d = cfg.hidden_size, cfg.num_key_value_heads, cfg.num_groups, cfg.head_dim
        self.cfg = cfg
        self.qkv = _param(rngs, (h, kv, g + 2, d), ("embed", "kv_heads", "qkv", "head_dim"), param_dtype)
        self.qkv_bias = (_param(rngs, (kv, g + 2, d), ("kv_heads", "qkv", "head_dim"), param_dtype, "zeros")
                         if cfg.qkv_bias else None)
        self.q_norm = _param(rngs, (d,), ("norm",), param_dtype, "ones") if cfg.qk_norm else None
        self.k_norm = _param(rngs, (d,), ("norm",), param_dtype, "ones") if cfg.qk_norm else None
        self.o = _param(rngs, (kv, g, d, h), ("kv_heads", "q_group", "head_dim", "embed"), param_dtype)
        self.o_bias = _param(rngs, (h,), ("norm",), param_dtype, "zeros") if cfg.o_bias else None

    def project(self, x: jax.Array, cos: jax.Array, sin: jax.Array):
        """x [B, L, H] -> q [B, L, KV, G, D] (RoPE'd, scaled by 1/sqrt(D)), k [B, L, KV, D] (RoPE'd), v."""
        cfg = self.cfg
        kv, g, d = cfg.num_key_value_heads, cfg.num_groups, cfg.head_dim
        w = self.qkv[...].astype(x.dtype)
        y = linear(x, w.reshape(w.shape[0], -1)).reshape(x.shape[:2] + (kv, g + 2, d))
        if self.qkv_bias is not None:
            y = y + self.qkv_bias[...].astype(x.dtype)
        q, k, v = y[..., :g, :], y[..., g, :], y[..., g + 1, :]
        if self.q_norm is not None:
            q = rms_norm(q, self.q_norm[...], cfg.rms_norm_eps)
            k = rms_norm(k, self.k_norm[...], cfg.rms_norm_eps)
        q = apply_rope(q, cos, sin) * jnp.asarray(d ** -0.5, x.dtype)
        k = apply_rope(k, cos, sin)
        return q, k, v

    def out(self, a: jax.Array) -> jax.Array:
        """a [B, L, KV, G, D] -> [B, L, H]."""
        w = self.o[...].astype(a.dtype)
        y = linear(a.reshape(a.shape[:2] + (-1,)), w.reshape(-1, w.shape[-1]))
        if self.o_bias is not None:
            y = y + self.o_bias[...].astype(a.dtype)
        return y

    def __call__(self, x, cos, sin, key_valid):
        q, k, v = self.project(x, cos, sin)
        return self.out(causal_attention(q, k, v, key_valid))


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, param_dtype):
        h, i = cfg.hidden_size, cfg.intermediate_size
        self.gate_up = _param(rngs, (h, 2, i), ("embed", "gate_up", "mlp"), param_dtype)
        self.down = _param(rngs, (i, h), ("mlp", "embed"), param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        w = self.gate_up[...].astype(x.dtype)
        gu = linear(x, w.reshape(w.shape[0], -1)).reshape(x.shape[:-1] + (2, w.shape[-1]))
        return linear(jax.nn.silu(gu[..., 0, :]) * gu[..., 1, :], self.down[...].astype(x.dtype))


class Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, param_dtype):
        self.cfg = cfg
        self.attn_norm = _param(rngs, (cfg.hidden_size,), ("norm",), param_dtype, "ones")
        self.attn = Attention(cfg, rngs=rngs, param_dtype=param_dtype)
        self.mlp_norm = _param(rngs, (cfg.hidden_size,), ("norm",), param_dtype, "ones")
        self.mlp = MLP(cfg, rngs=rngs, param_dtype=param_dtype)

    def __call__(self, x, cos, sin, key_valid):
        eps = self.cfg.rms_norm_eps
        x = x + self.attn(rms_norm(x, self.attn_norm[...], eps), cos, sin, key_valid)
        return x + self.mlp(rms_norm(x, self.mlp_norm[...], eps))

    def decode(self, x, cos, sin, cache, cache_index, visible):
        """One layer on S new tokens: their K/V go into slots cache_index.. of this layer's cache
        {"k", "v"} ([B, KV, T, D] each), then attention over the cache. Returns (x, new cache)."""
        eps = self.cfg.rms_norm_eps
        q, k, v = self.attn.project(rms_norm(x, self.attn_norm[...], eps), cos, sin)
        zero = jnp.zeros((), jnp.int32)
        at = (zero, zero, jnp.asarray(cache_index, jnp.int32), zero)
        kc = jax.lax.dynamic_update_slice(cache["k"], k.transpose(0, 2, 1, 3).astype(cache["k"].dtype), at)
        vc = jax.lax.dynamic_update_slice(cache["v"], v.transpose(0, 2, 1, 3).astype(cache["v"].dtype), at)
        a = cached_attention(q, kc.astype(q.dtype), vc.astype(q.dtype), visible)
        x = x + self.attn.out(a)
        return x + self.mlp(rms_norm(x, self.mlp_norm[...], eps)), {"k": kc, "v": vc}


def default_position_ids(attention_mask: jax.Array) -> jax.Array:
    """cumsum(mask) - 1 clipped at 0: position 0 is the first real token (left padding works)."""
    return jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=-1) - 1, 0)


class Decoder(nnx.Module):
    """Decoder-only LM. ``model(ids, attention_mask=m)`` -> float32 logits [B, L, V]."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, param_dtype: Any = "float32",
                 compute_dtype: Any = None, remat: bool = False, mesh: Any = None):
        self.cfg = cfg
        # With a mesh, activations are pinned batch-over-"data" (else FSDP-sharded weights could
        # drag activations onto their "embed" sharding); None = leave it to the compiler.
        self.mesh = mesh
        self.param_dtype = as_dtype(param_dtype).name
        self.compute_dtype = as_dtype(compute_dtype if compute_dtype is not None else param_dtype).name
        self.remat = bool(remat)
        pdt = as_dtype(param_dtype)
        self.embed = _param(rngs, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), pdt)
        self.layers = nnx.List([Block(cfg, rngs=rngs, param_dtype=pdt) for _ in range(cfg.num_hidden_layers)])
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
        for layer in self.layers:
            if self.remat:
                x = nnx.remat(lambda blk, *a: blk(*a))(layer, x, cos, sin, attention_mask)
            else:
                x = layer(x, cos, sin, attention_mask)
            x = self._constrain(x)
        return rms_norm(x, self.norm[...], self.cfg.rms_norm_eps)

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
                 position_ids: jax.Array | None = None) -> jax.Array:
        """[B, L] token ids -> float32 logits [B, L, V]."""
        return _compiled_unless_tracing(self, "_logits", input_ids, attention_mask, position_ids)

    def _logits(self, input_ids, attention_mask, position_ids):
        return self.logits_from_hidden(self._hidden_states(input_ids, attention_mask, position_ids))

    # ---------------------------------------------------------------- KV-cache decoding
    def init_cache(self, batch_size: int, max_len: int, dtype: Any = None) -> list[dict[str, jax.Array]]:
        """Zeroed KV cache: one {"k", "v"} per layer, [B, KV heads, max_len, head_dim] each
        (compute dtype).

        One array per layer, not one [layers, ...] array: under jit the attention then reads each
        layer's cache in place, where slicing a layer out of an updated stacked array makes XLA
        copy it every decode step (docs/models.md). Treat the cache as an opaque pytree."""
        cfg = self.cfg
        shape = (batch_size, cfg.num_key_value_heads, max_len, cfg.head_dim)
        dt = as_dtype(dtype if dtype is not None else self.compute_dtype)
        return [{"k": jnp.zeros(shape, dt), "v": jnp.zeros(shape, dt)} for _ in range(cfg.num_hidden_layers)]

    def decode(self, input_ids: jax.Array, position_ids: jax.Array, cache: list[dict[str, jax.Array]],
               cache_index: Any, cache_mask: jax.Array) -> tuple[jax.Array, list[dict[str, jax.Array]]]:
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
        t = cache[0]["k"].shape[2]
        cache_mask = jnp.asarray(cache_mask).astype(jnp.bool_)
        causal = jnp.arange(t)[None, :] <= (jnp.asarray(cache_index, jnp.int32) + jnp.arange(s))[:, None]
        visible = cache_mask[:, None, :] & causal[None]  # [B, S, T]
        cos, sin = rope_cos_sin(jnp.asarray(position_ids), self.cfg.inv_freq())
        x = self._constrain(self._embed(input_ids))
        new_cache = []
        for layer, layer_cache in zip(self.layers, cache):
            x, layer_cache = layer.decode(x, cos, sin, layer_cache, cache_index, visible)
            new_cache.append(layer_cache)
            x = self._constrain(x)
        h = rms_norm(x, self.norm[...], self.cfg.rms_norm_eps)
        return self.logits_from_hidden(h), new_cache


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
                   remat: bool = False, mesh: Any = None) -> Decoder:
    """A Decoder whose Params are ShapeDtypeStructs (no memory), for loading into."""
    return nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0), param_dtype=dtype,
                                          compute_dtype=compute_dtype, remat=remat, mesh=mesh))


def param_paths(model: Decoder) -> list[tuple[tuple, nnx.Param]]:
    """(attribute path, Param) for every parameter, in a fixed order."""
    return [(tuple(p), v) for p, v in nnx.iter_graph(model) if isinstance(v, nnx.Param)]


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
               compute_dtype: Any = None, remat: bool = False) -> Decoder:
    """Random weights (normal(0.02), norms 1, biases 0), created directly in their sharding.

    dtype is the parameter dtype; compute_dtype defaults to it (e.g. dtype="float32",
    compute_dtype="bfloat16" for fp32 master weights with bf16 matmuls). The values depend only
    on (cfg, seed), never on the mesh. They are drawn on the host with numpy, one parameter at a
    time: XLA:CPU takes about a second to compile each threefry normal, numpy none.
    """
    mesh = resolve_mesh(mesh)
    model = abstract_model(cfg, dtype=dtype, compute_dtype=compute_dtype, remat=remat, mesh=mesh)
    order = {path: j for j, (path, _) in enumerate(param_paths(model))}
    full: dict[tuple, np.ndarray] = {}

    def read_block(path, var, index):
        if path not in full:
            full.clear()
            shape, init = tuple(var.get_value().shape), var.get_metadata().get("init", "normal")
            if init == "normal":
                rng = np.random.default_rng([seed, order[path]])
                full[path] = (0.02 * rng.standard_normal(shape, dtype=np.float32))
            else:
                full[path] = (np.ones if init == "ones" else np.zeros)(shape, np.float32)
        return full[path][index]

    return materialize(model, mesh, read_block)
