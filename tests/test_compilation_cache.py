"""The persistent compilation cache: where it lives, that a second process loads what the first
compiled, that a process it starts inherits it, that it can be turned off."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from aepo_jax import compilation_cache as cc

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def clean_env(monkeypatch):
    for k in (cc.SETTING_ENV, cc.JAX_DIR_ENV, "AEPO_JAX_CACHE"):
        monkeypatch.delenv(k, raising=False)
    return monkeypatch


def test_resolve_auto_off_and_directory(clean_env, tmp_path):
    key = cc.cache_key()
    clean_env.setenv("AEPO_JAX_CACHE", str(tmp_path / "root"))
    assert cc.resolve_compilation_cache("auto") == tmp_path / "root" / "jax" / key
    assert cc.resolve_compilation_cache(None) == tmp_path / "root" / "jax" / key
    for off in ("off", "OFF", "none", "false", "0", "", "  "):
        assert cc.resolve_compilation_cache(off) is None, off
    assert cc.resolve_compilation_cache(str(tmp_path / "mine")) == tmp_path / "mine" / key
    # "auto" defers to the environment: an inherited choice, then JAX's own variable
    clean_env.setenv(cc.JAX_DIR_ENV, str(tmp_path / "jaxdir"))
    assert cc.resolve_compilation_cache("auto") == tmp_path / "jaxdir"
    clean_env.setenv(cc.SETTING_ENV, "off")
    assert cc.resolve_compilation_cache("auto") is None
    clean_env.setenv(cc.SETTING_ENV, str(tmp_path / "env"))
    assert cc.resolve_compilation_cache("auto") == tmp_path / "env" / key
    # an explicit setting wins over the environment
    assert cc.resolve_compilation_cache(str(tmp_path / "mine")) == tmp_path / "mine" / key


def test_cache_key_names_versions_and_changes_with_flags(clean_env):
    from importlib import metadata

    base = cc.cache_key()
    assert base.startswith(f"jax{metadata.version('jax')}-jaxlib{metadata.version('jaxlib')}-")
    clean_env.setenv("XLA_FLAGS", os.environ.get("XLA_FLAGS", "") + " --xla_cpu_enable_fast_math=true")
    assert cc.cache_key() != base
    clean_env.setenv("JAX_ENABLE_X64", "1")
    assert len({base, cc.cache_key()}) == 2


_PROGRAM = r"""
import json, os, subprocess, sys
from aepo_jax import compilation_cache as cc
d = cc.setup_compilation_cache(sys.argv[1])
import jax, jax.numpy as jnp
counts = []
for n in map(int, sys.argv[2].split(",")):
    before = cc.COMPILES.snapshot()
    f = jax.jit(lambda x: jnp.tanh(x @ x.T) * n + jnp.arange(x.shape[0])[:, None])
    f(jnp.ones((n, 3))).block_until_ready()
    counts.append({k: v - before[k] for k, v in cc.COMPILES.snapshot().items()})
child = subprocess.run([sys.executable, "-c",
    "from aepo_jax import compilation_cache as cc; print(cc.resolve_compilation_cache())"],
    capture_output=True, text=True, check=True).stdout.strip()
print(json.dumps({"dir": str(d), "child": child, "per_program": counts, **cc.COMPILES.snapshot()}))
"""


def _run_program(setting: str, sizes: str, env: dict) -> dict:
    out = subprocess.run([sys.executable, "-c", _PROGRAM, setting, sizes], capture_output=True, text=True,
                         env=env, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_second_process_loads_what_the_first_compiled(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in (cc.SETTING_ENV, cc.JAX_DIR_ENV)}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    first = _run_program(str(tmp_path / "cc"), "5", env)
    directory = Path(first["dir"])
    assert directory == tmp_path / "cc" / cc.cache_key()  # same environment, same key
    assert first["cache_misses"] >= 1 and first["cache_hits"] == 0
    assert any(directory.iterdir()), "nothing was written to the cache"
    assert first["child"] == first["dir"]  # a process it starts uses the same cache
    second = _run_program(str(tmp_path / "cc"), "5,7", env)
    assert second["dir"] == first["dir"]
    same, other = second["per_program"]
    assert same["cache_misses"] == 0 and same["cache_hits"] == first["per_program"][0]["cache_misses"]
    assert same["trace_s"] > 0  # tracing and lowering happen again: the cache holds compiled programs only
    assert other["cache_misses"] >= 1  # another program is compiled, not loaded
    off = _run_program("off", "5", env)
    assert off["dir"] == "None" and off["cache_hits"] == 0 and off["cache_misses"] == 0
    assert off["child"] == "None"  # and its children do not use one either


def test_unwritable_cache_directory_runs_without_cache(tmp_path, caplog, clean_env):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    try:
        with caplog.at_level("WARNING", logger="aepo_jax.compilation_cache"):
            assert cc.setup_compilation_cache(str(blocker)) is None
        assert str(blocker) in caplog.text and "compilation cache off" in caplog.text
        assert os.environ[cc.SETTING_ENV] == "off"
    finally:
        cc.setup_compilation_cache("off")
