"""Start an embedded server as a subprocess and wait until it is healthy (tests, tools, the trainer)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@dataclass
class ServerProcess:
    proc: subprocess.Popen
    url: str
    log_path: str | None = None

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def log_tail(self, n: int = 4000) -> str:
        if not self.log_path or not os.path.exists(self.log_path):
            return ""
        with open(self.log_path, errors="replace") as f:
            return f.read()[-n:]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def start_server(model_path: str, *, port: int | None = None, host: str = "127.0.0.1",
                 extra_args: list[str] | tuple[str, ...] = (), env: dict | None = None,
                 log_path: str | None = None) -> ServerProcess:
    """Start ``python -m aepo_jax.rollout.server`` in a subprocess without waiting for it."""
    port = port or free_port(host)
    cmd = [sys.executable, "-m", "aepo_jax.rollout.server", "--model-path", str(model_path),
           "--host", host, "--port", str(port), *extra_args]
    e = dict(os.environ)
    e.update(env or {})
    out = open(log_path, "w") if log_path else subprocess.DEVNULL
    # The server asks the kernel to stop it when this process dies (see server.die_with_parent):
    # a learner killed with SIGKILL runs no cleanup, and must not leave a server holding a port.
    e["AEPO_JAX_PARENT_PID"] = str(os.getpid())
    proc = subprocess.Popen(cmd, env=e, stdout=out, stderr=subprocess.STDOUT if log_path else subprocess.DEVNULL)
    if log_path:
        out.close()  # the child holds its own descriptor
    return ServerProcess(proc, f"http://{host}:{port}", log_path)


def launch_server(model_path: str, *, port: int | None = None, host: str = "127.0.0.1",
                  extra_args: list[str] | tuple[str, ...] = (), env: dict | None = None,
                  wait_s: float = 300.0, log_path: str | None = None) -> ServerProcess:
    """``python -m aepo_jax.rollout.server`` in a subprocess; returns once ``/health`` is 200."""
    sp = start_server(model_path, port=port, host=host, extra_args=extra_args, env=env, log_path=log_path)
    wait_healthy(sp, wait_s)
    return sp


def launch_servers(model_path: str, count: int, *, wait_s: float = 300.0, log_dir: str | None = None,
                   **kw) -> list[ServerProcess]:
    """Start ``count`` servers at once (their start-ups overlap), then wait for all of them."""
    sps = [start_server(model_path, log_path=os.path.join(log_dir, f"server{i}.log") if log_dir else None, **kw)
           for i in range(count)]
    try:
        for sp in sps:
            wait_healthy(sp, wait_s)
    except BaseException:
        for sp in sps:
            sp.kill()
        raise
    return sps


def wait_healthy(sp: ServerProcess, wait_s: float) -> None:
    proc = sp.proc
    cmd = proc.args
    t_end = time.monotonic() + wait_s
    while time.monotonic() < t_end:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} during start-up: {cmd}\n{sp.log_tail()}")
        try:
            with urllib.request.urlopen(sp.url + "/health", timeout=2) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.2)
    sp.kill()
    raise TimeoutError(f"server not healthy after {wait_s}s: {cmd}\n{sp.log_tail()}")
