"""steerjax.linearization: residuals of the first-order expansion and their log-log slope on a map with a
known quadratic term."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

import steerjax as sj
from steerjax import linearization


def test_linearization_residual_slope_of_a_quadratic_map(x64):
    rng = np.random.default_rng(5)
    d, V = 6, 7
    A, Q = rng.normal(size=(V, d)), rng.normal(size=(V, d, d))
    C3 = rng.normal(size=(V, d, d, d))
    # f(x) = A x + q(x) + c(x): the residual of the first-order expansion at 0 is q(a u) + c(a u)
    fn = lambda x, aux: aux[0] @ x + jnp.einsum("vij,i,j->v", aux[1], x, x) + \
        jnp.einsum("vijk,i,j,k->v", aux[2], x, x, x)
    aux = (jnp.asarray(A), jnp.asarray(Q), jnp.asarray(C3))
    u = rng.normal(size=d)
    a = np.logspace(-6, 1, 29)
    resid, lin = linearization.linearization_residuals(fn, jnp.zeros(d), jnp.asarray(u), a, aux)
    q_u = np.einsum("vij,i,j->v", Q, u, u)
    # a <= 10^-4.25: the cubic term changes r by a fraction ~a ||c(u)|| / ||q(u)|| < 1e-3
    np.testing.assert_allclose(resid[:8], a[:8] ** 2 * np.linalg.norm(q_u), rtol=1e-3)
    np.testing.assert_allclose(lin, a * np.linalg.norm(A @ u), rtol=1e-12)
    # fit over a in [1e-6, 1e-3]: the cubic term bends log r by at most ~a ||c(u)|| / ||q(u)|| ~ 1e-2 at the top
    fit = linearization.fit_loglog_slope(a, resid, floor=1e-13, a_max=1e-3)
    assert abs(fit.slope - 2) < 5e-3 and fit.used.sum() >= 10
    np.testing.assert_allclose(np.exp(fit.intercept), np.linalg.norm(q_u), rtol=1e-2)
    # at large a the cubic term takes over: the slope of the last points approaches 3
    big = linearization.fit_loglog_slope(a, resid, a_max=np.inf, floor=resid[-5] * 0.999)
    assert 2.5 < big.slope < 3.1
    # along a direction with q(u) = 0 (no quadratic term) the residual is cubic
    fn3 = lambda x, aux: aux[0] @ x + jnp.einsum("vijk,i,j,k->v", aux[2], x, x, x)
    r3, _ = linearization.linearization_residuals(fn3, jnp.zeros(d), jnp.asarray(u), a, aux)
    assert abs(linearization.fit_loglog_slope(a, r3, floor=1e-12, a_max=1e-1).slope - 3) < 1e-3
    # a purely linear map leaves only rounding noise: nothing to fit above a sensible floor
    r1, _ = linearization.linearization_residuals(lambda x, aux: aux[0] @ x, jnp.zeros(d), jnp.asarray(u), a, aux)
    assert r1.max() < 1e-12
    with pytest.raises(sj.InputError, match="points above the floor"):
        linearization.fit_loglog_slope(a, r1, floor=1e-12)


def test_linearization_bad_input():
    with pytest.raises(sj.InputError, match="a_values"):
        linearization.fit_loglog_slope([0.0, 1.0, 2.0], [1.0, 2.0, 3.0])
