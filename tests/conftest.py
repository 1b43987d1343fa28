"""Shared fixtures: tiny random Llama / Qwen2 checkpoints written with transformers' save_pretrained,
and the embedded SmolLM2 model. Weights are re-drawn at a larger scale than HF's 0.02 init so every
block is strongly nonlinear (a near-identity network would hide bugs)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import gc

import jax
import numpy as np
import pytest

# XLA:CPU maps each compiled executable's code into its own memory regions. One pytest process compiles
# thousands of programs, and near the end of a full run the process held ~60k mappings: at the kernel's
# vm.max_map_count (65530 by default) mmap fails inside the compiler, which segfaulted. After any test module that
# leaves more than MAP_LIMIT mappings, JAX's compilation caches are dropped (later modules recompile what they use).
MAP_LIMIT = 25_000


def memory_mappings() -> int:
    try:
        with open("/proc/self/maps") as f:
            return sum(1 for _ in f)
    except OSError:                                  # not Linux: no such limit to watch
        return 0


@pytest.fixture(autouse=True, scope="module")
def bounded_compiled_code():
    yield
    if memory_mappings() > MAP_LIMIT:
        jax.clear_caches()
        gc.collect()


TINY_VOCAB = 160
TINY_CONFIGS = {
    # Qwen2: q/k/v bias, tied embeddings, GQA ratio 1
    "qwen2_tied_gqa1": dict(model_type="qwen2", num_attention_heads=4, num_key_value_heads=4,
                            tie_word_embeddings=True),
    # Llama: Llama-3 rope scaling (short original context so scaling bites), untied, GQA ratio 2
    "llama3_untied_gqa2": dict(model_type="llama", num_attention_heads=4, num_key_value_heads=2,
                               tie_word_embeddings=False,
                               rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
                                                "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                "original_max_position_embeddings": 8}),
    # Qwen2 GQA ratio 4, untied
    "qwen2_untied_gqa4": dict(model_type="qwen2", num_attention_heads=8, num_key_value_heads=2,
                              tie_word_embeddings=False),
    # Llama tied, GQA 1, attention and MLP biases
    "llama_tied_bias_gqa1": dict(model_type="llama", num_attention_heads=4, num_key_value_heads=4,
                                 tie_word_embeddings=True, attention_bias=True, mlp_bias=True),
}


def build_hf_model(name: str, seed: int = 0, num_layers: int = 3, **overrides):
    """A tiny transformers causal LM (eager attention, float32) with random, O(1)-scale weights;
    `overrides` replace entries of TINY_CONFIGS[name]."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    spec = {**TINY_CONFIGS[name], **overrides}
    model_type = spec.pop("model_type")
    config_cls, model_cls = {"llama": (LlamaConfig, LlamaForCausalLM),
                             "qwen2": (Qwen2Config, Qwen2ForCausalLM)}[model_type]
    config = config_cls(vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=96,
                        num_hidden_layers=num_layers, rms_norm_eps=1e-6, max_position_embeddings=64,
                        attn_implementation="eager", pad_token_id=0, **spec)
    torch.manual_seed(seed)
    return randomize_weights(model_cls(config).eval())


def randomize_weights(model, norm_weight=lambda p: 1.0 + 0.2 * p):
    """`model` with O(1)-scale random weights drawn in parameter order from torch's current seed: norm weights
    norm_weight(N(0, 1)), biases 0.2 N(0, 1), matrices N(0, 1.5^2 / fan_in)."""
    import torch

    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "norm" in pname:
                p.copy_(norm_weight(torch.randn_like(p)))
            elif pname.endswith("bias"):
                p.copy_(0.2 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) / np.sqrt(p.shape[-1]) * 1.5)
    return model


def save_checkpoints(tmp_path_factory, names, build) -> dict:
    """name -> (folder, torch model): build(name) saved with save_pretrained into a fresh temp folder each."""
    out = {}
    for name in names:
        model = build(name)
        folder = tmp_path_factory.mktemp(name)
        model.save_pretrained(folder)
        out[name] = (folder, model)
    return out


def save_without_eos(tmp_path_factory, hf_model, name: str):
    """(folder, hf_model) with the model's EOS token removed, so greedy runs last max_new_tokens on both sides."""
    hf_model.config.eos_token_id = None
    hf_model.generation_config.eos_token_id = None
    folder = tmp_path_factory.mktemp(name)
    hf_model.save_pretrained(folder)
    return folder, hf_model


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory):
    """name -> (folder, torch model) for every tiny config."""
    return save_checkpoints(tmp_path_factory, TINY_CONFIGS, build_hf_model)


@pytest.fixture(scope="session")
def smollm2():
    import steerjax as sj

    return sj.load_model(None)


@pytest.fixture(scope="session")
def smollm2_hf():
    """transformers' own GGUF load of the embedded model (dequantized float32, eager attention)."""
    import torch
    from transformers import AutoModelForCausalLM

    from steerjax.models.loading import default_model_path

    path = default_model_path()
    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                attn_implementation="eager", dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def tiny_llama_with_smollm2_tokenizer(tmp_path_factory):
    """A 3-block random Llama (d = 32) with the embedded SmolLM2's tokenizer and vocabulary size, so the
    scripts' prompts tokenize (up to 128 tokens) and a script runs on it in seconds."""
    from transformers import LlamaConfig, LlamaForCausalLM
    import torch

    from steerjax.models.loading import default_model_path, gguf_tokenizer

    tokenizer = gguf_tokenizer(default_model_path())
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
                         attn_implementation="eager", pad_token_id=0, tie_word_embeddings=True)
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny_with_tokenizer")
    randomize_weights(LlamaForCausalLM(config).eval()).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def load_experiment(name: str):
    """Import experiments/<name>.py as a module (the scripts are not a package)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "experiments" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"{name}_cli", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def rel_err(a, b) -> float:
    """max |a - b| / max |b| (the tolerance measure used throughout the tests)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def random_ids(rng, batch: int, length: int, vocab: int = TINY_VOCAB):
    return rng.integers(1, vocab, size=(batch, length)).astype(np.int32)


# ----------------------------------------------------------------------------- small exact models (fisher, fits)

@pytest.fixture
def x64():
    with jax.enable_x64(True):
        yield


def low_rank(rng, rows: int, d: int, rank: int, spread: float = 10.0) -> np.ndarray:
    """rows x d matrix of exact rank `rank`, singular values spread over `spread`."""
    u, _ = np.linalg.qr(rng.normal(size=(rows, rank)))
    w, _ = np.linalg.qr(rng.normal(size=(d, rank)))
    return (u * np.geomspace(spread, 1.0, rank)) @ w.T


def null_of(J: np.ndarray) -> np.ndarray:
    """Orthonormal basis (d, k) of ker(J) by SVD (an independent route from fisher.spectral_split)."""
    _, s, vt = np.linalg.svd(J)
    rank = int(np.sum(s > 1e-10 * s[0]))
    return vt[rank:].T


def gaussian_setup(seed: int = 2, n: int = 20000):
    rng = np.random.default_rng(seed)
    V, d, rank, sigma = 12, 8, 5, 0.3
    J = low_rank(rng, V, d, rank)
    v_true = rng.normal(size=d)
    obs = J @ v_true + sigma * rng.normal(size=(n, V))
    return rng, J, v_true, obs, sigma
