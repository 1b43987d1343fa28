"""Test helpers shared by several test files: dense operators and matrices with known spectra, the float64
references the Krylov solvers are checked against."""

from __future__ import annotations

import numpy as np


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
