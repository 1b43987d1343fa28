"""steerjax.sequence: teacher-forced multi-position fisher factors against torch.func.jacfwd through the HF model
with the same additive hook, their second-order term against the exact sequence KL (float64), and the exact
per-token KL against the HF model steered by a forward-pre-hook."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import steerjax as sj
from conftest import rel_err
from hf_reference import hf_positions, hf_steering_hook
from steerjax import sequence, stats

# HF's float64 model keeps RMSNorm and RoPE tables in float32 (~1e-7 relative): 2e-6 as in test_jacobian
TORCH_TOL = 2e-6
NAME = "llama3_untied_gqa2"


@pytest.fixture(scope="module")
def tiny(tiny_checkpoints):
    folder, hf_model = tiny_checkpoints[NAME]
    return sj.load_model(folder, dtype="float64"), hf_model


def rows_and_window(seed: int, window: int):
    rng = np.random.default_rng(seed)
    prompts = [list(rng.integers(1, 150, size=n)) for n in (6, 4, 9)]
    continuations = rng.integers(1, 150, size=(3, window))
    return sequence.continuation_rows(prompts, continuations, pad_id=0), prompts, continuations


def torch_window_jacobians(hf_model, batch, layer: int, window: int) -> np.ndarray:
    """torch.func.jacfwd of the logits at the last `window` slots w.r.t. x added to h_layer at those slots
    (B, window, V, d), float64, one row at a time with its padding stripped (HF's eager attention gives NaN
    on all-masked pad rows, and a NaN primal poisons forward-mode tangents)."""
    model = hf_model.double()
    target = model.model.layers[layer]
    out = []
    try:
        for ids, mask in zip(np.asarray(batch.ids), np.asarray(batch.attention_mask)):
            ids = ids[mask.astype(bool)]
            steer = torch.zeros(len(ids), 1, dtype=torch.float64)
            steer[-window:] = 1.0

            def f(x):
                def hook(module, args, kwargs):
                    hidden = args[0] if args else kwargs["hidden_states"]
                    hidden = hidden + steer * x
                    return ((hidden, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": hidden})
                handle = target.register_forward_pre_hook(hook, with_kwargs=True)
                try:
                    return model(input_ids=torch.as_tensor(ids[None])).logits[0, -window:]
                finally:
                    handle.remove()

            x0 = torch.zeros(model.config.hidden_size, dtype=torch.float64)
            out.append(torch.func.jacfwd(f)(x0).detach().numpy())
    finally:
        hf_model.float()
    return np.stack(out)


def test_sequence_fisher_factors_match_torch(tiny):
    lm, hf_model = tiny
    layer, window = 1, 4
    batch, _, _ = rows_and_window(0, window)
    factors = sequence.sequence_fisher_factors(lm, batch, layer, window)
    assert factors.shape == (3, window, lm.d, lm.d)
    J = torch_window_jacobians(hf_model, batch, layer, window)                  # (B, G, V, d) logits
    logits = np.asarray(lm.forward(batch).logits, np.float64)[:, -window:]
    p = np.exp(stats.log_softmax(logits))
    J_F = np.sqrt(p)[..., None] * (J - np.einsum("bgv,bgvd->bgd", p, J)[:, :, None, :])
    for b in range(3):
        for g in range(window):
            gram, ref = factors[b, g].T @ factors[b, g], J_F[b, g].T @ J_F[b, g]
            assert rel_err(gram, ref) <= TORCH_TOL, (b, g)
    # every slot's Jacobian is different (the window is not one distribution repeated)
    assert rel_err(J_F[0, 0], J_F[0, -1]) > 0.1


def test_one_slot_window_is_the_last_position_operator(tiny):
    lm, _ = tiny
    batch, _, _ = rows_and_window(1, 1)
    one = sequence.sequence_fisher_factors(lm, batch, 2, 1)[:, 0]
    op = sj.jacobian_operator(lm, batch, 2, observable="fisher").factors()
    for a, b in zip(one, op):
        np.testing.assert_allclose(a.T @ a, b.T @ b, rtol=0, atol=1e-10 * np.abs(b.T @ b).max())


def test_second_order_term_of_the_sequence_kl(tiny):
    """0.5 s^2 sum_g ||C_g u||^2 is the second-order term of the exact teacher-forced sequence KL of a steer s u at
    every window slot (Steer "last+generated" with the window's prompt_len): the ratio tends to 1, error O(s)."""
    lm, _ = tiny
    layer, window = 2, 3
    batch, _, _ = rows_and_window(2, window)
    factors = sequence.sequence_fisher_factors(lm, batch, layer, window)
    u = np.random.default_rng(3).normal(size=lm.d)
    u /= np.linalg.norm(u)
    quad = np.sum(np.einsum("bgrd,d->bgr", factors, u) ** 2, axis=(1, 2)) * 0.5
    P = sequence.window_prompt_len(batch, window)
    errors = []
    for s in (1e-2, 1e-3):
        kl = sequence.sequence_kl(lm, batch.ids, batch.attention_mask, P, None,
                                  sj.Steer(layer, u, s, "last+generated"))
        assert kl.shape == (3, window - 1)       # the teacher-forced KL covers slots P-1..T-2
        # plus the last window slot (predicting the token after the row): the window's own logits
        last = stats.kl_divergence(
            np.asarray(lm.forward(batch).logits, np.float64)[:, -1],
            np.asarray(lm.forward(batch, sj.Steer(layer, u, s, "last+generated"), prompt_len=P).logits,
                       np.float64)[:, -1])
        total = kl.sum(axis=1) + last
        errors.append(np.max(np.abs(total / (s**2 * quad) - 1)))
    assert errors[1] < 2e-2 and errors[1] < 0.3 * errors[0]


def test_sequence_kl_matches_hf_hook(tiny_checkpoints):
    """Per-token KL between two steered float32 models along sampled sequences, against the HF model steered by a
    forward-pre-hook at the same slots; padding after an EOS gives NaN."""
    folder, hf_model = tiny_checkpoints[NAME]
    lm = sj.load_model(folder)
    rng = np.random.default_rng(4)
    batch = sj.model.left_pad([list(rng.integers(1, 150, size=n)) for n in (5, 3)], pad_id=0)
    out = sj.generate(lm, batch, max_new_tokens=6, temperature=1.0, seed=1)
    layer = 1
    va, vb = rng.normal(size=(2, lm.d))
    steer_a, steer_b = sj.Steer(layer, va, 0.7, "last+generated"), sj.Steer(layer, vb, 0.5, "last+generated")
    kl = sequence.sequence_kl(lm, out.tokens, out.attention_mask, out.prompt_len, steer_a, steer_b, rows_per_call=1)
    P = out.prompt_len
    tokens, mask = np.array(out.tokens), np.array(out.attention_mask)
    steered = sj.steering.position_mask("last+generated", P, mask)
    ref = []
    for vector, alpha in ((va, 0.7), (vb, 0.5)):
        with hf_steering_hook(hf_model, layer, vector, alpha, np.asarray(steered)), torch.no_grad():
            ref.append(hf_model(input_ids=torch.as_tensor(tokens), attention_mask=torch.as_tensor(mask),
                                position_ids=torch.as_tensor(hf_positions(mask))).logits[:, P - 1:-1].double().numpy())
    expected = np.where(mask[:, P:].astype(bool), stats.kl_divergence(*ref), np.nan)
    np.testing.assert_array_equal(np.isnan(kl), np.isnan(expected))
    real = ~np.isnan(kl)
    assert np.all(kl[real] > 0)
    np.testing.assert_allclose(kl[real], expected[real], rtol=1e-3, atol=1e-6)   # float32 forward passes
    same = sequence.sequence_kl(lm, out.tokens, out.attention_mask, P, steer_a, steer_a)
    assert np.nanmax(np.abs(same)) == 0.0
    # per-row vectors: row b steered by its own vector equals the shared-vector result for that row
    rows = sequence.sequence_kl(lm, out.tokens, out.attention_mask, P, steer_a,
                                sj.Steer(layer, np.stack([vb, va]), 0.5, "last+generated"), rows_per_call=1)
    np.testing.assert_allclose(rows[0], kl[0], rtol=1e-6, atol=1e-9, equal_nan=True)


def test_bad_input(tiny):
    lm, _ = tiny
    with pytest.raises(sj.InputError, match="continuations"):
        sequence.continuation_rows([[1, 2]], np.zeros(3, int), 0)
    with pytest.raises(sj.InputError, match="2 prompts but 1"):
        sequence.continuation_rows([[1], [2]], np.zeros((1, 3), int), 0)
    batch, _, _ = rows_and_window(5, 2)
    with pytest.raises(sj.InputError, match="window"):
        sequence.sequence_fisher_factors(lm, batch, 1, 40)
    with pytest.raises(sj.InputError, match="real tokens"):
        sequence.sequence_fisher_factors(lm, batch, 1, batch.ids.shape[1] - 2)
    with pytest.raises(sj.InputError, match="prompt_len"):
        sequence.sequence_kl(lm, batch.ids, batch.attention_mask, 0, None, None)


def test_continuation_logprobs_match_hf(tiny_checkpoints):
    """log p of each generated token under the (steered) model, against the HF model with the same hook."""
    folder, hf_model = tiny_checkpoints[NAME]
    lm = sj.load_model(folder)
    rng = np.random.default_rng(6)
    batch = sj.model.left_pad([list(rng.integers(1, 150, size=n)) for n in (4, 6)], pad_id=0)
    out = sj.generate(lm, batch, max_new_tokens=5, temperature=1.0, seed=2)
    P, tokens, mask = out.prompt_len, np.array(out.tokens), np.array(out.attention_mask)
    v = rng.normal(size=lm.d)
    steer = sj.Steer(1, v, 0.6, "last+generated")
    ours = sequence.continuation_logprobs(lm, tokens, mask, P, steer, rows_per_call=1)
    with hf_steering_hook(hf_model, 1, v, 0.6, np.asarray(sj.steering.position_mask("last+generated", P, mask))), \
            torch.no_grad():
        logits = hf_model(input_ids=torch.as_tensor(tokens), attention_mask=torch.as_tensor(mask),
                          position_ids=torch.as_tensor(hf_positions(mask))).logits[:, P - 1:-1].double().numpy()
    ref = np.take_along_axis(stats.log_softmax(logits), tokens[:, P:, None], axis=-1)[..., 0]
    ref = np.where(mask[:, P:].astype(bool), ref, np.nan)
    np.testing.assert_array_equal(np.isnan(ours), np.isnan(ref))
    np.testing.assert_allclose(ours[~np.isnan(ours)], ref[~np.isnan(ref)], atol=1e-4)   # float32 passes
    assert np.all(ours[~np.isnan(ours)] < 0)
