"""The embedded SGLang-compatible HTTP server (SGLang 0.5.23 native API) on the JAX sampler.

    python -m aepo_jax.rollout.server --model-path DIR --port N [--host 127.0.0.1] [--mesh DxT]

Endpoints, bodies and status codes follow ``../shared/notes/sglang-api.md`` (section 7): ``POST|PUT
/generate``, ``GET /health``, ``/health_generate``, ``/ready``, ``/model_info`` (+``/get_model_info``),
``/server_info`` (+``/get_server_info``), ``POST /update_weights_from_disk``, ``/update_weight_version``,
``GET|POST /flush_cache``, ``POST /abort_request``, ``/pause_generation``, ``/continue_generation``.

Batching: every ``/generate`` call puts its sequences on one queue; a single worker takes everything
queued (waiting ``--batch-wait-ms`` for concurrent arrivals), runs it as one sampler call in a worker
thread, and answers each caller. The sequences of one HTTP request always travel in one sampler call,
and a sampler call reads the weights once, so no response mixes weights. Like SGLang, a weight update
waits for in-flight ``/generate`` calls to finish (a write lock) and new calls wait for the update.

Log-probs: ``output_token_logprobs`` are ``log_softmax(logits / T)`` of the sampled tokens over the
full vocabulary (SGLang's default, temperature-scaled; T = 1 for greedy requests). With
``SGLANG_RETURN_ORIGINAL_LOGPROB=1`` in the server's environment they are ``log_softmax(logits)``
(temperature 1), as SGLang does.

Differences from SGLang (documented in docs/rollout.md): no prefix cache; ``abort`` of a running
request answers at once with an empty partial output; ``pause_generation`` in ``retract``/``in_place``
mode blocks new requests but lets the running batch finish; ``stop`` strings are applied to the
finished output (same result, extra compute); penalties, grammars and top/prompt logprobs are refused.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import json
import logging
import os
import random
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from aepo_jax.platform import mesh_spec_from_argv, setup_host_devices

log = logging.getLogger("aepo_jax.rollout.server")

SGLANG_API_VERSION = "0.5.23"


def _env_bool(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


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


@dataclass
class _Pending:
    item: Any  # protocol.GenerateItem
    request: Any  # sampler.SamplingRequest
    future: asyncio.Future
    t0: float
    aborted: bool = False
    running: bool = False


@dataclass
class ServerArgs:
    model_path: str
    host: str = "127.0.0.1"
    port: int = 30000
    dtype: str = "float32"
    mesh: str | None = None
    skip_tokenizer_init: bool = False
    weight_version: str = "default"
    context_length: int | None = None
    max_batch: int = 64
    batch_wait_ms: float = 5.0
    random_seed: int | None = None
    prompt_buckets: tuple[int, ...] = ()
    gen_buckets: tuple[int, ...] = ()
    batch_buckets: tuple[int, ...] = ()
    warmup: bool = True
    served_model_name: str | None = None
    extra: dict = field(default_factory=dict)


class EmbeddedServer:
    """State and handlers of one server process."""

    def __init__(self, args: ServerArgs):
        self.args = args
        self.status = "starting"
        self.start_error: str | None = None
        self.sampler = None
        self.tokenizer = None
        self.return_original_logprob = _env_bool("SGLANG_RETURN_ORIGINAL_LOGPROB")
        self.model_path = args.model_path
        self._queue: list[_Pending] = []
        self._inflight: dict[int, _Pending] = {}
        self._wake: asyncio.Event | None = None
        self._lock: RWLock | None = None
        self._unpaused: asyncio.Event | None = None
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="sampler")
        self._rng = random.Random(args.random_seed)
        self._active_http = 0
        self._last_batch_done = 0.0
        self._startup_time = time.time()
        self._model_cfg: dict = {}

    # ------------------------------------------------------------------ start-up
    def load(self) -> None:
        """Blocking: load the model and tokenizer, compile the smallest bucket."""
        from aepo_jax.rollout.sampler import Sampler, SamplerConfig, SamplingRequest

        a = self.args
        with open(os.path.join(a.model_path, "config.json")) as f:
            self._model_cfg = json.load(f)
        bb = a.batch_buckets or tuple(b for b in (1, 2, 4, 8, 16, 32, 64, 128, 256) if b < a.max_batch) + (a.max_batch,)
        cfg = SamplerConfig(max_batch=a.max_batch, batch_buckets=bb,
                            prompt_buckets=a.prompt_buckets, gen_buckets=a.gen_buckets)
        self.sampler = Sampler.from_pretrained(a.model_path, dtype=a.dtype, mesh=a.mesh, config=cfg,
                                               context_len=a.context_length)
        self.sampler.set_weight_version(a.weight_version)
        if not a.skip_tokenizer_init:
            self.tokenizer = load_tokenizer(a.model_path)
        if a.warmup:
            self.sampler.generate([SamplingRequest(input_ids=(0,), max_new_tokens=1, temperature=0.0, seed=0)])

    async def startup(self, app) -> None:
        self._wake = asyncio.Event()
        self._lock = RWLock()
        self._unpaused = asyncio.Event()
        self._unpaused.set()
        loop = asyncio.get_running_loop()

        async def _load():
            try:
                await loop.run_in_executor(self._executor, self.load)
                self.status = "ready"
                log.info("server ready: %s (weight_version=%s)", self.args.model_path, self.sampler.weight_version)
                print(f"[aepo_jax.rollout.server] ready on http://{self.args.host}:{self.args.port}", flush=True)
            except Exception as e:  # fail fast, as SGLang does: whoever launched us sees the exit
                self.status = "failed"
                self.start_error = f"{type(e).__name__}: {e}"
                log.exception("model load failed")
                print(f"[aepo_jax.rollout.server] start-up failed: {self.start_error}", file=sys.stderr, flush=True)
                os._exit(1)

        app["loader"] = asyncio.create_task(_load())
        app["worker"] = asyncio.create_task(self._worker())

    async def cleanup(self, app) -> None:
        for k in ("worker", "loader"):
            app[k].cancel()
        self._executor.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------------ batching worker
    async def _worker(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wake.wait()
            if self.args.batch_wait_ms > 0:
                await asyncio.sleep(self.args.batch_wait_ms / 1000.0)
            self._wake.clear()
            batch = [p for p in self._queue if not p.aborted]
            self._queue = []
            if not batch or self.status != "ready":
                if batch:  # not ready yet: put them back and wait for the loader
                    self._queue = batch + self._queue
                    await asyncio.sleep(0.05)
                    self._wake.set()
                continue
            for p in batch:
                p.running = True
            try:
                results, version = await loop.run_in_executor(
                    self._executor, self.sampler.generate_versioned, [p.request for p in batch])
            except Exception as e:  # an engine failure answers every caller with a 500
                log.exception("generation failed")
                for p in batch:
                    if not p.future.done():
                        p.future.set_exception(e)
                continue
            self._last_batch_done = time.time()
            for p, r in zip(batch, results):
                if not p.future.done():
                    p.future.set_result((r, version))

    def _submit(self, items, requests) -> list[_Pending]:
        loop = asyncio.get_running_loop()
        now = time.time()
        pend = [_Pending(i, r, loop.create_future(), now) for i, r in zip(items, requests)]
        for p in pend:
            self._inflight[id(p)] = p
        self._queue.extend(pend)  # one request's sequences enter the queue together
        self._wake.set()
        return pend

    def _abort(self, match) -> int:
        n = 0
        for p in list(self._inflight.values()):
            if match(p) and not p.future.done():
                p.aborted = True
                p.future.set_result(None)
                n += 1
        return n

    # ------------------------------------------------------------------ helpers
    def _vocab_size(self) -> int:
        return int(self.sampler.vocab_size)

    def _seed_for(self, item) -> int:
        return item.seed if item.seed is not None else self._rng.getrandbits(63)

    def _text(self, ids: list[int], skip_special: bool) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special)

    def _apply_stop_strings(self, item, ids, lpt, lp1, finish):
        """Cut the output at the first stop string (SGLang checks it before token stops)."""
        stops = item.sampling.stop
        if not stops or not ids:
            return ids, lpt, lp1, finish, None

        def first_hit(k):
            text = self._text(ids[:k], item.sampling.skip_special_tokens)
            found = [(text.find(s), s) for s in stops if s in text]
            return min(found) if found else None

        if first_hit(len(ids)) is None:
            return ids, lpt, lp1, finish, None
        lo, hi = 0, len(ids)  # smallest k whose decoded prefix contains a stop string
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if first_hit(mid) is None:
                lo = mid
            else:
                hi = mid
        _, s = first_hit(hi)
        return ids[:hi], lpt[:hi], lp1[:hi], {"type": "stop", "matched": s}, s

    def _build(self, p: _Pending, result, version: str) -> dict:
        from aepo_jax.rollout import protocol

        item = p.item
        now = time.time()
        if result is None:  # aborted
            fr = (protocol.finish_abort("Aborted") if p.running
                  else protocol.finish_abort("Abort in waiting queue"))
            return protocol.build_response(item, output_ids=[], finish_reason=fr, logprobs=[],
                                           weight_version=self.sampler.weight_version,
                                           e2e_latency=now - p.t0, now=now,
                                           text="" if self.tokenizer is not None else None)
        ids, lpt, lp1, fr = result.output_ids, result.logprobs, result.logprobs_t1, result.finish_reason
        matched_str = None
        if self.tokenizer is not None:
            ids, lpt, lp1, fr, matched_str = self._apply_stop_strings(item, ids, lpt, lp1, fr)
        lps = lp1 if self.return_original_logprob else lpt
        text = token_texts = None
        if self.tokenizer is not None:
            sp = item.sampling
            shown = ids
            if fr.get("type") == "stop" and not sp.no_stop_trim and matched_str is None and ids:
                shown = ids[:-1]  # the matched stop token is trimmed from text (kept in output_ids)
            text = self._text(shown, sp.skip_special_tokens)
            if matched_str is not None and not sp.no_stop_trim:
                cut = text.find(matched_str)
                text = text[:cut] if cut >= 0 else text
            if item.return_logprob and item.return_text_in_logprobs:
                token_texts = [self._text([t], False) for t in ids]
        return protocol.build_response(item, output_ids=ids, finish_reason=fr, logprobs=lps,
                                       weight_version=version, e2e_latency=now - p.t0, now=now,
                                       text=text, token_texts=token_texts)

    # ------------------------------------------------------------------ handlers
    async def generate(self, request):
        from aiohttp import web

        from aepo_jax.rollout import protocol
        from aepo_jax.rollout.sampler import SamplingRequest

        try:
            raw = await request.read()
            try:
                body = json.loads(raw) if raw else None
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise protocol.malformed_json_error(str(e))
            if self.status != "ready":
                return web.json_response({"error": {"message": f"server is {self.status}"
                                                    + (f": {self.start_error}" if self.start_error else "")}},
                                         status=503)
            tok = self.tokenizer
            parsed = protocol.parse_generate(
                body, vocab_size=self._vocab_size(), context_len=self.sampler.context_len,
                tokenize=(lambda t: tok.encode(t)) if tok is not None else None)
        except protocol.RequestError as e:
            return web.json_response(e.body, status=e.status)

        await self._unpaused.wait()  # /pause_generation: new requests wait for /continue_generation
        await self._lock.acquire_read()
        self._active_http += 1
        try:
            reqs = []
            for it in parsed.items:
                s = it.sampling
                reqs.append(SamplingRequest(
                    input_ids=tuple(it.input_ids), max_new_tokens=s.max_new_tokens,
                    temperature=s.temperature, top_p=s.top_p,
                    top_k=-1 if s.top_k >= protocol.TOP_K_ALL else s.top_k, min_p=s.min_p,
                    stop_token_ids=s.stop_token_ids, ignore_eos=s.ignore_eos, seed=self._seed_for(it)))
            pend = self._submit(parsed.items, reqs)
            try:
                outs = await asyncio.gather(*(p.future for p in pend))
            except Exception as e:
                return web.json_response({"error": {"message": f"generation failed: {type(e).__name__}: {e}"}},
                                         status=500)
            finally:
                for p in pend:
                    self._inflight.pop(id(p), None)
            version = self.sampler.weight_version
            objs = []
            for p, o in zip(pend, outs):
                if o is None:
                    objs.append(self._build(p, None, version))
                else:
                    objs.append(self._build(p, o[0], o[1]))
        finally:
            self._active_http -= 1
            await self._lock.release_read()

        if parsed.stream:
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await resp.prepare(request)
            for i, o in enumerate(objs):
                if not parsed.is_single:
                    o = {**o, "index": i}
                await resp.write(b"data: " + json.dumps(o).encode() + b"\n\n")
            await resp.write(b"data: [DONE]\n\n")
            await resp.write_eof()
            return resp
        return web.json_response(objs[0] if parsed.is_single else objs)

    async def health(self, request):
        from aiohttp import web

        return web.Response(status=200 if self.status == "ready" else 503)

    async def health_generate(self, request):
        from aiohttp import web

        from aepo_jax.rollout import protocol
        from aepo_jax.rollout.sampler import SamplingRequest

        if self.status != "ready":
            return web.Response(status=503)
        if self._inflight or time.time() - self._last_batch_done < 1.0:
            return web.Response(status=200)  # busy (or just was): that is proof of life
        item = protocol.GenerateItem(rid=f"HEALTH_CHECK_{time.time()}", input_ids=[0],
                                     sampling=protocol.SamplingSpec(max_new_tokens=1, temperature=0.0), seed=0)
        pend = self._submit([item], [SamplingRequest(input_ids=(0,), max_new_tokens=1, temperature=0.0, seed=0)])
        try:
            await asyncio.wait_for(asyncio.shield(pend[0].future), timeout=20.0)
            return web.Response(status=200)
        except Exception:
            return web.Response(status=503)
        finally:
            self._inflight.pop(id(pend[0]), None)

    def _model_info(self) -> dict:
        c = self._model_cfg
        return {
            "model_path": self.model_path,
            "served_model_name": self.args.served_model_name or self.model_path,
            "tokenizer_path": self.args.model_path,
            "is_generation": True,
            "preferred_sampling_params": None,
            "weight_version": self.sampler.weight_version if self.sampler else self.args.weight_version,
            "load_format": "auto",
            "reasoning_parser": None,
            "tool_call_parser": None,
            "disaggregation_mode": "null",
            "has_image_understanding": False,
            "has_audio_understanding": False,
            "model_type": c.get("model_type"),
            "architectures": c.get("architectures"),
        }

    async def model_info(self, request):
        from aiohttp import web

        if self.sampler is None:
            return web.json_response({"error": {"message": f"server is {self.status}"}}, status=503)
        return web.json_response(self._model_info())

    async def server_info(self, request):
        from aiohttp import web

        import aepo_jax

        a = self.args
        s = self.sampler
        ctx = s.context_len if s else (a.context_length or 0)
        info = {
            "model_path": self.model_path,
            "served_model_name": a.served_model_name or self.model_path,
            "tokenizer_path": a.model_path,
            "host": a.host,
            "port": a.port,
            "skip_tokenizer_init": self.tokenizer is None,
            "context_length": ctx,
            "max_context_length": ctx,
            "max_req_input_len": max(ctx - 1, 0),
            "max_total_num_tokens": ctx * a.max_batch,
            "tp_size": 1,
            "dp_size": 1,
            "dtype": a.dtype,
            "mesh": a.mesh,
            "max_running_requests": a.max_batch,
            "random_seed": a.random_seed,
            "weight_version": s.weight_version if s else a.weight_version,
            "return_original_logprob": self.return_original_logprob,
            "incremental_streaming_output": False,
            "disaggregation_mode": "null",
            "status": self.status,
            "start_error": self.start_error,
            "startup_time": self._startup_time,
            "launch_command": " ".join([sys.executable, "-m", "aepo_jax.rollout.server"] + sys.argv[1:]),
            "internal_states": [{"num_running_reqs": sum(p.running for p in self._inflight.values()),
                                 "num_waiting_reqs": len(self._queue),
                                 "paused": not self._unpaused.is_set() if self._unpaused else False}],
            "version": aepo_jax.__version__,
            "sglang_api_version": SGLANG_API_VERSION,
            "frontend": "aepo-jax",
        }
        return web.json_response(info)

    async def _json_body(self, request) -> dict:
        from aepo_jax.rollout import protocol

        raw = await request.read()
        if not raw:
            return {}
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise protocol.malformed_json_error(str(e))
        if not isinstance(body, dict):
            raise protocol.RequestError(400, {"object": "error", "message": "Request body must be a JSON object.",
                                              "type": "Bad Request", "param": None, "code": 400})
        return body

    @staticmethod
    def _field_error(name: str, msg: str):
        from aepo_jax.rollout import protocol

        return protocol.RequestError(400, {"object": "error", "message": f"{name}: {msg}",
                                           "type": "Bad Request", "param": name, "code": 400})

    async def update_weights_from_disk(self, request):
        from aiohttp import web

        from aepo_jax.rollout import protocol

        try:
            body = await self._json_body(request)
            path = body.get("model_path")
            if not isinstance(path, str) or not path:
                raise self._field_error("model_path", "a non-empty string is required")
            version = body.get("weight_version")
            if version is not None and not isinstance(version, str):
                raise self._field_error("weight_version", "must be a string or null")
            for name in ("abort_all_requests", "flush_cache", "is_async", "keep_pause", "torch_empty_cache",
                         "recapture_cuda_graph"):
                if name in body and not isinstance(body[name], bool):
                    raise self._field_error(name, "must be a boolean")
            if self.status != "ready":
                return web.json_response({"success": False, "message": f"server is {self.status}",
                                          "num_paused_requests": 0}, status=400)
        except protocol.RequestError as e:
            return web.json_response(e.body, status=e.status)

        if body.get("abort_all_requests"):
            self._abort(lambda p: True)
        await self._lock.acquire_write()  # waits for in-flight /generate calls, blocks new ones
        try:
            loop = asyncio.get_running_loop()
            t0 = time.time()
            try:
                await loop.run_in_executor(self._executor, self.sampler.load_weights, path, version)
            except Exception as e:
                return web.json_response({"success": False,
                                          "message": f"Failed to update weights: {e}.\nRolling back to original weights.",
                                          "num_paused_requests": 0}, status=400)
            self.model_path = path
            msg = "Succeeded to update model weights."
            if version is not None:
                msg += f" Weight version updated to {version}."
            log.info("%s (%.2fs, %s)", msg, time.time() - t0, path)
            return web.json_response({"success": True, "message": msg, "num_paused_requests": 0})
        finally:
            await self._lock.release_write()

    async def update_weight_version(self, request):
        from aiohttp import web

        from aepo_jax.rollout import protocol

        try:
            body = await self._json_body(request)
            v = body.get("new_version")
            if not isinstance(v, str):
                raise self._field_error("new_version", "a string is required")
        except protocol.RequestError as e:
            return web.json_response(e.body, status=e.status)
        if body.get("abort_all_requests", True):
            self._abort(lambda p: True)
        await self._lock.acquire_write()
        try:
            self.sampler.set_weight_version(v)
        finally:
            await self._lock.release_write()
        return web.json_response({"success": True, "message": f"Weight version updated to {v}", "new_version": v})

    async def flush_cache(self, request):
        from aiohttp import web

        from aepo_jax.rollout import protocol

        try:
            timeout = float(request.query.get("timeout", "0"))
            if timeout < 0:
                raise ValueError
        except ValueError:
            return web.json_response({"object": "error", "message": "timeout: must be a number >= 0",
                                      "type": "Bad Request", "param": "timeout", "code": 400}, status=400)
        deadline = time.time() + timeout
        while self._inflight and time.time() < deadline:
            await asyncio.sleep(0.02)
        if self._inflight:
            text = "Timed out waiting for idle state." if timeout > 0 else "Flush cache failed.\n"
            return web.Response(text=text, status=400)
        # There is no prefix cache to flush: the KV cache lives only inside one sampler call.
        return web.Response(text=protocol.FLUSH_OK_TEXT, status=200)

    async def abort_request(self, request):
        from aiohttp import web

        from aepo_jax.rollout import protocol

        try:
            body = await self._json_body(request)
            rid = body.get("rid", "")
            abort_all = body.get("abort_all", False)
            if rid is not None and not isinstance(rid, str):
                raise self._field_error("rid", "must be a string")
            if not isinstance(abort_all, bool):
                raise self._field_error("abort_all", "must be a boolean")
        except protocol.RequestError as e:
            return web.json_response(e.body, status=e.status)
        if abort_all:
            self._abort(lambda p: True)
        elif rid:
            self._abort(lambda p: p.item.rid.startswith(rid))  # SGLang's scheduler matches a prefix
        return web.Response(status=200)

    async def pause_generation(self, request):
        from aiohttp import web

        from aepo_jax.rollout import protocol

        try:
            body = await self._json_body(request)
            mode = body.get("mode", "abort")
            if mode not in ("abort", "retract", "in_place"):
                raise self._field_error("mode", f"must be 'abort', 'retract' or 'in_place', got {mode!r}")
        except protocol.RequestError as e:
            return web.json_response(e.body, status=e.status)
        self._unpaused.clear()
        if mode == "abort":
            self._abort(lambda p: True)
        return web.json_response({"message": "Generation paused successfully.", "status": "ok"})

    async def continue_generation(self, request):
        from aiohttp import web

        from aepo_jax.rollout import protocol

        try:
            await self._json_body(request)
        except protocol.RequestError as e:
            return web.json_response(e.body, status=e.status)
        self._unpaused.set()
        return web.json_response({"message": "Generation continued successfully.", "status": "ok"})


def load_tokenizer(model_path: str):
    """The model directory's tokenizer (local files only), or None when it has none."""
    names = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
    if not any(os.path.exists(os.path.join(model_path, n)) for n in names):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_path, local_files_only=True)


def make_app(server: EmbeddedServer):
    from aiohttp import web

    app = web.Application(client_max_size=1 << 30)
    r = app.router
    r.add_route("POST", "/generate", server.generate)
    r.add_route("PUT", "/generate", server.generate)
    for path, h in (("/health", server.health), ("/ready", server.health),
                    ("/health_generate", server.health_generate),
                    ("/model_info", server.model_info), ("/get_model_info", server.model_info),
                    ("/server_info", server.server_info), ("/get_server_info", server.server_info)):
        r.add_get(path, h)
    r.add_post("/update_weights_from_disk", server.update_weights_from_disk)
    r.add_post("/update_weight_version", server.update_weight_version)
    r.add_get("/flush_cache", server.flush_cache)
    r.add_post("/flush_cache", server.flush_cache)
    r.add_post("/abort_request", server.abort_request)
    r.add_post("/pause_generation", server.pause_generation)
    r.add_post("/continue_generation", server.continue_generation)
    app.on_startup.append(server.startup)
    app.on_cleanup.append(server.cleanup)
    return app


def _int_list(s: str) -> tuple[int, ...]:
    return tuple(int(x) for x in s.split(",") if x.strip()) if s else ()


def parse_args(argv: list[str] | None = None) -> ServerArgs:
    p = argparse.ArgumentParser(prog="python -m aepo_jax.rollout.server",
                                description="SGLang-compatible generation server on the aepo-jax JAX sampler")
    p.add_argument("--model-path", "--model", required=True, help="HF checkpoint directory (config.json + safetensors)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=30000)
    p.add_argument("--dtype", default="float32", help="parameter/compute dtype (float32 or bfloat16)")
    p.add_argument("--mesh", default=None, help="device mesh DxT (e.g. 2x1); default: one device")
    p.add_argument("--skip-tokenizer-init", action="store_true", help="token ids only (no text in or out)")
    p.add_argument("--weight-version", default="default")
    p.add_argument("--context-length", type=int, default=None, help="default: max_position_embeddings")
    p.add_argument("--max-running-requests", "--max-batch", dest="max_batch", type=int, default=64,
                   help="most sequences in one compiled batch")
    p.add_argument("--batch-wait-ms", type=float, default=5.0, help="wait this long to gather concurrent requests")
    p.add_argument("--random-seed", type=int, default=None, help="seeds the draws of requests without sampling_seed")
    p.add_argument("--prompt-buckets", default="", help="comma-separated prompt length buckets")
    p.add_argument("--gen-buckets", default="", help="comma-separated generation length buckets")
    p.add_argument("--batch-buckets", default="", help="comma-separated batch size buckets (default: powers of 2)")
    p.add_argument("--skip-server-warmup", action="store_true")
    p.add_argument("--served-model-name", default=None)
    p.add_argument("--log-level", default="warning")
    a = p.parse_args(argv)
    logging.basicConfig(level=getattr(logging, a.log_level.upper(), logging.WARNING),
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if a.max_batch < 1:
        p.error(f"--max-running-requests must be >= 1, got {a.max_batch}")
    return ServerArgs(model_path=a.model_path, host=a.host, port=a.port, dtype=a.dtype, mesh=a.mesh,
                      skip_tokenizer_init=a.skip_tokenizer_init, weight_version=a.weight_version,
                      context_length=a.context_length, max_batch=a.max_batch, batch_wait_ms=a.batch_wait_ms,
                      random_seed=a.random_seed, prompt_buckets=_int_list(a.prompt_buckets),
                      gen_buckets=_int_list(a.gen_buckets), batch_buckets=_int_list(a.batch_buckets),
                      warmup=not a.skip_server_warmup,
                      served_model_name=a.served_model_name)


def die_with_parent() -> None:
    """When started by ``launch.start_server`` (which sets ``AEPO_JAX_PARENT_PID``), have Linux send
    SIGTERM to this server when that parent dies, even by SIGKILL (strictly: when the parent *thread*
    that started it exits, so start servers from a long-lived thread). Done here rather than in a
    ``preexec_fn``: running Python between fork and exec in a multithreaded (jax) parent can deadlock."""
    parent = os.environ.get("AEPO_JAX_PARENT_PID")
    if not parent or not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    pr_set_pdeathsig = 1
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGTERM))
    except OSError:  # not glibc: the server then stops only on a clean exit of its parent
        return
    if os.getppid() != int(parent):  # the parent died before prctl took effect
        sys.exit("parent process exited before the server started")


def main(argv: list[str] | None = None) -> None:
    die_with_parent()
    setup_host_devices(mesh_spec_from_argv(argv))  # before jax initialises
    args = parse_args(argv)
    if not os.path.isdir(args.model_path):
        sys.exit(f"--model-path: {args.model_path!r} is not a directory")
    from aiohttp import web

    server = EmbeddedServer(args)
    web.run_app(make_app(server), host=args.host, port=args.port, print=None,
                access_log=None, handle_signals=True)


if __name__ == "__main__":
    main()
