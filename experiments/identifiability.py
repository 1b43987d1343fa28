"""The identifiability curve: which steering directions stay invisible on prompts that were not used to find them.

The paper's Definition 2 needs one v' that is equivalent to v on *all* inputs. For each layer in --layers and
each of --splits random splits of the shipped 240-prompt neutral pool into --n-train training and --n-heldout
held-out prompts (disjoint), and for N in --schedule:
  - the tau-invisible subspace of the first N training prompts: the directions u whose steer s u moves the
    next-token distribution by at most tau nats on average over those prompts (second order, exact fisher
    factors: 0.5 s^2 ||J_F,i u||^2 with J_F = diag(sqrt p)(I - 1 p^T) J_logits), for tau in --taus;
  - on the held-out prompts (never used to find it): the mean KL per direction of that subspace, of a random
    unit direction (its exact expectation, 0.5 s^2 tr(G) / d) and of the most visible training direction
    orthogonal to v (v: the formality mean-difference vector at that layer), second order from J_F, and the
    exact KL(p || p_steered) of --exact-directions sampled unit directions of each kind, from forward passes
    of the one-token tail at steer norm s;
  - ratio = held-out KL of the invisible subspace / of a random direction; the N at which it first drops
    below 0.5 (the invisible directions "carry over" once they stay at least 2x less visible than random).
s = --steer-fraction x the median ||h_l|| (h_l at the last prompt token) over the pool prompts the splits use.
Writes DIR/identifiability_units.json after every finished (layer, split) (a rerun resumes),
identifiability.json, identifiability.csv and identifiability.png, and prints a table.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

import steerjax as sj
from steerjax import data, identifiability, io, plotting, spectrum
from steerjax.cli import (ArgumentParser, check_trait, fmt, parse_floats, run_cli, run_or_report, wrote,
                          MODEL_HELP)
from steerjax.extraction import extract_vector



def parse_args(argv):
    p = ArgumentParser(description=__doc__)
    p.add_argument("--model", default=None, help=MODEL_HELP)
    p.add_argument("--layers", default="5,15,25", help="comma list of layers (default 5,15,25)")
    p.add_argument("--schedule", default="1,2,4,8,16,32,64", help="numbers N of stacked training prompts")
    p.add_argument("--n-heldout", type=int, default=32, help="held-out prompts per split (default 32)")
    p.add_argument("--splits", type=int, default=5, help="random train / held-out splits (default 5)")
    p.add_argument("--taus", default="1e-2,1e-3,1e-4", help="invisibility thresholds in nats (default 1e-2,1e-3,1e-4)")
    p.add_argument("--steer-fraction", type=float, default=0.1,
                   help="steer norm s as a fraction of the median ||h_l|| (default 0.1)")
    p.add_argument("--exact-directions", type=int, default=4,
                   help="sampled unit directions per kind for the exact held-out KL (default 4)")
    p.add_argument("--trait", default="formality", help="trait whose mean-difference vector is v (default formality)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="preset: layer 15, N up to 8, 8 held-out prompts, 2 splits")
    p.add_argument("--out", default="results/identifiability", help="output folder")
    p.add_argument("--fresh", action="store_true", help="discard finished units in --out instead of resuming")
    p.add_argument("--report", default=None, metavar="JSON",
                   help="print the markdown tables of a finished identifiability.json and exit (no model is loaded)")
    args = p.parse_args(argv)
    if args.report is not None:
        return args
    if args.quick:
        args.layers, args.schedule = "15", "1,2,4,8"
        args.n_heldout, args.splits, args.exact_directions = min(args.n_heldout, 8), min(args.splits, 2), 2
    try:
        args.layers = sorted({int(x) for x in args.layers.split(",") if x.strip()})
        args.schedule = sorted({int(x) for x in args.schedule.split(",") if x.strip()})
    except ValueError:
        p.error(f"--layers and --schedule must be comma lists of ints, got {args.layers!r}, {args.schedule!r}")
    if not args.layers or not args.schedule or min(args.schedule) < 1:
        p.error("--layers and --schedule must be non-empty, with every N >= 1")
    args.taus = sorted(parse_floats(p, args.taus, "--taus"), reverse=True)
    if min(args.taus) <= 0:
        p.error("--taus must be > 0 (nats)")
    for name in ("n_heldout", "splits", "exact_directions"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not 0 < args.steer_fraction < 10:
        p.error(f"--steer-fraction must be in (0, 10), got {args.steer_fraction}")
    pool = len(data.neutral_pool())
    if max(args.schedule) + args.n_heldout > pool:
        p.error(f"largest N ({max(args.schedule)}) + --n-heldout ({args.n_heldout}) exceeds the pool of {pool} prompts")
    check_trait(p, args.trait)
    return args


def split_unit(lm, pool_batch, split, layer: int, v: np.ndarray, steer_norm: float, args, factors: dict) -> dict:
    """Every N and tau of one (layer, split), from the exact fisher factors of its prompts."""
    train = np.stack([factors[int(i)] for i in split.train])
    heldout_gram = identifiability.mean_gram(np.stack([factors[int(i)] for i in split.heldout]))
    heldout = identifiability.heldout_tail(lm, identifiability.rows_of(pool_batch, split.heldout), layer)
    rng = np.random.default_rng([args.seed, layer, int(split.train[0])])
    random_dirs = identifiability.unit_combinations(np.eye(lm.d), args.exact_directions, rng)
    random_exact = float(identifiability.exact_mean_kl(lm, heldout, random_dirs, steer_norm).mean())
    random_2nd = identifiability.random_direction_kl(heldout_gram, steer_norm)
    stacked = dict(zip(range(1, len(train) + 1), spectrum.stack_factors(train)))
    rows = []
    for n in args.schedule:
        visible = identifiability.most_visible_orthogonal(stacked[n], v)
        visible_2nd = 0.5 * steer_norm**2 * float(visible @ heldout_gram @ visible)
        visible_exact = float(identifiability.exact_mean_kl(lm, heldout, visible[None], steer_norm)[0])
        for tau in args.taus:
            basis, train_kl = identifiability.invisible_basis(stacked[n], n, steer_norm, tau)
            k = basis.shape[1]
            inv_2nd = identifiability.mean_kl_per_direction(basis, heldout_gram, steer_norm)
            inv_exact = (float(identifiability.exact_mean_kl(lm, heldout,
                                                identifiability.unit_combinations(basis, args.exact_directions, rng),
                                                steer_norm).mean()) if k else None)
            rows.append({
                "n_train": n, "tau": tau, "invisible_dim": k,
                "train_kl_invisible_mean": float(train_kl.mean()) if k else None,
                "heldout_kl_invisible": inv_2nd, "heldout_kl_random": random_2nd, "heldout_kl_visible": visible_2nd,
                "ratio_invisible_random": None if inv_2nd is None else inv_2nd / random_2nd,
                "exact_heldout_kl_invisible": inv_exact, "exact_heldout_kl_random": random_exact,
                "exact_heldout_kl_visible": visible_exact,
                "exact_ratio_invisible_random": None if inv_exact is None else inv_exact / random_exact,
            })
    return {"layer": layer, "train": split.train.tolist(), "heldout": split.heldout.tolist(), "steer_norm": steer_norm,
            "rows": rows}


def summarize(units: list[dict], args) -> list[dict]:
    """Per (layer, tau, N): mean, sd, min and max over splits of the ratios; plus the first N below 0.5."""
    out = []
    for layer in args.layers:
        for tau in args.taus:
            per_n = []
            for n in args.schedule:
                rows = [r for u in units if u["layer"] == layer for r in u["rows"]
                        if r["n_train"] == n and r["tau"] == tau]
                ratios = [r["ratio_invisible_random"] for r in rows if r["ratio_invisible_random"] is not None]
                exact = [r["exact_ratio_invisible_random"] for r in rows
                         if r["exact_ratio_invisible_random"] is not None]
                per_n.append({
                    "layer": layer, "tau": tau, "n_train": n, "splits": len(rows),
                    "invisible_dim_mean": float(np.mean([r["invisible_dim"] for r in rows])),
                    "ratio_mean": float(np.mean(ratios)) if ratios else None,
                    "ratio_sd": float(np.std(ratios, ddof=1)) if len(ratios) > 1 else None,
                    "ratio_min": float(np.min(ratios)) if ratios else None,
                    "ratio_max": float(np.max(ratios)) if ratios else None,
                    "exact_ratio_mean": float(np.mean(exact)) if exact else None,
                    "heldout_kl_invisible_mean": float(np.mean([r["heldout_kl_invisible"] for r in rows
                                                                if r["heldout_kl_invisible"] is not None]))
                    if ratios else None,
                    "heldout_kl_random_mean": float(np.mean([r["heldout_kl_random"] for r in rows])),
                    "heldout_kl_visible_mean": float(np.mean([r["heldout_kl_visible"] for r in rows])),
                })
            n_below = identifiability.first_below([r["n_train"] for r in per_n], [r["ratio_mean"] for r in per_n])
            for r in per_n:
                r["first_n_below_half"] = n_below
            out += per_n
    return out


def run(args) -> dict:
    from tqdm import tqdm

    t0 = time.time()
    lm = sj.load_model(args.model)
    bad = [layer for layer in args.layers if not 0 <= layer <= lm.num_layers]
    if bad:
        raise sj.SteeringError(f"--layers {bad} outside [0, {lm.num_layers}] (the model has {lm.num_layers} blocks)")
    pool = data.neutral_pool()
    splits = identifiability.disjoint_splits(len(pool), max(args.schedule), args.n_heldout, args.splits, args.seed)
    settings = {"model": lm.source, **{k: getattr(args, k) for k in (
        "layers", "schedule", "n_heldout", "splits", "taus", "steer_fraction", "exact_directions", "trait", "seed",
        "quick")}}
    meta = io.run_metadata(lm, seeds={"seed": args.seed})
    out_dir = Path(args.out)
    store = io.UnitStore(out_dir / "identifiability_units.json", settings, fresh=args.fresh, meta=meta)
    if store.resumed:
        print(f"resuming: {store.resumed} finished (layer, split) units in {store.path}", file=sys.stderr)
    pos, neg = data.trait_pairs(args.trait)
    pool_batch = lm.tokenize(pool)
    output_factors: dict[int, np.ndarray] = {}
    bar = tqdm(total=len(args.layers) * args.splits, initial=len(store), desc="(layer, split)", unit="unit",
               file=sys.stderr)
    for layer in args.layers:
        todo = [k for k in range(args.splits) if f"layer={layer}/split={k}" not in store]
        if not todo:
            continue
        used = sorted({int(i) for split in splits for i in np.concatenate([split.train, split.heldout])})
        needed = {int(i) for k in todo for i in np.concatenate([splits[k].train, splits[k].heldout])}
        print(f"layer {layer}: exact fisher factors of {len(needed)} prompts ...", file=sys.stderr)
        norms, factors = identifiability.prompt_factors(lm, pool_batch, used, layer, needed, output_factors)
        steer_norm = args.steer_fraction * float(np.median([norms[i] for i in used]))
        v = np.asarray(extract_vector(lm, pos, neg, layer), np.float64)
        for k in todo:
            t_unit = time.time()
            unit = split_unit(lm, pool_batch, splits[k], layer, v, steer_norm, args, factors)
            store.put(f"layer={layer}/split={k}", {**unit, "split": k, "seconds": time.time() - t_unit})
            bar.update(1)
    bar.close()
    units = [store[f"layer={layer}/split={k}"] for layer in args.layers for k in range(args.splits)]
    result = {"model": lm.source, "model_name": Path(lm.source).name, "d": lm.d, "num_layers": lm.num_layers,
              "settings": settings, "pool_size": len(pool), "observable": "fisher",
              "definition": "ratio = held-out mean second-order KL per direction of the tau-invisible subspace of N "
                            "stacked training prompts / that of a uniformly random unit direction (0.5 s^2 tr G / d)",
              "summary": summarize(units, args), "meta": meta, "seconds_total": time.time() - t0}
    io.write_json_atomic(out_dir / "identifiability.json", result)
    io.write_csv(result["summary"], out_dir / "identifiability.csv")
    plotting.plot_identifiability(result, out_dir / "identifiability.png")
    print_table(result)
    wrote([out_dir / name for name in ("identifiability.json", "identifiability.csv", "identifiability.png")], t0)
    return result


def print_table(result: dict) -> None:
    s = result["settings"]
    print(f"{result['model_name']}: held-out KL of the tau-invisible subspace of N training prompts / a random "
          f"direction (fisher observable, steer norm {s['steer_fraction']:g} x median ||h_l||, mean over "
          f"{s['splits']} splits [min, max]; {s['n_heldout']} held-out prompts)")
    print(f"{'layer':>5} {'tau':>7} {'N':>3} {'dim':>6} {'ratio':>7} {'[min, max]':>15} {'exact':>7} "
          f"{'KL inv':>9} {'KL rand':>9} {'KL vis':>9} {'N<0.5':>5}")
    for r in result["summary"]:
        span = f"[{fmt(r['ratio_min'], '.2f')}, {fmt(r['ratio_max'], '.2f')}]"
        print(f"{r['layer']:>5} {r['tau']:>7.0e} {r['n_train']:>3} {r['invisible_dim_mean']:>6.1f} "
              f"{fmt(r['ratio_mean'], '>7.3f')} {span:>15} {fmt(r['exact_ratio_mean'], '>7.3f')} "
              f"{fmt(r['heldout_kl_invisible_mean'], '>9.2e')} {r['heldout_kl_random_mean']:>9.2e} "
              f"{r['heldout_kl_visible_mean']:>9.2e} {fmt(r['first_n_below_half'], '>5')}")


def markdown(result: dict) -> str:
    """docs/identifiability.md's tables, from a result file: per layer and tau, the held-out ratio against N."""
    s = result["settings"]
    lines = [f"*{result['model_name']}, fisher observable, steer norm s = {s['steer_fraction']:g} x median "
             f"||h_l||, {s['splits']} splits of the {result['pool_size']}-prompt pool, {s['n_heldout']} held-out "
             "prompts each; ratio = held-out KL of the invisible subspace / of a random direction (second order), "
             "mean [min, max] over splits; exact = the same ratio from exact KLs of sampled directions*", "",
             "| layer | tau (nats) | N | invisible dim | ratio [min, max] | exact ratio | held-out KL: invisible "
             "| random | most visible orth. to v | first N < 0.5 |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["summary"]:
        span = f"{fmt(r['ratio_mean'], '.3f')} [{fmt(r['ratio_min'], '.3f')}, {fmt(r['ratio_max'], '.3f')}]"
        lines.append(f"| {r['layer']} | {r['tau']:g} | {r['n_train']} | {r['invisible_dim_mean']:.1f} | {span} | "
                     f"{fmt(r['exact_ratio_mean'], '.3f')} | {fmt(r['heldout_kl_invisible_mean'], '.2e')} | "
                     f"{r['heldout_kl_random_mean']:.2e} | {r['heldout_kl_visible_mean']:.2e} | "
                     f"{fmt(r['first_n_below_half'], '')} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    return run_cli(parse_args, run_or_report(run, lambda result: print(markdown(result))), argv)


if __name__ == "__main__":
    sys.exit(main())
