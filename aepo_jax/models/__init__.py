"""The decoder (Qwen2 / Qwen2.5 / Qwen3 / Llama), its sharding, and Hugging Face import/export.

    from aepo_jax.models import load_pretrained, save_pretrained
    model = load_pretrained(path, dtype="float32", mesh=None)   # mesh: None, a jax Mesh, or "DxT"
    logits = model(input_ids, attention_mask=attention_mask)    # [B, L, V] float32
    save_pretrained(model, out_dir, dtype="bfloat16")

See docs/models.md.
"""

from aepo_jax.models.config import ConfigError, ModelConfig
from aepo_jax.models.decoder import Decoder, default_position_ids, init_model
from aepo_jax.models.hf_io import (CheckpointError, from_hf_tensors, hf_device_tensors, hf_tensor_specs,
                                   load_pretrained, read_config, save_pretrained)

__all__ = [
    "CheckpointError",
    "ConfigError",
    "Decoder",
    "ModelConfig",
    "default_position_ids",
    "from_hf_tensors",
    "hf_device_tensors",
    "hf_tensor_specs",
    "init_model",
    "load_pretrained",
    "read_config",
    "save_pretrained",
]
