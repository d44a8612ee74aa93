"""The trainer's configuration tree (plain data, validated once at start-up).

Every option is listed, with its default, by ``python -m aepo_jax.train --help``. The defaults are
the built-in toy run (a tiny model on the built-in link-following task, CPU-friendly); the YAML files in
``configs/`` set the paper's values (Table 4 of arXiv 2510.08141) and name their source.
The checks (``validate``, ``validate_mesh``) are in :mod:`aepo_jax.trainer.config_checks`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from aepo_jax.config import ConfigError  # noqa: F401 - re-exported: the error validate() raises
from aepo_jax.entropy_control import ControllerConfig, TargetSchedule
from aepo_jax.losses import LossConfig
from aepo_jax.methods import METHODS as METHOD_TABLE, method_help
# Validation lives in config_checks.py; these names are part of this module's interface.
from aepo_jax.trainer.config_checks import uses_on_policy_update, validate, validate_mesh  # noqa: F401

METHODS = tuple(METHOD_TABLE)  # the names of aepo_jax/methods.py's table


def _help(text: str):
    return {"help": text}


@dataclass
class ModelSection:
    """Policy model: a local Hugging Face directory (qwen2 / qwen3 / llama)."""

    path: str = field(default="", metadata=_help("HF model dir; empty = the built-in toy base model (built once, cached)"))
    dtype: str = field(default="float32", metadata=_help("parameter dtype: float32 | bfloat16"))
    compute_dtype: str = field(default="", metadata=_help("activation dtype; empty = same as dtype"))
    remat: bool | str = field(default=False, metadata=_help(
        "what each decoder layer recomputes in the backward pass: none | full | dots | dots_except_mlp | "
        "attn_context (false = none, true = full; docs/scale.md)"))
    logprob_chunk: int = field(default=256, metadata=_help("sequence chunk of the log-prob/entropy head"))
    shared_prefix: str = field(default="auto", metadata=_help(
        "the learner's passes run each distinct prompt through the decoder once and the step's samples continue "
        "it (the same numbers up to rounding): auto (on when the mesh's data axis is 1) | on | off (docs/performance.md)"))


@dataclass
class DataSection:
    """Training prompts (JSONL or Parquet; verl / EasyR1 layouts)."""

    train_files: list[str] = field(default_factory=list, metadata=_help("files; empty = the built-in toy task"))
    toy_variant: str = field(default="default", metadata=_help(
        "the built-in task's variant (no train_files): default | length (a free number of opening filler words, "
        "so correct answers can be shorter or longer; its own base model; configs/toy_length.yaml)"))
    prompt_key: str = field(default="auto", metadata=_help("dotted field path; auto = prompt/problem/question/..."))
    answer_key: str = field(default="auto", metadata=_help("dotted field path; auto = reward_model.ground_truth/answer/..."))
    template: str = field(default="auto", metadata=_help("auto | chat | plain"))
    max_prompt_length: int = 128
    prompts_per_step: int = field(default=16, metadata=_help("prompts per RL step (the paper's batch size, 512)"))
    shuffle: bool = True
    seed: int = 0
    skip_bad_rows: bool = field(default=False, metadata=_help("skip and count bad rows instead of failing"))


@dataclass
class RolloutSection:
    """Sampling through SGLang's HTTP API (external servers or the embedded one)."""

    urls: list[str] = field(default_factory=list, metadata=_help("SGLang server URLs; empty = start the embedded server"))
    weight_update_urls: list[str] = field(default_factory=list, metadata=_help(
        "servers that receive weight updates; empty = the urls (with sglang-router: the workers' URLs)"))
    n: int = field(default=8, metadata=_help("samples per prompt, G"))
    max_new_tokens: int = 48
    temperature: float = field(default=1.0, metadata=_help("temperature of the GRPO rollout (the paper's 1.0)"))
    top_p: float = 1.0
    top_k: int = -1
    request_timeout_s: float = 600.0
    request_deadline_s: float = field(default=3600.0, metadata=_help("wall clock of one rollout call, retries included"))
    health_check_timeout_s: float = field(default=5.0, metadata=_help("a server whose /health misses this twice in a row while it holds requests fails over"))
    max_retries: int = 3
    startup_timeout_s: float = 300.0
    sync: str = field(default="disk", metadata=_help(
        "how updated weights reach the servers: disk (an HF checkpoint in sync_dir, /update_weights_from_disk) | "
        "distributed (a torch.distributed broadcast of HF buckets, /update_weights_from_distributed; needs torch)"))
    sync_dir: str = field(default="", metadata=_help("where weights are written for the servers; empty = /dev/shm or tmp"))
    sync_bucket_mb: float = field(default=512.0, metadata=_help("sync=distributed: MiB per broadcast bucket"))
    sync_backend: str = field(default="auto", metadata=_help("sync=distributed: auto (nccl on GPU, gloo on CPU) | nccl | gloo"))
    sync_master_address: str = field(default="", metadata=_help(
        "sync=distributed: the address servers reach the learner at; empty = loopback for local servers, "
        "else the interface that routes to them"))
    sync_master_port: int = field(default=0, metadata=_help("sync=distributed: the group's TCP port; 0 = a free one"))
    server_args: str = field(default="", metadata=_help("extra args for the embedded server"))


@dataclass
class ControllerSection:
    """AEPO's entropy controller: T = T_high if H < target else T_low."""

    target: str = field(default="0.6", metadata=_help(
        "entropy target H (nats/token): a number, or a schedule 'linear:START:END:STEP0:STEP1', "
        "'cosine:START:END:STEP0:STEP1', 'piecewise:STEP=H,STEP=H,...'"))
    t_high: float = 1.2
    t_low: float = 0.8
    budget_up: int = field(default=60, metadata=_help("positive samples kept per step when raising entropy"))
    budget_down: int = field(default=30, metadata=_help("positive samples kept per step when lowering entropy"))
    estimator: str = field(default="full", metadata=_help("full (exact token entropy) | sampled (-log pi of sampled token)"))
    dead_band: float = field(default=0.0, metadata=_help("half-width of a band around the target; 0 = off (the paper's hard switch)"))
    band_mode: str = field(default="hold", metadata=_help(
        "inside the dead band: hold (keep the previous T) | idle (no temperature samples)"))
    budget_mode: str = field(default="fixed", metadata=_help(
        "fixed (the paper: full budget every step) | proportional (budget x min(1, |H - target| / (proportional_width x target))) "
        "| pi (proportional-integral: direction and budget from the relative error and its sum; docs/training.md) "
        "| pid (the paper's rule until the target is reached, then the budget from the error in units of H0, "
        "its slope and its sum; docs/training.md)"))
    proportional_width: float | None = field(default=None, metadata=_help(
        "relative error at which the proportional (pi, pid) budget is full; none = 0.1 (proportional), 0.3 (pi), "
        "0.6 (pid, whose error is relative to H0)"))
    integral_gain: float | None = field(default=None, metadata=_help(
        "budget_mode=pi / pid: weight of the summed relative error; none = 0.03 (pi), 0.1 (pid)"))
    derivative_steps: float = field(default=3.0, metadata=_help(
        "budget_mode=pid: steps ahead the error is extrapolated along its slope (the derivative gain)"))
    derivative_window: int = field(default=5, metadata=_help(
        "budget_mode=pid: decisions the error's slope is fitted over (>= 3)"))
    target_relative: bool = field(default=False, metadata=_help(
        "read the target's values as multiples of H0, the entropy measured at the first step (0.5 = half the base model's)"))
    signal: str = field(default="entropy", metadata=_help(
        "the statistic held at the target: entropy (nats/token, the paper) | length (mean tokens of the correct "
        "responses; shorter / longer correct samples instead of a temperature, see docs/targets.md)"))
    initial_entropy: float | None = field(default=None, metadata=_help(
        "entropy assumed before the first measurement; none = raise first (the authors' code starts from 0)"))


@dataclass
class ClipCovSection:
    """Clip-Cov (``--method=clip_cov``); defaults are verl's."""

    ratio: float = field(default=0.0002, metadata=_help("share of the tokens detached (at least one)"))
    lb: float = field(default=1.0, metadata=_help("lower end of the covariance band tokens are drawn from"))
    ub: float = field(default=5.0, metadata=_help("upper end of the covariance band"))


@dataclass
class KlCovSection:
    """KL-Cov (``--method=kl_cov``); defaults are verl's."""

    ratio: float = field(default=0.0002, metadata=_help("share of the tokens, highest covariance first, penalised (at least one)"))
    coef: float = field(default=1.0, metadata=_help("weight of the |log pi - log pi_old| penalty (verl's ppo_kl_coef)"))


@dataclass
class AlgorithmSection:
    """Method, AEPO reading, loss settings."""

    method: str = field(default="aepo", metadata=_help(method_help()))
    reading: str = field(default="paper", metadata=_help("paper (Eq. 1, explicit alpha) | mix (authors' code)"))
    reward: str = field(default="auto", metadata=_help(
        "auto (toy task: toy, else math) | a registered name (math, exact_match, toy) | module:function"))
    reg_prompt_fraction: float = field(default=1.0, metadata=_help(
        "share of the step's prompts given a temperature rollout (the authors' code: 0.25)"))
    reg_samples_per_prompt: int = field(default=0, metadata=_help("samples per prompt in the temperature rollout; 0 = rollout.n"))
    clip_low: float = 0.2
    clip_high: float = 0.2
    clip_dual: float = field(default=0.0, metadata=_help("dual-clip constant (3.0 in DAPO/verl); 0 = off"))
    alpha: float = field(default=1.0, metadata=_help("weight of AEPO's REINFORCE term (paper reading)"))
    entropy_coef: float = field(default=0.015, metadata=_help("Entropy-Reg lambda"))
    adv_beta: float = field(default=0.4, metadata=_help("Entropy-Adv beta"))
    adv_kappa: float = field(default=2.0, metadata=_help("Entropy-Adv kappa"))
    agg: str = field(default="seq-mean-token-mean", metadata=_help("seq-mean-token-mean (Eq. 1) | token-mean"))
    reg_norm: str = field(default="main", metadata=_help(
        "denominator of the REINFORCE term: main (the GRPO samples') | reg (the kept positives') | joint (all rows)"))
    log_ratio_clamp: float = field(default=20.0, metadata=_help("|log pi - log pi_old| is clamped to this before exp"))
    controller: ControllerSection = field(default_factory=ControllerSection)
    clip_cov: ClipCovSection = field(default_factory=ClipCovSection)
    kl_cov: KlCovSection = field(default_factory=KlCovSection)


@dataclass
class OptimSection:
    """AdamW via optax."""

    lr: float = 1e-3
    schedule: str = field(default="constant", metadata=_help("constant | cosine | linear (after warm-up)"))
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    grad_clip: float = field(default=1.0, metadata=_help("global-norm clip; 0 = off"))


@dataclass
class TrainSection:
    """The loop."""

    steps: int = 100
    mini_batch_prompts: int = field(default=0, metadata=_help("prompts per update; 0 = all prompts of the step (one update)"))
    epochs: int = field(default=1, metadata=_help("passes over each step's batch"))
    old_logp: str = field(default="auto", metadata=_help(
        "auto (on-policy, i.e. 1 epoch of 1 mini-batch: log pi_old = sg(log pi) of the update's own forward pass, "
        "and the controller's entropy is measured on the T = 1 rollout only for methods with a second rollout; "
        "else recompute) | reuse (no separate pass at all; the controller reads the previous update's entropy) | "
        "recompute (a separate pass over every row; the paper-exact path)"))
    micro_batch_size: int = field(default=0, metadata=_help("samples per gradient-accumulation micro-batch; 0 = none"))
    seed: int = 0
    mesh: str = field(default="", metadata=_help("DxT: D-way data/FSDP x T-way tensor parallel; empty = all devices x 1"))
    run_dir: str = "runs/aepo-toy"
    resume: bool = field(default=True, metadata=_help("continue from the run dir's latest checkpoint"))
    coordinator_address: str = field(default="", metadata=_help("multi-host: host:port of process 0 (empty = auto-detect / single host)"))
    num_processes: int = field(default=0, metadata=_help("multi-host: number of processes (0 = auto)"))
    process_id: int = field(default=-1, metadata=_help("multi-host: this process's index (-1 = auto)"))
    compilation_cache: str = field(default="auto", metadata=_help(
        "JAX persistent compilation cache: auto ($AEPO_JAX_CACHE or ~/.cache/aepo_jax, /jax/<versions>) | off | DIR"))


@dataclass
class CheckpointSection:
    """Orbax checkpoints in RUN_DIR/checkpoints."""

    every: int = 10
    keep: int = 3


@dataclass
class LoggingSection:
    """Where metrics go (metrics.jsonl always)."""

    tensorboard: bool = True
    console: bool = True
    wandb_project: str = ""
    wandb_name: str = ""


@dataclass
class EvalSection:
    """Validation inside the loop (verl's test_freq / val_before_train): avg@n, pass@k and entropy on
    a held-out split, sampled through the training's rollout servers (aepo_jax/trainer/validation.py)."""

    every: int = field(default=0, metadata=_help("validate every N steps (and at the last step); 0 = off"))
    before_train: bool = field(default=True, metadata=_help("with every > 0: also validate the starting policy (logged as step 0)"))
    files: list[str] = field(default_factory=list, metadata=_help(
        "held-out JSONL/JSON/Parquet files (read with data.prompt_key / data.answer_key); empty = the built-in task's test split"))
    n: int = field(default=8, metadata=_help("samples per problem"))
    k: list[int] = field(default_factory=list, metadata=_help("k of pass@k, each <= n; empty = 1, 2, 4, ..., n"))
    temperature: float = field(default=1.0, metadata=_help("sampling temperature (1.0: val/entropy estimates the policy's entropy)"))
    top_p: float = 1.0
    max_new_tokens: int = field(default=0, metadata=_help("0 = rollout.max_new_tokens"))
    seed: int = field(default=0, metadata=_help("sampling seed, the same at every validation (python -m aepo_jax.eval --seed)"))


@dataclass
class RunConfig:
    """Everything a run needs."""

    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    rollout: RolloutSection = field(default_factory=RolloutSection)
    algorithm: AlgorithmSection = field(default_factory=AlgorithmSection)
    optim: OptimSection = field(default_factory=OptimSection)
    train: TrainSection = field(default_factory=TrainSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    logging: LoggingSection = field(default_factory=LoggingSection)
    eval: EvalSection = field(default_factory=EvalSection)


# Short spellings accepted on the command line (``--mesh=8x1`` == ``--train.mesh=8x1``).
ALIASES = {
    "mesh": "train.mesh",
    "run_dir": "train.run_dir",
    "steps": "train.steps",
    "seed": "train.seed",
    "method": "algorithm.method",
}


def loss_config(cfg: RunConfig):
    """The :class:`aepo_jax.losses.LossConfig` of a run (every field has a key under ``algorithm``)."""
    a = cfg.algorithm
    return LossConfig(clip_low=a.clip_low, clip_high=a.clip_high, clip_dual=a.clip_dual or None, alpha=a.alpha,
                      entropy_coef=a.entropy_coef, adv_beta=a.adv_beta, adv_kappa=a.adv_kappa, agg=a.agg,
                      reg_norm=a.reg_norm, log_ratio_clamp=a.log_ratio_clamp,
                      clip_cov_ratio=a.clip_cov.ratio, clip_cov_lb=a.clip_cov.lb, clip_cov_ub=a.clip_cov.ub,
                      kl_cov_ratio=a.kl_cov.ratio, kl_cov_coef=a.kl_cov.coef)


def controller_config(cfg: RunConfig):
    """The :class:`aepo_jax.entropy_control.ControllerConfig` of a run (keys under ``algorithm.controller``)."""
    c = cfg.algorithm.controller
    return ControllerConfig(target=TargetSchedule.parse(c.target), t_high=c.t_high, t_low=c.t_low,
                            budget_raise=c.budget_up, budget_lower=c.budget_down, estimator=c.estimator,
                            dead_band=c.dead_band, band_mode=c.band_mode, initial_entropy=c.initial_entropy,
                            target_relative=c.target_relative, budget_mode=c.budget_mode,
                            proportional_width=c.proportional_width, integral_gain=c.integral_gain,
                            derivative_steps=c.derivative_steps, derivative_window=c.derivative_window,
                            signal=c.signal)
