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

from aepo_jax.config import ConfigError


class ServerStartError(ConfigError, RuntimeError):
    """The server did not come up (a model it cannot load, a port it cannot bind, a crash or a
    hang during load). One line: the model path, what happened, the log's last line, the log file.

    A ``ConfigError``: what fixes it is in the caller's inputs (model, server arguments, memory),
    so entry points report it like one (one line, exit status 2).
    """

    def __init__(self, model_path: str, what: str, reason: str, log_path: str | None):
        where = f"the full log is {log_path}" if log_path else "no server log was kept (pass log_path)"
        because = f": {reason}" if reason else ""
        super().__init__(f"the rollout server for model {model_path} {what}{because}; {where}")
        self.model_path, self.reason, self.log_path = model_path, reason, log_path


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@dataclass
class ServerProcess:
    proc: subprocess.Popen
    url: str
    log_path: str | None = None
    model_path: str = ""

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

    def last_log_line(self) -> str:
        """The log's last non-empty line: the exception (or argparse complaint) that ended it."""
        lines = [ln.strip() for ln in self.log_tail().splitlines() if ln.strip()]
        return lines[-1][:500] if lines else ""

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
    return ServerProcess(proc, f"http://{host}:{port}", log_path, str(model_path))


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
    """Return once ``/health`` answers 200; :class:`ServerStartError` if the server exits first
    or is not healthy within ``wait_s`` (then it is killed)."""
    proc = sp.proc
    t_end = time.monotonic() + wait_s
    while time.monotonic() < t_end:
        if proc.poll() is not None:
            raise ServerStartError(sp.model_path, f"exited with status {proc.returncode} during start-up",
                                   sp.last_log_line(), sp.log_path)
        try:
            with urllib.request.urlopen(sp.url + "/health", timeout=2) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.2)
    sp.kill()
    raise ServerStartError(sp.model_path, f"was not healthy after {wait_s:g}s (killed)", sp.last_log_line(),
                           sp.log_path)
