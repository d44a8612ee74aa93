"""Validation inside the training loop (verl's ``test_freq`` / ``val_before_train``).

With ``--eval.every=N`` the trainer samples ``eval.n`` responses per held-out problem through the
same rollout servers the training uses (holding the current policy), scores them with the run's
reward and logs, with the step's other metrics:

* ``val/avg@{n}``: mean accuracy over the n samples (pass@1 estimate);
* ``val/pass@{k}`` for every k of ``eval.k``: the unbiased estimator of ``aepo_jax.eval``;
* ``val/entropy``: mean -log p of the sampled tokens under the sampling distribution (at
  ``eval.temperature=1`` an unbiased estimate of the policy's token entropy, nats/token);
* ``val/response_length_mean``, ``val/truncation_rate``, ``val/num_problems``;
* ``timing_s/validation`` (wall) and ``perf/validation_cpu_s`` (CPU seconds of this process and of
  the servers that report theirs in ``/server_info``, as the project's own server does).

With several ``eval.files`` the un-prefixed numbers are the unweighted mean over the files (the
paper's "Average" column) and each file also gets ``val/<name>/...``. Sampling and scoring are
``aepo_jax.eval.sample_and_score`` and the summaries ``aepo_jax.eval.summarize``: the same code as
``python -m aepo_jax.eval``, so a validation equals that command on the same weights, data, seed
and sampling settings. Every validation uses the same seed (``eval.seed``): successive numbers
differ by the policy, not by fresh sampling noise.

Each validation also writes ``RUN_DIR/validation/step_N.json`` (N = 0 before training), in the
layout of ``python -m aepo_jax.eval --output``: per benchmark the summary with the per-problem
correct counts (what a standard error over problems needs), so a study reads its final evaluation
from the run instead of starting a second process to repeat it.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from aepo_jax import data as data_lib
from aepo_jax.config import ConfigError
from aepo_jax.eval import BenchmarkResult, average_row, benchmark_name, default_ks, report_json, sample_and_score

TOY_NAME = "toy"


@dataclass(frozen=True)
class ValidationSet:
    """One held-out benchmark, tokenized like the training prompts."""

    name: str
    examples: list
    dropped_prompts: int = 0
    skipped_rows: int = 0


def ks_of(cfg) -> list[int]:
    """The k of pass@k a run logs (``eval.k``, or 1, 2, 4, ..., n)."""
    return sorted(cfg.eval.k) if cfg.eval.k else default_ks(cfg.eval.n)


def should_validate(cfg, step: int) -> bool:
    """Validate after ``step`` (1-based; 0 = before the first step)?"""
    e = cfg.eval
    if e.every <= 0:
        return False
    if step == 0:
        return e.before_train
    return step % e.every == 0 or step == cfg.train.steps


def _problems(cfg, i: int, path: str):
    d = cfg.data
    try:
        return data_lib.load_problems(path, data_lib.DatasetConfig(prompt_key=d.prompt_key, answer_key=d.answer_key,
                                                                    skip_bad_rows=d.skip_bad_rows))
    except (data_lib.DataError, OSError) as e:
        raise ConfigError(f"config key 'eval.files[{i}]': {e}") from None


def check_files(cfg) -> None:
    """Start-up check of ``eval.files`` (before any server starts): each loads, with a problem."""
    if cfg.eval.every <= 0:
        return
    for i, path in enumerate(cfg.eval.files):
        problems, _ = _problems(cfg, i, path)
        if not problems:
            raise ConfigError(f"config key 'eval.files[{i}]': {path!r} holds no problems")


def load_sets(cfg, tokenizer) -> list[ValidationSet]:
    """The held-out sets: ``eval.files`` (one set per file), or the built-in task's test split
    (seed 0, the split the training prompts come from; disjoint from them)."""
    prompt_cfg = data_lib.PromptConfig(template=cfg.data.template, max_prompt_length=cfg.data.max_prompt_length)
    raw = []
    if cfg.eval.files:
        for i, path in enumerate(cfg.eval.files):
            problems, stats = _problems(cfg, i, path)
            raw.append((i, benchmark_name(path), problems, stats.skipped))
    else:
        raw.append((None, TOY_NAME, data_lib.toy_problems("test"), 0))
    sets, seen = [], set()
    for i, name, problems, skipped in raw:
        examples, pstats = data_lib.tokenize_problems(problems, tokenizer, prompt_cfg)
        if not examples:
            key = f"eval.files[{i}]" if i is not None else "eval.files"
            raise ConfigError(f"config key '{key}': no usable problems in {name!r} ({skipped} bad rows, "
                              f"{pstats.dropped_too_long} prompts longer than data.max_prompt_length)")
        unique = name if name not in seen else f"{name}_{i}"
        seen.add(unique)
        sets.append(ValidationSet(unique, examples, pstats.dropped_too_long, skipped))
    return sets


def _metrics(prefix: str, r: BenchmarkResult, ks) -> dict:
    m = {f"{prefix}avg@{r.n}": r.avg_at_n}
    m.update({f"{prefix}pass@{k}": r.pass_at_k[k] for k in ks})
    m[f"{prefix}entropy"] = r.mean_token_nll
    m[f"{prefix}response_length_mean"] = r.mean_response_tokens
    m[f"{prefix}truncation_rate"] = r.truncated_fraction
    m[f"{prefix}num_problems"] = float(r.num_problems)
    return m


def report_path(run_dir: str | Path, step: int) -> Path:
    """Where the validation after ``step`` (0 = before training) writes its report."""
    return Path(run_dir) / "validation" / f"step_{step}.json"


async def validate(client, tokenizer, sets: list[ValidationSet], reward_pool, cfg, *, check_samples=None,
                   report: Path | None = None) -> dict:
    """Sample, score and summarise every set; returns the ``val/...`` metrics (and
    ``timing_s/validation``). ``check_samples(samples)`` is called on each set's samples (the
    trainer checks their weight version). ``report``: also write the summaries there, in the
    layout of ``python -m aepo_jax.eval --output``."""
    e = cfg.eval
    ks = ks_of(cfg)
    max_new = e.max_new_tokens or cfg.rollout.max_new_tokens
    t0, c0 = time.perf_counter(), time.process_time()
    results = []
    for s in sets:
        scored = await sample_and_score(client, tokenizer, s.examples, reward_pool, n=e.n, temperature=e.temperature,
                                        top_p=e.top_p, max_new_tokens=max_new, seed=e.seed)
        if check_samples is not None:
            check_samples(scored.samples)
        results.append(scored.summary(s.name, ks, skipped_rows=s.skipped_rows, dropped_prompts=s.dropped_prompts))
    if len(results) == 1:
        m = _metrics("val/", results[0], ks)
    else:
        m = {}
        for r in results:
            m.update(_metrics(f"val/{r.name}/", r, ks))
        avg = average_row(results, ks)
        m[f"val/avg@{e.n}"] = avg["avg_at_n"]
        m.update({f"val/pass@{k}": avg["pass_at_k"][k] for k in ks})
        m["val/entropy"] = float(np.mean([r.mean_token_nll for r in results]))
        m["val/response_length_mean"] = float(np.mean([r.mean_response_tokens for r in results]))
        m["val/truncation_rate"] = float(np.mean([r.truncated_fraction for r in results]))
        m["val/num_problems"] = float(sum(r.num_problems for r in results))
    if report is not None:
        settings = {"n": e.n, "ks": ks, "temperature": e.temperature, "top_p": e.top_p, "max_new_tokens": max_new,
                    "seed": e.seed, "files": list(e.files) or [TOY_NAME]}
        report.parent.mkdir(parents=True, exist_ok=True)
        tmp = report.with_name(report.name + ".tmp")  # a reader never sees half a file
        tmp.write_text(json.dumps(report_json(results, ks, settings), indent=2) + "\n")
        tmp.replace(report)
    m["timing_s/validation"] = time.perf_counter() - t0
    # this process's CPU over the validation (the trainer adds the servers' when they report it): what a
    # study needs to tell a run's evaluation cost from its training cost
    m["perf/validation_cpu_s"] = time.process_time() - c0
    return m


def summary_line(step: int, m: dict, cfg) -> str:
    """One line for the console, e.g. ``validation (step 10): avg@8 0.412 pass@8 0.930 entropy 0.401``."""
    n = cfg.eval.n
    parts = [f"avg@{n} {m[f'val/avg@{n}']:.3f}"]
    parts += [f"pass@{k} {m[f'val/pass@{k}']:.3f}" for k in ks_of(cfg) if k > 1]
    parts.append(f"entropy {m['val/entropy']:.3f}")
    return f"validation ({'before training' if step == 0 else f'step {step}'}): " + " ".join(parts)
