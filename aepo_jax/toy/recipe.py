"""The built-in base model: a tiny Qwen2 warm-started on the toy task, saved in Hugging Face format.

Why noisy supervision: a base model for RL must be *partly* right, with real uncertainty, the way a
pretrained LLM is on math: pass@1 well inside (0, 1), token entropy well above 0, pass@k rising
with k. Training to convergence on correct solutions gives a model that is always right (nothing
for RL to do); stopping early gives one that fails at random places, including the format. So the
warm start trains on worked solutions in which every hop is misread with probability ``noise``
(the wrong digit is carried forward, as a model's mistake would be). A model that fits this data
reads each hop right with probability about ``1 - noise`` (more for easy links, less for hard
ones) and is otherwise fluent: pass@1 is about the mean of ``(1 - noise) ** hops`` over 2 to 4
hops, and RL can sharpen exactly those digit tokens, the entropy that GRPO collapses and AEPO
holds.

Outputs (``aepo_jax.toy.build_toy_base(out_dir)``): ``model.safetensors`` + ``config.json`` +
``generation_config.json`` (via :func:`aepo_jax.models.save_pretrained`), a real byte-level BPE
``tokenizer.json`` trained with the ``tokenizers`` library, with ``tokenizer_config.json`` and a chat
template (``AutoTokenizer.from_pretrained(out_dir)`` loads it and splits text exactly as the file
does), and ``toy_base.json`` with the build settings and teacher-forced diagnostics.

The build is the same bytes for the same recipe whatever process asks for it. XLA's CPU backend
splits long reductions (the K dimension of a matmul, a sum) into as many partial sums as its
thread pool has threads, and that pool is sized by the visible cores *and* by the number of
simulated host devices (``--xla_force_host_platform_device_count``), so a float32 training run of
700 steps lands on a different, and measurably weaker, model under ``--mesh=8x1`` than on one
device. :func:`~aepo_jax.toy.build.build_toy_base` therefore never trains in the calling process: it runs the recipe in
a fresh Python subprocess with one CPU device, one core (CPU affinity) and XLA's single-threaded
Eigen, so every reduction is summed in one fixed order (:data:`BUILD_ENV`, checked by the child).
:mod:`aepo_jax.toy.build` starts that subprocess (``python -m aepo_jax.toy``, :mod:`aepo_jax.toy.__main__`)
and caches the result.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from aepo_jax.data import toy_task
from aepo_jax.data.prompts import PromptConfig, tokenize_problems
from aepo_jax.data.toy_tokenizer import build_tokenizer, encode_responses, response_token_count, value_positions

logger = logging.getLogger(__name__)

BUILD_VERSION = 7  # bump when the built bytes change: cached models of another version are rebuilt
# (7: the decoder's layers became one scanned block; the same recipe trains to other float32 bytes)
# The one process environment the build runs in (see the module doc): one CPU device, XLA's Eigen
# single-threaded, and (set by the child itself) CPU affinity to one core.
BUILD_XLA_FLAGS = "--xla_force_host_platform_device_count=1 --xla_cpu_multi_thread_eigen=false"
BUILD_ENV = {
    "XLA_FLAGS": BUILD_XLA_FLAGS,
    "JAX_PLATFORMS": "cpu",
    "JAX_ENABLE_X64": "0",
    "TOKENIZERS_PARALLELISM": "false",
    "RAYON_NUM_THREADS": "1",
    "OMP_NUM_THREADS": "1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
}


@dataclass(frozen=True)
class ToyBaseConfig:
    """Recipe of the toy base model (all of it goes into ``toy_base.json``)."""

    seed: int = 0
    noise: float = 0.3  # mean probability that a training solution misreads a hop (see toy_task.link_noise)
    n_train_problems: int = 4096  # the toy task's train split (RL trains on the same problems)
    # (the problems are fixed; the misreads are drawn fresh every batch, so nothing is memorised)
    steps: int = 700  # the digit reads are learned by ~500 steps (to about 1 - noise)
    batch_size: int = 32
    lr: float = 1e-2
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
        if not 0 <= self.warmup_steps < self.steps:
            raise ValueError(f"ToyBaseConfig: warmup_steps ({self.warmup_steps}) must be in [0, steps={self.steps})")



@dataclass(frozen=True)
class LengthToyBaseConfig(ToyBaseConfig):
    """Recipe of the length variant's base model: the default recipe, trained on the length
    variant's grammar (``toy_task.VARIANTS``: a free number of opening filler words, see
    ``toy_task.length_filler_weights``), so its correct answers to one question draw a spread of
    lengths. A subclass rather than a field of :class:`ToyBaseConfig`: the default recipe, its
    ``toy_base.json`` and so its bytes stay exactly as they were."""

    # A stronger warm start than the default's (noise 0.3): with the free preamble the default noise
    # gives pass@1 0.22, low enough that guessing the box straight away is about as good as reading
    # the chain, so GRPO drifts to answers shorter than any correct chain, and a step has ~25 correct
    # answers to measure the length on; at 0.15 reading the chain clearly pays and twice as many are correct.
    noise: float = 0.15
    variant: str = "length"

    def __post_init__(self):
        super().__post_init__()
        if self.variant != "length":
            raise ValueError(f"LengthToyBaseConfig.variant must be 'length', got {self.variant!r}")


def recipe_variant(cfg: ToyBaseConfig) -> str:
    """The toy task variant a recipe trains on (``default`` for :class:`ToyBaseConfig`)."""
    return getattr(cfg, "variant", "default")


def recipe_from_dict(d: dict) -> ToyBaseConfig:
    """Inverse of ``dataclasses.asdict`` for either recipe (the build subprocess's argument)."""
    d = dict(d)
    variant = d.pop("variant", "default")
    if variant == "default":
        return ToyBaseConfig(**d)
    if variant == "length":
        return LengthToyBaseConfig(**d)
    raise ValueError(f"toy base recipe: variant {variant!r} is not one of {list(toy_task.VARIANTS)}")


def grammar_info(cfg: ToyBaseConfig) -> dict | None:
    """The variant's grammar settings (in ``toy_base.json``; the cache rebuilds when they change);
    None for the default, whose ``toy_base.json`` has no such entry."""
    if recipe_variant(cfg) == "default":
        return None
    return {"variant": recipe_variant(cfg), "max_fillers": toy_task.LENGTH_MAX_FILLERS,
            "filler_continue": toy_task.LENGTH_FILLER_CONTINUE}


def base_config_for(variant: str, **overrides) -> ToyBaseConfig:
    """The built-in base recipe of a toy task variant (``data.toy_variant``)."""
    return recipe_from_dict({**overrides, "variant": toy_task.check_variant(variant)})


# --- training data -------------------------------------------------------------------------------


@dataclass
class _Corpus:
    prompt_ids: list[tuple[int, ...]]
    problems: list[toy_task.ToyProblem]
    max_len: int


def _make_batch(corpus: _Corpus, idx: np.ndarray, noise: float, rng: random.Random, tokenizer, eos: int,
                variant: str = "default"):
    """Right-padded [B, L] ids, attention mask and loss mask (response tokens + EOS), with L the
    batch's longest sequence rounded up to a multiple of 16 (a few compiled shapes, little padding)."""
    b = len(idx)
    texts = [toy_task.noisy_solution_text(corpus.problems[i], noise, rng, variant) for i in idx]
    responses = [r + [eos] for r in encode_responses(tokenizer, texts)]
    longest = max(len(corpus.prompt_ids[i]) + len(r) for i, r in zip(idx, responses))
    length = min(corpus.max_len, -(-longest // 16) * 16)
    ids = np.zeros((b, length), np.int32)
    attn = np.zeros((b, length), np.int32)
    loss = np.zeros((b, length), np.float32)
    for r, (i, resp) in enumerate(zip(idx, responses)):
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


def _train(model, corpus: _Corpus, cfg: ToyBaseConfig, tokenizer, eos: int):
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
        ids, attn, mask = _make_batch(corpus, idx, cfg.noise, rng, tokenizer, eos, recipe_variant(cfg))
        loss = step(model, optimizer, jnp.asarray(ids), jnp.asarray(attn), jnp.asarray(mask))
        if s % 100 == 0 or s == cfg.steps - 1:
            losses.append((s, float(loss)))
            logger.info("toy base: step %d/%d loss %.4f", s, cfg.steps, float(loss))
    return losses


def teacher_forced_diagnostics(model, tokenizer, problems: list[toy_task.ToyProblem], variant: str = "default") -> dict:
    """Cheap checks on the *correct* solutions of held-out problems (no sampling):

    * ``p_correct_chain``: mean probability of writing the whole correct solution at T=1, a lower
      bound on pass@1 (other correct-answer paths exist only by luck);
    * ``value_token_p``: mean probability of the right digit at each hop (about ``1 - noise``);
    * ``entropy_per_token``: mean full-vocabulary entropy over response tokens (nats).
    """
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415

    eos = tokenizer.eos_token_id
    recs = [toy_task.problem_text(p) for p in problems]
    from aepo_jax.data.datasets import Problem  # noqa: PLC0415

    examples, _ = tokenize_problems([Problem(r, "", "toy", str(i)) for i, r in enumerate(recs)], tokenizer, PromptConfig(max_prompt_length=10_000))
    seqs, spans, value_pos = [], [], []
    # the clean solution in the grammar's most likely wording with three fillers (so the value
    # positions hold): the default's "okay so now", the length variant's "okay okay okay"
    fillers = toy_task.PLAIN_FILLERS if variant == "default" else (toy_task.FILLERS[0],) * toy_task.FILLER_SLOTS
    responses = encode_responses(tokenizer, [toy_task.solution_text(p, fillers=fillers, variant=variant) for p in problems])
    for ex, p, resp in zip(examples, problems, responses):
        resp = resp + [eos]
        start = len(ex.prompt_ids)
        seqs.append(list(ex.prompt_ids) + resp)
        spans.append((start, start + len(resp)))
        value_pos.append([start + v for v in value_positions(p)])
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



def pin_build_process() -> None:
    """In the build subprocess, before jax starts: check the environment, then take one core."""
    for k, v in BUILD_ENV.items():
        if os.environ.get(k) != v:
            raise RuntimeError(f"toy base: the build must run with {k}={v!r} (got {os.environ.get(k)!r}); use build_toy_base()")
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})



def build_in_this_process(out_dir: Path, cfg: ToyBaseConfig) -> Path:
    """The recipe itself, in this process (only ever the pinned subprocess: see the module doc)."""
    import jax  # noqa: PLC0415

    from aepo_jax.data.datasets import Problem  # noqa: PLC0415

    if jax.device_count() != 1 or jax.default_backend() != "cpu":
        raise RuntimeError(f"toy base: the build needs exactly one CPU device, got {jax.devices()}")
    from aepo_jax.models import ModelConfig, init_model, save_pretrained  # noqa: PLC0415

    t0 = time.time()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(out_dir)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id

    train, test = toy_task.make_splits(cfg.seed, cfg.n_train_problems, 256)
    rows = toy_task.to_records(train)
    problems = [Problem(r["prompt"], r["answer"], "toy", f"toy-train:{i}") for i, r in enumerate(rows)]
    # The same prompt path the trainer and eval use (auto -> this chat template + default instruction).
    examples, stats = tokenize_problems(problems, tokenizer, PromptConfig(max_prompt_length=10_000))
    # Every task word must be one token, or the value positions (and the model's job) shift.
    probe = train[: len(toy_task.SEPARATORS)]
    fill = toy_task.FILLERS
    texts = [toy_task.solution_text(p, separators=toy_task.SEPARATORS[i:] + toy_task.SEPARATORS[:i],
                                    fillers=[fill[(i + k) % len(fill)] for k in range(toy_task.FILLER_SLOTS)])
             for i, p in enumerate(probe)]
    lens = [len(r) for r in encode_responses(tokenizer, texts)]
    if lens != [response_token_count(p) for p in probe]:
        raise RuntimeError("toy base: the tokenizer splits task words into several tokens")
    # A misread leaves the path for at most one more hop (a distractor into its dead end).
    max_resp = max(toy_task.response_length_range(p, recipe_variant(cfg))[1] + toy_task.TOKENS_PER_HOP for p in train)
    max_len = -(-(max(len(e.prompt_ids) for e in examples) + max_resp) // 16) * 16
    corpus = _Corpus(prompt_ids=[e.prompt_ids for e in examples], problems=train, max_len=max_len)

    vocab_size = -(-len(tokenizer) // 64) * 64  # padded, as real checkpoints do (Qwen2.5: 151936)
    hf_cfg = model_hf_config(cfg, vocab_size, eos, pad)
    model = init_model(ModelConfig.from_hf_dict(hf_cfg), seed=cfg.seed, dtype="float32", mesh=None)
    losses = _train(model, corpus, cfg, tokenizer, eos)
    diag = teacher_forced_diagnostics(model, tokenizer, test, recipe_variant(cfg))

    save_pretrained(model, out_dir, dtype="float32", copy_tokenizer=False)
    gen = {"eos_token_id": eos, "pad_token_id": pad, "do_sample": True, "temperature": 1.0, "top_p": 1.0}
    (out_dir / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    info = {
        "build_version": BUILD_VERSION,
        "recipe": dataclasses.asdict(cfg),
        "task": dataclasses.asdict(toy_task.ToyTaskConfig()),
        **({"grammar": grammar_info(cfg)} if grammar_info(cfg) else {}),
        "max_len": max_len,
        "loss_curve": losses,
        "teacher_forced_test": diag,
        # Not the build time: every byte of the directory is a function of the recipe (and of
        # these versions), so two builds can be compared file by file.
        "built_with": {"jax": jax.__version__, "numpy": np.__version__, "xla_flags": BUILD_XLA_FLAGS},
    }
    (out_dir / "toy_base.json").write_text(json.dumps(info, indent=2) + "\n")
    logger.info("toy base built in %.1f s at %s: %s", time.time() - t0, out_dir, diag)
    return out_dir
