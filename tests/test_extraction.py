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


def test_the_two_pca_methods_match_their_peers_definitions():
    """'pca' is steering-vectors' pca_aggregator (top eigenvector of the uncentred second moment of [D; -D],
    signed by mean(D @ vec)); 'pca_centered' is repeng 0.4's pca_diff (scikit-learn's PCA, which centres D, signed
    by the majority of pairs). Both written out in NumPy here; on differences whose mean is not their main axis of
    variation the two directions differ, as they do between the peers."""
    rng = np.random.default_rng(3)
    d, n = 12, 40
    a, b = np.linalg.qr(rng.normal(size=(d, 2)))[0].T
    neg = rng.normal(size=(n, d))
    diffs = 3.0 * a + 2.0 * rng.normal(size=(n, 1)) * b + 0.05 * rng.normal(size=(n, d))
    pos = neg + diffs
    unit = lambda x: x / np.linalg.norm(x)

    stacked = np.concatenate([diffs, -diffs])                       # steering-vectors' _uncentered_pca input
    vec = np.linalg.eigh(stacked.T @ stacked)[1][:, -1]
    peer_sv = np.sign(np.mean(diffs @ vec)) * vec
    centred = diffs - diffs.mean(axis=0)                             # scikit-learn's PCA centres
    comp = np.linalg.eigh(centred.T @ centred)[1][:, -1]
    proj_pos, proj_neg = pos @ comp, neg @ comp                      # repeng's sign: most pairs higher on positive
    peer_repeng = comp if np.mean(proj_pos > proj_neg) >= np.mean(proj_pos < proj_neg) else -comp

    pca, pca_centered = vector_from_states(pos, neg, "pca"), vector_from_states(pos, neg, "pca_centered")
    np.testing.assert_allclose(unit(pca), peer_sv, atol=1e-10)
    np.testing.assert_allclose(unit(pca_centered), peer_repeng, atol=1e-10)
    assert abs(unit(pca) @ unit(pca_centered)) < 0.9                # the peers' directions differ here
    mean_diff = pos.mean(0) - neg.mean(0)
    assert np.linalg.norm(pca_centered) == pytest.approx(abs(unit(pca_centered) @ mean_diff))
    with pytest.raises(sj.InputError, match="at least two pairs"):
        vector_from_states(pos[:1], neg[:1], "pca_centered")


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
