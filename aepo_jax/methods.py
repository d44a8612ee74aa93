"""The method table: what every RL method of the package is, in one place.

A method is a small frozen :class:`MethodSpec`: which rollouts it draws and at what temperature,
which of their samples enter the training batch and with which advantage, and which registered
loss (:mod:`aepo_jax.losses`) trains on them. The trainer (``aepo_jax/train.py``), the batch
builder (``aepo_jax/trainer/batch.py``), the config validation and ``--help``
(``aepo_jax/trainer/config.py``) all read this table; none of them tests a method's name.

Adding a method = one entry here + one loss function registered with
``@register_loss("name", required=...)`` in ``aepo_jax/losses/`` (``policy_gradient.py``, or a
module of its own imported by ``aepo_jax/losses/__init__.py``).

Every method samples ``rollout.n`` responses per prompt at ``rollout.temperature`` (1.0, the
paper's) for the GRPO term: the *main* rollout. AEPO and the ablations also draw a second,
*regulariser* rollout for ``algorithm.reg_prompt_fraction`` of the prompts:

| method        | regulariser rollout          | its rows in the batch                                      | loss           |
|---------------|------------------------------|------------------------------------------------------------|----------------|
| grpo          | -                            | -                                                          | grpo           |
| entropy_reg   | -                            | -                                                          | entropy_reg    |
| entropy_adv   | -                            | -                                                          | entropy_adv    |
| reinforce     | -                            | - (main rows: advantage = reward)                          | reinforce      |
| clip_cov      | -                            | -                                                          | clip_cov       |
| kl_cov        | -                            | -                                                          | kl_cov         |
| aepo, paper   | controller's T               | positives (R > 0), up to the budget, appended, advantage R | aepo           |
| aepo, mix     | controller's T               | positives (group advantage > 0.05) REPLACE the first k main rows, advantage 1 | grpo |
| ablation_eq2  | T = 1 (Eq. 2)                | positives, up to the budget, appended, advantage R         | ablation_eq2   |
| ablation_eq3  | controller's T               | samples with a non-zero GRPO advantage, up to the budget, appended with it (Eq. 3) | ablation_eq3 |

This module imports only the standard library: config validation reads it before jax starts.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

__all__ = ["MethodSpec", "METHODS", "READINGS", "method_spec", "method_help"]

# Values of the fields below (validated in MethodSpec.__post_init__).
ADVANTAGES = ("grpo", "reward")
REG_ROLLOUTS = ("none", "controller", "t1")
REG_ROWS = ("none", "positives", "informative", "replace")
POSITIVE_RULES = ("reward", "group_adv")
READINGS = ("paper", "mix")


@dataclass(frozen=True)
class MethodSpec:
    """One RL method.

    name: the ``algorithm.method`` value.
    summary: one line for ``--help`` and the docs.
    loss: the registered loss (``aepo_jax.losses.LOSSES``) that trains on the batch.
    advantage: advantage of the main rollout's rows: ``grpo`` (group-normalised, Eq. 1) or
      ``reward`` (the reward itself: plain REINFORCE).
    reg_rollout: the second rollout: ``none``; ``controller`` (at the temperature AEPO's controller
      picks from the policy's entropy); ``t1`` (at T = 1, i.e. from pi_old itself: Eq. 2).
    reg_rows: which of its samples enter the batch, at most the controller's budget of them:
      ``positives`` (reward > 0, appended as regulariser rows with advantage R);
      ``informative`` (non-zero GRPO advantage within their group, appended with that advantage:
      Eq. 3 keeps the negatives); ``replace`` (positives replace the first k main rows and train with
      advantage 1 in the plain GRPO loss: the authors' code); ``none``.
    positives: how positives are chosen (``entropy_control.select_positives``): ``reward`` (the
      paper: R > 0, a random subset when there are more than the budget) or ``group_adv`` (the
      authors' code: GRPO advantage within the temperature group > 0.05, the first ones).
    entropy_grad: the loss differentiates the full-distribution entropy (Entropy-Reg).
    """

    name: str
    summary: str
    loss: str
    advantage: str = "grpo"
    reg_rollout: str = "none"
    reg_rows: str = "none"
    positives: str = "reward"
    entropy_grad: bool = False

    def __post_init__(self):
        for field, allowed in (("advantage", ADVANTAGES), ("reg_rollout", REG_ROLLOUTS),
                               ("reg_rows", REG_ROWS), ("positives", POSITIVE_RULES)):
            if getattr(self, field) not in allowed:
                raise ValueError(f"MethodSpec {self.name!r}: {field}={getattr(self, field)!r} is not one of {allowed}")
        if (self.reg_rollout == "none") != (self.reg_rows == "none"):
            raise ValueError(f"MethodSpec {self.name!r}: reg_rollout and reg_rows must both be 'none' or neither")

    @property
    def uses_reg_rollout(self) -> bool:
        return self.reg_rollout != "none"

    @property
    def appends_reg_rows(self) -> bool:
        """Regulariser rows are appended to the main rows (and need slots in every mini-batch)."""
        return self.reg_rows in ("positives", "informative")


_TABLE = (
    MethodSpec("aepo", "GRPO + alpha * REINFORCE on positive samples at the controller's temperature (Eq. 1)",
               loss="aepo", reg_rollout="controller", reg_rows="positives"),
    MethodSpec("grpo", "clipped GRPO surrogate, no KL (Eq. 1's J_GRPO)", loss="grpo"),
    MethodSpec("entropy_reg", "GRPO - lambda * full-distribution entropy (entropy term differentiated)",
               loss="entropy_reg", entropy_grad=True),
    MethodSpec("entropy_adv", "GRPO with entropy-shaped advantages A + min(beta * sg(H), |A| / kappa)",
               loss="entropy_adv"),
    MethodSpec("ablation_eq2", "AEPO's REINFORCE term on positives sampled at T = 1 (Table 3, Eq. 2)",
               loss="ablation_eq2", reg_rollout="t1", reg_rows="positives"),
    MethodSpec("ablation_eq3", "temperature samples with their GRPO advantages, negatives kept (Table 3, Eq. 3)",
               loss="ablation_eq3", reg_rollout="controller", reg_rows="informative"),
    MethodSpec("reinforce", "plain REINFORCE: advantage = reward, no clipping", loss="reinforce", advantage="reward"),
    MethodSpec("clip_cov", "Clip-Cov (Cui et al. 2025, verl): clipped GRPO surrogate with a random share of "
               "high-covariance tokens detached", loss="clip_cov"),
    MethodSpec("kl_cov", "KL-Cov (Cui et al. 2025, verl): unclipped surrogate + |log ratio| penalty on the "
               "highest-covariance tokens", loss="kl_cov"),
)

METHODS: dict[str, MethodSpec] = {m.name: m for m in _TABLE}

# The authors' code ("mix" reading): positives by group advantage, and AEPO's positives replace
# GRPO rows of one ordinary clipped loss instead of forming a separate term.
_MIX: dict[str, MethodSpec] = {
    "aepo": dataclasses.replace(METHODS["aepo"], loss="grpo", reg_rows="replace", positives="group_adv",
                                summary="the authors' code: positives replace GRPO rows, advantage 1, GRPO loss"),
    "ablation_eq2": dataclasses.replace(METHODS["ablation_eq2"], positives="group_adv"),
}


def method_spec(method: str, reading: str = "paper") -> MethodSpec:
    """The spec of ``method`` under ``reading`` (``paper`` | ``mix``); ValueError names the bad value."""
    if method not in METHODS:
        raise ValueError(f"method {method!r} is not one of {list(METHODS)}")
    if reading not in READINGS:
        raise ValueError(f"reading {reading!r} is not one of {list(READINGS)}")
    return _MIX.get(method, METHODS[method]) if reading == "mix" else METHODS[method]


def method_help() -> str:
    """``name (summary) | ...``: the help text of ``algorithm.method``."""
    return " | ".join(f"{m.name}: {m.summary}" for m in _TABLE)
