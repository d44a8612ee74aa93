"""The step's batch: one immutable pytree from the scored rollouts to the loss.

A :class:`Batch` holds packed token arrays and per-row data for a set of samples. The stages are
functions from one ``Batch`` to the next (host-side NumPy; the heavy math is in the jitted learner):

    pack(...)              scored rollout -> Batch (advantages 0, no old log-probs yet)
    select_reg_rows(...)   the regulariser rollout's rows the method trains on, with their advantages
    (stages.old_logp)      the learner's log pi_old and entropy at T = 1, set with dataclasses.replace
    assemble(...)          main rows with their advantages + the selected rows: the training batch
    split_minibatches(...) fixed-shape mini-batches (padding rows have an all-zero mask)

Which rows and advantages a method uses comes from its :class:`aepo_jax.methods.MethodSpec`.
Field names are the loss's (``aepo_jax.losses.policy_loss``): ``mask``, ``old_logp``,
``advantages``, ``rewards``, ``is_reg``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import jax
import numpy as np

from aepo_jax.advantages import grpo_advantages_by_id
from aepo_jax.entropy_control import select_positives
from aepo_jax.methods import MethodSpec


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class Batch:
    """Rows: [N]; tokens: [N, P + R] (prompt left-padded to P, response right-padded to R); [N, R]."""

    input_ids: np.ndarray        # int32 [N, P + R]
    attention_mask: np.ndarray   # int32 [N, P + R]
    position_ids: np.ndarray     # int32 [N, P + R]
    mask: np.ndarray             # float32 [N, R]: 1 on real response tokens
    rewards: np.ndarray          # float32 [N]: the reward of the response
    advantages: np.ndarray       # float32 [N]: the advantage the loss uses (0 until assembled)
    is_reg: np.ndarray           # bool [N]: the row belongs to the regulariser term
    main_rollout: np.ndarray     # bool [N]: sampled by the step's main rollout (the entropy signal's rows)
    group: np.ndarray            # int32 [N]: prompt index within the step (GRPO group)
    truncated: np.ndarray        # bool [N]: stopped by max_new_tokens
    old_logp: np.ndarray | None = None  # float32 [N, R]: log pi_old at T = 1; None = not computed
    entropy: np.ndarray | None = None   # float32 [N, R]: full entropy of pi_old at T = 1; None = not computed

    @property
    def num_rows(self) -> int:
        return int(self.rewards.shape[0])


def pack(prompts: list, outputs: list, rewards, group, truncated, *, main_rollout: bool,
         prompt_len: int, response_len: int, pad_id: int) -> Batch:
    """Pack a scored rollout (token lists per row) into a :class:`Batch`."""
    n = len(outputs)
    ids = np.full((n, prompt_len + response_len), pad_id, np.int32)
    attn = np.zeros_like(ids)
    mask = np.zeros((n, response_len), np.float32)
    for i, (p, o) in enumerate(zip(prompts, outputs)):
        o = o[:response_len]
        if len(p) > prompt_len:
            raise ValueError(f"row {i}: prompt of {len(p)} tokens exceeds the packed prompt length {prompt_len}")
        ids[i, prompt_len - len(p) : prompt_len] = p
        attn[i, prompt_len - len(p) : prompt_len] = 1
        ids[i, prompt_len : prompt_len + len(o)] = o
        attn[i, prompt_len : prompt_len + len(o)] = 1
        mask[i, : len(o)] = 1.0
    pos = np.maximum(np.cumsum(attn, axis=1) - 1, 0).astype(np.int32)
    return Batch(ids, attn, pos, mask, np.asarray(rewards, np.float32), np.zeros(n, np.float32),
                 np.zeros(n, bool), np.full(n, bool(main_rollout)), np.asarray(group, np.int32),
                 np.asarray(truncated, bool))


def take(b: Batch, idx) -> Batch:
    return jax.tree.map(lambda x: x[idx], b)


def concat(parts: list[Batch]) -> Batch:
    return jax.tree.map(lambda *xs: np.concatenate(xs, axis=0), *parts)


def pad_rows(b: Batch, n_total: int, pad_id: int, *, is_reg: bool) -> Batch:
    """Grow to ``n_total`` rows with padding rows (all-zero mask: they count nowhere in the loss)."""
    k = n_total - b.num_rows
    if k < 0:
        raise ValueError(f"{b.num_rows} rows do not fit in {n_total}")
    if k == 0:
        return b
    fill = {"input_ids": pad_id, "is_reg": is_reg}

    def grow(path, x):
        name = path[0].name
        return np.concatenate([x, np.full((k,) + x.shape[1:], fill.get(name, 0), x.dtype)])

    return jax.tree_util.tree_map_with_path(grow, b)


def group_advantages(rewards: np.ndarray, group_ids: np.ndarray) -> np.ndarray:
    """GRPO advantages (``aepo_jax.advantages``) of samples grouped by prompt, as host float32."""
    ids = np.asarray(group_ids, np.int32)
    return np.asarray(grpo_advantages_by_id(np.asarray(rewards, np.float32), ids, int(ids.max()) + 1), np.float32)


def select_reg_rows(spec: MethodSpec, reg: Batch, budget: int, rng: np.random.Generator) -> tuple[Batch, dict]:
    """The regulariser rollout's rows that ``spec`` trains on (at most ``budget``), with their
    advantages; returns them and the selection metrics."""
    r = reg.rewards
    if spec.reg_rows == "informative":
        # Eq. (3): temperature samples weighted by their GRPO advantage, negatives kept. Rows with
        # zero advantage carry no gradient, so the budget is spent on the informative ones.
        adv = group_advantages(r, reg.group)
        available = float(np.sum(adv > 0))
        idx = np.nonzero(adv != 0)[0]
        if len(idx) > budget:
            idx = np.sort(rng.choice(idx, size=budget, replace=False))
        weights = adv[idx]
    elif spec.reg_rows in ("positives", "replace"):
        if spec.positives == "group_adv":
            available = float(len(select_positives(r, len(r), rule="group_adv", group_ids=reg.group)))
            idx = select_positives(r, budget, rule="group_adv", group_ids=reg.group)
        else:
            # (the count draws from rng too, as it always has: a run's positives stay the same)
            available = float(len(select_positives(r, len(r), rule="reward", rng=rng)))
            idx = select_positives(r, budget, rule="reward", rng=rng)
        # REINFORCE on a positive: advantage R (1 with binary rewards); mix: advantage 1 in the GRPO loss.
        weights = r[idx] if spec.reg_rows == "positives" else np.ones(len(idx), np.float32)
    else:
        raise ValueError(f"method {spec.name!r} has no regulariser rows")
    rows = take(reg, idx)
    rows = dataclasses.replace(rows, advantages=np.asarray(weights, np.float32),
                               is_reg=np.full(len(idx), spec.appends_reg_rows))
    return rows, {"aepo/positives_available": available, "aepo/positives_used": float(len(idx))}


def assemble(spec: MethodSpec, main: Batch, reg: Batch | None) -> Batch:
    """The training batch: the main rows with ``spec``'s advantage, plus the selected regulariser
    rows (appended; or, for ``replace``, in place of the first k main rows)."""
    adv = main.rewards.copy() if spec.advantage == "reward" else group_advantages(main.rewards, main.group)
    main = dataclasses.replace(main, advantages=adv)
    if reg is None or reg.num_rows == 0:
        return main
    if spec.reg_rows == "replace":
        k = min(reg.num_rows, main.num_rows)
        return concat([take(reg, np.arange(k)), take(main, np.arange(k, main.num_rows))])
    return concat([main, reg])


def split_minibatches(b: Batch, num_minibatches: int, reg_rows_cap: int, pad_id: int,
                      rng: np.random.Generator) -> list[Batch]:
    """Shuffle and split into ``num_minibatches`` mini-batches of one fixed shape.

    Main rows are dealt evenly; regulariser rows are dealt evenly too and padded to
    ``reg_rows_cap`` per mini-batch, so every update has the same shapes and compiles once, whatever
    the number of positives this step. The caller sizes the cap (the budget's share, rounded to the
    data axis and micro-batches).
    """
    main_idx = np.nonzero(~b.is_reg)[0]
    reg_idx = np.nonzero(b.is_reg)[0]
    rng.shuffle(main_idx)
    rng.shuffle(reg_idx)
    if len(main_idx) % num_minibatches:
        raise ValueError(f"{len(main_idx)} GRPO rows do not split into {num_minibatches} mini-batches")
    if len(reg_idx) > reg_rows_cap * num_minibatches:
        raise ValueError(f"{len(reg_idx)} regulariser rows exceed {num_minibatches} x {reg_rows_cap} slots")
    per = len(main_idx) // num_minibatches
    reg_chunks = np.array_split(reg_idx, num_minibatches)
    out = []
    for m in range(num_minibatches):
        mb = take(b, main_idx[m * per : (m + 1) * per])
        if reg_rows_cap:
            mb = concat([mb, pad_rows(take(b, reg_chunks[m]), reg_rows_cap, pad_id, is_reg=True)])
        out.append(mb)
    return out


def response_means(values: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Per-row token mean of ``values`` over the response (rows without tokens dropped)."""
    lens = mask.sum(axis=1)
    keep = lens > 0
    return (values * mask).sum(axis=1)[keep] / lens[keep]
