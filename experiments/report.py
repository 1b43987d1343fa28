"""Markdown tables (the paper's Table 1, Figure 3 numbers, Tables 2 and 3, and the prompt-level tables with their
findings) from finished study folders.

    python experiments/report.py docs/results/orthogonal_corrected docs/results/scale_invariance_corrected ...
    python experiments/report.py --update docs/results.md README.md

Each folder must hold the summary JSON of orthogonal.py, scale_invariance.py, environments.py or
logit_equivalence.py; the kind is recognised from the file name. Prints Markdown to stdout. With --update, every
block of the given Markdown files that opens with `<!-- report FOLDER ... -->` (all tables),
`<!-- report-summary FOLDER ... -->` (headline findings) or `<!-- report-design FOLDER ... -->` (design and power)
and closes with `<!-- /report -->` is rewritten from the folders it names (paths relative to the repository root),
so no number in them is typed by hand; tests/test_docs_tables.py checks that the committed pages are current.
"""

from __future__ import annotations

import re
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
             "\\|d(v, v + v_perp)\\| (row level, the paper's statistic), mean over seeds (in brackets: d(v, base), "
             "the steering effect itself); v_e = the vector extracted in the environment, v = the shipped one", "",
             "| Trait | Vector | " + " | ".join(envs) + " |", "|---|---|" + "---|" * len(envs)]
    labels = list(dict.fromkeys((r.get("vector", s.get("vector")), r.get("label", "v_e" if s.get("vector") ==
                                                                            "environment" else "v"))
                                for r in result["rows"]))
    for t in s["traits"]:
        for kind, label in labels:
            cells = [next(r for r in result["rows"] if r["environment"] == e and r["trait"] == t
                          and r.get("vector", kind) == kind) for e in envs]
            lines.append(f"| {t} | {label} | " + " | ".join(
                f"{cli.fmt(c['abs_d_mean'], '.2f')} ({cli.fmt(c['d_base_vs_v'], '+.2f')})" for c in cells) + " |")
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


# ----------------------------------------------------------------------------- prompt level (issue 22)

def reading(c: dict) -> str:
    """How an interval reads: "compatible with zero" when it includes zero, else its sign."""
    if c["ci_low"] <= 0 <= c["ci_high"]:
        return "compatible with zero"
    return "above zero" if c["ci_low"] > 0 else "below zero"


def tost_cells(c: dict, effect: float) -> list[str]:
    """TOST Holm p at the effect-tied margin, its power, prompts for 80% power, and the smallest margin this design
    confirms at 80% power (as a fraction of v's effect)."""
    if c.get("tost_p") is None:
        return ["-"] * 4
    least = c.get("margin_for_80_power")
    least_text = "-" if least is None else f"{least:.3f} ({least / abs(effect):.0%})"
    return [f"{cli.fmt(c.get('tost_p_holm', c['tost_p']), '.3f')} (±{c['margin']:.3f})", f"{c['tost_power']:.2f}",
            cli.fmt(c.get("prompts_for_80_power"), ""), least_text]


def heterogeneity_cell(h: dict | None) -> str:
    return "-" if h is None else f"{h['tau2']:.1e} ({h['p']:.2f})"


FINDINGS_HEAD = ("Findings (generated from the table; \"above / below zero\" and \"compatible with zero\" read the "
                 "unadjusted 95% interval, the Holm-adjusted p is in the table):")
FAMILY_LABELS = {"v_plus_perp": "v + v_perp (norm √2‖v‖)", "matched": "v + v_perp rescaled to ‖v‖"}
PROMPT_HEADER = ["| Cell | Probe | v − base [95% CI] | Holm p | Comparison | − v [95% CI] | Holm p "
                 "| TOST Holm p (±margin) | power | prompts for 80% | margin with 80% power (/ effect) "
                 "| τ² across v_perp (Q p) |",
                 "|---|---|---|---|---|---|---|---|---|---|---|---|"]


def prompt_rows(label: str, probe: str, pl: dict | None) -> list[str]:
    """Rows of the prompt-level table for one cell (a trait, an alpha, an environment) and probe."""
    if not pl:
        return []
    e = pl["v_minus_base"]
    out = []
    for family, name in FAMILY_LABELS.items():
        c = pl.get(f"pooled_{family}_minus_v")
        if c is None:
            continue
        het = pl.get(f"heterogeneity_{family}_minus_v")
        out.append(" | ".join(["", label, probe, cli.fmt_ci(e, "+.3f"), cli.fmt(e.get("p_holm", e["p"]), ".3f"), name,
                               cli.fmt_ci(c, "+.3f"), cli.fmt(c.get("p_holm", c["p"]), ".3f"),
                               *tost_cells(c, e["mean"]), heterogeneity_cell(het), ""]).strip())
    return out


def fluency_cells(f: dict | None) -> str:
    if not f:
        return "-"
    return f"{cli.fmt(f['repetition'], '.3f')} / {cli.fmt(f['unsteered_loglik'], '.2f')}"


def finding(label: str, probe: str, pl: dict | None) -> str | None:
    """One sentence per cell and probe, claiming no more than the table: v's effect and whether its interval
    excludes zero; each perturbed family minus v and whether it is compatible with zero; whether equivalence at the
    effect-tied margin is shown, with the power the design had."""
    families = [f for f in FAMILY_LABELS if pl and f"pooled_{f}_minus_v" in pl]
    if not families:
        return None
    e = pl["v_minus_base"]
    parts = [f"{label}, {probe} probe: v − base = {cli.fmt_ci(e, '+.3f')} ({reading(e)})"]
    for family in families:
        c = pl[f"pooled_{family}_minus_v"]
        text = f"{FAMILY_LABELS[family]} − v = {cli.fmt_ci(c, '+.3f')} ({reading(c)}"
        if c.get("tost_p") is not None:
            p = c.get("tost_p_holm", c["tost_p"])
            text += (f"; equivalence within ±{c['margin']:.3f} {'shown' if p < 0.05 else 'not shown'}, "
                     f"TOST Holm p = {p:.3f}, power {c['tost_power']:.2f}")
        parts.append(text + ")")
    if pl[f"pooled_{families[0]}_minus_v"].get("tost_p") is None:
        parts.append("no equivalence test: v's effect is exactly zero here")
    elif e["ci_low"] <= 0 <= e["ci_high"]:
        parts.append("v's own effect is compatible with zero, so a margin tied to it says little")
    return "; ".join(parts) + "."


def orthogonal_prompt_md(result: dict) -> str:
    s = result["settings"]
    probes = [("prompt_level", s["probe"]), ("second_probe", s.get("second_probe"))]
    n_prompts = result["n_rows_per_condition"] // s["plan"]["samples_per_prompt"]
    lines = [f"Prompt level: the unit is the prompt ({n_prompts} "
             f"prompts, {s['plan']['samples_per_prompt']} paired samples each, averaged); 95% cluster-bootstrap "
             f"intervals; Holm over the table's traits; TOST margin {s['margin_fraction']:g} x (v − base) of the same "
             f"probe; the v_perp seeds pooled per row ({s['seeds']} seeds)", "", *PROMPT_HEADER]
    for level, probe in probes:
        for trait, r in result["traits"].items():
            lines += prompt_rows(trait, probe, r.get(level))
    lines += ["", "Fluency, prompt-level means: repetition rate (1 − distinct 3-grams / 3-grams) / the unsteered "
                  "model's log-likelihood per token (nats) of the continuation", "",
              "| Trait | base | v | 2v | v + v_perp | v + v_perp rescaled | v_perp alone |",
              "|---|---|---|---|---|---|---|"]
    for trait, r in result["traits"].items():
        f = r.get("fluency", {})
        lines.append(f"| {trait} | " + " | ".join(fluency_cells(f.get(k)) for k in
                                                    ("base", "v", "2v", "v+perp", "matched", "perp")) + " |")
    sentences = [finding(trait, probe, r.get(level)) for level, probe in probes
                 for trait, r in result["traits"].items()]
    return "\n".join(lines + ["", FINDINGS_HEAD, ""]
                     + [f"- {x}" for x in sentences if x])


def scale_prompt_md(result: dict) -> str:
    s = result["settings"]
    rows = [r for r in result["rows"] if r.get("prompt_level")]
    probes = [("prompt_level", s["probe"]), ("second_probe", s.get("second_probe"))]
    lines = [f"Prompt level per alpha ({result['n_rows_per_condition'] // s['plan']['samples_per_prompt']} prompts x "
             f"{s['plan']['samples_per_prompt']} paired samples; Holm over the table's alphas; TOST margin "
             f"{s['margin_fraction']:g} x (v − base) at the same alpha)", "", *PROMPT_HEADER]
    for level, probe in probes:
        for r in rows:
            lines += prompt_rows(f"{r['trait']}, alpha {r['alpha']:g}", probe, r.get(level))
    lines += ["", "Fluency (repetition rate / unsteered log-likelihood per token)", "",
              "| Trait | alpha | v (alpha 0: base) | v + v_perp |", "|---|---|---|---|"]
    for r in result["rows"]:
        f = r.get("fluency", {})
        lines.append(f"| {r['trait']} | {r['alpha']:g} | {fluency_cells(f.get('v'))} | "
                     f"{fluency_cells(f.get('v+perp'))} |")
    sentences = [finding(f"{r['trait']} at alpha {r['alpha']:g}", probe, r.get(level)) for level, probe in probes
                 for r in rows]
    return "\n".join(lines + ["", FINDINGS_HEAD, ""] + [f"- {x}" for x in sentences if x])


def environments_prompt_md(result: dict) -> str:
    s = result["settings"]
    probes = [("prompt_level", s["probe"]), ("second_probe", s.get("second_probe"))]
    lines = [f"Prompt level per environment ({s['n_prompts']} prompts x {s['samples']} paired samples; Holm over the "
             f"table's environment x trait cells, per vector; TOST margin {s['margin_fraction']:g} x (v − base); "
             "v_e = the vector extracted in the environment, v = the shipped one)", "", *PROMPT_HEADER]
    for level, probe in probes:
        for r in result["rows"]:
            lines += prompt_rows(f"{r['trait']}, {r['environment']}, {r['label']}", probe, r.get(level))
    lines += ["", "Fluency (repetition rate / unsteered log-likelihood per token)", "",
              "| Trait | Environment | Vector | base | v | v + v_perp |", "|---|---|---|---|---|---|"]
    for r in result["rows"]:
        f = r.get("fluency", {})
        lines.append(f"| {r['trait']} | {r['environment']} | {r['label']} | " + " | ".join(
            fluency_cells(f.get(k)) for k in ("base", "v", "v+perp")) + " |")
    sentences = [finding(f"{r['trait']} in {r['environment']} ({r['label']})", probe, r.get(level))
                 for level, probe in probes for r in result["rows"]]
    return "\n".join(lines + ["", FINDINGS_HEAD, ""] + [f"- {x}" for x in sentences if x])


PROMPT_LEVEL = {"orthogonal": orthogonal_prompt_md, "scale_invariance": scale_prompt_md,
                "environments": environments_prompt_md}


def load_study(folder: Path) -> tuple[str, dict]:
    """(kind, summary JSON) of a result folder."""
    for kind in KINDS:
        result = io.read_json(Path(folder) / f"{kind}.json")
        if result is not None:
            return kind, result
    raise InputError(f"{folder} holds none of {', '.join(k + '.json' for k in KINDS)}")


def study_markdown(folder: Path) -> str:
    """Every table of one study folder: the paper-format tables, then the prompt-level ones where the run has them."""
    kind, result = load_study(folder)
    fn = dict(zip(KINDS, (orthogonal_md, scale_md, environments_md, logit_equivalence_md)))[kind]
    parts = [fn(result)]
    has_prompt_level = (any(r.get("prompt_level") for r in result.get("traits", {}).values())
                        or any(r.get("prompt_level") for r in result.get("rows", [])))
    if kind in PROMPT_LEVEL and has_prompt_level:
        parts.append(PROMPT_LEVEL[kind](result))
    return "\n\n".join(parts)


def folder_markdown(folder: Path) -> str:
    return f"### {Path(folder).name}\n\n" + study_markdown(folder)


def summary_lines(folder: Path) -> list[str]:
    """The headline findings of one study (primary probe, the paper's v + v_perp), for README."""
    kind, result = load_study(folder)
    probe = result["settings"]["probe"]
    if kind == "orthogonal":
        return [finding(f"Table 1, {t}", probe, r.get("prompt_level")) for t, r in result["traits"].items()]
    if kind == "scale_invariance":
        return [finding(f"Figure 3, {r['trait']} at alpha {r['alpha']:g}", probe, r.get("prompt_level"))
                for r in result["rows"] if r.get("prompt_level")]
    if kind == "environments":
        out = []
        for label in dict.fromkeys(r["label"] for r in result["rows"]):
            cells = [r["prompt_level"] for r in result["rows"] if r["label"] == label and r.get("prompt_level")]
            steer = sum(not (c["v_minus_base"]["ci_low"] <= 0 <= c["v_minus_base"]["ci_high"]) for c in cells)
            pooled = [c["pooled_v_plus_perp_minus_v"] for c in cells]
            differ = sum(not (c["ci_low"] <= 0 <= c["ci_high"]) for c in pooled)
            tested = [c for c in pooled if c.get("tost_p") is not None]
            shown = sum(c.get("tost_p_holm", c["tost_p"]) < 0.05 for c in tested)
            power = sorted(c["tost_power"] for c in tested)
            out.append(f"Table 2 ({label}, {probe} probe, unadjusted 95% intervals): of {len(cells)} environment x "
                       f"trait cells, v − base excludes zero in {steer}; pooled v + v_perp − v excludes zero in "
                       f"{differ}; equivalence at "
                       f"{result['settings']['margin_fraction']:.0%} of v's effect is shown in {shown} of "
                       f"{len(tested)} tested (TOST power "
                       + (f"{power[0]:.2f}-{power[-1]:.2f}" if power else "-") + ").")
        return out
    return []


def prompt_tables(kind: str, result: dict) -> list[dict]:
    """Every prompt-level table (primary and second probe) of a study result."""
    cells = result["traits"].values() if kind == "orthogonal" else result.get("rows", [])
    return [c[level] for c in cells for level in ("prompt_level", "second_probe") if c.get(level)]


def design_line(folder: Path) -> str:
    """The design a study ran and the power it had: prompts x samples, seeds, run time, and for the pooled
    v + v_perp comparisons of the cells where v steers (its effect interval excludes zero) the TOST power at the
    effect-tied margin, the prompts 80% power would need, and the smallest margin this design confirms with 80%
    power (as a fraction of v's effect)."""
    kind, result = load_study(folder)
    s = result["settings"]
    if kind == "environments":
        prompts, samples = s["n_prompts"], s["samples"]
        where = f"{len(s['environments'])} environments x "
    else:
        prompts, samples, where = len(s["plan"]["prompts"]), s["plan"]["samples_per_prompt"], ""
    steers = lambda e: not (e["ci_low"] <= 0 <= e["ci_high"])
    comparisons = [(t["pooled_v_plus_perp_minus_v"], t["v_minus_base"]["mean"]) for t in prompt_tables(kind, result)
                   if t["pooled_v_plus_perp_minus_v"].get("tost_p") is not None and steers(t["v_minus_base"])]
    span = lambda xs, spec: "-" if not xs else f"{min(xs):{spec}}-{max(xs):{spec}}"
    power = [c["tost_power"] for c, _ in comparisons]
    needed = [c["prompts_for_80_power"] for c, _ in comparisons if c.get("prompts_for_80_power")]
    least = [c["margin_for_80_power"] / abs(e) for c, e in comparisons if c.get("margin_for_80_power") and e]
    minutes = result.get("seconds_total", result.get("seconds_generation", 0)) / 60
    return (f"`{kind}`: {where}{prompts} prompts x {samples} samples, {s['seeds']} v_perp seeds, "
            f"{s.get('margin_fraction', 0.2):.0%} margin, {minutes:.0f} min on 2 cores. Pooled v + v_perp against v, "
            f"in the {len(comparisons)} table cells (both probes) where v's effect interval excludes zero: "
            f"TOST power {span(power, '.2f')}; prompts for 80% power {span(needed, '')}; smallest margin with 80% "
            f"power {span(least, '.0%')} of v's effect.")


def render_block(directive: str, args: list[str], root: Path) -> str:
    if directive == "report":
        return "\n\n".join(study_markdown(root / a) for a in args)
    if directive == "report-design":
        return "\n".join(f"- {design_line(root / a)}" for a in args)
    return "\n".join(f"- {line}" for a in args for line in summary_lines(root / a) if line)


BLOCK = re.compile(r"(<!-- (report|report-summary|report-design) ([^>]*?) -->\n)(.*?)(<!-- /report -->)", re.S)


def update_text(text: str, root: Path) -> str:
    """`text` with every report block regenerated from the folders it names (relative to `root`)."""
    return BLOCK.sub(lambda m: m.group(1) + render_block(m.group(2), m.group(3).split(), root) + "\n" + m.group(5),
                     text)


def parse_args(argv):
    p = cli.ArgumentParser(description=__doc__)
    p.add_argument("folders", nargs="*", type=Path, help="result folders of the study scripts")
    p.add_argument("--update", nargs="+", type=Path, default=None, metavar="MARKDOWN",
                   help="rewrite the report blocks of these Markdown files in place (folders relative to the "
                        "repository root)")
    args = p.parse_args(argv)
    if not args.folders and not args.update:
        p.error("give result folders, or --update with Markdown files")
    return args


def run(args) -> None:
    if args.folders:
        print("\n\n".join(folder_markdown(f) for f in args.folders))
    root = Path(__file__).resolve().parents[1]
    for page in args.update or []:
        text = page.read_text()
        new = update_text(text, root)
        if new != text:
            page.write_text(new)
        print(f"{page}: {len(BLOCK.findall(text))} report blocks {'rewritten' if new != text else 'already current'}",
              file=sys.stderr)


def main(argv=None) -> int:
    return cli.run_cli(parse_args, run, argv)


if __name__ == "__main__":
    sys.exit(main())
