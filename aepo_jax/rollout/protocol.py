"""SGLang 0.5.23 native ``/generate`` protocol: request validation and response building.

Pure Python (no jax, no aiohttp) so both the embedded server and its tests can use it. The rules
mirror SGLang's two layers (see ``../shared/notes/sglang-api.md``):

1. the *contract gate* (``sglang/api/v1/api_types.py``): JSON types, unknown ``sampling_params``
   keys rejected. A violation is a 400 with ``{"error": "<serde-style text>"}`` (a string). We
   prefix the text with the JSON path of the offending field (``sampling_params[1].temperature:``)
   because SGLang's own text does not name it.
2. the *semantic checks* (``GenerateReqInput.normalize``, ``SamplingParams.verify``, the
   tokenizer manager's context-length check): a 400 with ``{"error": {"message": "..."}}``, with
   SGLang's message texts where it has one.

Features SGLang has but the embedded CPU server does not (penalties, grammars, logit_bias, top
logprobs, prompt logprobs, ...) are refused with a 400 that names the field, never silently ignored.
"""

from __future__ import annotations

import math
import uuid
from dataclasses import dataclass, field
from typing import Any

# The contract's accepted sampling keys, in its own order (its "expected one of" text).
SAMPLING_PARAM_KEYS: tuple[str, ...] = (
    "max_new_tokens", "stop", "stop_token_ids", "stop_regex", "temperature", "top_p", "top_k",
    "min_p", "frequency_penalty", "presence_penalty", "repetition_penalty", "min_new_tokens", "n",
    "json_schema", "regex", "ebnf", "structural_tag", "ignore_eos", "skip_special_tokens",
    "spaces_between_special_tokens", "no_stop_trim", "stream_interval", "logit_bias",
    "sampling_seed", "custom_params", "beam_width", "watermark", "choice",
)
TOP_K_ALL = 1 << 30  # SGLang's "whole vocabulary"
GREEDY_EPS = 1e-6  # SGLang: 0 <= temperature < 1e-6 means greedy (temperature 1, top_k 1)
MAX_STOP_COUNT = 32
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1

FLUSH_OK_TEXT = (
    "Cache flushed.\nPlease check backend logs for more details. "
    "(When there are running or waiting requests, the operation will not be performed.)\n"
)


class RequestError(Exception):
    """A request the server refuses: HTTP ``status`` with JSON ``body`` (SGLang's shapes)."""

    def __init__(self, status: int, body: Any):
        super().__init__(str(body))
        self.status = status
        self.body = body


def contract_error(path: str, msg: str) -> RequestError:
    """Contract-gate violation: 400 ``{"error": "<text>"}``."""
    return RequestError(400, {"error": f"{path}: {msg}" if path else msg})


def value_error(msg: str) -> RequestError:
    """Semantic error (SGLang's ``_create_error_response``): 400 ``{"error": {"message": ...}}``."""
    return RequestError(400, {"error": {"message": msg}})


def malformed_json_error(detail: str) -> RequestError:
    """FastAPI's RequestValidationError as SGLang re-shapes it (400, ``ErrorResponse``)."""
    return RequestError(
        400,
        {"object": "error", "message": f"JSON decode error: {detail}", "type": "Bad Request",
         "param": None, "code": 400},
    )


# ---- serde-style type checks (same texts as the generated contract) ----


def _unexpected(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return f"boolean `{'true' if v else 'false'}`"
    if isinstance(v, int):
        return f"integer `{v}`"
    if isinstance(v, float):
        return f"floating point `{v}`"
    if isinstance(v, str):
        return f'string "{v}"'
    if isinstance(v, list):
        return "sequence"
    if isinstance(v, dict):
        return "map"
    return type(v).__name__


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _type_error(path: str, v: Any, expected: str) -> RequestError:
    return contract_error(path, f"invalid type: {_unexpected(v)}, expected {expected}")


def _int(path: str, v: Any) -> int:
    if not _is_int(v):
        raise _type_error(path, v, "i64")
    if not INT64_MIN <= v <= INT64_MAX:
        raise contract_error(path, f"invalid value: integer `{v}`, expected i64")
    return v


def _float(path: str, v: Any) -> float:
    if not _is_number(v):
        raise _type_error(path, v, "f64")
    return float(v)


def _bool(path: str, v: Any) -> bool:
    if not isinstance(v, bool):
        raise _type_error(path, v, "a boolean")
    return v


def _str(path: str, v: Any) -> str:
    if not isinstance(v, str):
        raise _type_error(path, v, "a string")
    return v


def _seq(path: str, v: Any) -> list:
    if not isinstance(v, list):
        raise _type_error(path, v, "a sequence")
    return v


def _token_ids(path: str, v: Any) -> list[int]:
    return [_int(f"{path}[{i}]", e) for i, e in enumerate(_seq(path, v))]


def _str_or_list(path: str, v: Any) -> str | list[str]:
    if isinstance(v, list):
        return [_str(f"{path}[{i}]", e) for i, e in enumerate(v)]
    if not isinstance(v, str):
        raise _type_error(path, v, "a value or an array of values for StringOrList")
    return v


def _bool_or_list(path: str, v: Any) -> bool | list[bool]:
    if isinstance(v, list):
        return [_bool(f"{path}[{i}]", e) for i, e in enumerate(v)]
    if not isinstance(v, bool):
        raise _type_error(path, v, "a value or an array of values for BoolOrList")
    return v


def _int_or_list(path: str, v: Any) -> int | list[int]:
    if isinstance(v, list):
        return [_int(f"{path}[{i}]", e) for i, e in enumerate(v)]
    if not _is_int(v):
        raise _type_error(path, v, "a value or an array of values for Int64OrList")
    return v


def _unknown_field(path: str, key: str) -> RequestError:
    listed = ", ".join(f"`{f}`" for f in SAMPLING_PARAM_KEYS)
    return contract_error(path, f"unknown field `{key}`, expected one of {listed}")


# ---- sampling parameters ----


@dataclass(frozen=True)
class SamplingSpec:
    """One request's sampling parameters after SGLang's defaults, normalisation and ``verify``."""

    max_new_tokens: int = 128
    temperature: float = 1.0  # as sent; ``greedy`` tells whether it means argmax
    top_p: float = 1.0
    top_k: int = TOP_K_ALL
    min_p: float = 0.0
    stop_token_ids: tuple[int, ...] = ()
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    no_stop_trim: bool = False
    sampling_seed: int | None = None
    n: int = 1

    @property
    def greedy(self) -> bool:
        return 0.0 <= self.temperature < GREEDY_EPS


# Keys accepted by the contract whose non-default values the embedded server cannot honour.
_UNSUPPORTED_DEFAULTS: dict[str, Any] = {
    "stop_regex": None, "frequency_penalty": 0.0, "presence_penalty": 0.0,
    "repetition_penalty": 1.0, "min_new_tokens": 0, "json_schema": None, "regex": None,
    "ebnf": None, "structural_tag": None, "logit_bias": {}, "custom_params": None,
    "beam_width": None, "watermark": None, "choice": [],
}


def parse_sampling_params(path: str, raw: Any, vocab_size: int) -> SamplingSpec:
    """Contract types, then SGLang's ``__post_init__`` + ``verify`` ranges, then our support."""
    if not isinstance(raw, dict):
        raise _type_error(path, raw, "struct SamplingParams")
    kw: dict[str, Any] = {}
    for key, x in raw.items():
        p = f"{path}.{key}"
        if key not in SAMPLING_PARAM_KEYS:
            raise _unknown_field(path, key)
        if x is None:
            continue  # null means "use the default"
        if key in ("max_new_tokens", "top_k", "min_new_tokens", "n", "stream_interval",
                   "sampling_seed", "beam_width"):
            kw[key] = _int(p, x)
        elif key in ("temperature", "top_p", "min_p", "frequency_penalty", "presence_penalty",
                     "repetition_penalty"):
            kw[key] = _float(p, x)
        elif key in ("ignore_eos", "skip_special_tokens", "spaces_between_special_tokens",
                     "no_stop_trim"):
            kw[key] = _bool(p, x)
        elif key in ("stop", "stop_regex"):
            kw[key] = _str_or_list(p, x)
        elif key == "stop_token_ids":
            kw[key] = _token_ids(p, x)
        elif key in ("json_schema", "regex", "ebnf", "structural_tag"):
            kw[key] = _str(p, x)
        elif key == "logit_bias":
            if not isinstance(x, dict):
                raise _type_error(p, x, "a map")
            kw[key] = {k: _float(f"{p}.{k}", e) for k, e in x.items()}
        elif key == "choice":
            kw[key] = [_str(f"{p}[{i}]", e) for i, e in enumerate(_seq(p, x))]
        elif key == "watermark":
            if not isinstance(x, dict):
                raise _type_error(p, x, "struct WatermarkRequestConfig")
            kw[key] = x
        else:  # custom_params: any JSON
            kw[key] = x

    # SGLang's verify(), same messages.
    temperature = kw.get("temperature", 1.0)
    top_p = kw.get("top_p", 1.0)
    min_p = kw.get("min_p", 0.0)
    top_k = kw.get("top_k", TOP_K_ALL)
    if top_k == -1:
        top_k = TOP_K_ALL
    max_new_tokens = kw.get("max_new_tokens", 128)
    if not math.isfinite(temperature) or temperature < 0.0:
        raise value_error(f"temperature must be a non-negative finite number, got {temperature}.")
    if not 0.0 < top_p <= 1.0:
        raise value_error(f"top_p must be in (0, 1], got {top_p}.")
    if not 0.0 <= min_p <= 1.0:
        raise value_error(f"min_p must be in [0, 1], got {min_p}.")
    if top_k < 1:
        raise value_error(f"top_k must be -1 (disable) or at least 1, got {top_k}.")
    for name, lo, hi in (("frequency_penalty", -2.0, 2.0), ("presence_penalty", -2.0, 2.0)):
        v = kw.get(name, 0.0)
        if not lo <= v <= hi:
            raise value_error(f"{name} must be in [-2, 2], got {v}.")
    rp = kw.get("repetition_penalty", 1.0)
    if not 0.0 < rp <= 2.0:
        raise value_error(f"repetition_penalty must be in (0, 2] (1.0 = no penalty), got {rp}.")
    if max_new_tokens < 0:
        raise value_error(f"max_new_tokens must be at least 0, got {max_new_tokens}.")
    n = kw.get("n", 1)
    if n < 1:
        raise value_error(f"n must be at least 1, got {n}.")
    stop = kw.get("stop", [])
    stop = [stop] if isinstance(stop, str) else list(stop)
    if len(stop) > MAX_STOP_COUNT:
        raise value_error(f"at most {MAX_STOP_COUNT} stop strings are allowed, got {len(stop)}")
    stop_ids = tuple(kw.get("stop_token_ids", ()))
    for i, t in enumerate(stop_ids):
        if not 0 <= t < vocab_size:
            raise value_error(
                f"{path}.stop_token_ids[{i}]: token id {t} is outside the vocabulary [0, {vocab_size})."
            )
    for key, default in _UNSUPPORTED_DEFAULTS.items():
        if key in kw and kw[key] != default:
            raise value_error(
                f"{path}.{key}: not supported by the aepo-jax embedded server "
                f"(only the default {default!r} is accepted)."
            )
    return SamplingSpec(
        max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
        min_p=min_p, stop_token_ids=stop_ids, stop=tuple(stop),
        ignore_eos=kw.get("ignore_eos", False),
        skip_special_tokens=kw.get("skip_special_tokens", True),
        no_stop_trim=kw.get("no_stop_trim", False), sampling_seed=kw.get("sampling_seed"), n=n,
    )


# ---- the whole /generate body ----


@dataclass
class GenerateItem:
    """One sequence to generate (after batch and ``n`` expansion)."""

    rid: str
    input_ids: list[int]
    sampling: SamplingSpec
    seed: int | None  # per-sample seed (``sampling_seed`` + sample index), None = server draws
    return_logprob: bool = False
    return_text_in_logprobs: bool = False
    return_prompt_token_ids: bool = False


@dataclass
class ParsedGenerate:
    items: list[GenerateItem]
    is_single: bool  # a single prompt with n == 1: the response is one object, not an array
    stream: bool = False
    prompt_texts: list[str | None] = field(default_factory=list)


# Top-level GenerateRequest fields: ours are checked; the rest of the contract's fields are
# accepted when null/absent and refused otherwise (the embedded server cannot honour them).
_TOP_LEVEL_UNSUPPORTED = (
    "input_embeds", "image_data", "video_data", "audio_data", "lora_path", "session_params",
    "custom_logit_processor", "return_hidden_states", "token_ids_logprob", "kv_hints",
    "bootstrap_host", "bootstrap_port", "bootstrap_room", "return_sampling_mask",
    "max_thinking_tokens", "session_id",
)


def _per_item(name: str, value: Any, batch: int, default: Any) -> list:
    if value is None:
        return [default] * batch
    if isinstance(value, list):
        if len(value) != batch:
            raise value_error(f"The length of {name} ({len(value)}) should equal the batch size ({batch}).")
        return list(value)
    return [value] * batch


def parse_generate(
    body: Any,
    *,
    vocab_size: int,
    context_len: int,
    tokenize=None,
) -> ParsedGenerate:
    """Validate a parsed ``/generate`` JSON body; raise :class:`RequestError` on bad input.

    ``tokenize(text) -> list[int]`` is None when the server has no tokenizer
    (``--skip-tokenizer-init`` behaviour: text prompts are refused).
    """
    if not isinstance(body, dict):
        raise _type_error("", body, "struct GenerateRequest")
    # ---- contract layer: types of the fields we read ----
    text = body.get("text")
    input_ids = body.get("input_ids")
    if text is not None:
        text = _str_or_list("text", text)
    if input_ids is not None:
        if not isinstance(input_ids, list):
            raise _type_error("input_ids", input_ids, "a value or an array of values for TokenIdsOrList")
        if not input_ids or _is_number(input_ids[0]):
            input_ids = _token_ids("input_ids", input_ids)
        else:
            input_ids = [_token_ids(f"input_ids[{i}]", e) for i, e in enumerate(input_ids)]
    rid = body.get("rid")
    if rid is not None:
        rid = _str_or_list("rid", rid)
    sp_raw = body.get("sampling_params")
    if sp_raw is not None and not isinstance(sp_raw, (dict, list)):
        raise _type_error("sampling_params", sp_raw, "a value or an array of values for SamplingParamsOrList")
    return_logprob = body.get("return_logprob")
    if return_logprob is not None:
        return_logprob = _bool_or_list("return_logprob", return_logprob)
    for name in ("logprob_start_len", "top_logprobs_num"):
        if body.get(name) is not None:
            _int_or_list(name, body[name])
    stream = body.get("stream")
    stream = False if stream is None else _bool("stream", stream)
    rtil = body.get("return_text_in_logprobs")
    rtil = False if rtil is None else _bool("return_text_in_logprobs", rtil)
    rpti = body.get("return_prompt_token_ids", False)
    rpti = _bool("return_prompt_token_ids", rpti)

    # ---- semantic layer ----
    if (text is None) == (input_ids is None):
        raise value_error("Either text, input_ids or input_embeds should be provided.")
    for name in _TOP_LEVEL_UNSUPPORTED:
        if body.get(name) not in (None, False, [], {}):
            raise value_error(f"{name}: not supported by the aepo-jax embedded server.")
    for name, bad in (("logprob_start_len", lambda v: v != -1), ("top_logprobs_num", lambda v: v != 0)):
        v = body.get(name)
        vals = v if isinstance(v, list) else [v]
        if v is not None and any(bad(x) for x in vals):
            raise value_error(
                f"{name}: only the default ({-1 if name == 'logprob_start_len' else 0}) is "
                "supported by the aepo-jax embedded server."
            )

    prompt_texts: list[str | None]
    if text is not None:
        if tokenize is None:
            raise value_error(
                "The engine initialized with skip_tokenizer_init=True cannot accept text prompts. "
                "Please provide input_ids or re-initialize the engine with skip_tokenizer_init=False."
            )
        is_single = isinstance(text, str)
        texts = [text] if is_single else text
        if not texts:
            raise value_error("text cannot be empty.")
        prompts = [list(tokenize(t)) for t in texts]
        prompt_texts = list(texts)
    else:
        if len(input_ids) == 0:
            raise value_error("input_ids cannot be empty.")
        is_single = not isinstance(input_ids[0], list)
        prompts = [input_ids] if is_single else input_ids
        prompt_texts = [None] * len(prompts)
    batch = len(prompts)

    if isinstance(sp_raw, list):
        if is_single:
            if len(sp_raw) != 1:
                raise value_error("sampling_params should be a dict (or a list of one dict) for a single request.")
        elif len(sp_raw) != batch:
            raise value_error(
                f"The length of sampling_params ({len(sp_raw)}) should equal the batch size ({batch})."
            )
        specs = [parse_sampling_params(f"sampling_params[{i}]", s, vocab_size) for i, s in enumerate(sp_raw)]
    else:
        spec = parse_sampling_params("sampling_params", sp_raw or {}, vocab_size)
        specs = [spec] * batch
    n = specs[0].n
    if any(s.n != n for s in specs):
        raise value_error("The parallel_sample_num should be the same for all samples in sample params.")

    rlp = _per_item("return_logprob", return_logprob, batch, False)
    if isinstance(rid, list):
        if n > 1:
            rids = None  # SGLang regenerates a uuid per sample when n > 1
        else:
            rids = _per_item("rid", rid, batch, None)
            if len(set(rids)) != len(rids):
                dups = sorted({r for r in rids if rids.count(r) > 1})
                raise value_error(f"Duplicate request IDs detected within the request: {dups}")
    elif isinstance(rid, str) and n == 1:
        rids = [rid] if is_single else [f"{rid}_{i}" for i in range(batch)]
    else:
        rids = None

    for i, (ids, spec) in enumerate(zip(prompts, specs)):
        where = "input_ids" if is_single else f"input_ids[{i}]"
        if not ids:
            raise value_error(f"{where}: input_ids cannot be empty.")
        bad = [t for t in ids if not 0 <= t < vocab_size]
        if bad:
            raise value_error(f"{where}: token id {bad[0]} is outside the vocabulary [0, {vocab_size}).")
        if len(ids) >= context_len:
            raise value_error(
                f"The input ({len(ids)} tokens) is longer than the model's context length "
                f"({context_len} tokens)."
            )
        if len(ids) + spec.max_new_tokens > context_len:
            total = len(ids) + spec.max_new_tokens
            raise value_error(
                f"Requested token count exceeds the model's maximum context length of {context_len} "
                f"tokens. You requested a total of {total} tokens: {len(ids)} tokens from the input "
                f"messages and {spec.max_new_tokens} tokens for the completion. Please reduce the "
                "number of tokens in the input messages or the completion to fit within the limit."
            )
        if spec.stop and tokenize is None:
            raise value_error(
                f"{'sampling_params' if not isinstance(sp_raw, list) else f'sampling_params[{i}]'}.stop: "
                "stop strings need a tokenizer (this server runs without one); use stop_token_ids."
            )

    items: list[GenerateItem] = []
    texts_out: list[str | None] = []
    for i, (ids, spec) in enumerate(zip(prompts, specs)):  # prompt-major, as SGLang
        for j in range(n):
            r = rids[i] if (rids is not None and n == 1) else uuid.uuid4().hex
            seed = None if spec.sampling_seed is None else _wrap_seed(spec.sampling_seed + j)
            items.append(GenerateItem(rid=r, input_ids=list(ids), sampling=spec, seed=seed,
                                      return_logprob=bool(rlp[i]), return_text_in_logprobs=rtil,
                                      return_prompt_token_ids=rpti))
            texts_out.append(prompt_texts[i])
    return ParsedGenerate(items=items, is_single=is_single and n == 1, stream=stream,
                          prompt_texts=texts_out)


def _wrap_seed(s: int) -> int:
    """Keep ``seed + j`` inside int64 (wrap around), so a valid seed never becomes invalid."""
    return (s - INT64_MIN) % (2**64) + INT64_MIN


# ---- responses ----


def finish_stop_token(token_id: int) -> dict:
    return {"type": "stop", "matched": int(token_id)}


def finish_stop_str(s: str) -> dict:
    return {"type": "stop", "matched": s}


def finish_length(n: int) -> dict:
    return {"type": "length", "length": int(n)}


def finish_abort(message: str = "Aborted", status_code: int | None = None, err_type: str | None = None) -> dict:
    return {"type": "abort", "message": message, "status_code": status_code, "err_type": err_type}


def build_response(
    item: GenerateItem,
    *,
    output_ids: list[int],
    finish_reason: dict | None,
    logprobs: list[float] | None,
    weight_version: str,
    e2e_latency: float,
    now: float,
    text: str | None = None,
    token_texts: list[str | None] | None = None,
) -> dict:
    """One ``/generate`` result object, keys in SGLang's order. ``text=None`` omits ``text``
    (``--skip-tokenizer-init`` behaviour)."""
    meta: dict[str, Any] = {
        "id": item.rid,
        "finish_reason": finish_reason,
        "prompt_tokens": len(item.input_ids),
        "weight_version": weight_version,
        "num_retractions": 0,
    }
    if item.return_logprob:
        lp = logprobs or []
        tt = token_texts if (token_texts is not None and item.return_text_in_logprobs) else [None] * len(output_ids)
        meta["input_token_logprobs"] = []
        meta["output_token_logprobs"] = [[float(l), int(t), s] for l, t, s in zip(lp, output_ids, tt)]
        meta["output_token_logprobs_length"] = len(output_ids)
    meta["reasoning_tokens"] = 0
    meta["completion_tokens"] = len(output_ids)
    meta["cached_tokens"] = 0
    meta["e2e_latency"] = float(e2e_latency)
    meta["response_sent_to_client_ts"] = float(now)
    out: dict[str, Any] = {}
    if text is not None:
        out["text"] = text
    out["output_ids"] = [int(t) for t in output_ids]
    out["meta_info"] = meta
    if item.return_prompt_token_ids:
        out["prompt_token_ids"] = list(item.input_ids)
    return out
