"""Markdown tables (the paper's Table 1, Figure 3 numbers, Tables 2 and 3) from finished study folders.

    python experiments/report.py results/orthogonal_corrected results/scale_invariance_corrected ...

Each folder must hold the summary JSON of orthogonal.py, scale_invariance.py, environments.py or
logit_equivalence.py; the kind is recognised from the file name. Prints Markdown to stdout (used to write
docs/results.md).
"""

from __future__ import annotations

import sys
from pathlib import Path

from steerjax import cli, io
from steerjax.errors import InputError

KINDS = ("orthogonal", "scale_invariance", "environments", "logit_equivalence")

# the paper's Table 3 (R, agreement %, top-10 overlap %) per model and trait, for side-by-side reading
PAPER_TABLE3 = {"Qwen-3B": {"humor": (0.90, 81, 86), "formality": (0.76, 94, 96), "politeness": (0.75, 93, 96)},
                "Llama-8B": {"humor": (0.64, 96, 90), "formality": (0.49, 93, 95), "politeness": (0.65, 91, 94)}}


def header(result: dict) -> str:
    s = result["settings"]
    return (f"{result['model_name']}, {s['protocol']} protocol: read h{s['read_layer']}, steer h{s['steer_layer']} "
            f"({s['positions']}), {result['n_rows_per_condition']} samples per condition")


def orthogonal_md(result: dict) -> str:
    eff = "raw \\|perp\\|/\\|v\\|" if result["protocol"]["efficacy"] == "raw_ratio" else "(perp−base)/(v−base)"
    lines = [f"*{header(result)}, alpha {result['settings']['alpha']:g}*", "",
             f"| Trait | Seeds | Cohen's d | Correlation | Perp-only, {eff} |", "|---|---|---|---|---|"]
    for trait, r in result["traits"].items():
        for row in r["table"]:
            d, corr, efficacy = (cli.fmt_pm(row[f"{k}_mean"], row[f"{k}_sd"], spec)
                                 for k, spec in (("d", ".3f"), ("r", ".3f"), ("efficacy", ".1%")))
            lines.append(f"| {trait} | n={row['n_seeds']} | {d} | {corr} | {efficacy} |")
    lines += ["", "| Trait | mean base | mean v | d(v, base) | mean 2v | d(2v, v) | raw ratio (paper) "
                  "| (perp−base)/(v−base) | TOST p, v vs pooled v+perp (±0.2 SD) | detectable d |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for trait, r in result["traits"].items():
        eq = r["equivalence_v_vs_pooled_v_plus_perp"]
        raw = [s["raw_ratio"] for s in r["per_seed"] if s["raw_ratio"] is not None]
        base = [s["baseline_efficacy"] for s in r["per_seed"] if s["baseline_efficacy"] is not None]
        mean = lambda xs: sum(xs) / len(xs) if xs else None
        lines.append(f"| {trait} | {r['mean_base']:.3f} | {r['mean_v']:.3f} | {cli.fmt(r['d_base_vs_v'], '+.2f')} | "
                     f"{cli.fmt(r.get('mean_2v'), '.3f')} | {cli.fmt(r.get('d_v_vs_2v'), '+.2f')} | "
                     f"{cli.fmt(mean(raw), '.1%')} | {cli.fmt(mean(base), '.1%')} | {cli.fmt(eq['tost_p'], '.3f')} | "
                     f"{eq['minimum_detectable_d']:.2f} |")
    return "\n".join(lines)


def scale_md(result: dict) -> str:
    lines = [f"*{header(result)}, {result['settings']['seeds']} v_perp seeds*", "",
             "| Trait | alpha | mean v [95% CI] | mean v+v_perp [95% CI] | \\|diff\\| | d (mean ± sd over seeds) "
             "| TOST p (±0.2 SD) |",
             "|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['trait']} | {r['alpha']:g} | "
                     f"{r['mean_v']:.3f} [{r['ci_v_low']:.3f}, {r['ci_v_high']:.3f}] | "
                     f"{r['mean_v_plus_perp']:.3f} [{r['ci_perp_low']:.3f}, {r['ci_perp_high']:.3f}] | "
                     f"{r['abs_mean_diff']:.3f} | {cli.fmt_pm(r['d_mean'], r['d_sd'], '.3f')} | "
                     f"{cli.fmt(r['tost_p'], '.3f')} |")
    return "\n".join(lines)


def environments_md(result: dict) -> str:
    s = result["settings"]
    envs = s["environments"]
    lines = [f"*{result['model_name']}, {s['protocol']} protocol: read h{s['read_layer']}, steer h{s['steer_layer']}, "
             f"{result['n_rows_per_condition']} samples per condition, {s['max_new_tokens']} tokens, "
             f"{s['seeds']} seeds*", "",
             "\\|d(v_e, v_e + v_perp)\\|, mean over seeds (in brackets: d(v_e, base), the steering effect itself)", "",
             "| Trait | " + " | ".join(envs) + " |", "|---|" + "---|" * len(envs)]
    for t in s["traits"]:
        cells = [next(r for r in result["rows"] if r["environment"] == e and r["trait"] == t) for e in envs]
        lines.append(f"| {t} | " + " | ".join(f"{cli.fmt(c['abs_d_mean'], '.2f')} ({cli.fmt(c['d_base_vs_v'], '+.2f')})"
                                              for c in cells) + " |")
    g = result["geometry"]
    lines += ["", f"Exact Jacobian null spaces at h{g['layer']} ({g['prompts_per_environment']} prompts per "
                  "environment): null dimension at eps = 1e-2 / 1e-3 (per prompt, mean; stacked)", "",
              "| Environment | per prompt 1e-2 | per prompt 1e-3 | stacked 1e-2 | stacked 1e-3 |",
              "|---|---|---|---|---|"]
    for e, v in g["environments"].items():
        per_prompt = v["null_dim_per_prompt_mean"]
        lines.append(f"| {e} | {per_prompt['1e-02']:.1f} | {per_prompt['1e-03']:.1f} | "
                     f"{v['null_dim_stacked']['1e-02']} | {v['null_dim_stacked']['1e-03']} |")
    lines += ["", f"Principal angles between the environments' bottom-{g['k_smallest']} singular subspaces of the "
                  f"stacked J (random subspaces: mean cos² = {g['k_smallest'] / result['d']:.3f}) and cosines of their "
                  "trait vectors", "",
              "| A | B | mean cos² | smallest angle | " + " | ".join(f"cos(v_A, v_B) {t}" for t in s["traits"]) + " |",
              "|---|---|---|---|" + "---|" * len(s["traits"])]
    for p in g["pairs"]:
        lines.append(f"| {p['a']} | {p['b']} | {p['bottom_k']['mean_cos2']:.3f} | {p['bottom_k']['min_deg']:.1f}° | "
                     + " | ".join(f"{p['trait_vector_cosines'][t]:.2f}" for t in s["traits"]) + " |")
    return "\n".join(lines)


def logit_equivalence_md(result: dict) -> str:
    """Table 3 in the paper's format (R = L2(v, v+v_perp) / L2(v, r), r replacing v), the paper's numbers
    beside it, then the norm-matched comparison of the three perturbation kinds."""
    pr, s = result["protocol"], result["settings"]
    rows = {(r["trait"], r["alpha"], r["kind"]): r for r in result["rows"]}
    paper_cols = " | ".join(f"paper {m}: R / Agr. / Ovl." for m in PAPER_TABLE3)
    lines = [f"*{result['model_name']}, {pr['name']} protocol: read h{pr['read_layer']}, steer h{pr['steer_layer']} "
             f"({pr['positions']}), {s['n_prompts']} prompts x {s['seeds']} seeds, kernel = {s['k_smallest']} smallest "
             f"singular directions of J*", "",
             f"| Trait | alpha | R | Agreement% | Overlap% | {paper_cols} |",
             "|---|---|---|---|---|" + "---|" * len(PAPER_TABLE3)]
    for t in s["traits"]:
        for i, a in enumerate(s["alphas"]):
            r = rows[(t, a, "orthogonal")]
            paper = " | ".join("{:.2f} / {}% / {}%".format(*PAPER_TABLE3[m][t]) if i == 0 and t in PAPER_TABLE3[m]
                               else "" for m in PAPER_TABLE3)
            lines.append(f"| {t} | {a:g} | {r['R_vs_paper_random']:.2f} | {r['top1_mean']:.0%} | {r['top10_mean']:.0%} "
                         f"| {paper} |")
    lines += ["", "Norm-matched perturbations (‖delta‖ = ‖v‖) against steer(v): KL(steer(v) ‖ steer(v + delta)) "
                  "and, in brackets, top-1 agreement; J-ratio = ‖J delta‖ / ‖J v‖ for the kernel draws", "",
              "| Trait | alpha | orthogonal | random | kernel | kernel / orthogonal KL | kernel J-ratio "
              "| r replacing v (paper) |",
              "|---|---|---|---|---|---|---|---|"]
    for t in s["traits"]:
        for a in s["alphas"]:
            cell = lambda k: f"{rows[(t, a, k)]['kl_mean']:.2e} ({rows[(t, a, k)]['top1_mean']:.0%})"
            ker = rows[(t, a, "kernel")]
            lines.append(f"| {t} | {a:g} | {cell('orthogonal')} | {cell('random')} | {cell('kernel')} | "
                         f"{ker['kl_vs_orthogonal']:.3f} | {ker['jvp_ratio_mean']:.1e} | {cell('paper_random')} |")
    return "\n".join(lines)


def folder_markdown(folder: Path) -> str:
    for kind, fn in zip(KINDS, (orthogonal_md, scale_md, environments_md, logit_equivalence_md)):
        result = io.read_json(folder / f"{kind}.json")
        if result is not None:
            return f"### {folder.name}\n\n" + fn(result)
    raise InputError(f"{folder} holds none of {', '.join(k + '.json' for k in KINDS)}")


def parse_args(argv):
    p = cli.ArgumentParser(description=__doc__)
    p.add_argument("folders", nargs="+", type=Path, help="result folders of the study scripts")
    return p.parse_args(argv)


def run(args) -> None:
    print("\n\n".join(folder_markdown(f) for f in args.folders))


def main(argv=None) -> int:
    return cli.run_cli(parse_args, run, argv)


if __name__ == "__main__":
    sys.exit(main())
