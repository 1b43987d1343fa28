"""Matrix-free Krylov methods, jit-compiled with full reorthogonalisation.

`golub_kahan` bidiagonalises an operator A (n x d) from its products matvec(args, v) = A v and
rmatvec(args, u) = A^T u (module-level functions plus a pytree `args`, so one compilation serves every
operator of the same shapes, e.g. the Jacobians of many prompts);
`top_singular_triplets` returns the top-k singular triplets from the bidiagonal's SVD. `lanczos_eigh`
tridiagonalises a symmetric operator (e.g. the stacked Gram sum_i J_i^T J_i) for its top-k eigenpairs.
Every new Krylov vector is orthogonalised twice against all previous ones ("twice is enough"), so Ritz
values do not duplicate; on breakdown (an invariant subspace, e.g. a rank-deficient A) the next vector
is a fresh random one orthogonalised against the basis, with a zero coupling coefficient.
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class SVDResult(NamedTuple):
    """Top-k singular triplets: s (k,) descending, u (n, k), v (d, k)."""

    s: jax.Array
    u: jax.Array
    v: jax.Array


class EighResult(NamedTuple):
    """Top-k eigenpairs: w (k,) descending, v (d, k)."""

    w: jax.Array
    v: jax.Array


def _orthogonalise(x, basis, count):
    """x minus its projection on the first `count` rows of basis (m, n), twice; returns (x, norm)."""
    live = (jnp.arange(basis.shape[0]) < count).astype(x.dtype)
    for _ in range(2):  # masking the (m,) coefficients, not the (m, n) basis: no copy of the basis per step
        x = x - basis.T @ (live * (basis @ x))
    return x, jnp.linalg.norm(x)


def _normalise_or_restart(x, norm, basis, count, fresh, scale):
    """x / norm, or (breakdown: norm <= tol * scale) a fresh unit vector orthogonal to the basis."""
    tol = 100 * jnp.finfo(x.dtype).eps * scale

    def restart(_):
        unit, unit_norm = _orthogonalise(fresh, basis, count)
        return unit / unit_norm, jnp.zeros_like(norm)

    return jax.lax.cond(norm <= tol, restart, lambda _: (x / norm, norm), None)


@functools.partial(jax.jit, static_argnames=("matvec", "rmatvec", "n", "d", "steps", "dtype", "prepare"))
def golub_kahan(matvec: Callable, rmatvec: Callable, args, n: int, d: int, steps: int, key, dtype=jnp.float32,
                prepare: Callable | None = None):
    """`steps` rounds of Golub-Kahan-Lanczos bidiagonalisation: A V = U B with B upper bidiagonal.
    prepare(args), if given, runs once inside the compiled program before the loop and its result is what
    matvec / rmatvec receive (e.g. a linearised operator, so no step recomputes a primal).
    Returns (alpha (steps,), beta (steps,) superdiagonal, U (steps, n), V (steps, d))."""
    if prepare is not None:
        args = prepare(args)
    k_start, k_u, k_v = jax.random.split(key, 3)
    fresh_u = jax.random.normal(k_u, (steps, n), dtype)
    fresh_v = jax.random.normal(k_v, (steps + 1, d), dtype)
    v0 = jax.random.normal(k_start, (d,), dtype)
    U = jnp.zeros((steps, n), dtype)
    V = jnp.zeros((steps + 1, d), dtype).at[0].set(v0 / jnp.linalg.norm(v0))
    alpha = jnp.zeros(steps, dtype)
    beta = jnp.zeros(steps + 1, dtype)

    def body(j, state):
        U, V, alpha, beta, scale = state
        u = matvec(args, V[j]) - beta[j] * U[jnp.maximum(j - 1, 0)] * (j > 0)
        u, a = _orthogonalise(u, U, j)
        scale = jnp.maximum(scale, a)
        u, a = _normalise_or_restart(u, a, U, j, fresh_u[j], scale)
        w = rmatvec(args, u) - a * V[j]
        w, b = _orthogonalise(w, V, j + 1)
        scale = jnp.maximum(scale, b)
        w, b = _normalise_or_restart(w, b, V, j + 1, fresh_v[j + 1], scale)
        return U.at[j].set(u), V.at[j + 1].set(w), alpha.at[j].set(a), beta.at[j + 1].set(b), scale

    U, V, alpha, beta, _ = jax.lax.fori_loop(0, steps, body, (U, V, alpha, beta, jnp.zeros((), dtype)))
    return alpha, beta[1:steps], U, V[:steps]


def top_singular_triplets(matvec: Callable, rmatvec: Callable, args, n: int, d: int, k: int,
                          steps: int | None = None, seed: int = 0, dtype=jnp.float32,
                          prepare: Callable | None = None) -> SVDResult:
    """Top-k singular triplets of A (n x d) from `steps` >= k Golub-Kahan rounds (default
    min(d, max(2k + 20, 40))); `prepare` as in `golub_kahan`."""
    steps = min(d, n, steps or max(2 * k + 20, 40))
    if not 0 < k <= steps:
        raise ValueError(f"need 0 < k <= steps <= min(n, d); got k={k}, steps={steps}, n={n}, d={d}")
    alpha, beta, U, V = golub_kahan(matvec, rmatvec, args, n, d, steps, jax.random.PRNGKey(seed), dtype, prepare)
    bidiag = jnp.diag(alpha) + jnp.diag(beta, 1)
    p, s, qt = jnp.linalg.svd(bidiag)
    return SVDResult(s[:k], U.T @ p[:, :k], V.T @ qt[:k].T)


@functools.partial(jax.jit, static_argnames=("matvec", "d", "steps", "dtype"))
def lanczos_tridiag(matvec: Callable, args, d: int, steps: int, key, dtype=jnp.float32):
    """`steps` rounds of symmetric Lanczos: Q^T S Q = T. Returns (diag (steps,), offdiag (steps-1,), Q)."""
    k_start, k_fresh = jax.random.split(key)
    fresh = jax.random.normal(k_fresh, (steps, d), dtype)
    q0 = jax.random.normal(k_start, (d,), dtype)
    Q = jnp.zeros((steps, d), dtype).at[0].set(q0 / jnp.linalg.norm(q0))
    diag = jnp.zeros(steps, dtype)
    off = jnp.zeros(steps, dtype)

    def body(j, state):
        Q, diag, off, scale = state
        w = matvec(args, Q[j])
        a = Q[j] @ w
        w, b = _orthogonalise(w, Q, j + 1)
        scale = jnp.maximum(scale, jnp.maximum(jnp.abs(a), b))
        nxt, b = _normalise_or_restart(w, b, Q, j + 1, fresh[j], scale)
        last = j == steps - 1
        Q = jnp.where(last, Q, Q.at[jnp.minimum(j + 1, steps - 1)].set(nxt))
        return Q, diag.at[j].set(a), off.at[j].set(jnp.where(last, 0.0, b)), scale

    Q, diag, off, _ = jax.lax.fori_loop(0, steps, body, (Q, diag, off, jnp.zeros((), dtype)))
    return diag, off[: steps - 1], Q


def lanczos_eigh(matvec: Callable, args, d: int, k: int, steps: int | None = None, seed: int = 0,
                 dtype=jnp.float32) -> EighResult:
    """Top-k eigenpairs of a symmetric operator S (d x d) from its product matvec(args, x) = S x."""
    steps = min(d, steps or max(2 * k + 20, 40))
    if not 0 < k <= steps:
        raise ValueError(f"need 0 < k <= steps <= d; got k={k}, steps={steps}, d={d}")
    diag, off, Q = lanczos_tridiag(matvec, args, d, steps, jax.random.PRNGKey(seed), dtype)
    w, y = jnp.linalg.eigh(jnp.diag(diag) + jnp.diag(off, 1) + jnp.diag(off, -1))
    order = jnp.argsort(-w)[:k]
    return EighResult(w[order], Q.T @ y[:, order])


def dense_matvec(a, v):
    """A v for a dense matrix passed as the operator args."""
    return a @ v


def dense_rmatvec(a, u):
    """A^T u for a dense matrix passed as the operator args."""
    return a.T @ u


def known_spectrum_matrix(singular_values, n: int, seed: int = 0) -> np.ndarray:
    """n x d float64 matrix U diag(s) V^T with Haar-random orthonormal U, V (d = len(s))."""
    rng = np.random.default_rng(seed)
    s = np.asarray(singular_values, np.float64)
    u, _ = np.linalg.qr(rng.normal(size=(n, s.size)))
    v, _ = np.linalg.qr(rng.normal(size=(s.size, s.size)))
    return (u * s) @ v.T
