"""Memory plan before launch: does a run's update step fit on its devices, and what makes it fit.

    nice python tools/plan.py --config configs/paper/qwen2.5-math-7b-aepo.yaml --mesh=8x1 --device-memory=80GiB

Compiles the run's real update step (``aepo_jax.trainer.learner.Learner``: micro-batch scan, loss,
gradient, clipping, AdamW) and its log-prob pass with abstract inputs (``jax.ShapeDtypeStruct``
with the run's shardings: no weight is allocated) on a simulated mesh of the requested shape
(``--xla_force_host_platform_device_count``, set here before jax starts), and reads XLA's
compiled memory analysis per device. Prints, per device: parameters, optimiser state, gradients
(the accumulator of the micro-batch scan) and activations with the other temporaries, the peak
of each program, whether the larger fits ``--device-memory``, and if it does not, the first
setting that does from a short search (remat policies at the configured micro-batch, then
smaller micro-batches); plus the bytes one weight sync moves.

The model's architecture comes from ``<model.path>/config.json`` when that directory exists, else
from the built-in table of the paper's models (:data:`KNOWN_MODELS`, keyed by the directory's name).
Shapes are the run's worst case: prompts of ``data.max_prompt_length`` and responses of
``rollout.max_new_tokens``. The last line is JSON.

What the figures mean on GPU/TPU (docs/scale.md): parameters, optimiser state and gradients are
exact (they are array sizes). Activations are XLA:CPU's buffer assignment of the same program;
XLA:GPU and XLA:TPU fuse differently (GPU keeps attention blocks in fused kernels, TPU pads
minor dimensions to tiles), so they differ by some tens of percent, and the accelerator's own
reservations (CUDA context, XLA's allocator fraction) come on top: keep a margin.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# The paper's base models (their config.json on the Hugging Face hub), for planning without a local copy.
KNOWN_MODELS = {
    "qwen2.5-7b": {"model_type": "qwen2", "vocab_size": 152064, "hidden_size": 3584, "intermediate_size": 18944,
                   "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4,
                   "max_position_embeddings": 131072, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6,
                   "tie_word_embeddings": False},
    "qwen2.5-math-7b": {"model_type": "qwen2", "vocab_size": 152064, "hidden_size": 3584, "intermediate_size": 18944,
                        "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4,
                        "max_position_embeddings": 4096, "rope_theta": 10000.0, "rms_norm_eps": 1e-6,
                        "tie_word_embeddings": False},
    "qwen3-4b": {"model_type": "qwen3", "vocab_size": 151936, "hidden_size": 2560, "intermediate_size": 9728,
                 "num_hidden_layers": 36, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
                 "max_position_embeddings": 40960, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6,
                 "tie_word_embeddings": True},
}
REMAT_ORDER = ("none", "dots", "dots_except_mlp", "attn_context", "full")  # least recomputation first
GiB = 2**30


def parse_bytes(text: str) -> int:
    """'80GiB' | '80GB' | '85899345920' -> bytes (ValueError naming the value)."""
    m = re.fullmatch(r"\s*([0-9.]+)\s*(|B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)\s*", str(text), re.IGNORECASE)
    if not m:
        raise ValueError(f"--device-memory: {text!r} is not a size (e.g. 80GiB, 40GB)")
    unit = m.group(2).lower()
    scale = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
             "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}[unit]
    return int(float(m.group(1)) * scale)


def model_config(path: str):
    from aepo_jax.models import ModelConfig, read_config

    if path and (Path(path) / "config.json").is_file():
        return read_config(path), str(Path(path) / "config.json")
    key = Path(path).name.lower()
    if key not in KNOWN_MODELS:
        raise SystemExit(f"plan: model.path {path!r} has no config.json and {key!r} is not one of the built-in "
                         f"architectures ({', '.join(KNOWN_MODELS)}); point model.path at a directory with config.json")
    return ModelConfig.from_hf_dict(KNOWN_MODELS[key]), f"built-in table ({key})"


def _bytes_per_device(tree) -> int:
    import jax
    import numpy as np

    total = 0
    for x in jax.tree.leaves(tree):
        shape = x.sharding.shard_shape(x.shape) if getattr(x, "sharding", None) is not None else x.shape
        total += int(np.prod(shape, dtype=np.int64)) * np.dtype(x.dtype).itemsize
    return total


def plan_one(cfg, mcfg, mesh, *, micro_batch_size: int, remat: str) -> dict:
    """Compile the update and the log-prob pass for one setting; per-device bytes."""
    import jax
    import numpy as np
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec as P

    from aepo_jax.methods import method_spec
    from aepo_jax.models.decoder import abstract_model
    from aepo_jax.models.sharding import state_shardings
    from aepo_jax.trainer.batch import Batch
    from aepo_jax.trainer.config import loss_config, uses_on_policy_update
    from aepo_jax.trainer.learner import Learner, LearnerSpec
    from aepo_jax.trainer.stages import geometry

    a = cfg.algorithm
    spec = method_spec(a.method, a.reading)
    data_size = int(mesh.shape["data"])
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, micro_batch_size=micro_batch_size))
    # The trainer's own geometry, at the worst case: every prompt as long as data.max_prompt_length.
    geo = geometry(cfg, spec, data_size=data_size, longest_prompt=cfg.data.max_prompt_length, pad_id=0)
    prompt_len, response_len = geo.prompt_len, geo.response_len
    rows_per_minibatch = cfg.data.prompts_per_step * cfg.rollout.n // geo.num_minibatches + geo.reg_cap
    reuse = cfg.train.old_logp == "reuse" or (cfg.train.old_logp == "auto" and uses_on_policy_update(cfg))

    model = abstract_model(mcfg, dtype=cfg.model.dtype, compute_dtype=cfg.model.compute_dtype or None,
                           remat=remat, mesh=mesh)
    shardings = state_shardings(nnx.state(model), mesh)
    abstract = jax.tree.map(lambda v, s: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s),
                            nnx.state(model), shardings)
    nnx.update(model, abstract)
    lspec = LearnerSpec(loss_name=spec.loss, loss=loss_config(cfg), prompt_len=prompt_len, response_len=response_len,
                        logprob_chunk=cfg.model.logprob_chunk, micro_batches=geo.micro_batches,
                        entropy_grad=spec.entropy_grad, reuse_old_logp=reuse,
                        entropy_signal=not (not reuse or (cfg.train.old_logp == "auto" and spec.uses_reg_rollout)))
    learner = Learner(model, lspec, cfg.optim, total_updates=cfg.train.steps * geo.num_minibatches, mesh=mesh)

    width = prompt_len + response_len
    per_micro = rows_per_minibatch // geo.micro_batches

    def rows(shape, dtype, lead=()):
        spec_ = P(*([None] * len(lead)), "data", *([None] * (len(shape) - 1)))
        return jax.ShapeDtypeStruct(lead + shape, dtype, sharding=NamedSharding(mesh, spec_))

    def batch(lead, n):
        old = None if reuse else rows((n, response_len), np.float32, lead)
        return Batch(input_ids=rows((n, width), np.int32, lead), attention_mask=rows((n, width), np.int32, lead),
                     position_ids=rows((n, width), np.int32, lead), mask=rows((n, response_len), np.float32, lead),
                     rewards=rows((n,), np.float32, lead), advantages=rows((n,), np.float32, lead),
                     is_reg=rows((n,), np.bool_, lead), main_rollout=rows((n,), np.bool_, lead),
                     group=rows((n,), np.int32, lead), truncated=rows((n,), np.bool_, lead), old_logp=old)

    t0 = time.perf_counter()
    update = learner._update_fn.lower(learner.params, learner.opt_state, batch((geo.micro_batches,), per_micro),
                                      jax.ShapeDtypeStruct((), np.int32)).compile()
    t1 = time.perf_counter()
    lp_rows = max(geo.logprob_rows, data_size)
    lp_rows += (-lp_rows) % data_size
    tok = rows((lp_rows, width), np.int32)
    logprob = learner._logprob_fn.lower(learner.params, tok, tok, tok).compile()
    t2 = time.perf_counter()

    params = _bytes_per_device(learner.params)
    opt = _bytes_per_device(learner.opt_state)
    um, lm = update.memory_analysis(), logprob.memory_analysis()
    grads = params  # the micro-batch scan's gradient accumulator: one more copy of the parameters
    update_peak = um.argument_size_in_bytes + um.output_size_in_bytes - um.alias_size_in_bytes + um.temp_size_in_bytes
    # The log-prob pass runs while the optimiser state stays resident.
    logprob_peak = opt + lm.argument_size_in_bytes + lm.output_size_in_bytes + lm.temp_size_in_bytes
    return {
        "micro_batch_size": micro_batch_size, "remat": remat, "rows_per_micro_batch": per_micro,
        "micro_batches": geo.micro_batches, "tokens_per_row": width,
        "params": params, "optimizer": opt, "gradients": grads,
        "activations": max(um.temp_size_in_bytes - grads, 0),
        "logprob_activations": lm.temp_size_in_bytes,
        "update_peak": update_peak, "logprob_peak": logprob_peak, "peak": max(update_peak, logprob_peak),
        "compile_s": {"update": round(t1 - t0, 1), "logprob": round(t2 - t1, 1)},
    }


def candidates(cfg, data_size: int, max_trials: int) -> list[tuple[int, str]]:
    """Settings to try after the configured one: remat policies at its micro-batch, then halved
    micro-batches (kept a multiple of the data axis) with the remat policies from least to most."""
    from aepo_jax.models.config import remat_policy

    mbs = cfg.train.micro_batch_size
    current = remat_policy(cfg.model.remat)
    out = [(mbs, r) for r in REMAT_ORDER[REMAT_ORDER.index(current) + 1:]] if current in REMAT_ORDER else []
    m = mbs or data_size * 8
    while m // 2 >= data_size and m // 2 % data_size == 0:
        m //= 2
        out += [(m, r) for r in ("dots_except_mlp", "full")]
    return out[:max_trials]


def _gib(n: int) -> str:
    return f"{n / GiB:.2f}"


def table(rows: list[dict], budget: int) -> str:
    head = ("micro-batch", "remat", "params", "optimizer", "gradients", "activations", "log-prob act.",
            "peak", "fits")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append("| " + " | ".join([
            f"{r['micro_batch_size']} ({r['micro_batches']} x {r['rows_per_micro_batch']} rows of {r['tokens_per_row']})",
            r["remat"],
            _gib(r["params"]), _gib(r["optimizer"]), _gib(r["gradients"]), _gib(r["activations"]),
            _gib(r["logprob_activations"]), _gib(r["peak"]), "yes" if r["peak"] <= budget else "no"]) + " |")
    return "\n".join(lines) + "\n(GiB per device)"


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    p.add_argument("--config", required=True, help="run YAML (configs/paper/...)")
    p.add_argument("--mesh", default="", help="DxT; default: the config's train.mesh")
    p.add_argument("--device-memory", default="80GiB", help="memory of one device, e.g. 80GiB, 141GB, 16GiB")
    p.add_argument("--max-trials", type=int, default=4, help="settings tried after the configured one when it does not fit")
    p.add_argument("--no-search", action="store_true", help="only the configured setting")
    args, overrides = p.parse_known_args(argv)
    budget = parse_bytes(args.device_memory)

    from aepo_jax.config import build_config
    from aepo_jax.platform import parse_mesh_spec
    from aepo_jax.trainer.config import ALIASES, RunConfig, validate

    cfg = build_config(RunConfig, ["--config", args.config, *overrides], aliases=ALIASES)
    mesh_spec = args.mesh or cfg.train.mesh or "1x1"
    d, t = parse_mesh_spec(mesh_spec)
    # Exactly D*T simulated host devices, before jax starts (harmless on GPU/TPU hosts: CPU only).
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", ""))
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={d * t}".strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax

    from aepo_jax.models.hf_layout import hf_tensor_specs
    from aepo_jax.models.sharding import make_mesh

    mesh = make_mesh(mesh_spec, devices=jax.devices()[: d * t])
    validate(cfg, data_axis_size=d)
    mcfg, source = model_config(cfg.model.path)
    print(f"plan: {args.config} on mesh {mesh_spec} ({jax.devices()[0].platform}), {args.device_memory} per device; "
          f"model from {source}: {mcfg.num_hidden_layers} layers, hidden {mcfg.hidden_size}, vocab {mcfg.vocab_size}",
          file=sys.stderr)

    from aepo_jax.models.config import remat_policy

    tried = [plan_one(cfg, mcfg, mesh, micro_batch_size=cfg.train.micro_batch_size,
                      remat=remat_policy(cfg.model.remat))]
    print(table(tried, budget), file=sys.stderr)
    if tried[0]["peak"] > budget and not args.no_search:
        for mbs, remat in candidates(cfg, d, args.max_trials):
            tried.append(plan_one(cfg, mcfg, mesh, micro_batch_size=mbs, remat=remat))
            print(table(tried[-1:], budget).splitlines()[2], file=sys.stderr)
            if tried[-1]["peak"] <= budget:
                break
    fitting = next((r for r in tried if r["peak"] <= budget), None)
    itemsize = jax.numpy.dtype(cfg.model.dtype).itemsize
    sync_bytes = sum(math.prod(s) for _, s in hf_tensor_specs(mcfg)) * itemsize
    res = {
        "tool": "plan", "config": args.config, "mesh": mesh_spec, "device_memory": budget,
        "model": {"source": source, "layers": mcfg.num_hidden_layers, "hidden": mcfg.hidden_size,
                  "vocab": mcfg.vocab_size, "params": sync_bytes // itemsize},
        "dtype": cfg.model.dtype, "tried": tried,
        "fits": tried[0]["peak"] <= budget,
        "fitting_setting": None if fitting is None else {"train.micro_batch_size": fitting["micro_batch_size"],
                                                         "model.remat": fitting["remat"]},
        "weight_sync_bytes": sync_bytes,
    }
    print(f"\n{table(tried, budget)}", file=sys.stderr)
    verdict = ("fits as configured" if res["fits"] else
               f"does not fit; fits with --train.micro_batch_size={fitting['micro_batch_size']} "
               f"--model.remat={fitting['remat']}" if fitting else "does not fit with any setting tried")
    print(f"{verdict}; one weight sync moves {sync_bytes / 1e9:.2f} GB ({cfg.model.dtype}) to every engine",
          file=sys.stderr)
    print(json.dumps(res))
    return res


if __name__ == "__main__":
    main()
