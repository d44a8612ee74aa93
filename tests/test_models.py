"""Decoder vs transformers (torch CPU) parity, KV-cache decoding, dtypes, remat, jit over split state."""

from __future__ import annotations

import json

import numpy as np
import pytest

VOCAB = 97


def make_hf_checkpoint(out_dir, family: str, seed: int = 0, **overrides):
    """A tiny random transformers model of `family`, saved to out_dir; returns the torch model.

    Weights are perturbed away from transformers' init (norms 1, biases 0) so that every
    parameter, including norms and biases, matters to the logits.
    """
    import torch
    import transformers as T

    base = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=10000.0,
                bos_token_id=1, eos_token_id=2)
    base.update(overrides)
    cls = {"qwen2": T.Qwen2Config, "qwen3": T.Qwen3Config, "llama": T.LlamaConfig}[family]
    torch.manual_seed(seed)
    model = T.AutoModelForCausalLM.from_config(cls(**base)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(out_dir)
    return model


def left_padded_batch(seed: int = 0, batch: int = 3, length: int = 11):
    rng = np.random.RandomState(seed)
    ids = rng.randint(0, VOCAB, (batch, length))
    mask = np.ones((batch, length), np.int64)
    for b in range(1, batch):
        mask[b, : (3 * b) % length] = 0
    return ids, mask


def torch_logits(model, ids, mask):
    import torch

    with torch.no_grad():
        return model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.float().numpy()


LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 16}
FAMILIES = {
    # name: (family, overrides)
    "qwen2_gqa": ("qwen2", {}),
    "qwen2_tied_mha": ("qwen2", {"tie_word_embeddings": True, "num_key_value_heads": 4}),
    "qwen3_head_dim": ("qwen3", {"head_dim": 24}),  # head_dim != hidden / heads (16)
    "qwen3_tied_bias": ("qwen3", {"tie_word_embeddings": True, "attention_bias": True, "num_key_value_heads": 1}),
    "llama_rope3": ("llama", {"num_key_value_heads": 1, "rope_scaling": LLAMA3}),
    "llama_bias_linear": ("llama", {"attention_bias": True, "head_dim": 8,
                                    "rope_scaling": {"rope_type": "linear", "factor": 2.0}}),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    out = {}
    for name, (family, kw) in FAMILIES.items():
        d = tmp_path_factory.mktemp(name)
        out[name] = (str(d), make_hf_checkpoint(d, family, **kw))
    return out


@pytest.mark.parametrize("name", list(FAMILIES))
def test_logits_match_transformers_with_left_padding(checkpoints, name):
    from aepo_jax.models import load_pretrained

    path, hf = checkpoints[name]
    ids, mask = left_padded_batch()
    ref = torch_logits(hf, ids, mask)
    model = load_pretrained(path, dtype="float32")
    ours = np.asarray(model(ids, attention_mask=mask))
    assert ours.dtype == np.float32 and ours.shape == ref.shape
    valid = mask.astype(bool)
    assert np.abs(ours - ref)[valid].max() <= 1e-4


def test_long_sequence_crosses_attention_blocks(checkpoints):
    """L > the 128-row attention block: blocks above the diagonal are skipped, not wrongly dropped."""
    from aepo_jax.models import load_pretrained

    path, hf = checkpoints["qwen2_gqa"]
    ids, mask = left_padded_batch(seed=3, batch=2, length=300)
    mask[1, :150] = 0
    ref = torch_logits(hf, ids, mask)
    ours = np.asarray(load_pretrained(path)(ids, attention_mask=mask))
    assert np.abs(ours - ref)[mask.astype(bool)].max() <= 1e-4


def test_padding_side_and_explicit_positions_do_not_change_real_tokens(checkpoints):
    from aepo_jax.models import load_pretrained

    model = load_pretrained(checkpoints["qwen3_head_dim"][0])
    rng = np.random.RandomState(5)
    seq = rng.randint(0, VOCAB, (1, 7))
    alone = np.asarray(model(seq))[0]
    left = np.concatenate([np.zeros((1, 4), np.int64), seq], 1)
    lmask = np.concatenate([np.zeros((1, 4)), np.ones((1, 7))], 1)
    right = np.concatenate([seq, np.zeros((1, 4), np.int64)], 1)
    rmask = np.concatenate([np.ones((1, 7)), np.zeros((1, 4))], 1)
    np.testing.assert_allclose(np.asarray(model(left, attention_mask=lmask))[0, 4:], alone, atol=1e-5)
    np.testing.assert_allclose(np.asarray(model(right, attention_mask=rmask))[0, :7], alone, atol=1e-5)
    pos = np.clip(np.arange(11) - 4, 0, None)[None]
    np.testing.assert_allclose(
        np.asarray(model(left, attention_mask=lmask, position_ids=pos))[0, 4:], alone, atol=1e-5)


def test_hidden_states_and_lm_head(checkpoints):
    import jax.numpy as jnp

    from aepo_jax.models import load_pretrained

    for name in ("qwen2_gqa", "qwen2_tied_mha"):
        model = load_pretrained(checkpoints[name][0])
        ids, mask = left_padded_batch(seed=1)
        h = model.hidden_states(ids, attention_mask=mask)
        w = model.lm_head_kernel()
        assert h.shape == (3, 11, 64) and w.shape == (64, VOCAB)
        np.testing.assert_allclose(np.asarray(jnp.dot(h, w)), np.asarray(model(ids, attention_mask=mask)),
                                   atol=1e-5)
        if name == "qwen2_tied_mha":
            assert model.lm_head is None
            np.testing.assert_array_equal(np.asarray(w), np.asarray(model.embed[...]).T)


def test_continuation_of_shared_prefixes_equals_whole_rows(checkpoints, name="qwen2_gqa"):
    """Rows that continue shared prefixes (each prefix through the layers once): the hidden states
    and the gradient of whole rows, for left-padded prefixes, rows in any order and padded rows."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from aepo_jax.models import load_pretrained

    model = load_pretrained(checkpoints[name][0])
    rng = np.random.RandomState(11)
    lp, ls, u, n = 6, 5, 3, 7
    pre_ids, pre_mask = rng.randint(0, VOCAB, (u, lp)), np.ones((u, lp), np.int64)
    pre_mask[1, :2] = 0
    pre_mask[2, :5] = 0
    index = rng.permutation(np.arange(n) % u)
    ids = rng.randint(0, VOCAB, (n, ls))
    mask = np.ones((n, ls), np.int64)
    mask[0, 3:] = 0
    mask[4, 1:] = 0
    whole_ids = np.concatenate([pre_ids[index], ids], 1)
    whole_mask = np.concatenate([pre_mask[index], mask], 1)
    pos = np.maximum(np.cumsum(whole_mask, 1) - 1, 0)
    upos = np.maximum(np.cumsum(pre_mask, 1) - 1, 0)
    weights = jnp.asarray(rng.randn(n, ls, model.cfg.hidden_size), jnp.float32)
    graphdef, state = nnx.split(model)

    def whole(st):
        return nnx.merge(graphdef, st).hidden_states(whole_ids, whole_mask, pos)[:, lp:]

    def shared(st):
        return nnx.merge(graphdef, st).continuation_hidden_states(pre_ids, pre_mask, upos, ids, mask, pos[:, lp:],
                                                                  index)

    np.testing.assert_allclose(np.asarray(shared(state)), np.asarray(whole(state)), atol=1e-5)
    np.testing.assert_allclose(np.asarray(model.continuation_hidden_states(pre_ids, pre_mask, upos, ids, mask,
                                                                           pos[:, lp:], index)),
                               np.asarray(whole(state)), atol=1e-5)  # eager call: one compiled program
    g1, g2 = (jax.grad(lambda st, f=f: jnp.sum(f(st) * weights))(state) for f in (whole, shared))
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-4, rtol=1e-4)


def _decode_all(model, ids, mask, prompt_len, max_len):
    """Prefill the first prompt_len tokens, then decode the rest one by one in a jitted fori_loop."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    graphdef, state = nnx.split(model)
    b, total = ids.shape
    k = total - prompt_len

    @jax.jit
    def run(state, ids, mask):
        m = nnx.merge(graphdef, state)
        pos = jnp.maximum(jnp.cumsum(mask, -1) - 1, 0)
        cache = m.init_cache(b, max_len)
        cmask = jnp.zeros((b, max_len), bool).at[:, :prompt_len].set(mask[:, :prompt_len])
        logits, cache = m.decode(ids[:, :prompt_len], pos[:, :prompt_len], cache, 0, cmask)
        out = jnp.zeros((b, k, logits.shape[-1]), jnp.float32).at[:, 0].set(logits[:, -1])

        def body(i, carry):
            cache, cmask, out = carry
            t = prompt_len + i
            cmask = jax.lax.dynamic_update_slice_in_dim(cmask, jnp.ones((b, 1), bool), t, 1)
            tok = jax.lax.dynamic_slice_in_dim(ids, t, 1, 1)
            p = jax.lax.dynamic_slice_in_dim(pos, t, 1, 1)
            lg, cache = m.decode(tok, p, cache, t, cmask)
            return cache, cmask, jax.lax.dynamic_update_slice_in_dim(out, lg, i + 1, 1)

        return jax.lax.fori_loop(0, k - 1, body, (cache, cmask, out))[2]

    return np.asarray(run(state, jnp.asarray(ids), jnp.asarray(mask, bool)))


@pytest.mark.parametrize("name", ["qwen3_head_dim", "llama_rope3"])
def test_kv_cache_decode_matches_full_forward(checkpoints, name):
    from aepo_jax.models import load_pretrained

    model = load_pretrained(checkpoints[name][0])
    ids, mask = left_padded_batch(seed=2, batch=3, length=12)
    prompt_len, k = 7, 5
    full = np.asarray(model(ids, attention_mask=mask))
    got = _decode_all(model, ids, mask, prompt_len, max_len=16)
    np.testing.assert_allclose(got, full[:, prompt_len - 1: prompt_len - 1 + k], atol=1e-5)


def test_decode_chunk_of_several_tokens_applies_causality(checkpoints):
    """Two decode calls of S>1 tokens each equal the full forward (causality inside the chunk)."""
    from aepo_jax.models import load_pretrained

    model = load_pretrained(checkpoints["qwen2_gqa"][0])
    ids, mask = left_padded_batch(seed=4, batch=2, length=10)
    pos = np.maximum(np.cumsum(mask, -1) - 1, 0)
    cache = model.init_cache(2, 12)
    cmask = np.zeros((2, 12), bool)
    cmask[:, :10] = mask.astype(bool)  # slots being written are marked valid up front: harmless
    a, cache = model.decode(ids[:, :6], pos[:, :6], cache, 0, cmask)
    b, cache = model.decode(ids[:, 6:], pos[:, 6:], cache, 6, cmask)
    full = np.asarray(model(ids, attention_mask=mask))
    got = np.concatenate([np.asarray(a), np.asarray(b)], 1)
    valid = mask.astype(bool)
    np.testing.assert_allclose(got[valid], full[valid], atol=1e-5)
    assert set(cache) == {"k", "v"} and cache["k"].shape == (2, 2, 2, 12, 16)  # [layers, B, KV, T, D]


def test_jit_over_split_state_and_gradients(checkpoints):
    """The trainer's pattern: nnx.split once, jit a pure function that merges and calls hidden_states."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from aepo_jax.models import load_pretrained

    model = load_pretrained(checkpoints["qwen2_gqa"][0])
    graphdef, state = nnx.split(model)
    ids, mask = left_padded_batch(seed=6)

    def loss(state, ids, mask, remat):
        m = nnx.merge(graphdef, state)
        m.remat = remat  # a static attribute; the same weights
        h = m.hidden_states(ids, attention_mask=mask)
        logits = jnp.dot(h[:, :-1], m.lm_head_kernel())
        lp = jax.nn.log_softmax(logits)
        tgt = jnp.take_along_axis(lp, ids[:, 1:, None], -1)[..., 0]
        return -(tgt * mask[:, 1:]).sum() / mask[:, 1:].sum()

    f = jax.jit(jax.value_and_grad(loss), static_argnums=3)
    v0, g0 = f(state, ids, mask, False)
    assert np.isfinite(float(v0))
    # Every rematerialisation policy (and the legacy bool) changes memory, not the numbers.
    for policy in (True, "full", "dots", "dots_except_mlp", "attn_context"):
        v1, g1 = f(state, ids, mask, policy)
        np.testing.assert_allclose(float(v0), float(v1), rtol=1e-6)
        for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
    # Gradients of the custom-VJP linear layers agree with plain autodiff through jnp.dot.
    import aepo_jax.models.decoder as dec

    orig = dec.linear
    try:
        dec.linear = jnp.dot
        v2, g2 = jax.jit(jax.value_and_grad(loss), static_argnums=3)(state, ids, mask, False)
    finally:
        dec.linear = orig
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g2)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5)


def test_param_and_compute_dtypes(checkpoints):
    import jax
    import jax.numpy as jnp

    from aepo_jax.models import load_pretrained

    path, _ = checkpoints["qwen3_head_dim"]
    ids, mask = left_padded_batch(seed=7)
    ref = np.asarray(load_pretrained(path)(ids, attention_mask=mask))
    mixed = load_pretrained(path, dtype="float32", compute_dtype="bfloat16")
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(mixed.embed[...]))
    assert mixed.hidden_states(ids, attention_mask=mask).dtype == jnp.bfloat16
    bf16 = load_pretrained(path, dtype="bfloat16")
    assert bf16.layers.attn.qkv[...].dtype == jnp.bfloat16
    valid = mask.astype(bool)
    for m in (mixed, bf16):
        out = np.asarray(m(ids, attention_mask=mask))
        assert out.dtype == np.float32
        err = np.abs(out - ref)[valid].max()
        assert 0 < err < 0.1, err  # bf16 rounding, not a different function
    with pytest.raises(ValueError, match="dtype"):
        load_pretrained(path, dtype="int8")


def test_init_model_and_config_round_trip():
    import transformers as T

    from aepo_jax.models import ModelConfig, init_model

    hf = T.LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                       num_attention_heads=4, num_key_value_heads=2, rope_scaling=LLAMA3).to_dict()
    cfg = ModelConfig.from_hf_dict(hf)
    assert (cfg.head_dim, cfg.num_groups, cfg.rope_type, cfg.qkv_bias, cfg.qk_norm) == (8, 2, "llama3", False, False)
    again = ModelConfig.from_hf_dict(json.loads(json.dumps(cfg.to_hf_dict())))
    assert again == cfg and hash(again) == hash(cfg)
    # The legacy layout (rope_theta + rope_scaling with "type") reads the same.
    legacy = dict(hf)
    legacy.pop("rope_parameters", None)
    legacy.update(rope_theta=10000.0, rope_scaling={**{k: v for k, v in LLAMA3.items() if k != "rope_type"},
                                                     "type": "llama3"})
    assert ModelConfig.from_hf_dict(legacy) == cfg
    m1, m2 = init_model(cfg, seed=3), init_model(cfg, seed=3)
    ids = np.arange(10)[None] % 50
    np.testing.assert_array_equal(np.asarray(m1(ids)), np.asarray(m2(ids)))
    assert not np.allclose(np.asarray(init_model(cfg, seed=4)(ids)), np.asarray(m1(ids)))


@pytest.mark.parametrize("bad,match", [
    ({"model_type": "mistral"}, "model_type"),
    ({"num_key_value_heads": 3}, "num_key_value_heads"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}}, "rope_type"),
    ({"rope_parameters": {"rope_type": "llama3", "factor": 4.0, "rope_theta": 1e4}}, "low_freq_factor"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"use_sliding_window": True}, "use_sliding_window"),
    ({"hidden_size": None}, "hidden_size"),
])
def test_config_errors_name_the_field(bad, match):
    from aepo_jax.models import ConfigError, ModelConfig

    d = {"model_type": "qwen2", "vocab_size": 10, "hidden_size": 16, "intermediate_size": 32,
         "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2}
    d.update(bad)
    with pytest.raises(ConfigError, match=match):
        ModelConfig.from_hf_dict(d)


@pytest.mark.slow
def test_bench_model_runs_and_reports_ratio(capsys):
    """tools/bench_model.py end to end on a tiny config (the real figures come from running it)."""
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[1] / "tools" / "bench_model.py"
    spec = importlib.util.spec_from_file_location("bench_model", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    res = mod.main(["--layers", "1", "--hidden", "64", "--heads", "4", "--kv-heads", "2", "--intermediate", "96",
                    "--vocab", "256", "--batch", "2", "--seq", "32", "--steps", "1"])
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last["ratio"] == res["ratio"] > 0 and last["loss_ours"] == pytest.approx(last["loss_transformers"], abs=1e-3)


def test_layers_are_one_scanned_block_whatever_the_depth():
    """The layers' weights are stacked [layers, ...] and the forward and backward pass (and the KV-cache
    decode) are one loop over them: the traced program is the same size at 2 and at 7 layers."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from aepo_jax.models import ModelConfig, init_model

    def program(layers):
        cfg = ModelConfig(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=layers,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=8)
        model = init_model(cfg, seed=0, remat="dots")
        assert model.layers.attn.qkv[...].shape == (layers, 32, 2, 4, 8)
        assert nnx.state(model.layers).attn.qkv.get_metadata()["logical_axes"][0] == "layers"
        graphdef, state = nnx.split(model)
        ids = jnp.zeros((2, 8), jnp.int32)

        def loss(state):
            return jnp.sum(nnx.merge(graphdef, state).hidden_states(ids))

        def decode(state):
            m = nnx.merge(graphdef, state)
            return m.decode(ids, ids, m.init_cache(2, 8), 0, jnp.ones((2, 8), bool))

        return [len(jax.jit(f).lower(state).as_text().splitlines()) for f in (jax.grad(loss), decode)]

    assert program(2) == program(7)


def test_remat_policy_names():
    from aepo_jax.models.decoder import REMAT_POLICIES, remat_policy

    assert remat_policy(True) == "full" and remat_policy(False) == "none" and remat_policy("FALSE") == "none"
    assert all(remat_policy(n) == n for n in REMAT_POLICIES)
    with pytest.raises(ValueError, match="remat: 'dot' is not a policy"):
        remat_policy("dot")


def test_abstract_models_are_independent():
    """abstract_model is traced once per configuration, but every call is a module of its own:
    filling one (as each weight load does) leaves the next call abstract."""
    import jax

    from aepo_jax.models import ModelConfig
    from aepo_jax.models.decoder import abstract_model, materialize, param_paths

    cfg = ModelConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=8)
    first = materialize(abstract_model(cfg), None, lambda path, var, idx: np.ones(var.get_value().shape)[idx])
    assert all(isinstance(v.get_value(), jax.Array) for _, v in param_paths(first))
    again = abstract_model(cfg)
    assert all(isinstance(v.get_value(), jax.ShapeDtypeStruct) for _, v in param_paths(again))
    assert abstract_model(cfg, dtype="bfloat16").embed.get_value().dtype == jax.numpy.bfloat16
