"""Steered generation throughput: steerjax (jit, lax.scan KV cache) vs HF `generate` with a steering
forward-pre-hook, same model, same prompts, same batch, greedy. Prints median tokens/s and the ratio.

    python benchmarks/generation_throughput.py [--model SPEC] [--batch 8] [--new-tokens 32] [--repeats 3]

HF runs with eager attention (as in every steerjax reference) and sdpa; torch uses all cores.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch

import steerjax as sj
from steerjax.models.loading import default_model_path

PROMPTS = ["The weather today is", "My favourite book is about", "In the year 2050, cities will",
           "The best way to learn a language is", "Yesterday I went to the market and",
           "The most important invention was", "A good teacher always", "The ocean is home to"]


def load_hf(spec, attn):
    from transformers import AutoModelForCausalLM

    if spec is None:
        path = default_model_path()
        return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, attn_implementation=attn,
                                                    dtype=torch.float32).eval()
    return AutoModelForCausalLM.from_pretrained(spec, attn_implementation=attn, dtype=torch.float32).eval()


def time_call(fn, repeats):
    fn()  # warm-up (compilation for steerjax)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()

    lm = sj.load_model(args.model)
    prompts = (PROMPTS * (args.batch // len(PROMPTS) + 1))[: args.batch]
    batch = lm.tokenize(prompts)
    layer = lm.num_layers // 2
    v = np.random.default_rng(0).normal(size=lm.d).astype(np.float32)
    steer = sj.Steer(layer=layer, vector=v, alpha=1.0, positions="last+generated")
    n_tokens = args.batch * args.new_tokens

    ours = time_call(lambda: sj.generate(lm, batch, steer=steer, max_new_tokens=args.new_tokens,
                                         stop_at_eos=False), args.repeats)
    results = {"steerjax": ours}
    ids = torch.as_tensor(batch.ids, dtype=torch.long)
    mask = torch.as_tensor(batch.attention_mask, dtype=torch.long)
    for attn in ("eager", "sdpa"):
        model = load_hf(args.model, attn)

        def hook(module, hargs, kwargs):
            hidden = hargs[0] if hargs else kwargs["hidden_states"]
            hidden = torch.cat([hidden[:, :-1], hidden[:, -1:] + torch.as_tensor(v)], dim=1)
            return ((hidden, *hargs[1:]), kwargs) if hargs else (hargs, {**kwargs, "hidden_states": hidden})

        model.model.layers[layer].register_forward_pre_hook(hook, with_kwargs=True)

        def run_hf():
            with torch.no_grad():
                model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=args.new_tokens,
                               min_new_tokens=args.new_tokens, pad_token_id=lm.pad_id)

        results[f"HF generate ({attn}) + hook"] = time_call(run_hf, args.repeats)

    print(f"model {lm.source}: batch {args.batch} x {args.new_tokens} new tokens, steering at layer {layer}, "
          f"greedy, median of {args.repeats}; torch threads {torch.get_num_threads()}")
    for name, seconds in results.items():
        print(f"  {name:28s} {seconds:7.2f} s  {n_tokens / seconds:8.1f} tok/s")
    for name, seconds in results.items():
        if name != "steerjax":
            print(f"  speed-up vs {name}: {seconds / ours:.2f}x")


if __name__ == "__main__":
    main()
