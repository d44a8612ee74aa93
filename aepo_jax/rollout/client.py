"""Async client for SGLang's native HTTP API (real SGLang servers, sglang-router, or ours).

    client = RolloutClient(["http://127.0.0.1:30000", "http://127.0.0.1:30001"])
    await client.wait_healthy(deadline_s=300)
    samples = await client.generate(prompt_ids, n=8, sampling_params={"max_new_tokens": 256},
                                    seed=step, temperature=1.0)   # samples[i][j]: prompt i, sample j
    await client.update_weights_from_disk("/dev/shm/.../v12", weight_version="12")

* Each sample is one row of a batched ``POST /generate`` body (``input_ids`` as a list of lists,
  one ``sampling_params`` dict per row with its own ``sampling_seed``), so a run is reproducible and
  the server's ``n`` fan-out (which shares one seed on real SGLang) is never used.
* Requests go round robin over the URLs (or to one sglang-router URL), at most ``max_inflight``
  at a time per server. Connection errors, timeouts and 5xx answers are retried with exponential
  backoff on the next live server; a server that refuses connections is set aside and re-probed
  with ``GET /health``. A 429 (server overloaded) is retried after its ``Retry-After`` (or the
  backoff) without using up ``max_retries`` while the call has a deadline. Any other 4xx is the
  caller's fault and raises at once with SGLang's error body.
* A server that stops answering (a SIGSTOPped or hung process keeps its socket open, so the
  connection never fails) is noticed in seconds: while requests to a server are in flight, its
  ``GET /health`` is probed every ``health_check_interval_s`` with a ``health_check_timeout_s``
  limit; after ``health_check_failures`` misses in a row its requests are cancelled and retried on
  another server. A long generation on a healthy server is never cut short by this.
* Every ``generate`` call has an overall deadline (``request_deadline_s``, or ``deadline_s=`` per
  call) covering queueing, all batches, retries and backoff; past it the call raises.
* Nothing is dropped silently: ``generate`` returns exactly ``n`` samples for every prompt or raises
  :class:`RolloutError` naming the request, the servers tried and the last error. Samples whose
  finish reason is ``abort`` (e.g. the server was paused) are re-sent too.
* Weight updates go to ``weight_update_urls`` (default: the generation URLs); sglang-router has no
  weight-update route, so with a router pass the workers' URLs there.
"""

from __future__ import annotations

import asyncio
import email.utils
import hashlib
import itertools
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

log = logging.getLogger("aepo_jax.rollout.client")

# Keys a caller may put in sampling_params (SGLang's own list; a typo fails here, before any HTTP).
from aepo_jax.rollout.protocol import SAMPLING_PARAM_KEYS  # noqa: E402

_INT64_MASK = (1 << 63) - 1


class RolloutError(RuntimeError):
    """Generation (or a control call) could not be completed on any server."""


class ServerRequestError(RolloutError):
    """A server refused a request (4xx): a bad request, never retried."""

    def __init__(self, url: str, status: int, body: Any):
        super().__init__(f"{url} answered {status}: {body}")
        self.url, self.status, self.body = url, status, body


@dataclass
class Sample:
    """One generated sequence."""

    prompt_index: int
    sample_index: int
    output_ids: list[int]
    logprobs: list[float] | None  # per output token (see the server's log-prob convention)
    finish_reason: dict
    weight_version: str | None
    seed: int
    text: str | None = None
    server: str = ""
    meta_info: dict = field(default_factory=dict, repr=False)

    @property
    def finish_type(self) -> str:
        return (self.finish_reason or {}).get("type", "")

    @property
    def truncated(self) -> bool:
        return self.finish_type == "length"


def sample_seed(base_seed: int, prompt_index: int, sample_index: int) -> int:
    """Deterministic 63-bit seed of one sample: a hash of (base, prompt, sample)."""
    h = hashlib.blake2b(f"{int(base_seed)}:{int(prompt_index)}:{int(sample_index)}".encode(), digest_size=8)
    return int.from_bytes(h.digest(), "little") & _INT64_MASK


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


class ServerStalled(Exception):
    """A server stopped answering its health check while it held a request (internal)."""


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


class _Deadline:
    """The overall deadline of one call (monotonic clock)."""

    def __init__(self, seconds: float):
        self.seconds = float(seconds)
        self.at = time.monotonic() + self.seconds

    def remaining(self) -> float:
        return self.at - time.monotonic()

    def __str__(self) -> str:
        return f"the call's deadline (request_deadline_s={self.seconds:g})"


class _Watch:
    """One server's health watchdog, shared by every request in flight to it."""

    def __init__(self):
        self.inflight = 0
        self.stalled = asyncio.Event()
        self.reason = ""
        self.task: asyncio.Task | None = None


class RolloutClient:
    def __init__(self, urls: str | Sequence[str], *, weight_update_urls: Sequence[str] | None = None,
                 config: ClientConfig | None = None, **overrides):
        urls = [urls] if isinstance(urls, str) else list(urls)
        if not urls:
            raise ValueError("urls: at least one server URL is required")
        self.urls = [u.rstrip("/") for u in urls]
        self.weight_update_urls = [u.rstrip("/") for u in (weight_update_urls or self.urls)]
        cfg = config or ClientConfig()
        for k, v in overrides.items():
            if not hasattr(cfg, k):
                raise TypeError(f"RolloutClient: unknown option {k!r}")
            setattr(cfg, k, v)
        cfg.validate()
        self.config = cfg
        self._rr = itertools.cycle(range(len(self.urls)))
        self._dead_until: dict[str, float] = {}
        self._not_before: dict[str, float] = {}  # Retry-After of a server that answered 429
        self._watches: dict[str, _Watch] = {}
        self._session = None
        self._session_loop = None
        self._sems: dict[str, asyncio.Semaphore] = {}
        self._rid_counter = itertools.count()
        self._client_id = hashlib.blake2b(repr((id(self), time.time())).encode(), digest_size=4).hexdigest()

    # ------------------------------------------------------------------ session
    def _get_session(self):
        import aiohttp

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

    async def release_loop_session(self) -> None:
        """Close the HTTP session if it belongs to the running event loop (before that loop ends)."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        if self._session is not None and self._session_loop is loop:
            await self.close()

    async def close(self) -> None:
        if self._session is not None and not self._session.closed:
            await self._session.close()
        self._session = None

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.close()

    # ------------------------------------------------------------------ low-level HTTP
    async def _request(self, method: str, url: str, path: str, json_body: Any = None,
                       timeout_s: float | None = None) -> tuple[int, Any]:
        status, data, _ = await self._http(method, url, path, json_body, timeout_s)
        return status, data

    async def _http(self, method: str, url: str, path: str, json_body: Any = None,
                    timeout_s: float | None = None) -> tuple[int, Any, dict]:
        import aiohttp

        session = self._get_session()
        kw = {}
        if timeout_s is not None:
            kw["timeout"] = aiohttp.ClientTimeout(total=timeout_s, sock_connect=self.config.connect_timeout_s)
        async with session.request(method, url + path, json=json_body, **kw) as resp:
            raw = await resp.read()
            ctype = resp.headers.get("Content-Type", "")
            headers = {"Retry-After": resp.headers.get("Retry-After")}
            if "json" in ctype and raw:
                import json

                try:
                    return resp.status, json.loads(raw), headers
                except ValueError:
                    pass
            return resp.status, raw.decode("utf-8", "replace"), headers

    def _live_urls(self) -> list[str]:
        now = time.monotonic()
        return [u for u in self.urls if self._dead_until.get(u, 0.0) <= now]

    def _next_url(self, avoid: str | None = None) -> str:
        live = self._live_urls() or list(self.urls)  # all set aside: try them anyway
        for _ in range(len(self.urls)):
            u = self.urls[next(self._rr)]
            if u in live and (u != avoid or len(live) == 1):
                return u
        return live[0]

    # ------------------------------------------------------------------ liveness while in flight
    async def _watchdog(self, url: str, watch: _Watch) -> None:
        cfg = self.config
        misses = 0
        while True:
            await asyncio.sleep(cfg.health_check_interval_s)
            try:
                status, _ = await self._request("GET", url, "/health", timeout_s=cfg.health_check_timeout_s)
                why = None if status == 200 else f"/health answered {status}"
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - any failure to answer is a miss
                why = f"/health: {type(e).__name__}: {e}" if str(e) else (
                    f"/health gave no answer within {cfg.health_check_timeout_s:g}s" if isinstance(e, asyncio.TimeoutError)
                    else f"/health: {type(e).__name__}")
            misses = 0 if why is None else misses + 1
            if why is not None:
                log.warning("%s: health check missed (%d/%d): %s", url, misses, cfg.health_check_failures, why)
            if misses >= cfg.health_check_failures:
                watch.reason = f"stopped answering its health check ({misses} misses in a row; last: {why})"
                watch.stalled.set()
                return

    async def _watched_request(self, url: str, path: str, body: Any, timeout_s: float) -> tuple[int, Any, dict]:
        """POST while the server's health is watched; ServerStalled when it stops answering."""
        if self.config.health_check_failures == 0:
            return await self._http("POST", url, path, body, timeout_s=timeout_s)
        watch = self._watches.get(url)
        if watch is None or watch.stalled.is_set():
            watch = self._watches[url] = _Watch()
        watch.inflight += 1
        if watch.task is None or watch.task.done():
            watch.task = asyncio.ensure_future(self._watchdog(url, watch))
        request = asyncio.ensure_future(self._http("POST", url, path, body, timeout_s=timeout_s))
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

    async def _post_with_retries(self, path: str, body: dict, what: str, deadline: _Deadline | None = None,
                                 errors: list[str] | None = None) -> tuple[str, Any]:
        """POST to a live server, retrying connection errors / timeouts / stalls / 5xx on the next
        one and 429 after its Retry-After, until ``max_retries`` or the ``deadline`` (monotonic)."""
        import aiohttp

        cfg = self.config
        call_errors = errors  # the whole call's, for its deadline message
        errors = []  # this request's
        url = None
        failures = 0  # attempts that count against max_retries (not 429s while a deadline is set)
        throttled = 0

        def remaining() -> float:
            return math.inf if deadline is None else deadline.remaining()

        def note(err: str) -> None:
            errors.append(err)
            if call_errors is not None:
                call_errors.append(err)

        def give_up(reason: str) -> RolloutError:
            servers = sorted(set(e.split(": ")[0] for e in errors)) or [url]
            last = errors[-1] if errors else "none"
            return RolloutError(f"{what}: {path} {reason} on {servers}; last error: {last}")

        while True:
            url = self._next_url(avoid=url)
            wait = self._not_before.get(url, 0.0) - time.monotonic()
            if wait > 0:  # the server asked us to come back later (Retry-After)
                await asyncio.sleep(min(wait, max(0.0, remaining())))
            if remaining() <= 0:
                raise give_up(f"not done within {deadline}")
            sem = self._sems.get(url) or asyncio.Semaphore(cfg.max_inflight)
            retry_after = None
            try:
                async with sem:
                    if remaining() <= 0:
                        raise give_up(f"not done within {deadline}")
                    status, data, headers = await self._watched_request(
                        url, path, body, timeout_s=min(cfg.timeout_s, remaining()))
            except ServerStalled as e:
                note(f"{url}: {e}")
                self._dead_until[url] = time.monotonic() + cfg.dead_recheck_s
                log.warning("%s: %s on %s: server %s; retrying elsewhere", what, path, url, e)
                failures += 1
            except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, asyncio.TimeoutError, OSError) as e:
                note(f"{url}: {type(e).__name__}: {e}")
                if remaining() <= 0:  # cut short by the call's deadline, not the server's fault
                    raise give_up(f"not done within {deadline}") from None
                self._dead_until[url] = time.monotonic() + cfg.dead_recheck_s
                log.warning("%s: %s failed on %s (%s); retrying elsewhere", what, path, url, errors[-1])
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
            delay = min(cfg.backoff_s * 2.0 ** min(failures + throttled - 1, 30), cfg.max_backoff_s)
            if delay >= remaining():
                raise give_up(f"not done within {deadline}")
            await asyncio.sleep(delay)

    # ------------------------------------------------------------------ health
    async def health(self, url: str, timeout_s: float = 5.0) -> bool:
        try:
            status, _ = await self._request("GET", url, "/health", timeout_s=timeout_s)
            return status == 200
        except Exception:
            return False

    async def wait_healthy(self, deadline_s: float = 300.0, poll_s: float = 0.5, urls: Sequence[str] | None = None) -> None:
        """Wait until every server answers ``GET /health`` with 200; TimeoutError names the others."""
        urls = list(urls or dict.fromkeys(self.urls + self.weight_update_urls))
        t_end = time.monotonic() + deadline_s
        pending = set(urls)
        while True:
            ok = await asyncio.gather(*(self.health(u, timeout_s=min(5.0, max(deadline_s, 0.1))) for u in pending))
            pending -= {u for u, good in zip(list(pending), ok) if good}
            if not pending:
                for u in urls:
                    self._dead_until.pop(u, None)
                return
            if time.monotonic() >= t_end:
                raise TimeoutError(f"servers not healthy after {deadline_s:.0f}s: {sorted(pending)}")
            await asyncio.sleep(poll_s)

    # ------------------------------------------------------------------ generation
    def build_generate_bodies(
        self,
        prompt_ids: Sequence[Sequence[int]],
        n: int = 1,
        sampling_params: dict | None = None,
        seeds: Sequence[Sequence[int]] | None = None,
        seed: int | None = None,
        temperature: float | None = None,
        return_logprob: bool = True,
    ) -> list[tuple[list[tuple[int, int]], dict]]:
        """The /generate bodies for a rollout: [(the (prompt, sample) of each row, body)]."""
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        sp = dict(sampling_params or {})
        bad = [k for k in sp if k not in SAMPLING_PARAM_KEYS]
        if bad:
            raise ValueError(f"sampling_params: unknown key {bad[0]!r} (SGLang accepts: {', '.join(SAMPLING_PARAM_KEYS)})")
        if "n" in sp or "sampling_seed" in sp:
            raise ValueError("sampling_params: pass n= and seeds/seed= to generate(), not 'n'/'sampling_seed'")
        if temperature is not None:
            sp["temperature"] = float(temperature)
        for k, v in sp.items():  # JSON has no NaN/inf: a server would get an invalid body, and blame
            if isinstance(v, float) and not math.isfinite(v):
                raise ValueError(f"sampling_params: {k} must be a finite number, got {v!r}")
        prompts = [list(map(int, p)) for p in prompt_ids]
        for i, p in enumerate(prompts):
            if not p:
                raise ValueError(f"prompt_ids[{i}] is empty")
        if seeds is not None:
            if len(seeds) != len(prompts) or any(len(s) != n for s in seeds):
                raise ValueError(f"seeds must be [num_prompts={len(prompts)}][n={n}]")
        rows: list[tuple[int, int, int]] = []
        for i in range(len(prompts)):
            for j in range(n):
                if seeds is not None:
                    s = int(seeds[i][j])
                elif seed is not None:
                    s = sample_seed(seed, i, j)
                else:
                    s = None
                rows.append((i, j, s))
        out = []
        bs = max(1, self.config.batch_size)
        for k in range(0, len(rows), bs):
            chunk = rows[k:k + bs]
            body = {
                "input_ids": [prompts[i] for i, _, _ in chunk],
                "sampling_params": [dict(sp, **({"sampling_seed": s} if s is not None else {})) for _, _, s in chunk],
                "rid": [f"aepo-{self._client_id}-{next(self._rid_counter)}" for _ in chunk],
                "return_logprob": bool(return_logprob),
                "stream": False,
            }
            out.append(([(i, j) for i, j, _ in chunk], body))
        return out

    async def generate(
        self,
        prompt_ids: Sequence[Sequence[int]],
        n: int = 1,
        sampling_params: dict | None = None,
        seeds: Sequence[Sequence[int]] | None = None,
        *,
        seed: int | None = None,
        temperature: float | None = None,
        return_logprob: bool = True,
        max_abort_retries: int = 3,
        deadline_s: float | None = None,
    ) -> list[list[Sample]]:
        """``n`` samples for every prompt: ``result[i][j]`` is prompt i, sample j.

        Seeds: ``seeds[i][j]`` explicitly, or ``seed`` (a base, e.g. the training step) from
        which each sample's seed is hashed; with neither the server draws them. ``temperature``
        overrides ``sampling_params["temperature"]`` for this call. ``deadline_s`` overrides the
        config's ``request_deadline_s`` for this call: past it :class:`RolloutError` is raised and
        every request still in flight is cancelled."""
        limit = deadline_s if deadline_s is not None else self.config.request_deadline_s
        if limit is not None and not (isinstance(limit, (int, float)) and math.isfinite(limit) and limit > 0):
            raise ValueError(f"generate: deadline_s must be a finite number > 0, got {limit!r}")
        deadline = _Deadline(limit) if limit is not None else None
        bodies = self.build_generate_bodies(prompt_ids, n, sampling_params, seeds, seed, temperature, return_logprob)
        results: list[list[Sample | None]] = [[None] * n for _ in range(len(prompt_ids))]
        errors: list[str] = []

        async def run(idx: int, rows, body):
            what = f"generate batch {idx} ({len(rows)} sequences)"
            for attempt in range(max_abort_retries + 1):
                url, data = await self._post_with_retries("/generate", body, what, deadline, errors)
                if not isinstance(data, list) or len(data) != len(rows):
                    raise RolloutError(f"{what}: {url} returned {type(data).__name__} of "
                                       f"{len(data) if isinstance(data, list) else '?'} items, expected {len(rows)}")
                aborted = []
                for (i, j), sp, obj in zip(rows, body["sampling_params"], data):
                    s = _to_sample(i, j, obj, sp.get("sampling_seed"), url)
                    if s.finish_type == "abort":
                        aborted.append(((i, j), sp))
                    else:
                        results[i][j] = s
                if not aborted:
                    return
                log.warning("%s: %d sequences aborted on %s; re-sending", what, len(aborted), url)
                rows = [r for r, _ in aborted]
                body = dict(body, input_ids=[list(prompt_ids[i]) for i, _ in rows],
                            sampling_params=[sp for _, sp in aborted],
                            rid=[f"aepo-{self._client_id}-{next(self._rid_counter)}" for _ in rows])
                await asyncio.sleep(min(self.config.backoff_s * (2 ** attempt), self.config.max_backoff_s))
            raise RolloutError(f"{what}: {len(rows)} sequences still aborted after {max_abort_retries + 1} tries")

        tasks = [asyncio.ensure_future(run(k, rows, body)) for k, (rows, body) in enumerate(bodies)]
        try:
            pending = set(tasks)
            while pending:
                timeout = None if deadline is None else max(0.0, deadline.remaining())
                done, pending = await asyncio.wait(pending, timeout=timeout, return_when=asyncio.FIRST_EXCEPTION)
                for t in done:
                    if t.exception() is not None:
                        raise t.exception()
                if pending and not done:  # the deadline passed with batches still queued or in flight
                    raise RolloutError(
                        f"generate: {len(pending)} of {len(tasks)} batches not done within {deadline} "
                        f"(servers {self.urls}); last error: {errors[-1] if errors else 'none (still generating)'}")
        finally:
            for t in tasks:  # one batch failed or the deadline passed: stop the others (no orphans)
                if not t.done():
                    t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        missing = [(i, j) for i, r in enumerate(results) for j, s in enumerate(r) if s is None]
        if missing:  # cannot happen unless a code path above is wrong: never return fewer samples
            raise RolloutError(f"generate: {len(missing)} samples missing, first {missing[:5]}")
        return results  # type: ignore[return-value]

    # ------------------------------------------------------------------ control
    async def _post_each(self, urls: Sequence[str], path: str, body: dict | None, timeout_s: float | None = None) -> dict[str, tuple[int, Any]]:
        import aiohttp

        async def one(u):
            try:
                return u, await self._request("POST", u, path, body if body is not None else {}, timeout_s=timeout_s)
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
                return u, (0, f"{type(e).__name__}: {e}")

        return dict(await asyncio.gather(*(one(u) for u in urls)))

    async def update_weights_from_disk(self, model_path: str, weight_version: str | None = None, *,
                                       flush_cache: bool = True, abort_all_requests: bool = False,
                                       timeout_s: float | None = None) -> dict[str, Any]:
        """``POST /update_weights_from_disk`` on every weight-update URL; raise unless all succeed."""
        body: dict[str, Any] = {"model_path": model_path, "flush_cache": flush_cache,
                                "abort_all_requests": abort_all_requests}
        if weight_version is not None:
            body["weight_version"] = str(weight_version)
        res = await self._post_each(self.weight_update_urls, "/update_weights_from_disk", body, timeout_s)
        bad = {u: r for u, r in res.items() if r[0] != 200 or not (isinstance(r[1], dict) and r[1].get("success"))}
        if bad:
            raise RolloutError(f"update_weights_from_disk({model_path!r}, version={weight_version!r}) failed on "
                               + "; ".join(f"{u}: HTTP {s}: {str(b)[:300]}" for u, (s, b) in bad.items()))
        return {u: r[1] for u, r in res.items()}

    async def model_info(self, urls: Sequence[str] | None = None) -> dict[str, dict]:
        urls = list(urls or self.weight_update_urls)

        async def one(u):
            status, data = await self._request("GET", u, "/model_info", timeout_s=30.0)
            if status != 200 or not isinstance(data, dict):
                raise RolloutError(f"{u}/model_info answered {status}: {str(data)[:300]}")
            return u, data

        return dict(await asyncio.gather(*(one(u) for u in urls)))

    async def weight_versions(self, urls: Sequence[str] | None = None) -> dict[str, str | None]:
        return {u: d.get("weight_version") for u, d in (await self.model_info(urls)).items()}

    async def server_info(self, url: str | None = None) -> dict:
        u = url or self.urls[0]
        status, data = await self._request("GET", u, "/server_info", timeout_s=30.0)
        if status != 200:
            raise RolloutError(f"{u}/server_info answered {status}: {str(data)[:300]}")
        return data

    async def flush_cache(self) -> dict[str, int]:
        return {u: r[0] for u, r in (await self._post_each(self.weight_update_urls, "/flush_cache", None)).items()}

    async def pause_generation(self, mode: str = "abort") -> None:
        await self._post_each(self.weight_update_urls, "/pause_generation", {"mode": mode})

    async def continue_generation(self) -> None:
        await self._post_each(self.weight_update_urls, "/continue_generation", {})

    async def abort_all(self) -> None:
        await self._post_each(self.weight_update_urls, "/abort_request", {"abort_all": True})


def _to_sample(i: int, j: int, obj: Any, seed: int | None, url: str) -> Sample:
    if not isinstance(obj, dict) or "meta_info" not in obj:
        raise RolloutError(f"{url}: malformed /generate item for prompt {i} sample {j}: {str(obj)[:300]}")
    meta = obj["meta_info"]
    ids = obj.get("output_ids")
    if ids is None:
        raise RolloutError(f"{url}: /generate item for prompt {i} sample {j} has no output_ids "
                           "(real SGLang: do not launch with a detokenizer-only mode)")
    lps = meta.get("output_token_logprobs")
    logprobs = None
    if lps is not None:
        logprobs = [float(e[0]) if e[0] is not None else float("nan") for e in lps]
        if ids and [int(e[1]) for e in lps] != [int(t) for t in ids]:
            raise RolloutError(f"{url}: output_token_logprobs token ids differ from output_ids (prompt {i} sample {j})")
    return Sample(prompt_index=i, sample_index=j, output_ids=[int(t) for t in ids], logprobs=logprobs,
                  finish_reason=meta.get("finish_reason") or {}, weight_version=meta.get("weight_version"),
                  seed=seed if seed is not None else -1, text=obj.get("text"), server=url, meta_info=meta)


def run_sync(coro, client: RolloutClient | None = None):
    """Run a client coroutine from synchronous code in a fresh event loop, e.g.
    ``run_sync(client.generate(...), client)``; the client's session for that loop is closed
    before the loop ends (pass ``client`` to avoid "Unclosed connector" warnings)."""

    async def main():
        try:
            return await coro
        finally:
            if client is not None:
                await client.release_loop_session()

    return asyncio.run(main())
