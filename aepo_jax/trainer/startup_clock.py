"""The start-up's phases, timed: ``StartupClock.mark(phase)`` records the wall time since the previous
mark (the first clock of a process starts when the process started, so its first phase holds the
interpreter and the imports), and ``report_once`` logs one line with every phase, the XLA programs
compiled or loaded from the persistent cache and the cache's hits and misses, and returns the phases
as ``timing_s/startup/*`` metrics. The trainer does this once, after its first step.
"""

from __future__ import annotations

import logging
import os
import time

from aepo_jax.compilation_cache import COMPILES, JAX_DIR_ENV, SETTING_ENV

log = logging.getLogger(__name__)


def process_age_s() -> float:
    """Seconds since this process started (Linux: from /proc; elsewhere: since this module loaded)."""
    try:
        with open("/proc/self/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        start_ticks = int(fields[19])  # field 22 of stat(5); two fields precede the ")"
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return time.monotonic() - _LOADED


_LOADED = time.monotonic()


class StartupClock:
    """Wall time of each start-up phase, in order. The first clock of a process starts when the
    process started (so the first phase holds the interpreter and the imports); later ones (a
    second trainer in the same process) start when they are made."""

    _first = True

    def __init__(self):
        self.phases: list[tuple[str, float]] = []
        age = process_age_s() if StartupClock._first else 0.0
        StartupClock._first = False
        self._last = time.monotonic() - age
        self._start = self._last
        self._compiles_at_start = COMPILES.snapshot()
        self.reported = False

    def mark(self, phase: str) -> float:
        """End ``phase`` now; returns its seconds."""
        now = time.monotonic()
        dt, self._last = now - self._last, now
        self.phases.append((phase, dt))
        return dt

    def total_s(self) -> float:
        return self._last - self._start

    def compiles(self) -> dict:
        """Compilations in this process since the clock started."""
        now, then = COMPILES.snapshot(), self._compiles_at_start
        return {k: now[k] - then[k] for k in now}

    def summary(self) -> str:
        """One line: total, each phase, this process's compilations and the cache's use."""
        parts = ", ".join(f"{name} {dt:.1f}" for name, dt in self.phases)
        c = self.compiles()
        # jax times a program's compilation and its load from the persistent cache as one event.
        line = (f"start-up {self.total_s():.1f} s: {parts}; tracing and lowering {c['trace_s']:.1f} s, "
                f"XLA programs {c['compiles']} in {c['compile_s']:.1f} s")
        cache = os.environ.get(JAX_DIR_ENV) if os.environ.get(SETTING_ENV) != "off" else None
        if cache and COMPILES.installed:
            line += f" (compilation cache: {c['cache_hits']} loaded, {c['cache_misses']} compiled; {cache})"
        elif not cache:
            line += " (compilation cache off)"
        return line

    def metrics(self) -> dict:
        """The phases as ``timing_s/startup/<phase>`` plus ``timing_s/startup_total``,
        ``timing_s/startup_compile`` (this process's seconds compiling, or loading from the
        persistent cache, XLA programs) and ``timing_s/startup_trace`` (tracing and lowering them)."""
        out = {f"timing_s/startup/{_slug(name)}": dt for name, dt in self.phases}
        out["timing_s/startup_total"] = self.total_s()
        c = self.compiles()
        out["timing_s/startup_compile"] = c["compile_s"]  # compiling or loading XLA programs
        out["timing_s/startup_trace"] = c["trace_s"]  # tracing and lowering them (not cached)
        return out

    def report_once(self, phase: str, logger: logging.Logger | None = None) -> dict:
        """End the last phase (``phase``, e.g. the first step), log the one-line summary and return
        the phases as metrics; afterwards it does nothing and returns ``{}``."""
        if self.reported:
            return {}
        self.reported = True
        self.mark(phase)
        (logger or log).info("%s", self.summary())
        return self.metrics()


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name.lower()).strip("_")
