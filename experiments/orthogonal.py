"""Orthogonal perturbation test (the paper's Section 6.2 / Table 1 / Figure 2).

For each trait, v = mean-difference vector of the trait's 50 contrastive pairs at the read layer. Conditions
(each: every evaluation prompt x --samples sampled continuations, steered at the protocol's steer layer,
positions "last+generated" as the released code's hook):
    base          unsteered
    v             alpha * v
    v+perp{s}     alpha * (v + v_perp_s), v_perp_s Gaussian Gram-Schmidt'ed against v, ||v_perp_s|| = ||v||
    perp{s}       alpha * v_perp_s alone                                     (s = 0 .. seeds-1)
    2v            alpha * 2v: a shift of the same norm ||v|| as v_perp but along v (corrected protocol only:
                  the positive control that shows whether the test can see a shift of that size at all)
Per seed: Cohen's d(v, v+perp_s), Pearson r of row-aligned scores, perp-only efficacy; Table 1 reports mean
+- sd over the first n seeds for each n in --seed-counts. The corrected protocol adds d(base, v) (does v
steer at all?), d(v, 2v), a TOST of v vs the pooled v+perp rows at +-0.2 SD and the minimum detectable d.

Protocols (see steerjax.studies.StudyProtocol): `corrected` (default) extracts and steers h[L//2], scores
generated text only, reuses each row's sampling key in every condition (paired), pooled Cohen's d,
baseline-subtracted efficacy. `paper` steers h[L//2 + 1] (the released code's off-by-one), scores prompt +
generated text, fresh sampling noise per condition, ddof-0 d, raw ratio |perp| / |v|.

Writes DIR/orthogonal_units.json (every condition's texts and scores, saved after each condition; a rerun
resumes), DIR/orthogonal.json, DIR/orthogonal.csv (Table 1 rows), DIR/perp_only.png (Figure 2) and
DIR/effect_sizes.png, and prints Table 1.
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
    cli.add_study_arguments(p, n_prompts=100, samples=2, max_new_tokens=40)
    p.add_argument("--seeds", type=int, default=4, help="orthogonal directions per trait (default 4)")
    p.add_argument("--seed-counts", default="2,4", help="n for the Table 1 rows: mean +- sd over the first n seeds")
    p.add_argument("--alpha", type=float, default=1.0, help="steering strength (default 1.0, as the paper)")
    p.add_argument("--quick", action="store_true",
                   help="preset: 4 prompts x 2 samples, 16 tokens, 3 seeds (n = 2, 3): a smoke run in ~2 min")
    p.add_argument("--out", default=None, help="output folder (default results/orthogonal_<protocol>)")
    args = p.parse_args(argv)
    if args.quick:
        args.n_prompts, args.samples = min(args.n_prompts, 4), min(args.samples, 2)
        args.max_new_tokens = min(args.max_new_tokens, 16)
        args.seeds = min(args.seeds, 3)
        args.seed_counts = ",".join(str(n) for n in range(2, args.seeds + 1))
    cli.check_study_arguments(p, args)
    if args.seeds < 2:
        p.error(f"--seeds must be >= 2 (Table 1 reports a spread over seeds), got {args.seeds}")
    counts = cli.parse_floats(p, args.seed_counts, "--seed-counts")
    if any(c != int(c) or not 2 <= c <= args.seeds for c in counts):
        p.error(f"--seed-counts must be integers in [2, --seeds={args.seeds}], got {args.seed_counts!r}")
    args.seed_counts = sorted({int(c) for c in counts})
    if not np.isfinite(args.alpha) or args.alpha == 0:
        p.error(f"--alpha must be finite and non-zero, got {args.alpha}")
    if not 1 <= args.n_prompts <= 100:
        p.error(f"--n-prompts must be in [1, 100] (the neutral evaluation set has 100), got {args.n_prompts}")
    args.out = args.out or f"results/orthogonal_{args.protocol}"
    return args


def build_conditions(protocol, vectors, steer_layer, alpha, seeds, base_seed) -> tuple[dict, dict]:
    """(conditions key -> (layer, vector, alpha), perps trait -> (seeds, d))."""
    conditions = {"base": (None, None, 0.0)}
    perps = {}
    for trait, v in vectors.items():
        trait_index = data.TRAITS.index(trait)
        perps[trait] = np.stack([studies.orthogonal_to(v, np.random.default_rng([base_seed, trait_index, s]))
                                 for s in range(seeds)])
        conditions[f"{trait}/v"] = (steer_layer, v, alpha)
        if protocol.name == "corrected":
            conditions[f"{trait}/2v"] = (steer_layer, 2 * v, alpha)
        for s in range(seeds):
            conditions[f"{trait}/v+perp{s}"] = (steer_layer, v + perps[trait][s], alpha)
            conditions[f"{trait}/perp{s}"] = (steer_layer, perps[trait][s], alpha)
            if protocol.name == "corrected":        # norm-matched: v + v_perp rescaled to ||v|| (the paper's is sqrt 2)
                both = v + perps[trait][s]
                matched = both * np.linalg.norm(v) / np.linalg.norm(both)
                conditions[f"{trait}/v+perp{s}/matched"] = (steer_layer, matched, alpha)
    return conditions, perps


def prompt_level(store, protocol, trait, seeds, clusters, margin_fraction, kind=None) -> dict | None:
    """The prompt as the unit (issue 22), scored by the primary probe or the second probe `kind`: v's effect over
    base, each seed's v + v_perp (and its norm-matched version) minus v with cluster intervals and TOST at
    margin_fraction x v's effect, the seeds pooled per row, and the seeds' heterogeneity. None when the second
    probe did not score these conditions."""
    keys = ["base", f"{trait}/v", *(f"{trait}/v+perp{s}" for s in range(seeds))]
    if kind is not None and not all(behaviour.has_second_scores(store[k], kind, trait) for k in keys):
        return None
    score = lambda key: behaviour.scores_of(store[key], protocol, trait, kind)
    families = {"v_plus_perp": [score(f"{trait}/v+perp{s}") for s in range(seeds)]}
    matched = [f"{trait}/v+perp{s}/matched" for s in range(seeds)]
    if all(k in store and (kind is None or behaviour.has_second_scores(store[k], kind, trait)) for k in matched):
        families["matched"] = [score(k) for k in matched]
    v = score(f"{trait}/v")
    out = behaviour.perturbation_comparison(score("base"), v, families, clusters, margin_fraction)
    out["clustering_v"] = behaviour.clustering(v, clusters)
    return out


def fluency_by_family(store, trait, seeds, clusters) -> dict:
    """Prompt-level fluency (repetition rate, unsteered per-token log-likelihood) of base, v, 2v, and the seeds'
    v + v_perp, perp-only and norm-matched conditions (mean over seeds of each condition's prompt-level mean)."""
    families = {"base": ["base"], "v": [f"{trait}/v"], "2v": [f"{trait}/2v"],
                "v+perp": [f"{trait}/v+perp{s}" for s in range(seeds)],
                "matched": [f"{trait}/v+perp{s}/matched" for s in range(seeds)],
                "perp": [f"{trait}/perp{s}" for s in range(seeds)]}
    return {name: behaviour.mean_fluency([store[k] for k in keys], clusters)
            for name, keys in families.items() if all(k in store for k in keys)}


def holm_within_table(traits: dict) -> None:
    """Holm-adjust, across the table's traits, each family of prompt-level p-values (in place: `p_holm`,
    `tost_p_holm`), separately for the primary and the second probe."""
    for level in ("prompt_level", "second_probe"):
        tables = [t[level] for t in traits.values() if t.get(level)]
        for name, key in (("v_minus_base", "p"), ("pooled_v_plus_perp_minus_v", "p"),
                          ("pooled_v_plus_perp_minus_v", "tost_p"), ("pooled_matched_minus_v", "p"),
                          ("pooled_matched_minus_v", "tost_p")):
            behaviour.holm_entries([t.get(name) for t in tables], key)


def analyse_trait(store, protocol, trait, seeds, seed_counts) -> dict:
    score = lambda key: behaviour.scores_of(store[key], protocol, trait)
    base, v = score("base"), score(f"{trait}/v")
    per_seed = []
    for s in range(seeds):
        vp, perp = score(f"{trait}/v+perp{s}"), score(f"{trait}/perp{s}")
        per_seed.append({"seed": s, "d": behaviour.effect_size(protocol, v, vp), "r": stats.correlation(v, vp),
                         "efficacy": behaviour.efficacy(protocol, perp, v, base),
                         "raw_ratio": stats.or_none(stats.paper_raw_ratio, perp, v),
                         "baseline_efficacy": stats.or_none(stats.perp_only_efficacy, perp, v, base),
                         "mean_v_plus_perp": float(vp.mean()), "mean_perp": float(perp.mean())})
    table = [{"trait": trait, "n_seeds": n,
              **{f"{k}_{stat}": stats.mean_sd([r[k] for r in per_seed[:n]])[stat]
                 for k in ("d", "r", "efficacy") for stat in ("mean", "sd")}} for n in seed_counts]
    out = {"mean_base": float(base.mean()), "mean_v": float(v.mean()), "sd_v": float(v.std(ddof=1)),
           "per_seed": per_seed, "table": table,
           "d_base_vs_v": stats.or_none(stats.cohens_d, v, base)}
    pooled = np.concatenate([score(f"{trait}/v+perp{s}") for s in range(seeds)])
    out["equivalence_v_vs_pooled_v_plus_perp"] = stats.equivalence(v, pooled)
    if f"{trait}/2v" in store:
        twice = score(f"{trait}/2v")
        out["mean_2v"] = float(twice.mean())
        out["d_v_vs_2v"] = stats.or_none(stats.cohens_d, twice, v)
        out["equivalence_v_vs_2v"] = stats.equivalence(v, twice)
    return out


def run(args) -> dict:
    t0 = time.time()
    lm = sj.load_model(args.model)
    protocol = studies.StudyProtocol.from_name(args.protocol, positions="last+generated")
    read_layer, steer_layer = studies.protocol_layers(protocol, lm.num_layers, args.read_layer)
    prompts = data.neutral_eval_prompts()[: args.n_prompts]
    plan = behaviour.GenerationPlan(tuple(prompts), args.samples, args.max_new_tokens, args.temperature)
    vectors = behaviour.trait_vectors(lm, args.traits, read_layer)
    conditions, perps = build_conditions(protocol, vectors, steer_layer, args.alpha, args.seeds, args.seed)
    probes = behaviour.study_probes(args.probe, data.TRAITS, lm, second=not args.no_second_probe,
                                    skips=("perp", "2v"))      # controls outside the prompt-level tables
    settings = {"model": lm.source, "protocol": protocol.name, "read_layer": read_layer, "steer_layer": steer_layer,
                "positions": protocol.positions, "traits": args.traits, "alpha": args.alpha, "seeds": args.seeds,
                "seed": args.seed, "plan": plan.__dict__, "probe": args.probe, "quick": args.quick,
                "margin_fraction": args.margin_fraction,
                "second_probe": probes.second_kind}
    out_dir = Path(args.out)
    meta = io.run_metadata(lm, seeds={"seed": args.seed, "seeds": args.seeds})
    store = io.UnitStore(out_dir / "orthogonal_units.json", settings, fresh=args.fresh, meta=meta)
    if store.resumed:
        print(f"resuming: {store.resumed} of {len(conditions)} conditions already done in {store.path}",
              file=sys.stderr)
    behaviour.run_conditions(lm, plan, conditions, store, probes, protocol, args.seed, desc="orthogonal conditions")
    clusters = behaviour.row_clusters(plan)

    result = {"model": lm.source, "model_name": Path(lm.source).name, "settings": settings,
              "protocol": {**protocol.__dict__}, "n_rows_per_condition": plan.n_rows, "seed_counts": args.seed_counts,
              "vectors": {t: {"norm": float(np.linalg.norm(v)),
                              "max_abs_cos_perp": float(np.max(np.abs(perps[t] @ v)) / np.linalg.norm(v) ** 2)}
                          for t, v in vectors.items()},
              "traits": {t: {**analyse_trait(store, protocol, t, args.seeds, args.seed_counts),
                             "prompt_level": prompt_level(store, protocol, t, args.seeds, clusters,
                                                          args.margin_fraction),
                             "second_probe": None if probes.second_kind is None else prompt_level(
                                 store, protocol, t, args.seeds, clusters, args.margin_fraction, probes.second_kind),
                             "fluency": fluency_by_family(store, t, args.seeds, clusters)} for t in args.traits},
              "seconds_generation": sum(store[k]["seconds"] for k in conditions), "meta": meta}
    holm_within_table(result["traits"])
    result["seconds_total"] = time.time() - t0
    io.write_json_atomic(out_dir / "orthogonal.json", result)
    io.write_csv([row for t in args.traits for row in result["traits"][t]["table"]], out_dir / "orthogonal.csv")
    plot_perp_only(result, out_dir / "perp_only.png")
    plot_effect_sizes(result, out_dir / "effect_sizes.png")
    print_table(result)
    print_prompt_level(result)
    cli.wrote([out_dir / name for name in ("orthogonal.json", "orthogonal.csv", "perp_only.png", "effect_sizes.png")],
              t0)
    return result


def _title(result) -> str:
    s = result["settings"]
    return (f"{result['model_name']}: {s['protocol']} protocol (read h{s['read_layer']}, steer h{s['steer_layer']}, "
            f"alpha {s['alpha']:g}, {result['n_rows_per_condition']} samples/condition)")


def plot_perp_only(result: dict, path: Path) -> None:
    """Figure 2: per-seed perp-only efficacy per trait, with the paper's raw ratio beside the
    baseline-subtracted one."""
    from steerjax import plotting
    import matplotlib.pyplot as plt

    traits = list(result["traits"])
    fig, ax = plt.subplots(figsize=(1.8 + 2.2 * len(traits), 4))
    for i, trait in enumerate(traits):
        seeds = result["traits"][trait]["per_seed"]
        for j, (key, label, color) in enumerate((("raw_ratio", "paper raw |perp|/|v|", "tab:orange"),
                                                 ("baseline_efficacy", "(perp - base)/(v - base)", "tab:blue"))):
            ys = [s[key] for s in seeds if s[key] is not None]
            xs = i + (j - 0.5) * 0.3 + np.linspace(-0.06, 0.06, len(ys))
            ax.scatter(xs, ys, color=color, s=18, label=label if i == 0 else None)
    ax.axhline(1.0, color="red", ls="--", lw=1)
    ax.axhline(0.0, color="grey", ls=":", lw=1)
    ax.set(xticks=range(len(traits)), xticklabels=traits, ylabel="perp-only efficacy (per seed)")
    ax.set_title(_title(result), fontsize=8)
    ax.legend(fontsize=7)
    plotting.save_figure(fig, path)


def plot_effect_sizes(result: dict, path: Path) -> None:
    """Per-seed d(v, v+perp) per trait next to the corrected protocol's controls d(base, v), d(v, 2v)."""
    from steerjax import plotting
    import matplotlib.pyplot as plt

    traits = list(result["traits"])
    fig, ax = plt.subplots(figsize=(1.8 + 2.2 * len(traits), 4))
    for i, trait in enumerate(traits):
        r = result["traits"][trait]
        ds = [s["d"] for s in r["per_seed"] if s["d"] is not None]
        ax.scatter(i + np.linspace(-0.1, 0.1, len(ds)), np.abs(ds), color="tab:blue", s=18,
                   label="|d(v, v+perp_s)|" if i == 0 else None)
        if r.get("d_base_vs_v") is not None:
            ax.scatter([i + 0.25], [abs(r["d_base_vs_v"])], marker="s", color="tab:green",
                       label="|d(base, v)|" if i == 0 else None)
        if r.get("d_v_vs_2v") is not None:
            ax.scatter([i + 0.35], [abs(r["d_v_vs_2v"])], marker="^", color="tab:red",
                       label="|d(v, 2v)| (positive control)" if i == 0 else None)
        mdd = r["equivalence_v_vs_pooled_v_plus_perp"]["minimum_detectable_d"]
        ax.hlines(stats.minimum_detectable_d(result["n_rows_per_condition"], result["n_rows_per_condition"]),
                  i - 0.4, i + 0.4, color="grey", ls=":",
                  label="detectable d, one seed (80% power)" if i == 0 else None)
        ax.hlines(mdd, i - 0.4, i + 0.4, color="black", ls=":", label="detectable d, pooled seeds" if i == 0 else None)
    ax.axhline(0.2, color="red", ls="--", lw=1, label="d = 0.2")
    ax.set(xticks=range(len(traits)), xticklabels=traits, ylabel="|Cohen's d|")
    ax.set_title(_title(result), fontsize=8)
    ax.legend(fontsize=7)
    plotting.save_figure(fig, path)


def print_table(result: dict) -> None:
    print(_title(result))
    eff = "raw |perp|/|v|" if result["protocol"]["efficacy"] == "raw_ratio" else "(perp-base)/(v-base)"
    print(f"\nTable 1 format: {'trait':<11} {'seeds':>5} {'Cohen d':>16} {'correlation':>16} {'perp-only ' + eff:>24}")
    for trait, r in result["traits"].items():
        for row in r["table"]:
            d, corr, efficacy = (cli.fmt_pm(row[f"{k}_mean"], row[f"{k}_sd"], spec, sep=" +- ")
                                 for k, spec in (("d", ".3f"), ("r", ".3f"), ("efficacy", ".1%")))
            print(f"{'':<15} {trait:<11} {'n=' + str(row['n_seeds']):>5} {d:>16} {corr:>16} {efficacy:>24}")
    print("\nmeans and controls:")
    for trait, r in result["traits"].items():
        eq = r["equivalence_v_vs_pooled_v_plus_perp"]
        line = (f"  {trait:<11} base {r['mean_base']:.3f}  v {r['mean_v']:.3f}  d(v vs base) "
                f"{cli.fmt(r['d_base_vs_v'], '+.2f')}  TOST(v, pooled v+perp, +-0.2 SD) "
                f"p={cli.fmt(eq['tost_p'], '.3f')} (detectable d {eq['minimum_detectable_d']:.2f})")
        if "d_v_vs_2v" in r:
            line += f"  2v {r['mean_2v']:.3f}, d(2v vs v) {cli.fmt(r['d_v_vs_2v'], '+.2f')}"
        print(line)


def print_prompt_level(result: dict) -> None:
    """The prompt-level table (issue 22): per trait and probe, v's effect over base, pooled v + v_perp (and
    norm-matched) minus v with cluster 95% intervals, TOST at the effect-tied margin with its power, Holm-adjusted
    p, tau^2; then the fluency of each family of conditions."""
    s = result["settings"]
    print(f"\nprompt level ({s['plan']['samples_per_prompt']} samples per prompt averaged; cluster bootstrap 95% CI; "
          f"TOST margin {s['margin_fraction']:g} x effect of v; Holm over traits):")
    for level, probe in (("prompt_level", s["probe"]), ("second_probe", s.get("second_probe"))):
        for trait, r in result["traits"].items():
            pl = r.get(level)
            if not pl:
                continue
            e = pl["v_minus_base"]
            print(f"  {probe:<8} {trait:<11} v - base {e['mean']:+.3f} [{e['ci_low']:+.3f}, {e['ci_high']:+.3f}] "
                  f"p_holm={cli.fmt(e.get('p_holm'), '.3f')}  ICC(v) {pl['clustering_v']['icc']:.2f}")
            for name in ("v_plus_perp", "matched"):
                if f"pooled_{name}_minus_v" not in pl:
                    continue
                c, het = pl[f"pooled_{name}_minus_v"], pl.get(f"heterogeneity_{name}_minus_v")
                print(f"  {'':<20} {name:<12} - v {c['mean']:+.3f} [{c['ci_low']:+.3f}, {c['ci_high']:+.3f}] "
                      f"p_holm={cli.fmt(c.get('p_holm'), '.3f')}  TOST p_holm={cli.fmt(c.get('tost_p_holm'), '.3f')} "
                      f"(power {cli.fmt(c.get('tost_power'), '.2f')}, "
                      f"{cli.fmt(c.get('prompts_for_80_power'), '')} prompts for 80%)"
                      + ("" if het is None else f"  tau^2 {het['tau2']:.2e} (Q p={het['p']:.3f})"))
    print("\nfluency (prompt-level means; repetition = 1 - distinct 3-grams / 3-grams; log-lik = unsteered model's "
          "nats per token):")
    for trait, r in result["traits"].items():
        cells = [f"{name} {cli.fmt(f['repetition'], '.3f')} / {cli.fmt(f['unsteered_loglik'], '.2f')}"
                 for name, f in r["fluency"].items()]
        print(f"  {trait:<11} " + "  ".join(cells))


def main(argv=None) -> int:
    return cli.run_cli(parse_args, run, argv)


if __name__ == "__main__":
    sys.exit(main())
