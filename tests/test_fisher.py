"""steerjax.fisher on small exact cases (linear / softmax / quadratic toy models with known J).

Monte-Carlo tolerances are stated where used; each is several standard deviations of the sampling
error the code itself predicts, and each check is paired with a mis-specified alternative that it must
reject, so no assertion passes by construction. Fixed seeds throughout.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import steerjax as sj
from conftest import gaussian_setup, low_rank, null_of
from steerjax import fisher


# ----------------------------------------------------------------------------- Fisher matrices, bounds


def test_gaussian_fisher_split_and_bound():
    rng = np.random.default_rng(0)
    J = low_rank(rng, 12, 8, 5)
    sigma = 0.3
    F = fisher.gaussian_fisher(J, sigma)
    np.testing.assert_allclose(F, J.T @ J / sigma**2, rtol=1e-13)
    split = fisher.spectral_split(F, 1e-6)
    assert split.rank == 5 and split.null.shape == (8, 3) and split.eps == 1e-6
    assert np.all(np.diff(split.eigenvalues) <= 0)
    assert np.linalg.norm(J @ split.null) < 1e-12 * np.linalg.norm(J)          # null = ker(J)
    np.testing.assert_allclose(fisher.project(np.eye(8), split.null), null_of(J) @ null_of(J).T, atol=1e-12)
    bound = fisher.cramer_rao_bound(F, 1e-6)
    np.testing.assert_allclose(bound, sigma**2 * np.linalg.pinv(J.T @ J, rcond=1e-10, hermitian=True), atol=1e-12)
    assert np.linalg.norm(bound @ split.null) < 1e-12 * np.linalg.norm(bound)
    # eps is in singular-value units: singular values 10 .. 1 (ratio 0.1): eps 0.5 keeps those above 5
    s = np.linalg.svd(J, compute_uv=False)
    assert fisher.spectral_split(F, 0.5).rank == int(np.sum(s > 0.5 * s[0]))
    # stacked prompts add: the kernel of the sum is the intersection of the kernels
    J2 = low_rank(rng, 12, 8, 5)
    F12 = fisher.gaussian_fisher(np.stack([J, J2]), sigma)
    np.testing.assert_allclose(F12, F + fisher.gaussian_fisher(J2, sigma), rtol=1e-12)
    assert fisher.spectral_split(F12, 1e-6).rank == 8


def test_categorical_fisher_is_the_score_covariance_and_nll_hessian(x64):
    rng = np.random.default_rng(1)
    K, d = 6, 9
    J, z = rng.normal(size=(K, d)), rng.normal(size=K)
    p = np.exp(z - z.max())
    p /= p.sum()
    F = fisher.categorical_fisher(J, p)
    # E_t[score score^T], score of token t = J^T (e_t - p)
    scores = (np.eye(K) - p) @ J
    np.testing.assert_allclose(F, np.einsum("t,ti,tj->ij", p, scores, scores), rtol=1e-12, atol=1e-14)
    # expected Hessian of -log softmax(z + J v)_t at v = 0 (it does not depend on t for softmax models)
    nll = lambda v: -(jnp.asarray(p) * jax.nn.log_softmax(jnp.asarray(z) + jnp.asarray(J) @ v)).sum()
    np.testing.assert_allclose(np.asarray(jax.hessian(nll)(jnp.zeros(d))), F, rtol=1e-10, atol=1e-13)
    # rank K - 1: the constant logit shift is invisible to a softmax
    assert fisher.spectral_split(F, 1e-6).rank == K - 1
    np.testing.assert_allclose(fisher.categorical_fisher(np.stack([J, J]), np.stack([p, p])), 2 * F, rtol=1e-12)


# ----------------------------------------------------------------------------- Gaussian model


def test_least_squares_covariance_attains_the_cramer_rao_bound():
    rng, J, v_true, obs, sigma = gaussian_setup()
    n = obs.shape[0]
    est = fisher.least_squares(J, obs, 1e-8)
    assert est.shape == (n, 8)
    F = fisher.gaussian_fisher(J, sigma)
    # F = J^T J carries eigenvalue rounding ~1e-16 lambda_max, i.e. 1e-8 in singular-value units: split it
    # at 1e-6 (J's own singular values are 10 .. 1 or exactly 0, so any eps in (1e-15, 0.1) is the same split)
    split = fisher.spectral_split(F, 1e-6)
    bound = fisher.cramer_rao_bound(F, 1e-6)
    # min-norm LS puts exactly nothing in ker(J) (float64 rounding of the SVD)
    assert np.abs(est @ split.null).max() < 1e-12 * np.abs(est).max()
    check = fisher.covariance_check(est, bound, split.row, truth=v_true)
    assert check["dim"] == 5 and check["n"] == n
    # MC tolerance: each variance ratio has sd sqrt(2 / n) = 0.01 -> allow 5 sd; the mean of 5 ratios
    # 5 sd / sqrt(5); ||W - I||_F / sqrt(r) concentrates at its predicted RMS (sd ~20% for r = 5) -> x [0.4, 2]
    sd = check["variance_ratio_sd"]
    assert abs(check["variance_ratio_mean"] - 1) < 5 * sd / np.sqrt(5)
    assert 1 - 5 * sd < check["variance_ratio_min"] <= check["variance_ratio_max"] < 1 + 5 * sd
    assert 0.4 < check["whitened_rel_error"] / check["expected_whitened_rel_error"] < 2.0
    assert check["frobenius_rel_error"] < 3 * check["expected_frobenius_rel_error"]
    assert check["bias_whitened"] < 3.0          # chi_5 / sqrt(5): mean ~0.95, P(> 3) ~ 1e-9
    # power: a bound 10% too small or too large is rejected by the same tolerances
    for wrong in (0.9, 1.1):
        bad = fisher.covariance_check(est, wrong * bound, split.row)
        assert abs(bad["variance_ratio_mean"] - 1) > 5 * sd / np.sqrt(5)
    # a single observation gives a single estimate of the right shape
    assert fisher.least_squares(J, obs[0], 1e-8).shape == (8,)


def test_map_null_component_is_the_prior_mean():
    rng, J, v_true, obs, sigma = gaussian_setup(n=4000)
    null = null_of(J)
    tau = 2.0
    # one prior mean per replicate, drawn from the prior itself
    means = tau * rng.normal(size=(obs.shape[0], 8))
    est = fisher.map_estimate(J, obs, sigma, means, tau)
    # ker(J) component: exactly the prior's, whatever the data
    np.testing.assert_allclose(est @ null, means @ null, atol=1e-12)
    # ... so its spread is the prior's: variance tau^2 per null direction (MC: sd of a variance ratio
    # with n = 4000 is sqrt(2 / n) = 0.022 -> 5 sd)
    ratios = np.var(est @ null, axis=0, ddof=1) / tau**2
    assert np.all(np.abs(ratios - 1) < 5 * np.sqrt(2 / obs.shape[0]))
    # while the row-space spread is the data's sigma^2 (J^T J)^+ (prior sd tau >> sigma / sigma_min here),
    # inflated by nothing from the prior means (their row component is overridden by the data)
    F = fisher.gaussian_fisher(J, sigma)
    split = fisher.spectral_split(F, 1e-6)           # F's rounding is ~1e-8 in singular units (see above)
    check = fisher.covariance_check(est, fisher.cramer_rao_bound(F, 1e-6), split.row)
    assert abs(check["variance_ratio_mean"] - 1) < 0.05
    # with a flat prior (tau -> inf) the row-space part is least squares
    flat = fisher.map_estimate(J, obs[:10], sigma, np.zeros(8), 1e8)
    np.testing.assert_allclose(flat, fisher.least_squares(J, obs[:10], 1e-8), atol=1e-9)


# ----------------------------------------------------------------------------- errors


def test_bad_input_raises_input_error():
    J = np.ones((4, 3))
    with pytest.raises(sj.InputError, match="sigma"):
        fisher.gaussian_fisher(J, 0.0)
    with pytest.raises(sj.InputError, match="sigma"):
        fisher.gaussian_fisher(J, -1.0)
    with pytest.raises(sj.InputError, match="sigma"):
        fisher.gaussian_fisher(J, float("nan"))
    with pytest.raises(sj.InputError, match="J must be"):
        fisher.gaussian_fisher(np.ones(3), 1.0)
    with pytest.raises(sj.InputError, match="NaN"):
        fisher.gaussian_fisher(np.full((2, 2), np.nan), 1.0)
    with pytest.raises(sj.InputError, match="shape"):
        fisher.categorical_fisher(J, np.ones(3) / 3)
    with pytest.raises(sj.InputError, match="sum to 1"):
        fisher.categorical_fisher(J, np.ones(4))
    with pytest.raises(sj.InputError, match="square"):
        fisher.spectral_split(J, 1e-3)
    with pytest.raises(sj.InputError, match="eps"):
        fisher.spectral_split(np.eye(3), 1.5)
    with pytest.raises(sj.InputError, match="last axis 4"):
        fisher.least_squares(J, np.ones(3), 1e-6)
    with pytest.raises(sj.InputError, match="prior_sd"):
        fisher.map_estimate(J, np.ones(4), 1.0, np.zeros(3), 0)
    with pytest.raises(sj.InputError, match="prior_mean"):
        fisher.map_estimate(J, np.ones(4), 1.0, np.zeros(4), 1.0)
    with pytest.raises(sj.InputError, match="at least 3"):
        fisher.covariance_check(np.ones((2, 3)), np.eye(3), np.eye(3))
    with pytest.raises(sj.InputError, match="positive definite"):
        fisher.covariance_check(np.random.default_rng(0).normal(size=(5, 3)), np.zeros((3, 3)), np.eye(3))
