"""The checkpoint error types: what the trainer reports and stops on."""

from __future__ import annotations


class CheckpointError(RuntimeError):
    """Base class for checkpoint failures the trainer should report and stop on."""


class CheckpointSaveError(CheckpointError):
    """Writing a checkpoint failed; the previous checkpoint is still complete."""


class NonFiniteStateError(CheckpointError, ValueError):
    """The state to save contains NaN/inf; nothing was written."""


class NoCheckpointError(CheckpointError, FileNotFoundError):
    """No (complete) checkpoint exists where one was asked for."""
