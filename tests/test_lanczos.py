"""Lanczos / Golub-Kahan against dense float64 SVD / eigh on matrices with known spectra and on real
Jacobians of a tiny model."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import steerjax as sj
from conftest import random_ids
from helpers import dense_matvec, dense_rmatvec, known_spectrum_matrix
from steerjax import lanczos

REL_TOL = 1e-6  # the bar for top-k against dense; float64 with full reorthogonalisation

SPECTRA = {
    "geometric": np.geomspace(10.0, 1e-3, 60),
    # a tight cluster at the top, then a gap, then tiny values down to 1e-12
    "clustered_with_tiny": np.concatenate([[10, 10 - 1e-3, 10 - 2e-3, 10 - 3e-3, 7, 6.5],
                                           np.geomspace(1.0, 1e-12, 54)]),
    # rank 8 out of 60: exact zeros force breakdown and restart
    "rank_deficient": np.concatenate([np.linspace(5.0, 0.5, 8), np.zeros(52)]),
}


@pytest.fixture
def x64():
    with jax.enable_x64(True):
        yield


def dense_top_k(a, k, dtype=jnp.float64, **kw):
    n, d = a.shape
    return lanczos.top_singular_triplets(dense_matvec, dense_rmatvec, jnp.asarray(a, dtype), n, d, k,
                                         dtype=dtype, **kw)


def true_residuals(a, res):
    """(||A v_i - s_i u_i||, ||A^T u_i - s_i v_i||) per triplet, in float64."""
    s, u, v = (np.asarray(x, np.float64) for x in res[:3])
    return np.linalg.norm(a @ v - u * s, axis=0), np.linalg.norm(a.T @ u - v * s, axis=0)


@pytest.mark.parametrize("name", list(SPECTRA))
def test_block_golub_kahan_top_k_on_known_spectra(x64, name):
    s = SPECTRA[name]
    a = known_spectrum_matrix(s, n=150, seed=1)
    k = 10
    res = dense_top_k(a, k, tol=1e-12)
    assert res.converged
    np.testing.assert_allclose(res.s, s[:k], rtol=REL_TOL, atol=REL_TOL * s[0])
    forward, backward = true_residuals(a, res)
    assert np.all(forward <= 1e-12 * s[0])  # A v = s u holds by construction
    # the reported residuals are the true ||A^T u - s v||, and below the tolerance
    np.testing.assert_allclose(res.residuals, backward, rtol=1e-6, atol=1e-13 * s[0])
    assert np.all(backward <= 1e-12 * s[0])
    u = np.asarray(res.u)
    np.testing.assert_allclose(u.T @ u, np.eye(k), atol=1e-12)


# a flat, clustered top (like a random-weight model's): 60 values in [0.9, 1], then a decaying tail
FLAT = np.concatenate([np.linspace(1.0, 0.9, 60), np.geomspace(0.5, 1e-3, 340)])


@pytest.mark.parametrize("dtype, tol", [(jnp.float64, 1e-10), (jnp.float32, 1e-5)])
def test_flat_spectrum_runs_until_converged_and_residuals_bound_the_error(x64, dtype, tol):
    a = known_spectrum_matrix(FLAT, n=800, seed=4)
    k = 16
    res = dense_top_k(a, k, dtype)  # default tolerance for the dtype
    assert res.converged and res.products > 2 * 32  # needed more than one round of blocks of 32
    assert float(np.max(res.residuals)) <= tol * FLAT[0]
    # each Ritz value is within its triplet's residual of the true singular value (plus rounding)
    err = np.abs(np.asarray(res.s, np.float64) - FLAT[:k])
    assert np.all(err <= np.max(true_residuals(a, res)[1]) + 50 * np.finfo(dtype).eps * FLAT[0])


def test_stopping_short_warns_and_says_so(x64):
    a = known_spectrum_matrix(FLAT, n=800, seed=4)
    with pytest.warns(lanczos.ConvergenceWarning, match="did not converge in 1 blocks of 32"):
        res = dense_top_k(a, 16, max_blocks=1)
    assert not res.converged and res.products == 64
    assert float(np.max(res.residuals)) > 1e-10 * FLAT[0]
    # the reported residuals are still the true ones
    np.testing.assert_allclose(res.residuals, true_residuals(a, res)[1], rtol=1e-6)


@pytest.mark.parametrize("name", list(SPECTRA))
def test_symmetric_lanczos_top_k_on_known_spectra(x64, name):
    s = SPECTRA[name]
    a = known_spectrum_matrix(s, n=150, seed=2)
    gram = jnp.asarray(a.T @ a)
    res = lanczos.lanczos_eigh(dense_matvec, gram, 60, 10, steps=40, dtype=jnp.float64)
    np.testing.assert_allclose(res.w, s[:10] ** 2, rtol=REL_TOL, atol=REL_TOL * s[0] ** 2)
    assert res.converged


def test_symmetric_lanczos_residuals_are_true_and_warn_when_short(x64):
    a = known_spectrum_matrix(FLAT, n=800, seed=5)
    gram = a.T @ a
    with pytest.warns(lanczos.ConvergenceWarning, match="did not converge in 40 steps"):
        short = lanczos.lanczos_eigh(dense_matvec, jnp.asarray(gram), 400, 8, steps=40, dtype=jnp.float64)
    assert not short.converged
    for res in (short, lanczos.lanczos_eigh(dense_matvec, jnp.asarray(gram), 400, 8, steps=400,
                                            dtype=jnp.float64)):
        w, y = np.asarray(res.w), np.asarray(res.v)
        true = np.linalg.norm(gram @ y - y * w, axis=0)
        np.testing.assert_allclose(res.residuals, true, rtol=1e-5, atol=1e-12 * w[0])


@pytest.mark.parametrize("observable", ["logits", "logprobs"])
def test_lanczos_on_model_jacobians_matches_dense(x64, tiny_checkpoints, observable):
    lm = sj.load_model(tiny_checkpoints["llama3_untied_gqa2"][0], dtype="float64")
    rng = np.random.default_rng(3)
    op = sj.jacobian_operator(lm, random_ids(rng, 3, 8), layer=1, observable=observable)
    dense = np.asarray(op.dense())
    # on M D (the W_U = QR reduction) for every prompt; on J itself once (logits; each route compiles once)
    runs = [(prompt, True) for prompt in range(3)] + ([(1, False)] if observable == "logits" else [])
    for prompt, reduced in runs:
        s_dense = np.linalg.svd(dense[prompt], compute_uv=False)
        res = op.top_singular(8, prompt=prompt, reduced=reduced, method="lanczos")
        assert res.converged
        np.testing.assert_allclose(res.s, s_dense[:8], rtol=REL_TOL)
        forward, backward = true_residuals(dense[prompt], res)
        assert np.max(forward) <= REL_TOL * s_dense[0] and np.max(backward) <= REL_TOL * s_dense[0]
        np.testing.assert_allclose(res.residuals, backward, rtol=1e-4, atol=1e-12 * s_dense[0])
    if observable == "logits":
        for n in (2, 3):
            s_stacked = np.linalg.svd(np.concatenate(list(dense[:n])), compute_uv=False)
            res = op.top_stacked(8, n_prompts=n)
            np.testing.assert_allclose(res.s, s_stacked[:8], rtol=REL_TOL)
            assert res.converged


@pytest.mark.parametrize("observable", ["logits", "logprobs"])
def test_dense_top_singular_matches_dense_svd_with_true_residuals(x64, tiny_checkpoints, observable):
    lm = sj.load_model(tiny_checkpoints["llama3_untied_gqa2"][0], dtype="float64")
    op = sj.jacobian_operator(lm, random_ids(np.random.default_rng(4), 3, 8), layer=1, observable=observable)
    dense = np.asarray(op.dense())
    for prompt in (0, 2):
        res = op.top_singular(8, prompt=prompt, method="dense")
        s_dense = np.linalg.svd(dense[prompt], compute_uv=False)
        assert res.converged and res.products == lm.d + 16
        np.testing.assert_allclose(res.s, s_dense[:8], rtol=1e-10)
        forward, backward = true_residuals(dense[prompt], res)
        assert np.max(forward) <= 1e-10 * s_dense[0] and np.max(backward) <= 1e-10 * s_dense[0]
        np.testing.assert_allclose(res.residuals, backward, rtol=1e-3, atol=1e-13 * s_dense[0])


def test_auto_top_singular_follows_the_cost_model(tiny_checkpoints):
    from steerjax.jacobian import dense_is_cheaper

    assert dense_is_cheaper(576, 32) and dense_is_cheaper(896, 32) and not dense_is_cheaper(4096, 32)
    assert not dense_is_cheaper(896, 8) and dense_is_cheaper(896, 8, block=64)
    lm = sj.load_model(tiny_checkpoints["llama3_untied_gqa2"][0])  # float32: the default tol 1e-5 must hold
    op = sj.jacobian_operator(lm, random_ids(np.random.default_rng(5), 2, 8), layer=1)
    auto, lz = op.top_singular(4, prompt=1), op.top_singular(4, prompt=1, method="lanczos")
    assert dense_is_cheaper(lm.d, 4) and auto.products == lm.d + 8 and lz.products != auto.products
    assert auto.converged and lz.converged
    np.testing.assert_allclose(auto.s, lz.s, rtol=1e-4)  # two float32 routes, each to 1e-5 of s_1


def test_bad_top_singular_arguments_are_reported(tiny_checkpoints):
    lm = sj.load_model(tiny_checkpoints["llama3_untied_gqa2"][0])
    op = sj.jacobian_operator(lm, random_ids(np.random.default_rng(6), 2, 8), layer=1)
    with pytest.raises(sj.InputError, match="method must be one of"):
        op.top_singular(4, method="arpack")
    with pytest.raises(sj.InputError, match="prompt 2 is outside"):
        op.top_singular(4, prompt=2)
    with pytest.raises(sj.InputError, match=r"singular triplets.* in \[1, 64\], got 0"):   # k in [1, d]
        op.top_singular(0)


def test_bad_k_is_reported():
    with pytest.raises(ValueError, match="need 0 < k <= min"):
        lanczos.top_singular_triplets(dense_matvec, dense_rmatvec, jnp.eye(5), 5, 5, 6)
