"""Fisher information, Cramér-Rao bounds and estimators of a steering vector (paper Appendix E.2).

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

Linear algebra is NumPy float64. Fits (`minimise`, `categorical_mle`, `recover`) are jax / optax,
jit-compiled and vmapped over restarts; their model functions have the signature
`logits_fn(v (d,), aux) -> (B, K)` so a toy linear model and a transformer tail plug in alike.
Bad input raises `steerjax.errors.InputError`.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import numpy as np

from steerjax.errors import InputError

# ----------------------------------------------------------------------------- validation


def _array(x, name: str, ndims: tuple[int, ...]) -> np.ndarray:
    x = np.asarray(x, np.float64)
    if x.ndim not in ndims or x.size == 0:
        raise InputError(f"{name} must be a non-empty {' or '.join(f'{n}-D' for n in ndims)} array, got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise InputError(f"{name} has NaN/inf entries")
    return x


def _positive(x, name: str) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float, np.integer, np.floating)) or not np.isfinite(x) or x <= 0:
        raise InputError(f"{name} must be a finite number > 0, got {x!r}")
    return float(x)


def _eps(eps) -> float:
    eps = _positive(eps, "eps")
    if eps >= 1:
        raise InputError(f"eps is a relative tolerance in (0, 1), got {eps!r}")
    return eps


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
        "expected_frobenius_rel_error": float(np.sqrt(np.sum(B**2) + np.trace(B) ** 2) / (np.sqrt(n - 1) * np.linalg.norm(B))),
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


# ----------------------------------------------------------------------------- optax fits


class FitResult(NamedTuple):
    """Result of `minimise` for R restarts: v (R, d); loss (R,) and grad_norm (R,) at v; history (R, steps) the
    loss before each step (NaN after an early stop); n_steps (R,) steps taken."""

    v: Any
    loss: Any
    grad_norm: Any
    history: Any
    n_steps: Any


def minimise(loss: Callable, v0, data=None, aux=None, optimizer=None, steps: int = 200, gtol: float = 0.0) -> FitResult:
    """Minimise loss(v (d,), data_r, aux) -> scalar from each start v0[r] (R, d), at most `steps` optax steps
    under `jit(vmap(lax.while_loop))`, stopping a restart once ||grad|| <= gtol * ||grad at v0|| (gtol 0: run
    every step; the loop ends when every restart has stopped). `data` (pytree with leading axis R, or None)
    differs per restart, `aux` is shared (model parameters, targets); both are jit arguments, never baked-in
    constants. The compiled runner is cached per (loss, optimizer, steps): reuse the same loss function
    object to skip recompiling.

    Default optimizer: optax.lbfgs() (zoom line search). L-BFGS, plain or momentum SGD update along
    combinations of past gradients, and every gradient lies in the row space of the model's Jacobians, so
    these never change v's null-space component; Adam's per-coordinate scaling does."""
    import jax.numpy as jnp

    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
        raise InputError(f"steps must be an int >= 1, got {steps!r}")
    if not (isinstance(gtol, (int, float, np.floating)) and 0 <= gtol < 1):
        raise InputError(f"gtol must be a number in [0, 1), got {gtol!r}")
    v0 = jnp.asarray(v0)
    if v0.ndim != 2:
        raise InputError(f"v0 must be (restarts, d), got shape {v0.shape}")
    run = _runner(loss, _default_optimizer() if optimizer is None else optimizer, int(steps), data is not None)
    with x64_matching(v0.dtype):
        return FitResult(*run(v0, data, aux, jnp.asarray(gtol, v0.dtype)))


def x64_matching(dtype):
    """A context tracing a float32 fit with jax_enable_x64 off when a float64 model turned it on earlier in
    the process: optax's backtracking line search transposes the loss's linearisation with the cotangent
    1.0, a float64 under x64, and jax rejects it for a float32 loss (TypeError "cotangent type does not
    match function output")."""
    import contextlib

    import jax

    if jax.config.jax_enable_x64 and np.dtype(dtype) != np.float64:
        return jax.enable_x64(False)
    return contextlib.nullcontext()


@functools.lru_cache(maxsize=1)
def _default_optimizer():
    import optax

    return optax.lbfgs()


@functools.lru_cache(maxsize=64)
def _runner(loss: Callable, optimizer, steps: int, per_start_data: bool):
    import jax
    import jax.numpy as jnp
    import optax

    from steerjax import xla

    opt = optax.with_extra_args_support(optimizer)

    def one(v_start, data_r, aux, gtol):
        f = lambda v: loss(v, data_r, aux)  # noqa: E731
        value_and_grad = jax.value_and_grad(f)
        state = opt.init(v_start)
        # line searches (L-BFGS) store the value and gradient at the accepted point: reuse them rather than
        # evaluating again (under vmap, optax.value_and_grad_from_state's lax.cond would run both branches)
        stored = optax.tree.get(state, "value") is not None and optax.tree.get(state, "grad") is not None
        value, grad = value_and_grad(v_start)
        stop = gtol * jnp.linalg.norm(grad)

        def cond(carry):
            k, _, _, _, grad, _ = carry
            return (k < steps) & (jnp.linalg.norm(grad) > stop)

        def body(carry):
            k, v, state, value, grad, history = carry
            history = history.at[k].set(value)
            updates, state = opt.update(grad, state, v, value=value, grad=grad, value_fn=f)
            v = optax.apply_updates(v, updates)
            value, grad = ((optax.tree.get(state, "value"), optax.tree.get(state, "grad")) if stored
                           else value_and_grad(v))
            return k + 1, v, state, value, grad, history

        history = jnp.full(steps, jnp.nan, value.dtype)
        k, v, _, value, grad, history = jax.lax.while_loop(cond, body, (0, v_start, state, value, grad, history))
        return v, value, jnp.linalg.norm(grad), history, k

    return xla.jit(jax.vmap(one, in_axes=(0, 0 if per_start_data else None, None, None)))


def linear_logits(v, aux):
    """Toy / linearised model: logits z + J v for aux = (z (B, K), J (B, K, d)) -> (B, K)."""
    import jax.numpy as jnp

    z, J = aux
    return z + jnp.einsum("bkd,d->bk", J, v)


@functools.lru_cache(maxsize=None)
def categorical_nll(logits_fn: Callable) -> Callable:
    """loss(v, counts (B, K), aux) = -sum counts * log softmax(logits_fn(v, aux)) / sum counts: the
    per-token negative log-likelihood of observed token counts (a sufficient statistic). Cached per logits_fn."""
    import jax
    import jax.numpy as jnp

    def loss(v, counts, aux):
        logp = jax.nn.log_softmax(logits_fn(v, aux), axis=-1)
        return -jnp.sum(counts * logp) / jnp.sum(counts)

    return loss


def sample_counts(p, n_tokens: int, replicates: int, rng: np.random.Generator) -> np.ndarray:
    """Token counts (replicates, B, K) of n_tokens independent draws per prompt from p (B, K)."""
    p = _array(p, "p", (2,))
    if isinstance(n_tokens, bool) or not isinstance(n_tokens, (int, np.integer)) or n_tokens < 1:
        raise InputError(f"n_tokens must be an int >= 1, got {n_tokens!r}")
    if isinstance(replicates, bool) or not isinstance(replicates, (int, np.integer)) or replicates < 1:
        raise InputError(f"replicates must be an int >= 1, got {replicates!r}")
    p = p / p.sum(axis=1, keepdims=True)
    return np.stack([rng.multinomial(n_tokens, row, size=replicates) for row in p], axis=1).astype(np.float64)


def categorical_mle(logits_fn: Callable, counts, v0, aux, optimizer=None, steps: int = 200,
                    gtol: float = 0.0) -> FitResult:
    """Maximum-likelihood v for each replicate's counts (R, B, K) (e.g. from `sample_counts`), started
    from v0 (R, d); see `minimise`."""
    import jax.numpy as jnp

    counts = jnp.asarray(counts)
    if counts.ndim != 3 or counts.shape[0] != np.shape(v0)[0]:
        raise InputError(f"counts must be (R, B, K) with R = {np.shape(v0)[0]} starts, got shape {counts.shape}")
    return minimise(categorical_nll(logits_fn), v0, counts, aux, optimizer, steps, gtol)


@functools.lru_cache(maxsize=None)
def kl_objective(logits_fn: Callable) -> Callable:
    """loss(v, weights, (model_aux, target_logprobs (B, V))) = sum_b w_b KL(p*_b || softmax(logits_fn(v, model_aux))_b):
    how far the distributions at v are from observed ones; weights (B,) (e.g. 0/1 to use a subset of the
    prompts) or None for all ones. Cached per logits_fn."""
    import jax
    import jax.numpy as jnp

    def loss(v, weights, aux):
        model_aux, target = aux
        logq = jax.nn.log_softmax(logits_fn(v, model_aux), axis=-1)
        kl = jnp.sum(jnp.exp(target) * (target - logq), axis=-1)
        return jnp.sum(kl if weights is None else weights * kl)

    return loss


def recover(logits_fn: Callable, target_logits, v0, model_aux, optimizer=None, steps: int = 200,
            gtol: float = 0.0, weights=None) -> FitResult:
    """Recover a hidden steering vector from observed distributions softmax(target_logits (B, V)) by
    minimising `kl_objective` from each start v0 (R, d); weights (R, B) per start (or None: every prompt
    counts) let one compiled fit serve several prompt subsets. See `minimise`."""
    import jax
    import jax.numpy as jnp

    target = jax.nn.log_softmax(jnp.asarray(target_logits), axis=-1)
    if weights is not None:
        weights = jnp.asarray(weights, target.dtype)
        if weights.shape != (np.shape(v0)[0], target.shape[0]):
            raise InputError(f"weights must be (R, B) = ({np.shape(v0)[0]}, {target.shape[0]}), got {weights.shape}")
    return minimise(kl_objective(logits_fn), v0, weights, (model_aux, target), optimizer, steps, gtol)


# ----------------------------------------------------------------------------- linearisation


def linearization_residuals(fn: Callable, x, direction, a_values, aux=None) -> tuple[np.ndarray, np.ndarray]:
    """Residuals of the first-order expansion of fn(x (...), aux) -> (..., V) along `direction` (shape of x):
    r(a) = ||fn(x + a u) - fn(x) - a J u|| (J u by jax.jvp) and the linear term ||a J u||, for a_values (A,).
    Both (A,) float64; a smooth fn has r(a) = O(a^2). jit-compiled once per fn (keep fn's identity, e.g. from
    `model_logits_fn`, to reuse the compilation)."""
    import jax.numpy as jnp

    x = jnp.asarray(x)
    a = jnp.asarray(_array(a_values, "a_values", (1,)), x.dtype)
    direction = jnp.asarray(direction, x.dtype)
    if direction.shape != x.shape:
        raise InputError(f"direction must have the shape of x {x.shape}, got {direction.shape}")
    resid, lin = _residual_fn(fn)(x, direction, a, aux)
    return np.asarray(resid, np.float64), np.asarray(lin, np.float64)


@functools.lru_cache(maxsize=None)
def _residual_fn(fn: Callable):
    import jax
    import jax.numpy as jnp

    from steerjax import xla

    def compute(x, direction, a, aux):
        f = lambda y: fn(y, aux)  # noqa: E731
        f0, ju = jax.jvp(f, (x,), (direction,))
        fa = jax.lax.map(lambda s: f(x + s * direction), a)
        lin = a.reshape(-1, *([1] * ju.ndim)) * ju
        axes = tuple(range(1, fa.ndim))
        return jnp.sqrt(jnp.sum((fa - f0 - lin) ** 2, axis=axes)), jnp.sqrt(jnp.sum(lin**2, axis=axes))

    return xla.jit(compute)


class SlopeFit(NamedTuple):
    """log r = slope * log a + intercept, fitted on the points `used` (A,) bool."""

    slope: float
    intercept: float
    used: np.ndarray


def fit_loglog_slope(a_values, residuals, floor: float = 0.0, a_max: float = np.inf, min_points: int = 3) -> SlopeFit:
    """Least-squares slope of log(residual) against log(a) over the points with residual > floor (above
    rounding noise) and a <= a_max (the small-a regime)."""
    a = _array(a_values, "a_values", (1,))
    r = _array(residuals, "residuals", (1,))
    if a.shape != r.shape or np.any(a <= 0):
        raise InputError(f"a_values must be positive and match residuals, got shapes {a.shape}, {r.shape}")
    used = (r > floor) & (a <= a_max) & (r > 0)
    if used.sum() < min_points:
        raise InputError(f"only {int(used.sum())} points above the floor {floor:.3g} with a <= {a_max:g}; "
                         f"need {min_points} (widen the a range or lower the floor)")
    slope, intercept = np.polyfit(np.log(a[used]), np.log(r[used]), 1)
    return SlopeFit(float(slope), float(intercept), used)


# ----------------------------------------------------------------------------- transformer adapters


@functools.lru_cache(maxsize=None)
def model_logits_fn(config, observable: str = "logits") -> Callable:
    """fn(v (d,) or (B, d), aux) -> (B, V): the last-position observable of B prompts with v added to h_layer
    at the last prompt token, aux = `model_aux(op)`; blocks layer..L-1 run for one token against the
    cached prefix (`jacobian.tail_last`), so it is exact and cheap. Cached per (config, observable)."""
    import jax
    import jax.numpy as jnp

    from steerjax.jacobian import observe, tail_last

    def fn(v, aux):
        params, ctx = aux
        v = jnp.broadcast_to(v, ctx.h[:, -1].shape).astype(ctx.h.dtype)
        h_final = jax.vmap(lambda c, x: tail_last(config, params["blocks"], c, x))(ctx, v)
        return observe(config, params, h_final, observable)

    return fn


def model_aux(op, prompts: slice | None = None) -> tuple:
    """(params, context) of a `JacobianOperator` (optionally a slice of its prompts): the aux
    argument of `model_logits_fn`, `normed_jacobians_at` and `factors_at`."""
    import jax

    ctx = op.ctx if prompts is None else jax.tree.map(lambda x: x[prompts], op.ctx)
    return (op.lm.params, ctx)


def normed_jacobians_at(lm, aux, offsets, chunk: int | None = None) -> np.ndarray:
    """D_i = d final_norm(h_L) / dx at x = offsets_i (added to h_layer at the last token of prompt i), float64
    (B, d, d), for aux = `model_aux(op)`: as `JacobianOperator.normed_tail_jacobian` but away from the
    unsteered point. offsets (d,) or (B, d). The logit Jacobian is J_i = W_U D_i."""
    import jax.numpy as jnp

    from steerjax.jacobian import TAIL_CHUNK

    params, ctx = aux
    B = ctx.h.shape[0]
    offsets = np.broadcast_to(_array(offsets, "offsets", (1, 2)), (B, lm.d))
    chunk = TAIL_CHUNK if chunk is None else int(chunk)
    d_mats = _normed_jacobian_fn(lm.config, chunk)(params, ctx, jnp.asarray(offsets, lm.dtype))
    return np.asarray(d_mats, np.float64)


@functools.lru_cache(maxsize=None)
def _normed_jacobian_fn(config, chunk: int):
    import jax

    from steerjax import xla
    from steerjax.jacobian import jacfwd_chunked, tail_last
    from steerjax.models import causal_lm

    def normed(params, ctx, x0):
        f = lambda x: causal_lm.final_norm(config, params, tail_last(config, params["blocks"], ctx, x))  # noqa: E731
        return jacfwd_chunked(f, x0, chunk)

    return xla.jit(jax.vmap(normed, in_axes=(None, 0, 0)))


def factors_at(lm, aux, offsets, observable: str = "logits", d_mats=None) -> np.ndarray:
    """As `JacobianOperator.factors`, but with the Jacobians J_i taken at h_i + offsets_i (steered at the last
    token) instead of h_i: float64 (B, r, d) with J_i^T J_i = C_i^T C_i (r = d for logits, d + 1 for
    log-probs). aux = `model_aux(op)`; offsets (d,) or (B, d); pass d_mats from `normed_jacobians_at` to
    skip recomputing them."""
    import jax.numpy as jnp

    from steerjax.jacobian import OBSERVABLES, observable_factor, unembedding_reduction
    from steerjax.models import causal_lm

    if observable not in OBSERVABLES:
        raise InputError(f"unknown observable {observable!r}; choose one of {OBSERVABLES}")
    B = aux[1].h.shape[0]
    offsets = np.broadcast_to(_array(offsets, "offsets", (1, 2)), (B, lm.d))
    d_mats = normed_jacobians_at(lm, aux, offsets) if d_mats is None else np.asarray(d_mats, np.float64)
    reduction = unembedding_reduction(lm)
    if observable == "logits":
        return np.einsum("rd,bde->bre", reduction["R"], d_mats)
    w = np.asarray(causal_lm.unembedding(lm.params), np.float64)
    logits = np.asarray(model_logits_fn(lm.config)(jnp.asarray(offsets, lm.dtype), aux), np.float64)
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    return np.stack([observable_factor(reduction, w, "logprobs", p) @ dm for p, dm in zip(probs, d_mats)])
