"""Per-step metrics: RUN_DIR/metrics.jsonl, TensorBoard, W&B (optional) and a console bar.

API
---
``MetricsLogger(run_dir, *, use_tensorboard=True, wandb=None, console=True, is_main_process=True,
resume_step=None, total_steps=None, console_keys=CONSOLE_KEYS)``
    ``resume_step``: the step of the checkpoint the run restored (None: fresh start). Lines of
    ``metrics.jsonl`` with a step after it (and a torn last line from a killed run) are moved to
    ``metrics.dropped.jsonl``, so the file never holds duplicate or orphan steps; TensorBoard
    events after it are purged the same way (``purge_step``). ``wandb``: keyword arguments for
    ``wandb.init`` (e.g. ``{"project": "aepo", "name": "run1"}``); None = off.
    Only the main process writes anything; elsewhere ``log`` just returns the record.
``logger.log(step, metrics) -> dict``
    One JSON object per call appended to ``metrics.jsonl`` (flushed and fsync'ed: a killed run
    keeps every line it logged), ``step`` first. Values: Python/numpy/jax scalars (or size-1
    arrays), bools, strings, None. NaN/inf become ``null`` in JSON and are named in a
    ``RuntimeWarning``. Steps must increase (a repeated or earlier step raises ValueError).
``logger.close()`` (or use it as a context manager).
``Timer(stage, into=None)``: ``with Timer("rollout", metrics): ...`` adds the elapsed seconds to
    ``metrics["timing_s/rollout"]`` (accumulating if the stage runs several times in a step);
    ``.seconds`` holds the last duration. jax dispatch is asynchronous: call
    ``jax.block_until_ready`` on a stage's outputs inside the block to time the work itself.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

METRICS_FILE = "metrics.jsonl"
DROPPED_FILE = "metrics.dropped.jsonl"
TENSORBOARD_SUBDIR = "tensorboard"
# (metric key, short console label): the figures the progress bar shows when present.
CONSOLE_KEYS: tuple[tuple[str, str], ...] = (
    ("entropy", "H"),
    ("entropy_target", "H*"),
    ("temperature", "T"),
    ("reward_mean", "R"),
)


def to_json_value(key: str, value: Any, step: int | None = None) -> tuple[Any, bool]:
    """Convert one metric value to a JSON value; returns ``(value, was_non_finite)``.

    Raises TypeError naming the key (and step) for values that are not scalars.
    """
    v = value
    if hasattr(v, "shape") and hasattr(v, "dtype") and not isinstance(v, (np.generic,)):
        # jax / numpy arrays: only single-element arrays are metrics.
        if int(np.prod(v.shape)) != 1:
            raise TypeError(f"metrics: {key!r} at step {step} is an array of shape {tuple(v.shape)}; log a scalar")
        v = np.asarray(v).reshape(()).item()
    elif isinstance(v, np.generic):
        v = v.item()
    if v is None or isinstance(v, (bool, str)):
        return v, False
    if isinstance(v, int):
        return int(v), False
    if isinstance(v, float):
        return (v, False) if math.isfinite(v) else (None, True)
    raise TypeError(f"metrics: {key!r} at step {step} has type {type(value).__name__}; expected a number")


def _read_lines(path: Path) -> list[str]:
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read().split("\n")


def split_for_resume(lines: list[str], resume_step: int | None) -> tuple[list[str], list[str]]:
    """Partition raw ``metrics.jsonl`` lines into (kept, dropped) for a run resuming at ``resume_step``.

    Kept: well-formed objects with an integer ``step`` <= resume_step, strictly increasing (the
    first occurrence wins). Everything else (later steps, torn or foreign lines) is dropped.
    """
    kept: list[str] = []
    dropped: list[str] = []
    last = -math.inf
    for raw in lines:
        if not raw.strip():
            continue
        try:
            rec = json.loads(raw)
            step = rec["step"] if isinstance(rec, dict) else None
        except (json.JSONDecodeError, KeyError):
            step = None
        ok = (
            isinstance(step, int)
            and not isinstance(step, bool)
            and resume_step is not None
            and step <= resume_step
            and step > last
        )
        if ok:
            kept.append(raw)
            last = step
        else:
            dropped.append(raw)
    return kept, dropped


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - some filesystems do not allow opening directories
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class MetricsLogger:
    """See the module docstring."""

    def __init__(
        self,
        run_dir: str | os.PathLike[str],
        *,
        use_tensorboard: bool = True,
        wandb: Mapping[str, Any] | None = None,
        console: bool = True,
        is_main_process: bool = True,
        resume_step: int | None = None,
        total_steps: int | None = None,
        console_keys: tuple[tuple[str, str], ...] = CONSOLE_KEYS,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / METRICS_FILE
        self.is_main_process = bool(is_main_process)
        self.console_keys = tuple(console_keys)
        self._last_step: int | None = resume_step
        self._file: Any = None
        self._tb: Any = None
        self._wandb: Any = None
        self._bar: Any = None
        self._closed = False
        if not self.is_main_process:
            return
        if wandb is not None:
            self._wandb = _start_wandb(dict(wandb))  # fail before touching any file
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._truncate_for_resume(resume_step)
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        if use_tensorboard:
            from tensorboardX import SummaryWriter  # noqa: PLC0415

            purge = 0 if resume_step is None else resume_step + 1  # fresh start: every old event, like the lines
            # The suffix keeps a restart within the same second from overwriting the previous
            # event file (tensorboardX names files by whole seconds) and sorts files by creation.
            self._tb = SummaryWriter(
                logdir=str(self.run_dir / TENSORBOARD_SUBDIR),
                purge_step=purge,
                flush_secs=10,
                filename_suffix=f".{time.time_ns()}",
            )
        if console:
            from tqdm.auto import tqdm  # noqa: PLC0415

            self._bar = tqdm(total=total_steps, initial=resume_step or 0, unit="step", dynamic_ncols=True)

    # -- resume ------------------------------------------------------------------------------
    def _truncate_for_resume(self, resume_step: int | None) -> None:
        if not self.path.exists():
            return
        kept, dropped = split_for_resume(_read_lines(self.path), resume_step)
        if not dropped:
            return
        with open(self.run_dir / DROPPED_FILE, "a", encoding="utf-8") as f:
            f.write("".join(line + "\n" for line in dropped))
            f.flush()
            os.fsync(f.fileno())
        tmp = self.path.with_suffix(".jsonl.tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            f.write("".join(line + "\n" for line in kept))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)  # atomic: a crash here leaves the old or the new file, whole
        _fsync_dir(self.run_dir)
        where = f"after step {resume_step}" if resume_step is not None else "(fresh start, no checkpoint)"
        warnings.warn(
            f"metrics: moved {len(dropped)} line(s) of {self.path} {where} to {DROPPED_FILE}",
            RuntimeWarning,
            stacklevel=3,
        )

    # -- logging -------------------------------------------------------------------------------
    def log(self, step: int, metrics: Mapping[str, Any]) -> dict[str, Any]:
        """Record ``metrics`` for ``step`` everywhere configured; returns the JSON record."""
        if self._closed:
            raise RuntimeError(f"metrics: logger for {self.run_dir} is closed")
        if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or int(step) < 0:
            raise ValueError(f"metrics: step must be a non-negative int, got {step!r}")
        step = int(step)
        if self._last_step is not None and step <= self._last_step:
            raise ValueError(
                f"metrics: step {step} logged after step {self._last_step}; steps must increase "
                "(a resumed run must pass resume_step=<restored checkpoint step>)"
            )
        record: dict[str, Any] = {"step": step}
        nonfinite: list[str] = []
        for key, value in metrics.items():
            if not isinstance(key, str):
                raise TypeError(f"metrics: key {key!r} at step {step} is not a string")
            v, bad = to_json_value(key, value, step)
            if key == "step":
                if v != step:
                    raise ValueError(f"metrics: metrics['step']={v!r} disagrees with step={step}")
                continue
            record[key] = v
            if bad:
                nonfinite.append(key)
        line = json.dumps(record, allow_nan=False, ensure_ascii=False)
        if nonfinite and self.is_main_process:
            warnings.warn(
                f"metrics: non-finite value(s) at step {step} logged as null: {', '.join(nonfinite)}",
                RuntimeWarning,
                stacklevel=2,
            )
        self._last_step = step
        if not self.is_main_process:
            return record
        self._file.write(line + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())
        if self._tb is not None:
            for key, v in record.items():
                if key != "step" and isinstance(v, (int, float)):  # bools are ints: logged as 0/1
                    self._tb.add_scalar(key, float(v), global_step=step)
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in record.items() if k != "step" and v is not None}, step=step)
        if self._bar is not None:
            self._bar.set_postfix_str(self.console_summary(record), refresh=False)
            self._bar.update(step - self._bar.n)
        return record

    def message(self, text: str) -> None:
        """A line of text on stdout (above the progress bar), main process with console on only."""
        if not text or not self.is_main_process or self._bar is None:
            return
        from tqdm.auto import tqdm  # noqa: PLC0415

        tqdm.write(text, file=sys.stdout)

    def console_summary(self, record: Mapping[str, Any]) -> str:
        """The progress bar's text, e.g. ``H=0.512 H*=0.600 T=1.050 R=0.310``."""
        parts = []
        for key, label in self.console_keys:
            v = record.get(key)
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                parts.append(f"{label}={v:.3f}")
        return " ".join(parts)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()
        if self._file is not None:
            self._file.close()
        if self._wandb is not None:
            self._wandb.finish()

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _start_wandb(kwargs: dict[str, Any]) -> Any:
    try:
        import wandb  # noqa: PLC0415
    except ImportError as e:
        raise ImportError(
            f"metrics: W&B logging is configured (wandb={kwargs}) but the 'wandb' package is not "
            "installed; `pip install wandb` (or `pip install aepo-jax[wandb]`), or remove the wandb setting"
        ) from e
    return wandb.init(**kwargs)


class Timer:
    """``with Timer("rollout", metrics):`` adds elapsed seconds to ``metrics["timing_s/rollout"]``."""

    def __init__(self, stage: str, into: dict[str, Any] | None = None) -> None:
        self.stage = stage
        self.key = f"timing_s/{stage}"
        self.into = into
        self.seconds = 0.0
        self._t0 = 0.0

    def __enter__(self) -> Timer:
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.seconds = time.perf_counter() - self._t0
        if self.into is not None:
            self.into[self.key] = self.into.get(self.key, 0.0) + self.seconds
