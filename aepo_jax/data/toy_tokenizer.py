"""The built-in toy task's tokenizer: a real byte-level BPE with Qwen2's pipeline, trained with
the ``tokenizers`` library so that every word of the task is one token, and its chat template.

:func:`build_tokenizer` writes it next to the toy base model (``aepo_jax.toy``); tests build it
alone for tiny models.
"""

from __future__ import annotations

from pathlib import Path

from aepo_jax.data import toy_task
from aepo_jax.data.prompts import DEFAULT_INSTRUCTION

PAD, EOS = "<|pad|>", "<|endoftext|>"
GENERATION_PROMPT = "Answer:"
# The chat template writes the user's words, then the generation prompt. It keeps the problem and
# the default \boxed{} instruction word for word, so the generic prompt path (auto -> chat, default
# instruction) produces exactly the prompts the model was trained on.
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}" + GENERATION_PROMPT + "{% endif %}"
)


# Qwen2's pre-tokenizer split (transformers' Qwen2Tokenizer): letters-words with one optional
# leading non-letter, single digits, punctuation runs, whitespace.
QWEN2_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)


def tokenizer_corpus() -> list[str]:
    """Everything the toy model reads or writes: the chat template's words, the default
    instruction, and every word of the task."""
    return [GENERATION_PROMPT, DEFAULT_INSTRUCTION, *toy_task.corpus_texts()]


def build_tokenizer(out_dir: str | Path):
    """Write the toy tokenizer (``tokenizer.json`` + config + chat template); return it loaded.

    It is a byte-level BPE with Qwen2's pre-tokenizer, normaliser and decoder, trained with the
    ``tokenizers`` library on :func:`tokenizer_corpus` until every pre-token piece of that corpus
    is one token. The reason for Qwen2's exact pipeline: transformers 5 loads any ``model_type:
    qwen2`` directory with its own Qwen2Tokenizer, which rebuilds the pre-tokenizer from that
    recipe and keeps only vocab and merges from ``tokenizer.json``; a tokenizer built any other
    way would silently tokenize differently there (and in SGLang) than in the trainer.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers  # noqa: PLC0415
    from transformers import AutoTokenizer, PreTrainedTokenizerFast  # noqa: PLC0415

    tok = Tokenizer(models.BPE(continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=4096,  # an upper bound: training stops when every corpus piece is one token
        min_frequency=1,
        special_tokens=[PAD, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # any text stays encodable
        show_progress=False,
    )
    tok.train_from_iterator(tokenizer_corpus(), trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=PAD, unk_token=None)
    hf.chat_template = CHAT_TEMPLATE
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(out_dir)
    return AutoTokenizer.from_pretrained(out_dir)



def response_token_count(p: toy_task.ToyProblem) -> int:
    """Tokens of a clean worked solution without EOS: fillers, space, start, 3 per hop (link,
    separator, digit), 5 for " \\boxed{d}"."""
    return toy_task.response_tokens(p) - 1


def value_positions(p: toy_task.ToyProblem) -> list[int]:
    """Indices (in a clean response) of the digit written after each hop."""
    return [toy_task.FILLER_SLOTS + 1 + toy_task.TOKENS_PER_HOP * (i + 1) for i in range(p.hops)]


def encode_responses(tokenizer, texts: list[str]) -> list[list[int]]:
    return tokenizer(texts, add_special_tokens=False)["input_ids"]
