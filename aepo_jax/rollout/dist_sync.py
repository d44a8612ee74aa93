"""Learner parameters -> every inference server over SGLang's distributed update API (no disk).

    sync = DistributedWeightSync(client, bucket_mb=512)     # backend: nccl on GPU, gloo on CPU
    await sync.connect()                                    # once: the servers join our group
    res = await sync.sync(model, "12", dtype="bfloat16")    # per step
    await sync.close()

Per sync:

1. ``POST /pause_generation`` on every server (SGLang's RL recipe: pause -> update -> continue).
2. The HF tensors (names and layout of ``hf_io.hf_device_tensors``, cast to ``dtype`` on the
   devices) are grouped into buckets of at most ``bucket_mb``. For each bucket, one jitted function
   bitcasts them to uint8 and concatenates them on one device; ``torch.from_dlpack`` wraps the
   result without a copy (on a GPU it stays in GPU memory: no host round trip) and rank 0 of the
   group broadcasts it while ``POST /update_weights_from_distributed {"load_format":
   "flattened_bucket", ...}`` is in flight on every server. The next bucket is dispatched to the
   devices before the current one is sent, so its preparation overlaps the transfer.
3. ``GET /model_info`` on every server must report the new ``weight_version`` (as the disk path).
4. ``POST /continue_generation``, also after a failure (a failed sync raises ``WeightSyncError``).

Rank layout as SGLang expects it: the learner is rank 0; server ``k`` (``tp_size`` ranks, read from
its ``/server_info``) gets ``rank_offset = 1 + sum of the earlier servers' tp_size``.
The learner must be one process (``jax.process_count() == 1``); a multi-host learner uses the disk
path (``rollout.sync=disk``, which writes per process).
"""

from __future__ import annotations

import asyncio
import dataclasses
import socket
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from aepo_jax.models import hf_device_tensors, hf_tensor_specs
from aepo_jax.models.hf_layout import hf_host_tensors, host_path
from aepo_jax.rollout.dist_group import BucketLayout, join_group, leave_group, plan_buckets, require_torch
from aepo_jax.rollout.weight_sync import WeightSyncError, verify_weight_version


@dataclasses.dataclass
class DistSyncResult:
    weight_version: str
    bytes: int
    buckets: int
    pause_s: float
    send_s: float  # preparing and broadcasting every bucket (overlapped)
    verify_s: float
    servers: list[str]
    broadcast_s: float = 0.0  # of send_s: inside the broadcasts themselves (the transfer)
    wait_s: float = 0.0  # of send_s: waiting for buckets to be ready on the devices (learner layout work not hidden)
    tail_s: float = 0.0  # of send_s: from the end of the last broadcast to the last server's answer (its swap)

    @property
    def total_s(self) -> float:
        return self.pause_s + self.send_s + self.verify_s

    @property
    def gbps(self) -> float:
        return self.bytes / max(self.send_s, 1e-9) / 1e9


def _local_address(urls: list[str]) -> str:
    """The address servers reach this process at: loopback when every server is local, else the
    address this host uses to reach the first server."""
    from urllib.parse import urlparse

    hosts = {urlparse(u).hostname for u in urls}
    if hosts <= {"127.0.0.1", "localhost", "::1"}:
        return "127.0.0.1"
    host = next(h for h in hosts if h not in ("127.0.0.1", "localhost", "::1"))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((host, 9))  # no packet is sent: this only picks the outgoing interface
        return s.getsockname()[0]


def _free_port(address: str) -> int:
    with socket.socket() as s:
        s.bind((address, 0))
        return s.getsockname()[1]


@jax.jit
def _flatten(*arrays):
    """The arrays (one dtype) raveled and concatenated, in order, on the device: the bucket's bytes
    in that dtype (torch views them as uint8 without a copy; a bitcast here would cost a relayout)."""
    return jnp.concatenate([a.reshape(-1) for a in arrays])


class _HostBuckets:
    """The buckets of one sync of a model on one CPU device: every HF tensor is written by
    :func:`hf_host_tensors` straight into its place in a bucket buffer. The two buffers alternate
    (one in flight, the next being filled) and are kept for the next sync, so a sync touches no
    fresh memory (first-touch page faults cost more than the copies here). A tensor of the next
    bucket that is produced early (q/k/v and gate/up come together) waits in a temporary."""

    def __init__(self, model, dt, bufs: list[np.ndarray]):
        self.dt, self.bufs, self.n = dt, bufs, 0
        self.views: dict[str, np.ndarray] = {}
        self.early: dict[str, np.ndarray] = {}
        self.tensors = hf_host_tensors(model, dt, lambda name: self.views.get(name))

    def fill(self, layout: BucketLayout) -> np.ndarray:
        k = self.n % 2
        self.n += 1
        if self.bufs[k].size < layout.total_bytes:
            self.bufs[k] = np.empty(layout.total_bytes, np.uint8)
        buf = self.bufs[k][:layout.total_bytes]
        self.views = {n: a for n, a in layout.unflatten(buf).items()}
        todo = set(layout.names)
        for name in list(self.early):
            if name in todo:
                np.copyto(self.views[name], self.early.pop(name))
                todo.discard(name)
        while todo:
            name, a = next(self.tensors)
            if name in todo:
                if a is not self.views[name]:
                    np.copyto(self.views[name], a)
                todo.discard(name)
            else:
                self.early[name] = a
        self.views = {}
        return buf


class DistributedWeightSync:
    def __init__(self, client, *, bucket_mb: float = 512.0, master_address: str | None = None,
                 master_port: int = 0, group_name: str = "weight_update_group", backend: str = "auto",
                 timeout_s: float = 600.0, pause_mode: str = "abort"):
        self.torch = require_torch()
        if not bucket_mb > 0:
            raise ValueError(f"rollout.sync_bucket_mb must be > 0, got {bucket_mb!r}")
        if backend not in ("auto", "nccl", "gloo"):
            raise ValueError(f"rollout.sync_backend must be auto, nccl or gloo, got {backend!r}")
        self.client = client
        self.bucket_bytes = int(bucket_mb * 2**20)
        self.master_address = master_address
        self.master_port = int(master_port)
        self.group_name = group_name
        self.device = jax.devices()[0]
        self.backend = ("nccl" if self.device.platform == "gpu" else "gloo") if backend == "auto" else backend
        self.timeout_s = timeout_s
        self.pause_mode = pause_mode
        self.group = None
        self.world_size = 0
        self._host_bufs: list[np.ndarray] | None = None  # a CPU learner's two bucket buffers, reused every sync

    # ------------------------------------------------------------------ group
    async def connect(self) -> None:
        """Every server joins our process group (POST /init_weights_update_group) while we join as
        rank 0; returns when all have."""
        if self.group is not None:
            return
        if jax.process_count() > 1:
            raise WeightSyncError("rollout.sync=distributed needs a single-process learner (process 0 cannot address "
                                  "the other processes' parameter shards); use rollout.sync=disk")
        urls = self.client.weight_update_urls
        infos = await asyncio.gather(*(self.client.server_info(u) for u in urls))
        tp = [int(i.get("tp_size", 1) or 1) * int(i.get("pp_size", 1) or 1) for i in infos]
        self.world_size = 1 + sum(tp)
        addr = self.master_address or _local_address(urls)
        port = self.master_port or _free_port(addr if addr != "0.0.0.0" else "")
        offsets = [1 + sum(tp[:k]) for k in range(len(urls))]
        inits = [asyncio.ensure_future(self.client.init_weights_update_group(
            u, master_address=addr, master_port=port, rank_offset=o, world_size=self.world_size,
            group_name=self.group_name, backend=self.backend, timeout_s=self.timeout_s)) for u, o in zip(urls, offsets)]
        join = asyncio.ensure_future(asyncio.to_thread(join_group, addr, port, 0, self.world_size, self.group_name,
                                                       self.backend, self.timeout_s))
        try:
            # a server that refuses fails the connect at once (our join would only time out)
            done, _ = await asyncio.wait([join, *inits], return_when=asyncio.FIRST_EXCEPTION)
            for t in done:
                if t.exception() is not None:
                    raise t.exception()
            self.group = await join
            await asyncio.gather(*inits)
        except BaseException as e:
            for t in inits:
                t.cancel()
            await asyncio.gather(*inits, return_exceptions=True)
            if join.done() and not join.cancelled() and join.exception() is None:
                leave_group(join.result())
            self.group = None
            if isinstance(e, Exception):
                raise WeightSyncError(f"the servers {urls} could not join the weight-update group at "
                                      f"{addr}:{port} ({self.backend}): {e}") from e
            raise

    async def close(self) -> None:
        if self.group is None:
            return
        try:
            await self.client.destroy_weights_update_group(self.group_name)
        finally:
            leave_group(self.group)
            self.group = None

    # ------------------------------------------------------------------ one sync
    def _prepare(self, stream, specs, idxs: list[int], dt) -> tuple[BucketLayout, Any]:
        """The next bucket (the HF tensors ``idxs`` of ``stream``), ready to send: its layout and its
        bytes as a torch tensor (on a GPU: device memory, no host copy)."""
        torch = self.torch
        layout = BucketLayout.of([specs[i][0] for i in idxs], [dt.name] * len(idxs), [specs[i][1] for i in idxs])
        if isinstance(stream, _HostBuckets):
            return layout, torch.from_numpy(stream.fill(layout))
        arrays = [next(stream)[1] for _ in idxs]
        flat = _flatten(*[jax.device_put(a, self.device) for a in arrays]).block_until_ready()
        return layout, torch.from_dlpack(flat).view(torch.uint8)  # zero copy: the JAX buffer itself

    def _broadcast(self, t) -> tuple[float, float]:
        """Send one bucket; returns (the seconds the broadcast took, the perf_counter time it ended)."""
        torch = self.torch
        t0 = time.perf_counter()
        torch.distributed.broadcast(t, src=0, group=self.group)
        if t.is_cuda:
            torch.cuda.synchronize(t.device)
        t1 = time.perf_counter()
        return t1 - t0, t1

    async def sync(self, model, weight_version: str | int, *, dtype: Any = None, verify: bool = True) -> DistSyncResult:
        """Make every server serve ``model``'s weights as ``weight_version`` (see the module doc)."""
        await self.connect()
        version = str(weight_version)
        if dtype is None:
            dtype = getattr(model, "param_dtype", "float32")
        t0 = time.perf_counter()
        await self.client.pause_generation(self.pause_mode)
        t1 = time.perf_counter()
        total = nb = 0
        bcast_s = wait_s = 0.0
        sent_at = t1
        dt = jnp.dtype(dtype)
        specs = hf_tensor_specs(model.cfg)
        plan = plan_buckets(specs, dt.itemsize, self.bucket_bytes)
        if host_path(model):  # a CPU learner: each tensor converted on the host straight into its bucket
            if self._host_bufs is None:
                self._host_bufs = [np.empty(0, np.uint8), np.empty(0, np.uint8)]
            tensors = _HostBuckets(model, dt, self._host_bufs)
        else:
            tensors = hf_device_tensors(model, dt)  # lazily: one parameter's transform at a time
        prep = asyncio.ensure_future(asyncio.to_thread(self._prepare, tensors, specs, plan[0], dt))
        try:
            for k in range(len(plan)):
                tw = time.perf_counter()
                layout, buf = await prep
                wait_s += time.perf_counter() - tw
                post = asyncio.ensure_future(self.client.update_weights_from_distributed(
                    layout.names, layout.dtypes, layout.shapes, weight_version=version, group_name=self.group_name,
                    load_format="flattened_bucket", timeout_s=self.timeout_s))
                send = asyncio.ensure_future(asyncio.to_thread(self._broadcast, buf))
                # the next bucket is prepared (layout transforms, concatenation) while this one is in flight
                prep = (asyncio.ensure_future(asyncio.to_thread(self._prepare, tensors, specs, plan[k + 1], dt))
                        if k + 1 < len(plan) else None)
                await asyncio.wait({send, post}, return_when=asyncio.FIRST_COMPLETED)
                if post.done() and post.exception() is not None and not send.done():
                    # A server refused the bucket before receiving it: the broadcast cannot complete
                    # and the group is unusable (its pending operation times out in the background).
                    self.group = None
                    raise WeightSyncError(f"weight sync {version!r}, bucket {nb}: {post.exception()}") from post.exception()
                res = await asyncio.gather(send, post, return_exceptions=True)
                for r in res:
                    if isinstance(r, BaseException):
                        raise WeightSyncError(f"weight sync {version!r}, bucket {nb}: {r}") from r
                bcast_s += res[0][0]
                sent_at = res[0][1]
                total += layout.total_bytes
                nb += 1
            t2 = time.perf_counter()
            servers = (await verify_weight_version(self.client, version, "update_weights_from_distributed")
                       if verify else [])
            t3 = time.perf_counter()
        finally:
            if prep is not None:  # a failed sync: let the bucket in preparation finish, unused
                await asyncio.gather(prep, return_exceptions=True)
            await self.client.continue_generation()
        return DistSyncResult(version, total, nb, t1 - t0, t2 - t1, t3 - t2, servers, bcast_s, wait_s, t2 - sent_at)
