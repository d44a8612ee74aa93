"""``CheckpointManager``: the run's checkpoints through orbax (save policy, retention, async
writes) and grain's iterator handler; restore with the fallback past damaged steps.

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
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp

from aepo_jax.trainer import distributed
from aepo_jax.trainer.checkpoint.checks import check_json_extras, nonfinite_leaves
from aepo_jax.trainer.checkpoint.errors import (
    CheckpointError,
    CheckpointSaveError,
    NoCheckpointError,
    NonFiniteStateError,
)

log = logging.getLogger(__name__)

DAMAGED_PREFIX = "damaged-"
_STATE = "state"
_EXTRAS = "extras"
_DATA = "data"


@dataclasses.dataclass
class Restored:
    step: int
    state: Any
    extras: dict[str, Any]


def _describe(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    if "No space left on device" in text or "os_error_code='28'" in text or getattr(exc, "errno", None) == 28:
        return "disk full (No space left on device). " + text.splitlines()[0][:600]
    return text.splitlines()[0][:600] if text else type(exc).__name__


class _NotDamage(CheckpointError):
    """A restore failure that an older step cannot fix (e.g. another process count)."""


class CheckpointManager:
    """See the package docstring (:mod:`aepo_jax.trainer.checkpoint`)."""

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
        """Write ``state``, ``extras`` and the data iterator as checkpoint ``step``; see the package docstring."""
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
        items = {_STATE: ocp.args.PyTreeSave(state), _EXTRAS: ocp.args.JsonSave(extras)}
        if self.data_iterator is not None:
            items[_DATA] = grain.checkpoint.CheckpointSave(self.data_iterator)
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
            suffix = ocp.path.atomicity_types.TMP_DIR_SUFFIX
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
        if target is None:
            tree = self.state_metadata(step)
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
                items[_DATA] = grain.checkpoint.CheckpointRestore(self.data_iterator)
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

    def state_metadata(self, step: int) -> Any:
        """The saved state tree's orbax metadata (shapes, dtypes) of ``step``, without reading arrays."""
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
    return jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)


def _target_restore_args(target: Any) -> Any:
    def one(x: Any) -> Any:
        if isinstance(x, (jax.Array, jax.ShapeDtypeStruct)) and getattr(x, "sharding", None) is not None:
            return ocp.ArrayRestoreArgs(sharding=x.sharding, global_shape=x.shape, dtype=x.dtype)
        if isinstance(x, (np.ndarray, np.generic, jax.ShapeDtypeStruct)):
            return ocp.RestoreArgs(restore_type=np.ndarray, dtype=x.dtype)
        return ocp.RestoreArgs()

    return jax.tree.map(one, target)
