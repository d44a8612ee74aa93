"""The built-in toy base model: a tiny Qwen2 warm-started on the toy task (``aepo_jax.data.toy_task``).

This package trains a model, so it sits above ``data/`` and ``models/``: :mod:`aepo_jax.toy.recipe`
is the recipe (run only in a pinned subprocess), :mod:`aepo_jax.toy.build` builds it there and
caches it::

    from aepo_jax.toy import ensure_toy_base, build_toy_base, ToyBaseConfig
    path = ensure_toy_base()                      # $AEPO_JAX_CACHE (or ~/.cache/aepo_jax), built once
    build_toy_base("/tmp/toy", ToyBaseConfig())   # into a directory of your choice

Names are imported lazily, so ``python -m aepo_jax.toy.recipe`` (the build subprocess) imports
nothing before it pins itself to one core.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "BUILD_VERSION": "recipe",
    "ToyBaseConfig": "recipe",
    "build_toy_base": "build",
    "default_cache_dir": "build",
    "ensure_toy_base": "build",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"aepo_jax.toy.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'aepo_jax.toy' has no attribute {name!r}")
