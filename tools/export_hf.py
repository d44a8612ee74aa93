#!/usr/bin/env python
"""Export a training checkpoint's policy as a Hugging Face model directory.

    python tools/export_hf.py --checkpoint RUN_DIR[/STEP] --out DIR [--dtype bfloat16] [--model-path BASE]

``--checkpoint`` takes a run directory (latest complete step), ``RUN_DIR/STEP``, or the same under
``RUN_DIR/checkpoints``. The model structure (config.json), tokenizer and generation config come
from the base model directory named by ``model.path`` in ``RUN_DIR/config.yaml`` (or
``--model-path``); the weights are the checkpoint's ``params``. Only the params are read (never
the optimizer state) and they are read as host arrays, so no accelerator or mesh is needed and
host memory holds one copy of the weights. The result loads in transformers and SGLang.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np


class ExportError(ValueError):
    pass


def _norm_path(path: tuple) -> tuple[str, ...]:
    """Key path -> plain strings, without nnx's trailing ``value`` (orbax stores it as a dict key)."""
    parts = []
    for k in path:
        for attr in ("key", "idx", "name"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    while parts and parts[-1] == "value":
        parts.pop()
    return tuple(parts)


def run_dir_of(checkpoint_dir: Path) -> Path:
    return checkpoint_dir.parent if checkpoint_dir.name == "checkpoints" else checkpoint_dir


def base_model_path(run_dir: Path, override: str | None) -> Path:
    """The base model's HF directory: ``--model-path``, else ``model.path`` of RUN_DIR/config.yaml."""
    if override:
        p = Path(override)
    else:
        import yaml  # noqa: PLC0415

        cfg_file = run_dir / "config.yaml"
        if not cfg_file.is_file():
            raise ExportError(f"export_hf: {cfg_file} not found; pass --model-path BASE_HF_DIR")
        cfg = yaml.safe_load(cfg_file.read_text()) or {}
        raw = (cfg.get("model") or {}).get("path") if isinstance(cfg, dict) else None
        if not raw:
            raise ExportError(
                f"export_hf: {cfg_file} has no model.path (empty = built-in toy model, path not recorded); "
                "pass --model-path BASE_HF_DIR"
            )
        p = Path(raw)
        if not p.is_absolute() and not p.exists() and (run_dir / p).exists():
            p = run_dir / p
    if not (p / "config.json").is_file():
        raise ExportError(f"export_hf: base model directory {p} has no config.json; pass --model-path BASE_HF_DIR")
    return p


def fill_model(cfg: Any, params: Any) -> Any:
    """A Decoder for ``cfg`` whose weights are the checkpoint's ``params`` (host arrays).

    Every parameter must be present with the right shape; errors name the parameter path.
    """
    import jax  # noqa: PLC0415
    from flax import nnx  # noqa: PLC0415

    from aepo_jax.models.decoder import abstract_model  # noqa: PLC0415

    from aepo_jax.models.decoder import stack_legacy_layers  # noqa: PLC0415

    # Checkpoints from before the layers were stacked name each layer apart: stacked here.
    saved = stack_legacy_layers({_norm_path(p): x for p, x in jax.tree_util.tree_flatten_with_path(params)[0]})
    dtypes = {np.asarray(x).dtype.name for x in saved.values()}
    dtype = "float32" if "float32" in dtypes or not dtypes else sorted(dtypes)[0]
    model = abstract_model(cfg, dtype=dtype)
    state = nnx.state(model)
    flat, treedef = jax.tree_util.tree_flatten_with_path(state)
    leaves, missing, wrong = [], [], []
    for path, spec in flat:
        key = _norm_path(path)
        if key not in saved:
            missing.append("/".join(key))
            leaves.append(spec)
            continue
        x = np.asarray(saved.pop(key))
        if tuple(x.shape) != tuple(spec.shape):
            wrong.append(f"{'/'.join(key)}: checkpoint {list(x.shape)} vs config {list(spec.shape)}")
        leaves.append(x)
    problems = []
    if missing:
        problems.append(f"missing from the checkpoint: {', '.join(missing[:8])}")
    if wrong:
        problems.append(f"shape mismatch: {'; '.join(wrong[:8])}")
    if saved:
        problems.append(f"not in the model: {', '.join('/'.join(k) for k in list(saved)[:8])}")
    if problems:
        raise ExportError(
            "export_hf: the checkpoint's params do not fit the base model's config.json "
            f"(is model.path the run's base model?): {' | '.join(problems)}"
        )
    nnx.update(model, jax.tree_util.tree_unflatten(treedef, leaves))
    return model


def export(checkpoint: str | os.PathLike[str], out: str | os.PathLike[str], dtype: str = "bfloat16",
           model_path: str | None = None) -> tuple[int, list[str]]:
    """Write the HF directory; returns (exported step, files written)."""
    from aepo_jax.models import read_config, save_pretrained  # noqa: PLC0415
    from aepo_jax.trainer.checkpoint import resolve_checkpoint, restore_params_numpy  # noqa: PLC0415

    ckpt_dir, _ = resolve_checkpoint(checkpoint)
    base = base_model_path(run_dir_of(ckpt_dir), model_path)
    cfg = read_config(base)
    step, params = restore_params_numpy(checkpoint)
    model = fill_model(cfg, params)
    del params
    written = save_pretrained(model, out, dtype=dtype, source_dir=base)
    return step, written


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", required=True, help="RUN_DIR (latest step) or RUN_DIR/STEP")
    ap.add_argument("--out", required=True, help="output directory for the Hugging Face model")
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"), help="weight dtype (default bfloat16)")
    ap.add_argument("--model-path", default=None, help="base model HF dir (default: model.path in RUN_DIR/config.yaml)")
    args = ap.parse_args(argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # host arrays only; never grab an accelerator
    from aepo_jax.models import CheckpointError as HFError, ConfigError  # noqa: PLC0415
    from aepo_jax.trainer.checkpoint import CheckpointError  # noqa: PLC0415

    try:
        step, written = export(args.checkpoint, args.out, args.dtype, args.model_path)
    except (ExportError, CheckpointError, HFError, ConfigError) as e:
        print(str(e), file=sys.stderr)
        return 2
    print(f"exported step {step} to {args.out} ({len(written)} files)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
