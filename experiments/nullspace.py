"""Main job: exact null-space geometry of the layer-to-output Jacobian J_l = d(last-position output) / d h_l.

Default (no arguments): embedded SmolLM2-135M-Instruct, layers every 5th plus L/2 and L, 16 built-in
neutral prompts, exact spectra of the gauge-free observable "fisher" (J_F = diag(sqrt p)(I - 1 p^T) J_logits,
the whitened logit Jacobian: 0.5 s^2 ||J_F u||^2 is the next-token KL in nats of a steer s u), with null
dimensions in absolute KL units (tau = 1e-2, 1e-3, 1e-4 nats at s = 0.1 x median ||h_l||) next to the relative
counts (eps x sigma_max). --observable logits gives the paper's J, whose top left singular direction is the
softmax's constant shift (the JSON records its |cos| with the all-ones vector).
Writes DIR/nullspace.json (after every finished layer; a rerun with the same settings resumes), spectrum.png,
effective_rank.png, stacked_null_dim.png, and prints a table.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

import steerjax as sj
from steerjax.cli import ArgumentParser, run_cli, wrote, MODEL_HELP
from steerjax import data, geometry, io, plotting
from steerjax.extraction import last_token_states_all_layers, vector_from_states
from steerjax.jacobian import JACOBIAN_POSITIONS, OBSERVABLES


def parse_args(argv):
    p = ArgumentParser(description=__doc__)
    p.add_argument("--model", default=None, help=MODEL_HELP)
    p.add_argument("--layers", default="default",
                   help="'default' (every 5th, L/2 and L), 'all', 'mid', or a comma list like 0,6,12")
    p.add_argument("--prompts", default="builtin", help="'builtin', a .txt file (one prompt per line) or a "
                                                         ".json list of strings / {\"prompts\": [...]}")
    p.add_argument("--n-prompts", type=int, default=16, help="number of prompts to use (default 16)")
    p.add_argument("--observable", choices=OBSERVABLES, default="fisher",
                   help="fisher (default, gauge-free: the whitened logit Jacobian diag(sqrt p)(I - 1 p^T) J, so that "
                        "0.5 s^2 ||J_F u||^2 is the next-token KL in nats of a steer s u), logprobs, or logits (the "
                        "paper's J, whose top direction is the softmax's constant shift)")
    p.add_argument("--steer-fraction", type=float, default=geometry.STEER_FRACTION,
                   help="steer norm s of the KL counts as a fraction of the median ||h_l|| "
                        f"(default {geometry.STEER_FRACTION})")
    p.add_argument("--positions", choices=JACOBIAN_POSITIONS, default="last",
                   help="where the perturbation is added: last prompt token (default) or every token")
    p.add_argument("--method", choices=("exact", "lanczos"), default="exact")
    p.add_argument("--k", type=int, default=32, help="top-k singular values for --method lanczos")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="results/nullspace", help="output folder (default results/nullspace)")
    p.add_argument("--fresh", action="store_true", help="ignore an existing nullspace.json instead of resuming")
    args = p.parse_args(argv)
    if args.n_prompts < 1:
        p.error(f"--n-prompts must be >= 1, got {args.n_prompts}")
    if args.k < 1:
        p.error(f"--k must be >= 1, got {args.k}")
    if not 0 < args.steer_fraction < 10:
        p.error(f"--steer-fraction must be in (0, 10), got {args.steer_fraction}")
    return args


def read_prompts(spec: str) -> list[str]:
    if spec == "builtin":
        return list(data.geometry_prompts()["neutral"])
    path = Path(spec)
    if not path.is_file():
        raise sj.InputError(f"prompt file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise sj.InputError(f"prompt file {path} is not UTF-8 text: {err}") from err
    if path.suffix == ".json":
        try:
            loaded = json.loads(text)
        except json.JSONDecodeError as err:
            raise sj.InputError(f"prompt file {path} is not valid JSON: {err}") from err
        prompts = loaded.get("prompts") if isinstance(loaded, dict) else loaded
        if not isinstance(prompts, list) or not all(isinstance(x, str) for x in prompts):
            raise sj.InputError(f"prompt file {path} must hold a list of strings or {{\"prompts\": [...]}}")
    else:
        prompts = [line.strip() for line in text.splitlines()]
    prompts = [x for x in prompts if x.strip()]
    if not prompts:
        raise sj.InputError(f"prompt file {path} holds no prompts")
    return prompts


def parse_layers(spec: str, num_layers: int) -> list[int]:
    if spec == "default":
        return sorted(set(range(0, num_layers + 1, 5)) | {num_layers // 2, num_layers})
    if spec == "all":
        return list(range(num_layers + 1))
    if spec == "mid":
        return [num_layers // 2]
    try:
        layers = sorted({int(x) for x in spec.split(",") if x.strip()})
    except ValueError as err:
        raise sj.InputError(f"--layers must be default, all, mid or a comma list of ints, got {spec!r}") from err
    bad = [layer for layer in layers if not 0 <= layer <= num_layers]
    if bad or not layers:
        raise sj.InputError(f"--layers {bad or spec} outside [0, {num_layers}] (the model has {num_layers} blocks)")
    return layers


def settings_key(args, prompts_ids) -> dict:
    """What a resumable result must share with the current run."""
    return {"model": str(args.model), "observable": args.observable, "positions": args.positions,
            "method": args.method, "k": args.k if args.method == "lanczos" else None, "dtype": args.dtype,
            "steer_fraction": args.steer_fraction if args.observable == "fisher" else None,
            "seed": args.seed, "prompt_token_ids": prompts_ids}


def summary_row(entry: dict) -> dict:
    pp = entry["per_prompt"]
    med = lambda f: float(np.median([f(p) for p in pp]))
    row = {"layer": entry["layer"], "sigma_max": med(lambda p: p["sigma_max"])}
    last = entry["stacked"][-1]
    if "kl_null_dim" in pp[0]:  # fisher: absolute counts first, in nats of next-token KL of a steer of norm s
        row["s/|h|"] = entry["steer"]["fraction_of_median_h_norm"]
        row["max KL"] = med(lambda p: p["kl_max"])
        for tau in ("1e-02", "1e-03", "1e-04"):
            row[f"KL-null@{tau}"] = med(lambda p: p["kl_null_dim"][tau])
        row[f"stacked KL-null@1e-03 (N={last['n_prompts']})"] = last["kl_null_dim"]["1e-03"]
    ranks = pp[0]["effective_rank"]
    if "numerical" in ranks:
        for eps in ("1e-02", "1e-03", "1e-04"):
            row[f"null@{eps}"] = med(lambda p: p["null_dim"][eps])
        row["entropy"] = med(lambda p: p["effective_rank"]["entropy"])
        row["stable"] = med(lambda p: p["effective_rank"]["stable"])
    else:
        for eps in ("1e-02", "1e-03"):
            row[f"rank>=@{eps}"] = med(lambda p: p["effective_rank"]["numerical_lower_bound"][eps])
    row[f"stacked null@1e-03 (N={last['n_prompts']})"] = last["null_dim"]["1e-03"]
    if "logit_top_direction_abs_cos_ones" in entry:
        row["|cos(u1_logits, 1)|"] = entry["logit_top_direction_abs_cos_ones"]["median"]
    if "orthogonal_null_fraction" in entry:
        row["orth frac@1e-02"] = entry["orthogonal_null_fraction"]["1e-02"]["per_prompt_mean"]
    return row


def format_table(rows: list[dict]) -> str:
    cols = list(rows[0])
    fmt = lambda v: "-" if v is None else (f"{v:.3g}" if isinstance(v, float) else str(v))
    widths = [max(len(c), *(len(fmt(r.get(c))) for r in rows)) for c in cols]
    lines = ["  ".join(c.rjust(w) for c, w in zip(cols, widths))]
    lines += ["  ".join(fmt(r.get(c)).rjust(w) for c, w in zip(cols, widths)) for r in rows]
    return "\n".join(lines)


def record_finished_layers(json_path: Path, result: dict) -> None:
    """Tell an interrupted run's message how many layers json_path holds (a rerun resumes from them)."""
    io.record_saved(json_path, f"{len(result['layers'])} finished layer(s)", resumable=True)


def run(args) -> dict:
    from tqdm import tqdm

    t0 = time.time()
    lm = sj.load_model(args.model, dtype=args.dtype)
    prompts = read_prompts(args.prompts)[: args.n_prompts]
    if len(prompts) < args.n_prompts:
        print(f"note: only {len(prompts)} prompts available (asked for {args.n_prompts})", file=sys.stderr)
    batch = lm.tokenize(prompts)
    lm.check_ids(batch)
    layers = parse_layers(args.layers, lm.num_layers)
    token_ids = [[int(t) for t, m in zip(row, mask) if m] for row, mask in zip(batch.ids, batch.attention_mask)]
    out_dir = Path(args.out)
    json_path = out_dir / "nullspace.json"
    key = settings_key(args, token_ids)
    previous = None if args.fresh else io.read_json(json_path)
    resumable = previous is not None and previous.get("settings") == key
    done = {e["layer"]: e for e in previous["layers"]} if resumable else {}
    result = {
        "model": lm.source, "model_name": Path(lm.source).name, "d": lm.d, "num_layers": lm.num_layers,
        "vocab_size": lm.config.vocab_size, "observable": args.observable, "positions": args.positions,
        "method": args.method, "dtype": args.dtype, "noise_floor": geometry.noise_floor(lm),
        "prompts": [{"text": t, "token_ids": ids} for t, ids in zip(prompts, token_ids)],
        "settings": key, "config": lm.config.to_dict(), "meta": io.run_metadata(lm, seeds={"seed": args.seed}),
        "complete": False,
        "layers": [done[layer] for layer in layers if layer in done],
    }
    if done:
        print(f"resuming: {len(result['layers'])} finished layer(s) found in {json_path}", file=sys.stderr)
        record_finished_layers(json_path, result)
    pairs = data.geometry_prompts()["direction_pairs"]
    if args.method == "exact":  # the direction v at every layer, from one forward pass per side
        pos_states = last_token_states_all_layers(lm, pairs["positive"])
        neg_states = last_token_states_all_layers(lm, pairs["negative"])
    todo = [layer for layer in layers if layer not in done]
    # the output-side factors M_i depend on the prompts' next-token distributions, not on the layer: once
    observable_factors = (sj.jacobian_operator(lm, batch, todo[0], args.observable, args.positions).observable_factors()
                          if todo and args.method == "exact" else None)
    for layer in tqdm(todo, desc="layers", unit="layer", file=sys.stderr):
        t_layer = time.time()
        if args.method == "exact":
            v = vector_from_states(pos_states[layer], neg_states[layer])
            entry = geometry.analyze_layer_exact(lm, batch, layer, args.observable, args.positions, v, args.seed,
                                                 args.steer_fraction, observable_factors)
            entry["vector"] = {"source": f"mean_diff of built-in {pairs['trait']} pairs at this layer",
                               "norm": float(np.linalg.norm(v))}
        else:
            entry = geometry.analyze_layer_lanczos(lm, batch, layer, args.k, args.observable, args.positions,
                                                   args.seed)
        entry["seconds"] = time.time() - t_layer
        result["layers"] = sorted(result["layers"] + [entry], key=lambda e: e["layer"])
        io.write_json_atomic(json_path, result)
        record_finished_layers(json_path, result)
    result["complete"] = True
    result["seconds_total_this_run"] = time.time() - t0
    io.write_json_atomic(json_path, result)
    result = json.loads(json_path.read_text())
    plotting.plot_spectra(result, out_dir / "spectrum.png")
    plotting.plot_effective_ranks(result, out_dir / "effective_rank.png")
    plotting.plot_stacked_null_dims(result, out_dir / "stacked_null_dim.png")
    print(f"{result['model_name']}: d={lm.d}, L={lm.num_layers}, {len(prompts)} prompts, observable "
          f"{args.observable}, {args.method}, {args.dtype} (noise floor {result['noise_floor']:.1e} of sigma_max)")
    print("medians over prompts; null@eps = d - #{sigma > eps sigma_max}" + (
        "; KL-null@tau = dimension of the directions u whose steer s u moves the next-token distribution by at "
        "most tau nats (second order, mean over prompts), s = s/|h| x median ||h_l||" if args.observable == "fisher"
        else ""))
    print(format_table([summary_row(e) for e in result["layers"]]))
    wrote([json_path, *(out_dir / name for name in ("spectrum.png", "effective_rank.png", "stacked_null_dim.png"))],
          t0)
    return result


def main(argv=None) -> int:
    return run_cli(parse_args, run, argv)


if __name__ == "__main__":
    sys.exit(main())
