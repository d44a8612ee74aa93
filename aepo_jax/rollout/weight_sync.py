"""Learner parameters -> every inference server, through SGLang's ``/update_weights_from_disk``.

One code path for the embedded server and real SGLang:

1. ``save_pretrained(model, sync_dir/weights_v<version>, dtype)``: an HF checkpoint (config.json +
   safetensors + generation_config + tokenizer files), written file by file to a temporary name
   and renamed. ``sync_dir`` defaults to ``/dev/shm/aepo_jax_sync_<pid>`` when /dev/shm exists (a
   RAM disk: no disk I/O), else the system temp dir. Servers on *other* machines cannot read the
   learner's /dev/shm: give them a shared ``sync_dir`` (NFS, Lustre, a mounted bucket).
2. ``POST /update_weights_from_disk {"model_path", "weight_version", "flush_cache": true}`` to every
   server (``client.weight_update_urls``; sglang-router has no such route, so list the workers).
3. ``GET /model_info`` on every server: each must report the new ``weight_version``; anything else
   raises :class:`WeightSyncError`.

:func:`write_weights` (1) and :func:`publish_weights` (2-3) are the two halves, for a caller that
writes while it does other work (the trainer) and checks the version on its samples instead of 3.

Older ``weights_v*`` directories of this sync dir are removed once every server has the new one
(``keep`` most recent are kept); the default sync dir is removed when the process exits, and
default sync dirs left by processes that no longer exist (killed learners) when another learner
first resolves its own (:func:`remove_stale_sync_dirs`).
"""

from __future__ import annotations

import asyncio
import atexit
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from typing import Any

from aepo_jax.models import save_pretrained
from aepo_jax.rollout.client import run_sync


class WeightSyncError(RuntimeError):
    pass


@dataclass
class SyncResult:
    weight_version: str
    path: str
    save_s: float
    update_s: float
    verify_s: float
    servers: list[str]

    @property
    def total_s(self) -> float:
        return self.save_s + self.update_s + self.verify_s


_DEFAULT_PREFIX = "aepo_jax_sync_"


def _default_base() -> str:
    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else tempfile.gettempdir()


def default_sync_dir() -> str:
    return os.path.join(_default_base(), f"{_DEFAULT_PREFIX}{os.getpid()}")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def remove_stale_sync_dirs(base: str | None = None) -> list[str]:
    """Remove the default sync dirs (``aepo_jax_sync_<pid>`` in ``base``, default /dev/shm or the
    temp dir) whose process no longer exists: a learner that was killed (SIGKILL, out of memory)
    never ran its exit hook and left a whole checkpoint in RAM. Directories of live processes,
    of other users and any other name are left alone. Returns the paths removed."""
    base = base or _default_base()
    removed = []
    try:
        entries = os.listdir(base)
    except OSError:
        return removed
    for e in entries:
        pid = e[len(_DEFAULT_PREFIX):]
        if not e.startswith(_DEFAULT_PREFIX) or not pid.isdigit() or int(pid) == os.getpid():
            continue
        path = os.path.join(base, e)
        try:
            if os.stat(path).st_uid != os.getuid() or _pid_alive(int(pid)):
                continue
        except OSError:
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


_CLEANUP_REGISTERED: set[str] = set()


def _remove_at_exit(path: str) -> None:
    """The default sync dir lives in RAM (/dev/shm): remove it when this process exits. (The
    servers hold the weights in memory once loaded; a directory the caller chose is left alone.)"""
    if path in _CLEANUP_REGISTERED:
        return
    _CLEANUP_REGISTERED.add(path)
    atexit.register(shutil.rmtree, path, True)


def resolve_sync_dir(sync_dir: str | None) -> str:
    """``sync_dir``, or the default one (removed when this process exits) when it is None/empty."""
    if not sync_dir:
        sync_dir = default_sync_dir()
        if sync_dir not in _CLEANUP_REGISTERED:  # once per process: what killed learners left behind
            remove_stale_sync_dirs(os.path.dirname(sync_dir))
        _remove_at_exit(sync_dir)
    return os.path.abspath(sync_dir)


def shared_by_all_processes(sync_dir: str) -> bool:
    """Collective: True when every process of the learner sees the same ``sync_dir`` (a file
    process 0 creates there is visible to all), so :func:`write_weights_per_process` can be used."""
    import jax

    from aepo_jax import multihost as distributed

    probe = os.path.join(sync_dir, f".shared-probe-{os.getpid()}")
    probe = distributed.broadcast_object(probe)
    if jax.process_index() == 0:
        os.makedirs(sync_dir, exist_ok=True)
        with open(probe, "w") as f:
            f.write("probe\n")
    distributed.sync("sync-dir-probe")
    seen = distributed.allgather_object(os.path.isfile(probe))
    distributed.sync("sync-dir-probed")
    if jax.process_index() == 0:
        os.remove(probe)
    return all(seen)


def _safe_version(v: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", v)


def _prune(sync_dir: str, keep_paths: set[str], keep: int) -> None:
    try:
        entries = [os.path.join(sync_dir, e) for e in os.listdir(sync_dir) if e.startswith("weights_v")]
    except FileNotFoundError:
        return
    entries.sort(key=lambda p: os.path.getmtime(p), reverse=True)
    for p in entries[keep:]:
        if p not in keep_paths:
            shutil.rmtree(p, ignore_errors=True)


def write_weights(model, weight_version: str | int, sync_dir: str | None = None, *, dtype: Any = None,
                  source_dir: str | None = None) -> str:
    """Step 1 alone: save ``model`` as an HF checkpoint ``sync_dir/weights_v<version>``; returns its path.

    Blocking and thread-safe (the trainer runs it in a background thread, overlapping the step's
    logging, checkpoint and next prompts)."""
    version = str(weight_version)
    sync_dir = resolve_sync_dir(sync_dir)
    os.makedirs(sync_dir, exist_ok=True)
    path = os.path.join(sync_dir, f"weights_v{_safe_version(version)}")
    if dtype is None:  # the learner's own dtype: the server then reproduces its log-probs exactly
        dtype = getattr(model, "param_dtype", "float32")
    kw = {} if source_dir is None else {"source_dir": source_dir}
    save_pretrained(model, path, dtype, **kw)
    return path


@dataclass
class ShardedWrite:
    path: str  # the checkpoint directory (the same on every process)
    bytes_written: int  # tensor bytes this process wrote (its replica-0 shards)
    bytes_total: int  # tensor bytes of the whole checkpoint


def write_weights_per_process(model, weight_version: str | int, sync_dir: str, *, dtype: Any = None,
                              source_dir: str | None = None, max_shard_size: int | None = None) -> ShardedWrite:
    """Collective form of :func:`write_weights` for a learner of several processes: every process
    writes the shards of each HF tensor that it holds (replica 0 of each block, so each byte is
    written once), straight into safetensors files that process 0 laid out; no process ever holds
    the whole model. ``sync_dir`` must be the same directory on every process (a shared file
    system; WeightSyncError on every process otherwise). The result is byte for byte the
    checkpoint :func:`write_weights` (``save_pretrained``) writes, renamed into place by process 0
    once complete. Every process calls it with the same arguments, in the same order."""
    import jax
    import numpy as np

    from aepo_jax.models import hf_device_tensors, hf_tensor_specs
    from aepo_jax.models.decoder import as_dtype
    from aepo_jax.models.hf_io import DEFAULT_MAX_SHARD_BYTES, plan_shard_files, safetensors_header, write_hf_metadata
    from aepo_jax import multihost as distributed

    version = str(weight_version)
    dt = as_dtype(dtype if dtype is not None else getattr(model, "param_dtype", "float32"))
    cfg = model.cfg
    specs = hf_tensor_specs(cfg)
    plan = plan_shard_files(specs, dt.itemsize, max_shard_size or DEFAULT_MAX_SHARD_BYTES)
    path = os.path.join(os.path.abspath(sync_dir), f"weights_v{_safe_version(version)}")
    tmp = path + ".partial"
    where: dict[int, tuple[str, int]] = {}  # tensor index -> (file, byte offset of its data)
    main = jax.process_index() == 0
    for fn, idxs in plan:
        head, starts = safetensors_header([specs[j][0] for j in idxs], [specs[j][1] for j in idxs], dt)
        where.update({j: (os.path.join(tmp, fn), o) for j, o in zip(idxs, starts)})
        if main:
            if fn == plan[0][0]:
                shutil.rmtree(tmp, ignore_errors=True)
                os.makedirs(tmp)
            size = starts[-1] + int(np.prod(specs[idxs[-1]][1])) * dt.itemsize
            with open(os.path.join(tmp, fn), "wb") as f:  # header, then the data region (sparse until written)
                f.write(head)
                f.truncate(size)
    distributed.sync(f"weights-{version}-laid-out")
    seen = distributed.allgather_object(all(os.path.isfile(f) for f, _ in where.values()))
    if not all(seen):
        raise WeightSyncError(f"rollout.sync_dir {sync_dir!r}: processes {[i for i, s in enumerate(seen) if not s]} "
                              "cannot see the files process 0 created there; a multi-process learner needs a "
                              "directory every process shares (or leave rollout.sync_dir empty)")
    maps: dict[str, np.memmap] = {}
    written = 0
    try:
        for j, (name, arr) in enumerate(hf_device_tensors(model, dt)):
            fn, off = where[j]
            if fn not in maps:
                maps[fn] = np.memmap(fn, dtype=np.uint8, mode="r+")
            shape = specs[j][1]
            n = int(np.prod(shape)) * dt.itemsize
            dest = maps[fn][off:off + n].view(dt).reshape(shape)
            for shard in arr.addressable_shards:
                if shard.replica_id == 0:  # exactly one copy of each block, on one process, is written
                    block = np.asarray(shard.data)
                    dest[shard.index] = block
                    written += block.nbytes
        for m in maps.values():
            m.flush()
    finally:
        maps.clear()
    distributed.sync(f"weights-{version}-written")
    if main:
        write_hf_metadata(cfg, tmp, dt, plan, source_dir=source_dir)
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
    distributed.sync(f"weights-{version}-published")
    return ShardedWrite(path, written, sum(int(np.prod(s)) * dt.itemsize for _, s in specs))


async def verify_weight_version(client, version: str, after: str) -> list[str]:
    """Step 3 of either sync: every server's ``/model_info`` reports ``version``. Returns the servers
    (sorted URLs); raises ``WeightSyncError`` naming each server that reports another version."""
    versions = await client.weight_versions()
    wrong = {u: v for u, v in versions.items() if v != version}
    if wrong:
        raise WeightSyncError(f"after {after} these servers report another weight_version than {version!r}: {wrong}")
    return sorted(versions)


async def publish_weights(client, path: str, weight_version: str | int, *, verify: bool = True, keep: int = 1,
                          timeout_s: float | None = None) -> tuple[float, float, list[str]]:
    """Steps 2-3: every server loads ``path`` as ``weight_version`` (and, with ``verify``, reports it
    in ``/model_info``); older ``weights_v*`` beside ``path`` are pruned. Returns (update_s,
    verify_s, servers). Without ``verify`` the caller checks the ``weight_version`` that every
    ``/generate`` response carries (one HTTP round trip less per sync)."""
    version = str(weight_version)
    t1 = time.perf_counter()
    await client.update_weights_from_disk(path, version, flush_cache=True, timeout_s=timeout_s)
    t2 = time.perf_counter()
    servers = await verify_weight_version(client, version, f"update_weights_from_disk({path!r})") if verify else []
    t3 = time.perf_counter()
    _prune(os.path.dirname(path), {path}, max(1, keep))
    return t2 - t1, t3 - t2, servers


async def sync_weights_async(model, client, weight_version: str | int, sync_dir: str | None = None, *,
                             dtype: Any = None, keep: int = 1, source_dir: str | None = None,
                             timeout_s: float | None = None) -> SyncResult:
    """Save ``model`` and make every server of ``client`` serve it as ``weight_version``."""
    t0 = time.perf_counter()
    path = await asyncio.to_thread(write_weights, model, weight_version, sync_dir, dtype=dtype, source_dir=source_dir)
    save_s = time.perf_counter() - t0
    update_s, verify_s, servers = await publish_weights(client, path, weight_version, keep=keep, timeout_s=timeout_s)
    return SyncResult(str(weight_version), path, save_s, update_s, verify_s, servers)


def sync_weights_to_sampler(model, client, weight_version: str | int, sync_dir: str | None = None, **kw) -> SyncResult:
    """Synchronous wrapper of :func:`sync_weights_async` (runs its own event loop)."""
    return run_sync(sync_weights_async(model, client, weight_version, sync_dir, **kw), client)
