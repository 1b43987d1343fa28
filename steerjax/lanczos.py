"""Matrix-free Krylov methods, jit-compiled with full reorthogonalisation.

`top_singular_triplets` returns the top-k singular triplets of an operator A (n x d) from its products
matvec(args, v) = A v and rmatvec(args, u) = A^T u (module-level functions plus a pytree `args`, so one
compilation serves every operator of the same shapes, e.g. the Jacobians of many prompts) by block
Golub-Kahan-Lanczos (`block_golub_kahan`): rounds of `block` products at once, stopped when every top-k Ritz
residual ||A^T u - s v|| is below tol * s_1, with a warning when it is not reached. `lanczos_eigh`
tridiagonalises a symmetric operator (e.g. the stacked Gram sum_i J_i^T J_i) for its top-k eigenpairs and
reports the Ritz residual bounds |beta_m y_m|. New Krylov vectors are orthogonalised twice against all
previous ones ("twice is enough"), so Ritz values do not duplicate; on breakdown (an invariant subspace,
e.g. a rank-deficient A) a fresh random vector orthogonalised against the basis takes the place of the
dead one, with a zero coupling coefficient.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from steerjax import xla


class ConvergenceWarning(UserWarning):
    """A Krylov solver stopped before its residuals met the tolerance."""


class SVDResult(NamedTuple):
    """Top-k singular triplets: s (k,) descending, u (n, k), v (d, k); residuals (k,) ||A^T u_i - s_i v_i||
    (None where not computed), converged (all residuals <= tol * s_1), products (A v and A^T u applied)."""

    s: jax.Array
    u: jax.Array
    v: jax.Array
    residuals: Any = None
    converged: bool | None = None
    products: int | None = None


class EighResult(NamedTuple):
    """Top-k eigenpairs: w (k,) descending, v (d, k); residuals (k,) ||S v_i - w_i v_i||, converged."""

    w: jax.Array
    v: jax.Array
    residuals: Any = None
    converged: bool | None = None


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


def default_tolerance(dtype) -> float:
    """Residual tolerance relative to sigma_max: 1e-10 (float64), 1e-5 (float32), 1e-2 (16-bit floats)."""
    return {64: 1e-10, 32: 1e-5}.get(jnp.finfo(dtype).bits, 1e-2)


def _block_orthogonalise(x, basis, count, block: int):
    """Rows of x (b, n) minus their projection on basis[:count] (basis (m, n); count a multiple of `block`),
    twice. Returns (x, coefficients (m, b)) with x_in = x_out + coefficients^T basis. The leading `count`
    rows are sliced statically in one lax.switch branch per multiple of `block`, so the cost grows with
    the basis actually built, not with the buffer."""

    def project_on(size):
        def fn(x):
            sub, total = basis[:size], jnp.zeros((basis.shape[0], x.shape[0]), x.dtype)
            for _ in range(2):  # "twice is enough"
                coeffs = sub @ x.T
                x = x - coeffs.T @ sub
                total = total.at[:size].add(coeffs)
            return x, total
        return fn

    branches = [project_on(i * block) for i in range(basis.shape[0] // block + 1)]
    return jax.lax.switch(count // block, branches, x)


def _orthonormal_block(x, basis, count, block: int, fresh, scale):
    """Orthonormal rows q (b, n) and r (b, b), extra (m, b) with x = r^T q + extra^T basis, for x (b, n)
    already orthogonalised against basis[:count]. Thin QR; where a column is weak (|r_ii| <= sqrt(eps)
    scale) q is re-orthogonalised against the basis and re-factored, and dead columns (|r_ii| <= 100 eps
    scale: x is rank-deficient, e.g. an invariant subspace) are replaced by fresh random directions with a
    zero coefficient."""
    eps = jnp.finfo(x.dtype).eps
    q, r = jnp.linalg.qr(x.T)  # (n, b), (b, b)
    diag = jnp.abs(jnp.diag(r))

    def repair(_):
        dead = diag <= 100 * eps * scale
        r0 = jnp.where(dead[:, None], 0.0, r)
        q0 = jnp.where(dead[None, :], fresh.T, q)
        q1, coeffs = _block_orthogonalise(q0.T, basis, count, block)
        q2, r2 = jnp.linalg.qr(q1.T)
        return q2.T, r2 @ r0, coeffs @ r0

    def keep(_):
        return q.T, r, jnp.zeros((basis.shape[0], x.shape[0]), x.dtype)

    return jax.lax.cond(jnp.any(diag <= jnp.sqrt(eps) * scale), repair, keep, None)


def _ritz(B, W, V, filled, k: int, block: int):
    """Top-k Ritz triplets of the projection A V^T = U^T B restricted to its leading `filled` rows/columns
    (a multiple of `block`): s (k,), P (m, k), Q (m, k) with u = U^T P, v = V^T Q, and the residuals
    ||A^T u_i - s_i v_i|| = ||W^T P_i - s_i V^T Q_i|| from W = U A (m, d). Slots beyond `filled` get s = 0
    and an infinite residual."""
    m = B.shape[0]

    def svd_of(size):
        def fn(_):
            p, s, qt = jnp.linalg.svd(B[:size, :size])
            kk = min(k, size)
            pad = ((0, m - size), (0, k - kk))
            return jnp.pad(s[:kk], (0, k - kk)), jnp.pad(p[:, :kk], pad), jnp.pad(qt[:kk].T, pad)
        return fn

    s, P, Q = jax.lax.switch(filled // block - 1, [svd_of(i * block) for i in range(1, m // block + 1)], None)
    resid = jnp.linalg.norm(W.T @ P - (V[:m].T @ Q) * s, axis=0)
    return s, P, Q, jnp.where(jnp.arange(k) < filled, resid, jnp.inf)


@functools.partial(xla.jit, static_argnames=("matvec", "rmatvec", "n", "d", "k", "block", "max_blocks", "dtype",
                                             "prepare"))
def block_golub_kahan(matvec: Callable, rmatvec: Callable, args, n: int, d: int, k: int, block: int,
                      max_blocks: int, tol, key, dtype=jnp.float32, prepare: Callable | None = None):
    """Block Golub-Kahan-Lanczos with full reorthogonalisation, stopped when the top k converge.

    Each round applies A to a block of `block` orthonormal vectors and A^T to the new left block (both
    vmapped, so each round is matmul-shaped rather than `block` separate matrix-vector sweeps), keeps
    A V^T = U^T B exactly (B dense (m, m), m = block * max_blocks), and checks the top-k Ritz triplets'
    residuals ||A^T u_i - s_i v_i||: it stops once every one is <= tol * s_1 (then A v_i = s_i u_i holds by
    construction and each s_i is within its residual of a singular value of A), or after max_blocks rounds.
    prepare(args), if given, runs once before the loop (e.g. a linearisation). Returns (s (k,), u (n, k),
    v (d, k), residuals (k,), rounds)."""
    if prepare is not None:
        args = prepare(args)
    b, m = block, block * max_blocks
    apply = jax.vmap(lambda x: matvec(args, x))
    apply_t = jax.vmap(lambda y: rmatvec(args, y))
    k_start, k_u, k_v = jax.random.split(key, 3)
    v0, _ = jnp.linalg.qr(jax.random.normal(k_start, (d, b), dtype))
    state = dict(j=jnp.int32(0), U=jnp.zeros((m, n), dtype), V=jnp.zeros((m + b, d), dtype).at[:b].set(v0.T),
                 W=jnp.zeros((m, d), dtype), B=jnp.zeros((m, m), dtype), scale=jnp.zeros((), dtype),
                 s=jnp.zeros(k, dtype), P=jnp.zeros((m, k), dtype), Q=jnp.zeros((m, k), dtype),
                 resid=jnp.full(k, jnp.inf, dtype))

    def unconverged(st):
        return (st["j"] < max_blocks) & ~jnp.all(st["resid"] <= tol * st["s"][0])

    def round_(st):
        j, at = st["j"], st["j"] * b
        v_j = jax.lax.dynamic_slice_in_dim(st["V"], at, b)
        image = apply(v_j)  # (b, n): rows A v
        scale = jnp.maximum(st["scale"], jnp.max(jnp.linalg.norm(image, axis=1)))
        image, coeffs = _block_orthogonalise(image, st["U"], at, b)
        u_j, r, extra = _orthonormal_block(image, st["U"], at, b, jax.random.normal(jax.random.fold_in(k_u, j),
                                                                                      (b, n), dtype), scale)
        U = jax.lax.dynamic_update_slice_in_dim(st["U"], u_j, at, 0)
        B = jax.lax.dynamic_update_slice(st["B"], coeffs + extra, (jnp.zeros_like(at), at))
        B = jax.lax.dynamic_update_slice(B, r, (at, at))
        w_j = apply_t(u_j)  # (b, d): rows A^T u
        W = jax.lax.dynamic_update_slice_in_dim(st["W"], w_j, at, 0)
        nxt, _ = _block_orthogonalise(w_j, st["V"], at + b, b)
        scale = jnp.maximum(scale, jnp.max(jnp.linalg.norm(w_j, axis=1)))
        v_next, _, _ = _orthonormal_block(nxt, st["V"], at + b, b,
                                          jax.random.normal(jax.random.fold_in(k_v, j), (b, d), dtype), scale)
        V = jax.lax.dynamic_update_slice_in_dim(st["V"], v_next, at + b, 0)
        s, P, Q, resid = _ritz(B, W, V, at + b, k, b)
        return dict(j=j + 1, U=U, V=V, W=W, B=B, scale=scale, s=s, P=P, Q=Q, resid=resid)

    st = jax.lax.while_loop(unconverged, round_, state)
    return st["s"], st["U"].T @ st["P"], st["V"][:m].T @ st["Q"], st["resid"], st["j"]


def residuals_converged(resid, scale: float, tol: float, warning: tuple[str, str, str] | bool) -> bool:
    """Whether every residual is <= tol * scale; if not and `warning` = (what, scale name, hint) is given,
    a ConvergenceWarning naming the largest residual relative to scale."""
    converged = bool(np.all(np.asarray(resid) <= tol * scale))
    if warning and not converged:
        what, scale_name, hint = warning
        warnings.warn(f"{what}: largest residual {float(np.max(resid)) / max(scale, 1e-300):.1e} of {scale_name} "
                      f"> tol {tol:.0e}; {hint}", ConvergenceWarning, stacklevel=3)
    return converged


def default_block(k: int) -> int:
    """Block size for top-k: 2k (at least k + 8), so a cluster straddling the k-th value is still resolved
    and few rounds are needed (on SmolLM2's J at k = 32, blocks of 40 / 48 / 64 / 96 / 128 took 2.30 /
    2.30 / 1.71 / 1.86 / 2.42 s to tol 1e-5: fewer rounds beat fewer products until blocks get large)."""
    return max(2 * k, k + 8)


def top_singular_triplets(matvec: Callable, rmatvec: Callable, args, n: int, d: int, k: int,
                          block: int | None = None, max_blocks: int = 12, tol: float | None = None, seed: int = 0,
                          dtype=jnp.float32, prepare: Callable | None = None, warn: bool = True) -> SVDResult:
    """Top-k singular triplets of A (n x d) from its products matvec(args, v) = A v, rmatvec(args, u) = A^T u,
    by `block_golub_kahan` (block size default `default_block(k)`, at most max_blocks rounds, capped so the
    basis fits min(n, d); tol default `default_tolerance(dtype)`, relative to s_1). `prepare` as in
    `block_golub_kahan`. Warns (`ConvergenceWarning`) when the top k did not converge; the result's
    `residuals` and `converged` say how far it got, `products` counts the A v and A^T u applied."""
    size = min(n, d)
    if not 0 < k <= size:
        raise ValueError(f"need 0 < k <= min(n, d); got k={k}, n={n}, d={d}")
    block = min(block or default_block(k), size)
    max_blocks = max(1, min(max_blocks, size // block))
    if block * max_blocks < k:
        raise ValueError(f"block {block} x max_blocks {max_blocks} holds fewer than k={k} vectors")
    tol = default_tolerance(dtype) if tol is None else float(tol)
    s, u, v, resid, rounds = block_golub_kahan(matvec, rmatvec, args, n, d, k, block, max_blocks,
                                               jnp.asarray(tol, dtype), jax.random.PRNGKey(seed), dtype, prepare)
    converged = residuals_converged(resid, float(s[0]), tol, warn and (
        f"top-{k} singular triplets did not converge in {int(rounds)} blocks of {block}",
        "s_1", "raise max_blocks or block, or use the exact route (JacobianOperator.factors)"))
    return SVDResult(s, u, v, resid, converged, 2 * block * int(rounds))


@functools.partial(xla.jit, static_argnames=("matvec", "d", "steps", "dtype"))
def lanczos_tridiag(matvec: Callable, args, d: int, steps: int, key, dtype=jnp.float32):
    """`steps` rounds of symmetric Lanczos: S Q^T = Q^T T + beta_m q_{m+1} e_m^T. Returns (diag (steps,),
    offdiag (steps-1,), beta_m, Q (steps, d))."""
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
        return Q, diag.at[j].set(a), off.at[j].set(b), scale

    Q, diag, off, _ = jax.lax.fori_loop(0, steps, body, (Q, diag, off, jnp.zeros((), dtype)))
    return diag, off[: steps - 1], off[steps - 1], Q


def lanczos_eigh(matvec: Callable, args, d: int, k: int, steps: int | None = None, seed: int = 0,
                 dtype=jnp.float32, tol: float | None = None, warn: bool = True) -> EighResult:
    """Top-k eigenpairs of a symmetric operator S (d x d) from its product matvec(args, x) = S x, with the
    Ritz residuals ||S y_i - w_i y_i|| = |beta_m (last entry of T's eigenvector i)|; warns
    (`ConvergenceWarning`) when one exceeds tol * |w_1| (tol default `default_tolerance(dtype)`)."""
    steps = min(d, steps or max(2 * k + 20, 40))
    if not 0 < k <= steps:
        raise ValueError(f"need 0 < k <= steps <= d; got k={k}, steps={steps}, d={d}")
    diag, off, beta_last, Q = lanczos_tridiag(matvec, args, d, steps, jax.random.PRNGKey(seed), dtype)
    w, y = jnp.linalg.eigh(jnp.diag(diag) + jnp.diag(off, 1) + jnp.diag(off, -1))
    order = jnp.argsort(-w)[:k]
    resid = jnp.abs(beta_last * y[-1, order]) * (steps < d)  # a full basis (steps = d) is exact
    tol = default_tolerance(dtype) if tol is None else float(tol)
    converged = residuals_converged(resid, abs(float(w[order[0]])), tol, warn and (
        f"top-{k} Lanczos eigenpairs did not converge in {steps} steps", "|w_1|", "raise steps"))
    return EighResult(w[order], Q.T @ y[:, order], resid, converged)

