"""Rollouts over HTTP: SGLang's native API, an embedded JAX server, an async client, weight sync.

    from aepo_jax.rollout import RolloutClient, sync_weights_to_sampler
    python -m aepo_jax.rollout.server --model-path DIR --port 30000

Imports are lazy so ``import aepo_jax.rollout`` does not pull in jax or aiohttp. See docs/rollout.md.
"""

from __future__ import annotations

_EXPORTS = {
    "RolloutClient": "aepo_jax.rollout.client",
    "ClientConfig": "aepo_jax.rollout.client",
    "Sample": "aepo_jax.rollout.client",
    "RolloutError": "aepo_jax.rollout.client",
    "ServerRequestError": "aepo_jax.rollout.client",
    "sample_seed": "aepo_jax.rollout.client",
    "run_sync": "aepo_jax.rollout.client",
    "sync_weights_to_sampler": "aepo_jax.rollout.weight_sync",
    "sync_weights_async": "aepo_jax.rollout.weight_sync",
    "WeightSyncError": "aepo_jax.rollout.weight_sync",
    "Sampler": "aepo_jax.rollout.sampler",
    "SamplingRequest": "aepo_jax.rollout.sampler",
    "SampleResult": "aepo_jax.rollout.sampler",
    "ServerProcess": "aepo_jax.rollout.launch",
    "launch_server": "aepo_jax.rollout.launch",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'aepo_jax.rollout' has no attribute {name!r}")
