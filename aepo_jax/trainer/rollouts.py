"""The learner's side of the rollout servers: their lifecycle, the rollout and reward stages, and
the weights they sample from.

:class:`Rollouts` starts the embedded SGLang-compatible server (no ``rollout.urls``) without
waiting for it, connects the async client once the learner is ready (:meth:`Rollouts.connect`),
draws samples (:meth:`Rollouts.generate`), loads new weights into every server
(:meth:`Rollouts.publish`, or :meth:`Rollouts.broadcast` with ``rollout.sync=distributed``) and
checks that every sample came from the weights last published. :class:`WeightSync` moves the
updated weights to them: written in a background thread (off the critical path), or broadcast.
:func:`score` turns samples into a scored :class:`~aepo_jax.trainer.batch.Batch`.

Only process 0 talks to the servers and the reward pool; :func:`aepo_jax.trainer.stages.rollout`
hands its Batch to every process.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import jax
from flax import nnx
from jax.experimental import multihost_utils

from aepo_jax.rewards import RewardPool
from aepo_jax.rollout.client import RolloutClient
from aepo_jax.rollout.launch import start_server, wait_healthy
from aepo_jax.rollout.sampler import bucket_of, prompt_bucket_representatives
from aepo_jax.rollout.weight_sync import (WeightSyncError, publish_weights, resolve_sync_dir, shared_by_all_processes,
                                          write_weights, write_weights_per_process)
from aepo_jax.trainer import distributed
from aepo_jax.trainer.batch import Batch, pack
from aepo_jax.trainer.config import RunConfig

log = logging.getLogger("aepo_jax.train")


class Rollouts:
    """The rollout servers as the learner sees them (process 0 only; other processes hold none)."""

    def __init__(self, cfg: RunConfig, model_path: str, run_dir: Path):
        self.cfg = cfg.rollout
        self.server = None
        self.client: RolloutClient | None = None
        self.loop = asyncio.new_event_loop()
        self.weight_version: str | None = None  # the version the servers hold (checked on every sample)
        self.dist_sync = None  # rollout.sync=distributed: the servers' weight-update group
        if not self.cfg.urls:
            # Started now, without waiting: it loads and compiles while the learner initialises.
            extra = self.cfg.server_args.split() if self.cfg.server_args else []
            extra += ["--dtype", cfg.model.dtype]
            # Every generation is rollout.max_new_tokens long at most: one generation bucket of that
            # size (the KV cache no longer than needed), and no start-up compile of a shape the run
            # never uses: the trainer warms the shapes its rollouts reach (prewarm).
            if not any(a.startswith("--gen-buckets") for a in extra):
                extra += ["--gen-buckets", str(self.cfg.max_new_tokens)]
            if "--skip-server-warmup" not in extra:
                extra.append("--skip-server-warmup")
            log.info("starting the embedded SGLang-compatible server for %s", model_path)
            self.server = start_server(model_path, extra_args=extra, log_path=str(run_dir / "server.log"))

    def connect(self) -> None:
        """Wait for the embedded server (if any), then for every server to be healthy."""
        cfg = self.cfg
        urls = list(cfg.urls)
        if not urls:
            wait_healthy(self.server, cfg.startup_timeout_s)
            urls = [self.server.url]
        self.client = RolloutClient(urls, weight_update_urls=list(cfg.weight_update_urls) or None,
                                    timeout_s=cfg.request_timeout_s, max_retries=cfg.max_retries,
                                    request_deadline_s=cfg.request_deadline_s,
                                    health_check_timeout_s=cfg.health_check_timeout_s)
        self.loop.run_until_complete(self.client.wait_healthy(deadline_s=cfg.startup_timeout_s))
        if cfg.sync == "distributed":
            # Imported here: it needs torch (the `distributed` extra), which the default run does not.
            from aepo_jax.rollout.dist_sync import DistributedWeightSync

            self.dist_sync = DistributedWeightSync(
                self.client, bucket_mb=cfg.sync_bucket_mb, master_address=cfg.sync_master_address or None,
                master_port=cfg.sync_master_port, backend=cfg.sync_backend, timeout_s=cfg.request_timeout_s)
            self.loop.run_until_complete(self.dist_sync.connect())

    def generate(self, prompts: list[list[int]], n: int, temperature: float, seed: int,
                 max_new_tokens: int | None = None) -> list:
        """``n`` samples per prompt, each from the weights last published; ``max_new_tokens``
        overrides ``rollout.max_new_tokens`` (only ever lower: the batch's response length is fixed)."""
        r = self.cfg
        params = {"max_new_tokens": max_new_tokens or r.max_new_tokens, "top_p": r.top_p, "top_k": r.top_k}
        samples = self.loop.run_until_complete(self.client.generate(
            prompts, n=n, sampling_params=params, seed=seed, temperature=temperature, return_logprob=False))
        self.check_weight_version(samples)
        return samples

    def check_weight_version(self, samples) -> None:
        """Every sample came from the weights last published (validation checks its samples too)."""
        wrong = {s.server: s.weight_version for group in samples for s in group
                 if s.weight_version is not None and s.weight_version != self.weight_version}
        if wrong:
            raise WeightSyncError(f"samples came from weight_version {wrong} (server: version), "
                                  f"not the synced {self.weight_version!r}")

    def prewarm(self, prompts: list[list[int]], calls: list[tuple[int, int]]) -> int:
        """Compile, now, every sampler shape the run's rollouts can reach, so that no step after the
        first compiles (servers that report their buckets in ``/server_info``: the embedded one).

        A server batch runs in the bucket of its longest prompt, so the run's prompts reach one
        prompt bucket per representative length (:func:`prompt_bucket_representatives`). For each,
        every rollout call of a step (``calls``: (prompts, samples per prompt)) is drawn once, at
        the step's row count and generation bucket, with the run's prompt of that length repeated
        (greedy: the compiled programs do not depend on the temperature; the samples are dropped).
        Returns the number of warm-up rollouts (0 when no server reports buckets)."""
        infos = [self.loop.run_until_complete(self.client.server_info(u)) for u in self.client.urls]
        if not infos or any("prompt_buckets" not in i for i in infos):
            return 0
        by_len = {len(p): p for p in prompts}
        reps = set()
        for info in infos:
            reps.update(prompt_bucket_representatives(list(by_len), info["prompt_buckets"]).values())
        r = self.cfg
        # One new token compiles the same programs when it falls in the same generation bucket as
        # max_new_tokens (the embedded server's single bucket): the warm-up then barely decodes.
        one = all(bucket_of(1, i["gen_buckets"]) == bucket_of(r.max_new_tokens, i["gen_buckets"]) for i in infos)
        params = {"max_new_tokens": 1 if one else r.max_new_tokens, "top_p": r.top_p, "top_k": r.top_k}
        done = 0
        for length in sorted(reps):
            for num_prompts, n in dict.fromkeys(calls):
                self.loop.run_until_complete(self.client.generate(
                    [by_len[length]] * num_prompts, n=n, sampling_params=params, seed=0, temperature=0.0,
                    return_logprob=False))
                done += 1
        return done

    def server_counters(self) -> tuple[int | None, float | None]:
        """The servers' programs compiled and CPU seconds used so far, each summed over the servers
        (None where one does not report it); one /server_info round trip a server."""
        infos = [self.loop.run_until_complete(self.client.server_info(u)) for u in self.client.urls]
        compiles, cpu = [i.get("compiled_programs") for i in infos], [i.get("process_cpu_s") for i in infos]
        return (None if None in compiles else int(sum(compiles))), (None if None in cpu else float(sum(cpu)))

    def server_compiles(self) -> int | None:
        """Programs the servers have compiled so far (summed; None when they do not report it)."""
        return self.server_counters()[0]

    def publish(self, path: str, version: str) -> None:
        """Every server loads the weights written at ``path``. No /model_info round trip: each sample
        of the next rollout carries its server's weight_version, checked by :meth:`generate`."""
        self.loop.run_until_complete(publish_weights(self.client, path, version, verify=False))
        self.weight_version = version

    def broadcast(self, model, version: str, dtype: str) -> None:
        """``rollout.sync=distributed``: broadcast ``model``'s weights over the update group."""
        self.loop.run_until_complete(self.dist_sync.sync(model, version, dtype=dtype, verify=False))
        self.weight_version = version

    def close(self) -> None:
        for part in (self.dist_sync, self.client):  # the group first: leaving it talks to the servers
            if part is not None:
                try:
                    self.loop.run_until_complete(part.close())
                except Exception:  # noqa: BLE001 - best effort at shutdown
                    pass
        self.dist_sync = self.client = None
        if self.server is not None:
            self.server.stop()
            self.server = None
        self.loop.close()

    def kill(self) -> None:
        """Stop the embedded server at once (a failed start-up)."""
        if self.server is not None:
            self.server.kill()
            self.server = None


class WeightSync:
    """Moves the updated weights to the servers before the next rollout. ``rollout.sync=disk``:
    written (safetensors, ``rollout.sync_dir`` or /dev/shm) in a background thread while the step
    is logged and checkpointed and the next prompts are drawn, then loaded by every server
    (:meth:`Rollouts.publish`). ``distributed``: broadcast (:meth:`Rollouts.broadcast`)."""

    def __init__(self, cfg: RunConfig, model_path: str, is_main: bool):
        self.sync_dir = cfg.rollout.sync_dir or None
        self.dtype = cfg.model.dtype
        self.distributed = cfg.rollout.sync == "distributed"
        self.model_path = model_path
        self.is_main = is_main
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="weight-sync")
        # (version, future of (path, write seconds)); distributed: (version, the model to broadcast)
        self.pending: tuple[str, Future] | None = None
        self.shared_dir: str | None = None  # several processes: the sync dir all of them write to ("" = not shared)

    def begin(self, learner, version: int) -> None:
        """Start writing the learner's weights as ``version`` (a collective with several processes)."""
        model = learner.model()
        if jax.process_count() > 1:
            if self.shared_dir is None:  # once: process 0's sync dir, and whether every process sees it
                d = distributed.broadcast_object(resolve_sync_dir(self.sync_dir) if self.is_main else None)
                self.shared_dir = d if shared_by_all_processes(d) else ""
                if not self.shared_dir and self.is_main:
                    log.warning("rollout.sync_dir %s is not shared by all learner processes: every sync gathers the "
                                "whole model onto every process; a directory they all share avoids that", d)
            if self.shared_dir:
                # Each process writes the blocks it holds (a collective, so not in the background thread).
                t0 = time.perf_counter()
                res = write_weights_per_process(model, str(version), self.shared_dir, dtype=self.dtype,
                                                source_dir=self.model_path)
                if self.is_main:
                    done: Future = Future()
                    done.set_result((res.path, time.perf_counter() - t0))
                    self.pending = (str(version), done)
                return
            # Not shared: every process takes part in gathering the parameters; process 0 writes and posts.
            params = multihost_utils.process_allgather(learner.params, tiled=True)
            if not self.is_main:
                return
            model = nnx.merge(learner.graphdef, params)
        if not self.is_main:
            return
        if self.distributed:  # broadcast in finish(): nothing to write meanwhile
            self.pending = (str(version), model)
            return
        t0 = time.perf_counter()

        def write():
            path = write_weights(model, str(version), self.sync_dir, dtype=self.dtype, source_dir=self.model_path)
            return path, time.perf_counter() - t0

        # The next update (which donates the parameters) comes after the next rollout, which waits
        # for this write: the thread never reads a donated array.
        self.pending = (str(version), self.pool.submit(write))

    def finish(self, rollouts: Rollouts, m: dict | None = None) -> None:
        """The servers load the written weights (nothing to do when none are pending)."""
        if self.pending is None:
            return
        version, written = self.pending
        self.pending = None
        if self.distributed:  # the parameters are donated only by the next update
            rollouts.broadcast(written, version, self.dtype)
            return
        path, write_s = written.result()
        rollouts.publish(path, version)
        if m is not None:
            m["timing_s/sync_write"] = write_s  # in the background thread, overlapping the previous step's end

    def close(self) -> None:
        self.pool.shutdown(wait=True)


def score(samples: list, examples: list, reward_pool: RewardPool, tokenizer, *, main_rollout: bool,
          prompt_len: int, response_len: int, pad_id: int) -> tuple[Batch, dict]:
    """The reward stage: every sample decoded, scored against its prompt's answer and packed."""
    rows = [(i, s) for i, group in enumerate(samples) for s in group]
    outputs = [list(s.output_ids)[:response_len] for _, s in rows]
    texts = tokenizer.batch_decode(outputs, skip_special_tokens=True)
    scored = reward_pool.score(texts, [examples[i].answer for i, _ in rows])
    batch = pack([list(examples[i].prompt_ids) for i, _ in rows], outputs, scored.scores,
                 [i for i, _ in rows], [s.truncated for _, s in rows], main_rollout=main_rollout,
                 prompt_len=prompt_len, response_len=response_len, pad_id=pad_id)
    return batch, {"reward/timeouts": float(scored.timeouts), "reward/crashes": float(scored.crashes)}
