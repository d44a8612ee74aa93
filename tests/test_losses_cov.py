"""Clip-Cov and KL-Cov against an independent NumPy reading of verl's definitions (value and
d loss / d logp, both aggregations, random inputs with masks and an empty row), plus the selection
rules themselves, determinism in the key, the micro-batch contract and bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aepo_jax.losses.cov import clip_cov_priority
from aepo_jax.losses import LossConfig, loss_denominators, policy_loss

AGGS = ["seq-mean-token-mean", "token-mean"]


def make_batch(seed, n=14, L=11):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, L + 1, size=n)
    lengths[2] = 0  # a padding row: counts nowhere
    mask = (np.arange(L)[None, :] < lengths[:, None]).astype(np.float32)
    old = -rng.gamma(2.0, 1.0, size=(n, L)).astype(np.float32)
    logp = (old + rng.normal(0, 0.3, size=(n, L))).astype(np.float32)  # ratios ~[0.4, 2.5]: both clip sides
    adv = rng.normal(0, 1.5, size=(n,)).astype(np.float32)
    return dict(logp=logp, old_logp=old, mask=mask, advantages=adv,
                rewards=(adv > 0).astype(np.float32), is_reg=np.zeros(n, bool))


# ---------------------------------------------------------------- independent NumPy reading


def np_agg_weights(mask, agg):
    """d(aggregate)/d(token loss): the aggregation as a weight per token."""
    lens = mask.sum(1)
    if agg == "seq-mean-token-mean":
        return mask / np.maximum(lens, 1)[:, None] / max((lens > 0).sum(), 1)
    return mask / max(mask.sum(), 1)


def np_cov(logp, adv, mask):
    v = mask > 0
    return (adv - adv[v].mean()) * (logp - logp[v].mean())


def np_clip_cov(b, cfg, priority):
    logp, old, mask = (np.asarray(b[k], np.float64) for k in ("logp", "old_logp", "mask"))
    A = np.repeat(np.asarray(b["advantages"], np.float64)[:, None], logp.shape[1], 1)
    r = np.exp(logp - old)
    l1, l2 = -A * r, -A * np.clip(r, 1 - cfg.clip_low, 1 + cfg.clip_high)
    tok = np.maximum(l1, l2)
    dtok = np.where(l2 > l1, 0.0, -A * r)  # the clipped branch is constant in logp
    valid = mask > 0
    cov = np_cov(logp, A, mask)
    band = valid & ~(l2 > l1) & (cov > cfg.clip_cov_lb) & (cov < cfg.clip_cov_ub)
    k = max(int(cfg.clip_cov_ratio * valid.sum()), 1)
    rows, cols = np.nonzero(band)
    keep = np.argsort(priority[rows, cols], kind="stable")[:k]  # a random k of the band (same draws)
    corr = np.ones_like(tok)
    corr[rows[keep], cols[keep]] = 0.0
    w = np_agg_weights(mask, cfg.agg)
    return float(np.sum(tok * corr * w)), dtok * corr * w, corr == 0, band


def np_kl_cov(b, cfg):
    logp, old, mask = (np.asarray(b[k], np.float64) for k in ("logp", "old_logp", "mask"))
    A = np.repeat(np.asarray(b["advantages"], np.float64)[:, None], logp.shape[1], 1)
    d = logp - old
    r = np.exp(d)
    valid = mask > 0
    cov = np_cov(logp, A, mask)
    flat = np.flatnonzero(valid.reshape(-1))
    k = max(1, int(len(flat) * cfg.kl_cov_ratio))
    top = flat[np.argsort(-cov.reshape(-1)[flat])[:k]]
    sel = np.zeros(valid.size, bool)
    sel[top] = True
    sel = sel.reshape(valid.shape)
    tok = -A * r + np.where(sel, cfg.kl_cov_coef * np.abs(d), 0.0)
    dtok = -A * r + np.where(sel, cfg.kl_cov_coef * np.sign(d), 0.0)
    w = np_agg_weights(mask, cfg.agg)
    return float(np.sum(tok * w)), dtok * w, sel


def jax_value_and_grad(method, b, cfg, rng=None):
    def f(logp):
        return policy_loss(method, {**b, "logp": logp}, cfg, rng=rng)

    (loss, metrics), g = jax.value_and_grad(f, has_aux=True)(jnp.asarray(b["logp"]))
    return float(loss), np.asarray(g), metrics


# ---------------------------------------------------------------- value and gradient


@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_clip_cov_matches_numpy(agg, seed):
    b = make_batch(seed)
    # a wide band and a large share, so that several tokens are in the band and the share binds
    cfg = LossConfig(agg=agg, clip_cov_ratio=0.03, clip_cov_lb=0.2, clip_cov_ub=3.0, clip_low=0.2, clip_high=0.28)
    key = jax.random.key(100 + seed)
    priority = np.asarray(clip_cov_priority(key, b["mask"].shape))
    ref, ref_g, ref_sel, band = np_clip_cov(b, cfg, priority)
    assert 1 <= ref_sel.sum() < band.sum(), "the test batch must exercise the random choice"
    loss, g, m = jax_value_and_grad("clip_cov", b, cfg, key)
    np.testing.assert_allclose(loss, ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(g, ref_g, rtol=1e-5, atol=1e-5)
    toks = b["mask"].sum()
    np.testing.assert_allclose(float(m["cov/selected_token_frac"]), ref_sel.sum() / toks, rtol=1e-6)
    np.testing.assert_allclose(float(m["cov/band_token_frac"]), band.sum() / toks, rtol=1e-6)


@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kl_cov_matches_numpy(agg, seed):
    b = make_batch(seed)
    cfg = LossConfig(agg=agg, kl_cov_ratio=0.05, kl_cov_coef=0.7)
    ref, ref_g, sel = np_kl_cov(b, cfg)
    assert sel.sum() > 1
    loss, g, m = jax_value_and_grad("kl_cov", b, cfg)
    np.testing.assert_allclose(loss, ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(g, ref_g, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(float(m["cov/selected_token_frac"]), sel.sum() / b["mask"].sum(), rtol=1e-6)
    assert float(m["loss/kl"]) > 0
    np.testing.assert_allclose(float(m["loss/pg"]) + float(m["loss/kl"]), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["clip_cov", "kl_cov"])
def test_published_defaults_select_one_token_of_a_small_batch(method):
    """verl's defaults (share 0.0002) select max(floor(0.0002 n), 1) tokens: one of a few hundred."""
    b = make_batch(3)
    cfg = LossConfig()
    assert (cfg.clip_cov_ratio, cfg.clip_cov_lb, cfg.clip_cov_ub, cfg.kl_cov_ratio, cfg.kl_cov_coef) == (
        0.0002, 1.0, 5.0, 0.0002, 1.0)
    key = jax.random.key(0)
    _, m = policy_loss(method, b, cfg, rng=key)
    if method == "kl_cov":
        ref, _, sel = np_kl_cov(b, cfg)
        assert sel.sum() == 1
    else:
        ref, _, sel, band = np_clip_cov(b, cfg, np.asarray(clip_cov_priority(key, b["mask"].shape)))
        assert sel.sum() == min(1, band.sum())
    np.testing.assert_allclose(float(m["loss/total"]), ref, rtol=1e-5, atol=1e-6)


def test_large_share_selects_floor_of_ratio_times_tokens():
    b = make_batch(4, n=40, L=30)
    n_valid = int(b["mask"].sum())
    cfg = LossConfig(kl_cov_ratio=0.1)
    _, m = policy_loss("kl_cov", b, cfg)
    assert round(float(m["cov/selected_token_frac"]) * n_valid) == int(0.1 * n_valid)


# ---------------------------------------------------------------- behaviour


def test_clip_cov_draws_depend_on_the_key_only():
    b = make_batch(5, n=32, L=20)
    cfg = LossConfig(clip_cov_ratio=0.02, clip_cov_lb=0.1, clip_cov_ub=10.0)
    f = jax.jit(lambda b, k: policy_loss("clip_cov", b, cfg, rng=k))
    l1 = float(f(b, jax.random.key(7))[0])
    l2 = float(f(b, jax.random.key(7))[0])
    others = {float(f(b, jax.random.key(s))[0]) for s in range(8, 14)}
    assert l1 == l2
    assert len(others - {l1}) >= 1, "different keys must detach different tokens"


def test_clip_cov_without_band_tokens_is_the_clipped_surrogate():
    """A band no token reaches: Clip-Cov == GRPO's clipped surrogate (value and gradient)."""
    b = make_batch(6)
    cfg = LossConfig(clip_cov_lb=1e6, clip_cov_ub=2e6)
    l_cc, g_cc, m = jax_value_and_grad("clip_cov", b, cfg, jax.random.key(0))
    l_g, g_g, _ = jax_value_and_grad("grpo", b, cfg)
    assert float(m["cov/selected_token_frac"]) == 0.0
    np.testing.assert_allclose(l_cc, l_g, rtol=1e-6)
    np.testing.assert_allclose(g_cc, g_g, rtol=1e-6, atol=1e-8)


def test_kl_cov_penalises_highest_covariance_tokens():
    """Tokens with a positive advantage and a high log-prob (the entropy-collapsing ones) are hit;
    with coef 0 KL-Cov is the unclipped surrogate (plain REINFORCE-with-ratio)."""
    b = make_batch(7)
    cfg = LossConfig(kl_cov_ratio=0.05)
    _, _, sel = np_kl_cov(b, cfg)
    A = np.repeat(b["advantages"][:, None], b["logp"].shape[1], 1)
    cov = np_cov(b["logp"].astype(np.float64), A.astype(np.float64), b["mask"])
    assert cov[sel].min() >= cov[(b["mask"] > 0) & ~sel].max()
    l0, g0, _ = jax_value_and_grad("kl_cov", b, LossConfig(kl_cov_coef=0.0, kl_cov_ratio=0.05))
    lr, gr, _ = jax_value_and_grad("reinforce", b, LossConfig())
    np.testing.assert_allclose(l0, lr, rtol=1e-6)
    np.testing.assert_allclose(g0, gr, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("method", ["clip_cov", "kl_cov"])
def test_sharded_jit_matches_single_device(method):
    """Rows sharded over the 8 simulated devices: same loss as on one device."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    b = make_batch(8, n=16, L=12)
    cfg = LossConfig(clip_cov_ratio=0.03, clip_cov_lb=0.2, clip_cov_ub=3.0, kl_cov_ratio=0.03)
    key = jax.random.key(3)
    ref = float(policy_loss(method, b, cfg, rng=key)[0])
    mesh = Mesh(np.array(jax.devices()), ("data",))
    sb = {k: jax.device_put(v, NamedSharding(mesh, P("data", *([None] * (np.ndim(v) - 1))))) for k, v in b.items()}
    got = float(jax.jit(lambda x, k: policy_loss(method, x, cfg, rng=k)[0])(sb, key))
    np.testing.assert_allclose(got, ref, rtol=1e-5)


def test_bad_input():
    b = make_batch(9)
    with pytest.raises(ValueError, match="rng"):
        policy_loss("clip_cov", b, LossConfig())
    with pytest.raises(ValueError, match="clip_cov_ratio"):
        LossConfig(clip_cov_ratio=0.0)
    with pytest.raises(ValueError, match="kl_cov_ratio"):
        LossConfig(kl_cov_ratio=1.5)
    with pytest.raises(ValueError, match="clip_cov_lb"):
        LossConfig(clip_cov_lb=5.0, clip_cov_ub=1.0)
    with pytest.raises(ValueError, match="kl_cov_coef"):
        LossConfig(kl_cov_coef=-1.0)


def test_denominators_are_the_mini_batchs():
    """With the mini-batch's denominators a micro-batch call scales like every other loss (the
    covariance and the share are the call's own, as in verl)."""
    b = make_batch(10)
    half = {k: v[:7] for k, v in b.items()}
    dens = loss_denominators(b)
    cfg = LossConfig(kl_cov_ratio=0.05)
    full = float(policy_loss("kl_cov", half, cfg)[0])
    part = float(policy_loss("kl_cov", half, cfg, denominators=dens)[0])
    own = loss_denominators(half)
    key = "seqs_all"
    np.testing.assert_allclose(part, full * float(own[key]) / float(dens[key]), rtol=1e-5)


def test_config_keys_reach_the_loss_and_are_checked():
    from aepo_jax.config import ConfigError, build_config
    from aepo_jax.trainer.config import ALIASES, RunConfig, loss_config, validate

    cfg = validate(build_config(RunConfig, ["--method=clip_cov", "--algorithm.clip_cov.ratio=0.01",
                                            "--algorithm.clip_cov.lb=0.5", "--algorithm.kl_cov.coef=2"], aliases=ALIASES))
    lc = loss_config(cfg)
    assert (lc.clip_cov_ratio, lc.clip_cov_lb, lc.clip_cov_ub, lc.kl_cov_coef) == (0.01, 0.5, 5.0, 2.0)
    for bad, key in (("--algorithm.clip_cov.ub=0.5", "algorithm.clip_cov.ub"),
                     ("--algorithm.kl_cov.ratio=0", "algorithm.kl_cov.ratio"),
                     ("--algorithm.clip_cov.ratio=2", "algorithm.clip_cov.ratio"),
                     ("--algorithm.kl_cov.coef=-1", "algorithm.kl_cov.coef")):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            validate(build_config(RunConfig, [bad], aliases=ALIASES))


def test_clip_fractions_are_zero_for_kl_cov_and_counted_for_clip_cov():
    """KL-Cov never clips, so its clip fractions are 0 although the batch's ratios lie on both sides
    of the clip range; Clip-Cov (the clipped surrogate) reports them, as GRPO does."""
    b = make_batch(3)
    cfg = LossConfig()
    _, _, m_kl = jax_value_and_grad("kl_cov", b, cfg)
    _, _, m_cc = jax_value_and_grad("clip_cov", b, cfg, rng=jax.random.key(0))
    _, _, m_grpo = jax_value_and_grad("grpo", b, cfg)
    for side in ("upper", "lower", "dual"):
        assert float(m_kl[f"actor/pg_clipfrac_{side}"]) == 0.0
    for side in ("upper", "lower"):
        assert float(m_cc[f"actor/pg_clipfrac_{side}"]) > 0.0
        assert float(m_cc[f"actor/pg_clipfrac_{side}"]) == float(m_grpo[f"actor/pg_clipfrac_{side}"])
