"""The embedded SGLang-compatible HTTP server (SGLang 0.5.23 native API) on the JAX sampler.

    python -m aepo_jax.rollout.server --model-path DIR --port N [--host 127.0.0.1] [--mesh DxT]

This module is the command line and process control; the server itself is ``app.py`` (HTTP
handlers), ``scheduler.py`` (batching), ``sampler.py`` (generation), ``protocol.py`` /
``contract.py`` (request validation) and ``responses.py`` (response bodies); see docs/rollout.md.
It imports nothing that starts jax at module level: ``main`` sets the host device count first.

Endpoints: ``POST|PUT /generate``, ``GET /health``, ``/health_generate``, ``/ready``, ``/model_info``
(+``/get_model_info``), ``/server_info`` (+``/get_server_info``), ``POST /update_weights_from_disk``,
``/update_weight_version``, ``GET|POST /flush_cache``, ``POST /abort_request``, ``/pause_generation``,
``/continue_generation``, ``/init_weights_update_group``, ``/update_weights_from_distributed``,
``/destroy_weights_update_group`` (gloo; see docs/weight_sync.md).
"""

from __future__ import annotations

import argparse
import ctypes
import logging
import os
import signal
import sys
from dataclasses import dataclass

from aepo_jax.platform import mesh_spec_from_argv, setup_host_devices
from aepo_jax.compilation_cache import setup_compilation_cache


@dataclass
class ServerArgs:
    model_path: str
    host: str = "127.0.0.1"
    port: int = 30000
    dtype: str = "float32"
    mesh: str | None = None
    skip_tokenizer_init: bool = False
    weight_version: str = "default"
    context_length: int | None = None
    max_batch: int = 64
    batch_wait_ms: float = 5.0
    random_seed: int | None = None
    prompt_buckets: tuple[int, ...] = ()
    gen_buckets: tuple[int, ...] = ()
    batch_buckets: tuple[int, ...] = ()
    warmup: bool = True
    served_model_name: str | None = None
    # Per-request limits: a 100-byte body must not be able to take the host's memory.
    max_n: int = 64
    max_rows_per_request: int = 4096
    max_body_bytes: int = 64 << 20


def _int_list(s: str) -> tuple[int, ...]:
    return tuple(int(x) for x in s.split(",") if x.strip()) if s else ()


def parse_args(argv: list[str] | None = None) -> ServerArgs:
    d = ServerArgs(model_path="")
    p = argparse.ArgumentParser(prog="python -m aepo_jax.rollout.server",
                                description="SGLang-compatible generation server on the aepo-jax JAX sampler")
    p.add_argument("--model-path", "--model", required=True, help="HF checkpoint directory (config.json + safetensors)")
    p.add_argument("--host", default=d.host)
    p.add_argument("--port", type=int, default=d.port)
    p.add_argument("--dtype", default=d.dtype, help="parameter/compute dtype (float32 or bfloat16)")
    p.add_argument("--mesh", default=None, help="device mesh DxT (e.g. 2x1); default: one device")
    p.add_argument("--skip-tokenizer-init", action="store_true", help="token ids only (no text in or out)")
    p.add_argument("--weight-version", default=d.weight_version)
    p.add_argument("--context-length", type=int, default=None, help="default: max_position_embeddings")
    p.add_argument("--max-running-requests", "--max-batch", dest="max_batch", type=int, default=d.max_batch,
                   help="most sequences in one compiled batch")
    p.add_argument("--batch-wait-ms", type=float, default=d.batch_wait_ms,
                   help="wait this long to gather concurrent requests")
    p.add_argument("--random-seed", type=int, default=None, help="seeds the draws of requests without sampling_seed")
    p.add_argument("--prompt-buckets", default="", help="comma-separated prompt length buckets")
    p.add_argument("--gen-buckets", default="", help="comma-separated generation length buckets")
    p.add_argument("--batch-buckets", default="", help="comma-separated batch size buckets (default: powers of 2)")
    p.add_argument("--skip-server-warmup", action="store_true")
    p.add_argument("--served-model-name", default=None)
    p.add_argument("--max-n", type=int, default=d.max_n, help="largest sampling_params.n a request may ask for")
    p.add_argument("--max-rows-per-request", type=int, default=d.max_rows_per_request,
                   help="most sequences (prompts x n) in one /generate call")
    p.add_argument("--max-body-mb", type=float, default=d.max_body_bytes / 2**20,
                   help="largest request body in MiB (larger: 413)")
    p.add_argument("--log-level", default="warning")
    a = p.parse_args(argv)
    logging.basicConfig(level=getattr(logging, a.log_level.upper(), logging.WARNING),
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    for flag, v in (("--max-running-requests", a.max_batch), ("--max-n", a.max_n),
                    ("--max-rows-per-request", a.max_rows_per_request)):
        if v < 1:
            p.error(f"{flag} must be >= 1, got {v}")
    if not a.max_body_mb > 0:
        p.error(f"--max-body-mb must be > 0, got {a.max_body_mb}")
    try:
        buckets = [_int_list(a.prompt_buckets), _int_list(a.gen_buckets), _int_list(a.batch_buckets)]
    except ValueError as e:
        p.error(f"buckets must be comma-separated integers: {e}")
    return ServerArgs(model_path=a.model_path, host=a.host, port=a.port, dtype=a.dtype, mesh=a.mesh,
                      skip_tokenizer_init=a.skip_tokenizer_init, weight_version=a.weight_version,
                      context_length=a.context_length, max_batch=a.max_batch, batch_wait_ms=a.batch_wait_ms,
                      random_seed=a.random_seed, prompt_buckets=buckets[0], gen_buckets=buckets[1],
                      batch_buckets=buckets[2], warmup=not a.skip_server_warmup,
                      served_model_name=a.served_model_name, max_n=a.max_n,
                      max_rows_per_request=a.max_rows_per_request, max_body_bytes=int(a.max_body_mb * 2**20))


def die_with_parent() -> None:
    """When started by ``launch.start_server`` (which sets ``AEPO_JAX_PARENT_PID``), have Linux send
    SIGTERM to this server when that parent dies, even by SIGKILL (strictly: when the parent *thread*
    that started it exits, so start servers from a long-lived thread). Done here rather than in a
    ``preexec_fn``: running Python between fork and exec in a multithreaded (jax) parent can deadlock."""
    parent = os.environ.get("AEPO_JAX_PARENT_PID")
    if not parent or not sys.platform.startswith("linux"):
        return
    pr_set_pdeathsig = 1
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGTERM))
    except OSError:  # not glibc: the server then stops only on a clean exit of its parent
        return
    if os.getppid() != int(parent):  # the parent died before prctl took effect
        sys.exit("parent process exited before the server started")


def main(argv: list[str] | None = None) -> None:
    die_with_parent()
    setup_host_devices(mesh_spec_from_argv(argv))  # before anything imports jax
    setup_compilation_cache()  # JAX's persistent cache: as a launching trainer set it, else auto
    args = parse_args(argv)
    if not os.path.isdir(args.model_path):
        sys.exit(f"--model-path: {args.model_path!r} is not a directory")
    from aiohttp import web

    from aepo_jax.rollout.app import RolloutServer, make_app  # imports jax: after the device flags

    web.run_app(make_app(RolloutServer(args)), host=args.host, port=args.port, print=None,
                access_log=None, handle_signals=True, handler_cancellation=True)


if __name__ == "__main__":
    main()
