"""Checkpoints of the RL run: orbax-checkpoint underneath, atomic, resumable, collective.

Files: ``manager.py`` (``CheckpointManager``: save policy, retention, restore with the fallback
past damaged steps), ``readers.py`` (paths and the read-only params reader for export),
``checks.py`` (JSON and NaN/inf checks of what is saved), ``errors.py``.

API
---
``CheckpointManager(directory, *, save_every=1, keep_last=3, async_save=None, read_only=False,
data_iterator=None)``
    ``directory`` is usually ``RUN_DIR/checkpoints`` (see :func:`checkpoint_dir`); created if
    missing, and existing checkpoints there are picked up (the run directory resumes by default).
    ``async_save=None`` means async on GPU/TPU (the write overlaps the next step) and sync on CPU.
    ``data_iterator``: a ``grain.DatasetIterator`` (e.g. the trainer's ``PromptPipeline``) saved
    with every step and restored in place by :meth:`restore`, through grain's orbax handler (one
    JSON file per process). Use the manager as a context manager (or call ``close()``): exit waits
    for an async save to finish, also when the block ends with an exception. An async save still
    pending when the interpreter exits is lost (never an earlier step), and orbax's writer threads
    may then keep the process from exiting: Python stops the thread pools they need before any
    public exit hook runs.

``mgr.should_save(step) -> bool``        orbax's decision: step % save_every == 0 or a preemption notice
``mgr.save(step, state, extras=None, *, force=False) -> bool``
    ``state``: a pytree of (possibly sharded) ``jax.Array`` / numpy arrays / scalars, e.g.
    ``{"params": ..., "opt_state": ..., "rng": key}``. Keep params under the top-level key
    ``"params"``: ``tools/export_hf.py`` reads exactly that subtree.
    ``extras``: the run's small side state as plain JSON values (dicts with string keys, lists,
    strings, ints, finite floats, bools, None), the same on every process; stored with orbax's JSON
    handler (tuples come back as lists). Per-process state belongs in ``data_iterator``.
    Returns False when the step is not due (unless ``force``). Raises :class:`NonFiniteStateError`
    (nothing written) if any float leaf of ``state`` or any float in ``extras`` is NaN/inf,
    :class:`CheckpointSaveError` if writing fails (for async saves: at the next ``save`` /
    ``wait`` / ``close``); the previous checkpoint stays complete and loadable either way.
    Collective: with several processes every process calls ``save`` with the same step.
``mgr.wait()``                           block until an async save is on disk (raises its error)
``mgr.latest_step() -> int | None``, ``mgr.all_steps() -> list[int]``
``mgr.restore(step=None, target=None, *, partial=False) -> Restored(step, state, extras)``
    ``step=None``: the newest *intact* step. A newer step that cannot be read (files truncated or
    missing) is skipped with a warning naming it, and a writer moves it aside to
    ``damaged-<step>`` (kept for inspection; the run then redoes those steps). ``target``: pytree
    like ``state`` whose leaves are ``jax.Array`` or ``jax.ShapeDtypeStruct`` (with
    ``.sharding``), restored straight into those shardings, numpy arrays or unsharded ``ShapeDtypeStruct`` (restored on host).
    ``partial=True`` restores only the keys present in ``target`` (e.g. ``{"params": abstract}``).
    ``target=None`` restores every leaf as a host numpy array (topology-independent). The data
    iterator, if any, is set to the restored step's position.
``restore_params_numpy(ckpt_path) -> (step, params)``: params subtree as numpy, no mesh needed.
``resolve_checkpoint(path) -> (checkpoint_dir, step | None)``: accepts ``RUN_DIR``,
    ``RUN_DIR/<step>``, ``RUN_DIR/checkpoints`` or ``RUN_DIR/checkpoints/<step>``.
"""

from aepo_jax.trainer.checkpoint.checks import check_json_extras, nonfinite_leaves
from aepo_jax.trainer.checkpoint.errors import (
    CheckpointError,
    CheckpointSaveError,
    NoCheckpointError,
    NonFiniteStateError,
)
from aepo_jax.trainer.checkpoint.manager import DAMAGED_PREFIX, CheckpointManager, Restored
from aepo_jax.trainer.checkpoint.readers import (
    CHECKPOINT_SUBDIR,
    checkpoint_dir,
    resolve_checkpoint,
    restore_params_numpy,
)

__all__ = [
    "CHECKPOINT_SUBDIR", "DAMAGED_PREFIX", "CheckpointError", "CheckpointManager", "CheckpointSaveError",
    "NoCheckpointError", "NonFiniteStateError", "Restored", "check_json_extras", "checkpoint_dir",
    "nonfinite_leaves", "resolve_checkpoint", "restore_params_numpy",
]
