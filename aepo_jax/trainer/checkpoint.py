"""Checkpoints of the RL run: orbax-checkpoint underneath, atomic, resumable, collective.

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

Guarantees (tested in tests/test_checkpoint.py): a step directory appears only when complete
(orbax writes ``<step>.orbax-checkpoint-tmp`` and renames it at the end), so SIGKILL at any moment
leaves the previous or the new checkpoint as latest, never a partial one; retention is orbax's
(``LatestN(keep_last)``), applied only after the new step is complete (a kill during a deletion
can leave one half-deleted *old* step, which a later retention removes and a restore skips as
damaged); a failed write (e.g. disk full) removes its partial directory and keeps the previous
checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from aepo_jax.trainer import distributed

log = logging.getLogger(__name__)

CHECKPOINT_SUBDIR = "checkpoints"
DAMAGED_PREFIX = "damaged-"
_STATE = "state"
_EXTRAS = "extras"
_DATA = "data"


class CheckpointError(RuntimeError):
    """Base class for checkpoint failures the trainer should report and stop on."""


class CheckpointSaveError(CheckpointError):
    """Writing a checkpoint failed; the previous checkpoint is still complete."""


class NonFiniteStateError(CheckpointError, ValueError):
    """The state to save contains NaN/inf; nothing was written."""


class NoCheckpointError(CheckpointError, FileNotFoundError):
    """No (complete) checkpoint exists where one was asked for."""


@dataclasses.dataclass
class Restored:
    step: int
    state: Any
    extras: dict[str, Any]


def checkpoint_dir(run_dir: str | os.PathLike[str]) -> Path:
    """Where a run keeps its checkpoints: ``RUN_DIR/checkpoints``."""
    return Path(run_dir) / CHECKPOINT_SUBDIR


# ---------------------------------------------------------------------------------------------
# Checks before anything is written.
# ---------------------------------------------------------------------------------------------


def check_json_extras(obj: Any, where: str = "") -> None:
    """Raise naming the path if ``obj`` is not plain, finite JSON (what orbax's JSON handler stores).

    :class:`NonFiniteStateError` for NaN/inf (a controller state with a NaN temperature must never
    become a checkpoint), ``TypeError`` for anything JSON would not round-trip.
    """
    if obj is None or isinstance(obj, (bool, str)) or type(obj) is int:
        return
    if type(obj) is float:
        if not math.isfinite(obj):
            raise NonFiniteStateError(f"checkpoint: extras{where} = {obj}; refusing to save a NaN/inf value")
        return
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            if not isinstance(k, str):
                raise TypeError(f"checkpoint: extras{where} has a non-string key {k!r}; JSON keys must be strings")
            check_json_extras(v, f"{where}[{k!r}]")
        return
    if isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            check_json_extras(v, f"{where}[{i}]")
        return
    raise TypeError(
        f"checkpoint: extras{where} has unsupported type {type(obj).__name__}; extras are plain JSON "
        "(dict, list, str, int, float, bool, None; .item() / .tolist() for numpy values); arrays belong "
        "in the state pytree and per-process iterator state in data_iterator"
    )


def nonfinite_leaves(tree: Any) -> list[str]:
    """Paths (``jax.tree_util.keystr``) of float leaves holding any NaN/inf.

    jax arrays are reduced on device in one jitted call (works for arrays sharded over several
    processes: the verdict is a replicated array every process reads identically, so all
    processes agree on whether to save).
    """
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415

    bad: list[str] = []
    dev_paths, dev_leaves = [], []
    for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
        name = jax.tree_util.keystr(path)
        if isinstance(x, jax.Array):
            if jnp.issubdtype(x.dtype, jnp.inexact):
                dev_paths.append(name)
                dev_leaves.append(x)
        elif isinstance(x, (np.ndarray, np.generic, float)):
            a = np.asarray(x)
            if np.issubdtype(a.dtype, np.inexact) and not np.all(np.isfinite(a)):
                bad.append(name)
    if dev_leaves:
        flags = np.asarray(_all_finite(dev_leaves))
        bad.extend(p for p, ok in zip(dev_paths, flags, strict=True) if not ok)
    return bad


def _all_finite(leaves: list[Any]) -> Any:
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415

    global _ALL_FINITE_JIT
    if _ALL_FINITE_JIT is None:
        _ALL_FINITE_JIT = jax.jit(lambda xs: jnp.stack([jnp.all(jnp.isfinite(x)) for x in xs]))
    return _ALL_FINITE_JIT(leaves)


_ALL_FINITE_JIT = None


# ---------------------------------------------------------------------------------------------
# Paths.
# ---------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------
# The manager.
# ---------------------------------------------------------------------------------------------


def _describe(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    if "No space left on device" in text or "os_error_code='28'" in text or getattr(exc, "errno", None) == 28:
        return "disk full (No space left on device). " + text.splitlines()[0][:600]
    return text.splitlines()[0][:600] if text else type(exc).__name__


class _NotDamage(CheckpointError):
    """A restore failure that an older step cannot fix (e.g. another process count)."""


class CheckpointManager:
    """See the module docstring."""

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        save_every: int = 1,
        keep_last: int = 3,
        async_save: bool | None = None,
        read_only: bool = False,
        data_iterator: Any = None,
    ) -> None:
        import grain  # noqa: PLC0415
        import jax  # noqa: PLC0415
        import orbax.checkpoint as ocp  # noqa: PLC0415

        if int(save_every) < 1:
            raise ValueError(f"checkpoint.save_every must be >= 1, got {save_every}")
        if int(keep_last) < 1:
            raise ValueError(f"checkpoint.keep_last must be >= 1, got {keep_last}")
        if data_iterator is not None and not isinstance(data_iterator, grain.DatasetIterator):
            raise TypeError(f"checkpoint: data_iterator must be a grain.DatasetIterator, got {type(data_iterator).__name__}")
        self.directory = Path(directory).absolute()
        self.save_every = int(save_every)
        self.keep_last = int(keep_last)
        self.read_only = bool(read_only)
        self.async_save = jax.default_backend() != "cpu" if async_save is None else bool(async_save)
        self.data_iterator = data_iterator
        self._ocp, self._grain = ocp, grain
        self._pending_step: int | None = None
        self._closed = False
        policies = ocp.checkpoint_managers
        options = ocp.CheckpointManagerOptions(
            save_decision_policy=policies.AnySavePolicy(
                [policies.FixedIntervalPolicy(self.save_every), policies.PreemptionCheckpointingPolicy()]
            ),
            # Orbax deletes old steps only after the new one is complete (in its finalize stage).
            preservation_policy=None if read_only else policies.LatestN(n=self.keep_last),
            enable_async_checkpointing=self.async_save,
            # Partial dirs of a killed run are removed on start. Never by a reader (export running
            # beside a live run must not delete the run's in-progress write).
            cleanup_tmp_directories=not read_only,
            create=not read_only,
            read_only=read_only,
        )
        handlers = {_STATE: ocp.PyTreeCheckpointHandler(), _EXTRAS: ocp.JsonCheckpointHandler(),
                    _DATA: grain.checkpoint.CheckpointHandler()}
        self._orbax = ocp.CheckpointManager(self.directory, item_handlers=handlers, options=options)

    # -- queries ---------------------------------------------------------------------------
    def all_steps(self) -> list[int]:
        return sorted(int(s) for s in self._orbax.all_steps())

    def latest_step(self) -> int | None:
        steps = self.all_steps()
        return steps[-1] if steps else None

    def should_save(self, step: int) -> bool:
        return bool(self._orbax.should_save(int(step)))

    # -- save --------------------------------------------------------------------------------
    def save(self, step: int, state: Any, extras: Mapping[str, Any] | None = None, *, force: bool = False) -> bool:
        """Write ``state``, ``extras`` and the data iterator as checkpoint ``step``; see module docstring."""
        self._check_open()
        step = int(step)
        self.wait()  # surfaces a failed async save of the previous step before starting a new one
        if not force and not self.should_save(step):
            return False
        bad = nonfinite_leaves(state)
        if bad:
            shown = ", ".join(bad[:8]) + (f" (+{len(bad) - 8} more)" if len(bad) > 8 else "")
            raise NonFiniteStateError(
                f"checkpoint: refusing to save step {step}: NaN/inf in state leaves {shown}; "
                f"the last good checkpoint (step {self.latest_step()}) is kept"
            )
        extras = self._agreed_extras(step, dict(extras or {}))
        ocp = self._ocp
        items = {_STATE: ocp.args.PyTreeSave(state), _EXTRAS: ocp.args.JsonSave(extras)}
        if self.data_iterator is not None:
            items[_DATA] = self._grain.checkpoint.CheckpointSave(self.data_iterator)
        try:
            self._orbax.save(step, args=ocp.args.Composite(**items), force=True)
        except Exception as e:  # noqa: BLE001 - every write failure becomes one clear error
            self._recover_from_failed_save(step)
            raise CheckpointSaveError(self._failure_message(step, e)) from e
        if self.async_save:
            self._pending_step = step
        return True

    def _agreed_extras(self, step: int, extras: dict[str, Any]) -> dict[str, Any]:
        # Check locally, then exchange: every process learns whether any process failed, so all
        # raise together instead of some entering orbax's barriers alone (a deadlock).
        try:
            check_json_extras(extras)
            err = None
        except (TypeError, NonFiniteStateError) as e:
            err = (type(e).__name__, str(e))
        gathered = distributed.allgather_object((extras if err is None else None, err))
        for pid, (_, perr) in enumerate(gathered):
            if perr is not None:
                cls = NonFiniteStateError if perr[0] == "NonFiniteStateError" else TypeError
                where = f" (process {pid})" if len(gathered) > 1 else ""
                raise cls(f"{perr[1]}{where}; step {step} not saved")
        for pid, (theirs, _) in enumerate(gathered[1:], start=1):
            if json.dumps(theirs, sort_keys=True) != json.dumps(gathered[0][0], sort_keys=True):
                raise ValueError(
                    f"checkpoint: extras differ between process 0 and process {pid}; step {step} not saved "
                    "(extras are the run's shared state; per-process state goes through data_iterator)"
                )
        return extras

    def _failure_message(self, step: int, exc: BaseException) -> str:
        prev = self.latest_step()
        keep = f"the previous checkpoint (step {prev}) is intact" if prev is not None else "no earlier checkpoint exists"
        return f"checkpoint: saving step {step} to {self.directory} failed: {_describe(exc)}; {keep}"

    def _recover_from_failed_save(self, step: int) -> None:
        """Free the failed write's partial directory and resync orbax's step list with the disk."""
        if distributed.is_main_process():
            suffix = self._ocp.path.atomicity_types.TMP_DIR_SUFFIX
            for p in self.directory.glob(f"{step}{suffix}*"):
                shutil.rmtree(p, ignore_errors=True)
        # orbax forgets the steps it planned to delete (and the failed one) before the outcome is known.
        self._orbax.reload()

    def wait(self) -> None:
        """Block until the pending async save (if any) is complete; raise its failure."""
        step, self._pending_step = self._pending_step, None
        try:
            self._orbax.wait_until_finished()
            if step is not None:
                self._orbax.check_for_errors()
        except Exception as e:  # noqa: BLE001
            self._recover_from_failed_save(step if step is not None else -1)
            raise CheckpointSaveError(self._failure_message(step if step is not None else -1, e)) from e
        if step is not None and not (self.directory / str(step)).is_dir():
            # orbax logs (but does not raise) some finalisation failures: double-check on disk.
            self._recover_from_failed_save(step)
            raise CheckpointSaveError(self._failure_message(step, RuntimeError("step directory was not finalised")))

    # -- restore -----------------------------------------------------------------------------
    def restore(self, step: int | None = None, target: Any = None, *, partial: bool = False) -> Restored:
        """Restore ``state`` (into ``target``'s shardings), the extras and the data iterator.

        ``step=None``: the newest step that restores; newer damaged ones are skipped (warning) and,
        by a writer, moved aside. An explicit ``step`` is restored or fails, without fallback.
        """
        self._check_open()
        self.wait()
        steps = self.all_steps()
        if step is not None:
            if int(step) not in steps:
                raise NoCheckpointError(
                    f"checkpoint: step {step} not found in {self.directory} (complete steps: {steps or 'none'})"
                )
            try:
                return self._restore_step(int(step), target, partial)
            except _NotDamage:
                raise
            except Exception as e:  # noqa: BLE001
                raise self._restore_error(int(step), e) from e
        if not steps:
            raise NoCheckpointError(f"checkpoint: no complete checkpoint in {self.directory}")
        failures: list[tuple[int, BaseException]] = []
        for s in reversed(steps):
            try:
                restored = self._restore_step(s, target, partial)
                err = None
            except _NotDamage:
                raise
            except Exception as e:  # noqa: BLE001 - judged below, with every process's outcome
                restored, err = None, e
            # Every process must pick the same step; a read error on any one of them counts.
            errors = distributed.allgather_object(None if err is None else _describe(err))
            if not any(errors):
                if failures:
                    self._set_aside(failures, s)
                return restored
            failures.append((s, err if err is not None else CheckpointError(next(e for e in errors if e))))
        # Nothing restored: damage everywhere, or (more likely) a target that fits no step.
        first = self._restore_error(failures[0][0], failures[0][1])
        if len(failures) > 1:
            others = "; ".join(f"step {s}: {_describe(e)}" for s, e in failures[1:])
            first = CheckpointError(f"{first} (older steps failed too: {others})")
        raise first from failures[0][1]

    def _restore_error(self, step: int, exc: BaseException) -> CheckpointError:
        return CheckpointError(
            f"checkpoint: restoring step {step} from {self.directory} failed (damaged files, or a target "
            f"whose structure/shapes do not match what was saved): {_describe(exc)}"
        )

    def _set_aside(self, failures: list[tuple[int, BaseException]], good: int) -> None:
        """Warn about each damaged newer step and, as a writer, move it out of the step list."""
        for s, e in failures:
            src = self.directory / str(s)
            if self.read_only:
                log.warning("checkpoint %s is damaged (%s); using step %d instead", src, _describe(e), good)
                continue
            dst = self.directory / f"{DAMAGED_PREFIX}{s}"
            k = 1
            while dst.exists():
                k += 1
                dst = self.directory / f"{DAMAGED_PREFIX}{s}.{k}"
            if distributed.is_main_process():
                os.rename(src, dst)
            log.warning("checkpoint %s is damaged (%s); resuming from step %d, the damaged step moved to %s",
                        src, _describe(e), good, dst)
        distributed.sync("checkpoint-set-aside")
        self._orbax.reload()

    def _restore_step(self, step: int, target: Any, partial: bool) -> Restored:
        ocp = self._ocp
        if target is None:
            tree = self._state_metadata(step)
            state_args = ocp.args.PyTreeRestore(restore_args=_numpy_restore_args(tree))
        else:
            state_args = ocp.args.PyTreeRestore(
                target, restore_args=_target_restore_args(target), partial_restore=partial
            )
        items = {_STATE: state_args, _EXTRAS: ocp.args.JsonRestore()}
        data_state = None
        if self.data_iterator is not None:
            data_state = self._data_state_of_other_topology(step)
            if data_state is None:
                items[_DATA] = self._grain.checkpoint.CheckpointRestore(self.data_iterator)
        out = self._orbax.restore(step, args=ocp.args.Composite(**items))
        extras = out[_EXTRAS]
        if not isinstance(extras, dict):
            raise ValueError(f"extras of step {step} are not a JSON object")
        if data_state is not None:
            self.data_iterator.set_state(data_state)
        return Restored(step=step, state=out[_STATE], extras=extras)

    def _data_state_of_other_topology(self, step: int) -> dict[str, Any] | None:
        """None when grain's handler can restore this process's file; else the state every process
        of another process count saved identically (a resume on another topology)."""
        me, n = distributed.process_index(), distributed.process_count()
        data_dir = self.directory / str(step) / _DATA
        if (data_dir / f"process_{me}-of-{n}.json").is_file():
            return None
        files = sorted(data_dir.glob("process_*-of-*.json"))
        if not files:
            raise FileNotFoundError(f"{data_dir}: no data-iterator state")
        texts = [f.read_text() for f in files]
        if any(t != texts[0] for t in texts):
            raise _NotDamage(
                f"checkpoint: step {step} in {self.directory} was saved by {len(files)} processes with "
                f"different data-iterator states but this run has {n}; resume with {len(files)} processes"
            )
        return json.loads(texts[0])

    def _state_metadata(self, step: int) -> Any:
        md = self._orbax.item_metadata(step)[_STATE]
        return md.tree if hasattr(md, "tree") else md

    # -- lifecycle -----------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise CheckpointError(f"checkpoint: manager for {self.directory} is closed")

    def close(self) -> None:
        """Wait for a pending save (raising its error) and release orbax's threads."""
        if self._closed:
            return
        try:
            self.wait()
        finally:
            self._closed = True
            self._orbax.close()

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _numpy_restore_args(tree: Any) -> Any:
    import jax  # noqa: PLC0415
    import orbax.checkpoint as ocp  # noqa: PLC0415

    return jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)


def _target_restore_args(target: Any) -> Any:
    import jax  # noqa: PLC0415
    import orbax.checkpoint as ocp  # noqa: PLC0415

    def one(x: Any) -> Any:
        if isinstance(x, (jax.Array, jax.ShapeDtypeStruct)) and getattr(x, "sharding", None) is not None:
            return ocp.ArrayRestoreArgs(sharding=x.sharding, global_shape=x.shape, dtype=x.dtype)
        if isinstance(x, (np.ndarray, np.generic, jax.ShapeDtypeStruct)):
            return ocp.RestoreArgs(restore_type=np.ndarray, dtype=x.dtype)
        return ocp.RestoreArgs()

    return jax.tree.map(one, target)


def restore_params_numpy(path: str | os.PathLike[str], key: str = "params") -> tuple[int, Any]:
    """Restore only ``state[key]`` of a checkpoint as host numpy arrays (no mesh, no optimizer).

    ``path`` as in :func:`resolve_checkpoint`; without a step, the newest intact one.
    """
    import jax  # noqa: PLC0415

    ckpt, step = resolve_checkpoint(path)
    with CheckpointManager(ckpt, async_save=False, read_only=True) as mngr:
        probe = mngr.latest_step() if step is None else step
        if probe is None:
            raise NoCheckpointError(f"checkpoint: no complete checkpoint in {ckpt}")
        try:
            tree = mngr._state_metadata(probe)
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
