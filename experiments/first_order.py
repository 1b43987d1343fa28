"""Where the first-order picture holds: exact KL against its second-order prediction over a sweep of steer sizes,
where the paper's steers sit on that sweep, and how the invisible subspace moves at the steered point.

For each layer in --layers, one random split of the shipped neutral pool into --n-train training and --n-heldout
held-out prompts (disjoint; the split of `experiments/identifiability.py` with the same --seed):
  - directions (unit): v (the --trait mean-difference vector at that layer, normalised), --directions unit
    directions of the tau-invisible subspace of the training prompts (tau = --tau at the reference steer norm
    s_ref = --steer-fraction x median ||h_l||), --directions uniformly random ones, and the most visible training
    direction orthogonal to v;
  - for each steer size s = f x median ||h_l|| (f in --fractions): the exact KL(p || p(s u)) of the next-token
    distribution at the last prompt token (forward passes of the one-token tail) and its second-order prediction
    0.5 s^2 ||J_F u||^2 (exact fisher factors), both means over the held-out prompts; ratio = exact / second order
    (per family: mean exact / mean second order over its directions);
  - the radius: the f at which the ratio first leaves [0.9, 1.1] (log-linear interpolation in the sweep);
  - where the behavioural studies sit: alpha ||v_t|| / median ||h_l|| for every trait t with alpha = --alpha (the
    paper's 1.0) for v, v + v_perp (norm sqrt(2) ||v||) and 2v, over the pool prompts and the studies' prompts;
  - the steered point: the tau-invisible subspace of the training prompts recomputed at h_l + alpha v and at
    h_l + alpha (v + v_perp) (v_perp a random direction orthogonal to v, ||v_perp|| = ||v||), its dimension, the
    principal angles to the subspace at h_l, and the mean KL per direction at the point of the subspace found at
    h_l (against tau).
Writes DIR/first_order_units.json after every finished (layer, part) (a rerun resumes), first_order.json,
first_order.csv and first_order.png, and prints the tables.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

import steerjax as sj
from steerjax import behaviour, data, identifiability, io, plotting, spectrum, studies
from steerjax.cli import (ArgumentParser, check_trait, fmt, parse_floats, run_cli, run_or_report, wrote,
                          MODEL_HELP)

FAMILIES = ("v", "invisible", "random", "visible")
POINTS = ("v", "v+perp")


def parse_args(argv):
    p = ArgumentParser(description=__doc__)
    p.add_argument("--model", default=None, help=MODEL_HELP)
    p.add_argument("--layers", default="5,15,25", help="comma list of layers (default 5,15,25)")
    p.add_argument("--n-train", type=int, default=64, help="training prompts of the invisible subspace (default 64)")
    p.add_argument("--n-heldout", type=int, default=32, help="held-out prompts of the sweep (default 32)")
    p.add_argument("--tau", type=float, default=1e-3, help="invisibility threshold in nats (default 1e-3)")
    p.add_argument("--steer-fraction", type=float, default=0.1,
                   help="reference steer norm of the invisible subspace, as a fraction of the median ||h_l|| (0.1)")
    p.add_argument("--fractions", default="0.00625,0.0125,0.025,0.05,0.1,0.15,0.2,0.3,0.4,0.6,0.8",
                   help="steer sizes of the sweep, as fractions of the median ||h_l||")
    p.add_argument("--directions", type=int, default=4, help="sampled unit directions per family (default 4)")
    p.add_argument("--alpha", type=float, default=1.0, help="the studies' steering strength (default 1.0, the paper's)")
    p.add_argument("--trait", default="formality", help="trait whose vector is v (default formality)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true",
                   help="preset: layer 15, 8 training and 8 held-out prompts, 2 directions, 5 sizes")
    p.add_argument("--out", default="results/first_order", help="output folder")
    p.add_argument("--fresh", action="store_true", help="discard finished units in --out instead of resuming")
    p.add_argument("--report", default=None, metavar="JSON",
                   help="print the markdown tables of a finished first_order.json and exit (no model is loaded)")
    args = p.parse_args(argv)
    if args.report is not None:
        return args
    if args.quick:
        args.layers, args.fractions = "15", "0.0125,0.05,0.1,0.2,0.4"
        args.n_train, args.n_heldout, args.directions = min(args.n_train, 8), min(args.n_heldout, 8), 2
    try:
        args.layers = sorted({int(x) for x in args.layers.split(",") if x.strip()})
    except ValueError:
        p.error(f"--layers must be a comma list of ints, got {args.layers!r}")
    args.fractions = sorted(set(parse_floats(p, args.fractions, "--fractions")))
    if not args.layers or not args.fractions or min(args.fractions) <= 0:
        p.error("--layers and --fractions must be non-empty, with every fraction > 0")
    for name in ("n_train", "n_heldout", "directions"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not args.tau > 0 or not 0 < args.steer_fraction < 10 or not np.isfinite(args.alpha) or args.alpha == 0:
        p.error("--tau must be > 0, --steer-fraction in (0, 10) and --alpha finite and non-zero")
    pool = len(data.neutral_pool())
    if args.n_train + args.n_heldout > pool:
        p.error(f"--n-train + --n-heldout ({args.n_train + args.n_heldout}) exceeds the pool of {pool} prompts")
    check_trait(p, args.trait)
    return args


def family_directions(basis, stacked, v, count: int, rng) -> dict[str, np.ndarray]:
    """Unit directions (k, d) per family: v itself, random combinations of the invisible basis (none if it is
    empty), uniformly random, and the most visible direction orthogonal to v."""
    d = v.size
    return {"v": (v / np.linalg.norm(v))[None],
            "invisible": (identifiability.unit_combinations(basis, count, rng) if basis.shape[1] else np.zeros((0, d))),
            "random": identifiability.unit_combinations(np.eye(d), count, rng),
            "visible": identifiability.most_visible_orthogonal(stacked, v)[None]}


def sweep_unit(lm, heldout, heldout_gram, directions: dict, median_h: float, args) -> dict:
    """Exact and second-order mean held-out KL of every direction at every steer size; per-family ratios and
    radii (of the family means, and min / max over its directions)."""
    sizes = np.asarray(args.fractions) * median_h
    families = {}
    for name, dirs in directions.items():
        if not len(dirs):
            families[name] = None
            continue
        quad = 0.5 * np.einsum("kd,de,ke->k", dirs, heldout_gram, dirs)             # KL / s^2 per direction
        exact = np.stack([identifiability.exact_mean_kl(lm, heldout, dirs, s) for s in sizes])   # (F, k)
        second = sizes[:, None] ** 2 * quad[None]
        ratio = exact.mean(axis=1) / second.mean(axis=1)
        radius = identifiability.first_order_radius(args.fractions, ratio)
        per_direction = [identifiability.first_order_radius(args.fractions, exact[:, j] / second[:, j])
                         for j in range(len(dirs))]
        families[name] = {"directions": len(dirs), "exact_kl": exact.mean(axis=1).tolist(),
                          "second_order_kl": second.mean(axis=1).tolist(), "ratio": ratio.tolist(),
                          "radius": radius.value, "radius_status": radius.status,
                          "radius_per_direction": [r.value for r in per_direction],
                          "radius_status_per_direction": [r.status for r in per_direction]}
    return {"fractions": list(args.fractions), "steer_norms": sizes.tolist(), "families": families}


def point_unit(lm, pool_batch, train: list[int], layer: int, offset: np.ndarray, basis_h: np.ndarray,
               steer_norm: float, args) -> dict:
    """The tau-invisible subspace of the training prompts at h_l + offset against the one at h_l."""
    _, factors = identifiability.prompt_factors(lm, pool_batch, train, layer, at=offset)
    stacked_point = list(spectrum.stack_factors(np.stack([factors[i] for i in train])))[-1]
    basis_p, _ = identifiability.invisible_basis(stacked_point, len(train), steer_norm, args.tau)
    angles = identifiability.subspace_angles_deg(basis_h, basis_p)
    gram_point = identifiability.mean_gram(np.stack([factors[i] for i in train]))
    return {"offset_norm": float(np.linalg.norm(offset)), "invisible_dim_at_h": int(basis_h.shape[1]),
            "invisible_dim_at_point": int(basis_p.shape[1]), "angles_deg": angles.tolist(),
            "angle_median_deg": float(np.median(angles)) if angles.size else None,
            "angle_max_deg": float(angles.max()) if angles.size else None,
            "mean_cos2": float(np.mean(np.cos(np.radians(angles)) ** 2)) if angles.size else None,
            "kl_at_point_of_h_subspace": identifiability.mean_kl_per_direction(basis_h, gram_point, steer_norm)}


def behavioural_positions(lm, layer: int, median_pool: float, alpha: float, vectors: dict) -> dict:
    """Per trait (vectors: trait -> v_t at the layer): ||v_t||, and alpha ||v||, alpha ||v + v_perp|| =
    sqrt(2) alpha ||v|| and 2 alpha ||v|| as fractions of the median ||h_l|| of the pool prompts and of the studies'
    evaluation prompts."""
    eval_norms = np.linalg.norm(np.asarray(lm.forward(lm.tokenize(data.neutral_eval_prompts()),
                                                      return_hidden=True).hidden[layer][:, -1], np.float64), axis=1)
    median_eval = float(np.median(eval_norms))
    out = {}
    for trait, vector in vectors.items():
        norm = float(np.linalg.norm(vector))
        out[trait] = {"v_norm": norm, **{
            f"{name}_fraction_{where}": abs(alpha) * scale * norm / median
            for name, scale in (("v", 1.0), ("v+perp", np.sqrt(2.0)), ("2v", 2.0))
            for where, median in (("pool", median_pool), ("eval", median_eval))}}
    return {"median_h_eval": median_eval, "traits": out}


def run(args) -> dict:
    from tqdm import tqdm

    t0 = time.time()
    lm = sj.load_model(args.model)
    bad = [layer for layer in args.layers if not 0 <= layer <= lm.num_layers]
    if bad:
        raise sj.SteeringError(f"--layers {bad} outside [0, {lm.num_layers}] (the model has {lm.num_layers} blocks)")
    pool = data.neutral_pool()
    split = identifiability.disjoint_splits(len(pool), args.n_train, args.n_heldout, 1, args.seed)[0]
    train, heldout_idx = [int(i) for i in split.train], [int(i) for i in split.heldout]
    settings = {"model": lm.source, **{k: getattr(args, k) for k in (
        "layers", "n_train", "n_heldout", "tau", "steer_fraction", "fractions", "directions", "alpha", "trait",
        "seed", "quick")}}
    meta = io.run_metadata(lm, seeds={"seed": args.seed})
    out_dir = Path(args.out)
    store = io.UnitStore(out_dir / "first_order_units.json", settings, fresh=args.fresh, meta=meta)
    if store.resumed:
        print(f"resuming: {store.resumed} finished (layer, part) units in {store.path}", file=sys.stderr)
    pool_batch = lm.tokenize(pool)
    parts = ("sweep", "positions", *(f"point={p}" for p in POINTS))
    bar = tqdm(total=len(args.layers) * len(parts), initial=len(store), desc="(layer, part)", unit="unit",
               file=sys.stderr)
    for layer in args.layers:
        if all(f"layer={layer}/{part}" in store for part in parts):
            continue
        print(f"layer {layer}: exact fisher factors of {len(train) + len(heldout_idx)} prompts ...", file=sys.stderr)
        norms, factors = identifiability.prompt_factors(lm, pool_batch, train + heldout_idx, layer)
        median_h = float(np.median(list(norms.values())))
        steer_norm = args.steer_fraction * median_h
        stacked = list(spectrum.stack_factors(np.stack([factors[i] for i in train])))[-1]
        basis_h, _ = identifiability.invisible_basis(stacked, len(train), steer_norm, args.tau)
        vectors = behaviour.trait_vectors(lm, data.TRAITS, layer)         # the studies' mean-difference vectors
        v = vectors[args.trait]
        rng = np.random.default_rng([args.seed, layer])
        directions = family_directions(basis_h, stacked, v, args.directions, rng)
        perp = studies.orthogonal_to(v, rng)
        common = {"layer": layer, "median_h": median_h, "steer_norm_ref": steer_norm}
        key = f"layer={layer}/sweep"
        if key not in store:
            heldout = identifiability.heldout_tail(lm, identifiability.rows_of(pool_batch, heldout_idx), layer)
            gram = identifiability.mean_gram(np.stack([factors[i] for i in heldout_idx]))
            t_unit = time.time()
            store.put(key, {**common, **sweep_unit(lm, heldout, gram, directions, median_h, args),
                            "seconds": time.time() - t_unit})
            bar.update(1)
        key = f"layer={layer}/positions"
        if key not in store:
            store.put(key, {**common, **behavioural_positions(lm, layer, median_h, args.alpha, vectors)})
            bar.update(1)
        for point, offset in (("v", args.alpha * v), ("v+perp", args.alpha * (v + perp))):
            key = f"layer={layer}/point={point}"
            if key not in store:
                t_unit = time.time()
                store.put(key, {**common, **point_unit(lm, pool_batch, train, layer, offset, basis_h, steer_norm, args),
                                "seconds": time.time() - t_unit})
                bar.update(1)
    bar.close()
    layers = [{"layer": layer, **{part: store[f"layer={layer}/{part}"] for part in parts}} for layer in args.layers]
    result = {"model": lm.source, "model_name": Path(lm.source).name, "d": lm.d, "num_layers": lm.num_layers,
              "settings": settings, "observable": "fisher", "train": train, "heldout": heldout_idx,
              "definition": "ratio = exact KL(p || p(s u)) / 0.5 s^2 ||J_F u||^2, means over held-out prompts (and "
                            "over a family's directions); radius = the s / median ||h_l|| where |ratio - 1| first "
                            "reaches 0.1",
              "layers": layers, "meta": meta, "seconds_total": time.time() - t0}
    io.write_json_atomic(out_dir / "first_order.json", result)
    io.write_csv(summary_rows(result), out_dir / "first_order.csv")
    plotting.plot_first_order(result, out_dir / "first_order.png")
    print(markdown(result))
    wrote([out_dir / name for name in ("first_order.json", "first_order.csv", "first_order.png")], t0)
    return result


def radius_text(family: dict | None, fractions: list[float]) -> str:
    if family is None:
        return "-"
    if family["radius_status"] == "beyond_sweep":
        return f"> {max(fractions):g}"
    if family["radius_status"] == "below_sweep":
        return f"<= {min(fractions):g}"
    return f"{family['radius']:.3f}"


def single_range(family: dict, fractions: list[float]) -> str:
    """" [min, max]" of the single directions' radii ("> largest size" when one stays inside the band throughout);
    empty for a family of one direction."""
    if family["directions"] < 2:
        return ""
    values = [r for r in family["radius_per_direction"] if r is not None]
    beyond = "beyond_sweep" in family["radius_status_per_direction"]
    low = f"{min(values):.3f}" if values else f"> {max(fractions):g}"
    high = f"> {max(fractions):g}" if beyond else f"{max(values):.3f}"
    return f" [{low}, {high}]"


def summary_rows(result: dict) -> list[dict]:
    """One row per (layer, family): the radius and the ratio at every swept size."""
    rows = []
    for entry in result["layers"]:
        sweep = entry["sweep"]
        for name in FAMILIES:
            fam = sweep["families"][name]
            row = {"layer": entry["layer"], "family": name,
                   "radius": None if fam is None else fam["radius"],
                   "radius_status": None if fam is None else fam["radius_status"]}
            for f, r in zip(sweep["fractions"], [None] * len(sweep["fractions"]) if fam is None else fam["ratio"]):
                row[f"ratio@{f:g}"] = r
            rows.append(row)
    return rows


def markdown(result: dict) -> str:
    """docs/identifiability.md's first-order tables, from a result file."""
    s = result["settings"]
    fractions = result["layers"][0]["sweep"]["fractions"]
    shown = [f for f in fractions if f in (0.0125, 0.05, 0.1, 0.2, 0.4, 0.8)] or fractions
    lines = [f"*{result['model_name']}, fisher observable, {s['n_heldout']} held-out prompts; ratio = exact KL / "
             "second-order KL (means over held-out prompts and the family's directions) at steer size s = f x median "
             "||h_l||; radius = f where |ratio - 1| first reaches 0.1 (range over single directions in brackets)*", "",
             "| layer | direction | " + " | ".join(f"ratio at f = {f:g}" for f in shown) + " | radius f |",
             "|---|---|" + "---|" * len(shown) + "---|"]
    for entry in result["layers"]:
        sweep = entry["sweep"]
        for name in FAMILIES:
            fam = sweep["families"][name]
            if fam is None:
                lines.append(f"| {entry['layer']} | {name} | " + " | ".join("-" for _ in shown) + " | - |")
                continue
            ratios = [fam["ratio"][fractions.index(f)] for f in shown]
            span = single_range(fam, fractions)
            lines.append(f"| {entry['layer']} | {name} ({fam['directions']}) | "
                         + " | ".join(f"{r:.3f}" for r in ratios) + f" | {radius_text(fam, fractions)}{span} |")
    near = [f for f in fractions if f in (0.1, 0.2, 0.3, 0.4)] or fractions[-2:]
    lines += ["", "*Exact KL(p || p(s u)) in nats at the paper's sizes (mean over held-out prompts and the family's "
                  "directions) next to the second-order prediction*", "",
              "| layer | direction | " + " | ".join(f"exact at f = {f:g} | second order" for f in near) + " |",
              "|---|---|" + "---|---|" * len(near)]
    for entry in result["layers"]:
        for name in FAMILIES:
            fam = entry["sweep"]["families"][name]
            if fam is not None:
                cells = [f"{fam['exact_kl'][fractions.index(f)]:.2e} | {fam['second_order_kl'][fractions.index(f)]:.2e}"
                         for f in near]
                lines.append(f"| {entry['layer']} | {name} | " + " | ".join(cells) + " |")
    lines += ["", f"*Where the studies steer: alpha ||v_t|| / median ||h_l|| at alpha = {s['alpha']:g}, over the "
                  "pool prompts (the sweep's normalisation) and the studies' evaluation prompts*", "",
              "| layer | trait | v | v + v_perp | 2v | v (eval prompts) | v + v_perp (eval prompts) |",
              "|---|---|---|---|---|---|---|"]
    for entry in result["layers"]:
        for trait, t in entry["positions"]["traits"].items():
            cells = [t[f"{name}_fraction_{where}"] for name, where in (
                ("v", "pool"), ("v+perp", "pool"), ("2v", "pool"), ("v", "eval"), ("v+perp", "eval"))]
            lines.append(f"| {entry['layer']} | {trait} | " + " | ".join(f"{c:.3f}" for c in cells) + " |")
    lines += ["", f"*The tau-invisible subspace of the {s['n_train']} training prompts (tau = {s['tau']:g} nats at "
                  f"s = {s['steer_fraction']:g} x median ||h_l||) recomputed at the steered point h_l + offset "
                  f"({s['trait']} vector, alpha = {s['alpha']:g}); principal angles to the subspace at h_l*", "",
              "| layer | point | offset / median norm(h_l) | dim at h_l | dim at point | median angle (deg) "
              "| max angle | mean cos^2 | KL at the point of the h_l subspace (nats per direction) |",
              "|---|---|---|---|---|---|---|---|---|"]
    for entry in result["layers"]:
        for point in POINTS:
            u = entry[f"point={point}"]
            lines.append(f"| {entry['layer']} | {point} | {u['offset_norm'] / u['median_h']:.3f} | "
                         f"{u['invisible_dim_at_h']} | {u['invisible_dim_at_point']} | "
                         f"{fmt(u['angle_median_deg'], '.1f')} | {fmt(u['angle_max_deg'], '.1f')} | "
                         f"{fmt(u['mean_cos2'], '.3f')} | {fmt(u['kl_at_point_of_h_subspace'], '.2e')} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    return run_cli(parse_args, run_or_report(run, lambda result: print(markdown(result))), argv)


if __name__ == "__main__":
    sys.exit(main())
