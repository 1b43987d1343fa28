"""Steering: steerjax's Steer against an HF forward-pre-hook, and the four absolute-position modes."""

from __future__ import annotations

import numpy as np
import pytest

import steerjax as sj
from conftest import rel_err, random_ids
from hf_reference import hf_forward, hf_steering_hook
from steerjax.steering import position_mask

F32_TOL = 1e-4  # as in test_models: float32 rounding differences between the two implementations


@pytest.mark.parametrize("name", ["qwen2_tied_gqa1", "llama3_untied_gqa2"])
@pytest.mark.parametrize("layer", [0, 1, 3])
def test_steer_last_equals_hf_pre_hook(tiny_checkpoints, name, layer):
    folder, hf_model = tiny_checkpoints[name]
    lm = sj.load_model(folder)
    rng = np.random.default_rng(10 + layer)
    ids = random_ids(rng, batch=2, length=9)
    v = rng.normal(size=lm.d).astype(np.float32)
    alpha = -1.7
    out = lm.forward(ids, steer=sj.Steer(layer=layer, vector=v, alpha=alpha, positions="last"))
    last_only = np.zeros(ids.shape)
    last_only[:, -1] = 1
    with hf_steering_hook(hf_model, layer, v, alpha, last_only):
        ref_logits, _, _ = hf_forward(hf_model, ids)
    unsteered, _, _ = hf_forward(hf_model, ids)
    assert rel_err(out.logits, ref_logits) <= F32_TOL
    # the intervention really moved the last position, and (causal attention) nothing before it
    assert rel_err(ref_logits[:, -1], unsteered[:, -1]) > 1e-2
    np.testing.assert_allclose(out.logits[:, :-1], unsteered[:, :-1], rtol=0, atol=1e-4)


def test_steer_all_positions_with_padding_equals_hf_pre_hook(tiny_checkpoints):
    folder, hf_model = tiny_checkpoints["llama3_untied_gqa2"]
    lm = sj.load_model(folder)
    rng = np.random.default_rng(20)
    batch = sj.model.left_pad([list(rng.integers(1, 100, size=n)) for n in (4, 8)], pad_id=0)
    v = rng.normal(size=lm.d).astype(np.float32)
    out = lm.forward(batch, steer=sj.Steer(layer=2, vector=v, alpha=0.8, positions="all"), return_hidden=True)
    with hf_steering_hook(hf_model, 2, v, 0.8, batch.attention_mask):
        ref_logits, _, _ = hf_forward(hf_model, batch.ids, batch.attention_mask)
    real = batch.attention_mask.astype(bool)
    assert rel_err(np.asarray(out.logits)[real], ref_logits[real]) <= F32_TOL
    # hidden[2] is h_2 as block 2 sees it: unsteered h_2 plus alpha * v on every real token
    plain = lm.forward(batch, return_hidden=True)
    diff = np.asarray(out.hidden[2]) - np.asarray(plain.hidden[2])
    np.testing.assert_allclose(diff[real], np.broadcast_to(0.8 * v, diff[real].shape), atol=1e-5)
    np.testing.assert_array_equal(diff[~real], 0)
    np.testing.assert_array_equal(out.hidden[1], plain.hidden[1])


def test_position_modes_are_absolute_position_masks():
    # 2 rows, 7 slots: left-padded prompt of 4 slots (row 0 has 1 pad), then 3 generated tokens
    attention_mask = np.array([[0, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1]])
    prompt_len = 4
    expected = {
        "last": [[0, 0, 0, 1, 0, 0, 0], [0, 0, 0, 1, 0, 0, 0]],
        "last+generated": [[0, 0, 0, 1, 1, 1, 1], [0, 0, 0, 1, 1, 1, 1]],
        "all": [[0, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1]],
        "generated": [[0, 0, 0, 0, 1, 1, 1], [0, 0, 0, 0, 1, 1, 1]],
    }
    assert set(expected) == set(sj.POSITION_MODES)
    for mode, mask in expected.items():
        np.testing.assert_array_equal(position_mask(mode, prompt_len, attention_mask), mask, err_msg=mode)
    # a prompt-only forward: "generated" steers nothing, "last+generated" equals "last"
    prompt_mask = attention_mask[:, :prompt_len]
    assert not np.any(position_mask("generated", prompt_len, prompt_mask))
    np.testing.assert_array_equal(position_mask("last+generated", prompt_len, prompt_mask),
                                  position_mask("last", prompt_len, prompt_mask))


def test_generated_mode_leaves_a_prompt_forward_unchanged(tiny_checkpoints):
    folder, _ = tiny_checkpoints["qwen2_tied_gqa1"]
    lm = sj.load_model(folder)
    ids = random_ids(np.random.default_rng(21), 1, 6)
    v = np.ones(lm.d, np.float32)
    steered = lm.forward(ids, steer=sj.Steer(layer=1, vector=v, alpha=5.0, positions="generated"))
    np.testing.assert_array_equal(steered.logits, lm.forward(ids).logits)


def test_steer_is_linear_in_alpha_to_first_order(tiny_checkpoints):
    folder, _ = tiny_checkpoints["qwen2_tied_gqa1"]
    lm = sj.load_model(folder, dtype="float64")
    ids = random_ids(np.random.default_rng(22), 1, 6)
    v = np.random.default_rng(23).normal(size=lm.d)
    base = np.asarray(lm.forward(ids).logits[0, -1])
    deltas = [np.asarray(lm.forward(ids, steer=sj.Steer(1, v, a)).logits[0, -1]) - base for a in (1e-4, 2e-4)]
    # second-order remainder: doubling alpha doubles the change up to O(alpha^2)
    assert rel_err(deltas[1], 2 * deltas[0]) < 1e-3
