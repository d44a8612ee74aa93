"""The one table between our parameters and Hugging Face tensors, and the layout change both ways.

:func:`tensor_map` names, for every parameter of a Decoder (for each layer of the stacked
``layers.*`` parameters), its HF tensors and the kind of layout change; :func:`read_param_block`
builds any block of a parameter from HF tensors (import, the weight sync's receiving side), and
:func:`hf_device_tensors` gives every HF tensor as a device array (export, both weight syncs).
Tests use the same table.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from aepo_jax.models.config import ModelConfig
from aepo_jax.models.decoder import Decoder, abstract_model, as_dtype, param_paths, resolve_mesh


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
        w = _get_path(model, m.path)[...]
        if m.kind == "same" and m.layer is None and w.dtype == dt:  # already HF's layout: no copy
            yield m.hf_names[0], w
            continue
        layer = () if m.layer is None else (np.int32(m.layer),)
        yield from zip(m.hf_names, _to_hf_cached(m.kind, cfg, dt)(w, *layer))


# --------------------------------------------------------------------------- HF -> ours, on the devices
def _from_hf(kind: str, cfg: ModelConfig, dtype: jnp.dtype) -> Callable[..., jax.Array]:
    """The inverse of :func:`_to_hf`: one layer's HF tensors -> our layout, cast to ``dtype``."""
    g, d = cfg.num_groups, cfg.head_dim

    def f(*hf):
        hf = [x.astype(dtype) for x in hf]
        if kind == "same":
            return hf[0]
        if kind == "t":
            return hf[0].T
        if kind == "qkv":  # q [KV*G*D, H], k/v [KV*D, H] -> [H, KV, G+2, D]
            h = hf[0].shape[1]
            q, k, v = (x.T.reshape(h, -1, n, d) for x, n in zip(hf, (g, 1, 1)))
            return jnp.concatenate([q, k, v], axis=2)
        if kind == "qkv_bias":  # [KV*G*D], [KV*D] x2 -> [KV, G+2, D]
            return jnp.concatenate([x.reshape(-1, n, d) for x, n in zip(hf, (g, 1, 1))], axis=1)
        if kind == "o":  # [H, KV*G*D] -> [KV, G, D, H]
            return hf[0].T.reshape(-1, g, d, hf[0].shape[0])
        if kind == "gate_up":  # gate/up [I, H] -> [H, 2, I]
            return jnp.stack([hf[0].T, hf[1].T], axis=1)
        raise AssertionError(kind)

    return f


_FROM_HF_CACHE: dict[tuple, Callable] = {}


def _from_hf_jit(kind: str, cfg: ModelConfig, dtype: jnp.dtype, sharding: Any, stacked: bool) -> Callable:
    """Jitted writer of one parameter (``f(*hf) -> array``) or of one layer of a stacked one
    (``f(target, n, *hf) -> target`` with layer ``n`` replaced; ``target`` is donated, so the
    stacked parameter is filled in place, never copied)."""
    key = (kind, cfg.num_groups, cfg.head_dim, jnp.dtype(dtype).name, sharding, stacked)
    if key not in _FROM_HF_CACHE:
        f = _from_hf(kind, cfg, dtype)
        if stacked:
            def put(target, n, *hf):
                return jax.lax.dynamic_update_index_in_dim(target, f(*hf), n, 0)

            _FROM_HF_CACHE[key] = jax.jit(put, donate_argnums=0, out_shardings=sharding)
        else:
            _FROM_HF_CACHE[key] = jax.jit(f, out_shardings=sharding)
    return _FROM_HF_CACHE[key]


def _zeros_jit(shape: tuple[int, ...], dtype: jnp.dtype, sharding: Any) -> jax.Array:
    key = ("zeros", shape, jnp.dtype(dtype).name, sharding)
    if key not in _FROM_HF_CACHE:
        _FROM_HF_CACHE[key] = jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sharding)
    return _FROM_HF_CACHE[key]()


# --------------------------------------------------------------------------- on the host (XLA:CPU)
# On a CPU "device" the parameters are host memory (np.asarray views them, an aligned numpy array is
# used in place by jit). The layout changes are transposes, and XLA:CPU's transposes and
# concatenations of bf16 run at a fraction of memory bandwidth, so on CPU both directions do them
# here, straight from the source into the destination (torch's blocked transpose when torch is
# installed, else numpy in row blocks): one pass over the bytes, no intermediate copies.

def on_cpu() -> bool:
    """True when the JAX devices are CPUs (the host conversions apply)."""
    return jax.devices()[0].platform == "cpu"


_INT_OF = {1: np.int8, 2: np.int16, 4: np.int32, 8: np.int64}


def _t_into(dst: np.ndarray, src: np.ndarray) -> None:
    """``dst[...] = src.T`` for 2-D views of one dtype (``dst`` may be strided, e.g. a column of
    [H, 2, I]); casts first when the dtypes differ."""
    if src.dtype != dst.dtype:
        src = src.astype(dst.dtype)
    try:
        import torch
    except ImportError:
        torch = None
    if torch is not None:
        it = _INT_OF[dst.dtype.itemsize]  # torch has no ml_dtypes bf16: move the bits as integers
        with warnings.catch_warnings():  # a read-only source (a memory-mapped file) is only read
            warnings.simplefilter("ignore", UserWarning)
            torch.from_numpy(dst.view(it)).copy_(torch.from_numpy(np.ascontiguousarray(src).view(it)).t())
        return
    step = max(1, (1 << 16) // max(1, src.shape[1]))  # row blocks: the source block stays in cache
    for i in range(0, src.shape[0], step):
        dst[:, i:i + step] = src[i:i + step].T


def host_from_hf(kind: str, cfg: ModelConfig, hf: list[np.ndarray], out: np.ndarray) -> None:
    """The inverse of :func:`_to_hf` on the host: one layer's HF tensors written into ``out`` (our
    layout, C-contiguous, its dtype; a cast happens on the way when the tensors' dtype differs)."""
    g, d = cfg.num_groups, cfg.head_dim
    if kind == "same":
        np.copyto(out, hf[0], casting="unsafe")
    elif kind == "t":
        _t_into(out, hf[0])
    elif kind == "o":  # [H, KV*G*D] -> [KV, G, D, H]
        _t_into(out.reshape(-1, out.shape[-1]), hf[0])
    elif kind == "gate_up":  # gate/up [I, H] -> [H, 2, I]
        _t_into(out[:, 0], hf[0])
        _t_into(out[:, 1], hf[1])
    elif kind == "qkv":  # q [KV*G*D, H], k/v [KV*D, H] -> [H, KV, G+2, D] (small: through a temporary)
        h, kv = out.shape[0], out.shape[1]
        for x, sl in zip(hf, (slice(0, g), slice(g, g + 1), slice(g + 1, g + 2))):
            tmp = np.empty((h, x.shape[0]), out.dtype)
            _t_into(tmp, x)
            out[:, :, sl] = tmp.reshape(h, kv, -1, d)
    elif kind == "qkv_bias":  # [KV*G*D], [KV*D] x2 -> [KV, G+2, D]
        kv = out.shape[0]
        for x, sl in zip(hf, (slice(0, g), slice(g, g + 1), slice(g + 1, g + 2))):
            np.copyto(out[:, sl], x.reshape(kv, -1, d), casting="unsafe")
    else:
        raise AssertionError(kind)


def host_to_hf(kind: str, cfg: ModelConfig, w: np.ndarray, outs: list[np.ndarray]) -> None:
    """:func:`_to_hf` on the host: one layer ``w`` (our layout) written into its HF tensors ``outs``
    (C-contiguous, their dtype)."""
    g = cfg.num_groups
    if kind == "same":
        np.copyto(outs[0], w, casting="unsafe")
    elif kind == "t":
        _t_into(outs[0], w)
    elif kind == "o":  # [KV, G, D, H] -> [H, KV*G*D]
        _t_into(outs[0], w.reshape(-1, w.shape[-1]))
    elif kind == "gate_up":  # [H, 2, I] -> gate/up [I, H]
        _t_into(outs[0], w[:, 0])
        _t_into(outs[1], w[:, 1])
    elif kind == "qkv":  # [H, KV, G+2, D] -> q [KV*G*D, H], k/v [KV*D, H] (small: through a temporary)
        h = w.shape[0]
        for o, sl in zip(outs, (slice(0, g), slice(g, g + 1), slice(g + 1, g + 2))):
            _t_into(o, np.ascontiguousarray(w[:, :, sl]).reshape(h, -1))
    elif kind == "qkv_bias":  # [KV, G+2, D] -> [KV*G*D], [KV*D] x2
        for o, sl in zip(outs, (slice(0, g), slice(g, g + 1), slice(g + 1, g + 2))):
            np.copyto(o, w[:, sl].reshape(-1), casting="unsafe")
    else:
        raise AssertionError(kind)


def host_path(model: Decoder) -> bool:
    """True when :func:`hf_host_tensors` applies: the devices are CPUs and every parameter is on one
    device (np.asarray then views it in place; a sharded one would be gathered first)."""
    def on_one_device(x) -> bool:  # a host numpy array (a checkpoint restored for export) counts as one
        sharding = getattr(x, "sharding", None)
        return sharding is None or len(sharding.device_set) == 1

    return on_cpu() and all(on_one_device(v.get_value()) for _, v in param_paths(model))


def hf_host_tensors(model: Decoder, dtype: Any,
                    dest: Callable[[str], np.ndarray | None] | None = None) -> Iterator[tuple[str, np.ndarray]]:
    """(HF name, host array in HF layout and ``dtype``) for every tensor, in :func:`hf_tensor_specs`
    order: :func:`hf_device_tensors` for a model on one CPU device (:func:`host_path`), the
    parameters read in place and each tensor written once. ``dest(name)``, when given, returns the
    C-contiguous array to write that tensor into (e.g. its place in a weight-sync bucket) or None
    for a new one; a tensor already in HF layout and ``dtype`` is then yielded as a view of the
    parameter itself (read-only: no copy)."""
    dt = as_dtype(dtype)
    cfg = model.cfg
    host: dict[tuple, np.ndarray] = {}
    for m in tensor_map(cfg):
        if m.path not in host:
            host[m.path] = np.asarray(_get_path(model, m.path)[...])
        w = host[m.path] if m.layer is None else host[m.path][m.layer]
        outs = [dest(n) if dest is not None else None for n in m.hf_names]
        if m.kind == "same" and outs[0] is None and w.dtype == dt:
            yield m.hf_names[0], w
            continue
        outs = [o if o is not None else np.empty(s, dt) for o, s in zip(outs, m.hf_shapes)]
        host_to_hf(m.kind, cfg, w, outs)
        yield from zip(m.hf_names, outs)


_EXPONENT = {np.dtype(jnp.bfloat16): (np.uint16, 0x7F80), np.dtype(np.float16): (np.uint16, 0x7C00),
             np.dtype(np.float32): (np.uint32, 0x7F800000), np.dtype(np.float64): (np.uint64, 0x7FF0000000000000)}


def host_all_finite(a: np.ndarray, chunk: int = 1 << 20) -> bool:
    """No NaN or infinity in host array ``a`` (a float of a known width; anything else is True):
    a value is finite unless its exponent bits are all ones. Checked on the bits in cache-sized
    chunks, which reads at memory bandwidth (XLA:CPU's isfinite on bf16 runs ~10x slower)."""
    if a.dtype not in _EXPONENT:
        return True
    ui, mask = _EXPONENT[a.dtype]
    bits = np.ascontiguousarray(a).reshape(-1).view(ui)
    m = ui(mask)
    return all(int((bits[i:i + chunk] & m).max(initial=0)) != mask for i in range(0, bits.size, chunk))


HOST_ALIGN = 64  # XLA:CPU uses a host array in place (no copy) when its data is this aligned


def host_aligned(a: np.ndarray) -> np.ndarray:
    """``a`` itself when C-contiguous and 64-byte aligned, else an aligned copy. An aligned numpy
    array passed to a jitted function on CPU is used in place; an unaligned one is copied by XLA
    element by element, several times slower than this numpy copy."""
    if a.flags.c_contiguous and a.ctypes.data % HOST_ALIGN == 0:
        return a
    out = aligned_empty(a.shape, a.dtype)
    np.copyto(out, a)
    return out


def aligned_empty(shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    """An uninitialised C-contiguous host array whose data is 64-byte aligned."""
    dtype = np.dtype(dtype)
    n = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = np.empty(n + HOST_ALIGN, np.uint8)
    off = -raw.ctypes.data % HOST_ALIGN
    return raw[off:off + n].view(dtype).reshape(shape)


class HFAssembler:
    """Our parameters built on the devices from HF tensors that arrive in any order and grouping
    (the buckets of a distributed weight sync, the files of a checkpoint).

    ``add(name, array)`` takes one HF tensor (host numpy, e.g. a view into a received bucket or a
    memory-mapped file; or a device array). Once every HF tensor of one parameter (of one layer,
    for a stacked parameter) is in, they are converted to our layout and written into the
    parameter, a stacked ``[layers, ...]`` one allocated once and filled layer by layer in place,
    so nothing is stacked or copied twice and no more than the arrays given is held (until their
    layer is written). On accelerators one jitted function per parameter kind does it on the
    devices (the target donated, each parameter in its sharding; dispatch is asynchronous); on
    CPU :func:`host_from_hf` writes straight into an aligned host buffer that becomes the
    parameter without a copy. ``missing()`` names what has not arrived; ``finish()``
    returns the Decoder once complete. Tensors sent again overwrite the earlier ones."""

    def __init__(self, cfg: ModelConfig, dtype: Any = "float32", mesh: Any = None, *, compute_dtype: Any = None,
                 remat: Any = False):
        from aepo_jax.models.sharding import state_shardings

        mesh = resolve_mesh(mesh)
        self.cfg = cfg
        self.dtype = as_dtype(dtype)
        self.model = abstract_model(cfg, dtype=self.dtype, compute_dtype=compute_dtype, remat=remat, mesh=mesh)
        single = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        tree = None if mesh is None else state_shardings(nnx.state(self.model), mesh)
        self.vars = dict(param_paths(self.model))
        self.shapes = {p: tuple(v.get_value().shape) for p, v in self.vars.items()}
        self.shardings = {p: single if tree is None else functools.reduce(lambda o, k: o[k], p, tree).get_value()
                          for p in self.vars}
        self.host = on_cpu()
        self.entry_of: dict[str, TensorMap] = {}
        self.shape_of: dict[str, tuple[int, ...]] = {}
        for m in tensor_map(cfg):
            for n, s in zip(m.hf_names, m.hf_shapes):
                self.entry_of[n], self.shape_of[n] = m, s
        self.waiting: dict[int, dict[str, Any]] = {}  # id(entry) -> its HF tensors received so far
        self.values: dict[tuple, jax.Array] = {}
        self.done: set[str] = set()  # HF names written into the parameters

    def add(self, name: str, array: Any) -> None:
        m = self.entry_of.get(name)
        if m is None:
            raise KeyError(f"{name}: not a tensor of this model")
        if tuple(np.shape(array)) != self.shape_of[name]:
            raise ValueError(f"{name}: shape {list(np.shape(array))}, the model has {list(self.shape_of[name])}")
        got = self.waiting.setdefault(id(m), {})
        got[name] = array
        if len(got) < len(m.hf_names):
            return
        del self.waiting[id(m)]
        hf = [got[n] for n in m.hf_names]
        sharding = self.shardings[m.path]
        if self.host:  # written on the host into an aligned buffer that becomes the parameter (finish)
            if m.path not in self.values:
                self.values[m.path] = aligned_empty(self.shapes[m.path], self.dtype)
            buf = self.values[m.path]
            host_from_hf(m.kind, self.cfg, [np.asarray(x) for x in hf], buf if m.layer is None else buf[m.layer])
        elif m.layer is None:
            hf = [host_aligned(x) if isinstance(x, np.ndarray) else x for x in hf]  # used in place by XLA:CPU
            self.values[m.path] = _from_hf_jit(m.kind, self.cfg, self.dtype, sharding, False)(*hf)
        else:
            if m.path not in self.values:
                self.values[m.path] = _zeros_jit(self.shapes[m.path], self.dtype, sharding)
            put = _from_hf_jit(m.kind, self.cfg, self.dtype, sharding, True)
            hf = [host_aligned(x) if isinstance(x, np.ndarray) else x for x in hf]
            self.values[m.path] = put(self.values[m.path], np.int32(m.layer), *hf)
        self.done.update(m.hf_names)

    def detach(self) -> None:
        """Copy the tensors still waiting for the rest of their parameter (host ones only), so the
        caller may reuse the buffers they were views of."""
        for got in self.waiting.values():
            for n, a in got.items():
                if isinstance(a, np.ndarray):
                    got[n] = np.array(a)

    def missing(self) -> list[str]:
        """HF names not yet written, in export order."""
        return [n for n in self.shape_of if n not in self.done]

    def finish(self) -> Decoder:
        """The Decoder holding the assembled parameters (KeyError naming the first HF tensor that
        never arrived)."""
        if self.missing():
            raise KeyError(f"{self.missing()[0]}: not received")
        assert set(self.values) == set(self.vars), "the table covers every Param"
        for p, var in self.vars.items():
            v = self.values[p]
            # host buffers: on one CPU device jax uses the aligned buffer itself (no copy)
            var.set_value(jax.device_put(v, self.shardings[p]) if isinstance(v, np.ndarray) else v)
        return self.model
