"""Shared pieces of the paper-replication studies: protocols (paper vs corrected layer convention) and
norm-matched perturbation directions (random orthogonal, random, measured ker(J)).

All direction helpers are pure numpy functions of their inputs and a `numpy.random.Generator`, return
float64 (d,) arrays with exactly ||v|| (to float64 rounding), and raise `InputError` on bad input.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import numpy as np

from steerjax.checks import check_int, check_positive_int
from steerjax.errors import InputError, NonFiniteError, SteeringError
from steerjax.model import LanguageModel, TokenBatch, as_token_batch
from steerjax.steering import Steer

PROTOCOLS = ("paper", "corrected")


# ----------------------------------------------------------------------------- protocols

@dataclasses.dataclass(frozen=True)
class StudyProtocol:
    """Where a study reads the steering vector and where it steers.

    `steer_offset` is added to the read layer to get the steering layer (in steerjax's convention: h_l
    enters block l). The paper's released code reads `hidden_states[L//2]` (= h_{L//2}) but hooks the
    *output* of block L//2 (= h_{L//2 + 1}): offset 1. The corrected protocol steers where it reads."""

    name: str
    steer_offset: int
    positions: str = "last"
    description: str = ""
    # behavioural studies (steerjax.behaviour): what is scored and how conditions are compared
    score_prompt: bool = False          # score prompt + generated text (paper) or generated text only
    paired_sampling: bool = True        # every condition reuses the same per-row PRNG keys (common random
                                        # numbers) instead of fresh sampling noise per condition (paper)
    effect_size: str = "cohens_d"       # "cohens_d" (pooled, ddof 1, signed) | "paper_cohens_d" (ddof 0)
    efficacy: str = "baseline"          # "baseline": (perp - base) / (v - base) | "raw_ratio": |perp| / |v|

    @classmethod
    def paper(cls, positions: str = "last") -> "StudyProtocol":
        """The released code's convention: read h_{L//2}, steer h_{L//2+1} (off by one), score the prompt
        with the generation, fresh sampling noise per condition, ddof-0 d, raw perp-only ratio."""
        return cls("paper", 1, positions, "extract at h[L//2], steer the output of block L//2 (h[L//2+1]): "
                                          "the released code's off-by-one", score_prompt=True,
                   paired_sampling=False, effect_size="paper_cohens_d", efficacy="raw_ratio")

    @classmethod
    def corrected(cls, positions: str = "last") -> "StudyProtocol":
        """Read and steer the same residual stream h_{L//2}; score generated text only; paired sampling;
        pooled Cohen's d; baseline-subtracted efficacy."""
        return cls("corrected", 0, positions, "extract and steer the same h[L//2]")

    @classmethod
    def from_name(cls, name: str, positions: str = "last") -> "StudyProtocol":
        if name not in PROTOCOLS:
            raise InputError(f"unknown protocol {name!r}; choose one of {PROTOCOLS}")
        return getattr(cls, name)(positions)


def protocol_layers(protocol: StudyProtocol, num_layers: int, read_layer: int | None = None) -> tuple[int, int]:
    """(read_layer, steer_layer) for a model with `num_layers` blocks. read_layer defaults to L // 2;
    steer_layer = read_layer + protocol.steer_offset, which must stay in [0, L]."""
    check_positive_int(num_layers, "num_layers")
    read = num_layers // 2 if read_layer is None else int(read_layer)
    steer = read + protocol.steer_offset
    if not (0 <= read <= num_layers and 0 <= steer <= num_layers):
        raise SteeringError(f"protocol {protocol.name!r} with read layer {read} steers layer {steer}, outside "
                            f"[0, {num_layers}]")
    return read, steer


# ----------------------------------------------------------------------------- directions

def _vector(v, name: str = "v") -> np.ndarray:
    v = np.asarray(v, np.float64)
    if v.ndim != 1 or v.size < 2:
        raise InputError(f"{name} must be a 1-D vector of length >= 2, got shape {v.shape}")
    if not np.all(np.isfinite(v)):
        raise InputError(f"{name} has non-finite entries")
    if not np.linalg.norm(v) > 0:
        raise InputError(f"{name} is the zero vector")
    return v


def _remove_component(x: np.ndarray, v: np.ndarray) -> np.ndarray:
    """x minus its projection on v, applied twice (classical Gram-Schmidt, re-orthogonalised so
    |<x, v>| / (||x|| ||v||) ends at float64 rounding)."""
    u = v / np.linalg.norm(v)
    for _ in range(2):
        x = x - (x @ u) * u
    return x


def _rescale(x: np.ndarray, norm: float) -> np.ndarray:
    n = np.linalg.norm(x)
    if not n > 0:
        raise InputError("direction collapsed to zero (degenerate input)")
    return x * (norm / n)


def orthogonal_to(v, rng: np.random.Generator) -> np.ndarray:
    """The paper's v_perp: Gaussian noise Gram-Schmidt'ed against v, rescaled to ||v_perp|| = ||v||."""
    v = _vector(v)
    return _rescale(_remove_component(rng.standard_normal(v.size), v), np.linalg.norm(v))


def random_like(v, rng: np.random.Generator) -> np.ndarray:
    """A Gaussian direction rescaled to ||r|| = ||v|| (not orthogonalised: <r, v> ~ ||v||^2 / sqrt(d))."""
    v = _vector(v)
    return _rescale(rng.standard_normal(v.size), np.linalg.norm(v))


def kernel_basis(factor, k_smallest: int) -> tuple[np.ndarray, np.ndarray]:
    """Right singular vectors of `factor` (r, d) (e.g. one C_i of `JacobianOperator.factors()`, which has
    J_i's singular values and right singular vectors) for its k smallest singular values.
    Returns (basis (k, d) orthonormal rows, singular values (k,) relative to sigma_max, ascending order of
    row index = descending singular value as numpy gives them)."""
    factor = np.asarray(factor, np.float64)
    if factor.ndim != 2:
        raise InputError(f"factor must be a 2-D (r, d) matrix, got shape {factor.shape}")
    d = factor.shape[1]
    check_int(k_smallest, "k_smallest", 1, d - 1)
    _, s, vt = np.linalg.svd(factor, full_matrices=True)
    s_full = np.zeros(d)
    s_full[: s.size] = s
    smax = s_full[0] if s_full[0] > 0 else 1.0
    return vt[d - k_smallest:], s_full[d - k_smallest:] / smax


def kernel_direction(factor, v, rng: np.random.Generator, k_smallest: int = 32,
                     basis: np.ndarray | None = None) -> np.ndarray:
    """A direction from the measured (approximate) ker(J): a random (Gaussian) combination of the k
    smallest right singular vectors of `factor` (r, d), orthogonalised against v *inside* that span (the
    coefficients are Gram-Schmidt'ed against v's coordinates, so no multiple of v leaks in: subtracting
    <x, v_hat> v_hat from x afterwards would add a component along v, which J does see), then rescaled to
    ||v||. With k = 1 it falls back to plain Gram-Schmidt of the single vector against v.
    Pass `basis` (k, d) from `kernel_basis(factor, k)` to skip the SVD when drawing many directions
    (then `factor` may be None)."""
    v = _vector(v)
    if basis is None:
        basis, _ = kernel_basis(factor, k_smallest)
    basis = np.asarray(basis, np.float64)
    if basis.ndim != 2 or basis.shape[1] != v.size:
        raise InputError(f"kernel basis must be (k, {v.size}), got shape {basis.shape}")
    coeffs = rng.standard_normal(basis.shape[0])
    b = basis @ v                        # v's coordinates in the kernel basis
    if basis.shape[0] > 1 and np.linalg.norm(b) > 0:
        coeffs = _remove_component(coeffs, b)   # x = coeffs @ basis stays in span(basis) and <x, v> = 0
    x = coeffs @ basis
    return _rescale(_remove_component(x, v), np.linalg.norm(v))


# ----------------------------------------------------------------------------- steered forwards

def steered_last_logits(lm: LanguageModel, batch, layer: int | None, vectors=None, alpha: float = 1.0) -> np.ndarray:
    """Last-position logits (B, V) float64 of a left-padded batch, steering `alpha * vectors[b]` into
    h_layer at the last prompt token of row b (positions="last"); `vectors` (d,) is shared by every row,
    (B, d) gives one vector per row. layer None (or vectors None) runs unsteered. `lm.forward` with
    last_only=True: no (B, T, V) logits are formed."""
    steer = None
    if layer is not None and vectors is not None:
        steer = Steer(layer, np.asarray(vectors, np.float64), alpha, "last")
    out = lm.forward(batch, steer=steer, last_only=True)
    return np.asarray(out.logits[:, 0], np.float64)


def tile_batch(batch, times: int) -> TokenBatch:
    """A TokenBatch repeated `times` times along the batch axis (row b of copy s is row s * B + b)."""
    batch = as_token_batch(batch)
    return TokenBatch(np.tile(np.asarray(batch.ids), (times, 1)), np.tile(np.asarray(batch.attention_mask), (times, 1)))


# ----------------------------------------------------------------------------- the paper's null-space estimator

class PaperNullSpaceEstimate(NamedTuple):
    """The released code's estimate: singular values (n,) of the probe matrix Y, its rank at the relative
    threshold, and its null fraction 1 - rank / n_directions."""

    singular_values: np.ndarray
    rank: int
    null_fraction: float
    n_directions: int


def paper_null_space_estimate(fn, d: int, n_directions: int = 1000, eps: float = 0.01, threshold: float = 0.05,
                              seed: int = 0, chunk: int = 100) -> PaperNullSpaceEstimate:
    """The released code's estimate of the null space of J = d f / d x: central differences
    Y_k = (f(eps r_k) - f(-eps r_k)) / (2 eps) along n random unit directions r_k (fn maps a block of offsets
    (k, d) to outputs (k, V) in whatever precision it computes), rank = #{sigma(Y) > threshold sigma_max(Y)}, and
    null fraction = 1 - rank / n_directions. As released it divides by the number of probes, not by d, so it
    cannot fall below 1 - d / n_directions (0.42 for d = 576 and 1000 probes)."""
    check_positive_int(n_directions, "n_directions")
    rng = np.random.default_rng(seed)
    r = rng.standard_normal((n_directions, d))
    r /= np.linalg.norm(r, axis=1, keepdims=True)
    rows = []
    for start in range(0, n_directions, chunk):
        block = r[start:start + chunk]
        rows.append((np.asarray(fn(eps * block), np.float64) - np.asarray(fn(-eps * block), np.float64)) / (2 * eps))
    probes = np.concatenate(rows)
    if not np.all(np.isfinite(probes)):
        raise NonFiniteError(f"{int(np.sum(~np.all(np.isfinite(probes), axis=1)))} of {n_directions} probe rows are "
                             f"not finite: the outputs overflowed in the probed precision (float16 overflows past "
                             f"65504; Gemma 3's residual stream reaches tens of thousands)")
    s = np.linalg.svd(probes, compute_uv=False)
    rank = int(np.sum(s > threshold * s[0])) if s[0] > 0 else 0
    return PaperNullSpaceEstimate(s, rank, 1.0 - rank / n_directions, n_directions)
