"""The metrics of a loss call, and their merge over the micro-batches of one mini-batch."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp

from aepo_jax.losses.core import log_ratio, safe_div


def loss_metrics(b, cfg, agg, dens, terms, adv, g_logp):
    """The metrics :func:`aepo_jax.losses.policy_loss` documents, from its prepared batch and terms."""
    sg = jax.lax.stop_gradient
    mask = b["mask"]
    n = mask.shape[0]
    ones = jnp.ones((n,), jnp.float32)
    reg = b["is_reg"]
    has = (jnp.sum(mask, axis=1) > 0).astype(jnp.float32)
    log_r = sg(log_ratio(b, cfg))
    ratio = jnp.exp(log_r)
    adv = sg(adv)
    toks = dens["toks_all"]

    def tok_frac(cond):
        return safe_div(jnp.sum(cond.astype(jnp.float32) * mask), toks)

    m: dict[str, jax.Array] = {}
    for k in ("pg", "reg", "entropy"):
        m[f"loss/{k}"] = sg(terms[k]) if k in terms else jnp.float32(0.0)
    if "kl" in terms:  # kl_cov's penalty
        m["loss/kl"] = sg(terms["kl"])
    if "kl" in terms:
        # kl_cov's surrogate -A r is never clipped, so no token is: report 0 (as verl does) rather
        # than the tokens that would lie beyond a clip range this loss does not have.
        for side in ("upper", "lower", "dual"):
            m[f"actor/pg_clipfrac_{side}"] = jnp.float32(0.0)
    else:
        m["actor/pg_clipfrac_upper"] = tok_frac((adv > 0) & (ratio > 1.0 + cfg.clip_high))
        m["actor/pg_clipfrac_lower"] = tok_frac((adv < 0) & (ratio < 1.0 - cfg.clip_low))
        if cfg.clip_dual is not None:
            m["actor/pg_clipfrac_dual"] = tok_frac((adv < 0) & (ratio > cfg.clip_dual))
        else:
            m["actor/pg_clipfrac_dual"] = jnp.float32(0.0)
    m["actor/approx_kl"] = safe_div(jnp.sum(-log_r * mask), toks)
    m["actor/approx_kl_k3"] = safe_div(jnp.sum((ratio - 1.0 - log_r) * mask), toks)
    m["actor/ratio_mean"] = safe_div(jnp.sum(ratio * mask), toks)
    big = jnp.float32(3.0e38)
    m["actor/ratio_min"] = jnp.min(jnp.where(mask > 0, ratio, big))
    m["actor/ratio_max"] = jnp.max(jnp.where(mask > 0, ratio, -big))
    m["actor/entropy_nll"] = safe_div(agg.num(sg(-b["logp"]), ones), agg.den("all"))
    if "entropy" in b:
        m["actor/entropy_full"] = safe_div(agg.num(sg(b["entropy"]), ones), agg.den("all"))
    m["aepo/reg_token_share"] = safe_div(jnp.sum(jnp.sum(mask, axis=1) * reg), toks)
    m["aepo/reg_seq_share"] = safe_div(jnp.sum(has * reg), dens["seqs_all"])
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
