"""Checks of what is about to be saved, before anything is written: plain finite JSON extras, no
NaN/inf in the state pytree."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from aepo_jax.trainer.checkpoint.errors import NonFiniteStateError


def check_json_extras(obj: Any, where: str = "") -> None:
    """Raise naming the path if ``obj`` is not plain, finite JSON (what orbax's JSON handler stores).

    :class:`NonFiniteStateError` for NaN/inf (a controller state with a NaN temperature must never
    become a checkpoint), ``TypeError`` for anything JSON would not round-trip.
    """
    if obj is None or isinstance(obj, (bool, str)) or type(obj) is int:
        return
    if type(obj) is float:
        if not math.isfinite(obj):
            raise NonFiniteStateError(f"checkpoint: extras{where} = {obj}; refusing to save a NaN/inf value")
        return
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            if not isinstance(k, str):
                raise TypeError(f"checkpoint: extras{where} has a non-string key {k!r}; JSON keys must be strings")
            check_json_extras(v, f"{where}[{k!r}]")
        return
    if isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            check_json_extras(v, f"{where}[{i}]")
        return
    raise TypeError(
        f"checkpoint: extras{where} has unsupported type {type(obj).__name__}; extras are plain JSON "
        "(dict, list, str, int, float, bool, None; .item() / .tolist() for numpy values); arrays belong "
        "in the state pytree and per-process iterator state in data_iterator"
    )


def nonfinite_leaves(tree: Any) -> list[str]:
    """Paths (``jax.tree_util.keystr``) of float leaves holding any NaN/inf.

    jax arrays are reduced on device in one jitted call (works for arrays sharded over several
    processes: the verdict is a replicated array every process reads identically, so all
    processes agree on whether to save).
    """
    bad: list[str] = []
    dev_paths, dev_leaves = [], []
    for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
        name = jax.tree_util.keystr(path)
        if isinstance(x, jax.Array):
            if jnp.issubdtype(x.dtype, jnp.inexact):
                dev_paths.append(name)
                dev_leaves.append(x)
        elif isinstance(x, (np.ndarray, np.generic, float)):
            a = np.asarray(x)
            if np.issubdtype(a.dtype, np.inexact) and not np.all(np.isfinite(a)):
                bad.append(name)
    if dev_leaves:
        flags = np.asarray(_all_finite(dev_leaves))
        bad.extend(p for p, ok in zip(dev_paths, flags, strict=True) if not ok)
    return bad


def _all_finite(leaves: list[Any]) -> Any:
    global _ALL_FINITE_JIT
    if _ALL_FINITE_JIT is None:
        _ALL_FINITE_JIT = jax.jit(lambda xs: jnp.stack([jnp.all(jnp.isfinite(x)) for x in xs]))
    return _ALL_FINITE_JIT(leaves)


_ALL_FINITE_JIT = None
