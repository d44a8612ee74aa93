"""Meshes, the logical-axis rules table, and sharded models that compute what one device computes."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from test_models import left_padded_batch, make_hf_checkpoint


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("shard")
    # 4 KV heads and an even vocab so that tensor parallelism really splits heads, MLP and vocab.
    make_hf_checkpoint(d, "qwen3", seed=3, num_key_value_heads=4, num_attention_heads=8, head_dim=8,
                       vocab_size=96, intermediate_size=128)
    return str(d)


def test_make_mesh_shapes_and_errors():
    import jax

    from aepo_jax.models.sharding import make_mesh

    assert len(jax.devices()) == 8  # tests/conftest.py simulates 8 host devices
    assert dict(make_mesh("8x1").shape) == {"data": 8, "tensor": 1}
    assert dict(make_mesh("4x2").shape) == {"data": 4, "tensor": 2}
    assert dict(make_mesh(None).shape) == {"data": 8, "tensor": 1}
    with pytest.raises(ValueError, match=r"4x4.*16 devices but 8"):
        make_mesh("4x4")
    with pytest.raises(ValueError, match=r"1x1.*1 devices but 8"):
        make_mesh("1x1")
    with pytest.raises(ValueError, match="mesh"):
        make_mesh("8by1")


def test_rules_table_and_indivisible_dims():
    from jax.sharding import PartitionSpec as P

    from aepo_jax.models.sharding import LOGICAL_AXIS_RULES, logical_to_spec, make_mesh

    names = [n for n, _ in LOGICAL_AXIS_RULES]
    assert len(names) == len(set(names))
    mesh = make_mesh("4x2")
    assert logical_to_spec(("embed", "vocab"), (64, 96), mesh) == P("data", "tensor")
    assert logical_to_spec(("embed", "vocab"), (64, 97), mesh) == P("data", None)  # 97 % 2 != 0
    assert logical_to_spec(("embed", "kv_heads", "qkv", "head_dim"), (6, 2, 4, 8), mesh) == P(None, "tensor", None, None)
    assert logical_to_spec(("norm",), (64,), mesh) == P(None)
    with pytest.raises(KeyError, match="nonsense"):
        logical_to_spec(("nonsense",), (4,), mesh)


@pytest.mark.parametrize("spec", ["8x1", "4x2"])
def test_sharded_model_matches_one_device(ckpt, spec):
    import jax
    from flax import nnx

    from aepo_jax.models import load_pretrained
    from jax.sharding import NamedSharding, PartitionSpec as P

    from aepo_jax.models.sharding import make_mesh, model_shardings

    ids, mask = left_padded_batch(seed=8, batch=8, length=9)
    ref_model = load_pretrained(ckpt)
    ref = np.asarray(ref_model(ids, attention_mask=mask))
    mesh = make_mesh(spec)
    model = load_pretrained(ckpt, mesh=mesh)
    graphdef, state = nnx.split(model)
    shardings = model_shardings(model, mesh)
    for s, v in zip(jax.tree.leaves(shardings), jax.tree.leaves(state)):
        assert v.sharding == s  # loaded straight into the sharding the rules give

    @jax.jit
    def logits(state, ids, mask):
        return nnx.merge(graphdef, state)(ids, attention_mask=mask)

    ids_s, mask_s = jax.device_put((ids, mask), NamedSharding(mesh, P("data")))  # rows over "data"
    out = logits(state, ids_s, mask_s)
    valid = mask.astype(bool)
    assert np.abs(np.asarray(out) - ref)[valid].max() <= 1e-5
    assert out.sharding.spec[0] == "data"  # activations stay batch-sharded
    # Gradients under the mesh equal single-device gradients.
    def grad_fn(graphdef):
        def loss(state, ids, mask):
            h = nnx.merge(graphdef, state).hidden_states(ids, attention_mask=mask)
            return (h.astype(np.float32) ** 2).mean()

        return jax.jit(jax.grad(loss))

    g = grad_fn(graphdef)(state, ids_s, mask_s)
    g_ref = grad_fn(nnx.split(ref_model)[0])(nnx.split(ref_model)[1], ids, mask)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


def test_init_model_values_do_not_depend_on_mesh():
    from jax.sharding import PartitionSpec as P

    from aepo_jax.models import ModelConfig, init_model
    from aepo_jax.models.decoder import param_paths

    cfg = ModelConfig(model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=64,
                      num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                      qkv_bias=False)
    a = {p: np.asarray(v.get_value()) for p, v in param_paths(init_model(cfg, seed=1))}
    m = init_model(cfg, seed=1, mesh="4x2")
    for p, v in param_paths(m):
        np.testing.assert_array_equal(np.asarray(v.get_value()), a[p])
    assert m.lm_head[...].sharding.spec == P("data", "tensor")


def test_entry_point_simulates_host_devices_before_jax_starts():
    code = (
        "from aepo_jax.platform import setup_host_devices, mesh_spec_from_argv\n"
        "setup_host_devices(mesh_spec_from_argv())\n"
        "from aepo_jax.models.sharding import make_mesh\n"
        "print(dict(make_mesh(mesh_spec_from_argv()).shape))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    r = subprocess.run([sys.executable, "-c", code, "--mesh=2x3"], capture_output=True, text=True, env=env,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert "{'data': 2, 'tensor': 3}" in r.stdout
