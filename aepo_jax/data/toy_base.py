"""The built-in base model: a tiny Qwen2 warm-started on the toy task, saved in Hugging Face format.

Why noisy supervision: a base model for RL must be *partly* right, with real uncertainty, the way a
pretrained LLM is on math: pass@1 well inside (0, 1), token entropy well above 0, pass@k rising
with k. Training to convergence on correct solutions gives a model that is always right (nothing
for RL to do); stopping early gives one that fails at random places, including the format. So the
warm start trains on worked solutions in which every step's value is wrong with probability
``noise`` (a wrong value is carried forward, as a model's mistake would be). A model that fits this
data writes the right value with probability about ``1 - noise`` at every step and is otherwise
fluent: pass@1 is about the mean of ``(1 - noise) ** steps`` (2 to 5 steps), and RL can sharpen
those value tokens, which is exactly the entropy that GRPO collapses and AEPO holds.

Outputs (``build_toy_base(out_dir)``): ``model.safetensors`` + ``config.json`` +
``generation_config.json`` (via :func:`aepo_jax.models.save_pretrained`), a real word-level
``tokenizer.json`` built with the ``tokenizers`` library with ``tokenizer_config.json`` and a chat
template (``AutoTokenizer.from_pretrained(out_dir)`` loads it), and ``toy_base.json`` with the build
settings and teacher-forced diagnostics. The build is deterministic given the seed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import logging
import os
import random
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from aepo_jax.data import toy_task
from aepo_jax.data.prompts import DEFAULT_INSTRUCTION, PromptConfig, tokenize_problems

logger = logging.getLogger(__name__)

BUILD_VERSION = 1  # bump when the recipe changes: cached models of another version are rebuilt
PAD, EOS, UNK = "<|pad|>", "<|endoftext|>", "<unk>"
GENERATION_PROMPT = "Answer:"
# The chat template writes the user's words, then the generation prompt. It keeps the problem and
# the default \boxed{} instruction word for word, so the generic prompt path (auto -> chat, default
# instruction) produces exactly the prompts the model was trained on.
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}" + GENERATION_PROMPT + "{% endif %}"
)


@dataclass(frozen=True)
class ToyBaseConfig:
    """Recipe of the toy base model (all of it goes into ``toy_base.json``)."""

    seed: int = 0
    noise: float = 0.2  # probability that a training solution writes a wrong value at a step
    n_train_problems: int = 4096  # the toy task's train split (RL trains on the same problems)
    steps: int = 1200
    batch_size: int = 64
    lr: float = 3e-3
    warmup_steps: int = 50
    hidden_size: int = 64
    intermediate_size: int = 256
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    max_position_embeddings: int = 128

    def __post_init__(self):
        if not 0.0 <= self.noise < 1.0:
            raise ValueError(f"ToyBaseConfig.noise must be in [0, 1), got {self.noise}")
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError("ToyBaseConfig: steps and batch_size must be >= 1")


# --- tokenizer -----------------------------------------------------------------------------------


def vocabulary() -> list[str]:
    """Token strings in id order: specials, the generation prompt, instruction words, task words."""
    words = [PAD, EOS, UNK, GENERATION_PROMPT] + DEFAULT_INSTRUCTION.split() + toy_task.vocabulary_words()
    out: list[str] = []
    for w in words:
        if w not in out:
            out.append(w)
    return out


def build_tokenizer(out_dir: str | Path):
    """Write a word-level ``tokenizer.json`` (+ config, chat template); return the HF tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: PLC0415
    from transformers import AutoTokenizer, PreTrainedTokenizerFast  # noqa: PLC0415

    vocab = {w: i for i, w in enumerate(vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    for special in (PAD, EOS, UNK):
        tok.add_special_tokens([special])
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=PAD, unk_token=UNK)
    hf.chat_template = CHAT_TEMPLATE
    hf.padding_side = "left"
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(out_dir)
    return AutoTokenizer.from_pretrained(out_dir)


# --- training data -------------------------------------------------------------------------------


def noisy_wrong_values(p: toy_task.ToyProblem, noise: float, rng: random.Random) -> dict[int, int]:
    """Which steps of a training solution get a wrong value, and which (never the right one)."""
    wrong: dict[int, int] = {}
    value = p.start
    for i, (op, x) in enumerate(p.steps):
        right = toy_task.apply_op(value, op, x)
        if rng.random() < noise:
            value = rng.choice([d for d in range(toy_task.MODULUS) if d != right])
            wrong[i] = value
        else:
            value = right
    return wrong


def _encode_words(text: str, vocab: dict[str, int]) -> list[int]:
    return [vocab[w] for w in text.split()]


@dataclass
class _Corpus:
    prompt_ids: list[tuple[int, ...]]
    problems: list[toy_task.ToyProblem]
    max_len: int


def _make_batch(corpus: _Corpus, idx: np.ndarray, noise: float, rng: random.Random, vocab: dict[str, int], eos: int):
    """Right-padded [B, max_len] ids, attention mask and loss mask (response tokens + EOS)."""
    b = len(idx)
    ids = np.zeros((b, corpus.max_len), np.int32)
    attn = np.zeros((b, corpus.max_len), np.int32)
    loss = np.zeros((b, corpus.max_len), np.float32)
    for r, i in enumerate(idx):
        p = corpus.problems[i]
        resp = _encode_words(toy_task.solution_text(p, noisy_wrong_values(p, noise, rng)), vocab) + [eos]
        seq = list(corpus.prompt_ids[i]) + resp
        ids[r, : len(seq)] = seq
        attn[r, : len(seq)] = 1
        loss[r, len(corpus.prompt_ids[i]) : len(seq)] = 1.0  # predict response tokens and EOS only
    return ids, attn, loss


# --- model -------------------------------------------------------------------------------------


def model_hf_config(cfg: ToyBaseConfig, vocab_size: int, eos_id: int, pad_id: int) -> dict:
    head_dim = cfg.hidden_size // cfg.num_heads
    return {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "vocab_size": vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": head_dim,
        "max_position_embeddings": cfg.max_position_embeddings,
        "rope_theta": 10000.0,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": True,
        "hidden_act": "silu",
        "eos_token_id": eos_id,
        "pad_token_id": pad_id,
        "bos_token_id": None,
    }


def _train(model, corpus: _Corpus, cfg: ToyBaseConfig, vocab: dict[str, int], eos: int):
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415
    import optax  # noqa: PLC0415
    from flax import nnx  # noqa: PLC0415

    schedule = optax.warmup_cosine_decay_schedule(0.0, cfg.lr, cfg.warmup_steps, cfg.steps, end_value=cfg.lr * 0.1)
    optimizer = nnx.Optimizer(model, optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.0)), wrt=nnx.Param)

    def loss_fn(m, ids, attn, mask):
        logits = m(ids, attention_mask=attn)[:, :-1]
        logp = jax.nn.log_softmax(logits, axis=-1)
        nll = -jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0]
        w = mask[:, 1:]
        return (nll * w).sum() / jnp.maximum(w.sum(), 1.0)

    @nnx.jit
    def step(m, opt, ids, attn, mask):
        loss, grads = nnx.value_and_grad(loss_fn)(m, ids, attn, mask)
        opt.update(m, grads)
        return loss

    rng = random.Random(f"toy-base-noise-{cfg.seed}")
    order = np.random.default_rng(cfg.seed)
    losses = []
    for s in range(cfg.steps):
        idx = order.integers(0, len(corpus.problems), cfg.batch_size)
        ids, attn, mask = _make_batch(corpus, idx, cfg.noise, rng, vocab, eos)
        loss = step(model, optimizer, jnp.asarray(ids), jnp.asarray(attn), jnp.asarray(mask))
        if s % 100 == 0 or s == cfg.steps - 1:
            losses.append((s, float(loss)))
            logger.info("toy base: step %d/%d loss %.4f", s, cfg.steps, float(loss))
    return losses


def teacher_forced_diagnostics(model, tokenizer, problems: list[toy_task.ToyProblem]) -> dict:
    """Cheap checks on the *correct* solutions of held-out problems (no sampling):

    * ``p_correct_chain``: mean probability of writing the whole correct solution at T=1, a lower
      bound on pass@1 (other correct-answer paths exist only by luck);
    * ``value_token_p``: mean probability of the right value at each step (about ``1 - noise``);
    * ``entropy_per_token``: mean full-vocabulary entropy over response tokens (nats).
    """
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415

    vocab = tokenizer.get_vocab()
    eos = tokenizer.eos_token_id
    recs = [toy_task.problem_text(p) for p in problems]
    from aepo_jax.data.datasets import Problem  # noqa: PLC0415

    examples, _ = tokenize_problems([Problem(r, "", "toy", str(i)) for i, r in enumerate(recs)], tokenizer, PromptConfig(max_prompt_length=10_000))
    seqs, spans, value_pos = [], [], []
    for ex, p in zip(examples, problems):
        resp = _encode_words(toy_task.solution_text(p), vocab) + [eos]
        start = len(ex.prompt_ids)
        seqs.append(list(ex.prompt_ids) + resp)
        spans.append((start, start + len(resp)))
        value_pos.append([start + 2 + 2 * i for i in range(len(p.steps))])  # "v0 op v1 op v2 ... box"
    L = max(map(len, seqs))
    ids = np.zeros((len(seqs), L), np.int32)
    attn = np.zeros_like(ids)
    for r, s in enumerate(seqs):
        ids[r, : len(s)] = s
        attn[r, : len(s)] = 1
    logp = np.asarray(jax.jit(lambda i, a: jax.nn.log_softmax(model(i, attention_mask=a), -1))(jnp.asarray(ids), jnp.asarray(attn)))
    ent = -(np.exp(logp) * logp).sum(-1)
    chain_lp, vals, ents = [], [], []
    for r, (a, b) in enumerate(spans):
        tok_lp = [logp[r, t - 1, ids[r, t]] for t in range(a, b)]
        chain_lp.append(sum(tok_lp))
        vals += [np.exp(logp[r, t - 1, ids[r, t]]) for t in value_pos[r]]
        ents += [ent[r, t - 1] for t in range(a, b)]
    return {
        "p_correct_chain": float(np.mean(np.exp(chain_lp))),
        "value_token_p": float(np.mean(vals)),
        "entropy_per_token": float(np.mean(ents)),
        "n_problems": len(problems),
    }


def build_toy_base(out_dir: str | Path, cfg: ToyBaseConfig = ToyBaseConfig()) -> Path:
    """Build the toy base model into ``out_dir`` (overwritten); return the path."""
    import jax  # noqa: PLC0415

    from aepo_jax.data.datasets import Problem  # noqa: PLC0415
    from aepo_jax.models import ModelConfig, init_model, save_pretrained  # noqa: PLC0415

    t0 = time.time()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(out_dir)
    vocab = tokenizer.get_vocab()
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id

    train, test = toy_task.make_splits(cfg.seed, cfg.n_train_problems, 256)
    rows = toy_task.to_records(train)
    problems = [Problem(r["prompt"], r["answer"], "toy", f"toy-train:{i}") for i, r in enumerate(rows)]
    # The same prompt path the trainer and eval use (auto -> this chat template + default instruction).
    examples, stats = tokenize_problems(problems, tokenizer, PromptConfig(max_prompt_length=10_000))
    unk = tokenizer.convert_tokens_to_ids(UNK)
    if any(unk in ex.prompt_ids for ex in examples):
        raise RuntimeError("toy base: a prompt produced <unk>; the vocabulary and the prompt template disagree")
    max_resp = 2 * max(len(p.steps) for p in train) + 3
    max_len = max(len(e.prompt_ids) for e in examples) + max_resp
    max_len = -(-max_len // 8) * 8  # one compiled shape, a multiple of 8
    corpus = _Corpus(prompt_ids=[e.prompt_ids for e in examples], problems=train, max_len=max_len)

    hf_cfg = model_hf_config(cfg, len(vocab), eos, pad)
    model = init_model(ModelConfig.from_hf_dict(hf_cfg), seed=cfg.seed, dtype="float32", mesh=None)
    losses = _train(model, corpus, cfg, vocab, eos)
    diag = teacher_forced_diagnostics(model, tokenizer, test)

    save_pretrained(model, out_dir, dtype="float32", copy_tokenizer=False)
    gen = {"eos_token_id": eos, "pad_token_id": pad, "do_sample": True, "temperature": 1.0, "top_p": 1.0}
    (out_dir / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    info = {
        "build_version": BUILD_VERSION,
        "recipe": dataclasses.asdict(cfg),
        "task": {"modulus": toy_task.MODULUS, **dataclasses.asdict(toy_task.ToyTaskConfig())},
        "max_len": max_len,
        "loss_curve": losses,
        "teacher_forced_test": diag,
        "build_seconds": round(time.time() - t0, 1),
        "jax_backend": jax.default_backend(),
    }
    (out_dir / "toy_base.json").write_text(json.dumps(info, indent=2) + "\n")
    logger.info("toy base built in %.1f s at %s: %s", time.time() - t0, out_dir, diag)
    return out_dir


# --- cache ---------------------------------------------------------------------------------------


def default_cache_dir() -> Path:
    root = os.environ.get("AEPO_JAX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "aepo_jax")
    return Path(root)


def _is_complete(path: Path, cfg: ToyBaseConfig) -> bool:
    try:
        info = json.loads((path / "toy_base.json").read_text())
    except (OSError, ValueError):
        return False
    return (
        info.get("build_version") == BUILD_VERSION
        and info.get("recipe") == dataclasses.asdict(cfg)
        and (path / "model.safetensors").exists()
        and (path / "tokenizer.json").exists()
    )


def ensure_toy_base(cache_dir: str | os.PathLike | None = None, cfg: ToyBaseConfig = ToyBaseConfig()) -> str:
    """Path of the toy base model under ``cache_dir`` (default ``$AEPO_JAX_CACHE`` or
    ``~/.cache/aepo_jax``), building it first if it is missing or was built by another recipe.

    Safe to call from several processes at once: one builds (under a file lock) into a temporary
    directory that is renamed into place, the others wait and then reuse it.
    """
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    target = root / f"toy_base-v{BUILD_VERSION}-seed{cfg.seed}"
    if _is_complete(target, cfg):
        return str(target)
    with open(root / ".toy_base.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if _is_complete(target, cfg):
                return str(target)
            tmp = Path(tempfile.mkdtemp(prefix=".toy_base-", dir=root))
            try:
                logger.warning("building the toy base model into %s (once; about a minute or two on CPU)", target)
                build_toy_base(tmp, cfg)
                if target.exists():
                    shutil.rmtree(target)
                tmp.rename(target)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    shutil.rmtree(tmp)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return str(target)
