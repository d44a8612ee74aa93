"""The toy base model builder: a real Qwen2-compatible tokenizer, HF files that transformers and our
loader read, determinism given the seed, the cache, and (slow) the promised pass@1 band."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from aepo_jax.data import toy_task
from aepo_jax.data.toy_tokenizer import response_token_count
from aepo_jax.toy import ToyBaseConfig, ensure_toy_base

TINY = ToyBaseConfig(steps=3, warmup_steps=1, n_train_problems=64)


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory) -> Path:
    return Path(ensure_toy_base(tmp_path_factory.mktemp("cache"), TINY))


def test_files_and_loaders(tiny_base):
    from transformers import AutoConfig, AutoTokenizer

    from aepo_jax.models import load_pretrained

    for fn in ("model.safetensors", "config.json", "generation_config.json", "tokenizer.json",
               "tokenizer_config.json", "toy_base.json"):
        assert (tiny_base / fn).is_file(), fn
    cfg = AutoConfig.from_pretrained(tiny_base)
    assert cfg.model_type == "qwen2" and cfg.num_hidden_layers == 2 and cfg.hidden_size == 64
    tok = AutoTokenizer.from_pretrained(tiny_base)
    # transformers forces its Qwen2 tokenizer class on model_type qwen2 (rebuilding the
    # pre-tokenizer); it must split exactly as the tokenizer.json we wrote does.
    from tokenizers import Tokenizer

    raw = Tokenizer.from_file(str(tiny_base / "tokenizer.json"))
    p = toy_task.ToyProblem(start=7, links=((3, 9), (7, 3), (5, 1), (9, 0)))
    for text in (toy_task.problem_text(p), toy_task.solution_text(p), toy_task.solution_text(p, {0: 4})):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert ids == raw.encode(text, add_special_tokens=False).ids
        assert tok.decode(ids) == text
    assert len(tok(toy_task.solution_text(p), add_special_tokens=False)["input_ids"]) == response_token_count(p)
    assert tok.eos_token == "<|endoftext|>" and tok.pad_token == "<|pad|>"
    prompt = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert prompt == "hi Answer:"
    model = load_pretrained(str(tiny_base))
    assert model.cfg.vocab_size >= len(tok) and model.cfg.vocab_size % 64 == 0
    gen = json.loads((tiny_base / "generation_config.json").read_text())
    assert gen["eos_token_id"] == tok.eos_token_id
    info = json.loads((tiny_base / "toy_base.json").read_text())
    assert info["recipe"]["steps"] == 3 and 0.0 <= info["teacher_forced_test"]["value_token_p"] <= 1.0


def _same_files(a: Path, b: Path) -> None:
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    for fn in names:
        assert (a / fn).read_bytes() == (b / fn).read_bytes(), fn


_BUILD_IN_A_PROCESS = """
import json, sys
import jax
from aepo_jax.toy import ToyBaseConfig, build_toy_base
assert jax.device_count() == int(sys.argv[3]), jax.devices()
jax.jit(lambda x: x.sum())(jax.numpy.ones(8)).block_until_ready()  # a live backend, as in the trainer
build_toy_base(sys.argv[1], ToyBaseConfig(**json.loads(sys.argv[2])))
"""


def test_build_is_the_same_bytes_from_any_process(tiny_base, tmp_path):
    """The cache must never hold a different model under one name: a build asked for by a process
    with 1 device on one core, or with 8 simulated devices on all cores (this test process, see
    conftest), writes the same bytes in every file."""
    import dataclasses
    import subprocess
    import sys

    assert json.loads((tiny_base / "toy_base.json").read_text())["recipe"] == dataclasses.asdict(TINY)
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": root, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    one_core = ["taskset", "-c", str(min(os.sched_getaffinity(0)))] if shutil.which("taskset") else []
    out = tmp_path / "one_device"
    subprocess.run([*one_core, sys.executable, "-c", _BUILD_IN_A_PROCESS, str(out),
                    json.dumps(dataclasses.asdict(TINY)), "1"], env=env, check=True, timeout=600)
    _same_files(out, tiny_base)  # tiny_base: built from this 8-device process, jax running


def test_build_refuses_an_unpinned_process(tmp_path, monkeypatch):
    from aepo_jax.toy import recipe

    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
    with pytest.raises(RuntimeError, match="XLA_FLAGS"):
        recipe.pin_build_process()


def test_cache_reuses_and_rebuilds_on_recipe_change(tiny_base):
    before = os.stat(tiny_base / "model.safetensors").st_mtime_ns
    assert Path(ensure_toy_base(tiny_base.parent, TINY)) == tiny_base
    assert os.stat(tiny_base / "model.safetensors").st_mtime_ns == before  # not rebuilt
    other = ToyBaseConfig(steps=2, warmup_steps=1, n_train_problems=64)
    path = Path(ensure_toy_base(tiny_base.parent, other))
    assert json.loads((path / "toy_base.json").read_text())["recipe"]["steps"] == 2
    # Another recipe gets its own directory: the first model is still there, untouched.
    assert path != tiny_base
    assert os.stat(tiny_base / "model.safetensors").st_mtime_ns == before
    assert Path(ensure_toy_base(tiny_base.parent, TINY)) == tiny_base


def test_cache_names_tell_recipes_apart():
    from aepo_jax.toy.build import cache_name
    from aepo_jax.toy.recipe import BUILD_VERSION

    assert cache_name(ToyBaseConfig()) == f"toy_base-v{BUILD_VERSION}-seed0"  # the name older caches use
    assert cache_name(ToyBaseConfig(seed=2)) == f"toy_base-v{BUILD_VERSION}-seed2"
    names = {cache_name(c) for c in (ToyBaseConfig(), ToyBaseConfig(noise=0.5), ToyBaseConfig(noise=0.15),
                                     ToyBaseConfig(steps=300), ToyBaseConfig(seed=1, noise=0.5))}
    assert len(names) == 5
    assert cache_name(ToyBaseConfig(noise=0.5)) == cache_name(ToyBaseConfig(noise=0.5))  # stable


def test_bad_recipe():
    with pytest.raises(ValueError, match="noise"):
        ToyBaseConfig(noise=1.0)
    with pytest.raises(ValueError, match="warmup_steps"):
        ToyBaseConfig(steps=10, warmup_steps=10)


@pytest.mark.slow
def test_default_base_is_partly_right_with_entropy(tmp_path):
    """The promised band: pass@1 at T = 1 in [0.2, 0.6], entropy well above 0, pass@k rising."""
    from aepo_jax.eval import EvalConfig, run_eval

    path = ensure_toy_base(tmp_path / "cache")
    report = run_eval(EvalConfig(model_path=path, data=["toy"], n=16, ks=[1, 2, 4, 8, 16], temperature=1.0,
                                 top_p=1.0, max_new_tokens=64, output=str(tmp_path / "r.json")))
    res = report["benchmarks"]["toy"]
    pass_k = [res["pass_at_k"][str(k)] for k in (1, 2, 4, 8, 16)]
    assert 0.2 <= pass_k[0] <= 0.6, res
    assert all(b > a for a, b in zip(pass_k, pass_k[1:])), pass_k
    assert pass_k[-1] >= pass_k[0] + 0.2
    assert res["mean_token_nll"] > 0.1, res
    assert res["truncated_fraction"] < 0.05


@pytest.mark.slow  # one more tiny build (about 20 s on an idle core)
def test_length_variant_recipe_is_its_own_model(tiny_base):
    """The length variant's base (data.toy_variant=length) is another recipe under another cache name;
    the default recipe's toy_base.json carries no variant entry (its bytes are as before variants)."""
    import dataclasses

    from aepo_jax.toy import LengthToyBaseConfig, base_config_for
    from aepo_jax.toy.recipe import recipe_from_dict

    tiny_length = LengthToyBaseConfig(**dataclasses.asdict(TINY))
    assert base_config_for("length", **dataclasses.asdict(TINY)) == tiny_length
    assert base_config_for("default", **dataclasses.asdict(TINY)) == TINY
    assert recipe_from_dict(dataclasses.asdict(tiny_length)) == tiny_length
    with pytest.raises(ValueError, match="variant"):
        base_config_for("short")
    default_info = json.loads((tiny_base / "toy_base.json").read_text())
    assert "variant" not in default_info["recipe"] and "grammar" not in default_info
    path = Path(ensure_toy_base(tiny_base.parent, tiny_length))
    assert path != tiny_base and path.name.startswith("toy_base_length-") and tiny_base.name.startswith("toy_base-")
    info = json.loads((path / "toy_base.json").read_text())
    assert info["recipe"]["variant"] == "length"
    assert info["grammar"] == {"variant": "length", "max_fillers": toy_task.LENGTH_MAX_FILLERS,
                               "filler_continue": toy_task.LENGTH_FILLER_CONTINUE}
    # room for the variant's longest correct answer after the longest prompt
    assert info["max_len"] >= toy_task.LENGTH_MIN_NEW_TOKENS
    assert (path / "model.safetensors").read_bytes() != (tiny_base / "model.safetensors").read_bytes()
    assert Path(ensure_toy_base(tiny_base.parent, tiny_length)) == path  # cached
