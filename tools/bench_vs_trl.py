"""The whole GRPO step, aepo-jax vs Hugging Face TRL's ``GRPOTrainer``, side by side on one machine.

    pip install -e ".[bench]"        # TRL; never a runtime dependency of aepo-jax
    flock /tmp/aepo_heavy.lock python tools/bench_vs_trl.py [--runs 4] [--steps 40] [--shape toy|large]
    python tools/bench_vs_trl.py --quick          # 6 steps, one run of each side (a smoke check)

Both sides train the same base model on the same prompts in the same order with the same settings:
G = 8 samples per prompt, 16 prompts per step, 48 new tokens at T = 1 (no top-k / top-p), AdamW at a
constant lr of 1e-3, gradient-norm clip 1, PPO clip 0.2, no KL term, fp32, no gradient
checkpointing, the GRPO loss aggregated per sequence then over sequences ("seq-mean-token-mean";
TRL's ``loss_type="grpo"``), group-normalised advantages with the unbiased std, and the same binary
reward function (the toy task's exact match). TRL samples with eager ``model.generate`` (its default
when vLLM is off); aepo-jax runs ``python -m aepo_jax.train --method=grpo`` with its embedded
sampling server, exactly as a user would.

``--shape toy`` (default) is the built-in toy base model (a 2-layer Qwen2, hidden 64), built once and
cached (not timed). ``--shape large`` is a 4-layer Qwen2 with hidden 512 and a 32k vocabulary with
*random weights* (the toy tokenizer): the timing of a bigger model; its rewards mean nothing.

The prompts: our data pipeline's first ``steps x 16`` prompts (seed 0, shuffled), handed to TRL in
that order with ``shuffle_dataset=False``; the worker checks that TRL tokenizes each one to the very
token ids aepo-jax sends.

Runs alternate (ours, TRL, ours, TRL, ...), each a fresh subprocess, so a change in the machine's
load hits both sides alike and the whole-process time is what a user waits for. aepo-jax's first run
starts with an empty JAX compilation cache (a fresh directory for this benchmark), later runs find
it warm. The toy base model build is done before the first run and not timed.

TRL's process runs with ``OMP_WAIT_POLICY=PASSIVE`` by default: torch's OpenMP threads otherwise spin
while they wait, and on a machine where other work competes for the cores that makes torch many
times slower (measured: ``generate`` 12 s instead of 1.1 s at a load of 11 on 2 cores). Passive
waiting costs torch little on a quiet machine; ``--trl-omp-wait-policy=default`` measures torch as
shipped.

Reported (the last line is JSON): the median step time of each side over steps 6..N (over all runs
of that side) and ``ratio`` = ours / TRL (below 1: aepo-jax is faster), the whole-process time of
each run, the median per-stage times, step 1's time, the reward (and entropy) at steps 1, 10, 20,
30 and N, and the machine (``lscpu`` model name, AVX-512 or not).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere: the package is in the repository
    sys.path.insert(0, str(REPO))

# The settings both sides share (the comparison).
PROMPTS_PER_STEP = 16
GROUP_SIZE = 8  # G
NEW_TOKENS = 48
LR = 1e-3
CLIP = 0.2
GRAD_CLIP = 1.0
SEED = 0
TIMED_FROM_STEP = 6  # median over steps 6..N: step 1 compiles / warms up, a few more settle
REPORT_STEPS = (1, 10, 20, 30, 40)
LARGE_SHAPE = {"layers": 4, "hidden": 512, "heads": 8, "kv_heads": 2, "intermediate": 1408, "vocab": 32000}


# ----------------------------------------------------------------------------------- the machine
def machine() -> dict:
    """The CPU as lscpu names it, AVX-512 or not, core count: printed with every result."""
    info = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "avx512": False}
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        out = ""
    for line in out.splitlines():
        key, _, value = line.partition(":")
        key, value = key.strip(), value.strip()
        if key == "Model name":
            info["cpu"] = value
        elif key == "CPU family":
            info["cpu_family"] = value
        elif key == "Model":
            info["cpu_model"] = value
        elif key == "Flags":
            info["avx512"] = "avx512f" in value.split()
    if not out and os.path.exists("/proc/cpuinfo"):
        info["avx512"] = " avx512f " in Path("/proc/cpuinfo").read_text()
    return info


def machine_line(m: dict) -> str:
    fam = f", family {m['cpu_family']} model {m['cpu_model']}" if "cpu_family" in m else ""
    return f"machine: {m['cpu']}{fam}, {m['cores']} cores, AVX-512 {'yes' if m['avx512'] else 'no'}"


# ----------------------------------------------------------------------------------- model and prompts
def build_large_model(out_dir: str | Path, tokenizer_dir: str | Path, shape: dict = LARGE_SHAPE) -> str:
    """A random-weight Qwen2 of ``shape`` with the toy tokenizer (ids above its vocabulary decode
    to nothing): the timing of a bigger model on the same task."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    out_dir, tokenizer_dir = Path(out_dir), Path(tokenizer_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    base = json.loads((tokenizer_dir / "config.json").read_text())
    cfg = Qwen2Config(vocab_size=shape["vocab"], hidden_size=shape["hidden"], intermediate_size=shape["intermediate"],
                      num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"],
                      num_key_value_heads=shape["kv_heads"], max_position_embeddings=base.get("max_position_embeddings", 512),
                      eos_token_id=base["eos_token_id"], pad_token_id=base.get("pad_token_id"),
                      bos_token_id=base.get("bos_token_id"), tie_word_embeddings=False)
    torch.manual_seed(0)
    Qwen2ForCausalLM(cfg).to(torch.float32).save_pretrained(out_dir, safe_serialization=True)
    for f in tokenizer_dir.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "generation_config", "chat_template")):
            shutil.copy(f, out_dir / f.name)
    return str(out_dir)


def step_prompts(tokenizer, steps: int, prompts_per_step: int = PROMPTS_PER_STEP, seed: int = SEED) -> list:
    """The toy task's prompts exactly as ``python -m aepo_jax.train`` draws them: rendered and
    tokenized by the trainer's code, in its pipeline's order (``data.seed``, shuffled), one step's
    prompts after another."""
    from aepo_jax import data as data_lib
    from aepo_jax.trainer.config import RunConfig

    d = RunConfig().data
    examples, _ = data_lib.tokenize_problems(
        data_lib.toy_problems("train"), tokenizer,
        data_lib.PromptConfig(template=d.template, max_prompt_length=d.max_prompt_length))
    pipe = data_lib.PromptPipeline(examples, data_lib.PipelineConfig(
        batch_size=prompts_per_step, seed=seed, shuffle=True, process_index=0, process_count=1))
    return [e for _ in range(steps) for e in next(pipe)]


# ----------------------------------------------------------------------------------- TRL side
def toy_reward(prompts, completions, answer, **kwargs) -> list[float]:  # noqa: ARG001 - TRL's signature
    """TRL reward function: the toy task's reward, the very function aepo-jax's reward pool calls."""
    from aepo_jax.rewards import resolve_reward

    fn = resolve_reward("toy")
    return [float(fn(c, a)) for c, a in zip(completions, answer, strict=True)]


def trl_settings(steps: int, output_dir: str, seed: int = SEED) -> dict:
    """``GRPOConfig`` keyword arguments that match aepo-jax's run (see the module docstring)."""
    return dict(
        output_dir=output_dir,
        max_steps=steps,
        per_device_train_batch_size=PROMPTS_PER_STEP * GROUP_SIZE,  # TRL counts completions
        gradient_accumulation_steps=1,  # one update per step, on-policy
        num_generations=GROUP_SIZE,
        max_completion_length=NEW_TOKENS,
        temperature=1.0, top_p=1.0, top_k=0, min_p=None, repetition_penalty=1.0,
        learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, max_grad_norm=GRAD_CLIP,
        beta=0.0,  # no KL term, no reference model
        epsilon=CLIP, num_iterations=1,
        loss_type="grpo",  # per-sequence token mean, then mean over sequences
        scale_rewards="group",
        bf16=False, fp16=False,  # fp32 (TRL's default is bf16)
        gradient_checkpointing=False,  # TRL's default is on; aepo-jax does not rematerialise by default
        use_cpu=True, use_vllm=False, use_transformers_paged=False,  # eager model.generate
        shuffle_dataset=False,  # the prompts come in aepo-jax's order
        logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True,
        log_completions=False, dataloader_num_workers=0, seed=seed, data_seed=seed,
    )


def _trl_trainer(model_dir: str, examples: list, steps: int, output_dir: str):
    """A ``GRPOTrainer`` on ``examples`` that records per-step and per-stage wall times."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, PrinterCallback, ProgressCallback, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    steps_log: list[dict] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):  # noqa: ARG002
            steps_log.append({"step": len(steps_log) + 1, "t0": time.perf_counter(), "generate": 0.0,
                              "generate_and_score": 0.0, "reward": 0.0})

        def on_step_end(self, args, state, control, **kw):  # noqa: ARG002
            steps_log[-1]["step_s"] = time.perf_counter() - steps_log[-1]["t0"]

        def on_log(self, args, state, control, logs=None, **kw):  # noqa: ARG002
            if logs and steps_log:
                for key in ("reward", "entropy", "completions/mean_length"):
                    if key in logs:
                        steps_log[-1][key] = float(logs[key])

    class TimedGRPOTrainer(GRPOTrainer):
        def _timed(self, key, fn, *a, **kw):
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                if steps_log:
                    steps_log[-1][key] += time.perf_counter() - t0

        def _generate(self, prompts):
            if steps_log:
                steps_log[-1]["prompts"] = list(dict.fromkeys(prompts))  # each prompt once, in order
            return self._timed("generate", super()._generate, prompts)

        def _calculate_rewards(self, *a, **kw):
            return self._timed("reward", super()._calculate_rewards, *a, **kw)

        def _generate_and_score_completions(self, inputs):
            return self._timed("generate_and_score", super()._generate_and_score_completions, inputs)

    tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    ds = Dataset.from_dict({"prompt": [e.prompt_text for e in examples], "answer": [e.answer for e in examples]})
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, local_files_only=True)
    trainer = TimedGRPOTrainer(model=model, reward_funcs=toy_reward, args=GRPOConfig(**trl_settings(steps, output_dir)),
                               train_dataset=ds, processing_class=tok, callbacks=[Clock()])
    for cb in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(cb)
    return trainer, steps_log


def check_trl_prompt_ids(trainer, examples: list) -> None:
    """TRL must send the model exactly the token ids aepo-jax sends; fail loudly otherwise."""
    ids, _, _ = trainer._tokenize_prompts([e.prompt_text for e in examples])
    for i, (got, e) in enumerate(zip(ids, examples, strict=True)):
        if list(got) != list(e.prompt_ids):
            raise RuntimeError(f"prompt {i} ({e.uid}): TRL tokenizes it to {list(got)[:12]}..., aepo-jax to "
                               f"{list(e.prompt_ids)[:12]}...; the comparison would not be on the same prompts")


def check_step_prompts(steps_log: list[dict], examples: list) -> None:
    """TRL's step k must sample exactly aepo-jax's step-k prompts, in the same order."""
    for rec in steps_log:
        k = rec["step"] - 1
        want = [e.prompt_text for e in examples[k * PROMPTS_PER_STEP:(k + 1) * PROMPTS_PER_STEP]]
        if rec.get("prompts") != want:
            raise RuntimeError(f"TRL step {k + 1} sampled other prompts than aepo-jax's step {k + 1}")


def trl_worker(spec: dict) -> dict:
    """One TRL run in this process; returns its per-step records."""
    from transformers import AutoTokenizer

    t_imports = time.perf_counter()
    import trl  # noqa: F401 - timed: part of what a TRL user waits for

    tok = AutoTokenizer.from_pretrained(spec["model_dir"], local_files_only=True)
    examples = step_prompts(tok, spec["steps"])
    t_setup = time.perf_counter()
    trainer, steps_log = _trl_trainer(spec["model_dir"], examples, spec["steps"], spec["output_dir"])
    check_trl_prompt_ids(trainer, examples[:PROMPTS_PER_STEP * 2])
    t_train = time.perf_counter()
    trainer.train()
    t_end = time.perf_counter()
    check_step_prompts(steps_log, examples)
    for s in steps_log:
        s.pop("t0")
        s.pop("prompts")
    return {"steps": steps_log, "phases_s": {"import_trl": t_setup - t_imports, "trainer_init": t_train - t_setup,
                                             "train": t_end - t_train},
            "trl_version": trl.__version__}


TRL_STAGES = ("generate", "reward_and_advantages", "forward_backward_optimizer")


def trl_record(rec: dict) -> dict:
    """A TRL step's record in the layout of ours, its step in comparable stages: ``generate``
    (tokenize, ``model.generate``, decode), ``reward_and_advantages`` (the rest of TRL's
    generate-and-score, which holds no forward pass in this on-policy setting) and
    ``forward_backward_optimizer`` (the rest of the step)."""
    gas = rec["generate_and_score"]
    return {"step": rec["step"], "step_s": rec["step_s"], "reward": rec.get("reward"), "entropy": rec.get("entropy"),
            "stages": {"generate": rec["generate"], "reward_and_advantages": gas - rec["generate"],
                       "forward_backward_optimizer": rec["step_s"] - gas}}


# ----------------------------------------------------------------------------------- our side
def supports_compilation_cache() -> bool:
    from aepo_jax.trainer.config import TrainSection

    return "compilation_cache" in TrainSection.__dataclass_fields__


def ours_command(model_dir: str, run_dir: str, steps: int, compilation_cache: str | None) -> list[str]:
    """``python -m aepo_jax.train`` with the settings of :func:`trl_settings`."""
    cmd = [sys.executable, "-m", "aepo_jax.train", "--method=grpo", f"--steps={steps}", f"--run-dir={run_dir}",
           f"--model.path={model_dir}", "--model.dtype=float32", "--model.remat=false",
           f"--data.prompts_per_step={PROMPTS_PER_STEP}", f"--data.seed={SEED}", "--data.shuffle=true",
           f"--rollout.n={GROUP_SIZE}", f"--rollout.max_new_tokens={NEW_TOKENS}", "--rollout.temperature=1.0",
           "--rollout.top_p=1.0", "--rollout.top_k=-1",
           "--algorithm.agg=seq-mean-token-mean", f"--algorithm.clip_low={CLIP}", f"--algorithm.clip_high={CLIP}",
           "--algorithm.reward=toy",
           f"--optim.lr={LR}", "--optim.schedule=constant", "--optim.warmup_steps=0", "--optim.weight_decay=0.0",
           f"--optim.grad_clip={GRAD_CLIP}", "--train.epochs=1", "--train.mini_batch_prompts=0",
           f"--train.seed={SEED}", "--train.resume=false", f"--checkpoint.every={steps}",
           "--logging.tensorboard=false", "--logging.console=false"]
    if compilation_cache is not None:
        cmd.append(f"--train.compilation_cache={compilation_cache}")
    return cmd


OUR_STAGES = ("rollout", "reward", "old_logp", "batch", "update", "sync")


def read_ours(run_dir: str | Path) -> tuple[list[dict], dict]:
    """Our run's per-step records from ``metrics.jsonl``, and its start-up phases (``timing_s/startup*``
    of the first step; empty for versions that do not log them)."""
    out, startup = [], {}
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        m = json.loads(line)
        if not out:
            startup = {k.removeprefix("timing_s/"): round(v, 2) for k, v in m.items()
                       if k.startswith("timing_s/startup")}
        out.append({"step": m["step"], "step_s": m["timing_s/step"], "reward": m.get("rollout/reward_mean"),
                    "entropy": m.get("policy/entropy_full"), "compiles": m.get("perf/compiles"),
                    "server_compiles": m.get("perf/server_compiles"),
                    "stages": {s: m[f"timing_s/{s}"] for s in OUR_STAGES if f"timing_s/{s}" in m}})
    return out, startup


# ----------------------------------------------------------------------------------- one run
def run_side(side: str, spec: dict, workdir: Path, index: int) -> dict:
    """One fresh subprocess of ``side``; whole-process wall time plus its per-step records."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    run_dir = workdir / f"{index:02d}-{side}"
    run_dir.mkdir(parents=True)
    log_path = run_dir / "stdout.log"
    if side == "ours":
        cmd = ours_command(spec["model_dir"], str(run_dir / "run"), spec["steps"], spec["compilation_cache"])
    else:
        if spec["omp_wait_policy"] != "default":
            env["OMP_WAIT_POLICY"] = spec["omp_wait_policy"].upper()
        worker = dict(spec, output_dir=str(run_dir / "trl"), result=str(run_dir / "trl.json"))
        cmd = [sys.executable, str(Path(__file__).resolve()), "--trl-worker", json.dumps(worker)]
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=str(REPO))
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = log_path.read_text(errors="replace")[-4000:]
        raise RuntimeError(f"{side} run {index} failed (exit {proc.returncode}): {' '.join(cmd[:4])} ...\n{tail}")
    if side == "ours":
        steps, startup = read_ours(run_dir / "run")
        line = next((ln for ln in log_path.read_text().splitlines() if "start-up " in ln), None)
        extra = {"startup": startup, "startup_line": line.split(": ", 1)[-1] if line else None}
    else:
        res = json.loads((run_dir / "trl.json").read_text())
        steps = [trl_record(s) for s in res["steps"]]
        extra = {"phases_s": res["phases_s"], "trl_version": res["trl_version"]}
    return {"side": side, "index": index, "process_s": wall, "steps": steps, **extra}


# ----------------------------------------------------------------------------------- summary
def _median(xs) -> float | None:
    xs = [x for x in xs if x is not None]
    return float(statistics.median(xs)) if xs else None


def summarise(runs: list[dict], steps: int) -> dict:
    out: dict = {}
    for side in ("ours", "trl"):
        rs = [r for r in runs if r["side"] == side]
        if not rs:
            continue
        timed = [s for r in rs for s in r["steps"] if s["step"] >= min(TIMED_FROM_STEP, steps)]
        stage_keys = OUR_STAGES if side == "ours" else TRL_STAGES
        report = [k for k in REPORT_STEPS if k < steps] + [steps]
        out[side] = {
            "median_step_s": _median(s["step_s"] for s in timed),
            "median_step_s_per_run": [_median(s["step_s"] for s in r["steps"] if s["step"] >= min(TIMED_FROM_STEP, steps))
                                      for r in rs],
            "stages_s": {k: round(_median(s["stages"].get(k) for s in timed) or 0.0, 4) for k in stage_keys},
            "step1_s": [r["steps"][0]["step_s"] for r in rs],
            "slowest_later_step": [max(((s["step_s"], s["step"]) for s in r["steps"][1:]), default=(None, None))
                                   for r in rs],
            "process_s": [round(r["process_s"], 2) for r in rs],
            "reward_at": {k: [next((s.get("reward") for s in r["steps"] if s["step"] == k), None) for r in rs]
                          for k in report},
            "entropy_at": {k: [next((s.get("entropy") for s in r["steps"] if s["step"] == k), None) for r in rs]
                           for k in report},
            "reward_last": [r["steps"][-1].get("reward") for r in rs],
        }
        if side == "ours":
            out[side]["startup_s"] = [r.get("startup") for r in rs]
            # programs compiled after step 1: the learner's (perf/compiles of steps 2..N) and the
            # rollout servers' (perf/server_compiles, logged at the last step); both 0 when every
            # shape was compiled (or warmed) at start-up
            out[side]["compiles_after_step1"] = [sum(s.get("compiles") or 0.0 for s in r["steps"][1:]) for r in rs]
            out[side]["server_compiles_after_step1"] = [r["steps"][-1].get("server_compiles") for r in rs]
            out[side]["startup_line"] = [r.get("startup_line") for r in rs]
        else:
            out[side]["phases_s"] = [r["phases_s"] for r in rs]
            out[side]["trl_version"] = rs[0]["trl_version"]
    if "ours" in out and "trl" in out and out["trl"]["median_step_s"]:
        out["ratio"] = out["ours"]["median_step_s"] / out["trl"]["median_step_s"]
        o, t = out["ours"]["process_s"], out["trl"]["process_s"]
        out["process_ratio_first"] = o[0] / t[0]
        if len(o) > 1 and len(t) > 1:
            out["process_ratio_second"] = o[1] / t[1]
        ro, rt = out["ours"]["reward_last"], out["trl"]["reward_last"]
        if all(x is not None for x in ro + rt):
            out["reward_last_diff"] = statistics.mean(ro) - statistics.mean(rt)
    return out


def print_table(s: dict, steps: int) -> None:
    o, t = s.get("ours", {}), s.get("trl", {})

    def f(x, nd=3):
        return "-" if x is None else (f"{x:.{nd}f}" if isinstance(x, float) else str(x))

    print(f"{'':34s} {'aepo-jax':>22s} {'TRL ' + t.get('trl_version', ''):>22s}")
    print(f"{'median step, steps %d-%d (s)' % (min(TIMED_FROM_STEP, steps), steps):34s} "
          f"{f(o.get('median_step_s')):>22s} {f(t.get('median_step_s')):>22s}")
    print(f"{'whole process per run (s)':34s} {', '.join(f(x, 1) for x in o.get('process_s', [])):>22s} "
          f"{', '.join(f(x, 1) for x in t.get('process_s', [])):>22s}")
    print(f"{'step 1 per run (s)':34s} {', '.join(f(x, 2) for x in o.get('step1_s', [])):>22s} "
          f"{', '.join(f(x, 2) for x in t.get('step1_s', [])):>22s}")
    print(f"{'reward at step %d' % steps:34s} {', '.join(f(x, 3) for x in o.get('reward_last', [])):>22s} "
          f"{', '.join(f(x, 3) for x in t.get('reward_last', [])):>22s}")
    if "compiles_after_step1" in o:
        print(f"{'programs compiled after step 1':34s} learner {o['compiles_after_step1']}, "
              f"rollout server {o['server_compiles_after_step1']}")
    print("stages (median s): ours " + ", ".join(f"{k} {v}" for k, v in o.get("stages_s", {}).items()))
    print("                   TRL  " + ", ".join(f"{k} {v}" for k, v in t.get("stages_s", {}).items()))
    if "ratio" in s:
        print(f"ratio (ours / TRL median step): {s['ratio']:.3f}   whole process, first run {s['process_ratio_first']:.2f}"
              + (f", second run {s['process_ratio_second']:.2f}" if "process_ratio_second" in s else ""))


# ----------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=4, help="runs per side, alternating ours / TRL")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--shape", choices=("toy", "large"), default="toy",
                   help="toy: the built-in toy base model; large: 4 layers, hidden 512, vocab 32k, random weights")
    p.add_argument("--sides", default="ours,trl", help="comma-separated: ours, trl")
    p.add_argument("--quick", action="store_true", help="6 steps, one run of each side")
    p.add_argument("--trl-omp-wait-policy", choices=("passive", "default"), default="passive",
                   help="OMP_WAIT_POLICY of the TRL process: torch's OpenMP threads spin while they wait, "
                        "which on a loaded machine makes torch many times slower (passive: they sleep)")
    p.add_argument("--workdir", default="", help="keep run directories here (default: a temporary directory)")
    p.add_argument("--trl-worker", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)

    if a.trl_worker is not None:  # a child process: one TRL run
        spec = json.loads(a.trl_worker)
        Path(spec["result"]).write_text(json.dumps(trl_worker(spec)))
        return 0

    if a.quick:
        a.steps, a.runs = min(a.steps, 6), 1
    sides = [s.strip() for s in a.sides.split(",") if s.strip()]
    if not sides or any(s not in ("ours", "trl") for s in sides):
        p.error(f"--sides: expected a comma-separated subset of ours,trl, got {a.sides!r}")
    if a.runs < 1 or a.steps < 1:
        p.error("--runs and --steps must be >= 1")
    if "trl" in sides:
        try:
            import trl  # noqa: F401
        except ImportError:
            p.error('TRL is not installed: pip install -e ".[bench]"')

    m = machine()
    load_start = os.getloadavg()[0]
    print(f"{machine_line(m)}; load average {load_start:.1f}", flush=True)
    from aepo_jax.toy import ensure_toy_base

    t0 = time.perf_counter()
    toy_dir = ensure_toy_base()  # built once and cached; not part of either side's time
    print(f"toy base model: {toy_dir} ({time.perf_counter() - t0:.1f} s to find or build)", flush=True)

    own = not a.workdir
    workdir = Path(tempfile.mkdtemp(prefix="bench_vs_trl_")) if own else Path(a.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        model_dir = toy_dir if a.shape == "toy" else build_large_model(workdir / "large_model", toy_dir)
        # A fresh compilation cache: our first run compiles everything, later runs find it warm.
        cache = str(workdir / "jax_cache") if supports_compilation_cache() else None
        spec = {"model_dir": model_dir, "steps": a.steps, "compilation_cache": cache,
                "omp_wait_policy": a.trl_omp_wait_policy}
        order = [side for _ in range(a.runs) for side in sides]
        runs = []
        for i, side in enumerate(order):
            r = run_side(side, spec, workdir, i)
            med = _median(s["step_s"] for s in r["steps"] if s["step"] >= min(TIMED_FROM_STEP, a.steps))
            print(f"run {i + 1}/{len(order)} {side:4s}: process {r['process_s']:.1f} s, step 1 {r['steps'][0]['step_s']:.2f} s, "
                  f"median step {med:.3f} s, reward at step {a.steps} {r['steps'][-1].get('reward')}", flush=True)
            if r.get("startup_line"):
                print(f"    {r['startup_line'].strip()}", flush=True)
            runs.append(r)
        s = summarise(runs, a.steps)
        print_table(s, a.steps)
        s.update({"machine": m, "shape": a.shape if a.shape == "toy" else dict(LARGE_SHAPE, weights="random"),
                  "steps": a.steps, "runs_per_side": a.runs, "timed_steps": [min(TIMED_FROM_STEP, a.steps), a.steps],
                  "compilation_cache": "fresh for this benchmark" if cache else "not supported by this version",
                  "load_avg_1m": [load_start, os.getloadavg()[0]], "trl_omp_wait_policy": a.trl_omp_wait_policy,
                  "settings": {
                      "prompts_per_step": PROMPTS_PER_STEP, "G": GROUP_SIZE, "new_tokens": NEW_TOKENS, "lr": LR,
                      "kl": 0.0, "dtype": "float32", "agg": "seq-mean-token-mean"}})
        print(json.dumps(s))
    finally:
        if own:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
