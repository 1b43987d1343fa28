"""Scale invariance (the paper's Section 6.3 / Figure 3): trait scores under alpha * v and
alpha * (v + v_perp_s) for alpha in --alphas (default 0, 0.5, 1, 2), with 95% confidence bands.

alpha = 0 is the unsteered model (one condition shared by both curves); the plot also marks each seed's mean. v is
the trait's mean-difference vector at the read layer; v_perp_s (s < --seeds) Gaussian Gram-Schmidt'ed against v
with ||v_perp_s|| = ||v||;
steering at the protocol's steer layer on the last prompt token and every generated token. Bands are
t-intervals over per-prompt means (the samples of one prompt are not independent); the v+v_perp curve pools
its seeds. Per alpha: |mean(v) - mean(v+v_perp)| (the paper's "mean difference"), Cohen's d per seed
(mean +- sd), and in the corrected protocol a TOST of v vs the pooled v+v_perp rows at +-0.2 SD. Note that
alpha * v at alpha = 2 is the norm-matched positive control of alpha = 1: the same ||v|| shift as v_perp,
but along v.

Protocols as in orthogonal.py (`corrected` default; `paper`: off-by-one layer, prompt scored, fresh noise).
Writes DIR/scale_invariance_units.json (resumable), DIR/scale_invariance.json, .csv, figure3.png.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

import steerjax as sj
from steerjax import behaviour, cli, data, io, stats, studies


def parse_args(argv):
    p = cli.ArgumentParser(description=__doc__)
    cli.add_study_arguments(p, n_prompts=100, samples=2, max_new_tokens=40, traits="formality")
    p.add_argument("--alphas", default="0,0.5,1,2", help="steering strengths (default 0,0.5,1,2)")
    p.add_argument("--seeds", type=int, default=4, help="orthogonal directions v_perp per trait (default 4)")
    p.add_argument("--quick", action="store_true", help="preset: 4 prompts x 2 samples, 16 tokens, 2 seeds (~2 min)")
    p.add_argument("--out", default=None, help="output folder (default results/scale_invariance_<protocol>)")
    args = p.parse_args(argv)
    if args.quick:
        args.n_prompts, args.samples = min(args.n_prompts, 4), min(args.samples, 2)
        args.max_new_tokens = min(args.max_new_tokens, 16)
        args.seeds = min(args.seeds, 2)
    cli.check_study_arguments(p, args)
    args.alphas = sorted(set(cli.parse_floats(p, args.alphas, "--alphas")))
    if args.seeds < 1:
        p.error(f"--seeds must be >= 1, got {args.seeds}")
    if not 1 <= args.n_prompts <= 100:
        p.error(f"--n-prompts must be in [1, 100] (the neutral evaluation set has 100), got {args.n_prompts}")
    args.out = args.out or f"results/scale_invariance_{args.protocol}"
    return args


def alpha_key(alpha: float) -> str:
    return f"a{alpha:g}"


def build_conditions(vectors, perps, steer_layer, alphas) -> dict:
    conditions = {"base": (None, None, 0.0)}
    for trait, v in vectors.items():
        for a in alphas:
            if a == 0:
                continue
            conditions[f"{trait}/{alpha_key(a)}/v"] = (steer_layer, v, a)
            for s, perp in enumerate(perps[trait]):
                conditions[f"{trait}/{alpha_key(a)}/v+perp{s}"] = (steer_layer, v + perp, a)
    return conditions


def prompt_means(scores: np.ndarray, n_prompts: int) -> np.ndarray:
    """(n_prompts,) mean score per prompt of prompt-major rows (possibly several conditions concatenated
    as (conditions, n_prompts * samples))."""
    return np.asarray(scores, np.float64).reshape(-1, n_prompts, scores.shape[-1] // n_prompts).mean(axis=(0, 2))


def holm_within_table(rows: list[dict]) -> None:
    """Holm-adjust the table's prompt-level p-values (v - base, pooled v + v_perp minus v and its TOST p) across its
    alphas in place, separately for the primary and the second probe."""
    for level in ("prompt_level", "second_probe"):
        tables = [r[level] for r in rows if r.get(level)]
        behaviour.holm_entries([t["v_minus_base"] for t in tables], "p")
        for key in ("p", "tost_p"):
            behaviour.holm_entries([t["pooled_v_plus_perp_minus_v"] for t in tables], key)


def second_probe_level(store, trait, alpha, seeds, clusters, margin_fraction, kind) -> dict | None:
    """The prompt-level comparison under the second probe `kind` at one alpha; None if it did not score these."""
    keys = ["base", f"{trait}/{alpha_key(alpha)}/v", *(f"{trait}/{alpha_key(alpha)}/v+perp{s}" for s in range(seeds))]
    if not all(behaviour.has_second_scores(store[k], kind, trait) for k in keys):
        return None
    base, v, *perps = (behaviour.scores_of(store[k], None, trait, kind) for k in keys)
    return behaviour.perturbation_comparison(base, v, {"v_plus_perp": perps}, clusters, margin_fraction)


def analyse_trait(store, protocol, trait, alphas, seeds, n_prompts, clusters, margin_fraction,
                  second_kind=None) -> list[dict]:
    score = lambda key: behaviour.scores_of(store[key], protocol, trait)
    rows = []
    for a in alphas:
        if a == 0:
            v = score("base")
            perps = v[None]
        else:
            v = score(f"{trait}/{alpha_key(a)}/v")
            perps = np.stack([score(f"{trait}/{alpha_key(a)}/v+perp{s}") for s in range(seeds)])
        mv, lv, uv = stats.mean_ci(prompt_means(v[None], n_prompts))
        mp, lp, up = stats.mean_ci(prompt_means(perps, n_prompts))
        row = {"trait": trait, "alpha": a, "mean_v": mv, "ci_v_low": lv, "ci_v_high": uv,
               "mean_v_plus_perp": mp, "ci_perp_low": lp, "ci_perp_high": up, "abs_mean_diff": abs(mv - mp)}
        if a != 0:
            ds = [behaviour.effect_size(protocol, v, p) for p in perps]
            stat = stats.mean_sd(ds)
            eq = stats.equivalence(v, perps.reshape(-1))
            row.update({"d_mean": stat["mean"], "d_sd": stat["sd"], "tost_p": eq["tost_p"],
                        "equivalent_at_0.2sd": eq["equivalent"], "minimum_detectable_d": eq["minimum_detectable_d"],
                        "per_seed_d": ds, "per_seed_mean": perps.mean(axis=1).tolist(),
                        "prompt_level": behaviour.perturbation_comparison(score("base"), v, {"v_plus_perp": perps},
                                                                          clusters, margin_fraction),
                        "second_probe": second_probe_level(store, trait, a, seeds, clusters, margin_fraction,
                                                           second_kind),
                        "fluency": {"v": behaviour.mean_fluency([store[f"{trait}/{alpha_key(a)}/v"]], clusters),
                                    "v+perp": behaviour.mean_fluency([store[f"{trait}/{alpha_key(a)}/v+perp{s}"]
                                                                      for s in range(seeds)], clusters)}})
        else:
            row.update({"d_mean": None, "d_sd": None, "tost_p": None, "equivalent_at_0.2sd": None,
                        "minimum_detectable_d": None, "per_seed_d": [], "per_seed_mean": [], "prompt_level": None,
                        "second_probe": None, "fluency": {"v": behaviour.mean_fluency([store["base"]], clusters)}})
        rows.append(row)
    return rows


def run(args) -> dict:
    t0 = time.time()
    lm = sj.load_model(args.model)
    protocol = studies.StudyProtocol.from_name(args.protocol, positions="last+generated")
    read_layer, steer_layer = studies.protocol_layers(protocol, lm.num_layers, args.read_layer)
    prompts = data.neutral_eval_prompts()[: args.n_prompts]
    plan = behaviour.GenerationPlan(tuple(prompts), args.samples, args.max_new_tokens, args.temperature)
    vectors = behaviour.trait_vectors(lm, args.traits, read_layer)
    perps = {t: [studies.orthogonal_to(v, np.random.default_rng([args.seed, data.TRAITS.index(t), s]))
                 for s in range(args.seeds)] for t, v in vectors.items()}
    conditions = build_conditions(vectors, perps, steer_layer, args.alphas)
    probes = behaviour.study_probes(args.probe, data.TRAITS, lm, second=not args.no_second_probe)
    settings = {"model": lm.source, "protocol": protocol.name, "read_layer": read_layer, "steer_layer": steer_layer,
                "positions": protocol.positions, "traits": args.traits, "alphas": args.alphas, "seeds": args.seeds,
                "seed": args.seed, "plan": plan.__dict__, "probe": args.probe, "quick": args.quick,
                "margin_fraction": args.margin_fraction, "second_probe": probes.second_kind}
    out_dir = Path(args.out)
    meta = io.run_metadata(lm, seeds={"seed": args.seed, "seeds": args.seeds})
    store = io.UnitStore(out_dir / "scale_invariance_units.json", settings, fresh=args.fresh, meta=meta)
    if store.resumed:
        print(f"resuming: {store.resumed} of {len(conditions)} conditions already done in {store.path}",
              file=sys.stderr)
    behaviour.run_conditions(lm, plan, conditions, store, probes, protocol, args.seed, desc="scale conditions")

    rows = [r for t in args.traits for r in analyse_trait(store, protocol, t, args.alphas, args.seeds, len(prompts),
                                                           behaviour.row_clusters(plan), args.margin_fraction,
                                                           probes.second_kind)]
    holm_within_table(rows)
    result = {"model": lm.source, "model_name": Path(lm.source).name, "settings": settings,
              "protocol": {**protocol.__dict__}, "n_rows_per_condition": plan.n_rows,
              "vector_norms": {t: float(np.linalg.norm(v)) for t, v in vectors.items()}, "rows": rows,
              "max_abs_mean_diff": {t: max(r["abs_mean_diff"] for r in rows if r["trait"] == t) for t in args.traits},
              "seconds_generation": sum(store[k]["seconds"] for k in conditions), "meta": meta}
    result["seconds_total"] = time.time() - t0
    io.write_json_atomic(out_dir / "scale_invariance.json", result)
    io.write_csv([{k: x for k, x in r.items() if not k.startswith("per_seed")
                   and k not in ("prompt_level", "second_probe", "fluency")} for r in rows],
                 out_dir / "scale_invariance.csv")
    plot_curves(result, out_dir / "figure3.png")
    print_table(result)
    print_prompt_level(result)
    cli.wrote([out_dir / name for name in ("scale_invariance.json", "scale_invariance.csv", "figure3.png")], t0)
    return result


def plot_curves(result: dict, path: Path) -> None:
    """Figure 3: mean score vs alpha for v and v + v_perp with 95% bands, one panel per trait."""
    from steerjax import plotting
    import matplotlib.pyplot as plt

    traits = result["settings"]["traits"]
    fig, axes = plt.subplots(1, len(traits), figsize=(4.8 * len(traits), 4), squeeze=False)
    for ax, trait in zip(axes[0], traits):
        rows = [r for r in result["rows"] if r["trait"] == trait]
        a = np.array([r["alpha"] for r in rows])
        for key, lo, hi, label, style in (("mean_v", "ci_v_low", "ci_v_high", "v", "o-"),
                                          ("mean_v_plus_perp", "ci_perp_low", "ci_perp_high", "v + v_perp", "s--")):
            line, = ax.plot(a, [r[key] for r in rows], style, label=label)
            ax.fill_between(a, [r[lo] for r in rows], [r[hi] for r in rows], color=line.get_color(), alpha=0.2)
        seeds = [(r["alpha"], m) for r in rows for m in r["per_seed_mean"]]
        if seeds:
            ax.scatter(*zip(*seeds), marker="s", s=12, facecolors="none", edgecolors="tab:orange",
                       label="v + v_perp, one seed")
        ax.set(xlabel="alpha", ylabel=f"{trait} score (95% CI over prompts)", title=trait)
        ax.legend()
    s = result["settings"]
    fig.suptitle(f"{result['model_name']}: {s['protocol']} protocol\n"
                 f"(read h{s['read_layer']}, steer h{s['steer_layer']}, "
                 f"{result['n_rows_per_condition']} samples/condition, {s['seeds']} v_perp seeds)", fontsize=8)
    plotting.save_figure(fig, path)


def print_table(result: dict) -> None:
    s = result["settings"]
    print(f"{result['model_name']}: {s['protocol']} protocol (read h{s['read_layer']}, steer h{s['steer_layer']}), "
          f"{result['n_rows_per_condition']} samples per condition, {s['seeds']} v_perp seeds")
    print(f"{'trait':<11} {'alpha':>5} {'mean v [95% CI]':>22} {'mean v+perp [95% CI]':>24} {'|diff|':>7} "
          f"{'d (mean+-sd)':>15} {'TOST p':>7}")
    for r in result["rows"]:
        print(f"{r['trait']:<11} {r['alpha']:>5g} {r['mean_v']:>7.3f} [{r['ci_v_low']:.3f}, {r['ci_v_high']:.3f}] "
              f"{r['mean_v_plus_perp']:>9.3f} [{r['ci_perp_low']:.3f}, {r['ci_perp_high']:.3f}] "
              f"{r['abs_mean_diff']:>7.3f} "
              f"{cli.fmt(r['d_mean'], '+.3f'):>8} +- {cli.fmt(r['d_sd'], '.3f'):<5} {cli.fmt(r['tost_p'], '.3f'):>7}")


def print_prompt_level(result: dict) -> None:
    """Per alpha and probe: v - base and the seeds' pooled v + v_perp minus v (cluster 95% CI), TOST p_holm at the
    effect-tied margin with its power, tau^2 across seeds; fluency of v and v + v_perp."""
    s = result["settings"]
    print(f"\nprompt level (cluster bootstrap 95% CI; TOST margin {s['margin_fraction']:g} x effect of v; Holm over "
          "the table):")
    for level, probe in (("prompt_level", s["probe"]), ("second_probe", s.get("second_probe"))):
        for r in result["rows"]:
            pl = r.get(level)
            if not pl:
                continue
            e, c = pl["v_minus_base"], pl["pooled_v_plus_perp_minus_v"]
            het = pl.get("heterogeneity_v_plus_perp_minus_v")
            print(f"  {probe:<8} {r['trait']:<11} alpha {r['alpha']:<4g} v - base {e['mean']:+.3f} "
                  f"[{e['ci_low']:+.3f}, {e['ci_high']:+.3f}]  v+perp - v {c['mean']:+.3f} "
                  f"[{c['ci_low']:+.3f}, {c['ci_high']:+.3f}] TOST p_holm={cli.fmt(c.get('tost_p_holm'), '.3f')} "
                  f"(power {cli.fmt(c.get('tost_power'), '.2f')})"
                  + ("" if het is None else f"  tau^2 {het['tau2']:.2e} (Q p={het['p']:.3f})"))
    print("fluency (repetition rate / unsteered log-lik per token):")
    for r in result["rows"]:
        print(f"  {r['trait']:<11} alpha {r['alpha']:<4g} " + "  ".join(
            f"{name} {cli.fmt(f['repetition'], '.3f')} / {cli.fmt(f['unsteered_loglik'], '.2f')}"
            for name, f in r["fluency"].items()))


def main(argv=None) -> int:
    return cli.run_cli(parse_args, run, argv)


if __name__ == "__main__":
    sys.exit(main())
