"""Batching for the embedded server: one queue, one worker, one sampler call at a time.

Every ``/generate`` call puts its sequences on the queue; the worker takes everything queued
(after waiting ``batch_wait_ms`` for concurrent arrivals), runs it as one sampler call in a worker
thread, and resolves each sequence's future. The sequences of one HTTP request always travel in
one sampler call, and a sampler call reads the weights once, so no response mixes weights. Like
SGLang, a weight update takes the write side of ``lock`` (it waits for in-flight ``/generate``
calls, which hold the read side, and new calls wait for it).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

log = logging.getLogger("aepo_jax.rollout.server")


class RWLock:
    """asyncio readers-writer lock with writer preference (SGLang's model update lock)."""

    def __init__(self):
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0
        self._cond = asyncio.Condition()

    async def acquire_read(self):
        async with self._cond:
            await self._cond.wait_for(lambda: not self._writer and self._writers_waiting == 0)
            self._readers += 1

    async def release_read(self):
        async with self._cond:
            self._readers -= 1
            self._cond.notify_all()

    async def acquire_write(self):
        async with self._cond:
            self._writers_waiting += 1
            try:
                await self._cond.wait_for(lambda: not self._writer and self._readers == 0)
            finally:
                self._writers_waiting -= 1
            self._writer = True

    async def release_write(self):
        async with self._cond:
            self._writer = False
            self._cond.notify_all()


@dataclass(eq=False)
class Pending:
    """One sequence between its HTTP request and its sampler result."""

    item: Any  # protocol.GenerateItem
    request: Any  # sampler.SamplingRequest
    future: asyncio.Future  # -> (SampleResult, weight_version), or None when aborted
    t0: float
    aborted: bool = False
    running: bool = False


class BatchScheduler:
    """The queue, the worker that drains it into sampler calls, abort, and the update lock.

    ``run_batch(requests, cancelled) -> (results, weight_version)`` is the (blocking) sampler
    call; it runs on ``executor``, the server's single sampler thread, which weight loads share.
    It polls ``cancelled() -> [bool]`` and stops the sequences that were aborted meanwhile (by
    ``/abort_request`` or because their client went away), so the next batch does not wait."""

    def __init__(self, run_batch: Callable[[Sequence[Any], Callable[[], list[bool]]], tuple[list, str]],
                 executor: concurrent.futures.Executor, batch_wait_ms: float = 5.0):
        self._run_batch = run_batch
        self._executor = executor
        self._batch_wait_s = max(batch_wait_ms, 0.0) / 1000.0
        self._queue: list[Pending] = []
        self._inflight: set[Pending] = set()
        self._wake = asyncio.Event()
        self.lock = RWLock()
        self.unpaused = asyncio.Event()  # cleared by /pause_generation
        self.unpaused.set()
        self.last_batch_done = 0.0

    # ---------------------------------------------------------------- state
    @property
    def num_running(self) -> int:
        return sum(p.running for p in self._inflight)

    @property
    def num_waiting(self) -> int:
        return len(self._queue)

    @property
    def busy(self) -> bool:
        return bool(self._inflight)

    # ---------------------------------------------------------------- requests
    def submit(self, items: Sequence[Any], requests: Sequence[Any]) -> list[Pending]:
        """Queue one HTTP request's sequences (together); await each ``Pending.future``."""
        loop = asyncio.get_running_loop()
        now = time.time()
        pend = [Pending(i, r, loop.create_future(), now) for i, r in zip(items, requests)]
        self._inflight.update(pend)
        self._queue.extend(pend)
        self._wake.set()
        return pend

    def release(self, pend: Sequence[Pending]) -> None:
        """The caller is done with these (answered, failed or abandoned)."""
        for p in pend:
            self._inflight.discard(p)

    def abandon(self, pend: Sequence[Pending]) -> None:
        """Their caller went away (its futures are cancelled): drop them from the queue and stop
        them in the running batch."""
        for p in pend:
            p.aborted = True
        self.release(pend)

    def abort(self, match: Callable[[Pending], bool]) -> int:
        """Answer every matching unfinished sequence at once with None (abort); returns how many."""
        n = 0
        for p in list(self._inflight):
            if match(p) and not p.future.done():
                p.aborted = True
                p.future.set_result(None)
                n += 1
        return n

    # ---------------------------------------------------------------- the worker
    async def run(self) -> None:
        """The worker loop (one task per server)."""
        loop = asyncio.get_running_loop()
        while True:
            await self._wake.wait()
            if self._batch_wait_s > 0:
                await asyncio.sleep(self._batch_wait_s)
            self._wake.clear()
            batch = [p for p in self._queue if not p.aborted]
            self._queue = []
            if not batch:
                continue
            for p in batch:
                p.running = True
            try:
                results, version = await loop.run_in_executor(
                    self._executor, self._run_batch, [p.request for p in batch],
                    lambda: [p.aborted for p in batch])
            except Exception as e:  # an engine failure answers every caller with a 500
                log.exception("generation failed")
                for p in batch:
                    if not p.future.done():
                        p.future.set_exception(e)
                continue
            self.last_batch_done = time.time()
            for p, r in zip(batch, results):
                if not p.future.done():
                    p.future.set_result((r, version))
