"""Shared input checks: each returns the checked value or raises a SteerjaxError naming the value, the valid
range and the fix. Every module checks layers, counts, numbers and arrays through these helpers."""

from __future__ import annotations

import numbers

import numpy as np

from steerjax.errors import InputError, SteeringError


def is_int(x) -> bool:
    """True for Python / NumPy integers, False for bools (True is not a count)."""
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def check_int(x, name: str, low: int | None = None, high: int | None = None, error=InputError) -> int:
    """x as an int in [low, high] (either bound may be None), else `error` naming `name` and the range."""
    if not is_int(x) or (low is not None and x < low) or (high is not None and x > high):
        bounds = (f"in [{low}, {high}]" if low is not None and high is not None
                  else f">= {low}" if low is not None else f"<= {high}" if high is not None else "")
        raise error(f"{name} must be an int {bounds}, got {x!r}".replace("  ", " ").rstrip())
    return int(x)


def check_positive_int(x, name: str) -> int:
    """x as an int >= 1."""
    return check_int(x, name, low=1)


def check_layer(layer, num_layers: int, name: str = "layer") -> int:
    """A residual-stream index l in [0, L] (h_l enters block l; h_L is the final-norm input), else
    SteeringError."""
    if not is_int(layer) or not 0 <= layer <= num_layers:
        raise SteeringError(f"{name} {layer!r} is outside [0, {num_layers}] (this model has {num_layers} blocks; "
                            f"layer {num_layers} is the final-norm input)")
    return int(layer)


def check_index(index, count: int, name: str, holder: str = "") -> int:
    """An index in [0, count)."""
    if not is_int(index) or not 0 <= index < count:
        raise InputError(f"{name} {index!r} is outside [0, {count})" + (f" ({holder})" if holder else ""))
    return int(index)


def check_positive_number(x, name: str) -> float:
    """x as a finite float > 0."""
    if not isinstance(x, numbers.Real) or isinstance(x, (bool, np.bool_)) or not np.isfinite(x) or x <= 0:
        raise InputError(f"{name} must be a finite number > 0, got {x!r}")
    return float(x)


def check_fraction(x, name: str) -> float:
    """x as a float in the open interval (0, 1) (relative tolerances, confidence levels)."""
    x = check_positive_number(x, name)
    if x >= 1:
        raise InputError(f"{name} must lie in (0, 1), got {x!r}")
    return x


def finite_array(x, name: str, ndims: tuple[int, ...]) -> np.ndarray:
    """x as a non-empty finite float64 array with one of the allowed numbers of dimensions."""
    try:
        x = np.asarray(x, np.float64)
    except (TypeError, ValueError) as err:
        raise InputError(f"{name} must be a numeric array ({err})") from None
    if x.ndim not in ndims or x.size == 0:
        raise InputError(f"{name} must be a non-empty {' or '.join(f'{n}-D' for n in ndims)} array, "
                         f"got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise InputError(f"{name} has {int(np.sum(~np.isfinite(x)))} NaN/inf entries")
    return x
