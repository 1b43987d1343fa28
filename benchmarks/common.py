"""Shared benchmark helpers: the benchmark models (steerjax + transformers twins), timing, matmul
throughput of the machine, and analytic FLOP counts used to report achieved GFLOP/s.

Models (`--model`):
  smollm2         the embedded SmolLM2-135M-Instruct GGUF (d 576, 30 layers, vocab 49152); HF loads the same
                  GGUF (dequantized float32)
  qwen05b-random  Qwen2.5-0.5B shape (d 896, 24 layers, 14 heads, 2 kv heads, intermediate 4864,
                  vocab 151936, tied), random HF-init weights written with save_pretrained to a temp folder
  any other value a local HF folder

--threads N (both scripts) pins torch to N threads and, for N = 1, XLA's CPU matmuls to one thread. On a
machine shared with other jobs, torch's OpenMP threads spin-wait and lose badly when the cores are
oversubscribed (HF generate measured 15x slower with 2 threads than with 1 on the loaded 2-core box), so
the published CPU numbers use --threads 1 for both libraries.
"""

from __future__ import annotations

import atexit
import functools
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TQDM_DISABLE", "1")  # transformers' weight-loading progress bars


def threads_from_argv(argv) -> int | None:
    """--threads N from the command line; must act before jax and torch start their thread pools."""
    return int(argv[argv.index("--threads") + 1]) if "--threads" in argv else None


THREADS = threads_from_argv(sys.argv)
if THREADS == 1:  # single-threaded Eigen in XLA (torch is pinned below)
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false"

import jax
import jax.numpy as jnp
import numpy as np
import torch

from steerjax import cpu_kernels

import steerjax as sj
from steerjax.models.loading import default_model_path

if THREADS is not None:
    torch.set_num_threads(THREADS)

QWEN05B_SHAPE = dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                     intermediate_size=4864, vocab_size=151936, tie_word_embeddings=True,
                     max_position_embeddings=32768, rms_norm_eps=1e-6, rope_theta=1000000.0)


def qwen05b_random_folder(seed: int = 0) -> Path:
    """A Qwen2.5-0.5B-shaped checkpoint with random weights in a temp folder (removed at exit)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    folder = Path(tempfile.mkdtemp(prefix="qwen05b_random_"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    torch.manual_seed(seed)
    Qwen2ForCausalLM(Qwen2Config(**QWEN05B_SHAPE)).save_pretrained(folder)
    return folder


class BenchModel:
    """A steerjax LanguageModel and a factory for its transformers twin (chosen attention and dtype)."""

    def __init__(self, name: str):
        self.name = name
        self.folder = None if name == "smollm2" else qwen05b_random_folder() if name == "qwen05b-random" \
            else Path(name)
        self.lm = sj.load_model(self.folder)
        self._models: dict[str, sj.LanguageModel] = {}

    def model(self, dtype: str = "float32") -> sj.LanguageModel:
        """The steerjax model with weights in dtype (float32: the one loaded at start; others cached)."""
        if dtype == "float32":
            return self.lm
        if dtype not in self._models:
            self._models[dtype] = sj.load_model(self.folder, dtype=dtype)
        return self._models[dtype]

    def hf(self, attn: str = "eager", dtype: str = "float32"):
        from transformers import AutoModelForCausalLM

        torch_dtype = getattr(torch, dtype)
        if self.folder is None:
            path = default_model_path()
            return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                        attn_implementation=attn, dtype=torch_dtype).eval()
        return AutoModelForCausalLM.from_pretrained(str(self.folder), attn_implementation=attn,
                                                    dtype=torch_dtype).eval()

    def prompt_ids(self, batch: int, length: int, seed: int = 0) -> np.ndarray:
        """(batch, length) token ids without padding: a tokenized text for models with a tokenizer,
        random ids otherwise."""
        if self.lm.tokenizer_loader is not None:
            text = ("The history of the city begins with a small harbour where fishermen traded salt, "
                    "wool and timber with merchants who sailed along the coast every spring. ") * 8
            ids = np.asarray(self.lm.tokenizer(text)["input_ids"][:length], np.int32)
            return np.stack([np.roll(ids, -i) for i in range(batch)])
        return np.random.default_rng(seed).integers(100, self.lm.config.vocab_size, (batch, length)).astype(np.int32)


def block(x):
    """Wait for jax or torch results."""
    return jax.block_until_ready(x) if not isinstance(x, torch.Tensor) else x


def time_call(fn, repeats: int, warmup: int = 1) -> tuple[float, object]:
    """Median wall time of fn() over `repeats` calls after `warmup` calls; returns (median, last result)."""
    out = None
    for _ in range(warmup):
        out = block(fn())
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = block(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def matmul_gflops(n: int = 2048, repeats: int = 5) -> dict[str, float]:
    """float32 n x n matmul throughput (GFLOP/s) of jax (HIGHEST precision) and torch on this machine."""
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(n, n)).astype(np.float32), rng.normal(size=(n, n)).astype(np.float32)
    ja, jb = jnp.asarray(a), jnp.asarray(b)
    mm = jax.jit(lambda x, y: jnp.matmul(x, y, precision=jax.lax.Precision.HIGHEST))
    ta, tb = torch.as_tensor(a), torch.as_tensor(b)
    flops = 2 * n ** 3
    t_jax, _ = time_call(lambda: mm(ja, jb), repeats)
    t_torch, _ = time_call(lambda: ta @ tb, repeats)
    return {"jax": flops / t_jax / 1e9, "torch": flops / t_torch / 1e9}


def weight_stream_gbs(config, batch: int, layers: int = 8, repeats: int = 10) -> dict[str, float]:
    """GB/s of float32 weights consumed by batch-row products (B x d against the MLP's gate, up and down
    weights of `layers` layers): the rate a decode step's matmuls run at on this machine, for jax (a scan
    over stacked weights, as in sj.generate) and torch (a Python loop, as in HF)."""
    d, f = config.hidden_size, config.intermediate_size
    rng = np.random.default_rng(0)
    up = (rng.normal(size=(layers, 2, f, d)) / np.sqrt(d)).astype(np.float32)
    down = (rng.normal(size=(layers, d, f)) / np.sqrt(f)).astype(np.float32)
    h = rng.normal(size=(batch, d)).astype(np.float32)
    nbytes = up.nbytes + down.nbytes

    def jax_layer(x, w):
        gate_up, dn = w
        return jnp.tanh(x @ gate_up[0].T) * (x @ gate_up[1].T) @ dn.T, None

    scan = jax.jit(lambda ws, x: jax.lax.scan(jax_layer, x, ws)[0])
    j_ws, j_h = (jnp.asarray(up), jnp.asarray(down)), jnp.asarray(h)
    t_up, t_down, t_h = torch.as_tensor(up), torch.as_tensor(down), torch.as_tensor(h)

    def torch_loop():
        x = t_h
        for i in range(layers):
            x = (torch.tanh(x @ t_up[i, 0].T) * (x @ t_up[i, 1].T)) @ t_down[i].T
        return x

    t_jax, _ = time_call(lambda: scan(j_ws, j_h), repeats)
    t_torch, _ = time_call(torch_loop, repeats)
    rates = {"jax": nbytes / t_jax / 1e9, "torch": nbytes / t_torch / 1e9}
    if cpu_kernels.available():  # the same loop over panel-packed weights in steerjax's CPU decode kernel
        panels = tuple(cpu_kernels.pack_panels(jnp.asarray(w)) for w in (up[:, 0].transpose(0, 2, 1),
                                                                          up[:, 1].transpose(0, 2, 1),
                                                                          down.transpose(0, 2, 1)))

        def kernel_layer(x, layer):
            gate, up_, dn = (functools.partial(cpu_kernels.panel_matmul, panels=p, layer=layer) for p in panels)
            return dn(jnp.tanh(gate(x)) * up_(x)), None

        kernel_scan = jax.jit(lambda x: jax.lax.scan(kernel_layer, x, jnp.arange(layers))[0])
        t_kernel, _ = time_call(lambda: kernel_scan(j_h), repeats)
        rates["steerjax kernel"] = nbytes / t_kernel / 1e9
    return rates


def memory_read_gbs(n_bytes: int = 400_000_000, repeats: int = 5) -> float:
    """GB/s of one jitted float32 sum over n_bytes (all cores): the memory read rate weights can stream at."""
    x = jnp.ones((n_bytes // 4,), jnp.float32)
    total = jax.jit(jnp.sum)
    seconds, _ = time_call(lambda: total(x), repeats)
    return n_bytes / seconds / 1e9


# ----------------------------------------------------------------------------- analytic FLOP counts
# Matmul FLOPs only (2 per multiply-add); elementwise work, norms and softmax are not counted. A forward-mode
# tangent or a reverse-mode cotangent through a linear map costs the same matmul FLOPs as the primal.

def layer_matmul_params(config) -> int:
    d, h = config.hidden_size, config.head_dim
    return d * config.num_heads * h * 2 + 2 * d * config.num_kv_heads * h + 3 * d * config.intermediate_size


def token_layer_flops(config, context: int) -> float:
    """One token through one block attending to `context` keys."""
    return 2 * layer_matmul_params(config) + 4 * context * config.num_heads * config.head_dim


def sequence_flops(config, length: int, layers: int) -> float:
    """A causal pass of `length` tokens through `layers` blocks (token t attends to t + 1 keys)."""
    return layers * sum(token_layer_flops(config, t + 1) for t in range(length))


def svd_values_flops(m: int, n: int) -> float:
    """Golub-Kahan bidiagonalisation of an m x n matrix (m >= n), singular values only."""
    return 4 * m * n * n - 4 * n ** 3 / 3


def spectrum_flops(config, length: int, layer: int) -> dict[str, float]:
    """FLOPs of an exact per-prompt spectrum of J (V x d) at `layer` for a prompt of `length` tokens."""
    d, V, L = config.hidden_size, config.vocab_size, config.num_layers
    tail = L - layer
    prefix = sequence_flops(config, length, L)  # the unsteered pass (context / h_l)
    tail_token = tail * token_layer_flops(config, length)
    unembed_tangents = d * 2 * d * V
    return {
        # d + 1 (primal + d tangents) through the one-token tail, R @ D, SVD of d x d
        "steerjax": prefix + (d + 1) * tail_token + 2 * d ** 3 + svd_values_flops(d, d),
        # d + 1 passes of the tail over the whole sequence, d tangents through W_U, SVD of V x d
        "torch_jacfwd_full": sequence_flops(config, length, layer) + (d + 1) * sequence_flops(config, length, tail)
        + unembed_tangents + svd_values_flops(V, d),
        "torch_jacfwd_tail": prefix + (d + 1) * tail_token + unembed_tangents + svd_values_flops(V, d),
    }


def linear_map_flops(config, length: int, layer: int, full_sequence: bool = False, unembedding: bool = True) -> float:
    """FLOPs of one product J v or J^T u: the tail blocks for the last token (or over the whole sequence)
    and (unembedding=True) W_U."""
    tail = config.num_layers - layer
    blocks = sequence_flops(config, length, tail) if full_sequence else tail * token_layer_flops(config, length)
    return blocks + (2 * config.hidden_size * config.vocab_size if unembedding else 0)


def generation_flops(config, batch: int, prompt_len: int, new_tokens: int) -> float:
    """Prefill plus new_tokens decode steps for a batch, including the logits of every step."""
    L, d, V = config.num_layers, config.hidden_size, config.vocab_size
    prefill = sequence_flops(config, prompt_len, L) + 2 * d * V
    decode = sum(L * token_layer_flops(config, prompt_len + i + 1) + 2 * d * V for i in range(new_tokens))
    return batch * (prefill + decode)
