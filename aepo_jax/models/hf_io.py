"""Hugging Face checkpoints in and out: ``load_pretrained`` and ``save_pretrained``.

Import reads a local directory (config.json, model.safetensors or shards listed in
model.safetensors.index.json) tensor by tensor, and each device shard of each parameter is read
straight from the memory-mapped file into its place (``jax.make_array_from_callback``): the
host never holds more than one tensor, so a 7B model never needs two copies in host memory.

Export streams the other way: one jitted layout transform per parameter on the devices, an
asynchronous device->host copy of the next tensor while the current one is written, and
safetensors files whose headers are planned from shapes up front so that each tensor is written
the moment it arrives. The same function is the per-step weight sync to SGLang.

One table (``hf_layout.tensor_map``) names every parameter's HF tensors and the layout change
both ways; import, export, the weight syncs and the tests all use it.
"""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import shutil
import struct
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from aepo_jax.models.config import ModelConfig
from aepo_jax.models.decoder import Decoder, abstract_model, as_dtype, materialize, param_paths, resolve_mesh
from aepo_jax.models.hf_layout import (HFAssembler, TensorMap, hf_device_tensors, hf_host_tensors, hf_tensor_specs,
                                       host_path, read_param_block, tensor_map)

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
    "tokenizer.model", "added_tokens.json", "chat_template.jinja", "chat_template.json",
)
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9  # "5GB", as transformers writes
_ST_DTYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}


class CheckpointError(ValueError):
    """A checkpoint that does not fit the config: a missing tensor or a shape mismatch."""


# --------------------------------------------------------------------------- import
def read_config(path: str | os.PathLike) -> ModelConfig:
    """ModelConfig from <path>/config.json (FileNotFoundError / ConfigError naming the file)."""
    path = os.fspath(path)
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{cfg_path}: no config.json in the checkpoint directory {path!r}")
    with open(cfg_path) as f:
        try:
            d = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{cfg_path}: not valid JSON ({e})") from None
    try:
        return ModelConfig.from_hf_dict(d, source_dir=os.path.abspath(path))
    except ValueError as e:
        raise type(e)(f"{cfg_path}: {e}") from None


def checkpoint_files(path: str | os.PathLike) -> dict[str, str]:
    """Tensor name -> safetensors file, for a single file or an index of shards."""
    path = os.fspath(path)
    index = os.path.join(path, "model.safetensors.index.json")
    single = os.path.join(path, "model.safetensors")
    if os.path.isfile(index):
        with open(index) as f:
            weight_map = json.load(f).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index}: no 'weight_map' object")
        out = {}
        for name, fn in weight_map.items():
            full = os.path.join(path, fn)
            if not os.path.isfile(full):
                raise FileNotFoundError(f"{full}: shard named for {name!r} in {index} does not exist")
            out[name] = full
        return out
    if os.path.isfile(single):
        with _safe_open(single) as f:
            return {k: single for k in f.keys()}
    raise FileNotFoundError(f"{path}: neither model.safetensors nor model.safetensors.index.json found")


@contextlib.contextmanager
def _safe_open(fn: str) -> Iterator[Any]:
    """``safe_open`` whose failure (a truncated or damaged file) is a CheckpointError naming the file."""
    from safetensors import SafetensorError, safe_open

    try:
        handle = safe_open(fn, framework="numpy")
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{fn}: not a readable safetensors file (truncated or damaged?): {e}") from None
    with handle as f:
        yield f


def _slice_reader(files: dict[str, str], stack: contextlib.ExitStack) -> Any:
    """``get(name)``: the tensor's safetensors slice (header only until read), each file opened once."""
    handles: dict[str, Any] = {}

    def get(name: str) -> Any:
        fn = files[name]
        if fn not in handles:
            handles[fn] = stack.enter_context(_safe_open(fn))
        return handles[fn].get_slice(name)

    return get


def _check_tensors(path: str | os.PathLike, maps: Iterable[TensorMap], files: dict[str, str], get: Any) -> None:
    """Every tensor the config implies is in the checkpoint with that shape (headers only)."""
    for m in maps:
        for name, want in zip(m.hf_names, m.hf_shapes):
            if name not in files:
                raise CheckpointError(f"{name}: tensor missing from the checkpoint in {os.fspath(path)!r}")
            got = tuple(get(name).get_shape())
            if got != want:
                raise CheckpointError(
                    f"{name}: shape mismatch: checkpoint {files[name]} has {list(got)}, "
                    f"config.json implies {list(want)}"
                )


def check_checkpoint(path: str | os.PathLike) -> ModelConfig:
    """Everything about an HF directory that can be checked without loading it: config.json, the
    shard index, every safetensors file's header against its size, and every tensor the config
    implies present with its shape. Returns the config."""
    cfg = read_config(path)
    files = checkpoint_files(path)
    with contextlib.ExitStack() as stack:
        for fn in sorted(set(files.values())):  # every file's header, also of files no tensor needs
            stack.enter_context(_safe_open(fn))
        _check_tensors(path, tensor_map(cfg), files, _slice_reader(files, stack))
    return cfg


def _build_model(cfg: ModelConfig, get: Callable[[str], Any], dtype: Any, mesh: Any, compute_dtype: Any,
                 remat: bool) -> Decoder:
    """A Decoder whose parameters are read from HF tensors through ``get(name)`` (an array or a
    lazily read safetensors slice), each device shard straight into its sharding. The one
    import path, for checkpoints on disk and for tensors received in memory."""
    mesh = resolve_mesh(mesh)
    model = abstract_model(cfg, dtype=as_dtype(dtype), compute_dtype=compute_dtype, remat=remat, mesh=mesh)
    maps: dict[tuple, list[TensorMap]] = {}  # path -> its entries (one per layer of a stacked parameter)
    for m in tensor_map(cfg):
        maps.setdefault(m.path, []).append(m)
    missing = [p for p, _ in param_paths(model) if p not in maps]
    assert not missing, f"no HF mapping for {missing}"  # the table covers every Param
    materialize(model, mesh, lambda p, var, idx: read_param_block(maps[p], cfg, get, idx))
    return model


def from_hf_tensors(cfg: ModelConfig, tensors: Any, dtype: Any = "float32", mesh: Any = None, *,
                    compute_dtype: Any = None, remat: bool = False, what: str = "tensors") -> Decoder:
    """A Decoder from HF-named tensors held in memory (``tensors[name]``: a numpy array in HF
    layout), converted to our layout on the devices (:class:`HFAssembler`), each parameter in its
    sharding. A missing tensor or a wrong shape is a CheckpointError naming it (``what`` says
    where from). The weight sync's receiver feeds an :class:`HFAssembler` bucket by bucket instead."""
    for name, want in hf_tensor_specs(cfg):
        if name not in tensors:
            raise CheckpointError(f"{name}: tensor missing from the {what}")
        got = tuple(np.shape(tensors[name]))
        if got != want:
            raise CheckpointError(f"{name}: shape mismatch: the {what} have {list(got)}, the config implies {list(want)}")
    asm = HFAssembler(cfg, dtype, mesh, compute_dtype=compute_dtype, remat=remat)
    for name, _ in hf_tensor_specs(cfg):
        asm.add(name, tensors[name])
    return asm.finish()


_NP_ST_DTYPES = {"F32": np.dtype(np.float32), "F16": np.dtype(np.float16), "BF16": np.dtype(jnp.bfloat16)}


def _mapped_tensors(fn: str) -> dict[str, np.ndarray]:
    """name -> read-only numpy view of the tensor in a memory map of safetensors file ``fn`` (no
    copy: on a RAM disk the pages themselves). Other dtypes than F32/F16/BF16 are a CheckpointError."""
    with open(fn, "rb") as f:  # all pages mapped in one call (MAP_POPULATE): no fault per 4 KB page
        size = os.fstat(f.fileno()).st_size
        if size < 8:
            raise CheckpointError(f"{fn}: not a readable safetensors file (truncated or damaged?): {size} bytes")
        flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
        mm = np.frombuffer(mmap.mmap(f.fileno(), 0, flags=flags, prot=mmap.PROT_READ), np.uint8)
    try:
        n = int(mm[:8].view("<u8")[0])
        header = json.loads(bytes(mm[8:8 + n]))
    except (ValueError, IndexError) as e:
        raise CheckpointError(f"{fn}: not a readable safetensors file (truncated or damaged?): {e}") from None
    base, out = 8 + n, {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dt = _NP_ST_DTYPES.get(info.get("dtype"))
        if dt is None:
            raise CheckpointError(f"{fn}: tensor {name} has dtype {info.get('dtype')!r}; readable: {sorted(_NP_ST_DTYPES)}")
        a, b = info["data_offsets"]
        out[name] = mm[base + a:base + b].view(dt).reshape(info["shape"])
    return out


def load_pretrained(path: str | os.PathLike, dtype: Any = "float32", mesh: Any = None, *,
                    compute_dtype: Any = None, remat: bool = False) -> Decoder:
    """Load a local HF directory into a Decoder, each tensor straight into its sharding.

    dtype: parameter dtype ("float32" | "bfloat16"); compute_dtype defaults to it.
    mesh: None (one device) | jax Mesh | "DxT".

    One process: every file is memory-mapped and each tensor converted to our layout on the
    devices (:class:`HFAssembler`; the per-step disk weight sync's server side). Several processes:
    each device shard is read from the file straight into its place (only its own rows).
    """
    cfg = read_config(path)
    files = checkpoint_files(path)
    with contextlib.ExitStack() as stack:
        get = _slice_reader(files, stack)
        _check_tensors(path, tensor_map(cfg), files, get)  # every tensor before reading any: fails fast, by name
        if jax.process_count() > 1:
            return _build_model(cfg, get, dtype, mesh, compute_dtype, remat)
    asm = HFAssembler(cfg, dtype, mesh, compute_dtype=compute_dtype, remat=remat)
    for fn in sorted(set(files.values())):
        for name, a in _mapped_tensors(fn).items():
            if name in asm.shape_of:  # a checkpoint may hold more than the config needs
                asm.add(name, a)
    return asm.finish()


# --------------------------------------------------------------------------- export
def plan_shard_files(specs: list[tuple[str, tuple[int, ...]]], itemsize: int,
                     max_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> list[tuple[str, list[int]]]:
    """(file name, indices into ``specs``) of each safetensors file of an export: consecutive
    tensors, at most ``max_bytes`` a file (a larger tensor alone), named as transformers does."""
    shards: list[list[int]] = [[]]
    size = 0
    for j, (_, shape) in enumerate(specs):
        n = int(np.prod(shape)) * itemsize
        if shards[-1] and size + n > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(j)
        size += n
    k = len(shards)
    return [("model.safetensors" if k == 1 else f"model-{i + 1:05d}-of-{k:05d}.safetensors", idxs)
            for i, idxs in enumerate(shards)]


def safetensors_header(names: list[str], shapes: list[tuple[int, ...]], dtype: Any) -> tuple[bytes, list[int]]:
    """(the file's first bytes: length + JSON header padded to 64, each tensor's byte offset in
    the file) of a safetensors file holding these tensors in this order."""
    dt = as_dtype(dtype)
    if dt.name not in _ST_DTYPES:
        raise ValueError(f"dtype: {dtype!r} cannot be exported (use 'float32' or 'bfloat16')")
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    off, starts = 0, []
    for name, shape in zip(names, shapes):
        n = int(np.prod(shape)) * dt.itemsize
        header[name] = {"dtype": _ST_DTYPES[dt.name], "shape": list(shape), "data_offsets": [off, off + n]}
        starts.append(off)
        off += n
    hb = json.dumps(header, separators=(",", ":")).encode()
    # Spaces pad the header (the format allows it) so that the data starts 64-byte aligned: a
    # reader's memory map then hands XLA:CPU aligned tensors, which it uses without a copy.
    hb += b" " * (-(8 + len(hb)) % 64)
    head = struct.pack("<Q", len(hb)) + hb
    return head, [len(head) + o for o in starts]


def _host_stream(model: Decoder, dtype: jnp.dtype) -> Iterator[np.ndarray]:
    """HF tensors in order as host numpy arrays; the next tensor's transform and device->host
    copy are in flight while the caller writes the current one (one tensor of lookahead). A model
    on one CPU device is converted on the host instead (:func:`hf_host_tensors`), each tensor into
    a scratch array reused for the next tensor of that shape (the caller writes it first), so no
    fresh memory is touched per tensor."""
    if host_path(model):
        scratch: dict[tuple, np.ndarray] = {}
        specs = dict(hf_tensor_specs(model.cfg))
        slot = {n: j for m in tensor_map(model.cfg) for j, n in enumerate(m.hf_names)}  # gate and up: two buffers
        same = {m.hf_names[0] for m in tensor_map(model.cfg) if m.kind == "same"}

        def dest(name: str) -> np.ndarray | None:
            if name in same:  # written straight from the parameter (a view of it when the dtype matches)
                return None
            key = (specs[name], slot[name])
            if key not in scratch:
                scratch[key] = np.empty(specs[name], dtype)
            return scratch[key]

        yield from (a for _, a in hf_host_tensors(model, dtype, dest))
        return
    pending: jax.Array | None = None
    for _, a in hf_device_tensors(model, dtype):
        a.copy_to_host_async()
        if pending is not None:
            yield np.asarray(pending)
        pending = a
    if pending is not None:
        yield np.asarray(pending)


def _write_safetensors(fn: str, names: list[str], shapes: list[tuple[int, ...]], dtype: Any,
                       arrays: Iterator[np.ndarray]) -> None:
    head, _ = safetensors_header(names, shapes, dtype)
    tmp = fn + ".tmp"
    with open(tmp, "wb") as f:
        f.write(head)
        for name, shape in zip(names, shapes):
            a = next(arrays)
            if tuple(a.shape) != tuple(shape):  # pragma: no cover - table/transform disagreement
                raise AssertionError(f"{name}: produced {a.shape}, planned {shape}")
            f.write(np.ascontiguousarray(a).reshape(-1).view(np.uint8).data)
    os.replace(tmp, fn)


def save_pretrained(model: Decoder, out_dir: str | os.PathLike, dtype: Any = "bfloat16", *,
                    max_shard_size: int = DEFAULT_MAX_SHARD_BYTES, source_dir: str | os.PathLike | None = None,
                    copy_tokenizer: bool = True) -> list[str]:
    """Write an HF checkpoint directory loadable by transformers and SGLang; returns the files written.

    Shards of at most max_shard_size bytes (one file `model.safetensors` when it fits, otherwise
    `model-0000k-of-0000n.safetensors` + `model.safetensors.index.json`), config.json,
    generation_config.json and the tokenizer files of source_dir (default: the directory the
    model was loaded from). Files are written to a temporary name and renamed, so a reader never
    sees half a file.
    """
    cfg: ModelConfig = model.cfg
    dt = as_dtype(dtype)
    if dt.name not in _ST_DTYPES:
        raise ValueError(f"dtype: {dtype!r} cannot be exported (use 'float32' or 'bfloat16')")
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    specs = hf_tensor_specs(cfg)
    plan = plan_shard_files(specs, dt.itemsize, max_shard_size)
    stream = _host_stream(model, dt)
    for fn, idxs in plan:
        _write_safetensors(os.path.join(out_dir, fn), [specs[j][0] for j in idxs], [specs[j][1] for j in idxs],
                           dt, stream)
    return [fn for fn, _ in plan] + write_hf_metadata(cfg, out_dir, dt, plan, source_dir=source_dir,
                                                      copy_tokenizer=copy_tokenizer)


def write_hf_metadata(cfg: ModelConfig, out_dir: str, dtype: Any, plan: list[tuple[str, list[int]]], *,
                      source_dir: str | os.PathLike | None = None, copy_tokenizer: bool = True) -> list[str]:
    """Everything of an export but the tensors (written per ``plan``, :func:`plan_shard_files`):
    the shard index when there are several files, config.json, generation_config.json, the
    tokenizer files; weights of an earlier export into ``out_dir`` that ``plan`` does not name
    are removed. Returns the files written."""
    dt = as_dtype(dtype)
    specs = hf_tensor_specs(cfg)
    weights = [fn for fn, _ in plan]
    written = []
    index_fn = os.path.join(out_dir, "model.safetensors.index.json")
    if len(plan) > 1:
        total = sum(int(np.prod(s)) * dt.itemsize for _, s in specs)
        weight_map = {specs[j][0]: fn for fn, idxs in plan for j in idxs}
        _write_json(index_fn, {"metadata": {"total_size": total}, "weight_map": weight_map})
        written.append("model.safetensors.index.json")
    # Remove weights of an earlier export into the same directory that this one did not overwrite.
    for fn in os.listdir(out_dir):
        stale = fn.startswith("model") and fn.endswith(".safetensors") and fn not in weights
        if stale or (len(plan) == 1 and fn == "model.safetensors.index.json"):
            os.remove(os.path.join(out_dir, fn))

    _write_json(os.path.join(out_dir, "config.json"), cfg.to_hf_dict(dtype=dt.name))
    written.append("config.json")
    src = os.fspath(source_dir) if source_dir is not None else cfg.source_dir
    gen_src = os.path.join(src, "generation_config.json") if src else None
    if gen_src and os.path.isfile(gen_src):
        if os.path.abspath(gen_src) != os.path.abspath(os.path.join(out_dir, "generation_config.json")):
            shutil.copyfile(gen_src, os.path.join(out_dir, "generation_config.json"))
    else:
        extra = json.loads(cfg.extra_json)
        gen = {k: extra[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if extra.get(k) is not None}
        _write_json(os.path.join(out_dir, "generation_config.json"), gen)
    written.append("generation_config.json")
    if copy_tokenizer and src:
        for fn in TOKENIZER_FILES:
            s, d = os.path.join(src, fn), os.path.join(out_dir, fn)
            if os.path.isfile(s) and os.path.abspath(s) != os.path.abspath(d):
                shutil.copyfile(s, d)
                written.append(fn)
    return written


def _write_json(fn: str, obj: Any) -> None:
    tmp = fn + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, fn)
