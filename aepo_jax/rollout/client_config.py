"""The rollout client's options and its error types (``RolloutClient``'s contract with callers)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any


class RolloutError(RuntimeError):
    """Generation (or a control call) could not be completed on any server."""


class ServerRequestError(RolloutError):
    """A server refused a request (4xx): a bad request, never retried."""

    def __init__(self, url: str, status: int, body: Any):
        super().__init__(f"{url} answered {status}: {body}")
        self.url, self.status, self.body = url, status, body


@dataclass
class ClientConfig:
    timeout_s: float = 600.0  # one HTTP request (a whole batch of generations)
    connect_timeout_s: float = 10.0
    max_retries: int = 5  # per request, across servers
    backoff_s: float = 0.5  # first retry delay; doubles each time
    max_backoff_s: float = 10.0
    batch_size: int = 64  # sequences per /generate body
    max_inflight: int = 2  # concurrent /generate bodies per server
    dead_recheck_s: float = 5.0  # how soon a server set aside is probed again
    # Overall wall clock of one generate() call (queueing, every batch, retries, backoff);
    # None = no overall limit (each request is still bounded by timeout_s and max_retries).
    request_deadline_s: float | None = None
    # Liveness of a server while requests to it are in flight: GET /health every interval, each
    # probe limited to timeout; that many misses in a row (no answer, refused, or not 200) and
    # its requests fail over. Real SGLang's /health waits for one scheduler step (>= 1 s), so keep
    # the timeout well above that. health_check_failures = 0 turns the check off.
    health_check_interval_s: float = 2.0
    health_check_timeout_s: float = 5.0
    health_check_failures: int = 2

    def validate(self) -> None:
        def positive(name, allow_none=False):
            v = getattr(self, name)
            if v is None and allow_none:
                return
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise ValueError(f"RolloutClient: {name} must be a finite number > 0, got {v!r}")

        for name in ("timeout_s", "connect_timeout_s", "backoff_s", "max_backoff_s", "dead_recheck_s",
                     "health_check_interval_s", "health_check_timeout_s"):
            positive(name)
        positive("request_deadline_s", allow_none=True)
        for name, lo in (("max_retries", 0), ("batch_size", 1), ("max_inflight", 1), ("health_check_failures", 0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"RolloutClient: {name} must be an integer >= {lo}, got {v!r}")

    def backoff(self, attempt: int) -> float:
        """Delay before retry ``attempt`` (0 = the first): ``backoff_s`` doubling, at most ``max_backoff_s``."""
        return min(self.backoff_s * 2.0 ** min(attempt, 30), self.max_backoff_s)
