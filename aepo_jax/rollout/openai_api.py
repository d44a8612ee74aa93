"""The OpenAI-compatible API as SGLang 0.5.23 serves it (``srt/entrypoints/openai/``):
``GET /v1/models``, ``GET /v1/models/{model}``, ``POST /v1/completions``, ``POST /v1/chat/completions``.

Every request is translated into a native ``/generate`` body (``openai_requests``) and runs through
the server's own generate path, so batching, seeds, weight versions and validation are the native
ones; the answer is shaped from the native results (``openai_responses``). This module holds the
aiohttp routes and the server-sent-events stream of ``stream: true`` (SGLang's chunk layout, ending
with ``data: [DONE]``). The embedded server generates each request as a whole, so a stream carries
each choice's text in one chunk (SGLang sends it piece by piece). Refusals are raised as
``OpenAIError`` and answered by the server's error middleware.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

from aiohttp import web

from aepo_jax.rollout.contract import RequestError, parse_json
from aepo_jax.rollout.openai_requests import OpenAIError, read_generation_defaults, translate_chat, translate_completion
from aepo_jax.rollout.openai_responses import (chat_chunks, chat_response, completion_chunks, completion_response,
                                               from_native_error)


@dataclass
class Backend:
    """What the routes need from the server (kept small so that the server's layout may change).

    ``generate(body) -> list of native result objects`` runs a native ``/generate`` body (raises
    ``protocol.RequestError``); the other members are read per request."""

    generate: Callable[[dict], Awaitable[list[dict]]]
    tokenizer: Callable[[], Any]  # None when the server runs without one
    model_name: Callable[[], str]
    context_len: Callable[[], int]
    model_dir: Callable[[], str]
    ready: Callable[[], bool]


def _dumps(obj: Any) -> str:
    return json.dumps(obj, allow_nan=False)


async def send_events(request: web.Request, chunks: list[dict]) -> web.StreamResponse:
    """The chunks as server-sent events, then ``data: [DONE]``."""
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await resp.prepare(request)
    for c in chunks:
        await resp.write(b"data: " + _dumps(c).encode() + b"\n\n")
    await resp.write(b"data: [DONE]\n\n")
    await resp.write_eof()
    return resp


def add_openai_routes(app: web.Application, backend: Backend) -> None:
    """Register the /v1 routes on an aiohttp application (whose error middleware answers a raised
    ``RequestError`` with its body)."""
    state: dict[str, Any] = {}

    def gen_defaults() -> dict:
        d = backend.model_dir()
        if state.get("defaults_dir") != d:
            state["defaults"], state["defaults_dir"] = read_generation_defaults(d), d
        return state["defaults"]

    def require_ready() -> None:
        if not backend.ready():
            raise OpenAIError("server is not ready", None, 503, "ServiceUnavailable")

    async def read_json(request):
        try:
            return parse_json(await request.read())  # also refuses NaN / Infinity and deep nesting
        except RequestError as e:
            raise OpenAIError(e.body.get("message", str(e)) if isinstance(e.body, dict) else str(e)) from None

    def model_card():
        name = backend.model_name()
        return {"id": name, "object": "model", "created": int(time.time()), "owned_by": "sglang", "root": name,
                "parent": None, "max_model_len": backend.context_len()}

    async def list_models(request):
        require_ready()
        return web.json_response({"object": "list", "data": [model_card()]})

    async def retrieve_model(request):
        require_ready()
        model = request.match_info["model"]
        if model != backend.model_name():
            raise RequestError(404, {"error": {"message": f"The model '{model}' does not exist",
                                               "type": "invalid_request_error", "param": "model",
                                               "code": "model_not_found"}})
        return web.json_response(model_card())

    async def serve(request, translate, build, chunks, prefix, prompt_field):
        body = await read_json(request)
        require_ready()
        tr = translate(body)
        try:
            objs = await backend.generate(tr.native)
        except OpenAIError:
            raise
        except RequestError as e:
            raise from_native_error(e, prompt_field) from e
        objs = objs if isinstance(objs, list) else [objs]
        rid, created = f"{prefix}{uuid.uuid4().hex}", int(time.time())
        if tr.stream:
            return await send_events(request, chunks(tr, objs, rid, created))
        return web.json_response(build(tr, objs, rid, created), dumps=_dumps)

    async def completions(request):
        return await serve(request, lambda b: translate_completion(b, backend.tokenizer()),
                           completion_response, completion_chunks, "cmpl-", "prompt")

    async def chat_completions(request):
        return await serve(request,
                           lambda b: translate_chat(b, backend.tokenizer(), backend.context_len(), gen_defaults()),
                           chat_response, chat_chunks, "chatcmpl-", "messages")

    r = app.router
    r.add_get("/v1/models", list_models)
    r.add_get("/v1/models/{model:.+}", retrieve_model)
    r.add_post("/v1/completions", completions)
    r.add_post("/v1/chat/completions", chat_completions)
