"""Steering-vector extraction against hidden states read from the transformers reference."""

from __future__ import annotations

import numpy as np
import pytest

import steerjax as sj
from steerjax.extraction import vector_from_states


def test_mean_diff_and_pca_from_states_match_numpy():
    rng = np.random.default_rng(0)
    direction = rng.normal(size=16)
    neg = rng.normal(size=(30, 16))
    pos = neg + 3.0 * direction + 0.1 * rng.normal(size=(30, 16))
    np.testing.assert_allclose(vector_from_states(pos, neg), pos.mean(0) - neg.mean(0))
    pca = vector_from_states(pos, neg, "pca")
    cos = pca @ direction / np.linalg.norm(pca) / np.linalg.norm(direction)
    assert cos > 0.999  # recovers the planted direction, with the mean difference's sign
    mean_diff = pos.mean(0) - neg.mean(0)
    assert pca @ mean_diff == pytest.approx(np.dot(pca / np.linalg.norm(pca), mean_diff) ** 2)
    with pytest.raises(sj.InputError, match="unknown extraction method"):
        vector_from_states(pos, neg, "logistic")


def test_extract_vector_matches_hf_hidden_states(smollm2, smollm2_hf):
    import torch

    pos = ["Dear Sir, I write to inform you", "We kindly request your presence"]
    neg = ["hey dude, just so u know", "yo come hang out"]
    layer = 12
    v = sj.extract_vector(smollm2, pos, neg, layer=layer)

    def hf_states(prompts):
        rows = []
        for text in prompts:
            ids = torch.as_tensor(smollm2.tokenize([text]).ids, dtype=torch.long)
            with torch.no_grad():
                rows.append(smollm2_hf(input_ids=ids, output_hidden_states=True).hidden_states[layer][0, -1].numpy())
        return np.array(rows, np.float64)

    ref = hf_states(pos).mean(0) - hf_states(neg).mean(0)
    assert np.max(np.abs(v - ref)) / np.max(np.abs(ref)) < 1e-3
    with pytest.raises(sj.SteeringError, match="outside"):
        sj.extract_vector(smollm2, pos, neg, layer=31)
