"""Small cross-process helpers over ``jax.distributed`` (no trainer or rollout dependencies).

``process_index() -> int``, ``process_count() -> int``, ``is_main_process() -> bool``.
``broadcast_object(obj) -> obj``: process 0's picklable object, returned on every process.
``allgather_object(obj) -> list``: every process's object, indexed by process id.
``sync(name)``: barrier across processes.

Every helper is a no-op shortcut with one process. All cross-process helpers are collective: every
process must call them in the same order. Used by the trainer (``aepo_jax.trainer.distributed``
re-exports them beside the set-up) and by the multi-process disk weight sync.
"""

from __future__ import annotations

import pickle
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils


def process_index() -> int:
    return jax.process_index()


def process_count() -> int:
    return jax.process_count()


def is_main_process() -> bool:
    """True on process 0: the one that talks to rollout servers and writes logs."""
    return process_index() == 0


def sync(name: str) -> None:
    """Barrier: returns once every process has reached ``sync(name)``."""
    if process_count() == 1:
        return
    multihost_utils.sync_global_devices(name)


def _to_bytes_array(obj: Any) -> np.ndarray:
    return np.frombuffer(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL), dtype=np.uint8)


def broadcast_object(obj: Any) -> Any:
    """Return process 0's ``obj`` on every process (other processes' ``obj`` is ignored).

    Pickle carries numpy arrays, dicts and dataclasses as they are; it is only ever exchanged
    between processes of the same run, never read from disk or the network.
    """
    if process_count() == 1:
        return obj
    main = is_main_process()
    payload = _to_bytes_array(obj) if main else np.zeros(0, np.uint8)
    # Two rounds: the length first, so every process can allocate a same-shaped receive buffer.
    n = int(multihost_utils.broadcast_one_to_all(np.array(payload.size, np.int64)))
    buf = payload if main else np.zeros(n, np.uint8)
    out = np.asarray(multihost_utils.broadcast_one_to_all(buf))
    return obj if main else pickle.loads(out.tobytes())


def allgather_object(obj: Any) -> list[Any]:
    """Every process's ``obj``, as a list indexed by process id (on every process)."""
    if process_count() == 1:
        return [obj]
    payload = _to_bytes_array(obj)
    sizes = np.asarray(multihost_utils.process_allgather(np.array([payload.size], np.int64))).reshape(-1)
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[: payload.size] = payload
    rows = np.asarray(multihost_utils.process_allgather(padded)).reshape(len(sizes), -1)
    return [pickle.loads(rows[i, : int(s)].tobytes()) for i, s in enumerate(sizes)]
