"""steerjax.fits on small exact cases (linear / softmax toy models with known J): the optax fits attain the
Cramér-Rao bound of steerjax.fisher on the row space and keep their start's null-space component.

Monte-Carlo tolerances are stated where used; each is several standard deviations of the sampling
error the code itself predicts, and each check is paired with a mis-specified alternative that it must
reject, so no assertion passes by construction. Fixed seeds throughout.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import steerjax as sj
from conftest import gaussian_setup, null_of
from steerjax import fisher, fits


def test_float32_fit_with_backtracking_lbfgs_after_x64_was_enabled():
    """A float64 model load turns jax_enable_x64 on for the whole process; a later float32 fit with optax's
    backtracking line search (experiments/recovery.py's L-BFGS) must still trace and converge."""
    rng, J, _, obs, sigma = gaussian_setup(n=1)
    y, A = jnp.asarray(obs[0], jnp.float32), jnp.asarray(J, jnp.float32)
    loss = lambda v, data, aux: 0.5 * jnp.sum((aux @ v - y) ** 2) / sigma**2
    lbfgs = optax.lbfgs(linesearch=optax.scale_by_backtracking_linesearch(max_backtracking_steps=30,
                                                                          store_grad=True))
    starts = jnp.asarray(rng.normal(size=(2, 8)), jnp.float32)
    with jax.enable_x64(True):
        res = fits.minimise(loss, starts, aux=A, optimizer=lbfgs, steps=200)
    assert res.v.dtype == jnp.float32
    ls = fisher.least_squares(J, obs[0], 1e-8)
    np.testing.assert_allclose(np.asarray(res.v) @ J.T, np.tile(ls @ J.T, (2, 1)), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("name,optimizer,keeps_null", [
    ("lbfgs", None, True),
    ("sgd_momentum", optax.sgd(1e-3, momentum=0.9), True),  # lr < 2 / lambda_max(J^T J / sigma^2) = 1.8e-3
    ("adam", optax.adam(optax.cosine_decay_schedule(1.0, 600, alpha=1e-3)), False),
])
def test_gradient_fits_keep_their_starting_null_component(x64, name, optimizer, keeps_null):
    rng, J, v_true, obs, sigma = gaussian_setup(n=1)
    y = jnp.asarray(obs[0])
    loss = lambda v, data, aux: 0.5 * jnp.sum((aux @ v - y) ** 2) / sigma**2
    starts = 3.0 * rng.normal(size=(6, 8))
    res = fits.minimise(loss, starts, aux=jnp.asarray(J), optimizer=optimizer, steps=600)
    v = np.asarray(res.v)
    null = null_of(J)
    ls = fisher.least_squares(J, obs[0], 1e-8)
    # every start reaches the least-squares fit on the row space
    np.testing.assert_allclose(v @ J.T, np.tile(ls @ J.T, (6, 1)), atol=1e-6)
    moved = np.linalg.norm((v - starts) @ null, axis=1) / np.linalg.norm(starts, axis=1)
    if keeps_null:
        # updates are combinations of gradients J^T r, so ker(J) is untouched up to rounding (600 steps of
        # float64 rounding accumulate to ~1e-12)
        assert moved.max() < 1e-10
        # and the estimates differ exactly by their starts' null components
        np.testing.assert_allclose(v - ls, fisher.project(starts, null), atol=1e-6)
    else:
        # Adam rescales coordinates: its updates leave the row space, the null component drifts
        assert moved.min() > 1e-3


# ----------------------------------------------------------------------------- categorical model


def test_categorical_mle_covariance_attains_the_cramer_rao_bound(x64):
    rng = np.random.default_rng(3)
    B, K, d = 2, 5, 12
    J = rng.normal(size=(B, K, d))
    z = rng.normal(scale=0.5, size=(B, K))
    p = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    assert p.min() > 0.05                         # every token seen ~200+ times: asymptotic regime
    n_tokens, R = 4000, 2000
    counts = fits.sample_counts(p, n_tokens, R, rng)
    assert counts.shape == (R, B, K) and np.all(counts.sum(axis=2) == n_tokens)
    starts = rng.normal(size=(R, d))
    res = fits.categorical_mle(fits.linear_logits, counts, starts, (jnp.asarray(z), jnp.asarray(J)), steps=60)
    v = np.asarray(res.v)
    assert np.all(np.isfinite(v)) and np.asarray(res.grad_norm).max() < 1e-8
    F = fisher.categorical_fisher(J, p)
    split = fisher.spectral_split(F, 1e-6)
    assert split.rank == B * (K - 1)
    # the MLE reproduces the empirical frequencies (saturated model: rank B(K-1) <= d)
    q = np.asarray(jax.nn.softmax(fits.linear_logits(jnp.asarray(v[0]), (z, J))))
    np.testing.assert_allclose(q, counts[0] / n_tokens, atol=1e-8)
    # null space: the start's component, untouched by L-BFGS
    np.testing.assert_allclose(v @ split.null, starts @ split.null, atol=1e-9)
    # row space: covariance of the MLE vs the Cramér-Rao bound F^+ / n_tokens. MC tolerance: R = 2000
    # replicates give sd sqrt(2 / R) = 0.032 per direction ratio (allow 5 sd + 3% for the O(1 / (n p))
    # finite-sample correction of the MLE); the mean over 8 ratios gets 5 sd / sqrt(8) + 3%.
    bound = fisher.cramer_rao_bound(F, 1e-6) / n_tokens
    v_true_row = np.zeros(d)                      # data drawn at v = 0
    check = fisher.covariance_check(v, bound, split.row, truth=v_true_row)
    sd = check["variance_ratio_sd"]
    assert abs(check["variance_ratio_mean"] - 1) < 5 * sd / np.sqrt(8) + 0.03
    assert 1 - 5 * sd - 0.03 < check["variance_ratio_min"] <= check["variance_ratio_max"] < 1 + 5 * sd + 0.03
    assert check["whitened_rel_error"] < 1.5 * check["expected_whitened_rel_error"]
    assert check["bias_whitened"] < 3.0
    # power: the Gaussian-logit bound (J^T J)^+ / n (the wrong model for tokens) is rejected
    wrong = fisher.cramer_rao_bound(fisher.gaussian_fisher(J, 1.0), 1e-6) / n_tokens
    bad = fisher.covariance_check(v, wrong, split.row)
    assert abs(bad["variance_ratio_mean"] - 1) > 0.5


def test_recover_agrees_on_the_row_space_and_not_on_the_null_space(x64):
    """Nonlinear toy with a global null space: logits = W tanh(A v + c), A (m, d) with m < d, so J(v) has
    the row space of A at every v and ker(A) is invisible at any strength."""
    rng = np.random.default_rng(4)
    K, m, d = 8, 4, 10
    W, A, c = rng.normal(size=(1, K, m)), rng.normal(size=(m, d)) / np.sqrt(d), rng.normal(size=m) * 0.3
    fn = lambda v, aux: jnp.einsum("bkm,m->bk", aux[0], jnp.tanh(aux[1] @ v + aux[2]))
    aux = (jnp.asarray(W), jnp.asarray(A), jnp.asarray(c))
    v_true = rng.normal(size=d)
    target = fn(jnp.asarray(v_true), aux)
    starts = np.stack([v_true + 1.5 * rng.normal(size=d) for _ in range(5)])
    res = fits.recover(fn, target, starts, aux, steps=200)
    assert np.asarray(res.loss).max() < 1e-14
    # identifiable part: the Fisher of the observed distribution at v* (its row space = row(A))
    p = np.asarray(jax.nn.softmax(target))
    J = np.asarray(jax.jacfwd(lambda v: fn(v, aux))(jnp.asarray(v_true)))
    split = fisher.spectral_split(fisher.categorical_fisher(J, p), 1e-6)
    assert split.rank == m
    errors = fisher.subspace_errors(np.asarray(res.v), v_true, split)
    start_errors = fisher.subspace_errors(starts, v_true, split)
    assert errors["row"].max() < 1e-6                              # recovered on the row space
    np.testing.assert_allclose(errors["null"], start_errors["null"], rtol=1e-8)  # null part = the start's
    assert errors["null"].min() > 0.3 and np.ptp(errors["null"]) > 0.05        # ... which differs per start
    # the recovered vectors are distinct, yet give identical distributions
    assert np.linalg.norm(np.asarray(res.v)[0] - np.asarray(res.v)[1]) > 0.3 * np.linalg.norm(v_true)


def test_fit_bad_input_raises_input_error():
    with pytest.raises(sj.InputError, match="v0"):
        fits.minimise(lambda v, d, a: jnp.sum(v**2), np.ones(3))
    with pytest.raises(sj.InputError, match="steps"):
        fits.minimise(lambda v, d, a: jnp.sum(v**2), np.ones((2, 3)), steps=0)
    with pytest.raises(sj.InputError, match="n_tokens"):
        fits.sample_counts(np.ones((1, 3)) / 3, 0, 5, np.random.default_rng(0))
    with pytest.raises(sj.InputError, match="counts"):
        fits.categorical_mle(fits.linear_logits, np.ones((2, 1, 3)), np.ones((3, 4)), None)
