"""The learner's update with and without the shared-prefix pass, side by side in one process.

    python tools/bench_shared_prefix.py                    # the toy shape: 16 prompts x 8 samples, P 34, R 48
    python tools/bench_shared_prefix.py --shape large      # 4 layers, hidden 512, vocab 32k (random weights)

One GRPO update (seq-mean-token-mean, on-policy old log-probs, the policy-entropy signal: what
``python -m aepo_jax.train --method=grpo`` runs each step) on the same synthetic batch: G samples of
each prompt (prompts of 32-34 tokens, left-padded; responses of 5-48 tokens), rows shuffled, by two
learners that differ only in ``LearnerSpec.prefix_slots`` (0: every row through the decoder whole;
prompts + 1: ``--model.shared_prefix=on``). The updates alternate, so the machine's load hits both
alike; the medians of process CPU time and wall time are compared. Both learners start from the
same weights and see the same batch, so their losses agree (checked, printed). The last line is
JSON with ``cpu_ratio`` and ``wall_ratio`` = shared / whole (below 1: the shared pass is faster),
the machine and the load average.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

SHAPES = {
    "toy": {"vocab_size": 576, "hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16},
    "large": {"vocab_size": 32000, "hidden_size": 512, "intermediate_size": 1408, "num_hidden_layers": 4,
              "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 64},
}


def make_batch(prompts: int, group: int, prompt_len: int, response_len: int, vocab: int, seed: int = 0):
    """G samples per prompt, left-padded prompts of prompt_len-2..prompt_len tokens, responses of
    5..response_len tokens, rows shuffled (the trainer's batch after split_minibatches)."""
    import numpy as np

    from aepo_jax.trainer.batch import Batch

    rng = np.random.default_rng(seed)
    n = prompts * group
    ids = np.zeros((n, prompt_len + response_len), np.int32)
    attn = np.zeros_like(ids)
    mask = np.zeros((n, response_len), np.float32)
    for u in range(prompts):
        lp = int(rng.integers(prompt_len - 2, prompt_len + 1))
        prompt = rng.integers(2, vocab, lp)
        for g in range(group):
            i = u * group + g
            ids[i, prompt_len - lp : prompt_len] = prompt
            attn[i, prompt_len - lp : prompt_len] = 1
            lr = int(rng.integers(5, response_len + 1))
            ids[i, prompt_len : prompt_len + lr] = rng.integers(2, vocab, lr)
            attn[i, prompt_len : prompt_len + lr] = 1
            mask[i, :lr] = 1
    perm = rng.permutation(n)
    ids, attn, mask = ids[perm], attn[perm], mask[perm]
    pos = np.maximum(np.cumsum(attn, 1) - 1, 0).astype(np.int32)
    rewards = (rng.random(n) > 0.5).astype(np.float32)
    return Batch(ids, attn, pos, mask, rewards, rng.normal(size=n).astype(np.float32), np.zeros(n, bool),
                 np.ones(n, bool), (np.arange(n, dtype=np.int32) // group)[perm], np.zeros(n, bool))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=tuple(SHAPES), default="toy")
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--group", type=int, default=8, help="samples per prompt (G)")
    p.add_argument("--prompt-len", type=int, default=34)
    p.add_argument("--response-len", type=int, default=48)
    p.add_argument("--repeats", type=int, default=6, help="timed updates per side (after one untimed)")
    a = p.parse_args(argv)

    import jax

    from aepo_jax.losses import LossConfig
    from aepo_jax.models import ModelConfig, init_model
    from aepo_jax.models.sharding import make_mesh
    from aepo_jax.trainer.config import OptimSection
    from aepo_jax.trainer.learner import Learner, LearnerSpec
    from tools.bench_vs_trl import machine, machine_line

    cfg = ModelConfig(**SHAPES[a.shape], max_position_embeddings=max(128, a.prompt_len + a.response_len),
                      tie_word_embeddings=a.shape == "toy")
    mesh = make_mesh("1x1", devices=jax.devices()[:1])
    batch = make_batch(a.prompts, a.group, a.prompt_len, a.response_len, cfg.vocab_size)
    learners = {}
    for name, slots in (("whole", 0), ("shared", a.prompts + 1)):
        spec = LearnerSpec(loss_name="grpo", loss=LossConfig(agg="seq-mean-token-mean"), prompt_len=a.prompt_len,
                           response_len=a.response_len, reuse_old_logp=True, entropy_signal=True, prefix_slots=slots)
        learners[name] = Learner(init_model(cfg, seed=0, mesh=mesh), spec, OptimSection(lr=1e-6), 100, mesh)
    first = {name: learner.update(batch) for name, learner in learners.items()}  # compiles
    losses = {name: m["actor/grad_norm"] for name, m in first.items()}
    cpu: dict = {name: [] for name in learners}
    wall: dict = {name: [] for name in learners}
    for _ in range(a.repeats):
        for name, learner in learners.items():
            c0, w0 = time.process_time(), time.perf_counter()
            learner.update(batch)
            cpu[name].append(time.process_time() - c0)
            wall[name].append(time.perf_counter() - w0)
    med = {k: {"cpu_s": round(statistics.median(cpu[k]), 4), "wall_s": round(statistics.median(wall[k]), 4)}
           for k in learners}
    m = machine()
    print(machine_line(m) + f"; load average {os.getloadavg()[0]:.1f}")
    print(f"batch: {a.prompts} prompts x {a.group} samples, P {a.prompt_len}, R {a.response_len}; shape {a.shape}")
    print(f"grad norm of the first update: whole {losses['whole']:.6g}, shared {losses['shared']:.6g}")
    for k, v in med.items():
        print(f"{k:>7}: update {v['cpu_s']:.3f} CPU-s, {v['wall_s']:.3f} s wall (median of {a.repeats})")
    result = {"shape": a.shape, "prompts": a.prompts, "group": a.group, "prompt_len": a.prompt_len,
              "response_len": a.response_len, "whole": med["whole"], "shared": med["shared"],
              "cpu_ratio": med["shared"]["cpu_s"] / med["whole"]["cpu_s"],
              "wall_ratio": med["shared"]["wall_s"] / med["whole"]["wall_s"],
              "grad_norm": losses, "machine": m, "load_avg_1m": os.getloadavg()[0]}
    rel = abs(losses["whole"] - losses["shared"]) / max(abs(losses["whole"]), 1e-12)
    if rel > 1e-3:
        print(f"the two updates disagree: grad norm {losses['whole']} vs {losses['shared']}", file=sys.stderr)
        print(json.dumps(result))
        return 1
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
