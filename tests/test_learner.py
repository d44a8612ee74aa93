"""The jitted learner: log-probs match the model, one update step is the same on 1 device and on
simulated 8x1 / 4x2 meshes and for any micro-batch count, and a non-finite gradient skips the update."""

import dataclasses

import jax
import numpy as np
import pytest

from aepo_jax.losses import LossConfig
from aepo_jax.models import ModelConfig, init_model
from aepo_jax.models.sharding import make_mesh
from aepo_jax.methods import method_spec
from aepo_jax.trainer.batch import Batch
from aepo_jax.trainer.config import OptimSection
from aepo_jax.trainer.learner import Learner, LearnerSpec

P_LEN, R_LEN, N = 6, 10, 16


def _cfg():
    return ModelConfig.from_hf_dict({
        "model_type": "qwen2", "vocab_size": 97, "hidden_size": 32, "intermediate_size": 64,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": 64, "rope_theta": 10000.0, "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False,
    })


def _batch(seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, 97, size=(N, P_LEN + R_LEN)).astype(np.int32)
    attn = np.ones_like(ids)
    plen = rng.integers(2, P_LEN + 1, size=N)
    rlen = rng.integers(1, R_LEN + 1, size=N)
    rmask = np.zeros((N, R_LEN), np.float32)
    for i in range(N):
        attn[i, : P_LEN - plen[i]] = 0
        attn[i, P_LEN + rlen[i]:] = 0
        rmask[i, : rlen[i]] = 1
    pos = np.maximum(np.cumsum(attn, 1) - 1, 0).astype(np.int32)
    is_reg = np.zeros(N, bool)
    is_reg[-4:] = True
    return Batch(input_ids=ids, attention_mask=attn, position_ids=pos, mask=rmask,
                 rewards=(rng.random(N) > 0.5).astype(np.float32), advantages=rng.normal(size=N).astype(np.float32),
                 is_reg=is_reg, main_rollout=~is_reg, group=np.arange(N, dtype=np.int32) // 4,
                 truncated=np.zeros(N, bool))


def _grouped_batch(seed=0, prompts=3, pad_rows=2):
    """Rows that share prompts (a GRPO step: several samples per prompt, here of unequal group
    sizes and in shuffled order), plus all-padding rows (mask 0, as ``pad_rows`` adds)."""
    b = _batch(seed)
    rng = np.random.default_rng(seed + 100)
    ids, attn = b.input_ids.copy(), b.attention_mask.copy()
    prompt_of = rng.integers(0, prompts, size=N)
    for i in range(N):
        src = int(np.nonzero(prompt_of == prompt_of[i])[0][0])
        ids[i, :P_LEN], attn[i, :P_LEN] = ids[src, :P_LEN], attn[src, :P_LEN]
    mask = b.mask.copy()
    ids[N - pad_rows:], attn[N - pad_rows:], mask[N - pad_rows:] = 0, 0, 0
    pos = np.maximum(np.cumsum(attn, 1) - 1, 0).astype(np.int32)
    return dataclasses.replace(b, input_ids=ids, attention_mask=attn, position_ids=pos, mask=mask)


def _learner(mesh_spec, micro=1, method="aepo", reuse_old_logp=False, prefix_slots=0):
    d, t = (int(x) for x in mesh_spec.split("x"))
    mesh = make_mesh(mesh_spec, devices=jax.devices()[: d * t])
    model = init_model(_cfg(), seed=0, mesh=mesh)
    m = method_spec(method)
    spec = LearnerSpec(loss_name=m.loss, loss=LossConfig(), prompt_len=P_LEN, response_len=R_LEN,
                       logprob_chunk=4, micro_batches=micro, entropy_grad=m.entropy_grad,
                       reuse_old_logp=reuse_old_logp, prefix_slots=prefix_slots)
    # eps >> round-off in g: with a tiny eps Adam would turn a 1e-9 difference into a +-lr step.
    return Learner(model, spec, OptimSection(lr=1e-2, eps=1e-3), total_updates=10, mesh=mesh)


def _step(learner, batch):
    lp, _ = learner.logprobs(batch, rows_per_call=8)
    m = learner.update(dataclasses.replace(batch, old_logp=lp - 0.05 * batch.mask))
    return m, jax.tree.map(np.asarray, learner.params)


def test_logprobs_match_model_log_softmax():
    learner = _learner("1x1")
    b = _batch()
    lp, ent = learner.logprobs(b, rows_per_call=5)  # 5 does not divide 16: padding path
    logits = np.asarray(learner.model()(b.input_ids, b.attention_mask, b.position_ids), np.float64)
    logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    logsm = logits - logz[..., None]
    want = np.take_along_axis(logsm[:, P_LEN - 1 : -1], b.input_ids[:, P_LEN:, None], -1)[..., 0]
    np.testing.assert_allclose(lp, want, atol=1e-4)
    p = np.exp(logsm[:, P_LEN - 1 : -1])
    np.testing.assert_allclose(ent, -(p * logsm[:, P_LEN - 1 : -1]).sum(-1), atol=1e-4)


@pytest.mark.parametrize("method,layouts", [
    ("aepo", (("1x1", 4), ("8x1", 1), ("4x2", 2))),
    ("entropy_reg", (("4x2", 2),)),  # the loss whose entropy term carries a gradient
])
def test_update_invariant_to_mesh_and_micro_batches(method, layouts):
    b = _batch()
    m1, p1 = _step(_learner("1x1", 1, method), b)
    assert m1["actor/update_skipped"] == 0 and np.isfinite(m1["loss/total"])
    for mesh, micro in layouts:
        m2, p2 = _step(_learner(mesh, micro, method), b)
        assert m2["loss/total"] == pytest.approx(m1["loss/total"], rel=1e-5, abs=1e-6), (mesh, micro)
        assert m2["actor/grad_norm"] == pytest.approx(m1["actor/grad_norm"], rel=1e-4), (mesh, micro)
        for a, c in zip(jax.tree.leaves(p1), jax.tree.leaves(p2)):
            np.testing.assert_allclose(a, c, atol=2e-5)


def test_nonfinite_gradient_skips_update():
    learner = _learner("1x1")
    b = _batch()
    before = jax.tree.map(np.asarray, learner.params)
    lp, _ = learner.logprobs(b, rows_per_call=16)
    adv = b.advantages.copy()
    adv[0] = np.nan
    m = learner.update(dataclasses.replace(b, advantages=adv, old_logp=lp))
    assert m["actor/update_skipped"] == 1.0
    for a, c in zip(jax.tree.leaves(before), jax.tree.leaves(learner.params)):
        np.testing.assert_array_equal(a, np.asarray(c))
    m = learner.update(dataclasses.replace(b, old_logp=lp))  # and the next finite update goes through
    assert m["actor/update_skipped"] == 0.0


@pytest.mark.parametrize("method", ["aepo", "entropy_reg", "grpo"])
def test_on_policy_reuse_equals_recomputed_old_logprobs(method):
    """One epoch of one mini-batch: sg(log pi) of the update's own forward pass is log pi_old, so
    skipping the separate forward pass gives the same loss, gradient, update and policy entropy."""
    b = _batch(3)
    exact = _learner("1x1", 1, method)
    lp, ent = exact.logprobs(b, rows_per_call=16)
    m1 = exact.update(dataclasses.replace(b, old_logp=lp, entropy=ent))
    reuse = _learner("1x1", 1, method, reuse_old_logp=True)
    m2 = reuse.update(b)
    for k in ("loss/total", "loss/pg", "loss/reg", "loss/entropy", "actor/grad_norm", "actor/ratio_mean"):
        assert m2[k] == pytest.approx(m1[k], rel=1e-5, abs=1e-7), k
    assert m1["actor/ratio_mean"] == pytest.approx(1.0, abs=1e-5)
    for a, c in zip(jax.tree.leaves(exact.params), jax.tree.leaves(reuse.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(c), atol=1e-6)
    # the update's entropy of the main-rollout rows == the separate pass's (the controller's signal)
    main = b.main_rollout & (b.mask.sum(1) > 0)
    want_full = np.mean(((ent * b.mask).sum(1) / b.mask.sum(1))[main])
    want_nll = np.mean(((-lp * b.mask).sum(1) / b.mask.sum(1))[main])
    assert m2["policy/entropy_full"] == pytest.approx(want_full, rel=1e-5)
    assert m2["policy/entropy_nll"] == pytest.approx(want_nll, rel=1e-5)
    # without old log-probs an off-policy learner refuses the batch instead of guessing
    with pytest.raises(ValueError, match="old_logp"):
        _learner("1x1", 1, method).update(b)


@pytest.mark.parametrize("mesh,micro,reuse,slots", [("1x1", 1, True, 0), ("4x2", 2, False, 0), ("1x1", 1, False, 5)])
def test_updates_after_the_first_compile_nothing(mesh, micro, reuse, slots):
    """The optimiser state starts where the update keeps it, so the second update hits the jit
    cache (it used to compile again at step 2); new batch values never recompile (with the
    shared-prefix pass: nor a new number of distinct prompts)."""
    from aepo_jax.compilation_cache import COMPILES

    learner = _learner(mesh, micro, "aepo", reuse_old_logp=reuse, prefix_slots=slots)
    COMPILES.install()
    for seed in range(3):
        b = _grouped_batch(seed, prompts=seed + 2) if slots else _batch(seed)
        before = COMPILES.compiles
        if not reuse:
            lp, ent = learner.logprobs(b, rows_per_call=8)
            b = dataclasses.replace(b, old_logp=lp, entropy=ent)
        m = learner.update(b, seed)
        assert m["optim/lr"] == pytest.approx(1e-2)  # constant schedule, computed inside the update
        if seed == 0:
            assert COMPILES.compiles > before  # the counter sees compilations
        else:
            assert COMPILES.compiles == before, f"update {seed + 1} compiled {COMPILES.compiles - before} time(s)"


@pytest.mark.parametrize("method,mesh,micro,reuse", [
    ("aepo", "1x1", 1, True), pytest.param("entropy_reg", "4x2", 2, False, marks=pytest.mark.slow)])
def test_shared_prefix_pass_equals_whole_rows(method, mesh, micro, reuse):
    """Each distinct prompt through the decoder once, the rows continuing it: the same log-probs,
    entropies, loss, gradient and update as every row whole (up to float rounding), whatever the
    rows' order, group sizes, padding rows, micro-batches or mesh."""
    b = _grouped_batch(5)
    whole = _learner(mesh, micro, method, reuse_old_logp=reuse)
    shared = _learner(mesh, micro, method, reuse_old_logp=reuse, prefix_slots=4)
    for learner in (whole, shared):
        learner.out = learner.logprobs(b, rows_per_call=8)
    for a, c in zip(whole.out, shared.out):
        np.testing.assert_allclose(a, c, atol=2e-5)
    lp, ent = whole.out
    batch = b if reuse else dataclasses.replace(b, old_logp=lp - 0.05 * b.mask, entropy=ent)
    m1, m2 = whole.update(batch), shared.update(batch)
    assert m1.keys() == m2.keys()
    for k in m1:
        assert m2[k] == pytest.approx(m1[k], rel=1e-4, abs=1e-6), k
    for a, c in zip(jax.tree.leaves(whole.params), jax.tree.leaves(shared.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(c), atol=2e-5)


def test_shared_prefix_with_too_many_prompts_runs_rows_whole(caplog):
    """More distinct prompts in a call than prefix slots: those rows go through whole (a warning,
    the right numbers) instead of failing."""
    b = _grouped_batch(6, prompts=N)  # no two rows share a prompt
    whole, shared = _learner("1x1"), _learner("1x1", prefix_slots=3)
    with caplog.at_level("WARNING", logger="aepo_jax.train"):
        got = shared.logprobs(b, rows_per_call=8)
    assert "prefix slots" in caplog.text
    for a, c in zip(whole.logprobs(b, rows_per_call=8), got):
        np.testing.assert_allclose(a, c, atol=2e-5)


def test_shared_prefixes_finds_each_rows_prompt():
    from aepo_jax.trainer.learner import shared_prefixes

    b = _grouped_batch(7, prompts=3, pad_rows=3)
    got = shared_prefixes(b.input_ids, b.attention_mask, b.position_ids, P_LEN, slots=6)
    assert got["ids"].shape == (6, P_LEN - 1) and got["index"].shape == (N,)
    for i in range(N):  # every row's prefix columns are the ones of the slot it points at
        j = got["index"][i]
        np.testing.assert_array_equal(got["ids"][j], b.input_ids[i, : P_LEN - 1])
        np.testing.assert_array_equal(got["mask"][j], b.attention_mask[i, : P_LEN - 1])
        np.testing.assert_array_equal(got["pos"][j], b.position_ids[i, : P_LEN - 1])
    distinct = len({bytes(b.input_ids[i, : P_LEN - 1]) + bytes(b.attention_mask[i, : P_LEN - 1]) for i in range(N)})
    assert len(set(got["index"].tolist())) == distinct
    assert shared_prefixes(b.input_ids, b.attention_mask, b.position_ids, P_LEN, slots=distinct - 1) is None
    assert shared_prefixes(b.input_ids, b.attention_mask, b.position_ids, 1, slots=6) is None  # P = 1: no prefix
