"""Start-up checks of a run's inputs, before any heavy work: a bad input is one line naming it.

``python -m aepo_jax.train`` validates the config (``trainer.config.validate``), then calls
:func:`check_run`: :func:`check_inputs` (model directory, data files, reward, rollout servers, run
directory) and :func:`check_mesh` (the device count), before it loads the model or starts a
server. Each problem raises :class:`StartupError` whose message names the key and the file, row
or URL; the entry point prints it as one line and exits with status 2. What the checks read and
build (the training problems, the mesh) is handed to the Trainer as :class:`RunInputs`, so
nothing is read or built twice.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aepo_jax.data import DataError, DatasetConfig, LoadStats, Problem, load_problems, toy_problems
from aepo_jax.models.config import ConfigError as ModelConfigError
from aepo_jax.models.hf_io import CheckpointError, check_checkpoint
from aepo_jax.models.sharding import make_mesh
from aepo_jax.rewards import resolve_reward
from aepo_jax.rollout.client import RolloutClient
from aepo_jax.trainer import validation
from aepo_jax.trainer.config import ConfigError, RunConfig, validate_mesh

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


class StartupError(RuntimeError):
    """A run input that cannot be used; the message names the key and the file, row or URL."""


@dataclass(frozen=True)
class RunInputs:
    """What the start-up checks read and built, for the Trainer."""

    mesh: Any                     # the jax Mesh of ``train.mesh``
    problems: list[Problem]       # the training problems (the toy task's train split without data.train_files)
    load_stats: LoadStats | None  # rows read and skipped in data.train_files; None for the toy task


def check_run(cfg: RunConfig, *, talks_to_servers: bool = True) -> RunInputs:
    """Every start-up check (:func:`check_inputs`, then :func:`check_mesh`, which starts jax)."""
    problems, load_stats = check_inputs(cfg, talks_to_servers=talks_to_servers)
    return RunInputs(mesh=check_mesh(cfg), problems=problems, load_stats=load_stats)


def check_inputs(cfg: RunConfig, *, talks_to_servers: bool = True) -> tuple[list[Problem], LoadStats | None]:
    """Model directory, data files, reward, (when this process talks to them) the rollout servers,
    and last the run directory (created here, so only once everything else is known to be good).
    Returns the training problems and, for data.train_files, their load statistics."""
    if cfg.model.path:
        check_model_dir(cfg.model.path)
    if cfg.data.train_files:
        problems, load_stats = check_data(cfg)
    else:  # the toy task's split is fixed (seed 0, the base model's); data.seed shuffles it
        problems, load_stats = toy_problems("train"), None
    check_reward(cfg.algorithm.reward)
    try:
        validation.check_files(cfg)
    except ConfigError as e:
        raise StartupError(str(e)) from None
    if cfg.rollout.urls and talks_to_servers:
        check_servers(cfg)
    check_run_dir(cfg.train.run_dir)
    return problems, load_stats


def check_model_dir(path: str) -> None:
    p = Path(path)
    if not p.is_dir():
        raise StartupError(f"config key 'model.path': {path!r} is not a directory")
    try:
        check_checkpoint(p)
    except (OSError, ValueError, ModelConfigError, CheckpointError) as e:
        raise StartupError(f"config key 'model.path': {path!r} is not a usable model: {e}") from None
    if not any((p / f).is_file() for f in TOKENIZER_FILES):
        raise StartupError(f"config key 'model.path': {path!r} has no tokenizer (none of {list(TOKENIZER_FILES)})")


def check_data(cfg: RunConfig) -> tuple[list[Problem], LoadStats]:
    """The problems of data.train_files (at least one step's worth) and their load statistics."""
    d = cfg.data
    try:
        problems, stats = load_problems(d.train_files, DatasetConfig(prompt_key=d.prompt_key, answer_key=d.answer_key,
                                                                 skip_bad_rows=d.skip_bad_rows))
    except DataError as e:
        raise StartupError(f"config key 'data.train_files': {e}") from None
    if len(problems) < d.prompts_per_step:
        raise StartupError(f"config key 'data.prompts_per_step' ({d.prompts_per_step}) is more than the "
                           f"{len(problems)} usable problems in {d.train_files}")
    return problems, stats


def check_reward(name: str) -> None:
    """A registered reward name or an importable ``module:function`` (``auto`` picks one itself)."""
    if name == "auto":
        return
    try:
        resolve_reward(name)
    except (KeyError, ValueError, ImportError, AttributeError, TypeError) as e:
        raise StartupError(f"config key 'algorithm.reward': {_first_line(e).strip(chr(34))}") from None


def check_run_dir(run_dir: str) -> None:
    p = Path(run_dir)
    try:
        p.mkdir(parents=True, exist_ok=True)
        probe = p / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise StartupError(f"config key 'train.run_dir': cannot write to {str(p)!r}: {e.strerror or e}") from None


def check_servers(cfg: RunConfig) -> None:
    """Every rollout server answers ``GET /health`` within ``rollout.startup_timeout_s``."""
    r = cfg.rollout

    async def probe() -> None:
        client = RolloutClient(list(r.urls), weight_update_urls=list(r.weight_update_urls) or None)
        try:
            await client.wait_healthy(deadline_s=r.startup_timeout_s)
        finally:
            await client.close()

    try:
        asyncio.run(probe())
    except (TimeoutError, OSError) as e:
        raise StartupError(f"config key 'rollout.urls': rollout servers not healthy after "
                           f"rollout.startup_timeout_s={r.startup_timeout_s:g}s: {_first_line(e)}") from None


def check_mesh(cfg: RunConfig) -> Any:
    """The mesh ``train.mesh`` asks for, on the devices there are (initialises the jax backend),
    and the batch shapes it must divide (the rest of the config is checked by ``validate``)."""
    try:
        mesh = make_mesh(cfg.train.mesh or None)
    except ValueError as e:
        raise StartupError(f"config key 'train.mesh': {_first_line(e)}") from None
    try:
        validate_mesh(cfg, int(mesh.shape["data"]))
    except ConfigError as e:
        raise StartupError(str(e)) from None
    return mesh


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]
