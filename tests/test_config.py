"""Config machinery: defaults <- YAML <- --key=value, coercion, and errors that name the key."""

from dataclasses import dataclass, field

import pytest

from aepo_jax.config import ConfigError, build_config, flat_keys, help_text, parse_overrides


@dataclass
class Inner:
    """An inner section."""

    lr: float = 1e-6
    steps: int = 10
    names: list[str] = field(default_factory=list)
    flag: bool = False
    maybe: int | None = None


@dataclass
class Outer:
    inner: Inner = field(default_factory=Inner)
    mesh: str = "1x1"


def test_defaults_yaml_and_overrides(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("inner:\n  lr: 3.0e-6\n  steps: 5\nmesh: 2x1\n")
    cfg = build_config(Outer, ["--config", str(y), "--inner.steps=7", "--inner.names=a,b", "--inner.flag"])
    assert cfg.inner.lr == 3e-6 and cfg.inner.steps == 7 and cfg.inner.names == ["a", "b"]
    assert cfg.inner.flag is True and cfg.mesh == "2x1" and cfg.inner.maybe is None
    cfg = build_config(Outer, ["--mesh", "4x2", "--inner.maybe=3"], aliases={})
    assert cfg.mesh == "4x2" and cfg.inner.maybe == 3


def test_unknown_key_names_nearest(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown config key 'inner.setps'.*'inner.steps'"):
        build_config(Outer, ["--inner.setps=3"])
    y = tmp_path / "bad.yaml"
    y.write_text("inner:\n  lrr: 1\n")
    with pytest.raises(ConfigError, match=r"bad.yaml.*'inner.lrr'.*'inner.lr'"):
        build_config(Outer, ["--config", str(y)])


def test_bad_values_name_the_key():
    with pytest.raises(ConfigError, match=r"'inner.steps'.*integer.*'x'"):
        build_config(Outer, ["--inner.steps=x"])
    with pytest.raises(ConfigError, match=r"'inner.flag'"):
        build_config(Outer, ["--inner.flag=maybe"])
    with pytest.raises(ConfigError, match="config file not found"):
        build_config(Outer, ["--config=/nonexistent.yaml"])


def test_aliases_dashes_and_help():
    path, ov = parse_overrides(["--run-dir=x", "--mesh=8x1"], aliases={"mesh": "train.mesh", "run_dir": "train.run_dir"})
    assert path is None and ov == {"train": {"run_dir": "x", "mesh": "8x1"}}
    text = help_text(Outer, prog="t")
    for key in flat_keys(Outer):
        assert f"--{key}=" in text


def test_yaml_include(tmp_path):
    (tmp_path / "base.yaml").write_text("inner:\n  lr: 2.0e-6\n  steps: 3\n")
    (tmp_path / "run.yaml").write_text("include: base.yaml\ninner:\n  steps: 9\n")
    cfg = build_config(Outer, ["--config", str(tmp_path / "run.yaml")])
    assert cfg.inner.lr == 2e-6 and cfg.inner.steps == 9
    (tmp_path / "a.yaml").write_text("include: b.yaml\n")
    (tmp_path / "b.yaml").write_text("include: a.yaml\n")
    with pytest.raises(ConfigError, match="include cycle"):
        build_config(Outer, ["--config", str(tmp_path / "a.yaml")])
