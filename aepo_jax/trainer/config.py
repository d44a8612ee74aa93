"""The trainer's configuration tree (plain data, validated once at start-up).

Every option is listed, with its default, by ``python -m aepo_jax.train --help``. The defaults are
the built-in toy run (a tiny model on the built-in link-following task, CPU-friendly); the YAML files in
``configs/`` set the paper's values (Table 4 of arXiv 2510.08141) and name their source.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from aepo_jax.config import ConfigError
from aepo_jax.entropy_control import BAND_MODES, BUDGET_MODES, ESTIMATORS, SIGNALS, ControllerConfig, TargetSchedule
from aepo_jax.losses import AGG_MODES, REG_NORMS, LossConfig
from aepo_jax.methods import METHODS as METHOD_TABLE, READINGS, method_help, method_spec
from aepo_jax.platform import parse_mesh_spec

METHODS = tuple(METHOD_TABLE)  # the names of aepo_jax/methods.py's table


def _help(text: str):
    return {"help": text}


@dataclass
class ModelSection:
    """Policy model: a local Hugging Face directory (qwen2 / qwen3 / llama)."""

    path: str = field(default="", metadata=_help("HF model dir; empty = the built-in toy base model (built once, cached)"))
    dtype: str = field(default="float32", metadata=_help("parameter dtype: float32 | bfloat16"))
    compute_dtype: str = field(default="", metadata=_help("activation dtype; empty = same as dtype"))
    remat: bool = field(default=False, metadata=_help("rematerialise each decoder layer in the backward pass"))
    logprob_chunk: int = field(default=256, metadata=_help("sequence chunk of the log-prob/entropy head"))


@dataclass
class DataSection:
    """Training prompts (JSONL or Parquet; verl / EasyR1 layouts)."""

    train_files: list[str] = field(default_factory=list, metadata=_help("files; empty = the built-in toy task"))
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
        "| pi (proportional-integral: direction and budget from the relative error and its sum; docs/training.md)"))
    proportional_width: float = field(default=0.1, metadata=_help("relative error at which the proportional (and pi) budget is full"))
    integral_gain: float = field(default=0.1, metadata=_help("budget_mode=pi: weight of the summed relative error"))
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


def uses_on_policy_update(cfg: RunConfig) -> bool:
    """One epoch of one mini-batch: the update starts from the policy that sampled the batch."""
    mbp = cfg.train.mini_batch_prompts or cfg.data.prompts_per_step
    return cfg.train.epochs == 1 and mbp == cfg.data.prompts_per_step


def _one_of(key: str, value: str, allowed) -> None:
    if value not in allowed:
        raise ConfigError(f"config key '{key}': {value!r} is not one of {list(allowed)}")


def _finite_numbers(node, prefix: str = "") -> None:
    """Every float in the tree is finite: a NaN learning rate or temperature is refused here, by
    key, instead of running a step and syncing NaN weights to the servers."""
    for f in dataclasses.fields(node):
        value, key = getattr(node, f.name), f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            _finite_numbers(value, key + ".")
        elif isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"config key '{key}' must be a finite number, got {value}")


def _in_range(key: str, value: float, lo: float | None = None, hi: float | None = None, *,
              lo_open: bool = False, hi_open: bool = False) -> None:
    ok = (lo is None or (value > lo if lo_open else value >= lo)) and (hi is None or (value < hi if hi_open else value <= hi))
    if not ok:
        left = "" if lo is None else ("(" if lo_open else "[") + f"{lo}"
        right = "" if hi is None else f"{hi}" + (")" if hi_open else "]")
        want = f"in {left}, {right}" if lo is not None and hi is not None else (
            f"{'>' if lo_open else '>='} {lo}" if lo is not None else f"{'<' if hi_open else '<='} {hi}")
        raise ConfigError(f"config key '{key}' must be {want}, got {value}")


def _target_values(schedule) -> list[float]:
    if schedule.kind == "constant":
        return [schedule.value]
    if schedule.kind == "piecewise":
        return [v for _, v in schedule.points]
    return [schedule.start, schedule.end]


def _check_urls(key: str, urls) -> None:
    for i, url in enumerate(urls):
        try:
            parts = urlsplit(url)
            parts.port  # noqa: B018 - raises ValueError on a port that is not a number
        except ValueError as e:
            raise ConfigError(f"config key '{key}[{i}]': {url!r} is not a URL ({e})") from None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(f"config key '{key}[{i}]': {url!r} is not an http(s)://host:port URL")


def validate(cfg: RunConfig, *, data_axis_size: int | None = None) -> RunConfig:
    """Start-up checks that need no model or data; raise ConfigError naming the key and numbers.
    With ``data_axis_size`` also :func:`validate_mesh`."""
    a, c = cfg.algorithm, cfg.algorithm.controller
    _one_of("algorithm.method", a.method, METHODS)
    _one_of("algorithm.reading", a.reading, READINGS)
    _one_of("train.old_logp", cfg.train.old_logp, ("auto", "reuse", "recompute"))
    if cfg.train.old_logp == "reuse" and not uses_on_policy_update(cfg):
        raise ConfigError(
            f"config key 'train.old_logp': 'reuse' needs an on-policy update (train.epochs=1 and one mini-batch), "
            f"got train.epochs={cfg.train.epochs}, train.mini_batch_prompts={cfg.train.mini_batch_prompts}; "
            "use 'auto' or 'recompute'")
    _one_of("algorithm.agg", a.agg, AGG_MODES)
    _finite_numbers(cfg)
    try:
        schedule = TargetSchedule.parse(c.target)
    except ValueError as e:
        raise ConfigError(f"config key 'algorithm.controller.target': {e}") from None
    for v in _target_values(schedule):  # an entropy (nats/token): finite and not negative
        if not (math.isfinite(v) and v >= 0):
            raise ConfigError(f"config key 'algorithm.controller.target': entropy targets must be finite and >= 0, "
                              f"got {v} in {c.target!r}")
    if cfg.train.mesh:
        try:
            parse_mesh_spec(cfg.train.mesh)
        except ValueError as e:
            raise ConfigError(f"config key 'train.mesh': {e}") from None
    _check_urls("rollout.urls", cfg.rollout.urls)
    _check_urls("rollout.weight_update_urls", cfg.rollout.weight_update_urls)
    _one_of("rollout.sync", cfg.rollout.sync, ("disk", "distributed"))
    _one_of("rollout.sync_backend", cfg.rollout.sync_backend, ("auto", "nccl", "gloo"))
    if cfg.rollout.sync == "distributed":
        import importlib.util

        if importlib.util.find_spec("torch") is None:
            raise ConfigError("config key 'rollout.sync': 'distributed' needs torch (the 'distributed' extra: "
                              "pip install 'aepo-jax[distributed]'); use rollout.sync=disk without it")
        if cfg.train.num_processes > 1:
            raise ConfigError(f"config key 'rollout.sync': 'distributed' needs a single-process learner, got "
                              f"train.num_processes={cfg.train.num_processes}; use rollout.sync=disk (each process "
                              "writes its own shards)")
    _one_of("model.compute_dtype", cfg.model.compute_dtype, ("", "float32", "bfloat16"))
    _one_of("algorithm.controller.estimator", c.estimator, ESTIMATORS)
    _one_of("algorithm.controller.signal", c.signal, SIGNALS)
    if c.signal != "entropy":
        spec = method_spec(a.method, a.reading)
        if spec.uses_reg_rollout and (spec.reg_rollout != "controller" or spec.reg_rows not in ("positives", "replace")):
            raise ConfigError(f"config key 'algorithm.controller.signal': {c.signal!r} draws its own positives; method "
                              f"{a.method!r} (regulariser rows {spec.reg_rows!r} at {spec.reg_rollout!r}) cannot use it")
    _one_of("algorithm.controller.band_mode", c.band_mode, BAND_MODES)
    _one_of("algorithm.controller.budget_mode", c.budget_mode, BUDGET_MODES)
    if c.budget_mode == "pi" and c.dead_band > 0:
        raise ConfigError(f"config key 'algorithm.controller.dead_band' must be 0 with budget_mode=pi "
                          f"(pi decides the direction itself), got {c.dead_band}")
    _one_of("algorithm.reg_norm", a.reg_norm, REG_NORMS)
    _one_of("model.dtype", cfg.model.dtype, ("float32", "bfloat16"))
    _one_of("optim.schedule", cfg.optim.schedule, ("constant", "cosine", "linear"))
    _one_of("data.template", cfg.data.template, ("auto", "chat", "plain"))
    positive = {
        "train.steps": cfg.train.steps,
        "rollout.n": cfg.rollout.n,
        "rollout.max_new_tokens": cfg.rollout.max_new_tokens,
        "data.prompts_per_step": cfg.data.prompts_per_step,
        "data.max_prompt_length": cfg.data.max_prompt_length,
        "train.epochs": cfg.train.epochs,
        "model.logprob_chunk": cfg.model.logprob_chunk,
        "checkpoint.every": cfg.checkpoint.every,
        "checkpoint.keep": cfg.checkpoint.keep,
    }
    for key, v in positive.items():
        if v < 1:
            raise ConfigError(f"config key '{key}' must be >= 1, got {v}")
    o, r, t = cfg.optim, cfg.rollout, cfg.train
    ranges = [  # (key, value, lo, hi, lo_open, hi_open)
        ("algorithm.reg_prompt_fraction", a.reg_prompt_fraction, 0.0, 1.0, False, False),
        ("algorithm.reg_samples_per_prompt", a.reg_samples_per_prompt, 0, None, False, False),
        ("algorithm.clip_low", a.clip_low, 0.0, 1.0, False, True),  # the ratio's floor 1 - eps stays > 0
        ("algorithm.clip_high", a.clip_high, 0.0, None, False, False),
        ("algorithm.alpha", a.alpha, 0.0, None, False, False),
        ("algorithm.entropy_coef", a.entropy_coef, 0.0, None, False, False),
        ("algorithm.adv_beta", a.adv_beta, 0.0, None, False, False),
        ("algorithm.adv_kappa", a.adv_kappa, 0.0, None, True, False),
        ("algorithm.controller.t_high", c.t_high, 0.0, None, True, False),
        ("algorithm.controller.t_low", c.t_low, 0.0, c.t_high, True, False),
        ("algorithm.controller.budget_up", c.budget_up, 0, None, False, False),
        ("algorithm.controller.budget_down", c.budget_down, 0, None, False, False),
        ("algorithm.controller.dead_band", c.dead_band, 0.0, None, False, False),
        ("algorithm.controller.proportional_width", c.proportional_width, 0.0, None, True, False),
        ("algorithm.controller.integral_gain", c.integral_gain, 0.0, None, False, False),
        ("algorithm.log_ratio_clamp", a.log_ratio_clamp, 0.0, None, True, False),
        ("algorithm.clip_cov.ratio", a.clip_cov.ratio, 0.0, 1.0, True, False),
        ("algorithm.clip_cov.ub", a.clip_cov.ub, a.clip_cov.lb, None, True, False),
        ("algorithm.kl_cov.ratio", a.kl_cov.ratio, 0.0, 1.0, True, False),
        ("algorithm.kl_cov.coef", a.kl_cov.coef, 0.0, None, False, False),
        ("optim.lr", o.lr, 0.0, None, True, False),
        ("optim.warmup_steps", o.warmup_steps, 0, None, False, False),
        ("optim.min_lr_ratio", o.min_lr_ratio, 0.0, 1.0, False, False),
        ("optim.weight_decay", o.weight_decay, 0.0, None, False, False),
        ("optim.b1", o.b1, 0.0, 1.0, False, True),
        ("optim.b2", o.b2, 0.0, 1.0, False, True),
        ("optim.eps", o.eps, 0.0, None, True, False),
        ("optim.grad_clip", o.grad_clip, 0.0, None, False, False),
        ("rollout.temperature", r.temperature, 0.0, None, True, False),
        ("rollout.top_p", r.top_p, 0.0, 1.0, True, False),
        ("rollout.request_timeout_s", r.request_timeout_s, 0.0, None, True, False),
        ("rollout.max_retries", r.max_retries, 0, None, False, False),
        ("rollout.startup_timeout_s", r.startup_timeout_s, 0.0, None, True, False),
        ("rollout.request_deadline_s", r.request_deadline_s, 0.0, None, True, False),
        ("rollout.health_check_timeout_s", r.health_check_timeout_s, 0.0, None, True, False),
        ("rollout.sync_bucket_mb", r.sync_bucket_mb, 0.0, None, True, False),
        ("rollout.sync_master_port", r.sync_master_port, 0, 65535, False, False),
        ("train.mini_batch_prompts", t.mini_batch_prompts, 0, None, False, False),
        ("train.micro_batch_size", t.micro_batch_size, 0, None, False, False),
        ("train.num_processes", t.num_processes, 0, None, False, False),
        ("train.process_id", t.process_id, -1, None, False, False),
    ]
    for key, value, lo, hi, lo_open, hi_open in ranges:
        _in_range(key, value, lo, hi, lo_open=lo_open, hi_open=hi_open)
    _validate_eval(cfg)
    if a.clip_dual and a.clip_dual <= 1.0:
        raise ConfigError(f"config key 'algorithm.clip_dual' must be 0 (off) or > 1, got {a.clip_dual}")
    if r.top_k != -1 and r.top_k < 1:
        raise ConfigError(f"config key 'rollout.top_k' must be -1 (off) or >= 1, got {r.top_k}")
    mbp = cfg.train.mini_batch_prompts or cfg.data.prompts_per_step
    if cfg.data.prompts_per_step % mbp:
        raise ConfigError(
            f"config key 'train.mini_batch_prompts' ({mbp}) must divide data.prompts_per_step ({cfg.data.prompts_per_step})"
        )
    if data_axis_size is not None:
        validate_mesh(cfg, data_axis_size)
    return cfg


def validate_mesh(cfg: RunConfig, data_axis_size: int) -> None:
    """The batch shapes that must divide over the mesh's data axis (known once jax has started)."""
    mbp = cfg.train.mini_batch_prompts or cfg.data.prompts_per_step
    samples_per_mb = mbp * cfg.rollout.n
    if samples_per_mb % data_axis_size:
        raise ConfigError(
            f"a mini-batch of {samples_per_mb} samples (train.mini_batch_prompts={mbp} x rollout.n={cfg.rollout.n}) "
            f"does not divide over the mesh's data axis of size {data_axis_size} (train.mesh={cfg.train.mesh})"
        )
    mbs = cfg.train.micro_batch_size
    if mbs:
        if samples_per_mb % mbs:
            raise ConfigError(
                f"config key 'train.micro_batch_size' ({mbs}) must divide the mini-batch of {samples_per_mb} samples"
            )
        if mbs % data_axis_size:
            raise ConfigError(
                f"config key 'train.micro_batch_size' ({mbs}) does not divide over the data axis of size {data_axis_size}"
            )


def _validate_eval(cfg: RunConfig) -> None:
    e = cfg.eval
    _in_range("eval.every", e.every, 0)
    _in_range("eval.n", e.n, 1)
    _in_range("eval.temperature", e.temperature, 0.0, lo_open=True)
    _in_range("eval.top_p", e.top_p, 0.0, 1.0, lo_open=True)
    _in_range("eval.max_new_tokens", e.max_new_tokens, 0)
    for i, k in enumerate(e.k):
        if not 1 <= k <= e.n:
            raise ConfigError(f"config key 'eval.k[{i}]': every k of pass@k must be in [1, eval.n={e.n}], got {k}")
    if len(set(e.k)) != len(e.k):
        raise ConfigError(f"config key 'eval.k': repeated values in {e.k}")
    if e.every and cfg.data.train_files and not e.files:
        raise ConfigError("config key 'eval.files': validation (eval.every > 0) on your own training data needs "
                          "held-out files; the built-in task's test split is only the default for the built-in task")


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
                            signal=c.signal)
