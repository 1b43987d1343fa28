"""Memory and FLOP plan for large models on device meshes, computed from the models' configs and
steerjax's sharding rules (steerjax/sharding.py). Prints the Markdown tables of docs/scaling.md.

    python benchmarks/scaling_plan.py [--prompt-len 64] [--k 32] [--chunk 1024]

Assumptions (stated in every table): dense peak throughput per chip (H100 SXM: 989 TFLOP/s bf16, 67 TFLOP/s
float32 without TF32, 3.35 TB/s HBM; TPU v5e: 197 TFLOP/s bf16, 819 GB/s; TPU v4: 275 TFLOP/s bf16,
1.2 TB/s; TPUs run float32 HIGHEST-precision matmuls as 6 bf16 passes); achieved 40% of peak FLOP/s and
60% of peak bandwidth; a step takes max(compute time, weight-read time); collectives and host work
beyond the listed float64 SVD are ignored. Host float64 LAPACK at 100 GFLOP/s.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from steerjax.jacobian import TAIL_CHUNK
from steerjax.models.config import ModelConfig


def config(name, d, L, H, K, f, V, tied) -> tuple[str, ModelConfig]:
    return name, ModelConfig(model_type="llama", vocab_size=V, hidden_size=d, intermediate_size=f, num_layers=L,
                             num_heads=H, num_kv_heads=K, head_dim=d // H, rms_norm_eps=1e-6, rope_theta=1e6,
                             tie_word_embeddings=tied, qkv_bias=name.startswith("Qwen"))


MODELS = dict([
    config("Qwen2.5-3B", 2048, 36, 16, 2, 11008, 151936, True),
    config("Llama-3.1-8B", 4096, 32, 32, 8, 14336, 128256, False),
    config("Llama-3.1-70B", 8192, 80, 64, 8, 28672, 128256, False),
])


@dataclasses.dataclass(frozen=True)
class Mesh:
    name: str
    data: int
    model: int
    hbm_gb: float  # per chip
    bf16_tflops: float
    f32_tflops: float
    hbm_tbs: float


MESHES = [
    Mesh("1x H100 80GB", 1, 1, 80, 989, 67, 3.35),
    Mesh("8x H100 80GB", 1, 8, 80, 989, 67, 3.35),
    Mesh("TPU v5e-8", 1, 8, 16, 197, 197 / 6, 0.819),
    Mesh("TPU v4-32 (16 chips)", 2, 8, 32, 275, 275 / 6, 1.2),
]
COMPUTE_EFF, BW_EFF, HOST_GFLOPS = 0.40, 0.60, 100.0
# block Lanczos rounds to tol 1e-5 at k = 32: 5 on SmolLM2's J, 10 on the random-weight Qwen2.5-0.5B shape
# (flat top of the spectrum); the plan assumes the slower case
LANCZOS_ROUNDS = 10
GB = 1e9


def shard_factor(dim: int, m: int) -> int:
    """steerjax's rule: a dimension is split over the model axis only when it divides."""
    return m if dim % m == 0 else 1


def param_bytes(c: ModelConfig, m: int, itemsize: int) -> tuple[float, float]:
    """(total bytes, bytes per device) of the parameters under the model-axis rules."""
    d, h, L = c.hidden_size, c.head_dim, c.num_layers
    q, kv, f, V = c.num_heads * h, c.num_kv_heads * h, c.intermediate_size, c.vocab_size
    fh, fk, ff, fv = (shard_factor(x, m) for x in (c.num_heads, c.num_kv_heads, f, V))
    bias = (q + 2 * kv) if c.qkv_bias else 0
    per_layer_total = 2 * d * q + 2 * d * kv + 3 * d * f + 2 * d + bias
    per_layer_dev = 2 * d * q / fh + 2 * d * kv / fk + 3 * d * f / ff + 2 * d + (
        (q / fh + 2 * kv / fk) if c.qkv_bias else 0)
    emb = V * d * (1 if c.tie_word_embeddings else 2)
    total = L * per_layer_total + emb + d
    dev = L * per_layer_dev + emb / fv + d
    return total * itemsize, dev * itemsize


def layer_matmul_params(c: ModelConfig) -> int:
    d, h = c.hidden_size, c.head_dim
    return 2 * d * c.num_heads * h + 2 * d * c.num_kv_heads * h + 3 * d * c.intermediate_size


def token_layer_flops(c: ModelConfig, context: int) -> float:
    return 2 * layer_matmul_params(c) + 4 * context * c.num_heads * c.head_dim


def kv_bytes_per_token(c: ModelConfig, layers: int, m: int, itemsize: int) -> float:
    return 2 * layers * c.num_kv_heads * c.head_dim * itemsize / shard_factor(c.num_kv_heads, m)


def device_time(flops: float, bytes_read: float, mesh: Mesh, dtype: str) -> float:
    """Seconds for `flops` spread over one model group (mesh.model chips) that reads `bytes_read`."""
    peak = (mesh.bf16_tflops if dtype == "bfloat16" else mesh.f32_tflops) * 1e12 * mesh.model
    return max(flops / (COMPUTE_EFF * peak), bytes_read / (BW_EFF * mesh.hbm_tbs * 1e12 * mesh.model))


def plan_rows(T: int, k: int, chunk: int):
    rows = []
    for name, c in MODELS.items():
        d, V, L = c.hidden_size, c.vocab_size, c.num_layers
        layer = L // 2
        tail = L - layer
        for mesh in MESHES:
            for dtype, itemsize in (("bfloat16", 2), ("float32", 4)):
                total, per_dev = param_bytes(c, mesh.model, itemsize)
                kv_ctx = T * kv_bytes_per_token(c, tail, mesh.model, itemsize)  # one prompt's tail context
                tangents = chunk * (3 * c.intermediate_size / shard_factor(c.intermediate_size, mesh.model)
                                    + 6 * d) * itemsize  # live tangent activations of one block
                dense_d = d * d * 4
                need = per_dev + kv_ctx + tangents + dense_d
                fits = need < 0.9 * mesh.hbm_gb * GB
                # exact spectrum of one prompt at layer L/2: prefix pass + (d + 1) one-token tail passes
                tail_bytes = tail * layer_matmul_params(c) * itemsize
                prefix = L * sum(token_layer_flops(c, t + 1) for t in range(T))
                jvp_flops = (d + 1) * tail * token_layer_flops(c, T)
                t_jvps = device_time(jvp_flops, -(-d // chunk) * tail_bytes, mesh, dtype) \
                    + device_time(prefix, L * layer_matmul_params(c) * itemsize, mesh, dtype)
                t_host = (2 * d ** 3 + 8 / 3 * d ** 3) / (HOST_GFLOPS * 1e9)  # R @ D and SVD(d x d), float64
                # block Lanczos top-k on the reduced operator M D: LANCZOS_ROUNDS rounds of 2k batched tail
                # JVPs and 2k VJPs of one linearisation (the weights are read once for each), then u = J v / s
                # from k JVPs that include W_U
                lin = tail * token_layer_flops(c, T)
                block = 2 * k
                t_lanczos = LANCZOS_ROUNDS * device_time(2 * block * lin, 2 * tail_bytes, mesh, dtype) \
                    + device_time(k * (lin + 2 * d * V), tail_bytes + V * d * itemsize, mesh, dtype)
                # one decode step of generation (batch 8 per data shard): every weight read once
                t_decode = device_time(8 * (L * token_layer_flops(c, T) + 2 * d * V), total, mesh, dtype)
                rows.append(dict(model=name, mesh=mesh.name, dtype=dtype, total_gb=total / GB,
                                 per_device_gb=per_dev / GB, kv_ctx_mb=kv_ctx / 1e6, need_gb=need / GB,
                                 fits=fits, spectrum_tflop=(prefix + jvp_flops) / 1e12, t_device=t_jvps,
                                 t_host=t_host, lanczos_s=t_lanczos, decode_ms=1e3 * t_decode,
                                 qr_tflop=4 * V * d * d / 1e12, data=mesh.data))
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--chunk", type=int, default=TAIL_CHUNK, help="tangents per vmapped JVP chunk (steerjax's default)")
    args = p.parse_args()

    print("### Model shapes\n")
    print("| model | d | layers | heads | kv heads | head dim | intermediate | vocab | tied | params |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, c in MODELS.items():
        total, _ = param_bytes(c, 1, 1)
        print(f"| {name} | {c.hidden_size} | {c.num_layers} | {c.num_heads} | {c.num_kv_heads} | {c.head_dim} | "
              f"{c.intermediate_size} | {c.vocab_size} | {c.tie_word_embeddings} | {total / 1e9:.2f} B |")

    print("\n### What the 'model' axis splits (m = model-axis size)\n")
    print("| model | m | q heads / o_proj | k/v heads | MLP intermediate | vocab (embed, lm_head) |")
    print("|---|---|---|---|---|---|")
    for name, c in MODELS.items():
        for m in (8, 16):
            yes = lambda dim: "split" if dim % m == 0 else "replicated"
            print(f"| {name} | {m} | {yes(c.num_heads)} | {yes(c.num_kv_heads)} | {yes(c.intermediate_size)} | "
                  f"{yes(c.vocab_size)} |")

    rows = plan_rows(args.prompt_len, args.k, args.chunk)
    print(f"\n### Memory per device and time per exact spectrum (prompt of {args.prompt_len} tokens, layer L/2, "
          f"JVP chunk {args.chunk}, Lanczos k = {args.k})\n")
    print("| model | mesh (data x model) | dtype | params total GB | params / device GB | tail KV / prompt MB "
          "| fits | spectrum TFLOP | device s | host SVD s | Lanczos top-k s | decode step ms (B=8) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        mesh = next(m for m in MESHES if m.name == r["mesh"])
        fits = "yes" if r["fits"] else "**no**"
        device = f"{r['t_device']:.2f}" if r["fits"] else "-"
        lanczos = f"{r['lanczos_s']:.2f}" if r["fits"] else "-"
        decode = f"{r['decode_ms']:.1f}" if r["fits"] else "-"
        print(f"| {r['model']} | {r['mesh']} ({mesh.data}x{mesh.model}) | {r['dtype']} | {r['total_gb']:.1f} | "
              f"{r['per_device_gb']:.1f} | {r['kv_ctx_mb']:.1f} | {fits} | {r['spectrum_tflop']:.1f} | {device} | "
              f"{r['t_host']:.1f} | {lanczos} | {decode} |")
    print("\nOne-off per model: float64 thin QR of W_U (V x d) on the host: "
          + ", ".join(f"{name} {4 * c.vocab_size * c.hidden_size ** 2 / 1e12:.1f} TFLOP "
                      f"(~{4 * c.vocab_size * c.hidden_size ** 2 / (HOST_GFLOPS * 1e9):.0f} s)"
                      for name, c in MODELS.items()))


if __name__ == "__main__":
    main()
