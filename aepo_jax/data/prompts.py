"""Problems -> prompt token ids: the tokenizer's chat template, or a plain template.

``template="chat"`` renders ``[{"role": "user", "content": problem + " " + instruction}]`` with the
tokenizer's chat template (a verl-style message list is rendered as it is: such files already
carry their instruction). ``template="plain"`` writes ``problem + "\\n" + instruction`` and
tokenizes it with the tokenizer's special tokens (e.g. a BOS). ``"auto"`` is chat when the
tokenizer has a chat template, else plain.

The default instruction asks for the final answer in ``\\boxed{}`` (the Qwen2.5-Math prompt,
which the paper's math rewards rely on). Prompts longer than ``max_prompt_length`` tokens are
dropped and counted (never truncated: a cut-off problem is a different problem).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from aepo_jax.data.datasets import Problem

logger = logging.getLogger(__name__)

DEFAULT_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
TEMPLATES = ("auto", "chat", "plain")


@dataclass
class PromptConfig:
    template: str = "auto"  # auto | chat | plain
    instruction: str = DEFAULT_INSTRUCTION  # appended to a text problem; "" = none
    max_prompt_length: int = 1024  # in tokens; longer prompts are dropped and counted
    system_prompt: str = ""  # optional system message for chat templates

    def __post_init__(self):
        if self.template not in TEMPLATES:
            raise ValueError(f"prompt template must be one of {TEMPLATES}, got {self.template!r}")
        if self.max_prompt_length < 1:
            raise ValueError(f"max_prompt_length must be >= 1, got {self.max_prompt_length}")


@dataclass(frozen=True)
class Example:
    """A tokenized prompt ready for the rollout: what the pipeline yields (in batches)."""

    uid: str
    prompt_ids: tuple[int, ...]
    answer: str
    source: str
    prompt_text: str


@dataclass
class PromptStats:
    kept: int = 0
    dropped_too_long: int = 0
    longest_kept: int = 0


def _has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def render_prompt(problem: Problem, tokenizer, cfg: PromptConfig) -> tuple[str, bool]:
    """``(text, is_chat)``: the prompt as text, and whether it came from the chat template (then
    it already holds any special tokens and must be tokenized without adding more)."""
    use_chat = cfg.template == "chat" or (cfg.template == "auto" and _has_chat_template(tokenizer))
    messages = problem.messages
    if use_chat:
        if not _has_chat_template(tokenizer):
            raise ValueError("prompt template 'chat' but the tokenizer has no chat_template; use template='plain'")
        if messages is None:
            content = problem.prompt if not cfg.instruction else f"{problem.prompt} {cfg.instruction}"
            messages = [{"role": "user", "content": content}]
        if cfg.system_prompt and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": cfg.system_prompt}, *messages]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return text, True
    if messages is not None:
        body = "\n".join(m["content"] for m in messages)
        return body, False  # a message list already carries its instruction
    text = problem.prompt if not cfg.instruction else f"{problem.prompt}\n{cfg.instruction}"
    return text, False


def tokenize_problems(
    problems: Sequence[Problem], tokenizer, cfg: PromptConfig = PromptConfig()
) -> tuple[list[Example], PromptStats]:
    """Render and tokenize every problem; drop (and count) those over ``max_prompt_length``."""
    stats = PromptStats()
    examples: list[Example] = []
    texts, chat_flags = zip(*(render_prompt(p, tokenizer, cfg) for p in problems)) if problems else ((), ())
    # One batched call per flavour: fast tokenizers encode a list far faster than one by one.
    ids_by_index: dict[int, list[int]] = {}
    for is_chat in (True, False):
        idx = [i for i, c in enumerate(chat_flags) if c == is_chat]
        if not idx:
            continue
        enc = tokenizer([texts[i] for i in idx], add_special_tokens=not is_chat)["input_ids"]
        ids_by_index.update(zip(idx, enc))
    for i, p in enumerate(problems):
        ids = ids_by_index[i]
        if len(ids) > cfg.max_prompt_length:
            stats.dropped_too_long += 1
            continue
        stats.kept += 1
        stats.longest_kept = max(stats.longest_kept, len(ids))
        examples.append(Example(uid=p.uid, prompt_ids=tuple(int(t) for t in ids), answer=p.answer, source=p.source, prompt_text=texts[i]))
    if stats.dropped_too_long:
        logger.warning(
            "dropped %d of %d prompts longer than max_prompt_length=%d tokens",
            stats.dropped_too_long,
            len(problems),
            cfg.max_prompt_length,
        )
    return examples, stats
