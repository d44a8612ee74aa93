"""The built-in toy base model: a tiny Qwen2 warm-started on the toy task (``aepo_jax.data.toy_task``).

This package trains a model, so it sits above ``data/`` and ``models/``: :mod:`aepo_jax.toy.recipe`
is the recipe (run only in a pinned subprocess, ``python -m aepo_jax.toy``), :mod:`aepo_jax.toy.build`
builds it there and caches it::

    from aepo_jax.toy import ensure_toy_base, build_toy_base, ToyBaseConfig
    path = ensure_toy_base()                      # $AEPO_JAX_CACHE (or ~/.cache/aepo_jax), built once
    build_toy_base("/tmp/toy", ToyBaseConfig())   # into a directory of your choice
    ensure_toy_base(cfg=LengthToyBaseConfig())    # the length variant's base (data.toy_variant=length)

The recipe starts jax (its first device use) only inside the pinned subprocess.
"""

from aepo_jax.toy.build import build_toy_base, default_cache_dir, ensure_toy_base
from aepo_jax.toy.recipe import BUILD_VERSION, LengthToyBaseConfig, ToyBaseConfig, base_config_for

__all__ = ["BUILD_VERSION", "LengthToyBaseConfig", "ToyBaseConfig", "base_config_for", "build_toy_base",
           "default_cache_dir", "ensure_toy_base"]
