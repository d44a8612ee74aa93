"""``/generate`` result objects and the info bodies, in SGLang 0.5.23's shapes (pure Python).

A result is built from one sampler result: the output is cut at the first ``stop`` string (SGLang
checks stop strings before token stops), the text is decoded and trimmed as SGLang's detokenizer
does, and ``meta_info`` carries SGLang's keys in SGLang's order.
"""

from __future__ import annotations

import math
from typing import Any, Callable

from aepo_jax.rollout.protocol import GenerateItem

Decode = Callable[[list[int], bool], str]  # (token ids, skip_special_tokens) -> text

FLUSH_OK_TEXT = (
    "Cache flushed.\nPlease check backend logs for more details. "
    "(When there are running or waiting requests, the operation will not be performed.)\n"
)


def finish_abort(message: str) -> dict:
    return {"type": "abort", "message": message, "status_code": None, "err_type": None}


def cut_at_stop_string(ids: list[int], stops: tuple[str, ...], skip_special: bool, decode: Decode):
    """(k, matched): the shortest prefix ids[:k] whose text contains a stop string, and which one
    (the earliest in that text); (len(ids), None) when none occurs."""
    def first_hit(k):
        text = decode(ids[:k], skip_special)
        found = [(text.find(s), s) for s in stops if s in text]
        return min(found) if found else None

    if not stops or not ids or first_hit(len(ids)) is None:
        return len(ids), None
    lo, hi = 0, len(ids)  # bisection: containing a stop string is monotone in the prefix length
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if first_hit(mid) is None:
            lo = mid
        else:
            hi = mid
    return hi, first_hit(hi)[1]


def _finite(x: float) -> float | None:
    """JSON has no NaN/Infinity: a non-finite log-prob is sent as null, never as a bare NaN."""
    return float(x) if math.isfinite(x) else None


def build_response(item: GenerateItem, *, output_ids: list[int], finish_reason: dict, logprobs: list[float],
                   weight_version: str, e2e_latency: float, now: float, decode: Decode | None = None,
                   extras: Any = None) -> dict:
    """One ``/generate`` result object, keys in SGLang's order. ``decode=None`` (no tokenizer)
    omits ``text``, as SGLang's ``--skip-tokenizer-init``. ``extras``: the sequence's
    ``extra_logprobs.LogprobExtras`` (input, top-k and token-id log-probs), or None."""
    opt = item.output
    text = token_texts = None
    if decode is not None:
        k, matched = cut_at_stop_string(output_ids, opt.stop, opt.skip_special_tokens, decode)
        if matched is not None:
            output_ids, logprobs = output_ids[:k], logprobs[:k]
            extras = extras.truncated(k) if extras is not None else None
            finish_reason = {"type": "stop", "matched": matched}
        shown = output_ids
        if finish_reason.get("type") == "stop" and not opt.no_stop_trim and matched is None and output_ids:
            shown = output_ids[:-1]  # the matched stop token is trimmed from text (kept in output_ids)
        text = decode(shown, opt.skip_special_tokens)
        if matched is not None and not opt.no_stop_trim:
            cut = text.find(matched)
            text = text[:cut] if cut >= 0 else text
        if opt.return_logprob and opt.return_text_in_logprobs:
            token_texts = [decode([t], False) for t in output_ids]
    meta: dict[str, Any] = {"id": item.rid, "finish_reason": finish_reason,
                            "prompt_tokens": len(item.request.input_ids), "weight_version": weight_version,
                            "num_retractions": 0}
    if opt.return_logprob:
        tt = token_texts if token_texts is not None else [None] * len(output_ids)
        meta["input_token_logprobs"] = []
        meta["output_token_logprobs"] = [[_finite(lp), int(t), s] for lp, t, s in zip(logprobs, output_ids, tt)]
        meta["output_token_logprobs_length"] = len(output_ids)
        if extras is not None:
            text_of = (lambda t: decode([t], False)) if (decode is not None and opt.return_text_in_logprobs) else None
            meta.update(_extras_fields(opt, extras, text_of))
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
    if opt.return_prompt_token_ids:
        out["prompt_token_ids"] = list(item.request.input_ids)
    return out


def _extras_fields(opt, extras, text_of) -> dict:
    """SGLang's input/top/token-id log-prob fields: ``[logprob, token_id, text-or-null]`` entries;
    a row of top/token-id entries is ``null`` where SGLang has none (the first prompt position)."""
    def entry(e):
        return [None if e[0] is None else _finite(e[0]), int(e[1]), text_of(e[1]) if text_of else None]

    def rows(rs):
        return [None if r is None else [entry(e) for e in r] for r in rs]

    out: dict[str, Any] = {"input_token_logprobs": [entry(e) for e in extras.input_token_logprobs]}
    if opt.top_logprobs_num > 0:
        out["input_top_logprobs"] = rows(extras.input_top_logprobs)
        out["output_top_logprobs"] = rows(extras.output_top_logprobs)
    if opt.token_ids_logprob is not None:
        out["input_token_ids_logprobs"] = rows(extras.input_token_ids_logprobs)
        out["output_token_ids_logprobs"] = rows(extras.output_token_ids_logprobs)
    return out


def model_info(*, model_path: str, served_model_name: str | None, tokenizer_path: str, weight_version: str,
               model_config: dict) -> dict:
    """``GET /model_info``: SGLang's fields (the contract's, then ``model_type``/``architectures``)."""
    return {
        "model_path": model_path,
        "served_model_name": served_model_name or model_path,
        "tokenizer_path": tokenizer_path,
        "is_generation": True,
        "preferred_sampling_params": None,
        "weight_version": weight_version,
        "load_format": "auto",
        "reasoning_parser": None,
        "tool_call_parser": None,
        "disaggregation_mode": "null",
        "has_image_understanding": False,
        "has_audio_understanding": False,
        "model_type": model_config.get("model_type"),
        "architectures": model_config.get("architectures"),
    }
