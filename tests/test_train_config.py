"""The trainer's config tree: every shipped YAML loads and validates; start-up errors name keys and numbers."""

from pathlib import Path

import pytest

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
