"""The Jacobian of the intervention that generation actually runs: invisible directions of the teacher-forced,
multi-position observable against those of the one-position (next-token) one.

Generation steers the last prompt token and every generated one. For each prompt, the continuation is the
model's greedy unsteered continuation of --window tokens c_1..c_G; the steered window is the last prompt token
and c_1..c_{G-1}, and ONE steer x is added to h_l at all of them at once (`steerjax.sequence`). The observable is
the stack of the whitened Jacobians J_F,g of every window slot's next-token distribution, so that
0.5 s^2 sum_g ||J_F,g u||^2 is the second-order teacher-forced sequence KL of a steer s u (nats); per token it is
divided by G. The one-position observable is slot 1 alone (the next-token distribution after the prompt).

For each layer in --layers, one random split of the neutral pool into --n-train training and --n-heldout held-out
prompts (disjoint; the split of the other studies with the same --seed), and N in --schedule, tau in --taus
(nats), s = --steer-fraction x median ||h_l||:
  - the tau-invisible subspaces of N training prompts: one-position (mean KL over prompts <= tau) and sequence
    (mean KL per token over prompts and window slots <= tau), their dimensions and principal angles;
  - on the held-out prompts: the mean sequence KL per token of each subspace (per direction), and of a random
    direction, and the ratios: does one-position invisibility survive the intervention generation runs?
Writes DIR/sequence_identifiability_units.json after every layer (a rerun resumes), sequence_identifiability.json
and .csv, and prints the table.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

import steerjax as sj
from steerjax import data, identifiability, io, sequence
from steerjax.cli import ArgumentParser, fmt, parse_floats, run_cli, run_or_report, wrote, MODEL_HELP

ROWS_PER_CALL = 8          # prompts per sequence-factor call (memory: 8 x window x d x d float64 = 170 MB at G = 8)


def parse_args(argv):
    p = ArgumentParser(description=__doc__)
    p.add_argument("--model", default=None, help=MODEL_HELP)
    p.add_argument("--layers", default="15", help="comma list of layers (default 15, the studies' steered layer)")
    p.add_argument("--schedule", default="8,32", help="numbers N of training prompts (default 8,32)")
    p.add_argument("--n-heldout", type=int, default=16, help="held-out prompts (default 16)")
    p.add_argument("--window", type=int, default=8, help="steered window G: last prompt token + G - 1 generated (8)")
    p.add_argument("--taus", default="1e-2,1e-3,1e-4", help="invisibility thresholds in nats per token")
    p.add_argument("--steer-fraction", type=float, default=0.1,
                   help="steer norm s as a fraction of the median ||h_l|| (default 0.1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="preset: N = 4, 4 held-out prompts, window 4")
    p.add_argument("--out", default="results/sequence_identifiability", help="output folder")
    p.add_argument("--fresh", action="store_true", help="discard finished units in --out instead of resuming")
    p.add_argument("--report", default=None, metavar="JSON",
                   help="print the markdown table of a finished sequence_identifiability.json and exit")
    args = p.parse_args(argv)
    if args.report is not None:
        return args
    if args.quick:
        args.schedule, args.n_heldout, args.window = "4", min(args.n_heldout, 4), min(args.window, 4)
    try:
        args.layers = sorted({int(x) for x in args.layers.split(",") if x.strip()})
        args.schedule = sorted({int(x) for x in args.schedule.split(",") if x.strip()})
    except ValueError:
        p.error(f"--layers and --schedule must be comma lists of ints, got {args.layers!r}, {args.schedule!r}")
    if not args.layers or not args.schedule or min(args.schedule) < 1:
        p.error("--layers and --schedule must be non-empty, with every N >= 1")
    args.taus = sorted(parse_floats(p, args.taus, "--taus"), reverse=True)
    if min(args.taus) <= 0 or not 0 < args.steer_fraction < 10:
        p.error("--taus must be > 0 and --steer-fraction in (0, 10)")
    if args.window < 2 or args.n_heldout < 1:
        p.error(f"--window must be >= 2 and --n-heldout >= 1, got {args.window}, {args.n_heldout}")
    pool = len(data.neutral_pool())
    if max(args.schedule) + args.n_heldout > pool:
        p.error(f"largest N + --n-heldout exceeds the pool of {pool} prompts")
    return args


def greedy_rows(lm, pool_batch, indices: list[int], window: int) -> sj.TokenBatch:
    """Rows prompt + greedy continuation[:G - 1] (`sequence.continuation_rows`) for the pool prompts `indices`."""
    batch = identifiability.rows_of(pool_batch, indices)
    out = sj.generate(lm, batch, max_new_tokens=window, temperature=0.0, stop_at_eos=False)
    prompts = [list(np.asarray(ids)[np.asarray(mask).astype(bool)]) for ids, mask in zip(batch.ids,
                                                                                          batch.attention_mask)]
    return sequence.continuation_rows(prompts, np.asarray(out.tokens)[:, out.prompt_len:], lm.pad_id)


def sequence_grams(lm, rows: sj.TokenBatch, layer: int, window: int) -> np.ndarray:
    """Per prompt, the mean over window slots of C_g^T C_g (B, d, d): its quadratic form is the sequence KL per
    token / (0.5 s^2)."""
    out = []
    for start in range(0, rows.ids.shape[0], ROWS_PER_CALL):
        part = sj.TokenBatch(rows.ids[start:start + ROWS_PER_CALL], rows.attention_mask[start:start + ROWS_PER_CALL])
        c = sequence.sequence_fisher_factors(lm, part, layer, window)                   # (b, G, d, d)
        out.append(np.einsum("bgrd,bgre->bde", c, c, optimize=True) / window)
    return np.concatenate(out)


def layer_unit(lm, pool_batch, train: list[int], heldout: list[int], layer: int, args) -> dict:
    indices = train + heldout
    norms, factors = identifiability.prompt_factors(lm, pool_batch, indices, layer)
    steer_norm = args.steer_fraction * float(np.median(list(norms.values())))
    one = {i: factors[i].T @ factors[i] for i in indices}                              # one-position Grams
    rows = greedy_rows(lm, pool_batch, indices, args.window)
    seq = dict(zip(indices, sequence_grams(lm, rows, layer, args.window)))
    heldout_seq = np.mean([seq[i] for i in heldout], axis=0)
    heldout_one = np.mean([one[i] for i in heldout], axis=0)
    random_seq = identifiability.random_direction_kl(heldout_seq, steer_norm)
    random_one = identifiability.random_direction_kl(heldout_one, steer_norm)
    out = []
    for n in args.schedule:
        g_one = np.mean([one[i] for i in train[:n]], axis=0)
        g_seq = np.mean([seq[i] for i in train[:n]], axis=0)
        for tau in args.taus:
            basis_one, _ = identifiability.invisible_basis_from_gram(g_one, steer_norm, tau)
            basis_seq, _ = identifiability.invisible_basis_from_gram(g_seq, steer_norm, tau)
            angles = identifiability.subspace_angles_deg(basis_one, basis_seq)
            kl = lambda basis, gram: identifiability.mean_kl_per_direction(basis, gram, steer_norm)
            ratio = lambda x, ref: None if x is None else x / ref
            out.append({
                "n_train": n, "tau": tau, "dim_one_position": int(basis_one.shape[1]),
                "dim_sequence": int(basis_seq.shape[1]),
                "angle_median_deg": float(np.median(angles)) if angles.size else None,
                "mean_cos2": float(np.mean(np.cos(np.radians(angles)) ** 2)) if angles.size else None,
                "heldout_seq_kl_of_one_position": kl(basis_one, heldout_seq),
                "heldout_seq_kl_of_sequence": kl(basis_seq, heldout_seq),
                "heldout_seq_kl_random": random_seq,
                "heldout_one_kl_of_one_position": kl(basis_one, heldout_one),
                "heldout_one_kl_random": random_one,
                "ratio_seq_one_position": ratio(kl(basis_one, heldout_seq), random_seq),
                "ratio_seq_sequence": ratio(kl(basis_seq, heldout_seq), random_seq),
                "ratio_one_one_position": ratio(kl(basis_one, heldout_one), random_one),
            })
    return {"layer": layer, "steer_norm": steer_norm, "rows": out,
            "continuations": lm.decode(np.asarray(rows.ids)[:, -(args.window - 1):])}


def run(args) -> dict:
    from tqdm import tqdm

    t0 = time.time()
    lm = sj.load_model(args.model)
    bad = [layer for layer in args.layers if not 0 <= layer <= lm.num_layers]
    if bad:
        raise sj.SteeringError(f"--layers {bad} outside [0, {lm.num_layers}] (the model has {lm.num_layers} blocks)")
    pool = data.neutral_pool()
    split = identifiability.disjoint_splits(len(pool), max(args.schedule), args.n_heldout, 1, args.seed)[0]
    train, heldout = [int(i) for i in split.train], [int(i) for i in split.heldout]
    settings = {"model": lm.source, **{k: getattr(args, k) for k in (
        "layers", "schedule", "n_heldout", "window", "taus", "steer_fraction", "seed", "quick")}}
    meta = io.run_metadata(lm, seeds={"seed": args.seed})
    out_dir = Path(args.out)
    store = io.UnitStore(out_dir / "sequence_identifiability_units.json", settings, fresh=args.fresh, meta=meta)
    if store.resumed:
        print(f"resuming: {store.resumed} finished layers in {store.path}", file=sys.stderr)
    pool_batch = lm.tokenize(pool)
    bar = tqdm(total=len(args.layers), initial=len(store), desc="layers", unit="layer", file=sys.stderr)
    for layer in args.layers:
        if f"layer={layer}" in store:
            continue
        t_unit = time.time()
        print(f"layer {layer}: one-position and sequence factors of {len(train) + len(heldout)} prompts "
              f"(window {args.window}) ...", file=sys.stderr)
        store.put(f"layer={layer}", {**layer_unit(lm, pool_batch, train, heldout, layer, args),
                                     "seconds": time.time() - t_unit})
        bar.update(1)
    bar.close()
    result = {"model": lm.source, "model_name": Path(lm.source).name, "d": lm.d, "settings": settings,
              "train": train, "heldout": heldout, "observable": "fisher",
              "definition": "per-token KL: 0.5 s^2 u^T G u with G the mean over prompts (and window slots, for the "
                            "sequence observable) of J_F^T J_F; ratios: held-out KL per direction of the subspace / "
                            "of a uniformly random unit direction",
              "layers": [store[f"layer={layer}"] for layer in args.layers], "meta": meta,
              "seconds_total": time.time() - t0}
    io.write_json_atomic(out_dir / "sequence_identifiability.json", result)
    io.write_csv([{"layer": e["layer"], **r} for e in result["layers"] for r in e["rows"]],
                 out_dir / "sequence_identifiability.csv")
    print(markdown(result))
    wrote([out_dir / name for name in ("sequence_identifiability.json", "sequence_identifiability.csv")], t0)
    return result


def markdown(result: dict) -> str:
    s = result["settings"]
    lines = [f"*{result['model_name']}, fisher observable, steer norm s = {s['steer_fraction']:g} x median ||h_l||, "
             f"window G = {s['window']} (last prompt token + {s['window'] - 1} greedy tokens, one steer at all), "
             f"{s['n_heldout']} held-out prompts; KL per token; ratio = held-out KL per direction of the subspace / "
             "of a random direction*", "",
             "| layer | N | tau | dim: one-position | dim: sequence | median angle (deg) | held-out sequence KL ratio: "
             "one-position subspace | sequence subspace | held-out next-token ratio: one-position subspace |",
             "|---|---|---|---|---|---|---|---|---|"]
    for entry in result["layers"]:
        for r in entry["rows"]:
            lines.append(f"| {entry['layer']} | {r['n_train']} | {r['tau']:g} | {r['dim_one_position']} | "
                         f"{r['dim_sequence']} | {fmt(r['angle_median_deg'], '.1f')} | "
                         f"{fmt(r['ratio_seq_one_position'], '.3f')} | {fmt(r['ratio_seq_sequence'], '.3f')} | "
                         f"{fmt(r['ratio_one_one_position'], '.3f')} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    return run_cli(parse_args, run_or_report(run, lambda result: print(markdown(result))), argv)


if __name__ == "__main__":
    sys.exit(main())
