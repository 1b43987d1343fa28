"""GGUF loading: tiny checkpoints written like llama.cpp (permuted Q/K), and the embedded SmolLM2
against transformers' own GGUF load."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import steerjax as sj
from conftest import build_hf_model, rel_err, random_ids
from gguf_writer import llama_cpp_permute, write_gguf
from hf_reference import hf_forward
from steerjax.models.loading import unpermute_rope_rows

DEFAULT_ROPE = {"rope_type": "default", "rope_theta": 10000.0}


def test_unpermute_inverts_llama_cpp_permutation():
    w = np.random.default_rng(0).normal(size=(6 * 8, 5))
    for heads in (1, 3, 6):
        np.testing.assert_array_equal(unpermute_rope_rows(llama_cpp_permute(w, heads), heads), w)
    assert not np.array_equal(llama_cpp_permute(w, 3), w)


@pytest.mark.parametrize("name,overrides", [
    ("llama3_untied_gqa2", {"rope_parameters": DEFAULT_ROPE}),   # llama arch: Q/K permuted, GQA 2
    ("qwen2_tied_gqa1", {}),                                      # qwen2 arch: biases, tied, no permutation
])
def test_tiny_gguf_matches_hf(tmp_path, name, overrides):
    hf_model = build_hf_model(name, seed=5, **overrides)
    path = tmp_path / "tiny.gguf"
    write_gguf(hf_model, path)
    lm = sj.load_model(path)
    assert lm.config.model_type == hf_model.config.model_type
    assert lm.config.tie_word_embeddings == hf_model.config.tie_word_embeddings
    ids = random_ids(np.random.default_rng(6), 2, 10)
    ref_logits, _, _ = hf_forward(hf_model, ids)
    assert rel_err(lm.forward(ids).logits, ref_logits) <= 1e-4


SMOL_PROMPTS = ["The capital of France is", "Water boils at a temperature of",
                "Once upon a time, in a small village,"]
# transformers dequantizes with the same gguf kernels; both then run float32 through 30 layers.
# The bar is 1e-3 relative; we measure ~1e-5 (README).
SMOL_TOL = 1e-3


def test_smollm2_logits_match_transformers_gguf_load(smollm2, smollm2_hf):
    assert (smollm2.num_layers, smollm2.d, smollm2.config.vocab_size) == (30, 576, 49152)
    batch = smollm2.tokenize(SMOL_PROMPTS)
    logits = np.asarray(smollm2.forward(batch).logits)
    ref, _, _ = hf_forward(smollm2_hf, batch.ids, batch.attention_mask)
    real = batch.attention_mask.astype(bool)
    err = rel_err(logits[real], ref[real])
    print(f"SmolLM2 logits relative error vs transformers GGUF load: {err:.2e}")
    assert err <= SMOL_TOL


def greedy_continuation(lm, text: str, new_tokens: int) -> list[int]:
    """Greedy decoding by repeated full forwards (the KV-cache engine is tested elsewhere)."""
    ids = list(lm.tokenize([text]).ids[0])
    for _ in range(new_tokens):
        ids.append(int(np.argmax(lm.forward(np.array(ids)).logits[0, -1])))
    return ids


def test_smollm2_greedy_text_is_fluent_and_matches_hf(smollm2, smollm2_hf):
    prompt = SMOL_PROMPTS[0]
    ours = greedy_continuation(smollm2, prompt, 8)
    ids = smollm2.tokenize([prompt]).ids
    with torch.no_grad():
        ref = smollm2_hf.generate(torch.as_tensor(ids, dtype=torch.long), max_new_tokens=8, do_sample=False,
                                  attention_mask=torch.ones(ids.shape, dtype=torch.long))
    assert ours == ref[0].tolist()
    text = smollm2.decode([ours])[0]
    print(repr(text))
    assert "Paris" in text
