"""Multi-host set-up for the trainer, and (re-exported from ``aepo_jax.multihost``) small cross-process helpers.

API
---
``initialize_distributed(coordinator_address=None, num_processes=None, process_id=None,
local_device_ids=None) -> DistributedInfo``
    Start ``jax.distributed`` when the run spans several processes. With explicit arguments (or
    ``JAX_COORDINATOR_ADDRESS`` / ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID`` in the environment) it
    uses them; with none it lets JAX auto-detect a cluster (Cloud TPU pod, SLURM, Open MPI, ...)
    and stays single-process when none is detected. Call it once, before anything touches
    ``jax.devices()``. Idempotent.
``is_main_process() -> bool``, ``process_index() -> int``, ``process_count() -> int``.
``broadcast_object(obj) -> obj``: process 0's picklable object, returned on every process.
``allgather_object(obj) -> list``: every process's object, indexed by process id.
``sync(name)``: barrier across processes.

Every helper is a no-op shortcut with one process, so the single-host trainer pays nothing.
All cross-process helpers are collective: every process must call them in the same order.
"""

from __future__ import annotations

import dataclasses
import os

import jax

# The cross-process helpers live in a neutral module (the rollout side's weight sync uses them too);
# re-exported here, where the trainer has always found them.
from aepo_jax.multihost import (  # noqa: F401
    allgather_object, broadcast_object, is_main_process, process_count, process_index, sync)

_ENV_ADDRESS = "JAX_COORDINATOR_ADDRESS"
_ENV_NUM = "JAX_NUM_PROCESSES"
_ENV_ID = "JAX_PROCESS_ID"


@dataclasses.dataclass(frozen=True)
class DistributedInfo:
    """What :func:`initialize_distributed` set up (all processes agree on everything but ids)."""

    process_index: int
    process_count: int
    local_device_count: int
    global_device_count: int
    initialized: bool  # True when jax.distributed is running (False: plain single process)


def _env_int(name: str) -> int | None:
    raw = os.environ.get(name)
    if raw in (None, ""):
        return None
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"distributed: environment variable {name}={raw!r} is not an integer") from None


def _cluster_detected() -> bool:
    """True when JAX's own auto-detection recognises a multi-process environment."""
    try:  # private module: guarded so a JAX upgrade degrades to "explicit arguments only"
        from jax._src import clusters  # noqa: PLC0415

        envs = clusters.ClusterEnv._cluster_types  # type: ignore[attr-defined]
        return any(not getattr(e, "opt_in_only_method", False) and e.is_env_present() for e in envs)
    except Exception:  # pragma: no cover - depends on the JAX version
        return False


def _is_initialized() -> bool:
    from jax._src import distributed as _dist  # noqa: PLC0415

    return _dist.global_state.client is not None


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    local_device_ids: list[int] | None = None,
    initialization_timeout_s: int = 300,
) -> DistributedInfo:
    """Join (or skip) the multi-process JAX runtime; see the module docstring."""
    coordinator_address = coordinator_address or os.environ.get(_ENV_ADDRESS) or None
    num_processes = num_processes if num_processes is not None else _env_int(_ENV_NUM)
    process_id = process_id if process_id is not None else _env_int(_ENV_ID)
    explicit = any(v is not None for v in (coordinator_address, num_processes, process_id))
    if explicit:
        missing = [
            n
            for n, v in (
                ("coordinator_address", coordinator_address),
                ("num_processes", num_processes),
                ("process_id", process_id),
            )
            if v is None
        ]
        # A partial explicit set-up is almost always a typo; on a detected cluster JAX fills gaps.
        if missing and not _cluster_detected():
            raise ValueError(
                f"distributed: {', '.join(missing)} not given (set them or {_ENV_ADDRESS}/{_ENV_NUM}/"
                f"{_ENV_ID}); got coordinator_address={coordinator_address!r}, "
                f"num_processes={num_processes!r}, process_id={process_id!r}"
            )
        if num_processes is not None and process_id is not None and not 0 <= process_id < num_processes:
            raise ValueError(f"distributed: process_id={process_id} must be in [0, num_processes={num_processes})")

    if not _is_initialized() and (explicit or _cluster_detected()):
        jax.distributed.initialize(
            coordinator_address=coordinator_address,
            num_processes=num_processes,
            process_id=process_id,
            local_device_ids=local_device_ids,
            initialization_timeout=initialization_timeout_s,
        )
    return DistributedInfo(
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        local_device_count=jax.local_device_count(),
        global_device_count=jax.device_count(),
        initialized=_is_initialized(),
    )


def shutdown_distributed() -> None:
    """Leave the multi-process runtime (no-op when it was never started)."""
    if _is_initialized():
        jax.distributed.shutdown()
