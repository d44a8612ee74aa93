"""Compile time of the learner's update step against model depth, side by side in one run.

    nice -n 10 python tools/bench_compile.py                     # depths 2, 8, 28
    python tools/bench_compile.py --depths 2,4 --hidden 32       # quick look

For each depth the real update step (``aepo_jax.trainer.learner.Learner``: micro-batch scan,
policy loss, gradient, clipping, AdamW) of a narrow Qwen2-shaped model is traced and compiled
ahead of time (``jit(...).lower(...).compile()``) in a fresh Python process with the persistent
compilation cache off, so every depth pays its full compile and nothing is shared between them.
The log-prob pass is compiled too and reported beside it. Width hardly matters to XLA's compile
time; depth does when layers are unrolled, and does not when they are one scanned block.

The last line is JSON: ``compile_s`` (trace + compile of the update) per depth, ``logprob_compile_s``
likewise, and ``ratio`` = deepest / shallowest update compile time (the target is <= 1.5).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time


def child(args) -> dict:
    import dataclasses

    import jax
    import numpy as np

    from aepo_jax.losses import LossConfig
    from aepo_jax.methods import method_spec
    from aepo_jax.models import ModelConfig, init_model
    from aepo_jax.models.sharding import make_mesh
    from aepo_jax.trainer.batch import Batch
    from aepo_jax.trainer.config import OptimSection
    from aepo_jax.trainer.learner import Learner, LearnerSpec

    cfg = ModelConfig(model_type="qwen2", vocab_size=args.vocab, hidden_size=args.hidden,
                      intermediate_size=2 * args.hidden, num_hidden_layers=args.layers, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=args.hidden // 4)
    mesh = make_mesh(args.mesh)
    model = init_model(cfg, seed=0, mesh=mesh, remat=False if args.remat in ("none", "false") else args.remat)
    m = method_spec("aepo")
    spec = LearnerSpec(loss_name=m.loss, loss=LossConfig(), prompt_len=args.prompt_len,
                       response_len=args.response_len, logprob_chunk=args.response_len,
                       micro_batches=args.micro_batches, entropy_grad=m.entropy_grad)
    learner = Learner(model, spec, OptimSection(), total_updates=10, mesh=mesh)
    n, width = args.rows, args.prompt_len + args.response_len
    z = lambda shape, dt: np.zeros(shape, dt)  # noqa: E731
    batch = Batch(input_ids=z((n, width), np.int32), attention_mask=np.ones((n, width), np.int32),
                  position_ids=np.tile(np.arange(width, dtype=np.int32), (n, 1)),
                  mask=np.ones((n, args.response_len), np.float32), rewards=z(n, np.float32),
                  advantages=z(n, np.float32), is_reg=z(n, bool), main_rollout=np.ones(n, bool),
                  group=z(n, np.int32), truncated=z(n, bool), old_logp=z((n, args.response_len), np.float32))
    mc = args.micro_batches
    mb = jax.tree.map(lambda x: learner._put_rows(x.reshape((mc, n // mc) + x.shape[1:]), axis=1),
                      dataclasses.replace(batch, entropy=None))
    t0 = time.perf_counter()
    lowered = learner._update_fn.lower(learner.params, learner.opt_state, mb, np.int32(0))
    t1 = time.perf_counter()
    lowered.compile()
    t2 = time.perf_counter()
    toks = [learner._put_rows(x) for x in (batch.input_ids, batch.attention_mask, batch.position_ids)]
    t3 = time.perf_counter()
    learner._logprob_fn.lower(learner.params, *toks).compile()
    t4 = time.perf_counter()
    return {"layers": args.layers, "lower_s": t1 - t0, "compile_s": t2 - t0, "logprob_compile_s": t4 - t3}


def _machine() -> str:
    model = platform.processor() or platform.machine()
    avx512 = False
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
        for line in text.splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
        avx512 = " avx512f" in text
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores, AVX-512 {'yes' if avx512 else 'no'}"


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--depths", default="2,8,28", help="comma-separated layer counts")
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--vocab", type=int, default=512)
    p.add_argument("--rows", type=int, default=8)
    p.add_argument("--micro-batches", type=int, default=2)
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--response-len", type=int, default=16)
    p.add_argument("--remat", default="none", help="model.remat policy of the compiled step")
    p.add_argument("--mesh", default="1x1")
    p.add_argument("--layers", type=int, default=0, help=argparse.SUPPRESS)  # child mode
    args = p.parse_args(argv)
    if args.layers:
        res = child(args)
        print(json.dumps(res))
        return res

    depths = [int(x) for x in args.depths.split(",")]
    d, t = (int(x) for x in args.mesh.split("x"))
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_COMPILATION_CACHE_DIR", "XLA_FLAGS")}
    env.update(AEPO_JAX_COMPILATION_CACHE="off", JAX_PLATFORMS=env.get("JAX_PLATFORMS", "cpu"),
               XLA_FLAGS=f"--xla_force_host_platform_device_count={d * t}")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))
    passthrough = [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k not in ("depths", "layers")]
    per = {}
    for n in depths:
        out = subprocess.run([sys.executable, os.path.abspath(__file__), *passthrough, f"--layers={n}"],
                             env=env, capture_output=True, text=True, check=False)
        if out.returncode != 0:
            raise SystemExit(f"depth {n}: the child failed (exit {out.returncode}):\n{out.stderr[-4000:]}")
        per[n] = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{n:3d} layers: update {per[n]['compile_s']:.2f} s (trace {per[n]['lower_s']:.2f} s), "
              f"log-prob pass {per[n]['logprob_compile_s']:.2f} s", file=sys.stderr)
    res = {
        "bench": "compile_vs_depth",
        "machine": _machine(),
        "load_avg": round(os.getloadavg()[0], 2),
        "config": {k: v for k, v in vars(args).items() if k != "layers"},
        "compile_s": {str(n): round(per[n]["compile_s"], 2) for n in depths},
        "trace_s": {str(n): round(per[n]["lower_s"], 2) for n in depths},
        "logprob_compile_s": {str(n): round(per[n]["logprob_compile_s"], 2) for n in depths},
        "ratio": round(per[depths[-1]]["compile_s"] / per[depths[0]]["compile_s"], 3),
    }
    print(json.dumps(res))
    return res


if __name__ == "__main__":
    main()
