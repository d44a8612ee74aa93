"""The controller's reading of the entropy: the standard error logged beside it
(``policy/entropy_full_stderr``) is the spread of the reading itself."""

from __future__ import annotations

import numpy as np

from aepo_jax.trainer.batch import pack
from aepo_jax.trainer.stages import entropy_stderr, policy_entropy


def _rollout(rng, prompts=16, n=8, length=12, prompt_sd=0.08, token_sd=0.3):
    """Token entropies: a per-prompt level (prompts differ) + per-token noise; ragged lengths."""
    lens = rng.integers(length // 2, length + 1, size=prompts * n)
    group = np.repeat(np.arange(prompts), n)
    b = pack([[1, 2]] * (prompts * n), [[5] * int(k) for k in lens], np.zeros(prompts * n), group,
             np.zeros(prompts * n, bool), main_rollout=True, prompt_len=2, response_len=length, pad_id=0)
    level = 0.4 + prompt_sd * rng.standard_normal(prompts)[group]
    ent = np.clip(level[:, None] + token_sd * rng.standard_normal((prompts * n, length)), 0, None).astype(np.float32)
    return b.__class__(**{**b.__dict__, "entropy": ent * b.mask, "old_logp": -ent * b.mask})


def test_entropy_stderr_is_the_spread_of_the_reading():
    rng = np.random.default_rng(0)
    readings, stderrs = [], []
    for _ in range(300):
        b = _rollout(rng)
        readings.append(policy_entropy(b)[0])
        stderrs.append(entropy_stderr(b))
    sd = float(np.std(readings, ddof=1))
    assert 0.8 < float(np.mean(stderrs)) / sd < 1.2, (np.mean(stderrs), sd)
    # one prompt: no spread between prompts to measure
    one = _rollout(rng, prompts=1)
    assert np.isnan(entropy_stderr(one))
