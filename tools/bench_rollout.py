"""Rollout throughput: the embedded server (over HTTP, through RolloutClient) vs transformers
``generate()`` (torch CPU) on the same random Qwen2 model, plus the time of one full weight sync.

    flock /tmp/aepo_heavy.lock /work/venv/bin/python tools/bench_rollout.py [--prompts 32] [--new-tokens 128]

Both sides generate exactly ``prompts x new_tokens`` tokens (EOS ignored) at temperature 1 with
no top-k/top-p (transformers' default top_k=50 is turned off: same distribution on both sides),
after an untimed warm-up (ours includes the jit compile, reported separately). The timed runs
alternate ours / transformers ``--repeats`` times and the best time of each side counts, so a
change in the machine's load hits both alike. The last line is JSON with the figures and ``ratio`` (ours over
transformers' tokens/s), measured side by side in this run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time


def build_model(out_dir: str, layers: int, hidden: int, heads: int, kv_heads: int, inter: int, vocab: int) -> str:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=4096,
                      eos_token_id=2, bos_token_id=1, pad_token_id=0, tie_word_embeddings=False,
                      torch_dtype="float32")
    torch.manual_seed(0)
    Qwen2ForCausalLM(cfg).save_pretrained(out_dir, safe_serialization=True)
    with open(os.path.join(out_dir, "generation_config.json"), "w") as f:
        json.dump({"eos_token_id": 2, "bos_token_id": 1, "pad_token_id": 0}, f)
    return out_dir


class Transformers:
    """transformers generate() at T = 1 with no top-k/top-p (the same distribution as ours)."""

    def __init__(self, model_dir: str, prompts: list[list[int]], new_tokens: int):
        import torch
        from transformers import AutoModelForCausalLM

        self.torch = torch
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
        self.ids = torch.tensor(prompts)
        self.new_tokens = new_tokens
        self.kw = dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=new_tokens,
                       min_new_tokens=new_tokens, pad_token_id=0, attention_mask=torch.ones_like(self.ids))
        with torch.inference_mode():  # warm-up
            self.model.generate(self.ids[:4], **{**self.kw, "max_new_tokens": 8, "min_new_tokens": 8,
                                                 "attention_mask": torch.ones_like(self.ids[:4])})

    def run(self, default_top_k: bool = False) -> float:
        """One timed generate(); default_top_k: transformers' own default (top_k=50) instead."""
        kw = dict(self.kw, top_k=50) if default_top_k else self.kw
        with self.torch.inference_mode():
            t0 = time.perf_counter()
            out = self.model.generate(self.ids, **kw)
            dt = time.perf_counter() - t0
        gen = out.shape[1] - self.ids.shape[1]
        assert gen == self.new_tokens, f"transformers generated {gen} tokens per row, expected {self.new_tokens}"
        return dt


async def bench(url: str, model_dir: str, prompts: list[list[int]], new_tokens: int, repeats: int) -> dict:
    """Ours and transformers alternately (``repeats`` times each, best time of each side), so
    that a change in the machine's load hits both sides alike; then one weight sync."""
    import shutil

    from aepo_jax.models import load_pretrained
    from aepo_jax.rollout.client import RolloutClient
    from aepo_jax.rollout.weight_sync import sync_weights_async

    sp = {"max_new_tokens": new_tokens, "ignore_eos": True, "top_p": 1.0, "top_k": -1, "min_p": 0.0}
    n_tok = len(prompts) * new_tokens
    async with RolloutClient(url, batch_size=len(prompts), timeout_s=1800) as client:
        await client.wait_healthy(600)
        t0 = time.perf_counter()
        await client.generate(prompts, n=1, sampling_params=sp, seed=0, temperature=1.0)  # compile + run
        warm = time.perf_counter() - t0
        hf = await asyncio.to_thread(Transformers, model_dir, prompts, new_tokens)
        ours_t, hf_t, hf50_t = [], [], []
        for r in range(repeats):
            t0 = time.perf_counter()
            out = await client.generate(prompts, n=1, sampling_params=sp, seed=1 + r, temperature=1.0)
            ours_t.append(time.perf_counter() - t0)
            n = sum(len(s.output_ids) for row in out for s in row)
            assert n == n_tok, f"server generated {n} tokens, expected {n_tok}"
            hf_t.append(await asyncio.to_thread(hf.run))
            hf50_t.append(await asyncio.to_thread(hf.run, True))
        learner = load_pretrained(model_dir, dtype="float32")
        sync = await sync_weights_async(learner, client, "bench-1")
        shutil.rmtree(os.path.dirname(sync.path), ignore_errors=True)
    return {"ours": {"tokens": n_tok, "seconds": min(ours_t), "all_s": ours_t, "tokens_per_s": n_tok / min(ours_t),
                     "first_call_s_incl_compile": warm},
            "hf": {"tokens": n_tok, "seconds": min(hf_t), "all_s": hf_t, "tokens_per_s": n_tok / min(hf_t),
                   "torch_threads": hf.torch.get_num_threads(), "default_top_k_s": min(hf50_t)},
            "sync": {"total_s": sync.total_s, "save_s": sync.save_s, "update_s": sync.update_s,
                     "verify_s": sync.verify_s}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--intermediate", type=int, default=1408)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--repeats", type=int, default=2, help="timed runs per side, alternating; best of each")
    a = p.parse_args()

    import numpy as np

    from aepo_jax.rollout.launch import launch_server

    load_start = os.getloadavg()[0]
    rng = np.random.default_rng(0)
    prompts = rng.integers(3, a.vocab, size=(a.prompts, a.prompt_len)).tolist()
    with tempfile.TemporaryDirectory(prefix="bench_rollout_") as tmp:
        model_dir = build_model(os.path.join(tmp, "model"), a.layers, a.hidden, a.heads, a.kv_heads,
                                a.intermediate, a.vocab)
        bucket = lambda n: 1 << max(4, (n - 1).bit_length())  # noqa: E731
        args = ["--max-batch", str(a.prompts), "--batch-buckets", str(a.prompts),
                "--prompt-buckets", str(bucket(a.prompt_len)), "--gen-buckets", str(bucket(a.new_tokens)),
                "--skip-server-warmup"]
        server = launch_server(model_dir, extra_args=args, wait_s=600, log_path=os.path.join(tmp, "server.log"))
        try:
            res = asyncio.run(bench(server.url, model_dir, prompts, a.new_tokens, a.repeats))
        finally:
            server.stop()
        ours, theirs = res["ours"], res["hf"]
        ours["sync"] = res["sync"]
    print(f"embedded server (HTTP): {ours['tokens']} tokens in {ours['seconds']:.2f}s = "
          f"{ours['tokens_per_s']:.0f} tok/s (first call incl. compile {ours['first_call_s_incl_compile']:.1f}s)")
    print(f"transformers generate : {theirs['tokens']} tokens in {theirs['seconds']:.2f}s = "
          f"{theirs['tokens_per_s']:.0f} tok/s ({theirs['torch_threads']} torch threads)")
    print(f"weight sync (save + update_weights_from_disk + verify): {ours['sync']['total_s']:.2f}s "
          f"(save {ours['sync']['save_s']:.2f}s, update {ours['sync']['update_s']:.2f}s, "
          f"verify {ours['sync']['verify_s']:.3f}s)")
    result = {
        "bench": "rollout",
        "model": {"layers": a.layers, "hidden": a.hidden, "heads": a.heads, "kv_heads": a.kv_heads,
                  "intermediate": a.intermediate, "vocab": a.vocab},
        "prompts": a.prompts, "prompt_len": a.prompt_len, "new_tokens": a.new_tokens, "temperature": 1.0,
        "ours_tokens_per_s": round(ours["tokens_per_s"], 1),
        "transformers_tokens_per_s": round(theirs["tokens_per_s"], 1),
        "ratio": round(ours["tokens_per_s"] / theirs["tokens_per_s"], 3),
        # transformers' default sampling (top_k=50: a different, truncated distribution), for reference
        "transformers_default_topk50_tokens_per_s": round(theirs["tokens"] / theirs["default_top_k_s"], 1),
        "ratio_vs_default_topk50": round(theirs["default_top_k_s"] / ours["seconds"], 3),
        "ours_first_call_s": round(ours["first_call_s_incl_compile"], 2),
        "ours_runs_s": [round(x, 3) for x in ours["all_s"]],
        "transformers_runs_s": [round(x, 3) for x in theirs["all_s"]],
        "weight_sync_s": round(ours["sync"]["total_s"], 3),
        "weight_sync_save_s": round(ours["sync"]["save_s"], 3),
        "weight_sync_update_s": round(ours["sync"]["update_s"], 3),
        "weight_sync_verify_s": round(ours["sync"]["verify_s"], 4),
        "cpu_count": os.cpu_count(),
        # other processes on the machine skew both sides; the ratio is the figure to compare
        "loadavg_1min_start": round(load_start, 2),
        "loadavg_1min_end": round(os.getloadavg()[0], 2),
    }
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    sys.exit(main())
