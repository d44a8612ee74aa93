"""The building blocks every loss shares: :class:`LossConfig`, the batch checks, the
(numerator, denominator) aggregation, the clipped surrogate and the loss registry.

See :mod:`aepo_jax.losses` for the contract.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp

AGG_MODES = ("seq-mean-token-mean", "token-mean")
REG_NORMS = ("main", "reg", "joint")
DENOMINATOR_KEYS = ("seqs_all", "seqs_main", "seqs_reg", "toks_all", "toks_main", "toks_reg")


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """Hyper-parameters of every loss (frozen and hashable, so it can be a static jit argument).

    clip_low / clip_high: epsilon_low / epsilon_high of the clipped ratio (paper: 0.2 / 0.2).
    clip_dual: dual-clip constant c (> 1) bounding the loss of negative-advantage tokens at
      ``-A * c``; None = off (paper). The authors' code uses 3.0.
    alpha: weight of the REINFORCE term of ``aepo`` / ``ablation_eq2`` / ``ablation_eq3``.
    entropy_coef: lambda of ``entropy_reg`` (paper: 0.015).
    adv_beta, adv_kappa: beta, kappa of ``entropy_adv`` (paper: 0.4, 2).
    agg: ``seq-mean-token-mean`` (default, Eq. 1) or ``token-mean`` (authors' code / DAPO).
    reg_norm: denominator of the REINFORCE term (see docs/algorithms.md):
      ``main`` (default): the GRPO samples' denominator, so each temperature sample weighs alpha
        times what a GRPO sample weighs (alpha = 1 is the authors' effective weighting, and the
        positive-sample budget 60 / 30 acts as the strength of the term, as in the paper);
      ``reg``: the temperature samples' own denominator (the literal Monte-Carlo form of Eq. 1:
        alpha * mean over temperature samples);
      ``joint``: one pool, (GRPO + alpha * REINFORCE numerators) / (all samples' denominator),
        which with alpha = 1 and only positives in the batch is the authors' "mix" batch.
    log_ratio_clamp: |log pi - log pi_old| is clamped to this before exp (numerical guard).
    clip_cov_ratio, clip_cov_lb, clip_cov_ub: ``clip_cov``'s share of detached tokens and its
      covariance band (verl: 0.0002, 1, 5); kl_cov_ratio, kl_cov_coef: ``kl_cov``'s share of
      penalised tokens and the penalty's weight (verl: 0.0002, 1). See :mod:`aepo_jax.losses.cov`.
    """

    clip_low: float = 0.2
    clip_high: float = 0.2
    clip_dual: float | None = None
    alpha: float = 1.0
    entropy_coef: float = 0.015
    adv_beta: float = 0.4
    adv_kappa: float = 2.0
    agg: str = "seq-mean-token-mean"
    reg_norm: str = "main"
    log_ratio_clamp: float = 20.0
    clip_cov_ratio: float = 0.0002
    clip_cov_lb: float = 1.0
    clip_cov_ub: float = 5.0
    kl_cov_ratio: float = 0.0002
    kl_cov_coef: float = 1.0

    def __post_init__(self):
        if self.agg not in AGG_MODES:
            raise ValueError(f"LossConfig.agg: expected one of {AGG_MODES}, got {self.agg!r}")
        if self.reg_norm not in REG_NORMS:
            raise ValueError(f"LossConfig.reg_norm: expected one of {REG_NORMS}, got {self.reg_norm!r}")
        if not 0 <= self.clip_low < 1:
            raise ValueError(f"LossConfig.clip_low: expected 0 <= clip_low < 1, got {self.clip_low}")
        if not self.clip_high >= 0:
            raise ValueError(f"LossConfig.clip_high: expected >= 0, got {self.clip_high}")
        if self.clip_dual is not None and not self.clip_dual > 1:
            raise ValueError(f"LossConfig.clip_dual: expected None or > 1, got {self.clip_dual}")
        if not self.adv_kappa > 0:
            raise ValueError(f"LossConfig.adv_kappa: expected > 0, got {self.adv_kappa}")
        if not self.log_ratio_clamp > 0:
            raise ValueError(f"LossConfig.log_ratio_clamp: expected > 0, got {self.log_ratio_clamp}")
        for name in ("clip_cov_ratio", "kl_cov_ratio"):
            if not 0 < getattr(self, name) <= 1:
                raise ValueError(f"LossConfig.{name}: expected 0 < {name} <= 1, got {getattr(self, name)}")
        if not self.clip_cov_lb < self.clip_cov_ub:
            raise ValueError(f"LossConfig.clip_cov_lb ({self.clip_cov_lb}) must be < clip_cov_ub ({self.clip_cov_ub})")
        if not self.kl_cov_coef >= 0:
            raise ValueError(f"LossConfig.kl_cov_coef: expected >= 0, got {self.kl_cov_coef}")



# ----------------------------------------------------------------------------------------------
# Batch handling


def f32(x):
    return jnp.asarray(x, jnp.float32)


def prepare(batch: Mapping[str, Any], required: Sequence[str]) -> dict[str, jax.Array]:
    """Check shapes (at trace time) and fill optional fields; errors name the field."""
    for key in ("logp", "old_logp", "mask", *required):
        if key not in batch or batch[key] is None:
            raise ValueError(f"batch: missing required field {key!r}")
    logp = jnp.asarray(batch["logp"])
    if logp.ndim != 2:
        raise ValueError(f"batch['logp']: expected [N, L], got shape {tuple(logp.shape)}")
    n, L = logp.shape
    out: dict[str, jax.Array] = {"logp": logp.astype(jnp.float32)}
    for key in ("old_logp", "mask", "entropy"):
        if batch.get(key) is None:
            continue
        x = jnp.asarray(batch[key])
        if x.shape != (n, L):
            raise ValueError(f"batch[{key!r}]: expected shape {(n, L)} like logp, got {tuple(x.shape)}")
        out[key] = f32(x)
    out["old_logp"] = jax.lax.stop_gradient(out["old_logp"])
    out["mask"] = jax.lax.stop_gradient(out["mask"])
    if batch.get("advantages") is not None:
        a = f32(batch["advantages"])
        if a.shape not in ((n,), (n, L)):
            raise ValueError(f"batch['advantages']: expected shape {(n,)} or {(n, L)}, got {tuple(a.shape)}")
        out["advantages"] = jax.lax.stop_gradient(a if a.ndim == 2 else jnp.broadcast_to(a[:, None], (n, L)))
    for key in ("rewards", "is_reg"):
        if batch.get(key) is None:
            continue
        x = jnp.asarray(batch[key])
        if x.shape != (n,):
            raise ValueError(f"batch[{key!r}]: expected shape {(n,)}, got {tuple(x.shape)}")
        out[key] = jax.lax.stop_gradient(f32(x))
    if "is_reg" not in out:
        out["is_reg"] = jnp.zeros((n,), jnp.float32)
    return out


def loss_denominators(batch: Mapping[str, Any]) -> dict[str, jax.Array]:
    """Global denominators of a (mini-)batch: sequence and token counts for all / main / reg samples.

    "main" = samples with ``is_reg`` False, "reg" = ``is_reg`` True; a sequence counts only if it has
    at least one masked-in token. Needs only ``mask`` and (optionally) ``is_reg``.
    """
    mask = f32(batch["mask"])
    if mask.ndim != 2:
        raise ValueError(f"batch['mask']: expected [N, L], got shape {tuple(mask.shape)}")
    n = mask.shape[0]
    is_reg = batch.get("is_reg")
    reg = jnp.zeros((n,), jnp.float32) if is_reg is None else f32(is_reg)
    if reg.shape != (n,):
        raise ValueError(f"batch['is_reg']: expected shape {(n,)}, got {tuple(reg.shape)}")
    toks = jnp.sum(mask, axis=1)
    has = (toks > 0).astype(jnp.float32)
    main = 1.0 - reg
    return {
        "seqs_all": jnp.sum(has),
        "seqs_main": jnp.sum(has * main),
        "seqs_reg": jnp.sum(has * reg),
        "toks_all": jnp.sum(toks),
        "toks_main": jnp.sum(toks * main),
        "toks_reg": jnp.sum(toks * reg),
    }


def safe_div(num, den):
    # Denominators are counts: where one is 0 its numerator is 0 as well.
    return num / jnp.maximum(den, 1.0)


class Agg:
    """Numerators of masked per-token quantities under one aggregation mode."""

    def __init__(self, mask, agg: str, dens: Mapping[str, jax.Array]):
        self.mask = mask
        self.agg = agg
        self.dens = dens
        self.inv_len = 1.0 / jnp.maximum(jnp.sum(mask, axis=1), 1.0)

    def num(self, x, sel):
        """sum over selected samples of (per-seq token mean | token sum) of x."""
        per_seq = jnp.sum(x * self.mask, axis=1)
        if self.agg == "seq-mean-token-mean":
            per_seq = per_seq * self.inv_len
        return jnp.sum(per_seq * sel)

    def den(self, role: str):
        return self.dens[("seqs_" if self.agg == "seq-mean-token-mean" else "toks_") + role]



# ----------------------------------------------------------------------------------------------
# Per-token surrogates


def log_ratio(b, cfg):
    c = cfg.log_ratio_clamp
    return jnp.clip(b["logp"] - b["old_logp"], -c, c)


def clipped_surrogate(ratio, adv, cfg):
    """Per-token loss -min(r A, clip(r) A) with optional dual clip for A < 0."""
    loss = jnp.maximum(-adv * ratio, -adv * jnp.clip(ratio, 1.0 - cfg.clip_low, 1.0 + cfg.clip_high))
    if cfg.clip_dual is not None:
        loss = jnp.where(adv < 0, jnp.minimum(loss, -adv * cfg.clip_dual), loss)
    return loss


# ----------------------------------------------------------------------------------------------
# Registry. A loss function maps (prepared batch, cfg, aggregator) to a dict of scalar terms whose
# sum is the loss, plus the per-token advantage actually fed to the clipped surrogate (for metrics),
# and optionally a dict of the loss's own metrics (additive over micro-batches, like the others).

LossFn = Callable[[dict, LossConfig, Agg], tuple[dict[str, jax.Array], jax.Array]]
LOSSES: dict[str, LossFn] = {}
REQUIRED: dict[str, tuple[str, ...]] = {}
NEEDS_RNG: set[str] = set()


def register_loss(name: str, required: Sequence[str] = ("advantages",), needs_rng: bool = False):
    """Decorator: register a loss under ``name`` with the batch fields it needs; ``needs_rng``: it
    draws random numbers from ``batch["rng"]`` (``policy_loss(..., rng=key)``)."""

    def deco(fn: LossFn) -> LossFn:
        if name in LOSSES:
            raise ValueError(f"loss {name!r} is already registered")
        LOSSES[name] = fn
        REQUIRED[name] = tuple(required)
        if needs_rng:
            NEEDS_RNG.add(name)
        return fn

    return deco


def resolve_loss(method: str) -> tuple[LossFn, tuple[str, ...]]:
    """The registered loss function of ``method`` and the batch fields it needs."""
    if method not in LOSSES:
        raise ValueError(f"method: unknown loss {method!r}; registered: {sorted(LOSSES)}")
    return LOSSES[method], REQUIRED[method]
