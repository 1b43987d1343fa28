"""The paper's own null-space estimator next to the exact answer (issue 21, item 6).

The released code estimates dim ker(J) for one prompt by central differences in float16: eps = 0.01 along
1000 random unit directions r_k at h_l (last prompt token), Y_k = (f(eps r_k) - f(-eps r_k)) / (2 eps) with f the
last-position logits, rank = #{sigma(Y) > 5% sigma_max(Y)}, and a null fraction 1 - rank / 1000 that divides by
the number of probes, not by d (so it cannot fall below 1 - d / 1000). This script runs that estimator with the
model in float32 and in float16 (weights and activations; logits accumulated in float32) on the same prompt and
layer, and tables it against the exact singular values of J_logits (float32 model, float64 SVD of the exact
factor): the exact rank at the same 5% threshold, the exact null fraction (d - rank) / d, and the paper's formula
applied to the exact rank. Writes DIR/paper_estimator.json and prints the table.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp

import steerjax as sj
from steerjax import data, io, spectrum, studies, tail
from steerjax.cli import ArgumentParser, run_cli, run_or_report, study_layer, wrote, MODEL_HELP

DTYPES = {"float32": jnp.float32, "float16": jnp.float16}


def parse_args(argv):
    p = ArgumentParser(description=__doc__)
    p.add_argument("--model", default=None, help=MODEL_HELP)
    p.add_argument("--layer", type=int, default=None, help="layer (default L // 2)")
    p.add_argument("--prompt", type=int, default=0, help="index into the shipped neutral eval prompts (default 0)")
    p.add_argument("--n-directions", type=int, default=1000, help="random probe directions (default 1000)")
    p.add_argument("--eps", type=float, default=0.01, help="central-difference step (default 0.01)")
    p.add_argument("--threshold", type=float, default=0.05, help="rank threshold relative to sigma_max (0.05)")
    p.add_argument("--dtypes", default="float32,float16", help="model precisions of the estimator")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="results/paper_estimator", help="output folder")
    p.add_argument("--report", default=None, metavar="JSON", help="print the table of a finished result file and exit")
    args = p.parse_args(argv)
    if args.report is not None:
        return args
    args.dtypes = [x.strip() for x in args.dtypes.split(",") if x.strip()]
    if not args.dtypes or any(x not in DTYPES for x in args.dtypes):
        p.error(f"--dtypes must be a comma list of {', '.join(DTYPES)}")
    if args.n_directions < 2 or not args.eps > 0 or not 0 < args.threshold < 1:
        p.error("need --n-directions >= 2, --eps > 0 and --threshold in (0, 1)")
    prompts = data.neutral_eval_prompts()
    if not 0 <= args.prompt < len(prompts):
        p.error(f"--prompt must be in [0, {len(prompts)}), got {args.prompt}")
    return args


def probe_fn(lm, batch, layer: int, dtype):
    """Offsets (k, d) -> last-position logits (k, V), the model's weights and activations in `dtype`."""
    model = lm if dtype == jnp.float32 else lm.replace(params=jax.tree.map(lambda x: x.astype(dtype), lm.params))
    params, ctx = sj.jacobian_operator(model, batch, layer, observable="logits").tail_args()
    fn = tail.steered_observable(model.config, "logits")

    def call(offsets):
        k = offsets.shape[0]
        tiled = jax.tree.map(lambda x: jnp.repeat(x, k, axis=0), ctx)
        return fn(jnp.asarray(offsets, dtype), (params, tiled))

    return call


def run(args) -> dict:
    t0 = time.time()
    lm = sj.load_model(args.model)
    layer = study_layer(lm, args.layer)
    prompt = data.neutral_eval_prompts()[args.prompt]
    batch = lm.tokenize([prompt])
    exact = sj.jacobian_operator(lm, batch, layer, observable="logits").singular_values()[0]
    exact_rank = spectrum.numerical_rank(exact, args.threshold)
    rows = [{"method": "exact (float32 model, float64 SVD of the exact factor)", "rank": exact_rank,
             "null_fraction_over_d": 1 - exact_rank / lm.d,
             "null_fraction_paper_formula": 1 - exact_rank / args.n_directions}]
    for name in args.dtypes:
        method = f"paper estimator, {name} model"
        try:
            est = studies.paper_null_space_estimate(probe_fn(lm, batch, layer, DTYPES[name]), lm.d, args.n_directions,
                                                    args.eps, args.threshold, args.seed)
        except sj.NonFiniteError as err:  # e.g. a float16 model whose activations overflow: recorded, not fatal
            print(f"note: {method}: {err}", file=sys.stderr)
            rows.append({"method": method, "rank": None, "null_fraction_over_d": None,
                         "null_fraction_paper_formula": None, "failed": str(err)})
            continue
        rows.append({"method": method, "rank": est.rank,
                     "null_fraction_over_d": 1 - est.rank / lm.d, "null_fraction_paper_formula": est.null_fraction,
                     "probe_singular_values_top8": est.singular_values[:8]})
    result = {"model": lm.source, "model_name": Path(lm.source).name, "d": lm.d, "layer": layer, "prompt": prompt,
              "settings": {k: getattr(args, k) for k in ("n_directions", "eps", "threshold", "dtypes", "seed")},
              "paper_formula_floor": 1 - lm.d / args.n_directions, "rows": rows,
              "meta": io.run_metadata(lm, seeds={"seed": args.seed}), "seconds_total": time.time() - t0}
    out_dir = Path(args.out)
    io.write_json_atomic(out_dir / "paper_estimator.json", result)
    print_table(result)
    wrote([out_dir / "paper_estimator.json"], t0)
    return result


def print_table(result: dict) -> None:
    s = result["settings"]
    print(f"{result['model_name']}, layer {result['layer']}, prompt {result['prompt']!r}: rank = #sigma > "
          f"{s['threshold']:g} sigma_max; the paper's null fraction 1 - rank / {s['n_directions']} cannot fall "
          f"below {result['paper_formula_floor']:.3f}")
    print(f"{'method':<58} {'rank':>5} {'null frac (rank/d)':>18} {'paper formula':>13}")
    for r in result["rows"]:
        if r["rank"] is None:
            print(f"{r['method']:<58} {'-':>5} {'not finite':>18} {'-':>13}")
            continue
        print(f"{r['method']:<58} {r['rank']:>5} {r['null_fraction_over_d']:>18.3f} "
              f"{r['null_fraction_paper_formula']:>13.3f}")


def markdown(result: dict) -> str:
    """docs/identifiability.md's table for one layer, from a result file."""
    s = result["settings"]
    lines = [f"*{result['model_name']}, layer {result['layer']}, prompt {result['prompt']!r}; rank = #sigma > "
             f"{s['threshold']:g} sigma_max*", "",
             "| layer | method | rank | null fraction (d - rank) / d | paper's formula 1 - rank / "
             f"{s['n_directions']} |", "|---|---|---|---|---|"]
    for r in result["rows"]:
        if r["rank"] is None:
            lines.append(f"| {result['layer']} | {r['method']} | - | not finite (outputs overflow) | - |")
            continue
        lines.append(f"| {result['layer']} | {r['method']} | {r['rank']} | {r['null_fraction_over_d']:.3f} | "
                     f"{r['null_fraction_paper_formula']:.3f} |")
    return "\n".join(lines)


def report(result: dict) -> None:
    print_table(result)
    print()
    print(markdown(result))


def main(argv=None) -> int:
    return run_cli(parse_args, run_or_report(run, report), argv)


if __name__ == "__main__":
    sys.exit(main())
