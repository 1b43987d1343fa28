"""Logit-level equivalence test (the paper's Appendix A / Table 3), with norm-matched controls and
perturbations drawn from the measured ker(J).

For each trait, v = mean-difference vector read at the protocol's read layer, steered at the last prompt
token of neutral prompts at the protocol's steer layer with strength alpha. Each perturbation delta has
||delta|| = ||v|| exactly, drawn per prompt and seed:
    orthogonal   Gaussian Gram-Schmidt'ed against v (the paper's v_perp)
    random       Gaussian (not orthogonalised)
    kernel       random combination of the k smallest right singular vectors of the exact
                 J = d logits[last] / d h_steer at that prompt (unsteered point), orthogonalised against v
and logits of steer(v + delta) are compared with steer(v) (last position): L2, KL(steer(v) || steer(v+delta)),
top-1 agreement, top-10 overlap, L2 relative to ||logits(v) - logits(unsteered)||, and R = L2(kind) / L2(random).
The paper's own ratio R_paper compares v + v_perp against a *replacement* r (||r|| = ||v||), whose logit
difference comes from a shift of norm ~sqrt(2)||v|| (the norm confound): kind `paper_random` below.

Protocols: `corrected` (default) extracts and steers h[L//2]; `paper` extracts h[L//2] and steers
h[L//2 + 1] (the released code's off-by-one). Writes DIR/logit_equivalence.json, .csv and kl_by_kind.png.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

import steerjax as sj
from steerjax.cli import ArgumentParser, fmt, parse_floats, parse_traits, run_cli, wrote, MODEL_HELP
from steerjax import data, io, stats, studies

KINDS = ("orthogonal", "random", "kernel")          # additive, ||delta|| = ||v||
PAPER_RANDOM = "paper_random"                       # the paper's denominator: r replaces v, ||r|| = ||v||
ALL_KINDS = KINDS + (PAPER_RANDOM,)


def parse_args(argv):
    p = ArgumentParser(description=__doc__)
    p.add_argument("--model", default=None, help=MODEL_HELP)
    p.add_argument("--protocol", choices=studies.PROTOCOLS, default="corrected")
    p.add_argument("--traits", default="all", help=f"'all' or a comma list of {','.join(data.TRAITS)}")
    p.add_argument("--alphas", default="0.25,1,4", help="steering strengths, comma list (v is the raw "
                                                        "mean-difference vector; default 0.25,1,4)")
    p.add_argument("--n-prompts", type=int, default=20, help="neutral eval prompts (default 20, max 100)")
    p.add_argument("--seeds", type=int, default=5, help="perturbation draws per prompt (default 5)")
    p.add_argument("--seed", type=int, default=0, help="base random seed")
    p.add_argument("--k-smallest", type=int, default=32,
                   help="dimension of the measured kernel: k smallest singular directions of J (default 32)")
    p.add_argument("--read-layer", type=int, default=None, help="extraction layer (default L // 2)")
    p.add_argument("--quick", action="store_true", help="preset: 1 trait (formality), 8 prompts, 2 seeds")
    p.add_argument("--out", default=None, help="output folder (default results/logit_equivalence_<protocol>)")
    args = p.parse_args(argv)
    if args.quick:
        if args.traits == "all":
            args.traits = "formality"
        args.n_prompts = min(args.n_prompts, 8)
        args.seeds = min(args.seeds, 2)
    args.alphas = parse_floats(p, args.alphas, "--alphas")
    if 0 in args.alphas:
        p.error("--alphas must be non-zero (alpha = 0 is the unsteered reference; negative alphas steer along -v)")
    args.traits = parse_traits(p, args.traits)
    if not 1 <= args.n_prompts <= 100:
        p.error(f"--n-prompts must be in [1, 100], got {args.n_prompts}")
    if args.seeds < 1:
        p.error(f"--seeds must be >= 1, got {args.seeds}")
    args.out = args.out or f"results/logit_equivalence_{args.protocol}"
    return args


def draw_perturbations(v, bases, seeds: int, base_seed: int, trait_index: int) -> dict[str, np.ndarray]:
    """kind -> (seeds * B, d) perturbations (row s * B + b: seed s, prompt b), ||row|| = ||v||."""
    out = {k: [] for k in ALL_KINDS}
    for s in range(seeds):
        for b, basis in enumerate(bases):
            rng = np.random.default_rng([base_seed, trait_index, s, b])
            out["orthogonal"].append(studies.orthogonal_to(v, rng))
            out["random"].append(studies.random_like(v, rng))
            out["kernel"].append(studies.kernel_direction(None, v, rng, basis=basis))
            out[PAPER_RANDOM].append(studies.random_like(v, rng))
    return {k: np.stack(x) for k, x in out.items()}


def compare(ref: np.ndarray, other: np.ndarray) -> dict[str, np.ndarray]:
    """Per-row metrics of last-position logits (N, V) vs (N, V)."""
    top1 = ref.argmax(-1) == other.argmax(-1)
    top10 = np.array([stats.topk_overlap(r, o, k=10) for r, o in zip(ref, other)])
    return {"l2": stats.l2_distance(ref, other), "kl": stats.kl_divergence(ref, other),
            "top1": top1.astype(float), "top10": top10}


def summarize(metrics: dict[str, np.ndarray], seeds: int) -> dict:
    """Means over all (seed, prompt) rows, and the spread of per-seed means."""
    out = {}
    for name, values in metrics.items():
        per_seed = values.reshape(seeds, -1).mean(axis=1)
        out[f"{name}_mean"] = float(values.mean())
        out[f"{name}_median"] = float(np.median(values))
        out[f"{name}_seed_sd"] = float(per_seed.std(ddof=1)) if seeds > 1 else None
    return out


def run(args) -> dict:
    from tqdm import tqdm

    t0 = time.time()
    lm = sj.load_model(args.model)
    protocol = studies.StudyProtocol.from_name(args.protocol)
    read_layer, steer_layer = studies.protocol_layers(protocol, lm.num_layers, args.read_layer)
    if not 1 <= args.k_smallest < lm.d:
        raise sj.InputError(f"--k-smallest must be in [1, {lm.d - 1}], got {args.k_smallest}")
    prompts = data.neutral_eval_prompts()[: args.n_prompts]
    batch = lm.tokenize(prompts)
    B, S = len(prompts), args.seeds
    tiled = studies.tile_batch(batch, S)

    print(f"exact J at steer layer {steer_layer} for {B} prompts ...", file=sys.stderr)
    t_jac = time.time()
    factors = sj.jacobian_operator(lm, batch, steer_layer, observable="logits").factors()
    kernel = [studies.kernel_basis(f, args.k_smallest) for f in factors]
    bases = [k[0] for k in kernel]
    kernel_rel_sv_max = [float(k[1].max()) for k in kernel]
    t_jac = time.time() - t_jac
    base_logits = studies.steered_last_logits(lm, batch, None)

    result = {
        "model": lm.source, "model_name": Path(lm.source).name, "d": lm.d, "num_layers": lm.num_layers,
        "protocol": {"name": protocol.name, "description": protocol.description, "read_layer": read_layer,
                     "steer_layer": steer_layer, "positions": protocol.positions},
        "settings": {"traits": args.traits, "alphas": args.alphas, "n_prompts": B, "seeds": S, "seed": args.seed,
                     "k_smallest": args.k_smallest, "quick": args.quick},
        "prompts": prompts,
        "kernel": {"definition": f"span of the {args.k_smallest} smallest right singular vectors of exact "
                                 f"J = d logits[last] / d h_{steer_layer} (unsteered), per prompt",
                   "max_rel_singular_value_per_prompt": kernel_rel_sv_max,
                   "sigma_max_per_prompt": [float(np.linalg.svd(f, compute_uv=False)[0]) for f in factors],
                   "jacobian_seconds": t_jac},
        "kinds": {"orthogonal": "v + v_perp, v_perp Gaussian Gram-Schmidt'ed against v, ||v_perp|| = ||v||",
                  "random": "v + r, r Gaussian, ||r|| = ||v||",
                  "kernel": "v + k, k in measured ker(J), orthogonalised against v, ||k|| = ||v||",
                  PAPER_RANDOM: "r replaces v, ||r|| = ||v|| (the paper's denominator; shift ||r - v|| ~ "
                                "sqrt(2)||v||)"},
        "vectors": {}, "rows": [], "meta": io.run_metadata(lm, seeds={"seed": args.seed, "seeds": args.seeds}),
    }
    todo = [(t, a) for t in args.traits for a in args.alphas]
    bar = tqdm(total=len(todo), desc="trait x alpha", unit="cond", file=sys.stderr)
    for ti, trait in enumerate(args.traits):
        pos, neg = data.trait_pairs(trait)
        v = sj.extract_vector(lm, pos, neg, read_layer, method="mean_diff")
        v = np.asarray(v, np.float64)
        deltas = draw_perturbations(v, bases, S, args.seed, data.TRAITS.index(trait))
        jv = np.linalg.norm(factors @ v, axis=-1)                            # ||J_b v||, (B,)
        result["vectors"][trait] = {"norm": float(np.linalg.norm(v)), "read_layer": read_layer}
        for alpha in args.alphas:
            logits_v = studies.steered_last_logits(lm, batch, steer_layer, v, alpha)
            effect = {"l2": stats.l2_distance(base_logits, logits_v), "kl": stats.kl_divergence(base_logits, logits_v),
                      "top1": (base_logits.argmax(-1) == logits_v.argmax(-1)).astype(float)}
            ref = np.tile(logits_v, (S, 1))
            per_kind = {}
            for kind in ALL_KINDS:
                steer_vecs = deltas[kind] if kind == PAPER_RANDOM else v[None] + deltas[kind]
                logits_k = studies.steered_last_logits(lm, tiled, steer_layer, steer_vecs, alpha)
                metrics = compare(ref, logits_k)
                # first-order prediction: ||J (shift)|| / ||J v|| with shift = steer vector - v
                shift = steer_vecs - v[None]
                jshift = np.linalg.norm(np.einsum("brd,sbd->sbr", factors, shift.reshape(S, B, -1)), axis=-1)
                metrics["jvp_ratio"] = (jshift / jv[None]).reshape(-1)
                per_kind[kind] = summarize(metrics, S)
            for kind in ALL_KINDS:
                row = {"trait": trait, "alpha": alpha, "kind": kind, **per_kind[kind]}
                row["R_vs_random"] = row["l2_mean"] / per_kind["random"]["l2_mean"]
                row["R_vs_paper_random"] = row["l2_mean"] / per_kind[PAPER_RANDOM]["l2_mean"]
                row["kl_vs_orthogonal"] = (row["kl_mean"] / per_kind["orthogonal"]["kl_mean"]
                                           if per_kind["orthogonal"]["kl_mean"] > 0 else None)
                row["l2_rel_steer"] = row["l2_mean"] / float(effect["l2"].mean())
                row["kl_rel_steer"] = row["kl_mean"] / float(effect["kl"].mean()) if effect["kl"].mean() > 0 else None
                row["steer_l2_mean"] = float(effect["l2"].mean())
                row["steer_kl_mean"] = float(effect["kl"].mean())
                row["steer_top1_vs_unsteered"] = float(effect["top1"].mean())
                result["rows"].append(row)
            bar.update(1)
    bar.close()
    result["seconds_total"] = time.time() - t0
    out_dir = Path(args.out)
    io.write_json_atomic(out_dir / "logit_equivalence.json", result)
    io.write_csv(result["rows"], out_dir / "logit_equivalence.csv")
    plot_kl(result, out_dir / "kl_by_kind.png")
    print_tables(result)
    wrote([out_dir / name for name in ("logit_equivalence.json", "logit_equivalence.csv", "kl_by_kind.png")], t0)
    return result


def plot_kl(result: dict, path: Path) -> None:
    """Mean KL(steer(v) || steer(v + delta)) against alpha, one line per kind, one panel per trait."""
    from steerjax import plotting
    import matplotlib.pyplot as plt

    traits = result["settings"]["traits"]
    fig, axes = plt.subplots(1, len(traits), figsize=(4.5 * len(traits), 4), squeeze=False)
    for ax, trait in zip(axes[0], traits):
        rows = [r for r in result["rows"] if r["trait"] == trait]
        alphas = sorted({r["alpha"] for r in rows})
        for kind, marker in zip(ALL_KINDS, "osd^"):
            ys = [next(r["kl_mean"] for r in rows if r["kind"] == kind and r["alpha"] == a) for a in alphas]
            ax.plot(alphas, np.maximum(ys, 1e-16), marker=marker, ls="--" if kind == PAPER_RANDOM else "-",
                    label=kind)
        ax.plot(alphas, [next(r["steer_kl_mean"] for r in rows if r["alpha"] == a) for a in alphas],
                color="grey", ls=":", marker=".", label="unsteered vs v")
        ax.set(yscale="log", xlabel="alpha", ylabel="mean KL(steer(v) || steer(v + delta)) [nats]", title=trait)
        ax.legend(fontsize=7)
    p = result["protocol"]
    fig.suptitle(f"{result['model_name']}: {p['name']} protocol (read h{p['read_layer']}, steer h{p['steer_layer']})")
    plotting.save_figure(fig, path)


def print_tables(result: dict) -> None:
    p, s = result["protocol"], result["settings"]
    print(f"{result['model_name']}: protocol {p['name']} (read h{p['read_layer']}, steer h{p['steer_layer']}, "
          f"last token), {s['n_prompts']} prompts x {s['seeds']} seeds, kernel = {s['k_smallest']} smallest "
          f"directions of J (max sigma/sigma_max {max(result['kernel']['max_rel_singular_value_per_prompt']):.1e})")
    print("\nTable 3 format (paper's R = L2(v, v+v_perp) / L2(v, r), r replaces v; agreement/overlap of v+v_perp)")
    print(f"{'trait':<11} {'alpha':>5} {'R':>6} {'Agreement%':>10} {'Overlap%':>8}")
    rows = result["rows"]
    for r in rows:
        if r["kind"] == "orthogonal":
            print(f"{r['trait']:<11} {r['alpha']:>5g} {r['R_vs_paper_random']:>6.2f} {100 * r['top1_mean']:>9.0f}% "
                  f"{100 * r['top10_mean']:>7.0f}%")
    print("\nNorm-matched (||delta|| = ||v||) perturbations vs steer(v): R = L2(kind) / L2(random); "
          "rel = L2 / L2(unsteered, v); J-ratio = ||J delta|| / ||J v||")
    head = (f"{'trait':<11} {'alpha':>5} {'kind':<12} {'L2':>8} {'R':>6} {'rel':>6} {'KL':>9} {'KL/orth':>8} "
            f"{'top1%':>6} {'top10%':>6} {'J-ratio':>8}")
    print(head)
    for r in rows:
        print(f"{r['trait']:<11} {r['alpha']:>5g} {r['kind']:<12} {r['l2_mean']:>8.3g} {r['R_vs_random']:>6.2f} "
              f"{r['l2_rel_steer']:>6.2f} {r['kl_mean']:>9.2e} {fmt(r['kl_vs_orthogonal'], '>8.2g')} "
              f"{100 * r['top1_mean']:>6.0f} {100 * r['top10_mean']:>6.0f} {r['jvp_ratio_mean']:>8.2g}")
    steer = {(r["trait"], r["alpha"]): r for r in rows}
    print("\nsteering effect (unsteered vs steer(v)): " + "; ".join(
        f"{t} a={a:g}: L2 {r['steer_l2_mean']:.3g}, KL {r['steer_kl_mean']:.2e}, "
        f"top1 kept {100 * r['steer_top1_vs_unsteered']:.0f}%"
        for (t, a), r in steer.items()))


def main(argv=None) -> int:
    return run_cli(parse_args, run, argv)


if __name__ == "__main__":
    sys.exit(main())
