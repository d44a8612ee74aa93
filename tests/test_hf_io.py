"""Hugging Face import/export: round trips through transformers and load_pretrained, sharded
checkpoints, tokenizer/generation files, and the promised errors."""

from __future__ import annotations

import json
import os
import pathlib
import shutil

import numpy as np
import pytest

from test_models import VOCAB, left_padded_batch, make_hf_checkpoint, torch_logits

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _write_tokenizer(d):
    """A tiny real tokenizer (word level) so the copied files can be loaded back."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0", eos_token="w2").save_pretrained(d)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    d = tmp_path_factory.mktemp("src")
    hf = make_hf_checkpoint(d, "qwen2", seed=1)
    _write_tokenizer(d)
    with open(d / "generation_config.json", "w") as f:
        json.dump({"bos_token_id": 1, "eos_token_id": [2, 3], "temperature": 0.7}, f)
    return str(d), hf


def _params(model):
    from aepo_jax.models.decoder import param_paths

    return {p: np.asarray(v.get_value()) for p, v in param_paths(model)}


def test_export_fp32_reloads_in_transformers_with_identical_logits(source, tmp_path):
    import transformers as T

    from aepo_jax.models import load_pretrained, save_pretrained

    path, hf = source
    model = load_pretrained(path)
    out = tmp_path / "out"
    written = save_pretrained(model, out, dtype="float32")
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json",
            "tokenizer_config.json"} <= set(written)
    assert sorted(os.listdir(out)) == sorted(set(written))  # nothing else (no .tmp leftovers)
    ids, mask = left_padded_batch(seed=11)
    reloaded = T.AutoModelForCausalLM.from_pretrained(out).eval()
    np.testing.assert_array_equal(torch_logits(reloaded, ids, mask), torch_logits(hf, ids, mask))
    gen = json.load(open(out / "generation_config.json"))
    assert gen["temperature"] == 0.7 and gen["eos_token_id"] == [2, 3]
    for fn in ("tokenizer.json", "tokenizer_config.json"):
        assert open(out / fn, "rb").read() == open(os.path.join(path, fn), "rb").read()
    text = "w5 w7 w96"
    assert T.AutoTokenizer.from_pretrained(out)(text) == T.AutoTokenizer.from_pretrained(path)(text)


def test_export_sharded_then_load_pretrained_identical_params(source, tmp_path):
    from aepo_jax.models import load_pretrained, save_pretrained

    path, _ = source
    model = load_pretrained(path)
    out = tmp_path / "sharded"
    save_pretrained(model, out, dtype="float32", max_shard_size=40_000)
    index = json.load(open(out / "model.safetensors.index.json"))
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert index["metadata"]["total_size"] == sum(a.nbytes for a in _params(model).values())
    again = load_pretrained(out)
    a, b = _params(model), _params(again)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=str(k))
    # Exporting again as one file into the same directory removes the old shards and index.
    save_pretrained(again, out, dtype="float32")
    assert not any(f.startswith("model-") or f.endswith("index.json") for f in os.listdir(out))


def test_export_bf16_tied_and_transformers_reads_it(tmp_path):
    import jax.numpy as jnp
    import torch
    import transformers as T

    from aepo_jax.models import load_pretrained, save_pretrained

    src = tmp_path / "tied"
    make_hf_checkpoint(src, "qwen3", seed=2, tie_word_embeddings=True, head_dim=24)
    model = load_pretrained(src)
    out = tmp_path / "bf16"
    save_pretrained(model, out, dtype="bfloat16")
    cfg = json.load(open(out / "config.json"))
    assert cfg["torch_dtype"] == "bfloat16" and cfg["tie_word_embeddings"] is True and cfg["head_dim"] == 24
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), framework="numpy") as f:
        assert "lm_head.weight" not in f.keys()
        assert f.get_tensor("model.embed_tokens.weight").dtype == jnp.bfloat16
    # Parameters come back as the bf16 rounding of ours.
    back = load_pretrained(out, dtype="float32")
    for k, v in _params(model).items():
        np.testing.assert_array_equal(_params(back)[k], v.astype(jnp.bfloat16).astype(np.float32))
    hf = T.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids, mask = left_padded_batch(seed=12)
    ours = np.asarray(back(ids, attention_mask=mask))
    assert np.abs(torch_logits(hf, ids, mask) - ours)[mask.astype(bool)].max() <= 1e-4


def test_load_into_mesh_places_each_tensor_in_its_sharding(source):
    from jax.sharding import PartitionSpec as P

    from aepo_jax.models import load_pretrained

    model = load_pretrained(source[0], mesh="4x2")
    qkv = model.layers.attn.qkv[...]  # [layers=2, H=64, KV=2, G+2=4, D=16]: layers never sharded
    assert qkv.sharding.spec == P(None, "data", "tensor", None, None)
    assert len(qkv.addressable_shards) == 8 and qkv.addressable_shards[0].data.shape == (2, 16, 1, 4, 16)
    assert model.embed[...].sharding.spec == P(None, "data")  # vocab 97 is not divisible by 2
    assert model.layers.mlp.down[...].sharding.spec == P(None, "tensor", "data")
    ref = _params(load_pretrained(source[0]))
    for k, v in _params(model).items():
        np.testing.assert_array_equal(v, ref[k])


# ----------------------------------------------------------------------------- errors
def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_missing_files(source, tmp_path):
    from aepo_jax.models import load_pretrained

    with pytest.raises(FileNotFoundError, match="config.json"):
        load_pretrained(tmp_path)
    d = _copy(source[0], tmp_path / "noweights")
    os.remove(d / "model.safetensors")
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_pretrained(d)
    with open(d / "model.safetensors.index.json", "w") as f:
        json.dump({"weight_map": {"model.norm.weight": "model-00009-of-00009.safetensors"}}, f)
    with pytest.raises(FileNotFoundError, match="model-00009-of-00009.safetensors"):
        load_pretrained(d)


def test_unsupported_model_type(source, tmp_path):
    from aepo_jax.models import ConfigError, load_pretrained

    d = _copy(source[0], tmp_path / "mistral")
    cfg = json.load(open(d / "config.json"))
    cfg["model_type"] = "mistral"
    json.dump(cfg, open(d / "config.json", "w"))
    with pytest.raises(ConfigError, match="model_type.*mistral"):
        load_pretrained(d)


def test_shape_mismatch_names_tensor_and_both_shapes(source, tmp_path):
    from aepo_jax.models import CheckpointError, load_pretrained

    d = _copy(source[0], tmp_path / "wide")
    cfg = json.load(open(d / "config.json"))
    cfg["intermediate_size"] = 128
    json.dump(cfg, open(d / "config.json", "w"))
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.mlp\.gate_proj\.weight.*\[96, 64\].*\[128, 64\]"):
        load_pretrained(d)


def test_missing_tensor_is_named(source, tmp_path):
    from safetensors.numpy import load_file, save_file

    from aepo_jax.models import CheckpointError, load_pretrained

    d = _copy(source[0], tmp_path / "holes")
    tensors = load_file(str(d / "model.safetensors"))
    del tensors["model.layers.1.self_attn.k_proj.bias"]
    save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.self_attn\.k_proj\.bias.*missing"):
        load_pretrained(d)


def test_load_checkpoint_sharded_by_transformers(tmp_path):
    """Shards + model.safetensors.index.json as transformers itself writes them."""
    from aepo_jax.models import load_pretrained

    d = tmp_path / "hfsharded"
    hf = make_hf_checkpoint(tmp_path / "unused", "llama", seed=5, num_key_value_heads=1)
    hf.save_pretrained(d, max_shard_size="60KB")
    assert (d / "model.safetensors.index.json").exists() and not (d / "model.safetensors").exists()
    ids, mask = left_padded_batch(seed=13)
    ours = np.asarray(load_pretrained(d, mesh="8x1")(ids, attention_mask=mask))
    assert np.abs(ours - torch_logits(hf, ids, mask))[mask.astype(bool)].max() <= 1e-4


def test_params_saved_per_layer_before_stacking_still_export(source):
    """Checkpoints written before the layers became one stacked block hold ("layers", "<n>", ...)
    parameters; tools/export_hf.py stacks them into today's layout, value for value."""
    import importlib.util

    from aepo_jax.models import load_pretrained, read_config
    from aepo_jax.models.decoder import stack_legacy_layers

    model = load_pretrained(source[0])
    legacy: dict = {}
    for path, x in _params(model).items():  # the old tree: one subtree per layer, string keys as orbax restores
        for n, layer in enumerate(x if path[0] == "layers" else [x]):
            key = ("layers", str(n), *path[1:]) if path[0] == "layers" else path
            node = legacy
            for k in key[:-1]:
                node = node.setdefault(k, {})
            node[key[-1]] = {"value": layer}
    spec = importlib.util.spec_from_file_location("export_hf", ROOT / "tools" / "export_hf.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    again = tool.fill_model(read_config(source[0]), legacy)
    for k, v in _params(model).items():
        np.testing.assert_array_equal(_params(again)[k], v, err_msg=str(k))
    with pytest.raises(ValueError, match="layers/mlp/down: layers \\[0, 2\\] saved"):
        stack_legacy_layers({("layers", "0", "mlp", "down"): np.zeros(2), ("layers", "2", "mlp", "down"): np.zeros(2)})


def _random_cfg(rng):
    from aepo_jax.models import ModelConfig

    kv = int(rng.choice([1, 2]))
    heads = kv * int(rng.choice([1, 2, 3]))
    mt = str(rng.choice(["qwen2", "qwen3"]))
    d = {"model_type": mt, "vocab_size": int(rng.integers(40, 90)), "hidden_size": 8 * int(rng.integers(2, 5)),
         "intermediate_size": int(rng.integers(10, 40)), "num_hidden_layers": int(rng.integers(1, 4)),
         "num_attention_heads": heads, "num_key_value_heads": kv, "head_dim": 4 * int(rng.integers(1, 3)),
         "tie_word_embeddings": bool(rng.integers(2)), "max_position_embeddings": 64}
    return ModelConfig.from_hf_dict(d)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_host_and_device_layout_conversions_agree_both_ways(seed):
    """The CPU host conversions (hf_host_tensors, HFAssembler on the host) produce exactly what the
    jitted device transforms produce, both directions, for random shapes (GQA groups, biases,
    q/k norms, tied or not), whole or fed in any order and dtype."""
    from aepo_jax.models import init_model
    from aepo_jax.models.hf_layout import HFAssembler, hf_device_tensors, hf_host_tensors, host_path

    rng = np.random.default_rng(seed)
    cfg = _random_cfg(rng)
    dtype = str(rng.choice(["float32", "bfloat16"]))
    model = init_model(cfg, seed=seed, dtype=dtype)
    assert host_path(model)
    dev = {n: np.asarray(a) for n, a in hf_device_tensors(model, dtype)}
    host = {n: np.array(a) for n, a in hf_host_tensors(model, dtype)}
    assert list(dev) == list(host)
    for n in dev:
        assert dev[n].dtype == host[n].dtype and np.array_equal(dev[n].view(np.uint8), host[n].view(np.uint8)), n
    want = {tuple(p): np.asarray(v.get_value()) for p, v in _params_with_paths(model)}
    order = list(dev)
    rng.shuffle(order)
    for on_host in (True, False):  # the same tensors, shuffled, through both assemblers
        asm = HFAssembler(cfg, dtype)
        asm.host = on_host
        for n in order:
            asm.add(n, dev[n].astype(np.float32) if rng.integers(2) else dev[n])  # bf16: a cast on the way
            asm.detach()
        back = asm.finish()
        for p, v in _params_with_paths(back):
            np.testing.assert_array_equal(np.asarray(v.get_value()), want[tuple(p)], err_msg=str((p, on_host)))


def _params_with_paths(model):
    from aepo_jax.models.decoder import param_paths

    return param_paths(model)


@pytest.mark.parametrize("seed", [0, 1])
def test_host_all_finite_finds_any_nan_or_inf(seed):
    import jax.numpy as jnp

    from aepo_jax.models.hf_layout import host_all_finite

    rng = np.random.default_rng(seed)
    for dt in (jnp.bfloat16, np.float16, np.float32, np.float64):
        a = (rng.standard_normal(int(rng.integers(1, 5000))) * 1e3).astype(dt)
        assert host_all_finite(a, chunk=int(rng.integers(1, 700)))
        for bad in (np.nan, np.inf, -np.inf):
            b = a.copy()
            b[int(rng.integers(b.size))] = bad
            assert not host_all_finite(b, chunk=int(rng.integers(1, 700))), (dt, bad)
    big = np.array([np.finfo(np.float16).max, -np.finfo(np.float16).max, 0.0, -0.0], np.float16)
    assert host_all_finite(big)
