"""Markdown tables (the paper's Table 1, Figure 3 numbers, Table 2) from finished study folders.

    python experiments/report.py results/orthogonal_corrected results/scale_invariance_corrected ...

Each folder must hold the summary JSON of orthogonal.py, scale_invariance.py or environments.py; the kind
is recognised from the file name. Prints Markdown to stdout (used to write docs/results.md).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from steerjax import cli, io
from steerjax.errors import InputError

KINDS = ("orthogonal", "scale_invariance", "environments")


def _f(x, spec=".3f") -> str:
    return "-" if x is None else format(x, spec)


def _pm(m, s, spec=".3f") -> str:
    return "-" if m is None else (f"{m:{spec}} ± {s:{spec}}" if s is not None else f"{m:{spec}}")


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
            lines.append(f"| {trait} | n={row['n_seeds']} | {_pm(row['d_mean'], row['d_sd'])} | "
                         f"{_pm(row['r_mean'], row['r_sd'])} | {_pm(row['efficacy_mean'], row['efficacy_sd'], '.1%')} |")
    lines += ["", "| Trait | mean base | mean v | d(v, base) | mean 2v | d(2v, v) | raw ratio (paper) | (perp−base)/(v−base) | TOST p, v vs pooled v+perp (±0.2 SD) | detectable d |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for trait, r in result["traits"].items():
        eq = r["equivalence_v_vs_pooled_v_plus_perp"]
        raw = [s["raw_ratio"] for s in r["per_seed"] if s["raw_ratio"] is not None]
        base = [s["baseline_efficacy"] for s in r["per_seed"] if s["baseline_efficacy"] is not None]
        mean = lambda xs: sum(xs) / len(xs) if xs else None  # noqa: E731
        lines.append(f"| {trait} | {r['mean_base']:.3f} | {r['mean_v']:.3f} | {_f(r['d_base_vs_v'], '+.2f')} | "
                     f"{_f(r.get('mean_2v'))} | {_f(r.get('d_v_vs_2v'), '+.2f')} | {_f(mean(raw), '.1%')} | "
                     f"{_f(mean(base), '.1%')} | {_f(eq['tost_p'])} | {eq['minimum_detectable_d']:.2f} |")
    return "\n".join(lines)


def scale_md(result: dict) -> str:
    lines = [f"*{header(result)}, {result['settings']['seeds']} v_perp seeds*", "",
             "| Trait | alpha | mean v [95% CI] | mean v+v_perp [95% CI] | \\|diff\\| | d (mean ± sd over seeds) | TOST p (±0.2 SD) |",
             "|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['trait']} | {r['alpha']:g} | {r['mean_v']:.3f} [{r['ci_v_low']:.3f}, {r['ci_v_high']:.3f}] | "
                     f"{r['mean_v_plus_perp']:.3f} [{r['ci_perp_low']:.3f}, {r['ci_perp_high']:.3f}] | "
                     f"{r['abs_mean_diff']:.3f} | {_pm(r['d_mean'], r['d_sd'])} | {_f(r['tost_p'])} |")
    return "\n".join(lines)


def environments_md(result: dict) -> str:
    s = result["settings"]
    envs = s["environments"]
    lines = [f"*{result['model_name']}, {s['protocol']} protocol: read h{s['read_layer']}, steer h{s['steer_layer']}, "
             f"{result['n_rows_per_condition']} samples per condition, {s['max_new_tokens']} tokens, {s['seeds']} seeds*", "",
             "\\|d(v_e, v_e + v_perp)\\|, mean over seeds (in brackets: d(v_e, base), the steering effect itself)", "",
             "| Trait | " + " | ".join(envs) + " |", "|---|" + "---|" * len(envs)]
    for t in s["traits"]:
        cells = [next(r for r in result["rows"] if r["environment"] == e and r["trait"] == t) for e in envs]
        lines.append(f"| {t} | " + " | ".join(f"{_f(c['abs_d_mean'], '.2f')} ({_f(c['d_base_vs_v'], '+.2f')})"
                                              for c in cells) + " |")
    g = result["geometry"]
    lines += ["", f"Exact Jacobian null spaces at h{g['layer']} ({g['prompts_per_environment']} prompts per environment): "
                  "null dimension at eps = 1e-2 / 1e-3 (per prompt, mean; stacked)", "",
              "| Environment | per prompt 1e-2 | per prompt 1e-3 | stacked 1e-2 | stacked 1e-3 |", "|---|---|---|---|---|"]
    for e, v in g["environments"].items():
        lines.append(f"| {e} | {v['null_dim_per_prompt_mean']['1e-02']:.1f} | {v['null_dim_per_prompt_mean']['1e-03']:.1f} | "
                     f"{v['null_dim_stacked']['1e-02']} | {v['null_dim_stacked']['1e-03']} |")
    lines += ["", f"Principal angles between the environments' bottom-{g['k_smallest']} singular subspaces of the stacked J "
                  f"(random subspaces: mean cos² = {g['k_smallest'] / result['d']:.3f}) and cosines of their trait vectors", "",
              "| A | B | mean cos² | smallest angle | " + " | ".join(f"cos(v_A, v_B) {t}" for t in s["traits"]) + " |",
              "|---|---|---|---|" + "---|" * len(s["traits"])]
    for p in g["pairs"]:
        lines.append(f"| {p['a']} | {p['b']} | {p['bottom_k']['mean_cos2']:.3f} | {p['bottom_k']['min_deg']:.1f}° | "
                     + " | ".join(f"{p['trait_vector_cosines'][t]:.2f}" for t in s["traits"]) + " |")
    return "\n".join(lines)


def folder_markdown(folder: Path) -> str:
    for kind, fn in zip(KINDS, (orthogonal_md, scale_md, environments_md)):
        result = io.read_json(folder / f"{kind}.json")
        if result is not None:
            return f"### {folder.name}\n\n" + fn(result)
    raise InputError(f"{folder} holds none of {', '.join(k + '.json' for k in KINDS)}")


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folders", nargs="+", type=Path, help="result folders of the study scripts")
    return p.parse_args(argv)


def run(args) -> None:
    print("\n\n".join(folder_markdown(f) for f in args.folders))


def main(argv=None) -> int:
    return cli.run_cli(parse_args, run, argv)


if __name__ == "__main__":
    sys.exit(main())
