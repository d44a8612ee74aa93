"""Policy losses by name: GRPO, AEPO, Entropy-Reg, Entropy-Adv, the paper's ablations, REINFORCE,
Clip-Cov and KL-Cov (:mod:`aepo_jax.losses.cov`).

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

from aepo_jax.losses import cov, policy_gradient  # noqa: F401  (register the losses)
from aepo_jax.losses.core import AGG_MODES, LOSSES, NEEDS_RNG, REG_NORMS, LossConfig, loss_denominators, register_loss
from aepo_jax.losses.metrics import merge_microbatch_metrics
from aepo_jax.losses.objective import policy_loss

__all__ = [
    "AGG_MODES",
    "REG_NORMS",
    "LOSSES",
    "NEEDS_RNG",
    "LossConfig",
    "loss_denominators",
    "merge_microbatch_metrics",
    "policy_loss",
    "register_loss",
]
