"""Checkpoints of the RL run: orbax-checkpoint underneath, atomic, resumable, collective.

API
---
``CheckpointManager(directory, *, save_every=1, keep_last=3, async_save=None, read_only=False)``
    ``directory`` is usually ``RUN_DIR/checkpoints`` (see :func:`checkpoint_dir`); created if
    missing, and existing checkpoints there are picked up (the run directory resumes by default).
    ``async_save=None`` means async on GPU/TPU (the write overlaps the next step) and sync on CPU.
    Use it as a context manager (or call ``close()``): exit waits for an async save to finish.

``mgr.should_save(step) -> bool``        step % save_every == 0 (or a preemption notice), not saved yet
``mgr.save(step, state, extras=None, *, force=False) -> bool``
    ``state``: a pytree of (possibly sharded) ``jax.Array`` / numpy arrays / scalars, e.g.
    ``{"params": ..., "opt_state": ..., "rng": key}``. Keep params under the top-level key
    ``"params"``: ``tools/export_hf.py`` reads exactly that subtree.
    ``extras``: this process's JSON-able side state: data-iterator state (bytes or dict),
    controller state (dict), numpy RNG state, numpy arrays, jax key arrays. Values round-trip
    exactly (bytes and arrays are base64-tagged); tuples come back as lists.
    Returns False when the step is not due (unless ``force``). Raises :class:`NonFiniteStateError`
    (nothing written) if any float leaf of ``state`` or any float in ``extras`` is NaN/inf,
    :class:`CheckpointSaveError` if writing fails (for async saves: at the next ``save`` /
    ``wait`` / ``close``); the previous checkpoint stays complete and loadable either way.
    Collective: with several processes every process calls ``save`` with the same step.
``mgr.wait()``                           block until an async save is on disk (raises its error)
``mgr.latest_step() -> int | None``, ``mgr.all_steps() -> list[int]``
``mgr.restore(step=None, target=None, *, partial=False) -> Restored(step, state, extras)``
    ``step=None`` = latest. ``target``: pytree like ``state`` whose leaves are ``jax.Array`` or
    ``jax.ShapeDtypeStruct`` (with ``.sharding``), restored straight into those shardings, or
    numpy arrays (restored on host). ``partial=True`` restores only the keys present in
    ``target`` (e.g. ``{"params": abstract_params}``). ``target=None`` restores every leaf as a
    host numpy array (topology-independent; used by export). ``extras`` is this process's dict.
``restore_params_numpy(ckpt_path) -> (step, params)``: params subtree as numpy, no mesh needed.
``resolve_checkpoint(path) -> (checkpoint_dir, step | None)``: accepts ``RUN_DIR``,
    ``RUN_DIR/<step>``, ``RUN_DIR/checkpoints`` or ``RUN_DIR/checkpoints/<step>``.

Guarantees (tested in tests/test_checkpoint.py): a step directory appears only when complete
(orbax writes ``<step>.orbax-checkpoint-tmp`` and renames it at the end), so SIGKILL at any moment
leaves the previous or the new checkpoint as latest, never a partial one; old checkpoints are
deleted only after the new one is complete (async: at the next ``save``/``wait``/``close``, so
``keep_last + 1`` may briefly exist), and vanish atomically (renamed before the recursive delete);
a failed write (e.g. disk full) removes its partial directory and keeps the previous checkpoint.
"""

from __future__ import annotations

import atexit
import base64
import dataclasses
import logging
import math
import os
import re
import shutil
import threading
import weakref
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from aepo_jax.trainer import distributed

log = logging.getLogger(__name__)

CHECKPOINT_SUBDIR = "checkpoints"
_TMP_SUFFIX = ".orbax-checkpoint-tmp"  # orbax's in-progress marker (atomicity_types.TMP_DIR_SUFFIX)
_STATE = "state"
_EXTRAS = "extras"
_EXTRAS_FORMAT = 1


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
# Extras: exact JSON encoding of the loop's side state.
# ---------------------------------------------------------------------------------------------

_TAGS = ("__bytes__", "__ndarray__", "__jax_key__")


def _encode_array(a: np.ndarray) -> dict[str, Any]:
    a = np.ascontiguousarray(a)
    return {"__ndarray__": base64.b64encode(a.tobytes()).decode("ascii"), "dtype": a.dtype.str, "shape": list(a.shape)}


def _decode_array(d: Mapping[str, Any]) -> np.ndarray:
    raw = base64.b64decode(d["__ndarray__"])
    return np.frombuffer(raw, dtype=np.dtype(d["dtype"])).reshape(d["shape"]).copy()


def _check_finite_array(a: np.ndarray, where: str) -> None:
    if np.issubdtype(a.dtype, np.inexact) and not np.all(np.isfinite(a)):
        raise NonFiniteStateError(f"checkpoint: extras{where} contains NaN/inf; refusing to save it")


def encode_extras(obj: Any, where: str = "") -> Any:
    """Encode ``obj`` into plain JSON values, exactly and reversibly (see :func:`decode_extras`).

    Raises ``TypeError`` naming the path of an unsupported value and :class:`NonFiniteStateError`
    for NaN/inf floats (a controller state with a NaN temperature must never become a checkpoint).
    """
    import jax  # noqa: PLC0415

    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, (int, np.integer)) and not isinstance(obj, np.bool_):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, (float, np.floating)):
        if not math.isfinite(float(obj)):
            raise NonFiniteStateError(f"checkpoint: extras{where} = {float(obj)}; refusing to save a NaN/inf value")
        return float(obj)
    if isinstance(obj, (bytes, bytearray, memoryview)):
        return {"__bytes__": base64.b64encode(bytes(obj)).decode("ascii")}
    if isinstance(obj, jax.Array):
        if jax.dtypes.issubdtype(obj.dtype, jax.dtypes.prng_key):
            impl = str(jax.random.key_impl(obj))
            return {"__jax_key__": impl, "data": _encode_array(np.asarray(jax.random.key_data(obj)))}
        obj = np.asarray(obj)
    if isinstance(obj, np.ndarray):
        _check_finite_array(obj, where)
        if obj.dtype == object:
            raise TypeError(f"checkpoint: extras{where} is an object array; only numeric arrays are supported")
        return _encode_array(obj)
    if isinstance(obj, Mapping):
        out = {}
        for k, v in obj.items():
            if not isinstance(k, str):
                raise TypeError(f"checkpoint: extras{where} has a non-string key {k!r}; JSON keys must be strings")
            if k in _TAGS:
                raise TypeError(f"checkpoint: extras{where} uses the reserved key {k!r}")
            out[k] = encode_extras(v, f"{where}[{k!r}]")
        return out
    if isinstance(obj, (list, tuple)):
        return [encode_extras(v, f"{where}[{i}]") for i, v in enumerate(obj)]
    raise TypeError(
        f"checkpoint: extras{where} has unsupported type {type(obj).__name__}; use JSON values, bytes, "
        "numpy arrays or jax key arrays (put large arrays into the state pytree instead)"
    )


def decode_extras(obj: Any) -> Any:
    """Inverse of :func:`encode_extras` (jax non-key arrays come back as numpy arrays)."""
    if isinstance(obj, list):
        return [decode_extras(v) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__bytes__" in obj:
        return base64.b64decode(obj["__bytes__"])
    if "__ndarray__" in obj:
        return _decode_array(obj)
    if "__jax_key__" in obj:
        import jax  # noqa: PLC0415

        return jax.random.wrap_key_data(_decode_array(obj["data"]), impl=obj["__jax_key__"])
    return {k: decode_extras(v) for k, v in obj.items()}


# ---------------------------------------------------------------------------------------------
# NaN/inf guard for the state pytree.
# ---------------------------------------------------------------------------------------------


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
    ) -> None:
        import jax  # noqa: PLC0415
        import orbax.checkpoint as ocp  # noqa: PLC0415

        if int(save_every) < 1:
            raise ValueError(f"checkpoint.save_every must be >= 1, got {save_every}")
        if int(keep_last) < 1:
            raise ValueError(f"checkpoint.keep_last must be >= 1, got {keep_last}")
        self.directory = Path(directory).absolute()
        self.save_every = int(save_every)
        self.keep_last = int(keep_last)
        self.async_save = jax.default_backend() != "cpu" if async_save is None else bool(async_save)
        self._ocp = ocp
        self._pending_step: int | None = None
        self._closed = False
        options = ocp.CheckpointManagerOptions(
            # Retention is ours (_apply_retention): orbax rmtree()s old steps in place, so a kill
            # mid-delete would leave a half-deleted step listed as a checkpoint.
            max_to_keep=None,
            enable_async_checkpointing=self.async_save,
            # Partial dirs of a killed run are removed on start. Never by a reader (export running
            # beside a live run must not delete the run's in-progress write).
            cleanup_tmp_directories=not read_only,
            create=not read_only,
            read_only=read_only,
        )
        self._mngr = ocp.CheckpointManager(
            self.directory,
            item_handlers={_STATE: ocp.PyTreeCheckpointHandler(), _EXTRAS: ocp.JsonCheckpointHandler()},
            options=options,
        )
        # A loop that exits without close() must not lose an async save that is still writing.
        # Plain atexit runs after concurrent.futures has stopped accepting work (orbax needs it to
        # finish the write), so prefer threading's earlier exit hook, as concurrent.futures does.
        register = getattr(threading, "_register_atexit", atexit.register)
        register(_close_at_exit, weakref.ref(self))

    # -- queries ---------------------------------------------------------------------------
    def all_steps(self) -> list[int]:
        return sorted(int(s) for s in self._mngr.all_steps())

    def latest_step(self) -> int | None:
        steps = self.all_steps()
        return steps[-1] if steps else None

    def should_save(self, step: int) -> bool:
        if step in self.all_steps():
            return False
        return step % self.save_every == 0 or bool(self._mngr.reached_preemption(step))

    # -- save --------------------------------------------------------------------------------
    def save(self, step: int, state: Any, extras: Mapping[str, Any] | None = None, *, force: bool = False) -> bool:
        """Write ``state`` and this process's ``extras`` as checkpoint ``step``; see module docstring."""
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
        extras_doc = self._gather_extras(step, extras)
        ocp = self._ocp
        args = ocp.args.Composite(
            **{_STATE: ocp.args.PyTreeSave(state), _EXTRAS: ocp.args.JsonSave(extras_doc)}
        )
        try:
            self._mngr.save(step, args=args, force=True)
        except Exception as e:  # noqa: BLE001 - every write failure becomes one clear error
            self._recover_from_failed_save(step)
            raise CheckpointSaveError(self._failure_message(step, e)) from e
        if self.async_save:
            self._pending_step = step
        else:
            self._apply_retention()
        return True

    def _apply_retention(self) -> None:
        """Delete all but the newest ``keep_last`` complete steps; only after a save is complete.

        Each old step is first renamed to an orbax temporary name (atomic), so it disappears from
        the step list whole even if the process dies during the slow recursive delete; a leftover
        is removed by the next writer's start-up clean-up.
        """
        old = self.all_steps()[: -self.keep_last]
        if not old:
            return
        if distributed.is_main_process():
            for s in old:
                src = self.directory / str(s)
                dst = self.directory / f"{s}{_TMP_SUFFIX}-deleting"
                try:
                    os.rename(src, dst)
                except FileNotFoundError:
                    continue
                shutil.rmtree(dst, ignore_errors=True)
        self._mngr.reload()

    def _gather_extras(self, step: int, extras: Mapping[str, Any] | None) -> dict[str, Any]:
        # Encode locally, then exchange: every process learns whether any process failed, so all
        # raise together instead of some entering orbax's barriers alone (a deadlock).
        try:
            mine: Any = encode_extras(dict(extras or {}))
            err = None
        except (TypeError, NonFiniteStateError) as e:
            mine, err = None, (type(e).__name__, str(e))
        gathered = distributed.allgather_object((mine, err))
        for pid, (_, perr) in enumerate(gathered):
            if perr is not None:
                cls = NonFiniteStateError if perr[0] == "NonFiniteStateError" else TypeError
                where = f" (process {pid})" if len(gathered) > 1 else ""
                raise cls(f"{perr[1]}{where}; step {step} not saved")
        return {"format": _EXTRAS_FORMAT, "num_processes": len(gathered), "per_process": [g[0] for g in gathered]}

    def _failure_message(self, step: int, exc: BaseException) -> str:
        prev = self.latest_step()
        keep = f"the previous checkpoint (step {prev}) is intact" if prev is not None else "no earlier checkpoint exists"
        return f"checkpoint: saving step {step} to {self.directory} failed: {_describe(exc)}; {keep}"

    def _recover_from_failed_save(self, step: int) -> None:
        """Free the failed write's partial directory and resync orbax's step list with the disk."""
        if distributed.is_main_process():
            for p in self.directory.glob(f"{step}{_TMP_SUFFIX}*"):
                shutil.rmtree(p, ignore_errors=True)
        # orbax forgets steps it planned to delete (and the failed one) before knowing the outcome.
        self._mngr.reload()

    def wait(self) -> None:
        """Block until the pending async save (if any) is complete; raise its failure."""
        step, self._pending_step = self._pending_step, None
        try:
            self._mngr.wait_until_finished()
            if step is not None:
                self._mngr.check_for_errors()
        except Exception as e:  # noqa: BLE001
            self._recover_from_failed_save(step if step is not None else -1)
            raise CheckpointSaveError(self._failure_message(step if step is not None else -1, e)) from e
        if step is not None and not (self.directory / str(step)).is_dir():
            # orbax logs (but does not raise) some finalisation failures: double-check on disk.
            self._recover_from_failed_save(step)
            raise CheckpointSaveError(self._failure_message(step, RuntimeError("step directory was not finalised")))
        if step is not None:
            self._apply_retention()

    # -- restore -----------------------------------------------------------------------------
    def restore(self, step: int | None = None, target: Any = None, *, partial: bool = False) -> Restored:
        """Restore ``state`` (into ``target``'s shardings) and this process's extras."""
        self._check_open()
        self.wait()
        ocp = self._ocp
        steps = self.all_steps()
        if step is None:
            if not steps:
                raise NoCheckpointError(f"checkpoint: no complete checkpoint in {self.directory}")
            step = steps[-1]
        elif int(step) not in steps:
            raise NoCheckpointError(
                f"checkpoint: step {step} not found in {self.directory} (complete steps: {steps or 'none'})"
            )
        step = int(step)
        if target is None:
            tree = self._state_metadata(step)
            restore_args = _numpy_restore_args(tree)
            state_args = ocp.args.PyTreeRestore(restore_args=restore_args)
        else:
            state_args = ocp.args.PyTreeRestore(
                target, restore_args=_target_restore_args(target), partial_restore=partial
            )
        try:
            out = self._mngr.restore(
                step, args=ocp.args.Composite(**{_STATE: state_args, _EXTRAS: ocp.args.JsonRestore()})
            )
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(
                f"checkpoint: restoring step {step} from {self.directory} into the given target failed "
                f"(does the target's structure/shapes match what was saved?): {_describe(e)}"
            ) from e
        return Restored(step=step, state=out[_STATE], extras=self._my_extras(step, out[_EXTRAS]))

    def _state_metadata(self, step: int) -> Any:
        md = self._mngr.item_metadata(step)[_STATE]
        return md.tree if hasattr(md, "tree") else md

    def _my_extras(self, step: int, doc: Any) -> dict[str, Any]:
        if not isinstance(doc, dict) or doc.get("format") != _EXTRAS_FORMAT:
            raise CheckpointError(f"checkpoint: step {step} in {self.directory} has an unknown extras format")
        per = doc["per_process"]
        me, n = distributed.process_index(), distributed.process_count()
        if len(per) != n:
            if all(p == per[0] for p in per):  # identical everywhere: any process count may resume
                return decode_extras(per[0])
            raise CheckpointError(
                f"checkpoint: step {step} was saved by {len(per)} processes with per-process extras "
                f"(data-iterator state) but this run has {n}; resume with {len(per)} processes"
            )
        return decode_extras(per[me])

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
            self._mngr.close()

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _close_at_exit(ref: weakref.ref[CheckpointManager]) -> None:
    mngr = ref()
    if mngr is None or mngr._closed:
        return
    try:
        mngr.close()
    except Exception as e:  # noqa: BLE001 - at exit, report instead of raising into atexit
        log.error("%s", e)


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
        if isinstance(x, (np.ndarray, np.generic)):
            return ocp.RestoreArgs(restore_type=np.ndarray, dtype=x.dtype)
        return ocp.RestoreArgs()

    return jax.tree.map(one, target)


def restore_params_numpy(path: str | os.PathLike[str], key: str = "params") -> tuple[int, Any]:
    """Restore only ``state[key]`` of a checkpoint as host numpy arrays (no mesh, no optimizer)."""
    import orbax.checkpoint as ocp  # noqa: PLC0415

    ckpt, step = resolve_checkpoint(path)
    mngr = CheckpointManager(ckpt, async_save=False, read_only=True)
    try:
        step = mngr.latest_step() if step is None else step
        if step is None:
            raise NoCheckpointError(f"checkpoint: no complete checkpoint in {ckpt}")
        tree = mngr._state_metadata(step)
        if not isinstance(tree, Mapping) or key not in tree:
            have = list(tree.keys()) if isinstance(tree, Mapping) else type(tree).__name__
            raise CheckpointError(f"checkpoint: {ckpt}/{step} has no top-level state key {key!r} (has {have})")
        sub = {key: tree[key]}
        args = ocp.args.PyTreeRestore(item=sub, restore_args=_numpy_restore_args(sub), partial_restore=True)
        out = mngr._mngr.restore(step, args=ocp.args.Composite(**{_STATE: args}))
        return step, out[_STATE][key]
    finally:
        mngr.close()
