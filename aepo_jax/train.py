"""``python -m aepo_jax.train``: the AEPO / GRPO / baselines RL loop.

One step is a chain of stages, each a function of the previous stage's output (each timed as
``timing_s/<stage>``); what a method does at each stage comes from its entry in the method table
(``aepo_jax/methods.py``):

1. rollout       G samples per prompt at T = 1 from the SGLang servers, scored (``reward``): a Batch
2. old_logp      (off-policy updates, or ``train.old_logp=recompute``) the learner's log pi_old and
                 full entropy H_t at T = 1 of those samples; their means are the policy's entropy
3. controller    AEPO picks T (T_high below the target, T_low above) and the positive budget, from
                 this step's entropy (stage 2, or a forward pass over these rows: ``entropy``) or,
                 with ``train.old_logp=reuse``, the previous update's forward pass
4. reg_rollout   temperature samples for a share of the prompts (AEPO and the ablations), scored;
                 the rows the method keeps (``select_reg_rows``), their old log-probs as in stage 2
5. batch         main rows with their advantages + the kept rows: the training batch (``assemble``)
6. update        epochs x mini-batches of one jitted, sharded update (micro-batches inside)
7. sync          the new weights to every server: written (safetensors on /dev/shm) by a background
                 thread while the step is logged and checkpointed and the next prompts are drawn,
                 then loaded by every server (update_weights_from_disk) before the next rollout
8. checkpoint    orbax: params, optimiser, step, data iterator, controller, every N steps

With no arguments the run uses the built-in toy task and base model and starts the embedded
SGLang-compatible server as a subprocess; ``--rollout.urls=...`` uses external SGLang servers.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from dataclasses import replace
from pathlib import Path

# Importing jax starts no backend: XLA_FLAGS (simulated host devices for --mesh on CPU-only hosts)
# and jax.distributed are read when the first backend starts, which main() makes happen only after
# setup_host_devices() and initialize_distributed(). Nothing below may touch a device at import.
import yaml

from aepo_jax import data as data_lib
from aepo_jax.compilation_cache import COMPILES, setup_compilation_cache
from aepo_jax.config import ConfigError, build_config, help_text, to_dict
from aepo_jax.entropy_control import EntropyController
from aepo_jax.methods import method_spec
from aepo_jax.models import load_pretrained
from aepo_jax.platform import setup_cli_logging, setup_host_devices
from aepo_jax.rewards import RewardPool
from aepo_jax.rollout.client import RolloutError
from aepo_jax.rollout.weight_sync import WeightSyncError
from aepo_jax.toy import base_config_for, ensure_toy_base
from aepo_jax.trainer import distributed, stages, startup, validation
from aepo_jax.trainer.batch import Batch, assemble
from aepo_jax.trainer.checkpoint import (CheckpointError, CheckpointManager, CheckpointSaveError, NonFiniteStateError,
                                         checkpoint_dir)
from aepo_jax.trainer.config import ALIASES, RunConfig, controller_config, loss_config, uses_on_policy_update, validate
from aepo_jax.trainer.learner import Learner, LearnerSpec
from aepo_jax.trainer.metrics import MetricsLogger, Timer
from aepo_jax.trainer.rollouts import Rollouts, WeightSync
from aepo_jax.trainer.startup_clock import StartupClock
from aepo_jax.trainer.targets import target_for

log = logging.getLogger("aepo_jax.train")


class Trainer:
    """Holds the run's parts; :meth:`train_step` chains the stages (``aepo_jax/trainer/stages.py``)."""

    def __init__(self, cfg: RunConfig, inputs: startup.RunInputs):
        self.startup = StartupClock()  # phases printed once, after the first step
        self.rollouts: Rollouts | None = None
        self.reward_pool = self.weights = None
        try:
            self._setup(cfg, inputs)
        except BaseException:
            if self.rollouts is not None:  # started early, while the learner initialises
                self.rollouts.kill()
            raise

    def _setup(self, cfg: RunConfig, inputs: startup.RunInputs) -> None:
        self.cfg = cfg
        self.is_main = distributed.is_main_process()
        self.run_dir = Path(cfg.train.run_dir).resolve()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.startup.mark("imports")

        # ---- model path, then the embedded server: it starts while the rest is imported and the
        # learner initialises (run() waits for it)
        # no model.path: the built-in base of the toy task's variant (data.toy_variant), built once and cached
        model_path = cfg.model.path or ensure_toy_base(cfg=base_config_for(cfg.data.toy_variant))
        self.startup.mark("model path" if cfg.model.path else "toy base")
        if not Path(model_path).is_dir():
            raise ConfigError(f"config key 'model.path': {model_path!r} is not a directory")
        self.model_path = str(Path(model_path).resolve())
        self.cfg = cfg = replace(cfg, model=replace(cfg.model, path=self.model_path))
        if self.is_main:
            self.rollouts = Rollouts(cfg, self.model_path, self.run_dir)

        # The one import not at the top: transformers imports torch when it is installed (seconds),
        # which then overlaps the embedded server's start instead of delaying it.
        from transformers import AutoTokenizer

        self.startup.mark("learner imports")
        self.mesh = inputs.mesh  # built and checked against the batch shapes by startup.check_mesh

        # ---- tokenizer and model
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path, local_files_only=True)
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        model = load_pretrained(self.model_path, dtype=cfg.model.dtype, mesh=self.mesh,
                                compute_dtype=cfg.model.compute_dtype or None, remat=cfg.model.remat)
        self.startup.mark("model load")

        # ---- data (read by startup.check_inputs)
        toy = not cfg.data.train_files
        self.load_stats = inputs.load_stats
        examples, self.prompt_stats = data_lib.tokenize_problems(
            inputs.problems, self.tokenizer,
            data_lib.PromptConfig(template=cfg.data.template, max_prompt_length=cfg.data.max_prompt_length))
        # Every process walks the same stream (process 0 samples for all of them), so the
        # iterator state is identical everywhere and a resume is exact on any topology.
        self.prompts = [list(e.prompt_ids) for e in examples]  # the rollout warm-up's lengths
        self.pipeline = data_lib.PromptPipeline(examples, data_lib.PipelineConfig(
            batch_size=cfg.data.prompts_per_step, seed=cfg.data.seed, shuffle=cfg.data.shuffle,
            process_index=0, process_count=1))

        # ---- reward
        reward = cfg.algorithm.reward
        if reward == "auto":
            reward = "toy" if toy else "math"
        self.reward_name = reward
        if self.is_main:
            cheap = reward in ("toy", "exact_match")
            self.reward_pool = RewardPool(reward, num_workers=0 if cheap else 2, timeout_s=10.0)

        # ---- method, controller, loss, learner
        self.spec = method_spec(cfg.algorithm.method, cfg.algorithm.reading)
        self.controller = EntropyController(controller_config(cfg))
        self.target = target_for(cfg.algorithm.controller.signal)  # how its regularising samples are drawn
        # On-policy (one epoch of one mini-batch): pi_old is the policy being updated, so the update
        # uses sg(log pi) and no separate forward pass runs (docs/algorithms.md, "Old log-probs").
        self.reuse_old_logp = cfg.train.old_logp == "reuse" or (
            cfg.train.old_logp == "auto" and uses_on_policy_update(cfg))
        # The controller reads the policy's entropy on this step's T = 1 rollout, measured before it
        # decides (the paper), when old log-probs are recomputed anyway or, under `auto`, when the
        # method's second rollout depends on the decision (one forward pass over the main rows only).
        # Otherwise (`reuse`, or methods without a second rollout) it reads the update's own forward
        # pass, one step behind (the authors' code), and nothing extra runs.
        self.measure_entropy = not self.reuse_old_logp or (
            cfg.train.old_logp == "auto" and self.spec.uses_reg_rollout)
        self.geo = stages.geometry(cfg, self.spec, data_size=int(self.mesh.shape["data"]),
                                   longest_prompt=max(len(e.prompt_ids) for e in examples), pad_id=pad_id)
        learner_spec = LearnerSpec(loss_name=self.spec.loss, loss=loss_config(cfg), prompt_len=self.geo.prompt_len,
                                   response_len=self.geo.response_len, logprob_chunk=cfg.model.logprob_chunk,
                                   micro_batches=self.geo.micro_batches, entropy_grad=self.spec.entropy_grad,
                                   reuse_old_logp=self.reuse_old_logp, seed=cfg.train.seed,
                                   entropy_signal=not self.measure_entropy,
                                   prefix_slots=stages.prefix_slots(cfg, data_size=int(self.mesh.shape["data"])))
        total_updates = cfg.train.steps * cfg.train.epochs * self.geo.num_minibatches
        self.learner = Learner(model, learner_spec, cfg.optim, total_updates, self.mesh)
        self.num_updates = 0
        self.start_step = 0
        self.validation_compiles = 0  # the servers' programs compiled by validations (their own shapes)
        COMPILES.install()  # counts this process's compilations (perf/compiles); idempotent
        self.weights = WeightSync(cfg, self.model_path, self.is_main)
        # Held-out sets for validation inside the loop (eval.every > 0), tokenized once.
        self.val_sets = validation.load_sets(cfg, self.tokenizer) if cfg.eval.every > 0 and self.is_main else []
        self.startup.mark("data and learner")

    def close(self) -> None:
        if self.rollouts is not None:
            self.rollouts.close()
            self.rollouts = None
        if self.reward_pool is not None:
            self.reward_pool.close()
            self.reward_pool = None
        if self.weights is not None:
            self.weights.close()
            self.weights = None

    # ------------------------------------------------------------------ the step
    def train_step(self, step: int) -> dict:
        """One RL step; returns its metrics. Every process runs it: process 0 talks to the
        servers and the reward pool, the learner's computations are collective."""
        cfg, seed = self.cfg, self.cfg.train.seed
        t0, compiles = time.perf_counter(), COMPILES.compiles
        m: dict = {}
        examples = next(self.pipeline)
        with Timer("sync", m):
            self.weights.finish(self.rollouts, m)  # the previous update's weights, written meanwhile
        main = self._rollout(examples, cfg.rollout.n, cfg.rollout.temperature, stages.step_seed(seed, step, 0),
                             "rollout", m)
        main = stages.old_logp(main, m, learner=self.learner, geo=self.geo, reuse=self.reuse_old_logp)
        decision = stages.control(main, step, m, controller=self.controller, learner=self.learner, geo=self.geo,
                                  measure=self.measure_entropy, target=self.target)
        reg = stages.reg_rollout(examples, decision, stages.step_seed(seed, step, 1), m, cfg=cfg, spec=self.spec,
                                 draw=self._rollout, target=self.target, controller=self.controller)
        reg = stages.old_logp(reg, m, learner=self.learner, geo=self.geo, reuse=self.reuse_old_logp)
        with Timer("batch", m):
            batch = assemble(self.spec, main, reg)
        self.num_updates = stages.update(batch, step, self.num_updates, m, learner=self.learner, geo=self.geo,
                                         epochs=cfg.train.epochs, seed=seed)
        stages.observe(m, controller=self.controller, measured=self.measure_entropy,
                       estimator=cfg.algorithm.controller.estimator, target=self.target)
        self.weights.begin(self.learner, step + 1)  # written in the background: synced at the next step
        tokens = float(batch.mask.sum())
        m["timing_s/step"] = time.perf_counter() - t0
        m["perf/tokens_per_s"] = tokens / max(m["timing_s/step"], 1e-9)
        m["perf/train_tokens"] = tokens
        m["perf/compiles"] = float(COMPILES.compiles - compiles)  # this process's: 0 after step 1
        return m

    def _rollout(self, examples, n: int, temperature: float, seed: int, stage: str, m: dict,
                 max_new_tokens: int | None = None) -> Batch:
        return stages.rollout(examples, n, temperature, seed, stage, m, rollouts=self.rollouts,
                              reward_pool=self.reward_pool, tokenizer=self.tokenizer, geo=self.geo,
                              max_new_tokens=max_new_tokens)

    # ------------------------------------------------------------------ checkpoints
    def _validate(self, step: int, m: dict | None = None) -> dict:
        """Validation of the policy after ``step`` (0 = the starting one): its weights reach the
        servers first (the sync :meth:`train_step` started), then process 0 samples the held-out
        sets through them. Returns the ``val/...`` metrics (empty on other processes)."""
        with Timer("sync", m if m is not None else {}):
            self.weights.finish(self.rollouts, m)
        if not self.is_main:
            return {}
        compiles0, cpu0 = self.rollouts.server_counters()
        vm = self.rollouts.loop.run_until_complete(validation.validate(
            self.rollouts.client, self.tokenizer, self.val_sets, self.reward_pool, self.cfg,
            check_samples=self.rollouts.check_weight_version, report=validation.report_path(self.run_dir, step)))
        compiles1, cpu1 = self.rollouts.server_counters()
        if compiles0 is not None:
            # validation samples shapes the training's rollouts never use (eval.n, eval.max_new_tokens):
            # its compiles are its own metric, so perf/server_compiles still says whether training compiled
            self.validation_compiles += compiles1 - compiles0
            vm["perf/validation_server_compiles"] = float(compiles1 - compiles0)
        if cpu0 is not None:  # the servers' share of the validation's cost (this process's is in vm)
            vm["perf/validation_cpu_s"] += cpu1 - cpu0
        return vm

    def _extras(self) -> dict:
        return {"controller": self.controller.to_dict(), "num_updates": self.num_updates}

    def _restore(self, ckpt) -> None:
        if ckpt.latest_step() is None or not self.cfg.train.resume:
            return
        # The newest intact step (a damaged newer one is skipped with a warning); the data
        # pipeline is restored in place.
        restored = ckpt.restore(target=self.learner.abstract_state())
        step = restored.step
        self.learner.load_state(restored.state)
        ex = restored.extras
        self.controller = EntropyController.from_dict(ex["controller"])
        self.num_updates = int(ex["num_updates"])
        self.start_step = int(step)
        log.info("resumed from %s at step %d", self.run_dir / "checkpoints", step)

    def run(self) -> Path:
        cfg = self.cfg
        if self.is_main:
            (self.run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        with CheckpointManager(checkpoint_dir(self.run_dir), save_every=cfg.checkpoint.every,
                               keep_last=cfg.checkpoint.keep, data_iterator=self.pipeline) as ckpt:
            self._restore(ckpt)
            wandb = {"project": cfg.logging.wandb_project, "name": cfg.logging.wandb_name or None,
                     "config": to_dict(cfg)} if cfg.logging.wandb_project else None
            with MetricsLogger(self.run_dir, use_tensorboard=cfg.logging.tensorboard, wandb=wandb,
                               console=cfg.logging.console, is_main_process=self.is_main,
                               resume_step=self.start_step or None,  # fresh: no line kept, step 0 loggable
                               total_steps=cfg.train.steps) as logger:
                if self.is_main:
                    self.rollouts.connect()
                embedded = self.rollouts is not None and self.rollouts.server is not None
                self.startup.mark("server start (rest)" if embedded else "servers healthy")
                if self.is_main and self.rollouts.prewarm(self.prompts, stages.rollout_calls(cfg, self.spec)):
                    self.startup.mark("rollout warm-up")
                # The servers must sample from this run's policy: the restored one on a resume, and
                # the base model on a fresh start (a long-lived server may hold another run's weights).
                self.weights.begin(self.learner, self.start_step)
                self.weights.finish(self.rollouts)
                self.startup.mark("first sync")
                if self.start_step == 0 and validation.should_validate(cfg, 0):
                    vm = self._validate(0)
                    logger.log(0, vm)
                    logger.message(validation.summary_line(0, vm, cfg) if vm else "")
                last_ckpt_s = None
                server_compiles = None
                for step in range(self.start_step, cfg.train.steps):
                    raise_if_interrupted()
                    m = self.train_step(step)
                    raise_if_interrupted()  # before this step is logged or checkpointed
                    vm = self._validate(step + 1, m) if validation.should_validate(cfg, step + 1) else {}
                    m.update(vm)
                    m.update(self.startup.report_once("first step", log))  # the start-up's phases, once
                    if self.is_main and step == self.start_step:
                        # two round trips a run, not a step; a validation's compiles are not the training's
                        server_compiles = self.rollouts.server_compiles()
                        if server_compiles is not None:
                            server_compiles -= self.validation_compiles
                    if server_compiles is not None and step + 1 == cfg.train.steps:
                        # the programs the servers compiled after the first step (0: all were warmed)
                        m["perf/server_compiles"] = float(self.rollouts.server_compiles() - server_compiles
                                                          - self.validation_compiles)
                    if last_ckpt_s is not None:
                        m["timing_s/checkpoint"] = last_ckpt_s  # the previous step's save
                    # Log before checkpointing: a run killed in between resumes at the previous
                    # checkpoint and redoes (and relogs) this step, so no step's line is ever lost.
                    logger.log(step + 1, m)
                    if vm:
                        logger.message(validation.summary_line(step + 1, vm, cfg))
                    last_ckpt_s = None
                    if ckpt.should_save(step + 1) or step + 1 == cfg.train.steps:
                        t0 = time.perf_counter()
                        ckpt.save(step + 1, self.learner.state(), self._extras(), force=True)
                        last_ckpt_s = time.perf_counter() - t0
                self.weights.finish(self.rollouts)  # the servers end with the final policy
        return self.run_dir


def _latest_checkpoint(run_dir: str) -> str:
    d = checkpoint_dir(run_dir)
    if not d.is_dir():
        return "none yet"
    with CheckpointManager(d, read_only=True) as ck:
        step = ck.latest_step()
    return f"step {step} in {d}" if step is not None else "none yet"


# The first SIGINT / SIGTERM received, or None. The handler raises KeyboardInterrupt at once (a long
# rollout or update stops mid-way), and the step loop also checks this at every step boundary: a
# KeyboardInterrupt raised inside third-party code that swallows it (an event loop's callback, a
# library's broad ``except BaseException``) must not turn a Ctrl-C into a run that goes on to its
# last step and exits 0.
_interrupted: int | None = None


def _install_signal_handlers() -> None:
    """Ctrl-C and SIGTERM (e.g. a scheduler's preemption) unwind the same way, so servers are stopped."""
    global _interrupted
    _interrupted = None

    def handler(signum, frame):  # noqa: ARG001
        global _interrupted
        if _interrupted is None:
            _interrupted = signum
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)


def raise_if_interrupted() -> None:
    """Raise KeyboardInterrupt if a SIGINT / SIGTERM has arrived (even one whose exception was lost)."""
    if _interrupted is not None:
        raise KeyboardInterrupt(f"signal {_interrupted}")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        print(help_text(RunConfig, prog="python -m aepo_jax.train"))
        return 0
    setup_cli_logging(os.environ.get("AEPO_LOG_LEVEL", "INFO"))
    for noisy in ("absl", "jax", "orbax", "httpx", "aiohttp"):  # their INFO lines bury the run's
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        cfg = build_config(RunConfig, argv, aliases=ALIASES)
        validate(cfg)
    except ConfigError as e:
        print("error: " + " ".join(str(e).split()), file=sys.stderr)
        return 2
    # Before jax initialises: simulated host devices for --mesh on CPU-only hosts, then multi-host.
    setup_host_devices(cfg.train.mesh or None)
    setup_compilation_cache(cfg.train.compilation_cache)  # before anything compiles; the server inherits it
    _install_signal_handlers()
    t = cfg.train
    try:
        try:
            if t.coordinator_address or t.num_processes > 1:
                distributed.initialize_distributed(t.coordinator_address or None, t.num_processes or None,
                                                   t.process_id if t.process_id >= 0 else None)
            else:
                distributed.initialize_distributed()  # auto-detects TPU pods / SLURM; no-op on one host
        except ValueError as e:
            raise startup.StartupError(str(e)) from None
        # Every input that can be checked before loading the model or starting a server.
        inputs = startup.check_run(cfg, talks_to_servers=distributed.is_main_process())
    except startup.StartupError as e:
        print("error: " + " ".join(str(e).split()), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted before the run started", file=sys.stderr)
        return 130
    trainer = None
    try:
        trainer = Trainer(cfg, inputs)
        run_dir = trainer.run()
        if distributed.is_main_process():
            print(f"done: {run_dir} (metrics.jsonl, checkpoints/, config.yaml)")
        return 0
    except ConfigError as e:
        print("error: " + " ".join(str(e).split()), file=sys.stderr)
        return 2
    except CheckpointError as e:  # a restore at start-up (2), or a save that failed mid-run (1)
        print("error: " + " ".join(str(e).split()), file=sys.stderr)
        return 1 if isinstance(e, (CheckpointSaveError, NonFiniteStateError)) else 2
    except KeyboardInterrupt:
        print("interrupted; the last checkpoint is intact", file=sys.stderr)
        return 130
    except (RolloutError, WeightSyncError) as e:  # after start-up: the servers failed mid-run
        last = _latest_checkpoint(cfg.train.run_dir)
        print(f"error: the rollout servers failed and retries are exhausted: {e}\n"
              f"The run stopped; its last checkpoint ({last}) is intact: run the same command to resume.",
              file=sys.stderr)
        return 3
    finally:
        if trainer is not None:
            trainer.close()


if __name__ == "__main__":
    sys.exit(main())
