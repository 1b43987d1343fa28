"""Steering along invisible directions in generation: do directions that the stacked Jacobians of training prompts
call invisible also leave generated text unchanged on held-out prompts?

Setup: one random split of the shipped neutral pool into --n-train training and --n-heldout held-out prompts
(disjoint; the split of `experiments/first_order.py` with the same --seed), the corrected protocol's layer (h[L//2]
unless --layer) and v = the --trait mean-difference vector there. Unit directions orthogonal to v, --directions of
each family:
    null      a random unit direction of the tau-invisible subspace of the training prompts (fisher observable,
              next-token KL <= --tau nats at s = --steer-fraction x median ||h_l||), made orthogonal to v
    random    a uniformly random unit direction orthogonal to v (the paper's v_perp, normalised)
    visible   the most visible training direction orthogonal to v (then the next most visible ones)
Conditions, all steered with alpha = --alpha at the last prompt token and every generated one (as generation
steers), all perturbations norm-matched to the paper's v_perp (||delta|| = ||v||):
    base                     unsteered
    v                        alpha v
    v+{family}{k}            alpha (v + ||v|| u): the paper's v + v_perp, norm sqrt(2) ||v||
    rot{theta}/{family}{k}   alpha (cos theta v + sin theta ||v|| u): norm-preserving rotations, theta in --thetas
Each condition samples --samples continuations of --max-new-tokens tokens per held-out prompt (temperature
--temperature; the same per-row sampling keys in every condition). Scores:
  - KL per token: the exact KL(p_v || p_c) of the next-token distributions along the v-steered samples (teacher
    forcing: both models read the same v-sampled tokens; mean over generated tokens, then over a prompt's samples);
  - the --trait probe score of each condition's own samples, minus v's, per prompt, and as a fraction of v's
    steering effect (v - base).
The unit of analysis is the held-out prompt (samples of a prompt are averaged first): 95% t-intervals over prompts;
paired t-tests of each condition's score against v's with Holm's correction over the table; TOST of the same
differences at --margin-fraction x v's steering effect (fixed before the run) with its power at a true difference
of zero (`steerjax.clustered`).
Writes DIR/invisible_steering_units.json after every condition (a rerun resumes), invisible_steering.json,
invisible_steering.csv and invisible_steering.png, and prints the table.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
from scipy import stats as st

import steerjax as sj
from steerjax import behaviour, clustered, data, identifiability, io, plotting, sequence, spectrum, stats, studies
from steerjax.cli import (ArgumentParser, check_trait, fmt, fmt_ci, parse_floats, run_cli, run_or_report, wrote,
                          MODEL_HELP)
from steerjax.extraction import extract_vector

FAMILIES = ("null", "random", "visible")
POSITIONS = "last+generated"


def parse_args(argv):
    p = ArgumentParser(description=__doc__)
    p.add_argument("--model", default=None, help=MODEL_HELP)
    p.add_argument("--layer", type=int, default=None, help="steered layer (default L // 2, the corrected protocol's)")
    p.add_argument("--trait", default="formality", help="trait whose vector is v and whose probe scores (formality)")
    p.add_argument("--alpha", type=float, default=1.0, help="steering strength (default 1.0, the paper's)")
    p.add_argument("--n-train", type=int, default=64, help="training prompts of the invisible subspace (default 64)")
    p.add_argument("--n-heldout", type=int, default=48, help="held-out prompts the conditions run on (default 48)")
    p.add_argument("--samples", type=int, default=3, help="samples per held-out prompt (default 3)")
    p.add_argument("--max-new-tokens", type=int, default=40, help="tokens generated per sample (default 40)")
    p.add_argument("--temperature", type=float, default=0.8, help="sampling temperature (default 0.8)")
    p.add_argument("--tau", type=float, default=1e-3, help="invisibility threshold in nats (default 1e-3)")
    p.add_argument("--steer-fraction", type=float, default=0.1,
                   help="reference steer norm of the invisible subspace, fraction of the median ||h_l|| (0.1)")
    p.add_argument("--thetas", default="15,30,45,90", help="rotation angles in degrees (default 15,30,45,90)")
    p.add_argument("--directions", type=int, default=2, help="directions per family (default 2)")
    p.add_argument("--probe", choices=("lexical", "model"), default="lexical", help="trait scorer (default lexical)")
    p.add_argument("--margin-fraction", type=float, default=0.2,
                   help="TOST margin as a fraction of v's steering effect on the probe (0.2, fixed before the run)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true",
                   help="preset: 8 training and 4 held-out prompts, 2 samples of 8 tokens, thetas 45,90, 1 direction")
    p.add_argument("--out", default="results/invisible_steering", help="output folder")
    p.add_argument("--fresh", action="store_true", help="discard finished units in --out instead of resuming")
    p.add_argument("--report", default=None, metavar="JSON",
                   help="print the markdown table of a finished invisible_steering.json and exit (no model is loaded)")
    args = p.parse_args(argv)
    if args.report is not None:
        return args
    if args.quick:
        args.n_train, args.n_heldout = min(args.n_train, 8), min(args.n_heldout, 4)
        args.samples, args.max_new_tokens, args.thetas, args.directions = 2, 8, "45,90", 1
    args.thetas = sorted(set(parse_floats(p, args.thetas, "--thetas")))
    if any(not 0 < t <= 180 for t in args.thetas):
        p.error(f"--thetas must lie in (0, 180] degrees, got {args.thetas}")
    for name in ("n_train", "samples", "max_new_tokens", "directions"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.n_heldout < 2:
        p.error(f"--n-heldout must be >= 2 (intervals are over prompts), got {args.n_heldout}")
    if not 0 < args.margin_fraction < 1:
        p.error(f"--margin-fraction must lie in (0, 1), got {args.margin_fraction}")
    if not args.tau > 0 or not 0 < args.steer_fraction < 10 or not args.temperature > 0:
        p.error("--tau, --steer-fraction and --temperature must be > 0")
    if not np.isfinite(args.alpha) or args.alpha == 0:
        p.error(f"--alpha must be finite and non-zero, got {args.alpha}")
    pool = len(data.neutral_pool())
    if args.n_train + args.n_heldout > pool:
        p.error(f"--n-train + --n-heldout ({args.n_train + args.n_heldout}) exceeds the pool of {pool} prompts")
    check_trait(p, args.trait)
    return args


def unit_orthogonal(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    v_hat = v / np.linalg.norm(v)
    for _ in range(2):
        u = u - (u @ v_hat) * v_hat
    return u / np.linalg.norm(u)


def family_directions(basis, stacked, v, count: int, rng) -> dict[str, np.ndarray]:
    """count unit directions (count, d) orthogonal to v per family (null: none if the subspace is empty)."""
    null = ([unit_orthogonal(u, v) for u in identifiability.unit_combinations(basis, count, rng)]
            if basis.shape[1] else [])
    random = [unit_orthogonal(studies.orthogonal_to(v, rng), v) for _ in range(count)]
    visible, taken = [], np.zeros((v.size, 0))
    for _ in range(count):                  # the most visible direction orthogonal to v and to those already taken
        block = np.column_stack([v, taken])
        q = np.linalg.qr(block)[0]
        projected = stacked - (stacked @ q) @ q.T
        u = np.linalg.svd(projected, full_matrices=False)[2][0]
        u = u - q @ (q.T @ u)
        visible.append(u / np.linalg.norm(u))
        taken = np.column_stack([taken, visible[-1]])
    return {"null": np.asarray(null).reshape(-1, v.size), "random": np.asarray(random),
            "visible": np.asarray(visible)}


def conditions_of(v: np.ndarray, directions: dict, thetas: list[float]) -> dict[str, dict]:
    """key -> {"vector" (d,) or None, "family", "k", "theta"}; the vectors are scaled by alpha when steering."""
    norm = float(np.linalg.norm(v))
    out = {"base": {"vector": None, "family": None, "k": None, "theta": None},
           "v": {"vector": v, "family": None, "k": None, "theta": 0.0}}
    for family, dirs in directions.items():
        for k, u in enumerate(dirs):
            out[f"v+{family}{k}"] = {"vector": v + norm * u, "family": family, "k": k, "theta": None}
            for theta in thetas:
                t = np.radians(theta)
                out[f"rot{theta:g}/{family}{k}"] = {"vector": np.cos(t) * v + np.sin(t) * norm * u,
                                                    "family": family, "k": k, "theta": float(theta)}
    return out


def per_prompt(values, samples: int) -> np.ndarray:
    """Row values (prompts * samples,) (prompt-major) -> per-prompt means (prompts,)."""
    return np.asarray(values, np.float64).reshape(-1, samples).mean(axis=1)


def interval(x) -> dict:
    mean, lo, hi = stats.mean_ci(x)
    return {"mean": mean, "ci_low": lo, "ci_high": hi}


def steering_effect(units: dict, samples: int) -> dict:
    """v's steering effect on the probe: per-prompt score(v) - score(base), mean and 95% interval over prompts."""
    return interval(per_prompt(units["cond=v"]["scores"], samples) - per_prompt(units["cond=base"]["scores"], samples))


def score_tests(diff: np.ndarray, effect: dict, margin_fraction: float) -> dict:
    """Prompt-level tests of a condition's score difference to v: two-sided paired t p-value, and (when v's effect
    is known to be non-zero) TOST at margin_fraction x |effect| with its power at a true difference of 0."""
    out = {"p": float(st.ttest_1samp(diff, 0.0).pvalue) if np.std(diff) > 0 else 1.0}
    if effect["ci_low"] > 0 or effect["ci_high"] < 0:
        margin = clustered.effect_margin(effect["mean"], margin_fraction)
        tost = clustered.tost_paired(diff, margin)
        sd = float(np.std(diff, ddof=1)) or 1e-12
        try:
            needed = clustered.units_for_power(sd, margin)
        except sj.InputError:
            needed = None
        out.update(tost_margin=margin, tost_p=tost.p, tost_equivalent=tost.equivalent,
                   tost_power=clustered.tost_power(diff.size, sd, margin), prompts_for_80_power=needed)
    return out


def summarize(units: dict, conditions: dict, samples: int, margin_fraction: float) -> list[dict]:
    """Per condition: prompt-level KL per token against v (mean, 95% CI) and probe score differences to v (also
    over v's steering effect, only when that effect's interval excludes zero), with paired t p-values (Holm-adjusted
    over the table's conditions) and TOST at an effect-tied margin."""
    score = {k: per_prompt(units[f"cond={k}"]["scores"], samples) for k in conditions}
    effect = steering_effect(units, samples)
    effect_known = effect["ci_low"] > 0 or effect["ci_high"] < 0
    rows = []
    for key, c in conditions.items():
        diff = score[key] - score["v"]
        kl = units.get(f"kl={key}")
        rows.append({
            "condition": key, "family": c["family"], "k": c["k"], "theta": c["theta"],
            "norm_over_v": units[f"cond={key}"]["norm_over_v"],
            "kl_per_token": None if kl is None else interval(kl["per_prompt"]),
            "score": interval(score[key]), "score_minus_v": None if key == "v" else interval(diff),
            "score_minus_v_over_effect": (float(diff.mean() / effect["mean"]) if key != "v" and effect_known
                                          else None),
            "score_tests": None if key == "v" else score_tests(diff, effect, margin_fraction),
        })
    tested = [r for r in rows if r["score_tests"] is not None]
    for r, p_holm in zip(tested, clustered.holm([r["score_tests"]["p"] for r in tested])):
        r["score_tests"]["p_holm"] = float(p_holm)
    return rows


def run(args) -> dict:
    from tqdm import tqdm

    t0 = time.time()
    lm = sj.load_model(args.model)
    layer = lm.num_layers // 2 if args.layer is None else args.layer
    if not 0 <= layer <= lm.num_layers:
        raise sj.SteeringError(f"--layer {layer} outside [0, {lm.num_layers}] (the model has {lm.num_layers} blocks)")
    pool = data.neutral_pool()
    split = identifiability.disjoint_splits(len(pool), args.n_train, args.n_heldout, 1, args.seed)[0]
    train, heldout = [int(i) for i in split.train], [int(i) for i in split.heldout]
    settings = {"model": lm.source, "layer": layer, **{k: getattr(args, k) for k in (
        "trait", "alpha", "n_train", "n_heldout", "samples", "max_new_tokens", "temperature", "tau", "steer_fraction",
        "thetas", "directions", "probe", "margin_fraction", "seed", "quick")}}
    meta = io.run_metadata(lm, seeds={"seed": args.seed})
    out_dir = Path(args.out)
    store = io.UnitStore(out_dir / "invisible_steering_units.json", settings, fresh=args.fresh, meta=meta)
    if store.resumed:
        print(f"resuming: {store.resumed} finished units in {store.path}", file=sys.stderr)

    # directions (deterministic from the seed: recomputed on resume)
    pos, neg = data.trait_pairs(args.trait)
    v = np.asarray(extract_vector(lm, pos, neg, layer), np.float64)
    pool_batch = lm.tokenize(pool)
    print(f"layer {layer}: exact fisher factors of {len(train) + len(heldout)} prompts ...", file=sys.stderr)
    norms, factors = identifiability.prompt_factors(lm, pool_batch, train + heldout, layer)
    median_h = float(np.median(list(norms.values())))
    steer_norm = args.steer_fraction * median_h
    stacked = list(spectrum.stack_factors(np.stack([factors[i] for i in train])))[-1]
    basis, _ = identifiability.invisible_basis(stacked, len(train), steer_norm, args.tau)
    directions = family_directions(basis, stacked, v, args.directions, np.random.default_rng([args.seed, layer]))
    grams = {"train": identifiability.mean_gram(np.stack([factors[i] for i in train])),
             "heldout": identifiability.mean_gram(np.stack([factors[i] for i in heldout]))}
    direction_kls = {family: {where: [0.5 * steer_norm**2 * float(u @ g @ u) for u in dirs]
                              for where, g in grams.items()} for family, dirs in directions.items()}
    conditions = conditions_of(v, directions, args.thetas)

    # generation: every condition on the held-out prompts, the same sampling keys in every condition
    plan = behaviour.GenerationPlan(tuple(pool[i] for i in heldout), args.samples, args.max_new_tokens,
                                    args.temperature)
    batch = lm.tokenize(plan.row_prompts)
    probe = behaviour.make_probes(args.probe, [args.trait], lm)[args.trait]
    steer_of = lambda c: None if c["vector"] is None else sj.Steer(layer, c["vector"], args.alpha, POSITIONS)
    total = 2 * len(conditions) - 1                 # a generation per condition, a KL against v for all but v
    done = sum(f"cond={k}" in store for k in conditions) + sum(f"kl={k}" in store for k in conditions if k != "v")
    bar = tqdm(total=total, initial=done, desc="conditions (generate, then KL to v)", unit="unit", file=sys.stderr)
    for key, c in conditions.items():
        if f"cond={key}" in store:
            continue
        t_unit = time.time()
        out = sj.generate(lm, batch, steer_of(c), max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                          seed=args.seed)
        texts = sj.generated_texts(lm, out)
        unit = {"texts": texts, "scores": probe.score(texts).tolist(),
                "norm_over_v": 0.0 if c["vector"] is None else float(np.linalg.norm(c["vector"]) / np.linalg.norm(v)),
                "seconds": time.time() - t_unit}
        if key == "v":
            unit.update(tokens=np.asarray(out.tokens).tolist(), attention_mask=np.asarray(out.attention_mask).tolist(),
                        prompt_len=out.prompt_len)
        store.put(f"cond={key}", unit)
        bar.update(1)
    v_unit = store["cond=v"]
    for key, c in conditions.items():
        if key == "v" or f"kl={key}" in store:
            continue
        t_unit = time.time()
        kl = sequence.sequence_kl(lm, np.asarray(v_unit["tokens"]), np.asarray(v_unit["attention_mask"]),
                                  v_unit["prompt_len"], steer_of(conditions["v"]), steer_of(c))
        rows = np.nanmean(kl, axis=1)
        store.put(f"kl={key}", {"per_row": rows.tolist(), "per_prompt": per_prompt(rows, args.samples).tolist(),
                                "seconds": time.time() - t_unit})
        bar.update(1)
    bar.close()
    units = {k: store[k] for k in store.units}
    h_heldout = np.asarray([norms[i] for i in heldout])
    result = {"model": lm.source, "model_name": Path(lm.source).name, "d": lm.d, "settings": settings,
              "train": train, "heldout": heldout, "median_h": median_h, "steer_norm_ref": steer_norm,
              "v_norm": float(np.linalg.norm(v)), "v_over_median_h_heldout": float(np.linalg.norm(v) /
                                                                                  np.median(h_heldout)),
              "invisible_dim": int(basis.shape[1]), "direction_second_order_kl": direction_kls,
              "steering_effect": steering_effect(units, args.samples),
              "definition": "KL per token = exact KL(p_v || p_c) along v-steered samples, mean over generated tokens "
                            "and a prompt's samples; score differences per prompt; 95% t-intervals over prompts",
              "summary": summarize(units, conditions, args.samples, args.margin_fraction), "meta": meta,
              "seconds_total": time.time() - t0}
    io.write_json_atomic(out_dir / "invisible_steering.json", result)
    io.write_csv(csv_rows(result), out_dir / "invisible_steering.csv")
    plotting.plot_invisible_steering(result, out_dir / "invisible_steering.png")
    print(markdown(result))
    wrote([out_dir / name for name in ("invisible_steering.json", "invisible_steering.csv",
                                       "invisible_steering.png")], t0)
    return result


def csv_rows(result: dict) -> list[dict]:
    rows = []
    for r in result["summary"]:
        row = {k: r[k] for k in ("condition", "family", "k", "theta", "norm_over_v", "score_minus_v_over_effect")}
        for name in ("kl_per_token", "score", "score_minus_v"):
            for part in ("mean", "ci_low", "ci_high"):
                row[f"{name}_{part}"] = None if r[name] is None else r[name][part]
        rows.append(row)
    return rows


def markdown(result: dict) -> str:
    """docs/identifiability.md's generation table, from a result file."""
    s = result["settings"]
    effect = result["steering_effect"]
    lines = [f"*{result['model_name']}, layer {s['layer']}, {s['trait']} vector v at alpha = {s['alpha']:g} "
             f"(||v|| = {result['v_over_median_h_heldout']:.3f} x median ||h_l|| of the held-out prompts), "
             f"{s['n_heldout']} held-out prompts x {s['samples']} samples x {s['max_new_tokens']} tokens; means over "
             "prompts [95% t-interval over prompts]; KL per token = exact KL(p_v || p_condition) along the v-steered "
             f"samples; the {s['trait']} probe's score minus v's, and that difference over v's steering effect "
             f"(score(v) - score(base) = {fmt_ci(effect, '.3f')}; the ratio is shown only when this interval excludes "
             "zero)*", "",
             "| condition | norm / norm(v) | KL per token (nats) | score - score(v) | / effect of v | p (Holm) | "
             f"TOST p at {s['margin_fraction']:g} x effect (power) | prompts for 80% power |",
             "|---|---|---|---|---|---|---|---|"]
    for r in result["summary"]:
        if r["condition"] == "v":
            continue
        t = r["score_tests"]
        tost = f"{t['tost_p']:.3f} ({t['tost_power']:.2f})" if "tost_p" in t else "-"
        lines.append(f"| {r['condition']} | {r['norm_over_v']:.3f} | {fmt_ci(r['kl_per_token'], '.4f')} | "
                     f"{fmt_ci(r['score_minus_v'], '.3f')} | {fmt(r['score_minus_v_over_effect'], '.2f')} | "
                     f"{t['p_holm']:.3f} | {tost} | {fmt(t.get('prompts_for_80_power'), '')} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    return run_cli(parse_args, run_or_report(run, lambda result: print(markdown(result))), argv)


if __name__ == "__main__":
    sys.exit(main())
