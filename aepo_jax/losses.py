"""Policy losses by name: GRPO, AEPO, Entropy-Reg, Entropy-Adv, the paper's ablations, REINFORCE.

Contract::

    from aepo_jax.losses import LossConfig, policy_loss
    loss, metrics = policy_loss(method, batch, LossConfig(...), denominators=None)

``batch`` is a mapping of arrays (all log-probs at temperature 1):

=============  ==========  ====================================================================
key            shape       meaning
=============  ==========  ====================================================================
logp           [N, L]      log pi_theta(o_t) (carries the gradient)
old_logp       [N, L]      log pi_old(o_t) (no gradient)
mask           [N, L]      1 on response tokens, 0 on padding / prompt
advantages     [N]|[N, L]  GRPO (or other) advantages
rewards        [N]         binary reward R in {0, 1} (aepo, ablation_eq2; metrics)
is_reg         [N] bool    True = temperature ("regulariser") sample
entropy        [N, L]      full-distribution entropy per token (entropy_reg, entropy_adv; metrics)
=============  ==========  ====================================================================

Every loss is a *minimisation* objective (the negative of the paper's J).

Aggregation is done as (numerator, denominator) pairs. ``seq-mean-token-mean`` (Eq. 1, default)
sums per-sequence token means and divides by the number of sequences; ``token-mean`` (the
authors' code, DAPO) sums all token losses and divides by the number of tokens. Only sequences
with at least one masked-in token are counted.

Micro-batching / multiple devices: under ``jit`` with sharded arrays the sums are global, so the
device count never changes the loss. When the trainer splits one optimiser mini-batch into
micro-batches it must pass the mini-batch's denominators to every micro-batch call::

    dens = loss_denominators(minibatch)                     # cheap: mask, is_reg only
    for micro in split(minibatch):
        loss_i, m_i = policy_loss(method, micro, cfg, denominators=dens)
    # sum_i loss_i == policy_loss(method, minibatch, cfg)[0]; sum the gradients likewise
    metrics = merge_microbatch_metrics([m_1, m_2, ...])     # == the mini-batch's metrics

With global denominators every metric is additive over micro-batches except those ending in
``_min`` / ``_max`` (combined by min / max) and the derived shares recomputed by the merge.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp

from aepo_jax.advantages import entropy_adv_shaping

__all__ = [
    "AGG_MODES",
    "REG_NORMS",
    "LOSSES",
    "LossConfig",
    "loss_denominators",
    "merge_microbatch_metrics",
    "policy_loss",
    "register_loss",
]

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


# ----------------------------------------------------------------------------------------------
# Batch handling


def _f32(x):
    return jnp.asarray(x, jnp.float32)


def _prepare(batch: Mapping[str, Any], required: Sequence[str]) -> dict[str, jax.Array]:
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
        out[key] = _f32(x)
    out["old_logp"] = jax.lax.stop_gradient(out["old_logp"])
    out["mask"] = jax.lax.stop_gradient(out["mask"])
    if batch.get("advantages") is not None:
        a = _f32(batch["advantages"])
        if a.shape not in ((n,), (n, L)):
            raise ValueError(f"batch['advantages']: expected shape {(n,)} or {(n, L)}, got {tuple(a.shape)}")
        out["advantages"] = jax.lax.stop_gradient(a if a.ndim == 2 else jnp.broadcast_to(a[:, None], (n, L)))
    for key in ("rewards", "is_reg"):
        if batch.get(key) is None:
            continue
        x = jnp.asarray(batch[key])
        if x.shape != (n,):
            raise ValueError(f"batch[{key!r}]: expected shape {(n,)}, got {tuple(x.shape)}")
        out[key] = jax.lax.stop_gradient(_f32(x))
    if "is_reg" not in out:
        out["is_reg"] = jnp.zeros((n,), jnp.float32)
    return out


def loss_denominators(batch: Mapping[str, Any]) -> dict[str, jax.Array]:
    """Global denominators of a (mini-)batch: sequence and token counts for all / main / reg samples.

    "main" = samples with ``is_reg`` False, "reg" = ``is_reg`` True; a sequence counts only if it has
    at least one masked-in token. Needs only ``mask`` and (optionally) ``is_reg``.
    """
    mask = _f32(batch["mask"])
    if mask.ndim != 2:
        raise ValueError(f"batch['mask']: expected [N, L], got shape {tuple(mask.shape)}")
    n = mask.shape[0]
    is_reg = batch.get("is_reg")
    reg = jnp.zeros((n,), jnp.float32) if is_reg is None else _f32(is_reg)
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


def _safe_div(num, den):
    # Denominators are counts: where one is 0 its numerator is 0 as well.
    return num / jnp.maximum(den, 1.0)


class _Agg:
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


def _log_ratio(b, cfg):
    c = cfg.log_ratio_clamp
    return jnp.clip(b["logp"] - b["old_logp"], -c, c)


def _clipped_surrogate(ratio, adv, cfg):
    """Per-token loss -min(r A, clip(r) A) with optional dual clip for A < 0."""
    loss = jnp.maximum(-adv * ratio, -adv * jnp.clip(ratio, 1.0 - cfg.clip_low, 1.0 + cfg.clip_high))
    if cfg.clip_dual is not None:
        loss = jnp.where(adv < 0, jnp.minimum(loss, -adv * cfg.clip_dual), loss)
    return loss


# ----------------------------------------------------------------------------------------------
# Registry. A loss function maps (prepared batch, cfg, aggregator) to a dict of scalar terms whose
# sum is the loss, plus the per-token advantage actually fed to the clipped surrogate (for metrics).

LossFn = Callable[[dict, LossConfig, _Agg], tuple[dict[str, jax.Array], jax.Array]]
LOSSES: dict[str, LossFn] = {}
_REQUIRED: dict[str, tuple[str, ...]] = {}


def register_loss(name: str, required: Sequence[str] = ("advantages",)):
    """Decorator: register a loss under ``name`` with the batch fields it needs."""

    def deco(fn: LossFn) -> LossFn:
        if name in LOSSES:
            raise ValueError(f"loss {name!r} is already registered")
        LOSSES[name] = fn
        _REQUIRED[name] = tuple(required)
        return fn

    return deco


def _pg_all(b, cfg, agg, adv):
    """Clipped surrogate over every sample in the batch (GRPO and the losses built on it)."""
    ratio = jnp.exp(_log_ratio(b, cfg))
    ones = jnp.ones_like(b["is_reg"])
    return _safe_div(agg.num(_clipped_surrogate(ratio, adv, cfg), ones), agg.den("all"))


def _grpo_plus_reg(b, cfg, agg, reg_adv):
    """GRPO on the non-temperature samples + alpha * clipped surrogate with ``reg_adv`` on the rest."""
    ratio = jnp.exp(_log_ratio(b, cfg))
    reg = b["is_reg"]
    main = 1.0 - reg
    adv = jnp.where(reg[:, None] > 0, reg_adv, b["advantages"])
    tok = _clipped_surrogate(ratio, adv, cfg)
    num_main = agg.num(tok, main)
    num_reg = agg.num(tok, reg)
    if cfg.reg_norm == "main":
        den_main = den_reg = agg.den("main")
    elif cfg.reg_norm == "reg":
        den_main, den_reg = agg.den("main"), agg.den("reg")
    else:  # joint
        den_main = den_reg = agg.den("all")
    terms = {"pg": _safe_div(num_main, den_main), "reg": cfg.alpha * _safe_div(num_reg, den_reg)}
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
        "entropy": -cfg.entropy_coef * _safe_div(ent, agg.den("all")),
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
    ratio = jnp.exp(_log_ratio(b, cfg))
    tok = -b["advantages"] * ratio
    return {"pg": _safe_div(agg.num(tok, jnp.ones_like(b["is_reg"])), agg.den("all"))}, b["advantages"]


# ----------------------------------------------------------------------------------------------
# Public entry points


def _resolve(method: str):
    if method not in LOSSES:
        raise ValueError(f"method: unknown loss {method!r}; registered: {sorted(LOSSES)}")
    return LOSSES[method], _REQUIRED[method]


def _dens(b, denominators):
    if denominators is None:
        return loss_denominators(b)
    missing = [k for k in DENOMINATOR_KEYS if k not in denominators]
    if missing:
        raise ValueError(f"denominators: missing keys {missing}; build them with loss_denominators(minibatch)")
    return {k: jax.lax.stop_gradient(_f32(denominators[k])) for k in DENOMINATOR_KEYS}


def policy_loss(
    method: str,
    batch: Mapping[str, Any],
    cfg: LossConfig = LossConfig(),
    *,
    denominators: Mapping[str, Any] | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Loss (to minimise) and metrics for ``method`` on ``batch``. Pure and jit-able.

    ``method`` and ``cfg`` are static. ``denominators`` (from :func:`loss_denominators` on the whole
    mini-batch) makes the value of a micro-batch call its exact share of the mini-batch loss.

    Metrics (scalars; additive over micro-batches when global denominators are passed):
      ``loss/total``, ``loss/pg``, ``loss/reg``, ``loss/entropy`` (the terms, as they enter the loss);
      ``actor/pg_clipfrac_upper`` (A > 0, r > 1 + eps_high), ``actor/pg_clipfrac_lower`` (A < 0,
      r < 1 - eps_low), ``actor/pg_clipfrac_dual`` (A < 0, r > c), token fractions;
      ``actor/approx_kl`` (mean log pi_old - log pi), ``actor/approx_kl_k3`` (mean r - 1 - log r);
      ``actor/ratio_mean``, ``actor/ratio_min``, ``actor/ratio_max``;
      ``actor/entropy_nll`` (sampled estimator -log pi(o_t)), ``actor/entropy_full`` (if the batch has
      ``entropy``), both aggregated like the loss; ``aepo/reg_token_share``, ``aepo/reg_seq_share``
      (temperature samples' share of tokens / sequences); ``aepo/num_reg_samples``,
      ``aepo/num_positives`` (temperature samples with R > 0); ``aepo/reg_grad_share_logp``
      (||dL/dlogp on temperature samples|| / ||dL/dlogp||, a cheap proxy of their share of the
      gradient norm; ``gradsq/logp_reg`` and ``gradsq/logp_all`` are its additive parts);
      ``count/tokens``, ``count/seqs`` (this call's counts).
    """
    fn, required = _resolve(method)
    b = _prepare(batch, required)
    dens = _dens(b, denominators)
    agg = _Agg(b["mask"], cfg.agg, dens)

    def total_fn(logp):
        terms, adv = fn({**b, "logp": logp}, cfg, agg)
        return sum(terms.values()), (terms, adv)

    loss, (terms, adv) = total_fn(b["logp"])
    # dL/dlogp for the gradient-share metric, on a detached copy so it never enters the caller's
    # gradient (elementwise work on [N, L] only).
    g_logp = jax.grad(lambda lp: total_fn(lp)[0])(jax.lax.stop_gradient(b["logp"]))
    metrics = _metrics(b, cfg, agg, dens, terms, adv, jax.lax.stop_gradient(g_logp))
    metrics["loss/total"] = jax.lax.stop_gradient(loss)
    return loss, metrics


def _metrics(b, cfg, agg, dens, terms, adv, g_logp):
    sg = jax.lax.stop_gradient
    mask = b["mask"]
    n = mask.shape[0]
    ones = jnp.ones((n,), jnp.float32)
    reg = b["is_reg"]
    has = (jnp.sum(mask, axis=1) > 0).astype(jnp.float32)
    log_ratio = sg(_log_ratio(b, cfg))
    ratio = jnp.exp(log_ratio)
    adv = sg(adv)
    toks = dens["toks_all"]

    def tok_frac(cond):
        return _safe_div(jnp.sum(cond.astype(jnp.float32) * mask), toks)

    m: dict[str, jax.Array] = {}
    for k in ("pg", "reg", "entropy"):
        m[f"loss/{k}"] = sg(terms[k]) if k in terms else jnp.float32(0.0)
    m["actor/pg_clipfrac_upper"] = tok_frac((adv > 0) & (ratio > 1.0 + cfg.clip_high))
    m["actor/pg_clipfrac_lower"] = tok_frac((adv < 0) & (ratio < 1.0 - cfg.clip_low))
    if cfg.clip_dual is not None:
        m["actor/pg_clipfrac_dual"] = tok_frac((adv < 0) & (ratio > cfg.clip_dual))
    else:
        m["actor/pg_clipfrac_dual"] = jnp.float32(0.0)
    m["actor/approx_kl"] = _safe_div(jnp.sum(-log_ratio * mask), toks)
    m["actor/approx_kl_k3"] = _safe_div(jnp.sum((ratio - 1.0 - log_ratio) * mask), toks)
    m["actor/ratio_mean"] = _safe_div(jnp.sum(ratio * mask), toks)
    big = jnp.float32(3.0e38)
    m["actor/ratio_min"] = jnp.min(jnp.where(mask > 0, ratio, big))
    m["actor/ratio_max"] = jnp.max(jnp.where(mask > 0, ratio, -big))
    m["actor/entropy_nll"] = _safe_div(agg.num(sg(-b["logp"]), ones), agg.den("all"))
    if "entropy" in b:
        m["actor/entropy_full"] = _safe_div(agg.num(sg(b["entropy"]), ones), agg.den("all"))
    m["aepo/reg_token_share"] = _safe_div(jnp.sum(jnp.sum(mask, axis=1) * reg), toks)
    m["aepo/reg_seq_share"] = _safe_div(jnp.sum(has * reg), dens["seqs_all"])
    m["aepo/num_reg_samples"] = jnp.sum(has * reg)
    if "rewards" in b:
        m["aepo/num_positives"] = jnp.sum(has * reg * (b["rewards"] > 0))
    g2 = jnp.sum(g_logp * g_logp, axis=1)
    m["gradsq/logp_all"] = jnp.sum(g2)
    m["gradsq/logp_reg"] = jnp.sum(g2 * reg)
    m["count/tokens"] = jnp.sum(mask)
    m["count/seqs"] = jnp.sum(has)
    _derive(m)
    return m


_DERIVED = ("aepo/reg_grad_share_logp",)


def _derive(m):
    m["aepo/reg_grad_share_logp"] = jnp.sqrt(_safe_ratio(m["gradsq/logp_reg"], m["gradsq/logp_all"]))


def _safe_ratio(a, b):
    return jnp.where(b > 0, a / jnp.where(b > 0, b, 1.0), 0.0)


def merge_microbatch_metrics(metrics: Sequence[Mapping[str, Any]] | Mapping[str, Any]) -> dict[str, jax.Array]:
    """Combine the metrics of the micro-batches of one mini-batch (computed with its global denominators).

    Accepts a list of metric dicts, or one dict of stacked arrays with a leading micro-batch axis
    (what ``lax.scan`` over micro-batches returns). ``*_min`` -> min, ``*_max`` -> max, derived shares
    recomputed, everything else summed. Works inside and outside jit.
    """
    if isinstance(metrics, Mapping):
        stacked = {k: jnp.asarray(v) for k, v in metrics.items()}
    else:
        if not metrics:
            raise ValueError("metrics: empty list of micro-batch metrics")
        keys = set(metrics[0])
        for i, mi in enumerate(metrics):
            if set(mi) != keys:
                raise ValueError(f"metrics[{i}]: keys differ from metrics[0]: {sorted(set(mi) ^ keys)}")
        stacked = {k: jnp.stack([jnp.asarray(mi[k]) for mi in metrics]) for k in keys}
    out = {}
    for k, v in stacked.items():
        if k in _DERIVED:
            continue
        if k.endswith("_min"):
            out[k] = jnp.min(v, axis=0)
        elif k.endswith("_max"):
            out[k] = jnp.max(v, axis=0)
        else:
            out[k] = jnp.sum(v, axis=0)
    _derive(out)
    return out
