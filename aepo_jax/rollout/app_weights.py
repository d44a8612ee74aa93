"""The embedded server's weight endpoints, with SGLang's names and bodies: a new checkpoint from disk,
a broadcast over the distributed update group (``dist_recv``), and the version label alone.

A mixin of ``app.RolloutServer`` (which holds ``args``, ``status``, ``sampler``, ``scheduler``,
``receiver``, ``model_path`` and the sampler's executor). Every swap happens under the scheduler's
write lock, so it waits for the ``/generate`` calls in flight and lands between two batches.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import time
from typing import Any

from aiohttp import web

from aepo_jax.rollout.contract import RequestError, bad_request, parse_json

log = logging.getLogger("aepo_jax.rollout.server")


def json_response(obj: Any, status: int = 200) -> web.Response:
    """A JSON response; a NaN or infinity anywhere is a bug, never sent as a bare ``NaN``."""
    return web.json_response(obj, status=status, dumps=lambda o: json.dumps(o, allow_nan=False))



# A full collection walks every object of a process that has imported and traced jax (~250k):
# 0.15-0.9 s per call on a 2-core CPU, on the critical path of every sync. Worth it only where the
# copy it frees is big.
RELEASE_WEIGHTS_BYTES = 256 << 20


def _release_old_weights(sampler) -> None:
    """The replaced model's parameters hang in reference cycles (the module graph); collect them
    now, so that a server holds two copies of the weights only during a swap, not until the next
    garbage collection happens to run (a third copy at the next sync). Weights under
    ``RELEASE_WEIGHTS_BYTES`` are left to the ordinary collector: a copy of them costs less than
    the pause (a toy model's sync went from 0.05 to 0.6 s)."""
    import jax

    _, state = sampler.weights()
    if sum(x.nbytes for x in jax.tree.leaves(state)) >= RELEASE_WEIGHTS_BYTES:
        gc.collect()


class WeightEndpoints:
    @contextlib.asynccontextmanager
    async def _exclusive(self):
        """No ``/generate`` call runs inside: waits for those in flight, holds new ones back."""
        await self.scheduler.lock.acquire_write()
        try:
            yield
        finally:
            await self.scheduler.lock.release_write()

    async def update_weights_from_disk(self, request: web.Request) -> web.Response:
        body = parse_json(await request.read(), object_required=True) or {}
        path = body.get("model_path")
        if not isinstance(path, str) or not path:
            raise bad_request("a non-empty string is required", "model_path")
        version = body.get("weight_version")
        if version is not None and not isinstance(version, str):
            raise bad_request("must be a string or null", "weight_version")
        for name in ("abort_all_requests", "flush_cache", "is_async", "keep_pause", "torch_empty_cache",
                     "recapture_cuda_graph"):
            if name in body and not isinstance(body[name], bool):
                raise bad_request("must be a boolean", name)
        if self.status != "ready":
            raise RequestError(400, {"success": False, "message": f"server is {self.status}", "num_paused_requests": 0})
        sched = self.scheduler
        if body.get("abort_all_requests"):
            sched.abort(lambda p: True)
        async with self._exclusive():
            t0 = time.time()
            try:
                await asyncio.get_running_loop().run_in_executor(self._executor, self.sampler.load_weights, path, version)
            except Exception as e:
                raise RequestError(400, {"success": False, "num_paused_requests": 0,
                                         "message": f"Failed to update weights: {e}.\nRolling back to original weights."})
            self.model_path = path
            _release_old_weights(self.sampler)
            msg = "Succeeded to update model weights." + (f" Weight version updated to {version}." if version else "")
            log.info("%s (%.2fs, %s)", msg, time.time() - t0, path)
            return json_response({"success": True, "message": msg, "num_paused_requests": 0})

    async def init_weights_update_group(self, request: web.Request) -> web.Response:
        req = self.receiver.parse_init(parse_json(await request.read(), object_required=True))
        self._require_ready()
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self.receiver.thread, self.receiver.join, req)
        except Exception as e:
            log.exception("init_weights_update_group failed")
            raise RequestError(400, {"success": False, "message": f"Failed to init group: {type(e).__name__}: {e}."})
        return json_response({"success": True, "message": "Succeeded to initialize custom process group."})

    async def destroy_weights_update_group(self, request: web.Request) -> web.Response:
        body = parse_json(await request.read(), object_required=True) or {}
        name = body.get("group_name", "weight_update_group")
        if not isinstance(name, str):
            raise bad_request("must be a string", "group_name")
        ok, msg = self.receiver.destroy(name)
        return json_response({"success": ok, "message": msg}, status=200 if ok else 400)

    async def update_weights_from_distributed(self, request: web.Request) -> web.Response:
        """Receive one broadcast (a flattened bucket, or tensor by tensor) into the staged weights;
        once every tensor of the model has arrived they are swapped in at once, between two batches,
        under ``weight_version``. Generation is not paused here: the caller pauses around the sync."""
        req = self.receiver.parse_update(parse_json(await request.read(), object_required=True))
        if self.status != "ready":
            raise RequestError(400, {"success": False, "message": f"server is {self.status}"})
        sched, sampler = self.scheduler, self.sampler
        if req.abort_all_requests:
            sched.abort(lambda p: True)
        loop = asyncio.get_running_loop()
        try:
            model = await loop.run_in_executor(self.receiver.thread, self.receiver.receive, req, sampler)
            if model is not None:  # the last tensor arrived: swap, waiting for in-flight /generate calls
                async with self._exclusive():
                    sampler.swap_model(model, req.weight_version, what="update_weights_from_distributed")
                del model
                _release_old_weights(self.sampler)
                log.info("weights updated from the distributed group (weight_version=%s)", sampler.weight_version)
        except Exception as e:
            log.exception("update_weights_from_distributed failed")
            raise RequestError(400, {"success": False, "message": f"Failed to update weights: {e}."})
        return json_response({"success": True, "message": "Succeeded to update parameter online."})

    async def update_weight_version(self, request: web.Request) -> web.Response:
        body = parse_json(await request.read(), object_required=True) or {}
        v = body.get("new_version")
        if not isinstance(v, str):
            raise bad_request("a string is required", "new_version")
        self._require_ready()
        if body.get("abort_all_requests", True):
            self.scheduler.abort(lambda p: True)
        async with self._exclusive():
            self.sampler.set_weight_version(v)
        return json_response({"success": True, "message": f"Weight version updated to {v}", "new_version": v})
