"""Steered generation throughput: steerjax (jit, lax.scan KV cache) vs HF `generate` with a steering
forward-pre-hook, same model, same prompts, same batch, greedy. Prints median tokens/s, the ratio and the
achieved GFLOP/s next to the float32 matmul throughput measured in the same run. Where steerjax's CPU decode
kernels apply (steerjax.cpu_kernels) it also times sj.generate with decode_kernels=False (XLA's dot) and
prints the one-off weight packing the kernels need (once per model, not inside the timed calls).

    python benchmarks/generation_throughput.py [--model smollm2|qwen05b-random|FOLDER] [--batch 8]
        [--new-tokens 32] [--repeats 3]

HF runs with eager attention (as in every steerjax reference) and sdpa; torch uses all cores. Prompts are
tokenized texts (left-padded) for models with a tokenizer, 16 random tokens per row otherwise. Each weight
dtype in --dtypes (default float32,bfloat16) is a separate comparison: bf16 weights with float32
accumulation in both libraries (torch's bf16 CPU matmuls go through oneDNN, AMX where the CPU has it).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import jax
import numpy as np
import torch

import steerjax as sj
from steerjax import generation
from common import (BenchModel, generation_flops, matmul_gflops, memory_read_gbs, time_call,
                    weight_stream_gbs)

PROMPTS = ["The weather today is", "My favourite book is about", "In the year 2050, cities will",
           "The best way to learn a language is", "Yesterday I went to the market and",
           "The most important invention was", "A good teacher always", "The ocean is home to"]


def prompt_batch(bench: BenchModel, batch: int) -> sj.TokenBatch:
    lm = bench.lm
    if lm.tokenizer_loader is None:
        ids = np.random.default_rng(0).integers(100, lm.config.vocab_size, (batch, 16)).astype(np.int32)
        return sj.TokenBatch(ids, np.ones_like(ids))
    return lm.tokenize((PROMPTS * (batch // len(PROMPTS) + 1))[:batch])


def one_off_packing_seconds(lm) -> float | None:
    """Seconds to pack lm's weights for the CPU decode kernels (once per model, kept in lm.cache; not part
    of any timed call), or None where `generate` does not use the kernels."""
    if not generation.decode_kernels_apply(lm):
        return None
    generation.drop_decode_panels(lm)
    start = time.perf_counter()
    generation.decode_panels(lm)
    return time.perf_counter() - start


def time_generation(bench: BenchModel, dtype: str, batch: sj.TokenBatch, new_tokens: int, repeats: int) -> dict:
    """Median seconds of steerjax and of HF generate (eager, sdpa) with the same steering, weights in dtype."""
    lm = bench.model(dtype)
    layer = lm.num_layers // 2
    v = np.random.default_rng(0).normal(size=lm.d).astype(np.float32)
    steer = sj.Steer(layer=layer, vector=v, alpha=1.0, positions="last+generated")
    packing = one_off_packing_seconds(lm)
    ours, _ = time_call(lambda: sj.generate(lm, batch, steer=steer, max_new_tokens=new_tokens,
                                            stop_at_eos=False).tokens, repeats)
    results = {"steerjax sj.generate": ours}
    if packing is not None:  # the same call with XLA's dot in the decode steps
        results["steerjax, decode_kernels=False"], _ = time_call(
            lambda: sj.generate(lm, batch, steer=steer, max_new_tokens=new_tokens, stop_at_eos=False,
                                decode_kernels=False).tokens, repeats)
        results["one-off panel packing"] = packing
    ids = torch.as_tensor(batch.ids, dtype=torch.long)
    mask = torch.as_tensor(batch.attention_mask, dtype=torch.long)
    for attn in ("eager", "sdpa"):
        model = bench.hf(attn, dtype)
        v_torch = torch.as_tensor(v).to(next(model.parameters()).dtype)

        def hook(module, hargs, kwargs):
            hidden = hargs[0] if hargs else kwargs["hidden_states"]
            hidden = torch.cat([hidden[:, :-1], hidden[:, -1:] + v_torch], dim=1)
            return ((hidden, *hargs[1:]), kwargs) if hargs else (hargs, {**kwargs, "hidden_states": hidden})

        model.model.layers[layer].register_forward_pre_hook(hook, with_kwargs=True)

        def run_hf():
            with torch.no_grad():
                return model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=new_tokens,
                                      min_new_tokens=new_tokens, pad_token_id=lm.pad_id)

        results[f"HF generate ({attn}) + hook"], _ = time_call(run_hf, repeats)
        model = None  # free this attention variant before loading the next
    return results


def run_generation(bench: BenchModel, batch_size: int, new_tokens: int, repeats: int, peak: dict,
                   dtypes: tuple[str, ...] = ("float32", "bfloat16")) -> dict:
    """Steered greedy generation, steerjax vs HF, once per weight dtype (ratios within a dtype)."""
    batch = prompt_batch(bench, batch_size)
    n_tokens = batch_size * new_tokens
    flops = generation_flops(bench.lm.config, batch_size, batch.ids.shape[1], new_tokens)
    print(f"\n(c) steered generation: batch {batch_size} x {new_tokens} new tokens (prompt width "
          f"{batch.ids.shape[1]}), steering at layer {bench.lm.num_layers // 2} (last+generated), greedy, median of "
          f"{repeats}; bfloat16 = bf16 weights with float32 accumulation in both libraries")
    print(f"  {'dtype':8s} {'method':32s} {'median s':>9s} {'tok/s':>8s} {'GFLOP/s':>8s} {'% of matmul':>11s} "
          f"{'weights GB/s':>12s} {'ratio':>7s}")
    out = {}
    for dtype in dtypes:
        results = time_generation(bench, dtype, batch, new_tokens, repeats)
        packing = results.pop("one-off panel packing", None)
        ours = results["steerjax sj.generate"]
        # every decode step reads every weight once: weights consumed per second
        weight_bytes = sum(x.nbytes for x in jax.tree.leaves(bench.model(dtype).params))
        for name, seconds in results.items():
            rate = flops / seconds / 1e9
            lib = "jax" if name.startswith("steerjax") else "torch"
            ratio = "" if name == "steerjax sj.generate" else f"{seconds / ours:6.2f}x"
            print(f"  {dtype:8s} {name:32s} {seconds:9.2f} {n_tokens / seconds:8.1f} {rate:8.1f} "
                  f"{100 * rate / peak[lib]:10.0f}% {new_tokens * weight_bytes / seconds / 1e9:12.1f} {ratio:>7s}")
        if packing is not None:
            print(f"  {dtype:8s} steerjax's one-off panel packing for the CPU decode kernels (once per model, "
                  f"not in the timed calls): {packing:.2f} s")
        out[dtype] = {**results, "one-off panel packing": packing}
    # against the rate this machine runs batch-row products over layer-shaped weights at (both libraries)
    stream = weight_stream_gbs(bench.lm.config, batch_size)
    memory = memory_read_gbs()
    weight_bytes = sum(x.nbytes for x in jax.tree.leaves(bench.lm.params))
    rates = ", ".join(f"{name} {rate:.1f} GB/s" for name, rate in stream.items())
    print(f"  batch-{batch_size} products over layer-shaped float32 weights on this machine: {rates}; "
          f"memory read (a jitted sum) {memory:.1f} GB/s (each float32 decode step reads all "
          f"{weight_bytes / 1e6:.0f} MB of weights)")
    return {**out, "weight_stream_gbs": stream, "memory_read_gbs": memory}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="pin torch and XLA CPU threads (see common.py)")
    p.add_argument("--dtypes", default="float32,bfloat16", help="weight dtypes to compare in (comma-separated)")
    args = p.parse_args()
    bench = BenchModel(args.model)
    peak = matmul_gflops()
    print(f"model {args.model}; torch threads {torch.get_num_threads()}, XLA_FLAGS "
          f"{os.environ.get('XLA_FLAGS', '').strip() or '-'}; float32 matmul 2048^3: "
          f"jax {peak['jax']:.1f} GFLOP/s, torch {peak['torch']:.1f} GFLOP/s")
    run_generation(bench, args.batch, args.new_tokens, args.repeats, peak, tuple(args.dtypes.split(",")))


if __name__ == "__main__":
    main()
