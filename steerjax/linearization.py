"""How far the first-order picture of steering holds: residuals of the linearisation of a map along a
direction, r(a) = ||f(x + a u) - f(x) - a J u||, and the log-log slope that says where r(a) = O(a^2)."""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from steerjax import xla
from steerjax.checks import finite_array
from steerjax.errors import InputError

def linearization_residuals(fn: Callable, x, direction, a_values, aux=None) -> tuple[np.ndarray, np.ndarray]:
    """Residuals of the first-order expansion of fn(x (...), aux) -> (..., V) along `direction` (shape of x):
    r(a) = ||fn(x + a u) - fn(x) - a J u|| (J u by jax.jvp) and the linear term ||a J u||, for a_values (A,).
    Both (A,) float64; a smooth fn has r(a) = O(a^2). jit-compiled once per fn (keep fn's identity, e.g. from
    `steerjax.tail.steered_observable`, to reuse the compilation)."""
    x = jnp.asarray(x)
    a = jnp.asarray(finite_array(a_values, "a_values", (1,)), x.dtype)
    direction = jnp.asarray(direction, x.dtype)
    if direction.shape != x.shape:
        raise InputError(f"direction must have the shape of x {x.shape}, got {direction.shape}")
    resid, lin = _residual_fn(fn)(x, direction, a, aux)
    return np.asarray(resid, np.float64), np.asarray(lin, np.float64)


@functools.lru_cache(maxsize=None)
def _residual_fn(fn: Callable):
    def compute(x, direction, a, aux):
        f = lambda y: fn(y, aux)
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
    a = finite_array(a_values, "a_values", (1,))
    r = finite_array(residuals, "residuals", (1,))
    if a.shape != r.shape or np.any(a <= 0):
        raise InputError(f"a_values must be positive and match residuals, got shapes {a.shape}, {r.shape}")
    used = (r > floor) & (a <= a_max) & (r > 0)
    if used.sum() < min_points:
        raise InputError(f"only {int(used.sum())} points above the floor {floor:.3g} with a <= {a_max:g}; "
                         f"need {min_points} (widen the a range or lower the floor)")
    slope, intercept = np.polyfit(np.log(a[used]), np.log(r[used]), 1)
    return SlopeFit(float(slope), float(intercept), used)
