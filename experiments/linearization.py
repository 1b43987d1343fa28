"""Beyond the linear approximation: how fast does steering leave the regime where J describes it?

For each prompt i, F_i(x) = last-position logits (or log-probs) with x added to h_layer at the last prompt
token (blocks layer..L-1 re-run for one token against the cached prefix: exact), J_i = dF_i/dx at 0. For
a steering direction w and a in logspace(a_min, a_max) the residual of the first-order expansion
    r(a) = ||F_i(a s w) - F_i(0) - a s J_i w||,   s = ||h_i|| / ||v||
(so a = ||a s v|| / ||h_i||: the steering size relative to the residual stream) is compared with the
linear term ||a s J_i w||. Directions (||w|| = ||v|| except v + v_null):
    v            the trait's mean-difference vector
    v+v_null     v plus a direction v_null from the measured ker(J_i) (random combination of the k smallest
                 right singular vectors of the exact J_i, orthogonalised against v; studies.kernel_direction)
    v_null       that null direction alone: J_i v_null ~ 0, so its whole effect is nonlinear
    v_perp       random direction orthogonal to v (studies.orthogonal_to)
The log-log slope of r(a) is fitted where r is above the rounding floor (noise_factor * machine eps *
||F_i(0)||) and a <= fit_max (the small-a regime); Taylor's theorem predicts 2. a_10pct is the smallest
grid a with r(a) >= 0.1 ||a s J_i w|| (where the linear prediction is 10% off). float64 model by default.
Writes DIR/linearization.json, linearization.csv and linearization.png.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

import steerjax as sj
from steerjax import data, io, linearization, studies, tail
from steerjax.cli import ArgumentParser, fmt, check_trait, run_cli, trait_study, wrote, MODEL_HELP
from steerjax.tail import OBSERVABLES

DIRECTIONS = ("v", "v+v_null", "v_null", "v_perp")


def parse_args(argv):
    p = ArgumentParser(description=__doc__)
    p.add_argument("--model", default=None, help=MODEL_HELP)
    p.add_argument("--dtype", choices=("float64", "float32"), default="float64",
                   help="model dtype (default float64: the floor of the fit is rounding noise)")
    p.add_argument("--layer", type=int, default=None, help="steered layer (default L // 2)")
    p.add_argument("--n-prompts", type=int, default=4, help="neutral prompts (default 4)")
    p.add_argument("--trait", default="formality", help="trait whose mean-difference vector is v")
    p.add_argument("--observable", choices=OBSERVABLES, default="logits")
    p.add_argument("--a-min", type=float, default=1e-6, help="smallest relative steering size (default 1e-6)")
    p.add_argument("--a-max", type=float, default=1.0, help="largest relative steering size (default 1)")
    p.add_argument("--n-a", type=int, default=31, help="grid points in logspace(a_min, a_max) (default 31)")
    p.add_argument("--fit-max", type=float, default=1e-2, help="largest a used in the slope fit (default 1e-2)")
    p.add_argument("--noise-factor", type=float, default=1e4,
                   help="fit only residuals above noise_factor * machine eps * ||F(0)|| (default 1e4)")
    p.add_argument("--k-smallest", type=int, default=32, help="dimension of the measured kernel (default 32)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="preset: 2 prompts, 19 grid points")
    p.add_argument("--out", default="results/linearization", help="output folder")
    args = p.parse_args(argv)
    if args.quick:
        args.n_prompts = min(args.n_prompts, 2)
        args.n_a = min(args.n_a, 19)
    if not 0 < args.a_min < args.a_max or not np.isfinite(args.a_max):
        p.error("need 0 < --a-min < --a-max (finite)")
    if args.n_a < 5:
        p.error(f"--n-a must be >= 5, got {args.n_a}")
    if not args.fit_max > 0 or not args.noise_factor > 0:
        p.error("--fit-max and --noise-factor must be > 0")
    if not 1 <= args.n_prompts <= 100:
        p.error(f"--n-prompts must be in [1, 100], got {args.n_prompts}")
    check_trait(p, args.trait)
    return args


def first_crossing(a: np.ndarray, rel: np.ndarray, level: float) -> float | None:
    """Smallest grid a with rel >= level (None if never)."""
    hit = np.nonzero(rel >= level)[0]
    return float(a[hit[0]]) if hit.size else None


def run(args) -> dict:
    import jax.numpy as jnp
    from tqdm import tqdm

    t0 = time.time()
    lm, layer, v = trait_study(args, dtype=args.dtype)
    if not 1 <= args.k_smallest < lm.d:
        raise sj.InputError(f"--k-smallest must be in [1, {lm.d - 1}], got {args.k_smallest}")
    prompts = data.neutral_eval_prompts()[: args.n_prompts]
    batch = lm.tokenize(prompts)
    a_values = np.logspace(np.log10(args.a_min), np.log10(args.a_max), args.n_a)

    print(f"exact J at layer {layer} ({lm.dtype}) for {len(prompts)} prompts ...", file=sys.stderr)
    t_jac = time.time()
    op = sj.jacobian_operator(lm, batch, layer, observable=args.observable)
    factors = op.factors()
    t_jac = time.time() - t_jac
    h_norms = np.linalg.norm(op.steered_states(), axis=1)
    base = np.asarray(op.value(), np.float64)
    fn = tail.steered_observable(lm.config, args.observable)
    floor_eps = float(np.finfo(lm.dtype).eps)

    result = {
        "model": lm.source, "model_name": Path(lm.source).name, "d": lm.d, "num_layers": lm.num_layers,
        "dtype": str(np.dtype(lm.dtype)), "layer": layer, "observable": args.observable, "prompts": prompts,
        "trait": args.trait, "v_norm": float(np.linalg.norm(v)), "h_norms": h_norms,
        "settings": {k: getattr(args, k) for k in ("n_prompts", "a_min", "a_max", "n_a", "fit_max", "noise_factor",
                                                   "k_smallest", "seed", "quick")},
        "a_values": a_values, "jacobian_seconds": t_jac,
        "definition": "r(a) = ||F(a s w) - F(0) - a s J w||, s = ||h|| / ||v||; slope of log r vs log a fitted "
                      "where r > noise_factor * eps * ||F(0)|| and a <= fit_max",
        "directions": {"v": "trait mean-difference vector", "v+v_null": "v + v_null, ||v_null|| = ||v||",
                       "v_null": "random combination of the k smallest right singular vectors of J, "
                                 "orthogonal to v, ||v_null|| = ||v||",
                       "v_perp": "Gaussian Gram-Schmidt'ed against v, ||v_perp|| = ||v||"},
        "rows": [], "curves": [], "meta": io.run_metadata(lm, seeds={"seed": args.seed}),
    }
    bar = tqdm(total=len(prompts), desc="prompts", unit="prompt", file=sys.stderr)
    for i in range(len(prompts)):
        rng = np.random.default_rng([args.seed, i])
        basis, rel_sv = studies.kernel_basis(factors[i], args.k_smallest)
        v_null = studies.kernel_direction(None, v, rng, basis=basis)
        dirs = {"v": v, "v+v_null": v + v_null, "v_null": v_null, "v_perp": studies.orthogonal_to(v, rng)}
        aux = op.tail_args(slice(i, i + 1))
        scale = h_norms[i] / np.linalg.norm(v)
        floor = args.noise_factor * floor_eps * float(np.linalg.norm(base[i]))
        jv = np.linalg.norm(factors[i] @ v)
        for name in DIRECTIONS:
            w = dirs[name] * scale
            resid, lin = linearization.linearization_residuals(fn, jnp.zeros(lm.d, lm.dtype), jnp.asarray(w, lm.dtype),
                                                        a_values, aux)
            rel = resid / np.maximum(lin, np.finfo(np.float64).tiny)
            row = {"prompt": i, "direction": name, "floor": floor,
                   "jw_over_jv": float(np.linalg.norm(factors[i] @ dirs[name]) / jv),
                   "kernel_max_rel_singular_value": float(rel_sv.max()),
                   "a_10pct": first_crossing(a_values, rel, 0.1), "a_100pct": first_crossing(a_values, rel, 1.0)}
            try:
                fit = linearization.fit_loglog_slope(a_values, resid, floor=floor, a_max=args.fit_max)
                row.update(slope=fit.slope, intercept=fit.intercept, n_fit=int(fit.used.sum()),
                           a_fit_min=float(a_values[fit.used].min()), a_fit_max=float(a_values[fit.used].max()))
            except sj.InputError as err:
                row.update(slope=None, intercept=None, n_fit=0, a_fit_min=None, a_fit_max=None, fit_error=str(err))
            # local slopes between neighbouring grid points (where both are above the floor)
            ok = (resid[1:] > floor) & (resid[:-1] > floor)
            local = np.diff(np.log(np.maximum(resid, 1e-300))) / np.diff(np.log(a_values))
            row["large_a_slope"] = float(local[ok][-3:].mean()) if ok.sum() >= 3 else None
            result["rows"].append(row)
            result["curves"].append({"prompt": i, "direction": name, "residual": resid, "linear": lin})
        bar.update(1)
    bar.close()
    result["summary"] = summarize(result["rows"])
    result["seconds_total"] = time.time() - t0
    out_dir = Path(args.out)
    io.write_json_atomic(out_dir / "linearization.json", result)
    io.write_csv([{k: v for k, v in r.items() if k != "fit_error"} for r in result["rows"]],
                 out_dir / "linearization.csv")
    plot(result, out_dir / "linearization.png")
    print_tables(result)
    wrote([out_dir / name for name in ("linearization.json", "linearization.csv", "linearization.png")], t0)
    return result


def summarize(rows: list[dict]) -> dict:
    out = {}
    for name in DIRECTIONS:
        sub = [r for r in rows if r["direction"] == name]
        slopes = [r["slope"] for r in sub if r["slope"] is not None]
        a10 = [r["a_10pct"] for r in sub if r["a_10pct"] is not None]
        out[name] = {"slope_median": float(np.median(slopes)) if slopes else None,
                     "slope_min": float(min(slopes)) if slopes else None,
                     "slope_max": float(max(slopes)) if slopes else None,
                     "a_10pct_median": float(np.median(a10)) if a10 else None,
                     "jw_over_jv_median": float(np.median([r["jw_over_jv"] for r in sub]))}
    return out


def plot(result: dict, path: Path) -> None:
    """Left: residual r(a) (log-log) per direction, every prompt, with the fitted slope of prompt 0, an a^2
    guide and the rounding floor; right: r(a) / ||a s J w||."""
    from steerjax import plotting
    import matplotlib.pyplot as plt

    a = np.asarray(result["a_values"])
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
    colors = dict(zip(DIRECTIONS, plt.cm.tab10(np.arange(len(DIRECTIONS)))))
    for curve in result["curves"]:
        row = next(r for r in result["rows"] if r["prompt"] == curve["prompt"] and r["direction"] == curve["direction"])
        first = curve["prompt"] == 0
        label = (f"{curve['direction']} (slope {row['slope']:.3f})" if row["slope"] is not None
                 else curve["direction"]) if first else None
        resid, lin = np.asarray(curve["residual"]), np.asarray(curve["linear"])
        alpha = 1.0 if first else 0.35
        axes[0].loglog(a, np.maximum(resid, 1e-300), color=colors[curve["direction"]], alpha=alpha, label=label)
        axes[1].loglog(a, np.maximum(resid / np.maximum(lin, 1e-300), 1e-300), color=colors[curve["direction"]],
                       alpha=alpha, label=curve["direction"] if first else None)
    r0 = next(r for r in result["rows"] if r["prompt"] == 0 and r["direction"] == "v")
    if r0["slope"] is not None:
        axes[0].loglog(a, np.exp(r0["intercept"]) * a**2, "k:", lw=1, label="a^2 guide (through v's fit)")
    axes[0].axhline(r0["floor"], color="grey", ls="--", lw=0.8, label="rounding floor (fit threshold)")
    axes[0].axvline(result["settings"]["fit_max"], color="grey", ls=":", lw=0.8, label="fit_max")
    axes[0].set(xlabel="a = ||steering|| / ||h||", ylabel="||F(a s w) - F(0) - a s J w||",
                title=f"first-order residual ({result['observable']}, layer {result['layer']}, {result['dtype']})")
    axes[1].axhline(0.1, color="grey", ls=":", lw=0.8, label="10%")
    axes[1].set(xlabel="a = ||steering|| / ||h||", ylabel="residual / ||a s J w||",
                title="relative error of the linear prediction")
    for ax in axes:
        ax.legend(fontsize=7)
    fig.suptitle(f"{result['model_name']}: {len(result['prompts'])} prompts (prompt 0 solid)")
    plotting.save_figure(fig, path)


def print_tables(result: dict) -> None:
    print(f"{result['model_name']} ({result['dtype']}), layer {result['layer']}, {result['observable']}: residual of "
          f"the first-order expansion, slope fitted for a <= {result['settings']['fit_max']:g} "
          "above the rounding floor")
    print(f"{'prompt':>6} {'direction':<9} {'slope':>7} {'n_fit':>5} {'a range':>17} {'large-a slope':>13} "
          f"{'a_10%':>8} {'||Jw||/||Jv||':>13}")
    for r in result["rows"]:
        rng = f"{r['a_fit_min']:.0e}..{r['a_fit_max']:.0e}" if r["a_fit_min"] is not None else "-"
        print(f"{r['prompt']:>6} {r['direction']:<9} {fmt(r['slope'], '>7.3f')} {r['n_fit']:>5} {rng:>17} "
              f"{fmt(r['large_a_slope'], '>13.2f')} {fmt(r['a_10pct'], '>8.1e')} {r['jw_over_jv']:>13.2e}")
    print("\nsummary (over prompts): " + "; ".join(
        f"{k}: slope {fmt(s['slope_median'], '.3f')} [{fmt(s['slope_min'], '.3f')}, {fmt(s['slope_max'], '.3f')}], "
        f"a_10% {fmt(s['a_10pct_median'], '.1e')}" for k, s in result["summary"].items()))


def main(argv=None) -> int:
    return run_cli(parse_args, run, argv)


if __name__ == "__main__":
    sys.exit(main())
