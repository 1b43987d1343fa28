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
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from steerjax import xla
from steerjax.errors import InputError
from steerjax.model import LanguageModel, as_token_batch
from steerjax.models import causal_lm
from steerjax.models.config import ModelConfig
from steerjax.models.layers import rope_cos_sin, rope_inv_freq
from steerjax.steering import Steer, position_mask


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


def decode_step(config: ModelConfig, params, token, slot, position, cache_k, cache_v, key_mask, steer_layer, delta):
    """Run token (B,) at cache slot `slot` with RoPE position (B,); caches (L, B, S, K, h); key_mask (B, S);
    delta (B, d) steers h_steer_layer. Returns logits (B, V) and the updated caches."""
    dtype = causal_lm.param_dtype(params)
    inv_freq = jnp.asarray(rope_inv_freq(config), jnp.promote_types(dtype, jnp.float32))
    cos, sin = rope_cos_sin(inv_freq, position[:, None], dtype)
    h = params["embed"][token][:, None, :]
    delta = delta[:, None, :].astype(dtype)
    mask = key_mask[:, None, :]

    def layer(h, xs):
        block_params, ck, cv, index = xs
        h = h + causal_lm.steer_at(index, steer_layer, delta)
        h, (ck, cv) = causal_lm.merged_block(config, block_params).decode(h, cos, sin, mask, ck, cv, slot)
        return h, (ck, cv)

    h, (cache_k, cache_v) = jax.lax.scan(layer, h, (params["blocks"], cache_k, cache_v,
                                                    jnp.arange(config.num_layers)))
    h = h + causal_lm.steer_at(config.num_layers, steer_layer, delta)
    return causal_lm.logits_from_final_hidden(config, params, h[:, 0]), cache_k, cache_v


def generate_pure(config: ModelConfig, params, ids, attention_mask, steer_layer, vector, alpha, keys,
                  temperature, top_p, *, max_new_tokens: int, mode: str, eos_ids: tuple[int, ...] = (),
                  pad_id: int = 0, return_logits: bool = False):
    """Pure batched generation. ids, attention_mask (B, T); vector (d,); alpha, temperature, top_p scalars;
    steer_layer int (-1: none); keys (B, 2) PRNG keys. Returns (tokens (B, T+N), mask (B, T+N), logits)."""
    B, T = ids.shape
    S = T + max_new_tokens
    full_mask = jnp.concatenate([attention_mask, jnp.ones((B, max_new_tokens), attention_mask.dtype)], axis=1)
    steer_mask = position_mask(mode, T, full_mask)  # (B, S)
    deltas = alpha * steer_mask[..., None] * vector[None, None, :]  # (B, S, d)

    hidden, keys_cache, values_cache, _, _ = causal_lm.forward_with_cache(config, params, ids, attention_mask,
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
                                                    key_mask, steer_layer, deltas[:, slot])
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


def row_keys(seed: int, batch: int):
    """Independent PRNG keys (B, 2), one per row."""
    return jax.random.split(jax.random.PRNGKey(seed), batch)


def _check_sampling(max_new_tokens, temperature, top_p):
    if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
        raise InputError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    if not np.isfinite(temperature) or temperature < 0:
        raise InputError(f"temperature must be finite and >= 0 (0 = greedy), got {temperature}")
    if not 0 < top_p <= 1:
        raise InputError(f"top_p must be in (0, 1], got {top_p}")


def eos_tuple(config: ModelConfig) -> tuple[int, ...]:
    eos = config.eos_token_id
    return () if eos is None else (tuple(eos) if isinstance(eos, tuple) else (int(eos),))


def generate(lm: LanguageModel, ids, steer: Steer | None = None, max_new_tokens: int = 40,
             temperature: float = 0.0, top_p: float = 1.0, seed: int = 0, attention_mask=None,
             stop_at_eos: bool = True, return_logits: bool = False) -> GenerationOutput:
    """Generate max_new_tokens per row (temperature 0 = greedy) with optional steering.
    ids: TokenBatch, (T,), (B, T) or ragged lists (left-padded)."""
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
    fn = jitted_generate(lm.config, int(max_new_tokens), mode, eos_tuple(lm.config) if stop_at_eos else (),
                         lm.pad_id, bool(return_logits))
    tokens, mask, logits = fn(lm.params, lm.to_device(batch.ids), lm.to_device(batch.attention_mask), jnp.int32(layer),
                              jnp.asarray(vector, lm.dtype), jnp.asarray(alpha, lm.dtype),
                              lm.to_device(row_keys(seed, B)), jnp.float32(temperature), jnp.float32(top_p))
    return GenerationOutput(np.asarray(tokens), np.asarray(mask), T, logits)


def generated_texts(lm: LanguageModel, out: GenerationOutput) -> list[str]:
    """Decoded continuations only (never the prompt), cut at the first EOS."""
    eos = set(eos_tuple(lm.config))
    texts = []
    for row in np.asarray(out.tokens)[:, out.prompt_len:]:
        kept = []
        for t in row:
            if int(t) in eos:
                break
            kept.append(int(t))
        texts.append(lm.tokenizer.decode(kept, skip_special_tokens=True))
    return texts

