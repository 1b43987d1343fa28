"""Write a transformers model to a GGUF file the way llama.cpp's converter (convert_hf_to_gguf.py) does, so the
GGUF loader can be tested on checkpoints with known weights: Q/K rows permuted for the llama architecture; for
Gemma 3 (architecture gemma3) its own norm names, every norm weight stored as w + 1 and only the metadata llama.cpp
writes (the sliding-window pattern, local RoPE base and attention scale are fixed by llama.cpp, so the model must
use them); optionally the matrices quantized (Q8_0, Q4_0, ...: the types gguf.quants can quantize)."""

from __future__ import annotations

import gguf
import numpy as np

LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_proj.bias": "attn_q.bias", "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias", "self_attn.o_proj.bias": "attn_output.bias",
    "self_attn.q_norm.weight": "attn_q_norm.weight", "self_attn.k_norm.weight": "attn_k_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
GEMMA3_LAYER_NAMES = {
    **LAYER_NAMES,
    "post_attention_layernorm.weight": "post_attention_norm.weight",
    "pre_feedforward_layernorm.weight": "ffn_norm.weight",
    "post_feedforward_layernorm.weight": "post_ffw_norm.weight",
}
ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma3_text": "gemma3"}


def llama_cpp_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf's LlamaModel.permute (HF halves layout -> interleaved pairs)."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_name(hf_name: str, arch: str = "llama") -> str:
    if hf_name == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf_name == "model.norm.weight":
        return "output_norm.weight"
    if hf_name == "lm_head.weight":
        return "output.weight"
    _, _, layer, rest = hf_name.split(".", 3)
    return f"blk.{layer}.{(GEMMA3_LAYER_NAMES if arch == 'gemma3' else LAYER_NAMES)[rest]}"


def gemma3_pattern_layer_types(num_layers: int) -> list[str]:
    """The layer types llama.cpp assumes for every gemma3 GGUF: every 6th layer global."""
    return ["sliding_attention" if (i + 1) % 6 else "full_attention" for i in range(num_layers)]


def _add_gemma3_metadata(writer, cfg) -> None:
    """Gemma3Model.set_gguf_parameters: the global RoPE (base, linear scaling) and the window; the rest llama.cpp
    fixes, which the tiny model must match or the file would describe another model."""
    head_dim = cfg.head_dim
    assert list(cfg.layer_types) == gemma3_pattern_layer_types(cfg.num_hidden_layers), cfg.layer_types
    assert cfg.rope_parameters["sliding_attention"]["rope_theta"] == 10000.0
    assert cfg.rope_parameters["sliding_attention"].get("rope_type", "default") == "default"
    assert cfg.query_pre_attn_scalar == head_dim
    assert cfg.attn_logit_softcapping is None  # the converter asserts the same
    full = cfg.rope_parameters["full_attention"]
    writer.add_rope_freq_base(full["rope_theta"])
    if full.get("rope_type", "default") != "default":
        assert full["rope_type"] == "linear"
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(full["factor"])
    writer.add_sliding_window(cfg.sliding_window)
    if cfg.final_logit_softcapping is not None:  # Gemma 2's key; llama.cpp's gemma3 converter never writes it
        writer.add_final_logit_softcapping(cfg.final_logit_softcapping)


def _tensor_values(values: np.ndarray, qtype: gguf.GGMLQuantizationType | None):
    """(data, raw_dtype) for add_tensor: 1-D tensors stay F32 (as llama.cpp keeps norms), matrices are quantized
    to qtype where their rows fill whole blocks."""
    if qtype is None or values.ndim < 2 or values.shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0]:
        return np.ascontiguousarray(values), None
    return gguf.quants.quantize(np.ascontiguousarray(values), qtype), qtype


def write_gguf(model, path, qtype: gguf.GGMLQuantizationType | None = None) -> None:
    """Write `model` (transformers Llama / Qwen2 / Qwen3 / Gemma 3 text) as a GGUF file at `path`: F32, or its
    matrices quantized to `qtype`. Also writes {arch}.vocab_size (transformers' GGUF loader reads the vocabulary size
    from there or from a tokenizer, which these files lack)."""
    cfg = model.config
    arch = ARCHITECTURES[cfg.model_type]
    writer = gguf.GGUFWriter(str(path), arch=arch)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    if getattr(cfg, "head_dim", None):
        writer.add_key_length(cfg.head_dim)
        writer.add_value_length(cfg.head_dim)
    if arch == "gemma3":
        _add_gemma3_metadata(writer, cfg)
    else:
        writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    state = {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    for name, values in state.items():
        if arch == "llama" and ".q_proj." in name:
            values = llama_cpp_permute(values, cfg.num_attention_heads)
        elif arch == "llama" and ".k_proj." in name:
            values = llama_cpp_permute(values, cfg.num_key_value_heads)
        elif arch == "gemma3" and name.endswith("norm.weight"):
            values = values + np.float32(1.0)  # Gemma3Model.norm_shift
        data, raw_dtype = _tensor_values(values, qtype)
        writer.add_tensor(gguf_name(name, arch), data, raw_dtype=raw_dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
