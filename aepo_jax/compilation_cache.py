"""JAX's persistent compilation cache: a second run of the same configuration loads its compiled
programs from disk instead of compiling them again (the trainer's update and log-prob programs,
the embedded server's sampler).

``setup_compilation_cache(setting)`` (``--train.compilation_cache``) points the cache at:

- ``auto`` (default): what ``$AEPO_JAX_COMPILATION_CACHE`` says if it is set (``off`` or a
  directory), else ``$JAX_COMPILATION_CACHE_DIR`` if that is set, else ``<cache root>/jax/<key>``,
  where the cache root is ``$AEPO_JAX_CACHE`` or ``~/.cache/aepo_jax`` (as for the toy base model)
  and ``<key>`` names the jax and jaxlib versions and a hash of the XLA/JAX flags, so different
  versions or flags never share entries (JAX's own entry keys include them too; the subdirectory
  also makes stale entries easy to delete).
- ``off`` (or ``none``, ``false``, ``0``, ``""``): no persistent cache.
- a directory: ``<directory>/<key>``.

The choice is exported to the environment (``AEPO_JAX_COMPILATION_CACHE`` and JAX's own
``JAX_COMPILATION_CACHE_DIR``), so every process this one starts (the embedded server) uses the same
cache; a process started on its own calls ``setup_compilation_cache()`` with no argument, which reads
that environment. Call it before the process compiles anything: JAX decides at its first
compilation whether the cache is in use (this module makes it decide again, but programs compiled
before are not in the cache). Every program is cached, however short its compilation: JAX's default
skips those under a second, and start-up is many short ones.

``COMPILES`` counts the XLA programs the process compiled or loaded from the cache (``jax.monitoring``
listeners, installed by ``setup_compilation_cache``).

Nothing here imports jax at module level: entry points import this module before jax starts.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
import threading
from importlib import metadata
from pathlib import Path

log = logging.getLogger(__name__)

SETTING_ENV = "AEPO_JAX_COMPILATION_CACHE"
JAX_DIR_ENV = "JAX_COMPILATION_CACHE_DIR"
OFF = ("off", "none", "false", "0", "no", "")
# Environment variables that change what XLA compiles: part of the cache subdirectory's key.
KEY_ENV = ("XLA_FLAGS", "JAX_PLATFORMS", "LIBTPU_INIT_ARGS", "JAX_ENABLE_X64", "JAX_DEFAULT_MATMUL_PRECISION")


# ----------------------------------------------------------------------------------- compilation cache
def cache_root() -> Path:
    """The project's cache directory: ``$AEPO_JAX_CACHE`` or ``~/.cache/aepo_jax``."""
    return Path(os.environ.get("AEPO_JAX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "aepo_jax"))


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "none"


def cache_key() -> str:
    """``jax<version>-jaxlib<version>-<hash of the flags>``: a subdirectory per toolchain and flags."""
    flags = "\n".join(f"{k}={os.environ.get(k, '')}" for k in KEY_ENV)
    digest = hashlib.sha256(f"{flags}\npython={sys.version_info[:2]}".encode()).hexdigest()[:12]
    return f"jax{_version('jax')}-jaxlib{_version('jaxlib')}-{digest}"


def resolve_compilation_cache(setting: str | None = None) -> Path | None:
    """The directory ``setting`` names (see the module docstring), or None when the cache is off."""
    s = "auto" if setting is None else str(setting).strip()
    if s.lower() == "auto":
        # The environment sets what "auto" means: a parent's choice, or the user's.
        inherited = os.environ.get(SETTING_ENV, "").strip()
        if inherited and inherited.lower() != "auto":
            s = inherited
        elif os.environ.get(JAX_DIR_ENV):
            return Path(os.environ[JAX_DIR_ENV])
        else:
            return cache_root() / "jax" / cache_key()
    if s.lower() in OFF:
        return None
    return Path(s).expanduser() / cache_key()


def setup_compilation_cache(setting: str | None = None) -> Path | None:
    """Turn JAX's persistent compilation cache on at ``setting``'s directory (or off); returns it.

    Exports the choice to the environment for child processes. A directory that cannot be
    created is logged (naming it and the setting) and the run goes on without a cache: the cache
    only saves time. Also starts counting compilations (``COMPILES``).
    """
    directory = resolve_compilation_cache(setting)
    if directory is None:
        os.environ[SETTING_ENV] = "off"
        os.environ.pop(JAX_DIR_ENV, None)
        _configure_jax(None)
        return None
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        log.warning("compilation cache off: cannot create %s (compilation_cache=%r): %s", directory, setting, e)
        return setup_compilation_cache("off")
    os.environ[SETTING_ENV] = "auto"  # children resolve to JAX_COMPILATION_CACHE_DIR, i.e. this directory
    os.environ[JAX_DIR_ENV] = str(directory)
    # Cache every program: start-up is many compilations under JAX's default threshold of 1 s.
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")
    _configure_jax(directory)
    return directory


def _configure_jax(directory: Path | None) -> None:
    """Apply the setting to jax itself (it reads the environment only when it is imported)."""
    import jax  # noqa: PLC0415 - after the environment is set: jax reads it at import

    jax.config.update("jax_compilation_cache_dir", str(directory) if directory else None)
    if directory is not None:
        jax.config.update("jax_persistent_cache_min_compile_time_secs",
                          float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]))
        jax.config.update("jax_persistent_cache_min_entry_size_bytes",
                          int(os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"]))
    # jax decides at its first compilation whether the cache is used (and where); make it decide
    # again with this setting (the public re-export of jax's own reset).
    from jax.experimental.compilation_cache import compilation_cache  # noqa: PLC0415

    compilation_cache.reset_cache()
    COMPILES.install()


# ----------------------------------------------------------------------------------- compile counter
class CompileCounter:
    """Counts XLA compilations (and their seconds), the seconds spent tracing and lowering to XLA
    (which the persistent cache does not save), and persistent-cache hits and misses, through
    ``jax.monitoring`` listeners (installed once per process)."""

    BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"
    HIT = "/jax/compilation_cache/cache_hits"
    MISS = "/jax/compilation_cache/cache_misses"
    SAVED = "/jax/compilation_cache/compile_time_saved_sec"
    TRACE = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/jaxpr_to_mlir_module_duration")

    def __init__(self):
        self.compiles = 0
        self.compile_s = 0.0
        self.hits = 0
        self.misses = 0
        self.saved_s = 0.0
        self.trace_s = 0.0
        self.installed = False
        self._lock = threading.Lock()

    def install(self) -> None:
        with self._lock:
            if self.installed:
                return
            from jax import monitoring  # noqa: PLC0415

            monitoring.register_event_duration_secs_listener(self._on_duration)
            monitoring.register_event_listener(self._on_event)
            self.installed = True

    def _on_duration(self, event: str, seconds: float, **kwargs) -> None:  # noqa: ARG002
        if event == self.BACKEND_COMPILE:
            self.compiles += 1
            self.compile_s += seconds
        elif event in self.TRACE:
            self.trace_s += seconds
        elif event == self.SAVED:
            self.saved_s += seconds

    def _on_event(self, event: str, **kwargs) -> None:  # noqa: ARG002
        if event == self.HIT:
            self.hits += 1
        elif event == self.MISS:
            self.misses += 1

    def snapshot(self) -> dict:
        return {"compiles": self.compiles, "compile_s": self.compile_s, "trace_s": self.trace_s,
                "cache_hits": self.hits, "cache_misses": self.misses}


COMPILES = CompileCounter()
