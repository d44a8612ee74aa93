"""Exact-match reward: the last ``\\boxed{...}`` must equal the ground truth as a string.

Used by the built-in toy task, whose answers are single integers, so string equality after
stripping whitespace is the whole check (and costs microseconds: no process pool needed).
"""

from __future__ import annotations

from aepo_jax.rewards.math import extract_boxed


def exact_match_reward(response: str, ground_truth: str) -> float:
    """1.0 if the last box in ``response`` holds exactly ``ground_truth`` (whitespace ignored)."""
    if not isinstance(response, str):
        raise TypeError(f"exact_match_reward: response must be str, got {type(response).__name__}")
    boxed = extract_boxed(response)
    if boxed is None:
        return 0.0
    return 1.0 if "".join(boxed.split()) == "".join(str(ground_truth).split()) else 0.0
