"""The null-space study of one layer: per-prompt and stacked spectra, effective ranks, null dimensions,
principal angles between the null spaces of two prompt sets, and the share of a random direction
orthogonal to v that lies in the null space. Returns JSON-ready dicts (nullspace.json's `layers` items)."""

from __future__ import annotations


import jax.numpy as jnp
import numpy as np

from steerjax import blas, spectrum
from steerjax.jacobian import jacobian_operator, unembedding_reduction
from steerjax.model import LanguageModel, TokenBatch

ANGLE_EPS = (1e-2, 1e-3)
# the steer norm of the KL counts, as a fraction of the median ||h_l|| over prompts (the paper-sized steers of the
# behavioural studies sit at 0.15-0.28 ||h_15||; 0.1 stays nearer the first-order regime)
STEER_FRACTION = 0.1
FRACTION_SAMPLES = 2000


def stacking_schedule(n_prompts: int) -> list[int]:
    """1, 2, 4, ... up to n_prompts (always included)."""
    schedule, n = [], 1
    while n < n_prompts:
        schedule.append(n)
        n *= 2
    return schedule + [n_prompts]


def noise_floor(lm: LanguageModel) -> float:
    """Relative singular-value level below which rounding in the model dtype dominates
    (sqrt(d) * machine epsilon): null dims at smaller eps are not meaningful in that dtype."""
    return float(np.sqrt(lm.d) * jnp.finfo(lm.dtype).eps)


def spectrum_entry(s, d: int) -> dict:
    s = spectrum.padded_singular_values(s, d)
    return {"singular_values": s, "sigma_max": float(s[0]), "effective_rank": spectrum.effective_ranks(s),
            "null_dim": spectrum.null_dims(s, d)}


def principal_angle_entry(factor_a, factor_b, d: int) -> dict:
    """Null spaces of two stacked prompt sets at each eps: dimensions, angles (degrees) and the
    mean squared cosine next to its value for independent random subspaces (k_b / d)."""
    out = {}
    for eps in ANGLE_EPS:
        a = spectrum.null_space_basis(factor_a, eps)
        b = spectrum.null_space_basis(factor_b, eps)
        angles = spectrum.principal_angles(a, b)
        out[spectrum.eps_key(eps)] = {
            "dim_a": a.shape[1], "dim_b": b.shape[1], "angles_deg": np.degrees(angles),
            "mean_cos2": float(np.mean(np.cos(angles) ** 2)) if angles.size else None,
            "random_mean_cos2": float(max(a.shape[1], b.shape[1]) / d) if angles.size else None,
        }
    return out


def orthogonal_fraction_entry(factors: np.ndarray, stacked_factor: np.ndarray, v: np.ndarray, seed: int) -> dict:
    """Exact E||P_null r||^2/||r||^2 for random r orthogonal to v, per prompt (mean, min, max) and for the
    stacked null space, at every eps; with a Monte Carlo check on the first prompt."""
    out = {}
    for eps in spectrum.RANK_EPS:
        bases = [spectrum.null_space_basis(c, eps) for c in factors]
        per_prompt = np.array([spectrum.orthogonal_null_fraction(b, v) for b in bases])
        samples = spectrum.sampled_orthogonal_null_fractions(bases[0], v, FRACTION_SAMPLES, seed)
        out[spectrum.eps_key(eps)] = {
            "per_prompt_mean": float(per_prompt.mean()), "per_prompt_min": float(per_prompt.min()),
            "per_prompt_max": float(per_prompt.max()),
            "stacked": spectrum.orthogonal_null_fraction(spectrum.null_space_basis(stacked_factor, eps), v),
            "monte_carlo_first_prompt": {"mean": float(samples.mean()), "std": float(samples.std()),
                                         "samples": FRACTION_SAMPLES},
        }
    return out


def logit_top_direction_cos_ones(lm: LanguageModel, normed_jacobians) -> np.ndarray:
    """|cos| (B,) between the top left singular vector of each prompt's logit Jacobian J = W_U D (a V-vector)
    and the all-ones vector, the softmax's constant-shift direction that changes no probability. With
    W_U = Q R, u_1 = Q u_C for the top left singular vector u_C of R D, so |cos| = |b . u_C| / sqrt(V), b = Q^T 1."""
    reduction = unembedding_reduction(lm)
    with blas.dense_threads(lm.d):      # d x d SVDs under the same BLAS thread policy as the spectra
        tops = [np.linalg.svd(reduction["R"] @ dm)[0][:, 0] for dm in np.asarray(normed_jacobians, np.float64)]
    return np.abs(np.array([reduction["b"] @ u for u in tops])) / np.sqrt(lm.config.vocab_size)


def analyze_layer_exact(lm: LanguageModel, batch: TokenBatch, layer: int, observable: str = "logits",
                        positions: str = "last", vector: np.ndarray | None = None, seed: int = 0,
                        steer_fraction: float = STEER_FRACTION, observable_factors=None) -> dict:
    """Exact study of one layer (float64 SVDs of the QR-reduced factors). For observable "fisher" the null
    dimensions are also counted in absolute KL units (`spectrum.kl_null_dims`) for a steer of norm
    steer_fraction * median_i ||h_l,i|| (h_l at the last prompt token). observable_factors: the operator's M_i
    (B, r, d) if already computed (they depend on the prompts, not on the layer)."""
    op = jacobian_operator(lm, batch, layer, observable, positions)
    d_mats = np.asarray(op.normed_tail_jacobian(), np.float64)
    factors = op.factors(d_mats, observable_factors)
    n, d = factors.shape[0], lm.d
    per_prompt = spectrum.factor_singular_values(factors)
    entry = {"layer": layer, "per_prompt": [spectrum_entry(s, d) for s in per_prompt]}
    stacked = spectrum.stacked_spectra(factors, stacking_schedule(n))
    entry["stacked"] = [{"n_prompts": k, **spectrum_entry(s, d)} for k, s, _ in stacked]
    h_norms = np.linalg.norm(op.steered_states(), axis=1)
    cos_ones = logit_top_direction_cos_ones(lm, d_mats)
    entry["h_norm_median"] = float(np.median(h_norms))
    entry["logit_top_direction_abs_cos_ones"] = {"median": float(np.median(cos_ones)), "min": float(cos_ones.min()),
                                                 "max": float(cos_ones.max())}
    if observable == "fisher":
        steer_norm = steer_fraction * float(np.median(h_norms))
        entry["steer"] = {"fraction_of_median_h_norm": steer_fraction, "norm": steer_norm}
        for item, s in zip(entry["per_prompt"], per_prompt):
            item["kl_null_dim"] = spectrum.kl_null_dims(s, d, 1, steer_norm)
            item["kl_max"] = float(spectrum.second_order_kl(s[:1], 1, steer_norm)[0])
        for item, (k, s, _) in zip(entry["stacked"], stacked):
            item["kl_null_dim"] = spectrum.kl_null_dims(s, d, k, steer_norm)
    if n >= 2:
        half = n // 2
        last = lambda fs: list(spectrum.stack_factors(fs))[-1]
        entry["principal_angles"] = {"set_a": list(range(half)), "set_b": list(range(half, n)),
                                     **principal_angle_entry(last(factors[:half]), last(factors[half:]), d)}
    if vector is not None:
        entry["orthogonal_null_fraction"] = orthogonal_fraction_entry(factors, stacked[-1][2], vector, seed)
    return entry


def analyze_layer_lanczos(lm: LanguageModel, batch: TokenBatch, layer: int, k: int, observable: str = "logits",
                          positions: str = "last", seed: int = 0) -> dict:
    """Matrix-free study of one layer: top-k singular values per prompt (block Golub-Kahan, run to
    convergence) and of the stacked operator (Lanczos on sum J_i^T J_i), each with its largest Ritz
    residual and whether it met the tolerance. Ranks counted within the top k are lower bounds when every one
    of the k values passes the threshold; null dims are then unknown (null)."""
    op = jacobian_operator(lm, batch, layer, observable, positions)
    d = lm.d

    def truncated_entry(res) -> dict:
        s = np.sort(np.asarray(res.s, np.float64))[::-1]
        ranks = {spectrum.eps_key(e): spectrum.numerical_rank(s, e) for e in spectrum.RANK_EPS}
        return {"singular_values": s, "sigma_max": float(s[0]), "top_k": len(s),
                "effective_rank": {"numerical_lower_bound": ranks},
                "null_dim": {key: (d - r if r < len(s) else None) for key, r in ranks.items()},
                "max_residual_over_sigma_max": float(np.max(np.asarray(res.residuals)) / s[0]),
                "converged": bool(res.converged)}

    per_prompt = [op.top_singular(k, prompt=i, seed=seed, method="lanczos") for i in range(op.num_prompts)]
    entry = {"layer": layer, "per_prompt": [truncated_entry(res) for res in per_prompt]}
    entry["stacked"] = [{"n_prompts": n, **truncated_entry(op.top_stacked(k, n_prompts=n, seed=seed))}
                        for n in stacking_schedule(op.num_prompts)]
    return entry
