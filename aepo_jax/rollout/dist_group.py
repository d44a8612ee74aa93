"""The torch side of SGLang's distributed weight update: the process group and the flat buckets.

SGLang's ``/init_weights_update_group`` makes each engine rank join a ``torch.distributed``
process group of its own (not the default group) through ``tcp://master_address:master_port``,
its store prefixed with the group name; the trainer is rank 0. ``/update_weights_from_distributed``
with ``load_format: "flattened_bucket"`` then receives one ``broadcast(src=0)`` of a uint8 tensor:
the listed tensors' bytes, concatenated in ``names`` order, no padding (each tensor's byte offset
must be a multiple of its dtype's size).

This module is both ends of that: :func:`join_group` (the learner and the embedded server join
the same way a real SGLang engine does), :func:`plan_buckets` and :class:`BucketLayout` (where
each tensor lies in a bucket). torch is imported lazily: it is the optional ``distributed`` extra,
needed only with ``--rollout.sync=distributed``.
"""

from __future__ import annotations

import dataclasses
import datetime
from typing import Any, Sequence

import numpy as np

# dtype names as SGLang's request carries them (torch attribute names) <-> numpy/JAX dtypes
DTYPES = ("float32", "bfloat16", "float16")


def require_torch(what: str = "rollout.sync=distributed"):
    """The torch module, or an ImportError that says what needs it and how to install it."""
    try:
        import torch
        import torch.distributed  # noqa: F401
    except ImportError as e:
        raise ImportError(f"{what} needs torch (the 'distributed' extra): pip install 'aepo-jax[distributed]' "
                          f"(CPU-only is enough for the gloo backend); import failed: {e}") from None
    return torch


def np_dtype(name: str) -> np.dtype:
    """numpy dtype of an SGLang dtype name (bfloat16 is ml_dtypes', as JAX uses)."""
    if name not in DTYPES:
        raise ValueError(f"dtype {name!r} is not one of {list(DTYPES)}")
    import jax.numpy as jnp

    return np.dtype(jnp.dtype(name))


@dataclasses.dataclass(frozen=True)
class BucketLayout:
    """Where each tensor of one flattened bucket lies: ``offsets[i]:offsets[i] + nbytes[i]``."""

    names: tuple[str, ...]
    dtypes: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    offsets: tuple[int, ...]
    nbytes: tuple[int, ...]

    @property
    def total_bytes(self) -> int:
        return self.offsets[-1] + self.nbytes[-1] if self.names else 0

    @classmethod
    def of(cls, names: Sequence[str], dtypes: Sequence[str], shapes: Sequence[Sequence[int]]) -> "BucketLayout":
        """The layout SGLang's receiver allocates; ValueError naming the tensor it would refuse."""
        if not (len(names) == len(dtypes) == len(shapes)):
            raise ValueError(f"names, dtypes and shapes differ in length ({len(names)}, {len(dtypes)}, {len(shapes)})")
        if not names:
            raise ValueError("names: an empty bucket")
        offsets, sizes, off = [], [], 0
        for name, dt, shape in zip(names, dtypes, shapes):
            item = np_dtype(dt).itemsize
            if any(int(d) < 0 for d in shape):
                raise ValueError(f"{name}: negative dimension in shape {list(shape)}")
            if off % item:
                raise ValueError(f"{name}: byte offset {off} in the bucket is not a multiple of {dt}'s size")
            n = int(np.prod(shape, dtype=np.int64)) * item
            offsets.append(off)
            sizes.append(n)
            off += n
        return cls(tuple(names), tuple(dtypes), tuple(tuple(int(d) for d in s) for s in shapes),
                   tuple(offsets), tuple(sizes))

    def unflatten(self, flat: np.ndarray) -> dict[str, np.ndarray]:
        """name -> array (views into ``flat``, a uint8 array of ``total_bytes``)."""
        if flat.dtype != np.uint8 or flat.size != self.total_bytes:
            raise ValueError(f"bucket holds {flat.size} bytes of {flat.dtype}, expected {self.total_bytes} uint8")
        return {n: flat[o:o + b].view(np_dtype(dt)).reshape(s)
                for n, dt, s, o, b in zip(self.names, self.dtypes, self.shapes, self.offsets, self.nbytes)}


def plan_buckets(specs: Sequence[tuple[str, tuple[int, ...]]], itemsize: int, bucket_bytes: int) -> list[list[int]]:
    """Indices of ``specs`` per bucket, in order: each bucket at most ``bucket_bytes`` unless a
    single tensor is larger (it then travels alone)."""
    if bucket_bytes <= 0:
        raise ValueError(f"bucket size must be > 0 bytes, got {bucket_bytes}")
    out: list[list[int]] = []
    size = 0
    for i, (_, shape) in enumerate(specs):
        n = int(np.prod(shape, dtype=np.int64)) * itemsize
        if not out or (out[-1] and size + n > bucket_bytes):
            out.append([])
            size = 0
        out[-1].append(i)
        size += n
    return out


def join_group(master_address: str, master_port: int, rank: int, world_size: int, group_name: str,
               backend: str, timeout_s: float = 600.0) -> Any:
    """Join (rank 0: host) the weight-update process group exactly as an SGLang engine rank does:
    a TCP store at ``master_address:master_port`` (rank 0 serves it), prefixed with ``group_name``,
    and a process group of ``backend`` ("nccl" on GPUs, "gloo" on CPU) built on it. Blocks until
    all ``world_size`` ranks have joined. Returns the group for ``torch.distributed.broadcast``."""
    torch = require_torch()
    import torch.distributed as dist
    from torch.distributed import distributed_c10d as c10d  # the one way to build a non-default group

    if backend not in ("nccl", "gloo"):
        raise ValueError(f"backend: {backend!r} is not 'nccl' or 'gloo'")
    if backend == "nccl" and not torch.cuda.is_available():
        raise ValueError("backend: 'nccl' needs a CUDA device; use 'gloo' on CPU")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside the group of world_size {world_size}")
    timeout = datetime.timedelta(seconds=timeout_s)
    store, rank, world_size = next(c10d.rendezvous(f"tcp://{master_address}:{int(master_port)}", rank, world_size,
                                                   timeout=timeout))
    store.set_timeout(timeout)
    store = dist.PrefixStore(group_name, store)
    pg, _ = c10d._new_process_group_helper(world_size, rank, [], dist.Backend(backend), store,
                                           group_name=group_name, backend_options=None, timeout=timeout)
    c10d._world.pg_group_ranks[pg] = {i: i for i in range(world_size)}  # group rank == rank
    return pg


def leave_group(pg: Any) -> None:
    import torch.distributed as dist

    try:
        dist.destroy_process_group(pg)
    except Exception:  # a peer already gone: nothing left to release on our side
        pass
