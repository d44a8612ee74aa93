#!/usr/bin/env python
"""The reproduction study: run the paper's grid on the built-in task and write a report.

    python tools/reproduce.py [--quick] --out docs/results [--work runs/reproduce] [--workers 2]
    python tools/reproduce.py --plan          # print the grid and its estimated time, run nothing
    python tools/reproduce.py --report-only --out docs/results   # redraw from docs/results/runs.json

Every number and figure of ``OUT/README.md`` comes from runs this tool made: it builds the base
models (``tools/make_toy_base.py``), trains each run as a subprocess (``python -m aepo_jax.train``),
evaluates the final policy of each run and each base model on the toy task's held-out test split
(avg@n and the unbiased pass@k up to k = n = 256 at T = 1: a run's by its trainer's validation of
the last step, ``RUN_DIR/validation/step_N.json``, a base model's by ``python -m aepo_jax.eval``,
the same sampling and estimators; a run trained without that validation gets the latter), then
writes ``OUT/runs.json`` (every run's spec, per-step entropy / target / reward / temperature,
evaluation, wall time), the PNG figures and the README. The Appendix B checks
(``tools/appendix_b.py``, a subprocess) run on the project's own loss, entropy head and
controller.

The grid (``build_grid``): AEPO at five targets relative to the base model's entropy H0 (0.5, 0.75,
1, 1.5 and 2 x H0) under both readings (``paper``, ``mix``); GRPO, Entropy-Reg at two
coefficients, Entropy-Adv, Clip-Cov and KL-Cov (verl's defaults; full grid only) and the ablations Eq. (2) / Eq. (3) (at 1.5 x H0); AEPO at 0.5 and 1.5 x
H0 and GRPO on a weaker and a stronger base model. The full grid repeats the held-target and
baseline runs for three seeds (the seed of the run and of its base model); ``--quick`` runs one.
Beyond the paper (full grid only): ``configs/toy_hold.yaml``'s option at 0.5 and 1.5 x H0 for the default
run's 100 steps on every base with the paper's controller and GRPO at the same batch and length (the
hold group: a run may have its own step count), and the length target on the length variant;
with ``--with-pid`` also the ``pid`` budget beside the paper's controller at 0.5 and 2 x H0 (the
controller group, superseded by the hold group's option and left out of the default grid's time).

Resume: the work directory keeps every run. A run is finished when its ``result.json`` exists
and records the same spec (method, options, steps, evaluation settings): it is skipped. A run
whose training stopped part-way restarts from its latest checkpoint (the trainer resumes by
default; checkpoints every ``--checkpoint-every`` steps); one with no checkpoint yet starts from
scratch; one whose training finished but whose evaluation did not goes straight to the
evaluation. The plan printed first says which of these applies to each run.
"""

from __future__ import annotations

import argparse
import concurrent.futures as futures
import dataclasses
import datetime
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
for _p in (str(ROOT), str(ROOT / "tools")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

RESULT_FILE = "result.json"
SPEC_FILE = "spec.json"  # written when a run starts training: what its outputs are outputs of
RUNS_FILE = "runs.json"
HELDOUT_FILE = "heldout.jsonl"
# Per-step metrics kept in runs.json (all the report draws from).
SERIES_KEYS = ("entropy", "entropy_target", "reward_mean", "temperature",
               "control/signal", "control/target", "rollout/correct_length_mean",
               "policy/entropy_full_stderr")  # the step's entropy reading's own standard error
BAND = 0.10  # "held": within +-10% of the target


class ReproduceError(RuntimeError):
    pass


# --- the grid ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BaseSpec:
    """A toy base model (``tools/make_toy_base.py --seed --noise [--variant]``)."""

    name: str
    seed: int = 0
    noise: float = 0.3
    steps: int = 700
    variant: str = "default"  # the toy task variant it learns (length: a free number of opening fillers)

    def recipe(self) -> dict:
        # the default variant is left out, so the specs of the bases that predate variants read as before
        extra = {} if self.variant == "default" else {"variant": self.variant}
        return {"seed": self.seed, "noise": self.noise, "steps": self.steps, **extra}


@dataclass(frozen=True)
class RunSpec:
    """One training run: a method with its options on a base model, then the held-out evaluation.

    target: the entropy target as a multiple of H0 (``target_relative=true``), for methods with a
    controller; None for the others. options: further ``--key=value`` overrides.
    """

    name: str
    group: str  # held | baseline | robust | controller | hold | length
    base: str
    method: str
    label: str
    reading: str = "paper"
    target: float | None = None
    seed: int = 0
    options: tuple[tuple[str, str], ...] = ()
    steps: int | None = None  # training steps; None = the grid's

    def train_args(self) -> list[str]:
        args = [f"--algorithm.method={self.method}", f"--algorithm.reading={self.reading}",
                f"--train.seed={self.seed}", f"--data.seed={self.seed}"]
        if self.target is not None:
            args += [f"--algorithm.controller.target={self.target}", "--algorithm.controller.target_relative=true"]
        args += [f"--{k}={v}" for k, v in self.options]
        return args


@dataclass(frozen=True)
class EvalSpec:
    """Held-out evaluation: ``problems`` of the toy test split, ``n`` samples each at T = 1."""

    problems: int = 64
    n: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 48
    seed: int = 0

    @property
    def ks(self) -> list[int]:
        ks = [1 << p for p in range(int(math.log2(self.n)) + 1)]
        return ks if ks[-1] == self.n else [*ks, self.n]


@dataclass(frozen=True)
class Grid:
    bases: tuple[BaseSpec, ...]
    runs: tuple[RunSpec, ...]
    steps: int
    eval: EvalSpec
    checkpoint_every: int = 10
    # settings every run shares (the default toy run's, see configs/toy.yaml), as overrides
    common: tuple[tuple[str, str], ...] = (("logging.tensorboard", "false"), ("logging.console", "false"))

    def base(self, name: str) -> BaseSpec:
        for b in self.bases:
            if b.name == name:
                return b
        raise ReproduceError(f"grid: run names base {name!r}, which is not one of {[b.name for b in self.bases]}")

    def eval_for(self, base: BaseSpec) -> EvalSpec:
        """The held-out evaluation of a base and its runs: the grid's, with a token budget that fits
        the length variant's longest correct answer on that variant (so no correct answer is cut off)."""
        if base.variant == "length":
            return dataclasses.replace(self.eval, max_new_tokens=max(self.eval.max_new_tokens, LENGTH_MAX_NEW_TOKENS))
        return self.eval

    def steps_for(self, run: RunSpec) -> int:
        return run.steps or self.steps

    def run_spec_dict(self, run: RunSpec) -> dict:
        """Everything that decides a run's outputs: a stored result with another spec is stale."""
        base = self.base(run.base)
        spec = dataclasses.asdict(run)
        if spec["steps"] is None:  # left out, so the specs of the runs that predate per-run steps read as before
            del spec["steps"]
        return _plain({"run": spec, "base": base.recipe(), "steps": self.steps_for(run),
                       "eval": dataclasses.asdict(self.eval_for(base)), "common": self.common})

    def base_spec_dict(self, base: BaseSpec) -> dict:
        return _plain({"base": base.recipe(), "eval": dataclasses.asdict(self.eval_for(base))})


def _plain(obj):
    """As it reads back from JSON (tuples are lists), so a stored spec compares equal to a fresh one."""
    return json.loads(json.dumps(obj))


TARGETS = (0.5, 0.75, 1.0, 1.5, 2.0)  # multiples of H0
ENTROPY_REG_COEFS = (0.015, 0.05)  # the package default (lambda = 0.015) and a stronger one
ABLATION_TARGET = 1.5  # above H0: where GRPO's pull down has to be overcome
ROBUST_TARGETS = (0.5, 1.5)
# The controller group: budget_mode=pid with the raising budget for lowering too (docs/training.md,
# "Holding an entropy target") against the paper's controller at the lowest and highest of TARGETS
CONTROLLER_OPTION = "pid"
CONTROLLER_OPTIONS = (("algorithm.controller.budget_mode", "pid"), ("algorithm.controller.budget_down", "60"))
CONTROLLER_TARGETS = (0.5, 2.0)
# The hold group (the built-in task's bar: 0.5 and 1.5 x H0 held at the default run's length on every base):
# budget_mode=proportional with the raising budget for lowering too, and 64 prompts a step
# (configs/toy_hold.yaml: with 16 or 32 the per-step entropy reading's noise limits the share of
# steps in a +-10% band at 0.5 x H0, and the least accurate base, seed 2, learns nothing under any
# method: docs/training.md), for 100 steps (configs/toy.yaml), beside the paper's controller and
# GRPO at the same batch and length.
HOLD_OPTION = "proportional"
HOLD_PROMPTS = (("data.prompts_per_step", "64"),)
HOLD_OPTIONS = (("algorithm.controller.budget_mode", "proportional"), ("algorithm.controller.budget_down", "60"),
                *HOLD_PROMPTS)
HOLD_TARGETS = (0.5, 1.5)
HOLD_STEPS = 100
# The length group (docs/targets.md): AEPO's length target distribution on the toy task's length
# variant, at 0.7 and 1.3 x the base's mean correct length, and GRPO's drift beside it.
LENGTH_TARGETS = (0.7, 1.3)
LENGTH_MAX_NEW_TOKENS = 64  # configs/toy_length.yaml: the variant's longest correct answer is 52 tokens
LENGTH_OPTIONS = (("data.toy_variant", "length"), ("rollout.max_new_tokens", str(LENGTH_MAX_NEW_TOKENS)))
# the length target's settings (configs/toy_length.yaml, docs/targets.md): the pid controller (the paper's
# full-budget switch overshoots: a lowered filler count does not come back), 16 positives a side, alpha 3
LENGTH_CONTROL = (("algorithm.controller.signal", "length"), ("algorithm.controller.budget_mode", "pid"),
                  ("algorithm.controller.budget_up", "16"), ("algorithm.controller.budget_down", "16"),
                  ("algorithm.alpha", "3"))


def _num(x: float) -> str:
    return f"{x:g}".replace(".", "p")


def build_grid(quick: bool, *, steps: int | None = None, eval_problems: int | None = None, eval_n: int = 256,
               seeds: Sequence[int] | None = None, pid_group: bool = False) -> Grid:
    """The study's grid. quick: one seed; full: seeds 0, 1, 2 for the held-target and baseline runs.
    pid_group: add the controller group (full grid only; superseded by the hold group's option, and
    left out by default so that the whole grid fits 90 minutes on 2 cores)."""
    seeds = tuple(seeds) if seeds is not None else ((0,) if quick else (0, 1, 2))
    steps = steps or (30 if quick else 60)
    ev = EvalSpec(problems=eval_problems or (24 if quick else 64), n=eval_n)
    bases = [BaseSpec(f"seed{s}", seed=s) for s in seeds]
    weak, strong = BaseSpec("weak", seed=0, noise=0.5), BaseSpec("strong", seed=0, noise=0.15)
    length = BaseSpec("length", seed=seeds[0], noise=0.15, variant="length")  # the variant's recipe (LengthToyBaseConfig)
    bases += [weak, strong] + ([] if quick else [length])
    # Built section by section; run in the order of _by_priority (every group with one seed first).
    runs: list[RunSpec] = []
    for i, s in enumerate(seeds):
        b = f"seed{s}"
        for t in TARGETS:
            runs.append(RunSpec(f"aepo-paper-t{_num(t)}-s{s}", "held", b, "aepo", f"AEPO (paper) {t:g} x H0",
                                reading="paper", target=t, seed=s))
        runs.append(RunSpec(f"grpo-s{s}", "baseline", b, "grpo", "GRPO", seed=s))
        for c in ENTROPY_REG_COEFS:
            runs.append(RunSpec(f"entropy_reg-l{_num(c)}-s{s}", "baseline", b, "entropy_reg", f"Entropy-Reg lambda={c:g}",
                                seed=s, options=(("algorithm.entropy_coef", str(c)),)))
        runs.append(RunSpec(f"entropy_adv-s{s}", "baseline", b, "entropy_adv", "Entropy-Adv", seed=s))
        # the covariance baselines (verl's defaults): the full grid only (--quick keeps its time budget)
        for m, lab in (() if quick else (("clip_cov", "Clip-Cov"), ("kl_cov", "KL-Cov"))):
            runs.append(RunSpec(f"{m}-s{s}", "baseline", b, m, lab, seed=s))
        for m, lab in (("ablation_eq2", "Eq. (2): REINFORCE on T = 1 samples"),
                       ("ablation_eq3", "Eq. (3): temperature samples, GRPO advantages")):
            runs.append(RunSpec(f"{m}-t{_num(ABLATION_TARGET)}-s{s}", "baseline", b, m, f"{lab}, {ABLATION_TARGET:g} x H0",
                                target=ABLATION_TARGET, seed=s))
        if i == 0:
            for t in ROBUST_TARGETS:
                for base in (weak, strong):
                    runs.append(RunSpec(f"{base.name}-aepo-t{_num(t)}", "robust", base.name, "aepo",
                                        f"AEPO {t:g} x H0 ({base.name} base)", target=t))
            for base in (weak, strong):
                runs.append(RunSpec(f"{base.name}-grpo", "robust", base.name, "grpo", f"GRPO ({base.name} base)"))
        for t in TARGETS:
            runs.append(RunSpec(f"aepo-mix-t{_num(t)}-s{s}", "held", b, "aepo", f"AEPO (mix) {t:g} x H0",
                                reading="mix", target=t, seed=s))
    # The controller group, last (the study's own rows come first): the option that holds a target
    # (budget_mode=pid, budget_down=60) at the lowest and highest target on every base, each compared with the
    # paper's controller at the same target (the held and robust groups' rows, plus the paper at
    # 2 x H0 on the weak and strong bases, which the robust group does not run). Full grid only and
    # on request (--with-pid): the hold group's option holds its targets where pid did not (8 runs,
    # 12 CPU-min of the grid's time budget).
    if pid_group and not quick:
        for s in seeds[:1]:
            for t in CONTROLLER_TARGETS:
                runs.append(RunSpec(f"{CONTROLLER_OPTION}-t{_num(t)}-s{s}", "controller", f"seed{s}", "aepo",
                                    f"AEPO {CONTROLLER_OPTION} {t:g} x H0", target=t, seed=s, options=CONTROLLER_OPTIONS))
        for base in (weak, strong):
            for t in CONTROLLER_TARGETS:
                runs.append(RunSpec(f"{base.name}-{CONTROLLER_OPTION}-t{_num(t)}", "controller", base.name, "aepo",
                                    f"AEPO {CONTROLLER_OPTION} {t:g} x H0 ({base.name} base)", target=t,
                                    options=CONTROLLER_OPTIONS))
            for t in CONTROLLER_TARGETS:
                if t not in ROBUST_TARGETS:
                    runs.append(RunSpec(f"{base.name}-aepo-t{_num(t)}", "controller", base.name, "aepo",
                                        f"AEPO {t:g} x H0 ({base.name} base)", target=t))
    # The hold group (full grid only): the option at 0.5 and 1.5 x H0 and GRPO at the same batch and
    # the default run's length on every seed's base; the paper's controller beside it at 0.5 x H0 (the
    # target it misses) on the first seed, and the option at 0.5 x H0 on the weak and strong bases.
    # A run trains for about 300 CPU-s (100 steps of 64 prompts; a 60-step grid run about 90), so the
    # group is kept to these 12.
    if not quick:
        for i, s in enumerate(seeds):
            for t in HOLD_TARGETS:
                runs.append(RunSpec(f"hold-t{_num(t)}-s{s}", "hold", f"seed{s}", "aepo", f"AEPO {HOLD_OPTION} {t:g} x H0",
                                    target=t, seed=s, options=HOLD_OPTIONS, steps=HOLD_STEPS))
            if i == 0:
                runs.append(RunSpec(f"hold-paper-t0p5-s{s}", "hold", f"seed{s}", "aepo", "AEPO (paper) 0.5 x H0",
                                    target=0.5, seed=s, options=HOLD_PROMPTS, steps=HOLD_STEPS))
            runs.append(RunSpec(f"hold-grpo-s{s}", "hold", f"seed{s}", "grpo", "GRPO", seed=s, options=HOLD_PROMPTS,
                                steps=HOLD_STEPS))
        for base in (weak, strong):
            runs.append(RunSpec(f"{base.name}-hold-t0p5", "hold", base.name, "aepo",
                                f"AEPO {HOLD_OPTION} 0.5 x H0 ({base.name} base)", target=0.5, options=HOLD_OPTIONS,
                                steps=HOLD_STEPS))
    # The length group, after it (beyond the paper, Section 7): AEPO's length target on the toy task's
    # length variant and GRPO's length drift beside it, one seed. Full grid only (--quick keeps its
    # time budget).
    if not quick:
        for t in LENGTH_TARGETS:
            runs.append(RunSpec(f"length-aepo-l{_num(t)}", "length", length.name, "aepo", f"AEPO length {t:g} x L0",
                                target=t, options=(*LENGTH_OPTIONS, *LENGTH_CONTROL)))
        runs.append(RunSpec("length-grpo", "length", length.name, "grpo", "GRPO (length variant)", options=LENGTH_OPTIONS))
    return Grid(tuple(bases), tuple(_by_priority(runs, seeds[0])), steps, ev)


def _by_priority(runs: Sequence[RunSpec], first_seed: int) -> list[RunSpec]:
    """The order the grid runs in, so that a grid stopped part-way (a deadline, a crash) has covered
    every group with one seed: the first seed's study rows (paper reading, baselines, robustness),
    the controller and length groups' rows on the first seed's and the weak/strong bases, the first
    seed's 'mix' reading, then the other seeds' rows. Stable within each class."""

    def rank(r: RunSpec) -> int:
        if r.group == "hold":  # the built-in task's bar, on every seed
            return 1
        if r.seed != first_seed:
            return 4
        if r.group in ("controller", "length"):
            return 1
        if r.reading == "mix":
            return 2
        return 0

    return sorted(runs, key=rank)


def grid_from_json(path: str | Path) -> Grid:
    """A custom grid (tests, partial studies): ``{"steps", "eval": {...}, "bases": [...], "runs": [...]}``."""
    try:
        d = json.loads(Path(path).read_text())
        bases = tuple(BaseSpec(**b) for b in d["bases"])
        runs = tuple(RunSpec(**{**r, "options": tuple(tuple(o) for o in r.get("options", ()))}) for r in d["runs"])
        grid = Grid(bases, runs, int(d["steps"]), EvalSpec(**d.get("eval", {})), int(d.get("checkpoint_every", 10)))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ReproduceError(f"--grid {path}: {e}") from None
    for r in runs:
        grid.base(r.base)
    return grid


# --- state of the work directory ------------------------------------------------------------------


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def write_json(path: Path, obj: Any) -> None:
    """Atomically (a reader, or a resumed study, never sees half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    tmp.replace(path)


def base_complete(path: Path, base: BaseSpec) -> bool:
    info = read_json(path / "toy_base.json")
    if not isinstance(info, dict) or not (path / "model.safetensors").is_file():
        return False
    recipe = info.get("recipe", {})
    return all(recipe.get(k) == v for k, v in base.recipe().items())


def latest_checkpoint_step(run_dir: Path) -> int | None:
    d = run_dir / "checkpoints"
    steps = [int(p.name) for p in d.iterdir() if p.is_dir() and p.name.isdigit()] if d.is_dir() else []
    return max(steps) if steps else None


def run_state(run_dir: Path, spec: dict, steps: int) -> str:
    """finished | stale (outputs of another spec: redone from scratch) | evaluate (training done) |
    resume@STEP | restart (outputs, no checkpoint) | new."""
    res = read_json(run_dir / RESULT_FILE)
    if isinstance(res, dict) and res.get("spec") == spec and res.get("complete"):
        return "finished"
    # a grid edited after a run trained (other options, base, steps): its checkpoints and weights belong
    # to the old spec, so they must neither be resumed nor evaluated as the new one's
    started = read_json(run_dir / SPEC_FILE)
    if (isinstance(started, dict) and started != spec) or (isinstance(res, dict) and res.get("spec") != spec):
        return "stale"
    last = latest_checkpoint_step(run_dir)
    if last is not None and last >= steps and final_weights(run_dir, steps) is not None:
        return "evaluate"
    if last is not None:
        return f"resume@{last}"
    if run_dir.exists():
        return "restart"
    return "new"


def _unused_path(p: Path) -> Path:
    k = 1
    while (q := p.with_name(f"{p.name}{k}")).exists():
        k += 1
    return q


def final_weights(run_dir: Path, steps: int) -> Path | None:
    """The final policy as an HF directory: the trainer's last weight sync (``rollout.sync_dir``)."""
    p = run_dir / "weights" / f"weights_v{steps}"
    return p if (p / "config.json").is_file() and any(p.glob("*.safetensors")) else None


def read_metrics(run_dir: Path) -> list[dict]:
    """metrics.jsonl rows (the last row of each step; torn lines skipped)."""
    rows: dict[int, dict] = {}
    path = run_dir / "metrics.jsonl"
    if path.is_file():
        for line in path.read_text(errors="replace").splitlines():
            try:
                r = json.loads(line)
            except ValueError:
                continue
            if isinstance(r, dict) and isinstance(r.get("step"), int):
                rows[r["step"]] = r
    return [rows[k] for k in sorted(rows)]


# --- running ---------------------------------------------------------------------------------------


@dataclass
class Env:
    work: Path
    python: str = sys.executable
    log: Callable[[str], None] = print
    cpus: tuple[int, ...] = field(default_factory=lambda: tuple(sorted(os.sched_getaffinity(0))) if hasattr(os, "sched_getaffinity") else (0,))

    def environ(self) -> dict:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        return env


_CHILDREN: set[int] = set()
_CHILDREN_LOCK = threading.Lock()
_STOPPING = threading.Event()


def stop_children(signum=None, frame=None) -> None:  # noqa: ARG001 - a signal handler
    """SIGTERM / Ctrl-C: stop every running job's process group (a trainer saves nothing more and
    stops its server; its last checkpoint stays for the next invocation to resume from), then exit."""
    import signal  # noqa: PLC0415

    _STOPPING.set()
    with _CHILDREN_LOCK:
        pids = list(_CHILDREN)
    for pid in pids:
        try:
            os.killpg(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    print(f"stopping: {len(pids)} job(s) signalled; the same command resumes the grid", file=sys.stderr, flush=True)
    raise SystemExit(130)


def _run(cmd: list[str], log_path: Path, env: Env, *, cpu: int | None = None, check: bool = True) -> tuple[float, float]:
    """Run ``cmd``, its output appended to ``log_path``; raise naming the log on failure.

    Returns (wall seconds, CPU seconds of the process and the children it waited for: the
    trainer's embedded server included). CPU time is what extrapolates to another machine's load.
    """
    if _STOPPING.is_set():
        raise ReproduceError("stopped")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    pre = (lambda: os.sched_setaffinity(0, {cpu})) if cpu is not None and hasattr(os, "sched_setaffinity") else None
    with open(log_path, "a") as f:
        f.write(f"\n$ {' '.join(cmd)}\n")
        f.flush()
        # its own process group, so stop_children() signals a trainer and its embedded server together;
        # the same session (not start_new_session): a new session is a new scheduler autogroup, and
        # every job would then compete with other users' whole sessions instead of sharing ours
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env.environ(),
                                cwd=str(ROOT), preexec_fn=pre, process_group=0)
        with _CHILDREN_LOCK:
            _CHILDREN.add(proc.pid)
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        finally:
            with _CHILDREN_LOCK:
                _CHILDREN.discard(proc.pid)
        proc.returncode = os.waitstatus_to_exitcode(status)
        if _STOPPING.is_set():
            raise ReproduceError("stopped")
    if proc.returncode != 0 and check:
        tail = log_path.read_text(errors="replace").strip().splitlines()[-5:]
        raise ReproduceError(f"{' '.join(cmd[1:3])} exited with {proc.returncode}; log {log_path}:\n  " + "\n  ".join(tail))
    return time.time() - t0, usage.ru_utime + usage.ru_stime


_HELDOUT_LOCK = threading.Lock()


def heldout_file(work: Path, ev: EvalSpec) -> Path:
    """The first ``ev.problems`` problems of the toy task's test split (disjoint from the training
    problems the trainer uses), in the JSONL layout ``python -m aepo_jax.eval`` reads."""
    from aepo_jax.data import toy_task  # noqa: PLC0415

    path = work / f"heldout-{ev.problems}.jsonl"
    # one writer: jobs evaluating at the same time (two base models) would otherwise both write the
    # same temporary file and the second rename fails
    with _HELDOUT_LOCK:
        if not path.is_file():
            _, test = toy_task.make_splits(0, 4096, 256)
            if ev.problems > len(test):
                raise ReproduceError(f"eval problems: {ev.problems} > the test split's {len(test)}")
            toy_task.write_jsonl(toy_task.to_records(test[: ev.problems]), path)
    return path


def evaluate(model: Path, out: Path, ev: EvalSpec, env: Env, log_path: Path) -> tuple[dict, tuple[float, float]]:
    cmd = [env.python, "-m", "aepo_jax.eval", "--model-path", str(model), "--data", str(heldout_file(env.work, ev)),
           "--reward", "toy", "--n", str(ev.n), "--k", ",".join(map(str, ev.ks)), "--temperature", str(ev.temperature),
           "--top-p", str(ev.top_p), "--max-new-tokens", str(ev.max_new_tokens), "--seed", str(ev.seed),
           "--output", str(out)]
    secs = _run(cmd, log_path, env)
    rep = read_json(out)
    if not isinstance(rep, dict) or not rep.get("benchmarks"):
        raise ReproduceError(f"evaluation of {model} wrote no report to {out}")
    return _eval_json(next(iter(rep["benchmarks"].values()))), secs


def _eval_json(bench: dict) -> dict:
    """The study's record of one evaluation, from a benchmark summary of ``python -m aepo_jax.eval``'s
    report layout (which the trainer's validation reports share)."""
    return {"avg_at_n": bench["avg_at_n"], "pass_at_k": bench["pass_at_k"], "n": bench["n"],
            "problems": bench["num_problems"], "entropy_nll": bench.get("mean_token_nll"),
            "response_tokens": bench.get("mean_response_tokens"),
            "per_problem_correct": bench.get("per_problem_correct")}


def final_validation_args(ev: EvalSpec, steps: int, heldout: Path) -> list[str]:
    """Trainer options that evaluate the final policy inside the run, exactly as ``evaluate`` would
    (the same sampling and estimators, the same held-out file, reward and seed): one process a run
    instead of two, which saves the second one's start-up (about 9 CPU-s a run)."""
    return [f"--eval.every={steps}", "--eval.before_train=false", f"--eval.files={heldout}", f"--eval.n={ev.n}",
            f"--eval.k={','.join(map(str, ev.ks))}", f"--eval.temperature={ev.temperature}", f"--eval.top_p={ev.top_p}",
            f"--eval.max_new_tokens={ev.max_new_tokens}", f"--eval.seed={ev.seed}"]


def read_final_validation(run_dir: Path, steps: int, ev: EvalSpec) -> dict | None:
    """The run's validation of its last step (``RUN_DIR/validation/step_N.json``) when it was made with
    ``ev``'s settings; None otherwise (then the separate evaluation runs)."""
    # the trainer's documented layout (aepo_jax.trainer.validation.report_path, not imported: it brings
    # jax into this process, which only forks others)
    rep = read_json(run_dir / "validation" / f"step_{steps}.json")
    if not isinstance(rep, dict) or len(rep.get("benchmarks") or {}) != 1:
        return None
    st = rep.get("settings") or {}
    want = {"n": ev.n, "ks": ev.ks, "temperature": ev.temperature, "top_p": ev.top_p,
            "max_new_tokens": ev.max_new_tokens, "seed": ev.seed}
    if any(st.get(k) != v for k, v in want.items()):
        return None
    bench = next(iter(rep["benchmarks"].values()))
    return _eval_json(bench) if bench.get("num_problems") == ev.problems else None


def build_base(grid: Grid, base: BaseSpec, env: Env, cpu: int | None) -> dict:
    """Build (unless complete) and evaluate a base model; result.json marks it finished."""
    d = env.work / "bases" / base.name
    spec = grid.base_spec_dict(base)
    res = read_json(d / RESULT_FILE)
    if isinstance(res, dict) and res.get("spec") == spec and res.get("complete"):
        return res
    log_path = env.work / "logs" / f"base-{base.name}.log"
    build = (0.0, 0.0)
    if not base_complete(d / "model", base):
        env.log(f"[base {base.name}] building (seed {base.seed}, noise {base.noise})")
        if (d / "model").exists():
            shutil.rmtree(d / "model")
        variant = [] if base.variant == "default" else ["--variant", base.variant]
        build = _run([env.python, str(ROOT / "tools" / "make_toy_base.py"), "--seed", str(base.seed), "--noise",
                      str(base.noise), "--steps", str(base.steps), *variant, "--out", str(d / "model")], log_path, env, cpu=cpu)
    env.log(f"[base {base.name}] evaluating")
    ev, evs = evaluate(d / "model", d / "eval.json", grid.eval_for(base), env, log_path)
    info = read_json(d / "model" / "toy_base.json") or {}
    res = {"spec": spec, "complete": True, "name": base.name, "recipe": base.recipe(), "eval": ev,
           "teacher_forced": info.get("teacher_forced_test"),
           "wall_s": {"build": build[0], "eval": evs[0]}, "cpu_s": {"build": build[1], "eval": evs[1]}}
    write_json(d / RESULT_FILE, res)
    env.log(f"[base {base.name}] done: pass@1 {ev['avg_at_n']:.3f}, build {build[0]:.0f} s, eval {evs[0]:.0f} s")
    return res


def train_and_eval(grid: Grid, run: RunSpec, env: Env) -> dict:
    if _STOPPING.is_set():  # a queued job after Ctrl-C: touch nothing
        raise ReproduceError("stopped")
    d = env.work / "runs" / run.name
    spec = grid.run_spec_dict(run)
    steps = grid.steps_for(run)
    state = run_state(d, spec, steps)
    if state == "finished":
        return read_json(d / RESULT_FILE)
    log_path = env.work / "logs" / f"{run.name}.log"
    base_dir = env.work / "bases" / run.base / "model"
    train = (0.0, 0.0)
    ev_spec = grid.eval_for(grid.base(run.base))
    if state == "stale":  # kept beside, not deleted: the old outputs may still be wanted
        old = _unused_path(d.with_name(f"{d.name}.stale"))
        d.rename(old)
        env.log(f"[{run.name}] outputs of another spec moved to {old.name}")
        state = "new"
    if state != "evaluate":
        if state == "restart":  # outputs without a checkpoint: nothing to resume, start clean
            shutil.rmtree(d)
        if state in ("new", "restart"):
            write_json(d / SPEC_FILE, spec)
        how = "from scratch" if state in ("new", "restart") else f"resuming from its checkpoint at step {state[7:]}"
        env.log(f"[{run.name}] training {how}")
        cmd = [env.python, "-m", "aepo_jax.train", f"--model.path={base_dir}", f"--train.run_dir={d}",
               f"--train.steps={steps}", f"--checkpoint.every={grid.checkpoint_every}", "--checkpoint.keep=1",
               f"--rollout.sync_dir={d / 'weights'}", *[f"--{k}={v}" for k, v in grid.common], *run.train_args(),
               *final_validation_args(ev_spec, steps, heldout_file(env.work, ev_spec))]
        train = _run(cmd, log_path, env)
    weights = final_weights(d, steps)
    if weights is None:
        raise ReproduceError(f"[{run.name}] training ended without the final weights {d / 'weights'}/weights_v{steps}")
    rows = read_metrics(d)
    if len(rows) < steps:
        raise ReproduceError(f"[{run.name}] metrics.jsonl has {len(rows)} steps, expected {steps}")
    ev = read_final_validation(d, steps, ev_spec)
    if ev is not None:  # the trainer's own validation of its last step
        last = rows[-1]
        evs = (float(last.get("timing_s/validation") or 0.0), float(last.get("perf/validation_cpu_s") or 0.0))
        if state != "evaluate":  # trained (and so validated) in this invocation: its time out of the training's
            train = (max(0.0, train[0] - evs[0]), max(0.0, train[1] - evs[1]))
    else:  # trained before the trainer validated (a resume past its last step, older outputs)
        env.log(f"[{run.name}] evaluating")
        ev, evs = evaluate(weights, d / "eval.json", ev_spec, env, log_path)
    series = {k: [r.get(k) for r in rows] for k in SERIES_KEYS}
    res = {"spec": spec, "complete": True, "name": run.name, "run": dataclasses.asdict(run), "steps": [r["step"] for r in rows],
           "series": series, "eval": ev, "resumed_from": state,
           "wall_s": {"train": train[0], "eval": evs[0]}, "cpu_s": {"train": train[1], "eval": evs[1]},
           "step_s_median": _median([r.get("timing_s/step") for r in rows[1:]])}
    write_json(d / RESULT_FILE, res)
    s = summarize_run(res)
    env.log(f"[{run.name}] done: H0 {s['h0']:.3f}, end entropy {s['h_end']:.3f}"
            + (f", held {100 * s['held']:.0f}%" if s["held"] is not None else "")
            + f", pass@1 {ev['avg_at_n']:.3f}; train {train[0]:.0f} s ({train[1]:.0f} CPU-s), eval {evs[0]:.0f} s")
    return res


def _finished(d: Path, spec: dict) -> dict | None:
    res = read_json(d / RESULT_FILE)
    return res if isinstance(res, dict) and res.get("spec") == spec and res.get("complete") else None


def _median(xs) -> float | None:
    xs = sorted(x for x in xs if isinstance(x, (int, float)))
    return xs[len(xs) // 2] if xs else None


# --- the plan ----------------------------------------------------------------------------------------

# CPU-seconds (user + system, the trainer's embedded server included) measured on the 2-core
# machine (AMD EPYC, see the report's "Time" section); wall time on an idle machine is about the
# CPU time over the cores used. The plan scales them by the grid's steps and evaluation size, or
# uses this study's own finished runs once there are some.
EST_BASE_BUILD_CPU_S = 75.0
EST_TRAIN_START_CPU_S = 15.0
EST_STEP_CPU_S = 0.75  # a step of the default run (16 prompts x 8 samples): 0.74 measured (below)
DEFAULT_PROMPTS_PER_STEP = 16  # configs/toy.yaml
EST_EVAL_START_CPU_S = 9.0
EST_EVAL_SAMPLE_CPU_S = 1.0e-3
# share of 2 cores two jobs keep busy: 0.955 measured over the whole default grid in one invocation
# (150 CPU-min of jobs in 78.6 min from an empty work directory and compilation cache); 0.73-0.96
# in earlier passes beside other jobs
PARALLEL_EFFICIENCY = 0.95


# The share of a default step's cost that does not grow with the prompts (dispatch, the controller's
# reading, the optimizer, the weight sync). Measured in the committed study (training CPU-s less
# EST_TRAIN_START_CPU_S, over the steps): 0.74 CPU-s a step with 16 prompts (mean of 56 60-step
# runs), 2.53 with 64 (the 12 hold runs): 0.15 + 0.037 per prompt.
STEP_FIXED_SHARE = 0.2


def _work_units(steps: int, options) -> float:
    """A run's training work in units of a default step (16 prompts): a step with P prompts costs
    STEP_FIXED_SHARE + (1 - STEP_FIXED_SHARE) x P / 16 of a default one."""
    prompts = dict(map(tuple, options or ())).get("data.prompts_per_step")
    p = int(prompts) if prompts else DEFAULT_PROMPTS_PER_STEP
    return steps * (STEP_FIXED_SHARE + (1 - STEP_FIXED_SHARE) * p / DEFAULT_PROMPTS_PER_STEP)


def estimate(grid: Grid, todo_runs: Sequence[RunSpec], todo_bases: Sequence[BaseSpec], workers: int,
             measured: Sequence[dict] = (), cores: int = 2) -> dict:
    """CPU-seconds of what is left and the wall time they take on ``cores`` otherwise idle cores.
    Training scales with each run's steps and prompts a step (:func:`_work_units`)."""
    # a run's evaluation is its trainer's validation of the last step; a base model's is a process of its own
    per_eval = EST_EVAL_SAMPLE_CPU_S * grid.eval.problems * grid.eval.n
    base_eval = EST_EVAL_START_CPU_S + per_eval
    start, per_unit = EST_TRAIN_START_CPU_S, EST_STEP_CPU_S
    source = "built-in per-step estimate"
    done = [m for m in measured if m.get("cpu_s", {}).get("train")]
    if done:  # this study's own runs: the start-up stays the built-in estimate, the rest per unit of work
        per_unit = _mean([max(0.0, m["cpu_s"]["train"] - start) / _work_units(len(m["steps"]), m["run"].get("options"))
                          for m in done])
        per_eval = _mean([m["cpu_s"]["eval"] for m in done])
        source = f"mean of {len(done)} finished run(s) of this study"
    costs = [start + per_unit * _work_units(grid.steps_for(r), r.options) + per_eval for r in todo_runs]
    per_run = start + per_unit * grid.steps + per_eval
    cpu = sum(costs) + len(todo_bases) * (EST_BASE_BUILD_CPU_S + base_eval)
    used = min(max(1, workers), cores) * (PARALLEL_EFFICIENCY if workers > 1 else 1.0)
    return {"per_run_cpu_s": per_run, "cpu_s": cpu, "wall_s": cpu / used, "source": source, "workers": workers}


def print_plan(grid: Grid, env: Env, workers: int, out=print) -> dict:
    states = {}
    for b in grid.bases:
        res = read_json(env.work / "bases" / b.name / RESULT_FILE)
        ok = isinstance(res, dict) and res.get("spec") == grid.base_spec_dict(b) and res.get("complete")
        states[("base", b.name)] = "finished" if ok else ("evaluate" if base_complete(env.work / "bases" / b.name / "model", b) else "build")
    measured = []
    for r in grid.runs:
        d = env.work / "runs" / r.name
        states[("run", r.name)] = run_state(d, grid.run_spec_dict(r), grid.steps_for(r))
        res = read_json(d / RESULT_FILE)
        if isinstance(res, dict) and res.get("complete") and res.get("resumed_from") in ("new", "restart"):
            measured.append(res)
    todo_runs = [r for r in grid.runs if states[("run", r.name)] != "finished"]
    todo_bases = [b for b in grid.bases if states[("base", b.name)] == "build"]
    est = estimate(grid, todo_runs, todo_bases, workers, measured)
    out(f"plan: {len(grid.bases)} base models, {len(grid.runs)} runs of {grid.steps} steps, evaluation "
        f"{grid.eval.problems} held-out problems x {grid.eval.n} samples (pass@k, k = 1..{grid.eval.n}), {workers} worker(s)")
    for b in grid.bases:
        out(f"  base {b.name:<10} seed {b.seed} noise {b.noise:<5} {states[('base', b.name)]}")
    for r in grid.runs:
        st = states[("run", r.name)]
        what = {"finished": "finished: skipped", "evaluate": "trained: evaluate only", "new": "new",
                "restart": "outputs without a checkpoint: restart from scratch",
                "stale": "outputs of another spec: moved aside, run from scratch"}.get(st, f"half-done: resume from checkpoint step {st[7:]}")
        out(f"  run  {r.name:<28} {r.label:<48} {what}")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    out(f"estimated time: {est['wall_s'] / 60:.0f} min on 2 otherwise idle cores for {len(todo_runs)} run(s) and "
        f"{len(todo_bases)} base build(s): {est['cpu_s'] / 60:.0f} CPU-min, {est['per_run_cpu_s']:.0f} CPU-s a run "
        f"({est['source']}); load average now {load:.1f}: with other jobs running it takes longer")
    return est


def run_grid(grid: Grid, env: Env, workers: int) -> tuple[list[dict], list[dict], list[str]]:
    """Every base model (each build pinned to its own core) and every run; a run starts as soon as
    its base model is ready. Failures are collected and reported; the rest of the grid goes on."""
    errors: list[str] = []
    with futures.ThreadPoolExecutor(max(1, workers)) as pool:
        # Bases are queued first: a run job waits for its base only after every base job has
        # left the queue (FIFO), so waiting never starves a build of a worker.
        base_jobs = {b.name: pool.submit(build_base, grid, b, env, env.cpus[i % len(env.cpus)])
                     for i, b in enumerate(grid.bases)}

        def run_job(run: RunSpec) -> dict:
            try:
                base_jobs[run.base].result()
            except Exception:  # noqa: BLE001 - reported once, under the base
                raise ReproduceError(f"its base model {run.base} failed") from None
            return train_and_eval(grid, run, env)

        run_jobs = {r.name: pool.submit(run_job, r) for r in grid.runs}
        bases, runs = [], []
        for name, f in base_jobs.items():
            try:
                bases.append(f.result())
            except Exception as e:  # noqa: BLE001
                errors.append(f"base {name}: {e}")
                env.log(f"FAILED base {name}: {e}")
        for name, f in run_jobs.items():
            try:
                runs.append(f.result())
            except Exception as e:  # noqa: BLE001
                errors.append(f"run {name}: {e}")
                env.log(f"FAILED {name}: {e}")
    return bases, runs, errors


# --- summaries -----------------------------------------------------------------------------------------


def _finite(xs) -> list[float]:
    return [float(x) for x in xs if isinstance(x, (int, float)) and math.isfinite(x)]


def _mean(xs) -> float:
    xs = _finite(xs)
    return sum(xs) / len(xs) if xs else float("nan")


def summarize_run(res: dict) -> dict:
    """Per-run numbers: H0 (step 1), end entropy and reward (mean of the last 10% of steps), the
    share of the second half of the steps within +-10% of the target, first step in the band."""
    s = res["series"]
    h, tgt, rew = s["entropy"], s["entropy_target"], s["reward_mean"]
    n = len(h)
    tail = max(1, n // 10)
    half = n // 2
    has_target = res["run"].get("target") is not None and any(isinstance(t, (int, float)) and t > 0 for t in tgt)
    held = first = None
    if has_target:
        pairs = [(hh, tt) for hh, tt in zip(h[half:], tgt[half:]) if isinstance(hh, (int, float)) and isinstance(tt, (int, float)) and tt > 0]
        held = sum(abs(hh - tt) <= BAND * tt for hh, tt in pairs) / len(pairs) if pairs else 0.0
        first = next((res["steps"][i] for i, (hh, tt) in enumerate(zip(h, tgt))
                      if isinstance(hh, (int, float)) and isinstance(tt, (int, float)) and tt > 0 and abs(hh - tt) <= BAND * tt), None)
    h0 = float(h[0]) if h and isinstance(h[0], (int, float)) else float("nan")
    return {
        "name": res["name"], "h0": h0, "target": _mean(tgt[half:]) if has_target else None,
        "h_end": _mean(h[-tail:]), "h_min": min(_finite(h)), "h_max": max(_finite(h)),
        "held": held, "first_in_band": first, "reward_start": _mean(rew[: max(1, min(5, n))]), "reward_end": _mean(rew[-tail:]),
        "pass1": res["eval"]["avg_at_n"], "passk": {int(k): v for k, v in res["eval"]["pass_at_k"].items()},
        "eval_entropy": res["eval"].get("entropy_nll"),
        "reading_se": _reading_se(s, half) if has_target else None,
    }


def _reading_se(series: dict, half: int) -> float | None:
    """The entropy reading's standard error over the target, mean of the second half; None for a run
    stored without it (runs made before the series kept it)."""
    ratios = [e / t for e, t in zip((series.get("policy/entropy_full_stderr") or [])[half:], series["entropy_target"][half:])
              if isinstance(e, (int, float)) and isinstance(t, (int, float)) and t > 0]
    return _mean(ratios) if ratios else None


LENGTH_HELD_SHARE = 0.8  # issue 13's bar for the length target: >= 80% of the second half within +-10%


def summarize_length(res: dict) -> dict:
    """A length-group run's numbers: L0 (the mean correct length at step 1), the mean correct length
    at the start (steps 1-5) and at the end (the last 10% of steps), the length target (mean over the
    second half; None without a length controller), the share of the second half within +-10% of it
    (``control/signal`` against ``control/target``, the controller's own reading), reward and pass@1."""
    s = res["series"]
    length = s.get("rollout/correct_length_mean") or []
    signal, target = s.get("control/signal") or [], s.get("control/target") or []
    rew = s["reward_mean"]
    n = len(rew)
    tail, half = max(1, n // 10), n // 2
    controlled = res["run"].get("target") is not None and dict(map(tuple, res["run"].get("options", ()))).get(
        "algorithm.controller.signal") == "length"
    held = None
    if controlled:
        pairs = [(x, t) for x, t in zip(signal[half:], target[half:])
                 if isinstance(x, (int, float)) and isinstance(t, (int, float)) and t > 0]
        held = sum(abs(x - t) <= BAND * t for x, t in pairs) / len(pairs) if pairs else 0.0
    l0 = next((float(x) for x in length if isinstance(x, (int, float))), float("nan"))
    return {"name": res["name"], "l0": l0, "target": _mean(target[half:]) if controlled else None,
            "len_start": _mean(length[: max(1, min(5, n))]), "len_end": _mean(length[-tail:]),
            "len_min": min(_finite(length[half:]), default=float("nan")),
            "len_max": max(_finite(length[half:]), default=float("nan")), "held": held,
            "reward_start": _mean(rew[: max(1, min(5, n))]), "reward_end": _mean(rew[-tail:]),
            "pass1": res["eval"]["avg_at_n"], "response_tokens": res["eval"].get("response_tokens")}


# --- report ----------------------------------------------------------------------------------------------


def write_report(data: dict, out: Path) -> Path:
    import reproduce_report  # noqa: PLC0415  (tools/reproduce_report.py; tools/ is on sys.path)

    return reproduce_report.write(data, out)


def machine() -> dict:
    model = ""
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    return {"cpu": model or platform.processor(), "cores": os.cpu_count(), "avx512": " avx512f" in flags,
            "loadavg_end": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT,
                              check=False).stdout.strip()
    except OSError:
        return ""


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="one seed and shorter runs (about 20 min on 2 cores)")
    ap.add_argument("--out", default="docs/results", help="where README.md, the figures and runs.json go")
    ap.add_argument("--work", default="runs/reproduce", help="base models, run directories, logs (kept for resuming)")
    ap.add_argument("--workers", type=int, default=2, help="jobs at a time")
    ap.add_argument("--steps", type=int, default=0, help="steps per run (default: 30 quick, 60 full)")
    ap.add_argument("--eval-problems", type=int, default=0, help="held-out problems (default: 24 quick, 64 full)")
    ap.add_argument("--eval-n", type=int, default=256, help="samples per held-out problem (pass@k up to k = n)")
    ap.add_argument("--with-pid", action="store_true",
                    help="full grid: add the controller group (the pid budget at 0.5 and 2 x H0 on three bases, 8 runs)")
    ap.add_argument("--grid", default="", help="a grid as JSON instead of the built-in one (see grid_from_json)")
    ap.add_argument("--plan", action="store_true", help="print the plan and estimated time, run nothing")
    ap.add_argument("--report-only", action="store_true", help="rewrite the report from OUT/runs.json")
    ap.add_argument("--collect", action="store_true",
                    help="write the report from the work directory's finished runs without running anything")
    ap.add_argument("--no-theory", action="store_true", help="skip the Appendix B checks")
    args = ap.parse_args(argv)
    out = Path(args.out)
    if args.report_only:
        data = read_json(out / RUNS_FILE)
        if not isinstance(data, dict):
            print(f"error: {out / RUNS_FILE} is missing or not JSON; run the grid first (or --collect)", file=sys.stderr)
            return 2
        print(write_report(data, out))
        return 0
    try:
        grid = grid_from_json(args.grid) if args.grid else build_grid(
            args.quick, steps=args.steps or None, eval_problems=args.eval_problems or None, eval_n=args.eval_n,
            pid_group=args.with_pid)
    except ReproduceError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.time()

    lock = threading.Lock()

    def log(msg: str) -> None:
        with lock:
            print(f"{time.strftime('%H:%M:%S')} [{(time.time() - t_start) / 60:5.1f} min] {msg}", flush=True)

    env = Env(work, log=log)
    import signal  # noqa: PLC0415

    signal.signal(signal.SIGTERM, stop_children)
    signal.signal(signal.SIGINT, stop_children)
    est = print_plan(grid, env, args.workers)
    if args.plan:
        return 0
    if args.collect:
        est = {"wall_s": float("nan")}
    theory = None
    if not args.no_theory and not args.collect:
        # in a subprocess: this process only starts others (no jax here, nothing forks a jax process)
        path = env.work / "appendix_b.json"
        secs, _ = _run([env.python, str(ROOT / "tools" / "appendix_b.py"), "--json", str(path)],
                       env.work / "logs" / "appendix_b.log", env, check=False)
        theory = read_json(path)
        if isinstance(theory, dict):
            theory["wall_s"] = secs
            log(f"Appendix B checks: {theory['summary']} ({secs:.0f} s)")
        else:
            log(f"Appendix B checks wrote nothing: see {env.work / 'logs' / 'appendix_b.log'}")
    if args.collect:  # the finished runs of the work directory, nothing run
        bases = [res for b in grid.bases if (res := _finished(env.work / "bases" / b.name, grid.base_spec_dict(b)))]
        runs = [res for r in grid.runs if (res := _finished(env.work / "runs" / r.name, grid.run_spec_dict(r)))]
        errors = [f"run {r.name}: not finished when the report was written" for r in grid.runs
                  if not any(x["name"] == r.name for x in runs)]
        if theory is None:  # the checks this grid's last full invocation ran
            theory = read_json(env.work / "appendix_b.json") or (read_json(out / RUNS_FILE) or {}).get("theory")
    else:
        bases, runs, errors = run_grid(grid, env, args.workers)
    wall = time.time() - t_start
    if args.collect:
        wall = sum(r["wall_s"]["train"] + r["wall_s"]["eval"] for r in runs) / max(1, args.workers)
    data = {
        "created": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python tools/reproduce.py" + (" --quick" if args.quick else "") + (" --with-pid" if args.with_pid else "")
                   + f" --out {args.out}",
        "commit": git_commit(), "machine": machine(), "quick": args.quick, "workers": args.workers,
        "grid": {"steps": grid.steps, "eval": dataclasses.asdict(grid.eval), "targets": list(TARGETS),
                 "entropy_reg_coefs": list(ENTROPY_REG_COEFS), "ablation_target": ABLATION_TARGET,
                 "seeds": sorted({r.seed for r in grid.runs}), "n_runs": len(grid.runs), "n_bases": len(grid.bases)},
        "estimate_s": est["wall_s"], "wall_s": wall, "errors": errors, "collected": bool(args.collect),
        "bases": bases, "runs": runs, "theory": theory,
    }
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / RUNS_FILE, data)
    path = write_report(data, out)
    if args.collect:
        log(f"wrote {path} from {len(runs)} finished runs ({len(errors)} of the grid not finished)")
    else:
        log(f"wrote {path} ({len(runs)} runs, {len(errors)} failed) in {wall / 60:.1f} min")
    for e in errors:
        print(f"error: {e}", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
