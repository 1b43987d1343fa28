"""Fisher information and Cramér-Rao bounds of a steering vector (paper Appendix E.2), NumPy float64.

Two observation models of a steering vector v (d,) seen through a Jacobian J (V, d):
    Gaussian     o = J v + eta, eta ~ N(0, sigma^2 I_V)            Fisher  J^T J / sigma^2
    categorical  one token t ~ softmax(z + J v) (logits z + J v)    Fisher  J^T (diag p - p p^T) J
Several prompts are independent observations: their Fisher matrices add (J (B, V, d), p (B, V)).
The Cramér-Rao bound is the pseudo-inverse of the Fisher matrix on its row space. Along its null space
the bound is infinite: the data carry no information there, and an estimate's null-space component is
whatever the prior, the regulariser or the optimiser's starting point put there.

Ranks use an explicit relative tolerance `eps` in singular-value units, as `steerjax.spectrum`: an
eigenvalue lambda_k of a Fisher matrix is row space iff sqrt(lambda_k) > eps * sqrt(lambda_max) (for the
Gaussian model: the singular values of J / sigma).

Everything here is NumPy float64: Fisher matrices, their row / null split, the bound, the closed-form
Gaussian estimators (truncated least squares, MAP) and the check of an estimator's covariance against the
bound. Iterative fits (optax) live in `steerjax.fits`; the exact Jacobians come from
`steerjax.jacobian.JacobianOperator` (`factors()` at any point `at`). Bad input raises
`steerjax.errors.InputError`.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from steerjax.checks import check_fraction, check_positive_number, finite_array
from steerjax.errors import InputError

# ----------------------------------------------------------------------------- validation

_array = finite_array
_positive = check_positive_number


def _eps(eps) -> float:
    return check_fraction(eps, "eps (a relative singular-value tolerance)")


def _jacobians(J) -> np.ndarray:
    """J (V, d) or (B, V, d) -> (B, V, d)."""
    J = _array(J, "J", (2, 3))
    return J[None] if J.ndim == 2 else J


# ----------------------------------------------------------------------------- Fisher matrices and bounds


def gaussian_fisher(J, sigma: float) -> np.ndarray:
    """Fisher information (d, d) of o = J v + N(0, sigma^2 I): J^T J / sigma^2, summed over prompts for
    J (B, V, d)."""
    J, sigma = _jacobians(J), _positive(sigma, "sigma")
    return np.einsum("bvd,bve->de", J, J) / sigma**2


def categorical_fisher(J, p) -> np.ndarray:
    """Fisher information (d, d) of one token drawn from softmax(z + J v) at v, with p = softmax(z + J v):
    J^T (diag p - p p^T) J. J (V, d) with p (V,), or J (B, V, d) with p (B, V) (summed over prompts).
    p must be a probability vector per prompt (restrict to a token subset by renormalising first)."""
    J = _jacobians(J)
    p = _array(p, "p", (1, 2))
    p = p[None] if p.ndim == 1 else p
    if p.shape != J.shape[:2]:
        raise InputError(f"p must have shape {J.shape[:2]} to match J {J.shape}, got {p.shape}")
    if np.any(p < 0) or np.max(np.abs(p.sum(axis=1) - 1)) > 1e-6:
        raise InputError("p must be non-negative and sum to 1 per prompt (renormalise a token subset first)")
    out = np.zeros((J.shape[2], J.shape[2]))
    for Jb, pb in zip(J, p):
        jp = Jb.T @ pb                                        # J^T p
        out += (Jb * pb[:, None]).T @ Jb - np.outer(jp, jp)
    return out


class SpectralSplit(NamedTuple):
    """Eigen-split of a Fisher matrix at tolerance eps. eigenvalues (d,) descending; row (d, r) and
    null (d, d - r) orthonormal eigenvector columns; rank r = #{sqrt(lambda) > eps sqrt(lambda_max)}."""

    eigenvalues: np.ndarray
    row: np.ndarray
    null: np.ndarray
    eps: float

    @property
    def rank(self) -> int:
        return self.row.shape[1]


def spectral_split(fisher, eps: float) -> SpectralSplit:
    """Row / null space of a symmetric PSD matrix (d, d) by `numpy.linalg.eigh`. Eigenvalues below
    eps^2 * lambda_max (eps in singular-value units) and all non-positive ones count as null."""
    return spectral_splits(fisher, [eps])[0]


def spectral_splits(fisher, eps_values) -> list[SpectralSplit]:
    """`spectral_split` for several tolerances from one eigendecomposition."""
    fisher = _array(fisher, "fisher", (2,))
    eps_values = [_eps(e) for e in eps_values]
    if fisher.shape[0] != fisher.shape[1]:
        raise InputError(f"fisher must be square, got shape {fisher.shape}")
    lam, vec = np.linalg.eigh(0.5 * (fisher + fisher.T))
    lam, vec = lam[::-1], vec[:, ::-1]
    out = []
    for eps in eps_values:
        keep = lam > max(eps**2 * lam[0], 0.0)
        out.append(SpectralSplit(lam, vec[:, keep], vec[:, ~keep], eps))
    return out


def factor_splits(factor, eps_values) -> list[SpectralSplit]:
    """`spectral_splits` of F = A^T A from a square-root factor A (m, d) by SVD, never forming F: small
    eigenvalues (and the boundary between row and null space) keep their accuracy instead of drowning in
    the rounding of F (eigenvalues lambda = s^2; m < d pads with exact zeros)."""
    A = _array(factor, "factor", (2,))
    eps_values = [_eps(e) for e in eps_values]
    d = A.shape[1]
    _, s, vt = np.linalg.svd(A, full_matrices=A.shape[0] < d)
    lam = np.zeros(d)
    lam[: s.size] = s**2
    out = []
    for eps in eps_values:
        keep = lam > max(eps**2 * lam[0], 0.0)
        out.append(SpectralSplit(lam, vt[keep].T, vt[~keep].T, eps))
    return out


def categorical_fisher_factor(J, p) -> np.ndarray:
    """A (B * V, d) with A^T A = `categorical_fisher(J, p)`: rows diag(sqrt p) (I - 1 p^T) J per prompt."""
    J = _jacobians(J)
    p = _array(p, "p", (1, 2))
    p = p[None] if p.ndim == 1 else p
    if p.shape != J.shape[:2]:
        raise InputError(f"p must have shape {J.shape[:2]} to match J {J.shape}, got {p.shape}")
    centred = J - np.einsum("bv,bvd->bd", p, J)[:, None, :]
    return (np.sqrt(np.maximum(p, 0.0))[..., None] * centred).reshape(-1, J.shape[2])


def psd_sqrt(matrix) -> np.ndarray:
    """Symmetric square root (d, d) of a symmetric PSD matrix (negative rounding eigenvalues clipped to 0)."""
    m = _array(matrix, "matrix", (2,))
    lam, vec = np.linalg.eigh(0.5 * (m + m.T))
    return (vec * np.sqrt(np.maximum(lam, 0.0))) @ vec.T


def cramer_rao_bound(fisher, eps: float | None = None) -> np.ndarray:
    """Pseudo-inverse (d, d) of a Fisher matrix on its eps-row space: sum_k u_k u_k^T / lambda_k over
    sqrt(lambda_k) > eps sqrt(lambda_max). Any unbiased estimator of the row-space component has at
    least this covariance there; null-space directions have no finite bound (left out, i.e. 0 here).
    `fisher` may be a `SpectralSplit` (then eps is taken from it)."""
    split = fisher if isinstance(fisher, SpectralSplit) else spectral_split(fisher, eps)
    lam = split.eigenvalues[: split.rank]
    return (split.row / lam) @ split.row.T


def project(x, basis) -> np.ndarray:
    """Component of x (..., d) in span(basis) for orthonormal basis columns (d, k)."""
    basis = np.asarray(basis, np.float64)
    return (np.asarray(x, np.float64) @ basis) @ basis.T


# ----------------------------------------------------------------------------- Gaussian-model estimators


def _observations(obs, V: int) -> tuple[np.ndarray, bool]:
    obs = _array(obs, "obs", (1, 2))
    if obs.shape[-1] != V:
        raise InputError(f"observations must have last axis {V} (rows of J), got shape {obs.shape}")
    return np.atleast_2d(obs), obs.ndim == 1


def _svd(J, svd):
    return np.linalg.svd(J, full_matrices=False) if svd is None else svd


def least_squares(J, obs, eps: float, svd=None) -> np.ndarray:
    """Minimum-norm least-squares estimates argmin ||J v - o|| with J's singular values at or below
    eps * sigma_max dropped (truncated SVD pseudo-inverse). J (V, d), obs (V,) or (n, V) -> (d,) or (n, d).
    Exactly zero outside the eps-row space: the min-norm choice for the unidentified part.
    svd: optional precomputed `numpy.linalg.svd(J, full_matrices=False)`."""
    J, eps = _array(J, "J", (2,)), _eps(eps)
    obs, single = _observations(obs, J.shape[0])
    u, s, vt = _svd(J, svd)
    k = s > eps * s[0] if s[0] > 0 else np.zeros_like(s, bool)
    est = ((obs @ u[:, k]) / s[k]) @ vt[k]
    return est[0] if single else est


def map_estimate(J, obs, sigma: float, prior_mean, prior_sd: float, svd=None) -> np.ndarray:
    """Posterior mean (ridge estimate) for o = J v + N(0, sigma^2 I) with prior v ~ N(m, tau^2 I):
    m + (J^T J + sigma^2 / tau^2 I)^{-1} J^T (o - J m). J (V, d); obs (V,) or (n, V); prior_mean (d,) or
    (n, d) -> (d,) or (n, d). Along ker(J) the data do not enter: the estimate's component there is m's
    (singular values at float64 rounding level, below max(V, d) * 2.2e-16 * sigma_max, count as exact zeros).
    svd: optional precomputed `numpy.linalg.svd(J, full_matrices=False)`."""
    J = _array(J, "J", (2,))
    sigma, tau = _positive(sigma, "sigma"), _positive(prior_sd, "prior_sd")
    obs, single = _observations(obs, J.shape[0])
    m = _array(prior_mean, "prior_mean", (1, 2))
    if m.shape[-1] != J.shape[1]:
        raise InputError(f"prior_mean must have last axis d = {J.shape[1]}, got shape {m.shape}")
    u, s, vt = _svd(J, svd)
    k = s > s[0] * max(J.shape) * np.finfo(np.float64).eps          # rounding-level singular values are 0
    resid = obs - m @ J.T
    est = m + ((resid @ u[:, k]) * (s[k] / (s[k] ** 2 + sigma**2 / tau**2))) @ vt[k]
    return est[0] if single and m.ndim == 1 else est


# ----------------------------------------------------------------------------- covariance vs bound


def covariance_check(samples, bound, basis, truth=None) -> dict:
    """Empirical covariance of estimates (n, d) against a bound (d, d) on span(basis) (d, r).

    With S = cov(samples @ basis) (ddof 1) and B = basis^T bound basis (r, r), W = B^{-1/2} S B^{-1/2}:
      variance_ratio_*     u^T S u / u^T B u along B's eigenvectors u (1 for an efficient estimator)
      whitened_rel_error   ||W - I||_F / sqrt(r)
      frobenius_rel_error  ||S - B||_F / ||B||_F
      min_whitened_eig     smallest eigenvalue of W (the Cramér-Rao bound says Cov >= B: >= 1 up to sampling)
      bound_variances, variance_ratios   (r,) arrays: B's eigenvalues and the ratios along its eigenvectors
    and, for Gaussian estimates whose covariance IS B, the RMS of each error from sampling alone (Wishart):
      expected_whitened_rel_error = sqrt((r + 1) / (n - 1)), expected_frobenius_rel_error =
      sqrt(||B||_F^2 + tr(B)^2) / (sqrt(n - 1) ||B||_F), variance_ratio_sd = sqrt(2 / (n - 1)) per direction.
    With `truth` (d,): bias_whitened = sqrt(n / r) ||B^{-1/2} basis^T (mean - truth)|| (about 1 if unbiased)."""
    x = _array(samples, "samples", (2,))
    n, d = x.shape
    if n < 3:
        raise InputError(f"need at least 3 samples for a covariance, got {n}")
    bound, basis = _array(bound, "bound", (2,)), np.asarray(basis, np.float64)
    if bound.shape != (d, d) or basis.ndim != 2 or basis.shape[0] != d or basis.shape[1] == 0:
        raise InputError(f"bound must be ({d}, {d}) and basis ({d}, r >= 1), got {bound.shape} and {basis.shape}")
    r = basis.shape[1]
    coords = x @ basis
    S = np.cov(coords, rowvar=False, ddof=1).reshape(r, r)
    B = basis.T @ bound @ basis
    w, Q = np.linalg.eigh(0.5 * (B + B.T))
    if not w.min() > 0:
        raise InputError("the bound is not positive definite on span(basis); use its row space")
    ratios = np.einsum("ik,ij,jk->k", Q, S, Q) / w
    half = (Q / np.sqrt(w)) @ Q.T
    W = half @ S @ half
    out = {
        "n": int(n), "dim": int(r),
        "variance_ratio_mean": float(ratios.mean()), "variance_ratio_median": float(np.median(ratios)),
        "variance_ratio_min": float(ratios.min()), "variance_ratio_max": float(ratios.max()),
        "variance_ratio_sd": float(np.sqrt(2 / (n - 1))),
        "whitened_rel_error": float(np.linalg.norm(W - np.eye(r)) / np.sqrt(r)),
        "expected_whitened_rel_error": float(np.sqrt((r + 1) / (n - 1))),
        "frobenius_rel_error": float(np.linalg.norm(S - B) / np.linalg.norm(B)),
        "expected_frobenius_rel_error": float(np.sqrt(np.sum(B**2) + np.trace(B) ** 2)
                                              / (np.sqrt(n - 1) * np.linalg.norm(B))),
        "min_whitened_eig": float(np.linalg.eigvalsh(0.5 * (W + W.T)).min()),
        "bound_variances": w, "variance_ratios": ratios,
    }
    if truth is not None:
        t = _array(truth, "truth", (1,))
        out["bias_whitened"] = float(np.sqrt(n / r) * np.linalg.norm(half @ (coords.mean(axis=0) - t @ basis)))
    return out


def subspace_errors(estimates, truth, split: SpectralSplit) -> dict:
    """Per-estimate errors (R,) relative to ||truth||: ||P_row (v_hat - v*)|| and ||P_null (v_hat - v*)||."""
    est = np.atleast_2d(_array(estimates, "estimates", (1, 2)))
    truth = _array(truth, "truth", (1,))
    err, scale = est - truth, np.linalg.norm(truth)
    return {"row": np.linalg.norm(err @ split.row, axis=1) / scale,
            "null": np.linalg.norm(err @ split.null, axis=1) / scale}
