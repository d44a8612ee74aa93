"""The embedded server's end of SGLang's distributed weight update.

``/init_weights_update_group`` joins the learner's process group (``dist_group.join_group``, the
way an SGLang engine rank does; this server is one rank, ``rank_offset``), and
``/update_weights_from_distributed`` receives one broadcast per request: a flattened uint8 bucket
(``load_format: "flattened_bucket"``) or the tensors one by one (``load_format: null``). Received
tensors are converted to the model's layout on the devices as they arrive (``hf_layout.HFAssembler``:
each layer written into its stacked parameter in place); when every HF tensor of the served model
has arrived they are a new model that the handler swaps in atomically. A sync is therefore one or more
requests that together cover the model, and the ``weight_version`` of the request that completes
it is the one served (SGLang instead loads each request's tensors into the live model at once,
which is why its RL recipe pauses generation around a sync; our clients pause too).

Bodies are checked field by field against SGLang 0.5.23's request structs
(``InitWeightsUpdateGroupReqInput``, ``UpdateWeightsFromDistributedReqInput``): a wrong type is a
400 naming the field, before anything is received.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import threading
import time
from typing import Any

import numpy as np

from aepo_jax.models.hf_layout import HFAssembler, aligned_empty, on_cpu
from aepo_jax.rollout.contract import bad_request
from aepo_jax.rollout.dist_group import DTYPES, BucketLayout, join_group, leave_group, np_dtype, require_torch

log = logging.getLogger("aepo_jax.rollout.server")


_REQUIRED = object()


def _fields(body: Any, spec: dict[str, tuple[Any, Any]]) -> dict[str, Any]:
    """``spec``: field -> (accepted types, default or _REQUIRED). Unknown keys are ignored, as
    SGLang's FastAPI models do; a missing required field or a wrong type is a 400 naming it."""
    if not isinstance(body, dict):
        raise bad_request("the body must be a JSON object")
    out = {}
    for name, (types, default) in spec.items():
        if name not in body:
            if default is _REQUIRED:
                raise bad_request("field required", name)
            out[name] = default
            continue
        v = body[name]
        ok = isinstance(v, types) and not (isinstance(v, bool) and bool not in (types if isinstance(types, tuple) else (types,)))
        if not ok:
            raise bad_request(f"must be {types.__name__ if isinstance(types, type) else ' or '.join(t.__name__ for t in types)}, "
                              f"got {type(v).__name__}", name)
        out[name] = v
    return out


@dataclasses.dataclass(frozen=True)
class InitGroupRequest:
    master_address: str
    master_port: int
    rank_offset: int
    world_size: int
    group_name: str
    backend: str


@dataclasses.dataclass(frozen=True)
class UpdateRequest:
    layout: BucketLayout
    group_name: str
    load_format: str | None
    weight_version: str | None
    flush_cache: bool
    abort_all_requests: bool


class WeightReceiver:
    """The process groups this server joined and the tensors staged for the next swap."""

    def __init__(self):
        self.thread = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="weight-receiver")
        self.groups: dict[str, Any] = {}
        self.staged = None  # HFAssembler of the sync in progress: the tensors received so far, converted
        self._lock = threading.Lock()
        self._recv = np.empty(0, np.uint8)

    def close(self) -> None:
        for pg in self.groups.values():
            leave_group(pg)
        self.groups.clear()
        self.thread.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------------ bodies
    @staticmethod
    def parse_init(body: Any) -> InitGroupRequest:
        f = _fields(body, {"master_address": (str, _REQUIRED), "master_port": (int, _REQUIRED),
                           "rank_offset": (int, _REQUIRED), "world_size": (int, _REQUIRED),
                           "group_name": (str, "weight_update_group"), "backend": (str, "nccl")})
        if f["backend"] not in ("nccl", "gloo"):
            raise bad_request(f"must be 'nccl' or 'gloo', got {f['backend']!r}", "backend")
        if not 0 < f["world_size"]:
            raise bad_request("must be > 0", "world_size")
        if not 0 <= f["rank_offset"] < f["world_size"]:
            raise bad_request(f"must be in [0, world_size={f['world_size']})", "rank_offset")
        if not 0 < f["master_port"] < 65536:
            raise bad_request("must be a TCP port (1-65535)", "master_port")
        if not f["group_name"]:
            raise bad_request("must not be empty", "group_name")
        return InitGroupRequest(**f)

    @staticmethod
    def parse_update(body: Any) -> UpdateRequest:
        f = _fields(body, {"names": (list, _REQUIRED), "dtypes": (list, _REQUIRED), "shapes": (list, _REQUIRED),
                           "group_name": (str, "weight_update_group"), "flush_cache": (bool, True),
                           "abort_all_requests": (bool, False), "weight_version": ((str, type(None)), None),
                           "load_format": ((str, type(None)), None), "selector": (str, "all"),
                           "torch_empty_cache": (bool, False)})
        names, dtypes, shapes = f["names"], f["dtypes"], f["shapes"]
        for i, n in enumerate(names):
            if not isinstance(n, str):
                raise bad_request("must be a list of strings", f"names[{i}]")
        for i, d in enumerate(dtypes):
            if d not in DTYPES:
                raise bad_request(f"must be one of {list(DTYPES)}, got {d!r}", f"dtypes[{i}]")
        for i, s in enumerate(shapes):
            if not isinstance(s, list) or not all(isinstance(x, int) and not isinstance(x, bool) for x in s):
                raise bad_request("must be a list of integers", f"shapes[{i}]")
        if f["load_format"] not in (None, "flattened_bucket"):
            raise bad_request(f"must be null or 'flattened_bucket', got {f['load_format']!r}", "load_format")
        if f["selector"] not in ("target", "draft", "all"):
            raise bad_request(f"must be 'target', 'draft' or 'all', got {f['selector']!r}", "selector")
        try:
            layout = BucketLayout.of(names, dtypes, shapes)
        except ValueError as e:
            raise bad_request(str(e), "names") from None
        return UpdateRequest(layout, f["group_name"], f["load_format"], f["weight_version"], f["flush_cache"],
                             f["abort_all_requests"])

    def _bucket_buffer(self, nbytes: int) -> np.ndarray:
        """Where a flattened bucket is received: 64-byte aligned, so its tensors reach XLA:CPU
        without another copy. On CPU the assembler has copied everything out of it when a request
        returns, so one buffer is kept and reused (no fresh pages per sync); on accelerators the
        host->device transfers may still read it, so each bucket gets its own."""
        if not on_cpu():
            return aligned_empty((nbytes,), np.uint8)
        if self._recv.size < nbytes:
            self._recv = aligned_empty((nbytes,), np.uint8)
        return self._recv[:nbytes]

    # ------------------------------------------------------------------ on the receiver thread
    def join(self, req: InitGroupRequest) -> None:
        require_torch("/init_weights_update_group")
        if req.group_name in self.groups:
            raise ValueError(f"group {req.group_name!r} already exists; destroy it first")
        # tp_rank 0 of a one-rank engine: rank = rank_offset
        self.groups[req.group_name] = join_group(req.master_address, req.master_port, req.rank_offset, req.world_size,
                                                 req.group_name, req.backend)

    def destroy(self, name: str) -> tuple[bool, str]:
        pg = self.groups.pop(name, None)
        if pg is None:
            return False, f"Group {name} not in {sorted(self.groups)}."
        leave_group(pg)
        with self._lock:
            self.staged = None  # a sync cut short leaves nothing for the next group's
        return True, "Succeeded to destroy custom process group."

    def receive(self, req: UpdateRequest, sampler) -> Any:
        """Receive the broadcast of ``req``; returns the new model once the staged tensors cover the
        served model, else None. Unknown names or shapes raise after the data is received (so the
        sender's broadcast completes and the group stays usable)."""
        torch = require_torch("/update_weights_from_distributed")
        import torch.distributed as dist

        pg = self.groups.get(req.group_name)
        if pg is None:
            raise ValueError(f"Group {req.group_name} not in {sorted(self.groups)}. "
                             "Please call `init_weights_update_group` first.")
        lay = req.layout
        t0 = time.perf_counter()
        if req.load_format == "flattened_bucket":
            flat = self._bucket_buffer(lay.total_bytes)
            dist.broadcast(torch.from_numpy(flat), src=0, group=pg)
            got = lay.unflatten(flat)
        else:  # one broadcast per tensor, in order
            got = {}
            for name, dt, shape in zip(lay.names, lay.dtypes, lay.shapes):
                t = torch.empty(shape, dtype=getattr(torch, dt))
                dist.broadcast(t, src=0, group=pg)
                got[name] = t.reshape(-1).view(torch.uint8).numpy().view(np_dtype(dt)).reshape(shape)
        log.info("received %d tensors, %.1f MB, in %.3f s", len(lay.names), lay.total_bytes / 1e6, time.perf_counter() - t0)
        with self._lock:
            asm = self.staged
            if asm is None or asm.cfg != sampler.cfg:
                asm = self.staged = HFAssembler(sampler.cfg, sampler.dtype, sampler.mesh)
            for name, a in got.items():
                if name not in asm.shape_of:
                    raise ValueError(f"{name}: not a tensor of the served model")
                if tuple(a.shape) != asm.shape_of[name]:
                    raise ValueError(f"{name}: shape {list(a.shape)}, the served model has {list(asm.shape_of[name])}")
            t1 = time.perf_counter()
            for name, a in got.items():  # converted to our layout on the devices (dispatched, not awaited)
                asm.add(name, a)
            asm.detach()  # what waits for the next bucket must not stay a view of the reused buffer
            if asm.missing():
                return None
            self.staged = None
        model = asm.finish()
        log.info("new weights assembled on the devices in %.3f s", time.perf_counter() - t1)
        return model
