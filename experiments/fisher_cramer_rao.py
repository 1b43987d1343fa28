"""Fisher information and the Cramér-Rao bound for a steering vector (the paper's Appendix E.2), checked by
simulation on the exact Jacobians of SmolLM2 (or any --model).

J_i = d logits[last] / d h_layer (V x d, exact) for N neutral prompts, at the unsteered point.

Gaussian model o_i = J_i v + N(0, sigma^2 I_V). With the thin QR W_U = Q R_U, J_i = Q (R_U D_i), so
y_i = Q^T o_i = C_i v + N(0, sigma^2 I_d) (C_i = `JacobianOperator.factors()`) is an exactly sufficient
statistic: the part of o_i outside range(Q) is noise that does not depend on v. Stacking prompts, the
triangular R_N with R_N^T R_N = sum_i C_i^T C_i (QR updates) gives y = R_N v + N(0, sigma^2 I_d) with the
same Fisher matrix F = sum_i J_i^T J_i / sigma^2 and the same least-squares estimates. For each design
(prompt 0 alone; all N prompts stacked) and each eps (rank = #{sigma_k > eps sigma_max}):
  - n_obs simulated observations; min-norm truncated least squares; empirical covariance vs the bound
    sigma^2 (J^T J)^+ on the eps-row space (variance ratios along F's eigenvectors, whitened and Frobenius
    errors with their Monte-Carlo expectations, whitened bias);
  - null space: min-norm LS puts exactly 0 there; the posterior mean under a prior N(m, tau^2 I) (m drawn per
    replicate) keeps m's component, so its null-space spread is tau^2 (the prior's), whatever the data;
    L-BFGS from random starts keeps each start's component.
Categorical model: a token sampled from the top-K next tokens (renormalised: the conditional distribution
given that the token is among the K most likely; equivalent to rejection sampling from the full softmax) with
logits linear in v, z_K + J_K v (the local model at h; its Fisher J_K^T (diag p - p p^T) J_K is also the exact
model's Fisher at v = 0). Tokens are drawn at v = 0; per replicate, n_tokens tokens per prompt; v fitted by
maximum likelihood (optax L-BFGS, vmapped over replicates); covariance of the MLE vs the bound F^+ / n_tokens
on the row space (rank N (K - 1)).
Writes DIR/fisher_cramer_rao.json, gaussian.csv, categorical.csv and fisher_cramer_rao.png.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

import steerjax as sj
from steerjax import data, fisher, fits, io, spectrum, stats
from steerjax.cli import ArgumentParser, fmt, check_trait, run_cli, trait_study, wrote, MODEL_HELP

CHECK_KEYS = ("variance_ratio_mean", "variance_ratio_min", "variance_ratio_max", "variance_ratio_sd",
              "whitened_rel_error", "expected_whitened_rel_error", "frobenius_rel_error",
              "expected_frobenius_rel_error", "min_whitened_eig", "bias_whitened")


def parse_args(argv):
    p = ArgumentParser(description=__doc__)
    p.add_argument("--model", default=None, help=MODEL_HELP)
    p.add_argument("--layer", type=int, default=None, help="steered layer (default L // 2)")
    p.add_argument("--n-prompts", type=int, default=8, help="neutral prompts stacked (default 8)")
    p.add_argument("--trait", default="formality", help="trait whose mean-difference vector plays v*")
    p.add_argument("--sigma", type=float, default=1.0, help="Gaussian noise sd in logit units (default 1)")
    p.add_argument("--n-obs", type=int, default=20000, help="simulated Gaussian observations (default 20000)")
    p.add_argument("--eps", default="1e-2,1e-3,1e-4,1e-6", help="relative singular-value tolerances")
    p.add_argument("--prior-sd", type=float, default=1.0, help="prior sd tau of the MAP estimate (default 1)")
    p.add_argument("--starts", type=int, default=8, help="random starts of the L-BFGS least-squares fit")
    p.add_argument("--top-k", type=int, default=16, help="categorical model: K most likely tokens (default 16)")
    p.add_argument("--n-tokens", type=int, default=50000, help="sampled tokens per prompt and replicate")
    p.add_argument("--replicates", type=int, default=1000, help="categorical MLE replicates (default 1000)")
    p.add_argument("--steps", type=int, default=100,
                   help="most L-BFGS steps of a categorical MLE (default 100; the Gaussian fit gets 5x)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="preset: 3 prompts, 4000 observations, 300 replicates")
    p.add_argument("--out", default="results/fisher_cramer_rao", help="output folder")
    args = p.parse_args(argv)
    if args.quick:
        args.n_prompts = min(args.n_prompts, 3)
        args.n_obs = min(args.n_obs, 4000)
        args.replicates = min(args.replicates, 300)
    try:
        args.eps = sorted({float(e) for e in args.eps.split(",") if e.strip()}, reverse=True)
    except ValueError:
        p.error(f"--eps must be a comma list of numbers, got {args.eps!r}")
    if not args.eps or not all(0 < e < 1 for e in args.eps):
        p.error("--eps values must lie in (0, 1)")
    for name in ("n_prompts", "n_obs", "starts", "n_tokens", "replicates", "steps"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.n_obs < 3 or args.replicates < 3:
        p.error("--n-obs and --replicates must be >= 3 (a covariance needs samples)")
    if not 2 <= args.top_k <= 4096:
        p.error(f"--top-k must be in [2, 4096], got {args.top_k}")
    if not (args.sigma > 0 and args.prior_sd > 0):
        p.error("--sigma and --prior-sd must be > 0")
    if not 1 <= args.n_prompts <= 100:
        p.error(f"--n-prompts must be in [1, 100], got {args.n_prompts}")
    check_trait(p, args.trait)
    return args


def _summary(check: dict) -> dict:
    return {k: check[k] for k in CHECK_KEYS if k in check}


def least_squares_loss(v, data, aux):
    """0.5 ||R v - y||^2 / sigma^2 for aux = (R, y, sigma): the Gaussian negative log-likelihood."""
    import jax.numpy as jnp

    R, y, sigma = aux
    return 0.5 * jnp.sum((R @ v - y) ** 2) / sigma**2


def gaussian_study(R: np.ndarray, v_star: np.ndarray, args, rng: np.random.Generator) -> tuple[list[dict], dict]:
    """Rows (one per eps) for the reduced Gaussian model y = R v + N(0, sigma^2 I), plus plot data."""
    import jax
    import jax.numpy as jnp

    sigma, tau = args.sigma, args.prior_sd
    d = R.shape[1]
    svd = np.linalg.svd(R, full_matrices=False)
    s = svd[1]
    Y = v_star @ R.T + sigma * rng.standard_normal((args.n_obs, R.shape[0]))
    means = tau * rng.standard_normal((args.n_obs, d))            # prior mean per replicate, m ~ N(0, tau^2 I)
    est_map = fisher.map_estimate(R, Y, sigma, means, tau, svd=svd)
    # L-BFGS from random starts on one data set (the first observation)
    starts = np.stack([np.linalg.norm(v_star) * x / np.linalg.norm(x) for x in rng.standard_normal((args.starts, d))])
    with jax.enable_x64(True):
        fit = fits.minimise(least_squares_loss, starts, aux=(jnp.asarray(R), jnp.asarray(Y[0]), sigma),
                              steps=args.steps * 5, gtol=1e-12)
        v_gd = np.asarray(fit.v, np.float64)
    rows, per_eps = [], {}
    for eps, split in zip(args.eps, fisher.factor_splits(R / sigma, args.eps)):     # F = (R / sigma)^T (R / sigma)
        if split.rank == 0:
            continue
        bound = fisher.cramer_rao_bound(split)
        est = fisher.least_squares(R, Y, eps, svd=svd)
        check = fisher.covariance_check(est, bound, split.row, truth=v_star)
        ls0 = est[0]
        null_map = est_map @ split.null
        null_info = split.eigenvalues[split.rank] if split.rank < d else None
        row = {"eps": eps, "rank": split.rank, "null_dim": d - split.rank,
               "rank_from_singular_values": spectrum.numerical_rank(s, eps),
               # largest Fisher eigenvalue left in the eps-null space, times tau^2: << 1 means the data
               # cannot move the estimate there (prior dominates); >~ 1 means an eps-"null" direction is
               # still informative at this noise level
               "null_information_times_tau2": None if null_info is None else float(max(null_info, 0.0) * tau**2),
               **_summary(check),
               "ls_null_fraction_max": float(np.max(np.linalg.norm(est @ split.null, axis=1)
                                                    / np.linalg.norm(est, axis=1))),
               "map_null_minus_prior_rel_max": (float(np.max(np.linalg.norm(null_map - means @ split.null, axis=1)
                                                             / np.linalg.norm(means @ split.null, axis=1)))
                                                if split.null.shape[1] else None),
               "map_null_variance_over_tau2": (float(np.mean(np.var(null_map, axis=0, ddof=1)) / tau**2)
                                               if split.null.shape[1] else None),
               "gd_null_moved_rel_max": (float(np.max(np.linalg.norm((v_gd - starts) @ split.null, axis=1)
                                                      / np.linalg.norm(starts, axis=1)))
                                         if split.null.shape[1] else None),
               "gd_row_minus_ls_rel_max": float(np.max(np.linalg.norm((v_gd - ls0) @ split.row, axis=1)
                                                       / np.linalg.norm(ls0))),
               "gd_null_spread_rel": (float(np.mean(np.std(v_gd @ split.null, axis=0)) / np.linalg.norm(v_star))
                                      if split.null.shape[1] else None)}
        rows.append(row)
        per_eps[eps] = {"bound": check["bound_variances"], "ratios": check["variance_ratios"]}
    return rows, {"per_eps": per_eps, "singular_values": s}


def categorical_study(z_top, J_top, p_top, args, rng: np.random.Generator, v_scale: float) -> tuple[dict, dict]:
    """Categorical MLE on the top-K linear-logit model of B prompts; tokens drawn at v = 0."""
    import jax
    import jax.numpy as jnp

    B, K, d = J_top.shape
    eps = min(args.eps)
    split = fisher.factor_splits(fisher.categorical_fisher_factor(J_top, p_top), [eps])[0]
    counts = fits.sample_counts(p_top, args.n_tokens, args.replicates, rng)
    starts = rng.standard_normal((args.replicates, d))
    starts *= v_scale / np.linalg.norm(starts, axis=1, keepdims=True)
    with jax.enable_x64(True):
        # gtol 1e-8: stop once the gradient is 1e-8 of its start (far below the MLE's sampling spread)
        fit = fits.categorical_mle(fits.linear_logits, counts, starts, (jnp.asarray(z_top), jnp.asarray(J_top)),
                                     steps=args.steps, gtol=1e-8)
        v, grad_norm = np.asarray(fit.v, np.float64), np.asarray(fit.grad_norm, np.float64)
    bound = fisher.cramer_rao_bound(split) / args.n_tokens
    finite = np.all(np.isfinite(v), axis=1)
    check = fisher.covariance_check(v[finite], bound, split.row, truth=np.zeros(d))
    row = {"n_prompts": B, "top_k": K, "eps": eps, "rank": split.rank, "expected_rank": B * (K - 1),
           "n_tokens": args.n_tokens, "replicates": args.replicates, "converged_replicates": int(finite.sum()),
           "min_expected_count": float(p_top.min() * args.n_tokens),
           "top_k_mass_min": None, **_summary(check),
           "grad_norm_max": float(np.max(grad_norm[finite])),
           "null_moved_rel_max": (float(np.max(np.linalg.norm((v[finite] - starts[finite]) @ split.null, axis=1)
                                               / v_scale)) if split.null.shape[1] else None)}
    return row, {"bound": check["bound_variances"], "ratios": check["variance_ratios"]}


def run(args) -> dict:
    from tqdm import tqdm

    t0 = time.time()
    lm, layer, v_star = trait_study(args)
    prompts = data.neutral_eval_prompts()[: args.n_prompts]
    batch = lm.tokenize(prompts)
    rng = np.random.default_rng(args.seed)

    print(f"exact J at layer {layer} for {len(prompts)} prompts ...", file=sys.stderr)
    t_jac = time.time()
    op = sj.jacobian_operator(lm, batch, layer, observable="logits")
    d_mats = np.asarray(op.normed_tail_jacobian(), np.float64)           # d norm(h_L) / dh_layer, (B, d, d)
    factors = op.factors(d_mats)                                         # C_i: J_i^T J_i = C_i^T C_i
    logits = np.asarray(op.value(), np.float64)
    t_jac = time.time() - t_jac
    w_u = np.asarray(lm.unembedding, np.float64)
    n = len(prompts)
    designs = [(1, factors[0])] + ([(n, list(spectrum.stack_factors(factors))[-1])] if n > 1 else [])

    result = {
        "model": lm.source, "model_name": Path(lm.source).name, "d": lm.d, "num_layers": lm.num_layers,
        "layer": layer, "prompts": prompts, "trait": args.trait, "v_star_norm": float(np.linalg.norm(v_star)),
        "settings": {k: getattr(args, k) for k in ("n_prompts", "sigma", "n_obs", "eps", "prior_sd", "starts",
                                                   "top_k", "n_tokens", "replicates", "steps", "seed", "quick")},
        "jacobian_seconds": t_jac,
        "gaussian_model": ("o_i = J_i v + N(0, sigma^2 I_V), reduced exactly to y = R_N v + N(0, sigma^2 I_d) with "
                           "R_N^T R_N = sum_i J_i^T J_i (Q^T o is sufficient); estimates: min-norm truncated LS, "
                           "MAP with prior N(m, tau^2 I) (m ~ N(0, tau^2 I) per replicate), L-BFGS from random starts"),
        "categorical_model": ("token ~ softmax over the top-K tokens of z_K + J_K v (renormalised, linear in v), "
                              "tokens drawn at v = 0; MLE by optax L-BFGS; bound F^+ / n_tokens, "
                              "F = sum_i J_K,i^T (diag p_i - p_i p_i^T) J_K,i"),
        "gaussian": [], "categorical": [], "meta": io.run_metadata(lm, seeds={"seed": args.seed}),
    }
    plots = {"gaussian": {}, "categorical": {}}
    bar = tqdm(total=2 * len(designs), desc="designs", unit="study", file=sys.stderr)
    for n_used, R in designs:
        rows, curves = gaussian_study(R, v_star, args, rng)
        for row in rows:
            result["gaussian"].append({"n_prompts": n_used, **row})
        plots["gaussian"][n_used] = curves
        bar.update(1)

        top = np.argsort(-logits[:n_used], axis=1)[:, : args.top_k]
        z_top = np.take_along_axis(logits[:n_used], top, axis=1)
        p_full = np.exp(stats.log_softmax(logits[:n_used]))
        p_top = np.exp(stats.log_softmax(z_top))
        J_top = np.einsum("bkd,bde->bke", w_u[top], d_mats[:n_used])          # rows of J_i for the top-K tokens
        row, curves = categorical_study(z_top, J_top, p_top, args, rng, float(np.linalg.norm(v_star)))
        row["top_k_mass_min"] = float(np.take_along_axis(p_full, top, axis=1).sum(axis=1).min())
        result["categorical"].append(row)
        plots["categorical"][n_used] = curves
        bar.update(1)
    bar.close()
    result["seconds_total"] = time.time() - t0
    out_dir = Path(args.out)
    io.write_json_atomic(out_dir / "fisher_cramer_rao.json", result)
    io.write_csv(result["gaussian"], out_dir / "gaussian.csv")
    io.write_csv(result["categorical"], out_dir / "categorical.csv")
    plot(result, plots, out_dir / "fisher_cramer_rao.png")
    print_tables(result)
    wrote([out_dir / name for name in ("fisher_cramer_rao.json", "gaussian.csv", "categorical.csv",
                                       "fisher_cramer_rao.png")], t0)
    return result


def plot(result: dict, plots: dict, path: Path) -> None:
    """Left: Gaussian per-direction empirical variance / bound against the bound (smallest eps, every design);
    middle: the same for the categorical MLE; right: sqrt-eigenvalue spectra of the Gaussian Fisher."""
    from steerjax import plotting
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.3))
    eps_min = min(result["settings"]["eps"])
    for (n, g), marker in zip(plots["gaussian"].items(), "os"):
        key = min(g["per_eps"])
        axes[0].scatter(g["per_eps"][key]["bound"], g["per_eps"][key]["ratios"], s=6, marker=marker,
                        label=f"N = {n} (rank {len(g['per_eps'][key]['ratios'])}, eps {key:g})")
    sd = np.sqrt(2 / (result["settings"]["n_obs"] - 1))
    for ax, label in ((axes[0], f"Gaussian, n_obs = {result['settings']['n_obs']}"),
                      (axes[1], f"categorical top-{result['settings']['top_k']}, {result['settings']['replicates']} "
                                f"replicates")):
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set(xscale="log", xlabel="Cramér-Rao bound along eigenvector u (u^T F^+ u)",
               ylabel="empirical variance / bound", title=label)
    axes[0].axhspan(1 - 3 * sd, 1 + 3 * sd, color="grey", alpha=0.2, label="+-3 MC sd")
    sd_c = np.sqrt(2 / (result["settings"]["replicates"] - 1))
    for (n, c), marker in zip(plots["categorical"].items(), "os"):
        axes[1].scatter(c["bound"], c["ratios"], s=10, marker=marker, label=f"N = {n} (rank {len(c['ratios'])})")
    axes[1].axhspan(1 - 3 * sd_c, 1 + 3 * sd_c, color="grey", alpha=0.2, label="+-3 MC sd")
    for n, g in plots["gaussian"].items():
        s = np.asarray(g["singular_values"])
        axes[2].semilogy(np.arange(1, s.size + 1), np.maximum(s / s[0], 1e-18), label=f"N = {n} prompts")
    for eps in result["settings"]["eps"]:
        axes[2].axhline(eps, color="grey", ls=":", lw=0.8)
    axes[2].set(xlabel="index k", ylabel="sqrt(lambda_k / lambda_max) of the Fisher matrix",
                title=f"Fisher spectrum (eps lines; smallest {eps_min:g})")
    for ax in axes:
        ax.legend(fontsize=7)
    fig.suptitle(f"{result['model_name']}: Cramér-Rao check at layer {result['layer']}")
    plotting.save_figure(fig, path)


def print_tables(result: dict) -> None:
    s = result["settings"]
    print(f"{result['model_name']}, layer {result['layer']}: Gaussian model, sigma = {s['sigma']:g}, "
          f"{s['n_obs']} simulated observations; variance ratio = empirical / Cramér-Rao along F's eigenvectors "
          f"(MC sd per direction {np.sqrt(2 / (s['n_obs'] - 1)):.3f})")
    print(f"{'N':>3} {'eps':>7} {'rank':>5} {'null':>5} {'ratio mean':>10} {'min':>6} {'max':>6} {'whiten err':>10} "
          f"{'(MC exp)':>8} {'LS null':>8} {'null info*tau2':>14} {'MAP-m null':>10} {'MAP null var/tau2':>17} "
          f"{'GD null moved':>13}")
    for r in result["gaussian"]:
        print(f"{r['n_prompts']:>3} {r['eps']:>7.0e} {r['rank']:>5} {r['null_dim']:>5} "
              f"{r['variance_ratio_mean']:>10.4f} "
              f"{r['variance_ratio_min']:>6.3f} {r['variance_ratio_max']:>6.3f} {r['whitened_rel_error']:>10.4f} "
              f"{r['expected_whitened_rel_error']:>8.4f} {r['ls_null_fraction_max']:>8.1e} "
              f"{fmt(r['null_information_times_tau2'], '>14.1e')} {fmt(r['map_null_minus_prior_rel_max'], '>10.1e')} "
              f"{fmt(r['map_null_variance_over_tau2'], '>17.4f')} "
              f"{fmt(r['gd_null_moved_rel_max'], '>13.1e')}")
    print(f"\ncategorical model: top-{s['top_k']} tokens, {s['n_tokens']} tokens per prompt, {s['replicates']} "
          f"replicates, MLE by L-BFGS (MC sd per direction {np.sqrt(2 / (s['replicates'] - 1)):.3f})")
    print(f"{'N':>3} {'rank':>5} {'N(K-1)':>6} {'ratio mean':>10} {'min':>6} {'max':>6} {'whiten err':>10} "
          f"{'(MC exp)':>8} {'bias(whit.)':>11} {'min count':>9} {'null moved':>10}")
    for r in result["categorical"]:
        print(f"{r['n_prompts']:>3} {r['rank']:>5} {r['expected_rank']:>6} {r['variance_ratio_mean']:>10.4f} "
              f"{r['variance_ratio_min']:>6.3f} {r['variance_ratio_max']:>6.3f} {r['whitened_rel_error']:>10.4f} "
              f"{r['expected_whitened_rel_error']:>8.4f} {r['bias_whitened']:>11.3f} {r['min_expected_count']:>9.0f} "
              f"{fmt(r['null_moved_rel_max'], '>10.1e')}")


def main(argv=None) -> int:
    return run_cli(parse_args, run, argv)


if __name__ == "__main__":
    sys.exit(main())
