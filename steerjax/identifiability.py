"""Identifiability on prompts never used to find the directions: disjoint train / held-out splits, the
tau-invisible subspace of N stacked training prompts, and its held-out KL next to random and visible directions.

All in NumPy float64 over exact fisher factors C_i (d x d, `JacobianOperator(observable="fisher").factors()`):
a steer of norm s along the unit direction u moves prompt i's next-token distribution by
0.5 s^2 ||C_i u||^2 nats to second order. For a prompt set, G = mean_i C_i^T C_i (d x d) and the mean KL of u
is 0.5 s^2 u^T G u. The model side (`prompt_factors`, `HeldoutTail`, `exact_mean_kl`) computes those factors and
the exact KLs they predict, from the one-token tail. Bad input raises `steerjax.errors.InputError`.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import jax.numpy as jnp
import numpy as np

from steerjax import spectrum, stats, tail
from steerjax.checks import check_int, check_positive_number, finite_array
from steerjax.errors import InputError
from steerjax.jacobian import jacobian_operator
from steerjax.model import TokenBatch

FACTOR_BATCH = 16          # prompts per Jacobian operator (memory: 16 x d tangents through the tail at once)


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
    if S.shape[0] > d:
        S = np.linalg.qr(S, mode="r")               # same right singular pairs; never an (n d) x (n d) U
    _, s, vt = np.linalg.svd(S, full_matrices=True)
    sigma = np.zeros(d)
    sigma[: s.size] = s
    kl = 0.5 * steer_norm**2 * sigma**2 / n_prompts
    keep = kl <= tau
    return vt[keep].T, kl[keep]


def invisible_basis_from_gram(gram, steer_norm: float, tau: float) -> tuple[np.ndarray, np.ndarray]:
    """As `invisible_basis`, from a mean Gram G (d, d) (mean over prompts, or over prompts and positions) instead
    of a stacked factor: the eigenvectors (d, k) of G with 0.5 s^2 lambda <= tau, and those KLs (k,). For many
    stacked blocks (an SVD of the stack would be large); its rounding is ~1e-16 of the largest KL, far below any
    tau used here."""
    gram = finite_array(gram, "gram", (2,))
    check_positive_number(steer_norm, "steer_norm")
    check_positive_number(tau, "tau")
    lam, vec = np.linalg.eigh(0.5 * (gram + gram.T))
    kl = 0.5 * steer_norm**2 * np.maximum(lam, 0.0)
    keep = kl <= tau
    return vec[:, keep], kl[keep]


def subspace_angles_deg(a, b) -> np.ndarray:
    """Principal angles (min(k_a, k_b),) in degrees, ascending, between span(a (d, k_a)) and span(b (d, k_b))
    (orthonormal bases; `spectrum.principal_angles`); empty if either is empty."""
    return np.degrees(spectrum.principal_angles(a, b))


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


class Radius(NamedTuple):
    """Where exact / second-order first leaves [1 - tolerance, 1 + tolerance] along a sweep of steer sizes.
    value: the crossing (log-linear interpolation between the bracketing sweep points), the first sweep point if
    it is already outside ("below_sweep": the radius is at most that), or None ("beyond_sweep": inside at every
    point, so the radius exceeds the largest)."""

    value: float | None
    status: str          # "crossed" | "below_sweep" | "beyond_sweep"


def first_order_radius(sizes: Sequence[float], ratios: Sequence[float], tolerance: float = 0.1) -> Radius:
    """The smallest steer size at which |exact KL / second-order KL - 1| reaches `tolerance`, for ratios measured
    at increasing `sizes` (> 0)."""
    x = finite_array(sizes, "sizes", (1,))
    r = finite_array(ratios, "ratios", (1,))
    check_positive_number(tolerance, "tolerance")
    if x.shape != r.shape or x.size == 0 or np.any(x <= 0) or np.any(np.diff(x) <= 0):
        raise InputError(f"sizes must be positive and increasing, one per ratio; got {x.size} sizes, {r.size} ratios")
    err = np.abs(r - 1.0)
    out = np.flatnonzero(err >= tolerance)
    if out.size == 0:
        return Radius(None, "beyond_sweep")
    k = int(out[0])
    if k == 0:
        return Radius(float(x[0]), "below_sweep")
    t = (tolerance - err[k - 1]) / (err[k] - err[k - 1])
    return Radius(float(np.exp(np.log(x[k - 1]) + t * (np.log(x[k]) - np.log(x[k - 1])))), "crossed")


def first_below(ns: Sequence[int], ratios: Sequence[float | None], level: float = 0.5) -> int | None:
    """The first N whose ratio is below `level` (None if none is; None ratios are skipped)."""
    for n, r in zip(ns, ratios):
        if r is not None and r < level:
            return int(n)
    return None


# ----------------------------------------------------------------------------- the model side

def rows_of(batch: TokenBatch, indices) -> TokenBatch:
    """A pool batch's rows `indices` (every slice keeps the pool's width, so shapes and compilations repeat)."""
    return TokenBatch(np.asarray(batch.ids)[indices], np.asarray(batch.attention_mask)[indices])


def factor_chunks(indices: list[int]) -> list[list[int]]:
    """FACTOR_BATCH-sized chunks, the last one padded with its final index (one compiled shape for all)."""
    out = [indices[i:i + FACTOR_BATCH] for i in range(0, len(indices), FACTOR_BATCH)]
    if out and len(out[-1]) < FACTOR_BATCH and len(indices) > FACTOR_BATCH:
        out[-1] = out[-1] + [out[-1][-1]] * (FACTOR_BATCH - len(out[-1]))
    return out


def prompt_factors(lm, pool_batch: TokenBatch, indices: list[int], layer: int, with_factors: set[int] | None = None,
                   output_factors: dict | None = None, at=None) -> tuple[dict, dict]:
    """h_l norms {i: ||h_l||} at the last token (unsteered) for every pool prompt in `indices`, and exact fisher
    factors {i: C_i (d, d)} at the point h_l + at (`at` (d,) or None) for those in `with_factors` (default all).
    output_factors (a dict, unsteered points only) caches M_i, the output side of the fisher factor, a function of
    the prompt's next-token distribution only, across layers."""
    with_factors = set(indices) if with_factors is None else set(with_factors)
    if at is not None:
        output_factors = None                      # M_i depends on the point
    norms, factors = {}, {}
    for chunk in factor_chunks(list(indices)):
        op = jacobian_operator(lm, rows_of(pool_batch, chunk), layer, observable="fisher", at=at)
        for i, h in zip(chunk, np.linalg.norm(op.steered_states(), axis=1)):
            norms[i] = float(h)
        if not set(chunk) & with_factors:
            continue
        if output_factors is None:
            c = op.factors()
        else:
            if any(i not in output_factors for i in chunk):
                for i, m in zip(chunk, op.observable_factors()):
                    output_factors.setdefault(i, m)
            c = op.factors(observable_factors=np.stack([output_factors[i] for i in chunk]))
        factors.update({i: c[j] for j, i in enumerate(chunk) if i in with_factors})
    return norms, factors


class HeldoutTail(NamedTuple):
    """Prompts' unsteered log-probabilities (M, V) float64 and the one-token tail's arguments."""

    base: np.ndarray
    aux: tuple


def heldout_tail(lm, batch: TokenBatch, layer: int) -> HeldoutTail:
    op = jacobian_operator(lm, batch, layer, observable="fisher")
    return HeldoutTail(np.asarray(op.value(), np.float64), op.tail_args())


def exact_kls(lm, heldout: HeldoutTail, directions, steer_norm: float) -> np.ndarray:
    """Exact KL(p_j || p_j(s u)) (n_directions, M) of steers s u (directions (n, d)) at the last prompt token of
    each prompt j, from the one-token tail."""
    fn = tail.steered_observable(lm.config, "logits")
    steered = lambda u: np.asarray(fn(jnp.asarray(steer_norm * u, lm.dtype), heldout.aux), np.float64)
    return np.stack([stats.kl_divergence(heldout.base, steered(u)) for u in np.atleast_2d(directions)])


def exact_mean_kl(lm, heldout: HeldoutTail, directions, steer_norm: float) -> np.ndarray:
    """`exact_kls` averaged over the prompts (n_directions,)."""
    return exact_kls(lm, heldout, directions, steer_norm).mean(axis=1)
