"""Host-device set-up that must happen before jax initialises its backends.

On a machine with only CPUs, a mesh such as ``--mesh=8x1`` needs 8 devices. XLA can split the
host into N virtual devices with ``--xla_force_host_platform_device_count=N``, but only if the flag
is in ``XLA_FLAGS`` before the first jax backend call. Entry points (``python -m aepo_jax.train``,
the server, tools) call :func:`setup_host_devices` with the requested mesh before importing jax.
The flag only affects the CPU ("host") platform, so it is harmless on GPU and TPU hosts.

This module deliberately imports nothing but the standard library.
"""

from __future__ import annotations

import os
import re
import sys

_FLAG = "--xla_force_host_platform_device_count"


def parse_mesh_spec(spec: str) -> tuple[int, int]:
    """Parse ``"DxT"`` into ``(D, T)``; raise ValueError naming the field on bad input."""
    m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", str(spec))
    if not m or int(m.group(1)) < 1 or int(m.group(2)) < 1:
        raise ValueError(f"mesh: expected 'DxT' with positive integers (e.g. '8x1', '4x2'), got {spec!r}")
    return int(m.group(1)), int(m.group(2))


def mesh_spec_from_argv(argv: list[str] | None = None) -> str | None:
    """Find ``--mesh=DxT`` / ``--mesh DxT`` in argv without a full parse (jax is not imported yet)."""
    argv = sys.argv[1:] if argv is None else argv
    for i, a in enumerate(argv):
        if a.startswith("--mesh="):
            return a.split("=", 1)[1]
        if a == "--mesh" and i + 1 < len(argv):
            return argv[i + 1]
    return None


def setup_host_devices(mesh_spec: str | None) -> int:
    """Make at least D*T host devices visible if jax has not initialised yet.

    Returns the number of host devices requested (1 when nothing was changed).
    """
    if not mesh_spec:
        return 1
    d, t = parse_mesh_spec(mesh_spec)
    n = d * t
    if n <= 1:
        return 1
    # If a jax backend already exists the flag comes too late and changes nothing (make_mesh then
    # reports the device count); jax offers no public way to ask, and setting it is harmless.
    flags = os.environ.get("XLA_FLAGS", "")
    if _FLAG in flags:
        return n
    os.environ["XLA_FLAGS"] = (flags + f" {_FLAG}={n}").strip()
    return n


LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup_cli_logging(level: str | int = "INFO") -> None:
    """Root logging for a command-line entry point: ``level`` and :data:`LOG_FORMAT` on stderr.

    ``logging.basicConfig`` alone is not enough: importing orbax logs through absl, which calls
    ``basicConfig()`` itself when the root logger has no handler, so the root logger already has a
    WARNING-level stderr handler by the time ``main`` runs and a second ``basicConfig`` is a no-op
    (the run's INFO lines, the start-up summary among them, were never printed). Plain stderr
    handlers made that way are re-formatted; other handlers (a test harness's) are left alone.
    """
    import logging  # noqa: PLC0415

    root = logging.getLogger()
    plain = [h for h in root.handlers if type(h) is logging.StreamHandler and getattr(h, "stream", None) is sys.stderr]
    if not root.handlers:
        logging.basicConfig(level=level, format=LOG_FORMAT)
        return
    root.setLevel(level)
    for h in plain:
        h.setFormatter(logging.Formatter(LOG_FORMAT))
