"""Benchmark the log-prob/entropy head: naive full-softmax vs chunked (custom VJP), value and gradient.

Measures ``jit(value_and_grad)`` of ``sum(logp * g) `` (+ the entropy, no gradient, as the trainer
uses it) with respect to the hidden states and the LM head, at vocab 151,936, hidden 1,024,
batch 4 by default:

- naive head at 1,024 tokens (about 11 GiB; at 4,096 it would need about 38 GiB, so it is not run),
- chunked head at 1,024 and at 4,096 tokens (chunks of 256),
- optionally (``--with-remat``) a plain ``lax.scan`` + ``jax.checkpoint`` chunked head, to show what
  the hand-written VJP buys.

Each variant runs in its own subprocess, so its peak memory is that process's own ``ru_maxrss``
(peak resident set size of the whole process: JAX runtime + inputs + XLA buffers). The XLA
compiled memory analysis (temp bytes) is reported beside it as a second, allocator-independent
figure. Times are medians over ``--reps`` runs after a warm-up call. ``time_ratio`` comes from one
more subprocess that calls the naive and the chunked head alternately (N C N C ...), so both see
the same machine load (on a shared machine the load drifts over the minutes between variants).

The full-size run needs about 11 GiB: run it alone, under the heavy-job lock::

    flock /tmp/aepo_heavy.lock python tools/bench_loss.py          # full size, several minutes
    python tools/bench_loss.py --small                               # quick check (seconds)

The last line is JSON with the figures and ``memory_ratio`` (chunked / naive peak at the short
length), ``memory_growth`` (chunked peak at the long length / at the short one) and ``time_ratio``
(chunked / naive time at the short length). Targets: <= 0.40, <= 1.2, <= 1.1.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

TARGETS = {"memory_ratio": 0.40, "memory_growth": 1.2, "time_ratio": 1.1}


def _child(args) -> dict:
    """Run one variant in this process and return its figures."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    import jax
    import jax.numpy as jnp
    import numpy as np

    from aepo_jax.logprobs import chunked_logprobs_entropy, naive_logprobs_entropy

    B, S, H, V, chunk = args.batch, args.seq, args.hidden, args.vocab, args.chunk
    # Inputs from NumPy (float32 directly): jax.random at this size leaves GiB-sized transients
    # (uint32 bits, conversions) in the process's high-water mark before the head even runs.
    rng = np.random.default_rng(0)
    hidden = jnp.asarray(rng.standard_normal((B, S, H), dtype=np.float32))
    w_np = rng.standard_normal((H, V), dtype=np.float32)
    w_np *= 0.02
    lm_head = jnp.asarray(w_np)
    del w_np
    targets = jnp.asarray(rng.integers(0, V, size=(B, S), dtype=np.int32))
    g = jnp.asarray(rng.standard_normal((B, S), dtype=np.float32))

    if args.child == "interleaved":
        return _interleaved(args, hidden, lm_head, targets, g)
    if args.child == "naive":
        head = lambda h, w: naive_logprobs_entropy(h, w, targets)  # noqa: E731
    elif args.child == "chunked":
        head = lambda h, w: chunked_logprobs_entropy(h, w, targets, chunk_size=chunk)  # noqa: E731
    elif args.child == "remat":
        head = lambda h, w: _remat_head(h, w, targets, chunk)  # noqa: E731
    else:
        raise ValueError(f"--child: unknown variant {args.child!r}")

    def loss(h, w):
        logp, ent = head(h, w)
        return jnp.sum(logp * g), jnp.mean(ent)

    fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))
    jax.block_until_ready((hidden, lm_head, targets, g))
    rss_inputs = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    t0 = time.perf_counter()
    compiled = fn.lower(hidden, lm_head).compile()
    compile_s = time.perf_counter() - t0
    mem = {}
    try:
        ma = compiled.memory_analysis()
        mem = {
            "xla_temp_gib": ma.temp_size_in_bytes / 2**30,
            "xla_total_gib": (ma.temp_size_in_bytes + ma.argument_size_in_bytes + ma.output_size_in_bytes) / 2**30,
        }
    except Exception as e:  # pragma: no cover - backend without memory analysis
        mem = {"xla_memory_analysis_error": repr(e)}
    t0 = time.perf_counter()
    out = jax.block_until_ready(compiled(hidden, lm_head))
    first_s = time.perf_counter() - t0
    times = []
    for _ in range(args.reps):
        t0 = time.perf_counter()
        out = jax.block_until_ready(compiled(hidden, lm_head))
        times.append(time.perf_counter() - t0)
    (val, ent), (dh, dw) = out
    return {
        "variant": args.child,
        "seq": S,
        "time_s": float(np.median(times)) if times else first_s,
        "times_s": times,
        "first_call_s": first_s,
        "compile_s": compile_s,
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "rss_after_inputs_gib": rss_inputs,
        **mem,
        "checksum": [float(val), float(ent), float(jnp.sum(dh * dh)), float(jnp.sum(dw * dw))],
    }


def _interleaved(args, hidden, lm_head, targets, g) -> dict:
    """Time naive and chunked alternately (N C N C ...) in one process: both see the same machine load,
    which matters on a shared machine where load drifts over minutes."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from aepo_jax.logprobs import chunked_logprobs_entropy, naive_logprobs_entropy

    def make(head):
        def loss(h, w):
            logp, ent = head(h, w)
            return jnp.sum(logp * g), jnp.mean(ent)

        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)).lower(hidden, lm_head).compile()

    fns = {
        "naive": make(lambda h, w: naive_logprobs_entropy(h, w, targets)),
        "chunked": make(lambda h, w: chunked_logprobs_entropy(h, w, targets, chunk_size=args.chunk)),
    }
    times = {k: [] for k in fns}
    for rep in range(args.reps + 1):  # the first round is a warm-up
        for k, f in fns.items():
            t0 = time.perf_counter()
            jax.block_until_ready(f(hidden, lm_head))
            if rep:
                times[k].append(time.perf_counter() - t0)
    med = {k: float(np.median(v)) for k, v in times.items()}
    return {"variant": "interleaved", "seq": args.seq, "times_s": times, "naive_s": med["naive"],
            "chunked_s": med["chunked"], "time_ratio": med["chunked"] / med["naive"]}


def _remat_head(hidden, lm_head, targets, chunk):
    """The plain alternative: lax.scan over chunks with jax.checkpoint and ordinary autodiff."""
    import jax
    import jax.numpy as jnp

    B, S, H = hidden.shape
    n = -(-S // chunk)
    pad = n * chunk - S
    h = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0))).reshape(B, n, chunk, H).swapaxes(0, 1)
    t = jnp.pad(targets, ((0, 0), (0, pad))).reshape(B, n, chunk).swapaxes(0, 1)

    @jax.checkpoint
    def body(_, xs):
        hc, tc = xs
        lp = jax.nn.log_softmax(jnp.einsum("bch,hv->bcv", hc, lm_head), axis=-1)
        logp = jnp.take_along_axis(lp, tc[..., None], -1)[..., 0]
        ent = jax.lax.stop_gradient(-jnp.sum(jnp.exp(lp) * lp, -1))
        return None, (logp, ent)

    _, (logp, ent) = jax.lax.scan(body, None, (h, t))
    return logp.swapaxes(0, 1).reshape(B, -1)[:, :S], ent.swapaxes(0, 1).reshape(B, -1)[:, :S]


def _run_child(variant, seq, args) -> dict:
    cmd = [
        sys.executable, os.path.abspath(__file__), "--child", variant, "--seq", str(seq),
        "--batch", str(args.batch), "--hidden", str(args.hidden), "--vocab", str(args.vocab),
        "--chunk", str(args.chunk), "--reps", str(args.reps),
    ]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"variant {variant} at {seq} tokens failed (rc {p.returncode}):\n{p.stderr[-4000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--small", action="store_true", help="quick sizes: batch 2, hidden 256, vocab 32768, 512/2048 tokens")
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--hidden", type=int, default=None)
    ap.add_argument("--vocab", type=int, default=None)
    ap.add_argument("--seq-short", type=int, default=None)
    ap.add_argument("--seq-long", type=int, default=None)
    ap.add_argument("--chunk", type=int, default=None)
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--with-remat", action="store_true", help="also run the plain checkpointed scan at the short length")
    ap.add_argument("--no-interleaved", action="store_true",
                    help="skip the interleaved timing of naive vs chunked (time_ratio then comes from the separate runs)")
    ap.add_argument("--only-timing", action="store_true", help="run only the interleaved naive-vs-chunked timing")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--seq", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    defaults = (
        dict(batch=2, hidden=256, vocab=32768, seq_short=512, seq_long=2048, chunk=128, reps=3)
        if args.small
        else dict(batch=4, hidden=1024, vocab=151936, seq_short=1024, seq_long=4096, chunk=256, reps=2)
    )
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)

    if args.child:
        print(json.dumps(_child(args)))
        return

    print(f"head value+grad: batch {args.batch}, hidden {args.hidden}, vocab {args.vocab}, chunk {args.chunk}, "
          f"median of {args.reps} after warm-up; one subprocess per variant (peak = its ru_maxrss)", flush=True)
    if args.only_timing:
        r = _run_child("interleaved", args.seq_short, args)
        print(f"interleaved at {args.seq_short} tokens: naive {r['naive_s']:.2f} s, chunked {r['chunked_s']:.2f} s")
        print(json.dumps({"time_ratio": r["time_ratio"], "interleaved": r, "targets": {"time_ratio": TARGETS["time_ratio"]},
                          "meets_targets": {"time_ratio": bool(r["time_ratio"] <= TARGETS["time_ratio"])}}))
        return
    plan = [("naive", args.seq_short), ("chunked", args.seq_short), ("chunked", args.seq_long)]
    if args.with_remat:
        plan.append(("remat", args.seq_short))
    res = {}
    print(f"{'variant':<10}{'tokens':>8}{'time s':>10}{'compile s':>11}{'peak RSS GiB':>14}{'XLA temp GiB':>14}", flush=True)
    for variant, seq in plan:
        r = _run_child(variant, seq, args)
        res[f"{variant}_{seq}"] = r
        print(f"{variant:<10}{seq:>8}{r['time_s']:>10.2f}{r['compile_s']:>11.2f}{r['peak_rss_gib']:>14.2f}"
              f"{r.get('xla_temp_gib', float('nan')):>14.2f}", flush=True)
    naive = res[f"naive_{args.seq_short}"]
    short = res[f"chunked_{args.seq_short}"]
    long = res[f"chunked_{args.seq_long}"]
    # same function, same inputs: the two heads must agree (loss value and gradient norms)
    agree = all(abs(a - b) <= 1e-3 * max(1.0, abs(b)) for a, b in zip(short["checksum"], naive["checksum"]))
    summary = {
        "memory_ratio": short["peak_rss_gib"] / naive["peak_rss_gib"],
        "memory_growth": long["peak_rss_gib"] / short["peak_rss_gib"],
        "time_ratio": short["time_s"] / naive["time_s"],
        "time_ratio_source": "separate runs",
        "memory_ratio_xla_temp": short.get("xla_temp_gib", float("nan")) / naive.get("xla_temp_gib", float("nan")),
        "memory_growth_xla_temp": long.get("xla_temp_gib", float("nan")) / short.get("xla_temp_gib", float("nan")),
        "time_per_token_ratio_long_vs_short": (long["time_s"] / args.seq_long) / (short["time_s"] / args.seq_short),
        "chunked_matches_naive": agree,
        "memory_measure": "peak ru_maxrss of one subprocess per variant (GiB); XLA compiled temp size beside it",
        "config": {k: getattr(args, k) for k in ("batch", "hidden", "vocab", "seq_short", "seq_long", "chunk", "reps")},
        "variants": {k: {kk: vv for kk, vv in v.items() if kk != "checksum"} for k, v in res.items()},
    }
    if not args.no_interleaved:
        r = _run_child("interleaved", args.seq_short, args)
        print(f"interleaved at {args.seq_short} tokens: naive {r['naive_s']:.2f} s, chunked {r['chunked_s']:.2f} s",
              flush=True)
        summary["time_ratio_separate_runs"] = summary["time_ratio"]
        summary["time_ratio"] = r["time_ratio"]
        summary["time_ratio_source"] = "interleaved naive/chunked calls in one process"
        summary["variants"]["interleaved"] = r
    if args.with_remat:
        rm = res[f"remat_{args.seq_short}"]
        summary["remat_memory_ratio"] = rm["peak_rss_gib"] / naive["peak_rss_gib"]
        summary["remat_time_ratio"] = rm["time_s"] / naive["time_s"]
    summary["targets"] = TARGETS
    summary["meets_targets"] = {k: bool(summary[k] <= v) for k, v in TARGETS.items()}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
