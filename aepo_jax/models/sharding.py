"""Device meshes and the one table that maps logical axis names to mesh axes (MaxText style).

Every parameter of the decoder carries ``logical_axes`` metadata (a name per dimension, e.g.
``("embed", "vocab")``). :data:`LOGICAL_AXIS_RULES` maps each name to a mesh axis:
``"data"`` (data parallel + FSDP: parameters are split over it along their "embed" dimension)
or ``"tensor"`` (tensor parallel: heads, MLP width, vocabulary), or ``None`` (replicated).
Import, export, the trainer and the sampler all derive shardings from this one table.

A dimension whose size is not divisible by its mesh axis is replicated instead (e.g. 2 KV heads
on a 4-way tensor axis), so every config runs on every mesh; only speed differs.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from aepo_jax.platform import parse_mesh_spec

MESH_AXES = ("data", "tensor")

# logical name -> mesh axis (None = replicated). One table for parameters, activations and caches.
LOGICAL_AXIS_RULES: tuple[tuple[str, str | None], ...] = (
    # parameters
    ("embed", "data"),  # FSDP: the hidden dimension of every weight is split over "data"
    ("vocab", "tensor"),
    ("mlp", "tensor"),
    ("kv_heads", "tensor"),  # q/k/v/o are laid out [.., kv_heads, group, head_dim]: split whole heads
    ("qkv", None),  # the q-group / k / v slot of the fused q,k,v projection
    ("q_group", None),
    ("gate_up", None),
    ("head_dim", None),
    ("norm", None),
    ("layers", None),  # the leading dimension of the stacked (scanned) layers: every device holds all layers
    # activations and data batches
    ("batch", "data"),
    ("length", None),
    ("act_embed", None),
)
_RULES = dict(LOGICAL_AXIS_RULES)


def make_mesh(spec: str | Mesh | None = None, devices: list | None = None) -> Mesh:
    """Build a ``("data", "tensor")`` mesh from ``"DxT"``; None = all devices on "data".

    A size that differs from the number of devices fails at once, naming both numbers (on a
    CPU-only host call :func:`aepo_jax.platform.setup_host_devices` before jax initialises).
    """
    if isinstance(spec, Mesh):
        return spec
    devs = list(jax.devices() if devices is None else devices)
    if spec is None:
        d, t = len(devs), 1
    else:
        d, t = parse_mesh_spec(spec)
    if d * t != len(devs):
        raise ValueError(
            f"mesh: {spec!r} needs {d}x{t} = {d * t} devices but {len(devs)} are available "
            f"(on a CPU-only host, call aepo_jax.platform.setup_host_devices({spec!r}) before importing jax, "
            f"or set XLA_FLAGS=--xla_force_host_platform_device_count={d * t})"
        )
    return Mesh(np.asarray(devs, dtype=object).reshape(d, t), MESH_AXES)


def logical_to_spec(logical_axes: tuple[str | None, ...] | None, shape: tuple[int, ...], mesh: Mesh) -> P:
    """PartitionSpec for an array with these logical axes; indivisible dimensions stay replicated."""
    if not logical_axes:
        return P()
    if len(logical_axes) != len(shape):
        raise ValueError(f"logical axes {logical_axes} do not match shape {shape}")
    used: set[str] = set()
    out: list[str | None] = []
    for name, size in zip(logical_axes, shape):
        ax = _RULES.get(name) if name is not None else None
        if name is not None and name not in _RULES:
            raise KeyError(f"logical axis {name!r} is not in LOGICAL_AXIS_RULES")
        if ax is None or ax in used or ax not in mesh.shape or size % mesh.shape[ax]:
            out.append(None)
        else:
            out.append(ax)
            used.add(ax)
    return P(*out)


def _logical_axes(var: Any) -> tuple | None:
    meta = var.get_metadata() if hasattr(var, "get_metadata") else {}
    return meta.get("logical_axes")


def state_shardings(state: Any, mesh: Mesh) -> Any:
    """NamedShardings for an NNX State (concrete or abstract), from each Variable's logical_axes."""
    from flax import nnx

    def one(v):
        if isinstance(v, nnx.Variable):
            val = v.get_value()
            return v.replace(NamedSharding(mesh, logical_to_spec(_logical_axes(v), tuple(val.shape), mesh)))
        return NamedSharding(mesh, P())

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def model_shardings(model: Any, mesh: Mesh) -> Any:
    """NamedShardings for ``nnx.split(model)[1]`` (the state the trainer jits over)."""
    from flax import nnx

    return state_shardings(nnx.state(model), mesh)
