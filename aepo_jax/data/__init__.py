"""Data: problem files, prompt templates, the prompt pipeline, the built-in toy task and its tokenizer.

Typical use (what the trainer does)::

    problems, load_stats = load_problems(["train.parquet"], DatasetConfig(answer_key="reward_model.ground_truth"))
    examples, prompt_stats = tokenize_problems(problems, tokenizer, PromptConfig(max_prompt_length=1024))
    pipeline = PromptPipeline(examples, PipelineConfig(batch_size=512, seed=0))
    batch = next(pipeline)            # list[Example] for this JAX process
    state = pipeline.get_state()      # into the checkpoint; pipeline.set_state(state) on resume

With no data files the trainer uses the toy task: ``toy_problems("train")`` and the base model from
``aepo_jax.toy.ensure_toy_base(cache_dir)`` (the toy package trains it; data/ trains nothing).
"""

from __future__ import annotations

from aepo_jax.data.datasets import DataError, DatasetConfig, LoadStats, Problem, load_problems
from aepo_jax.data.pipeline import PipelineConfig, PromptPipeline
from aepo_jax.data.prompts import DEFAULT_INSTRUCTION, Example, PromptConfig, PromptStats, tokenize_problems


def toy_problems(split: str = "train", seed: int = 0, n_train: int = 4096, n_test: int = 256) -> list[Problem]:
    """The built-in task's problems as :class:`Problem` rows (``split``: train | test)."""
    from aepo_jax.data import toy_task  # noqa: PLC0415

    if split not in ("train", "test"):
        raise ValueError(f"toy split must be 'train' or 'test', got {split!r}")
    train, test = toy_task.make_splits(seed, n_train, n_test)
    rows = toy_task.to_records(train if split == "train" else test)
    return [Problem(prompt=r["prompt"], answer=r["answer"], source="toy", uid=f"toy-{split}:{i}") for i, r in enumerate(rows)]


__all__ = [
    "DEFAULT_INSTRUCTION",
    "DataError",
    "DatasetConfig",
    "Example",
    "LoadStats",
    "PipelineConfig",
    "Problem",
    "PromptConfig",
    "PromptPipeline",
    "PromptStats",
    "load_problems",
    "tokenize_problems",
    "toy_problems",
]
