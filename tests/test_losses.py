"""Losses against an independent NumPy implementation (value and d loss / d logp), both aggregations,
micro-batch invariance with global denominators, metrics, sharded inputs, bad input."""

import numpy as np
import pytest

METHODS = ["grpo", "aepo", "ablation_eq2", "ablation_eq3", "entropy_reg", "entropy_adv", "reinforce"]
AGGS = ["seq-mean-token-mean", "token-mean"]


def make_batch(seed, n=12, L=9, token_adv=False, empty_row=True):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, L + 1, size=n)
    if empty_row:
        lengths[3] = 0  # a padding row: must not count anywhere
    mask = (np.arange(L)[None, :] < lengths[:, None]).astype(np.float32)
    old = -rng.gamma(2.0, 0.7, size=(n, L)).astype(np.float32)
    # ratios spread over [~0.5, ~1.6] so every clip branch is exercised
    logp = (old + rng.normal(0, 0.3, size=(n, L))).astype(np.float32)
    rewards = rng.integers(0, 2, size=n).astype(np.float32)
    adv = rng.normal(0, 1, size=(n, L) if token_adv else (n,)).astype(np.float32)
    adv[rng.random(adv.shape) < 0.15] = 0.0
    is_reg = np.zeros(n, bool)
    is_reg[rng.choice(n, size=n // 3, replace=False)] = True
    ent = rng.gamma(1.5, 0.5, size=(n, L)).astype(np.float32)
    return dict(logp=logp, old_logp=old, mask=mask, advantages=adv, rewards=rewards, is_reg=is_reg, entropy=ent)


# ---------------------------------------------------------------- independent NumPy reference


def ref_loss(method, b, cfg):
    """Returns (loss, dloss/dlogp, dloss/dentropy) in float64, written token by token."""
    logp, old, mask = (np.asarray(b[k], np.float64) for k in ("logp", "old_logp", "mask"))
    n, L = logp.shape
    adv = np.asarray(b["advantages"], np.float64)
    adv = np.repeat(adv[:, None], L, 1) if adv.ndim == 1 else adv
    R = np.asarray(b["rewards"], np.float64)
    reg = np.asarray(b["is_reg"], bool)
    H = np.asarray(b["entropy"], np.float64)
    lens = mask.sum(1)
    valid = lens > 0
    seq_mode = cfg.agg == "seq-mean-token-mean"

    def count(sel):
        return float(np.sum(valid & sel)) if seq_mode else float(np.sum(lens[sel]))

    everyone = np.ones(n, bool)
    if method in ("aepo", "ablation_eq2", "ablation_eq3"):
        main_sel, reg_sel = ~reg, reg
        den_main = count(~reg)
        den_reg = {"main": count(~reg), "reg": count(reg), "joint": count(everyone)}[cfg.reg_norm]
        if cfg.reg_norm == "joint":
            den_main = count(everyone)
    else:
        main_sel, reg_sel = everyone, np.zeros(n, bool)
        den_main, den_reg = count(everyone), 1.0

    loss = 0.0
    g = np.zeros((n, L))
    gH = np.zeros((n, L))
    for i in range(n):
        for t in range(L):
            if mask[i, t] == 0:
                continue
            r = np.exp(logp[i, t] - old[i, t])
            a = adv[i, t]
            if reg_sel[i]:
                a = R[i] if method in ("aepo", "ablation_eq2") else adv[i, t]
            if method == "entropy_adv":
                a = a + min(cfg.adv_beta * H[i, t], abs(a) / cfg.adv_kappa)
            if method == "reinforce":
                tok, dtok = -a * r, -a * r
            else:
                lo, hi = 1 - cfg.clip_low, 1 + cfg.clip_high
                unclipped, clipped = -a * r, -a * min(max(r, lo), hi)
                if unclipped >= clipped:
                    tok, dtok = unclipped, -a * r
                else:
                    tok, dtok = clipped, 0.0
                if cfg.clip_dual is not None and a < 0 and tok > -a * cfg.clip_dual:
                    tok, dtok = -a * cfg.clip_dual, 0.0
            w = 1.0 / lens[i] if seq_mode else 1.0
            if reg_sel[i]:
                w *= cfg.alpha / max(den_reg, 1.0)
            else:
                w /= max(den_main, 1.0)
            loss += w * tok
            g[i, t] = w * dtok
            if method == "entropy_reg":
                we = (1.0 / lens[i] if seq_mode else 1.0) / max(count(everyone), 1.0)
                loss -= cfg.entropy_coef * we * H[i, t]
                gH[i, t] = -cfg.entropy_coef * we
    return loss, g, gH


def jax_loss_and_grads(method, b, cfg, denominators=None):
    import jax
    import jax.numpy as jnp

    from aepo_jax.losses import policy_loss

    def f(logp, ent):
        return policy_loss(method, {**b, "logp": logp, "entropy": ent}, cfg, denominators=denominators)

    (loss, metrics), (g, gH) = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(
        jnp.asarray(b["logp"]), jnp.asarray(b["entropy"])
    )
    return float(loss), np.asarray(g), np.asarray(gH), metrics


CONFIGS = [
    dict(),
    dict(clip_dual=3.0, clip_low=0.2, clip_high=0.28, alpha=0.5),
    dict(reg_norm="reg", alpha=2.0, clip_dual=1.5),
    dict(reg_norm="joint", entropy_coef=0.1, adv_beta=1.0, adv_kappa=3.0),
]


@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("method", METHODS)
def test_loss_matches_numpy(method, agg):
    from aepo_jax.losses import LossConfig

    for ci, kw in enumerate(CONFIGS):
        cfg = LossConfig(agg=agg, **kw)
        for seed, token_adv in ((ci, False), (ci + 10, True)):
            b = make_batch(seed, token_adv=token_adv)
            want, want_g, want_gH = ref_loss(method, b, cfg)
            got, g, gH, _ = jax_loss_and_grads(method, b, cfg)
            assert got == pytest.approx(want, rel=1e-5, abs=1e-6), (method, agg, kw)
            np.testing.assert_allclose(g, want_g, rtol=1e-4, atol=1e-7, err_msg=f"{method} {agg} {kw}")
            np.testing.assert_allclose(gH, want_gH, rtol=1e-4, atol=1e-7, err_msg=f"{method} {agg} {kw}")


def test_contract_formula_for_aepo():
    """The issue's formula: -(mean_GRPO tokmean min(rA, clip(r)A)) - alpha (mean_T tokmean min(rR, clip(r)R))."""
    from aepo_jax.losses import LossConfig, policy_loss

    b = make_batch(3, empty_row=False)
    alpha = 0.3
    r = np.exp(b["logp"].astype(np.float64) - b["old_logp"])
    cr = np.clip(r, 0.8, 1.2)

    def tokmean(x, i):
        return np.sum(x[i] * b["mask"][i]) / np.sum(b["mask"][i])

    A, R = b["advantages"][:, None], b["rewards"][:, None]
    g_terms = [tokmean(np.minimum(r * A, cr * A), i) for i in range(len(r)) if not b["is_reg"][i]]
    t_terms = [tokmean(np.minimum(r * R, cr * R), i) for i in range(len(r)) if b["is_reg"][i]]
    want = -np.mean(g_terms) - alpha * np.mean(t_terms)
    got, _ = policy_loss("aepo", b, LossConfig(alpha=alpha, reg_norm="reg"))
    assert float(got) == pytest.approx(want, rel=1e-5)
    # default reg_norm="main": the REINFORCE sum is divided by the number of GRPO samples
    want_main = -np.mean(g_terms) - alpha * np.sum(t_terms) / len(g_terms)
    got_main, _ = policy_loss("aepo", b, LossConfig(alpha=alpha))
    assert float(got_main) == pytest.approx(want_main, rel=1e-5)


def test_negatives_do_not_count_in_aepo_reg_term():
    """R = 0 temperature samples contribute nothing (value or gradient) to the REINFORCE term."""
    import jax

    from aepo_jax.losses import LossConfig, policy_loss

    b = make_batch(4)
    cfg = LossConfig()
    g = jax.grad(lambda lp: policy_loss("aepo", {**b, "logp": lp}, cfg)[0])(b["logp"])
    neg_reg = b["is_reg"] & (b["rewards"] == 0)
    assert neg_reg.any()
    assert np.all(np.asarray(g)[neg_reg] == 0)
    # ...but in ablation_eq3 (GRPO advantages on temperature samples) they do
    g3 = jax.grad(lambda lp: policy_loss("ablation_eq3", {**b, "logp": lp}, cfg)[0])(b["logp"])
    assert np.any(np.asarray(g3)[neg_reg] != 0)


def test_on_policy_gradient_is_policy_gradient():
    """At logp == old_logp, d loss / d logp_t = -A / |o| / N for GRPO (seq-mean-token-mean)."""
    import jax

    from aepo_jax.losses import LossConfig, policy_loss

    b = make_batch(5, empty_row=False)
    b["logp"] = b["old_logp"].copy()
    g = np.asarray(jax.grad(lambda lp: policy_loss("grpo", {**b, "logp": lp}, LossConfig())[0])(b["logp"]))
    lens = b["mask"].sum(1, keepdims=True)
    want = -b["advantages"][:, None] / lens / len(lens) * b["mask"]
    np.testing.assert_allclose(g, want, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("method", ["aepo", "entropy_reg", "grpo"])
def test_microbatch_split_invariance(method, agg):
    """Sum of micro-batch losses/grads (with the mini-batch's denominators) == the mini-batch's; metrics merge."""
    from aepo_jax.losses import LossConfig, loss_denominators, merge_microbatch_metrics

    cfg = LossConfig(agg=agg, clip_dual=3.0)
    b = make_batch(7, n=14)
    full_loss, full_g, full_gH, full_m = jax_loss_and_grads(method, b, cfg)
    dens = loss_denominators(b)
    rng = np.random.default_rng(0)
    perm = rng.permutation(14)
    parts = np.split(perm, [2, 7, 8])  # uneven micro-batches, one of a single row
    total, ms = 0.0, []
    g = np.zeros_like(full_g)
    gH = np.zeros_like(full_gH)
    for idx in parts:
        mb = {k: v[idx] for k, v in b.items()}
        l_i, g_i, gH_i, m_i = jax_loss_and_grads(method, mb, cfg, denominators=dens)
        total += l_i
        g[idx] += g_i
        gH[idx] += gH_i
        ms.append(m_i)
    assert total == pytest.approx(full_loss, rel=1e-5, abs=1e-7)
    np.testing.assert_allclose(g, full_g, rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(gH, full_gH, rtol=1e-5, atol=1e-8)
    merged = merge_microbatch_metrics(ms)
    assert set(merged) == set(full_m)
    for k in full_m:
        assert float(merged[k]) == pytest.approx(float(full_m[k]), rel=1e-5, abs=1e-6), k
    # stacked form (what lax.scan over micro-batches returns) gives the same
    stacked = {k: np.stack([np.asarray(m[k]) for m in ms]) for k in ms[0]}
    merged2 = merge_microbatch_metrics(stacked)
    for k in full_m:
        assert float(merged2[k]) == pytest.approx(float(full_m[k]), rel=1e-5, abs=1e-6), k


def test_metrics_values():
    from aepo_jax.losses import LossConfig, policy_loss

    b = make_batch(8)
    cfg = LossConfig(clip_dual=1.3)
    loss, m = policy_loss("aepo", b, cfg)
    mask = b["mask"] > 0
    r = np.exp(b["logp"].astype(np.float64) - b["old_logp"])[mask]
    A = np.where(b["is_reg"], b["rewards"], b["advantages"])[:, None].repeat(b["mask"].shape[1], 1)[mask]
    assert float(m["actor/ratio_min"]) == pytest.approx(r.min(), rel=1e-5)
    assert float(m["actor/ratio_max"]) == pytest.approx(r.max(), rel=1e-5)
    assert float(m["actor/ratio_mean"]) == pytest.approx(r.mean(), rel=1e-5)
    assert float(m["actor/pg_clipfrac_upper"]) == pytest.approx(np.mean((A > 0) & (r > 1.2)), abs=1e-6)
    assert float(m["actor/pg_clipfrac_lower"]) == pytest.approx(np.mean((A < 0) & (r < 0.8)), abs=1e-6)
    assert float(m["actor/pg_clipfrac_dual"]) == pytest.approx(np.mean((A < 0) & (r > 1.3)), abs=1e-6)
    assert float(m["actor/pg_clipfrac_upper"]) > 0 and float(m["actor/pg_clipfrac_lower"]) > 0
    assert float(m["actor/approx_kl"]) == pytest.approx(np.mean(-np.log(r)), rel=1e-4)
    lens = b["mask"].sum(1)
    valid = lens > 0
    reg = b["is_reg"]
    assert float(m["aepo/reg_token_share"]) == pytest.approx(lens[reg].sum() / lens.sum(), rel=1e-6)
    assert float(m["aepo/num_positives"]) == np.sum(reg & valid & (b["rewards"] > 0))
    assert float(m["aepo/num_reg_samples"]) == np.sum(reg & valid)
    per_seq_nll = (-b["logp"] * b["mask"]).sum(1)[valid] / lens[valid]
    assert float(m["actor/entropy_nll"]) == pytest.approx(per_seq_nll.mean(), rel=1e-5)
    per_seq_H = (b["entropy"] * b["mask"]).sum(1)[valid] / lens[valid]
    assert float(m["actor/entropy_full"]) == pytest.approx(per_seq_H.mean(), rel=1e-5)
    assert float(m["loss/total"]) == pytest.approx(float(loss), rel=1e-6)
    assert float(m["loss/pg"] + m["loss/reg"]) == pytest.approx(float(loss), rel=1e-5)
    assert 0 < float(m["aepo/reg_grad_share_logp"]) < 1


def test_jit_and_sharded_batch():
    """Jitted with the batch sharded over a 'data' mesh axis gives the unsharded value and gradient."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    from aepo_jax.losses import LossConfig, policy_loss

    n_dev = min(4, len(jax.devices()))
    b = make_batch(11, n=8 * n_dev // 2 * 2)
    cfg = LossConfig(agg="token-mean")
    f = jax.jit(
        jax.value_and_grad(lambda lp, bb: policy_loss("aepo", {**bb, "logp": lp}, cfg)[0]),
    )
    want_v, want_g = f(jnp.asarray(b["logp"]), b)
    mesh = Mesh(np.array(jax.devices()[:n_dev]), ("data",))
    sh = {k: jax.device_put(v, NamedSharding(mesh, P("data"))) for k, v in b.items()}
    v, g = f(sh["logp"], sh)
    assert float(v) == pytest.approx(float(want_v), rel=1e-5)
    np.testing.assert_allclose(np.asarray(g), np.asarray(want_g), rtol=1e-5, atol=1e-8)


def test_bad_input_names_field():
    from aepo_jax.losses import LossConfig, policy_loss

    b = make_batch(1)
    with pytest.raises(ValueError, match="entropy"):
        policy_loss("entropy_reg", {k: v for k, v in b.items() if k != "entropy"}, LossConfig())
    with pytest.raises(ValueError, match="rewards"):
        policy_loss("aepo", {k: v for k, v in b.items() if k != "rewards"}, LossConfig())
    with pytest.raises(ValueError, match="advantages"):
        policy_loss("grpo", {**b, "advantages": b["advantages"][:-1]}, LossConfig())
    with pytest.raises(ValueError, match="unknown loss"):
        policy_loss("ppo", b, LossConfig())
    with pytest.raises(ValueError, match="agg"):
        LossConfig(agg="sum")
    with pytest.raises(ValueError, match="clip_dual"):
        LossConfig(clip_dual=0.5)
    with pytest.raises(ValueError, match="denominators"):
        policy_loss("grpo", b, LossConfig(), denominators={"toks_all": 3.0})
