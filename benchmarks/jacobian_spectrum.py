"""steerjax vs PyTorch peers in one run: exact J spectrum, top-k singular values, steered generation.

    python benchmarks/jacobian_spectrum.py --model {smollm2,qwen05b-random,FOLDER} [--repeats 3]
        [--prompt-len 32] [--k 32] [--parts spectrum,topk,generation] [--jacfwd-chunk 128]

J = d logits[last] / d h_l[last] for one prompt at layer l = L // 2 (float32 everywhere but the bf16 rows of (c)).
(a) exact spectrum (all d singular values):
    steerjax      JacobianOperator.singular_values(): d JVPs through the one-token tail against the cached
                  prefix, D = d norm(h_L)/dh_l, then sigma(R D) with W_U = Q R (the QR is once per model; its
                  time is printed separately and not counted per prompt), SVD of a d x d float64 matrix (on
                  one BLAS thread for d <= 768, steerjax.blas)
    torch full    torch.func.jacfwd of an HF eager model's tail blocks l..L-1 recomputed over the whole
                  sequence (explicit causal mask), final norm and lm_head at the last position, then
                  torch.linalg.svdvals of the V x d J; jacfwd (= vmap of jvp over the basis) runs in chunks
                  of --jacfwd-chunk tangents (vmap's chunk_size: all d tangents at once hold d x T x f
                  activations per MLP, several GB for the 0.5B shape)
    torch tail    the same with the tail run for the last token only against the prefix's cached K/V
(b) top-k singular values: steerjax JacobianOperator.top_singular(k) with its default method "auto", which
    takes the exact route (d JVPs, SVD of M D, u = J v / s, residuals from k VJPs) when its cost model
    says d JVPs beat block Lanczos (jacobian.dense_is_cheaper: d <= 3 * 2k * 6), else block Lanczos; and
    block Golub-Kahan Lanczos itself (top_singular(method="lanczos"): one
    jit-compiled program, linearised once, blocks of 2k batched jvp / vjp, full reorthogonalisation, run
    until every Ritz residual <= 1e-5 sigma_max), on the reduced operator M D (the default: W_U = Q R, so
    products skip the V x d unembedding; the QR is the one-off above) and on J itself, vs
    scipy.sparse.linalg.svds (ARPACK) over a
    LinearOperator whose matvec is torch.func.jvp and rmatvec a torch.func.vjp closure (computed once), on
    the torch last-position tail (the strong peer) and on the tail over the whole sequence.
(c) steered generation: sj.generate vs HF generate with a steering forward-pre-hook (see
    generation_throughput.py), greedy, in float32 and again with bfloat16 weights (--gen-dtypes).
Each timing is the median of --repeats calls after one warm-up call (steerjax's warm-up compiles).
Achieved GFLOP/s use the analytic matmul FLOPs of each method (benchmarks/common.py), next to the float32
matmul throughput of jax and torch measured in the same run.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np
import torch

import steerjax as sj
from common import BenchModel, linear_map_flops, matmul_gflops, spectrum_flops, time_call
from steerjax.jacobian import dense_is_cheaper, unembedding_reduction


# ----------------------------------------------------------------------------- torch peers

class PrefixKV:
    """Duck-typed HF cache: prepends the prefix's keys/values of each layer to the current token's."""

    def __init__(self, keys: dict, values: dict):
        self.keys, self.values = keys, values

    def update(self, k, v, layer_idx, *args, **kwargs):
        return torch.cat([self.keys[layer_idx], k], dim=2), torch.cat([self.values[layer_idx], v], dim=2)


def torch_full_tail_fn(model, ids: np.ndarray, layer: int):
    """x (d,) -> last-position logits with x added to h_layer[-1], tail blocks over the whole sequence."""
    ids_t = torch.as_tensor(ids[None], dtype=torch.long)
    T = ids_t.shape[1]
    with torch.no_grad():
        h = model(input_ids=ids_t, output_hidden_states=True).hidden_states[layer]
    pos = torch.arange(T)[None]
    cos_sin = model.model.rotary_emb(h, pos)
    mask = torch.full((T, T), torch.finfo(h.dtype).min).triu(1)[None, None]  # eager needs an explicit causal mask
    blocks = model.model.layers[layer:]

    def f(x):
        hh = torch.cat([h[:, :-1], h[:, -1:] + x], dim=1)
        for blk in blocks:
            hh = blk(hh, attention_mask=mask, position_embeddings=cos_sin, position_ids=pos)
        return model.lm_head(model.model.norm(hh[:, -1]))[0]

    return f


def torch_last_tail_fn(model, ids: np.ndarray, layer: int):
    """As torch_full_tail_fn, but the tail runs for the last token only against cached prefix K/V."""
    ids_t = torch.as_tensor(ids[None], dtype=torch.long)
    T = ids_t.shape[1]
    with torch.no_grad():
        out = model(input_ids=ids_t, output_hidden_states=True, use_cache=True)
    h = out.hidden_states[layer][:, -1:]
    cache = out.cache
    n_layers = len(model.model.layers)
    prefix = PrefixKV({i: cache.layers[i].keys[:, :, :-1] for i in range(layer, n_layers)},
                      {i: cache.layers[i].values[:, :, :-1] for i in range(layer, n_layers)})
    pos = torch.tensor([[T - 1]])
    cos_sin = model.model.rotary_emb(h, pos)
    blocks = model.model.layers[layer:]

    def f(x):
        hh = h + x
        for blk in blocks:  # one query attending to every key: no mask needed
            hh = blk(hh, attention_mask=None, position_embeddings=cos_sin, position_ids=pos, cache=prefix)
        return model.lm_head(model.model.norm(hh[:, -1]))[0]

    return f


def torch_jacfwd_spectrum(make_fn, d: int, chunk: int):
    def run():
        f = make_fn()
        x0 = torch.zeros(d)
        with torch.no_grad():  # jacfwd = vmap(jvp) over the basis; vmap's chunk_size bounds the memory
            cols = torch.func.vmap(lambda t: torch.func.jvp(f, (x0,), (t,))[1], chunk_size=chunk)(torch.eye(d))
            return torch.linalg.svdvals(cols.T).numpy()
    return run


def torch_svds(make_fn, shape, k: int, counter: dict):
    from scipy.sparse.linalg import LinearOperator, svds

    def run():
        f = make_fn()
        x0 = torch.zeros(shape[1])
        _, vjp_fn = torch.func.vjp(f, x0)

        def matvec(v):
            counter["calls"] += 1
            with torch.no_grad():
                return torch.func.jvp(f, (x0,), (torch.as_tensor(np.ravel(v), dtype=torch.float32),))[1].numpy()

        def rmatvec(u):
            counter["calls"] += 1
            return vjp_fn(torch.as_tensor(np.ravel(u), dtype=torch.float32))[0].detach().numpy()

        op = LinearOperator(shape, matvec=matvec, rmatvec=rmatvec, dtype=np.float32)
        return np.sort(svds(op, k=k, return_singular_vectors=False, random_state=0))[::-1]
    return run


# ----------------------------------------------------------------------------- report

def report(title: str, rows: list[tuple[str, float, float]], ours: str, peak: dict[str, float]) -> None:
    """rows: (name, seconds, flops)."""
    base = dict((name, sec) for name, sec, _ in rows)[ours]
    print(f"\n{title}")
    print(f"  {'method':44s} {'median s':>9s} {'GFLOP/s':>8s} {'% of matmul':>11s} {'ratio':>7s}")
    for name, sec, flops in rows:
        rate = flops / sec / 1e9
        lib = "jax" if name.startswith("steerjax") else "torch"
        ratio = "" if name == ours else f"{sec / base:6.1f}x"
        print(f"  {name:44s} {sec:9.2f} {rate:8.1f} {100 * rate / peak[lib]:10.0f}% {ratio:>7s}")


def rel_to_max(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="pin torch and XLA CPU threads (see common.py)")
    p.add_argument("--peer-repeats", type=int, default=None, help="repeats of the torch peers (default --repeats)")
    p.add_argument("--skip-full", action="store_true", help="skip the full-sequence torch peers (the slowest)")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--jacfwd-chunk", type=int, default=128)
    p.add_argument("--parts", default="spectrum,topk,generation")
    p.add_argument("--gen-batch", type=int, default=8)
    p.add_argument("--gen-tokens", type=int, default=32)
    p.add_argument("--gen-dtypes", default="float32,bfloat16", help="weight dtypes for (c), comma-separated")
    args = p.parse_args()
    parts = set(args.parts.split(","))
    args.peer_repeats = args.peer_repeats or args.repeats

    bench = BenchModel(args.model)
    lm, cfg = bench.lm, bench.lm.config
    layer, d, V = cfg.num_layers // 2, cfg.hidden_size, cfg.vocab_size
    ids = bench.prompt_ids(1, args.prompt_len)[0]
    print(f"model {args.model}: d {d}, {cfg.num_layers} layers, vocab {V}; one prompt of {len(ids)} tokens, "
          f"layer {layer}; median of {args.repeats} steerjax calls after a compiling warm-up call, "
          f"{args.peer_repeats} torch calls without; "
          f"torch threads {torch.get_num_threads()}, XLA_FLAGS {os.environ.get('XLA_FLAGS', '').strip() or '-'}")
    peak = matmul_gflops()
    print(f"float32 matmul 2048^3: jax {peak['jax']:.1f} GFLOP/s, torch {peak['torch']:.1f} GFLOP/s")
    hf = bench.hf("eager")

    if "spectrum" in parts:
        t_qr, _ = time_call(lambda: unembedding_reduction(lm), 1, warmup=0)
        print(f"\n(one-off per model) float64 thin QR of W_U ({V} x {d}): {t_qr:.2f} s")

        def ours():
            return sj.jacobian_operator(lm, ids, layer).singular_values()[0]

        flops = spectrum_flops(cfg, len(ids), layer)
        t_ours, s_ours = time_call(ours, args.repeats)
        t_tail, s_tail = time_call(torch_jacfwd_spectrum(lambda: torch_last_tail_fn(hf, ids, layer), d,
                                                         args.jacfwd_chunk), args.peer_repeats, warmup=0)
        rows = [("steerjax singular_values() (d x d SVD)", t_ours, flops["steerjax"]),
                ("torch jacfwd, last-position tail + svdvals", t_tail, flops["torch_jacfwd_tail"])]
        agree = {"torch tail": s_tail}
        if not args.skip_full:
            t_full, s_full = time_call(torch_jacfwd_spectrum(lambda: torch_full_tail_fn(hf, ids, layer), d,
                                                             args.jacfwd_chunk), args.peer_repeats, warmup=0)
            rows.insert(1, ("torch jacfwd, tail over sequence + svdvals", t_full, flops["torch_jacfwd_full"]))
            agree["torch full"] = s_full
        report(f"(a) exact spectrum of J ({V} x {d}), all {d} singular values", rows, rows[0][0], peak)
        t_exact = t_ours
        print("  agreement (max |diff| / sigma_max): " + ", ".join(
            f"vs {name} {rel_to_max(s_ours, values):.1e}" for name, values in agree.items()))
        exact = s_ours
    else:
        exact = sj.jacobian_operator(lm, ids, layer).singular_values()[0]

    if "topk" in parts:
        k = args.k
        per = linear_map_flops(cfg, len(ids), layer)
        per_full = linear_map_flops(cfg, len(ids), layer, full_sequence=True)
        per_reduced = linear_map_flops(cfg, len(ids), layer, unembedding=False) + 2 * d * d
        rows, accuracy = [], {}
        per_dense = spectrum_flops(cfg, len(ids), layer)["steerjax"] + 3 * k * per  # + k JVPs, k VJPs on J
        for method, reduced, label, flops_per in (("auto", True, "top_singular(k), auto", None),
                                                  ("lanczos", True, "block Lanczos on M D (W_U = QR reduction)",
                                                   per_reduced),
                                                  ("lanczos", False, "block Lanczos on J itself", per)):
            info = {}

            def top_run():
                res = sj.jacobian_operator(lm, ids, layer).top_singular(k, reduced=reduced, method=method)
                info.update(products=res.products, converged=res.converged,
                            residual=float(np.max(np.asarray(res.residuals)) / float(res.s[0])))
                return np.asarray(res.s)

            seconds, values = time_call(top_run, args.repeats)
            total_flops = info["products"] * (flops_per or per_reduced)
            if method == "auto" and dense_is_cheaper(d, k):  # the route top_singular took
                label, total_flops = f"{label} -> dense (exact route + k JVPs + k VJPs)", per_dense
            elif method == "auto":
                label = f"{label} -> lanczos"
            rows.append((f"steerjax {label}", seconds, total_flops))
            accuracy[f"steerjax {label.split(' (')[0]}"] = values
            print(f"  steerjax {label}: {info['products']} products, converged {info['converged']}, "
                  f"max residual {info['residual']:.1e} of sigma_max")
        peers = [("last-position tail", torch_last_tail_fn, per)]
        if not args.skip_full:
            peers.append(("tail over sequence", torch_full_tail_fn, per_full))
        for label, make, flops_per in peers:
            counter = {"calls": 0}
            seconds, values = time_call(torch_svds(lambda: make(hf, ids, layer), (V, d), k, counter),
                                        args.peer_repeats, warmup=0)
            calls = counter["calls"] / args.peer_repeats
            rows.append((f"svds, torch jvp/vjp, {label} ({calls:.0f} products)", seconds, calls * flops_per))
            accuracy[f"svds ({label})"] = values
        if "spectrum" in parts:  # the exact route also yields the top k (all d values, in d JVPs)
            rows.insert(3, ("steerjax exact route (all d values), from (a)", t_exact, flops["steerjax"]))
        report(f"(b) top-{k} singular values (matrix-free; FLOPs counted as J v / J^T u products)", rows,
               rows[0][0], peak)
        for other in (1, 2):
            print(f"  ratios against {rows[other][0]} instead: " + ", ".join(
                f"{name.split(' (')[0]} {sec / rows[other][1]:.1f}x" for name, sec, _ in rows
                if name.startswith("svds")))
        if "spectrum" in parts:
            print("  ratios against the steerjax exact route instead: " + ", ".join(
                f"{name.split(' (')[0]} {sec / t_exact:.1f}x" for name, sec, _ in rows if name.startswith("svds")))
        print(f"  accuracy of the top {k} vs the exact spectrum (max |diff| / sigma_max): " + ", ".join(
            f"{name} {rel_to_max(values, exact[:k]):.1e}" for name, values in accuracy.items()))

    if "generation" in parts:
        del hf
        from generation_throughput import run_generation

        run_generation(bench, args.gen_batch, args.gen_tokens, args.repeats, peak, tuple(args.gen_dtypes.split(",")))


if __name__ == "__main__":
    main()
