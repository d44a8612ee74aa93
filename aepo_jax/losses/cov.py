"""Clip-Cov and KL-Cov (Cui et al. 2025, "The Entropy Mechanism of Reinforcement Learning for
Reasoning Language Models"): the covariance-based entropy baselines that verl ships.

Both read, per response token, the centred product of the token's log-probability and advantage

    cov_t = (A_t - mean(A)) * (log pi(o_t) - mean(log pi))         (means over the call's valid tokens)

and act on the few tokens with the largest covariance, which are the ones whose update lowers the
entropy most (the paper's Theorem: the entropy change is minus the covariance of log pi and the
logit change, which for policy gradients is proportional to the advantage):

* **Clip-Cov** takes the clipped PPO surrogate and detaches (zero loss, zero gradient) a random
  ``ratio`` share of the tokens whose covariance is in ``(lb, ub)`` and which the PPO clip has not
  already cut off; at least one token when any is in the band.
* **KL-Cov** takes the *unclipped* surrogate ``-A r`` and adds ``coef * |log pi - log pi_old|`` on
  the ``ratio`` share of valid tokens with the largest covariance (at least one).

Defaults are verl's (``compute_policy_loss_clip_cov`` / ``compute_policy_loss_kl_cov``):
``clip_cov_ratio = 0.0002``, ``clip_cov_lb = 1.0``, ``clip_cov_ub = 5.0``, ``kl_cov_ratio =
0.0002``, ``ppo_kl_coef = 1.0``, with the run's clip range (0.2 / 0.2) and aggregation. As in
verl, the covariance's means and the share are taken over the tokens of one loss call (one
micro-batch when the trainer splits a mini-batch), and the selection carries no gradient.

Clip-Cov's random choice needs a PRNG key: :func:`aepo_jax.losses.policy_loss` takes ``rng=`` and
the learner derives it from (``train.seed``, update index, micro-batch index), so a run is
reproducible and a resumed run draws the same tokens.

Selecting ``k`` of many tokens with a ``k`` known only at run time (it depends on the mask) is done
with one ``argsort`` and a scatter of ``rank < k``: exact, no ties at a threshold.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from aepo_jax.losses.core import log_ratio, register_loss, safe_div

__all__ = ["token_covariance", "selection_count", "rank_select", "clip_cov_priority"]


def token_covariance(logp: jax.Array, adv: jax.Array, mask: jax.Array) -> jax.Array:
    """``(A - mean A) * (log pi - mean log pi)`` per token, means over ``mask > 0``; no gradient.

    Tokens outside the mask get 0 (callers select only among valid tokens)."""
    sg = jax.lax.stop_gradient
    logp, adv = sg(logp), sg(adv)
    valid = mask > 0
    n = jnp.maximum(jnp.sum(valid), 1)
    mean_a = jnp.sum(jnp.where(valid, adv, 0.0)) / n
    mean_l = jnp.sum(jnp.where(valid, logp, 0.0)) / n
    return jnp.where(valid, (adv - mean_a) * (logp - mean_l), 0.0)


def selection_count(ratio: float, n_valid: jax.Array) -> jax.Array:
    """``max(floor(ratio * n_valid), 1)``: how many tokens the share ``ratio`` selects (verl's rule)."""
    return jnp.maximum(jnp.floor(ratio * n_valid.astype(jnp.float32)), 1.0)


def rank_select(score: jax.Array, eligible: jax.Array, k: jax.Array) -> jax.Array:
    """Boolean mask of the ``k`` eligible entries with the *smallest* ``score`` (all of them if fewer).

    ``k`` may be traced. Ineligible entries rank after every eligible one."""
    flat = jnp.where(eligible, score, jnp.inf).reshape(-1)
    order = jnp.argsort(flat)
    rank = jnp.zeros(flat.shape, jnp.int32).at[order].set(jnp.arange(flat.size, dtype=jnp.int32))
    return (rank.reshape(score.shape) < k) & eligible


def clip_cov_priority(rng: jax.Array, shape) -> jax.Array:
    """Clip-Cov's random order of tokens: uniform [0, 1) per token; the band tokens with the lowest
    values are detached (a uniformly random subset, as verl's ``randperm``)."""
    return jax.random.uniform(rng, shape, jnp.float32)


# ----------------------------------------------------------------------------------------------
# The registered losses (minimisation objectives, aggregated like every other loss).


def _frac(sel, agg):
    """Token fraction of ``sel`` over the mini-batch's tokens (additive over micro-batches)."""
    return safe_div(jnp.sum(sel.astype(jnp.float32)), agg.dens["toks_all"])


@register_loss("clip_cov", needs_rng=True)
def _clip_cov(b, cfg, agg):
    """Clip-Cov: the clipped surrogate with a random ``clip_cov_ratio`` share of the unclipped tokens
    whose covariance lies in (``clip_cov_lb``, ``clip_cov_ub``) detached. ``clip_dual`` does not
    apply (verl's Clip-Cov has no dual clip)."""
    adv, mask = b["advantages"], b["mask"]
    ratio = jnp.exp(log_ratio(b, cfg))
    unclipped = -adv * ratio
    clipped = -adv * jnp.clip(ratio, 1.0 - cfg.clip_low, 1.0 + cfg.clip_high)
    tok = jnp.maximum(unclipped, clipped)
    valid = mask > 0
    cut_by_ppo = jax.lax.stop_gradient(clipped > unclipped) & valid
    cov = token_covariance(b["logp"], adv, mask)
    band = valid & ~cut_by_ppo & (cov > cfg.clip_cov_lb) & (cov < cfg.clip_cov_ub)
    k = selection_count(cfg.clip_cov_ratio, jnp.sum(valid))
    detached = rank_select(clip_cov_priority(b["rng"], mask.shape), band, k)
    tok = jnp.where(detached, 0.0, tok)
    pg = safe_div(agg.num(tok, jnp.ones_like(b["is_reg"])), agg.den("all"))
    return {"pg": pg}, adv, {"cov/selected_token_frac": _frac(detached, agg), "cov/band_token_frac": _frac(band, agg)}


@register_loss("kl_cov")
def _kl_cov(b, cfg, agg):
    """KL-Cov: the unclipped surrogate ``-A r`` plus ``kl_cov_coef * |log pi - log pi_old|`` on the
    ``kl_cov_ratio`` share of valid tokens with the largest covariance (``loss/kl``)."""
    adv, mask = b["advantages"], b["mask"]
    lr = log_ratio(b, cfg)
    valid = mask > 0
    cov = token_covariance(b["logp"], adv, mask)
    k = selection_count(cfg.kl_cov_ratio, jnp.sum(valid))
    penalised = rank_select(-cov, valid, k)
    ones = jnp.ones_like(b["is_reg"])
    pg = safe_div(agg.num(-adv * jnp.exp(lr), ones), agg.den("all"))
    kl = safe_div(agg.num(jnp.where(penalised, jnp.abs(lr), 0.0), ones), agg.den("all"))
    return {"pg": pg, "kl": cfg.kl_cov_coef * kl}, adv, {"cov/selected_token_frac": _frac(penalised, agg),
                                                         "cov/band_token_frac": jnp.float32(0.0)}
