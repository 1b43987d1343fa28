"""Contrastive steering-vector extraction (paper eq. 3 / 9): read h_l at the last prompt token."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from steerjax.checks import check_layer
from steerjax.errors import InputError, SteeringError
from steerjax.model import LanguageModel

EXTRACTION_METHODS = ("mean_diff", "pca", "pca_centered")


def last_token_states_all_layers(lm: LanguageModel, prompts: Sequence[str], chat: bool = False) -> np.ndarray:
    """h_l at the last token of each prompt for every layer l = 0..L, (L + 1, N, d) float64."""
    out = lm.forward(lm.tokenize(list(prompts), chat=chat), return_hidden=True)
    return np.stack([np.asarray(h[:, -1], np.float64) for h in out.hidden])


def last_token_states(lm: LanguageModel, prompts: Sequence[str], layer: int, chat: bool = False) -> np.ndarray:
    """h_layer at the last token of each prompt, (N, d) float64."""
    return last_token_states_all_layers(lm, prompts, chat)[check_layer(layer, lm.num_layers)]


def vector_from_states(pos: np.ndarray, neg: np.ndarray, method: str = "mean_diff") -> np.ndarray:
    """Steering vector (d,) from positive / negative activations (N, d).
    mean_diff: mean(pos) - mean(neg).
    pca: first principal direction of the paired differences D_i = pos_i - neg_i, uncentred (steering-vectors'
    `pca_aggregator`), signed and scaled to the mean difference's projection on it.
    pca_centered: first principal direction of D - mean(D), centred as repeng's `pca_diff` (scikit-learn's PCA),
    signed as repeng signs it (the sign under which most pairs project higher on the positive side) and scaled to
    |projection of the mean difference| (repeng returns it at unit norm)."""
    if method not in EXTRACTION_METHODS:
        raise InputError(f"unknown extraction method {method!r}; choose one of {EXTRACTION_METHODS}")
    mean_diff = pos.mean(axis=0) - neg.mean(axis=0)
    if method == "mean_diff":
        return mean_diff
    if pos.shape != neg.shape:
        raise InputError(f"{method} extraction needs paired prompts, got {len(pos)} positive and {len(neg)} negative")
    diffs = pos - neg
    if method == "pca":
        direction = np.linalg.svd(diffs, full_matrices=False)[2][0]
        return direction * (direction @ mean_diff)
    if len(diffs) < 2:
        raise InputError("pca_centered extraction needs at least two pairs (one centred difference is zero)")
    direction = np.linalg.svd(diffs - diffs.mean(axis=0), full_matrices=False)[2][0]
    higher = np.mean(pos @ direction > neg @ direction)
    if higher < np.mean(pos @ direction < neg @ direction):
        direction = -direction
    return direction * abs(direction @ mean_diff)


def extract_vector(lm: LanguageModel, pos_prompts: Sequence[str], neg_prompts: Sequence[str], layer: int,
                   method: str = "mean_diff", chat: bool = False) -> np.ndarray:
    """Steering vector (d,) at `layer` from contrastive prompts (h_l at the last token)."""
    if not pos_prompts or not neg_prompts:
        raise InputError("extraction needs at least one positive and one negative prompt")
    pos = last_token_states(lm, pos_prompts, layer, chat)
    neg = last_token_states(lm, neg_prompts, layer, chat)
    v = vector_from_states(pos, neg, method)
    if np.linalg.norm(v) <= 1e-6 * np.linalg.norm(pos, axis=-1).mean():
        raise SteeringError(f"the extracted vector at layer {layer} is zero (|v| = {np.linalg.norm(v):.1e}): the "
                            f"positive and negative prompts give the same activations there (identical prompts, or "
                            f"prompts ending in the same token at layer 0)")
    return v
