"""The async SGLang client against real embedded-server subprocesses: seeded n-sample rollouts,
round robin, 4xx vs 5xx, 429 with Retry-After, health deadline, a server killed mid-rollout, a
server stopped (SIGSTOP) mid-rollout, and the overall deadline of a call."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time

import pytest

from aepo_jax.rollout.testing import load_sglang_api_types, make_tiny_model_dir

VOCAB = 256
SERVER_ARGS = ["--max-batch", "8", "--batch-buckets", "8", "--prompt-buckets", "16",
               "--gen-buckets", "16", "--skip-tokenizer-init"]
PROMPTS = [[1 + i, 3 + 2 * i, 7, 11 + i] for i in range(12)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model_dir(str(tmp_path_factory.mktemp("client_model")), seed=0, vocab_size=VOCAB,
                               init_std=0.3, eos_token_id=2)


@pytest.fixture(scope="module")
def servers(model_dir, tmp_path_factory):
    from aepo_jax.rollout.launch import launch_servers

    sps = launch_servers(model_dir, 2, extra_args=SERVER_ARGS, wait_s=240,
                         log_dir=str(tmp_path_factory.mktemp("client_logs")))
    yield sps
    for sp in sps:
        sp.stop()


def run(coro):
    return asyncio.run(coro)


def _client(urls, **kw):
    from aepo_jax.rollout.client import RolloutClient

    kw = {"batch_size": 8, "backoff_s": 0.05, **kw}
    return RolloutClient(urls, **kw)


SP = {"max_new_tokens": 10, "ignore_eos": True}


def _wait_healthy(url, **kw):
    from aepo_jax.rollout.client import run_sync

    c = _client(url)
    run_sync(c.wait_healthy(**{"deadline_s": 30, **kw}), c)


def _ids(result):
    return [[s.output_ids for s in row] for row in result]


def test_seeded_n_samples_reproducible_across_servers(servers):
    from aepo_jax.rollout.client import sample_seed

    async def go():
        async with _client([s.url for s in servers]) as c:
            await c.wait_healthy(30)
            r1 = await c.generate(PROMPTS, n=4, sampling_params=SP, seed=123, temperature=1.0)
            r2 = await c.generate(PROMPTS, n=4, sampling_params=SP, seed=123, temperature=1.0)
        async with _client(servers[1].url) as c:
            r3 = await c.generate(PROMPTS, n=4, sampling_params=SP, seed=123, temperature=1.0)
        return r1, r2, r3

    r1, r2, r3 = run(go())
    assert len(r1) == len(PROMPTS) and all(len(row) == 4 for row in r1)
    assert _ids(r1) == _ids(r2) == _ids(r3)  # same seeds: same samples, whichever server
    assert {s.server for row in r1 for s in row} == {s.url for s in servers}  # round robin used both
    for i, row in enumerate(r1):
        assert len({tuple(s.output_ids) for s in row}) > 1  # the n samples differ
        for j, s in enumerate(row):
            assert (s.prompt_index, s.sample_index, s.seed) == (i, j, sample_seed(123, i, j))
            assert len(s.output_ids) == 10 and len(s.logprobs) == 10 and s.finish_type == "length"
            assert s.weight_version == "default" and s.text is None  # --skip-tokenizer-init: no text
            api = load_sglang_api_types()
            if api is not None:
                api.GenerateMetaInfo.from_json_value(s.meta_info)


def test_per_call_temperature_and_explicit_seeds(servers):
    async def go():
        async with _client(servers[0].url) as c:
            greedy = await c.generate(PROMPTS[:3], n=3, sampling_params=SP, seed=1, temperature=0.0)
            seeds = [[10 * i + j for j in range(2)] for i in range(3)]
            a = await c.generate(PROMPTS[:3], n=2, sampling_params=SP, seeds=seeds, temperature=1.0)
            b = await c.generate(PROMPTS[:3], n=2, sampling_params=SP, seeds=seeds, temperature=1.0)
            hot = await c.generate(PROMPTS[:3], n=2, sampling_params=dict(SP, temperature=0.0), seeds=seeds,
                                   temperature=1.0)
        return greedy, a, b, hot

    greedy, a, b, hot = run(go())
    assert all(len({tuple(s.output_ids) for s in row}) == 1 for row in greedy)  # T=0: identical
    assert _ids(a) == _ids(b) and [[s.seed for s in row] for row in a] == [[0, 1], [10, 11], [20, 21]]
    assert _ids(hot) == _ids(a)  # the per-call temperature overrides sampling_params


def test_bad_request_is_not_retried(servers):
    from aepo_jax.rollout.client import ServerRequestError

    async def go():
        async with _client([s.url for s in servers]) as c:
            with pytest.raises(ServerRequestError) as e:
                await c.generate(PROMPTS[:1], sampling_params={"top_p": 1.5})
            return e.value

    err = run(go())
    assert err.status == 400 and "top_p" in str(err.body)
    with pytest.raises(ValueError, match="max_tokens"):
        _client(servers[0].url).build_generate_bodies(PROMPTS[:1], sampling_params={"max_tokens": 3})
    with pytest.raises(ValueError, match="seeds"):
        _client(servers[0].url).build_generate_bodies(PROMPTS[:2], n=2, seeds=[[1, 2]])
    for sp, temp in (({}, float("nan")), ({"top_p": float("inf")}, None)):
        with pytest.raises(ValueError, match="temperature|top_p"):
            _client(servers[0].url).build_generate_bodies(PROMPTS[:1], sampling_params=sp, temperature=temp)


def test_wait_healthy_deadline_names_the_server():
    from aepo_jax.rollout.launch import free_port

    url = f"http://127.0.0.1:{free_port()}"
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match=url):
        _wait_healthy(url, deadline_s=1.0, poll_s=0.1)
    assert time.monotonic() - t0 < 10


class LocalServer:
    """A tiny aiohttp server on 127.0.0.1 in a thread, for faults a real server does not make on
    demand: ``routes`` maps (method, path) to an async handler."""

    def __init__(self, routes):
        from aepo_jax.rollout.launch import free_port

        self.routes = routes
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()
        assert self._ready.wait(10)

    def _serve(self):
        from aiohttp import web

        async def main():
            app = web.Application()
            for (method, path), handler in self.routes.items():
                app.router.add_route(method, path, handler)
            runner = web.AppRunner(app, handler_cancellation=True)  # a dropped client cancels its handler
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", self.port).start()
            self._stop = asyncio.Event()
            self._ready.set()
            await self._stop.wait()
            await runner.cleanup()

        self._loop = asyncio.new_event_loop()
        self._loop.run_until_complete(main())

    def close(self):
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)


class FlakyProxy(LocalServer):
    """Fault injection in front of a real server: the first ``fail`` /generate calls get ``status``
    (with ``headers``), later ones are forwarded unchanged. ``times`` records each call's arrival."""

    def __init__(self, target: str, fail: int, status: int = 503, headers: dict | None = None):
        self.target, self.fail, self.status, self.headers = target, fail, status, headers or {}
        self.calls, self.times = 0, []
        super().__init__({("POST", "/generate"): self._handle})

    async def _handle(self, request):
        import aiohttp
        from aiohttp import web

        self.calls += 1
        self.times.append(time.monotonic())
        if self.calls <= self.fail:
            return web.json_response({"error": {"message": "injected"}}, status=self.status, headers=self.headers)
        async with aiohttp.ClientSession() as s:
            async with s.post(self.target + "/generate", data=await request.read(),
                              headers={"Content-Type": "application/json"}) as r:
                return web.Response(body=await r.read(), status=r.status, content_type="application/json")


def test_5xx_is_retried_with_backoff(servers):
    from aepo_jax.rollout.client import RolloutError

    proxy = FlakyProxy(servers[0].url, fail=2)
    try:
        async def go(max_retries):
            async with _client(proxy.url, max_retries=max_retries) as c:
                return await c.generate(PROMPTS[:2], n=2, sampling_params=SP, seed=5)

        r = run(go(3))
        assert proxy.calls == 3 and all(len(row) == 2 for row in r)
        proxy.calls, proxy.fail = 0, 10
        with pytest.raises(RolloutError, match="HTTP 503"):
            run(go(2))
        assert proxy.calls == 3
    finally:
        proxy.close()


def test_429_is_retried_after_retry_after(servers):
    """An overloaded server (429) is asked again after its Retry-After, without using up
    max_retries while the call has a deadline; without one, 429s count as retries."""
    from aepo_jax.rollout.client import RolloutError

    proxy = FlakyProxy(servers[0].url, fail=2, status=429, headers={"Retry-After": "1"})
    try:
        async def go(**kw):
            async with _client(proxy.url, **kw) as c:
                return await c.generate(PROMPTS[:2], n=2, sampling_params=SP, seed=5)

        r = run(go(max_retries=0, request_deadline_s=60))
        assert proxy.calls == 3 and all(len(row) == 2 for row in r)
        gaps = [b - a for a, b in zip(proxy.times, proxy.times[1:])]
        assert min(gaps) >= 0.9, gaps  # Retry-After: 1 honoured (the backoff alone is 0.05 s)
        proxy.calls, proxy.times = 0, []
        with pytest.raises(RolloutError, match="429"):
            run(go(max_retries=1))
        assert proxy.calls == 2
    finally:
        proxy.close()


def test_retry_after_header_forms():
    from email.utils import formatdate

    from aepo_jax.rollout.client import parse_retry_after

    assert parse_retry_after("3") == 3.0 and parse_retry_after(" 0.5 ") == 0.5
    assert parse_retry_after("-4") == 0.0
    now = time.time()
    assert 9 <= parse_retry_after(formatdate(now + 10, usegmt=True), now=now) <= 11
    assert parse_retry_after(formatdate(now - 10, usegmt=True), now=now) == 0.0
    assert parse_retry_after(None) is None and parse_retry_after("soon") is None
    assert parse_retry_after("nan") is None and parse_retry_after("inf") is None


def _stopped(sp):
    """Context: the server process is SIGSTOPped (alive, socket open, never answers), then resumed."""
    class _Ctx:
        def __enter__(self):
            os.kill(sp.proc.pid, signal.SIGSTOP)

        def __exit__(self, *exc):
            os.kill(sp.proc.pid, signal.SIGCONT)

    return _Ctx()


# Health probes fast enough for a test; the request timeout stays at its 600 s default, so only the
# health check can notice the stopped server in time.
FAST_HEALTH = {"health_check_interval_s": 0.3, "health_check_timeout_s": 1.0, "health_check_failures": 2}


def test_stopped_server_fails_over_within_seconds(servers, caplog):
    """One of two servers is SIGSTOPped: its connections open but nothing answers. The requests
    sent to it fail over to the other server within seconds, and every sample comes back, the same
    as from the live server alone."""
    victim, live = servers
    sp = dict(SP, max_new_tokens=12)

    async def go(urls):
        async with _client(urls, **FAST_HEALTH) as c:
            return await c.generate(PROMPTS, n=2, sampling_params=sp, seed=31)

    ref = run(go(live.url))
    with _stopped(victim), caplog.at_level("WARNING", logger="aepo_jax.rollout.client"):
        t0 = time.monotonic()
        got = run(go([victim.url, live.url]))
        took = time.monotonic() - t0
    assert took < 30, took
    assert _ids(got) == _ids(ref) and all(len(row) == 2 for row in got)
    assert {s.server for row in got for s in row} == {live.url}
    assert "stopped answering its health check" in caplog.text and victim.url in caplog.text
    _wait_healthy(victim.url)  # resumed, it serves again


def test_stopped_only_server_fails_the_call_within_seconds(servers):
    from aepo_jax.rollout.client import RolloutError

    victim = servers[0]

    async def go():
        async with _client(victim.url, max_retries=1, **FAST_HEALTH) as c:
            return await c.generate(PROMPTS[:2], n=2, sampling_params=SP, seed=3)

    with _stopped(victim):
        t0 = time.monotonic()
        with pytest.raises(RolloutError, match="stopped answering its health check") as e:
            run(go())
        took = time.monotonic() - t0
    assert took < 30, took
    assert victim.url in str(e.value)
    _wait_healthy(victim.url)


def test_stopped_then_resumed_server_completes_the_call(servers, caplog):
    """The only server is stopped, then resumed a few seconds into the call (as a restarted or
    briefly frozen server comes back): the call retries it and returns every sample."""
    victim = servers[0]

    async def go():
        async with _client(victim.url, max_retries=6, backoff_s=0.5, **FAST_HEALTH) as c:
            task = asyncio.create_task(c.generate(PROMPTS[:4], n=2, sampling_params=SP, seed=11))
            await asyncio.sleep(5.0)  # long enough for the health check to give up on it (~2.6 s)
            os.kill(victim.proc.pid, signal.SIGCONT)
            return await task

    os.kill(victim.proc.pid, signal.SIGSTOP)
    try:
        with caplog.at_level("WARNING", logger="aepo_jax.rollout.client"):
            got = run(go())
    finally:
        os.kill(victim.proc.pid, signal.SIGCONT)
    assert "stopped answering its health check" in caplog.text  # it was given up on, then retried
    assert [len(row) for row in got] == [2] * 4
    assert all(len(s.output_ids) == 10 for row in got for s in row)


def test_call_deadline_cancels_a_slow_healthy_server():
    """A server that answers /health but never finishes /generate: the call ends at its deadline
    (config or per call) with an error naming it, not after timeout_s x retries."""
    from aiohttp import web

    from aepo_jax.rollout.client import RolloutError

    started, dropped = [], []

    async def health(request):
        return web.Response(status=200)

    async def generate(request):
        started.append(time.monotonic())
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            dropped.append(time.monotonic())
            raise
        return web.json_response([])

    srv = LocalServer({("GET", "/health"): health, ("POST", "/generate"): generate})
    try:
        for kw, call_kw, limit in (({"request_deadline_s": 1.5}, {}, 1.5), ({}, {"deadline_s": 1.0}, 1.0)):
            async def go():
                async with _client(srv.url, **FAST_HEALTH, **kw) as c:
                    return await c.generate(PROMPTS, n=2, sampling_params=SP, **call_kw)

            t0 = time.monotonic()
            with pytest.raises(RolloutError, match=rf"request_deadline_s={limit:g}"):
                run(go())
            took = time.monotonic() - t0
            assert limit <= took < limit + 5, took
        assert len(started) >= 2  # the requests really were in flight when the deadline struck
        time.sleep(0.5)
        assert len(dropped) == len(started)  # and the client closed them (nothing left running)
    finally:
        srv.close()


def test_client_options_are_validated():
    from aepo_jax.rollout.client import RolloutClient

    for key, bad in (("request_deadline_s", float("nan")), ("request_deadline_s", 0), ("health_check_timeout_s", -1),
                     ("max_retries", -1), ("health_check_failures", 1.5), ("timeout_s", float("inf"))):
        with pytest.raises(ValueError, match=key):
            RolloutClient("http://127.0.0.1:9", **{key: bad})
    with pytest.raises(TypeError, match="nope"):
        RolloutClient("http://127.0.0.1:9", nope=1)


def test_server_killed_mid_rollout_is_survived_then_reported(servers):
    """Kill one of two servers while it holds requests: every sample still comes back, equal to
    what an undisturbed run gives (same seeds); a client left with only the dead server fails
    with a clear error instead of returning fewer samples."""
    from aepo_jax.rollout.client import RolloutError

    sp = dict(SP, max_new_tokens=14)
    prompts = [p * 5 for p in PROMPTS]  # 20 tokens: a shape not compiled yet, so requests stay in flight

    async def reference():
        async with _client(servers[0].url) as c:
            return await c.generate(prompts, n=2, sampling_params=sp, seed=77)

    async def disturbed(victim):
        async with _client([s.url for s in servers], batch_size=4) as c:
            task = asyncio.create_task(c.generate(prompts, n=2, sampling_params=sp, seed=77))
            deadline = time.monotonic() + 60
            held = False
            while time.monotonic() < deadline and not held:  # wait until the victim holds requests
                try:
                    st = (await c.server_info(victim.url))["internal_states"][0]
                    held = st["num_running_reqs"] + st["num_waiting_reqs"] > 0
                except Exception:
                    pass
                await asyncio.sleep(0.01)
            victim.kill()
            assert held, "the victim never held a request: the test did not kill it mid-rollout"
            return await task

    victim = servers[1]
    got = run(disturbed(victim))
    assert not victim.alive()
    assert all(len(row) == 2 for row in got)
    assert {s.server for row in got for s in row} <= {servers[0].url, victim.url}
    ref = run(reference())
    assert _ids(got) == _ids(ref)

    async def only_dead():
        async with _client(victim.url, max_retries=2) as c:
            return await c.generate(PROMPTS[:2], n=2, sampling_params=SP, seed=1)

    with pytest.raises(RolloutError, match=victim.url.split("//")[1]):
        run(only_dead())
