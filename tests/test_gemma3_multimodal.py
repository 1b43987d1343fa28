"""Multimodal Gemma 3 checkpoints (model_type "gemma3", transformers' Gemma3ForConditionalGeneration): steerjax loads
their text decoder. Tiny random checkpoints (the text decoder of test_gemma3_qwen3's gemma3_plain, a one-block
SigLIP tower) saved by transformers: logits and every hidden state on a left-padded text-only batch against
Gemma3ForConditionalGeneration (eager, float32), tied and untied; both tensor naming schemes load the same params;
a Hub-style sparse config.json against transformers' Gemma3Config; the errors.

Text-only input needs nothing extra in transformers 5.25: without pixel_values and token_type_ids the multimodal
forward embeds the ids and runs the language model with the same causal / sliding masks as Gemma3ForCausalLM. It
differs from Gemma3ForCausalLM in one documented way: it never applies final_logit_softcapping (the tied checkpoint
sets one, which steerjax then ignores too)."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

import steerjax as sj
from conftest import TINY_VOCAB, randomize_weights
from steerjax.models.config import config_from_hf
from test_gemma3_qwen3 import CONFIGS, F32_TOL, padded_batch, parity_errors

MM_CONFIGS = {
    # tied lm_head; a final logit softcap that Gemma3ForConditionalGeneration does not apply
    "mm_tied": dict(text=dict(CONFIGS["gemma3_plain"], final_logit_softcapping=3.0), tie_word_embeddings=True),
    "mm_untied": dict(text=CONFIGS["gemma3_plain"], tie_word_embeddings=False),
}


def build_mm_model(name: str, seed: int = 0):
    """A tiny Gemma3ForConditionalGeneration (eager, float32) with O(1)-scale random weights: 28-pixel images of
    2 x 2 patches pooled to mm_tokens_per_image = 4 soft tokens; image tokens at the top of the 160-token vocab."""
    import torch
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3TextConfig, SiglipVisionConfig

    spec = MM_CONFIGS[name]
    text = {key: value for key, value in spec["text"].items() if key != "model_type"}
    text_config = Gemma3TextConfig(vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=96, rms_norm_eps=1e-6,
                                   max_position_embeddings=64, pad_token_id=0,
                                   tie_word_embeddings=spec["tie_word_embeddings"], **text)
    vision_config = SiglipVisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                       num_attention_heads=2, image_size=28, patch_size=14)
    config = Gemma3Config(text_config=text_config, vision_config=vision_config, mm_tokens_per_image=4,
                          boi_token_index=TINY_VOCAB - 3, eoi_token_index=TINY_VOCAB - 2,
                          image_token_index=TINY_VOCAB - 1, tie_word_embeddings=spec["tie_word_embeddings"],
                          attn_implementation="eager")
    torch.manual_seed(seed)
    return randomize_weights(Gemma3ForConditionalGeneration(config).eval(), lambda p: 0.3 * p)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """name -> (folder, torch model), saved with save_pretrained as float32 safetensors."""
    out = {}
    for name in MM_CONFIGS:
        model = build_mm_model(name)
        folder = tmp_path_factory.mktemp(name)
        model.save_pretrained(folder)
        out[name] = (folder, model)
    return out


def saved_tensors(folder):
    from safetensors.numpy import load_file

    return load_file(str(folder / "model.safetensors"))


def test_save_pretrained_writes_the_hub_names(checkpoints):
    """transformers 5.25 writes the Hub's (pre-5) names, though its modules are model.language_model.*."""
    folder, hf_model = checkpoints["mm_untied"]
    names = set(saved_tensors(folder))
    assert "language_model.model.layers.0.self_attn.q_proj.weight" in names
    assert {"language_model.model.embed_tokens.weight", "language_model.model.norm.weight",
            "language_model.lm_head.weight"} <= names
    assert any(n.startswith("vision_tower.") for n in names) and any(n.startswith("multi_modal_projector.")
                                                                       for n in names)
    assert "model.language_model.norm.weight" in dict(hf_model.named_parameters())
    assert "language_model.lm_head.weight" not in saved_tensors(checkpoints["mm_tied"][0])


@pytest.mark.parametrize("name", list(MM_CONFIGS))
def test_logits_and_every_hidden_state_match_hf_on_a_padded_batch(checkpoints, name):
    folder, hf_model = checkpoints[name]
    lm = sj.load_model(folder)
    raw = json.loads((folder / "config.json").read_text())
    assert raw["model_type"] == "gemma3"
    assert lm.config.model_type == "gemma3_text" and lm.num_layers == 4 and lm.config.vocab_size == TINY_VOCAB
    assert lm.config.tie_word_embeddings == MM_CONFIGS[name]["tie_word_embeddings"]
    assert lm.config.final_logit_softcapping is None  # Gemma3ForConditionalGeneration applies none
    # the same config as the text_config alone would give, less the softcap
    alone = config_from_hf({**raw["text_config"], "final_logit_softcapping": None})
    assert lm.config == alone
    errors = parity_errors(lm, hf_model, padded_batch(1))
    print(f"{name}: max relative error {max(errors.values()):.2e} ({max(errors, key=errors.get)})")
    assert max(errors.values()) <= F32_TOL, errors


def transformers5_names(name: str) -> str:
    """A tensor's name in transformers 5's module tree (its conversion mapping applied to a Hub name)."""
    for old, new in (("language_model.model.", "model.language_model."), ("language_model.lm_head.", "lm_head."),
                     ("vision_tower.", "model.vision_tower."),
                     ("multi_modal_projector.", "model.multi_modal_projector.")):
        if name.startswith(old):
            return new + name[len(old):]
    raise AssertionError(f"unexpected tensor {name}")


@pytest.mark.parametrize("name", list(MM_CONFIGS))
def test_both_naming_schemes_load_identical_params(checkpoints, tmp_path, name):
    from safetensors.numpy import save_file

    folder, _ = checkpoints[name]
    renamed = {transformers5_names(n): value for n, value in saved_tensors(folder).items()}
    assert "model.language_model.layers.3.mlp.down_proj.weight" in renamed
    save_file(renamed, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    hub, new = sj.load_model(folder), sj.load_model(tmp_path)
    assert hub.config == new.config
    assert jax.tree.structure(hub.params) == jax.tree.structure(new.params)
    assert ("lm_head" in hub.params) == (not MM_CONFIGS[name]["tie_word_embeddings"])
    assert all(jax.tree.leaves(jax.tree.map(np.array_equal, hub.params, new.params)))


def test_hub_style_sparse_config_matches_transformers():
    """gemma-3-4b-it's config.json names few text keys and puts eos_token_id at the top level: the missing ones are
    transformers' Gemma3TextConfig defaults, checked against Gemma3Config itself."""
    from transformers import Gemma3Config

    raw = {"architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3", "eos_token_id": [1, 106],
           "boi_token_index": 255999, "eoi_token_index": 256000, "image_token_index": 262144,
           "mm_tokens_per_image": 256,
           "text_config": {"hidden_size": 2560, "intermediate_size": 10240, "model_type": "gemma3_text",
                           "num_hidden_layers": 34, "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
                           "sliding_window": 1024},
           "vision_config": {"hidden_size": 1152, "image_size": 896, "intermediate_size": 4304,
                             "model_type": "siglip_vision_model", "num_attention_heads": 16,
                             "num_hidden_layers": 27, "patch_size": 14, "vision_use_head": False}}
    config = config_from_hf(raw)
    hf = Gemma3Config.from_dict(raw)
    text = hf.text_config
    assert (config.vocab_size, config.hidden_size, config.intermediate_size, config.num_layers) == (
        text.vocab_size, text.hidden_size, text.intermediate_size, text.num_hidden_layers) == (262208, 2560, 10240, 34)
    assert (config.num_heads, config.num_kv_heads, config.head_dim) == (
        text.num_attention_heads, text.num_key_value_heads, text.head_dim)
    assert config.query_pre_attn_scalar == text.query_pre_attn_scalar
    assert config.max_position_embeddings == text.max_position_embeddings
    assert config.sliding_window == text.sliding_window and list(config.layer_types) == text.layer_types
    rope = text.rope_parameters
    assert config.rope_theta == rope["full_attention"]["rope_theta"]
    assert dict(config.rope_scaling) == {"rope_type": "linear", "factor": 8.0}
    assert config.rope_local_theta == rope["sliding_attention"]["rope_theta"] and config.rope_local_scaling == ()
    assert config.tie_word_embeddings is hf.tie_word_embeddings is True
    assert config.eos_token_id == (1, 106) and config.bos_token_id == 2 and config.pad_token_id == 0
    # text_config without model_type is read the same
    del raw["text_config"]["model_type"]
    assert config_from_hf(raw) == config


def test_config_without_text_config_is_a_clear_error(checkpoints, tmp_path):
    folder, _ = checkpoints["mm_tied"]
    raw = json.loads((folder / "config.json").read_text())
    del raw["text_config"]
    (tmp_path / "config.json").write_text(json.dumps(raw))
    (tmp_path / "model.safetensors").symlink_to(folder / "model.safetensors")
    with pytest.raises(sj.UnsupportedModelError, match="model_type 'gemma3'.* has no text_config"):
        sj.load_model(tmp_path)
    with pytest.raises(sj.UnsupportedModelError, match="text_config has model_type 'siglip_vision_model'"):
        config_from_hf({"model_type": "gemma3", "text_config": {"model_type": "siglip_vision_model"}})


@pytest.mark.parametrize("hub_names", [True, False])
def test_missing_text_tensor_is_named_as_in_the_checkpoint(checkpoints, tmp_path, hub_names):
    from safetensors.numpy import save_file

    folder, _ = checkpoints["mm_untied"]
    state = saved_tensors(folder)
    del state["language_model.model.layers.2.mlp.up_proj.weight"], state["language_model.lm_head.weight"]
    if not hub_names:
        state = {transformers5_names(n): value for n, value in state.items()}
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    missing = (r"language_model\.lm_head\.weight, language_model\.model\.layers\.2\.mlp\.up_proj\.weight"
               if hub_names else r"lm_head\.weight, model\.language_model\.layers\.2\.mlp\.up_proj\.weight")
    with pytest.raises(sj.WeightError, match=rf"missing 2 weight tensor\(s\): {missing}$"):
        sj.load_model(tmp_path)
