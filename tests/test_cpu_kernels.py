"""CPU decode kernels (steerjax.cpu_kernels): panel layout, products against NumPy float64, vmap, bad
input, the build cache and the fallbacks; and generation with the kernels against generation with XLA's dot.

Tolerance of the products: the kernel accumulates K float32 products in k order, so each output element
is within a few sqrt(K) float32 roundings of the exact sum, measured against the sum of |x_k w_k| (the
scale of that rounding): |y - y64| <= 8 sqrt(K) eps32 (|x| @ |w|). A wrong panel index or layer gives
errors of the order of |x| @ |w| itself.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import steerjax as sj
from conftest import build_hf_model
from steerjax import cpu_kernels, generation
from steerjax.errors import InputError

EPS32 = float(np.finfo(np.float32).eps)
# arrays here carry an explicit float32 dtype: a float64 model loaded earlier in the process turns jax_enable_x64 on,
# and jnp.zeros would then be float64 (which the kernels do not take)
# every test that runs the kernels themselves; on a machine without a C++ compiler they skip and the fallback
# tests below (compiler hidden from PATH, failing compiler, STEERJAX_DECODE_KERNELS=0) still run
needs_compiler = pytest.mark.skipif(cpu_kernels.compiler() is None,
                                    reason="no C++ compiler ($CXX, g++ or c++): the CPU decode kernels cannot be "
                                           "built here; generation falls back to XLA's dot (tested without one)")


def assert_product_close(y, x, w):
    """y (M, N) against x (M, K) @ w (K, N) in float64, within the rounding bound of the module docstring."""
    x64, w64 = np.asarray(x, np.float64), np.asarray(w, np.float64)
    bound = 8 * np.sqrt(x64.shape[-1]) * EPS32 * (np.abs(x64) @ np.abs(w64))
    err = np.abs(np.asarray(y, np.float64) - x64 @ w64)
    assert np.all(err <= bound), f"max err / bound {np.max(err / bound):.2f}"


@needs_compiler
def test_kernels_build_on_this_machine():
    """Where a C++ compiler exists, a failed build is a bug, not a fallback to accept silently."""
    assert cpu_kernels.available(), cpu_kernels.unavailable_reason()


def test_pack_panels_layout():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((3, 5, 24)).astype(np.float32)
    panels = np.asarray(cpu_kernels.pack_panels(jnp.asarray(w)))
    assert panels.shape == (3, 3, 5, 8)
    for layer, p, k, j in [(0, 0, 0, 0), (2, 1, 4, 7), (1, 2, 3, 5)]:
        assert panels[layer, p, k, j] == w[layer, k, 8 * p + j]
    u = rng.standard_normal((16, 5)).astype(np.float32)  # (N, K), used as x @ u.T
    rows = np.asarray(cpu_kernels.pack_panels(jnp.asarray(u).T[None]))  # as generation packs W_U
    assert rows.shape == (1, 2, 5, 8)
    np.testing.assert_array_equal(rows[0, 1, 3], u[8:16, 3])
    with pytest.raises(ValueError, match="multiple of 8"):
        cpu_kernels.pack_panels(jnp.zeros((1, 4, 12), jnp.float32))
    f32 = jnp.float32
    assert not cpu_kernels.supports(jnp.zeros((4, 12), f32)) and cpu_kernels.supports(jnp.zeros((4, 16), f32))
    assert not cpu_kernels.supports(np.zeros((4, 16), np.float64))


@needs_compiler
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("M,K,N", [(8, 96, 64), (1, 37, 8), (3, 200, 40), (13, 64, 24), (16, 7, 16)])
def test_panel_matmul_matches_float64(dtype, M, K, N):
    """Every row count around the 8-row micro-kernel, odd K, one to several panels, each layer of a stack."""
    rng = np.random.default_rng(M * 1000 + K)
    x = rng.standard_normal((M, K)).astype(np.float32)
    w = jnp.asarray(rng.standard_normal((3, K, N)), dtype)
    panels = cpu_kernels.pack_panels(w)
    fn = jax.jit(cpu_kernels.panel_matmul)
    for layer in range(3):
        y = fn(jnp.asarray(x), panels, layer)
        assert y.shape == (M, N) and y.dtype == jnp.float32
        assert_product_close(y, x, np.asarray(w[layer], np.float32))  # bf16 widens exactly


@needs_compiler
def test_panel_matmul_threads_large_products_and_traced_layers():
    """Shapes past the kernel's threading threshold, with the layer a scan counter (as in decoding)."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((8, 576)).astype(np.float32)
    w = rng.standard_normal((2, 576, 1536)).astype(np.float32)
    panels = cpu_kernels.pack_panels(jnp.asarray(w))
    ys = jax.jit(lambda x, p: jax.lax.map(lambda i: cpu_kernels.panel_matmul(x, p, i), jnp.arange(2)))(x, panels)
    for layer in range(2):
        assert_product_close(ys[layer], x, w[layer])


@needs_compiler
def test_panel_matmul_under_vmap_and_leading_axes():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((4, 2, 3, 16)).astype(np.float32)
    u = rng.standard_normal((24, 16)).astype(np.float32)
    rows = cpu_kernels.pack_panels(jnp.asarray(u).T[None])
    direct = cpu_kernels.panel_matmul(jnp.asarray(x), rows, 0)
    assert direct.shape == (4, 2, 3, 24)
    assert_product_close(np.asarray(direct).reshape(-1, 24), x.reshape(-1, 16), u.T)
    mapped = jax.vmap(cpu_kernels.panel_matmul, (0, None, None))(jnp.asarray(x), rows, 0)
    np.testing.assert_array_equal(np.asarray(mapped), np.asarray(direct))


@needs_compiler
def test_panel_matmul_empty_operands():
    """K = 0 gives zeros (empty sums), M = 0 an empty result."""
    f32 = jnp.float32
    assert np.all(np.asarray(cpu_kernels.panel_matmul(jnp.ones((2, 0), f32), jnp.ones((1, 3, 0, 8), f32), 0)) == 0)
    assert cpu_kernels.panel_matmul(jnp.ones((0, 4), f32), jnp.ones((1, 1, 4, 8), f32), 0).shape == (0, 8)


@needs_compiler
def test_panel_matmul_bad_input():
    panels = cpu_kernels.pack_panels(jnp.ones((2, 16, 8), jnp.float32))
    with pytest.raises(ValueError, match="width 12, the panels expect K = 16"):
        cpu_kernels.panel_matmul(jnp.ones((3, 12), jnp.float32), panels, 0)
    with pytest.raises(Exception, match="layer index out of range"):
        jax.block_until_ready(cpu_kernels.panel_matmul(jnp.ones((3, 16), jnp.float32), panels, 2))
    with pytest.raises(Exception, match="vmap over weights is not supported"):
        stacked = jnp.stack([panels, panels])
        x = jnp.ones((3, 16), jnp.float32)
        jax.block_until_ready(jax.vmap(cpu_kernels.panel_matmul, (None, 0, None))(x, stacked, 0))


def test_library_cache_key_follows_source_compiler_and_cpu(monkeypatch, tmp_path):
    monkeypatch.setenv("STEERJAX_KERNEL_CACHE", str(tmp_path))
    base = cpu_kernels.library_path("g++")
    assert base.parent.parent == tmp_path
    assert cpu_kernels.library_path("clang++") != base
    monkeypatch.setattr(cpu_kernels, "cpu_signature", lambda: "another cpu")
    assert cpu_kernels.library_path("g++") != base


def run_python(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=600)


FALLBACK_CHECK = """
    import json, warnings, jax.numpy as jnp, numpy as np
    import steerjax as sj
    from steerjax import cpu_kernels, generation, io
    from steerjax.errors import InputError
    lm = sj.load_model({folder!r})
    meta = io.run_metadata(lm)                        # a run's metadata starts before its generations
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        print("PATH", generation.decode_path(lm))
        out = sj.generate(lm, [[1, 2, 3]], max_new_tokens=3)
        again = sj.generate(lm, [[4, 5, 6]], max_new_tokens=3)
    print("WARNINGS", sum("unavailable" in str(w.message) for w in caught))
    plain = sj.generate(lm, [[1, 2, 3]], max_new_tokens=3, decode_kernels=False)
    print("SAME", bool(np.array_equal(out.tokens, plain.tokens)), out.tokens.shape)
    print("META", json.dumps(io.to_jsonable(meta["decode"])))
    try:
        sj.generate(lm, [[1, 2, 3]], max_new_tokens=3, decode_kernels=True)
        print("FORCED ran")
    except InputError as err:
        print("ERROR", err)
"""


def fallback_lines(result) -> dict[str, str]:
    assert result.returncode == 0, result.stderr[-3000:]
    return {line.split(" ", 1)[0]: line.split(" ", 1)[1] for line in result.stdout.splitlines() if " " in line}


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("kernel_tiny")
    build_hf_model("llama_tied_bias_gqa1", seed=5).save_pretrained(folder)
    return str(folder)


def test_decode_kernels_env_switch(tiny_folder, tmp_path):
    """STEERJAX_DECODE_KERNELS=0 runs XLA's dot without ever building the kernels (run metadata says so);
    an explicit decode_kernels argument still wins; an unknown setting is a named error."""
    lines = fallback_lines(run_python(FALLBACK_CHECK.format(folder=tiny_folder), STEERJAX_DECODE_KERNELS="0",
                                      STEERJAX_KERNEL_CACHE=str(tmp_path)))
    assert lines["PATH"] == "xla_dot" and lines["WARNINGS"] == "0" and lines["SAME"].startswith("True (1, 6)")
    meta = json.loads(lines["META"])
    assert meta["paths_run"] == ["xla_dot"] and meta["generate_calls"]["xla_dot"] == 3
    assert meta["setting"] == "0" and meta["cpu_kernels"] == "not built"
    if cpu_kernels.compiler() is not None:
        assert lines["FORCED"] == "ran"
    bad = run_python(FALLBACK_CHECK.format(folder=tiny_folder), STEERJAX_DECODE_KERNELS="yes")
    assert "STEERJAX_DECODE_KERNELS='yes' is not a setting" in bad.stderr


@needs_compiler
def test_decode_kernels_env_forces_the_kernels(tiny_folder, tmp_path, monkeypatch):
    """STEERJAX_DECODE_KERNELS=1 takes the kernels even past the memory share, and records it."""
    lm = sj.load_model(tiny_folder)
    monkeypatch.setattr(generation, "PANEL_MEMORY_FRACTION", 1e-12)
    assert generation.decode_path(lm) == "xla_dot"
    monkeypatch.setenv("STEERJAX_DECODE_KERNELS", "1")
    assert generation.decode_path(lm) == "cpu_kernel"
    before = generation.DECODE_RECORD.calls["cpu_kernel"]
    sj.generate(lm, [[1, 2, 3]], max_new_tokens=2)
    assert generation.DECODE_RECORD.calls["cpu_kernel"] == before + 1
    assert generation.DECODE_RECORD.since_now().to_json()["cpu_kernels"] in ("compiled", "loaded from cache")


def test_no_compiler_on_path_falls_back_with_one_warning(tiny_folder, tmp_path):
    """With no C++ compiler to be found (PATH without one, no $CXX), generation runs on XLA's dot with a single
    warning for the whole process, gives the XLA path's tokens, and the metadata records why."""
    empty = tmp_path / "bin"
    empty.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("CXX", "STEERJAX_DECODE_KERNELS")}
    env.update(PATH=str(empty), STEERJAX_KERNEL_CACHE=str(tmp_path / "cache"))
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(FALLBACK_CHECK.format(folder=tiny_folder))],
                            capture_output=True, text=True, env=env, timeout=600)
    lines = fallback_lines(result)
    assert lines["PATH"] == "xla_dot" and lines["WARNINGS"] == "1" and lines["SAME"].startswith("True (1, 6)")
    meta = json.loads(lines["META"])
    assert meta["paths_run"] == ["xla_dot"] and "no C++ compiler found" in meta["cpu_kernels"]
    assert lines["ERROR"].startswith("the CPU decode kernels") and "no C++ compiler found" in lines["ERROR"]
    assert not list(tmp_path.rglob("*.so"))


def test_failed_build_warns_and_falls_back(tiny_folder, tmp_path):
    """A compiler that fails (here `false`) leaves a warning naming the command, and generation works."""
    lines = fallback_lines(run_python(FALLBACK_CHECK.format(folder=tiny_folder), CXX="false",
                                      STEERJAX_KERNEL_CACHE=str(tmp_path)))
    assert lines["PATH"] == "xla_dot" and lines["WARNINGS"] == "1" and lines["SAME"].startswith("True (1, 6)")
    assert "failed" in json.loads(lines["META"])["cpu_kernels"]
    assert not list(tmp_path.rglob("*.so")), "a failed build must not leave a library in the cache"


@pytest.fixture(scope="module", params=["llama_tied_bias_gqa1", "qwen2_untied_gqa4"])
def tiny_model_folder(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    hf_model = build_hf_model(request.param, seed=7)
    hf_model.config.eos_token_id = None
    hf_model.save_pretrained(folder)
    return folder


@needs_compiler
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_generation_with_kernels_equals_xla_dot(tiny_model_folder, dtype):
    """Same tokens and, step by step, the same logits up to float32 (bf16: one bf16 rounding per layer
    output) whether decode products run in the kernels or in XLA's dot; with steering, biases, tied and
    untied unembeddings."""
    lm = sj.load_model(tiny_model_folder, dtype=dtype)
    assert generation.decode_kernels_apply(lm)
    rng = np.random.default_rng(3)
    batch = sj.model.left_pad([list(rng.integers(1, 150, size=n)) for n in (5, 2, 7)], pad_id=0)
    steer = sj.Steer(layer=1, vector=rng.normal(size=lm.d), alpha=3.0, positions="last+generated")
    kw = dict(steer=steer, max_new_tokens=8, return_logits=True, stop_at_eos=False)
    fast = sj.generate(lm, batch, decode_kernels=True, **kw)
    plain = sj.generate(lm, batch, decode_kernels=False, **kw)
    fast_logits, plain_logits = np.asarray(fast.logits, np.float64), np.asarray(plain.logits, np.float64)
    scale = np.abs(plain_logits).max()
    if dtype == "float32":
        np.testing.assert_array_equal(fast.tokens, plain.tokens)
        assert np.abs(fast_logits - plain_logits).max() <= 1e-5 * scale
    else:  # a 1-ulp bf16 difference in one layer output may flip a near-tie; compare each row up to it
        T = batch.ids.shape[1]
        for row in range(len(batch.ids)):
            differ = np.flatnonzero(fast.tokens[row, T:] != plain.tokens[row, T:])
            upto = differ[0] + 1 if differ.size else kw["max_new_tokens"]
            assert np.abs(fast_logits[row, :upto] - plain_logits[row, :upto]).max() <= 3e-2 * scale
            if differ.size:  # the two choices were a near-tie under both paths' logits
                step, a, b = differ[0], fast.tokens[row, T + differ[0]], plain.tokens[row, T + differ[0]]
                assert abs(plain_logits[row, step, a] - plain_logits[row, step, b]) <= 3e-2 * scale
    assert generation.has_decode_panels(lm)


@needs_compiler
def test_memory_share_policy(tiny_folder, monkeypatch):
    """Past PANEL_MEMORY_FRACTION of memory the default is XLA's dot; decode_kernels=True still packs."""
    lm = sj.load_model(tiny_folder)
    assert generation.panel_bytes(lm.params) == sum(
        x.nbytes for x in jax.tree.leaves(generation.pack_decode_weights(lm.params)))
    monkeypatch.setattr(generation, "PANEL_MEMORY_FRACTION", 1e-12)
    assert not generation.decode_kernels_apply(lm)
    sj.generate(lm, [[1, 2, 3]], max_new_tokens=2)
    assert not generation.has_decode_panels(lm)
    sj.generate(lm, [[1, 2, 3]], max_new_tokens=2, decode_kernels=True)
    assert generation.has_decode_panels(lm) and generation.decode_kernels_apply(lm)


@needs_compiler
def test_new_weights_get_new_panels(tiny_folder, caplog):
    """A model with new weights (lm.replace, the public way) packs its own panels; the old model keeps its
    own; fields cannot be assigned; weights swapped inside the params dict are seen too (the cache holds its
    source arrays, so no freed id can be mistaken for them). Tokens follow the new weights exactly as the XLA
    path does. The packed size is logged once per packing."""
    lm = sj.load_model(tiny_folder)
    ids = [[5, 9, 2, 7]]
    with caplog.at_level(logging.INFO, logger="steerjax"):
        sj.generate(lm, ids, max_new_tokens=4)
        sj.generate(lm, ids, max_new_tokens=4)
    assert sum("packed" in r.getMessage() and "MB" in r.getMessage() for r in caplog.records) == 1
    old = generation.decode_panels(lm)
    flipped = lm.replace(params=jax.tree.map(lambda x: -x if x.ndim == 3 else x, lm.params))  # every kernel
    with pytest.raises(dataclasses.FrozenInstanceError):
        lm.params = flipped.params
    fresh = sj.generate(flipped, ids, max_new_tokens=4, return_logits=True)
    plain = sj.generate(flipped, ids, max_new_tokens=4, return_logits=True, decode_kernels=False)
    np.testing.assert_array_equal(fresh.tokens, plain.tokens)
    np.testing.assert_allclose(np.asarray(fresh.logits), np.asarray(plain.logits), rtol=1e-5, atol=1e-5)
    assert generation.decode_panels(flipped) is not old and generation.decode_panels(lm) is old
    assert flipped.cache.names() == ["decode_panels"]
    lm.params["embed"] = -lm.params["embed"]       # in-place swap of one leaf: repacked, old copy freed
    assert not generation.has_decode_panels(lm)
    assert generation.decode_panels(lm) is not old and lm.cache.names() == ["decode_panels"]


def test_kernels_refused_for_float64_and_sharded_models(tiny_folder):
    lm64 = sj.load_model(tiny_folder, dtype="float64")
    assert not generation.decode_kernels_apply(lm64)
    with pytest.raises(InputError, match=r"float32 / bfloat16 model .*\(model: float64"):
        sj.generate(lm64, [[1, 2, 3]], max_new_tokens=2, decode_kernels=True)
    sharded = sj.load_model(tiny_folder).replace(mesh=sj.sharding.make_mesh(1, 1))
    assert not generation.decode_kernels_apply(sharded)
    assert generation.decode_kernels_apply(sj.load_model(tiny_folder))
