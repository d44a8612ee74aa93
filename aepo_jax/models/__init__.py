"""The decoder (Qwen2 / Qwen2.5 / Qwen3 / Llama), its sharding, and Hugging Face import/export.

    from aepo_jax.models import load_pretrained, save_pretrained
    model = load_pretrained(path, dtype="float32", mesh=None)   # mesh: None, a jax Mesh, or "DxT"
    logits = model(input_ids, attention_mask=attention_mask)    # [B, L, V] float32
    save_pretrained(model, out_dir, dtype="bfloat16")

See docs/models.md.
"""

import importlib

# name -> submodule. Imported on first use (PEP 562), so that ``aepo_jax.models.config`` (plain Python:
# ModelConfig, the remat policy names) can be read by config validation before jax starts.
_EXPORTS = {
    "CheckpointError": "hf_io",
    "ConfigError": "config",
    "Decoder": "decoder",
    "ModelConfig": "config",
    "default_position_ids": "decoder",
    "from_hf_tensors": "hf_io",
    "hf_device_tensors": "hf_layout",
    "hf_tensor_specs": "hf_layout",
    "init_model": "decoder",
    "load_pretrained": "hf_io",
    "read_config": "hf_io",
    "save_pretrained": "hf_io",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'aepo_jax.models' has no attribute {name!r}")
    return getattr(importlib.import_module(f"aepo_jax.models.{_EXPORTS[name]}"), name)
