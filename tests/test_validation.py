"""Validation inside the training loop (``--eval.*``): its options, its schedule, and its numbers,
which must equal ``python -m aepo_jax.eval`` on the same weights, data and seed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from aepo_jax.config import ConfigError, build_config
from aepo_jax.trainer import validation
from aepo_jax.trainer.config import ALIASES, RunConfig, validate

ROOT = Path(__file__).resolve().parent.parent


def _cfg(*args):
    return validate(build_config(RunConfig, list(args), aliases=ALIASES))


@pytest.mark.parametrize("args, key", [
    (["--eval.every=-1"], "eval.every"),
    (["--eval.every=1", "--eval.n=0"], "eval.n"),
    (["--eval.n=4", "--eval.k=1,5"], "eval.k[1]"),
    (["--eval.k=0"], "eval.k[0]"),
    (["--eval.k=2,2"], "eval.k"),
    (["--eval.temperature=0"], "eval.temperature"),
    (["--eval.top_p=1.5"], "eval.top_p"),
    (["--eval.max_new_tokens=-3"], "eval.max_new_tokens"),
    (["--eval.every=5", "--data.train_files=train.jsonl"], "eval.files"),
    (["--eval.every=x"], "eval.every"),
])
def test_bad_options_name_their_key(args, key):
    with pytest.raises(ConfigError, match=f"'{key}'".replace("[", r"\[").replace("]", r"\]")):
        _cfg(*args)


def test_schedule_and_ks():
    off = _cfg()
    assert not any(validation.should_validate(off, s) for s in range(0, 101))
    cfg = _cfg("--eval.every=30", "--steps=100", "--eval.n=16")
    assert [s for s in range(0, 101) if validation.should_validate(cfg, s)] == [0, 30, 60, 90, 100]
    assert validation.ks_of(cfg) == [1, 2, 4, 8, 16]
    no_before = _cfg("--eval.every=50", "--eval.before_train=false", "--eval.k=4,1")
    assert [s for s in range(0, 101) if validation.should_validate(no_before, s)] == [50, 100]
    assert validation.ks_of(no_before) == [1, 4]
    # eval.files with the user's own training data is fine
    _cfg("--eval.every=5", "--data.train_files=train.jsonl", "--eval.files=test.jsonl")


def test_missing_or_empty_file_is_refused_at_startup(tmp_path, capsys):
    from aepo_jax.train import main

    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    for files in (tmp_path / "nope.jsonl", empty):
        assert main(["--eval.every=1", f"--eval.files={files}", f"--run-dir={tmp_path / 'run'}"]) == 2
        assert "config key 'eval.files[0]'" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # refused before anything started


def test_default_set_is_the_toy_test_split_eval_uses(tmp_path):
    """Without eval.files the held-out set is the built-in task's test split, tokenized as
    ``python -m aepo_jax.eval --data toy`` tokenizes it (seed 0), and disjoint from training."""
    from aepo_jax import data as data_lib
    from aepo_jax.data.toy_tokenizer import build_tokenizer
    from aepo_jax.eval import EvalConfig, _load_benchmark

    tok = build_tokenizer(tmp_path / "tok")
    (s,) = validation.load_sets(_cfg("--eval.every=1"), tok)
    name, examples, _, _ = _load_benchmark("toy", tok, EvalConfig(model_path="", data=["toy"], seed=0))
    assert s.name == name == "toy"
    assert [(e.prompt_ids, e.answer) for e in s.examples] == [(e.prompt_ids, e.answer) for e in examples]
    train = {p.prompt for p in data_lib.toy_problems("train")}
    assert not train & {e.prompt_text for e in s.examples} and len(s.examples) == 256


@pytest.mark.slow
def test_validation_equals_the_eval_command(tmp_path, small_toy_base):
    """A 2-step run validating before step 1 and after step 2 (on a held-out file, a non-zero
    seed); then ``python -m aepo_jax.eval`` on the base model and on the exported step-2
    checkpoint, each through its own embedded server: every number is equal, exactly."""
    from aepo_jax.data import toy_task
    from aepo_jax.eval import main as eval_main
    from aepo_jax.train import main as train_main

    base = small_toy_base
    data = toy_task.write_toy_dataset(tmp_path / "heldout", seed=0, n_train=8, n_test=12)["test"]
    run = tmp_path / "run"
    n, ks, seed, max_new = 4, (1, 2, 4), 3, 24
    rc = train_main([f"--model.path={base}", f"--run-dir={run}", "--steps=2", "--data.prompts_per_step=8",
                     "--rollout.n=4", f"--rollout.max_new_tokens={max_new}", "--logging.console=false",
                     "--logging.tensorboard=false", "--checkpoint.every=1", "--eval.every=2", f"--eval.files={data}",
                     f"--eval.n={n}", "--eval.k=1,2,4", f"--eval.seed={seed}"])
    assert rc == 0
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [0, 1, 2]
    assert not any(k.startswith("val/") for k in lines[1])
    hf = tmp_path / "hf"
    r = subprocess.run([sys.executable, "tools/export_hf.py", "--checkpoint", str(run), "--out", str(hf),
                        "--dtype", "float32"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    for model, val in ((base, lines[0]), (hf, lines[2])):
        out = tmp_path / f"eval_{Path(model).name}.json"
        assert eval_main(["--model-path", str(model), "--data", str(data), "--n", str(n), "--k", "1,2,4",
                          "--seed", str(seed), "--temperature", "1.0", "--top-p", "1.0",
                          "--max-new-tokens", str(max_new), "--reward", "toy", "--server-args", "--dtype float32",
                          "--output", str(out)]) == 0
        (res,) = json.loads(out.read_text())["benchmarks"].values()
        assert val[f"val/avg@{n}"] == res["avg_at_n"]
        for k in ks:
            assert val[f"val/pass@{k}"] == res["pass_at_k"][str(k)]
        assert val["val/entropy"] == res["mean_token_nll"]
        assert val["val/response_length_mean"] == res["mean_response_tokens"]
        assert val["val/num_problems"] == res["num_problems"] == 12
        # the run's own report of that validation (what tools/reproduce.py reads): the eval command's
        # numbers, per problem too
        (rep,) = json.loads((run / "validation" / f"step_{val['step']}.json").read_text())["benchmarks"].values()
        for key in ("avg_at_n", "pass_at_k", "per_problem_correct", "mean_token_nll", "num_problems", "n"):
            assert rep[key] == res[key], key
    assert sorted(p.name for p in (run / "validation").iterdir()) == ["step_0.json", "step_2.json"]
    assert lines[0]["val/entropy"] != lines[2]["val/entropy"]  # the policy moved between the two
