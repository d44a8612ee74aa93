"""Tiny random checkpoints for the rollout tests and benchmark (no downloads).

``make_tiny_model_dir`` writes a random Qwen2 with transformers + torch (``save_pretrained``), and
optionally a small byte-level BPE tokenizer trained on a built-in text, into a directory that
``aepo_jax.models.load_pretrained``, the embedded server and transformers can all read. torch and
transformers are test-time dependencies only; they are imported inside the function.

Also: SGLang's own JSON contract (``sglang/api/v1/api_types.py``), loaded by file path so that
``sglang/__init__`` (which needs torch, numpy, zmq, ...) never runs.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys

_CORPUS = (
    "the quick brown fox jumps over the lazy dog. 1 + 1 = 2, 2 + 2 = 4, 3 * 3 = 9. "
    "what is the answer? the answer is 42. please reason step by step and put the final answer "
    "in a box. hello world, hello rollout, hello server. "
) * 4

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>")  # ids 0, 1, 2; "</s>" is the EOS


def make_tokenizer(out_dir: str, vocab_size: int) -> int:
    """Train a byte-level BPE of ``vocab_size`` tokens into out_dir; returns the EOS id."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([_CORPUS], trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(out_dir)
    return tok.token_to_id("</s>")


def make_tiny_model_dir(out_dir: str, *, seed: int = 0, vocab_size: int = 320, hidden_size: int = 64,
                        intermediate_size: int = 128, num_layers: int = 2, num_heads: int = 4,
                        num_kv_heads: int = 2, max_position_embeddings: int = 512,
                        init_std: float = 0.02, with_tokenizer: bool = False, eos_token_id: int = 2) -> str:
    """A random Qwen2 checkpoint (fp32 safetensors) in ``out_dir``; returns out_dir.

    ``init_std`` is transformers' ``initializer_range``: a larger value gives peaked next-token
    distributions (useful to make temperature visible in a test)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    os.makedirs(out_dir, exist_ok=True)
    if with_tokenizer:
        eos_token_id = make_tokenizer(out_dir, vocab_size)
    cfg = Qwen2Config(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
                      num_hidden_layers=num_layers, num_attention_heads=num_heads,
                      num_key_value_heads=num_kv_heads, max_position_embeddings=max_position_embeddings,
                      initializer_range=init_std, eos_token_id=eos_token_id, bos_token_id=1,
                      pad_token_id=0, tie_word_embeddings=False, torch_dtype="float32")
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(cfg).eval()
    model.save_pretrained(out_dir, safe_serialization=True)
    with open(os.path.join(out_dir, "generation_config.json"), "w") as f:
        json.dump({"eos_token_id": eos_token_id, "bos_token_id": 1, "pad_token_id": 0}, f)
    return out_dir


def load_sglang_api_types():
    """SGLang 0.5.23's generated JSON contract module, or None when sglang is not installed."""
    if "sgl_api_types" in sys.modules:
        return sys.modules["sgl_api_types"]
    spec0 = importlib.util.find_spec("sglang")
    if spec0 is None or not spec0.submodule_search_locations:
        return None
    path = os.path.join(list(spec0.submodule_search_locations)[0], "api", "v1", "api_types.py")
    if not os.path.exists(path):
        return None
    spec = importlib.util.spec_from_file_location("sgl_api_types", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["sgl_api_types"] = mod
    spec.loader.exec_module(mod)
    return mod
