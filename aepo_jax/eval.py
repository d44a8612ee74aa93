"""Evaluation: avg@n and unbiased pass@k per benchmark, sampled through SGLang-compatible servers.

    python -m aepo_jax.eval --model-path DIR --data aime24.jsonl,math500.parquet [--n 32] [--k 1,2,4]
                            [--temperature T] [--top-p P] [--max-new-tokens N] [--urls URL,...]

For every problem, ``n`` responses are sampled (through ``--urls`` of running SGLang servers, or
the embedded server started as a subprocess), scored by the reward (math-verify in a process pool
with a wall clock per sample), and summarised per benchmark and averaged over benchmarks:

* ``avg@n``: mean accuracy over the n samples (the pass@1 estimate the paper reports as e.g.
  AIME24x32);
* ``pass@k`` for each requested k <= n: the unbiased estimator of Chen et al. (2021), in log
  space so that it is exact at n = 1024 (:mod:`aepo_jax.eval_metrics`, re-exported here).

Defaults follow the paper's Appendix A (Table 4, evaluation settings): top_p 0.95, 8192 new tokens,
temperature 0.1 when only pass@1 is asked for and 1.0 for pass@k. The table is printed and the
numbers are written as JSON (``--output``).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from aepo_jax.eval_metrics import (BenchmarkResult, average_row, avg_at_n, default_ks, format_table, parse_ks,  # noqa: F401
                                   pass_at_k, summarize)
from aepo_jax.platform import setup_cli_logging

log = logging.getLogger("aepo_jax.eval")

# Appendix A of arXiv 2510.08141 (evaluation settings).
PAPER_TOP_P = 0.95
PAPER_MAX_NEW_TOKENS = 8192
PAPER_TEMPERATURE_PASS1 = 0.1
PAPER_TEMPERATURE_PASSK = 1.0


# --- benchmarks ---------------------------------------------------------------------------------------

# Canonical names for the usual local files; the field layouts of their common public versions
# (HuggingFaceH4/MATH-500, openai/gsm8k, AI-MO/aimo-validation-amc, the Qwen2.5-Math evaluation
# JSONLs, OlympiadBench's final_answer lists, Minerva's boxed solutions) are read by the loader's
# "auto" keys; --prompt-key/--answer-key override them.
BENCHMARK_ALIASES = {
    "aime24": ("aime24", "aime_2024", "aime2024"),
    "aime25": ("aime25", "aime_2025", "aime2025"),
    "amc": ("amc23", "amc_23", "amc", "aimo-validation-amc"),
    "gsm8k": ("gsm8k", "gsm_8k"),
    "math500": ("math500", "math_500", "math-500"),
    "minerva": ("minerva_math", "minervamath", "minerva"),
    "olympiadbench": ("olympiadbench", "olympiad_bench", "olympiad"),
}


def benchmark_name(path: str) -> str:
    """Canonical benchmark name from a file path (its stem, or its folder for ``test.jsonl``)."""
    p = Path(path)
    candidates = [p.stem.lower(), p.parent.name.lower()]
    for text in candidates:
        for name, aliases in BENCHMARK_ALIASES.items():
            if any(a in text for a in aliases):
                return name
    return p.stem if p.stem.lower() not in ("test", "train", "validation") else p.parent.name or p.stem


# --- the run ------------------------------------------------------------------------------------------


@dataclass
class EvalConfig:
    model_path: str
    data: list[str]
    n: int = 32
    ks: list[int] = field(default_factory=list)  # empty = 1, 2, 4, ..., n
    temperature: float | None = None  # None = 0.1 if ks == [1] else 1.0 (Appendix A)
    top_p: float = PAPER_TOP_P
    max_new_tokens: int = PAPER_MAX_NEW_TOKENS
    urls: list[str] = field(default_factory=list)  # empty = start the embedded server
    reward: str = "auto"  # auto = exact match for the toy task, math otherwise
    reward_workers: int = 2
    reward_timeout_s: float = 10.0
    prompt_key: str = "auto"
    answer_key: str = "auto"
    template: str = "auto"
    instruction: str | None = None  # None = the default \boxed{} instruction
    max_prompt_length: int = 4096
    strict: bool = False  # True: a bad row is an error; False: skipped, counted and reported
    seed: int = 0
    output: str = "eval_results.json"
    samples_output: str = ""  # JSONL of every response and its score; empty = not written
    server_args: str = ""
    startup_timeout_s: float = 600.0

    def resolved_temperature(self) -> float:
        if self.temperature is not None:
            return self.temperature
        return PAPER_TEMPERATURE_PASS1 if self.ks == [1] else PAPER_TEMPERATURE_PASSK


def _load_benchmark(spec: str, tokenizer, cfg: EvalConfig):
    from aepo_jax.data import DatasetConfig, PromptConfig, load_problems, tokenize_problems, toy_problems  # noqa: PLC0415
    from aepo_jax.data.prompts import DEFAULT_INSTRUCTION  # noqa: PLC0415

    if spec in ("toy", "toy:test"):
        name, problems, skipped = "toy", toy_problems("test"), 0
    else:
        problems, stats = load_problems(
            spec, DatasetConfig(prompt_key=cfg.prompt_key, answer_key=cfg.answer_key, skip_bad_rows=not cfg.strict)
        )
        name, skipped = benchmark_name(spec), stats.skipped
    instruction = DEFAULT_INSTRUCTION if cfg.instruction is None else cfg.instruction
    examples, pstats = tokenize_problems(
        problems, tokenizer, PromptConfig(template=cfg.template, instruction=instruction, max_prompt_length=cfg.max_prompt_length)
    )
    if not examples:
        raise ValueError(f"{spec}: no usable problems ({skipped} bad rows, {pstats.dropped_too_long} prompts too long)")
    return name, examples, skipped, pstats.dropped_too_long


def _context_limit(model_path: str) -> int | None:
    try:
        cfg = json.loads((Path(model_path) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return cfg.get("max_position_embeddings")


@dataclass
class ScoredSamples:
    """``n`` scored samples for each of a benchmark's problems (:func:`sample_and_score`)."""

    n: int
    samples: list  # [problem][sample] of rollout Samples
    texts: list[str]  # decoded responses, problem-major
    scores: np.ndarray  # [problems, n]
    status: list[str]  # the reward's status per response, problem-major
    truncated_fraction: float
    mean_response_tokens: float
    mean_token_nll: float
    reward_timeouts: int
    reward_crashes: int

    def correct(self) -> list[int]:
        return [int((row > 0.5).sum()) for row in self.scores]

    def summary(self, name: str, ks: Sequence[int], **extra) -> BenchmarkResult:
        return summarize(name, self.correct(), self.n, ks, truncated_fraction=self.truncated_fraction,
                         mean_response_tokens=self.mean_response_tokens, mean_token_nll=self.mean_token_nll,
                         reward_timeouts=self.reward_timeouts, reward_crashes=self.reward_crashes, **extra)


async def sample_and_score(client, tokenizer, examples, reward_pool, *, n: int, temperature: float, top_p: float,
                           max_new_tokens: int, seed: int) -> ScoredSamples:
    """``n`` samples per example through ``client`` (a :class:`RolloutClient`), decoded and scored
    by ``reward_pool``. Each sample's seed is hashed from ``seed`` and its (problem, sample) index,
    so the same model, examples and seed give the same samples on any server and in any batch: the
    trainer's validation stage (``aepo_jax/trainer/validation.py``) calls this too."""
    sp = {"max_new_tokens": max_new_tokens, "top_p": top_p}
    samples = await client.generate([e.prompt_ids for e in examples], n=n, sampling_params=sp,
                                    seed=seed, temperature=temperature, return_logprob=True)
    flat = [s for row in samples for s in row]
    texts = [tokenizer.decode(s.output_ids, skip_special_tokens=True) for s in flat]
    n_tokens = sum(len(s.output_ids) for s in flat)
    lps = [lp for s in flat if s.logprobs is not None for lp in s.logprobs]
    nll = float(-np.mean(lps)) if lps and len(lps) == n_tokens else float("nan")
    scored = reward_pool.score(texts, [e.answer for e in examples for _ in range(n)])
    return ScoredSamples(
        n=n, samples=samples, texts=texts, scores=scored.scores.reshape(len(examples), n), status=list(scored.status),
        truncated_fraction=sum(s.truncated for s in flat) / max(1, len(flat)),
        mean_response_tokens=n_tokens / max(1, len(flat)), mean_token_nll=nll,
        reward_timeouts=scored.timeouts, reward_crashes=scored.crashes)


def run_eval(cfg: EvalConfig) -> dict:
    """Sample, score and summarise every benchmark; returns the JSON-able report."""
    from transformers import AutoTokenizer  # noqa: PLC0415

    from aepo_jax.rewards import RewardPool  # noqa: PLC0415
    from aepo_jax.rollout.client import RolloutClient, run_sync  # noqa: PLC0415

    if cfg.n < 1:
        raise ValueError(f"--n must be >= 1, got {cfg.n}")
    ks = cfg.ks or default_ks(cfg.n)
    cfg.ks = ks
    temperature = cfg.resolved_temperature()
    tokenizer = AutoTokenizer.from_pretrained(cfg.model_path)
    benches = [_load_benchmark(spec, tokenizer, cfg) for spec in cfg.data]
    context = _context_limit(cfg.model_path)

    server = None
    urls = list(cfg.urls)
    if not urls:
        from aepo_jax.rollout.launch import launch_server  # noqa: PLC0415

        log.info("starting the embedded server for %s", cfg.model_path)
        server = launch_server(cfg.model_path, extra_args=cfg.server_args.split(), wait_s=cfg.startup_timeout_s)
        urls = [server.url]
    results: list[BenchmarkResult] = []
    samples_file = open(cfg.samples_output, "w") if cfg.samples_output else None  # noqa: SIM115
    try:
        client = RolloutClient(urls)
        run_sync(client.wait_healthy(deadline_s=cfg.startup_timeout_s), client)
        for (name, examples, skipped, dropped), spec in zip(benches, cfg.data):
            reward = cfg.reward if cfg.reward != "auto" else ("toy" if name == "toy" else "math")
            t0 = time.time()
            max_new = cfg.max_new_tokens
            if context:
                longest = max(len(e.prompt_ids) for e in examples)
                if longest + max_new > context:
                    max_new = max(1, context - longest)
                    log.warning("%s: max_new_tokens %d exceeds the model's context %d; using %d",
                                name, cfg.max_new_tokens, context, max_new)
            workers = 0 if reward in ("toy", "exact_match") else cfg.reward_workers
            with RewardPool(reward, num_workers=workers, timeout_s=cfg.reward_timeout_s) as pool:
                scored = run_sync(
                    sample_and_score(client, tokenizer, examples, pool, n=cfg.n, temperature=temperature,
                                     top_p=cfg.top_p, max_new_tokens=max_new, seed=cfg.seed),
                    client,
                )
            if samples_file:
                for i, e in enumerate(examples):
                    for j in range(cfg.n):
                        samples_file.write(json.dumps({"benchmark": name, "uid": e.uid, "answer": e.answer,
                                                       "response": scored.texts[i * cfg.n + j],
                                                       "score": float(scored.scores[i, j]),
                                                       "status": scored.status[i * cfg.n + j]}) + "\n")
            res = scored.summary(name, ks, files=[spec], skipped_rows=skipped, dropped_prompts=dropped)
            results.append(res)
            log.info("%s: %d problems x %d samples in %.1f s, avg@%d %.4f", name, len(examples), cfg.n,
                     time.time() - t0, cfg.n, res.avg_at_n)
    finally:
        if samples_file:
            samples_file.close()
        if server is not None:
            server.stop()
    settings = {"n": cfg.n, "ks": ks, "temperature": temperature, "top_p": cfg.top_p,
                "max_new_tokens": cfg.max_new_tokens, "seed": cfg.seed, "urls": cfg.urls or ["embedded"]}
    return {"model_path": cfg.model_path, **report_json(results, ks, settings)}


def report_json(results: Sequence[BenchmarkResult], ks: Sequence[int], settings: dict) -> dict:
    """The ``--output`` file's layout (also the trainer's ``validation/step_N.json``): the settings,
    each benchmark's summary (per-problem correct counts included), their average and the table."""
    return {"settings": settings, "benchmarks": {r.name: _result_json(r) for r in results},
            "average": average_row(results, ks), "table": format_table(results, ks, settings["n"])}


def _result_json(r: BenchmarkResult) -> dict:
    d = asdict(r)
    d["pass_at_k"] = {str(k): v for k, v in r.pass_at_k.items()}
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in d.items()}  # strict JSON


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m aepo_jax.eval", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-path", required=True, help="HF model directory (tokenizer and, for the embedded server, weights)")
    p.add_argument("--data", required=True, help="comma-separated JSONL/JSON/Parquet files, or 'toy' (the built-in task's test split)")
    p.add_argument("--n", type=int, default=32, help="samples per problem (default 32)")
    p.add_argument("--k", default="", help="comma-separated k for pass@k (default 1,2,4,...,n)")
    p.add_argument("--temperature", type=float, default=None,
                   help=f"default {PAPER_TEMPERATURE_PASS1} when --k is 1, else {PAPER_TEMPERATURE_PASSK} (paper, App. A)")
    p.add_argument("--top-p", type=float, default=PAPER_TOP_P)
    p.add_argument("--max-new-tokens", type=int, default=PAPER_MAX_NEW_TOKENS)
    p.add_argument("--urls", default="", help="comma-separated running SGLang server URLs; empty = embedded server")
    p.add_argument("--reward", default="auto", help="auto | math | exact_match | module:function")
    p.add_argument("--reward-workers", type=int, default=2)
    p.add_argument("--reward-timeout", type=float, default=10.0, help="wall clock per sample (s)")
    p.add_argument("--prompt-key", default="auto", help="field of the problem (dotted for nested)")
    p.add_argument("--answer-key", default="auto", help="field of the answer (e.g. reward_model.ground_truth)")
    p.add_argument("--template", default="auto", choices=("auto", "chat", "plain"))
    p.add_argument("--instruction", default=None, help="appended to each problem; default asks for \\boxed{}")
    p.add_argument("--max-prompt-length", type=int, default=4096)
    p.add_argument("--strict", action="store_true", help="fail on a bad row instead of skipping and counting it")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default="eval_results.json")
    p.add_argument("--samples-output", default="", help="JSONL with every response and its score")
    p.add_argument("--server-args", default="", help="extra arguments for the embedded server")
    return p


def config_from_args(argv: Sequence[str] | None = None) -> EvalConfig:
    a = build_parser().parse_args(argv)
    return EvalConfig(
        model_path=a.model_path,
        data=[s.strip() for s in a.data.split(",") if s.strip()],
        n=a.n,
        ks=parse_ks(a.k, a.n),
        temperature=a.temperature,
        top_p=a.top_p,
        max_new_tokens=a.max_new_tokens,
        urls=[u.strip() for u in a.urls.split(",") if u.strip()],
        reward=a.reward,
        reward_workers=a.reward_workers,
        reward_timeout_s=a.reward_timeout,
        prompt_key=a.prompt_key,
        answer_key=a.answer_key,
        template=a.template,
        instruction=a.instruction,
        max_prompt_length=a.max_prompt_length,
        strict=a.strict,
        seed=a.seed,
        output=a.output,
        samples_output=a.samples_output,
        server_args=a.server_args,
    )


def main(argv: Sequence[str] | None = None) -> int:
    setup_cli_logging("INFO")
    try:
        cfg = config_from_args(argv)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    report = run_eval(cfg)
    print(report["table"])
    out = Path(cfg.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
