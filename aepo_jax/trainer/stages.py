"""The stages of one RL step, each a function of the previous stage's output.

``aepo_jax/train.py`` (``Trainer.train_step``) calls them in order; each adds its metrics to the
step's dict ``m`` and times itself as ``timing_s/<stage>``:

    rollout      prompts -> samples (process 0, the servers) -> scored Batch on every process
    old_logp     Batch -> Batch with the learner's log pi_old and entropy at T = 1 (off-policy)
    control      main Batch -> the controller's Decision (T, positive budget)
    reg_rollout  Decision -> the method's second rollout, the rows it keeps (Batch | None)
    update       assembled Batch -> epochs x mini-batches of the jitted update
    observe      the update's entropy -> the controller (on-policy) and the ``entropy`` metric

The fixed shapes every stage shares (prompt and response length, mini-batch rows) are one
:class:`Geometry`, computed once per run by :func:`geometry`.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace

import numpy as np

from aepo_jax.entropy_control import Decision, EntropyController, least_squares_slope
from aepo_jax.methods import MethodSpec
from aepo_jax.rewards import RewardPool
from aepo_jax.trainer import distributed
from aepo_jax.trainer.batch import Batch, response_means, select_reg_rows, split_minibatches
from aepo_jax.trainer.config import RunConfig
from aepo_jax.trainer.learner import Learner
from aepo_jax.trainer.metrics import Timer
from aepo_jax.trainer.rollouts import Rollouts, score
from aepo_jax.trainer.targets import TargetDistribution, correct_length_mean, reg_rows_by_target

log = logging.getLogger("aepo_jax.train")


@dataclass(frozen=True)
class Geometry:
    """The run's fixed batch shapes (each jitted function compiles once)."""

    prompt_len: int        # P: the longest prompt (not rounded up: every padding column costs a forward and backward)
    response_len: int      # R: rollout.max_new_tokens
    pad_id: int
    num_minibatches: int   # optimiser updates per epoch
    reg_cap: int           # padded slot for appended regulariser rows in each mini-batch
    micro_batches: int     # micro-batches scanned inside one update
    logprob_rows: int      # rows per call of the log-prob forward pass


def geometry(cfg: RunConfig, spec: MethodSpec, *, data_size: int, longest_prompt: int, pad_id: int) -> Geometry:
    """Mini-batch rows = main rows + a padded slot for the appended regulariser rows, rounded to
    whole micro-batches (or to the mesh's data axis without micro-batching)."""
    c = cfg.algorithm.controller
    num_minibatches = cfg.data.prompts_per_step // (cfg.train.mini_batch_prompts or cfg.data.prompts_per_step)
    main_rows = cfg.data.prompts_per_step * cfg.rollout.n // num_minibatches
    cap = math.ceil(max(c.budget_up, c.budget_down) / num_minibatches) if spec.appends_reg_rows else 0
    mbs = cfg.train.micro_batch_size
    if mbs:
        micro = math.ceil((main_rows + cap) / mbs)
        rows = micro * mbs
    else:
        micro = 1
        rows = main_rows + cap
        rows += (-rows) % data_size
    return Geometry(prompt_len=int(longest_prompt), response_len=cfg.rollout.max_new_tokens,
                    pad_id=pad_id, num_minibatches=num_minibatches, reg_cap=rows - main_rows,
                    micro_batches=micro, logprob_rows=mbs or main_rows)


def prefix_slots(cfg: RunConfig, *, data_size: int) -> int:
    """Distinct prompt prefixes one learner call can meet (0 = the shared-prefix pass is off): the
    step's prompts (every rollout of a step samples from them) and the padding rows' empty prompt.
    ``auto`` turns it on with one data shard: the prefixes are computed on every device, so with
    D shards each device would redo the prefixes of the others' rows."""
    mode = cfg.model.shared_prefix
    if mode == "off" or (mode == "auto" and data_size > 1):
        return 0
    return cfg.data.prompts_per_step + 1


def rollout_calls(cfg: RunConfig, spec: MethodSpec) -> list[tuple[int, int]]:
    """(prompts, samples per prompt) of every rollout a step draws: the main one and, for methods
    with one, the temperature rollout (:func:`reg_rollout`); the shapes the servers are warmed with."""
    p = cfg.data.prompts_per_step
    return [(p, cfg.rollout.n)] + ([_reg_call(cfg, p)] if spec.uses_reg_rollout else [])


def _reg_call(cfg: RunConfig, num_prompts: int) -> tuple[int, int]:
    """(prompts, samples per prompt) of the temperature rollout of a step with ``num_prompts``."""
    a = cfg.algorithm
    return max(1, math.ceil(a.reg_prompt_fraction * num_prompts)), a.reg_samples_per_prompt or cfg.rollout.n


def step_seed(base: int, step: int, phase: int) -> int:
    """Seed of one rollout call: distinct per (run seed, step, phase), the same on a resume."""
    return (int(base) * 1_000_003 + int(step) * 7 + int(phase)) & ((1 << 62) - 1)


def _mean(xs) -> float:
    xs = list(xs)
    return float(sum(xs) / len(xs)) if xs else 0.0


def rollout_metrics(b: Batch, prefix: str) -> dict:
    lens = b.mask.sum(axis=1)
    return {
        f"{prefix}/reward_mean": float(b.rewards.mean()),
        f"{prefix}/accuracy": float((b.rewards > 0.5).mean()),
        f"{prefix}/response_length_mean": float(lens.mean()),
        f"{prefix}/response_length_max": float(lens.max()),
        # the length controller's signal; NaN (null in metrics.jsonl) when nothing is correct
        f"{prefix}/correct_length_mean": correct_length_mean(lens, b.rewards) or float("nan"),
        f"{prefix}/truncation_rate": float(b.truncated.mean()),
        f"{prefix}/num_samples": float(b.num_rows),
    }


def policy_entropy(b: Batch) -> tuple[float, float]:
    """The policy's entropy on a rollout with old log-probs (Section 3.2's H): per-response token
    means, then the mean over responses; (full-distribution, sampled -log pi) estimators."""
    return float(_mean(response_means(b.entropy, b.mask))), float(_mean(response_means(-b.old_logp, b.mask)))


def entropy_stderr(b: Batch) -> float:
    """Standard error of :func:`policy_entropy`'s full-distribution estimate, clustered by prompt
    (the responses to one prompt are not independent): the standard deviation of the per-prompt
    means over the square root of the number of prompts. NaN with fewer than two prompts."""
    lens = b.mask.sum(axis=1)
    keep = lens > 0
    per_row = response_means(b.entropy, b.mask)
    groups = b.group[keep]
    means = np.array([per_row[groups == g].mean() for g in np.unique(groups)])
    return float(means.std(ddof=1) / math.sqrt(len(means))) if len(means) > 1 else float("nan")


def rollout(examples: list, n: int, temperature: float, seed: int, stage: str, m: dict, *,
            rollouts: Rollouts | None, reward_pool: RewardPool | None, tokenizer, geo: Geometry,
            max_new_tokens: int | None = None) -> Batch:
    """Samples and their rewards (process 0), packed; the same Batch on every process."""
    if distributed.is_main_process():
        with Timer(stage, m):
            samples = rollouts.generate([list(e.prompt_ids) for e in examples], n, temperature, seed, max_new_tokens)
        with Timer("reward" if stage == "rollout" else f"{stage}_reward", m):
            payload = score(samples, examples, reward_pool, tokenizer, main_rollout=stage == "rollout",
                            prompt_len=geo.prompt_len, response_len=geo.response_len, pad_id=geo.pad_id)
    else:
        payload = None
    # Rollouts are drawn by process 0 only: its Batch on every process.
    batch, stats = payload if distributed.process_count() == 1 else distributed.broadcast_object(payload)
    for k, v in stats.items():
        m[k] = m.get(k, 0.0) + v
    m.update(rollout_metrics(batch, stage))
    if stage == "rollout":
        m["reward_mean"] = m["rollout/reward_mean"]
    return batch


def old_logp(batch: Batch | None, m: dict, *, learner: Learner, geo: Geometry, reuse: bool) -> Batch | None:
    """The learner's log pi_old and entropy at T = 1 of every row (skipped when the update is
    on-policy, ``reuse``: it then uses sg(log pi) of its own forward pass)."""
    if batch is None or reuse or batch.num_rows == 0:
        return batch
    with Timer("old_logp", m):
        logp, entropy = learner.logprobs(batch, rows_per_call=geo.logprob_rows)
    return replace(batch, old_logp=logp, entropy=entropy)


def control(main: Batch, step: int, m: dict, *, controller: EntropyController, learner: Learner,
            geo: Geometry, measure: bool, target: TargetDistribution) -> Decision:
    """AEPO's decision for this step: T and the positive budget from the policy's entropy (or from
    ``target``'s statistic, measured on this step's rollout before the decision: no lag).

    ``measure``: the signal is this step's rollout, measured before the controller decides (the
    paper; from the recomputed old log-probs, or a forward pass over the main rows). Otherwise it
    is the previous update's forward pass on the previous step's rollout (one update behind, as
    in the authors' code; :func:`observe`).
    """
    if measure:
        if main.old_logp is None:
            with Timer("entropy", m):
                logp, entropy = learner.logprobs(main, rows_per_call=geo.logprob_rows)
            main = replace(main, old_logp=logp, entropy=entropy)
        h_full, h_nll = policy_entropy(main)
        controller.observe(entropy_full=h_full, entropy_sampled=h_nll)
        m["policy/entropy_full"], m["policy/entropy_nll"] = h_full, h_nll
        # how noisy the controller's reading is, to compare with the +-10% band around the target
        m["policy/entropy_full_stderr"] = entropy_stderr(main)
    if target.name != "entropy":
        value = target.measure(main)
        if value is not None:  # e.g. no correct response this step: keep the last value
            controller.observe(**{target.name: value})
    decision = controller.decide(step)
    m["aepo/budget"] = float(decision.budget)
    m["aepo/raising"] = 1.0 if decision.mode == "raise" else 0.0
    m["control/target"] = decision.target
    m["control/side"] = {"raise": 1.0, "lower": -1.0}.get(decision.mode, 0.0)
    if target.name == "entropy":  # these keys are the entropy's; other signals have control/*
        m["entropy_target"] = decision.target
        if decision.entropy is not None:
            m["aepo/entropy_signal"] = decision.entropy
    if decision.entropy is not None and decision.target > 0:  # > 0 also rules out a NaN target
        m["control/relative_error"] = (decision.entropy - decision.target) / decision.target
    if controller.config.budget_mode in ("pi", "pid"):
        m["aepo/integral"] = controller.state.integral
    if controller.config.budget_mode == "pid":  # the error's slope per step, the derivative term's input
        m["control/error_slope"] = least_squares_slope(controller.state.errors)
        m["aepo/reached"] = 1.0 if controller.state.reached else 0.0  # 0: the paper's rule, 1: PID
    return decision


def reg_rollout(examples: list, decision: Decision, seed: int, m: dict, *, cfg: RunConfig, spec: MethodSpec,
                draw, target: TargetDistribution, controller: EntropyController) -> Batch | None:
    """The method's second rollout and the rows of it the batch keeps (None without one).
    ``draw(examples, n, temperature, seed, stage, m, max_new_tokens)`` is the :func:`rollout` stage.
    For the entropy target, T from the decision and every positive (the paper); for another
    target, its own sampling and selection (:mod:`aepo_jax.trainer.targets`)."""
    temperature = 1.0 if spec.reg_rollout in ("none", "t1") else decision.temperature
    max_new_tokens = cfg.rollout.max_new_tokens
    signal = None if target.name == "entropy" else controller.signal()
    if target.name != "entropy" and spec.reg_rollout == "controller":
        temperature, max_new_tokens = target.sampling(decision, signal, cfg.rollout.temperature, max_new_tokens)
        m["aepo/reg_max_new_tokens"] = float(max_new_tokens)
    m["temperature"] = temperature
    if not spec.uses_reg_rollout:
        return None
    n_prompts, n = _reg_call(cfg, len(examples))
    reg = draw(examples[:n_prompts], n, temperature, seed, "reg_rollout", m, max_new_tokens)
    with Timer("batch", m):
        rng = np.random.default_rng([cfg.train.seed, decision.step, 2])
        if target.name == "entropy":
            rows, stats = select_reg_rows(spec, reg, decision.budget, rng)
        else:
            rows, stats = reg_rows_by_target(target, spec, reg, decision, signal, rng)
    m.update(stats)
    return rows


def update(batch: Batch, step: int, num_updates: int, m: dict, *, learner: Learner, geo: Geometry,
           epochs: int, seed: int) -> int:
    """Epochs x mini-batches of the jitted update, their metrics averaged into ``m``; returns the
    number of updates applied so far (a non-finite loss or gradient skips one)."""
    update_metrics = []
    with Timer("update", m):
        rng = np.random.default_rng([seed, step, 3])
        for _ in range(epochs):
            for mb in split_minibatches(batch, geo.num_minibatches, geo.reg_cap, geo.pad_id, rng):
                um = learner.update(mb, num_updates)
                if um["actor/update_skipped"] == 0.0:
                    num_updates += 1
                else:
                    log.warning("step %d: non-finite loss or gradient; update skipped", step + 1)
                update_metrics.append(um)
    for k in update_metrics[0]:
        vals = [u[k] for u in update_metrics]
        m[k] = float(np.sum(vals)) if k == "actor/update_skipped" else _mean(vals)
    m["optim/num_updates"] = float(num_updates)
    return num_updates


def observe(m: dict, *, controller: EntropyController, measured: bool, estimator: str,
            target: TargetDistribution) -> None:
    """``entropy``: the policy's entropy on this step's rollout, before the update (the controller's
    estimator). Unless ``measured`` by :func:`control`, it comes from the update's forward pass and
    feeds the next decision. ``control/signal``: the controlled statistic of this step's rollout."""
    if not measured:
        controller.observe(entropy_full=m["policy/entropy_full"], entropy_sampled=m["policy/entropy_nll"])
    m["entropy"] = m["policy/entropy_full"] if estimator == "full" else m["policy/entropy_nll"]
    m["control/signal"] = m["entropy"] if target.name == "entropy" else m[f"rollout/correct_{target.name}_mean"]
