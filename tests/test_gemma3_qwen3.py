"""Gemma 3 (text) and Qwen3 against transformers (PyTorch, eager attention, float32) on tiny random checkpoints:
logits and every hidden state on a left-padded batch, steering against an HF pre-hook, the sliding-window and
RoPE conventions, config parsing; both through the KV-cache generator (steered greedy generation past Gemma's
sliding window against HF generate with the same hook, the four position modes against the full forward) and the
Jacobian tail (against jax.jacfwd of the full forward, float64)."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import steerjax as sj
from conftest import TINY_VOCAB, randomize_weights, rel_err, save_checkpoints, save_without_eos
from hf_reference import hf_forward, hf_positions, hf_steering_hook
from steerjax import cpu_kernels, tail
from steerjax.models import causal_lm
from steerjax.models.config import config_from_hf
from steerjax.steering import position_mask

F32_TOL = 1e-4  # as in test_models: float32 rounding differences between the two implementations
F64_TOL = 1e-9  # steerjax float64 paths against each other (test_jacobian's bar)
SLIDE, FULL = "sliding_attention", "full_attention"

CONFIGS = {
    # window 4 < the 13-token test rows; linear scaling on the global RoPE; both softcaps (transformers applies only
    # the final one to Gemma 3, see test_attention_softcapping_*); query_pre_attn_scalar (32) differs from head_dim
    # (24), which differs from hidden / heads (16)
    "gemma3_softcap": dict(model_type="gemma3_text", num_hidden_layers=5, num_attention_heads=4,
                           num_key_value_heads=2, head_dim=24, query_pre_attn_scalar=32, sliding_window=4,
                           layer_types=[SLIDE, SLIDE, FULL, SLIDE, FULL],
                           rope_parameters={SLIDE: {"rope_type": "default", "rope_theta": 100.0},
                                            FULL: {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0}},
                           attn_logit_softcapping=4.0, final_logit_softcapping=3.0),
    # no softcapping; RoPE bases through the older kwargs (rope_theta, rope_local_base_freq); window 3; GQA 1
    "gemma3_plain": dict(model_type="gemma3_text", num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=4, head_dim=16, query_pre_attn_scalar=16, sliding_window=3,
                         layer_types=[SLIDE, FULL, SLIDE, SLIDE], rope_theta=5000.0, rope_local_base_freq=50.0),
    "qwen3_tied": dict(model_type="qwen3", num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                       head_dim=24, tie_word_embeddings=True),
    "qwen3_untied_bias": dict(model_type="qwen3", num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=1,
                              head_dim=16, tie_word_embeddings=False, attention_bias=True),
}


def build_model(name: str, seed: int = 0, **overrides):
    """A tiny transformers Gemma3ForCausalLM / Qwen3ForCausalLM (eager, float32) with O(1)-scale random weights
    (Gemma's norms, which scale by 1 + w, get w ~ 0.3 N(0, 1))."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig, Qwen3Config, Qwen3ForCausalLM

    spec = {**CONFIGS[name], **overrides}
    model_type = spec.pop("model_type")
    config_cls, model_cls = {"gemma3_text": (Gemma3TextConfig, Gemma3ForCausalLM),
                             "qwen3": (Qwen3Config, Qwen3ForCausalLM)}[model_type]
    config = config_cls(vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=96, rms_norm_eps=1e-6,
                        max_position_embeddings=64, attn_implementation="eager", pad_token_id=0, **spec)
    torch.manual_seed(seed)
    gemma = model_type == "gemma3_text"
    return randomize_weights(model_cls(config).eval(), (lambda p: 0.3 * p) if gemma else (lambda p: 1.0 + 0.2 * p))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """name -> (folder, torch model), saved as float32 safetensors."""
    return save_checkpoints(tmp_path_factory, CONFIGS, build_model)


def padded_batch(seed: int, lengths=(13, 8)):
    rng = np.random.default_rng(seed)
    return sj.model.left_pad([list(rng.integers(1, TINY_VOCAB, size=n)) for n in lengths], pad_id=0)


def parity_errors(lm, hf_model, batch, steer=None, hook=None, steer_deltas=None) -> dict[str, float]:
    """Relative errors (real tokens only) of logits, each h_l (l < L), the final-norm input h_L and its norm,
    steerjax against HF (under `hook`, a context manager, when given). steer_deltas (B, T, d): what `steer` adds
    to h_steer.layer, taken off before the comparison (steerjax's hidden[l] is h_l as block l sees it, HF's
    hidden_states[l] the output of block l - 1, before a pre-hook on block l)."""
    out = lm.forward(batch, steer=steer, return_hidden=True)
    with hook if hook is not None else contextlib.nullcontext():
        ref_logits, ref_hidden, ref_h_final = hf_forward(hf_model, batch.ids, batch.attention_mask)
    real = batch.attention_mask.astype(bool)
    hidden = [np.asarray(h) for h in out.hidden]
    if steer is not None:
        hidden[steer.layer] = hidden[steer.layer] - steer_deltas
    errors = {"logits": rel_err(np.asarray(out.logits)[real], ref_logits[real])}
    for layer in range(lm.num_layers):
        errors[f"h{layer}"] = rel_err(hidden[layer][real], ref_hidden[layer][real])
    errors["h_L"] = rel_err(hidden[-1][real], ref_h_final[real])
    normed = causal_lm.final_norm(lm.config, lm.params, out.hidden[-1])
    errors["norm(h_L)"] = rel_err(np.asarray(normed)[real], ref_hidden[-1][real])
    return errors


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_and_every_hidden_state_match_hf_on_a_padded_batch(checkpoints, name):
    folder, hf_model = checkpoints[name]
    lm = sj.load_model(folder)
    assert lm.config.model_type == CONFIGS[name]["model_type"]
    errors = parity_errors(lm, hf_model, padded_batch(1))
    print(f"{name}: max relative error {max(errors.values()):.2e} ({max(errors, key=errors.get)})")
    assert max(errors.values()) <= F32_TOL, errors


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("layer,positions", [(1, "all"), (3, "last")])
def test_steering_equals_hf_pre_hook(checkpoints, name, layer, positions):
    folder, hf_model = checkpoints[name]
    lm = sj.load_model(folder)
    batch = padded_batch(2 + layer)
    v = np.random.default_rng(3 + layer).normal(size=lm.d).astype(np.float32)
    steer = sj.Steer(layer=layer, vector=v, alpha=1.5, positions=positions)
    mask = np.array(position_mask(positions, batch.ids.shape[1], batch.attention_mask))
    errors = parity_errors(lm, hf_model, batch, steer, hf_steering_hook(hf_model, layer, v, 1.5, mask),
                           steer_deltas=1.5 * mask[..., None] * v)
    print(f"{name} steered at {layer} ({positions}): max relative error {max(errors.values()):.2e}")
    assert max(errors.values()) <= F32_TOL, errors
    unsteered = lm.forward(batch).logits
    assert rel_err(lm.forward(batch, steer=steer).logits[:, -1], unsteered[:, -1]) > 1e-2  # the steer bit


def test_attention_softcapping_matches_hf_eager_with_softcap(checkpoints, monkeypatch):
    """transformers 5.25's Gemma3Attention never passes attn_logit_softcapping to its attention function, so
    steerjax's gemma3_text config leaves it None; the mechanism itself (Gemma 2's: scores <- cap tanh(scores / cap)
    before the mask) equals HF's eager attention called with softcap, as Gemma2Attention calls it."""
    from transformers.models.gemma3 import modeling_gemma3

    folder, hf_model = checkpoints["gemma3_softcap"]
    lm = sj.load_model(folder)
    assert lm.config.attn_logit_softcapping is None and lm.config.final_logit_softcapping == 3.0
    cap = hf_model.config.attn_logit_softcapping
    batch = padded_batch(1)
    plain = lm.forward(batch).logits
    eager = modeling_gemma3.eager_attention_forward
    monkeypatch.setattr(modeling_gemma3, "eager_attention_forward",
                        lambda module, *args, **kwargs: eager(module, *args, softcap=cap, **kwargs))
    capped = lm.replace(config=dataclasses.replace(lm.config, attn_logit_softcapping=cap))
    errors = parity_errors(capped, hf_model, batch)
    print(f"gemma3 with attention softcapping {cap}: max relative error {max(errors.values()):.2e}")
    assert max(errors.values()) <= F32_TOL, errors
    assert rel_err(capped.forward(batch).logits, plain) > 1e-2  # the cap bites


def test_the_comparison_resolves_the_window_boundary_and_the_two_rope_bases(checkpoints):
    """An off-by-one window or swapped RoPE bases would fail the parity test: each moves the logits by far more
    than its tolerance."""
    folder, hf_model = checkpoints["gemma3_softcap"]
    lm = sj.load_model(folder)
    batch = padded_batch(1)
    real = batch.attention_mask.astype(bool)
    ref = hf_forward(hf_model, batch.ids, batch.attention_mask)[0][real]
    config = lm.config
    variants = {"window - 1": dict(sliding_window=config.sliding_window - 1),
                "window + 1": dict(sliding_window=config.sliding_window + 1),
                "local base = global": dict(rope_local_theta=config.rope_theta,
                                            rope_local_scaling=config.rope_scaling),
                "global base = local": dict(rope_theta=config.rope_local_theta, rope_scaling=())}
    for label, change in variants.items():
        wrong = lm.replace(config=dataclasses.replace(config, **change))
        err = rel_err(np.asarray(wrong.forward(batch).logits)[real], ref)
        print(f"{label}: relative error {err:.2e}")
        assert err > 100 * F32_TOL, label


def test_sliding_window_mask_convention():
    """HF's sliding_window_overlay: a query at slot t sees keys t - window + 1 .. t (window keys with itself),
    and no padding."""
    mask = np.asarray(causal_lm.sliding_window_mask(jnp.asarray([[0, 1, 1, 1, 1, 1, 1]]), 3))[0]
    expected = np.zeros((7, 7), bool)
    for t in range(1, 7):
        expected[t, max(1, t - 2):t + 1] = True
    np.testing.assert_array_equal(mask, expected)


def test_gemma3_config_from_the_hub_format_equals_the_saved_one(checkpoints, tmp_path):
    """transformers 5 saves Gemma 3's RoPE per layer type (rope_parameters = {"sliding_attention": {...},
    "full_attention": {...}}); Hub checkpoints carry rope_theta + rope_scaling (global layers),
    rope_local_base_freq (local) and an older sliding_window_pattern instead of layer_types."""
    folder, _ = checkpoints["gemma3_softcap"]
    saved = json.loads((folder / "config.json").read_text())
    assert set(saved["rope_parameters"]) == {SLIDE, FULL}
    hub = {k: v for k, v in saved.items() if k not in ("rope_parameters", "layer_types")}
    hub.update(rope_theta=10000.0, rope_local_base_freq=100.0, rope_scaling={"rope_type": "linear", "factor": 4.0},
               num_hidden_layers=5, sliding_window_pattern=3)
    from_saved, from_hub = config_from_hf(saved), config_from_hf(hub)
    assert from_hub.layer_types == (SLIDE, SLIDE, FULL, SLIDE, SLIDE)   # every 3rd layer global, as HF derives
    assert dataclasses.replace(from_hub, layer_types=from_saved.layer_types) == from_saved
    assert from_saved.rope_scaling == (("factor", 4.0), ("rope_type", "linear"))
    assert (from_saved.rope_theta, from_saved.rope_local_theta, from_saved.rope_local_scaling) == (10000.0, 100.0, ())
    # transformers' own reading of the Hub-format file agrees on what its layers use
    from transformers import Gemma3TextConfig

    hf = Gemma3TextConfig.from_dict(hub)
    assert tuple(hf.layer_types) == from_hub.layer_types
    assert hf.rope_parameters[SLIDE]["rope_theta"] == 100.0 and hf.rope_parameters[FULL]["factor"] == 4.0


def test_qwen3_config_fields(checkpoints):
    config = sj.load_model(checkpoints["qwen3_untied_bias"][0]).config
    assert config.qk_norm and config.qkv_bias and config.o_bias and not config.has_local_layers
    assert config.head_dim == 16 and config.norm_style == "llama" and not config.scale_embeddings
    with pytest.raises(sj.UnsupportedModelError, match="use_sliding_window"):
        config_from_hf({**json.loads((checkpoints["qwen3_tied"][0] / "config.json").read_text()),
                        "use_sliding_window": True})


@pytest.mark.parametrize("name", ["gemma3_plain", "qwen3_tied"])
def test_sharding_layout_covers_the_new_weights(checkpoints, name):
    """Every leaf (the q/k norms, Gemma's extra norms) has a PartitionSpec; norms are replicated."""
    lm = sj.load_model(checkpoints[name][0])
    specs = sj.sharding.partition_specs(lm.config, lm.params, 2)
    assert jax.tree.structure(specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)) == \
        jax.tree.structure(lm.params)
    assert specs["blocks"]["self_attn"]["q_norm"]["weight"] == jax.sharding.PartitionSpec(None, None)


def test_embedding_scale_is_rounded_like_hf():
    """sqrt(d) in float32, then in the model dtype: Gemma 3 4B's sqrt(2560) = 50.596 is 50.5 in bfloat16."""
    config = dataclasses.replace(sj.ModelConfig("gemma3_text", 10, 2560, 8, 1, 4, 4, 640, 1e-6, 1e4),
                                 scale_embeddings=True)
    assert float(causal_lm.embed_scale(config, jnp.bfloat16)) == 50.5
    assert float(causal_lm.embed_scale(config, jnp.float32)) == float(np.float32(np.sqrt(2560)))


@pytest.mark.parametrize("name", ["gemma3_softcap", "qwen3_untied_bias"])
def test_bf16_model_is_as_accurate_as_transformers_bf16(checkpoints, name):
    """bf16 weights (float32 accumulation, Gemma's embedding scale rounded to bf16 as HF does): logits against
    the float32 model no worse than transformers' own bfloat16 model against its float32 one, same prompts."""
    folder, hf_model = checkpoints[name]
    lm32, lm16 = sj.load_model(folder), sj.load_model(folder, dtype="bfloat16")
    batch = padded_batch(10, lengths=(11, 7))
    real = batch.attention_mask.astype(bool)
    logits16, logits32 = (np.asarray(m.forward(batch).logits, np.float32) for m in (lm16, lm32))
    ours = rel_err(logits16[real], logits32[real])
    ref32 = hf_forward(hf_model, batch.ids, batch.attention_mask)[0]
    hf16 = copy.deepcopy(hf_model).to(torch.bfloat16)  # a copy: the fixture's model stays float32
    with torch.no_grad():
        ref16 = hf16(input_ids=torch.as_tensor(batch.ids, dtype=torch.long),
                     attention_mask=torch.as_tensor(batch.attention_mask, dtype=torch.long),
                     position_ids=torch.as_tensor(hf_positions(batch.attention_mask), dtype=torch.long)
                     ).logits.float().numpy()
    theirs = rel_err(ref16[real], ref32[real])
    print(f"{name}: bf16 logits rel. error vs float32: steerjax {ours:.2e}, transformers {theirs:.2e}")
    assert ours <= 1.5 * theirs + 5e-3  # the bar of test_sharding's Llama / Qwen2 bf16 test


# ----------------------------------------------------------------------------- cached paths

@pytest.fixture(scope="module")
def no_eos(tmp_path_factory):
    """A tiny Qwen3 and a tiny Gemma 3 (window 4) without an EOS token, so greedy runs last max_new_tokens on both
    sides: name -> (folder, torch model)."""
    return {name: save_without_eos(tmp_path_factory, build_model(name, seed=3), f"{name}_gen")
            for name in ("qwen3_tied", "gemma3_softcap")}


def hf_greedy(hf_model, batch, new_tokens: int):
    with torch.no_grad():
        return hf_model.generate(torch.as_tensor(batch.ids, dtype=torch.long), do_sample=False,
                                 attention_mask=torch.as_tensor(batch.attention_mask, dtype=torch.long),
                                 max_new_tokens=new_tokens, pad_token_id=0).numpy()


@contextlib.contextmanager
def hf_last_position_hook(hf_model, layer: int, vector):
    """Adds vector at position -1 of every forward call of block `layer` (prefill: the last prompt token; under the
    KV cache: each new token), the paper's protocol = positions 'last+generated'."""
    v = torch.as_tensor(np.asarray(vector, np.float32))

    def hook(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        hidden = torch.cat([hidden[:, :-1], hidden[:, -1:] + v], dim=1)
        return ((hidden, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": hidden})

    handle = hf_model.model.layers[layer].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


@pytest.mark.parametrize("kernels", [False, True], ids=["xla-dot", "cpu-decode-kernels"])
@pytest.mark.parametrize("name", ["qwen3_tied", "gemma3_softcap"])
def test_greedy_and_steered_generation_match_hf_generate(no_eos, name, kernels):
    """Unsteered and steered ('last+generated' = HF's last-position hook) greedy tokens equal HF generate; for
    Gemma 3 the rows run 4 + 12 and 9 + 12 tokens against a window of 4, so decode passes the window on every
    local layer. Each decode step's logits also equal the full forward over the final sequence."""
    if kernels and not cpu_kernels.available():
        pytest.skip(f"CPU decode kernels unavailable: {cpu_kernels.unavailable_reason()}")
    folder, hf_model = no_eos[name]
    lm = sj.load_model(folder)
    batch = padded_batch(5, lengths=(4, 9))
    new = 12
    plain = sj.generate(lm, batch, max_new_tokens=new, decode_kernels=kernels, return_logits=True)
    np.testing.assert_array_equal(plain.tokens, hf_greedy(hf_model, batch, new))
    T = batch.ids.shape[1]
    full = lm.forward(plain.tokens, attention_mask=plain.attention_mask).logits
    assert rel_err(plain.logits, full[:, T - 1:-1]) <= F32_TOL

    layer = 2
    v = np.random.default_rng(7).normal(size=lm.d).astype(np.float32)
    v *= 30.0 / np.linalg.norm(v)  # Gemma's residual stream is scaled by sqrt(d) = 8
    steered = sj.generate(lm, batch, steer=sj.Steer(layer=layer, vector=v, alpha=1.0, positions="last+generated"),
                          max_new_tokens=new, decode_kernels=kernels)
    with hf_last_position_hook(hf_model, layer, v):
        ref = hf_greedy(hf_model, batch, new)
    np.testing.assert_array_equal(steered.tokens, ref)
    assert not np.array_equal(steered.tokens, plain.tokens)  # the steer changed the text


@pytest.mark.parametrize("mode", sj.POSITION_MODES)
def test_gemma3_cached_generation_steers_exactly_the_masked_positions(no_eos, mode):
    """Every decode step's logits (past the window of 4) equal the full forward over the final sequence with the
    steering delta at position_mask(mode) (the full forward is the HF-checked one above)."""
    lm = sj.load_model(no_eos["gemma3_softcap"][0])
    batch = padded_batch(8, lengths=(3, 7))
    steer = sj.Steer(layer=1, vector=np.random.default_rng(1).normal(size=lm.d), alpha=2.0, positions=mode)
    out = sj.generate(lm, batch, steer=steer, max_new_tokens=9, return_logits=True)
    T = batch.ids.shape[1]
    full = lm.forward(out.tokens, steer=steer, attention_mask=out.attention_mask, prompt_len=T).logits
    assert rel_err(out.logits, full[:, T - 1:-1]) <= F32_TOL
    plain = lm.forward(out.tokens, attention_mask=out.attention_mask).logits
    steered_slots = np.asarray(position_mask(mode, T, out.attention_mask)).astype(bool)
    changed = (np.abs(np.asarray(full) - np.asarray(plain)).max(axis=-1) > 1e-4) & out.attention_mask.astype(bool)
    assert changed[steered_slots].all()  # the steer acts where the mode says


@pytest.mark.parametrize("observable", ["logits", "logprobs"])
@pytest.mark.parametrize("name", ["qwen3_untied_bias", "gemma3_softcap"])
def test_tail_jacobian_equals_jacfwd_of_the_full_forward(checkpoints, name, observable):
    """The one-token tail (and its recompute cross-check) against jax.jacfwd of the HF-checked full forward,
    float64, on a padded batch whose rows (6, 9 tokens) pass Gemma's window of 4; the tail runs layers 1..L-1,
    local and global ones."""
    lm = sj.load_model(checkpoints[name][0], dtype="float64")
    batch = padded_batch(6, lengths=(6, 9))
    layer = 1
    op = sj.jacobian_operator(lm, batch, layer, observable)
    dense = np.asarray(op.dense())
    for row in range(2):
        ids, mask = batch.ids[row], batch.attention_mask[row]
        steer_mask = np.zeros(ids.shape)
        steer_mask[-1] = 1

        def f(x):
            delta = steer_mask[None, :, None] * x[None, None, :]
            logits = causal_lm.forward(lm.config, lm.params, ids[None], mask[None], layer, delta, False)[0][0, -1]
            return logits if observable == "logits" else jax.nn.log_softmax(logits)

        ref = np.asarray(jax.jacfwd(f)(jnp.zeros(lm.d)))
        print(f"{name} {observable} row {row}: tail vs jacfwd relative error {rel_err(dense[row], ref):.1e}")
        assert rel_err(dense[row], ref) <= F64_TOL
    recomputed = np.asarray(sj.jacobian_operator(lm, batch, layer, observable, recompute=True).dense())
    print(f"{name} {observable}: tail vs recompute relative error {rel_err(dense, recomputed):.1e}")
    assert rel_err(dense, recomputed) <= F64_TOL


def test_gemma3_tail_window_and_all_positions_equal_the_full_forward(checkpoints):
    """tail_window (the last 3 positions steered, run against cached keys) and tail_full (every real position)
    equal the full forward with the same deltas, float64, on a row of 9 tokens past the window of 4."""
    lm = sj.load_model(checkpoints["gemma3_softcap"][0], dtype="float64")
    batch = padded_batch(9, lengths=(9, 5))
    layer = 2
    ctx = tail.tail_context(lm.config, lm.params, batch, layer)
    x = jnp.asarray(np.random.default_rng(3).normal(size=lm.d))
    for row in range(2):
        one = jax.tree.map(lambda a: a[row], ctx)
        ids, mask = batch.ids[row][None], batch.attention_mask[row][None]
        window_mask = np.zeros(ids.shape[1])
        window_mask[-3:] = 1
        for steer_mask, ours in [
            (window_mask, tail.tail_window(lm.config, lm.params["blocks"], one, x, 3)[-1]),
            (np.asarray(mask[0], float), tail.tail_full(lm.config, lm.params["blocks"], one, x, jnp.asarray(mask[0])))]:
            delta = steer_mask[None, :, None] * x[None, None, :]
            h = causal_lm.forward(lm.config, lm.params, ids, mask, layer, delta, True)[1][-1][0, -1]
            assert rel_err(np.asarray(ours), np.asarray(h)) <= F64_TOL
