"""ModelConfig: the architecture facts steerjax needs, read from HF config.json or GGUF metadata."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from steerjax.errors import UnsupportedModelError

SUPPORTED_MODEL_TYPES = ("llama", "qwen2")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of a Llama- or Qwen2-family decoder. Hashable, so it can key jit caches."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: tuple[tuple[str, Any], ...] = ()  # sorted (key, value) pairs; () = plain RoPE
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    max_position_embeddings: int = 2048
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None

    @property
    def rope_type(self) -> str:
        return dict(self.rope_scaling).get("rope_type", "default")

    @property
    def d(self) -> int:
        return self.hidden_size

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["rope_scaling"] = dict(self.rope_scaling)
        return out


def _rope_scaling_from_hf(raw: Mapping[str, Any]) -> tuple[float, tuple[tuple[str, Any], ...]]:
    """Read rope theta and scaling from either `rope_parameters` (transformers 5) or
    `rope_scaling` + `rope_theta` (checkpoints on the Hub)."""
    params = dict(raw.get("rope_parameters") or {})
    legacy = dict(raw.get("rope_scaling") or {})
    merged = {**legacy, **params}
    theta = merged.pop("rope_theta", raw.get("rope_theta", 10000.0))
    rope_type = merged.pop("rope_type", merged.pop("type", "default")) or "default"
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise UnsupportedModelError(
            f"unsupported rope scaling type {rope_type!r}; steerjax implements {SUPPORTED_ROPE_TYPES}"
        )
    if rope_type == "default":
        return float(theta), ()
    keep = {"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}
    items = {k: v for k, v in merged.items() if k in keep}
    items["rope_type"] = rope_type
    return float(theta), tuple(sorted(items.items()))


def _eos(value: Any) -> int | tuple[int, ...] | None:
    if isinstance(value, (list, tuple)):
        return tuple(int(v) for v in value)
    return None if value is None else int(value)


def config_from_hf(raw: Mapping[str, Any]) -> ModelConfig:
    """Build a ModelConfig from a parsed HF `config.json` dict."""
    model_type = raw.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModelError(
            f"unsupported model_type {model_type!r}; steerjax supports {SUPPORTED_MODEL_TYPES}"
        )
    if raw.get("use_sliding_window"):
        raise UnsupportedModelError("Qwen2 sliding-window attention (use_sliding_window=true) is not supported")
    if raw.get("hidden_act", "silu") != "silu":
        raise UnsupportedModelError(f"unsupported hidden_act {raw.get('hidden_act')!r}; only 'silu' is implemented")
    missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                           "num_attention_heads") if k not in raw]
    if missing:
        raise UnsupportedModelError(f"config.json lacks required keys {missing}")
    theta, scaling = _rope_scaling_from_hf(raw)
    num_heads = int(raw["num_attention_heads"])
    hidden = int(raw["hidden_size"])
    head_dim = raw.get("head_dim") or hidden // num_heads
    attention_bias = bool(raw.get("attention_bias", False))
    return ModelConfig(
        model_type=model_type,
        vocab_size=int(raw["vocab_size"]),
        hidden_size=hidden,
        intermediate_size=int(raw["intermediate_size"]),
        num_layers=int(raw["num_hidden_layers"]),
        num_heads=num_heads,
        num_kv_heads=int(raw.get("num_key_value_heads") or num_heads),
        head_dim=int(head_dim),
        rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_scaling=scaling,
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        qkv_bias=model_type == "qwen2" or attention_bias,
        o_bias=model_type == "llama" and attention_bias,
        mlp_bias=bool(raw.get("mlp_bias", False)),
        max_position_embeddings=int(raw.get("max_position_embeddings", 2048)),
        bos_token_id=raw.get("bos_token_id"),
        eos_token_id=_eos(raw.get("eos_token_id")),
        pad_token_id=raw.get("pad_token_id"),
    )
