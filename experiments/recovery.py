"""Recovering a hidden steering vector from the steered output distributions alone.

A hidden v* (the trait's mean-difference direction, rescaled to ||v*|| = v_scale * mean ||h||) is added to
h_layer at the last token of N neutral prompts; only the steered next-token distributions
p_i* = softmax(F_i(h_i + v*)) are observed (exact tail of blocks layer..L-1 for one token against the cached
prefix). v is recovered by minimising sum_i KL(p_i* || p_i(v)) with optax from random starts
(||v0|| = start_scale * ||v*||) and compared with v* on two row / null splits of the directions at v*:
  logprobs   the stacked Jacobians of the log-probabilities, sum_i J_i^T J_i (what exact distributions
             determine in principle: p_i(v) = p_i* forces J_i (v - v*) ~ 0 to first order)
  fisher     the stacked categorical Fisher sum_i J_i^T (diag p_i - p_i p_i^T) J_i (logit J_i): the KL's own
             curvature at v*, which weights each token by its probability
each at eps (row space = sqrt(eigenvalue) > eps * sqrt(max)). Reported per restart: ||P_row (v - v*)|| and
||P_null (v - v*)|| relative to ||v*||, the same for the start, the final KL, how far the null component moved
from the start, and the KL on held-out prompts (not used in the fit). The first N of the prompts are used for
each N in the schedule, so the null space shrinks as prompts are stacked.
Writes DIR/recovery.json, recovery.csv and recovery.png; DIR/recovery_units.json keeps each N's fit as soon
as it finishes, so a killed run resumes (--fresh starts over).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

import steerjax as sj
from steerjax import data, fisher, fits, io, spectrum, stats, studies, tail
from steerjax.cli import ArgumentParser, fmt, check_trait, run_cli, trait_study, wrote, MODEL_HELP

SPLITS = ("logprobs", "fisher")


def parse_args(argv):
    p = ArgumentParser(description=__doc__)
    p.add_argument("--model", default=None, help=MODEL_HELP)
    p.add_argument("--layer", type=int, default=None, help="steered layer (default L // 2)")
    p.add_argument("--n-prompts", type=int, default=8, help="largest number of observed prompts (default 8)")
    p.add_argument("--schedule", default=None, help="comma list of N (default: 1 and --n-prompts)")
    p.add_argument("--n-heldout", type=int, default=4, help="held-out prompts for the KL check (default 4)")
    p.add_argument("--trait", default="formality", help="trait whose mean-difference direction is v*")
    p.add_argument("--v-scale", type=float, default=0.1, help="||v*|| / mean ||h|| (default 0.1)")
    p.add_argument("--start-scale", type=float, default=1.0, help="||v0|| / ||v*|| of random starts (default 1)")
    p.add_argument("--restarts", type=int, default=4, help="random starts per N (default 4)")
    p.add_argument("--optimizer", choices=("lbfgs", "adam"), default="lbfgs",
                   help="optax L-BFGS (default; its updates stay in the span of the gradients) or Adam")
    p.add_argument("--linesearch", choices=("backtracking", "zoom"), default="backtracking",
                   help="L-BFGS line search: backtracking Armijo (default; usually one evaluation per step) or "
                        "optax's zoom (strong Wolfe; many more evaluations per step under vmap)")
    p.add_argument("--lr", type=float, default=0.05, help="Adam peak learning rate in units of ||v*|| (cosine decay)")
    p.add_argument("--steps", type=int, default=200, help="most optimiser steps (default 200)")
    p.add_argument("--gtol", type=float, default=1e-4,
                   help="stop a fit once ||grad|| <= gtol * ||grad at the start|| (default 1e-4; 0: every step)")
    p.add_argument("--eps", default="1e-1,1e-2,1e-3", help="relative tolerances of the row/null splits")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="preset: N = 1 and 3, 2 held out, 3 restarts, 100 steps")
    p.add_argument("--out", default="results/recovery", help="output folder")
    p.add_argument("--fresh", action="store_true", help="discard fitted N in --out instead of resuming")
    args = p.parse_args(argv)
    if args.quick:
        args.n_prompts = min(args.n_prompts, 3)
        args.n_heldout = min(args.n_heldout, 2)
        args.restarts = min(args.restarts, 3)
        args.steps = min(args.steps, 100)
    try:
        args.schedule = (sorted({int(x) for x in args.schedule.split(",") if x.strip()}) if args.schedule
                         else sorted({1, args.n_prompts}))
        args.eps = sorted({float(e) for e in args.eps.split(",") if e.strip()}, reverse=True)
    except ValueError:
        p.error("--schedule must be a comma list of ints and --eps of numbers")
    if not args.schedule or min(args.schedule) < 1 or max(args.schedule) > args.n_prompts:
        p.error(f"--schedule values must lie in [1, --n-prompts = {args.n_prompts}]")
    if not args.eps or not all(0 < e < 1 for e in args.eps):
        p.error("--eps values must lie in (0, 1)")
    if not 1 <= args.n_prompts + args.n_heldout <= 100 or args.n_heldout < 0:
        p.error("need --n-prompts >= 1, --n-heldout >= 0 and at most 100 prompts in all")
    if args.restarts < 1 or args.steps < 1:
        p.error("--restarts and --steps must be >= 1")
    if not 0 <= args.gtol < 1:
        p.error("--gtol must lie in [0, 1)")
    if not (args.v_scale > 0 and args.start_scale > 0 and args.lr > 0):
        p.error("--v-scale, --start-scale and --lr must be > 0")
    check_trait(p, args.trait)
    return args


def make_optimizer(args, v_norm: float):
    import optax

    if args.optimizer == "lbfgs":
        if args.linesearch == "zoom":
            return None                                  # fits.minimise's default: optax.lbfgs()
        return optax.lbfgs(linesearch=optax.scale_by_backtracking_linesearch(max_backtracking_steps=30,
                                                                             store_grad=True))
    return optax.adam(optax.cosine_decay_schedule(args.lr * v_norm, args.steps, alpha=1e-3))


def kl_rows(target_logits: np.ndarray, logits: np.ndarray) -> np.ndarray:
    """KL(softmax(target) || softmax(logits)) per row."""
    return stats.kl_divergence(target_logits, logits)


def run(args) -> dict:
    import jax.numpy as jnp
    from tqdm import tqdm

    t0 = time.time()
    lm, layer, v_dir = trait_study(args)
    all_prompts = data.neutral_eval_prompts()[: args.n_prompts + args.n_heldout]
    prompts, heldout = all_prompts[: args.n_prompts], all_prompts[args.n_prompts:]
    batch = lm.tokenize(all_prompts)
    op = sj.jacobian_operator(lm, batch, layer, observable="logprobs")
    h_norms = np.linalg.norm(op.steered_states(), axis=1)
    v_star = v_dir / np.linalg.norm(v_dir) * args.v_scale * float(h_norms[: args.n_prompts].mean())
    v_norm = float(np.linalg.norm(v_star))
    fn = tail.steered_observable(lm.config, "logits")
    aux_all = op.tail_args()
    target = np.asarray(fn(jnp.asarray(v_star, lm.dtype), aux_all), np.float64)        # observed (all prompts)
    unsteered = np.asarray(op.value(), np.float64)

    print(f"exact J at v* (layer {layer}) for {args.n_prompts} prompts ...", file=sys.stderr)
    t_jac = time.time()
    aux_obs = op.tail_args(slice(0, args.n_prompts))
    observed = sj.TokenBatch(*(np.asarray(x)[: args.n_prompts] for x in batch))
    op_star = sj.jacobian_operator(lm, observed, layer, observable="logprobs", at=v_star)   # J_i at v*
    d_mats = np.asarray(op_star.normed_tail_jacobian(), np.float64)
    factors = op_star.factors(d_mats)                                                # log-prob J_i at v*
    w_u = np.asarray(lm.unembedding, np.float64)
    p_star = np.exp(stats.log_softmax(target[: args.n_prompts]))
    # square-root factors of the categorical Fisher: sqrt(W_U^T (diag p - p p^T) W_U) D_i
    fisher_factors = [fisher.psd_sqrt(fisher.categorical_fisher(w_u, p)) @ dm for p, dm in zip(p_star, d_mats)]
    t_jac = time.time() - t_jac

    result = {
        "model": lm.source, "model_name": Path(lm.source).name, "d": lm.d, "num_layers": lm.num_layers,
        "layer": layer, "prompts": prompts, "heldout_prompts": heldout, "trait": args.trait,
        "v_star_norm": v_norm, "h_norm_mean": float(h_norms.mean()),
        "settings": {k: getattr(args, k) for k in ("n_prompts", "schedule", "n_heldout", "v_scale", "start_scale",
                                                   "restarts", "optimizer", "linesearch", "lr", "steps", "gtol",
                                                   "eps", "seed", "quick")},
        "observed_kl_from_unsteered": kl_rows(unsteered[: args.n_prompts], target[: args.n_prompts]),
        "jacobian_seconds": t_jac, "splits": {
            "logprobs": "eigen-split of sum_i J_i^T J_i, J_i = d log softmax / dh at v* (stacked first N prompts)",
            "fisher": "eigen-split of sum_i J_i^T (diag p_i - p_i p_i^T) J_i at v* (logit J_i, p_i = p_i*)"},
        "designs": [], "meta": io.run_metadata(lm, seeds={"seed": args.seed}),
    }
    # running triangular factors of the stacked operators (QR updates: no squared condition numbers)
    running = {"logprobs": dict(zip(range(1, args.n_prompts + 1), spectrum.stack_factors(factors))),
               "fisher": dict(zip(range(1, args.n_prompts + 1), spectrum.stack_factors(fisher_factors)))}
    # one fit (all restarts, vmapped) per N, saved as a unit as soon as it finishes: a killed run resumes with
    # the finished N; every N reuses one compiled program (prompt weights 1 for the first N prompts, 0 after)
    out_dir = Path(args.out)
    store = io.UnitStore(out_dir / "recovery_units.json", {"model": lm.source, "layer": layer, **result["settings"]},
                         fresh=args.fresh, meta=result["meta"])
    if store.resumed:
        print(f"resuming: {store.resumed} N already fitted in {store.path}", file=sys.stderr)
    optimizer = make_optimizer(args, v_norm)
    starts = {n: random_starts(v_star, args.restarts, args.start_scale, np.random.default_rng([args.seed, n]))
              for n in args.schedule}
    for n in args.schedule:
        if f"N={n}" in store:
            continue
        print(f"fitting N = {n}: {args.restarts} starts with {args.optimizer} ...", file=sys.stderr)
        t_fit = time.time()
        weights = np.tile(np.arange(args.n_prompts) < n, (args.restarts, 1))
        fit = fits.recover(fn, jnp.asarray(target[: args.n_prompts], lm.dtype), jnp.asarray(starts[n], lm.dtype),
                             aux_obs, optimizer, args.steps, gtol=args.gtol, weights=weights)
        store.put(f"N={n}", {"v_hat": np.asarray(fit.v, np.float64), "loss": np.asarray(fit.loss, np.float64),
                             "grad_norm": np.asarray(fit.grad_norm, np.float64), "n_steps": np.asarray(fit.n_steps),
                             "history": np.asarray(fit.history, np.float64), "seconds": time.time() - t_fit})
    result["fit_seconds"] = sum(store[f"N={n}"]["seconds"] for n in args.schedule)
    histories = {}
    bar = tqdm(total=len(args.schedule), desc="N prompts", unit="N", file=sys.stderr)
    for n in args.schedule:
        unit = store[f"N={n}"]
        v_hat, starts_n = np.asarray(unit["v_hat"], np.float64), starts[n]
        fitted = np.stack([np.asarray(fn(jnp.asarray(v, lm.dtype), aux_all), np.float64) for v in v_hat])
        splits = {name: dict(zip(args.eps, fisher.factor_splits(running[name][n], args.eps))) for name in SPLITS}
        design = {"n_prompts": n, "null_dim": {}, "restarts": []}
        for name, by_eps in splits.items():
            design["null_dim"][name] = {spectrum.eps_key(e): split.null.shape[1] for e, split in by_eps.items()}
        for r in range(args.restarts):
            row = {"restart": r, "kl_fit": float(unit["loss"][r]), "grad_norm": float(unit["grad_norm"][r]),
                   "n_steps": int(unit["n_steps"][r]),
                   "kl_observed_mean": float(kl_rows(target[:n], fitted[r][:n]).mean()),
                   "kl_unobserved_mean": (float(kl_rows(target[n:], fitted[r][n:]).mean())
                                          if target.shape[0] > n else None),
                   "rel_distance": float(np.linalg.norm(v_hat[r] - v_star) / v_norm),
                   "start_rel_distance": float(np.linalg.norm(starts_n[r] - v_star) / v_norm)}
            for name, by_eps in splits.items():
                for e, split in by_eps.items():
                    err = fisher.subspace_errors(v_hat[r], v_star, split)
                    err0 = fisher.subspace_errors(starts_n[r], v_star, split)
                    key = f"{name}_{spectrum.eps_key(e)}"
                    empty = split.null.shape[1] == 0          # no null space at this eps: nothing to report there
                    row[f"{key}_row_err"] = float(err["row"][0])
                    row[f"{key}_null_err"] = None if empty else float(err["null"][0])
                    row[f"{key}_start_row_err"] = float(err0["row"][0])
                    row[f"{key}_start_null_err"] = None if empty else float(err0["null"][0])
                    row[f"{key}_null_moved"] = (None if empty else
                                                float(np.linalg.norm((v_hat[r] - starts_n[r]) @ split.null) / v_norm))
            design["restarts"].append(row)
        design["pairwise"] = pairwise_spread(v_hat, splits, v_norm)
        histories[n] = np.asarray(unit["history"], np.float64)
        result["designs"].append(design)
        bar.update(1)
    bar.close()
    result["seconds_total"] = time.time() - t0
    io.write_json_atomic(out_dir / "recovery.json", result)
    io.write_csv([{"n_prompts": d["n_prompts"], **r} for d in result["designs"] for r in d["restarts"]],
                 out_dir / "recovery.csv")
    plot(result, histories, out_dir / "recovery.png")
    print_tables(result)
    wrote([out_dir / name for name in ("recovery.json", "recovery.csv", "recovery.png")], t0)
    return result


def random_starts(v_star: np.ndarray, restarts: int, scale: float, rng: np.random.Generator) -> np.ndarray:
    """(restarts, d) random directions of norm scale * ||v*||, drawn in turn from rng."""
    return np.stack([studies.random_like(v_star, rng) * scale for _ in range(restarts)])


def pairwise_spread(v_hat: np.ndarray, splits: dict, v_norm: float) -> dict:
    """Mean over restart pairs of ||P_row (v_i - v_j)|| and ||P_null (v_i - v_j)||, relative to ||v*||, per
    split and eps (None with fewer than 2 restarts or an empty null space): distinct recovered vectors that
    agree on the row space differ along the null space."""
    pairs = [(i, j) for i in range(len(v_hat)) for j in range(i + 1, len(v_hat))]
    out = {}
    for name, by_eps in splits.items():
        for e, split in by_eps.items():
            diffs = np.stack([v_hat[i] - v_hat[j] for i, j in pairs]) if pairs else None
            key = f"{name}_{spectrum.eps_key(e)}"
            out[f"{key}_row"] = (None if diffs is None else
                                 float(np.linalg.norm(diffs @ split.row, axis=1).mean() / v_norm))
            out[f"{key}_null"] = (None if diffs is None or split.null.shape[1] == 0 else
                                  float(np.linalg.norm(diffs @ split.null, axis=1).mean() / v_norm))
    return out


def plot(result: dict, histories: dict, path: Path) -> None:
    """Left/middle: row- and null-space error (relative to ||v*||) against eps for each split, one line per N
    (median over restarts; start errors dashed); right: KL during the fit."""
    from steerjax import plotting
    import matplotlib.pyplot as plt

    eps = result["settings"]["eps"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.3))
    colors = plt.cm.viridis(np.linspace(0, 0.85, len(result["designs"])))
    for ax, name in zip(axes[:2], SPLITS):
        for color, design in zip(colors, result["designs"]):
            keys = [f"{name}_{sj_eps}" for sj_eps in map(_eps_key, eps)]
            for kind, ls, marker in (("row", "-", "o"), ("null", "--", "s"), ("start_null", ":", None)):
                ys = [_median([r[f"{k}_{kind}_err"] for r in design["restarts"]]) for k in keys]
                label = {"row": "row space", "null": "null space", "start_null": "start, null space"}[kind]
                ax.loglog(eps, ys, ls=ls, marker=marker, color=color, label=f"N = {design['n_prompts']}: {label}")
        ax.set(xlabel="eps (row space: sqrt(lambda) > eps sqrt(lambda_max))", ylabel="||P (v - v*)|| / ||v*||",
               title=f"{name} split at v*")
        ax.invert_xaxis()
        ax.legend(fontsize=6)
    for color, (n, hist) in zip(colors, histories.items()):
        for r, h in enumerate(hist):
            axes[2].semilogy(np.maximum(h, 1e-12), color=color, alpha=0.7, label=f"N = {n}" if r == 0 else None)
    axes[2].set(xlabel="step", ylabel="sum_i KL(p_i* || p_i(v))", title=f"{result['settings']['optimizer']} fits")
    axes[2].legend(fontsize=7)
    fig.suptitle(f"{result['model_name']}: recovering v* (||v*|| = {result['v_star_norm']:.1f}) at layer "
                 f"{result['layer']} from {result['settings']['restarts']} random starts")
    plotting.save_figure(fig, path)


def _median(values) -> float:
    """Median ignoring None (an empty null space); NaN if nothing is left (not drawn)."""
    values = [x for x in values if x is not None]
    return float(np.median(values)) if values else np.nan


def _eps_key(e: float) -> str:
    return spectrum.eps_key(e)


def print_tables(result: dict) -> None:
    s = result["settings"]
    print(f"{result['model_name']}, layer {result['layer']}: hidden v* ({result['trait']} direction, "
          f"||v*|| = {result['v_star_norm']:.2f} = {s['v_scale']:g} mean ||h||), {s['optimizer']}, <= {s['steps']} "
          f"steps from {s['restarts']} random starts (||v0|| = {s['start_scale']:g} ||v*||), fits took "
          f"{result['fit_seconds']:.0f} s. Errors relative to ||v*||.")
    for design in result["designs"]:
        n = design["n_prompts"]
        print(f"\nN = {n} observed prompts; null dims: " + "; ".join(
            f"{k}: {v}" for k, v in design["null_dim"].items()))
        head = f"{'start':>5} {'steps':>5} {'KL fit':>9} {'KL held-out':>11} {'|v-v*|':>7}"
        for name in SPLITS:
            for e in s["eps"]:
                head += f" {name[:3] + ' ' + _eps_key(e) + ' row/null':>22}"
        print(head)
        for r in design["restarts"]:
            line = (f"{r['restart']:>5} {r['n_steps']:>5} {r['kl_fit']:>9.2e} {fmt(r['kl_unobserved_mean'], '>11.2e')} "
                    f"{r['rel_distance']:>7.3f}")
            for name in SPLITS:
                for e in s["eps"]:
                    k = f"{name}_{_eps_key(e)}"
                    null = r[k + "_null_err"]
                    line += f" {r[k + '_row_err']:>10.2e}/" + (f"{null:<11.3f}" if null is not None else f"{'-':<11}")
            print(line)
        pw = design["pairwise"]
        print("  between restarts, mean ||P (v_i - v_j)|| / ||v*|| row/null: " + "; ".join(
            f"{name[:3]} {_eps_key(e)} {fmt(pw[f'{name}_{_eps_key(e)}_row'], '.2e')}/"
            f"{fmt(pw[f'{name}_{_eps_key(e)}_null'], '.3f')}" for name in SPLITS for e in s["eps"]))


def main(argv=None) -> int:
    return run_cli(parse_args, run, argv)


if __name__ == "__main__":
    sys.exit(main())
