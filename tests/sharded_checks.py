"""Sharded vs unsharded results on a data=2 x model=2 mesh of 4 host (CPU) devices; run by
tests/test_sharding.py in a subprocess, because the device count must be fixed before jax starts:

    XLA_FLAGS=--xla_force_host_platform_device_count=4 python tests/sharded_checks.py OUT_DIR [--full]

Prints one JSON object: per model, max relative errors (conftest.rel_err) of every sharded result against
the same call on the unsharded model, the shard shapes of representative parameters, the output shardings,
and the collectives in the compiled sharded forward. Every check compiles twice (sharded and not), so the
default run is trimmed: all checks on the model whose key/value heads are sharded, forward, J v and
generation on the one whose key/value heads are replicated; --full runs everything on both.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import jax
import jax.numpy as jnp
import numpy as np

import steerjax as sj
from conftest import build_hf_model, random_ids, rel_err
from test_gemma3_qwen3 import CONFIGS as GEMMA3_QWEN3_CONFIGS
from test_gemma3_qwen3 import build_model as build_gemma3_or_qwen3
from steerjax.models import causal_lm

# name -> (TINY_CONFIGS entry, overrides): K = 2 kv heads (sharded over model = 2) and K = 1 (replicated)
MODELS = {"qwen2_gqa4_kv_sharded": ("qwen2_untied_gqa4", {}),
          "llama3_gqa4_kv_replicated": ("llama3_untied_gqa2", {"num_key_value_heads": 1}),
          # sliding window 4 < the 9-token rows, two RoPE bases, softcapping, q/k norms, sandwich norms
          "gemma3_kv_sharded": ("gemma3_softcap", {})}
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")


def shard_shape(x) -> list[int]:
    return list(x.addressable_shards[0].data.shape)


def spec_of(x) -> str:
    return str(x.sharding.spec)


def collectives(lm, ids) -> dict[str, int]:
    """Collective ops in the compiled sharded forward (the scan body is counted once)."""
    fn = causal_lm.jitted_forward(lm.config, False)
    delta = jnp.zeros((*ids.shape, lm.d), lm.dtype)
    hlo = fn.lower(lm.params, lm.to_device(ids), lm.to_device(np.ones_like(ids)), jnp.int32(-1),
                   lm.to_device(delta)).compile().as_text()
    return {op: len(re.findall(rf"\b{op}(?:-start)?\(", hlo)) for op in COLLECTIVES}


def core_checks(lm, slm, ids, v, out) -> None:
    """Parameter placement, forward (plain and steered), J v, steered greedy generation."""
    err = out["errors"]
    blocks = slm.params["blocks"]
    attn, mlp = blocks["self_attn"], blocks["mlp"]
    out["global"] = {"q_proj": list(attn["q_proj"]["kernel"].shape), "k_proj": list(attn["k_proj"]["kernel"].shape),
                     "embed": list(slm.params["embed"].shape)}
    leaves = {"q_proj": attn["q_proj"]["kernel"], "k_proj": attn["k_proj"]["kernel"],
              "o_proj": attn["o_proj"]["kernel"],
              "gate_proj": mlp["gate_proj"]["kernel"], "down_proj": mlp["down_proj"]["kernel"],
              "embed": slm.params["embed"], "norm": slm.params["norm"]["weight"]}
    out["shards"] = {name: shard_shape(leaf) for name, leaf in leaves.items()}

    ref, got = lm.forward(ids, return_hidden=True), slm.forward(ids, return_hidden=True)
    err["forward_logits"] = rel_err(got.logits, ref.logits)
    err["forward_hidden"] = max(rel_err(g, r) for g, r in zip(got.hidden, ref.hidden))
    out["specs"]["logits"] = spec_of(got.logits)
    steer = sj.Steer(layer=1, vector=v, alpha=2.0, positions="last")
    err["steered_logits"] = rel_err(slm.forward(ids, steer=steer).logits, lm.forward(ids, steer=steer).logits)
    out["collectives"] = collectives(slm, ids)

    ops = [sj.jacobian_operator(m, ids, layer=1) for m in (lm, slm)]  # 2 prompts, split over 'data'
    err["jacobian_matvec"] = rel_err(ops[1].matvec(v), ops[0].matvec(v))

    steer = sj.Steer(layer=2, vector=v, alpha=1.0, positions="last+generated")
    gens = [sj.generate(m, ids, steer=steer, max_new_tokens=6, stop_at_eos=False, return_logits=True)
            for m in (lm, slm)]
    out["generation_tokens_equal"] = bool(np.array_equal(gens[1].tokens, gens[0].tokens))
    err["generation_logits"] = rel_err(gens[1].logits, gens[0].logits)


def spectral_checks(folder, mesh, lm, slm, ids, rng, out) -> None:
    """J^T u, exact singular values (QR route), Lanczos top-k, load_sharded, bfloat16 forward."""
    err = out["errors"]
    ops = [sj.jacobian_operator(m, ids, layer=1) for m in (lm, slm)]
    u = rng.normal(size=(2, lm.config.vocab_size)).astype(np.float32)
    err["jacobian_rmatvec"] = rel_err(ops[1].rmatvec(u), ops[0].rmatvec(u))
    sv = [np.linalg.svd(op.factors(), compute_uv=False) for op in ops]
    err["exact_singular_values"] = rel_err(sv[1], sv[0])
    top = [op.top_singular(k=6, prompt=1, method="lanczos").s for op in ops]
    err["lanczos_top6"] = rel_err(top[1], top[0])
    err["lanczos_top6_vs_exact"] = rel_err(top[1], sv[0][1][:6])

    loaded = sj.load_sharded(folder, mesh, dtype="float32")  # straight onto the mesh
    out["load_sharded_equal"] = all(jax.tree.leaves(jax.tree.map(
        lambda a, b: bool(np.array_equal(a, b)) and a.sharding == b.sharding, loaded.params, slm.params)))

    lm16 = sj.load_model(folder, dtype="bfloat16")  # bf16 weights, float32 accumulation
    err["bf16_forward_logits"] = rel_err(sj.shard_model(lm16, mesh).forward(ids).logits, lm16.forward(ids).logits)


def extra_checks(lm, slm, ids, rng, out) -> None:
    """Stacked Gram products, dense J, stacked Lanczos (--full only)."""
    err = out["errors"]
    ops = [sj.jacobian_operator(m, ids, layer=1) for m in (lm, slm)]
    x = rng.normal(size=lm.d).astype(np.float32)
    err["jacobian_gram_matvec"] = rel_err(ops[1].gram_matvec(x), ops[0].gram_matvec(x))
    dense = ops[1].dense()
    err["jacobian_dense"] = rel_err(dense, ops[0].dense())
    out["specs"]["jacobian_dense"] = spec_of(dense)
    stacked = [op.top_stacked(k=4).s for op in ops]
    err["lanczos_stacked_top4"] = rel_err(stacked[1], stacked[0])


def check_model(folder: Path, mesh, spectral: bool, full: bool) -> dict:
    lm = sj.load_model(folder)
    slm = sj.shard_model(lm, mesh)
    rng = np.random.default_rng(0)
    ids = random_ids(rng, batch=2, length=9)
    v = rng.normal(size=lm.d).astype(np.float32)
    out: dict = {"errors": {}, "specs": {}}
    core_checks(lm, slm, ids, v, out)
    if spectral or full:
        spectral_checks(folder, mesh, lm, slm, ids, rng, out)
    if full:
        extra_checks(lm, slm, ids, rng, out)
    return out


def main(workdir: str, full: bool) -> None:
    assert len(jax.devices()) == 4, jax.devices()
    mesh = sj.make_mesh(data=2, model=2)
    results = {"devices": len(jax.devices()), "mesh": dict(mesh.shape)}
    for i, (name, (base, overrides)) in enumerate(MODELS.items()):
        folder = Path(workdir) / name
        build = build_gemma3_or_qwen3 if base in GEMMA3_QWEN3_CONFIGS else build_hf_model
        build(base, **overrides).save_pretrained(folder)
        results[name] = check_model(folder, mesh, spectral=i == 0, full=full)
    print(json.dumps(results))


if __name__ == "__main__":
    main(sys.argv[1], full="--full" in sys.argv[2:])
