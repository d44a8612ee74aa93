"""OpenAI responses as SGLang 0.5.23 shapes them, from the native ``/generate`` result objects:
``choices``, ``usage`` (prompt tokens counted once per prompt), ``metadata.weight_version``,
completion ``logprobs`` (``tokens`` / ``token_logprobs`` / ``top_logprobs`` / ``text_offset`` = -1),
chat ``logprobs.content``, the server-sent-event chunks of ``stream: true``, and native refusals in
OpenAI's error layout. Pure functions (no HTTP)."""

from __future__ import annotations

from typing import Any, Callable

from aepo_jax.rollout.contract import RequestError
from aepo_jax.rollout.openai_requests import OpenAIError, Translated

def usage(objs: list[dict], n: int) -> dict:
    prompt = sum(o["meta_info"]["prompt_tokens"] for o in objs[::n])
    completion = sum(o["meta_info"]["completion_tokens"] for o in objs)
    return {"prompt_tokens": prompt, "total_tokens": prompt + completion, "completion_tokens": completion,
            "prompt_tokens_details": None, "reasoning_tokens": 0, "completion_tokens_details": None}


def _finish(o: dict) -> tuple[str | None, Any]:
    fr = o["meta_info"].get("finish_reason")
    if not fr:
        return None, None
    return fr["type"], fr.get("matched")


def completion_logprobs(o: dict, echo: bool) -> dict:
    """SGLang's ``to_openai_style_logprobs``: input entries first when echoing."""
    meta = o["meta_info"]
    tokens, values, tops = [], [], []
    entries = (meta.get("input_token_logprobs") or []) if echo else []
    entries = list(entries) + list(meta.get("output_token_logprobs") or [])
    for lp, _tid, text in entries:
        tokens.append(text or "")
        values.append(lp)
    top_rows = []
    if echo and "input_top_logprobs" in meta:
        top_rows += meta["input_top_logprobs"]
    top_rows += meta.get("output_top_logprobs", [])
    for row in top_rows:
        tops.append(None if row is None else {(t or ""): lp for lp, _i, t in row})
    return {"text_offset": [-1] * len(tokens), "token_logprobs": values, "tokens": tokens, "top_logprobs": tops}


def chat_logprobs(o: dict, token_bytes: Callable[[int, str], list[int]]) -> dict:
    """``logprobs.content`` of one chat choice; ``token_bytes``: ``openai_requests.token_bytes_fn``."""
    meta = o["meta_info"]
    tops = meta.get("output_top_logprobs") or []
    content = []
    for i, (lp, tid, text) in enumerate(meta.get("output_token_logprobs") or []):
        row = tops[i] if i < len(tops) and tops[i] is not None else []
        content.append({"token": text or "", "bytes": token_bytes(tid, text), "logprob": lp,
                        "top_logprobs": [{"token": t or "", "bytes": token_bytes(j, t), "logprob": v}
                                         for v, j, t in row]})
    return {"content": content}


def _response(kind: str, tr: Translated, objs: list[dict], rid: str, created: int, choices: list[dict]) -> dict:
    return {"id": rid, "object": kind, "created": created, "model": tr.model, "choices": choices,
            "usage": usage(objs, tr.n), "metadata": {"weight_version": objs[0]["meta_info"]["weight_version"]}}


def completion_response(tr: Translated, objs: list[dict], rid: str, created: int) -> dict:
    choices = []
    for i, o in enumerate(objs):
        text = o.get("text", "")
        if tr.echo_prompts is not None:
            text = tr.echo_prompts[i // tr.n] + text
        reason, matched = _finish(o)
        choices.append({"index": i, "text": text,
                        "logprobs": completion_logprobs(o, tr.echo_prompts is not None) if tr.logprobs else None,
                        "finish_reason": reason, "matched_stop": matched})
    return _response("text_completion", tr, objs, rid, created, choices)


def chat_response(tr: Translated, objs: list[dict], rid: str, created: int) -> dict:
    choices = []
    for i, o in enumerate(objs):
        reason, matched = _finish(o)
        choices.append({"index": i, "message": {"role": "assistant", "content": o.get("text", ""),
                                                "reasoning_content": None},
                        "logprobs": chat_logprobs(o, tr.token_bytes) if tr.logprobs else None,
                        "finish_reason": reason, "matched_stop": matched})
    return _response("chat.completion", tr, objs, rid, created, choices)


def completion_chunks(tr: Translated, objs: list[dict], rid: str, created: int) -> list[dict]:
    """One chunk per choice (its whole text, its finish reason), then the usage chunk if asked."""
    full = completion_response(tr, objs, rid, created)
    head = {"id": rid, "object": "text_completion", "created": created, "model": tr.model}
    chunks = [{**head, "choices": [c]} for c in full["choices"]]
    if tr.include_usage:
        chunks.append({**head, "choices": [], "usage": full["usage"]})
    return chunks


def chat_chunks(tr: Translated, objs: list[dict], rid: str, created: int) -> list[dict]:
    """Per choice: the role chunk, the content chunk (with its logprobs), then one finish chunk per
    choice and the usage chunk if asked (SGLang's order)."""
    head = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": tr.model}

    def chunk(i, delta, logprobs=None, finish=None, matched=None):
        return {**head, "choices": [{"index": i, "delta": {"reasoning_content": None, **delta},
                                     "logprobs": logprobs, "finish_reason": finish, "matched_stop": matched}]}

    chunks = []
    for i, o in enumerate(objs):
        chunks.append(chunk(i, {"role": "assistant", "content": ""}))
        chunks.append(chunk(i, {"content": o.get("text", "")},
                            chat_logprobs(o, tr.token_bytes) if tr.logprobs else None))
    for i, o in enumerate(objs):
        reason, matched = _finish(o)
        chunks.append(chunk(i, {}, None, reason, matched))
    if tr.include_usage:
        chunks.append({**head, "choices": [], "usage": usage(objs, tr.n)})
    return chunks


# --------------------------------------------------------------------------- errors from the native path

_NATIVE_NAMES = (("sampling_params.max_new_tokens", "max_tokens"), ("max_new_tokens", "max_tokens"),
                 ("sampling_params.sampling_seed", "seed"), ("sampling_params.", ""), ("top_logprobs_num", "logprobs"))


def from_native_error(e: RequestError, prompt_field: str) -> OpenAIError:
    """A native /generate refusal in OpenAI's layout (status kept; field names translated)."""
    b = e.body
    if isinstance(b, dict) and isinstance(b.get("error"), str):
        msg = b["error"]
    elif isinstance(b, dict) and isinstance(b.get("error"), dict):
        msg = str(b["error"].get("message"))
    elif isinstance(b, dict) and "message" in b:
        msg = str(b["message"])
    else:
        msg = str(b)
    for a, z in _NATIVE_NAMES:
        msg = msg.replace(a, z)
    msg = msg.replace("input_ids", prompt_field) if not msg.startswith(prompt_field) else msg
    param = None
    head = msg.split(":", 1)[0].split("[", 1)[0].split(".", 1)[0]
    if ":" in msg and " " not in head:
        param = head
    elif "context length" in msg:
        param = prompt_field
    err_type = "BadRequestError" if e.status < 500 else ("ServiceUnavailable" if e.status == 503
                                                         else "InternalServerError")
    return OpenAIError(msg, param, e.status, err_type)
