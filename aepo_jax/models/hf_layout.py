"""The one table between our parameters and Hugging Face tensors, and the layout change both ways.

:func:`tensor_map` names, for every parameter of a Decoder (for each layer of the stacked
``layers.*`` parameters), its HF tensors and the kind of layout change; :func:`read_param_block`
builds any block of a parameter from HF tensors (import, the weight sync's receiving side), and
:func:`hf_device_tensors` gives every HF tensor as a device array (export, both weight syncs).
Tests use the same table.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from aepo_jax.models.config import ModelConfig
from aepo_jax.models.decoder import Decoder, as_dtype


@dataclasses.dataclass(frozen=True)
class TensorMap:
    """One parameter of ours (or one layer of a stacked one) <-> one or more HF tensors.

    kind: "same" (identical layout), "t" (2-D transpose), "qkv", "qkv_bias", "o", "gate_up".
    """

    path: tuple  # attribute path in the Decoder, e.g. ("layers", "attn", "qkv")
    kind: str
    hf_names: tuple[str, ...]
    hf_shapes: tuple[tuple[int, ...], ...]
    layer: int | None = None  # the index into the leading [layers] dimension of a stacked parameter


def tensor_map(cfg: ModelConfig) -> list[TensorMap]:
    """Every parameter of a Decoder with this config, in HF state-dict order."""
    h, v, i = cfg.hidden_size, cfg.vocab_size, cfg.intermediate_size
    nq, kv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    out = [TensorMap(("embed",), "same", ("model.embed_tokens.weight",), ((v, h),))]
    for n in range(cfg.num_hidden_layers):
        p = f"model.layers.{n}."
        a = p + "self_attn."

        def layer(sub, kind, names, shapes, n=n):
            return TensorMap(("layers", *sub), kind, names, shapes, layer=n)

        out.append(layer(("attn_norm",), "same", (p + "input_layernorm.weight",), ((h,),)))
        out.append(layer(("attn", "qkv"), "qkv", (a + "q_proj.weight", a + "k_proj.weight", a + "v_proj.weight"),
                         ((nq * d, h), (kv * d, h), (kv * d, h))))
        if cfg.qkv_bias:
            out.append(layer(("attn", "qkv_bias"), "qkv_bias", (a + "q_proj.bias", a + "k_proj.bias", a + "v_proj.bias"),
                             ((nq * d,), (kv * d,), (kv * d,))))
        if cfg.qk_norm:
            out.append(layer(("attn", "q_norm"), "same", (a + "q_norm.weight",), ((d,),)))
            out.append(layer(("attn", "k_norm"), "same", (a + "k_norm.weight",), ((d,),)))
        out.append(layer(("attn", "o"), "o", (a + "o_proj.weight",), ((h, nq * d),)))
        if cfg.o_bias:
            out.append(layer(("attn", "o_bias"), "same", (a + "o_proj.bias",), ((h,),)))
        out.append(layer(("mlp_norm",), "same", (p + "post_attention_layernorm.weight",), ((h,),)))
        out.append(layer(("mlp", "gate_up"), "gate_up", (p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"),
                         ((i, h), (i, h))))
        out.append(layer(("mlp", "down"), "t", (p + "mlp.down_proj.weight",), ((h, i),)))
    out.append(TensorMap(("norm",), "same", ("model.norm.weight",), ((h,),)))
    if not cfg.tie_word_embeddings:
        out.append(TensorMap(("lm_head",), "t", ("lm_head.weight",), ((v, h),)))
    return out


def read_param_block(maps: list[TensorMap], cfg: ModelConfig, get: Callable[[str], Any],
                     index: tuple[slice, ...]) -> np.ndarray:
    """Block ``index`` of one parameter in our layout, read from HF tensors (``get(name)``: an array
    or a lazily read safetensors slice; only the rows needed). ``maps``: the parameter's entries
    of :func:`tensor_map` (one per layer, in order, for a stacked parameter)."""
    if maps[0].layer is None:
        return _read_block(maps[0], cfg, get, index)
    return np.stack([_read_block(maps[n], cfg, get, index[1:]) for n in range(index[0].start, index[0].stop)])


def _read_block(m: TensorMap, cfg: ModelConfig, get: Callable[[str], Any], index: tuple[slice, ...]) -> np.ndarray:
    """Our-layout block `index` of (one layer of) parameter m, read from HF tensors."""
    g, d = cfg.num_groups, cfg.head_dim
    if m.kind == "same":
        return get(m.hf_names[0])[index]
    if m.kind == "t":
        a, b = index
        return np.asarray(get(m.hf_names[0])[b, a]).T
    if m.kind == "qkv":  # ours [H, KV, G+2, D] <- q [KV*G*D, H], k/v [KV*D, H]
        sh, skv, sg, sd = index
        k0, k1 = skv.start, skv.stop
        nkv, nh = k1 - k0, sh.stop - sh.start
        q = np.asarray(get(m.hf_names[0])[k0 * g * d:k1 * g * d, sh]).T.reshape(nh, nkv, g, d)
        k = np.asarray(get(m.hf_names[1])[k0 * d:k1 * d, sh]).T.reshape(nh, nkv, 1, d)
        v = np.asarray(get(m.hf_names[2])[k0 * d:k1 * d, sh]).T.reshape(nh, nkv, 1, d)
        return np.concatenate([q, k, v], axis=2)[:, :, sg, sd]
    if m.kind == "qkv_bias":  # ours [KV, G+2, D]
        skv, sg, sd = index
        k0, k1 = skv.start, skv.stop
        q = np.asarray(get(m.hf_names[0])[k0 * g * d:k1 * g * d]).reshape(k1 - k0, g, d)
        k = np.asarray(get(m.hf_names[1])[k0 * d:k1 * d]).reshape(k1 - k0, 1, d)
        v = np.asarray(get(m.hf_names[2])[k0 * d:k1 * d]).reshape(k1 - k0, 1, d)
        return np.concatenate([q, k, v], axis=1)[:, sg, sd]
    if m.kind == "o":  # ours [KV, G, D, H] <- o_proj [H, KV*G*D]
        skv, sg, sd, sh = index
        k0, k1 = skv.start, skv.stop
        w = np.asarray(get(m.hf_names[0])[sh, k0 * g * d:k1 * g * d]).T
        return w.reshape(k1 - k0, g, d, sh.stop - sh.start)[:, sg, sd, :]
    if m.kind == "gate_up":  # ours [H, 2, I] <- gate/up [I, H]
        sh, s2, si = index
        parts = [np.asarray(get(m.hf_names[j])[si, sh]).T for j in range(2)[s2]]
        return np.stack(parts, axis=1)
    raise AssertionError(m.kind)


def _to_hf(kind: str, cfg: ModelConfig, dtype: jnp.dtype) -> Callable[[jax.Array], tuple[jax.Array, ...]]:
    """Jitted our-layout -> HF-layout transform (runs on the devices, before the host copy);
    ``f(w, n)`` transforms layer n of a stacked parameter (n traced: one program for all layers)."""
    g, d = cfg.num_groups, cfg.head_dim

    def f(w, *layer):
        w = (jax.lax.dynamic_index_in_dim(w, layer[0], 0, keepdims=False) if layer else w).astype(dtype)
        if kind == "same":
            return (w,)
        if kind == "t":
            return (w.T,)
        if kind == "qkv":
            h = w.shape[0]
            return (w[:, :, :g].reshape(h, -1).T, w[:, :, g].reshape(h, -1).T, w[:, :, g + 1].reshape(h, -1).T)
        if kind == "qkv_bias":
            return (w[:, :g].reshape(-1), w[:, g].reshape(-1), w[:, g + 1].reshape(-1))
        if kind == "o":
            return (w.reshape(-1, w.shape[-1]).T,)
        if kind == "gate_up":
            return (w[:, 0].T, w[:, 1].T)
        raise AssertionError(kind)

    return jax.jit(f)


_TO_HF_CACHE: dict[tuple, Callable] = {}


def _to_hf_cached(kind: str, cfg: ModelConfig, dtype: jnp.dtype) -> Callable:
    key = (kind, cfg.num_groups, cfg.head_dim, jnp.dtype(dtype).name)
    if key not in _TO_HF_CACHE:
        _TO_HF_CACHE[key] = _to_hf(kind, cfg, dtype)
    return _TO_HF_CACHE[key]


def _get_path(obj: Any, path: tuple) -> Any:
    for p in path:
        obj = obj[p] if isinstance(p, int) else getattr(obj, p)
    return obj


def hf_tensor_specs(cfg: ModelConfig) -> list[tuple[str, tuple[int, ...]]]:
    """(HF name, HF shape) of every tensor of a checkpoint of this config, in export order."""
    return [(n, s) for m in tensor_map(cfg) for n, s in zip(m.hf_names, m.hf_shapes)]


def hf_device_tensors(model: Decoder, dtype: Any) -> Iterator[tuple[str, jax.Array]]:
    """(HF name, device array in HF layout and ``dtype``) for every tensor, in
    :func:`hf_tensor_specs` order. The layout transforms run on the devices (each output keeps
    the sharding XLA gives it); nothing is copied to the host. Export and both weight syncs
    read the model through this."""
    dt = as_dtype(dtype)
    cfg = model.cfg
    for m in tensor_map(cfg):
        layer = () if m.layer is None else (np.int32(m.layer),)
        outs = _to_hf_cached(m.kind, cfg, dt)(_get_path(model, m.path)[...], *layer)
        yield from zip(m.hf_names, outs)
