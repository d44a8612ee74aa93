"""The rollout client's per-server transport: one HTTP session per event loop, round robin over
the servers, retries with backoff (and a 429's ``Retry-After``), setting aside a server that
fails, and the ``GET /health`` watchdog that notices a server that stopped answering while it
holds requests. ``RolloutClient`` (``client.py``) builds on :class:`ServerPool`."""

from __future__ import annotations

import asyncio
import email.utils
import itertools
import json
import logging
import math
import time
from typing import Any, Sequence

import aiohttp

from aepo_jax.rollout.client_config import ClientConfig, RolloutError, ServerRequestError

log = logging.getLogger("aepo_jax.rollout.client")

# What a server that cannot be reached (or cut a transfer short) raises: retried elsewhere.
_CONNECTION_ERRORS = (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, asyncio.TimeoutError, OSError)


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or an HTTP date); None if absent
    or unreadable."""
    if not value:
        return None
    value = value.strip()
    try:
        secs = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when is None:
            return None
        secs = when.timestamp() - (time.time() if now is None else now)
    if not math.isfinite(secs):
        return None
    return max(0.0, secs)


class Deadline:
    """The overall deadline of one call (monotonic clock)."""

    def __init__(self, seconds: float):
        self.seconds = float(seconds)
        self.at = time.monotonic() + self.seconds

    def remaining(self) -> float:
        return self.at - time.monotonic()

    def __str__(self) -> str:
        return f"the call's deadline (request_deadline_s={self.seconds:g})"


class ServerStalled(Exception):
    """A server stopped answering its health check while it held a request."""


class _Watch:
    """One server's health watchdog, shared by every request in flight to it."""

    def __init__(self):
        self.inflight = 0
        self.stalled = asyncio.Event()
        self.reason = ""
        self.task: asyncio.Task | None = None


class ServerPool:
    """The servers behind one client and what it knows of each (set aside until, Retry-After,
    requests in flight, health watchdog)."""

    def __init__(self, urls: Sequence[str], config: ClientConfig):
        self.urls = list(urls)
        self.config = config
        self._rr = itertools.cycle(range(len(self.urls)))
        self._dead_until: dict[str, float] = {}
        self._not_before: dict[str, float] = {}  # Retry-After of a server that answered 429
        self._watches: dict[str, _Watch] = {}
        self._session: aiohttp.ClientSession | None = None
        self._session_loop = None
        self._sems: dict[str, asyncio.Semaphore] = {}

    # ------------------------------------------------------------------ session
    def _get_session(self) -> aiohttp.ClientSession:
        loop = asyncio.get_running_loop()
        if self._session is None or self._session.closed or self._session_loop is not loop:
            # A session is bound to its event loop; asyncio.run() per call needs a fresh one.
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.config.timeout_s, sock_connect=self.config.connect_timeout_s),
                connector=aiohttp.TCPConnector(limit=0))
            self._session_loop = loop
            self._sems = {u: asyncio.Semaphore(self.config.max_inflight) for u in self.urls}
            self._watches = {}
        return self._session

    def session_is_on(self, loop: asyncio.AbstractEventLoop) -> bool:
        return self._session is not None and self._session_loop is loop

    async def close(self) -> None:
        if self._session is not None and not self._session.closed:
            await self._session.close()
        self._session = None

    # ------------------------------------------------------------------ one HTTP request
    async def request(self, method: str, url: str, path: str, json_body: Any = None,
                      timeout_s: float | None = None) -> tuple[int, Any, dict]:
        """(status, JSON or text body, the headers the retry policy reads) of one request."""
        session = self._get_session()
        kw = {}
        if timeout_s is not None:
            kw["timeout"] = aiohttp.ClientTimeout(total=timeout_s, sock_connect=self.config.connect_timeout_s)
        async with session.request(method, url + path, json=json_body, **kw) as resp:
            raw = await resp.read()
            ctype = resp.headers.get("Content-Type", "")
            headers = {"Retry-After": resp.headers.get("Retry-After")}
            if "json" in ctype and raw:
                try:
                    return resp.status, json.loads(raw), headers
                except ValueError:
                    pass
            return resp.status, raw.decode("utf-8", "replace"), headers

    async def post_each(self, urls: Sequence[str], path: str, body: dict,
                        timeout_s: float | None = None) -> dict[str, tuple[int, Any]]:
        """POST to every URL at once: {url: (status, body)}; status 0 when it could not be reached."""
        async def one(u):
            try:
                status, data, _ = await self.request("POST", u, path, body, timeout_s=timeout_s)
                return u, (status, data)
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
                return u, (0, f"{type(e).__name__}: {e}")

        return dict(await asyncio.gather(*(one(u) for u in urls)))

    # ------------------------------------------------------------------ liveness
    async def probe_health(self, url: str, timeout_s: float) -> str | None:
        """One ``GET /health``: None when it answers 200, else why not."""
        try:
            status, _, _ = await self.request("GET", url, "/health", timeout_s=timeout_s)
        except Exception as e:  # noqa: BLE001 - any failure to answer is a miss
            if str(e):
                return f"/health: {type(e).__name__}: {e}"
            if isinstance(e, asyncio.TimeoutError):
                return f"/health gave no answer within {timeout_s:g}s"
            return f"/health: {type(e).__name__}"
        return None if status == 200 else f"/health answered {status}"

    def mark_alive(self, urls: Sequence[str]) -> None:
        for u in urls:
            self._dead_until.pop(u, None)

    def _set_aside(self, url: str) -> None:
        self._dead_until[url] = time.monotonic() + self.config.dead_recheck_s

    def _next_url(self, avoid: str | None = None) -> str:
        now = time.monotonic()
        live = [u for u in self.urls if self._dead_until.get(u, 0.0) <= now]
        live = live or list(self.urls)  # all set aside: try them anyway
        for _ in range(len(self.urls)):
            u = self.urls[next(self._rr)]
            if u in live and (u != avoid or len(live) == 1):
                return u
        return live[0]

    async def _watchdog(self, url: str, watch: _Watch) -> None:
        cfg = self.config
        misses = 0
        while True:
            await asyncio.sleep(cfg.health_check_interval_s)
            why = await self.probe_health(url, cfg.health_check_timeout_s)
            misses = 0 if why is None else misses + 1
            if why is not None:
                log.warning("%s: health check missed (%d/%d): %s", url, misses, cfg.health_check_failures, why)
            if misses >= cfg.health_check_failures:
                watch.reason = f"stopped answering its health check ({misses} misses in a row; last: {why})"
                watch.stalled.set()
                return

    async def _watched_post(self, url: str, path: str, body: Any, timeout_s: float) -> tuple[int, Any, dict]:
        """POST while the server's health is watched; ServerStalled when it stops answering."""
        if self.config.health_check_failures == 0:
            return await self.request("POST", url, path, body, timeout_s=timeout_s)
        watch = self._watches.get(url)
        if watch is None or watch.stalled.is_set():
            watch = self._watches[url] = _Watch()
        watch.inflight += 1
        if watch.task is None or watch.task.done():
            watch.task = asyncio.ensure_future(self._watchdog(url, watch))
        request = asyncio.ensure_future(self.request("POST", url, path, body, timeout_s=timeout_s))
        stalled = asyncio.ensure_future(watch.stalled.wait())
        try:
            await asyncio.wait({request, stalled}, return_when=asyncio.FIRST_COMPLETED)
            if request.done():
                return request.result()
            raise ServerStalled(watch.reason)
        finally:
            for t in (request, stalled):
                if not t.done():
                    t.cancel()
            await asyncio.gather(request, stalled, return_exceptions=True)
            watch.inflight -= 1
            if watch.inflight == 0 and watch.task is not None and not watch.task.done():
                watch.task.cancel()
                await asyncio.gather(watch.task, return_exceptions=True)

    # ------------------------------------------------------------------ the retry policy
    async def post_with_retries(self, path: str, body: dict, what: str, deadline: Deadline | None = None,
                                errors: list[str] | None = None) -> tuple[str, Any]:
        """POST to a live server, retrying connection errors / timeouts / stalls / 5xx on the next
        one and 429 after its Retry-After, until ``max_retries`` or the ``deadline``. Returns
        (url, body); a 4xx raises ServerRequestError at once. ``errors`` collects every failure
        (the whole call's, for its deadline message)."""
        cfg = self.config
        tried: list[str] = []  # this request's failures
        url = None
        failures = 0  # attempts that count against max_retries (not 429s while a deadline is set)
        throttled = 0

        def remaining() -> float:
            return math.inf if deadline is None else deadline.remaining()

        def note(err: str) -> None:
            tried.append(err)
            if errors is not None:
                errors.append(err)

        def give_up(reason: str) -> RolloutError:
            servers = sorted(set(e.split(": ")[0] for e in tried)) or [url]
            return RolloutError(f"{what}: {path} {reason} on {servers}; last error: {tried[-1] if tried else 'none'}")

        def past_deadline() -> RolloutError:
            return give_up(f"not done within {deadline}")

        while True:
            url = self._next_url(avoid=url)
            wait = self._not_before.get(url, 0.0) - time.monotonic()
            if wait > 0:  # the server asked us to come back later (Retry-After)
                await asyncio.sleep(min(wait, max(0.0, remaining())))
            if remaining() <= 0:
                raise past_deadline()
            sem = self._sems.get(url) or asyncio.Semaphore(cfg.max_inflight)
            retry_after = None
            try:
                async with sem:
                    if remaining() <= 0:
                        raise past_deadline()
                    status, data, headers = await self._watched_post(
                        url, path, body, timeout_s=min(cfg.timeout_s, remaining()))
            except (ServerStalled, *_CONNECTION_ERRORS) as e:
                if isinstance(e, ServerStalled):
                    note(f"{url}: {e}")
                    log.warning("%s: %s on %s: server %s; retrying elsewhere", what, path, url, e)
                else:
                    note(f"{url}: {type(e).__name__}: {e}")
                    if remaining() <= 0:  # cut short by the call's deadline, not the server's fault
                        raise past_deadline() from None
                    log.warning("%s: %s failed on %s (%s); retrying elsewhere", what, path, url, tried[-1])
                self._set_aside(url)
                failures += 1
            else:
                if status < 400:
                    self._dead_until.pop(url, None)
                    return url, data
                retry_after = parse_retry_after(headers.get("Retry-After"))
                if status == 429:
                    note(f"{url}: HTTP 429 (overloaded{'' if retry_after is None else f', Retry-After {retry_after:g}s'})")
                    throttled += 1
                    if deadline is None:
                        failures += 1
                elif status < 500:
                    raise ServerRequestError(url, status, data)
                else:
                    note(f"{url}: HTTP {status}: {str(data)[:500]}")
                    failures += 1
                if retry_after is not None:
                    self._not_before[url] = time.monotonic() + retry_after
                log.warning("%s: %s on %s answered %s; retrying", what, path, url, status)
            if failures > cfg.max_retries:
                tries = failures + throttled
                raise give_up(f"failed after {tries} attempt{'s' if tries != 1 else ''}")
            delay = cfg.backoff(failures + throttled - 1)
            if delay >= remaining():
                raise past_deadline()
            await asyncio.sleep(delay)
