"""ModelConfig: the architecture of one Qwen2 / Qwen2.5 / Qwen3 / Llama decoder.

Read from and written back to a Hugging Face ``config.json`` dict. Both the transformers-5
layout (``rope_parameters``) and the older one (``rope_theta`` + ``rope_scaling``) are read;
``to_hf_dict`` writes both so that older readers (SGLang, transformers 4.x) and newer ones agree.

The dataclass is frozen and hashable: it sits in the static part of the NNX graph, so jit
caches key on it. Keys of config.json that the decoder does not use are kept verbatim in
``extra_json`` (not part of equality) and written back on export.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

import numpy as np

SUPPORTED_MODEL_TYPES = ("qwen2", "qwen3", "llama")
_ARCHITECTURES = {"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM", "llama": "LlamaForCausalLM"}
# RoPE variants we implement exactly (the others would silently give wrong logits).
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")

# config.json keys the decoder reads (everything else goes to extra_json and is written back).
_KNOWN_KEYS = {
    "model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_theta",
    "rope_scaling", "rope_parameters", "tie_word_embeddings", "attention_bias", "mlp_bias",
    "hidden_act", "max_position_embeddings", "architectures", "torch_dtype", "dtype",
    "transformers_version",
}


# What each decoder layer keeps for its backward pass (``model.remat``): the named outputs of the
# layer's matmuls (``checkpoint_name`` in decoder.py); everything else in the layer is recomputed.
REMAT_POLICIES: dict[str, tuple[str, ...] | None] = {
    "none": None,  # no rematerialisation: every intermediate the backward needs is kept
    "full": (),  # keep only the layer's input; recompute the whole layer
    "dots": ("qkv_proj", "context", "out_proj", "mlp_up", "mlp_down"),  # keep matmul outputs
    "dots_except_mlp": ("qkv_proj", "context", "out_proj"),  # recompute the MLP (its [B, L, 2I] is the largest)
    "attn_context": ("context",),  # keep only attention's output: recompute the projections, skip attention
}


def remat_policy(value: Any) -> str:
    """Normalise a ``remat`` setting: a policy name, or a bool (True = "full", False = "none")."""
    if isinstance(value, (bool, np.bool_)) or value is None:
        return "full" if value else "none"
    name = str(value).strip().lower()
    name = {"true": "full", "false": "none", "": "none"}.get(name, name)
    if name not in REMAT_POLICIES:
        raise ValueError(f"remat: {value!r} is not a policy (use one of {', '.join(REMAT_POLICIES)}, or true/false)")
    return name


class ConfigError(ValueError):
    """A config.json that the decoder cannot represent; the message names the field."""


def _freeze(v: Any) -> Any:
    if isinstance(v, dict):
        return tuple(sorted((k, _freeze(x)) for k, x in v.items()))
    if isinstance(v, list):
        return tuple(_freeze(x) for x in v)
    return v


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    model_type: str = "qwen2"
    vocab_size: int = 32000
    hidden_size: int = 512
    intermediate_size: int = 1408
    num_hidden_layers: int = 4
    num_attention_heads: int = 8
    num_key_value_heads: int = 2
    head_dim: int = 64
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    # Non-default RoPE parameters as sorted (key, value) pairs, e.g. llama3 scaling; None = default.
    rope_scaling: tuple[tuple[str, Any], ...] | None = None
    tie_word_embeddings: bool = False
    qkv_bias: bool = True  # qwen2: always; llama/qwen3: attention_bias
    o_bias: bool = False  # llama/qwen3: attention_bias
    qk_norm: bool = False  # qwen3
    max_position_embeddings: int = 32768
    extra_json: str = dataclasses.field(default="{}", compare=False, repr=False)
    source_dir: str | None = dataclasses.field(default=None, compare=False, repr=False)

    # ------------------------------------------------------------------ derived
    @property
    def num_groups(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def rope_type(self) -> str:
        return dict(self.rope_scaling or ()).get("rope_type", "default")

    def __post_init__(self) -> None:
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"model_type: {self.model_type!r} is not supported (supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
            )
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim"):
            v = getattr(self, name)
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"{name}: expected a positive integer, got {v!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.head_dim % 2:
            raise ConfigError(f"head_dim: RoPE needs an even head_dim, got {self.head_dim}")
        if self.rope_type not in SUPPORTED_ROPE_TYPES:
            raise ConfigError(
                f"rope_scaling.rope_type: {self.rope_type!r} is not supported "
                f"(supported: {', '.join(SUPPORTED_ROPE_TYPES)})"
            )

    # ------------------------------------------------------------------ RoPE
    def inv_freq(self) -> np.ndarray:
        """RoPE inverse frequencies [head_dim // 2] in float32, computed as transformers does."""
        d = self.head_dim
        inv = (1.0 / (self.rope_theta ** (np.arange(0, d, 2, dtype=np.int64).astype(np.float32) / d))).astype(
            np.float32
        )
        p = dict(self.rope_scaling or ())
        if self.rope_type == "linear":
            inv = (inv / np.float32(p["factor"])).astype(np.float32)
        elif self.rope_type == "llama3":
            factor, lo, hi = float(p["factor"]), float(p["low_freq_factor"]), float(p["high_freq_factor"])
            old = float(p.get("original_max_position_embeddings", self.max_position_embeddings))
            lo_wavelen, hi_wavelen = old / lo, old / hi
            wavelen = (2 * math.pi / inv).astype(np.float32)
            scaled = np.where(wavelen > lo_wavelen, inv / np.float32(factor), inv).astype(np.float32)
            smooth = ((old / wavelen - lo) / (hi - lo)).astype(np.float32)
            smoothed = ((1 - smooth) * scaled / np.float32(factor) + smooth * scaled).astype(np.float32)
            medium = ~(wavelen < hi_wavelen) & ~(wavelen > lo_wavelen)
            inv = np.where(medium, smoothed, scaled).astype(np.float32)
        return inv

    # ------------------------------------------------------------------ HF dicts
    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], source_dir: str | None = None) -> "ModelConfig":
        """Build from a Hugging Face config.json dict; ConfigError names the offending field."""
        if not isinstance(d, dict):
            raise ConfigError(f"config: expected a JSON object, got {type(d).__name__}")
        mt = d.get("model_type")
        if mt not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(f"model_type: {mt!r} is not supported (supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
        def _int(k: str, default: Any = None) -> int:
            v = d.get(k, default)
            if v is None:
                raise ConfigError(f"{k}: missing from config")
            if isinstance(v, bool) or not isinstance(v, (int, float)) or int(v) != v:
                raise ConfigError(f"{k}: expected an integer, got {v!r}")
            return int(v)

        for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
            _int(k)
        act = d.get("hidden_act", "silu")
        if act not in ("silu", "swish"):
            raise ConfigError(f"hidden_act: only 'silu' (SwiGLU) is supported, got {act!r}")
        if d.get("mlp_bias"):
            raise ConfigError("mlp_bias: true is not supported (no Qwen/Llama checkpoint uses it)")
        if mt in ("qwen2", "qwen3") and d.get("use_sliding_window"):
            raise ConfigError("use_sliding_window: true is not supported (full attention only)")
        nh = _int("num_attention_heads")
        head_dim = _int("head_dim") if d.get("head_dim") else _int("hidden_size") // nh

        # RoPE: transformers 5 writes rope_parameters (with rope_theta inside); older files rope_theta + rope_scaling.
        rp = d.get("rope_parameters")
        if isinstance(rp, dict) and rp and all(isinstance(v, dict) for v in rp.values()):
            raise ConfigError("rope_parameters: per-layer-type RoPE parameters are not supported")
        rp = dict(rp or {})
        legacy = dict(d.get("rope_scaling") or {})
        if "type" in legacy and "rope_type" not in legacy:
            legacy["rope_type"] = legacy.pop("type")
        params = {**legacy, **rp}
        theta = params.pop("rope_theta", d.get("rope_theta", 10000.0))
        params.pop("type", None)
        rope_type = params.get("rope_type", "default")
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ConfigError(
                f"rope_scaling.rope_type: {rope_type!r} is not supported (supported: {', '.join(SUPPORTED_ROPE_TYPES)})"
            )
        if rope_type == "default":
            params = {}
        else:
            need = ("factor",) if rope_type == "linear" else ("factor", "low_freq_factor", "high_freq_factor")
            for k in need:
                if k not in params:
                    raise ConfigError(f"rope_scaling.{k}: required for rope_type {rope_type!r}")
        attn_bias = bool(d.get("attention_bias", False))
        extra = {k: v for k, v in d.items() if k not in _KNOWN_KEYS}
        return cls(
            model_type=mt,
            vocab_size=_int("vocab_size"),
            hidden_size=_int("hidden_size"),
            intermediate_size=_int("intermediate_size"),
            num_hidden_layers=_int("num_hidden_layers"),
            num_attention_heads=nh,
            num_key_value_heads=_int("num_key_value_heads", nh),
            head_dim=head_dim,
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            rope_theta=float(theta),
            rope_scaling=_freeze(params) if params else None,
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            qkv_bias=True if mt == "qwen2" else attn_bias,
            o_bias=False if mt == "qwen2" else attn_bias,
            qk_norm=(mt == "qwen3"),
            max_position_embeddings=_int("max_position_embeddings", 32768),
            extra_json=json.dumps(extra, sort_keys=True),
            source_dir=source_dir,
        )

    def to_hf_dict(self, dtype: str | None = None) -> dict[str, Any]:
        """A config.json dict that transformers (4.x and 5.x) and SGLang load as this architecture."""
        d: dict[str, Any] = dict(json.loads(self.extra_json))
        rope = dict(self.rope_scaling or ())
        d.update(
            architectures=[_ARCHITECTURES[self.model_type]],
            model_type=self.model_type,
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            head_dim=self.head_dim,
            hidden_act="silu",
            rms_norm_eps=self.rms_norm_eps,
            rope_theta=self.rope_theta,
            rope_scaling=rope or None,
            rope_parameters={"rope_theta": self.rope_theta, "rope_type": "default", **rope},
            tie_word_embeddings=self.tie_word_embeddings,
            max_position_embeddings=self.max_position_embeddings,
        )
        if "layer_types" in d:  # transformers 5 checks its length against num_hidden_layers
            d["layer_types"] = ["full_attention"] * self.num_hidden_layers
        if self.model_type != "qwen2":
            d["attention_bias"] = self.qkv_bias
        if self.model_type == "llama":
            d["mlp_bias"] = False
        if dtype is not None:
            d["torch_dtype"] = dtype
            d["dtype"] = dtype
        return d
