"""Target distributions: how AEPO's regularising samples are drawn for each controlled statistic.

Section 7 of the paper: temperature is only one way to build the target distribution pi*. Whenever
a transformed distribution with a wanted property can be drawn from the current policy, REINFORCE
on its positive samples moves the policy toward that property. A :class:`TargetDistribution` is one
such construction, for one statistic (``algorithm.controller.signal``):

* ``measure(main)``: the statistic on the step's T = 1 rollout (a :class:`~aepo_jax.trainer.batch.Batch`),
  in the target's unit (None when it is measured elsewhere, as the entropy is by the learner's
  forward pass, or cannot be measured this step);
* ``sampling(decision, signal, temperature, max_new_tokens)``: temperature and token budget of the
  regulariser rollout for the controller's decision (raise or lower);
* ``select(reg, decision, signal, budget, rng)``: which of its samples are the positives, at most
  ``budget``.

The controller (:class:`aepo_jax.entropy_control.EntropyController`) is the same for every signal:
raise when the signal is below the target, else lower. ``docs/targets.md`` has a worked example of
a new target distribution.

Entropy (the paper): T_high / T_low from the decision, the positives are the correct samples
(a random subset when there are more than the budget). The trainer keeps its original code path for
it (:func:`aepo_jax.trainer.batch.select_reg_rows`), so entropy runs are unchanged.

Length: the mean token count of the correct responses. The regulariser rollout is drawn at the
rollout's own temperature and budget; its positives are the correct samples that are shorter
(lowering) or longer (raising) than the mean correct length *of their own prompt's* samples, the
most extreme first. Why per prompt: how long a correct answer must be depends on the question
(here, on the number of hops). Compared with one global length, the short correct samples would
mostly be the easy questions' and the long ones the hard questions', and the policy would learn to
solve some questions rather than to answer each one more briefly or at more length; a tighter token
budget (one per call, for every prompt) has the same bias, so it is not used. Prompts with fewer
than two correct samples have no contrast and give no positive.

Truncated samples never count: they did not stop, so they teach nothing about where to stop.
On the built-in task a correct answer's length is fixed by its question up to a token or two, so
there is little to choose from; its length variant (``data.toy_variant=length``,
``configs/toy_length.yaml``) lets correct answers differ by up to 32 filler words, and there both
0.7 x and 1.3 x the base's length are held (``docs/targets.md``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from aepo_jax.entropy_control import Decision

__all__ = ["TargetDistribution", "EntropyTarget", "LengthTarget", "TARGETS", "correct_length_mean", "target_for"]


def correct_length_mean(lengths: np.ndarray, rewards: np.ndarray) -> float | None:
    """Mean response tokens of the correct (reward > 0) responses; None when there are none."""
    lengths, rewards = np.asarray(lengths, np.float64), np.asarray(rewards, np.float64)
    ok = rewards > 0
    return float(lengths[ok].mean()) if ok.any() else None


@dataclass(frozen=True)
class TargetDistribution:
    """Base: the statistic ``name`` in ``unit``; subclasses define the three steps."""

    name: str = ""
    unit: str = ""

    def measure(self, main) -> float | None:
        raise NotImplementedError

    def sampling(self, decision: Decision, signal: float | None, temperature: float,
                 max_new_tokens: int) -> tuple[float, int]:
        raise NotImplementedError

    def select(self, reg, decision: Decision, signal: float | None, budget: int,
               rng: np.random.Generator) -> np.ndarray:
        raise NotImplementedError


@dataclass(frozen=True)
class EntropyTarget(TargetDistribution):
    """The paper's: temperature T_high / T_low, every correct sample a positive."""

    name: str = "entropy"
    unit: str = "nats/token"

    def measure(self, main):
        return None  # from the learner's log-probs (aepo_jax/train.py), not from the rollout alone

    def sampling(self, decision, signal, temperature, max_new_tokens):
        return decision.temperature, max_new_tokens

    def select(self, reg, decision, signal, budget, rng):
        idx = np.flatnonzero(reg.rewards > 0)
        return np.sort(rng.permutation(idx)[:budget])


@dataclass(frozen=True)
class LengthTarget(TargetDistribution):
    """Shorter or longer correct responses at the rollout's own temperature (see the module doc)."""

    name: str = "length"
    unit: str = "tokens"

    def measure(self, main):
        return correct_length_mean(main.mask.sum(axis=1), main.rewards)

    def sampling(self, decision, signal, temperature, max_new_tokens):
        return temperature, max_new_tokens

    def select(self, reg, decision, signal, budget, rng):
        lengths = reg.mask.sum(axis=1).astype(np.float64)
        ok = (reg.rewards > 0) & ~np.asarray(reg.truncated, bool)
        if decision.mode == "idle" or budget <= 0:
            return np.zeros(0, np.int64)
        rel = np.zeros_like(lengths)  # length - the mean correct length of the same prompt's samples
        for g in np.unique(reg.group):
            own = ok & (reg.group == g)
            if own.sum() >= 2:  # one correct sample has nothing to be shorter or longer than
                rel[own] = lengths[own] - lengths[own].mean()
        if decision.mode == "lower":
            ok &= rel < 0
            key = rel  # the most below its prompt's mean first
        else:
            ok &= rel > 0
            key = -rel
        idx = np.flatnonzero(ok)
        # ties broken at random, so equal-length samples of different prompts share the budget
        order = np.lexsort((rng.random(len(idx)), key[idx]))
        return np.sort(idx[order[:budget]])


TARGETS: dict[str, TargetDistribution] = {t.name: t for t in (EntropyTarget(), LengthTarget())}


def target_for(signal: str) -> TargetDistribution:
    if signal not in TARGETS:
        raise ValueError(f"controller signal {signal!r} is not one of {list(TARGETS)}")
    return TARGETS[signal]


def reg_rows_by_target(target: TargetDistribution, spec, reg, decision: Decision, signal: float | None,
                       rng: np.random.Generator):
    """The regulariser rows ``spec`` trains on, chosen by ``target`` (like
    :func:`aepo_jax.trainer.batch.select_reg_rows` for the entropy target): positives with advantage R
    (``reg_rows=positives``) or 1 (``replace``, the authors' reading); returns them and the metrics."""
    import dataclasses

    from aepo_jax.trainer.batch import take

    if spec.reg_rows not in ("positives", "replace"):
        raise ValueError(f"method {spec.name!r}: the {target.name!r} target needs positive regulariser rows, "
                         f"not {spec.reg_rows!r}")
    everything = Decision(decision.step, decision.temperature, reg.num_rows, decision.target, decision.entropy,
                          decision.mode)
    available = len(target.select(reg, everything, signal, reg.num_rows, rng))
    idx = target.select(reg, decision, signal, decision.budget, rng)
    weights = reg.rewards[idx] if spec.reg_rows == "positives" else np.ones(len(idx), np.float32)
    rows = dataclasses.replace(take(reg, idx), advantages=np.asarray(weights, np.float32),
                               is_reg=np.full(len(idx), spec.appends_reg_rows))
    return rows, {"aepo/positives_available": float(available), "aepo/positives_used": float(len(idx))}
