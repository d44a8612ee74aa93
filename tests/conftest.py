"""Test-wide set-up: 8 simulated host devices (for mesh tests) before jax initialises."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Tests write nothing to the user's cache: no persistent JAX compilation cache unless a test asks.
os.environ.setdefault("AEPO_JAX_COMPILATION_CACHE", "off")
