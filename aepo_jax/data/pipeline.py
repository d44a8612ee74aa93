"""The prompt stream of a run: a grain pipeline with a checkpointable position.

Step ``s`` of the stream is computed from ``s`` alone (grain ``MapDataset`` over step indices)::

    epoch = s // steps_per_epoch                 permutation_e = Philox(seed, epoch).permutation(N)
    global batch s = permutation_e[j*B : (j+1)*B] with j = s % steps_per_epoch
    this process's rows = global batch s [p*B/P : (p+1)*B/P]

* Each epoch is a fresh seeded permutation and never crosses into the next one: a step's prompts
  all come from one epoch, and the remainder (``N mod B`` prompts) is dropped for that epoch.
  (The permutation is numpy's, one per epoch and cached: grain's own lazy shuffle evaluates a
  Feistel network per element, milliseconds per prompt on CPU, which a 512-prompt step would feel.)
* Sharding per JAX process happens *after* batching: process ``p`` of ``P`` takes rows
  ``[p*B/P, (p+1)*B/P)`` of every global batch. So the union over processes of step ``s`` is the
  same global batch whatever ``P`` is, and a run can resume on a different number of hosts.
* :meth:`PromptPipeline.get_state` is a small JSON-able dict (grain's position plus a fingerprint
  of the data and settings). :meth:`set_state` puts a new pipeline exactly there, so a resumed run
  continues with the next batch, mid-epoch or at an epoch boundary (verl PR #5725 was a run that
  resumed at an epoch boundary and silently trained zero steps). A fingerprint mismatch (other
  data, seed or batch size) is an error, not a silent reshuffle.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import grain
import numpy as np

from aepo_jax.data.prompts import Example

STATE_VERSION = 1
_FOREVER_EPOCHS = 1 << 20  # "repeat forever": a million epochs, far beyond any run


@dataclass
class PipelineConfig:
    batch_size: int  # prompts per step, over all processes (the paper's 512)
    seed: int = 0
    shuffle: bool = True
    num_epochs: int | None = None  # None = repeat forever
    process_index: int | None = None  # None = jax.process_index()
    process_count: int | None = None  # None = jax.process_count()


def _jax_process() -> tuple[int, int]:
    import jax  # noqa: PLC0415 - only when the caller did not say

    return jax.process_index(), jax.process_count()


def fingerprint(examples: Sequence[Example], cfg: PipelineConfig) -> str:
    """Hash of what determines the stream (data identity and order-relevant settings)."""
    h = hashlib.sha256()
    h.update(f"{len(examples)}|{cfg.batch_size}|{cfg.seed}|{cfg.shuffle}|{cfg.num_epochs}".encode())
    for ex in examples:
        h.update(ex.uid.encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


class PromptPipeline(grain.DatasetIterator):
    """Iterator over this process's share of each step's prompts: ``list[Example]`` per step.

    A ``grain.DatasetIterator``, so grain's orbax handler checkpoints it (``get_state``/``set_state``).
    """

    def __init__(self, examples: Sequence[Example], cfg: PipelineConfig):
        # grain's __del__ calls close(), which reads _closed: set it before a check below can raise,
        # so a refused pipeline is not reported again as an AttributeError at garbage collection.
        self._closed = True
        if cfg.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {cfg.batch_size}")
        if len(examples) < cfg.batch_size:
            raise ValueError(
                f"dataset has {len(examples)} prompts, fewer than one batch of {cfg.batch_size} "
                "(after dropping over-long prompts)"
            )
        pi, pc = (cfg.process_index, cfg.process_count)
        if pi is None or pc is None:
            jpi, jpc = _jax_process()
            pi = jpi if pi is None else pi
            pc = jpc if pc is None else pc
        if not 0 <= pi < pc:
            raise ValueError(f"process_index {pi} out of range for process_count {pc}")
        if cfg.batch_size % pc:
            raise ValueError(f"batch_size {cfg.batch_size} is not divisible by the {pc} JAX processes")
        self.cfg = cfg
        self.process_index, self.process_count = pi, pc
        self.local_batch_size = cfg.batch_size // pc
        self.steps_per_epoch = len(examples) // cfg.batch_size
        self._fingerprint = fingerprint(examples, cfg)

        self._examples = list(examples)
        n_steps = (cfg.num_epochs if cfg.num_epochs is not None else _FOREVER_EPOCHS) * self.steps_per_epoch
        ds = grain.MapDataset.range(n_steps).map(self._local_batch)
        # Batches are built from in-memory lists: no reader threads needed (and none to restart on
        # set_state, which with grain's default of 16 threads costs about a second).
        self._dataset = ds
        self._read_options = grain.ReadOptions(num_threads=1, prefetch_buffer_size=1)
        self._iter = iter(ds.to_iter_dataset(read_options=self._read_options))
        super().__init__(self._iter)

    @functools.lru_cache(maxsize=2)  # noqa: B019 - one pipeline per run; the current and next epoch
    def _permutation(self, epoch: int) -> np.ndarray:
        n = len(self._examples)
        if not self.cfg.shuffle:
            return np.arange(n)
        return np.random.Generator(np.random.Philox(key=[self.cfg.seed, epoch])).permutation(n)

    def _local_batch(self, step: int) -> list[Example]:
        epoch, j = divmod(int(step), self.steps_per_epoch)
        rows = self._permutation(epoch)[j * self.cfg.batch_size : (j + 1) * self.cfg.batch_size]
        lo = self.process_index * self.local_batch_size
        return [self._examples[i] for i in rows[lo : lo + self.local_batch_size]]

    # -- iteration --------------------------------------------------------------------------------

    def __iter__(self) -> Iterator[list[Example]]:
        return self

    def __next__(self) -> list[Example]:
        return next(self._iter)

    @property
    def next_step(self) -> int:
        """Index (from 0) of the batch the next ``next()`` returns."""
        return int(self._iter.get_state()["next_index"])

    @property
    def epoch(self) -> int:
        """Epoch (from 0) of the next batch."""
        return self.next_step // self.steps_per_epoch

    @property
    def total_steps(self) -> int | None:
        return None if self.cfg.num_epochs is None else self.cfg.num_epochs * self.steps_per_epoch

    # -- checkpointing ----------------------------------------------------------------------------

    def get_state(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, "grain": dict(self._iter.get_state()), "fingerprint": self._fingerprint}

    def set_state(self, state: dict[str, Any]) -> None:
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION or "grain" not in state:
            raise ValueError(f"pipeline state: not a version-{STATE_VERSION} pipeline state: {state!r}")
        if state.get("fingerprint") != self._fingerprint:
            raise ValueError(
                "pipeline state: the checkpoint was written for different data or settings "
                f"(fingerprint {state.get('fingerprint')!r}, this pipeline {self._fingerprint!r}); "
                "resume with the same files, seed, shuffle, epochs and batch size"
            )
        self._iter.set_state(dict(state["grain"]))
