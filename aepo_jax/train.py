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

import asyncio
import logging
import math
import os
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

# Importing jax starts no backend: XLA_FLAGS (simulated host devices for --mesh on CPU-only hosts)
# and jax.distributed are read when the first backend starts, which main() makes happen only after
# setup_host_devices() and initialize_distributed(). Nothing below may touch a device at import.
import jax
import numpy as np
import yaml
from flax import nnx
from jax.experimental import multihost_utils

from aepo_jax import data as data_lib
from aepo_jax.compilation_cache import COMPILES, setup_compilation_cache
from aepo_jax.config import ConfigError, build_config, help_text, to_dict
from aepo_jax.entropy_control import EntropyController
from aepo_jax.methods import method_spec
from aepo_jax.models import load_pretrained
from aepo_jax.models.sharding import make_mesh
from aepo_jax.platform import setup_host_devices
from aepo_jax.rewards import RewardPool
from aepo_jax.rollout.client import RolloutClient, RolloutError
from aepo_jax.rollout.launch import start_server, wait_healthy
from aepo_jax.rollout.weight_sync import WeightSyncError, publish_weights, write_weights
from aepo_jax.trainer import distributed, startup
from aepo_jax.trainer.batch import Batch, assemble, pack, response_means, select_reg_rows, split_minibatches
from aepo_jax.trainer.checkpoint import (CheckpointError, CheckpointManager, CheckpointSaveError, NonFiniteStateError,
                                         checkpoint_dir)
from aepo_jax.trainer.config import (ALIASES, RunConfig, controller_config, loss_config, uses_on_policy_update,
                                    validate)
from aepo_jax.trainer.learner import Learner, LearnerSpec
from aepo_jax.trainer.metrics import MetricsLogger, Timer
from aepo_jax.trainer.startup_clock import StartupClock

log = logging.getLogger("aepo_jax.train")


def _step_seed(base: int, step: int, phase: int) -> int:
    """Seed of one rollout call: distinct per (run seed, step, phase), the same on a resume."""
    return (int(base) * 1_000_003 + int(step) * 7 + int(phase)) & ((1 << 62) - 1)


def _mean(xs) -> float:
    xs = list(xs)
    return float(sum(xs) / len(xs)) if xs else 0.0


def rollout_metrics(b: Batch, prefix: str) -> dict:
    lens = b.mask.sum(axis=1)
    return {
        f"{prefix}/reward_mean": float(b.rewards.mean()),
        f"{prefix}/accuracy": float((b.rewards > 0.5).mean()),
        f"{prefix}/response_length_mean": float(lens.mean()),
        f"{prefix}/response_length_max": float(lens.max()),
        f"{prefix}/truncation_rate": float(b.truncated.mean()),
        f"{prefix}/num_samples": float(b.num_rows),
    }


def policy_entropy(b: Batch) -> tuple[float, float]:
    """The policy's entropy on a rollout with old log-probs (Section 3.2's H): per-response token
    means, then the mean over responses; (full-distribution, sampled -log pi) estimators."""
    return float(_mean(response_means(b.entropy, b.mask))), float(_mean(response_means(-b.old_logp, b.mask)))


class Trainer:
    """Holds the run's parts; :meth:`train_step` chains the stages."""

    def __init__(self, cfg: RunConfig):
        self.startup = StartupClock()  # phases printed once, after the first step
        self.server = None
        try:
            self._setup(cfg)
        except BaseException:
            if self.server is not None:  # started early, while the learner initialises
                self.server.kill()
            raise

    def _setup(self, cfg: RunConfig) -> None:
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

        # The one import not at the top: transformers imports torch when it is installed (seconds),
        # which then overlaps the embedded server's start instead of delaying it.
        from transformers import AutoTokenizer

        self.startup.mark("learner imports")
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
            cheap = reward in ("toy", "exact_match")
            self.reward_pool = RewardPool(reward, num_workers=0 if cheap else 2, timeout_s=10.0)

        # ---- method, controller, loss, learner
        a, c = cfg.algorithm, cfg.algorithm.controller
        self.spec = method_spec(a.method, a.reading)
        self.controller = EntropyController(controller_config(cfg))
        loss_cfg = loss_config(cfg)
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

        # Fixed mini-batch geometry: main rows + a padded slot for appended regulariser rows.
        self.num_minibatches = cfg.data.prompts_per_step // (cfg.train.mini_batch_prompts or cfg.data.prompts_per_step)
        self.data_size = int(self.mesh.shape["data"])
        main_rows = cfg.data.prompts_per_step * cfg.rollout.n // self.num_minibatches
        cap = math.ceil(max(c.budget_up, c.budget_down) / self.num_minibatches) if self.spec.appends_reg_rows else 0
        mbs = cfg.train.micro_batch_size
        if mbs:
            micro = math.ceil((main_rows + cap) / mbs)
            rows = micro * mbs
        else:
            micro = 1
            rows = main_rows + cap
            rows += (-rows) % self.data_size
        self.reg_cap = rows - main_rows
        learner_spec = LearnerSpec(loss_name=self.spec.loss, loss=loss_cfg, prompt_len=self.prompt_len,
                                   response_len=self.response_len, logprob_chunk=cfg.model.logprob_chunk,
                                   micro_batches=micro, entropy_grad=self.spec.entropy_grad,
                                   reuse_old_logp=self.reuse_old_logp, seed=cfg.train.seed)
        total_updates = cfg.train.steps * cfg.train.epochs * self.num_minibatches
        self.learner = Learner(model, learner_spec, cfg.optim, total_updates, self.mesh)
        self.logprob_rows = mbs or main_rows
        self.num_updates = 0
        self.start_step = 0
        self.client = None
        self.dist_sync = None  # rollout.sync=distributed: the servers' weight-update group
        self.loop = asyncio.new_event_loop()
        COMPILES.install()  # counts this process's compilations (perf/compiles); idempotent
        self.weights_writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="weight-sync")
        self.pending_sync = None      # (version, future of (path, write seconds)) while weights are written
        self.weight_version = None    # the version the servers hold (checked on every sample)
        self.startup.mark("data and learner")

    # ------------------------------------------------------------------ lifecycle
    def _launch_embedded_server(self) -> None:
        """Start the embedded server (no --rollout.urls) without waiting: it loads and compiles
        while the learner initialises; ``_start_rollout`` waits until it is healthy."""
        cfg = self.cfg.rollout
        if cfg.urls or not self.is_main:
            return
        extra = cfg.server_args.split() if cfg.server_args else []
        extra += ["--dtype", self.cfg.model.dtype]
        log.info("starting the embedded SGLang-compatible server for %s", self.model_path)
        self.server = start_server(self.model_path, extra_args=extra, log_path=str(self.run_dir / "server.log"))

    def _start_rollout(self) -> None:
        cfg = self.cfg.rollout
        urls = list(cfg.urls)
        if not urls:
            wait_healthy(self.server, cfg.startup_timeout_s)
            urls = [self.server.url]
        self.client = RolloutClient(urls, weight_update_urls=list(cfg.weight_update_urls) or None,
                                    timeout_s=cfg.request_timeout_s, max_retries=cfg.max_retries,
                                    request_deadline_s=cfg.request_deadline_s, health_check_timeout_s=cfg.health_check_timeout_s)
        self.loop.run_until_complete(self.client.wait_healthy(deadline_s=cfg.startup_timeout_s))
        if cfg.sync == "distributed":
            from aepo_jax.rollout.dist_sync import DistributedWeightSync

            self.dist_sync = DistributedWeightSync(
                self.client, bucket_mb=cfg.sync_bucket_mb, master_address=cfg.sync_master_address or None,
                master_port=cfg.sync_master_port, backend=cfg.sync_backend, timeout_s=cfg.request_timeout_s)
            self.loop.run_until_complete(self.dist_sync.connect())

    def close(self) -> None:
        if self.dist_sync is not None:
            try:
                self.loop.run_until_complete(self.dist_sync.close())
            except Exception:  # noqa: BLE001 - best effort at shutdown
                pass
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
        self.weights_writer.shutdown(wait=True)
        self.loop.close()

    # ------------------------------------------------------------------ the step
    def train_step(self, step: int) -> dict:
        """One RL step; returns its metrics. Every process runs it: process 0 talks to the
        servers and the reward pool, the learner's computations are collective."""
        cfg, seed = self.cfg, self.cfg.train.seed
        t0, compiles = time.perf_counter(), COMPILES.compiles
        m: dict = {}
        examples = next(self.pipeline)
        with Timer("sync", m):
            self._sync_finish(m)  # the previous update's weights, written meanwhile, reach the servers
        main = self._rollout(examples, cfg.rollout.n, cfg.rollout.temperature, _step_seed(seed, step, 0), "rollout", m)
        main = self._old_logp(main, m)
        decision = self._control(step, main, m)
        reg = self._reg_rollout(examples, decision, _step_seed(seed, step, 1), m)
        reg = self._old_logp(reg, m)
        with Timer("batch", m):
            batch = assemble(self.spec, main, reg)
        self._update(step, batch, m)
        self._observe_entropy(main, m)
        self._sync_begin(step + 1)
        tokens = float(batch.mask.sum())
        m["timing_s/step"] = time.perf_counter() - t0
        m["perf/tokens_per_s"] = tokens / max(m["timing_s/step"], 1e-9)
        m["perf/train_tokens"] = tokens
        m["perf/compiles"] = float(COMPILES.compiles - compiles)  # this process's: 0 after step 1
        return m

    # ------------------------------------------------------------------ stages
    def _rollout(self, examples, n: int, temperature: float, seed: int, stage: str, m: dict) -> Batch:
        """Samples and their rewards (process 0), packed; the same Batch on every process."""
        if self.is_main:
            with Timer(stage, m):
                r = self.cfg.rollout
                params = {"max_new_tokens": r.max_new_tokens, "top_p": r.top_p, "top_k": r.top_k}
                samples = self.loop.run_until_complete(self.client.generate(
                    [list(e.prompt_ids) for e in examples], n=n, sampling_params=params, seed=seed,
                    temperature=temperature, return_logprob=False))
                self._check_weight_version(samples)
            with Timer("reward" if stage == "rollout" else f"{stage}_reward", m):
                rows = [(i, s) for i, group in enumerate(samples) for s in group]
                outputs = [list(s.output_ids)[: self.response_len] for _, s in rows]
                texts = self.tokenizer.batch_decode(outputs, skip_special_tokens=True)
                scored = self.reward_pool.score(texts, [examples[i].answer for i, _ in rows])
                batch = pack([list(examples[i].prompt_ids) for i, _ in rows], outputs, scored.scores,
                             [i for i, _ in rows], [s.truncated for _, s in rows], main_rollout=stage == "rollout",
                             prompt_len=self.prompt_len, response_len=self.response_len, pad_id=self.pad_id)
            payload = (batch, {"reward/timeouts": float(scored.timeouts), "reward/crashes": float(scored.crashes)})
        else:
            payload = None
        # Rollouts are drawn by process 0 only: its Batch on every process.
        batch, stats = payload if distributed.process_count() == 1 else distributed.broadcast_object(payload)
        for k, v in stats.items():
            m[k] = m.get(k, 0.0) + v
        m.update(rollout_metrics(batch, stage))
        if stage == "rollout":
            m["reward_mean"] = m["rollout/reward_mean"]
        return batch

    def _old_logp(self, batch: Batch | None, m: dict) -> Batch | None:
        """The learner's log pi_old and entropy at T = 1 of every row (skipped when the update is
        on-policy: it then uses sg(log pi) of its own forward pass)."""
        if batch is None or self.reuse_old_logp or batch.num_rows == 0:
            return batch
        with Timer("old_logp", m):
            logp, entropy = self.learner.logprobs(batch, rows_per_call=self.logprob_rows)
        return replace(batch, old_logp=logp, entropy=entropy)

    def _control(self, step: int, main: Batch, m: dict):
        """AEPO's decision for this step: T and the positive budget from the policy's entropy.

        ``measure_entropy``: the signal is this step's rollout, measured before the controller
        decides (the paper; from the recomputed old log-probs, or a forward pass over the main
        rows). Otherwise it is the previous update's forward pass on the previous step's rollout
        (one update behind, as in the authors' code; :meth:`_observe_entropy`).
        """
        if self.measure_entropy:
            if main.old_logp is None:
                with Timer("entropy", m):
                    logp, entropy = self.learner.logprobs(main, rows_per_call=self.logprob_rows)
                h_full, h_nll = policy_entropy(replace(main, old_logp=logp, entropy=entropy))
            else:
                h_full, h_nll = policy_entropy(main)
            self.controller.observe(entropy_full=h_full, entropy_sampled=h_nll)
            m["policy/entropy_full"], m["policy/entropy_nll"] = h_full, h_nll
        decision = self.controller.decide(step)
        m["entropy_target"] = decision.target
        m["aepo/budget"] = float(decision.budget)
        m["aepo/raising"] = 1.0 if decision.mode == "raise" else 0.0
        if decision.entropy is not None:
            m["aepo/entropy_signal"] = decision.entropy
        return decision

    def _reg_rollout(self, examples, decision, seed: int, m: dict) -> Batch | None:
        """The method's second rollout and the rows of it the batch keeps (None without one)."""
        cfg, spec = self.cfg, self.spec
        temperature = 1.0 if spec.reg_rollout in ("none", "t1") else decision.temperature
        m["temperature"] = temperature
        if not spec.uses_reg_rollout:
            return None
        n_prompts = max(1, math.ceil(cfg.algorithm.reg_prompt_fraction * len(examples)))
        reg = self._rollout(examples[:n_prompts], cfg.algorithm.reg_samples_per_prompt or cfg.rollout.n,
                            temperature, seed, "reg_rollout", m)
        with Timer("batch", m):
            rows, stats = select_reg_rows(spec, reg, decision.budget, np.random.default_rng([cfg.train.seed, decision.step, 2]))
        m.update(stats)
        return rows

    def _update(self, step: int, batch: Batch, m: dict) -> None:
        """Epochs x mini-batches of the jitted update; their metrics averaged into ``m``."""
        cfg = self.cfg
        update_metrics = []
        with Timer("update", m):
            rng = np.random.default_rng([cfg.train.seed, step, 3])
            for _ in range(cfg.train.epochs):
                for mb in split_minibatches(batch, self.num_minibatches, self.reg_cap, self.pad_id, rng):
                    um = self.learner.update(mb, self.num_updates)
                    if um["actor/update_skipped"] == 0.0:
                        self.num_updates += 1
                    else:
                        log.warning("step %d: non-finite loss or gradient; update skipped", step + 1)
                    update_metrics.append(um)
        for k in update_metrics[0]:
            if k.startswith("policy/") and k in m:
                continue  # measured exactly on the rollout before the update (recomputed old log-probs)
            vals = [u[k] for u in update_metrics]
            m[k] = float(np.sum(vals)) if k == "actor/update_skipped" else _mean(vals)
        m["optim/num_updates"] = float(self.num_updates)

    def _observe_entropy(self, main: Batch, m: dict) -> None:
        """``entropy``: the policy's entropy on this step's rollout, before the update (the controller's
        estimator). On-policy it comes from the update's forward pass and feeds the next decision."""
        if not self.measure_entropy:
            self.controller.observe(entropy_full=m["policy/entropy_full"], entropy_sampled=m["policy/entropy_nll"])
        est = self.cfg.algorithm.controller.estimator
        m["entropy"] = m["policy/entropy_full"] if est == "full" else m["policy/entropy_nll"]

    def _sync_begin(self, version: int) -> None:
        """Start moving the updated weights to the servers: a background thread writes them while
        the step is logged and checkpointed and the next prompts are drawn (off the critical path);
        :meth:`_sync_finish` has the servers load them before the next rollout."""
        model = self.learner.model()
        if jax.process_count() > 1:
            # Every process takes part in gathering the parameters; only process 0 writes and posts.
            params = multihost_utils.process_allgather(self.learner.params, tiled=True)
            if not self.is_main:
                return
            model = nnx.merge(self.learner.graphdef, params)
        if not self.is_main:
            return
        if self.dist_sync is not None:  # broadcast in _sync_finish: nothing to write meanwhile
            self.pending_sync = (str(version), model)
            return
        sync_dir, t0 = self.cfg.rollout.sync_dir or None, time.perf_counter()

        def write():
            path = write_weights(model, str(version), sync_dir, dtype=self.cfg.model.dtype, source_dir=self.model_path)
            return path, time.perf_counter() - t0

        # The next update (which donates the parameters) comes after the next rollout, which waits
        # for this write: the thread never reads a donated array.
        self.pending_sync = (str(version), self.weights_writer.submit(write))

    def _sync_finish(self, m: dict | None = None) -> None:
        """Every server loads the written weights. No /model_info round trip: each sample of the
        next rollout carries its server's weight_version, checked by :meth:`_check_weight_version`."""
        if self.pending_sync is None:
            return
        version, written = self.pending_sync
        self.pending_sync = None
        if self.dist_sync is not None:  # the parameters are donated only by the next update
            self.loop.run_until_complete(self.dist_sync.sync(written, version, dtype=self.cfg.model.dtype, verify=False))
            self.weight_version = version
            return
        path, write_s = written.result()
        self.loop.run_until_complete(publish_weights(self.client, path, version, verify=False))
        self.weight_version = version
        if m is not None:
            m["timing_s/sync_write"] = write_s  # in the background thread, overlapping the previous step's end

    def _check_weight_version(self, samples) -> None:
        wrong = {s.server: s.weight_version for group in samples for s in group
                 if s.weight_version is not None and s.weight_version != self.weight_version}
        if wrong:
            raise WeightSyncError(f"samples came from weight_version {wrong} (server: version), "
                                  f"not the synced {self.weight_version!r}")

    # ------------------------------------------------------------------ checkpoints
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
                               resume_step=self.start_step, total_steps=cfg.train.steps) as logger:
                if self.is_main:
                    self._start_rollout()
                self.startup.mark("server start (rest)" if self.server is not None else "servers healthy")
                # The servers must sample from this run's policy: the restored one on a resume, and
                # the base model on a fresh start (a long-lived server may hold another run's weights).
                self._sync_begin(self.start_step)
                self._sync_finish()
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
                self._sync_finish()  # the servers end with the final policy
        return self.run_dir


def _latest_checkpoint(run_dir: str) -> str:
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
