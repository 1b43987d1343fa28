"""steerjax.fisher on small exact cases (linear / softmax / quadratic toy models with known J), plus the
transformer adapters on SmolLM2.

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
from steerjax import fisher


@pytest.fixture
def x64():
    with jax.enable_x64(True):
        yield


def low_rank(rng, rows: int, d: int, rank: int, spread: float = 10.0) -> np.ndarray:
    """rows x d matrix of exact rank `rank`, singular values spread over `spread`."""
    u, _ = np.linalg.qr(rng.normal(size=(rows, rank)))
    w, _ = np.linalg.qr(rng.normal(size=(d, rank)))
    return (u * np.geomspace(spread, 1.0, rank)) @ w.T


def null_of(J: np.ndarray) -> np.ndarray:
    """Orthonormal basis (d, k) of ker(J) by SVD (an independent route from fisher.spectral_split)."""
    _, s, vt = np.linalg.svd(J)
    rank = int(np.sum(s > 1e-10 * s[0]))
    return vt[rank:].T


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
    nll = lambda v: -(jnp.asarray(p) * jax.nn.log_softmax(jnp.asarray(z) + jnp.asarray(J) @ v)).sum()  # noqa: E731
    np.testing.assert_allclose(np.asarray(jax.hessian(nll)(jnp.zeros(d))), F, rtol=1e-10, atol=1e-13)
    # rank K - 1: the constant logit shift is invisible to a softmax
    assert fisher.spectral_split(F, 1e-6).rank == K - 1
    np.testing.assert_allclose(fisher.categorical_fisher(np.stack([J, J]), np.stack([p, p])), 2 * F, rtol=1e-12)


# ----------------------------------------------------------------------------- Gaussian model


def gaussian_setup(seed: int = 2, n: int = 20000):
    rng = np.random.default_rng(seed)
    V, d, rank, sigma = 12, 8, 5, 0.3
    J = low_rank(rng, V, d, rank)
    v_true = rng.normal(size=d)
    obs = J @ v_true + sigma * rng.normal(size=(n, V))
    return rng, J, v_true, obs, sigma


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


def test_float32_fit_with_backtracking_lbfgs_after_x64_was_enabled():
    """A float64 model load turns jax_enable_x64 on for the whole process; a later float32 fit with optax's
    backtracking line search (experiments/recovery.py's L-BFGS) must still trace and converge."""
    rng, J, _, obs, sigma = gaussian_setup(n=1)
    y, A = jnp.asarray(obs[0], jnp.float32), jnp.asarray(J, jnp.float32)
    loss = lambda v, data, aux: 0.5 * jnp.sum((aux @ v - y) ** 2) / sigma**2  # noqa: E731
    lbfgs = optax.lbfgs(linesearch=optax.scale_by_backtracking_linesearch(max_backtracking_steps=30,
                                                                          store_grad=True))
    starts = jnp.asarray(rng.normal(size=(2, 8)), jnp.float32)
    with jax.enable_x64(True):
        res = fisher.minimise(loss, starts, aux=A, optimizer=lbfgs, steps=200)
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
    loss = lambda v, data, aux: 0.5 * jnp.sum((aux @ v - y) ** 2) / sigma**2  # noqa: E731
    starts = 3.0 * rng.normal(size=(6, 8))
    res = fisher.minimise(loss, starts, aux=jnp.asarray(J), optimizer=optimizer, steps=600)
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
    counts = fisher.sample_counts(p, n_tokens, R, rng)
    assert counts.shape == (R, B, K) and np.all(counts.sum(axis=2) == n_tokens)
    starts = rng.normal(size=(R, d))
    res = fisher.categorical_mle(fisher.linear_logits, counts, starts, (jnp.asarray(z), jnp.asarray(J)), steps=60)
    v = np.asarray(res.v)
    assert np.all(np.isfinite(v)) and np.asarray(res.grad_norm).max() < 1e-8
    F = fisher.categorical_fisher(J, p)
    split = fisher.spectral_split(F, 1e-6)
    assert split.rank == B * (K - 1)
    # the MLE reproduces the empirical frequencies (saturated model: rank B(K-1) <= d)
    q = np.asarray(jax.nn.softmax(fisher.linear_logits(jnp.asarray(v[0]), (z, J))))
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
    fn = lambda v, aux: jnp.einsum("bkm,m->bk", aux[0], jnp.tanh(aux[1] @ v + aux[2]))  # noqa: E731
    aux = (jnp.asarray(W), jnp.asarray(A), jnp.asarray(c))
    v_true = rng.normal(size=d)
    target = fn(jnp.asarray(v_true), aux)
    starts = np.stack([v_true + 1.5 * rng.normal(size=d) for _ in range(5)])
    res = fisher.recover(fn, target, starts, aux, steps=200)
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


# ----------------------------------------------------------------------------- linearisation


def test_linearization_residual_slope_of_a_quadratic_map(x64):
    rng = np.random.default_rng(5)
    d, V = 6, 7
    A, Q = rng.normal(size=(V, d)), rng.normal(size=(V, d, d))
    C3 = rng.normal(size=(V, d, d, d))
    # f(x) = A x + q(x) + c(x): the residual of the first-order expansion at 0 is q(a u) + c(a u)
    fn = lambda x, aux: aux[0] @ x + jnp.einsum("vij,i,j->v", aux[1], x, x) + \
        jnp.einsum("vijk,i,j,k->v", aux[2], x, x, x)  # noqa: E731
    aux = (jnp.asarray(A), jnp.asarray(Q), jnp.asarray(C3))
    u = rng.normal(size=d)
    a = np.logspace(-6, 1, 29)
    resid, lin = fisher.linearization_residuals(fn, jnp.zeros(d), jnp.asarray(u), a, aux)
    q_u = np.einsum("vij,i,j->v", Q, u, u)
    # a <= 10^-4.25: the cubic term changes r by a fraction ~a ||c(u)|| / ||q(u)|| < 1e-3
    np.testing.assert_allclose(resid[:8], a[:8] ** 2 * np.linalg.norm(q_u), rtol=1e-3)
    np.testing.assert_allclose(lin, a * np.linalg.norm(A @ u), rtol=1e-12)
    # fit over a in [1e-6, 1e-3]: the cubic term bends log r by at most ~a ||c(u)|| / ||q(u)|| ~ 1e-2 at the top
    fit = fisher.fit_loglog_slope(a, resid, floor=1e-13, a_max=1e-3)
    assert abs(fit.slope - 2) < 5e-3 and fit.used.sum() >= 10
    np.testing.assert_allclose(np.exp(fit.intercept), np.linalg.norm(q_u), rtol=1e-2)
    # at large a the cubic term takes over: the slope of the last points approaches 3
    big = fisher.fit_loglog_slope(a, resid, a_max=np.inf, floor=resid[-5] * 0.999)
    assert 2.5 < big.slope < 3.1
    # along a direction with q(u) = 0 (no quadratic term) the residual is cubic
    fn3 = lambda x, aux: aux[0] @ x + jnp.einsum("vijk,i,j,k->v", aux[2], x, x, x)  # noqa: E731
    r3, _ = fisher.linearization_residuals(fn3, jnp.zeros(d), jnp.asarray(u), a, aux)
    assert abs(fisher.fit_loglog_slope(a, r3, floor=1e-12, a_max=1e-1).slope - 3) < 1e-3
    # a purely linear map leaves only rounding noise: nothing to fit above a sensible floor
    r1, _ = fisher.linearization_residuals(lambda x, aux: aux[0] @ x, jnp.zeros(d), jnp.asarray(u), a, aux)
    assert r1.max() < 1e-12
    with pytest.raises(sj.InputError, match="points above the floor"):
        fisher.fit_loglog_slope(a, r1, floor=1e-12)


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
    with pytest.raises(sj.InputError, match="v0"):
        fisher.minimise(lambda v, d, a: jnp.sum(v**2), np.ones(3))
    with pytest.raises(sj.InputError, match="steps"):
        fisher.minimise(lambda v, d, a: jnp.sum(v**2), np.ones((2, 3)), steps=0)
    with pytest.raises(sj.InputError, match="n_tokens"):
        fisher.sample_counts(np.ones((1, 3)) / 3, 0, 5, np.random.default_rng(0))
    with pytest.raises(sj.InputError, match="counts"):
        fisher.categorical_mle(fisher.linear_logits, np.ones((2, 1, 3)), np.ones((3, 4)), None)
    with pytest.raises(sj.InputError, match="a_values"):
        fisher.fit_loglog_slope([0.0, 1.0, 2.0], [1.0, 2.0, 3.0])


# ----------------------------------------------------------------------------- transformer adapters


def test_model_adapters_match_the_model(smollm2):
    """model_logits_fn = steered forward (last token); factors_at(0) = JacobianOperator.factors();
    factors_at(v) has ||C x|| = ||J(v) x|| with J(v) the JVP of the steered map at v. Layer 27 (3 tail
    blocks) keeps it fast; float32 model, so tolerances are float32-level (1e-4 relative)."""
    from steerjax import studies

    lm, layer = smollm2, 27
    batch = lm.tokenize(["Water boils at", "The three primary colours are"])
    rng = np.random.default_rng(0)
    v = rng.normal(size=lm.d) * 3.0
    op = sj.jacobian_operator(lm, batch, layer, observable="logprobs")
    fn = fisher.model_logits_fn(lm.config, "logits")
    logits = np.asarray(fn(jnp.asarray(v, jnp.float32), fisher.model_aux(op)))
    np.testing.assert_allclose(logits, studies.steered_last_logits(lm, batch, layer, v), atol=2e-4)
    aux = fisher.model_aux(op)
    c0 = fisher.factors_at(lm, aux, np.zeros(lm.d), "logprobs")
    ref = op.factors()
    assert c0.shape == ref.shape == (2, lm.d + 1, lm.d)
    np.testing.assert_allclose(c0, ref, atol=1e-6 * np.abs(ref).max())
    cv = fisher.factors_at(lm, aux, v, "logprobs")
    # a prompt slice of aux is that prompt
    np.testing.assert_allclose(np.asarray(fn(jnp.asarray(v, jnp.float32), fisher.model_aux(op, slice(1, 2))))[0],
                               logits[1], atol=2e-4)
    lp = fisher.model_logits_fn(lm.config, "logprobs")
    for x in rng.normal(size=(2, lm.d)):
        jx = jax.jvp(lambda y: lp(y, fisher.model_aux(op)), (jnp.asarray(v, jnp.float32),),
                     (jnp.asarray(x, jnp.float32),))[1]
        np.testing.assert_allclose(np.linalg.norm(cv @ x, axis=1), np.linalg.norm(np.asarray(jx, np.float64), axis=1),
                                   rtol=1e-4)
    # the Jacobian did move: J(v) differs from J(0)
    assert np.abs(cv - c0).max() > 1e-3 * np.abs(c0).max()
