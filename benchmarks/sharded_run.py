"""Exact Jacobian spectra, Lanczos top-k and steered generation of a large model on a device mesh.

    python benchmarks/sharded_run.py --model meta-llama/Llama-3.1-8B-Instruct --mesh 1x8 --dtype float32 \
        [--layer mid] [--n-prompts 8] [--prompt-len 64] [--k 32] [--new-tokens 40] [--chunk 256] \
        [--check] [--out results/sharded_run.json]

--mesh DATAxMODEL: 'data' splits prompts, 'model' splits heads / MLP / vocabulary (steerjax/sharding.py);
the product must not exceed the visible devices (on CPU, set
XLA_FLAGS=--xla_force_host_platform_device_count=N). The model is loaded onto host memory and placed shard
by shard (sj.load_sharded), so no single device ever holds it. Prompts: the built-in neutral geometry
prompts, tokenized and cut/left-padded to --prompt-len. --n-prompts should be a multiple of the data
axis (otherwise prompts are replicated over it). --check also runs the unsharded model (small models
only) and prints the largest relative difference.
Prints the parameter placement, timings (first call includes compilation), and writes a JSON summary.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
import numpy as np

import steerjax as sj
from steerjax import data
from steerjax.sharding import describe


def timed(fn):
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn())
    return out, time.perf_counter() - t0


def prompt_batch(lm, n: int, length: int) -> sj.TokenBatch:
    texts = (list(data.geometry_prompts()["neutral"]) * n)[:n]
    if lm.tokenizer_loader is None:
        ids = np.random.default_rng(0).integers(100, lm.config.vocab_size, (n, length)).astype(np.int32)
        return sj.TokenBatch(ids, np.ones_like(ids))
    batch = lm.tokenize(texts)
    ids, mask = np.asarray(batch.ids)[:, -length:], np.asarray(batch.attention_mask)[:, -length:]
    return sj.TokenBatch(ids, mask)


def run(lm, batch, layer: int, k: int, new_tokens: int, chunk: int) -> dict:
    res: dict = {}
    op = sj.jacobian_operator(lm, batch, layer, chunk=chunk)
    factors, res["exact_first_s"] = timed(op.factors)
    _, res["exact_s"] = timed(lambda: sj.jacobian_operator(lm, batch, layer, chunk=chunk).factors())
    res["singular_values"] = [np.linalg.svd(c, compute_uv=False) for c in factors]
    top, res["lanczos_first_s"] = timed(lambda: op.top_singular(k, method="lanczos").s)
    top, res["lanczos_s"] = timed(lambda: op.top_singular(k, method="lanczos").s)
    res["lanczos_top"] = np.asarray(top)
    v = np.random.default_rng(0).normal(size=lm.d).astype(np.float32)
    steer = sj.Steer(layer=layer, vector=v, alpha=1.0, positions="last+generated")
    gen = lambda: sj.generate(lm, batch, steer=steer, max_new_tokens=new_tokens, stop_at_eos=False).tokens
    res["tokens"], res["generate_first_s"] = timed(gen)
    _, res["generate_s"] = timed(gen)
    return res


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None)
    p.add_argument("--mesh", default="1x1", help="DATAxMODEL, e.g. 1x8 or 2x8")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--layer", default="mid")
    p.add_argument("--n-prompts", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=40)
    p.add_argument("--chunk", type=int, default=256, help="tangents per vmapped JVP chunk")
    p.add_argument("--check", action="store_true", help="compare with the unsharded model (small models)")
    p.add_argument("--out", default="results/sharded_run.json")
    args = p.parse_args()

    n_data, n_model = (int(x) for x in args.mesh.lower().split("x"))
    mesh = sj.make_mesh(data=n_data, model=n_model)
    t0 = time.perf_counter()
    lm = sj.load_sharded(args.model, mesh, dtype=args.dtype)
    print(f"loaded {lm.source} ({args.dtype}) onto {dict(mesh.shape)} of {jax.devices()[0].platform} devices "
          f"in {time.perf_counter() - t0:.1f} s")
    placement = describe(lm)
    per_device = sum(r["bytes_per_device"] for r in placement)
    for r in placement:
        print(f"  {r['param']:48s} {str(r['shape']):22s} -> {str(r['shard']):22s} {r['spec']}")
    print(f"  parameter bytes per device: {per_device / 1e9:.2f} GB")

    layer = lm.num_layers // 2 if args.layer == "mid" else int(args.layer)
    batch = prompt_batch(lm, args.n_prompts, args.prompt_len)
    res = run(lm, batch, layer, args.k, args.new_tokens, args.chunk)
    n = args.n_prompts
    print(f"layer {layer}, {n} prompts x {batch.ids.shape[1]} tokens:")
    print(f"  exact spectra (factors, d = {lm.d}): {res['exact_s']:.2f} s for {n} prompts "
          f"({res['exact_s'] / n:.3f} s / prompt; first call with compilation {res['exact_first_s']:.1f} s)")
    print(f"  Lanczos top-{args.k}, prompt 0: {res['lanczos_s']:.2f} s (first {res['lanczos_first_s']:.1f} s)")
    print(f"  steered generation {n} x {args.new_tokens} tokens: {res['generate_s']:.2f} s "
          f"({n * args.new_tokens / res['generate_s']:.1f} tok/s; first {res['generate_first_s']:.1f} s)")
    summary = {"model": lm.source, "mesh": dict(mesh.shape), "dtype": args.dtype, "layer": layer,
               "param_bytes_per_device": per_device, "n_prompts": n, "prompt_len": int(batch.ids.shape[1]),
               **{key: res[key] for key in res if key.endswith("_s")},
               "sigma_max": [float(s[0]) for s in res["singular_values"]]}

    if args.check:
        plain = sj.load_model(args.model, dtype=args.dtype)
        ref = run(plain, batch, layer, args.k, args.new_tokens, args.chunk)
        diff = {"exact_singular_values": max(float(np.max(np.abs(a - b)) / np.max(b)) for a, b in
                                             zip(res["singular_values"], ref["singular_values"])),
                "lanczos_top": float(np.max(np.abs(res["lanczos_top"] - ref["lanczos_top"])) /
                                     np.max(ref["lanczos_top"])),
                "generated_tokens_equal": bool(np.array_equal(res["tokens"], ref["tokens"]))}
        print(f"  sharded vs unsharded: {diff}")
        summary["check"] = diff
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
