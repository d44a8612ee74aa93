"""The trainer's config tree: every shipped YAML loads and validates; start-up errors name keys and numbers."""

from pathlib import Path

import pytest
import yaml

from aepo_jax.config import ConfigError, build_config, flat_keys, help_text
from aepo_jax.trainer.config import ALIASES, METHODS, RunConfig, validate

CONFIGS = sorted(str(p) for p in (Path(__file__).parent.parent / "configs").rglob("*.yaml") if not p.name.startswith("_"))


@pytest.mark.parametrize("path", CONFIGS)
def test_every_shipped_config_loads(path):
    cfg = build_config(RunConfig, ["--config", path], aliases=ALIASES)
    validate(cfg, data_axis_size=int(cfg.train.mesh.split("x")[0]) if cfg.train.mesh else 1)
    assert cfg.algorithm.method in METHODS


def test_paper_values_come_from_table4():
    cfg = build_config(RunConfig, ["--config", "configs/paper/qwen2.5-7b-entropy_adv.yaml"], aliases=ALIASES)
    assert cfg.optim.lr == 1e-6 and cfg.data.prompts_per_step == 512 and cfg.train.mini_batch_prompts == 128
    assert cfg.rollout.n == 8 and cfg.rollout.max_new_tokens == 8192
    assert (cfg.algorithm.controller.t_high, cfg.algorithm.controller.t_low) == (1.2, 0.8)
    assert (cfg.algorithm.controller.budget_up, cfg.algorithm.controller.budget_down) == (60, 30)
    assert (cfg.algorithm.adv_beta, cfg.algorithm.adv_kappa, cfg.algorithm.entropy_coef) == (0.4, 2.0, 0.015)


def test_batch_not_dividing_data_axis_names_both_numbers():
    cfg = build_config(RunConfig, ["--data.prompts_per_step=3", "--rollout.n=3", "--mesh=8x1"], aliases=ALIASES)
    with pytest.raises(ConfigError, match=r"9 samples.*data axis of size 8"):
        validate(cfg, data_axis_size=8)


def test_unknown_key_and_bad_choice():
    with pytest.raises(ConfigError, match=r"'algorithm.controller.taret'.*'algorithm.controller.target'"):
        build_config(RunConfig, ["--algorithm.controller.taret=0.3"], aliases=ALIASES)
    cfg = build_config(RunConfig, ["--method=ppo"], aliases=ALIASES)
    with pytest.raises(ConfigError, match=r"algorithm.method.*'ppo'"):
        validate(cfg)


def test_help_lists_every_option():
    text = help_text(RunConfig, prog="python -m aepo_jax.train")
    for key in flat_keys(RunConfig):
        assert f"--{key}=" in text


def test_defaults_are_the_toy_config():
    # `python -m aepo_jax.train` with no arguments must be exactly configs/toy.yaml's run.
    assert build_config(RunConfig, [], aliases=ALIASES) == build_config(RunConfig, ["--config", "configs/toy.yaml"], aliases=ALIASES)


def test_every_loss_and_controller_option_is_reachable(tmp_path):
    """Each field of LossConfig and ControllerConfig is set by a command-line key and by a YAML
    file: a field added to either without a key fails here."""
    import dataclasses

    from aepo_jax.entropy_control import ControllerConfig, TargetSchedule
    from aepo_jax.losses import LossConfig
    from aepo_jax.trainer.config import controller_config, loss_config

    overrides = {
        "algorithm.clip_low": "0.1", "algorithm.clip_high": "0.28", "algorithm.clip_dual": "3.0",
        "algorithm.alpha": "0.5", "algorithm.entropy_coef": "0.003", "algorithm.adv_beta": "0.2",
        "algorithm.adv_kappa": "3.0", "algorithm.agg": "token-mean", "algorithm.reg_norm": "reg",
        "algorithm.log_ratio_clamp": "10.0",
        "algorithm.controller.target": "linear:0.6:0.2:0:50", "algorithm.controller.t_high": "1.3",
        "algorithm.controller.t_low": "0.7", "algorithm.controller.budget_up": "40",
        "algorithm.controller.budget_down": "20", "algorithm.controller.estimator": "sampled",
        "algorithm.controller.dead_band": "0.02", "algorithm.controller.band_mode": "idle",
        "algorithm.controller.initial_entropy": "0.4", "algorithm.controller.target_relative": "true",
        "algorithm.controller.budget_mode": "proportional", "algorithm.controller.proportional_width": "0.2",
        "algorithm.controller.signal": "length",
        "algorithm.clip_cov.ratio": "0.001", "algorithm.clip_cov.lb": "0.5", "algorithm.clip_cov.ub": "4.0",
        "algorithm.kl_cov.ratio": "0.002", "algorithm.kl_cov.coef": "0.5",
        "algorithm.controller.integral_gain": "0.2", "algorithm.controller.derivative_steps": "2.0",
        "algorithm.controller.derivative_window": "4",
    }
    tree: dict = {}
    for k, v in overrides.items():
        *sections, leaf = k.split(".")
        node = tree
        for sec in sections:
            node = node.setdefault(sec, {})
        node[leaf] = v
    yaml_text = yaml.safe_dump(tree)
    (tmp_path / "run.yaml").write_text(yaml_text)
    from_cli = build_config(RunConfig, [f"--{k}={v}" for k, v in overrides.items()], aliases=ALIASES)
    from_yaml = build_config(RunConfig, ["--config", str(tmp_path / "run.yaml")], aliases=ALIASES)
    assert from_cli == from_yaml
    validate(from_cli)
    for built, default in ((loss_config(from_cli), LossConfig()), (controller_config(from_cli), ControllerConfig())):
        unchanged = [f.name for f in dataclasses.fields(built) if getattr(built, f.name) == getattr(default, f.name)]
        assert unchanged == [], f"{type(built).__name__} fields with no config key: {unchanged}"
    assert loss_config(from_cli).reg_norm == "reg" and loss_config(from_cli).clip_dual == 3.0
    ctl = controller_config(from_cli)
    assert ctl.target == TargetSchedule.parse("linear:0.6:0.2:0:50") and ctl.band_mode == "idle"
    assert ctl.initial_entropy == 0.4 and (ctl.budget_raise, ctl.budget_lower) == (40, 20)
    # The defaults are the paper's method.
    assert loss_config(RunConfig()) == LossConfig(agg="seq-mean-token-mean", reg_norm="main")
    with pytest.raises(ConfigError, match="algorithm.reg_norm"):
        validate(build_config(RunConfig, ["--algorithm.reg_norm=batch"], aliases=ALIASES))
    with pytest.raises(ConfigError, match="algorithm.controller.band_mode"):
        validate(build_config(RunConfig, ["--algorithm.controller.band_mode=off"], aliases=ALIASES))


def test_pid_from_the_command_line_and_its_checks():
    """budget_mode=pid is reachable as a key, takes its own defaults (width 0.6, gain 0.1) unless
    given, and bad companions are refused at start-up naming the key."""
    from aepo_jax.trainer.config import controller_config

    def cfg(*argv):
        return validate(build_config(RunConfig, list(argv), aliases=ALIASES))

    ctl = controller_config(cfg("--algorithm.controller.budget_mode=pid"))
    assert (ctl.budget_mode, ctl.width, ctl.gain) == ("pid", 0.6, 0.1)
    ctl = controller_config(cfg("--algorithm.controller.budget_mode=pid", "--algorithm.controller.integral_gain=0.2",
                                "--algorithm.controller.proportional_width=0.4"))
    assert (ctl.width, ctl.gain) == (0.4, 0.2) and (ctl.derivative_steps, ctl.derivative_window) == (3.0, 5)
    assert controller_config(RunConfig()).budget_mode == "fixed"  # the paper's stays the default
    with pytest.raises(ConfigError, match="algorithm.controller.dead_band"):
        cfg("--algorithm.controller.budget_mode=pid", "--algorithm.controller.dead_band=0.02")
    with pytest.raises(ConfigError, match="algorithm.controller.integral_gain"):
        cfg("--algorithm.controller.budget_mode=pid", "--algorithm.controller.integral_gain=-0.1")
    with pytest.raises(ConfigError, match="algorithm.controller.derivative_window"):
        cfg("--algorithm.controller.budget_mode=pid", "--algorithm.controller.derivative_window=2")
    with pytest.raises(ConfigError, match="algorithm.controller.derivative_steps"):
        cfg("--algorithm.controller.budget_mode=pid", "--algorithm.controller.derivative_steps=-1")
    with pytest.raises(ConfigError, match="algorithm.controller.budget_mode"):
        cfg("--algorithm.controller.budget_mode=reach")


def test_toy_variant_key_and_its_checks():
    """data.toy_variant selects the built-in task's variant; the length variant's file sets a token
    budget that fits its longest correct answer, and the checks name the key that is wrong."""
    from aepo_jax.data import toy_task

    path = str(Path(__file__).parent.parent / "configs" / "toy_length.yaml")
    cfg = validate(build_config(RunConfig, ["--config", path], aliases=ALIASES))
    assert cfg.data.toy_variant == "length" and cfg.rollout.max_new_tokens >= toy_task.LENGTH_MIN_NEW_TOKENS
    assert validate(build_config(RunConfig, [], aliases=ALIASES)).data.toy_variant == "default"
    for argv, key in ((["--data.toy_variant=long"], "data.toy_variant"),
                      (["--data.toy_variant=length"], "rollout.max_new_tokens"),  # 48 < the longest answer
                      (["--data.toy_variant=length", "--rollout.max_new_tokens=64", "--data.train_files=[a.jsonl]"],
                       "data.toy_variant")):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            validate(build_config(RunConfig, argv, aliases=ALIASES))


def test_toy_hold_file_is_the_default_run_with_the_hold_option():
    """configs/toy_hold.yaml: the default toy run with budget_mode=proportional, budget_down=60 and
    64 prompts a step, nothing else changed (the reproduce tool's hold group runs these keys)."""
    import dataclasses
    import sys

    root = Path(__file__).parent.parent
    hold = validate(build_config(RunConfig, ["--config", str(root / "configs" / "toy_hold.yaml")], aliases=ALIASES))
    default = validate(build_config(RunConfig, [], aliases=ALIASES))
    c = hold.algorithm.controller
    assert (c.budget_mode, c.budget_down, c.budget_up, hold.data.prompts_per_step) == ("proportional", 60, 60, 64)
    same = dataclasses.replace(hold, data=dataclasses.replace(hold.data, prompts_per_step=default.data.prompts_per_step),
                               algorithm=dataclasses.replace(hold.algorithm, controller=dataclasses.replace(
                                   c, budget_mode=default.algorithm.controller.budget_mode,
                                   budget_down=default.algorithm.controller.budget_down)),
                               train=dataclasses.replace(hold.train, run_dir=default.train.run_dir))
    assert same == default
    sys.path.insert(0, str(root / "tools"))
    try:
        import reproduce
    finally:
        sys.path.remove(str(root / "tools"))
    file_keys = {"algorithm.controller.budget_mode": c.budget_mode, "algorithm.controller.budget_down": str(c.budget_down),
                 "data.prompts_per_step": str(hold.data.prompts_per_step)}
    assert dict(reproduce.HOLD_OPTIONS) == file_keys
