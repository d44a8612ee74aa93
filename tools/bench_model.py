"""Forward+backward tokens/s of our decoder vs transformers (torch CPU), side by side in one run.

    flock /tmp/aepo_heavy.lock python tools/bench_model.py            # defaults below
    python tools/bench_model.py --layers 2 --seq 128 --steps 2         # quick look

Both sides train the same weights (transformers builds a random Qwen2, we load its checkpoint)
on the same tokens with the same loss: mean next-token cross-entropy over the B*(L-1) predicted
positions, fp32, gradients for every parameter. transformers computes it as
`model(ids, labels=ids).loss` (LM head over all L positions, the last one ignored); we compute
`hidden_states`, shift them before the LM head and use a cross-entropy with a closed-form
backward (softmax minus one-hot). Both loss values are printed and checked to agree, so the two
sides do the same work. Steps alternate between the two (noise hits both alike); the medians
give tokens/s. The last line is JSON with both figures and `ratio` = ours / transformers.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time


def jax_step_fn(model):
    import jax
    import jax.numpy as jnp
    from flax import nnx

    graphdef, state = nnx.split(model)

    @jax.custom_vjp
    def token_ce(h, w, targets):
        logits = jnp.dot(h, w, preferred_element_type=jnp.float32)
        lse = jax.nn.logsumexp(logits, axis=-1)
        return jnp.mean(lse - jnp.take_along_axis(logits, targets[:, None], -1)[:, 0])

    def ce_fwd(h, w, targets):
        logits = jnp.dot(h, w, preferred_element_type=jnp.float32)
        lse = jax.nn.logsumexp(logits, axis=-1)
        loss = jnp.mean(lse - jnp.take_along_axis(logits, targets[:, None], -1)[:, 0])
        return loss, (h, w, targets, logits, lse)

    def ce_bwd(res, g):
        # d loss / d logits = (softmax - onehot) * g / N, formed in one fused elementwise pass.
        h, w, targets, logits, lse = res
        n = logits.shape[0]
        onehot = jnp.arange(logits.shape[1])[None, :] == targets[:, None]
        dlogits = ((jnp.exp(logits - lse[:, None]) - onehot) * (g / n)).astype(h.dtype)
        return jnp.dot(dlogits, w.T), jnp.dot(h.T, dlogits), None

    token_ce.defvjp(ce_fwd, ce_bwd)

    def loss_fn(state, ids):
        m = nnx.merge(graphdef, state)
        h = m.hidden_states(ids)[:, :-1]  # shift before the LM head: position t predicts ids[t+1]
        return token_ce(h.reshape(-1, h.shape[-1]), m.lm_head_kernel(), ids[:, 1:].reshape(-1))

    step = jax.jit(jax.value_and_grad(loss_fn))
    return lambda ids: step(state, ids)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--intermediate", type=int, default=1408)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--steps", type=int, default=4, help="timed steps per side (after one warm-up)")
    args = p.parse_args(argv)

    import jax
    import numpy as np
    import torch
    import transformers as T

    from aepo_jax.models import load_pretrained

    torch.manual_seed(0)
    cfg = T.Qwen2Config(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                        num_hidden_layers=args.layers, num_attention_heads=args.heads,
                        num_key_value_heads=args.kv_heads, tie_word_embeddings=False)
    hf = T.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    hf.train()
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        ours = load_pretrained(d, dtype="float32")
    ids_np = np.random.RandomState(0).randint(0, args.vocab, (args.batch, args.seq))
    ids_t = torch.tensor(ids_np)
    ids_j = jax.numpy.asarray(ids_np, dtype=jax.numpy.int32)
    jax_step = jax_step_fn(ours)

    def torch_step():
        hf.zero_grad(set_to_none=True)
        loss = hf(input_ids=ids_t, labels=ids_t).loss
        loss.backward()
        return float(loss.detach())

    def our_step():
        loss, grads = jax_step(ids_j)
        jax.block_until_ready(grads)
        return float(loss)

    t0 = time.perf_counter()
    loss_ours = our_step()
    compile_s = time.perf_counter() - t0
    loss_torch = torch_step()
    if abs(loss_ours - loss_torch) > 1e-3 * max(1.0, abs(loss_torch)):
        raise SystemExit(f"losses differ: ours {loss_ours} vs transformers {loss_torch}: not the same work")
    t_ours, t_torch = [], []
    for _ in range(args.steps):
        for fn, acc in ((torch_step, t_torch), (our_step, t_ours)):
            t = time.perf_counter()
            fn()
            acc.append(time.perf_counter() - t)
    tokens = args.batch * args.seq
    res = {
        "bench": "model_fwd_bwd",
        "config": {k: getattr(args, k) for k in ("layers", "hidden", "heads", "kv_heads", "intermediate", "vocab",
                                                   "batch", "seq")},
        "ours_tokens_per_s": round(tokens / statistics.median(t_ours), 1),
        "transformers_tokens_per_s": round(tokens / statistics.median(t_torch), 1),
        "ours_step_s": [round(x, 3) for x in t_ours],
        "transformers_step_s": [round(x, 3) for x in t_torch],
        "loss_ours": round(loss_ours, 5),
        "loss_transformers": round(loss_torch, 5),
        "compile_s": round(compile_s, 1),
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
    }
    res["ratio"] = round(res["ours_tokens_per_s"] / res["transformers_tokens_per_s"], 3)
    print(f"ours {res['ours_tokens_per_s']} tok/s, transformers {res['transformers_tokens_per_s']} tok/s, "
          f"ratio {res['ratio']}", file=sys.stderr)
    print(json.dumps(res))
    return res


if __name__ == "__main__":
    main()
