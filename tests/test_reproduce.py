"""tools/reproduce.py: the grid, resuming a half-done grid, the report from stored rows, Appendix B."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
TOOLS = ROOT / "tools"


def _load(name: str):
    if str(TOOLS) not in sys.path:
        sys.path.insert(0, str(TOOLS))
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, TOOLS / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def rp():
    return _load("reproduce")


@pytest.fixture(scope="module")
def report(rp):
    return _load("reproduce_report")


# --- the grid ------------------------------------------------------------------------------------------


def test_grid_covers_the_study(rp):
    for quick, n_seeds in ((True, 1), (False, 3)):
        g = rp.build_grid(quick)
        held = [r for r in g.runs if r.group == "held"]
        targets = sorted({r.target for r in held})
        assert len(targets) >= 5 and targets[0] <= 0.5 and targets[-1] >= 2.0
        assert {r.reading for r in held} == {"paper", "mix"}
        assert len({r.seed for r in held}) == n_seeds
        # the seed of the run is the seed of its base model
        assert all(g.base(r.base).seed == r.seed for r in held)
        methods = {r.method for r in g.runs if r.group == "baseline"}
        assert methods == {"grpo", "entropy_reg", "entropy_adv", "ablation_eq2", "ablation_eq3"} | (
            set() if quick else {"clip_cov", "kl_cov"})
        coefs = {dict(r.options)["algorithm.entropy_coef"] for r in g.runs if r.method == "entropy_reg"}
        assert len(coefs) >= 2
        noises = {g.base(r.base).noise for r in g.runs if r.group == "robust"}
        assert len(noises) == 2 and min(noises) < 0.3 < max(noises)
        assert len({r.name for r in g.runs}) == len(g.runs)  # names are run directories


def test_train_args_are_valid_trainer_options(rp):
    """Every run's overrides parse and validate as the trainer's config (no key typo reaches a run)."""
    from aepo_jax.config import build_config
    from aepo_jax.trainer.config import ALIASES, RunConfig, validate

    g = rp.build_grid(False)
    for r in g.runs:
        argv = [f"--model.path=/x", f"--train.steps={g.steps}", f"--checkpoint.every={g.checkpoint_every}",
                *[f"--{k}={v}" for k, v in g.common], *r.train_args()]
        cfg = validate(build_config(RunConfig, argv, aliases=ALIASES))
        assert cfg.algorithm.method == r.method and cfg.algorithm.reading == r.reading
        if r.target is not None:
            assert cfg.algorithm.controller.target_relative
            assert float(cfg.algorithm.controller.target) == r.target


def test_plan_fits_the_time_budget(rp):
    """Item 5: the estimate on 2 idle cores is within 90 min for the whole default grid and 20 for
    --quick; the paper's study part within 60; the controller group (beyond the paper, --with-pid)
    adds at most 20 min, the length group (its base and three runs) at most 10, the hold group (12
    runs of 100 steps at four times the batch; 31 min measured with 2 workers) at most 60."""
    for quick, limit in ((True, 20), (False, 90)):
        g = rp.build_grid(quick)
        assert not [r for r in g.runs if r.group == "controller"]
        assert rp.estimate(g, g.runs, g.bases, workers=2)["wall_s"] <= limit * 60, quick
        study = [r for r in g.runs if r.group not in ("controller", "length", "hold")]
        est = rp.estimate(g, study, [b for b in g.bases if b.variant == "default"], workers=2)
        assert est["wall_s"] <= min(limit, 60) * 60, (quick, est)
        g = rp.build_grid(quick, pid_group=True)
        extra = rp.estimate(g, [r for r in g.runs if r.group == "controller"], (), workers=2)
        assert extra["wall_s"] <= 20 * 60, (quick, extra)
        hold = rp.estimate(g, [r for r in g.runs if r.group == "hold"], (), workers=2)
        assert hold["wall_s"] <= 60 * 60 and (quick or hold["wall_s"] > extra["wall_s"]), (quick, hold)
        length = rp.estimate(g, [r for r in g.runs if r.group == "length"],
                             [b for b in g.bases if b.variant == "length"], workers=2)
        assert length["wall_s"] <= 10 * 60, (quick, length)


def test_controller_group_pairs_the_option_with_the_paper(rp):
    """The controller group: budget_mode=pid (budget_down=60) at 0.5 and 2 x H0 on the first seed's, the
    weak and the strong base of the full grid, and for each of them a run of the paper's controller at the same base, seed and target somewhere
    in the grid (the report compares the two). Only with --with-pid (pid_group)."""
    assert not [r for r in rp.build_grid(False).runs if r.group == "controller"]
    g = rp.build_grid(False, pid_group=True)
    group = [r for r in g.runs if r.group == "controller"]
    opt = [r for r in group if r.options]
    bases = ("seed0", "weak", "strong")
    assert {(r.base, r.target) for r in opt} == {(b, t) for b in bases for t in (0.5, 2.0)}
    assert all(dict(r.options) == {"algorithm.controller.budget_mode": "pid", "algorithm.controller.budget_down": "60"}
               for r in opt)
    assert all(g.base(r.base).seed == r.seed for r in opt)
    for r in opt:
        paper = [p for p in g.runs if p.method == "aepo" and p.reading == "paper" and not p.options
                 and (p.base, p.target, p.seed) == (r.base, r.target, r.seed)]
        assert len(paper) == 1, r.name
    assert not [r for r in rp.build_grid(True).runs if r.group == "controller"]


def test_hold_group_runs_the_option_at_the_default_length_on_every_base(rp):
    """The hold group: the option (budget_mode=proportional, budget_down=60, 64 prompts) at 0.5 and
    1.5 x H0 for 100 steps on every seed's base and at 0.5 x H0 on the weak and strong ones, GRPO
    beside it on each seed and the paper's controller at 0.5 x H0 on the first, at the same batch and length; each run trains its own steps, and the runs of
    the grid's own length keep the spec they had before runs could have their own."""
    g = rp.build_grid(False, seeds=(3, 4))
    hold = [r for r in g.runs if r.group == "hold"]
    entropy_bases = [b.name for b in g.bases if b.variant == "default"]
    opt = [r for r in hold if r.method == "aepo" and "algorithm.controller.budget_mode" in dict(r.options)]
    assert {(r.base, r.target) for r in opt} == ({(f"seed{s}", t) for s in (3, 4) for t in (0.5, 1.5)}
                                                 | {(b, 0.5) for b in entropy_bases if not b.startswith("seed")})
    assert set(entropy_bases) == {"seed3", "seed4", "weak", "strong"}
    assert all(dict(r.options) == {"algorithm.controller.budget_mode": "proportional",
                                   "algorithm.controller.budget_down": "60", "data.prompts_per_step": "64"} for r in opt)
    for s in (3, 4):  # GRPO on each seed, the paper's controller on the first
        same = [r for r in hold if r.seed == s and r not in opt]
        assert sorted((r.method, r.target) for r in same) == ([("aepo", 0.5)] if s == 3 else []) + [("grpo", None)]
        assert all(dict(r.options) == {"data.prompts_per_step": "64"} and r.base == f"seed{s}" for r in same)
    assert all(r.steps == 100 and g.steps_for(r) == 100 for r in hold)
    assert all(g.run_spec_dict(r)["steps"] == 100 for r in hold)
    other = next(r for r in g.runs if r.group == "held")
    assert g.steps_for(other) == g.steps == 60 and "steps" not in g.run_spec_dict(other)["run"]
    assert "--train.steps=100" not in other.train_args()
    # the estimate scales training by steps and prompts: 100 steps of 64 prompts are 100 x (0.2 + 0.8 x 4)
    # = 340 default steps against 60
    one = rp.estimate(g, [hold[0]], (), workers=1)["cpu_s"]
    assert one - rp.estimate(g, [other], (), workers=1)["cpu_s"] == pytest.approx(rp.EST_STEP_CPU_S * (340 - 60))
    assert rp._work_units(100, (("data.prompts_per_step", "16"),)) == pytest.approx(100)
    assert not [r for r in rp.build_grid(True).runs if r.group == "hold"]


def test_grid_order_covers_every_group_with_one_seed_first(rp):
    """A grid stopped part-way has every group with the first seed: that seed's study rows, then the
    controller and length groups (on it and on the weak/strong/length bases), then its 'mix'
    reading, then the other seeds; the hold group (the issue's bar) with the first seed's groups, on
    every seed; each run's spec is what build_grid made, only the order moves."""
    g = rp.build_grid(False, pid_group=True)
    klass = []
    for r in g.runs:
        if r.group == "hold":
            klass.append(1)
        elif r.seed != 0:
            klass.append(3)
        elif r.group in ("controller", "length"):
            klass.append(1)
        elif r.reading == "mix":
            klass.append(2)
        else:
            klass.append(0)
    assert klass == sorted(klass) and set(klass) == {0, 1, 2, 3}
    assert len({r.name for r in g.runs}) == len(g.runs)
    assert g.runs[0].name == "aepo-paper-t0p5-s0"
    groups_first_seed = {r.group for r, k in zip(g.runs, klass) if k < 3}
    assert {"held", "baseline", "robust", "controller", "hold", "length"} <= groups_first_seed
    assert not [r for r in rp.build_grid(True).runs if r.group == "controller"]


def test_heldout_file_written_once_by_concurrent_jobs(rp, tmp_path):
    """Two base models evaluated at the same time ask for the held-out file together: one writes it,
    both get it (each writing it would race on the same temporary file)."""
    import threading

    ev = rp.EvalSpec(problems=8)
    barrier = threading.Barrier(6)
    got, errors = [], []

    def job():
        barrier.wait()
        try:
            got.append(rp.heldout_file(tmp_path, ev))
        except Exception as e:  # noqa: BLE001 - collected and asserted below
            errors.append(e)

    threads = [threading.Thread(target=job) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and len(set(got)) == 1
    assert len(got[0].read_text().splitlines()) == 8


# --- resume ------------------------------------------------------------------------------------------------

TINY = {"steps": 4, "checkpoint_every": 2, "eval": {"problems": 2, "n": 4},
        "bases": [{"name": "b", "seed": 0, "steps": 60}],
        "runs": [{"name": "done", "group": "held", "base": "b", "method": "aepo", "label": "AEPO", "target": 1.5},
                 {"name": "half", "group": "baseline", "base": "b", "method": "grpo", "label": "GRPO"},
                 {"name": "trained", "group": "baseline", "base": "b", "method": "entropy_adv", "label": "Entropy-Adv"},
                 {"name": "new", "group": "baseline", "base": "b", "method": "grpo", "label": "GRPO 2", "seed": 1}]}


def _fake_result(grid, run, rp):
    n = grid.steps
    return {"spec": grid.run_spec_dict(run), "complete": True, "name": run.name, "run": rp.dataclasses.asdict(run),
            "steps": list(range(1, n + 1)), "series": {k: [0.5] * n for k in rp.SERIES_KEYS},
            "eval": {"avg_at_n": 0.5, "pass_at_k": {"1": 0.5}}, "resumed_from": "new",
            "wall_s": {"train": 10.0, "eval": 1.0}, "cpu_s": {"train": 20.0, "eval": 2.0}}


def test_resume_states_of_a_half_done_grid(rp, tmp_path):
    """finished runs are skipped, a run with a checkpoint resumes from it, one whose training ended
    goes to evaluation, a stale result (other spec) is redone, a run with outputs but no checkpoint restarts."""
    (tmp_path / "grid.json").write_text(json.dumps(TINY))
    grid = rp.grid_from_json(tmp_path / "grid.json")
    runs = {r.name: r for r in grid.runs}
    work = tmp_path / "work"
    d = work / "runs"
    rp.write_json(d / "done" / rp.RESULT_FILE, _fake_result(grid, runs["done"], rp))
    (d / "half" / "checkpoints" / "2").mkdir(parents=True)
    (d / "trained" / "checkpoints" / "4").mkdir(parents=True)
    w = d / "trained" / "weights" / "weights_v4"
    w.mkdir(parents=True)
    (w / "config.json").write_text("{}")
    (w / "model.safetensors").write_bytes(b"x")
    st = {n: rp.run_state(d / n, grid.run_spec_dict(r), grid.steps) for n, r in runs.items()}
    assert st == {"done": "finished", "half": "resume@2", "trained": "evaluate", "new": "new"}

    lines = []
    rp.print_plan(grid, rp.Env(work, log=lines.append), workers=2, out=lines.append)
    text = "\n".join(lines)
    assert "done" in text and "finished: skipped" in text
    assert "resume from checkpoint step 2" in text and "evaluate only" in text
    assert "estimated time" in text and "3 run(s)" in text  # the finished one is not counted

    # a result written for another spec (e.g. more steps) is not "finished"
    longer = rp.Grid(grid.bases, grid.runs, grid.steps + 2, grid.eval)
    assert rp.run_state(d / "done", longer.run_spec_dict(runs["done"]), longer.steps) != "finished"
    # outputs without any checkpoint: restart from scratch
    (d / "new").mkdir()
    (d / "new" / "metrics.jsonl").write_text('{"step": 1}\n')
    assert rp.run_state(d / "new", grid.run_spec_dict(runs["new"]), grid.steps) == "restart"


def test_a_run_trained_under_another_spec_is_moved_aside_not_reused(rp, tmp_path):
    """A grid edited after its runs trained (here: another option): the old checkpoints and final
    weights must be neither evaluated nor resumed as the new spec's; they are moved aside, kept."""
    (tmp_path / "grid.json").write_text(json.dumps(TINY))
    grid = rp.grid_from_json(tmp_path / "grid.json")
    run = grid.runs[0]
    d = tmp_path / "work" / "runs" / run.name
    old = rp.dataclasses.replace(run, options=(("data.prompts_per_step", "64"),))
    rp.write_json(d / rp.SPEC_FILE, grid.run_spec_dict(old))
    (d / "checkpoints" / str(grid.steps)).mkdir(parents=True)
    (d / "checkpoints" / "2").mkdir(parents=True)
    w = d / "weights" / f"weights_v{grid.steps}"
    w.mkdir(parents=True)
    (w / "config.json").write_text("{}")
    (w / "model.safetensors").write_bytes(b"x")
    assert rp.run_state(d, grid.run_spec_dict(old), grid.steps) == "evaluate"  # its own spec: trained
    assert rp.run_state(d, grid.run_spec_dict(run), grid.steps) == "stale"
    # a stored result of another spec, with no spec file (a run that predates it), is stale too
    other = tmp_path / "other"
    rp.write_json(other / rp.RESULT_FILE, {**_fake_result(grid, old, rp), "spec": grid.run_spec_dict(old)})
    (other / "checkpoints" / str(grid.steps)).mkdir(parents=True)
    assert rp.run_state(other, grid.run_spec_dict(run), grid.steps) == "stale"
    # in the plan, and when run: moved aside (kept), the run starts from scratch under its new spec
    lines = []
    rp.print_plan(grid, rp.Env(tmp_path / "work", log=lines.append), workers=1, out=lines.append)
    assert "outputs of another spec: moved aside" in "\n".join(lines)
    env = rp.Env(tmp_path / "work", python=str(tmp_path / "no-python"), log=lines.append)
    with pytest.raises((rp.ReproduceError, OSError)):  # the trainer cannot start here; the move came first
        rp.train_and_eval(grid, run, env)
    aside = d.with_name(f"{run.name}.stale1")
    assert (aside / "weights" / f"weights_v{grid.steps}" / "model.safetensors").is_file()
    assert rp.read_json(d / rp.SPEC_FILE) == grid.run_spec_dict(run) and not (d / "checkpoints").exists()


def test_finished_grid_runs_nothing(rp, tmp_path):
    """With every base and run finished, the whole grid returns at once, without a subprocess."""
    (tmp_path / "grid.json").write_text(json.dumps(TINY))
    grid = rp.grid_from_json(tmp_path / "grid.json")
    work = tmp_path / "work"
    rp.write_json(work / "bases" / "b" / rp.RESULT_FILE,
                  {"spec": grid.base_spec_dict(grid.bases[0]), "complete": True, "name": "b", "eval": {"avg_at_n": 0.1}})
    for r in grid.runs:
        rp.write_json(work / "runs" / r.name / rp.RESULT_FILE, _fake_result(grid, r, rp))
    env = rp.Env(work, python="/nonexistent/python", log=lambda m: None)  # any subprocess would fail
    bases, runs, errors = rp.run_grid(grid, env, workers=2)
    assert errors == [] and len(runs) == len(grid.runs) and len(bases) == 1


def _trained_outputs(rp, grid, run, d, validation: dict | None) -> None:
    """What a finished training leaves: spec, last checkpoint, final weights, metrics, its validation."""
    n = grid.steps
    rp.write_json(d / rp.SPEC_FILE, grid.run_spec_dict(run))
    (d / "checkpoints" / str(n)).mkdir(parents=True)
    w = d / "weights" / f"weights_v{n}"
    w.mkdir(parents=True)
    (w / "config.json").write_text("{}")
    (w / "model.safetensors").write_bytes(b"x")
    rows = [{"step": i, **{k: 0.5 for k in rp.SERIES_KEYS}} for i in range(1, n + 1)]
    rows[-1].update({"timing_s/validation": 3.0, "perf/validation_cpu_s": 5.0})
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if validation is not None:
        rp.write_json(d / "validation" / f"step_{n}.json", validation)


def _validation_report(ev, **settings) -> dict:
    """A trainer's validation report (python -m aepo_jax.eval's --output layout) made with ``ev``."""
    st = {"n": ev.n, "ks": ev.ks, "temperature": ev.temperature, "top_p": ev.top_p, "max_new_tokens": ev.max_new_tokens,
          "seed": ev.seed, **settings}
    bench = {"avg_at_n": 0.25, "pass_at_k": {str(k): 0.5 for k in ev.ks}, "n": ev.n, "num_problems": ev.problems,
             "mean_token_nll": 0.4, "mean_response_tokens": 9.0, "per_problem_correct": [1, 0]}
    return {"settings": st, "benchmarks": {"heldout-2": bench}}


def test_trained_run_is_read_back_from_its_own_validation(rp, tmp_path):
    """A run whose training ended with the study's validation (result.json lost): its result is
    assembled from the run's files, no process started, the validation's time moved out of training."""
    (tmp_path / "grid.json").write_text(json.dumps(TINY))
    grid = rp.grid_from_json(tmp_path / "grid.json")
    run = grid.runs[1]
    d = tmp_path / "work" / "runs" / run.name
    _trained_outputs(rp, grid, run, d, _validation_report(grid.eval))
    env = rp.Env(tmp_path / "work", python="/nonexistent/python", log=lambda m: None)  # any process would fail
    res = rp.train_and_eval(grid, run, env)
    assert res["eval"] == {"avg_at_n": 0.25, "pass_at_k": {str(k): 0.5 for k in grid.eval.ks}, "n": grid.eval.n,
                           "problems": grid.eval.problems, "entropy_nll": 0.4, "response_tokens": 9.0,
                           "per_problem_correct": [1, 0]}
    assert res["wall_s"]["eval"] == 3.0 and res["cpu_s"]["eval"] == 5.0 and res["resumed_from"] == "evaluate"
    assert rp.read_json(d / rp.RESULT_FILE)["complete"]


@pytest.mark.parametrize("change", [{"n": 8}, {"seed": 1}, {"max_new_tokens": 7}, {"temperature": 0.6}, {"ks": [1, 2]}])
def test_validation_with_other_settings_is_not_the_evaluation(rp, tmp_path, change):
    """A validation report made with other settings than the grid's evaluation (or of another
    problem count) is not read as it: the separate evaluation runs instead (here it cannot start)."""
    (tmp_path / "grid.json").write_text(json.dumps(TINY))
    grid = rp.grid_from_json(tmp_path / "grid.json")
    assert rp.read_final_validation(tmp_path / "none", grid.steps, grid.eval) is None
    d = tmp_path / "run"
    rp.write_json(d / "validation" / f"step_{grid.steps}.json", _validation_report(grid.eval))
    assert rp.read_final_validation(d, grid.steps, grid.eval) is not None
    rp.write_json(d / "validation" / f"step_{grid.steps}.json", _validation_report(grid.eval, **change))
    assert rp.read_final_validation(d, grid.steps, grid.eval) is None
    other = rp.dataclasses.replace(grid.eval, problems=grid.eval.problems + 1)
    rp.write_json(d / "validation" / f"step_{grid.steps}.json", _validation_report(grid.eval))
    assert rp.read_final_validation(d, grid.steps, other) is None


def test_final_validation_args_are_the_evaluation_settings(rp, tmp_path):
    """The trainer options the study adds make the run validate once, after its last step, with each
    of the evaluation's settings (as the trainer's config reads them)."""
    from aepo_jax.config import build_config
    from aepo_jax.trainer.config import ALIASES, RunConfig, validate
    from aepo_jax.trainer.validation import ks_of, should_validate

    ev = rp.EvalSpec(problems=5, n=16, temperature=0.9, top_p=0.95, max_new_tokens=40, seed=3)
    held = tmp_path / "heldout.jsonl"
    held.write_text('{"prompt": "1+1", "answer": "2"}\n')
    cfg = validate(build_config(RunConfig, ["--model.path=/x", "--train.steps=7", *rp.final_validation_args(ev, 7, held)],
                                aliases=ALIASES))
    e = cfg.eval
    assert (e.n, e.temperature, e.top_p, e.max_new_tokens, e.seed, list(e.files)) == (16, 0.9, 0.95, 40, 3, [str(held)])
    assert ks_of(cfg) == ev.ks == [1, 2, 4, 8, 16]
    assert [s for s in range(8) if should_validate(cfg, s)] == [7]


def test_bad_grid_file_names_the_problem(rp, tmp_path):
    bad = dict(TINY, runs=[dict(TINY["runs"][0], base="nope")])
    (tmp_path / "g.json").write_text(json.dumps(bad))
    with pytest.raises(rp.ReproduceError, match="nope"):
        rp.grid_from_json(tmp_path / "g.json")


@pytest.mark.slow
def test_tiny_grid_end_to_end_then_resumes(rp, tmp_path):
    """A real tiny grid (base build, two runs, evaluations, report), then the same command again:
    everything is skipped; then one run's result and its in-run validation are removed: that run
    alone is evaluated again, by the separate evaluation, which gives the numbers the run's own
    validation gave (reading a validation back without any process: test_trained_run_is_read_back)."""
    (tmp_path / "grid.json").write_text(json.dumps({**TINY, "runs": TINY["runs"][:2]}))
    cmd = [sys.executable, str(TOOLS / "reproduce.py"), "--grid", str(tmp_path / "grid.json"), "--work", str(tmp_path / "w"),
           "--out", str(tmp_path / "out"), "--no-theory"]
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=1500)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert (tmp_path / "out" / "README.md").is_file() and (tmp_path / "out" / "fig1_entropy_targets.png").is_file()
    data = json.loads((tmp_path / "out" / "runs.json").read_text())
    assert [r["name"] for r in data["runs"]] == ["done", "half"]
    for r in data["runs"]:
        assert len(r["series"]["entropy"]) == 4 and 0 <= r["eval"]["avg_at_n"] <= 1
        assert set(r["eval"]["pass_at_k"]) == {"1", "2", "4"}
    for r in data["runs"]:  # evaluated by the trainer's own validation of its last step (one process a run)
        assert (tmp_path / "w" / "runs" / r["name"] / "validation" / "step_4.json").is_file()
        # its shapes (2 problems x 4 samples) are not the training's: compiled, and not counted as training's
        last = json.loads((tmp_path / "w" / "runs" / r["name"] / "metrics.jsonl").read_text().splitlines()[-1])
        assert last["perf/validation_server_compiles"] > 0 and last["perf/server_compiles"] == 0
        # the evaluation CPU of the result is the validation's, its server's share included
        assert r["cpu_s"]["eval"] == last["perf/validation_cpu_s"] > 0
        assert r["eval"]["per_problem_correct"] and r["cpu_s"]["eval"] > 0 and r["wall_s"]["eval"] > 0
        assert r["eval"]["problems"] == TINY["eval"]["problems"] and r["eval"]["n"] == TINY["eval"]["n"]
    half = tmp_path / "w" / "runs" / "half"
    (half / "result.json").unlink()
    (half / "validation" / "step_4.json").unlink()
    second = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "[half] evaluating" in second.stdout and "[done]" not in second.stdout
    assert "training" not in second.stdout  # the trained run is not retrained
    # python -m aepo_jax.eval: the same samples and scores, per problem too; the mean log-prob of the
    # sampled tokens to float32 rounding (the two servers pad generations to other lengths)
    separate, fused = json.loads((half / "result.json").read_text())["eval"], data["runs"][1]["eval"]
    assert separate.pop("entropy_nll") == pytest.approx(fused.pop("entropy_nll"), rel=1e-6)
    assert separate == fused


# --- the report from stored rows ------------------------------------------------------------------------------


def _rows(h0: float, end: float, n: int, target: float | None, rng) -> dict:
    """A run's stored series: entropy from h0 towards end (noise 1%), its target, reward."""
    h = [h0 + (end - h0) * min(1.0, 3 * i / n) for i in range(n)]
    h = [x * (1 + 0.01 * rng.standard_normal()) for x in h]
    h[0] = h0
    return {"entropy": h, "entropy_target": [target] * n if target else [None] * n,
            "reward_mean": list(np.linspace(0.3, 0.7, n)), "temperature": [1.2 if target else 1.0] * n}


def _study(rp, tmp_path, rng):
    """runs.json-shaped data for the quick grid, from synthetic stored rows."""
    grid = rp.build_grid(True, steps=20)
    h0 = 0.4
    runs = []
    for r in grid.runs:
        if r.method == "aepo":
            end, tgt = r.target * h0, r.target * h0
        elif r.method in ("grpo", "ablation_eq2", "ablation_eq3"):
            end, tgt = 0.7 * h0, (r.target * h0 if r.target else None)
        elif r.method == "entropy_reg":
            end, tgt = (0.6 if "0.015" in str(r.options) else 2.0) * h0, None
        else:
            end, tgt = 0.9 * h0, None
        # pass@1 rises then falls with the target
        p1 = 0.6 - 0.1 * abs((r.target or 1.0) - 1.0) if r.method == "aepo" else 0.45
        ks = [1, 2, 4, 8, 16, 32, 64, 128, 256]
        runs.append({"name": r.name, "complete": True, "run": rp.dataclasses.asdict(r), "steps": list(range(1, 21)),
                     "series": _rows(h0, end, 20, tgt, rng),
                     "eval": {"avg_at_n": p1, "n": 256, "pass_at_k": {str(k): 1 - (1 - p1) ** k for k in ks},
                              "entropy_nll": end, "per_problem_correct": [int(256 * p1)] * 16 + [int(256 * p1) + 8] * 16},
                     "resumed_from": "new", "wall_s": {"train": 100.0, "eval": 20.0}, "cpu_s": {"train": 60.0, "eval": 15.0}})
    bases = [{"name": b.name, "recipe": b.recipe(), "eval": {"avg_at_n": 0.4, "n": 256, "pass_at_k": {"1": 0.4, "256": 0.9}}}
             for b in grid.bases]
    return {"created": "now", "command": "python tools/reproduce.py --quick", "commit": "abc", "quick": True, "workers": 2,
            "machine": {"cpu": "test", "cores": 2, "avx512": False, "loadavg_end": [1.0, 1.0, 1.0]},
            "grid": {"steps": 20, "eval": rp.dataclasses.asdict(grid.eval), "seeds": [0]}, "estimate_s": 1000.0,
            "wall_s": 1200.0, "errors": [], "bases": bases, "runs": runs, "theory": None}


def test_report_from_stored_rows(rp, report, tmp_path):
    data = _study(rp, tmp_path, np.random.default_rng(0))
    path = report.write(data, tmp_path / "out")
    text = path.read_text()
    for name in report.FIGURES.values():
        if name not in (report.FIGURES["theory"], report.FIGURES["length"]):  # no theory, no length group here
            assert (tmp_path / "out" / name).stat().st_size > 10_000, name
    claims = {c: v for _, c, _, v in report.claims(report.Study(data))}
    # synthetic rows built to confirm: AEPO on target, GRPO at 0.7 x H0, Entropy-Reg 0.6 / 2.0 x H0
    assert claims["AEPO holds the entropy at arbitrary targets (Fig. 1), reading 'paper'"] == "**confirmed**"
    assert claims["GRPO collapses the entropy (Fig. 4)"] == "**confirmed**"
    assert claims["Entropy-Reg drives the entropy to collapse or explosion (Fig. 3, 4)"] == "**confirmed**"
    nonmono = next(v for c, v in claims.items() if "non-monotonic" in c)
    assert nonmono == "**confirmed**"
    assert "| paper | 0.5 |" in text and "pass@256" in text


def test_report_verdicts_follow_the_numbers(rp, report, tmp_path):
    """The same study with GRPO holding its entropy and AEPO missing a target: verdicts flip."""
    data = _study(rp, tmp_path, np.random.default_rng(1))
    for r in data["runs"]:
        if r["run"]["method"] == "grpo":
            r["series"]["entropy"] = [0.4] * 20
        if r["run"]["method"] == "aepo" and r["run"]["target"] == 2.0:
            r["series"]["entropy"] = [0.4] * 20
    claims = {c: v for _, c, _, v in report.claims(report.Study(data))}
    assert claims["GRPO collapses the entropy (Fig. 4)"] == "**not confirmed**"
    assert claims["AEPO holds the entropy at arbitrary targets (Fig. 1), reading 'paper'"] == "**partly**"
    text = report.write(data, tmp_path / "out").read_text()
    assert "Where the toy does not reproduce a claim" in text and "GRPO collapses the entropy" in text


def test_held_share_and_first_step(rp):
    res = {"name": "x", "run": {"target": 1.0}, "steps": list(range(1, 11)),
           "series": {"entropy": [1.0, 0.5, 0.7, 0.95, 1.05, 1.2, 1.0, 0.99, 0.8, 1.02], "entropy_target": [1.0] * 10,
                      "reward_mean": [0.1] * 10, "temperature": [1.0] * 10},
           "eval": {"avg_at_n": 0.3, "pass_at_k": {"1": 0.3}}}
    s = rp.summarize_run(res)
    assert s["held"] == pytest.approx(3 / 5)  # second half: 1.2 no, 1.0 yes, 0.99 yes, 0.8 no, 1.02 yes
    assert s["first_in_band"] == 1 and s["h0"] == 1.0
    assert math.isclose(s["h_end"], 1.02)


# --- Appendix B -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ab():
    return _load("appendix_b")


def test_appendix_b_update_is_the_project_loss_gradient(ab):
    """The update the checks use (minus the aepo loss's gradient, weights R * pi^T) equals Eq. (4)'s
    expectation in closed form, so the checks test the paper's update."""
    import jax.numpy as jnp

    z, correct, exists = ab.random_policies(50, seed=3, max_actions=12)
    zj = jnp.asarray(z)
    for t in (0.8, 1.0, 1.2):
        w = ab.reinforce_weights(zj, jnp.asarray(correct), t)
        u = np.asarray(ab.reinforce_update(zj, w, jnp.asarray(exists)))
        zz = np.where(exists, z.astype(np.float64), -np.inf)
        p = np.exp(zz - zz.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        pt = np.exp(zz / t - (zz / t).max(-1, keepdims=True))
        pt /= pt.sum(-1, keepdims=True)
        wt = correct * pt
        expected = wt - wt.sum(-1, keepdims=True) * p
        np.testing.assert_allclose(np.where(exists, u, 0), expected, atol=2e-5)


@pytest.mark.slow
def test_appendix_b_checks_pass(ab):
    res = ab.run_all(n_pol=1000, seed=5)
    judged = [c for c in res["checks"] if c["ok"] is not None]
    assert len(judged) >= 4 and all(c["ok"] for c in judged), [c for c in judged if not c["ok"]]


def test_report_compares_the_controller_option_with_the_paper(rp, report, tmp_path):
    """The controller group's table and claim: each option run beside the paper's run on the same
    base, seed and target; the verdict follows the option's held shares."""
    rng = np.random.default_rng(2)
    full = rp.build_grid(False, steps=20, pid_group=True)
    data = _study(rp, tmp_path, rng)
    h0, runs = 0.4, []
    for r in full.runs:
        if r.group == "controller" or (r.method == "aepo" and r.reading == "paper" and r.target in (0.5, 2.0)):
            # the option on target; the paper's controller 30% above it
            level = r.target * h0 * (1.0 if r.options else 1.3)
            runs.append({"name": r.name, "complete": True, "run": rp.dataclasses.asdict(r), "steps": list(range(1, 21)),
                         "series": _rows(h0, level, 20, r.target * h0, rng),
                         "eval": {"avg_at_n": 0.5, "n": 256, "pass_at_k": {"1": 0.5}}, "resumed_from": "new",
                         "wall_s": {"train": 1.0, "eval": 1.0}, "cpu_s": {"train": 1.0, "eval": 1.0}})
    data["runs"] = [r for r in data["runs"] if r["name"] not in {x["name"] for x in runs}] + runs
    st = report.Study(data)
    pairs = report.controller_pairs(st)
    assert len(pairs) == 6 and all(p is not None for _, p in pairs)
    assert all((p["run"]["base"], p["run"]["target"], p["run"]["seed"]) == (r["run"]["base"], r["run"]["target"], r["run"]["seed"])
               and not p["run"]["options"] for r, p in pairs)
    claim = next(c for c in report.claims(st) if c[0] == "controller")
    assert claim[3] == "**confirmed**" and "held on 6 of 6 runs" in claim[2]
    text = report.write(data, tmp_path / "out").read_text()
    assert "## Beyond the paper: a controller that holds the target" in text and "| weak | 2 | budget_mode=pid, budget_down=60 |" in text
    # the option off its target on one base: the verdict and the why-section say so
    miss = next(r for r in data["runs"] if r["name"] == "strong-pid-t2")
    miss["series"]["entropy"] = [0.4] * 20
    claim = next(c for c in report.claims(report.Study(data)) if c[0] == "controller")
    assert claim[3] == "**partly**" and "held on 5 of 6 runs" in claim[2]
    assert "AEPO pid 2 x H0 (strong base)" in report.why_section(report.claims(report.Study(data)), report.Study(data))


# --- the length group (issue 13) ---------------------------------------------------------------------------------


def test_length_group_is_new_rows_only(rp):
    """The length group adds a base and runs to the full grid; every row that was there before keeps
    its spec (a changed spec makes a running grid redo it) and --quick is unchanged."""
    full, quick = rp.build_grid(False), rp.build_grid(True)
    length = [r for r in full.runs if r.group == "length"]
    assert {(r.method, r.target) for r in length} == {("aepo", 0.7), ("aepo", 1.3), ("grpo", None)}
    assert all(full.base(r.base).variant == "length" for r in length)
    assert all(dict(r.options)["data.toy_variant"] == "length" for r in length)
    assert all(dict(r.options).get("algorithm.controller.signal") == "length" for r in length if r.method == "aepo")
    assert not [r for r in quick.runs if r.group == "length"] and all(b.variant == "default" for b in quick.bases)
    # the older bases and runs read exactly as before variants existed
    old_base = full.base("seed0")
    assert full.base_spec_dict(old_base) == rp._plain({"base": {"seed": 0, "noise": 0.3, "steps": 700},
                                                        "eval": rp.dataclasses.asdict(full.eval)})
    grpo = next(r for r in full.runs if r.name == "grpo-s0")
    assert full.run_spec_dict(grpo)["eval"]["max_new_tokens"] == 48
    assert "variant" not in full.run_spec_dict(grpo)["base"]
    # the variant's evaluation leaves room for its longest correct answer; its base recipe names the variant
    lbase = full.base(length[0].base)
    assert full.base_spec_dict(lbase)["eval"]["max_new_tokens"] >= 52 and lbase.recipe()["variant"] == "length"
    for r in length:
        assert full.run_spec_dict(r)["eval"]["max_new_tokens"] >= 52


def _length_run(rp, run, n, length_end, target_ratio, l0=27.0, rng=None):
    """A stored length-group run: the mean correct length moving from l0 to length_end (1% noise)."""
    rng = rng or np.random.default_rng(0)
    length = [l0 + (length_end - l0) * min(1.0, 4 * i / n) for i in range(n)]
    length = [x * (1 + 0.01 * rng.standard_normal()) for x in length]
    length[0] = l0
    series = {"entropy": [0.6] * n, "entropy_target": [None] * n, "reward_mean": list(np.linspace(0.2, 0.5, n)),
              "temperature": [1.0] * n, "rollout/correct_length_mean": length,
              "control/signal": length if target_ratio else [0.6] * n,
              "control/target": [target_ratio * l0] * n if target_ratio else [0.6] * n}
    return {"name": run.name, "complete": True, "run": rp.dataclasses.asdict(run), "steps": list(range(1, n + 1)),
            "series": series, "eval": {"avg_at_n": 0.3, "n": 256, "pass_at_k": {"1": 0.3, "256": 0.9}},
            "resumed_from": "new", "wall_s": {"train": 100.0, "eval": 20.0}, "cpu_s": {"train": 60.0, "eval": 15.0}}


@pytest.mark.parametrize("aepo_on_target", [True, False])
def test_length_group_report(rp, report, tmp_path, aepo_on_target):
    """Table, figure and claim row of the length group, with the verdict following the numbers: AEPO at
    its targets (GRPO drifting) confirms; AEPO staying at L0 does not, and the report says why."""
    grid = rp.build_grid(False, steps=20)
    runs = []
    for r in (x for x in grid.runs if x.group == "length"):
        ratio = r.target
        end = (ratio if aepo_on_target else 1.0) * 27.0 if ratio else 29.0
        runs.append(_length_run(rp, r, 20, end, ratio))
    s = rp.summarize_length(runs[0])
    assert s["l0"] == 27.0 and s["target"] == pytest.approx(0.7 * 27.0)
    assert s["held"] == (1.0 if aepo_on_target else 0.0)
    assert rp.summarize_length(runs[-1])["held"] is None and rp.summarize_length(runs[-1])["target"] is None
    data = _study(rp, tmp_path, np.random.default_rng(3))  # the study's other rows beside them
    data["runs"] += runs
    text = report.write(data, tmp_path / "out").read_text()
    assert (tmp_path / "out" / report.FIGURES["length"]).stat().st_size > 10_000
    assert "## Beyond the paper: a response-length target" in text and "| AEPO length 0.7 x L0 | 27.0 | 18.9 |" in text
    claims = {cid: v for cid, _, _, v in report.claims(report.Study(data))}
    assert claims["length"] == ("**confirmed**" if aepo_on_target else "**not confirmed**")
    if not aepo_on_target:
        assert "AEPO length 1.3 x L0: held 0.0%" in text  # the why section names the miss


def test_report_states_the_hold_bar_from_the_hold_group(rp, report, tmp_path):
    """The hold group's claims: the option's held share and reward on every base seed (the paper's
    controller beside it), GRPO's end entropy against 0.8 x H0; a miss on one seed, or GRPO above
    0.8 x H0 on one, turns the verdict to partly and the why-section names the run."""
    rng = np.random.default_rng(3)
    full = rp.build_grid(False, steps=20, seeds=(5, 6))
    data = _study(rp, tmp_path, rng)
    h0, runs = 0.4, []
    for r in full.runs:
        if r.group != "hold":
            continue
        option = "algorithm.controller.budget_mode" in dict(r.options)
        end = r.target * h0 * (1.0 if option else 1.3) if r.method == "aepo" else 0.7 * h0
        runs.append({"name": r.name, "complete": True, "run": rp.dataclasses.asdict(r), "steps": list(range(1, 101)),
                     "series": _rows(h0, end, 100, r.target * h0 if r.target else None, rng),
                     "eval": {"avg_at_n": 0.5, "n": 256, "pass_at_k": {"1": 0.5}}, "resumed_from": "new",
                     "wall_s": {"train": 1.0, "eval": 1.0}, "cpu_s": {"train": 1.0, "eval": 1.0}})
    data["runs"] += runs
    # the reading's noise: 0.02 nats on a 0.2 target over the second half (the first half must not count)
    se_run = next(r for r in runs if r["name"] == "hold-t0p5-s5")
    se_run["series"]["policy/entropy_full_stderr"] = [0.2] * 50 + [0.02] * 50
    st = report.Study(data)
    assert st.sum["hold-t0p5-s5"]["reading_se"] == pytest.approx(0.1, rel=1e-6)
    assert st.sum["hold-t1p5-s5"]["reading_se"] is None  # stored without the key
    rows = report.hold_rows(st)
    assert len(rows) == 6  # 2 seeds x 2 targets, weak and strong at 0.5 x H0
    assert [(r["run"]["base"], r["run"]["target"]) for r, p in rows if p] == [("seed5", 0.5)]  # the paper's: first seed
    cl = {c[0]: c for c in report.claims(st)}
    assert cl["hold"][3] == "**confirmed**" and "met on 4 of 4 runs" in cl["hold"][2]
    assert "(paper's controller 0.0%)" in cl["hold"][2]
    assert cl["hold_grpo"][3] == "**confirmed**" and "seed5 0.70" in cl["hold_grpo"][2]
    text = report.write(data, tmp_path / "out").read_text()
    assert "## Beyond the paper: holding 0.5 and 1.5 x H0 at the default run's length" in text
    assert "20 or 100 steps" in text
    row = next(line for line in text.splitlines() if line.startswith("| seed5 | 0.5 |"))
    assert "| 10.0% |" in row
    # the option off its target on seed 6 at 0.5 x H0, GRPO not collapsed on seed 5
    miss = next(r for r in data["runs"] if r["name"] == "hold-t0p5-s6")
    miss["series"]["entropy"] = [0.4] * 100
    g5 = next(r for r in data["runs"] if r["name"] == "hold-grpo-s5")
    g5["series"]["entropy"] = [0.4] * 100
    st = report.Study(data)
    cl = {c[0]: c for c in report.claims(st)}
    assert cl["hold"][3] == "**partly**" and "met on 3 of 4 runs" in cl["hold"][2]
    assert cl["hold_grpo"][3] == "**partly**" and "seed5 1.00" in cl["hold_grpo"][2]
    why = report.why_section(report.claims(st), st)
    assert "AEPO proportional 0.5 x H0 on seed6: 50 of its 50 second-half steps above the band" in why
    assert "GRPO on seed5 ends at 1.00 x H0 after 100 steps" in why and "GRPO on seed6" not in why
