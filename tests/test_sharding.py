"""SPMD sharding (steerjax/sharding.py) and bfloat16 weights with float32 accumulation.

The sharded-vs-unsharded checks need 4 devices, and the host device count is fixed when jax starts, while
the rest of the suite runs in this process on 1 device: they run in a subprocess (tests/sharded_checks.py,
XLA_FLAGS=--xla_force_host_platform_device_count=4, mesh data=2 x model=2) that prints JSON.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.sharding import PartitionSpec as P

import steerjax as sj
from conftest import rel_err, random_ids
from hf_reference import hf_forward
from steerjax import generation, xla
from steerjax.models.layers import Linear
from steerjax.sharding import partition_specs

# Sharded and unsharded float32 programs differ only in summation order (partial sums on each model
# shard, then an all-reduce): measured <= 2e-6 relative; 1e-5 leaves room across backends.
SHARDED_TOL = 1e-5
# Lanczos amplifies rounding slightly through reorthogonalisation (measured <= 1e-6).
LANCZOS_TOL = 1e-4
# bfloat16 logits: sharded and unsharded programs round partial sums at different points; one bf16 ulp
# of an output is 2^-8 relative, a few ulps after a few layers.
BF16_SHARDED_TOL = 3e-2


@pytest.fixture(scope="module")
def sharded_results(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("sharded")
    script = Path(__file__).resolve().parent / "sharded_checks.py"
    # 4 host devices; cheaper LLVM passes halve the compile time that dominates this test (no numerics change)
    flags = "--xla_force_host_platform_device_count=4 --xla_backend_optimization_level=0 " \
            "--xla_llvm_disable_expensive_passes=true"
    env = {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, str(script), str(workdir)], env=env, capture_output=True, text=True,
                          timeout=1800)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_sharded_results_equal_unsharded(sharded_results):
    res = sharded_results
    assert res["devices"] == 4 and res["mesh"] == {"data": 2, "model": 2}
    for name in ("qwen2_gqa4_kv_sharded", "llama3_gqa4_kv_replicated", "gemma3_kv_sharded"):
        out = res[name]
        print(name, json.dumps(out["errors"]))
        for check, err in out["errors"].items():
            tol = LANCZOS_TOL if check.startswith("lanczos") else BF16_SHARDED_TOL if check.startswith("bf16") \
                else SHARDED_TOL
            assert err <= tol, (name, check, err)
        assert out["generation_tokens_equal"], name
        # outputs stay split: prompts over 'data', vocabulary over 'model'
        assert out["specs"]["logits"] == "P('data', None, 'model')", out["specs"]
        # tensor parallelism without gathering weights: the forward's only collectives are all-reduces
        assert out["collectives"]["all-gather"] == 0 and out["collectives"]["all-reduce"] >= 2, out["collectives"]
    spectral = res["qwen2_gqa4_kv_sharded"]
    expected = {"jacobian_rmatvec", "exact_singular_values", "lanczos_top6", "bf16_forward_logits"}
    assert expected <= set(spectral["errors"])
    assert spectral["load_sharded_equal"]


def test_params_are_actually_sharded(sharded_results):
    # L = 3 layers, d = 64, H = 8 heads of 8, K = 2 kv heads, f = 96, V = 160, model axis 2
    kv_sharded = sharded_results["qwen2_gqa4_kv_sharded"]["shards"]
    assert kv_sharded["q_proj"] == [3, 64, 32]      # heads split: (L, d, H*h / 2)
    assert kv_sharded["k_proj"] == [3, 64, 8]       # K = 2 divisible by 2: split
    assert kv_sharded["o_proj"] == [3, 32, 64]      # row-parallel: input dim split
    assert kv_sharded["gate_proj"] == [3, 64, 48] and kv_sharded["down_proj"] == [3, 48, 64]
    assert kv_sharded["embed"] == [80, 64]          # vocabulary split
    assert kv_sharded["norm"] == [64]               # replicated
    # GQA with K = 1 < model axis (H = 4 heads of 16): keys/values replicated, query heads still split
    kv_replicated = sharded_results["llama3_gqa4_kv_replicated"]["shards"]
    assert kv_replicated["k_proj"] == [3, 64, 16] and kv_replicated["q_proj"] == [3, 64, 32]


def test_partition_rules_replicate_what_does_not_divide(tiny_checkpoints):
    folder, _ = tiny_checkpoints["llama_tied_bias_gqa1"]  # biases everywhere, tied embeddings
    lm = sj.load_model(folder)
    config = lm.config  # H = K = 4, f = 96, V = 160

    specs = partition_specs(config, lm.params, model_size=4)
    attn, mlp = specs["blocks"]["self_attn"], specs["blocks"]["mlp"]
    assert attn["q_proj"] == {"kernel": P(None, None, "model"), "bias": P(None, "model")}
    assert attn["o_proj"] == {"kernel": P(None, "model", None), "bias": P(None, None)}
    assert mlp["down_proj"] == {"kernel": P(None, "model", None), "bias": P(None, None)}
    assert specs["embed"] == P("model", None) and "lm_head" not in specs
    assert specs["blocks"]["input_layernorm"]["weight"] == P(None, None)
    # the leading stacked-layer axis is never sharded
    assert all(spec[0] is None for spec in jax.tree.leaves(specs["blocks"], is_leaf=lambda x: isinstance(x, P)))
    assert jax.tree.structure(specs, is_leaf=lambda x: isinstance(x, P)) == jax.tree.structure(lm.params)

    odd = dataclasses.replace(config, num_heads=6, num_kv_heads=3, intermediate_size=90, vocab_size=150)
    specs = partition_specs(odd, lm.params, model_size=4)  # nothing divides by 4: all replicated
    leaves = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, P))
    assert all(all(axis is None for axis in spec) for spec in leaves)
    gqa = dataclasses.replace(config, num_heads=8, num_kv_heads=2)
    specs = partition_specs(gqa, lm.params, model_size=4)  # kv heads (2) < model axis (4): k/v replicated
    assert specs["blocks"]["self_attn"]["k_proj"]["kernel"] == P(None, None, None)
    assert specs["blocks"]["self_attn"]["q_proj"]["kernel"] == P(None, None, "model")


def test_single_device_mesh_runs_the_same_api(tiny_checkpoints):
    folder, _ = tiny_checkpoints["qwen2_tied_gqa1"]
    lm = sj.load_model(folder)
    mesh = sj.make_mesh(data=1, model=1)
    slm = sj.shard_model(lm, mesh)
    ids = random_ids(np.random.default_rng(0), 2, 7)
    np.testing.assert_allclose(slm.forward(ids).logits, lm.forward(ids).logits, rtol=1e-6, atol=1e-6)
    with pytest.raises(sj.InputError, match="xla_force_host_platform_device_count"):
        sj.make_mesh(data=len(jax.devices()) + 1, model=1)


# ----------------------------------------------------------------------------- bfloat16


def test_bf16_linear_accumulates_in_float32():
    """One rounding of the exact float32 product, not a bf16 running sum (fan-in 4096)."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(3, 4096)), jnp.bfloat16)
    layer = Linear(4096, 8, use_bias=False, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16,
                   preferred_element_type=jnp.float32, rngs=sj.models.layers.nnx.Rngs(0))
    y = layer(x)
    assert y.dtype == jnp.bfloat16
    exact = np.asarray(x, np.float64) @ np.asarray(layer.kernel[...], np.float64)
    # float32 accumulation then one bf16 rounding: within bf16's unit roundoff (2^-8) plus float32 noise,
    # and equal to rounding the exact product (a bf16 running sum would be off by many ulps)
    assert np.max(np.abs(np.asarray(y, np.float64) - exact) / np.abs(exact)) <= 2 ** -8 + 1e-5
    assert np.array_equal(np.asarray(y), np.asarray(jnp.asarray(exact, jnp.float32).astype(jnp.bfloat16)))


@pytest.mark.parametrize("name", ["qwen2_tied_gqa1", "llama3_untied_gqa2"])
def test_bf16_model_is_as_accurate_as_transformers_bf16(tiny_checkpoints, name):
    """bf16 weights: logits vs the float32 model within a bf16 bar, and no worse than transformers' own
    bfloat16 model is against its float32 one (same checkpoint, same prompts)."""
    folder, hf_model = tiny_checkpoints[name]
    lm32, lm16 = sj.load_model(folder), sj.load_model(folder, dtype="bfloat16")
    assert lm16.dtype == jnp.bfloat16 and jax.tree.leaves(lm16.params)[0].dtype == jnp.bfloat16
    ids = random_ids(np.random.default_rng(7), 2, 12)
    ours = rel_err(lm16.forward(ids).logits, lm32.forward(ids).logits)
    ref32, _, _ = hf_forward(hf_model, ids)
    hf16 = copy.deepcopy(hf_model).to(torch.bfloat16)  # a copy: casting the shared model back loses its float32 weights
    with torch.no_grad():
        ref16 = hf16(input_ids=torch.as_tensor(ids, dtype=torch.long)).logits.float().numpy()
    theirs = rel_err(ref16, ref32)
    print(f"{name}: bf16 logits rel. error vs float32: steerjax {ours:.2e}, transformers {theirs:.2e}")
    # 5e-2: a 3-layer O(1)-weight network rounds activations (2^-9) a dozen times and amplifies them
    assert ours <= 5e-2
    assert ours <= 1.5 * theirs + 5e-3


def test_bf16_jacobian_spectrum_close_to_float32(tiny_checkpoints):
    """Top of the exact spectrum in bf16 (bf16 tangents, float32 accumulation) vs float32."""
    folder, _ = tiny_checkpoints["llama3_untied_gqa2"]
    ids = random_ids(np.random.default_rng(8), 1, 10)[0]
    s = [np.linalg.svd(sj.jacobian_operator(sj.load_model(folder, dtype=dt), ids, layer=1).factors()[0],
                       compute_uv=False) for dt in ("float32", "bfloat16")]
    # bf16 resolves singular values to ~1e-2 of sigma_max; compare the top 8
    assert rel_err(s[1][:8], s[0][:8]) <= 3e-2


def _materialised_f32_stacks(hlo: str, stacks) -> list[str]:
    """float32 buffers with the shape of one of the weight stacks (L, ...) that compiled HLO text writes:
    results of instructions outside fused computations (inside a fusion, a convert of the stack followed
    by a dynamic-slice only computes the slice's elements)."""
    shapes = {"f32[" + ",".join(map(str, x.shape)) + "]" for x in stacks}
    fused = set(re.findall(r"fusion\(.*?calls=(%[\w.\-]+)", hlo))
    found, in_fused = set(), False
    for line in hlo.splitlines():
        header = re.match(r"(?:ENTRY )?(%[\w.\-]+) .*\{$", line)
        if header:
            in_fused = header.group(1) in fused
        elif not in_fused:
            result = re.match(r"\s*(?:ROOT )?%[\w.\-]+ = (f32\[[\d,]+\])", line)
            if result and result.group(1) in shapes:
                found.add(result.group(1))
    return sorted(found)


def test_bf16_layer_loop_never_upcasts_the_weight_stack(tiny_checkpoints):
    """XLA CPU turns a bf16 dynamic-slice of the stacked block weights into a float32 copy of the whole
    stack hoisted out of the layer loop (see steerjax/xla.py); the forward compiled by steerjax has no
    float32 array of a stack's shape, the same program under plain jax.jit does, and both agree."""
    from steerjax.models import causal_lm

    folder, _ = tiny_checkpoints["llama3_untied_gqa2"]
    lm = sj.load_model(folder, dtype="bfloat16")
    ids = lm.to_device(random_ids(np.random.default_rng(3), 2, 9))
    args = (lm.params, ids, jnp.ones_like(ids), jnp.int32(-1), jnp.zeros((*ids.shape, lm.d), lm.dtype))
    stacks = [x for x in jax.tree.leaves(lm.params["blocks"]) if x.ndim == 3]
    ours = causal_lm.jitted_forward(lm.config, False)
    plain = jax.jit(ours.__wrapped__)
    assert _materialised_f32_stacks(ours.lower(*args).compile().as_text(), stacks) == []
    if jax.default_backend() == "cpu":  # the test would catch the upcast: plain jit shows it
        assert _materialised_f32_stacks(plain.lower(*args).compile().as_text(), stacks) != []
    np.testing.assert_array_equal(np.asarray(ours(*args)[0], np.float32), np.asarray(plain(*args)[0], np.float32))
    # the decode loop (a layer scan inside the token scan) and the Jacobian tail
    gen = generation.jitted_generate(lm.config, 3, "last+generated", (), 0, False)
    gen_args = (lm.params, ids, jnp.ones_like(ids), jnp.int32(1), jnp.ones(lm.d, lm.dtype), jnp.float32(1.0),
                generation.row_keys(0, 2), jnp.float32(0.0), jnp.float32(1.0))
    assert _materialised_f32_stacks(gen.lower(*gen_args).compile().as_text(), stacks) == []
    op = sj.jacobian_operator(lm, np.asarray(ids[0]), layer=1)
    tail = op.fns.normed_jacobian.lower(lm.params, op.ctx, op.point).compile().as_text()
    assert _materialised_f32_stacks(tail, stacks) == []


def test_backend_jit_options_per_backend():
    assert xla.compiler_options("cpu") == {"xla_disable_hlo_passes": "while-loop-invariant-code-motion"}
    assert xla.compiler_options("gpu") is None and xla.compiler_options("tpu") is None
    fn = xla.jit(lambda x, n: x * n, static_argnums=1)
    assert fn.__name__ == "<lambda>"
    assert float(fn(jnp.float32(2.0), 3)) == 6.0
    assert "multiply" in fn.lower(jnp.float32(2.0), 3).as_text()
