"""OpenAI request bodies (``/v1/completions``, ``/v1/chat/completions``) checked with OpenAI field
names and translated into a native ``/generate`` body, as SGLang 0.5.23's ``serving_completions`` /
``serving_chat`` build a ``GenerateReqInput``. Pure functions (no HTTP).

A bad request raises :class:`OpenAIError`: a 400 in SGLang's OpenAI error layout ``{"object":
"error", "message": "<field>: ...", "type": "BadRequestError", "param": "<field>", "code": 400}``.
SGLang features the embedded server does not have (penalties, ``logit_bias``, grammars, tools,
images) are accepted only with their neutral values and refused otherwise, naming the field;
unknown fields are refused too (SGLang ignores them). Chat prompts come from the model directory's
chat template, with ``temperature`` / ``top_p`` / ``top_k`` / ``min_p`` defaulting to its
``generation_config.json`` as in SGLang.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from dataclasses import dataclass
from typing import Any, Callable

from aepo_jax.rollout.contract import INT64_MAX, INT64_MIN, RequestError
from aepo_jax.rollout.contract import is_int, is_num
from aepo_jax.rollout.protocol import MAX_STOP_COUNT

log = logging.getLogger("aepo_jax.rollout.server")

CHAT_MAX_TOP_LOGPROBS = 20  # OpenAI's limit for chat top_logprobs


class OpenAIError(RequestError):
    """A refusal in SGLang's OpenAI error layout (the server's error middleware sends ``body``)."""

    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 err_type: str = "BadRequestError"):
        super().__init__(status, {"object": "error", "message": message, "type": err_type, "param": param,
                                  "code": status})


def _bad(param: str, msg: str) -> OpenAIError:
    return OpenAIError(f"{param}: {msg}", param)


def _opt(body: dict, name: str, kind: str, default=None):
    """body[name] checked against ``kind`` (None/absent -> default)."""
    v = body.get(name)
    if v is None:
        return default
    ok = {"int": is_int, "number": is_num, "bool": lambda x: isinstance(x, bool),
          "str": lambda x: isinstance(x, str), "dict": lambda x: isinstance(x, dict),
          "int_list": lambda x: isinstance(x, list) and all(is_int(e) for e in x),
          "str_or_list": lambda x: isinstance(x, str) or (isinstance(x, list) and all(isinstance(e, str) for e in x)),
          }[kind](v)
    if not ok:
        what = {"int": "an integer", "number": "a number", "bool": "a boolean", "str": "a string",
                "dict": "an object", "int_list": "a list of integers",
                "str_or_list": "a string or a list of strings"}[kind]
        raise _bad(name, f"must be {what}, got {json.dumps(v)[:80]}")
    return float(v) if kind == "number" else v


# Fields SGLang accepts whose effect the embedded server does not have: only these values pass.
_NEUTRAL: dict[str, tuple] = {
    "frequency_penalty": (0, 0.0), "presence_penalty": (0, 0.0), "repetition_penalty": (1, 1.0),
    "logit_bias": ({},), "min_tokens": (0,), "regex": (), "ebnf": (), "json_schema": (),
    "stop_regex": ([],), "best_of": (1,), "suffix": ("",), "response_format": ({"type": "text"},),
    "tools": ([],), "tool_choice": ("none", "auto"), "functions": ([],), "function_call": ("none", "auto"),
    "return_hidden_states": (False,), "lora_path": (), "custom_logit_processor": (), "custom_params": ({},),
    "reasoning_effort": (), "structural_tag": (), "session_params": (), "audio": (), "modalities": (["text"],),
    "prediction": (), "return_routed_experts": (False,),
}
# Fields with no effect on generation (metadata, routing hints): any well-typed value.
_ACCEPTED_ANY = {"user": "str", "parallel_tool_calls": "bool", "metadata": "dict", "store": "bool",
                 "service_tier": "str", "priority": "int", "extra_key": "str", "cache_salt": "str"}

_COMMON = {"model", "max_tokens", "temperature", "top_p", "n", "stop", "seed", "stream", "stream_options",
           "top_k", "min_p", "stop_token_ids", "ignore_eos", "skip_special_tokens", "no_stop_trim", "rid",
           "logprobs"}
_COMPLETION_FIELDS = _COMMON | {"prompt", "echo"}
_CHAT_FIELDS = _COMMON | {"messages", "top_logprobs", "max_completion_tokens", "chat_template_kwargs",
                          "continue_final_message"}


def _check_known(body: dict, known: set[str]) -> None:
    for k, v in body.items():
        if k in known:
            continue
        if k in _ACCEPTED_ANY:
            _opt(body, k, _ACCEPTED_ANY[k])
            continue
        if k in _NEUTRAL:
            if v is None or any(v == n for n in _NEUTRAL[k]):
                continue
            raise _bad(k, f"not supported by the aepo-jax embedded server (only a neutral value is accepted: "
                          f"{', '.join(json.dumps(n) for n in (None,) + _NEUTRAL[k])}).")
        raise _bad(k, "unknown field.")


def _sampling(body: dict, defaults: dict, max_new_tokens) -> dict:
    """Native sampling_params from the OpenAI fields shared by both endpoints."""
    temperature = _opt(body, "temperature", "number", defaults.get("temperature", 1.0))
    if not temperature >= 0.0 or temperature != temperature or temperature == float("inf"):
        raise _bad("temperature", f"must be a non-negative finite number, got {temperature}")
    top_p = _opt(body, "top_p", "number", defaults.get("top_p", 1.0))
    if not 0.0 < top_p <= 1.0:
        raise _bad("top_p", f"must be in (0, 1], got {top_p}")
    n = _opt(body, "n", "int", 1)
    if n < 1:
        raise _bad("n", f"must be at least 1, got {n}")
    stop = _opt(body, "stop", "str_or_list", [])
    stop = [stop] if isinstance(stop, str) else stop
    if len(stop) > MAX_STOP_COUNT:
        raise _bad("stop", f"at most {MAX_STOP_COUNT} stop sequences, got {len(stop)}")
    seed = _opt(body, "seed", "int")
    if seed is not None and not INT64_MIN <= seed <= INT64_MAX:
        raise _bad("seed", f"must fit in 64 bits, got {seed}")
    top_k = _opt(body, "top_k", "int", defaults.get("top_k", -1))
    if top_k == 0 or top_k < -1:
        raise _bad("top_k", f"must be -1 (disabled) or at least 1, got {top_k}")
    min_p = _opt(body, "min_p", "number", defaults.get("min_p", 0.0))
    if not 0.0 <= min_p <= 1.0:
        raise _bad("min_p", f"must be in [0, 1], got {min_p}")
    sp = {"max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p, "top_k": top_k,
          "min_p": min_p, "n": n, "stop": stop, "stop_token_ids": _opt(body, "stop_token_ids", "int_list", []),
          "ignore_eos": _opt(body, "ignore_eos", "bool", False),
          "skip_special_tokens": _opt(body, "skip_special_tokens", "bool", True),
          "no_stop_trim": _opt(body, "no_stop_trim", "bool", False)}
    if seed is not None:
        sp["sampling_seed"] = seed
    return sp


def _stream_flags(body: dict) -> tuple[bool, bool]:
    stream = _opt(body, "stream", "bool", False)
    so = _opt(body, "stream_options", "dict")
    include_usage = False
    if so is not None:
        for k in so:
            if k not in ("include_usage", "continuous_usage_stats"):
                raise _bad(f"stream_options.{k}", "unknown field.")
        iu = so.get("include_usage")
        if iu is not None and not isinstance(iu, bool):
            raise _bad("stream_options.include_usage", "must be a boolean")
        include_usage = bool(iu)
        if not stream:
            raise _bad("stream_options", "only allowed when stream is true")
    return stream, include_usage


@dataclass
class Translated:
    native: dict  # the /generate body
    model: str
    n: int
    stream: bool
    include_usage: bool
    echo_prompts: list[str] | None = None  # completions with echo: text to put before each choice
    logprobs: bool = False
    token_bytes: Callable[[int, str], list[int]] | None = None  # chat logprobs' raw bytes of a token


@functools.lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """Byte-level BPE's printable stand-in of each of the 256 bytes (GPT-2's table), inverted."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1),
            *range(ord("\u00ae"), ord("\u00ff") + 1)]
    moved = [b for b in range(256) if b not in keep]
    table = {chr(b): b for b in keep}
    table.update({chr(256 + i): b for i, b in enumerate(moved)})
    return table


def token_bytes_fn(tokenizer) -> Callable[[int, str], list[int]]:
    """(token id, token text) -> the token's raw bytes. Byte-level BPE (Qwen, Llama 3, GPT-2): the
    bytes its vocabulary entry stands for, so a fragment of a multi-byte character keeps its real
    bytes (its decoded text is U+FFFD); other tokenizers: the UTF-8 of the text (as SGLang)."""
    decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)  # None: a slow tokenizer
    byte_level = type(decoder).__name__ == "ByteLevel"
    dec = _byte_decoder()

    def token_bytes(tid: int, text: str) -> list[int]:
        if byte_level:
            piece = tokenizer.convert_ids_to_tokens(int(tid))
            if isinstance(piece, str) and piece and all(c in dec for c in piece):
                return [dec[c] for c in piece]
        return list((text or "").encode("utf-8"))

    return token_bytes


def translate_completion(body: Any, tokenizer) -> Translated:
    """A ``/v1/completions`` body -> native body (the native path checks the context length)."""
    if not isinstance(body, dict):
        raise OpenAIError("Request body must be a JSON object.", None)
    _check_known(body, _COMPLETION_FIELDS)
    if "prompt" not in body or body["prompt"] is None:
        raise _bad("prompt", "field required")
    prompt = body["prompt"]
    if isinstance(prompt, str):
        key = "text"
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        key = "text"
    elif isinstance(prompt, list) and prompt and all(is_int(t) for t in prompt):
        key = "input_ids"
    elif (isinstance(prompt, list) and prompt
          and all(isinstance(p, list) and p and all(is_int(t) for t in p) for p in prompt)):
        key = "input_ids"
    else:
        raise _bad("prompt", "must be a non-empty string, list of strings, list of token ids or list of "
                             "lists of token ids")
    if key == "text" and tokenizer is None:
        raise _bad("prompt", "text prompts need a tokenizer (this server runs without one); send token ids")
    max_tokens = _opt(body, "max_tokens", "int", 16)
    if max_tokens <= 0:
        raise _bad("max_tokens", "max_tokens must be positive")
    stream, include_usage = _stream_flags(body)
    logprobs = _opt(body, "logprobs", "int")
    if logprobs is not None and logprobs < 0:
        raise _bad("logprobs", f"must be >= 0, got {logprobs}")
    echo = _opt(body, "echo", "bool", False)
    sp = _sampling(body, {}, max_tokens)
    native = {key: prompt, "sampling_params": sp, "return_logprob": logprobs is not None,
              "top_logprobs_num": logprobs or 0, "logprob_start_len": 0 if (echo and logprobs is not None) else -1,
              "return_text_in_logprobs": tokenizer is not None}
    model = _opt(body, "model", "str", "default")
    echo_prompts = None
    if echo:
        if tokenizer is None:
            raise _bad("echo", "needs a tokenizer (this server runs without one)")
        if isinstance(prompt, str):
            echo_prompts = [prompt]
        elif isinstance(prompt[0], str):
            echo_prompts = list(prompt)
        elif is_int(prompt[0]):
            echo_prompts = [tokenizer.decode(prompt, skip_special_tokens=True)]
        else:
            echo_prompts = [tokenizer.decode(p, skip_special_tokens=True) for p in prompt]
    return Translated(native, model, sp["n"], stream, include_usage, echo_prompts,
                      logprobs=logprobs is not None)


def _message_text(i: int, m: Any) -> dict:
    if not isinstance(m, dict):
        raise _bad(f"messages[{i}]", "must be an object with role and content")
    role = m.get("role")
    if role not in ("system", "user", "assistant", "tool", "developer"):
        raise _bad(f"messages[{i}].role", f"must be one of system, user, assistant, tool, developer; got {role!r}")
    for k in m:
        if k not in ("role", "content", "name", "tool_calls", "tool_call_id", "reasoning_content"):
            raise _bad(f"messages[{i}].{k}", "unknown field.")
    if m.get("tool_calls"):
        raise _bad(f"messages[{i}].tool_calls", "tool calls are not supported by the aepo-jax embedded server.")
    content = m.get("content")
    if content is None:
        if role != "assistant":
            raise _bad(f"messages[{i}].content", "field required")
        content = ""
    elif isinstance(content, list):
        parts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise _bad(f"messages[{i}].content[{j}]",
                           f"only text parts ({{'type': 'text', 'text': ...}}) are supported, got {kind!r}")
            parts.append(part["text"])
        content = "".join(parts)
    elif not isinstance(content, str):
        raise _bad(f"messages[{i}].content", "must be a string or a list of text parts")
    out = {"role": role, "content": content}
    if isinstance(m.get("name"), str):
        out["name"] = m["name"]
    return out


def read_generation_defaults(model_dir: str) -> dict:
    """``generation_config.json``'s sampling defaults that the embedded server honours (SGLang's chat
    defaults: a request's own value wins, then these, then OpenAI's)."""
    path = os.path.join(model_dir, "generation_config.json")
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        cfg = json.load(f)
    rp = cfg.get("repetition_penalty")
    if is_num(rp) and rp != 1.0:
        log.warning("%s: repetition_penalty=%s is not applied to chat requests (the embedded server has no "
                    "penalties); temperature, top_p, top_k and min_p defaults are", path, rp)
    return {k: cfg[k] for k in ("temperature", "top_p", "top_k", "min_p") if is_num(cfg.get(k))}


def translate_chat(body: Any, tokenizer, context_len: int, defaults: dict) -> Translated:
    if not isinstance(body, dict):
        raise OpenAIError("Request body must be a JSON object.", None)
    _check_known(body, _CHAT_FIELDS)
    if tokenizer is None:
        raise OpenAIError("chat completions need a tokenizer and its chat template; this server runs without "
                          "a tokenizer (--skip-tokenizer-init or none in the model directory).", "messages")
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise _bad("messages", "Messages cannot be empty." if isinstance(msgs, list) else "field required")
    messages = [_message_text(i, m) for i, m in enumerate(msgs)]
    if not getattr(tokenizer, "chat_template", None):
        raise _bad("messages", "the model directory has no chat template (tokenizer_config.json 'chat_template' "
                               "or chat_template.jinja); use /v1/completions")
    kwargs = _opt(body, "chat_template_kwargs", "dict", {})
    cont = _opt(body, "continue_final_message", "bool", False)
    if cont and messages[-1]["role"] != "assistant":
        raise _bad("continue_final_message", "the last message must be the assistant's")
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=not cont,
                                             continue_final_message=cont, **kwargs)
    except Exception as e:  # a template error is the request's (its messages or kwargs)
        raise _bad("messages", f"the chat template failed on these messages: {type(e).__name__}: {e}")
    ids = tokenizer.encode(text, add_special_tokens=False)  # the template writes special tokens itself
    if not ids:
        raise _bad("messages", "the chat template produced an empty prompt")
    mct = _opt(body, "max_completion_tokens", "int")
    mt = _opt(body, "max_tokens", "int")
    max_tokens = mct if mct is not None else mt
    name = "max_completion_tokens" if mct is not None else "max_tokens"
    if max_tokens is not None:
        if max_tokens <= 0:
            raise _bad(name, f"{name} must be positive")
        if max_tokens > context_len:
            raise _bad(name, f"{name} is too large: {max_tokens}. This model supports at most {context_len} "
                             "completion tokens.")
    else:
        max_tokens = max(context_len - len(ids), 0)  # SGLang: up to the context length
    stream, include_usage = _stream_flags(body)
    logprobs = _opt(body, "logprobs", "bool", False)
    top = _opt(body, "top_logprobs", "int")
    if top is not None:
        if not 0 <= top <= CHAT_MAX_TOP_LOGPROBS:
            raise _bad("top_logprobs", f"must be in [0, {CHAT_MAX_TOP_LOGPROBS}], got {top}")
        if top > 0 and not logprobs:
            raise _bad("top_logprobs", "requires logprobs: true")
    sp = _sampling(body, defaults, max_tokens)
    native = {"input_ids": ids, "sampling_params": sp, "return_logprob": logprobs,
              "top_logprobs_num": top or 0, "logprob_start_len": -1, "return_text_in_logprobs": True}
    return Translated(native, _opt(body, "model", "str", "default"), sp["n"], stream, include_usage,
                      logprobs=logprobs, token_bytes=token_bytes_fn(tokenizer))
