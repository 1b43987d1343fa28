"""KV-cache generation: greedy parity with HF generate (plain and with a steering hook), exact position
masks in prefill and decode, vmapping over alphas, per-row PRNG keys and nucleus sampling."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import steerjax as sj
from conftest import build_hf_model, rel_err, save_without_eos
from steerjax import generation
from steerjax.generation import generate_pure, row_keys, sample_token
from steerjax.steering import position_mask


@pytest.fixture(scope="module")
def tiny_no_eos(tmp_path_factory):
    """A tiny Llama without an EOS token, so greedy runs always last max_new_tokens on both sides."""
    folder, hf_model = save_without_eos(tmp_path_factory, build_hf_model("llama3_untied_gqa2", seed=3), "tiny_gen")
    return sj.load_model(folder), hf_model


def hf_greedy(model, batch, new_tokens, pad_id=0):
    with torch.no_grad():
        return model.generate(torch.as_tensor(batch.ids, dtype=torch.long), do_sample=False,
                              attention_mask=torch.as_tensor(batch.attention_mask, dtype=torch.long),
                              max_new_tokens=new_tokens, pad_token_id=pad_id).numpy()


def test_greedy_matches_hf_generate_on_padded_batch(tiny_no_eos):
    lm, hf_model = tiny_no_eos
    rng = np.random.default_rng(0)
    batch = sj.model.left_pad([list(rng.integers(1, 150, size=n)) for n in (3, 9, 6)], pad_id=0)
    ours = sj.generate(lm, batch, max_new_tokens=10)
    assert ours.tokens.shape == (3, 19)
    np.testing.assert_array_equal(ours.tokens, hf_greedy(hf_model, batch, 10))


@pytest.mark.parametrize("mode", sj.POSITION_MODES)
def test_cached_generation_steers_exactly_the_masked_positions(tiny_no_eos, mode):
    """Every decode step's logits equal a full (uncached) forward over the final sequence with the
    steering delta at position_mask(mode): prefill and decode steer the same absolute positions."""
    lm, _ = tiny_no_eos
    rng = np.random.default_rng(1)
    batch = sj.model.left_pad([list(rng.integers(1, 150, size=n)) for n in (4, 7)], pad_id=0)
    steer = sj.Steer(layer=1, vector=rng.normal(size=lm.d), alpha=2.0, positions=mode)
    out = sj.generate(lm, batch, steer=steer, max_new_tokens=6, return_logits=True)
    T = batch.ids.shape[1]
    full = lm.forward(out.tokens, steer=steer, attention_mask=out.attention_mask, prompt_len=T).logits
    assert rel_err(out.logits, full[:, T - 1:-1]) <= 1e-4
    # and the steering did something where the mode says it should
    plain = lm.forward(out.tokens, attention_mask=out.attention_mask).logits
    changed = np.abs(np.asarray(full) - np.asarray(plain)).max(axis=-1) > 1e-4
    changed &= out.attention_mask.astype(bool)  # pad slots carry no meaningful logits
    steered = np.asarray(position_mask(mode, T, out.attention_mask)).astype(bool)
    first_steered = np.argmax(np.cumsum(steered, axis=1) > 0, axis=1)
    for row in range(2):
        if steered[row].any():
            assert not changed[row, :first_steered[row]].any()
            assert changed[row, first_steered[row]:].all()
        else:
            assert not changed[row].any()


def test_steered_generation_matches_hf_hook_on_smollm2(smollm2, smollm2_hf):
    """The paper's protocol: a hook adding alpha*v at position -1 of every forward call under the KV cache
    is positions='last+generated'."""
    batch = smollm2.tokenize(["The capital of France is", "My favourite food is"])
    v = np.random.default_rng(2).normal(size=smollm2.d).astype(np.float32)
    v *= 8.0 / np.linalg.norm(v)
    layer = 15
    plain = sj.generate(smollm2, batch, max_new_tokens=8)
    np.testing.assert_array_equal(plain.tokens, hf_greedy(smollm2_hf, batch, 8, smollm2.pad_id))
    steer = sj.Steer(layer=layer, vector=v, alpha=1.0, positions="last+generated")
    ours = sj.generate(smollm2, batch, steer=steer, max_new_tokens=8)

    def last_position_hook(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        hidden = torch.cat([hidden[:, :-1], hidden[:, -1:] + torch.as_tensor(v)], dim=1)
        return ((hidden, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": hidden})

    handle = smollm2_hf.model.layers[layer].register_forward_pre_hook(last_position_hook, with_kwargs=True)
    try:
        ref = hf_greedy(smollm2_hf, batch, 8, smollm2.pad_id)
    finally:
        handle.remove()
    np.testing.assert_array_equal(ours.tokens, ref)
    assert not np.array_equal(ours.tokens, plain.tokens)  # the steering changed the text
    assert all(isinstance(t, str) for t in sj.generated_texts(smollm2, ours))


@pytest.mark.parametrize("kernels", [False, True], ids=["xla-dot", "cpu-decode-kernels"])
def test_vmap_over_alphas_equals_separate_calls(tiny_no_eos, kernels):
    """Also with the CPU decode kernels' panels passed in: the kernel call vmaps over the alphas' rows."""
    lm, _ = tiny_no_eos
    panels = generation.decode_panels(lm) if kernels else None
    ids = np.random.default_rng(3).integers(1, 150, size=(2, 5)).astype(np.int32)
    mask = np.ones_like(ids)
    v = np.random.default_rng(4).normal(size=lm.d).astype(np.float32)
    alphas = jnp.array([-2.0, 0.0, 3.0])

    def run(alpha):
        tokens, _, _ = generate_pure(lm.config, lm.params, ids, mask, 2, jnp.asarray(v), alpha, row_keys(0, 2),
                                     0.0, 1.0, panels, max_new_tokens=5, mode="all")
        return tokens

    batched = jax.jit(jax.vmap(run))(alphas)
    for k, alpha in enumerate(alphas):
        single = sj.generate(lm, ids, steer=sj.Steer(2, v, float(alpha), "all"), max_new_tokens=5,
                             decode_kernels=kernels)
        np.testing.assert_array_equal(batched[k], single.tokens)


def test_sampling_keys_and_reproducibility(tiny_no_eos):
    lm, _ = tiny_no_eos
    ids = np.tile(np.arange(1, 6, dtype=np.int32), (6, 1))  # identical prompts
    a = sj.generate(lm, ids, max_new_tokens=8, temperature=1.0, seed=7).tokens
    b = sj.generate(lm, ids, max_new_tokens=8, temperature=1.0, seed=7).tokens
    c = sj.generate(lm, ids, max_new_tokens=8, temperature=1.0, seed=8).tokens
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert len({tuple(row) for row in a[:, 5:]}) > 1  # per-row keys: identical prompts diverge
    # a vanishing nucleus is greedy
    greedy = sj.generate(lm, ids, max_new_tokens=8).tokens
    np.testing.assert_array_equal(sj.generate(lm, ids, max_new_tokens=8, temperature=1.0, top_p=1e-6).tokens, greedy)


def test_sample_token_follows_softmax_and_nucleus():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]] * 20000))
    keys = row_keys(0, 20000)
    draws = np.asarray(sample_token(logits, keys, 1.0, 1.0))
    freq = np.bincount(draws, minlength=4) / draws.size
    np.testing.assert_allclose(freq, [0.5, 0.3, 0.15, 0.05], atol=0.015)  # > 4 standard errors
    nucleus = np.asarray(sample_token(logits, keys, 1.0, 0.7))  # keeps {0.5, 0.3}: mass before 0.3 is 0.5 < 0.7
    assert set(np.unique(nucleus)) == {0, 1}
    np.testing.assert_allclose(np.mean(nucleus == 0), 0.5 / 0.8, atol=0.015)
    np.testing.assert_array_equal(sample_token(logits[:3], keys[:3], 0.0, 1.0), [0, 0, 0])


def test_generation_bad_input(tiny_no_eos):
    lm, _ = tiny_no_eos
    with pytest.raises(sj.InputError, match="temperature must be finite and >= 0"):
        sj.generate(lm, np.arange(1, 4), temperature=-1.0)
    with pytest.raises(sj.InputError, match="top_p must be in"):
        sj.generate(lm, np.arange(1, 4), top_p=0.0)
    with pytest.raises(sj.InputError, match="max_new_tokens must be an int >= 1"):
        sj.generate(lm, np.arange(1, 4), max_new_tokens=0)
    with pytest.raises(sj.InputError, match="exceeds the model's context of 64"):
        sj.generate(lm, np.arange(1, 30), max_new_tokens=40)
