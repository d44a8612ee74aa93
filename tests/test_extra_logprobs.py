"""Input-token / top-k / token-id log-probs (SGLang's layout) against one full forward of the model:
the first entry is None, rows are shifted by one, prompt rows at T = 1, output rows at the output
temperature, top-k sorted and equal to the largest entries of the full row."""

from __future__ import annotations

import numpy as np
import pytest
from flax import nnx

V = 97


@pytest.fixture(scope="module")
def model():
    from aepo_jax.models import ModelConfig, init_model

    cfg = ModelConfig(model_type="qwen2", vocab_size=V, hidden_size=32, intermediate_size=64,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                      max_position_embeddings=256)
    m = init_model(cfg, seed=3)
    # peaked rows, so a temperature mix-up is visible
    m.lm_head[...] = m.lm_head[...] * 20.0
    return m


def _full_logsoftmax(model, seq, temperature=1.0):
    import jax
    import jax.numpy as jnp

    logits = np.asarray(model(jnp.asarray([seq], jnp.int32))[0], np.float64) / temperature
    return np.asarray(jax.nn.log_softmax(logits, axis=-1))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_extras_match_a_full_forward(model, seed):
    from aepo_jax.rollout.extra_logprobs import LogprobRequest, compute_many

    rng = np.random.default_rng(seed)
    plen = int(rng.integers(2, 40))
    nout = int(rng.integers(0, 12))
    prompt = tuple(int(t) for t in rng.integers(0, V, plen))
    output = tuple(int(t) for t in rng.integers(0, V, nout))
    start = int(rng.integers(0, plen + 1))
    k = int(rng.integers(1, 6))
    tok_ids = tuple(int(t) for t in rng.integers(0, V, int(rng.integers(1, 4))))
    t_out = float(rng.choice([0.7, 1.0, 1.3]))
    req = LogprobRequest(prompt, output, start=start, top_k=k, token_ids=tok_ids, out_temperature=t_out)
    (ex,) = compute_many(*nnx.split(model), [req], V)

    seq = list(prompt) + list(output)
    lp1 = _full_logsoftmax(model, seq)
    lpt = _full_logsoftmax(model, seq, t_out)

    n_in = plen - start
    assert len(ex.input_token_logprobs) == n_in
    if n_in:
        assert ex.input_token_logprobs[0] == (None, prompt[start])
        assert ex.input_top_logprobs[0] is None and ex.input_token_ids_logprobs[0] is None
    for j, (v, t) in enumerate(ex.input_token_logprobs[1:], start=start + 1):
        assert t == prompt[j]
        np.testing.assert_allclose(v, lp1[j - 1, t], atol=1e-4)
        row = ex.input_top_logprobs[j - start]
        np.testing.assert_allclose([e[0] for e in row], np.sort(lp1[j - 1])[::-1][:k], atol=1e-4)
        assert [e[0] for e in row] == sorted((e[0] for e in row), reverse=True)
        for val, tid in row:
            np.testing.assert_allclose(val, lp1[j - 1, tid], atol=1e-4)
        assert [e[1] for e in ex.input_token_ids_logprobs[j - start]] == list(tok_ids)
        np.testing.assert_allclose([e[0] for e in ex.input_token_ids_logprobs[j - start]],
                                   lp1[j - 1, list(tok_ids)], atol=1e-4)
    assert len(ex.output_top_logprobs) == nout and len(ex.output_token_ids_logprobs) == nout
    for i in range(nout):
        p = plen - 1 + i
        np.testing.assert_allclose([e[0] for e in ex.output_top_logprobs[i]], np.sort(lpt[p])[::-1][:k], atol=1e-4)
        np.testing.assert_allclose([e[0] for e in ex.output_token_ids_logprobs[i]], lpt[p, list(tok_ids)],
                                   atol=1e-4)


def test_nothing_asked_means_no_forward_and_empty_fields(model):
    from aepo_jax.rollout.extra_logprobs import LogprobRequest, compute_many

    req = LogprobRequest((1, 2, 3), (4, 5), start=-1)
    assert not req.needs_forward
    (ex,) = compute_many(*nnx.split(model), [req], V)
    assert ex.input_token_logprobs == [] and ex.output_top_logprobs == []
    # start == len(prompt) - 1: one entry, None, still no forward
    req = LogprobRequest((1, 2, 3), (), start=2)
    assert not req.needs_forward
    assert compute_many(*nnx.split(model), [req], V)[0].input_token_logprobs == [(None, 3)]
