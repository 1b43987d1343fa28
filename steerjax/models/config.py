"""ModelConfig: the architecture facts steerjax needs, read from HF config.json or GGUF metadata."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from steerjax.errors import UnsupportedModelError

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3", "gemma3_text")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
SUPPORTED_ACTIVATIONS = ("silu", "gelu_pytorch_tanh")
LAYER_TYPES = ("full_attention", "sliding_attention")
GEMMA3_DEFAULT_THETA = {"full_attention": 1_000_000.0, "sliding_attention": 10_000.0}
# transformers' Gemma3TextConfig defaults (5.25) of the keys config_from_hf needs and has no default for; they fill
# what the text_config of a multimodal gemma3 config.json leaves out
GEMMA3_TEXT_DEFAULTS = {"vocab_size": 262_208, "hidden_size": 2304, "intermediate_size": 9216, "num_hidden_layers": 26,
                        "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256,
                        "max_position_embeddings": 131_072, "sliding_window": 4096}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of a Llama-, Qwen2/3- or Gemma 3-family decoder. Hashable, so it can key jit caches.

    The fields after `pad_token_id` default to the Llama / Qwen2 block. Gemma 3 sets them: layer_types
    ("full_attention" / "sliding_attention" per layer; () = all full) with the window `sliding_window` and the
    local RoPE (`rope_local_theta`, `rope_local_scaling`) on sliding layers."""

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
    qk_norm: bool = False  # per-head RMSNorm of q and k before RoPE (Qwen3, Gemma 3)
    norm_style: str = "llama"  # "llama": w * x_hat; "gemma": (1 + w) * x_hat, rounded after the product
    sandwich_norms: bool = False  # Gemma: norms on the attention and MLP outputs, a pre-MLP norm
    hidden_act: str = "silu"  # gated MLP activation: "silu" (SwiGLU) or "gelu_pytorch_tanh" (GeGLU)
    scale_embeddings: bool = False  # h_0 = embed * sqrt(d), the scale rounded to float32 then the model dtype
    query_pre_attn_scalar: float | None = None  # scores scaled by its -1/2 power; None = head_dim
    attn_logit_softcapping: float | None = None  # scores <- cap * tanh(scores / cap)
    final_logit_softcapping: float | None = None  # logits <- cap * tanh(logits / cap)
    layer_types: tuple[str, ...] = ()
    sliding_window: int | None = None  # a query at slot t sees keys t - window + 1 .. t on sliding layers
    rope_local_theta: float | None = None  # RoPE of sliding layers; None = the global one
    rope_local_scaling: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self):
        if self.layer_types and len(self.layer_types) != self.num_layers:
            raise UnsupportedModelError(f"layer_types lists {len(self.layer_types)} layers, the model has "
                                        f"{self.num_layers}")
        unknown = sorted(set(self.layer_types) - set(LAYER_TYPES))
        if unknown:
            raise UnsupportedModelError(f"unsupported layer types {unknown}; steerjax implements {LAYER_TYPES}")
        if "sliding_attention" in self.layer_types and not self.sliding_window:
            raise UnsupportedModelError("sliding_attention layers need a positive sliding_window in config.json")
        if self.hidden_act not in SUPPORTED_ACTIVATIONS:
            raise UnsupportedModelError(f"unsupported activation {self.hidden_act!r}; steerjax implements "
                                        f"{SUPPORTED_ACTIVATIONS}")

    @property
    def rope_type(self) -> str:
        return dict(self.rope_scaling).get("rope_type", "default")

    @property
    def d(self) -> int:
        return self.hidden_size

    @property
    def local_layers(self) -> tuple[bool, ...]:
        """Per layer: whether it is a sliding-window layer with the local RoPE (all False for Llama / Qwen)."""
        return tuple(t == "sliding_attention" for t in self.layer_types) or (False,) * self.num_layers

    @property
    def has_local_layers(self) -> bool:
        return any(self.local_layers)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["rope_scaling"] = dict(self.rope_scaling)
        out["rope_local_scaling"] = dict(self.rope_local_scaling)
        out["layer_types"] = list(self.layer_types)
        return out


def _rope_from_params(params: Mapping[str, Any], default_theta: float) -> tuple[float, tuple[tuple[str, Any], ...]]:
    """(theta, sorted scaling items) of one RoPE parameter dict (rope_type / type, rope_theta, factor, ...)."""
    merged = dict(params)
    theta = merged.pop("rope_theta", default_theta)
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


def _rope_scaling_from_hf(raw: Mapping[str, Any]) -> tuple[float, tuple[tuple[str, Any], ...]]:
    """Read rope theta and scaling from either `rope_parameters` (transformers 5) or
    `rope_scaling` + `rope_theta` (checkpoints on the Hub)."""
    merged = {**dict(raw.get("rope_scaling") or {}), **dict(raw.get("rope_parameters") or {})}
    return _rope_from_params(merged, raw.get("rope_theta", 10000.0))


def _gemma3_rope(raw: Mapping[str, Any], layer_type: str) -> tuple[float, tuple[tuple[str, Any], ...]]:
    """Gemma 3's RoPE of one layer type as transformers 5 builds it: `rope_parameters[layer_type]` (its saved
    format), else the Hub keys: rope_theta + rope_scaling for full-attention layers, rope_local_base_freq
    (plain RoPE) for sliding ones."""
    params = dict((raw.get("rope_parameters") or {}).get(layer_type) or {"rope_type": "default"})
    if layer_type == "full_attention":
        params.update(raw.get("rope_scaling") or {})
        default_theta = raw.get("rope_theta", GEMMA3_DEFAULT_THETA[layer_type])
    else:
        default_theta = raw.get("rope_local_base_freq", GEMMA3_DEFAULT_THETA[layer_type])
    return _rope_from_params(params, default_theta)


def _gemma3_layer_types(raw: Mapping[str, Any]) -> tuple[str, ...]:
    """config.layer_types, else HF's rule from the older `sliding_window_pattern` (every n-th layer global)."""
    if raw.get("layer_types"):
        return tuple(raw["layer_types"])
    pattern = int(raw.get("sliding_window_pattern", raw.get("_sliding_window_pattern", 6)))
    return tuple("sliding_attention" if (i + 1) % pattern else "full_attention"
                 for i in range(int(raw["num_hidden_layers"])))


def _optional_float(value: Any) -> float | None:
    return None if value is None else float(value)


def _gemma3_fields(raw: Mapping[str, Any]) -> dict[str, Any]:
    """The ModelConfig fields particular to Gemma 3 text models. config.json's attn_logit_softcapping is not applied,
    as in transformers (5.25: Gemma3Attention never passes it to the attention function; Gemma 3 checkpoints set
    it to null, QK-norm took its place), so it is left None here."""
    if raw.get("use_bidirectional_attention"):
        raise UnsupportedModelError("Gemma 3 with use_bidirectional_attention=true is not supported")
    theta, scaling = _gemma3_rope(raw, "full_attention")
    local_theta, local_scaling = _gemma3_rope(raw, "sliding_attention")
    layer_types = _gemma3_layer_types(raw)
    attention_bias = bool(raw.get("attention_bias", False))
    return dict(
        rope_theta=theta, rope_scaling=scaling, rope_local_theta=local_theta, rope_local_scaling=local_scaling,
        layer_types=layer_types,
        sliding_window=int(raw["sliding_window"]) if raw.get("sliding_window") else None,
        qk_norm=True, norm_style="gemma", sandwich_norms=True, scale_embeddings=True,
        hidden_act=raw.get("hidden_activation") or "gelu_pytorch_tanh",
        query_pre_attn_scalar=float(raw.get("query_pre_attn_scalar", 256)),
        final_logit_softcapping=_optional_float(raw.get("final_logit_softcapping")),
        qkv_bias=attention_bias, o_bias=attention_bias,
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", True)),
        rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        pad_token_id=raw.get("pad_token_id", 0), eos_token_id=_eos(raw.get("eos_token_id", 1)),
        bos_token_id=raw.get("bos_token_id", 2),
    )


def _llama_qwen_fields(raw: Mapping[str, Any], model_type: str) -> dict[str, Any]:
    """The ModelConfig fields of Llama, Qwen2 and Qwen3 models."""
    if raw.get("use_sliding_window"):
        raise UnsupportedModelError(f"{model_type} sliding-window attention (use_sliding_window=true) is not "
                                    f"supported")
    theta, scaling = _rope_scaling_from_hf(raw)
    attention_bias = bool(raw.get("attention_bias", False))
    return dict(
        rope_theta=theta, rope_scaling=scaling,
        qk_norm=model_type == "qwen3",
        hidden_act=raw.get("hidden_act", "silu"),
        qkv_bias=model_type == "qwen2" or attention_bias,
        o_bias=model_type in ("llama", "qwen3") and attention_bias,
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        pad_token_id=raw.get("pad_token_id"), eos_token_id=_eos(raw.get("eos_token_id")),
        bos_token_id=raw.get("bos_token_id"),
    )


def _eos(value: Any) -> int | tuple[int, ...] | None:
    if isinstance(value, (list, tuple)):
        return tuple(int(v) for v in value)
    return None if value is None else int(value)


def gemma3_text_raw_config(raw: Mapping[str, Any]) -> dict[str, Any]:
    """The gemma3_text config.json dict of the text decoder of a multimodal Gemma 3 config (model_type "gemma3",
    transformers' Gemma3Config): its `text_config`, keys it leaves out filled as transformers fills them.

    - Gemma3TextConfig's defaults (GEMMA3_TEXT_DEFAULTS; the Hub's gemma-3-4b/12b/27b text_configs name only a
      few keys), the token ids (bos / eos / pad) from the top level where text_config lacks them (the Hub's files
      put eos_token_id [1, 106] there);
    - tie_word_embeddings from the top level (default true): transformers ties Gemma3ForConditionalGeneration's
      lm_head by Gemma3Config.tie_word_embeddings, whatever text_config says;
    - final_logit_softcapping None: Gemma3ForConditionalGeneration (transformers 5.25) never soft-caps its logits
      (only Gemma3ForCausalLM does)."""
    text = raw.get("text_config")
    if not isinstance(text, Mapping):
        raise UnsupportedModelError(
            "multimodal Gemma 3 config.json (model_type 'gemma3') has no text_config: steerjax loads the text "
            "decoder of a Gemma3ForConditionalGeneration checkpoint and reads its architecture from text_config"
        )
    if text.get("model_type", "gemma3_text") != "gemma3_text":
        raise UnsupportedModelError(f"Gemma 3 text_config has model_type {text['model_type']!r}, expected "
                                    f"'gemma3_text'")
    top_level = {key: raw[key] for key in ("bos_token_id", "eos_token_id", "pad_token_id") if key in raw}
    return {**GEMMA3_TEXT_DEFAULTS, **top_level, **text, "model_type": "gemma3_text",
            "tie_word_embeddings": raw.get("tie_word_embeddings", True), "final_logit_softcapping": None}


def config_from_hf(raw: Mapping[str, Any]) -> ModelConfig:
    """Build a ModelConfig from a parsed HF `config.json` dict.

    A multimodal Gemma 3 config (model_type "gemma3", Gemma3ForConditionalGeneration) gives the gemma3_text
    ModelConfig of its text decoder (see gemma3_text_raw_config): steerjax runs text only, images (the vision
    tower and projector) are not supported."""
    model_type = raw.get("model_type")
    if model_type == "gemma3":
        return config_from_hf(gemma3_text_raw_config(raw))
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModelError(
            f"unsupported model_type {model_type!r}; steerjax supports {SUPPORTED_MODEL_TYPES} and the text "
            f"decoder of multimodal 'gemma3'"
        )
    missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                           "num_attention_heads") if k not in raw]
    if missing:
        raise UnsupportedModelError(f"config.json lacks required keys {missing}")
    family = _gemma3_fields(raw) if model_type == "gemma3_text" else _llama_qwen_fields(raw, model_type)
    num_heads = int(raw["num_attention_heads"])
    hidden = int(raw["hidden_size"])
    head_dim = raw.get("head_dim") or hidden // num_heads
    return ModelConfig(
        model_type=model_type,
        vocab_size=int(raw["vocab_size"]),
        hidden_size=hidden,
        intermediate_size=int(raw["intermediate_size"]),
        num_layers=int(raw["num_hidden_layers"]),
        num_heads=num_heads,
        num_kv_heads=int(raw.get("num_key_value_heads") or num_heads),
        head_dim=int(head_dim),
        mlp_bias=bool(raw.get("mlp_bias", False)),
        max_position_embeddings=int(raw.get("max_position_embeddings", 2048)),
        **family,
    )
