"""jit-compiled batched sampling with a KV cache and steering at an absolute-position mask.

One `lax.scan` over new tokens (no Python loop per token). Each row has its own PRNG key; rows are
left-padded prompts sharing S = T + max_new_tokens cache slots. The steering delta for slot s is
alpha * v * position_mask[b, s] (see steering.py), applied in the prefill for s < T and in the decode
step that processes slot s, so a cached generation steers exactly the tokens a full forward over the
final sequence with the same mask would. `generate_pure` is a pure function of (params, ids, mask, vector,
alpha, keys, temperature, top_p): jax.vmap it over alphas or vectors.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from steerjax import cpu_kernels, xla
from steerjax.checks import check_positive_int
from steerjax.errors import InputError
from steerjax.model import LanguageModel, as_token_batch
from steerjax.models import causal_lm
from steerjax.models.config import ModelConfig
from steerjax.models.layers import rope_cos_sin, rope_inv_freq
from steerjax.steering import Steer, steer_deltas

log = logging.getLogger("steerjax")
GENERATOR_NAME = "the KV-cache generator (steerjax.generate)"


class GenerationOutput(NamedTuple):
    """tokens (B, T + new): the left-padded prompt then the new tokens (pad after an EOS when
    stop_at_eos); attention_mask (B, T + new); prompt_len T; logits (B, new, V) of each sampled step
    (or None)."""

    tokens: Any
    attention_mask: Any
    prompt_len: int
    logits: Any = None


def categorical_sample(logits, key, temperature):
    """Sample from softmax(logits / temperature) with per-row keys (B, 2)."""
    return jax.vmap(jax.random.categorical)(key, logits / temperature).astype(jnp.int32)


def nucleus_sample(logits, key, temperature, top_p):
    """Sample from softmax(logits / temperature) restricted to the smallest top set of mass >= top_p.
    top_p >= 1 skips the vocabulary sort (the nucleus is then the whole vocabulary)."""
    return jax.lax.cond(top_p < 1.0, _nucleus_sample_sorted, lambda lg, k, t, _: categorical_sample(lg, k, t),
                        logits, key, temperature, top_p)


def _nucleus_sample_sorted(logits, key, temperature, top_p):
    scaled = logits / temperature
    sorted_logits = jnp.sort(scaled, axis=-1)[:, ::-1]
    sorted_probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_before = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs
    kept = jnp.where(mass_before < top_p, sorted_logits, -jnp.inf)
    threshold = jnp.min(jnp.where(jnp.isfinite(kept), kept, jnp.inf), axis=-1, keepdims=True)
    filtered = jnp.where(scaled >= threshold, scaled, -jnp.inf)
    return jax.vmap(jax.random.categorical)(key, filtered).astype(jnp.int32)


def sample_token(logits, key, temperature, top_p):
    """One token per row from logits (B, V): greedy where temperature == 0 (the sort for nucleus
    sampling is then skipped), else nucleus sampling with per-row keys (B, 2)."""
    return jax.lax.cond(temperature > 0, nucleus_sample,
                        lambda logits, *_: jnp.argmax(logits, axis=-1).astype(jnp.int32),
                        logits, key, jnp.maximum(temperature, 1e-6), top_p)


def pack_linear_kernels(tree) -> dict:
    """{"self_attn": {"q_proj": panels, ...}, "mlp": {...}}: every stacked Linear kernel (L, K, N) of a
    block tree that the CPU decode kernel supports, packed to (L, P, K, PANEL) panels."""
    packed = {}
    for name, sub in tree.items():
        if not isinstance(sub, Mapping):
            continue
        if "kernel" in sub:
            if cpu_kernels.supports(sub["kernel"]):
                packed[name] = cpu_kernels.pack_panels(sub["kernel"])
        elif inner := pack_linear_kernels(sub):
            packed[name] = inner
    return packed


def pack_decode_weights(params) -> dict:
    """Panels for the CPU decode kernels: {"blocks": pack_linear_kernels(blocks), "unembed": (1, P, d, PANEL)
    panels of W_U.T, or None when unsupported}."""
    w_u_t = causal_lm.unembedding(params).T[None]  # logits = x @ W_U.T: W_U.T as a one-layer stack
    unembed = cpu_kernels.pack_panels(w_u_t) if cpu_kernels.supports(w_u_t) else None
    return {"blocks": pack_linear_kernels(params["blocks"]), "unembed": unembed}


def layer_matmuls(block_panels: dict, index) -> dict:
    """The `matmuls` tree of DecoderBlock.decode for layer `index` (traced int) over packed panels."""
    return jax.tree.map(lambda panels: functools.partial(cpu_kernels.panel_matmul, panels=panels, layer=index),
                        block_panels)


def decode_rope(config: ModelConfig, position, dtype, local: bool = False):
    """cos, sin (B, 1, h) of the decoded token at RoPE positions (B,): of the global or the local layers."""
    inv_freq = jnp.asarray(rope_inv_freq(config, local), jnp.promote_types(dtype, jnp.float32))
    return rope_cos_sin(inv_freq, position[:, None], dtype)


def decode_layer_inputs(config: ModelConfig, position, slot, key_mask, dtype):
    """The global (cos, sin, mask (B, 1, S)) of one decode step and the local layers' `LocalInputs` (None
    without local layers): a sliding-window layer sees the keys of slots slot - window + 1 .. slot only (a
    row's real tokens occupy consecutive slots, so slot distance is position distance, as in the prefill's
    `sliding_window_mask`)."""
    cos, sin = decode_rope(config, position, dtype)
    mask = key_mask[:, None, :]
    if not config.has_local_layers:
        return cos, sin, mask, None
    in_window = jnp.arange(key_mask.shape[-1]) > slot - config.sliding_window
    local_cos, local_sin = decode_rope(config, position, dtype, local=True)
    return cos, sin, mask, causal_lm.LocalInputs(local_cos, local_sin, mask & in_window[None, None, :])


def decode_step(config: ModelConfig, params, token, slot, position, cache_k, cache_v, key_mask, steer_layer, delta,
                panels=None):
    """Run token (B,) at cache slot `slot` with RoPE position (B,); caches (L, B, S, K, h); key_mask (B, S);
    delta (B, d) steers h_steer_layer; panels: optional `pack_decode_weights(params)`, whose products then
    run in the CPU decode kernel. Returns logits (B, V) and the updated caches."""
    dtype = causal_lm.param_dtype(params)
    inputs = decode_layer_inputs(config, position, slot, key_mask, dtype)
    h = causal_lm.embed_tokens(config, params, token[:, None])
    delta = delta[:, None, :].astype(dtype)

    def layer(h, xs):
        block_params, ck, cv, index, is_local = xs
        h = h + causal_lm.steer_at(index, steer_layer, delta)
        matmuls = None if panels is None else layer_matmuls(panels["blocks"], index)
        h, (ck, cv) = causal_lm.merged_block(config, block_params).decode(
            h, *causal_lm.layer_inputs(is_local, *inputs), ck, cv, slot, matmuls)
        return h, (ck, cv)

    h, (cache_k, cache_v) = jax.lax.scan(layer, h, (params["blocks"], cache_k, cache_v,
                                                    jnp.arange(config.num_layers), jnp.asarray(config.local_layers)))
    h = h + causal_lm.steer_at(config.num_layers, steer_layer, delta)
    unembed = None if panels is None or panels["unembed"] is None else functools.partial(
        cpu_kernels.panel_matmul, panels=panels["unembed"], layer=0)
    return causal_lm.logits_from_final_hidden(config, params, h[:, 0], unembed), cache_k, cache_v


def generate_pure(config: ModelConfig, params, ids, attention_mask, steer_layer, vector, alpha, keys,
                  temperature, top_p, panels=None, *, max_new_tokens: int, mode: str, eos_ids: tuple[int, ...] = (),
                  pad_id: int = 0, return_logits: bool = False):
    """Pure batched generation. ids, attention_mask (B, T); vector (d,); alpha, temperature, top_p scalars;
    steer_layer int (-1: none); keys (B, 2) PRNG keys; panels: optional `pack_decode_weights(params)`, which
    runs the decode steps' weight products in the CPU kernels (steerjax.cpu_kernels; the caller checks they
    are available). Returns (tokens (B, T+N), mask (B, T+N), logits)."""
    B, T = ids.shape
    S = T + max_new_tokens
    full_mask = jnp.concatenate([attention_mask, jnp.ones((B, max_new_tokens), attention_mask.dtype)], axis=1)
    deltas = steer_deltas(mode, T, full_mask, vector, alpha)  # (B, S, d)

    hidden, keys_cache, values_cache, *_ = causal_lm.forward_with_cache(config, params, ids, attention_mask,
                                                                        steer_layer, deltas[:, :T])
    last_logits = causal_lm.logits_from_final_hidden(config, params, hidden[-1][:, -1])
    pad = [(0, 0), (0, 0), (0, max_new_tokens), (0, 0), (0, 0)]
    cache_k, cache_v = jnp.pad(keys_cache, pad), jnp.pad(values_cache, pad)
    n_real = jnp.sum(attention_mask, axis=-1).astype(jnp.int32)
    eos = jnp.asarray(eos_ids if eos_ids else (-1,), jnp.int32)

    def step(carry, i):
        logits, cache_k, cache_v, finished = carry
        token = sample_token(logits, jax.vmap(jax.random.fold_in, (0, None))(keys, i), temperature, top_p)
        token = jnp.where(finished, pad_id, token)
        finished = finished | jnp.isin(token, eos)
        slot = T + i
        key_mask = full_mask.astype(bool) & (jnp.arange(S)[None, :] <= slot)
        next_logits, cache_k, cache_v = decode_step(config, params, token, slot, n_real + i, cache_k, cache_v,
                                                    key_mask, steer_layer, deltas[:, slot], panels)
        return (next_logits, cache_k, cache_v, finished), (token, logits if return_logits else None)

    init = (last_logits, cache_k, cache_v, jnp.zeros(B, bool))
    _, (new_tokens, step_logits) = jax.lax.scan(step, init, jnp.arange(max_new_tokens))
    tokens = jnp.concatenate([ids, new_tokens.T], axis=1)
    return tokens, full_mask, (jnp.moveaxis(step_logits, 0, 1) if return_logits else None)


@functools.lru_cache(maxsize=None)
def jitted_generate(config: ModelConfig, max_new_tokens: int, mode: str, eos_ids: tuple[int, ...], pad_id: int,
                    return_logits: bool):
    return xla.jit(functools.partial(generate_pure, config, max_new_tokens=max_new_tokens, mode=mode,
                                     eos_ids=eos_ids, pad_id=pad_id, return_logits=return_logits))


DECODE_PANELS = "decode_panels"


def decode_panel_sources(lm: LanguageModel) -> list:
    """The arrays the packed copy is derived from: every leaf of lm.params (new weights, new panels)."""
    return jax.tree.leaves(lm.params)


def has_decode_panels(lm: LanguageModel) -> bool:
    return lm.cache.holds(DECODE_PANELS, decode_panel_sources(lm))


def drop_decode_panels(lm: LanguageModel) -> None:
    """Free the packed copy held in lm.cache (the next kernel `generate` packs again)."""
    lm.cache.drop(DECODE_PANELS)


def decode_panels(lm: LanguageModel) -> dict:
    """lm's weights packed for the CPU decode kernels (`pack_decode_weights`), computed once per set of
    weights and kept in lm.cache: one more copy of the linear and unembedding weights while lm.params stays
    the same, so that no `generate` call repacks them (a jitted repack of SmolLM2 took 0.5 s, a third of
    an 8 x 32 call). A model with other weights (`lm.replace(params=...)`) packs its own; the size of a new
    copy is logged once per model (logger "steerjax", level INFO)."""
    def pack():
        panels = jax.block_until_ready(xla.jit(pack_decode_weights)(lm.params))
        size = sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(panels))
        log.info("steerjax: packed %s's weights for the CPU decode kernels: %.1f MB (kept with the model)",
                 lm.source, size / 1e6)
        return panels

    return lm.cache.get(DECODE_PANELS, decode_panel_sources(lm), pack)


PANEL_MEMORY_FRACTION = 0.25  # largest share of physical memory the packed copy may take by default


def panel_bytes(params) -> int:
    """Bytes of the packed copy `pack_decode_weights` makes (the Linear kernels and W_U it supports)."""
    shapes = jax.eval_shape(pack_decode_weights, params)
    return sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(shapes))


def physical_memory_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def decode_kernels_apply(lm: LanguageModel) -> bool:
    """Whether `generate` runs lm's decode products in the CPU kernels by default: unsharded float32 /
    bfloat16 weights on the CPU backend, their packed copy within PANEL_MEMORY_FRACTION of physical memory,
    and the kernels built (steerjax.cpu_kernels.available())."""
    if not decode_kernels_possible(lm):
        return False
    memory = physical_memory_bytes()
    fits = has_decode_panels(lm) or memory is None or panel_bytes(lm.params) <= PANEL_MEMORY_FRACTION * memory
    return fits and cpu_kernels.available()


def decode_kernels_possible(lm: LanguageModel) -> bool:
    """Unsharded float32 / bfloat16 weights on the CPU backend (what the kernels can run, memory aside)."""
    on_cpu = all(device.platform == "cpu" for device in lm.params["embed"].devices())
    return lm.mesh is None and on_cpu and lm.dtype.name in cpu_kernels.TARGETS


DECODE_KERNELS_ENV = "STEERJAX_DECODE_KERNELS"
DECODE_PATHS = ("cpu_kernel", "xla_dot")


def decode_kernels_setting() -> bool | None:
    """The decode-path switch in the environment: STEERJAX_DECODE_KERNELS=0 -> False (XLA's dot, the kernels
    are never built), 1 -> True (the CPU kernels; an error where they cannot run), unset or "auto" -> None
    (`decode_kernels_apply`)."""
    raw = os.environ.get(DECODE_KERNELS_ENV, "auto").strip().lower()
    if raw in ("", "auto"):
        return None
    if raw not in ("0", "1"):
        raise InputError(f"{DECODE_KERNELS_ENV}={raw!r} is not a setting; use 0 (XLA's dot), 1 (CPU kernels) or auto")
    return raw == "1"


def decode_path(lm: LanguageModel, decode_kernels: bool | None = None) -> str:
    """"cpu_kernel" or "xla_dot": the path `generate(lm, decode_kernels=...)` runs its decode products on.
    The argument wins over STEERJAX_DECODE_KERNELS, which wins over the automatic choice."""
    choice = decode_kernels_setting() if decode_kernels is None else bool(decode_kernels)
    if choice is None:
        return DECODE_PATHS[0] if decode_kernels_apply(lm) else DECODE_PATHS[1]
    possible = bool(choice) and decode_kernels_possible(lm)
    if choice and not (possible and cpu_kernels.available()):
        platforms = ", ".join(sorted({device.platform for device in lm.params["embed"].devices()}))
        kernels = (cpu_kernels.unavailable_reason() or "built") if possible else "not built"  # never built off CPU
        raise InputError("the CPU decode kernels (decode_kernels=True or STEERJAX_DECODE_KERNELS=1) need an unsharded "
                         f"float32 / bfloat16 model on the CPU backend and built kernels (model: {lm.dtype.name} on "
                         f"{platforms}, sharded: {lm.mesh is not None}, kernels: {kernels})")
    return DECODE_PATHS[0] if choice else DECODE_PATHS[1]


class DecodeRecord:
    """Calls of `generate` per decode path in this process (`DECODE_RECORD`). `since_now()` gives the view a run
    records in its metadata: what ran from then on, read when the result file is written."""

    def __init__(self):
        self.calls = dict.fromkeys(DECODE_PATHS, 0)

    def add(self, path: str) -> None:
        self.calls[path] += 1

    def since_now(self) -> "DecodeWindow":
        return DecodeWindow(self, dict(self.calls))


class DecodeWindow(NamedTuple):
    """The decode paths a run took since `start`: `to_json()` is read when a result file is written (see
    `steerjax.io.to_jsonable`), with the STEERJAX_DECODE_KERNELS setting and whether the CPU kernels compiled."""

    record: DecodeRecord
    start: dict

    def to_json(self) -> dict:
        calls = {path: self.record.calls[path] - self.start[path] for path in DECODE_PATHS}
        return {"paths_run": [p for p in DECODE_PATHS if calls[p]] or None, "generate_calls": calls,
                "setting": os.environ.get(DECODE_KERNELS_ENV, "auto"), "cpu_kernels": cpu_kernels.build_status()}


DECODE_RECORD = DecodeRecord()


def row_keys(seed: int, batch: int):
    """Independent PRNG keys (B, 2), one per row."""
    return jax.random.split(jax.random.PRNGKey(seed), batch)


def _check_sampling(max_new_tokens, temperature, top_p):
    check_positive_int(max_new_tokens, "max_new_tokens")
    if not np.isfinite(temperature) or temperature < 0:
        raise InputError(f"temperature must be finite and >= 0 (0 = greedy), got {temperature}")
    if not 0 < top_p <= 1:
        raise InputError(f"top_p must be in (0, 1], got {top_p}")


def eos_tuple(config: ModelConfig) -> tuple[int, ...]:
    eos = config.eos_token_id
    return () if eos is None else (tuple(eos) if isinstance(eos, tuple) else (int(eos),))


def generate(lm: LanguageModel, ids, steer: Steer | None = None, max_new_tokens: int = 40,
             temperature: float = 0.0, top_p: float = 1.0, seed: int = 0, attention_mask=None,
             stop_at_eos: bool = True, return_logits: bool = False,
             decode_kernels: bool | None = None) -> GenerationOutput:
    """Generate max_new_tokens per row (temperature 0 = greedy) with optional steering.
    ids: TokenBatch, (T,), (B, T) or ragged lists (left-padded).
    decode_kernels: run decode steps' weight products in steerjax's CPU kernels over a packed copy of the
    weights kept in lm.cache (None: STEERJAX_DECODE_KERNELS=0/1 if set, else wherever `decode_kernels_apply(lm)`;
    True: also past the memory share; False: XLA's dot everywhere). `DECODE_RECORD` counts the path taken."""
    _check_sampling(max_new_tokens, temperature, top_p)
    batch = as_token_batch(ids, attention_mask)
    lm.check_ids(batch)
    B, T = batch.ids.shape
    if T + max_new_tokens > lm.config.max_position_embeddings:
        raise InputError(f"prompt ({T}) + max_new_tokens ({max_new_tokens}) exceeds the model's context of "
                         f"{lm.config.max_position_embeddings}")
    if steer is None:
        layer, vector, alpha, mode = -1, np.zeros(lm.d), 0.0, "last"
    else:
        steer.check_for(lm.config)
        layer, vector, alpha, mode = steer.layer, steer.vector, steer.alpha, steer.positions
    path = decode_path(lm, decode_kernels)
    fn = jitted_generate(lm.config, int(max_new_tokens), mode, eos_tuple(lm.config) if stop_at_eos else (),
                         lm.pad_id, bool(return_logits))
    panels = decode_panels(lm) if path == "cpu_kernel" else None
    DECODE_RECORD.add(path)
    tokens, mask, logits = fn(lm.params, lm.to_device(batch.ids), lm.to_device(batch.attention_mask), jnp.int32(layer),
                              jnp.asarray(vector, lm.dtype), jnp.asarray(alpha, lm.dtype),
                              lm.to_device(row_keys(seed, B)), jnp.float32(temperature), jnp.float32(top_p), panels)
    return GenerationOutput(np.asarray(tokens), np.asarray(mask), T, logits)


def generated_token_ids(lm: LanguageModel, out: GenerationOutput) -> list[list[int]]:
    """Each row's generated token ids (never the prompt), cut at the first EOS."""
    eos = set(eos_tuple(lm.config))
    rows = []
    for row in np.asarray(out.tokens)[:, out.prompt_len:]:
        kept = []
        for t in row:
            if int(t) in eos:
                break
            kept.append(int(t))
        rows.append(kept)
    return rows


def generated_texts(lm: LanguageModel, out: GenerationOutput) -> list[str]:
    """Decoded continuations only (never the prompt), cut at the first EOS."""
    return [lm.tokenizer.decode(ids, skip_special_tokens=True) for ids in generated_token_ids(lm, out)]
