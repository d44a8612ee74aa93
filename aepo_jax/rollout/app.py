"""The embedded server's HTTP layer: the routes, one error middleware, and the handlers.

Handlers validate with ``protocol``, queue sequences on the ``scheduler``, and shape answers with
``responses``. Any ``RequestError`` a handler raises becomes its JSON error body in
``error_middleware``; so do aiohttp's own errors (404, 405, 413) and, as a 500, anything
unexpected: every error answer is JSON.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import json
import logging
import os
import random
import sys
import time
from typing import Any

from aiohttp import web

import aepo_jax
from aepo_jax.compilation_cache import COMPILES
from aepo_jax.rollout import protocol, responses
from aepo_jax.rollout.contract import RequestError, bad_request, parse_json, value_error
from aepo_jax.rollout.app_weights import WeightEndpoints
from aepo_jax.rollout.app_weights import json_response as _json
from aepo_jax.rollout.dist_recv import WeightReceiver
from aepo_jax.rollout.sampler import Sampler, SamplerConfig, SamplingRequest
from aepo_jax.rollout.scheduler import BatchScheduler

log = logging.getLogger("aepo_jax.rollout.server")


def _env_bool(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def load_tokenizer(model_path: str):
    """The model directory's tokenizer (local files only), or None when it has none."""
    names = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
    if not any(os.path.exists(os.path.join(model_path, n)) for n in names):
        return None
    from transformers import AutoTokenizer  # heavy, and only for models that ship a tokenizer

    return AutoTokenizer.from_pretrained(model_path, local_files_only=True)


@web.middleware
async def error_middleware(request: web.Request, handler) -> web.StreamResponse:
    """The one place where a failure becomes an HTTP answer (always JSON)."""
    try:
        return await handler(request)
    except RequestError as e:
        return web.json_response(e.body, status=e.status)
    except web.HTTPException as e:  # aiohttp's own: unknown route, wrong method, body too large
        if e.status < 400:
            raise
        return web.json_response(bad_request(e.reason if not e.text else e.text, status=e.status).body,
                                 status=e.status)
    except Exception as e:  # a bug or an engine failure: a 500 naming it; the server keeps serving
        log.exception("%s %s failed", request.method, request.path)
        return web.json_response({"error": {"message": f"{type(e).__name__}: {e}"}}, status=500)


class RolloutServer(WeightEndpoints):
    """State and handlers of one server process (``args``: ``server.ServerArgs``)."""

    def __init__(self, args: Any):
        self.args = args
        self.status = "starting"
        self.sampler: Sampler | None = None
        self.tokenizer = None
        self.return_original_logprob = _env_bool("SGLANG_RETURN_ORIGINAL_LOGPROB")
        self.model_path = args.model_path
        self.limits = protocol.Limits(max_n=args.max_n, max_rows=args.max_rows_per_request)
        # one thread runs every sampler call and weight load, in order
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="sampler")
        self._rng = random.Random(args.random_seed)
        self._model_cfg: dict = {}
        self.scheduler: BatchScheduler | None = None
        # SGLang's distributed weight update (dist_recv): broadcasts are received on their own thread,
        # never on the sampler's, so a batch in progress never delays the learner's broadcast
        self.receiver = WeightReceiver()

    # ------------------------------------------------------------------ start-up
    def load(self) -> None:
        """Blocking: load the model and tokenizer, compile the smallest bucket."""
        a = self.args
        COMPILES.install()  # /server_info's compiled_programs (idempotent; server.main installs it too)
        with open(os.path.join(a.model_path, "config.json")) as f:
            self._model_cfg = json.load(f)
        bb = a.batch_buckets or tuple(b for b in (1, 2, 4, 8, 16, 32, 64, 128, 256) if b < a.max_batch) + (a.max_batch,)
        cfg = SamplerConfig(max_batch=a.max_batch, batch_buckets=bb, prompt_buckets=a.prompt_buckets,
                            gen_buckets=a.gen_buckets)
        self.sampler = Sampler.from_pretrained(a.model_path, dtype=a.dtype, mesh=a.mesh, config=cfg,
                                               context_len=a.context_length)
        self.sampler.set_weight_version(a.weight_version)
        if not a.skip_tokenizer_init:
            self.tokenizer = load_tokenizer(a.model_path)
        if a.warmup:
            self.sampler.generate([SamplingRequest(input_ids=(0,), max_new_tokens=1, temperature=0.0, seed=0)])

    async def startup(self, app: web.Application) -> None:
        self.scheduler = BatchScheduler(lambda reqs, cancelled: self.sampler.generate_versioned(reqs, cancelled),
                                        self._executor,
                                        batch_wait_ms=self.args.batch_wait_ms)
        loop = asyncio.get_running_loop()

        async def _load():
            try:
                await loop.run_in_executor(self._executor, self.load)
            except Exception as e:  # fail fast, as SGLang does: whoever launched us sees the exit
                log.exception("model load failed")
                print(f"[aepo_jax.rollout.server] start-up failed: {type(e).__name__}: {e}", file=sys.stderr,
                      flush=True)
                os._exit(1)
            self.status = "ready"
            log.info("server ready: %s (weight_version=%s)", self.args.model_path, self.sampler.weight_version)
            print(f"[aepo_jax.rollout.server] ready on http://{self.args.host}:{self.args.port}", flush=True)

        app["loader"] = asyncio.create_task(_load())
        app["worker"] = asyncio.create_task(self.scheduler.run())

    async def cleanup(self, app: web.Application) -> None:
        for k in ("worker", "loader"):
            app[k].cancel()
        self.receiver.close()
        self._executor.shutdown(wait=False, cancel_futures=True)

    def _require_ready(self) -> None:
        if self.status != "ready":
            raise value_error(f"server is {self.status}", status=503)

    # ------------------------------------------------------------------ /generate
    def _decode(self, ids: list[int], skip_special: bool) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special)

    def _result(self, p, outcome, extras=None) -> dict:
        """The response object of one sequence: its sampler result, or an abort."""
        now = time.time()
        item = p.item
        decode = self._decode if self.tokenizer is not None else None
        if outcome is None:  # aborted
            fr = responses.finish_abort("Aborted" if p.running else "Abort in waiting queue")
            return responses.build_response(item, output_ids=[], finish_reason=fr, logprobs=[],
                                            weight_version=self.sampler.weight_version,
                                            e2e_latency=now - p.t0, now=now, decode=decode)
        r, version = outcome
        lps = r.logprobs_t1 if self.return_original_logprob else r.logprobs
        return responses.build_response(item, output_ids=r.output_ids, finish_reason=r.finish_reason,
                                        logprobs=lps, weight_version=version, e2e_latency=now - p.t0,
                                        now=now, decode=decode, extras=extras)

    async def generate(self, request: web.Request) -> web.StreamResponse:
        parsed, objs = await self.run_generate(parse_json(await request.read()))
        if parsed.stream:
            from aepo_jax.rollout.openai_api import send_events

            return await send_events(request, objs if parsed.is_single
                                     else [{**o, "index": i} for i, o in enumerate(objs)])
        return _json(objs[0] if parsed.is_single else objs)

    async def run_generate(self, body: Any) -> tuple[protocol.ParsedGenerate, list[dict]]:
        """A ``/generate`` body -> (parsed, result objects): the path that ``/generate`` and the
        OpenAI routes share. Raises ``RequestError``."""
        self._require_ready()
        tok = self.tokenizer
        parsed = protocol.parse_generate(body, vocab_size=self.sampler.vocab_size,
                                         context_len=self.sampler.context_len,
                                         tokenize=(lambda t: tok.encode(t)) if tok is not None else None,
                                         limits=self.limits)
        await self.scheduler.unpaused.wait()  # /pause_generation: new requests wait for /continue_generation
        sched = self.scheduler
        await sched.lock.acquire_read()
        try:
            reqs = [it.request if it.request.seed is not None
                    else dataclasses.replace(it.request, seed=self._rng.getrandbits(63)) for it in parsed.items]
            pend = sched.submit(parsed.items, reqs)
            try:
                outs = await asyncio.gather(*(p.future for p in pend))
            except asyncio.CancelledError:  # the client went away: stop its sequences
                sched.abandon(pend)
                log.info("client went away: %d sequences abandoned", len(pend))
                raise
            finally:
                sched.release(pend)
            # still under the read lock: the scoring forward sees the weights that generated
            extras = await self._extra_logprobs(parsed.items, outs)
            objs = [self._result(p, o, x) for p, o, x in zip(pend, outs, extras)]
        finally:
            await sched.lock.release_read()
        return parsed, objs

    async def _extra_logprobs(self, items, outs) -> list:
        """Input, top-k and token-id log-probs (``extra_logprobs``) of the items that ask for them."""
        from aepo_jax.rollout import extra_logprobs
        from aepo_jax.rollout.sampling import GREEDY_EPS

        reqs = []
        for it, o in zip(items, outs):
            if o is None or not it.wants_extra_logprobs:
                reqs.append(None)
                continue
            r, opt = it.request, it.output
            t_out = 1.0 if (self.return_original_logprob or r.temperature < GREEDY_EPS) else r.temperature
            reqs.append(extra_logprobs.LogprobRequest(
                r.input_ids, tuple(o[0].output_ids), start=opt.logprob_start_len, top_k=opt.top_logprobs_num,
                token_ids=opt.token_ids_logprob, out_temperature=t_out))
        if all(x is None for x in reqs):
            return reqs
        graphdef, state = self.sampler.weights()
        return await asyncio.get_running_loop().run_in_executor(
            self._executor, extra_logprobs.compute_many, graphdef, state, reqs, self.sampler.vocab_size)

    def openai_backend(self):
        """What the OpenAI routes (``openai_api``) read from this server."""
        from aepo_jax.rollout.openai_api import Backend

        async def generate(body):
            return (await self.run_generate(body))[1]

        return Backend(generate=generate, tokenizer=lambda: self.tokenizer,
                       model_name=lambda: self.args.served_model_name or self.args.model_path,
                       context_len=lambda: self.sampler.context_len, model_dir=lambda: self.args.model_path,
                       ready=lambda: self.status == "ready")

    # ------------------------------------------------------------------ health and info
    async def health(self, request: web.Request) -> web.Response:
        return web.Response(status=200 if self.status == "ready" else 503)

    async def health_generate(self, request: web.Request) -> web.Response:
        if self.status != "ready":
            return web.Response(status=503)
        sched = self.scheduler
        if sched.busy or time.time() - sched.last_batch_done < 1.0:
            return web.Response(status=200)  # busy (or just was): that is proof of life
        req = SamplingRequest(input_ids=(0,), max_new_tokens=1, temperature=0.0, seed=0)
        pend = sched.submit([protocol.GenerateItem(rid=f"HEALTH_CHECK_{time.time()}", request=req)], [req])
        try:
            await asyncio.wait_for(asyncio.shield(pend[0].future), timeout=20.0)
            return web.Response(status=200)
        except Exception:  # a timeout or an engine failure
            return web.Response(status=503)
        finally:
            sched.release(pend)

    def _weight_version(self) -> str:
        return self.sampler.weight_version if self.sampler else self.args.weight_version

    async def model_info(self, request: web.Request) -> web.Response:
        if self.sampler is None:
            raise value_error(f"server is {self.status}", status=503)
        a = self.args
        return _json(responses.model_info(model_path=self.model_path, served_model_name=a.served_model_name,
                                          tokenizer_path=a.model_path, weight_version=self._weight_version(),
                                          model_config=self._model_cfg))

    async def server_info(self, request: web.Request) -> web.Response:
        a, s, sched = self.args, self.sampler, self.scheduler
        ctx = s.context_len if s else (a.context_length or 0)
        return _json({  # the contract's fields, then the server arguments SGLang reports too
            "model_path": self.model_path, "served_model_name": a.served_model_name or self.model_path,
            "tokenizer_path": a.model_path, "max_context_length": ctx, "max_total_num_tokens": ctx * a.max_batch,
            "version": aepo_jax.__version__,
            "internal_states": [{"num_running_reqs": sched.num_running, "num_waiting_reqs": sched.num_waiting,
                                 "paused": not sched.unpaused.is_set()}],
            "host": a.host, "port": a.port, "incremental_streaming_output": False, "disaggregation_mode": "null",
            "skip_tokenizer_init": self.tokenizer is None, "context_length": ctx, "max_req_input_len": max(ctx - 1, 0),
            "tp_size": 1, "dp_size": 1, "dtype": a.dtype, "max_running_requests": a.max_batch,
            "random_seed": a.random_seed, "weight_version": self._weight_version(),
            # Not SGLang's: the sampler's compiled shapes (a client can warm every bucket its prompts
            # reach) and the programs this process has compiled or loaded so far (a test that no
            # step after the first compiles), and the CPU seconds this process has used (a client
            # can tell what a phase cost the server: the trainer's validation).
            **({f"{k}_buckets": v for k, v in s.buckets.items()} if s else {}),
            "compiled_programs": COMPILES.compiles,
            "process_cpu_s": time.process_time(),
        })

    # ------------------------------------------------------------------ control
    async def flush_cache(self, request: web.Request) -> web.Response:
        try:
            timeout = float(request.query.get("timeout", "0"))
        except ValueError:
            timeout = -1.0
        if not timeout >= 0:  # also refuses nan
            raise bad_request("must be a number >= 0", "timeout")
        deadline = time.time() + timeout
        while self.scheduler.busy and time.time() < deadline:
            await asyncio.sleep(0.02)
        if self.scheduler.busy:
            text = "Timed out waiting for idle state." if timeout > 0 else "Flush cache failed.\n"
            return web.Response(text=text, status=400)
        # There is no prefix cache to flush: the KV cache lives only inside one sampler call.
        return web.Response(text=responses.FLUSH_OK_TEXT, status=200)

    async def abort_request(self, request: web.Request) -> web.Response:
        body = parse_json(await request.read(), object_required=True) or {}
        rid, abort_all = body.get("rid", ""), body.get("abort_all", False)
        if rid is not None and not isinstance(rid, str):
            raise bad_request("must be a string", "rid")
        if not isinstance(abort_all, bool):
            raise bad_request("must be a boolean", "abort_all")
        if abort_all:
            self.scheduler.abort(lambda p: True)
        elif rid:
            self.scheduler.abort(lambda p: p.item.rid.startswith(rid))  # SGLang's scheduler matches a prefix
        return web.Response(status=200)

    async def pause_generation(self, request: web.Request) -> web.Response:
        body = parse_json(await request.read(), object_required=True) or {}
        mode = body.get("mode", "abort")
        if mode not in ("abort", "retract", "in_place"):
            raise bad_request(f"must be 'abort', 'retract' or 'in_place', got {mode!r}", "mode")
        self.scheduler.unpaused.clear()
        if mode == "abort":
            self.scheduler.abort(lambda p: True)
        return _json({"message": "Generation paused successfully.", "status": "ok"})

    async def continue_generation(self, request: web.Request) -> web.Response:
        parse_json(await request.read(), object_required=True)
        self.scheduler.unpaused.set()
        return _json({"message": "Generation continued successfully.", "status": "ok"})


def make_app(server: RolloutServer) -> web.Application:
    app = web.Application(client_max_size=server.args.max_body_bytes, middlewares=[error_middleware])
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
    r.add_post("/init_weights_update_group", server.init_weights_update_group)
    r.add_post("/update_weights_from_distributed", server.update_weights_from_distributed)
    r.add_post("/destroy_weights_update_group", server.destroy_weights_update_group)
    r.add_get("/flush_cache", server.flush_cache)
    r.add_post("/flush_cache", server.flush_cache)
    r.add_post("/abort_request", server.abort_request)
    r.add_post("/pause_generation", server.pause_generation)
    r.add_post("/continue_generation", server.continue_generation)
    from aepo_jax.rollout.openai_api import add_openai_routes

    add_openai_routes(app, server.openai_backend())  # /v1/models, /v1/completions, /v1/chat/completions
    app.on_startup.append(server.startup)
    app.on_cleanup.append(server.cleanup)
    return app
