"""Test-wide set-up: 8 simulated host devices (for mesh tests) before jax initialises."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Tests write nothing to the user's cache: no persistent JAX compilation cache unless a test asks.
os.environ.setdefault("AEPO_JAX_COMPILATION_CACHE", "off")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def small_toy_base(tmp_path_factory):
    """A barely trained toy base model (30 steps), built once per test session and shared READ-ONLY
    by the end-to-end tests that need some model that writes the task's format (each build costs a
    subprocess and a compile). A test that writes into a model directory must build its own."""
    from aepo_jax.toy import ToyBaseConfig, ensure_toy_base

    cfg = ToyBaseConfig(steps=30, warmup_steps=5, n_train_problems=256)
    return ensure_toy_base(tmp_path_factory.getbasetemp() / "shared_toy_cache", cfg)
