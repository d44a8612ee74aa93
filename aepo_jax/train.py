"""``python -m aepo_jax.train``: the AEPO / GRPO / baselines RL loop.

One step, in stages (each timed as ``timing_s/<stage>``):

1. rollout       G samples per prompt at T = 1 from the SGLang servers
2. reward        binary reward of every response (process pool with timeouts)
3. old_logp      the learner recomputes log pi_old(o_t) and the full entropy H_t at T = 1;
                 their means are the entropy of the current policy (both estimators)
4. controller    AEPO picks T (T_high below the target, T_low above) and the positive budget
5. reg_rollout   temperature samples for a share of the prompts (AEPO and the ablations only)
6. batch         rows per method (docs/algorithms.md), advantages, fixed-shape mini-batches
7. update        epochs x mini-batches of one jitted, sharded update (micro-batches inside)
8. sync          the new weights to every server (safetensors on /dev/shm + update_weights_from_disk)
9. checkpoint    orbax: params, optimiser, step, data iterator, controller, every N steps

With no arguments the run uses the built-in toy task and base model and starts the embedded
SGLang-compatible server as a subprocess; ``--rollout.urls=...`` uses external SGLang servers.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import signal
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from aepo_jax.compilation_cache import setup_compilation_cache
from aepo_jax.config import ConfigError, build_config, help_text, to_dict
from aepo_jax.platform import setup_host_devices
from aepo_jax.trainer.config import ALIASES, RunConfig, validate

log = logging.getLogger("aepo_jax.train")


def _step_seed(base: int, step: int, phase: int) -> int:
    """Seed of one rollout call: distinct per (run seed, step, phase), the same on a resume."""
    return (int(base) * 1_000_003 + int(step) * 7 + int(phase)) & ((1 << 62) - 1)


def _mean(xs) -> float:
    xs = list(xs)
    return float(sum(xs) / len(xs)) if xs else 0.0


class Trainer:
    """Wires the stages together; everything heavy lives in the modules it calls."""

    def __init__(self, cfg: RunConfig):
        from aepo_jax.trainer.startup_clock import StartupClock

        self.startup = StartupClock()  # phases printed once, after the first step
        self.server = None
        try:
            self._setup(cfg)
        except BaseException:
            if self.server is not None:  # started early, while the learner initialises
                self.server.kill()
            raise

    def _setup(self, cfg: RunConfig) -> None:
        # Imported here, not at the top: main() must set XLA_FLAGS before jax starts a backend.
        from aepo_jax import data as data_lib
        from aepo_jax.trainer import distributed

        self.cfg = cfg
        self.is_main = distributed.is_main_process()
        self.run_dir = Path(cfg.train.run_dir).resolve()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.startup.mark("imports")

        # ---- model path, then the embedded server: it starts while the rest is imported and the
        # learner initialises (run() waits for it)
        model_path = cfg.model.path or data_lib.ensure_toy_base()
        self.startup.mark("model path" if cfg.model.path else "toy base")
        if not Path(model_path).is_dir():
            raise ConfigError(f"config key 'model.path': {model_path!r} is not a directory")
        self.model_path = str(Path(model_path).resolve())
        self.cfg = cfg = replace(cfg, model=replace(cfg.model, path=self.model_path))
        self._launch_embedded_server()

        import jax
        from transformers import AutoTokenizer  # imports torch when it is installed: seconds

        from aepo_jax.entropy_control import ControllerConfig, EntropyController, TargetSchedule
        from aepo_jax.losses import LossConfig
        from aepo_jax.models import load_pretrained
        from aepo_jax.models.sharding import make_mesh
        from aepo_jax.trainer.learner import Learner, LearnerSpec

        self.startup.mark("learner imports")
        self.jax = jax
        # ---- mesh and start-up validation (errors name keys and numbers)
        self.mesh = make_mesh(cfg.train.mesh or None)
        validate(cfg, data_axis_size=int(self.mesh.shape["data"]))

        # ---- tokenizer and model
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path, local_files_only=True)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        model = load_pretrained(self.model_path, dtype=cfg.model.dtype, mesh=self.mesh,
                                compute_dtype=cfg.model.compute_dtype or None, remat=cfg.model.remat)
        self.startup.mark("model load")

        # ---- data
        toy = not cfg.data.train_files
        if toy:
            # The toy task's split is fixed (seed 0, the base model's); data.seed shuffles it.
            problems = data_lib.toy_problems("train")
            self.load_stats = None
        else:
            problems, self.load_stats = data_lib.load_problems(
                cfg.data.train_files,
                data_lib.DatasetConfig(prompt_key=cfg.data.prompt_key, answer_key=cfg.data.answer_key,
                                       skip_bad_rows=cfg.data.skip_bad_rows))
        examples, self.prompt_stats = data_lib.tokenize_problems(
            problems, self.tokenizer,
            data_lib.PromptConfig(template=cfg.data.template, max_prompt_length=cfg.data.max_prompt_length))
        # Every process walks the same stream (process 0 samples for all of them), so the
        # iterator state is identical everywhere and a resume is exact on any topology.
        self.pipeline = data_lib.PromptPipeline(examples, data_lib.PipelineConfig(
            batch_size=cfg.data.prompts_per_step, seed=cfg.data.seed, shuffle=cfg.data.shuffle,
            process_index=0, process_count=1))
        longest = max(len(e.prompt_ids) for e in examples)
        self.prompt_len = int(math.ceil(longest / 8) * 8)
        self.response_len = cfg.rollout.max_new_tokens

        # ---- reward
        reward = cfg.algorithm.reward
        if reward == "auto":
            reward = "toy" if toy else "math"
        self.reward_name = reward
        self.reward_pool = None
        if self.is_main:
            from aepo_jax.rewards import RewardPool

            cheap = reward in ("toy", "exact_match")
            self.reward_pool = RewardPool(reward, num_workers=0 if cheap else 2, timeout_s=10.0)

        # ---- controller, loss, learner
        c = cfg.algorithm.controller
        self.controller = EntropyController(ControllerConfig(
            target=TargetSchedule.parse(c.target), t_high=c.t_high, t_low=c.t_low,
            budget_raise=c.budget_up, budget_lower=c.budget_down, estimator=c.estimator, dead_band=c.dead_band))
        a = cfg.algorithm
        loss_cfg = LossConfig(clip_low=a.clip_low, clip_high=a.clip_high, clip_dual=a.clip_dual or None,
                              alpha=a.alpha, entropy_coef=a.entropy_coef, adv_beta=a.adv_beta,
                              adv_kappa=a.adv_kappa, agg=a.agg)
        self.method = a.method
        loss_method = "grpo" if (a.method == "aepo" and a.reading == "mix") else a.method
        self.uses_reg = a.method in ("aepo", "ablation_eq2", "ablation_eq3")
        self.reg_in_batch = self.uses_reg and not (a.method == "aepo" and a.reading == "mix")

        # Fixed mini-batch geometry: GRPO rows + a padded slot for regulariser rows.
        self.num_minibatches = cfg.data.prompts_per_step // (cfg.train.mini_batch_prompts or cfg.data.prompts_per_step)
        self.data_size = int(self.mesh.shape["data"])
        grpo_rows = cfg.data.prompts_per_step * cfg.rollout.n // self.num_minibatches
        cap = 0
        if self.reg_in_batch:
            cap = math.ceil(max(c.budget_up, c.budget_down) / self.num_minibatches)
        mbs = cfg.train.micro_batch_size
        if mbs:
            micro = math.ceil((grpo_rows + cap) / mbs)
            rows = micro * mbs
        else:
            micro = 1
            rows = grpo_rows + cap
            rows += (-rows) % self.data_size
        self.reg_cap = rows - grpo_rows
        self.rows_per_minibatch = rows
        spec = LearnerSpec(method=loss_method, loss=loss_cfg, prompt_len=self.prompt_len,
                           response_len=self.response_len, logprob_chunk=cfg.model.logprob_chunk,
                           micro_batches=micro)
        total_updates = cfg.train.steps * cfg.train.epochs * self.num_minibatches
        self.learner = Learner(model, spec, cfg.optim, total_updates, self.mesh)
        self.logprob_rows = mbs or grpo_rows
        self.num_updates = 0
        self.start_step = 0
        self.client = None
        self.loop = asyncio.new_event_loop()
        self.startup.mark("data and learner")

    # ------------------------------------------------------------------ lifecycle
    def _launch_embedded_server(self) -> None:
        """Start the embedded server (no --rollout.urls) without waiting: it loads and compiles
        while the learner initialises; ``_start_rollout`` waits until it is healthy."""
        cfg = self.cfg.rollout
        if cfg.urls or not self.is_main:
            return
        from aepo_jax.rollout.launch import start_server

        extra = cfg.server_args.split() if cfg.server_args else []
        extra += ["--dtype", self.cfg.model.dtype]
        log.info("starting the embedded SGLang-compatible server for %s", self.model_path)
        self.server = start_server(self.model_path, extra_args=extra, log_path=str(self.run_dir / "server.log"))

    def _start_rollout(self) -> None:
        from aepo_jax.rollout.client import RolloutClient

        cfg = self.cfg.rollout
        urls = list(cfg.urls)
        if not urls:
            from aepo_jax.rollout.launch import wait_healthy

            wait_healthy(self.server, cfg.startup_timeout_s)
            urls = [self.server.url]
        self.client = RolloutClient(urls, weight_update_urls=list(cfg.weight_update_urls) or None,
                                    timeout_s=cfg.request_timeout_s, max_retries=cfg.max_retries,
                                    request_deadline_s=cfg.request_deadline_s, health_check_timeout_s=cfg.health_check_timeout_s)
        self.loop.run_until_complete(self.client.wait_healthy(deadline_s=cfg.startup_timeout_s))

    def close(self) -> None:
        if self.client is not None:
            try:
                self.loop.run_until_complete(self.client.close())
            except Exception:  # noqa: BLE001 - best effort at shutdown
                pass
        if self.server is not None:
            self.server.stop()
            self.server = None
        if self.reward_pool is not None:
            self.reward_pool.close()
            self.reward_pool = None
        self.loop.close()

    # ------------------------------------------------------------------ stages
    def _generate(self, examples, n: int, temperature: float, seed: int):
        from aepo_jax.trainer.batch import Rollout

        r = self.cfg.rollout
        params = {"max_new_tokens": r.max_new_tokens, "top_p": r.top_p, "top_k": r.top_k}
        samples = self.loop.run_until_complete(self.client.generate(
            [list(e.prompt_ids) for e in examples], n=n, sampling_params=params, seed=seed,
            temperature=temperature, return_logprob=False))
        out = []
        for i, row in enumerate(samples):
            for s in row:
                out.append(Rollout(prompt_index=i, prompt_ids=list(examples[i].prompt_ids),
                                   output_ids=list(s.output_ids)[: self.response_len],
                                   finish_reason=s.finish_type or "stop", temperature=temperature))
        return out

    def _score(self, rollouts, examples) -> dict:
        texts = self.tokenizer.batch_decode([r.output_ids for r in rollouts], skip_special_tokens=True)
        batch = self.reward_pool.score(texts, [examples[r.prompt_index].answer for r in rollouts])
        for r, t, s in zip(rollouts, texts, batch.scores):
            r.text, r.reward = t, float(s)
        return {"timeouts": batch.timeouts, "crashes": batch.crashes}

    def _attach_logprobs(self, rollouts) -> None:
        """Learner log-probs and entropies at T = 1 for every rollout (stored on the rollouts)."""
        from aepo_jax.trainer.batch import Rows, pack

        if not rollouts:
            return
        n = len(rollouts)
        rows = Rows(rollouts, np.zeros(n, np.float32), np.zeros(n, bool), np.zeros(n, np.int8))
        p = pack(rows, self.prompt_len, self.response_len, self.pad_id)
        lp, ent = self.learner.logprobs(p.arrays(), rows_per_call=self.logprob_rows)
        for i, r in enumerate(rollouts):
            k = len(r.output_ids)
            r.old_logp, r.entropy = lp[i, :k].copy(), ent[i, :k].copy()

    @staticmethod
    def _entropy_stats(rollouts) -> tuple[float, float]:
        """Per-response token means, then the mean over responses (Section 3.2's H)."""
        full = [float(r.entropy.mean()) for r in rollouts if len(r.output_ids)]
        nll = [float(-r.old_logp.mean()) for r in rollouts if len(r.output_ids)]
        return _mean(full), _mean(nll)

    def _rollout_metrics(self, rollouts, prefix: str) -> dict:
        if not rollouts:
            return {}
        lens = np.array([len(r.output_ids) for r in rollouts], np.float64)
        rewards = np.array([r.reward for r in rollouts])
        return {
            f"{prefix}/reward_mean": float(rewards.mean()),
            f"{prefix}/accuracy": float((rewards > 0.5).mean()),
            f"{prefix}/response_length_mean": float(lens.mean()),
            f"{prefix}/response_length_max": float(lens.max()),
            f"{prefix}/truncation_rate": float(np.mean([r.finish_reason == "length" for r in rollouts])),
            f"{prefix}/num_samples": float(len(rollouts)),
        }

    def _share(self, obj):
        """Process 0's value on every process (rollouts are drawn by process 0 only)."""
        from aepo_jax.trainer import distributed

        if distributed.process_count() == 1:
            return obj
        return distributed.broadcast_object(obj if self.is_main else None)

    def _sample_and_score(self, examples, n: int, temperature: float, seed: int, stage: str, m: dict):
        """Rollout + reward on process 0, then the scored rollouts on every process."""
        from aepo_jax.trainer.metrics import Timer

        if self.is_main:
            with Timer(stage, m):
                rollouts = self._generate(examples, n, temperature, seed)
            with Timer("reward" if stage == "rollout" else f"{stage}_reward", m):
                stats = self._score(rollouts, examples)
            payload = (rollouts, stats)
        else:
            payload = None
        return self._share(payload)

    def train_step(self, step: int) -> dict:
        """One RL step; returns its metrics. Every process runs it: process 0 talks to the
        servers and the reward pool, the learner's computations are collective."""
        from aepo_jax.trainer.batch import build_rows, pack, split_minibatches
        from aepo_jax.trainer.metrics import Timer

        cfg = self.cfg
        t0 = time.perf_counter()
        m: dict = {}
        examples = next(self.pipeline)

        # 1-2. rollout at T = 1 and rewards
        grpo, stats = self._sample_and_score(examples, cfg.rollout.n, cfg.rollout.temperature,
                                             _step_seed(cfg.train.seed, step, 0), "rollout", m)
        # 3. old log-probs and the current policy's entropy, both estimators
        with Timer("old_logp", m):
            self._attach_logprobs(grpo)
        h_full, h_nll = self._entropy_stats(grpo)
        # 4. the controller picks T and the positive budget
        self.controller.observe(entropy_full=h_full, entropy_sampled=h_nll)
        decision = self.controller.decide(step)
        # 5. temperature rollout for a share of the prompts (AEPO and the ablations)
        reg = []
        if self.uses_reg:
            n_prompts = max(1, math.ceil(cfg.algorithm.reg_prompt_fraction * len(examples)))
            temperature = 1.0 if self.method == "ablation_eq2" else decision.temperature
            reg, s2 = self._sample_and_score(examples[:n_prompts], cfg.algorithm.reg_samples_per_prompt or cfg.rollout.n,
                                             temperature, _step_seed(cfg.train.seed, step, 1), "reg_rollout", m)
            stats = {k: stats[k] + s2[k] for k in stats}
        m.update(self._rollout_metrics(grpo, "rollout"))
        m.update(self._rollout_metrics(reg, "reg_rollout"))
        m.update({
            "entropy": h_full if cfg.algorithm.controller.estimator == "full" else h_nll,
            # The current policy on this step's T = 1 rollout, before the update (the controller's
            # signal). actor/entropy_* (from the loss) are over the training batch, during the update.
            "policy/entropy_full": h_full,
            "policy/entropy_nll": h_nll,
            "entropy_target": decision.target,
            "temperature": decision.temperature if self.uses_reg else 1.0,
            "reward_mean": m["rollout/reward_mean"],
            "reward/timeouts": float(stats["timeouts"]),
            "reward/crashes": float(stats["crashes"]),
            "aepo/budget": float(decision.budget),
            "aepo/raising": 1.0 if decision.mode == "raise" else 0.0,
        })

        # 6. the method's rows, their old log-probs, fixed-shape mini-batches
        with Timer("batch", m):
            rng = np.random.default_rng([cfg.train.seed, step, 2])
            rows, sel = build_rows(self.method, cfg.algorithm.reading, grpo, reg, decision.budget, rng)
            m.update(sel)
            self._attach_logprobs([r for r in rows.rollouts if r.old_logp is None])
            packed = pack(rows, self.prompt_len, self.response_len, self.pad_id)

        # 7. updates
        update_metrics = []
        with Timer("update", m):
            rng = np.random.default_rng([cfg.train.seed, step, 3])
            for _ in range(cfg.train.epochs):
                for mb in split_minibatches(packed, self.num_minibatches, self.reg_cap, self.pad_id, rng):
                    um = self.learner.update(mb.arrays())
                    um["optim/lr"] = self.learner.learning_rate(self.num_updates)
                    if um["actor/update_skipped"] == 0.0:
                        self.num_updates += 1
                    else:
                        log.warning("step %d: non-finite loss or gradient; update skipped", step + 1)
                    update_metrics.append(um)
        for k in update_metrics[0]:
            vals = [u[k] for u in update_metrics]
            m[k] = float(np.sum(vals)) if k == "actor/update_skipped" else _mean(vals)
        m["optim/num_updates"] = float(self.num_updates)

        with Timer("sync", m):
            self._sync(step + 1)
        tokens = float(packed.response_mask.sum())
        m["timing_s/step"] = time.perf_counter() - t0
        m["perf/tokens_per_s"] = tokens / max(m["timing_s/step"], 1e-9)
        m["perf/train_tokens"] = tokens
        return m

    def _sync(self, version: int) -> None:
        """Weights to the sampling servers (main process talks to them)."""
        from aepo_jax.rollout.weight_sync import sync_weights_async

        model = self.learner.model()
        if self.jax.process_count() > 1:
            # Every process takes part in gathering the parameters; only process 0 writes and posts.
            from jax.experimental import multihost_utils

            params = multihost_utils.process_allgather(self.learner.params, tiled=True)
            if not self.is_main:
                return
            from flax import nnx

            model = nnx.merge(self.learner.graphdef, params)
        if not self.is_main:
            return
        self.loop.run_until_complete(sync_weights_async(
            model, self.client, str(version), self.cfg.rollout.sync_dir or None,
            dtype=self.cfg.model.dtype, source_dir=self.model_path))

    # ------------------------------------------------------------------ checkpoints
    def _extras(self) -> dict:
        return {"controller": self.controller.to_dict(), "num_updates": self.num_updates}

    def _restore(self, ckpt) -> None:
        from aepo_jax.entropy_control import EntropyController

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
        import yaml

        from aepo_jax.trainer.checkpoint import CheckpointManager, checkpoint_dir
        from aepo_jax.trainer.metrics import MetricsLogger

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
                               resume_step=self.start_step, total_steps=cfg.train.steps) as logger:
                if self.is_main:
                    self._start_rollout()
                self.startup.mark("server start (rest)" if self.server is not None else "servers healthy")
                # The servers must sample from this run's policy: the restored one on a resume, and
                # the base model on a fresh start (a long-lived server may hold another run's weights).
                self._sync(self.start_step)
                self.startup.mark("first sync")
                last_ckpt_s = None
                for step in range(self.start_step, cfg.train.steps):
                    m = self.train_step(step)
                    m.update(self.startup.report_once("first step", log))  # the start-up's phases, once
                    if last_ckpt_s is not None:
                        m["timing_s/checkpoint"] = last_ckpt_s  # the previous step's save
                    # Log before checkpointing: a run killed in between resumes at the previous
                    # checkpoint and redoes (and relogs) this step, so no step's line is ever lost.
                    logger.log(step + 1, m)
                    last_ckpt_s = None
                    if ckpt.should_save(step + 1) or step + 1 == cfg.train.steps:
                        t0 = time.perf_counter()
                        ckpt.save(step + 1, self.learner.state(), self._extras(), force=True)
                        last_ckpt_s = time.perf_counter() - t0
        return self.run_dir


def _latest_checkpoint(run_dir: str) -> str:
    from aepo_jax.trainer.checkpoint import CheckpointManager, checkpoint_dir

    d = checkpoint_dir(run_dir)
    if not d.is_dir():
        return "none yet"
    with CheckpointManager(d, read_only=True) as ck:
        step = ck.latest_step()
    return f"step {step} in {d}" if step is not None else "none yet"


def _install_signal_handlers() -> None:
    """SIGTERM (e.g. a scheduler's preemption) unwinds like Ctrl-C, so servers are stopped."""

    def handler(signum, frame):  # noqa: ARG001
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, handler)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        print(help_text(RunConfig, prog="python -m aepo_jax.train"))
        return 0
    logging.basicConfig(level=os.environ.get("AEPO_LOG_LEVEL", "INFO"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
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
    # The error classes main() reports (imported after the device flags: these modules import jax).
    from aepo_jax.rollout.client import RolloutError
    from aepo_jax.rollout.weight_sync import WeightSyncError
    from aepo_jax.trainer import distributed, startup
    from aepo_jax.trainer.checkpoint import CheckpointError, CheckpointSaveError, NonFiniteStateError

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
        startup.check_inputs(cfg, talks_to_servers=distributed.is_main_process())
        startup.check_mesh(cfg)
    except startup.StartupError as e:
        print("error: " + " ".join(str(e).split()), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted before the run started", file=sys.stderr)
        return 130
    trainer = None
    try:
        trainer = Trainer(cfg)
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
