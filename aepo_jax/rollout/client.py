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

The pieces: ``client_config.py`` (options, errors), ``client_wire.py`` (request bodies, result
parsing), ``client_transport.py`` (sessions, retries, Retry-After, the health watchdog).
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import logging
import math
import time
from typing import Any, Sequence

# The client's public names live where they are built; they are imported from here too.
from aepo_jax.rollout.client_config import ClientConfig, RolloutError, ServerRequestError
from aepo_jax.rollout.client_transport import Deadline, ServerPool, parse_retry_after
from aepo_jax.rollout.client_wire import Sample, generate_bodies, sample_seed, to_sample

__all__ = ["ClientConfig", "RolloutClient", "RolloutError", "Sample", "ServerRequestError", "parse_retry_after",
           "run_sync", "sample_seed"]

log = logging.getLogger("aepo_jax.rollout.client")


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
        self._pool = ServerPool(self.urls, cfg)
        self._rid_counter = itertools.count()
        self._client_id = hashlib.blake2b(repr((id(self), time.time())).encode(), digest_size=4).hexdigest()

    def _new_rid(self) -> str:
        return f"aepo-{self._client_id}-{next(self._rid_counter)}"

    # ------------------------------------------------------------------ session
    async def release_loop_session(self) -> None:
        """Close the HTTP session if it belongs to the running event loop (before that loop ends)."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        if self._pool.session_is_on(loop):
            await self.close()

    async def close(self) -> None:
        await self._pool.close()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.close()

    # ------------------------------------------------------------------ health
    async def health(self, url: str, timeout_s: float = 5.0) -> bool:
        return await self._pool.probe_health(url, timeout_s) is None

    async def wait_healthy(self, deadline_s: float = 300.0, poll_s: float = 0.5, urls: Sequence[str] | None = None) -> None:
        """Wait until every server answers ``GET /health`` with 200; TimeoutError names the others."""
        urls = list(urls or dict.fromkeys(self.urls + self.weight_update_urls))
        t_end = time.monotonic() + deadline_s
        pending = set(urls)
        while True:
            ok = await asyncio.gather(*(self.health(u, timeout_s=min(5.0, max(deadline_s, 0.1))) for u in pending))
            pending -= {u for u, good in zip(list(pending), ok) if good}
            if not pending:
                self._pool.mark_alive(urls)
                return
            if time.monotonic() >= t_end:
                raise TimeoutError(f"servers not healthy after {deadline_s:.0f}s: {sorted(pending)}")
            await asyncio.sleep(poll_s)

    # ------------------------------------------------------------------ generation
    def build_generate_bodies(self, prompt_ids: Sequence[Sequence[int]], n: int = 1,
                              sampling_params: dict | None = None, seeds: Sequence[Sequence[int]] | None = None,
                              seed: int | None = None, temperature: float | None = None,
                              return_logprob: bool = True) -> list[tuple[list[tuple[int, int]], dict]]:
        """The /generate bodies for a rollout: [(the (prompt, sample) of each row, body)]."""
        return generate_bodies(prompt_ids, n, sampling_params, seeds, seed, temperature, return_logprob,
                               batch_size=self.config.batch_size, new_rid=self._new_rid)

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
        deadline = Deadline(limit) if limit is not None else None
        bodies = self.build_generate_bodies(prompt_ids, n, sampling_params, seeds, seed, temperature, return_logprob)
        results: list[list[Sample | None]] = [[None] * n for _ in range(len(prompt_ids))]
        errors: list[str] = []

        async def run(idx: int, rows, body):
            what = f"generate batch {idx} ({len(rows)} sequences)"
            for attempt in range(max_abort_retries + 1):
                url, data = await self._pool.post_with_retries("/generate", body, what, deadline, errors)
                if not isinstance(data, list) or len(data) != len(rows):
                    raise RolloutError(f"{what}: {url} returned {type(data).__name__} of "
                                       f"{len(data) if isinstance(data, list) else '?'} items, expected {len(rows)}")
                aborted = []
                for (i, j), sp, obj in zip(rows, body["sampling_params"], data):
                    s = to_sample(i, j, obj, sp.get("sampling_seed"), url)
                    if s.finish_type == "abort":
                        aborted.append(((i, j), sp))
                    else:
                        results[i][j] = s
                if not aborted:
                    return
                log.warning("%s: %d sequences aborted on %s; re-sending", what, len(aborted), url)
                rows = [r for r, _ in aborted]
                body = dict(body, input_ids=[list(prompt_ids[i]) for i, _ in rows],
                            sampling_params=[sp for _, sp in aborted], rid=[self._new_rid() for _ in rows])
                await asyncio.sleep(self.config.backoff(attempt))
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

    # ------------------------------------------------------------------ weights and server state
    async def update_weights_from_disk(self, model_path: str, weight_version: str | None = None, *,
                                       flush_cache: bool = True, abort_all_requests: bool = False,
                                       timeout_s: float | None = None) -> dict[str, Any]:
        """``POST /update_weights_from_disk`` on every weight-update URL; raise unless all succeed."""
        body: dict[str, Any] = {"model_path": model_path, "flush_cache": flush_cache,
                                "abort_all_requests": abort_all_requests}
        if weight_version is not None:
            body["weight_version"] = str(weight_version)
        res = await self._pool.post_each(self.weight_update_urls, "/update_weights_from_disk", body, timeout_s)
        bad = {u: r for u, r in res.items() if r[0] != 200 or not (isinstance(r[1], dict) and r[1].get("success"))}
        if bad:
            raise RolloutError(f"update_weights_from_disk({model_path!r}, version={weight_version!r}) failed on "
                               + "; ".join(f"{u}: HTTP {s}: {str(b)[:300]}" for u, (s, b) in bad.items()))
        return {u: r[1] for u, r in res.items()}

    async def _post_control(self, path: str, body: dict, what: str, urls: Sequence[str] | None = None,
                            timeout_s: float | None = None, need_success: bool = True) -> dict[str, Any]:
        """POST ``body`` to every weight-update URL at once; RolloutError naming each server that
        did not answer 200 (and, with ``need_success``, ``"success": true``)."""
        res = await self._pool.post_each(list(urls or self.weight_update_urls), path, body, timeout_s)
        bad = {u: r for u, r in res.items()
               if r[0] != 200 or (need_success and not (isinstance(r[1], dict) and r[1].get("success")))}
        if bad:
            raise RolloutError(f"{what} failed on " + "; ".join(f"{u}: HTTP {s}: {str(b)[:300]}" for u, (s, b) in bad.items()))
        return {u: r[1] for u, r in res.items()}

    async def init_weights_update_group(self, url: str, *, master_address: str, master_port: int, rank_offset: int,
                                        world_size: int, group_name: str = "weight_update_group",
                                        backend: str = "nccl", timeout_s: float | None = None) -> dict[str, Any]:
        """``POST /init_weights_update_group`` on one server: its ranks join the learner's process
        group (they block until rank 0, the learner, joins too)."""
        body = {"master_address": master_address, "master_port": int(master_port), "rank_offset": int(rank_offset),
                "world_size": int(world_size), "group_name": group_name, "backend": backend}
        return (await self._post_control("/init_weights_update_group", body,
                                         f"init_weights_update_group(rank_offset={rank_offset})", [url], timeout_s))[url]

    async def update_weights_from_distributed(self, names: Sequence[str], dtypes: Sequence[str],
                                              shapes: Sequence[Sequence[int]], *, weight_version: str | None = None,
                                              group_name: str = "weight_update_group",
                                              load_format: str | None = "flattened_bucket", flush_cache: bool = True,
                                              abort_all_requests: bool = False,
                                              timeout_s: float | None = None) -> dict[str, Any]:
        """``POST /update_weights_from_distributed`` on every weight-update URL: each receives the
        broadcast the caller sends on the group meanwhile (see ``dist_sync``)."""
        body: dict[str, Any] = {"names": list(names), "dtypes": list(dtypes), "shapes": [list(s) for s in shapes],
                                "group_name": group_name, "flush_cache": flush_cache,
                                "abort_all_requests": abort_all_requests, "load_format": load_format}
        if weight_version is not None:
            body["weight_version"] = str(weight_version)
        return await self._post_control("/update_weights_from_distributed", body,
                                        f"update_weights_from_distributed({len(body['names'])} tensors, "
                                        f"version={weight_version!r})", timeout_s=timeout_s)

    async def destroy_weights_update_group(self, group_name: str = "weight_update_group",
                                           timeout_s: float | None = 60.0) -> dict[str, Any]:
        return await self._post_control("/destroy_weights_update_group", {"group_name": group_name},
                                        "destroy_weights_update_group", timeout_s=timeout_s)

    async def pause_generation(self, mode: str = "abort", timeout_s: float | None = 60.0) -> dict[str, Any]:
        """``POST /pause_generation`` on every weight-update URL (``abort`` | ``retract`` | ``in_place``)."""
        return await self._post_control("/pause_generation", {"mode": mode}, f"pause_generation({mode!r})",
                                        timeout_s=timeout_s, need_success=False)

    async def continue_generation(self, timeout_s: float | None = 60.0) -> dict[str, Any]:
        return await self._post_control("/continue_generation", {}, "continue_generation", timeout_s=timeout_s,
                                        need_success=False)

    async def _get_info(self, url: str, path: str) -> dict:
        status, data, _ = await self._pool.request("GET", url, path, timeout_s=30.0)
        if status != 200 or not isinstance(data, dict):
            raise RolloutError(f"{url}{path} answered {status}: {str(data)[:300]}")
        return data

    async def model_info(self, urls: Sequence[str] | None = None) -> dict[str, dict]:
        urls = list(urls or self.weight_update_urls)
        infos = await asyncio.gather(*(self._get_info(u, "/model_info") for u in urls))
        return dict(zip(urls, infos))

    async def weight_versions(self, urls: Sequence[str] | None = None) -> dict[str, str | None]:
        return {u: d.get("weight_version") for u, d in (await self.model_info(urls)).items()}

    async def server_info(self, url: str | None = None) -> dict:
        return await self._get_info(url or self.urls[0], "/server_info")


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
