"""Trainer infrastructure used by the RL loop (``aepo_jax.train``).

- :mod:`aepo_jax.trainer.checkpoint`: ``CheckpointManager`` (orbax; atomic, resumable, collective).
- :mod:`aepo_jax.trainer.metrics`: ``MetricsLogger`` (metrics.jsonl, TensorBoard, W&B, tqdm), ``Timer``.
- :mod:`aepo_jax.trainer.distributed`: ``initialize_distributed`` and cross-process helpers.

Names are imported lazily so that ``import aepo_jax.trainer`` stays cheap (no orbax/tensorboardX).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "CheckpointManager": "checkpoint",
    "CheckpointError": "checkpoint",
    "CheckpointSaveError": "checkpoint",
    "NonFiniteStateError": "checkpoint",
    "NoCheckpointError": "checkpoint",
    "Restored": "checkpoint",
    "checkpoint_dir": "checkpoint",
    "MetricsLogger": "metrics",
    "Timer": "metrics",
    "initialize_distributed": "distributed",
    "is_main_process": "distributed",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"aepo_jax.trainer.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'aepo_jax.trainer' has no attribute {name!r}")
