"""SGLang's JSON contract for ``/generate`` (``sglang/api/v1/api_types.py``): its key sets, its
serde-style type checks and texts, and the error bodies the server answers with.

A contract violation is a 400 ``{"error": "<serde-style text>"}`` (a string); we prefix the text
with the JSON path of the offending field (``sampling_params[1].temperature:``) because SGLang's
own text does not name it. Semantic errors are ``{"error": {"message": ...}}``
(``value_error``), malformed bodies and control-endpoint errors SGLang's ``ErrorResponse``
(``bad_request``). Pure Python.
"""

from __future__ import annotations

import json
from typing import Any, Callable

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1

# The contract's accepted sampling keys, in its own order (its "expected one of" text).
SAMPLING_PARAM_KEYS: tuple[str, ...] = (
    "max_new_tokens", "stop", "stop_token_ids", "stop_regex", "temperature", "top_p", "top_k",
    "min_p", "frequency_penalty", "presence_penalty", "repetition_penalty", "min_new_tokens", "n",
    "json_schema", "regex", "ebnf", "structural_tag", "ignore_eos", "skip_special_tokens",
    "spaces_between_special_tokens", "no_stop_trim", "stream_interval", "logit_bias",
    "sampling_seed", "custom_params", "beam_width", "watermark", "choice",
)
# Every field of SGLang 0.5.23's GenerateReqInput (io_struct.py), the accepted top-level keys.
GENERATE_REQ_INPUT_FIELDS: frozenset[str] = frozenset((
    "rid", "session_id", "text", "input_ids", "input_embeds", "image_data", "video_data",
    "audio_data", "mm_hashes", "mm_content_hashes", "use_audio_in_video", "video_config",
    "sampling_params", "watermark", "return_logprob", "logprob_start_len", "top_logprobs_num",
    "token_ids_logprob", "return_sampling_mask", "sampling_logprobs_mode", "return_text_in_logprobs",
    "return_flat_raw_top_logprobs", "return_flat_raw_output_top_logprobs",
    "return_flat_raw_top_logprobs_b64", "stream", "log_metrics", "return_hidden_states",
    "return_routed_experts", "routed_experts_start_len", "return_indexer_topk", "modalities",
    "session_params", "lora_path", "lora_id", "custom_logit_processor", "positional_embed_overrides",
    "bootstrap_host", "bootstrap_port", "bootstrap_room", "bootstrap_pair_key", "decode_tp_size",
    "routed_dp_rank", "data_parallel_rank", "disagg_prefill_dp_rank", "routing_key", "conversation_id",
    "http_worker_ipc", "background", "require_reasoning", "max_thinking_tokens", "priority",
    "extra_key", "no_logs", "custom_labels", "return_bytes", "return_entropy", "return_prompt_token_ids",
    "external_trace_header", "received_time", "need_wait_for_mm_inputs", "num_items_assigned",
    "encoder_urls", "max_dynamic_patch", "min_dynamic_patch", "image_max_dynamic_patch",
    "video_max_dynamic_patch", "images_config", "mm_processor_kwargs", "multi_item_delimiter_indices",
    "token_indices_to_pool", "cache_salt", "kv_hints",
))

# --------------------------------------------------------------------------- errors


class RequestError(Exception):
    """A request the server refuses: HTTP ``status`` with JSON ``body`` (SGLang's shapes)."""

    def __init__(self, status: int, body: Any):
        super().__init__(str(body))
        self.status = status
        self.body = body


def contract_error(path: str, msg: str) -> RequestError:
    """Contract-gate violation: 400 ``{"error": "<text>"}``."""
    return RequestError(400, {"error": f"{path}: {msg}" if path else msg})


def value_error(msg: str, status: int = 400) -> RequestError:
    """Semantic error (SGLang's ``_create_error_response``): ``{"error": {"message": ...}}``."""
    return RequestError(status, {"error": {"message": msg}})


def bad_request(msg: str, param: str | None = None, status: int = 400) -> RequestError:
    """SGLang's ``ErrorResponse`` (malformed JSON, control endpoints), naming the field in ``param``."""
    return RequestError(status, {"object": "error", "message": f"{param}: {msg}" if param else msg,
                                 "type": "Bad Request", "param": param, "code": status})


def parse_json(raw: bytes, *, object_required: bool = False) -> Any:
    """An HTTP body as JSON (None when empty); 400 on malformed JSON, on NaN/Infinity (not JSON)
    and on nesting deeper than the parser's recursion limit."""
    if not raw:
        return None
    try:
        body = json.loads(raw, parse_constant=_refuse_constant)
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
        raise bad_request(f"JSON decode error: {e}")
    except RecursionError:
        raise bad_request("JSON decode error: nested too deeply")
    if object_required and not isinstance(body, dict):
        raise bad_request("Request body must be a JSON object.")
    return body


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


# --------------------------------------------------------------------------- serde-style type checks


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


def is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_num(v: Any) -> bool:
    """A JSON number (bool is an int in Python, never a number here)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def type_error(path: str, v: Any, expected: str) -> RequestError:
    return contract_error(path, f"invalid type: {_unexpected(v)}, expected {expected}")


def _int(path: str, v: Any) -> int:
    if not is_int(v):
        raise type_error(path, v, "i64")
    if not INT64_MIN <= v <= INT64_MAX:
        raise contract_error(path, f"invalid value: integer `{v}`, expected i64")
    return v


def _float(path: str, v: Any) -> float:
    if not is_num(v):
        raise type_error(path, v, "f64")
    return float(v)


def check_bool(path: str, v: Any) -> bool:
    if not isinstance(v, bool):
        raise type_error(path, v, "a boolean")
    return v


def _str(path: str, v: Any) -> str:
    if not isinstance(v, str):
        raise type_error(path, v, "a string")
    return v


def _seq(path: str, v: Any) -> list:
    if not isinstance(v, list):
        raise type_error(path, v, "a sequence")
    return v


def token_ids(path: str, v: Any) -> list[int]:
    return [_int(f"{path}[{i}]", e) for i, e in enumerate(_seq(path, v))]


def _or_list(one: Callable[[str, Any], Any], is_type: Callable[[Any], bool], what: str):
    """A checker for "a value or an array of values" of the type ``one`` checks."""
    def check(path: str, v: Any):
        if isinstance(v, list):
            return [one(f"{path}[{i}]", e) for i, e in enumerate(v)]
        if not is_type(v):
            raise type_error(path, v, f"a value or an array of values for {what}")
        return one(path, v)
    return check


str_or_list = _or_list(_str, lambda v: isinstance(v, str), "StringOrList")
bool_or_list = _or_list(check_bool, lambda v: isinstance(v, bool), "BoolOrList")
int_or_list = _or_list(_int, is_int, "Int64OrList")


def _map(path: str, v: Any) -> dict:
    if not isinstance(v, dict):
        raise type_error(path, v, "a map")
    return v


SAMPLING_TYPES: dict[str, Callable[[str, Any], Any]] = {
    **dict.fromkeys(("max_new_tokens", "top_k", "min_new_tokens", "n", "stream_interval", "sampling_seed",
                     "beam_width"), _int),
    **dict.fromkeys(("temperature", "top_p", "min_p", "frequency_penalty", "presence_penalty",
                     "repetition_penalty"), _float),
    **dict.fromkeys(("ignore_eos", "skip_special_tokens", "spaces_between_special_tokens", "no_stop_trim"), check_bool),
    **dict.fromkeys(("stop", "stop_regex"), str_or_list),
    "stop_token_ids": token_ids,
    **dict.fromkeys(("json_schema", "regex", "ebnf", "structural_tag"), _str),
    "logit_bias": lambda p, x: {k: _float(f"{p}.{k}", e) for k, e in _map(p, x).items()},
    "choice": lambda p, x: [_str(f"{p}[{i}]", e) for i, e in enumerate(_seq(p, x))],
    "watermark": lambda p, x: x if isinstance(x, dict) else _raise_type_error(p, x, "struct WatermarkRequestConfig"),
    "custom_params": lambda p, x: x,  # any JSON
}


def _raise_type_error(path: str, v: Any, expected: str):
    raise type_error(path, v, expected)
