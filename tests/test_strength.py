"""steerjax.strength: steering strength by next-token KL (calibrate_alpha, steering_kl) and the layer profile.

References: the exact KL from steerjax's FULL forward with `Steer` (the strength module uses the one-token tail
instead), transformers' float64 model with a forward-pre-hook for the second-order term, and the Fisher matrix
written out in NumPy float64 from the dense logit Jacobian."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import steerjax as sj
from conftest import random_ids
from hf_reference import hf_steering_hook
from steerjax import data, plotting, stats, strength
from steerjax.model import TokenBatch

LAYER = 15


def full_forward_kl(lm, batch, vector, layer, alpha, positions) -> np.ndarray:
    """KL(p_steered || p) (B,) at the last prompt token from two full forward passes (left-padded: last column)."""
    base = np.asarray(lm.forward(batch).logits[:, -1], np.float64)
    steer = sj.Steer(layer=layer, vector=vector, alpha=alpha, positions=positions)   # lowered in the model dtype
    steered = np.asarray(lm.forward(batch, steer=steer).logits[:, -1], np.float64)
    return stats.kl_divergence(steered, base)


@pytest.fixture(scope="module")
def formality(smollm2):
    pos, neg = data.trait_pairs("formality")
    return sj.extract_vector(smollm2, pos[:16], neg[:16], LAYER)


def test_calibrate_alpha_hits_its_target_on_the_embedded_model(smollm2, formality):
    """Issue 24's bar: within 2% of the target, here checked on the full forward with Steer (not the tail the
    solver uses); the solver's own KLs agree with the full forward to float32 rounding. (positions="all" is
    checked against the full forward on the tiny model below.)"""
    positions = "last"
    batch = smollm2.tokenize(data.neutral_eval_prompts()[:6])
    for target in (0.02, 0.2, 1.0):
        cal = sj.calibrate_alpha(smollm2, batch, formality, LAYER, target, positions=positions)
        assert cal.mean_kl == pytest.approx(target, rel=1e-3)
        kl = full_forward_kl(smollm2, batch, formality, LAYER, cal.alpha, positions)
        assert abs(kl.mean() / target - 1) < 0.02, (target, kl.mean())
        np.testing.assert_allclose(cal.kl, kl, rtol=2e-3, atol=1e-6)
        assert cal.steer_norm == pytest.approx(cal.alpha * np.linalg.norm(formality))
        assert cal.second_order_alpha == pytest.approx(np.sqrt(target / cal.kl_per_alpha_sq))
        # the inverse: steering_kl at the calibrated alpha gives the target back
        again = sj.steering_kl(smollm2, batch, formality, LAYER, cal.alpha, positions=positions)
        assert again.mean_kl == pytest.approx(cal.mean_kl, rel=1e-6)


@pytest.fixture(scope="module")
def tiny64(tiny_checkpoints):
    folder, hf_model = tiny_checkpoints["llama3_untied_gqa2"]
    return sj.load_model(folder, dtype="float64"), hf_model.double()


def tiny_batch(seed: int = 3, rows: int = 3, length: int = 7, padded: bool = True) -> TokenBatch:
    ids = random_ids(np.random.default_rng(seed), rows, length)
    mask = np.ones_like(ids)
    if padded:                             # one left-padded row
        mask[0, :2] = 0
        ids[0, :2] = 0
    return TokenBatch(ids, mask)


def hf_kl(hf_model, batch: TokenBatch, layer: int, vector, alpha: float) -> np.ndarray:
    """KL(p_steered || p) (B,) at the last token, transformers float64 with a pre-hook at the last position."""
    from hf_reference import hf_positions

    ids, mask = np.asarray(batch.ids), np.asarray(batch.attention_mask)
    kwargs = dict(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask),
                  position_ids=torch.as_tensor(hf_positions(mask)))
    last = np.zeros(ids.shape)
    last[:, -1] = 1
    with torch.no_grad():
        base = hf_model(**kwargs).logits[:, -1].numpy()
        with hf_steering_hook(hf_model, layer, vector, alpha, last):
            steered = hf_model(**kwargs).logits[:, -1].numpy()
    return stats.kl_divergence(steered, base)


def test_exact_to_second_order_on_a_tiny_model(tiny64):
    """q_i = 0.5 v^T F_i v equals transformers' exact KL / alpha^2 as alpha -> 0 (error O(alpha)), and the
    calibrated alpha tends to the second-order one as the target shrinks, with error O(sqrt(target))."""
    lm, hf_model = tiny64
    batch, layer = tiny_batch(padded=False), 1      # transformers' eager attention turns fully masked rows to NaN
    v = np.random.default_rng(5).normal(size=lm.d)
    probe = strength.KLProbe(lm, batch, v, layer)
    for alpha in (1e-2, 1e-3):
        ratio = hf_kl(hf_model, batch, layer, v, alpha) / (alpha**2 * probe.q)
        assert np.max(np.abs(ratio - 1)) < 40 * alpha, (alpha, ratio)     # first-order remainder, shrinking
    errors = []
    for target in (1e-4, 1e-6, 1e-8):
        cal = sj.calibrate_alpha(lm, batch, v, layer, target, rtol=1e-6)
        assert cal.mean_kl == pytest.approx(target, rel=1e-6)
        errors.append(abs(cal.alpha / cal.second_order_alpha - 1))
    assert errors[2] < 2e-3 and errors[1] < errors[0] / 5 and errors[2] < errors[1] / 5, errors


def test_steering_kl_positions_and_bad_input(tiny64):
    lm, _ = tiny64
    batch = tiny_batch()
    v = np.random.default_rng(6).normal(size=lm.d)
    for positions in ("last", "all"):
        got = sj.steering_kl(lm, batch, v, 2, 0.7, positions=positions)
        np.testing.assert_allclose(got.kl, full_forward_kl(lm, batch, v, 2, 0.7, positions), rtol=1e-9, atol=1e-14)
    same = sj.steering_kl(lm, batch, v, 2, 0.7, positions="last+generated")
    np.testing.assert_allclose(same.kl, sj.steering_kl(lm, batch, v, 2, 0.7).kl, rtol=1e-12)
    with pytest.raises(sj.InputError, match="steers no prompt token"):
        sj.steering_kl(lm, batch, v, 2, 0.7, positions="generated")
    with pytest.raises(sj.InputError, match="target_kl"):
        sj.calibrate_alpha(lm, batch, v, 2, 0.0)
    with pytest.raises(sj.InputError, match="the model needs"):
        sj.calibrate_alpha(lm, batch, v[:-1], 2, 0.1)
    with pytest.raises(sj.SteeringError, match="zero norm"):
        sj.steering_kl(lm, batch, np.zeros(lm.d), 2, 1.0)
    with pytest.raises(sj.InputError, match="alpha must be finite"):
        sj.steering_kl(lm, batch, v, 2, float("nan"))
    with pytest.raises(sj.SteeringError, match="below target_kl"):
        sj.calibrate_alpha(lm, batch, v, 2, 1e6, max_doublings=2)


def fisher_matrices(lm, batch, layer) -> np.ndarray:
    """F_i = J_i^T (diag p_i - p_i p_i^T) J_i (B, d, d) in NumPy float64 from the dense logit Jacobian."""
    op = sj.jacobian_operator(lm, batch, layer, observable="logits")
    J = np.asarray(op.dense(), np.float64)                                 # (B, V, d)
    logits = np.asarray(op.value(), np.float64)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    cov = np.stack([np.diag(pi) - np.outer(pi, pi) for pi in p])
    return np.einsum("bvd,bvw,bwe->bde", J, cov, J)


def test_layer_profile_agrees_with_direct_computations(tiny64, tmp_path):
    lm, _ = tiny64
    batch = tiny_batch(seed=4, rows=4)
    rng = np.random.default_rng(7)
    vectors = {layer: rng.normal(size=lm.d) * (1 + layer) for layer in (1, 3)}
    tau, fraction, target = 1e-3, 0.3, 0.05
    profile = sj.layer_profile(lm, batch, vectors, target_kl=target, tau=tau, steer_fraction=fraction,
                               progress=False)
    hidden = lm.forward(batch, return_hidden=True).hidden
    assert [row["layer"] for row in profile.rows] == [1, 3]
    for row in profile.rows:
        layer, v = row["layer"], vectors[row["layer"]]
        h_median = np.median(np.linalg.norm(np.asarray(hidden[layer][:, -1]), axis=1))
        assert row["norm_ratio"] == pytest.approx(np.linalg.norm(v) / h_median, rel=1e-12)
        fisher = fisher_matrices(lm, batch, layer)
        assert row["fisher_form"] == pytest.approx(np.mean([v @ F @ v for F in fisher]), rel=1e-8)
        assert row["kl_per_alpha_sq"] == pytest.approx(row["fisher_form"] / 2, rel=1e-12)
        kl = full_forward_kl(lm, batch, v, layer, row["alpha"], "last")
        assert kl.mean() == pytest.approx(target, rel=2e-3)
        lam, vec = np.linalg.eigh(fisher.mean(axis=0))
        invisible = vec[:, 0.5 * (fraction * h_median) ** 2 * lam <= tau]
        assert row["invisible_dim"] == invisible.shape[1]
        assert row["invisible_share"] == pytest.approx(np.sum((invisible.T @ v) ** 2) / (v @ v), abs=1e-9)
    plotting.plot_layer_profile(profile.rows, tmp_path / "profile.png")
    assert (tmp_path / "profile.png").stat().st_size > 10_000


def test_layer_profile_inputs(tiny64, smollm2):
    lm, _ = tiny64
    batch = tiny_batch()
    stack = np.random.default_rng(8).normal(size=(lm.num_layers + 1, lm.d))
    from_stack = sj.layer_profile(lm, batch, stack, layers=[2], progress=False).rows[0]
    from_mapping = sj.layer_profile(lm, batch, {2: stack[2]}, progress=False).rows[0]
    assert from_stack == from_mapping
    with pytest.raises(sj.InputError, match="no vector given for layer"):
        sj.layer_profile(lm, batch, {2: stack[2]}, layers=[1], progress=False)
    with pytest.raises(sj.InputError, match="one per layer"):
        sj.layer_profile(lm, batch, stack[:2], progress=False)
    # contrastive pairs: the mean-difference vector at each layer, as extract_vector reads it
    pos, neg = data.trait_pairs("politeness")
    pairs = (pos[:4], neg[:4])
    vectors = strength.profile_vectors(smollm2, pairs, [3, 29])
    for layer in (3, 29):
        np.testing.assert_allclose(vectors[layer], sj.extract_vector(smollm2, *pairs, layer), rtol=1e-12)
    assert list(strength.profile_vectors(smollm2, pairs, None)) == list(range(1, smollm2.num_layers + 1))
