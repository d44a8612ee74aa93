"""Log-probs beyond the sampled tokens, in SGLang 0.5.23's layout: input-token log-probs
(``logprob_start_len >= 0``), top-k log-probs (``top_logprobs_num``) and the log-probs of chosen
token ids (``token_ids_logprob``), for the prompt and for the generated tokens.

They come from one prefill forward of the served model over ``prompt + output`` (the model's own
``hidden_states``; the sampled tokens' log-probs come from the learner's head,
``aepo_jax.logprobs.chunked_logprobs_entropy``), run after generation with the same weights (the
caller holds the weight lock across both). Only a window of positions reaches the LM head: from the
first position whose log-probs were asked for to the last generated token, so a long prompt with
``logprob_start_len`` near its end costs one forward and a few vocabulary rows.

Temperatures, as SGLang computes them (``srt/layers/logprob_processor.py``, ``sampler.py``):

* input (prompt) rows are always ``log_softmax(logits)``: temperature 1, whatever the request's
  temperature (SGLang's prefill path never divides by it);
* output rows (``output_top_logprobs``, ``output_token_ids_logprobs``) are ``log_softmax(logits /
  T)`` like ``output_token_logprobs``; T = 1 for greedy requests and when the server runs with
  ``SGLANG_RETURN_ORIGINAL_LOGPROB=1``.

Layout (``scheduler_components/logprob_result_processor.py``): ``input_token_logprobs`` has one
entry per prompt token from ``logprob_start_len`` on, and the first entry's log-prob is always
``None`` (SGLang shifts the prefill rows by one and drops the row of the sampling position);
``input_top_logprobs`` and ``input_token_ids_logprobs`` follow the same rule (first row ``None``).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np


@dataclass(frozen=True)
class LogprobRequest:
    """What one sequence asks for, beyond ``output_token_logprobs``.

    ``start``: ``logprob_start_len`` as sent (-1: no input log-probs; 0 <= start <= len(prompt)).
    ``top_k``: ``top_logprobs_num`` (0: none). ``token_ids``: ``token_ids_logprob`` (None: none).
    ``out_temperature``: the temperature of output rows (1 for greedy / original log-probs)."""

    prompt: tuple[int, ...]
    output: tuple[int, ...]
    start: int = -1
    top_k: int = 0
    token_ids: tuple[int, ...] | None = None
    out_temperature: float = 1.0

    @property
    def wants_input(self) -> bool:
        return 0 <= self.start < len(self.prompt)

    @property
    def wants_output_rows(self) -> bool:
        return bool(self.output) and (self.top_k > 0 or self.token_ids is not None)

    @property
    def needs_forward(self) -> bool:
        return window_of(self)[1] > 0


Entry = tuple  # (logprob or None, token_id)


@dataclass
class LogprobExtras:
    """SGLang's meta_info logprob fields for one sequence, without token texts."""

    input_token_logprobs: list[Entry] = field(default_factory=list)
    input_top_logprobs: list[list[Entry] | None] = field(default_factory=list)
    output_top_logprobs: list[list[Entry] | None] = field(default_factory=list)
    input_token_ids_logprobs: list[list[Entry] | None] = field(default_factory=list)
    output_token_ids_logprobs: list[list[Entry] | None] = field(default_factory=list)

    def truncated(self, n_output: int) -> "LogprobExtras":
        """The same with the output rows cut to the first ``n_output`` tokens (stop strings)."""
        return LogprobExtras(self.input_token_logprobs, self.input_top_logprobs,
                             self.output_top_logprobs[:n_output], self.input_token_ids_logprobs,
                             self.output_token_ids_logprobs[:n_output])


def window_of(req: LogprobRequest) -> tuple[int, int]:
    """(first, count) of the predicting positions that need LM-head rows.

    Position p predicts token p + 1. Input entries k >= 1 of a start s are predicted at positions
    s .. L-2; output token j is predicted at position L-1+j."""
    plen = len(req.prompt)
    lo = hi = None  # inclusive range
    if req.wants_input and req.start <= plen - 2:
        lo, hi = req.start, plen - 2
    if req.wants_output_rows:
        a, b = plen - 1, plen + len(req.output) - 2
        lo = a if lo is None else min(lo, a)
        hi = b if hi is None else max(hi, b)
    if lo is None:
        return 0, 0
    return lo, hi - lo + 1


def _bucket(n: int, lo: int = 16) -> int:
    b = lo
    while b < n:
        b *= 2
    return b


@functools.lru_cache(maxsize=None)
def _jitted():
    import jax  # not at import time: the server sets up host devices before jax starts

    return jax.jit(_window_logprobs, static_argnames=("graphdef", "window", "k"))


def _window_logprobs(graphdef, state, ids, mask, first, row_temps, tok_ids, *, window, k):
    """One forward over ``ids`` [1, P]; LM-head rows for positions first .. first+window-1.

    Returns the T = 1 log-prob of each row's next token (the learner's head), and, on
    ``log_softmax(logits / row_temps)``, the top-``k`` values and ids and the columns ``tok_ids``."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from aepo_jax.logprobs import chunked_logprobs_entropy

    model = nnx.merge(graphdef, state)
    hidden = model.hidden_states(ids, attention_mask=mask)
    hw = jax.lax.dynamic_slice_in_dim(hidden, first, window, axis=1)  # [1, W, H]
    targets = jax.lax.dynamic_slice_in_dim(ids, first + 1, window, axis=1)
    next_lp, _ = chunked_logprobs_entropy(hw, model.lm_head_kernel(), targets)
    logits = model.logits_from_hidden(hw)[0] / row_temps[:, None]
    lsm = jax.nn.log_softmax(logits, axis=-1)
    lsm = jnp.maximum(lsm, jnp.finfo(jnp.float32).min)  # SGLang clamps -inf the same way
    if k > 0:
        top_v, top_i = jax.lax.top_k(lsm, k)
    else:
        top_v = jnp.zeros((window, 0), jnp.float32)
        top_i = jnp.zeros((window, 0), jnp.int32)
    return next_lp[0], top_v, top_i, lsm[:, tok_ids]


def compute(graphdef, state, req: LogprobRequest, vocab_size: int) -> LogprobExtras:
    """The extras of one sequence (blocking; runs the forward when one is needed)."""
    plen = len(req.prompt)
    seq = list(req.prompt) + list(req.output)
    first, count = window_of(req)
    out = LogprobExtras()
    rows_lp = rows_top = rows_tok = None
    if count > 0:
        window = _bucket(count)
        length = _bucket(first + 1 + window)
        real = min(len(seq), first + 1 + count)  # tokens the window reads (targets included)
        ids = np.zeros((1, length), np.int32)
        ids[0, :real] = seq[:real]
        mask = np.zeros((1, length), bool)
        mask[0, :real] = True
        temps = np.ones((window,), np.float32)
        temps[max(0, plen - 1 - first):] = req.out_temperature  # rows predicting output tokens
        tok = list(req.token_ids or ())
        tok_arr = np.zeros((_bucket(max(len(tok), 1), 1),), np.int32)
        tok_arr[:len(tok)] = tok
        k = min(_bucket(req.top_k, 1), vocab_size) if req.top_k > 0 else 0
        lp, tv, ti, tl = _jitted()(graphdef, state, ids, mask, np.int32(first), temps, tok_arr,
                                          window=window, k=k)
        rows_lp = np.asarray(lp)[:count].tolist()
        rows_top = (np.asarray(tv)[:count, :req.top_k].tolist(), np.asarray(ti)[:count, :req.top_k].tolist())
        rows_tok = np.asarray(tl)[:count, :len(tok)].tolist()

    def row(p):  # window row of predicting position p
        return p - first

    def top_row(p):
        r = row(p)
        return [(float(v), int(i)) for v, i in zip(rows_top[0][r], rows_top[1][r])]

    def tok_row(p):
        r = row(p)
        return [(float(v), int(t)) for v, t in zip(rows_tok[r], req.token_ids)]

    if req.wants_input:
        s = req.start
        out.input_token_logprobs = [(None, int(req.prompt[s]))] + [
            (float(rows_lp[row(p)]), int(req.prompt[p + 1])) for p in range(s, plen - 1)]
        if req.top_k > 0:
            out.input_top_logprobs = [None] + [top_row(p) for p in range(s, plen - 1)]
        if req.token_ids is not None:
            out.input_token_ids_logprobs = [None] + [tok_row(p) for p in range(s, plen - 1)]
    if req.output:
        positions = range(plen - 1, plen - 1 + len(req.output))
        if req.top_k > 0:
            out.output_top_logprobs = [top_row(p) for p in positions]
        if req.token_ids is not None:
            out.output_token_ids_logprobs = [tok_row(p) for p in positions]
    return out


def compute_many(graphdef, state, reqs: Sequence[LogprobRequest | None], vocab_size: int) -> list[LogprobExtras | None]:
    """``compute`` for each request that is not None, with the weights ``(graphdef, state)`` as the
    sampler holds them (``Sampler.weights()``: no model is rebuilt per request)."""
    return [None if r is None else compute(graphdef, state, r, vocab_size) for r in reqs]
