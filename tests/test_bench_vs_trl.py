"""tools/bench_vs_trl.py keeps working: our side's command is a valid run with the shared settings,
the summary computes what it says, and (with TRL installed: pip install -e ".[bench]") TRL's side
builds with matching settings, scores with our reward and samples our prompts in our order."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _load_bench():
    spec = importlib.util.spec_from_file_location("bench_vs_trl", ROOT / "tools" / "bench_vs_trl.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_vs_trl"] = mod
    spec.loader.exec_module(mod)
    return mod


bench = _load_bench()


def test_ours_command_is_a_valid_run_with_the_shared_settings():
    from aepo_jax.config import build_config
    from aepo_jax.trainer.config import ALIASES, RunConfig, validate

    cmd = bench.ours_command("/models/base", "/runs/x", 40, "/tmp/cc")
    assert cmd[1:3] == ["-m", "aepo_jax.train"]
    cfg = validate(build_config(RunConfig, cmd[3:], aliases=ALIASES))
    assert cfg.algorithm.method == "grpo" and cfg.train.steps == 40 and cfg.model.path == "/models/base"
    assert (cfg.rollout.n, cfg.data.prompts_per_step, cfg.rollout.max_new_tokens) == (
        bench.GROUP_SIZE, bench.PROMPTS_PER_STEP, bench.NEW_TOKENS)
    assert (cfg.rollout.temperature, cfg.rollout.top_p, cfg.rollout.top_k) == (1.0, 1.0, -1)
    assert cfg.optim.lr == bench.LR and cfg.optim.schedule == "constant" and cfg.optim.warmup_steps == 0
    assert cfg.optim.grad_clip == bench.GRAD_CLIP and cfg.optim.weight_decay == 0.0
    assert cfg.algorithm.agg == "seq-mean-token-mean" and cfg.model.dtype == "float32" and not cfg.model.remat
    assert cfg.algorithm.clip_low == cfg.algorithm.clip_high == bench.CLIP and cfg.algorithm.reward == "toy"
    assert cfg.train.epochs == 1 and cfg.train.mini_batch_prompts == 0 and not cfg.train.resume
    assert cfg.train.compilation_cache == "/tmp/cc"


def _fake_run(side, step_times, rewards, process_s, compiles=None, server_compiles=None):
    compiles = compiles or [0.0] * len(step_times)
    return {"side": side, "process_s": process_s,
            "steps": [{"step": i + 1, "step_s": t, "reward": r, "entropy": 0.3, "stages": {"rollout": t / 2},
                       "compiles": c, "server_compiles": server_compiles if i + 1 == len(step_times) else None}
                      for i, (t, r, c) in enumerate(zip(step_times, rewards, compiles))],
            **({"phases_s": {}, "trl_version": "x"} if side == "trl" else {})}


def test_summary_medians_skip_warm_up_steps_and_give_the_ratio():
    n = 10
    ours = [_fake_run("ours", [9.0] + [1.0] * 4 + [0.5] * 5, [0.5] * n, 30.0),
            _fake_run("ours", [5.0] + [1.0] * 4 + [0.5] * 5, [0.5] * 9 + [0.9], 20.0,
                      compiles=[30.0, 0.0, 2.0] + [0.0] * 7, server_compiles=1.0)]
    trl = [_fake_run("trl", [2.0] * 5 + [1.0] * 5, [0.5] * 9 + [0.8], 15.0),
           _fake_run("trl", [2.0] * 5 + [1.0] * 5, [0.5] * 9 + [1.0], 16.0)]
    s = bench.summarise([ours[0], trl[0], ours[1], trl[1]], n)
    assert s["ours"]["median_step_s"] == 0.5 and s["trl"]["median_step_s"] == 1.0  # steps 6..10 only
    assert s["ratio"] == 0.5
    assert s["ours"]["process_s"] == [30.0, 20.0] and s["process_ratio_first"] == 2.0
    assert s["process_ratio_second"] == 1.25
    assert s["ours"]["reward_last"] == [0.5, 0.9] and s["reward_last_diff"] == pytest.approx(0.7 - 0.9)
    assert s["ours"]["compiles_after_step1"] == [0.0, 2.0] and s["ours"]["server_compiles_after_step1"] == [None, 1.0]
    assert s["ours"]["step1_s"] == [9.0, 5.0] and s["ours"]["stages_s"] == {"rollout": 0.25} | {
        k: 0.0 for k in bench.OUR_STAGES if k != "rollout"}


def test_machine_names_the_cpu_and_avx512():
    m = bench.machine()
    assert m["cpu"] and isinstance(m["avx512"], bool) and m["cores"] >= 1
    assert "AVX-512" in bench.machine_line(m)


# ---------------------------------------------------------------------------- TRL's side
@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    from aepo_jax.toy import ToyBaseConfig, build_toy_base

    out = tmp_path_factory.mktemp("toy_base")
    build_toy_base(out, ToyBaseConfig(steps=3, warmup_steps=1, n_train_problems=64))
    return str(out)


def test_trl_settings_match_ours(tmp_path):
    pytest.importorskip("trl")
    from trl import GRPOConfig

    a = GRPOConfig(**bench.trl_settings(40, str(tmp_path)))
    assert a.generation_batch_size == bench.PROMPTS_PER_STEP * bench.GROUP_SIZE and a.steps_per_generation == 1
    assert a.num_generations == bench.GROUP_SIZE and a.num_iterations == 1 and a.max_completion_length == 48
    assert a.beta == 0.0 and a.loss_type == "grpo" and a.scale_rewards == "group" and a.epsilon == bench.CLIP
    assert not a.bf16 and not a.fp16 and not a.gradient_checkpointing and not a.use_vllm
    assert a.learning_rate == bench.LR and a.lr_scheduler_type == "constant" and a.warmup_steps == 0
    assert a.max_grad_norm == bench.GRAD_CLIP and a.weight_decay == 0.0
    assert (a.temperature, a.top_p, a.top_k) == (1.0, 1.0, 0) and not a.shuffle_dataset


def test_toy_reward_is_the_trainers_reward():
    from aepo_jax.data import toy_problems
    from aepo_jax.rewards import RewardPool

    problems = toy_problems("train")[:4]
    texts = [f"so \\boxed{{{p.answer}}}" for p in problems[:2]] + ["\\boxed{x}", "no box"]
    answers = [p.answer for p in problems]
    ours = RewardPool("toy", num_workers=0).score(texts, answers).scores
    assert bench.toy_reward(prompts=[""] * 4, completions=texts, answer=answers) == list(ours) == [1.0, 1.0, 0.0, 0.0]


@pytest.mark.slow
def test_trl_samples_our_prompts_in_our_order_and_times_its_stages(tiny_base, tmp_path):
    pytest.importorskip("trl")
    import torch
    from transformers import AutoTokenizer

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # torch's spinning OpenMP threads crawl when other tests load the cores
    try:
        _trl_two_steps(tiny_base, tmp_path)
    finally:
        torch.set_num_threads(threads)


def _trl_two_steps(tiny_base, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_base)
    examples = bench.step_prompts(tok, 2)
    assert len(examples) == 2 * bench.PROMPTS_PER_STEP and len({e.uid for e in examples}) == len(examples)
    trainer, log = bench._trl_trainer(tiny_base, examples, 2, str(tmp_path / "trl"))
    bench.check_trl_prompt_ids(trainer, examples)
    trainer.train()
    bench.check_step_prompts(log, examples)  # raises if TRL sampled other prompts or another order
    with pytest.raises(RuntimeError, match="other prompts"):
        bench.check_step_prompts(log, examples[bench.PROMPTS_PER_STEP:] + examples[:bench.PROMPTS_PER_STEP])
    assert [r["step"] for r in log] == [1, 2]
    for r in log:
        rec = bench.trl_record(r)
        assert 0.0 <= rec["reward"] <= 1.0 and rec["step_s"] > 0
        assert all(v >= 0 for v in rec["stages"].values())
        assert sum(rec["stages"].values()) == pytest.approx(rec["step_s"])
        assert rec["stages"]["generate"] > 0
