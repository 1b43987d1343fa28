"""Multi-environment test (the paper's Section 6.4 / Table 2 / Figure 4) and the Jacobian null spaces of the
environments.

Environments: the four shipped prompt sets (in_distribution, topic_shift, genre_shift, safety_style; 25
prompts each). For each environment and trait, v vs v + v_perp_s (s < --seeds, ||v_perp_s|| = ||v||) is
tested on that environment's prompts. `--vector environment` (default, the paper's design): v_e is extracted
*in* the environment, v_e = mean_i h(positive framing + prompt_i) - h(negative framing + prompt_i) at the read
layer over its prompts (framings: steerjax.behaviour.TRAIT_FRAMINGS), rescaled to the shipped vector's norm:
framing differences are small at the last token (||v_e|| = 3-9 against ||v|| = 23-45 on SmolLM2), and
unrescaled v_e does not steer at alpha = 1 (measured d(base, v_e) within +-0.17), which makes a
d(v_e, v_e + v_perp) test empty. `--vector shipped`: the trait's shipped pair vector v in every environment.
`--vector both`: both, sharing each environment's unsteered baseline. Condition keys and table labels say which
(v_e or v). Table 2 reports |Cohen's d| per trait x environment (mean over seeds) and the prompt-level table:
v - base, the seeds' v + v_perp pooled per row minus v with a cluster interval, TOST at --margin-fraction x v's
effect with its power, tau^2 across seeds, Holm over the table's cells; for both probes, with fluency.

Geometry (exact, from steerjax's Jacobian core): for each environment, the per-prompt factors of
J = d logits[last] / d h_steer at its first --geometry-prompts prompts, stacked by QR. Reported: null
dimensions per eps (per prompt and stacked), principal angles between environments' null spaces (eps-null
spaces, and the --k-smallest-dimensional bottom singular subspaces of the stacked J, next to the value
expected for random subspaces), the share of a random v_perp that falls in each environment's null
spaces, and the cosines between the environments' trait vectors.

Generation: 150 new tokens under the paper protocol (as the released code's multi-environment script), 40
under the corrected one (--max-new-tokens overrides). Writes DIR/environments_units.json (resumable),
DIR/environments.json, .csv (Table 2), table2.png (Figure 4) and principal_angles.png.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

import steerjax as sj
from steerjax import behaviour, cli, data, geometry, io, spectrum, stats, studies


def parse_args(argv):
    p = cli.ArgumentParser(description=__doc__)
    cli.add_study_arguments(p, n_prompts=25, samples=2, max_new_tokens=0)
    p.add_argument("--environments", default="all", help="'all' or a comma list of the shipped environments")
    p.add_argument("--seeds", type=int, default=3, help="orthogonal directions per trait and environment (default 3)")
    p.add_argument("--alpha", type=float, default=1.0, help="steering strength (default 1.0)")
    p.add_argument("--vector", choices=("environment", "shipped", "both"), default="environment",
                   help="environment (default, the paper's design): extracted in each environment by trait "
                        "framings, rescaled to the shipped vector's norm; shipped: the trait-pair vector in every "
                        "environment; both: the two side by side")
    p.add_argument("--geometry-prompts", type=int, default=16,
                   help="prompts per environment for the exact J (default 16)")
    p.add_argument("--k-smallest", type=int, default=64,
                   help="dimension of the bottom singular subspaces compared (default 64)")
    p.add_argument("--quick", action="store_true",
                   help="preset: 3 prompts x 2 samples, 12 tokens, 2 seeds, 3 geometry prompts (~3 min)")
    p.add_argument("--out", default=None, help="output folder (default results/environments_<protocol>)")
    args = p.parse_args(argv)
    if args.max_new_tokens == 0:
        args.max_new_tokens = 150 if args.protocol == "paper" else 40
    if args.quick:
        args.n_prompts, args.samples = min(args.n_prompts, 3), min(args.samples, 2)
        args.max_new_tokens, args.seeds = min(args.max_new_tokens, 12), min(args.seeds, 2)
        args.geometry_prompts = min(args.geometry_prompts, 3)
    cli.check_study_arguments(p, args)
    envs = data.environments()
    args.environments = (list(envs) if args.environments == "all"
                         else [e.strip() for e in args.environments.split(",") if e.strip()])
    bad = [e for e in args.environments if e not in envs]
    if bad or not args.environments:
        p.error(f"unknown environment(s) {bad}; choose from {', '.join(envs)} or 'all'")
    n_env = min(len(envs[e]) for e in args.environments)
    if not 1 <= args.n_prompts <= n_env:
        p.error(f"--n-prompts must be in [1, {n_env}] (prompts per environment), got {args.n_prompts}")
    if not 1 <= args.geometry_prompts <= n_env:
        p.error(f"--geometry-prompts must be in [1, {n_env}], got {args.geometry_prompts}")
    if args.seeds < 1:
        p.error(f"--seeds must be >= 1, got {args.seeds}")
    if not np.isfinite(args.alpha) or args.alpha == 0:
        p.error(f"--alpha must be finite and non-zero, got {args.alpha}")
    args.out = args.out or f"results/environments_{args.protocol}"
    return args


def environment_vectors(lm, traits, prompts, layer, norms: dict[str, float]) -> tuple[dict, dict]:
    """(trait -> v_e (d,) from the trait framings of this environment's prompts, rescaled to norms[trait];
    trait -> the raw norm ||v_e|| before rescaling)."""
    out, raw = {}, {}
    for trait in traits:
        pos, neg = behaviour.framed_pairs(trait, prompts)
        v = np.asarray(sj.extract_vector(lm, pos, neg, layer, method="mean_diff"), np.float64)
        raw[trait] = float(np.linalg.norm(v))
        out[trait] = v * (norms[trait] / raw[trait])
    return out, raw


def environment_geometry(lm, prompts, layer, k_smallest) -> dict:
    """Exact per-prompt factors at `layer`, the stacked factor, null dims and bottom-k subspace."""
    factors = sj.jacobian_operator(lm, lm.tokenize(list(prompts)), layer, observable="logits").factors()
    stacked = None
    for stacked in spectrum.stack_factors(factors):
        pass
    s_stacked, vt = spectrum.right_singular(stacked)
    per_prompt = [spectrum.null_dims(spectrum.right_singular(f)[0], lm.d) for f in factors]
    return {"factors": factors, "stacked": stacked, "bottom": vt[-k_smallest:].T,
            "null_dim_stacked": spectrum.null_dims(s_stacked, lm.d),
            "null_dim_per_prompt_mean": {k: float(np.mean([p[k] for p in per_prompt])) for k in per_prompt[0]},
            "bottom_rel_sv_max": float(s_stacked[-k_smallest] / s_stacked[0])}


def angle_summary(angles_rad: np.ndarray, dim: int, d: int) -> dict:
    cos2 = np.cos(angles_rad) ** 2
    return {"min_deg": float(np.degrees(angles_rad.min())), "median_deg": float(np.degrees(np.median(angles_rad))),
            "mean_cos2": float(cos2.mean()), "random_mean_cos2": dim / d}


VECTOR_LABELS = {"environment": "v_e", "shipped": "v"}


def analyse(store, protocol, env, traits, seeds, kinds, clusters, margin_fraction, second_kind) -> list[dict]:
    """One Table 2 row per trait and vector kind in environment `env`: row-level d as the paper, and the prompt
    level (`behaviour.perturbation_comparison`) for the primary and the second probe, with fluency."""
    rows = []
    base_key = f"{env}/base"
    for trait in traits:
        for kind in kinds:
            label = VECTOR_LABELS[kind]
            v_key, perp_keys = f"{env}/{trait}/{label}", [f"{env}/{trait}/{label}+perp{s}" for s in range(seeds)]
            score = lambda key, probe=None: behaviour.scores_of(store[key], protocol, trait, probe)
            base, v = score(base_key), score(v_key)
            perps = [score(k) for k in perp_keys]
            ds = [behaviour.effect_size(protocol, v, p) for p in perps]
            signed, absolute = stats.mean_sd(ds), stats.mean_sd([None if x is None else abs(x) for x in ds])
            eq = stats.equivalence(v, np.concatenate(perps))
            second = None
            if all(behaviour.has_second_scores(store[k], second_kind, trait) for k in (base_key, v_key, *perp_keys)):
                second = behaviour.perturbation_comparison(
                    score(base_key, second_kind), score(v_key, second_kind),
                    {"v_plus_perp": [score(k, second_kind) for k in perp_keys]}, clusters, margin_fraction)
            rows.append({"environment": env, "trait": trait, "vector": kind, "label": label,
                         "d_mean": signed["mean"], "d_sd": signed["sd"],
                         "abs_d_mean": absolute["mean"], "mean_base": float(base.mean()), "mean_v": float(v.mean()),
                         "mean_v_plus_perp": float(np.mean(perps)),
                         "d_base_vs_v": stats.or_none(stats.cohens_d, v, base),
                         "tost_p": eq["tost_p"], "minimum_detectable_d": eq["minimum_detectable_d"],
                         "prompt_level": behaviour.perturbation_comparison(base, v, {"v_plus_perp": perps}, clusters,
                                                                           margin_fraction),
                         "second_probe": second,
                         "fluency": {name: behaviour.mean_fluency([store[k] for k in ks], clusters)
                                     for name, ks in (("base", [base_key]), ("v", [v_key]), ("v+perp", perp_keys))}})
    return rows


def holm_within_table(rows: list[dict]) -> None:
    """Holm over the table's cells (environment x trait), per vector kind and probe: v - base p, and pooled
    v + v_perp minus v p and TOST p."""
    for kind in sorted({r["vector"] for r in rows}):
        for level in ("prompt_level", "second_probe"):
            tables = [r[level] for r in rows if r["vector"] == kind and r[level]]
            for name, key in (("v_minus_base", "p"), ("pooled_v_plus_perp_minus_v", "p"),
                              ("pooled_v_plus_perp_minus_v", "tost_p")):
                behaviour.holm_entries([t[name] for t in tables], key)


def run(args) -> dict:
    from tqdm import tqdm

    t0 = time.time()
    lm = sj.load_model(args.model)
    protocol = studies.StudyProtocol.from_name(args.protocol, positions="last+generated")
    read_layer, steer_layer = studies.protocol_layers(protocol, lm.num_layers, args.read_layer)
    envs = data.environments()
    probes = behaviour.study_probes(args.probe, data.TRAITS, lm, second=not args.no_second_probe)
    settings = {"model": lm.source, "protocol": protocol.name, "read_layer": read_layer, "steer_layer": steer_layer,
                "positions": protocol.positions, "traits": args.traits, "environments": args.environments,
                "alpha": args.alpha, "vector": args.vector, "seeds": args.seeds, "seed": args.seed,
                "n_prompts": args.n_prompts,
                "samples": args.samples, "max_new_tokens": args.max_new_tokens, "temperature": args.temperature,
                "probe": args.probe, "quick": args.quick, "margin_fraction": args.margin_fraction,
                "second_probe": probes.second_kind}
    out_dir = Path(args.out)
    meta = io.run_metadata(lm, seeds={"seed": args.seed, "seeds": args.seeds})
    store = io.UnitStore(out_dir / "environments_units.json", settings, fresh=args.fresh, meta=meta)
    if store.resumed:
        print(f"resuming: {store.resumed} conditions already done in {store.path}", file=sys.stderr)
    kinds = ["environment", "shipped"] if args.vector == "both" else [args.vector]
    shipped = behaviour.trait_vectors(lm, args.traits, read_layer)
    vectors, raw_norms, rows = {}, {}, []
    for env in args.environments:
        prompts = envs[env][: args.n_prompts]
        plan = behaviour.GenerationPlan(tuple(prompts), args.samples, args.max_new_tokens, args.temperature)
        vectors[env] = {"shipped": dict(shipped)}
        if "environment" in kinds:
            vectors[env]["environment"], raw_norms[env] = environment_vectors(
                lm, args.traits, envs[env], read_layer, {t: float(np.linalg.norm(v)) for t, v in shipped.items()})
        conditions = {f"{env}/base": (None, None, 0.0)}
        for kind in kinds:
            for trait, v in vectors[env][kind].items():
                label = VECTOR_LABELS[kind]
                conditions[f"{env}/{trait}/{label}"] = (steer_layer, v, args.alpha)
                for s in range(args.seeds):
                    perp = studies.orthogonal_to(v, np.random.default_rng([args.seed, data.TRAITS.index(trait),
                                                                           args.environments.index(env), s]))
                    conditions[f"{env}/{trait}/{label}+perp{s}"] = (steer_layer, v + perp, args.alpha)
        behaviour.run_conditions(lm, plan, conditions, store, probes, protocol, args.seed, desc=f"{env} conditions")
        rows += analyse(store, protocol, env, args.traits, args.seeds, kinds, behaviour.row_clusters(plan),
                        args.margin_fraction, probes.second_kind)
    holm_within_table(rows)
    gv = {env: vs[kinds[0]] for env, vs in vectors.items()}       # the vectors the geometry section measures

    print(f"exact J at h{steer_layer} for {args.geometry_prompts} prompts per environment ...", file=sys.stderr)
    geo = {env: environment_geometry(lm, envs[env][: args.geometry_prompts], steer_layer, args.k_smallest)
           for env in tqdm(args.environments, desc="environment Jacobians", file=sys.stderr)}
    summary_keys = ("null_dim_stacked", "null_dim_per_prompt_mean", "bottom_rel_sv_max")
    geometry_out = {"layer": steer_layer, "vector": kinds[0], "prompts_per_environment": args.geometry_prompts,
                    "k_smallest": args.k_smallest,
                    "environments": {e: {k: g[k] for k in summary_keys} for e, g in geo.items()},
                    "pairs": []}
    names = args.environments
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            bottom = spectrum.principal_angles(geo[a]["bottom"], geo[b]["bottom"])
            geometry_out["pairs"].append({
                "a": a, "b": b, "bottom_k": angle_summary(bottom, args.k_smallest, lm.d),
                "eps_null_stacked": geometry.principal_angle_entry(geo[a]["stacked"], geo[b]["stacked"], lm.d),
                "trait_vector_cosines": {t: float(gv[a][t] @ gv[b][t] / (np.linalg.norm(gv[a][t])
                                                                         * np.linalg.norm(gv[b][t])))
                                         for t in args.traits}})
    def null_fraction(factor, eps, v):
        return spectrum.orthogonal_null_fraction(spectrum.null_space_basis(factor, eps), v)

    geometry_out["v_perp_null_fraction"] = {
        e: {t: {spectrum.eps_key(eps): {
            "per_prompt_mean": float(np.mean([null_fraction(f, eps, gv[e][t]) for f in geo[e]["factors"]])),
            "stacked": null_fraction(geo[e]["stacked"], eps, gv[e][t])}
            for eps in spectrum.RANK_EPS} for t in args.traits} for e in names}

    result = {"model": lm.source, "model_name": Path(lm.source).name, "d": lm.d, "settings": settings,
              "protocol": {**protocol.__dict__}, "n_rows_per_condition": args.n_prompts * args.samples,
              "vector_norms": {e: {t: float(np.linalg.norm(v)) for t, v in vs.items()} for e, vs in gv.items()},
              "environment_vector_raw_norms": raw_norms,
              "rows": rows, "geometry": geometry_out, "meta": meta}
    result["seconds_total"] = time.time() - t0
    io.write_json_atomic(out_dir / "environments.json", result)
    io.write_csv(rows, out_dir / "environments.csv")
    plot_table2(result, out_dir / "table2.png")
    plot_angles(result, out_dir / "principal_angles.png")
    print_tables(result)
    cli.wrote([out_dir / name for name in ("environments.json", "environments.csv", "table2.png",
                                           "principal_angles.png")], t0)
    return result


def plot_table2(result: dict, path: Path) -> None:
    """Figure 4: |d| (mean over seeds) per trait x environment as an annotated heat map."""
    from steerjax import plotting
    import matplotlib.pyplot as plt

    s = result["settings"]
    envs, traits = s["environments"], s["traits"]
    kinds = sorted({r["vector"] for r in result["rows"]}, key=list(VECTOR_LABELS).index)
    labels = [(t, k) for k in kinds for t in traits]
    grid = np.array([[next(r["abs_d_mean"] for r in result["rows"] if r["environment"] == e and r["trait"] == t
                           and r["vector"] == k) or np.nan for e in envs] for t, k in labels], float)
    traits = [f"{t} ({VECTOR_LABELS[k]})" for t, k in labels]
    fig, ax = plt.subplots(figsize=(1.5 + 1.6 * len(envs), 1.2 + 0.8 * len(traits)))
    im = ax.imshow(grid, cmap="viridis", vmin=0)
    for i in range(len(traits)):
        for j in range(len(envs)):
            ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", color="w", fontsize=9)
    ax.set(xticks=range(len(envs)), xticklabels=envs, yticks=range(len(traits)), yticklabels=traits)
    plt.setp(ax.get_xticklabels(), rotation=20, ha="right")
    fig.colorbar(im, ax=ax, label="|d(v, v + v_perp)|, mean over seeds (v_e: in-environment vector)")
    ax.set_title(f"{result['model_name']}: {s['protocol']} protocol, steer h{s['steer_layer']}", fontsize=8)
    plotting.save_figure(fig, path)


def plot_angles(result: dict, path: Path) -> None:
    """Mean cos^2 of principal angles between environments' bottom-k subspaces vs the random level."""
    from steerjax import plotting
    import matplotlib.pyplot as plt

    g = result["geometry"]
    envs = result["settings"]["environments"]
    n = len(envs)
    grid = np.eye(n)
    for p in g["pairs"]:
        i, j = envs.index(p["a"]), envs.index(p["b"])
        grid[i, j] = grid[j, i] = p["bottom_k"]["mean_cos2"]
    fig, ax = plt.subplots(figsize=(1.5 + 1.4 * n, 1.2 + 1.2 * n))
    im = ax.imshow(grid, cmap="magma", vmin=0, vmax=1)
    for i in range(n):
        for j in range(n):
            ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", color="c", fontsize=9)
    ax.set(xticks=range(n), xticklabels=envs, yticks=range(n), yticklabels=envs)
    plt.setp(ax.get_xticklabels(), rotation=20, ha="right")
    fig.colorbar(im, ax=ax, label="mean cos^2 of principal angles")
    random_level = g["k_smallest"] / result["d"]
    ax.set_title(f"bottom-{g['k_smallest']} singular subspaces of stacked J at h{g['layer']} "
                 f"(random subspaces: {random_level:.2f})", fontsize=8)
    plotting.save_figure(fig, path)


def cell(result: dict, env: str, trait: str, kind: str) -> dict:
    return next(r for r in result["rows"] if r["environment"] == env and r["trait"] == trait and r["vector"] == kind)


def print_tables(result: dict) -> None:
    s = result["settings"]
    envs = s["environments"]
    kinds = sorted({r["vector"] for r in result["rows"]}, key=list(VECTOR_LABELS).index)
    print(f"{result['model_name']}: {s['protocol']} protocol (read h{s['read_layer']}, steer h{s['steer_layer']}), "
          f"{result['n_rows_per_condition']} samples per condition, {s['max_new_tokens']} tokens, {s['seeds']} seeds")
    for kind in kinds:
        label = VECTOR_LABELS[kind]
        print(f"\nTable 2 format ({kind} vectors): |Cohen's d({label}, {label} + v_perp)|, mean over seeds")
        print(f"{'trait':<11} " + " ".join(f"{e[:14]:>14}" for e in envs))
        for t in s["traits"]:
            print(f"{t:<11} " + " ".join(f"{cli.fmt(cell(result, e, t, kind)['abs_d_mean'], '.2f'):>14}" for e in envs))
        for level, probe in (("prompt_level", s["probe"]), ("second_probe", s.get("second_probe"))):
            print(f"prompt level, {probe} probe: {label} - base and pooled {label} + v_perp - {label} "
                  f"(cluster 95% CI), TOST p_holm at {s.get('margin_fraction', 0.2):g} x effect (power):")
            for t in s["traits"]:
                for e in envs:
                    pl = cell(result, e, t, kind)[level]
                    if not pl:
                        continue
                    eff, c = pl["v_minus_base"], pl["pooled_v_plus_perp_minus_v"]
                    print(f"  {t:<11} {e:<16} {eff['mean']:+.3f} [{eff['ci_low']:+.3f}, {eff['ci_high']:+.3f}]  "
                          f"{c['mean']:+.3f} [{c['ci_low']:+.3f}, {c['ci_high']:+.3f}]  "
                          f"TOST p_holm={cli.fmt(c.get('tost_p_holm'), '.3f')} "
                          f"(power {cli.fmt(c.get('tost_power'), '.2f')})")
    g = result["geometry"]
    print(f"\nJacobian null spaces at h{g['layer']} ({g['prompts_per_environment']} prompts per environment):")
    for e, v in g["environments"].items():
        print(f"  {e:<16} null dim per prompt (mean) {v['null_dim_per_prompt_mean']}  stacked {v['null_dim_stacked']}")
    print(f"principal angles between bottom-{g['k_smallest']} singular subspaces of the stacked J "
          f"(mean cos^2; random subspaces: {g['k_smallest'] / result['d']:.3f}):")
    for p in g["pairs"]:
        print(f"  {p['a']:<16} {p['b']:<16} mean cos^2 {p['bottom_k']['mean_cos2']:.3f}  min angle "
              f"{p['bottom_k']['min_deg']:.1f} deg  trait-vector cosines "
              + ", ".join(f"{t} {c:.2f}" for t, c in p["trait_vector_cosines"].items()))


def main(argv=None) -> int:
    return cli.run_cli(parse_args, run, argv)


if __name__ == "__main__":
    sys.exit(main())
