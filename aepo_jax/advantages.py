"""Advantage estimators: GRPO group normalisation, plain REINFORCE, Entropy-Adv shaping.

All functions are pure and jit-able (group counts are static). Rewards are per sample ([N]);
advantages are per sample ([N]) or per token ([N, L]); the loss broadcasts [N] over tokens.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = [
    "grpo_advantages",
    "grpo_advantages_by_id",
    "reinforce_advantages",
    "entropy_adv_shaping",
]


def grpo_advantages(rewards: jax.Array, group_size: int, eps: float = 1e-6) -> jax.Array:
    """GRPO advantages for samples laid out as consecutive groups of ``group_size``.

    ``A_i = (r_i - mean_g) / (std_g + eps)`` with the unbiased (N-1) standard deviation, as in
    verl/EasyR1/the authors' code. A group whose rewards are all equal (and a group of one sample)
    gets exactly 0: without that, float round-off in ``r - mean`` divided by ``eps`` would give
    spurious advantages of order 1e-2 for non-binary rewards.

    Args:
      rewards: [N] float, N a multiple of ``group_size``.
      group_size: G (static python int).
    Returns: [N] float32.
    """
    rewards = jnp.asarray(rewards, jnp.float32)
    if rewards.ndim != 1:
        raise ValueError(f"rewards: expected [N], got shape {tuple(rewards.shape)}")
    if not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size: expected a positive int, got {group_size!r}")
    if rewards.shape[0] % group_size:
        raise ValueError(f"rewards: length {rewards.shape[0]} is not a multiple of group_size {group_size}")
    r = rewards.reshape(-1, group_size)
    mean = jnp.mean(r, axis=1, keepdims=True)
    if group_size == 1:
        return jnp.zeros_like(rewards)
    std = jnp.std(r, axis=1, ddof=1, keepdims=True)
    equal = jnp.all(r == r[:, :1], axis=1, keepdims=True)
    adv = jnp.where(equal, 0.0, (r - mean) / (std + eps))
    return adv.reshape(-1)


def grpo_advantages_by_id(rewards: jax.Array, group_ids: jax.Array, num_groups: int, eps: float = 1e-6) -> jax.Array:
    """Same as :func:`grpo_advantages` for groups given by id (any order, sizes may differ).

    Args:
      rewards: [N] float; group_ids: [N] int in [0, num_groups); num_groups: static int.
    """
    rewards = jnp.asarray(rewards, jnp.float32)
    group_ids = jnp.asarray(group_ids)
    if rewards.ndim != 1 or group_ids.shape != rewards.shape:
        raise ValueError(
            f"group_ids: expected shape {tuple(rewards.shape)} like rewards, got {tuple(group_ids.shape)}"
        )
    seg = lambda x: jax.ops.segment_sum(x, group_ids, num_segments=num_groups)  # noqa: E731
    n = seg(jnp.ones_like(rewards))
    mean = seg(rewards) / jnp.maximum(n, 1.0)
    dev = rewards - mean[group_ids]
    var = seg(dev * dev) / jnp.maximum(n - 1.0, 1.0)
    std = jnp.sqrt(var)[group_ids]
    rmax = jax.ops.segment_max(rewards, group_ids, num_segments=num_groups)[group_ids]
    rmin = jax.ops.segment_min(rewards, group_ids, num_segments=num_groups)[group_ids]
    degenerate = (rmax == rmin) | (n[group_ids] < 2)
    return jnp.where(degenerate, 0.0, dev / (std + eps))


def reinforce_advantages(rewards: jax.Array) -> jax.Array:
    """Plain REINFORCE: the advantage is the reward itself (no baseline). [N] float32."""
    rewards = jnp.asarray(rewards, jnp.float32)
    if rewards.ndim != 1:
        raise ValueError(f"rewards: expected [N], got shape {tuple(rewards.shape)}")
    return rewards


def entropy_adv_shaping(advantages: jax.Array, entropy: jax.Array, beta: float = 0.4, kappa: float = 2.0) -> jax.Array:
    """Entropy-Adv (Cheng et al. 2025): ``A_t + min(beta * sg(H_t), |A_t| / kappa)`` per token.

    The entropy is detached, and the bonus is at most |A|/kappa with kappa > 1, so the shaping never
    flips the sign of a nonzero advantage and leaves A = 0 tokens at 0.

    Args:
      advantages: [N] or [N, L]; entropy: [N, L] full-distribution entropy per token.
    Returns: [N, L] float32.
    """
    advantages = jnp.asarray(advantages, jnp.float32)
    entropy = jnp.asarray(entropy, jnp.float32)
    if entropy.ndim != 2:
        raise ValueError(f"entropy: expected [N, L], got shape {tuple(entropy.shape)}")
    if advantages.ndim == 1:
        advantages = advantages[:, None]
    if advantages.shape[0] != entropy.shape[0]:
        raise ValueError(
            f"advantages: first dim {advantages.shape[0]} does not match entropy's {entropy.shape[0]}"
        )
    psi = jnp.minimum(beta * jax.lax.stop_gradient(entropy), jnp.abs(advantages) / kappa)
    return jnp.broadcast_to(advantages + psi, entropy.shape)
