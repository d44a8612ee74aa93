"""AEPO's entropy controller on a tabular policy: entropy held near three different targets.

A toy RLVR problem small enough to run in seconds: S prompts, each a softmax policy over A
answers of which a few (2..8) are correct (binary reward). Every step:

1. draw P prompts, G answers each at T = 1 from pi_old; measure the entropy of pi_old on them
   (full-distribution entropy, or the sampled estimator -log pi(o));
2. the controller picks T and the positive budget from that entropy and the target;
3. GRPO: group-normalised advantages, gradient sum_i A_i grad log pi(a_i) / (P G);
4. AEPO's REINFORCE term: G answers at temperature T for the first P/4 prompts, keep up to
   ``budget`` positives (R = 1), add alpha * sum grad log pi(a) / (P G) (``reg_norm="main"``);
5. gradient ascent on the logits.

GRPO alone collapses the entropy (rich-get-richer among the correct answers); the controller holds
it near the target. Prints a table and writes a PNG of entropy against step.

    python tools/entropy_control_demo.py --targets 0.4 0.8 1.2 --steps 500 --out entropy_control_demo.png
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from aepo_jax.entropy_control import ControllerConfig, EntropyController, TargetSchedule, select_positives  # noqa: E402


def _softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _entropy(p):
    return -np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0), -1)


def _sample(rng, p):
    """One draw per row of p (inverse CDF)."""
    c = np.cumsum(p, -1)
    u = rng.random((p.shape[0], 1)) * c[:, -1:]
    return np.minimum((u > c).sum(-1), p.shape[1] - 1)


def simulate(
    target: float | str | TargetSchedule | None,
    *,
    steps: int = 400,
    seed: int = 0,
    n_prompts: int = 64,
    n_actions: int = 16,
    batch_prompts: int = 32,
    group: int = 8,
    lr: float = 16.0,
    min_correct: int = 4,
    max_correct: int = 10,
    init_scale: float = 1.0,
    init_bonus: float = 2.0,
    alpha: float = 4.0,
    budget_raise: int = 48,
    budget_lower: int = 24,
    estimator: str = "full",
    dead_band: float = 0.0,
) -> list[dict]:
    """Run the toy problem; ``target=None`` runs plain GRPO. Returns one row of numbers per step."""
    rng = np.random.default_rng(seed)
    correct = np.zeros((n_prompts, n_actions), bool)
    for s in range(n_prompts):
        correct[s, rng.choice(n_actions, size=rng.integers(min_correct, max_correct + 1), replace=False)] = True
    # a "pre-trained" start: correct answers already favoured (accuracy about 0.5), spread out
    z = rng.normal(0.0, init_scale, size=(n_prompts, n_actions)) + init_bonus * correct
    ctl = None
    if target is not None:
        sched = target if isinstance(target, TargetSchedule) else TargetSchedule.parse(target)
        ctl = EntropyController(
            ControllerConfig(
                target=sched,
                budget_raise=budget_raise,
                budget_lower=budget_lower,
                estimator=estimator,
                dead_band=dead_band,
            )
        )
    n_main = batch_prompts * group
    rows = []
    for step in range(steps):
        prompts = rng.choice(n_prompts, size=batch_prompts, replace=False)
        p = _softmax(z[prompts])
        rep = np.repeat(np.arange(batch_prompts), group)
        acts = _sample(rng, p[rep])
        rewards = correct[prompts[rep], acts].astype(np.float64)
        h_full = float(np.mean(_entropy(p)))
        h_sampled = float(np.mean(-np.log(p[rep, acts])))
        row = {"step": step, "entropy_full": h_full, "entropy_sampled": h_sampled,
               "entropy_all_prompts": float(np.mean(_entropy(_softmax(z)))), "accuracy": float(rewards.mean())}
        # GRPO
        r = rewards.reshape(batch_prompts, group)
        std = r.std(1, ddof=1, keepdims=True)
        adv = np.where(std > 0, (r - r.mean(1, keepdims=True)) / (std + 1e-6), 0.0).reshape(-1)
        grad = np.zeros_like(z)
        onehot = np.eye(n_actions)[acts]
        np.add.at(grad, prompts[rep], adv[:, None] * (onehot - p[rep]) / n_main)
        # AEPO
        if ctl is not None:
            ctl.observe(entropy_full=h_full, entropy_sampled=h_sampled)
            d = ctl.decide(step)
            row.update(target=d.target, temperature=d.temperature, budget=d.budget)
            if d.budget > 0:
                tp = prompts[: max(1, batch_prompts // 4)]
                trep = np.repeat(tp, group)
                pt = _softmax(z[trep] / d.temperature)
                ta = _sample(rng, pt)
                tr = correct[trep, ta].astype(np.float64)
                keep = select_positives(tr, d.budget)
                pk = _softmax(z[trep[keep]])
                np.add.at(grad, trep[keep], alpha * (np.eye(n_actions)[ta[keep]] - pk) / n_main)
                row["positives"] = int(len(keep))
        z = z + lr * grad
        rows.append(row)
    return rows


def tracking_error(rows: list[dict], last: int = 150) -> float:
    """Mean |entropy - target| over the last ``last`` steps (entropy over all prompts)."""
    tail = rows[-last:]
    return float(np.mean([abs(r["entropy_all_prompts"] - r["target"]) for r in tail]))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--targets", type=str, nargs="+", default=["0.4", "0.8", "1.2"],
                    help="entropy targets (numbers or schedules such as 'linear:1.2:0.4:0:400')")
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--estimator", choices=["full", "sampled"], default="full")
    ap.add_argument("--dead-band", type=float, default=0.0)
    ap.add_argument("--out", default="entropy_control_demo.png", help="PNG path ('' to skip the plot)")
    ap.add_argument("--json", default="", help="optional path for all rows as JSON")
    args = ap.parse_args(argv)

    runs = {"grpo (no control)": simulate(None, steps=args.steps, seed=args.seed)}
    for t in args.targets:
        runs[f"aepo target {t}"] = simulate(t, steps=args.steps, seed=args.seed, estimator=args.estimator,
                                           dead_band=args.dead_band)

    checkpoints = sorted({0, args.steps // 8, args.steps // 4, args.steps // 2, 3 * args.steps // 4, args.steps - 1})
    header = f"{'run':<28}" + "".join(f"{'H@' + str(s):>9}" for s in checkpoints) + f"{'acc(end)':>10}{'|H-tgt|':>9}"
    print(header)
    print("-" * len(header))
    summary = {}
    for name, rows in runs.items():
        err = tracking_error(rows) if "target" in rows[-1] else float("nan")
        acc = float(np.mean([r["accuracy"] for r in rows[-50:]]))
        print(f"{name:<28}" + "".join(f"{rows[s]['entropy_all_prompts']:>9.3f}" for s in checkpoints)
              + f"{acc:>10.3f}{err:>9.3f}")
        summary[name] = {"final_entropy": rows[-1]["entropy_all_prompts"], "tracking_error": err, "accuracy": acc}
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"summary": summary, "runs": runs}, f)
    if args.out:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(8, 4.5))
        for i, (name, rows) in enumerate(runs.items()):
            line, = ax.plot([r["entropy_all_prompts"] for r in rows], label=name, lw=1.4, color=f"C{i}")
            if "target" in rows[0]:
                ax.plot([r["target"] for r in rows], ls="--", lw=0.9, color=line.get_color())
        ax.set_xlabel("step")
        ax.set_ylabel("policy entropy (nats, mean over prompts)")
        ax.set_title("AEPO temperature controller on a tabular policy (dashed: target)")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(args.out, dpi=120)
        print(f"wrote {args.out}")
    print(json.dumps({name: s for name, s in summary.items()}))


if __name__ == "__main__":
    main()
