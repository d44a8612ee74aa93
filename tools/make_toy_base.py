"""Build the built-in toy base model (tiny Qwen2 + its tokenizer) and, optionally, measure it.

    python tools/make_toy_base.py                      # build into the cache the trainer uses
    python tools/make_toy_base.py --out /tmp/toy_base  # build into a directory of your choice
    python tools/make_toy_base.py --eval               # then: pass@k at T=1 and token entropy
    python tools/make_toy_base.py --variant length     # the length variant's base (its own cache name)

The build is the same bytes for the same recipe on any process (it trains in a subprocess pinned
to one CPU device and one core, see aepo_jax/toy/recipe.py) and takes a few minutes. The recipe and teacher-forced diagnostics are written to toy_base.json in
the model directory; --eval samples the toy test split through the embedded server
(``python -m aepo_jax.eval``) and prints avg@n, pass@k and the mean sampled-token entropy.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
import dataclasses
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    from aepo_jax.data.toy_task import VARIANTS
    from aepo_jax.toy import ToyBaseConfig, base_config_for, build_toy_base, default_cache_dir, ensure_toy_base

    defaults = ToyBaseConfig()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="", help="output directory; empty = the cache ($AEPO_JAX_CACHE or ~/.cache/aepo_jax)")
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--steps", type=int, default=defaults.steps)
    p.add_argument("--noise", type=float, default=None, help="misread probability of the warm-start data "
                   f"(default: the variant's recipe, {defaults.noise} for the default task)")
    p.add_argument("--variant", choices=VARIANTS, default="default",
                   help="toy task variant whose grammar the base learns (length: a free number of opening fillers)")
    p.add_argument("--eval", action="store_true", help="measure pass@k at T=1 on the toy test split")
    p.add_argument("--n", type=int, default=16, help="samples per problem for --eval")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    given = {"seed": args.seed, "steps": args.steps, **({} if args.noise is None else {"noise": args.noise})}
    cfg = base_config_for(args.variant, **given)
    t0 = time.time()
    path = str(build_toy_base(args.out, cfg)) if args.out else ensure_toy_base(default_cache_dir(), cfg)
    info = json.loads((Path(path) / "toy_base.json").read_text())
    print(f"toy base model: {path} ({time.time() - t0:.1f} s)")
    print("teacher-forced on the test split:", json.dumps(info["teacher_forced_test"]))
    if args.eval:
        from aepo_jax.eval import EvalConfig, default_ks, run_eval

        report = run_eval(EvalConfig(model_path=path, data=["toy"], n=args.n, ks=default_ks(args.n), temperature=1.0,
                                     top_p=1.0, max_new_tokens=64 if args.variant == "default" else 80,
                                     seed=args.seed))
        toy = report["benchmarks"]["toy"]
        print(report["table"])
        print(f"mean sampled-token entropy (NLL at T=1): {toy['mean_token_nll']:.3f} nats; "
              f"mean response length {toy['mean_response_tokens']:.1f} tokens")
    return 0


if __name__ == "__main__":
    sys.exit(main())
