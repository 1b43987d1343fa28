"""Steering strength in nats: the next-token KL a steer causes, and the alpha that causes a chosen KL.

For prompts i with next-token distribution p_i at the last prompt token, steering `alpha * v` at h_layer
(at the positions of mode `positions`) gives p_i(alpha). The measured divergence is KL(p_i(alpha) || p_i), the
direction of RLHF's KL penalty to the reference model, averaged over the prompts. To second order in alpha it is
alpha^2 q_i with q_i = 0.5 v^T F_i v, F_i the categorical Fisher information of p_i in h_layer
(q_i = 0.5 ||J_F,i v||^2 with J_F the whitened logit Jacobian, one JVP per prompt; either direction of the KL has
the same second-order term). `calibrate_alpha` starts from that prediction and finishes on the exact KL from
forward passes of the tail (blocks layer..L-1 only).
"""

from __future__ import annotations

import math
from typing import Mapping, NamedTuple, Sequence

import numpy as np
from scipy import optimize

from steerjax import identifiability, stats
from steerjax.checks import check_fraction, check_layer, check_positive_number, finite_array
from steerjax.extraction import last_token_states_all_layers, vector_from_states
from steerjax.errors import InputError, SteeringError
from steerjax.jacobian import JACOBIAN_POSITIONS, JacobianOperator
from steerjax.model import LanguageModel, TokenBatch, as_token_batch
from steerjax.steering import POSITION_MODES

# the steering modes and the tail positions that act the same at the last prompt token: "last+generated" steers
# only the last prompt token before anything is generated; "generated" steers nothing there
KL_POSITIONS = {"last": "last", "last+generated": "last", "all": "all"}
assert set(KL_POSITIONS.values()) <= set(JACOBIAN_POSITIONS) and set(KL_POSITIONS) <= set(POSITION_MODES)


class SteeringKL(NamedTuple):
    """The next-token KL(p(alpha) || p) of steer alpha * v at the last prompt token of each prompt."""

    alpha: float
    kl: np.ndarray               # (B,) exact, nats
    mean_kl: float               # mean over prompts, nats
    second_order_kl: np.ndarray  # (B,) alpha^2 q_i, nats


class Calibration(NamedTuple):
    """`calibrate_alpha`'s answer: the alpha whose mean exact KL is target_kl, and the prediction it started from."""

    alpha: float
    target_kl: float
    kl: np.ndarray                 # (B,) exact KL at alpha, nats
    mean_kl: float                 # mean of kl: target_kl to rtol
    second_order_alpha: float      # sqrt(target_kl / mean q): the second-order prediction
    kl_per_alpha_sq: float         # mean q = 0.5 mean v^T F v, nats per unit alpha^2
    steer_norm: float              # alpha ||v||
    evaluations: int               # exact KL evaluations the solve used


def prompt_batch(lm: LanguageModel, prompts) -> TokenBatch:
    """Prompts as a TokenBatch: a string, a list of strings (tokenized without chat template) or a TokenBatch."""
    if isinstance(prompts, TokenBatch):
        return prompts
    if isinstance(prompts, str) or (isinstance(prompts, Sequence) and prompts
                                    and all(isinstance(p, str) for p in prompts)):
        return lm.tokenize(prompts if isinstance(prompts, str) else list(prompts))
    if isinstance(prompts, Sequence) and not prompts:
        raise InputError("prompts is empty; pass at least one prompt")
    return as_token_batch(prompts)


def tail_positions(positions: str) -> str:
    """The tail position mode equivalent at the last prompt token to steering mode `positions`."""
    if positions == "generated":
        raise InputError("positions='generated' steers no prompt token, so it does not change the next-token "
                         "distribution at the last prompt token; use 'last', 'last+generated' or 'all'")
    if positions not in KL_POSITIONS:
        raise InputError(f"unknown steering positions {positions!r}; choose one of {tuple(KL_POSITIONS)}")
    return KL_POSITIONS[positions]


def steering_vector(lm: LanguageModel, vector) -> np.ndarray:
    """vector as (d,) float64, finite and non-zero."""
    v = finite_array(vector, "steering vector", (1,))
    if v.shape != (lm.d,):
        raise InputError(f"steering vector has shape {v.shape}; the model needs ({lm.d},)")
    if not np.any(v):
        raise SteeringError("steering vector has zero norm (it would steer nothing)")
    return np.asarray(v, np.float64)


class KLProbe:
    """The exact and second-order next-token KL of steers alpha * v for a fixed batch, layer and positions: one
    operator (one forward pass up to the layer), the unsteered log-probabilities and q_i computed once."""

    def __init__(self, lm: LanguageModel, prompts, vector, layer: int, positions: str = "last"):
        self.vector = steering_vector(lm, vector)
        self.op = JacobianOperator(lm, prompt_batch(lm, prompts), layer, observable="fisher",
                                   positions=tail_positions(positions))
        self.base = np.asarray(self.op.value(), np.float64)                        # (B, V) log-probs
        whitened = np.asarray(self.op.matvec(self.vector), np.float64)             # (B, V) J_F v
        self.q = 0.5 * np.sum(whitened**2, axis=-1)                                # (B,)
        self.evaluations = 0

    def exact(self, alpha: float) -> np.ndarray:
        """KL(p_i(alpha) || p_i) (B,) in nats."""
        self.evaluations += 1
        steered = np.asarray(self.op.value_at(alpha * self.vector), np.float64)
        return stats.kl_divergence(steered, self.base)

    def measure(self, alpha: float) -> SteeringKL:
        kl = self.exact(alpha)
        return SteeringKL(float(alpha), kl, float(kl.mean()), alpha**2 * self.q)


def steering_kl(lm: LanguageModel, prompts, vector, layer: int, alpha: float, positions: str = "last") -> SteeringKL:
    """The next-token KL(p(alpha) || p) at the last prompt token of each prompt when `alpha * vector` is added to
    h_layer at the positions of mode `positions`, exact and to second order (alpha^2 q_i). The inverse of
    `calibrate_alpha`. prompts: str, list of str, or a TokenBatch; vector (d,)."""
    alpha = float(alpha)
    if not math.isfinite(alpha):
        raise InputError(f"alpha must be finite, got {alpha}")
    return KLProbe(lm, prompts, vector, layer, positions).measure(alpha)


def calibrate_alpha(lm: LanguageModel, prompts, vector, layer: int, target_kl: float, positions: str = "last",
                    rtol: float = 1e-3, max_doublings: int = 40) -> Calibration:
    """The alpha >= 0 at which the mean over prompts of the exact next-token KL(p(alpha) || p) equals target_kl
    nats (to relative tolerance rtol). Starts at the second-order prediction sqrt(target_kl / mean q), brackets the
    root by doubling from there, and solves on the exact KL by Brent's method (each step: one forward pass of the
    tail). Raises SteeringError when the KL stays below the target (the steer saturates) for every alpha tried."""
    return calibrate_probe(KLProbe(lm, prompts, vector, layer, positions), target_kl, rtol, max_doublings)


def calibrate_probe(probe: KLProbe, target_kl: float, rtol: float = 1e-3, max_doublings: int = 40) -> Calibration:
    """`calibrate_alpha` on a KLProbe already built (its operator and q reused)."""
    target = check_positive_number(target_kl, "target_kl (nats)")
    rtol = check_fraction(rtol, "rtol")
    q_mean = float(probe.q.mean())
    predicted = math.sqrt(target / q_mean) if q_mean > 0 else math.inf
    gap = lambda a: float(probe.exact(a).mean()) - target

    lo, hi = 0.0, predicted if math.isfinite(predicted) else 1.0 / np.linalg.norm(probe.vector)
    gap_hi = gap(hi)
    for _ in range(max_doublings):
        if gap_hi >= 0:
            break
        lo, hi = hi, 2 * hi
        gap_hi = gap(hi)
    else:
        raise SteeringError(f"the mean KL reaches only {gap_hi + target:.4g} nats at alpha = {hi:.4g} (||alpha v|| = "
                            f"{hi * np.linalg.norm(probe.vector):.4g}), below target_kl = {target:.4g}: this steer "
                            f"cannot move the next-token distribution that far")
    alpha = hi
    if abs(gap_hi) > rtol * target:
        alpha = optimize.brentq(lambda a: gap(a) / target, lo, hi, xtol=1e-7 * hi, maxiter=200)
    result = probe.measure(alpha)
    if abs(result.mean_kl - target) > rtol * target:
        raise SteeringError(f"calibration did not converge: mean KL {result.mean_kl:.6g} at alpha {alpha:.6g}, "
                            f"target {target:.6g}")
    return Calibration(float(alpha), target, result.kl, result.mean_kl, predicted, q_mean,
                       float(alpha * np.linalg.norm(probe.vector)), probe.evaluations)


# ----------------------------------------------------------------------------- layer profile

class LayerProfile(NamedTuple):
    """`layer_profile`'s answer: one row per layer (dicts, JSON-ready) and the settings they were computed with."""

    rows: list[dict]
    settings: dict


def profile_vectors(lm: LanguageModel, vectors_or_pairs, layers) -> dict[int, np.ndarray]:
    """{layer: vector (d,)} from a {layer: vector} mapping, an (L + 1, d) array of one vector per layer, or a pair
    (positive prompts, negative prompts) whose mean-difference vector is read at every layer (one forward pass per
    side)."""
    if isinstance(vectors_or_pairs, Mapping):
        vectors = {check_layer(int(k), lm.num_layers): v for k, v in vectors_or_pairs.items()}
        layers = sorted(vectors) if layers is None else layers
        missing = [layer for layer in layers if layer not in vectors]
        if missing:
            raise InputError(f"no vector given for layer(s) {missing}; the mapping has layers {sorted(vectors)}")
        return {layer: steering_vector(lm, vectors[layer]) for layer in layers}
    layers = range(1, lm.num_layers + 1) if layers is None else layers
    if (isinstance(vectors_or_pairs, (tuple, list)) and len(vectors_or_pairs) == 2
            and all(isinstance(side, (list, tuple)) and side and all(isinstance(t, str) for t in side)
                    for side in vectors_or_pairs)):
        pos = last_token_states_all_layers(lm, vectors_or_pairs[0])
        neg = last_token_states_all_layers(lm, vectors_or_pairs[1])
        return {layer: steering_vector(lm, vector_from_states(pos[layer], neg[layer])) for layer in layers}
    stack = finite_array(vectors_or_pairs, "vectors_or_pairs (one vector per layer)", (2,))
    if stack.shape != (lm.num_layers + 1, lm.d):
        raise InputError(f"an array of vectors must hold one per layer, shape ({lm.num_layers + 1}, {lm.d}); got "
                         f"{stack.shape}. Or pass {{layer: vector}} or (positive prompts, negative prompts)")
    return {layer: steering_vector(lm, stack[layer]) for layer in layers}


def layer_row(probe: KLProbe, layer: int, target_kl: float, tau: float, steer_fraction: float) -> dict:
    """One layer of `layer_profile` from a KLProbe at that layer."""
    v = probe.vector
    v_norm = float(np.linalg.norm(v))
    h_median = float(np.median(np.linalg.norm(probe.op.steered_states(), axis=1)))
    calibration = calibrate_probe(probe, target_kl)
    gram = identifiability.mean_gram(probe.op.factors())          # mean_i J_F,i^T J_F,i = mean Fisher (d, d)
    steer_norm = steer_fraction * h_median
    basis, _ = identifiability.invisible_basis_from_gram(gram, steer_norm, tau)
    inside = float(np.sum((basis.T @ v) ** 2) / v_norm**2) if basis.size else 0.0
    return {
        "layer": layer, "vector_norm": v_norm, "h_norm_median": h_median, "norm_ratio": v_norm / h_median,
        "fisher_form": float(2 * probe.q.mean()), "kl_per_alpha_sq": float(probe.q.mean()),
        "target_kl": target_kl, "alpha": calibration.alpha, "second_order_alpha": calibration.second_order_alpha,
        "steer_fraction_at_alpha": calibration.steer_norm / h_median, "kl_at_alpha": calibration.kl.tolist(),
        "invisible_dim": int(basis.shape[1]), "invisible_share": inside,
    }


def layer_profile(lm: LanguageModel, prompts, vectors_or_pairs, layers: Sequence[int] | None = None,
                  target_kl: float = 0.1, positions: str = "last", tau: float = 1e-3,
                  steer_fraction: float = 0.1, progress: bool = True) -> LayerProfile:
    """Per layer, what a user needs to pick one, without generating: the vector's norm relative to the median
    ||h_l|| of the prompts (last token); its Fisher quadratic form mean_i v^T F_i v and the second-order KL per unit
    alpha^2 (half of it, nats); the alpha (and the fraction of ||h_l|| it steers) whose exact mean next-token KL is
    `target_kl` (`calibrate_alpha`); and the share of ||v||^2 inside the prompts' stacked tau-invisible subspace
    (steers of norm steer_fraction x median ||h_l|| along it move the next token by <= tau nats on average, second
    order; `identifiability.invisible_basis_from_gram`). vectors_or_pairs: {layer: v}, an (L + 1, d) array, or
    (positive prompts, negative prompts) for mean-difference vectors at each layer. layers default: the mapping's
    keys, else 1..L. Cost per layer: d JVPs per prompt and a few tail forward passes."""
    target_kl = check_positive_number(target_kl, "target_kl (nats)")
    tau = check_positive_number(tau, "tau (nats)")
    steer_fraction = check_positive_number(steer_fraction, "steer_fraction")
    if layers is not None:
        layers = [check_layer(int(layer), lm.num_layers) for layer in layers]
        if not layers:
            raise InputError("layers is empty; pass at least one layer")
    vectors = profile_vectors(lm, vectors_or_pairs, layers)
    batch = prompt_batch(lm, prompts)
    items = list(vectors.items())
    if progress:
        from tqdm import tqdm
        items = tqdm(items, desc="layer profile", unit="layer")
    rows = [layer_row(KLProbe(lm, batch, v, layer, positions), layer, target_kl, tau, steer_fraction)
            for layer, v in items]
    settings = {"target_kl": target_kl, "positions": positions, "tau": tau, "steer_fraction": steer_fraction,
                "n_prompts": int(batch.ids.shape[0]), "kl": "KL(p_steered || p) at the last prompt token, mean over "
                                                          "prompts"}
    return LayerProfile(rows, settings)
