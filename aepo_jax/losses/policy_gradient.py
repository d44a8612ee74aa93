"""The registered policy losses: GRPO, AEPO, the paper's ablations (Eq. 2, Eq. 3), Entropy-Reg,
Entropy-Adv and plain REINFORCE. Each maps (prepared batch, LossConfig, Agg) to its terms and the
per-token advantage it fed to the surrogate (see :mod:`aepo_jax.losses.core`).
"""

from __future__ import annotations

import jax.numpy as jnp

from aepo_jax.advantages import entropy_adv_shaping
from aepo_jax.losses.core import clipped_surrogate, log_ratio, register_loss, safe_div


def _pg_all(b, cfg, agg, adv):
    """Clipped surrogate over every sample in the batch (GRPO and the losses built on it)."""
    ratio = jnp.exp(log_ratio(b, cfg))
    ones = jnp.ones_like(b["is_reg"])
    return safe_div(agg.num(clipped_surrogate(ratio, adv, cfg), ones), agg.den("all"))


def _grpo_plus_reg(b, cfg, agg, reg_adv):
    """GRPO on the non-temperature samples + alpha * clipped surrogate with ``reg_adv`` on the rest."""
    ratio = jnp.exp(log_ratio(b, cfg))
    reg = b["is_reg"]
    main = 1.0 - reg
    adv = jnp.where(reg[:, None] > 0, reg_adv, b["advantages"])
    tok = clipped_surrogate(ratio, adv, cfg)
    num_main = agg.num(tok, main)
    num_reg = agg.num(tok, reg)
    if cfg.reg_norm == "main":
        den_main = den_reg = agg.den("main")
    elif cfg.reg_norm == "reg":
        den_main, den_reg = agg.den("main"), agg.den("reg")
    else:  # joint
        den_main = den_reg = agg.den("all")
    terms = {"pg": safe_div(num_main, den_main), "reg": cfg.alpha * safe_div(num_reg, den_reg)}
    return terms, adv


@register_loss("grpo")
def _grpo(b, cfg, agg):
    """Eq. (1) J_GRPO: clipped surrogate, no KL. Also the authors' "mix" AEPO (a mixed batch)."""
    return {"pg": _pg_all(b, cfg, agg, b["advantages"])}, b["advantages"]


@register_loss("aepo", required=("advantages", "rewards", "is_reg"))
def _aepo(b, cfg, agg):
    """Eq. (1) J_AEPO: GRPO + alpha * clipped REINFORCE (advantage = binary R) on temperature samples."""
    n, L = b["logp"].shape
    return _grpo_plus_reg(b, cfg, agg, jnp.broadcast_to(b["rewards"][:, None], (n, L)))


@register_loss("ablation_eq2", required=("advantages", "rewards", "is_reg"))
def _ablation_eq2(b, cfg, agg):
    """Table 3, Eq. (2): the REINFORCE term on samples from pi_old itself (T = 1).

    Same function as ``aepo``; the difference is the batch: the trainer draws the is_reg samples
    at T = 1 instead of the controller's temperature. Registered separately so runs are labelled.
    """
    return _aepo(b, cfg, agg)


@register_loss("ablation_eq3", required=("advantages", "is_reg"))
def _ablation_eq3(b, cfg, agg):
    """Table 3, Eq. (3): temperature samples with their GRPO advantages (negatives kept) instead of R."""
    return _grpo_plus_reg(b, cfg, agg, b["advantages"])


@register_loss("entropy_reg", required=("advantages", "entropy"))
def _entropy_reg(b, cfg, agg):
    """Entropy-Reg: GRPO - lambda * full-distribution entropy (needs entropy with gradient)."""
    ent = agg.num(b["entropy"], jnp.ones_like(b["is_reg"]))
    return {
        "pg": _pg_all(b, cfg, agg, b["advantages"]),
        "entropy": -cfg.entropy_coef * safe_div(ent, agg.den("all")),
    }, b["advantages"]


@register_loss("entropy_adv", required=("advantages", "entropy"))
def _entropy_adv(b, cfg, agg):
    """Entropy-Adv: GRPO with A_t + min(beta * sg(H_t), |A_t| / kappa)."""
    adv = entropy_adv_shaping(b["advantages"], b["entropy"], cfg.adv_beta, cfg.adv_kappa)
    return {"pg": _pg_all(b, cfg, agg, adv)}, adv


@register_loss("reinforce")
def _reinforce(b, cfg, agg):
    """Plain REINFORCE: -r * A without clipping (gradient -A grad log pi on-policy).

    Pair with ``advantages.reinforce_advantages`` (A = R) for the textbook estimator.
    """
    ratio = jnp.exp(log_ratio(b, cfg))
    tok = -b["advantages"] * ratio
    return {"pg": safe_div(agg.num(tok, jnp.ones_like(b["is_reg"])), agg.den("all"))}, b["advantages"]
