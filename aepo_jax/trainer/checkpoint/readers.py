"""Read-only access to a run's checkpoints by path, for tools that run beside or after a run
(``tools/export_hf.py``): where the checkpoints live and the params subtree as host numpy arrays."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax

from aepo_jax.trainer.checkpoint.errors import CheckpointError, NoCheckpointError
from aepo_jax.trainer.checkpoint.manager import CheckpointManager

CHECKPOINT_SUBDIR = "checkpoints"


def checkpoint_dir(run_dir: str | os.PathLike[str]) -> Path:
    """Where a run keeps its checkpoints: ``RUN_DIR/checkpoints``."""
    return Path(run_dir) / CHECKPOINT_SUBDIR


def _is_step_dir(p: Path) -> bool:
    return p.is_dir() and re.fullmatch(r"\d+", p.name) is not None


def resolve_checkpoint(path: str | os.PathLike[str]) -> tuple[Path, int | None]:
    """Map a user path to ``(checkpoint directory, step or None = latest)``.

    Accepted: ``RUN_DIR``, ``RUN_DIR/<step>``, ``RUN_DIR/checkpoints``, ``RUN_DIR/checkpoints/<step>``.
    """
    p = Path(path)
    if (p / CHECKPOINT_SUBDIR).is_dir():  # first: a run directory may itself have a numeric name
        return p / CHECKPOINT_SUBDIR, None
    if re.fullmatch(r"\d+", p.name):
        step = int(p.name)
        parent = p.parent
        ckpt = parent if parent.name == CHECKPOINT_SUBDIR or not (parent / CHECKPOINT_SUBDIR).is_dir() else parent / CHECKPOINT_SUBDIR
        if not (ckpt / p.name).is_dir():
            have = sorted(int(c.name) for c in ckpt.iterdir() if _is_step_dir(c)) if ckpt.is_dir() else []
            raise NoCheckpointError(f"checkpoint: step {step} not found in {ckpt} (complete steps there: {have or 'none'})")
        return ckpt, step
    if p.is_dir() and any(_is_step_dir(c) for c in p.iterdir()):
        return p, None
    raise NoCheckpointError(f"checkpoint: no checkpoints under {p} (expected {p / CHECKPOINT_SUBDIR}/<step>/)")


def restore_params_numpy(path: str | os.PathLike[str], key: str = "params") -> tuple[int, Any]:
    """Restore only ``state[key]`` of a checkpoint as host numpy arrays (no mesh, no optimizer).

    ``path`` as in :func:`resolve_checkpoint`; without a step, the newest intact one.
    """
    ckpt, step = resolve_checkpoint(path)
    with CheckpointManager(ckpt, async_save=False, read_only=True) as mngr:
        probe = mngr.latest_step() if step is None else step
        if probe is None:
            raise NoCheckpointError(f"checkpoint: no complete checkpoint in {ckpt}")
        try:
            tree = mngr.state_metadata(probe)
        except Exception:  # noqa: BLE001 - a damaged latest: restore() below skips it and says so
            tree = None
        if tree is not None and (not isinstance(tree, Mapping) or key not in tree):
            have = sorted(tree) if isinstance(tree, Mapping) else type(tree).__name__
            raise CheckpointError(f"checkpoint: {ckpt}/{probe} has no top-level state key {key!r} (has {have})")
        if tree is None:  # shapes unknown: read everything (the fallback step) as numpy
            restored = mngr.restore(step)
        else:  # leaves without a sharding come back as host numpy arrays
            target = {key: jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), tree[key])}
            restored = mngr.restore(step, target=target, partial=True)
        return restored.step, restored.state[key]
