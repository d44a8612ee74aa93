"""Validation of a run's configuration (:class:`aepo_jax.trainer.config.RunConfig`) at start-up.

:func:`validate` checks everything that needs no model, data or devices (one
:class:`~aepo_jax.config.ConfigError` naming the key and the numbers); :func:`validate_mesh` the
batch shapes that must divide over the mesh, once jax has started. Both are re-exported by
:mod:`aepo_jax.trainer.config`. ``RunConfig`` in the annotations is that module's class, not imported
here (it imports this module: the arrow points one way only).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
from urllib.parse import urlsplit

from aepo_jax.config import ConfigError
from aepo_jax.entropy_control import BAND_MODES, BUDGET_MODES, ESTIMATORS, SIGNALS, TargetSchedule
from aepo_jax.losses import AGG_MODES, REG_NORMS
from aepo_jax.methods import METHODS, READINGS, method_spec
from aepo_jax.models.config import remat_policy
from aepo_jax.platform import parse_mesh_spec


def uses_on_policy_update(cfg: RunConfig) -> bool:
    """One epoch of one mini-batch: the update starts from the policy that sampled the batch."""
    mbp = cfg.train.mini_batch_prompts or cfg.data.prompts_per_step
    return cfg.train.epochs == 1 and mbp == cfg.data.prompts_per_step


def _one_of(key: str, value: str, allowed) -> None:
    if value not in allowed:
        raise ConfigError(f"config key '{key}': {value!r} is not one of {list(allowed)}")


def _check_toy_variant(cfg: RunConfig) -> None:
    """``data.toy_variant`` names a built-in task, so it needs no data files; the length variant's
    responses need a token budget that fits its longest correct answer."""
    from aepo_jax.data import toy_task  # noqa: PLC0415

    variant = cfg.data.toy_variant
    _one_of("data.toy_variant", variant, toy_task.VARIANTS)
    if variant == "default":
        return
    if cfg.data.train_files:
        raise ConfigError(f"config key 'data.toy_variant': {variant!r} selects a variant of the built-in task, "
                          "which data.train_files replaces; leave one of them unset")
    if cfg.rollout.max_new_tokens < toy_task.LENGTH_MIN_NEW_TOKENS:
        raise ConfigError(f"config key 'rollout.max_new_tokens': {cfg.rollout.max_new_tokens} is below the length "
                          f"variant's longest correct answer; use >= {toy_task.LENGTH_MIN_NEW_TOKENS} "
                          "(configs/toy_length.yaml sets 64)")


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
    if c.budget_mode in ("pi", "pid") and c.dead_band > 0:
        raise ConfigError(f"config key 'algorithm.controller.dead_band' must be 0 with budget_mode={c.budget_mode} "
                          f"(it decides the direction itself), got {c.dead_band}")
    _one_of("algorithm.reg_norm", a.reg_norm, REG_NORMS)
    _one_of("model.dtype", cfg.model.dtype, ("float32", "bfloat16"))
    _one_of("model.shared_prefix", cfg.model.shared_prefix, ("auto", "on", "off"))
    try:
        remat_policy(cfg.model.remat)
    except ValueError as e:
        raise ConfigError(f"config key 'model.remat': {str(e).removeprefix('remat: ')}") from None
    _one_of("optim.schedule", cfg.optim.schedule, ("constant", "cosine", "linear"))
    _one_of("data.template", cfg.data.template, ("auto", "chat", "plain"))
    _check_toy_variant(cfg)
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
        ("algorithm.controller.derivative_steps", c.derivative_steps, 0.0, None, False, False),
        ("algorithm.controller.derivative_window", c.derivative_window, 3, None, False, False),
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
    if c.proportional_width is not None:
        ranges.append(("algorithm.controller.proportional_width", c.proportional_width, 0.0, None, True, False))
    if c.integral_gain is not None:
        ranges.append(("algorithm.controller.integral_gain", c.integral_gain, 0.0, None, False, False))
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
