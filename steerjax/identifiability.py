"""Identifiability on prompts never used to find the directions: disjoint train / held-out splits, the
tau-invisible subspace of N stacked training prompts, and its held-out KL next to random and visible directions.

All in NumPy float64 over exact fisher factors C_i (d x d, `JacobianOperator(observable="fisher").factors()`):
a steer of norm s along the unit direction u moves prompt i's next-token distribution by
0.5 s^2 ||C_i u||^2 nats to second order. For a prompt set, G = mean_i C_i^T C_i (d x d) and the mean KL of u
is 0.5 s^2 u^T G u. Bad input raises `steerjax.errors.InputError`.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np

from steerjax.checks import check_int, check_positive_number, finite_array
from steerjax.errors import InputError


class Split(NamedTuple):
    """Indices into a prompt pool: train (n_train,) and held-out (n_heldout,), disjoint."""

    train: np.ndarray
    heldout: np.ndarray


def disjoint_splits(pool_size: int, n_train: int, n_heldout: int, n_splits: int, seed: int) -> list[Split]:
    """n_splits random splits of range(pool_size) into disjoint train / held-out index sets (split k from
    numpy.random.default_rng([seed, k]))."""
    check_int(n_train, "n_train", low=1)
    check_int(n_heldout, "n_heldout", low=1)
    check_int(n_splits, "n_splits", low=1)
    if n_train + n_heldout > pool_size:
        raise InputError(f"n_train + n_heldout = {n_train + n_heldout} exceeds the pool of {pool_size} prompts")
    splits = []
    for k in range(n_splits):
        order = np.random.default_rng([seed, k]).permutation(pool_size)
        splits.append(Split(order[:n_train], order[n_train:n_train + n_heldout]))
    return splits


def mean_gram(factors) -> np.ndarray:
    """G = mean_i C_i^T C_i (d, d) for factors (n, r, d)."""
    factors = finite_array(factors, "factors", (3,))
    return np.einsum("nrd,nre->de", factors, factors, optimize=True) / factors.shape[0]


def invisible_basis(stacked_factor, n_prompts: int, steer_norm: float, tau: float) -> tuple[np.ndarray, np.ndarray]:
    """The tau-invisible subspace of n stacked prompts: right singular vectors u_k (basis (d, k)) of the stacked
    factor S (S^T S = sum_i C_i^T C_i) whose mean second-order KL 0.5 s^2 sigma_k^2 / n is <= tau, and those
    KLs (k,). By Courant-Fischer it is the largest subspace on which every unit steer stays within tau."""
    S = finite_array(stacked_factor, "stacked_factor", (2,))
    check_positive_number(steer_norm, "steer_norm")
    check_positive_number(tau, "tau")
    d = S.shape[1]
    _, s, vt = np.linalg.svd(S, full_matrices=True)
    sigma = np.zeros(d)
    sigma[: s.size] = s
    kl = 0.5 * steer_norm**2 * sigma**2 / n_prompts
    keep = kl <= tau
    return vt[keep].T, kl[keep]


def mean_kl_per_direction(basis, gram, steer_norm: float) -> float | None:
    """Mean over an orthonormal basis (d, k) of 0.5 s^2 u^T G u: the expected KL of a random unit direction of
    the subspace (None for k = 0)."""
    basis = np.asarray(basis, np.float64)
    if basis.shape[1] == 0:
        return None
    return float(0.5 * steer_norm**2 * np.trace(basis.T @ gram @ basis) / basis.shape[1])


def random_direction_kl(gram, steer_norm: float) -> float:
    """Expected 0.5 s^2 u^T G u of a uniformly random unit direction u in R^d: 0.5 s^2 tr(G) / d (exact)."""
    gram = np.asarray(gram, np.float64)
    return float(0.5 * steer_norm**2 * np.trace(gram) / gram.shape[0])


def most_visible_orthogonal(stacked_factor, v) -> np.ndarray:
    """The unit direction orthogonal to v with the largest stacked quadratic form u^T S^T S u (d,): the top right
    singular vector of S P, P = I - v v^T / ||v||^2."""
    S = finite_array(stacked_factor, "stacked_factor", (2,))
    v_hat = finite_array(v, "v", (1,))
    v_hat = v_hat / np.linalg.norm(v_hat)
    projected = S - np.outer(S @ v_hat, v_hat)
    u = np.linalg.svd(projected, full_matrices=False)[2][0]
    u = u - (u @ v_hat) * v_hat
    return u / np.linalg.norm(u)


def unit_combinations(basis, count: int, rng: np.random.Generator) -> np.ndarray:
    """count random unit vectors (count, d) of span(basis (d, k)) (Gaussian coefficients, normalised)."""
    basis = np.asarray(basis, np.float64)
    coeffs = rng.standard_normal((count, basis.shape[1]))
    x = coeffs @ basis.T
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def first_below(ns: Sequence[int], ratios: Sequence[float | None], level: float = 0.5) -> int | None:
    """The first N whose ratio is below `level` (None if none is; None ratios are skipped)."""
    for n, r in zip(ns, ratios):
        if r is not None and r < level:
            return int(n)
    return None
