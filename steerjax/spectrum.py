"""Spectral summaries of Jacobians: effective ranks, null dimensions, stacked-prompt null spaces,
principal angles, and how much of a random direction orthogonal to v lies in the null space.

Singular values are descending float64 arrays; `d` is the input dimension (so a factor with fewer rows
than d contributes exact zeros). "eps-null space" = right singular directions with sigma <= eps*sigma_max.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np

from steerjax import blas

RANK_EPS = (1e-2, 1e-3, 1e-4, 1e-6)
# absolute thresholds of the KL counts (nats of second-order next-token KL of one steer)
KL_TAUS = (1e-2, 1e-3, 1e-4)


def padded_singular_values(s, d: int) -> np.ndarray:
    """s sorted descending and padded with zeros to length d (an n x d matrix with n < d)."""
    s = np.sort(np.asarray(s, np.float64))[::-1][:d]
    return np.concatenate([s, np.zeros(d - s.size)])


def factor_singular_values(factors) -> np.ndarray:
    """Singular values (B, min(r, d)) float64, descending, of exact factors (B, r, d) (e.g.
    `JacobianOperator.factors()`), under the BLAS thread policy of `steerjax.blas`."""
    factors = np.asarray(factors, np.float64)
    with blas.dense_threads(factors.shape[-1]):
        return np.linalg.svd(factors, compute_uv=False)


def numerical_rank(s, eps: float) -> int:
    """#{sigma_i > eps * sigma_max}."""
    s = np.asarray(s, np.float64)
    return int(np.sum(s > eps * s.max())) if s.size and s.max() > 0 else 0


def entropy_rank(s) -> float:
    """Roy & Vetterli effective rank exp(H(p)), p = sigma / sum(sigma)."""
    s = np.asarray(s, np.float64)
    p = s[s > 0] / s.sum()
    return float(np.exp(-np.sum(p * np.log(p))))


def stable_rank(s) -> float:
    """||J||_F^2 / ||J||_2^2."""
    s = np.asarray(s, np.float64)
    return float(np.sum(s**2) / s.max() ** 2)


def participation_ratio(s) -> float:
    """(sum sigma^2)^2 / sum sigma^4: the participation ratio of the eigenvalues of J^T J."""
    lam = np.asarray(s, np.float64) ** 2
    return float(lam.sum() ** 2 / np.sum(lam**2))


def eps_key(eps: float) -> str:
    return f"{eps:.0e}"


def effective_ranks(s, eps_values: Sequence[float] = RANK_EPS) -> dict:
    """All effective ranks side by side (JSON-ready)."""
    return {
        "numerical": {eps_key(e): numerical_rank(s, e) for e in eps_values},
        "entropy": entropy_rank(s),
        "stable": stable_rank(s),
        "participation_ratio": participation_ratio(s),
    }


def null_dims(s, d: int, eps_values: Sequence[float] = RANK_EPS) -> dict:
    """d - numerical rank, per eps."""
    return {eps_key(e): d - numerical_rank(padded_singular_values(s, d), e) for e in eps_values}


def second_order_kl(s, n_prompts: int, steer_norm: float) -> np.ndarray:
    """Second-order KL (nats), mean over prompts, of a steer of norm `steer_norm` along each right singular
    direction: 0.5 steer_norm^2 sigma_k^2 / n for the singular values s (descending) of a stacked fisher factor
    (S^T S = sum_i J_F,i^T J_F,i over n prompts; one prompt: n = 1)."""
    s = np.asarray(s, np.float64)
    return 0.5 * steer_norm**2 * s**2 / n_prompts


def kl_null_dims(s, d: int, n_prompts: int, steer_norm: float, taus: Sequence[float] = KL_TAUS) -> dict:
    """Dimension of the largest subspace of unit directions u whose steer of norm `steer_norm` moves the
    next-token distribution by at most tau nats on average over the n prompts (second order:
    mean_i 0.5 steer_norm^2 ||J_F,i u||^2 <= tau): by Courant-Fischer, #{k : KL_k <= tau} over the d
    directions (s padded with zeros to d). Averaging over prompts, not summing, makes it stacking-invariant:
    a prompt set stacked twice gives the same count."""
    kl = second_order_kl(padded_singular_values(s, d), n_prompts, steer_norm)
    return {eps_key(tau): int(np.sum(kl <= tau)) for tau in taus}


def right_singular(factor) -> tuple[np.ndarray, np.ndarray]:
    """(s (d,) padded, Vt (d, d)) of an (r, d) factor: full right singular basis, rows ordered by s."""
    factor = np.asarray(factor, np.float64)
    _, s, vt = np.linalg.svd(factor, full_matrices=True)
    return padded_singular_values(s, factor.shape[1]), vt


def null_space_basis(factor, eps: float) -> np.ndarray:
    """Orthonormal basis (d, k) of the eps-null space of an (r, d) factor (or of J, same right space)."""
    s, vt = right_singular(factor)
    return vt[s <= eps * s[0]].T


def stack_factors(factors: Iterable[np.ndarray]) -> Iterable[np.ndarray]:
    """Running triangular factors R_n with R_n^T R_n = sum_{i<=n} C_i^T C_i (C_i (r, d)), by QR updates:
    never forms the Gram matrix, so small singular values are not squared away."""
    running = None
    for c in factors:
        c = np.asarray(c, np.float64)
        stacked = c if running is None else np.vstack([running, c])
        running = np.linalg.qr(stacked, mode="r")
        yield running


def stacked_spectra(factors: Sequence[np.ndarray], schedule: Sequence[int]) -> list[tuple[int, np.ndarray, np.ndarray]]:
    """[(n, singular values (d,), running factor R_n)] of the stacked operator for each n in schedule."""
    wanted = set(schedule)
    out = []
    for n, r in enumerate(stack_factors(factors), start=1):
        if n in wanted:
            out.append((n, right_singular(r)[0], r))
    return out


def principal_angles(basis_a, basis_b) -> np.ndarray:
    """Principal angles (radians, ascending) between span(basis_a) and span(basis_b), both (d, k)
    orthonormal; empty if either is empty."""
    a, b = np.asarray(basis_a, np.float64), np.asarray(basis_b, np.float64)
    if a.shape[1] == 0 or b.shape[1] == 0:
        return np.zeros(0)
    cosines = np.linalg.svd(a.T @ b, compute_uv=False)
    return np.arccos(np.clip(cosines, -1.0, 1.0))


def orthogonal_null_fraction(null_basis, v) -> float:
    """Exact E ||P_N r||^2 / ||r||^2 for r uniform on the unit sphere of v's orthogonal complement:
    (k - ||P_N v_hat||^2) / (d - 1), N the null space (basis (d, k))."""
    null_basis = np.asarray(null_basis, np.float64)
    d, k = null_basis.shape
    v_hat = np.asarray(v, np.float64) / np.linalg.norm(v)
    return float((k - np.sum((null_basis.T @ v_hat) ** 2)) / (d - 1))


def sampled_orthogonal_null_fractions(null_basis, v, samples: int, seed: int = 0) -> np.ndarray:
    """Monte Carlo counterpart of `orthogonal_null_fraction`: ||P_N r_perp||^2 / ||r_perp||^2 for Gaussian
    r made orthogonal to v (Gram-Schmidt, as the paper's v_perp)."""
    rng = np.random.default_rng(seed)
    null_basis = np.asarray(null_basis, np.float64)
    v_hat = np.asarray(v, np.float64) / np.linalg.norm(v)
    r = rng.normal(size=(samples, v_hat.size))
    r -= np.outer(r @ v_hat, v_hat)
    return np.sum((r @ null_basis) ** 2, axis=1) / np.sum(r**2, axis=1)
