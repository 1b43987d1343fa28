"""steerjax forward passes against transformers (PyTorch, eager attention) on tiny random checkpoints."""

from __future__ import annotations

import json
import shutil

import jax
import numpy as np
import pytest

import steerjax as sj
from conftest import TINY_CONFIGS, rel_err, random_ids
from hf_reference import hf_forward
from steerjax.models import causal_lm

# float32: both sides round differently in every matmul / softmax; 1e-4 relative is the bar.
F32_TOL = 1e-4
# float64: transformers keeps RMSNorm (and its RoPE tables) in float32 even in a .double() model, so
# the reference itself is only ~1e-7 accurate; 1e-6 leaves room over what we measure (see README).
F64_TOL = 1e-6


@pytest.mark.parametrize("name", list(TINY_CONFIGS))
def test_logits_and_hidden_match_hf_float32(tiny_checkpoints, name):
    folder, hf_model = tiny_checkpoints[name]
    lm = sj.load_model(folder)
    ids = random_ids(np.random.default_rng(1), batch=2, length=13)
    out = lm.forward(ids, return_hidden=True)
    ref_logits, ref_hidden, ref_h_final = hf_forward(hf_model, ids)
    assert out.logits.shape == ref_logits.shape
    assert rel_err(out.logits, ref_logits) <= F32_TOL
    assert len(out.hidden) == lm.num_layers + 1
    for layer in range(lm.num_layers):
        assert rel_err(out.hidden[layer], ref_hidden[layer]) <= F32_TOL, layer
    # Convention: our hidden[L] is the final-norm input; HF's hidden_states[L] is the norm's output.
    assert rel_err(out.hidden[-1], ref_h_final) <= F32_TOL
    normed = causal_lm.final_norm(lm.config, lm.params, out.hidden[-1])
    assert rel_err(normed, ref_hidden[-1]) <= F32_TOL


@pytest.mark.parametrize("name", ["qwen2_tied_gqa1", "llama3_untied_gqa2"])
def test_logits_match_hf_float64(tiny_checkpoints, name):
    folder, hf_model = tiny_checkpoints[name]
    lm = sj.load_model(folder, dtype="float64")
    assert lm.dtype == np.float64
    ids = random_ids(np.random.default_rng(2), batch=2, length=11)
    out = lm.forward(ids, return_hidden=True)
    ref_logits, ref_hidden, _ = hf_forward(hf_model.double(), ids)
    hf_model.float()
    err = rel_err(out.logits, ref_logits)
    print(f"{name}: float64 logits relative error vs HF .double() = {err:.2e}")
    assert err <= F64_TOL
    assert max(rel_err(out.hidden[i], ref_hidden[i]) for i in range(lm.num_layers)) <= F64_TOL


def test_left_padded_batch_equals_single_prompts(tiny_checkpoints):
    folder, hf_model = tiny_checkpoints["llama3_untied_gqa2"]
    lm = sj.load_model(folder)
    rng = np.random.default_rng(3)
    prompts = [list(rng.integers(1, 100, size=n)) for n in (5, 12, 9)]
    batch = sj.model.left_pad(prompts, pad_id=0)
    out = lm.forward(batch)
    ref_logits, _, _ = hf_forward(hf_model, batch.ids, batch.attention_mask)
    real = batch.attention_mask.astype(bool)
    assert rel_err(np.asarray(out.logits)[real], ref_logits[real]) <= F32_TOL
    for row, prompt in enumerate(prompts):
        alone = lm.forward(np.array(prompt)).logits[0]
        assert rel_err(out.logits[row, -len(prompt):], alone) <= F32_TOL
    # ragged lists are left-padded automatically
    assert rel_err(lm.forward(prompts).logits, out.logits) == 0.0


def test_sharded_safetensors_equal_single_file(tiny_checkpoints, tmp_path):
    folder, hf_model = tiny_checkpoints["qwen2_untied_gqa4"]
    hf_model.save_pretrained(tmp_path, max_shard_size="40KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    single, sharded = sj.load_model(folder), sj.load_model(tmp_path)
    same = jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), single.params, sharded.params)
    assert all(jax.tree.leaves(same))


def test_model_id_resolved_from_local_hf_cache(tiny_checkpoints, tmp_path):
    folder, _ = tiny_checkpoints["qwen2_tied_gqa1"]
    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "models--steerjax-tests--tiny-qwen2"
    shutil.copytree(folder, repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    lm = sj.load_model("steerjax-tests/tiny-qwen2", cache_dir=tmp_path)
    ids = random_ids(np.random.default_rng(4), 1, 7)
    np.testing.assert_array_equal(lm.forward(ids).logits, sj.load_model(folder).forward(ids).logits)
    with pytest.raises(sj.ModelNotFoundError, match="not in the local HF cache"):
        sj.load_model("steerjax-tests/absent-model", cache_dir=tmp_path)


def test_forward_is_a_pure_jittable_function(tiny_checkpoints):
    folder, _ = tiny_checkpoints["qwen2_tied_gqa1"]
    lm = sj.load_model(folder)
    ids = random_ids(np.random.default_rng(5), 2, 6)
    mask = np.ones_like(ids)
    delta = np.zeros((2, 6, lm.d), np.float32)
    pure = jax.jit(lambda p, i: causal_lm.forward(lm.config, p, i, mask, -1, delta, return_hidden=False)[0])
    np.testing.assert_allclose(pure(lm.params, ids), lm.forward(ids).logits, rtol=1e-6, atol=1e-6)
    # vmapped over a stack of steering strengths: one compiled call, matching the per-alpha calls
    v = np.random.default_rng(6).normal(size=lm.d).astype(np.float32)
    alphas = np.array([0.0, 1.0, -2.0], np.float32)

    def steered_last_logits(alpha):
        d = np.zeros((2, 6, lm.d), np.float32)
        d[:, -1] = v
        return causal_lm.forward(lm.config, lm.params, ids, mask, 1, alpha * d, return_hidden=False)[0][:, -1]

    batched = jax.jit(jax.vmap(steered_last_logits))(alphas)
    for k, alpha in enumerate(alphas):
        single = lm.forward(ids, steer=sj.Steer(layer=1, vector=v, alpha=float(alpha))).logits[:, -1]
        np.testing.assert_allclose(batched[k], single, rtol=1e-5, atol=1e-5)


def test_language_model_is_immutable_and_its_cache_holds_its_sources(tiny_checkpoints):
    """Fields cannot be assigned (replace() gives a new model with an empty cache); a DerivedCache entry keeps
    its source arrays alive, so no freed id can be mistaken for them, and new sources recompute."""
    import dataclasses
    import gc
    import weakref

    lm = sj.load_model(tiny_checkpoints["qwen2_tied_gqa1"][0])
    with pytest.raises(dataclasses.FrozenInstanceError):
        lm.params = {}
    lm.cache.get("x", [lm.params["embed"]], lambda: 1)
    other = lm.replace(source="elsewhere")
    assert other.cache.names() == [] and lm.cache.names() == ["x"] and other.tokenizer_loader is lm.tokenizer_loader
    with pytest.raises(sj.InputError, match="fresh cache"):
        lm.replace(cache=None)
    cache, calls = sj.model.DerivedCache(), []
    source = np.arange(3.0)
    alive = weakref.ref(source)
    assert cache.get("sum", [source], lambda: calls.append(1) or 3.0) == 3.0
    del source
    gc.collect()
    assert alive() is not None                          # held by the entry
    assert cache.get("sum", [alive()], lambda: calls.append(1) or 0.0) == 3.0 and len(calls) == 1
    assert cache.get("sum", [np.arange(3.0)], lambda: calls.append(1) or 4.0) == 4.0 and len(calls) == 2
    gc.collect()
    assert alive() is None                              # the replaced entry freed its source
