"""Lanczos / Golub-Kahan against dense float64 SVD / eigh on matrices with known spectra and on real
Jacobians of a tiny model."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import steerjax as sj
from conftest import random_ids
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


@pytest.mark.parametrize("name", list(SPECTRA))
def test_golub_kahan_top_k_on_known_spectra(x64, name):
    s = SPECTRA[name]
    a = lanczos.known_spectrum_matrix(s, n=150, seed=1)
    k = 10
    res = lanczos.top_singular_triplets(lanczos.dense_matvec, lanczos.dense_rmatvec, jnp.asarray(a), 150, 60, k,
                                        steps=40, dtype=jnp.float64)
    np.testing.assert_allclose(res.s, s[:k], rtol=REL_TOL, atol=REL_TOL * s[0])
    # triplets: A v_i = s_i u_i for the well-separated, non-zero ones
    ok = s[:k] > 0
    resid = np.linalg.norm(a @ np.asarray(res.v) - np.asarray(res.u) * np.asarray(res.s), axis=0)
    assert np.all(resid[ok] <= 1e-6 * s[0])


@pytest.mark.parametrize("name", list(SPECTRA))
def test_symmetric_lanczos_top_k_on_known_spectra(x64, name):
    s = SPECTRA[name]
    a = lanczos.known_spectrum_matrix(s, n=150, seed=2)
    gram = jnp.asarray(a.T @ a)
    res = lanczos.lanczos_eigh(lanczos.dense_matvec, gram, 60, 10, steps=40, dtype=jnp.float64)
    np.testing.assert_allclose(res.w, s[:10] ** 2, rtol=REL_TOL, atol=REL_TOL * s[0] ** 2)


def test_lanczos_on_model_jacobians_matches_dense(x64, tiny_checkpoints):
    lm = sj.load_model(tiny_checkpoints["llama3_untied_gqa2"][0], dtype="float64")
    rng = np.random.default_rng(3)
    op = sj.jacobian_operator(lm, random_ids(rng, 3, 8), layer=1, observable="logprobs")
    dense = np.asarray(op.dense())
    for prompt in range(3):
        s_dense = np.linalg.svd(dense[prompt], compute_uv=False)
        res = op.top_singular(8, prompt=prompt)
        np.testing.assert_allclose(res.s, s_dense[:8], rtol=REL_TOL)
        resid = dense[prompt] @ np.asarray(res.v) - np.asarray(res.u) * np.asarray(res.s)
        assert np.max(np.linalg.norm(resid, axis=0)) <= REL_TOL * s_dense[0]
    for n in (2, 3):
        s_stacked = np.linalg.svd(np.concatenate(list(dense[:n])), compute_uv=False)
        np.testing.assert_allclose(op.top_stacked(8, n_prompts=n).s, s_stacked[:8], rtol=REL_TOL)


def test_bad_k_is_reported():
    with pytest.raises(ValueError, match="need 0 < k <= steps"):
        lanczos.top_singular_triplets(lanczos.dense_matvec, lanczos.dense_rmatvec, jnp.eye(5), 5, 5, 6)
