"""SGLang 0.5.23 native ``/generate`` requests: what a request is and when it is valid.

Pure Python (no jax, no aiohttp): the server, the sampler, the client and the tests share it.
Two layers, as SGLang's: the contract gate's JSON types (``contract.py``), then the semantic checks
(``GenerateReqInput.normalize``, ``SamplingParams.verify``, the tokenizer manager's context-length
check) with SGLang's message texts. ``check_request`` holds the per-sequence checks; the sampler
runs the same function on its own callers' requests.

Top-level keys that are not fields of SGLang's ``GenerateReqInput`` are refused (SGLang's own
clients only send its fields). Features SGLang has but the embedded CPU server does not
(penalties, grammars, logit_bias, images, LoRA, ...) are refused with a 400 that
names the field unless their value is neutral (null, empty, false, or SGLang's default), never
silently ignored.
"""

from __future__ import annotations

import dataclasses
import math
import uuid
from dataclasses import dataclass, field
from typing import Any

from aepo_jax.rollout.contract import (  # noqa: F401  (SAMPLING_PARAM_KEYS, RequestError: re-exported)
    GENERATE_REQ_INPUT_FIELDS, INT64_MIN, SAMPLING_PARAM_KEYS, SAMPLING_TYPES, RequestError, bool_or_list,
    check_bool, contract_error, int_or_list, str_or_list, token_ids, type_error, value_error)

# Top-level fields this server reads; and fields that only route, tag or log a request (no effect
# on the output of one engine), accepted with any value. Every other field must be neutral.
_TOP_LEVEL_READ = frozenset(("text", "input_ids", "sampling_params", "rid", "return_logprob",
                             "logprob_start_len", "top_logprobs_num", "return_text_in_logprobs",
                             "stream", "return_prompt_token_ids", "token_ids_logprob"))
_TOP_LEVEL_METADATA = frozenset(("log_metrics", "no_logs", "priority", "routing_key", "routed_dp_rank",
                                 "data_parallel_rank", "extra_key", "cache_salt", "custom_labels",
                                 "conversation_id", "received_time", "http_worker_ipc",
                                 "external_trace_header"))
_TOP_LEVEL_DEFAULTS = {"routed_experts_start_len": 0}  # non-null defaults of the other fields
# Sampling keys accepted by the contract whose non-default values the embedded server cannot honour.
_UNSUPPORTED_DEFAULTS: dict[str, Any] = {
    "stop_regex": None, "frequency_penalty": 0.0, "presence_penalty": 0.0,
    "repetition_penalty": 1.0, "min_new_tokens": 0, "json_schema": None, "regex": None,
    "ebnf": None, "structural_tag": None, "logit_bias": {}, "custom_params": None,
    "beam_width": None, "watermark": None, "choice": [],
}
TOP_K_ALL = 1 << 30  # SGLang's "whole vocabulary"
MAX_STOP_COUNT = 32


def _neutral(value: Any, default: Any = None) -> bool:
    """null, empty, false or the default: a value that asks for nothing."""
    return value is None or value is False or value == default or (
        isinstance(value, (str, list, dict)) and not value)


# --------------------------------------------------------------------------- one sequence


@dataclass(frozen=True)
class SamplingRequest:
    """One sequence to generate: what the sampler needs (``Sampler.generate``)."""

    input_ids: tuple[int, ...]
    max_new_tokens: int = 128
    temperature: float = 1.0  # < sampling.GREEDY_EPS: greedy
    top_p: float = 1.0
    top_k: int = -1  # -1 or >= vocab: whole vocabulary
    min_p: float = 0.0
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False  # disables every token stop (EOS and stop_token_ids), as SGLang
    seed: int | None = None  # None: a fresh random seed

    def __post_init__(self):
        object.__setattr__(self, "input_ids", tuple(int(t) for t in self.input_ids))
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))


def check_request(r: SamplingRequest, vocab_size: int, context_len: int, *, ids_name: str = "input_ids",
                  params_name: str = "") -> None:
    """SGLang's checks of one sequence (``SamplingParams.verify``, the prompt and context-length
    checks), with SGLang's texts; ValueError on the first violation. ``ids_name`` and
    ``params_name`` say where the prompt and the sampling parameters came from."""
    at = f"{params_name}." if params_name else ""
    if not math.isfinite(r.temperature) or r.temperature < 0.0:
        raise ValueError(f"temperature must be a non-negative finite number, got {r.temperature}.")
    if not 0.0 < r.top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {r.top_p}.")
    if not 0.0 <= r.min_p <= 1.0:
        raise ValueError(f"min_p must be in [0, 1], got {r.min_p}.")
    if r.top_k < 1 and r.top_k != -1:
        raise ValueError(f"top_k must be -1 (disable) or at least 1, got {r.top_k}.")
    if r.max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be at least 0, got {r.max_new_tokens}.")
    for i, t in enumerate(r.stop_token_ids):
        if not 0 <= t < vocab_size:
            raise ValueError(f"{at}stop_token_ids[{i}]: token id {t} is outside the vocabulary [0, {vocab_size}).")
    if not r.input_ids:
        raise ValueError(f"{ids_name} cannot be empty.")
    bad = next((t for t in r.input_ids if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise ValueError(f"{ids_name}: token id {bad} is outside the vocabulary [0, {vocab_size}).")
    n = len(r.input_ids)
    if n >= context_len:
        raise ValueError(f"The input ({n} tokens) is longer than the model's context length ({context_len} tokens).")
    if n + r.max_new_tokens > context_len:
        raise ValueError(
            f"Requested token count exceeds the model's maximum context length of {context_len} tokens. "
            f"You requested a total of {n + r.max_new_tokens} tokens: {n} tokens from the input messages "
            f"and {r.max_new_tokens} tokens for the completion. Please reduce the number of tokens in the "
            "input messages or the completion to fit within the limit.")


# --------------------------------------------------------------------------- the /generate body


@dataclass(frozen=True)
class OutputOptions:
    """What the response of one sequence shows (text, stop strings, log-probs)."""

    stop: tuple[str, ...] = ()
    skip_special_tokens: bool = True
    no_stop_trim: bool = False
    return_logprob: bool = False
    return_text_in_logprobs: bool = False
    return_prompt_token_ids: bool = False
    logprob_start_len: int = -1  # >= 0: input_token_logprobs from this prompt position on
    top_logprobs_num: int = 0
    token_ids_logprob: tuple[int, ...] | None = None


@dataclass
class GenerateItem:
    """One sequence of a ``/generate`` call (after batch and ``n`` expansion)."""

    rid: str
    request: SamplingRequest  # seed None: the server draws one
    output: OutputOptions = field(default_factory=OutputOptions)

    @property
    def wants_extra_logprobs(self) -> bool:
        """Needs a scoring forward beyond the sampler's own log-probs (``extra_logprobs``)."""
        o = self.output
        return o.return_logprob and (0 <= o.logprob_start_len < len(self.request.input_ids)
                                     or o.top_logprobs_num > 0 or o.token_ids_logprob is not None)


@dataclass
class ParsedGenerate:
    items: list[GenerateItem]
    is_single: bool  # a single prompt with n == 1: the response is one object, not an array
    stream: bool = False


@dataclass(frozen=True)
class Limits:
    """Per-call caps that keep one request from taking the host's memory (``--max-*`` flags)."""

    max_n: int = 64  # sampling_params.n
    max_rows: int = 4096  # sequences per call, after n expansion


def _sampling_kwargs(path: str, raw: Any) -> dict[str, Any]:
    """Contract types of one ``sampling_params`` dict, unsupported features refused."""
    if not isinstance(raw, dict):
        raise type_error(path, raw, "struct SamplingParams")
    kw: dict[str, Any] = {}
    for key, x in raw.items():
        if key not in SAMPLING_TYPES:
            listed = ", ".join(f"`{f}`" for f in SAMPLING_PARAM_KEYS)
            raise contract_error(path, f"unknown field `{key}`, expected one of {listed}")
        if x is not None:  # null means "use the default"
            kw[key] = SAMPLING_TYPES[key](f"{path}.{key}", x)
    for name, lo, hi in (("frequency_penalty", -2.0, 2.0), ("presence_penalty", -2.0, 2.0)):
        if not lo <= kw.get(name, 0.0) <= hi:
            raise value_error(f"{name} must be in [-2, 2], got {kw[name]}.")
    if not 0.0 < kw.get("repetition_penalty", 1.0) <= 2.0:
        raise value_error(f"repetition_penalty must be in (0, 2] (1.0 = no penalty), got {kw['repetition_penalty']}.")
    if kw.get("n", 1) < 1:
        raise value_error(f"n must be at least 1, got {kw['n']}.")
    stop = kw.get("stop", [])
    kw["stop"] = [stop] if isinstance(stop, str) else list(stop)
    if len(kw["stop"]) > MAX_STOP_COUNT:
        raise value_error(f"at most {MAX_STOP_COUNT} stop strings are allowed, got {len(kw['stop'])}")
    for key, default in _UNSUPPORTED_DEFAULTS.items():
        if key in kw and not _neutral(kw[key], default):
            raise value_error(f"{path}.{key}: not supported by the aepo-jax embedded server "
                              f"(only the default {default!r} is accepted).")
    return kw


def _per_item(name: str, value: Any, batch: int, default: Any) -> list:
    if value is None:
        return [default] * batch
    if isinstance(value, list):
        if len(value) != batch:
            raise value_error(f"The length of {name} ({len(value)}) should equal the batch size ({batch}).")
        return list(value)
    return [value] * batch


def _prompts(body: dict, tokenize) -> tuple[list[list[int]], bool]:
    """(token-id prompts, is_single) from ``text`` or ``input_ids``."""
    text, input_ids = body.get("text"), body.get("input_ids")
    if text is not None:
        text = str_or_list("text", text)
    if input_ids is not None:
        if not isinstance(input_ids, list):
            raise type_error("input_ids", input_ids, "a value or an array of values for TokenIdsOrList")
        if not input_ids or not isinstance(input_ids[0], list):
            input_ids = token_ids("input_ids", input_ids)
        else:
            input_ids = [token_ids(f"input_ids[{i}]", e) for i, e in enumerate(input_ids)]
    if (text is None) == (input_ids is None):
        raise value_error("Either text, input_ids or input_embeds should be provided.")
    if text is not None:
        if tokenize is None:
            raise value_error(
                "The engine initialized with skip_tokenizer_init=True cannot accept text prompts. "
                "Please provide input_ids or re-initialize the engine with skip_tokenizer_init=False.")
        texts = [text] if isinstance(text, str) else text
        if not texts:
            raise value_error("text cannot be empty.")
        return [list(tokenize(t)) for t in texts], isinstance(text, str)
    if not input_ids:
        raise value_error("input_ids cannot be empty.")
    is_single = not isinstance(input_ids[0], list)
    return ([input_ids] if is_single else input_ids), is_single


def parse_generate(body: Any, *, vocab_size: int, context_len: int, tokenize=None,
                   limits: Limits = Limits()) -> ParsedGenerate:
    """Validate a parsed ``/generate`` JSON body; raise :class:`RequestError` on bad input.

    ``tokenize(text) -> list[int]`` is None when the server has no tokenizer
    (``--skip-tokenizer-init`` behaviour: text prompts are refused)."""
    if not isinstance(body, dict):
        raise type_error("", body, "struct GenerateRequest")
    # ---- contract layer: types of the fields we read ----
    rid = body.get("rid")
    if rid is not None:
        rid = str_or_list("rid", rid)
    sp_raw = body.get("sampling_params")
    if sp_raw is not None and not isinstance(sp_raw, (dict, list)):
        raise type_error("sampling_params", sp_raw, "a value or an array of values for SamplingParamsOrList")
    return_logprob = body.get("return_logprob")
    if return_logprob is not None:
        return_logprob = bool_or_list("return_logprob", return_logprob)
    lsl_raw = body.get("logprob_start_len")
    lsl_raw = None if lsl_raw is None else int_or_list("logprob_start_len", lsl_raw)
    tln_raw = body.get("top_logprobs_num")
    tln_raw = None if tln_raw is None else int_or_list("top_logprobs_num", tln_raw)
    til_raw, til_nested = body.get("token_ids_logprob"), False  # nested: one list of ids per prompt
    if til_raw is not None:
        if not isinstance(til_raw, list):
            raise type_error("token_ids_logprob", til_raw, "a value or an array of values for TokenIdsOrList")
        if til_raw and (isinstance(til_raw[0], list) or til_raw[0] is None):
            til_nested = True
            til_raw = [None if e is None else token_ids(f"token_ids_logprob[{i}]", e) for i, e in enumerate(til_raw)]
        else:
            til_raw = token_ids("token_ids_logprob", til_raw)
    stream = bool(body.get("stream") is not None and check_bool("stream", body["stream"]))
    rtil = bool(body.get("return_text_in_logprobs") is not None
                and check_bool("return_text_in_logprobs", body["return_text_in_logprobs"]))
    rpti = check_bool("return_prompt_token_ids", body.get("return_prompt_token_ids", False))

    # ---- semantic layer ----
    for name, value in body.items():
        if name not in GENERATE_REQ_INPUT_FIELDS:
            raise value_error(f"{name}: unknown field (not in SGLang's GenerateReqInput).")
        if name not in _TOP_LEVEL_READ and name not in _TOP_LEVEL_METADATA and not _neutral(value, _TOP_LEVEL_DEFAULTS.get(name)):
            raise value_error(f"{name}: not supported by the aepo-jax embedded server.")
    prompts, is_single = _prompts(body, tokenize)
    batch = len(prompts)

    if isinstance(sp_raw, list):
        if is_single and len(sp_raw) != 1:
            raise value_error("sampling_params should be a dict (or a list of one dict) for a single request.")
        if not is_single and len(sp_raw) != batch:
            raise value_error(f"The length of sampling_params ({len(sp_raw)}) should equal the batch size ({batch}).")
        paths = [f"sampling_params[{i}]" for i in range(len(sp_raw))]
        specs = [_sampling_kwargs(p, s) for p, s in zip(paths, sp_raw)]
    else:
        paths = ["sampling_params"] * batch
        specs = [_sampling_kwargs("sampling_params", sp_raw or {})] * batch
    n = specs[0].get("n", 1)
    if any(s.get("n", 1) != n for s in specs):
        raise value_error("The parallel_sample_num should be the same for all samples in sample params.")
    if n > limits.max_n:
        raise value_error(f"{paths[0]}.n: {n} exceeds this server's limit of {limits.max_n} (--max-n).")
    if batch * n > limits.max_rows:
        raise value_error(f"{batch} prompts x n={n} = {batch * n} sequences exceed this server's limit of "
                          f"{limits.max_rows} per request (--max-rows-per-request).")

    rlp = _per_item("return_logprob", return_logprob, batch, False)
    lsl = _per_item("logprob_start_len", lsl_raw, batch, -1)
    tln = _per_item("top_logprobs_num", tln_raw, batch, 0)
    til = _per_item("token_ids_logprob", til_raw, batch, None) if til_nested else [til_raw] * batch
    for i in range(batch):
        at = "" if is_single else f"[{i}]"
        if lsl[i] < -1:
            raise value_error(f"logprob_start_len{at}: must be -1 (no input log-probs) or >= 0, got {lsl[i]}.")
        if rlp[i] and lsl[i] > len(prompts[i]):  # SGLang's scheduler message
            raise value_error(f"logprob_start_len{at}: req.logprob_start_len={lsl[i]} is higher than the number of "
                              f"input tokens len(req.origin_input_ids)={len(prompts[i])}. Please use a smaller "
                              "logprob_start_len.")
        if not 0 <= tln[i] <= vocab_size:
            raise value_error(f"top_logprobs_num{at}: must be in [0, {vocab_size}] (the vocabulary), got {tln[i]}.")
        for j, t in enumerate(til[i] or ()):
            if not 0 <= t < vocab_size:
                raise value_error(f"token_ids_logprob{at}[{j}]: token id {t} is outside the vocabulary "
                                  f"[0, {vocab_size}).")
    rids = None  # None: a fresh uuid per sequence (SGLang regenerates them when n > 1)
    if isinstance(rid, list) and n == 1:
        rids = _per_item("rid", rid, batch, None)
        if len(set(rids)) != len(rids):
            raise value_error(f"Duplicate request IDs detected within the request: "
                              f"{sorted({r for r in rids if rids.count(r) > 1})}")
    elif isinstance(rid, str) and n == 1:
        rids = [rid] if is_single else [f"{rid}_{i}" for i in range(batch)]

    items: list[GenerateItem] = []
    for i, (ids, kw, path) in enumerate(zip(prompts, specs, paths)):  # prompt-major, as SGLang
        top_k = kw.get("top_k", TOP_K_ALL)
        req = SamplingRequest(input_ids=ids, max_new_tokens=kw.get("max_new_tokens", 128),
                              temperature=kw.get("temperature", 1.0), top_p=kw.get("top_p", 1.0),
                              top_k=-1 if top_k >= TOP_K_ALL else top_k, min_p=kw.get("min_p", 0.0),
                              stop_token_ids=tuple(kw.get("stop_token_ids", ())),
                              ignore_eos=kw.get("ignore_eos", False))
        try:
            check_request(req, vocab_size, context_len, ids_name="input_ids" if is_single else f"input_ids[{i}]",
                          params_name=path)
        except ValueError as e:
            raise value_error(str(e)) from None
        if kw["stop"] and tokenize is None:
            raise value_error(f"{path}.stop: stop strings need a tokenizer (this server runs without one); "
                              "use stop_token_ids.")
        out = OutputOptions(stop=tuple(kw["stop"]), skip_special_tokens=kw.get("skip_special_tokens", True),
                            no_stop_trim=kw.get("no_stop_trim", False), return_logprob=bool(rlp[i]),
                            return_text_in_logprobs=rtil, return_prompt_token_ids=rpti,
                            logprob_start_len=lsl[i], top_logprobs_num=tln[i],
                            token_ids_logprob=None if til[i] is None else tuple(til[i]))
        seed = kw.get("sampling_seed")
        for j in range(n):
            r = rids[i] if rids is not None else uuid.uuid4().hex
            sj = None if seed is None else (seed + j - INT64_MIN) % 2**64 + INT64_MIN  # wraps inside int64
            items.append(GenerateItem(rid=r, request=dataclasses.replace(req, seed=sj), output=out))
    return ParsedGenerate(items=items, is_single=is_single and n == 1, stream=stream)
