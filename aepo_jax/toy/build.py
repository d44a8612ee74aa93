"""Building and caching the toy base model: the recipe (:mod:`aepo_jax.toy.recipe`) runs in a
fresh subprocess pinned to one CPU device and one core (:data:`~aepo_jax.toy.recipe.BUILD_ENV`),
so the bytes are the same whatever process asks; :func:`ensure_toy_base` builds it once into the
cache under a file lock and reuses it while the recipe is the same.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from aepo_jax.toy.recipe import BUILD_ENV, BUILD_VERSION, ToyBaseConfig, grammar_info, recipe_variant

logger = logging.getLogger(__name__)


def build_toy_base(out_dir: str | Path, cfg: ToyBaseConfig = ToyBaseConfig()) -> Path:
    """Build the toy base model into ``out_dir`` (overwritten); return the path.

    The recipe runs in a fresh subprocess with :data:`BUILD_ENV` (one device, one core), so the
    bytes do not depend on this process's devices, threads or jax state. Its log goes to stderr;
    a failed build raises RuntimeError with the child's exit status.
    """
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("XLA_", "JAX_", "TF_"))}
    env.update(BUILD_ENV)
    root = str(Path(__file__).resolve().parents[2])  # the directory holding the aepo_jax package
    env["PYTHONPATH"] = os.pathsep.join([root, *filter(None, [os.environ.get("PYTHONPATH")])])
    cmd = [sys.executable, "-m", "aepo_jax.toy", str(out_dir), json.dumps(dataclasses.asdict(cfg))]
    t0 = time.time()
    proc = subprocess.run(cmd, env=env, stdin=subprocess.DEVNULL, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"toy base: the build subprocess failed (exit {proc.returncode}); its log is above")
    logger.info("toy base built in %.1f s at %s", time.time() - t0, out_dir)
    return out_dir



# --- cache ---------------------------------------------------------------------------------------


def default_cache_dir() -> Path:
    root = os.environ.get("AEPO_JAX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "aepo_jax")
    return Path(root)


def cache_name(cfg: ToyBaseConfig) -> str:
    """The cache directory's name for a recipe: ``toy_base-v<version>-seed<S>`` for the default recipe
    at any seed, plus a short hash of the whole recipe otherwise, so that two recipes that differ in
    anything but the seed (``--noise``, ``--steps``, ...) never replace each other's model."""
    # each task variant has its own name (the default's unchanged: ``toy_base_length-...`` for the length variant)
    variant = recipe_variant(cfg)
    name = f"{'toy_base' if variant == 'default' else f'toy_base_{variant}'}-v{BUILD_VERSION}-seed{cfg.seed}"
    if cfg != dataclasses.replace(type(cfg)(), seed=cfg.seed):
        recipe = json.dumps(dataclasses.asdict(cfg), sort_keys=True)
        name += "-" + hashlib.sha256(recipe.encode()).hexdigest()[:10]
    return name


def _is_complete(path: Path, cfg: ToyBaseConfig) -> bool:
    try:
        info = json.loads((path / "toy_base.json").read_text())
    except (OSError, ValueError):
        return False
    return (
        info.get("build_version") == BUILD_VERSION
        and info.get("recipe") == dataclasses.asdict(cfg)
        and info.get("grammar") == grammar_info(cfg)
        and (path / "model.safetensors").exists()
        and (path / "tokenizer.json").exists()
    )


def ensure_toy_base(cache_dir: str | os.PathLike | None = None, cfg: ToyBaseConfig = ToyBaseConfig()) -> str:
    """Path of the toy base model under ``cache_dir`` (default ``$AEPO_JAX_CACHE`` or
    ``~/.cache/aepo_jax``), building it first if it is missing or was built by another recipe.

    Safe to call from several processes at once: one builds (under a file lock) into a temporary
    directory that is renamed into place, the others wait and then reuse it.
    """
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    target = root / cache_name(cfg)
    if _is_complete(target, cfg):
        return str(target)
    with open(root / ".toy_base.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if _is_complete(target, cfg):
                return str(target)
            tmp = Path(tempfile.mkdtemp(prefix=".toy_base-", dir=root))
            try:
                logger.warning("building the toy base model into %s (once; about a minute or two on CPU)", target)
                build_toy_base(tmp, cfg)
                if target.exists():
                    shutil.rmtree(target)
                tmp.rename(target)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    shutil.rmtree(tmp)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return str(target)

