"""The client's side of SGLang's ``/generate`` wire format: the batched request bodies of a rollout
(one row per sample, each with its own ``sampling_seed``) and the result items read back as
:class:`Sample` s. Pure Python, no HTTP."""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from aepo_jax.rollout.client_config import RolloutError
# Keys a caller may put in sampling_params (SGLang's own list; a typo fails here, before any HTTP).
from aepo_jax.rollout.contract import SAMPLING_PARAM_KEYS

_INT64_MASK = (1 << 63) - 1


@dataclass
class Sample:
    """One generated sequence."""

    prompt_index: int
    sample_index: int
    output_ids: list[int]
    logprobs: list[float] | None  # per output token (see the server's log-prob convention)
    finish_reason: dict
    weight_version: str | None
    seed: int
    text: str | None = None
    server: str = ""
    meta_info: dict = field(default_factory=dict, repr=False)

    @property
    def finish_type(self) -> str:
        return (self.finish_reason or {}).get("type", "")

    @property
    def truncated(self) -> bool:
        return self.finish_type == "length"


def sample_seed(base_seed: int, prompt_index: int, sample_index: int) -> int:
    """Deterministic 63-bit seed of one sample: a hash of (base, prompt, sample)."""
    h = hashlib.blake2b(f"{int(base_seed)}:{int(prompt_index)}:{int(sample_index)}".encode(), digest_size=8)
    return int.from_bytes(h.digest(), "little") & _INT64_MASK


def generate_bodies(
    prompt_ids: Sequence[Sequence[int]],
    n: int,
    sampling_params: dict | None,
    seeds: Sequence[Sequence[int]] | None,
    seed: int | None,
    temperature: float | None,
    return_logprob: bool,
    *,
    batch_size: int,
    new_rid: Callable[[], str],
) -> list[tuple[list[tuple[int, int]], dict]]:
    """The /generate bodies of a rollout, ``batch_size`` rows each: [(the (prompt, sample) of each
    row, body)]. ValueError names the bad argument before anything is sent."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    sp = dict(sampling_params or {})
    bad = [k for k in sp if k not in SAMPLING_PARAM_KEYS]
    if bad:
        raise ValueError(f"sampling_params: unknown key {bad[0]!r} (SGLang accepts: {', '.join(SAMPLING_PARAM_KEYS)})")
    if "n" in sp or "sampling_seed" in sp:
        raise ValueError("sampling_params: pass n= and seeds/seed= to generate(), not 'n'/'sampling_seed'")
    if temperature is not None:
        sp["temperature"] = float(temperature)
    for k, v in sp.items():  # JSON has no NaN/inf: a server would get an invalid body, and blame
        if isinstance(v, float) and not math.isfinite(v):
            raise ValueError(f"sampling_params: {k} must be a finite number, got {v!r}")
    prompts = [list(map(int, p)) for p in prompt_ids]
    for i, p in enumerate(prompts):
        if not p:
            raise ValueError(f"prompt_ids[{i}] is empty")
    if seeds is not None:
        if len(seeds) != len(prompts) or any(len(s) != n for s in seeds):
            raise ValueError(f"seeds must be [num_prompts={len(prompts)}][n={n}]")
    rows: list[tuple[int, int, int | None]] = []
    for i in range(len(prompts)):
        for j in range(n):
            if seeds is not None:
                s = int(seeds[i][j])
            elif seed is not None:
                s = sample_seed(seed, i, j)
            else:
                s = None
            rows.append((i, j, s))
    out = []
    bs = max(1, batch_size)
    for k in range(0, len(rows), bs):
        chunk = rows[k:k + bs]
        body = {
            "input_ids": [prompts[i] for i, _, _ in chunk],
            "sampling_params": [dict(sp, **({"sampling_seed": s} if s is not None else {})) for _, _, s in chunk],
            "rid": [new_rid() for _ in chunk],
            "return_logprob": bool(return_logprob),
            "stream": False,
        }
        out.append(([(i, j) for i, j, _ in chunk], body))
    return out


def to_sample(i: int, j: int, obj: Any, seed: int | None, url: str) -> Sample:
    """One ``/generate`` result item (prompt ``i``, sample ``j``, from ``url``) as a Sample;
    RolloutError when the item is malformed."""
    if not isinstance(obj, dict) or "meta_info" not in obj:
        raise RolloutError(f"{url}: malformed /generate item for prompt {i} sample {j}: {str(obj)[:300]}")
    meta = obj["meta_info"]
    ids = obj.get("output_ids")
    if ids is None:
        raise RolloutError(f"{url}: /generate item for prompt {i} sample {j} has no output_ids "
                           "(real SGLang: do not launch with a detokenizer-only mode)")
    lps = meta.get("output_token_logprobs")
    logprobs = None
    if lps is not None:
        logprobs = [float(e[0]) if e[0] is not None else float("nan") for e in lps]
        if ids and [int(e[1]) for e in lps] != [int(t) for t in ids]:
            raise RolloutError(f"{url}: output_token_logprobs token ids differ from output_ids (prompt {i} sample {j})")
    return Sample(prompt_index=i, sample_index=j, output_ids=[int(t) for t in ids], logprobs=logprobs,
                  finish_reason=meta.get("finish_reason") or {}, weight_version=meta.get("weight_version"),
                  seed=seed if seed is not None else -1, text=obj.get("text"), server=url, meta_info=meta)
