"""Score responses in worker processes with a hard wall-clock timeout per sample.

Why processes: math-verify (sympy) can run for minutes on a pathological answer such as
``9^{9^{9}}``, inside C code that no signal interrupts, and its signal-based timeout does not work
off the main thread. A worker that overruns its deadline is killed and replaced; the sample scores
0 and counts as a timeout. A reward function that raises, returns a non-finite value, or a worker
that dies (segfault, memory limit) scores 0 and counts as a crash. Both are logged with the sample
index and the start of the response, and both are returned per call and accumulated in
:attr:`RewardPool.stats`, so the trainer can log ``reward/timeouts`` and ``reward/crashes``: a
silent 0 is exactly the bug this module exists to prevent.

Workers are started with ``spawn`` (never ``fork``: the parent usually has jax threads running),
announce themselves ready after importing the reward, and only then get work, so import time never
eats into a sample's deadline.

``num_workers=0`` scores in the caller's process, for cheap rewards such as exact match (no
inter-process round trip per sample), under the same per-sample ``timeout_s``: a ``SIGALRM``
wall clock (:mod:`aepo_jax.rewards.clock`) interrupts a reward that overruns, which scores 0 and
counts as a timeout like a killed worker. A reward that swallows the interruption and returns late
counts as a timeout too. Signals only reach the main thread, so called from any other thread the
pool scores in one worker process instead (started on first use), never without a limit.
"""

from __future__ import annotations

import logging
import math
import multiprocessing as mp
import time
import weakref
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import wait

import numpy as np

from aepo_jax.rewards.clock import can_arm, wall_clock_limit

logger = logging.getLogger(__name__)

OK, TIMEOUT, CRASH = "ok", "timeout", "crash"


@dataclass
class PoolStats:
    """Cumulative counts over the pool's life."""

    samples: int = 0
    timeouts: int = 0
    crashes: int = 0
    worker_restarts: int = 0


@dataclass
class RewardBatch:
    """One :meth:`RewardPool.score` call: a score and a status per sample."""

    scores: np.ndarray  # float32 [N]
    status: list[str]  # "ok" | "timeout" | "crash" per sample
    errors: dict[int, str] = field(default_factory=dict)  # sample index -> what went wrong

    @property
    def timeouts(self) -> int:
        return self.status.count(TIMEOUT)

    @property
    def crashes(self) -> int:
        return self.status.count(CRASH)


def _worker_main(conn, reward_path: str, max_memory_mb: int | None) -> None:
    """Worker loop: import the reward, say ready, then score (idx, response, gt) until None."""
    if max_memory_mb:
        try:
            import resource  # noqa: PLC0415

            limit = int(max_memory_mb) * 1024 * 1024
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        except (ImportError, ValueError, OSError):  # pragma: no cover - platform without rlimits
            pass
    try:
        from aepo_jax.rewards import _import_path  # noqa: PLC0415

        fn = _import_path(reward_path)
        if reward_path.startswith("aepo_jax.rewards.math:"):
            from aepo_jax.rewards.math import _math_verify  # noqa: PLC0415

            _math_verify()  # import sympy now, before the first deadline starts
    except BaseException as e:  # noqa: BLE001 - report every start-up failure to the parent
        conn.send(("fatal", f"{type(e).__name__}: {e}"))
        return
    pass_timeout = _takes_timeout(fn)
    conn.send(("ready",))
    while True:
        try:
            task = conn.recv()
        except (EOFError, KeyboardInterrupt):
            return
        if task is None:
            return
        idx, response, ground_truth = task
        try:
            # timeout_s=None: the parent owns the wall clock (a signal here would only add noise).
            value = fn(response, ground_truth, timeout_s=None) if pass_timeout else fn(response, ground_truth)
            value = float(value)
            if not math.isfinite(value):
                raise ValueError(f"reward returned non-finite value {value!r}")
            conn.send((idx, OK, value))
        except BaseException as e:  # noqa: BLE001 - any failure is a counted crash, never silent
            conn.send((idx, CRASH, f"{type(e).__name__}: {str(e)[:300]}"))


def _takes_timeout(fn: Callable) -> bool:
    try:
        import inspect  # noqa: PLC0415

        return "timeout_s" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


class _Worker:
    def __init__(self, ctx, reward_path: str, max_memory_mb: int | None):
        self.conn, child = ctx.Pipe(duplex=True)
        self.proc = ctx.Process(target=_worker_main, args=(child, reward_path, max_memory_mb), daemon=True)
        self.proc.start()
        child.close()
        self.ready = False
        self.task: tuple[int, float] | None = None  # (sample index, deadline)

    def kill(self) -> None:
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join(timeout=5)
        self.conn.close()


def _kill_all(workers: list[_Worker]) -> None:
    for w in workers:
        try:
            w.kill()
        except Exception:  # noqa: BLE001 - best effort at interpreter exit
            pass


class _InProcessTimeout(BaseException):
    """A reward scored in-process overran (BaseException: a reward's ``except Exception`` cannot
    swallow it)."""


class RewardPoolError(RuntimeError):
    """The pool itself cannot work (e.g. the reward cannot be imported in a worker)."""


class RewardPool:
    """``RewardPool(reward, num_workers, timeout_s).score(responses, ground_truths) -> RewardBatch``.

    ``reward``: a registered name (``"math"``), a ``"module:function"`` path or a module-level
    function. ``timeout_s`` is the wall clock per sample, measured from when a ready worker
    receives it. ``max_memory_mb`` caps each worker's address space (a runaway sympy expression
    then crashes its worker instead of the machine). Use as a context manager or call
    :meth:`close`.
    """

    def __init__(
        self,
        reward: str | Callable = "math",
        num_workers: int = 2,
        timeout_s: float = 10.0,
        max_memory_mb: int | None = 4096,
        startup_timeout_s: float = 120.0,
    ):
        from aepo_jax.rewards import _import_path, reward_spec  # noqa: PLC0415 - package imports us

        if num_workers < 0:
            raise ValueError(f"RewardPool: num_workers must be >= 0, got {num_workers}")
        if not timeout_s > 0:
            raise ValueError(f"RewardPool: timeout_s must be > 0, got {timeout_s}")
        self.reward_path = reward_spec(reward)
        self._fn = _import_path(self.reward_path)  # validates the path here, in the caller's process
        self.num_workers = num_workers
        self.timeout_s = float(timeout_s)
        self.max_memory_mb = max_memory_mb
        self.startup_timeout_s = startup_timeout_s
        self.stats = PoolStats()
        self._ctx = mp.get_context("spawn")
        self._workers: list[_Worker] = [self._spawn() for _ in range(num_workers)]
        self._closed = False
        self._finalizer = weakref.finalize(self, _kill_all, self._workers)

    def _spawn(self) -> _Worker:
        return _Worker(self._ctx, self.reward_path, self.max_memory_mb)

    # -- public ---------------------------------------------------------------------------------

    def score(self, responses: Sequence[str], ground_truths: Sequence[str]) -> RewardBatch:
        if len(responses) != len(ground_truths):
            raise ValueError(
                f"RewardPool.score: {len(responses)} responses but {len(ground_truths)} ground truths"
            )
        n = len(responses)
        scores = np.zeros(n, dtype=np.float32)
        status = [OK] * n
        errors: dict[int, str] = {}
        if self._closed:  # in every mode: a closed pool must not keep scoring in-process either
            raise RewardPoolError("RewardPool.score called after close()")
        if self.num_workers == 0 and can_arm():
            self._score_in_process(responses, ground_truths, scores, status, errors)
        else:
            if not self._workers:  # in-process mode off the main thread: no signal reaches here
                logger.info("reward %s: called off the main thread; scoring in a worker process "
                            "so the %s s limit holds", self.reward_path, self.timeout_s)
                self._workers.append(self._spawn())
            self._score_in_workers(responses, ground_truths, scores, status, errors)
        self.stats.samples += n
        for i, msg in sorted(errors.items()):
            if status[i] == TIMEOUT:
                self.stats.timeouts += 1
            else:
                self.stats.crashes += 1
            logger.warning(
                "reward %s: sample %d %s, scored 0 (%s); response starts %r",
                self.reward_path,
                i,
                status[i],
                msg,
                str(responses[i])[:120],
            )
        return RewardBatch(scores=scores, status=status, errors=errors)

    def close(self) -> None:
        for w in self._workers:
            try:
                if w.proc.is_alive():
                    w.conn.send(None)
            except (OSError, BrokenPipeError):
                pass
        deadline = time.monotonic() + 5
        for w in self._workers:
            w.proc.join(timeout=max(0.0, deadline - time.monotonic()))
        _kill_all(self._workers)
        self._workers.clear()
        self._closed = True
        self._finalizer.detach()

    def __enter__(self) -> RewardPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- scheduling -----------------------------------------------------------------------------

    def _score_in_process(self, responses, ground_truths, scores, status, errors) -> None:
        pass_timeout = _takes_timeout(self._fn)
        limit = f"exceeded {self.timeout_s} s wall clock"
        for i, (r, g) in enumerate(zip(responses, ground_truths)):
            start = time.monotonic()
            try:
                with wall_clock_limit(self.timeout_s, lambda: _InProcessTimeout(limit)):
                    # timeout_s=None: this limit is the wall clock (as in a worker).
                    v = self._fn(r, g, timeout_s=None) if pass_timeout else self._fn(r, g)
                    v = float(v)
                if time.monotonic() - start > self.timeout_s:
                    raise _InProcessTimeout(f"{limit} (returned late)")
                if not math.isfinite(v):
                    raise ValueError(f"reward returned non-finite value {v!r}")
                scores[i] = v
            except _InProcessTimeout as e:
                status[i], errors[i] = TIMEOUT, str(e)
            except Exception as e:  # noqa: BLE001 - counted and logged by score()
                status[i], errors[i] = CRASH, f"{type(e).__name__}: {str(e)[:300]}"

    def _replace(self, k: int) -> None:
        self._workers[k].kill()
        self._workers[k] = self._spawn()
        self.stats.worker_restarts += 1

    def _score_in_workers(self, responses, ground_truths, scores, status, errors) -> None:
        if not self._workers:
            raise RewardPoolError("RewardPool.score called after close()")
        pending = deque(range(len(responses)))
        started = time.monotonic()
        while pending or any(w.task for w in self._workers):
            # Hand work to idle, ready workers.
            for w in self._workers:
                if w.ready and w.task is None and pending:
                    i = pending.popleft()
                    w.conn.send((i, responses[i], ground_truths[i]))
                    w.task = (i, time.monotonic() + self.timeout_s)
            busy_deadlines = [w.task[1] for w in self._workers if w.task]
            if not busy_deadlines and not any(w.ready for w in self._workers):
                if time.monotonic() - started > self.startup_timeout_s:
                    raise RewardPoolError(
                        f"RewardPool: no worker became ready within {self.startup_timeout_s} s "
                        f"(reward {self.reward_path!r})"
                    )
            wait_s = max(0.0, min(busy_deadlines) - time.monotonic()) if busy_deadlines else 0.5
            ready_conns = wait([w.conn for w in self._workers], timeout=wait_s)
            for k, w in enumerate(list(self._workers)):
                if w.conn not in ready_conns:
                    continue
                try:
                    msg = w.conn.recv()
                except (EOFError, OSError):
                    # The worker died: the sample it held (if any) crashed; start a replacement.
                    if w.task is not None:
                        i = w.task[0]
                        w.proc.join(timeout=1)
                        status[i], errors[i] = CRASH, f"worker died (exit code {w.proc.exitcode})"
                    self._replace(k)
                    continue
                if msg[0] == "ready":
                    w.ready = True
                elif msg[0] == "fatal":
                    raise RewardPoolError(f"RewardPool: worker could not load reward {self.reward_path!r}: {msg[1]}")
                else:
                    i, st, payload = msg
                    if st == OK:
                        scores[i] = payload
                    else:
                        status[i], errors[i] = CRASH, str(payload)
                    w.task = None
            now = time.monotonic()
            for k, w in enumerate(list(self._workers)):
                if w.task is not None and now >= w.task[1]:
                    i = w.task[0]
                    status[i], errors[i] = TIMEOUT, f"exceeded {self.timeout_s} s wall clock"
                    self._replace(k)
