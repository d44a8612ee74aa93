"""tools/plan.py: per-device bytes from the compiled update of an abstract model, the fit verdict,
the search for a setting that fits, and the weight-sync size; tools/bench_compile.py end to end."""

import importlib.util
import json
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _tool(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


HF = {"model_type": "qwen2", "vocab_size": 512, "hidden_size": 64, "intermediate_size": 128,
      "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2,
      "max_position_embeddings": 512, "tie_word_embeddings": False}


@pytest.fixture(autouse=True)
def _keep_env(monkeypatch):
    """plan.main sets XLA_FLAGS / JAX_PLATFORMS for its own jax; later tests' subprocesses must not see them."""
    import os

    for k in ("XLA_FLAGS", "JAX_PLATFORMS"):
        if k in os.environ:
            monkeypatch.setenv(k, os.environ[k])
        else:
            monkeypatch.delenv(k, raising=False)


@pytest.fixture()
def run_yaml(tmp_path):
    model = tmp_path / "tiny"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(HF))  # plan needs only the architecture: no weights
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"""
model: {{path: {model}, dtype: float32, remat: false, logprob_chunk: 32}}
data: {{max_prompt_length: 32, prompts_per_step: 8}}
rollout: {{n: 4, max_new_tokens: 96}}
train: {{micro_batch_size: 16, mini_batch_prompts: 8}}
algorithm: {{method: grpo}}
""")
    return str(cfg)


def test_parse_bytes():
    plan = _tool("plan")
    assert plan.parse_bytes("80GiB") == 80 * 2**30 and plan.parse_bytes("40GB") == 40 * 10**9
    assert plan.parse_bytes("1024") == 1024
    with pytest.raises(ValueError, match="--device-memory: 'lots'"):
        plan.parse_bytes("lots")


@pytest.mark.slow
def test_plan_bytes_of_the_configured_setting(run_yaml, capsys):
    import numpy as np

    from aepo_jax.models import ModelConfig, init_model

    plan = _tool("plan")
    n_params = sum(np.asarray(x).size for x in __import__("jax").tree.leaves(
        __import__("flax").nnx.state(init_model(ModelConfig.from_hf_dict(HF)))))
    one = plan.main(["--config", run_yaml, "--mesh=1x1", "--device-memory=64GiB"])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == json.loads(json.dumps(one))
    r1 = one["tried"][0]
    assert one["fits"] and len(one["tried"]) == 1 and r1["remat"] == "none"
    assert r1["params"] == r1["gradients"] == 4 * n_params  # float32, unsharded
    assert 2 * r1["params"] <= r1["optimizer"] <= 2 * r1["params"] + 64  # Adam's two moments + counts
    assert one["weight_sync_bytes"] == 4 * n_params and one["model"]["params"] == n_params



@pytest.mark.slow
def test_plan_shards_and_searches_until_it_fits(run_yaml):
    plan = _tool("plan")
    one = plan.main(["--config", run_yaml, "--mesh=1x1", "--no-search"])["tried"][0]
    # FSDP over 4 devices: about a quarter of the parameters and moments per device (the norms and
    # biases stay replicated); a budget just below the configured peak makes the search try more
    # rematerialisation, then smaller micro-batches, until one fits.
    four = plan.main(["--config", run_yaml, "--mesh=4x1", "--no-search"])["tried"][0]
    assert four["params"] < 0.3 * one["params"] and four["optimizer"] < 0.3 * one["optimizer"]
    res = plan.main(["--config", run_yaml, "--mesh=4x1", f"--device-memory={four['peak'] - 1}", "--max-trials=8"])
    assert not res["fits"] and len(res["tried"]) > 1
    assert [(t["micro_batch_size"], t["remat"]) for t in res["tried"][1:]] == [(16, "dots"), (16, "dots_except_mlp"),
                                                                            (16, "attn_context")][:len(res["tried"]) - 1]
    assert res["tried"][1]["activations"] < res["tried"][0]["activations"]  # rematerialising saves activations
    fitting = [t for t in res["tried"] if t["peak"] <= res["device_memory"]]
    assert fitting == res["tried"][-1:]  # the search stops at the first setting that fits
    assert res["fitting_setting"] == {"train.micro_batch_size": fitting[0]["micro_batch_size"],
                                      "model.remat": fitting[0]["remat"]}


def test_search_order(run_yaml):
    """More rematerialisation first at the configured micro-batch, then halved micro-batches that the
    data axis still divides."""
    from aepo_jax.config import build_config
    from aepo_jax.trainer.config import RunConfig

    plan = _tool("plan")
    cfg = build_config(RunConfig, ["--config", run_yaml])
    assert plan.candidates(cfg, data_size=4, max_trials=20) == [
        (16, "dots"), (16, "dots_except_mlp"), (16, "attn_context"), (16, "full"),
        (8, "dots_except_mlp"), (8, "full"), (4, "dots_except_mlp"), (4, "full")]
    cfg = build_config(RunConfig, ["--config", run_yaml, "--model.remat=full"])
    assert plan.candidates(cfg, data_size=8, max_trials=2) == [(8, "dots_except_mlp"), (8, "full")]


def test_plan_names_an_unknown_model(tmp_path):
    plan = _tool("plan")
    cfg = tmp_path / "run.yaml"
    cfg.write_text("model: {path: models/NotAModel-1B}\n")
    with pytest.raises(SystemExit, match="'notamodel-1b' is not one of the built-in"):
        plan.main(["--config", str(cfg), "--mesh=1x1"])


@pytest.mark.slow
def test_bench_compile_reports_a_ratio(capsys):
    bench = _tool("bench_compile")
    res = bench.main(["--depths", "1,3", "--hidden", "32", "--vocab", "128", "--prompt-len", "8",
                      "--response-len", "8"])
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last == json.loads(json.dumps(res)) and set(last["compile_s"]) == {"1", "3"}
    # compile_s is rounded to 0.01 s and ratio to 0.001: allow exactly that rounding, no more
    c1, c3 = last["compile_s"]["1"], last["compile_s"]["3"]
    bound = (c3 + 0.005) / max(c1 - 0.005, 1e-9) - c3 / c1 + 5e-4
    assert last["ratio"] == pytest.approx(c3 / c1, abs=bound)
