"""Rewards: binary math reward (math-verify), exact match, a registry, and a process pool.

A reward is any function ``f(response: str, ground_truth: str) -> float``. Configs name it either by
a registered name (``"math"``, ``"exact_match"``) or by a ``"package.module:function"`` path, so a
user adds a reward without touching this package::

    reward: my_project.rewards:format_and_accuracy      # in the run config
    register_reward("mine", "my_project.rewards:fn")    # or from Python

Rewards run in :class:`RewardPool` worker processes, which is why the registry stores import paths
rather than function objects: a spawned worker can import a path, it cannot see a closure.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from aepo_jax.rewards.exact import exact_match_reward
from aepo_jax.rewards.math import extract_answer, extract_boxed, math_reward
from aepo_jax.rewards.pool import PoolStats, RewardBatch, RewardPool

RewardFn = Callable[[str, str], float]

BUILTIN_REWARDS: dict[str, str] = {
    "math": "aepo_jax.rewards.math:math_reward",
    "exact_match": "aepo_jax.rewards.exact:exact_match_reward",
    "toy": "aepo_jax.rewards.exact:exact_match_reward",
}
_REGISTRY: dict[str, str] = dict(BUILTIN_REWARDS)


def _path_of(fn: Callable) -> str:
    module, qualname = getattr(fn, "__module__", None), getattr(fn, "__qualname__", "")
    if not module or "<" in qualname or module == "__main__":
        raise ValueError(
            f"reward {fn!r} is not importable by path (lambda, closure or __main__ function); "
            "define it at module level in an importable module and register 'module:function'"
        )
    return f"{module}:{qualname}"


def register_reward(name: str, target: str | Callable) -> None:
    """Register ``target`` (a ``"module:function"`` path or a module-level function) as ``name``."""
    if not name or ":" in name:
        raise ValueError(f"reward name must be non-empty and contain no ':', got {name!r}")
    path = target if isinstance(target, str) else _path_of(target)
    _import_path(path)  # fail now, with the name, rather than inside a worker later
    _REGISTRY[name] = path


def list_rewards() -> list[str]:
    return sorted(_REGISTRY)


def reward_spec(name_or_path: str | Callable) -> str:
    """Canonical ``"module:function"`` for a registered name, a path, or a function."""
    if callable(name_or_path):
        return _path_of(name_or_path)
    if name_or_path in _REGISTRY:
        return _REGISTRY[name_or_path]
    if ":" in str(name_or_path):
        return str(name_or_path)
    raise KeyError(f"reward: unknown name {name_or_path!r}; registered: {list_rewards()} (or give 'module:function')")


def _import_path(path: str) -> RewardFn:
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise ValueError(f"reward: expected 'package.module:function', got {path!r}")
    try:
        obj = importlib.import_module(module_name)
    except ImportError as e:
        raise ImportError(f"reward: cannot import module {module_name!r} (from {path!r}): {e}") from e
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise AttributeError(f"reward: {module_name!r} has no attribute {attr!r} (from {path!r})")
        obj = getattr(obj, part)
    if not callable(obj):
        raise TypeError(f"reward: {path!r} is not callable")
    return obj


def resolve_reward(name_or_path: str | Callable) -> RewardFn:
    """The reward function for a registered name or a ``"module:function"`` path."""
    if callable(name_or_path):
        return name_or_path
    return _import_path(reward_spec(name_or_path))


__all__ = [
    "BUILTIN_REWARDS",
    "PoolStats",
    "RewardBatch",
    "RewardPool",
    "exact_match_reward",
    "extract_answer",
    "extract_boxed",
    "list_rewards",
    "math_reward",
    "register_reward",
    "resolve_reward",
    "reward_spec",
]
