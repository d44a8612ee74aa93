"""``policy_loss``: a registered loss on a batch, with its metrics (the package's entry point)."""

from __future__ import annotations

from typing import Any, Mapping

import jax

from aepo_jax.losses.core import DENOMINATOR_KEYS, NEEDS_RNG, Agg, LossConfig, f32, loss_denominators, prepare, resolve_loss
from aepo_jax.losses.metrics import loss_metrics


def _dens(b, denominators):
    if denominators is None:
        return loss_denominators(b)
    missing = [k for k in DENOMINATOR_KEYS if k not in denominators]
    if missing:
        raise ValueError(f"denominators: missing keys {missing}; build them with loss_denominators(minibatch)")
    return {k: jax.lax.stop_gradient(f32(denominators[k])) for k in DENOMINATOR_KEYS}


def policy_loss(
    method: str,
    batch: Mapping[str, Any],
    cfg: LossConfig = LossConfig(),
    *,
    denominators: Mapping[str, Any] | None = None,
    rng: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Loss (to minimise) and metrics for ``method`` on ``batch``. Pure and jit-able.

    ``method`` and ``cfg`` are static. ``denominators`` (from :func:`loss_denominators` on the whole
    mini-batch) makes the value of a micro-batch call its exact share of the mini-batch loss.
    ``rng``: a PRNG key, required by losses registered with ``needs_rng`` (``clip_cov``), ignored
    by the others.

    Metrics (scalars; additive over micro-batches when global denominators are passed):
      ``loss/total``, ``loss/pg``, ``loss/reg``, ``loss/entropy`` (the terms, as they enter the loss),
      ``loss/kl`` (``kl_cov`` only); ``cov/selected_token_frac``, ``cov/band_token_frac``
      (``clip_cov``, ``kl_cov``: token share detached / penalised, and in Clip-Cov's band);
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
    fn, required = resolve_loss(method)
    b = prepare(batch, required)
    if method in NEEDS_RNG:
        if rng is None:
            raise ValueError(f"policy_loss: loss {method!r} draws random tokens; pass rng=<PRNG key>")
        b["rng"] = rng
    dens = _dens(b, denominators)
    agg = Agg(b["mask"], cfg.agg, dens)

    def total_fn(logp):
        terms, adv, *own = fn({**b, "logp": logp}, cfg, agg)
        return sum(terms.values()), (terms, adv, own[0] if own else {})

    loss, (terms, adv, own_metrics) = total_fn(b["logp"])
    # dL/dlogp for the gradient-share metric, on a detached copy so it never enters the caller's
    # gradient (elementwise work on [N, L] only).
    g_logp = jax.grad(lambda lp: total_fn(lp)[0])(jax.lax.stop_gradient(b["logp"]))
    metrics = loss_metrics(b, cfg, agg, dens, terms, adv, jax.lax.stop_gradient(g_logp))
    metrics.update({k: jax.lax.stop_gradient(v) for k, v in own_metrics.items()})
    metrics["loss/total"] = jax.lax.stop_gradient(loss)
    return loss, metrics
