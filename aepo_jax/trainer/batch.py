"""From rollouts to training arrays: token packing, AEPO's sample selection, mini-batches.

Everything here is host-side NumPy on small per-sample records; the heavy math is in the jitted
learner (``aepo_jax/trainer/learner.py``). The methods differ only in which rows go into the batch
and with which weights, so a new method is a new branch of :func:`build_rows`, not a new trainer:

| method        | GRPO rows (T = 1 rollout)        | regulariser rows (is_reg, second rollout)           |
|---------------|-----------------------------------|------------------------------------------------------|
| grpo          | group-normalised advantages       | -                                                    |
| entropy_reg   | same (+ entropy bonus in the loss)| -                                                    |
| entropy_adv   | same (advantage shaping in loss)  | -                                                    |
| reinforce     | advantage = reward                | -                                                    |
| aepo, paper   | group-normalised advantages       | positives (R = 1) of the T-rollout, up to the budget |
| aepo, mix     | the first k rows are REPLACED by the k positives (advantage 1), as the authors' code |
| ablation_eq2  | group-normalised advantages       | positives of a second rollout at T = 1 (Eq. 2)       |
| ablation_eq3  | group-normalised advantages       | T-rollout samples with their GRPO advantages (Eq. 3) |
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from aepo_jax.advantages import grpo_advantages_by_id
from aepo_jax.entropy_control import select_positives

REG_METHODS = ("aepo", "ablation_eq2", "ablation_eq3")


@dataclass
class Rollout:
    """One sampled response and what we know about it (host side)."""

    prompt_index: int          # index of the prompt within the step (its GRPO group)
    prompt_ids: list[int]
    output_ids: list[int]
    finish_reason: str         # "stop" | "length" | "abort"
    temperature: float
    reward: float = 0.0
    text: str = ""
    old_logp: np.ndarray | None = None   # [len(output_ids)] log pi_old at T = 1 (learner's)
    entropy: np.ndarray | None = None    # [len(output_ids)] full-distribution entropy at T = 1


def group_advantages(rewards: np.ndarray, group_ids: np.ndarray) -> np.ndarray:
    """GRPO advantages of the step's samples (``aepo_jax.advantages``), as host float32."""
    ids = np.asarray(group_ids, np.int32)
    return np.asarray(grpo_advantages_by_id(np.asarray(rewards, np.float32), ids, int(ids.max()) + 1), np.float32)


def _positives(rewards: np.ndarray, group_ids: np.ndarray, budget: int, rng: np.random.Generator, reading: str):
    """The temperature samples that enter the REINFORCE term: the paper's R = 1 (a random subset of
    ``budget`` when there are more), or the authors' group advantage > 0.05 (the first ``budget``)."""
    if reading == "mix":
        return select_positives(rewards, budget, rule="group_adv", group_ids=group_ids)
    return select_positives(rewards, budget, rule="reward", rng=rng)


@dataclass
class Rows:
    """The step's training rows before packing (parallel lists/arrays, one entry per row)."""

    rollouts: list[Rollout]
    advantages: np.ndarray     # [N] float32: GRPO advantage, reward (reinforce/REINFORCE rows), ...
    is_reg: np.ndarray         # [N] bool: row belongs to the regulariser term
    source: np.ndarray         # [N] int8: 0 = T = 1 rollout, 1 = temperature rollout (for metrics)


def build_rows(
    method: str,
    reading: str,
    grpo: list[Rollout],
    reg: list[Rollout],
    budget: int,
    rng: np.random.Generator,
) -> tuple[Rows, dict]:
    """Assemble the step's rows for ``method``; returns the rows and selection metrics."""
    g_rewards = np.array([r.reward for r in grpo], np.float32)
    g_ids = np.array([r.prompt_index for r in grpo])
    if method == "reinforce":
        g_adv = g_rewards.copy()
    else:
        g_adv = group_advantages(g_rewards, g_ids)
    stats = {"aepo/positives_available": 0.0, "aepo/positives_used": 0.0}
    if method not in REG_METHODS or not reg:
        n = len(grpo)
        return Rows(list(grpo), g_adv, np.zeros(n, bool), np.zeros(n, np.int8)), stats

    r_rewards = np.array([r.reward for r in reg], np.float32)
    r_ids = np.array([r.prompt_index for r in reg])
    if method == "ablation_eq3":
        # Eq. (3): temperature samples weighted by their GRPO advantage, negatives kept. Rows with
        # zero advantage carry no gradient, so the budget is spent on the informative ones.
        r_adv = group_advantages(r_rewards, r_ids)
        cand = np.nonzero(r_adv != 0)[0]
        stats["aepo/positives_available"] = float(np.sum(r_adv > 0))
        if len(cand) > budget:
            cand = np.sort(rng.choice(cand, size=budget, replace=False))
        chosen = [reg[i] for i in cand]
        weights = r_adv[cand]
    else:
        stats["aepo/positives_available"] = float(len(_positives(r_rewards, r_ids, len(reg), rng, reading)))
        pos = _positives(r_rewards, r_ids, budget, rng, reading)
        chosen = [reg[i] for i in pos]
        weights = np.ones(len(pos), np.float32)  # R = 1 for every kept positive
    stats["aepo/positives_used"] = float(len(chosen))
    k = len(chosen)

    if method == "aepo" and reading == "mix":
        # The authors' code: the k positives replace the first k GRPO samples and the mixed batch
        # goes through the ordinary clipped loss with advantage 1 on them (alpha is implicit).
        k = min(k, len(grpo))
        rollouts = chosen[:k] + list(grpo[k:])
        adv = np.concatenate([np.ones(k, np.float32), g_adv[k:]])
        source = np.concatenate([np.ones(k, np.int8), np.zeros(len(grpo) - k, np.int8)])
        return Rows(rollouts, adv, np.zeros(len(rollouts), bool), source), stats

    rollouts = list(grpo) + chosen
    adv = np.concatenate([g_adv, np.asarray(weights, np.float32)])
    is_reg = np.concatenate([np.zeros(len(grpo), bool), np.ones(len(chosen), bool)])
    source = is_reg.astype(np.int8)
    return Rows(rollouts, adv, is_reg, source), stats


@dataclass
class Packed:
    """Fixed-shape arrays for the learner. Rows: [N]; tokens: [N, P + R]; response: [N, R]."""

    input_ids: np.ndarray       # int32, prompt left-padded to P, response right-padded to R
    attention_mask: np.ndarray  # int32
    position_ids: np.ndarray    # int32
    response_mask: np.ndarray   # float32 [N, R], 1 on real response tokens
    old_logp: np.ndarray        # float32 [N, R] (0 where unknown / padding)
    advantages: np.ndarray      # float32 [N]
    rewards: np.ndarray         # float32 [N] (binary reward; the REINFORCE weight of reg rows)
    is_reg: np.ndarray          # bool [N]
    source: np.ndarray          # int8 [N]
    row_valid: np.ndarray       # bool [N] False on padding rows

    def arrays(self) -> dict[str, np.ndarray]:
        return dict(self.__dict__)


def pack(rows: Rows, prompt_len: int, response_len: int, pad_id: int) -> Packed:
    """Pack rows into fixed shapes; prompts left-padded (so responses start at column P)."""
    n = len(rows.rollouts)
    total = prompt_len + response_len
    ids = np.full((n, total), pad_id, np.int32)
    attn = np.zeros((n, total), np.int32)
    rmask = np.zeros((n, response_len), np.float32)
    old = np.zeros((n, response_len), np.float32)
    for i, r in enumerate(rows.rollouts):
        p, o = r.prompt_ids, r.output_ids[:response_len]
        if len(p) > prompt_len:
            raise ValueError(f"row {i}: prompt of {len(p)} tokens exceeds the packed prompt length {prompt_len}")
        ids[i, prompt_len - len(p) : prompt_len] = p
        attn[i, prompt_len - len(p) : prompt_len] = 1
        ids[i, prompt_len : prompt_len + len(o)] = o
        attn[i, prompt_len : prompt_len + len(o)] = 1
        rmask[i, : len(o)] = 1.0
        if r.old_logp is not None:
            old[i, : len(o)] = r.old_logp[: len(o)]
    pos = np.maximum(np.cumsum(attn, axis=1) - 1, 0).astype(np.int32)
    adv = np.asarray(rows.advantages, np.float32)
    rewards = np.where(rows.is_reg, adv, np.array([r.reward for r in rows.rollouts], np.float32))
    return Packed(ids, attn, pos, rmask, old, adv, rewards.astype(np.float32), rows.is_reg.copy(),
                  rows.source.copy(), np.ones(n, bool))


def _pad_rows(p: Packed, n_total: int, pad_id: int, *, is_reg: bool) -> Packed:
    n = p.input_ids.shape[0]
    if n == n_total:
        return p
    k = n_total - n

    def grow(a, fill):
        extra = np.full((k,) + a.shape[1:], fill, a.dtype)
        return np.concatenate([a, extra], axis=0)

    return Packed(
        grow(p.input_ids, pad_id), grow(p.attention_mask, 0), grow(p.position_ids, 0),
        grow(p.response_mask, 0.0), grow(p.old_logp, 0.0), grow(p.advantages, 0.0), grow(p.rewards, 0.0),
        grow(p.is_reg, is_reg), grow(p.source, 1 if is_reg else 0), grow(p.row_valid, False),
    )


def _take(p: Packed, idx: np.ndarray) -> Packed:
    return Packed(**{k: v[idx] for k, v in p.arrays().items()})


def _concat(parts: list[Packed]) -> Packed:
    return Packed(**{k: np.concatenate([getattr(q, k) for q in parts], axis=0) for k in parts[0].arrays()})


def split_minibatches(
    packed: Packed, num_minibatches: int, reg_rows_cap: int, pad_id: int, rng: np.random.Generator
) -> list[Packed]:
    """Shuffle and split into ``num_minibatches`` mini-batches of one fixed shape.

    GRPO rows are dealt evenly; regulariser rows are dealt evenly too and padded to
    ``reg_rows_cap`` per mini-batch, so every update has the same shapes and compiles once, whatever
    the number of positives this step. Padding rows have an all-zero mask and count nowhere in the
    loss. The caller sizes the cap (the budget's share, rounded to the data axis and micro-batches).
    """
    main_idx = np.nonzero(~packed.is_reg)[0]
    reg_idx = np.nonzero(packed.is_reg)[0]
    rng.shuffle(main_idx)
    rng.shuffle(reg_idx)
    if len(main_idx) % num_minibatches:
        raise ValueError(f"{len(main_idx)} GRPO rows do not split into {num_minibatches} mini-batches")
    main_per = len(main_idx) // num_minibatches
    reg_chunks = np.array_split(reg_idx, num_minibatches)
    if len(reg_idx) > reg_rows_cap * num_minibatches:
        raise ValueError(f"{len(reg_idx)} regulariser rows exceed {num_minibatches} x {reg_rows_cap} slots")
    out = []
    for m in range(num_minibatches):
        main = _take(packed, main_idx[m * main_per : (m + 1) * main_per])
        if reg_rows_cap:
            reg = _pad_rows(_take(packed, reg_chunks[m]), reg_rows_cap, pad_id, is_reg=True)
            out.append(_concat([main, reg]))
        else:
            out.append(main)
    return out
