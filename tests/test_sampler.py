"""The JAX sampler: greedy == argmax of the full forward, seeds, exact sampling distributions
(chi-square), log-probs against the learner's forward, stops and lengths, weight swaps."""

from __future__ import annotations

import math

import numpy as np
import pytest

from aepo_jax.rollout.testing import make_tiny_model_dir

VOCAB = 320
EOS = 2


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    # initializer_range 0.3: peaked next-token distributions, so temperature is visible.
    return make_tiny_model_dir(str(tmp_path_factory.mktemp("sampler_model")), seed=0, vocab_size=VOCAB,
                               init_std=0.3, eos_token_id=EOS)


@pytest.fixture(scope="module")
def sampler(model_dir):
    from aepo_jax.rollout.sampler import Sampler, SamplerConfig

    cfg = SamplerConfig(max_batch=512, batch_buckets=(8, 512), prompt_buckets=(16,), gen_buckets=(16,))
    return Sampler.from_pretrained(model_dir, dtype="float32", config=cfg)


_FWD = {}


def _full_logits(sampler, ids, pad_to=32):
    """The learner's view: one full forward of prompt+output, float32 logits [L, V].

    Right-padded to a fixed length (causal: padding after the sequence changes nothing before
    it) so one compiled forward serves every call."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    if "fn" not in _FWD:
        _FWD["fn"] = jax.jit(lambda st, x: nnx.merge(sampler._graphdef, st)(x))
    x = np.zeros((1, pad_to), np.int32)
    x[0, :len(ids)] = ids
    out = _FWD["fn"](nnx.split(sampler.model())[1], jnp.asarray(x))
    return np.asarray(out[0, :len(ids)], np.float64)


def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _chi2_pvalue(counts, probs, min_expected=5.0):
    """Pearson chi-square goodness of fit, bins with small expectation pooled; Wilson-Hilferty p."""
    n = counts.sum()
    exp = probs * n
    big = exp >= min_expected
    obs = np.append(counts[big], counts[~big].sum())
    ex = np.append(exp[big], exp[~big].sum())
    keep = ex > 0
    obs, ex = obs[keep], ex[keep]
    # counts that land where the expectation is exactly 0 make the fit impossible
    if counts[probs == 0].sum() > 0:
        return 0.0
    stat = float(((obs - ex) ** 2 / ex).sum())
    k = len(obs) - 1
    z = ((stat / k) ** (1 / 3) - (1 - 2 / (9 * k))) / math.sqrt(2 / (9 * k))
    return 0.5 * math.erfc(z / math.sqrt(2))


PROMPTS = [(1, 17, 33, 48), (5, 9), (1, 200, 201, 202, 203, 204, 205, 206, 207), (99,)]


def test_greedy_equals_argmax_of_full_forward(sampler):
    from aepo_jax.rollout.sampler import SamplingRequest

    reqs = [SamplingRequest(input_ids=p, max_new_tokens=12, temperature=0.0, ignore_eos=True) for p in PROMPTS]
    res = sampler.generate(reqs)
    for p, r in zip(PROMPTS, res):
        ids = list(p)
        for _ in range(12):  # argmax decoding with a full forward each step
            ids.append(int(np.argmax(_full_logits(sampler, ids)[-1])))
        assert r.output_ids == ids[len(p):], (p, r.output_ids, ids[len(p):])
        assert r.finish_reason == {"type": "length", "length": 12}
        # greedy returns temperature-1 log-probs (SGLang)
        np.testing.assert_allclose(r.logprobs, r.logprobs_t1, atol=1e-6)


def test_seeds_reproducible_and_batch_independent(sampler):
    from aepo_jax.rollout.sampler import SamplingRequest

    def req(seed, prompt=PROMPTS[0], **kw):
        kw = {"temperature": 1.0, **kw}
        return SamplingRequest(input_ids=prompt, max_new_tokens=10, seed=seed, ignore_eos=True, **kw)

    alone = sampler.generate([req(7)])[0]
    again = sampler.generate([req(7)])[0]
    assert alone.output_ids == again.output_ids
    # same seed in a different batch (other prompts, other lengths, other settings around it)
    mixed = sampler.generate([req(1, PROMPTS[2]), req(3, PROMPTS[1], top_p=0.5), req(7),
                              req(9, PROMPTS[3], temperature=0.0)])
    assert mixed[2].output_ids == alone.output_ids
    np.testing.assert_allclose(mixed[2].logprobs, alone.logprobs, atol=1e-5)
    outs = {tuple(sampler.generate([req(s)])[0].output_ids) for s in range(6)}
    assert len(outs) >= 5, "different seeds should give different samples"
    # the same request twice in one batch with the same seed gives the same output too
    dup = sampler.generate([req(11), req(11)])
    assert dup[0].output_ids == dup[1].output_ids
    # seed=None draws a fresh seed and records it; replaying it reproduces the sample
    fresh = sampler.generate([req(None)])[0]
    assert sampler.generate([req(fresh.seed)])[0].output_ids == fresh.output_ids


def _first_token_probs(logits, temperature, top_p=1.0, top_k=None, min_p=0.0):
    p = np.exp(_log_softmax(logits / temperature))
    keep = np.ones_like(p, bool)
    order = np.argsort(-p)
    if top_k is not None:
        keep[order[top_k:]] = False
    if top_p < 1.0:
        cs = np.cumsum(p[order])
        m = int(np.sum(cs - p[order] < top_p))  # smallest prefix with mass >= top_p
        keep[order[m:]] = False
    if min_p > 0:
        keep &= p >= min_p * p.max()
    q = np.where(keep, p, 0.0)
    return q / q.sum()


CASES = [dict(temperature=0.5), dict(temperature=1.0), dict(temperature=1.5),
         dict(temperature=1.0, top_p=0.8), dict(temperature=1.2, top_k=7), dict(temperature=1.0, min_p=0.05)]


def test_first_token_distribution_chi_square(sampler):
    from aepo_jax.rollout.sampler import SamplingRequest

    prompt = (1, 17, 33, 48)
    logits = _full_logits(sampler, list(prompt))[-1]
    n = 3072
    reqs = []
    for c, case in enumerate(CASES):
        reqs += [SamplingRequest(input_ids=prompt, max_new_tokens=1, seed=100_000 * c + i, **case) for i in range(n)]
    res = sampler.generate(reqs)
    firsts = np.array([r.output_ids[0] for r in res]).reshape(len(CASES), n)
    for c, case in enumerate(CASES):
        kw = {k: v for k, v in case.items() if k != "temperature"}
        probs = _first_token_probs(logits, case["temperature"], **kw)
        counts = np.bincount(firsts[c], minlength=VOCAB).astype(float)
        p = _chi2_pvalue(counts, probs)
        assert p > 1e-3, (case, p)
        # the support of a truncated distribution is respected exactly
        assert np.all(probs[firsts[c]] > 0), case
    # the test has power: T=1.0 samples do not fit the T=0.5 distribution, nor the untruncated
    # T=1.0 samples the top_p=0.8 one
    assert _chi2_pvalue(np.bincount(firsts[1], minlength=VOCAB).astype(float),
                        _first_token_probs(logits, 0.5)) < 1e-6
    assert _chi2_pvalue(np.bincount(firsts[1], minlength=VOCAB).astype(float),
                        _first_token_probs(logits, 1.0, top_p=0.8)) < 1e-6


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_match_learner_forward(sampler, temperature):
    from aepo_jax.rollout.sampler import SamplingRequest

    reqs = [SamplingRequest(input_ids=p, max_new_tokens=12, temperature=temperature, seed=5 + i,
                            ignore_eos=True, top_p=0.9 if i == 1 else 1.0) for i, p in enumerate(PROMPTS)]
    for p, r in zip(PROMPTS, sampler.generate(reqs)):
        full = list(p) + r.output_ids
        logits = _full_logits(sampler, full)[len(p) - 1:-1]  # positions that predicted each output
        idx = np.arange(len(r.output_ids))
        lp_t = _log_softmax(logits / temperature)[idx, r.output_ids]
        lp_1 = _log_softmax(logits)[idx, r.output_ids]
        np.testing.assert_allclose(r.logprobs, lp_t, atol=1e-4)
        np.testing.assert_allclose(r.logprobs_t1, lp_1, atol=1e-4)


def test_stops_lengths_and_ignore_eos(sampler):
    from aepo_jax.rollout.sampler import SamplingRequest

    p = PROMPTS[0]
    ref = sampler.generate([SamplingRequest(input_ids=p, max_new_tokens=12, temperature=0.0, ignore_eos=True)])[0]
    stop_tok = ref.output_ids[3]
    first = ref.output_ids.index(stop_tok)
    res = sampler.generate([
        SamplingRequest(input_ids=p, max_new_tokens=12, temperature=0.0, stop_token_ids=(stop_tok,)),
        SamplingRequest(input_ids=p, max_new_tokens=12, temperature=0.0, stop_token_ids=(stop_tok,), ignore_eos=True),
        SamplingRequest(input_ids=p, max_new_tokens=3, temperature=0.0, ignore_eos=True),
        SamplingRequest(input_ids=p, max_new_tokens=0, temperature=0.0),
        SamplingRequest(input_ids=p, max_new_tokens=first + 1, temperature=0.0, stop_token_ids=(stop_tok,)),
    ])
    # the stop token is included in output_ids; finish reason names it
    assert res[0].output_ids == ref.output_ids[:first + 1]
    assert res[0].finish_reason == {"type": "stop", "matched": stop_tok}
    # ignore_eos disables every token stop, stop_token_ids included (SGLang)
    assert res[1].output_ids == ref.output_ids and res[1].finish_reason["type"] == "length"
    assert res[2].output_ids == ref.output_ids[:3] and res[2].finish_reason == {"type": "length", "length": 3}
    assert res[3].output_ids == [] and res[3].finish_reason == {"type": "length", "length": 0}
    # a stop token on the last allowed position is a stop, not a length finish
    assert res[4].finish_reason == {"type": "stop", "matched": stop_tok}
    # the model's EOS stops generation unless ignore_eos
    assert sampler.eos_token_ids == (EOS,)


def test_bad_requests_raise_naming_the_request(sampler):
    from aepo_jax.rollout.sampler import SamplingRequest

    ok = SamplingRequest(input_ids=(1, 2), max_new_tokens=1)
    for bad, word in [(SamplingRequest(input_ids=(), max_new_tokens=1), "input_ids"),
                      (SamplingRequest(input_ids=(VOCAB,), max_new_tokens=1), "vocabulary"),
                      (SamplingRequest(input_ids=(1,), max_new_tokens=-1), "max_new_tokens"),
                      (SamplingRequest(input_ids=(1,), top_p=0.0), "top_p"),
                      (SamplingRequest(input_ids=(1,), temperature=-1.0), "temperature"),
                      (SamplingRequest(input_ids=(1,), max_new_tokens=10_000), "context")]:
        with pytest.raises(ValueError, match=word) as e:
            sampler.generate([ok, bad])
        assert "request 1" in str(e.value)


def test_load_weights_swaps_and_rejects_other_shapes(sampler, model_dir, tmp_path):
    from aepo_jax.rollout.sampler import SamplingRequest

    req = [SamplingRequest(input_ids=PROMPTS[0], max_new_tokens=8, temperature=0.0, ignore_eos=True)]
    before = sampler.generate(req)[0].output_ids
    other = make_tiny_model_dir(str(tmp_path / "other"), seed=1, vocab_size=VOCAB, init_std=0.3, eos_token_id=EOS)
    wrong = make_tiny_model_dir(str(tmp_path / "wrong"), seed=1, vocab_size=VOCAB, hidden_size=32,
                                num_heads=2, num_kv_heads=1, eos_token_id=EOS)
    try:
        sampler.load_weights(other, weight_version="v1")
        assert sampler.weight_version == "v1"
        after = sampler.generate(req)[0].output_ids
        assert after != before
        with pytest.raises(Exception):
            sampler.load_weights(wrong, weight_version="v2")
        assert sampler.weight_version == "v1"  # failed swap: old weights and version stay
        assert sampler.generate(req)[0].output_ids == after
    finally:
        sampler.load_weights(model_dir, weight_version="default")
    assert sampler.generate(req)[0].output_ids == before


def test_sharded_sampler_matches_single_device(sampler, model_dir):
    """--mesh DxT: parameters sharded over host devices (conftest makes 8); same outputs."""
    import jax

    from aepo_jax.rollout.sampler import Sampler, SamplingRequest

    n = len(jax.devices())
    if n < 2 or n % 2:
        pytest.skip("needs an even number (>= 2) of host devices")
    mesh = f"{n // 2}x2"  # data (FSDP) x tensor parallel over every device
    sharded = Sampler.from_pretrained(model_dir, dtype="float32", mesh=mesh, config=sampler.config)
    reqs = [SamplingRequest(input_ids=p, max_new_tokens=8, temperature=t, seed=3, ignore_eos=True)
            for p, t in zip(PROMPTS, (0.0, 1.0, 0.7, 1.3))]
    for a, b in zip(sharded.generate(reqs), sampler.generate(reqs)):
        assert a.output_ids == b.output_ids
        np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-4)


def copy_with_weights(src, dst, change):
    """A copy of the checkpoint at src whose tensors went through change(name, array)."""
    import shutil

    from safetensors.numpy import load_file, save_file

    shutil.copytree(src, dst)
    tensors = load_file(f"{src}/model.safetensors")
    save_file({k: change(k, v) for k, v in tensors.items()}, f"{dst}/model.safetensors", metadata={"format": "pt"})
    return str(dst)


def test_seeded_output_in_the_same_buckets_ignores_the_rest_of_the_batch(sampler):
    """The documented guarantee, bit for bit: same seed, prompt and buckets -> same output,
    whatever the other rows are and wherever the row sits."""
    from aepo_jax.rollout.sampler import SamplingRequest

    rng = np.random.default_rng(1)

    def rand_req(seed, **kw):
        ids = tuple(int(t) for t in rng.integers(3, VOCAB, rng.integers(1, 16)))
        kw = {"temperature": float(rng.choice([0.0, 0.6, 1.0, 1.4])), "top_p": float(rng.choice([1.0, 0.9])), **kw}
        return SamplingRequest(input_ids=ids, max_new_tokens=int(rng.integers(1, 16)), seed=seed, **kw)

    subjects = [rand_req(1000 + i, temperature=1.0) for i in range(6)]
    alone = [sampler.generate([r])[0] for r in subjects]  # batch bucket 8
    for trial in range(2):
        others = [rand_req(int(rng.integers(1 << 40))) for _ in range(4)]
        batch = others + subjects[:4] if trial == 0 else subjects[2:] + others  # other positions, still <= 8 rows
        got = {id(r): res for r, res in zip(batch, sampler.generate(batch))}
        for r, ref in zip(subjects, alone):
            if id(r) in got:
                assert got[id(r)].output_ids == ref.output_ids
                assert got[id(r)].logprobs == ref.logprobs and got[id(r)].logprobs_t1 == ref.logprobs_t1


def test_seeded_output_in_other_buckets_agrees_to_rounding(sampler):
    """In another batch bucket (8 -> 512 rows) only float rounding differs: log-probs agree to
    1e-4 for as long as the tokens agree (a draw at a distribution boundary may then differ)."""
    from aepo_jax.rollout.sampler import SamplingRequest

    subjects = [SamplingRequest(input_ids=p, max_new_tokens=12, temperature=1.0, seed=77 + i, ignore_eos=True)
                for i, p in enumerate(PROMPTS)]
    alone = [sampler.generate([r])[0] for r in subjects]
    filler = [SamplingRequest(input_ids=(7, 8, 9), max_new_tokens=12, seed=i) for i in range(20)]
    big = sampler.generate(subjects + filler)[:len(subjects)]  # 24 rows: the 512 bucket
    agree = 0
    for a, b in zip(alone, big):
        n = next((k for k, (x, y) in enumerate(zip(a.output_ids, b.output_ids)) if x != y), len(a.output_ids))
        np.testing.assert_allclose(a.logprobs[:n + 1], b.logprobs[:n + 1], atol=1e-4)
        agree += n == len(a.output_ids)
    assert agree >= len(subjects) - 1  # a divergence needs a draw within ~1e-6 of a boundary: rare


def test_cancelled_requests_stop_early(sampler):
    """cancelled() is polled before every STEPS_PER_CALL decode steps; a request marked True
    stops there, and a batch with every request cancelled stops at once."""
    from aepo_jax.rollout.sampler import STEPS_PER_CALL, SamplingRequest

    n_new = 2 * STEPS_PER_CALL + 5
    reqs = [SamplingRequest(input_ids=p, max_new_tokens=n_new, temperature=1.0, seed=3, ignore_eos=True)
            for p in PROMPTS[:2]]
    polls = []

    def cancel_first_after_one_call():
        polls.append(1)
        return [len(polls) > 1, False]

    res = sampler.generate(reqs, cancelled=cancel_first_after_one_call)
    assert len(polls) == 3  # ceil(n_new / STEPS_PER_CALL) calls
    assert len(res[0].output_ids) == STEPS_PER_CALL and len(res[1].output_ids) == n_new
    assert res[0].finish_reason["type"] == "abort" and res[1].finish_reason == {"type": "length", "length": n_new}
    full = sampler.generate(reqs)
    assert res[0].output_ids == full[0].output_ids[:STEPS_PER_CALL] and res[1].output_ids == full[1].output_ids
    assert [r.output_ids for r in sampler.generate(reqs, cancelled=lambda: [True, True])] == [[], []]


def test_non_finite_weights_refused_and_overflow_stays_in_the_vocabulary(sampler, model_dir, tmp_path):
    """NaN weights: refused, the served weights stay. Finite weights that overflow to NaN
    logits: the tokens are still inside the vocabulary (320, not a multiple of the 256 block)."""
    from aepo_jax.rollout.sampler import Sampler, SamplingRequest

    req = [SamplingRequest(input_ids=PROMPTS[0], max_new_tokens=8, temperature=0.0, ignore_eos=True)]
    before = sampler.generate(req)[0].output_ids
    nan = copy_with_weights(model_dir, tmp_path / "nan", lambda k, v: np.where(
        np.arange(v.size).reshape(v.shape) == 5, np.nan, v).astype(v.dtype) if "layers.1.mlp.down" in k else v)
    with pytest.raises(ValueError, match=r"layers.*1.*mlp.*down.*non-finite"):
        sampler.load_weights(nan, weight_version="nan")
    assert sampler.weight_version != "nan" and sampler.generate(req)[0].output_ids == before
    with pytest.raises(ValueError, match="non-finite"):
        Sampler.from_pretrained(nan, config=sampler.config)

    huge = copy_with_weights(model_dir, tmp_path / "huge", lambda k, v: v * np.float32(1e38) if "lm_head" in k else v)
    over = Sampler.from_pretrained(huge, config=sampler.config)
    reqs = [SamplingRequest(input_ids=p, max_new_tokens=6, temperature=t, seed=1, ignore_eos=True)
            for p in PROMPTS for t in (0.0, 1.0)]
    for r in over.generate(reqs):
        assert len(r.output_ids) == 6 and all(0 <= t < VOCAB for t in r.output_ids), r.output_ids


def test_prompt_bucket_representatives_cover_every_reachable_bucket():
    from aepo_jax.rollout.sampler import bucket_of, prompt_bucket_representatives

    rng = np.random.default_rng(7)
    buckets = (16, 32, 64, 128)
    for _ in range(20):
        lengths = rng.integers(1, 200, size=int(rng.integers(1, 30))).tolist()
        reps = prompt_bucket_representatives(lengths, buckets)
        # every batch of these prompts runs in the bucket of its longest prompt: one of reps
        for _ in range(10):
            batch = rng.choice(lengths, size=int(rng.integers(1, len(lengths) + 1)))
            assert bucket_of(int(max(batch)), buckets) in reps
        for b, n in reps.items():
            assert bucket_of(n, buckets) == b and n == max(x for x in lengths if bucket_of(x, buckets) == b)


def test_warming_the_representative_buckets_leaves_nothing_to_compile(model_dir):
    """Prompts of 30-35 tokens straddle the 32 bucket: a batch of only short ones is another
    shape. One batch per representative length compiles every shape any batch of them uses."""
    from aepo_jax.compilation_cache import COMPILES
    from aepo_jax.rollout.protocol import SamplingRequest
    from aepo_jax.rollout.sampler import Sampler, SamplerConfig, prompt_bucket_representatives

    COMPILES.install()
    s = Sampler.from_pretrained(model_dir, dtype="float32",
                                config=SamplerConfig(max_batch=8, batch_buckets=(8,), prompt_buckets=(16, 32, 64),
                                                     gen_buckets=(8,)))
    rng = np.random.default_rng(3)
    lengths = [30, 31, 32, 33, 35]
    prompts = {n: [int(t) for t in rng.integers(3, VOCAB, size=n)] for n in lengths}

    def run(ns, seed):
        return s.generate([SamplingRequest(input_ids=tuple(prompts[n]), max_new_tokens=8, temperature=1.0,
                                           seed=seed + i) for i, n in enumerate(ns)])

    reps = prompt_bucket_representatives(lengths, s.buckets["prompt"])
    assert reps == {32: 32, 64: 35}
    for n in reps.values():
        run([n] * 8, 0)
    before = COMPILES.compiles
    for seed in range(6):  # only-short batches, only-long ones, mixed, partial
        ns = rng.choice(lengths, size=int(rng.integers(1, 9))).tolist()
        run(ns, 100 * seed)
    run([30] * 8, 7)
    run([35] * 3, 9)
    assert COMPILES.compiles == before
