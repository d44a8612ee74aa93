"""A wall-clock limit for code running in this process (``SIGALRM``), nested correctly.

Used where a reward runs in the caller's process (cheap rewards scored in-process by
:class:`aepo_jax.rewards.pool.RewardPool`, direct :func:`aepo_jax.rewards.math.math_reward` calls).
The signal interrupts Python code and regular-expression matching, not a single long C call (a huge
integer power), which is why expensive rewards run in worker processes that can be killed.

Signals only reach the main thread, so the limit can only be armed there; callers check
:func:`can_arm` and fall back to a worker process elsewhere. An alarm already set by someone else
(e.g. a test runner's timeout) is kept: if it is due first, it stays in charge; otherwise it is
re-armed with its remaining time when the limit ends.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager


def can_arm() -> bool:
    """True when a SIGALRM limit can be armed here (a POSIX main thread whose SIGALRM handler, if
    any, was set from Python and so can be put back)."""
    return (hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()
            and signal.getsignal(signal.SIGALRM) is not None)


@contextmanager
def wall_clock_limit(timeout_s: float | None, make_error: Callable[[], BaseException]) -> Iterator[bool]:
    """Raise ``make_error()`` in this thread once ``timeout_s`` seconds have passed.

    Yields whether a limit of ours is armed: False without a limit, off the main thread, with a
    Python-level handler we cannot restore, or when an outer alarm is due first (then that one
    fires)."""
    if timeout_s is None or timeout_s <= 0 or not can_arm():
        yield False
        return
    outer_handler = signal.getsignal(signal.SIGALRM)
    outer_left, outer_interval = signal.getitimer(signal.ITIMER_REAL)
    if outer_left > 0 and outer_left <= timeout_s:
        yield False
        return

    def on_alarm(signum, frame):
        raise make_error()

    start = time.monotonic()
    signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, timeout_s)
    try:
        yield True
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0.0)
        signal.signal(signal.SIGALRM, outer_handler)
        if outer_left > 0:
            left = outer_left - (time.monotonic() - start)
            signal.setitimer(signal.ITIMER_REAL, max(left, 1e-3), outer_interval)
