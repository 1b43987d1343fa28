"""Pure functions of the causal LM over a parameter pytree.

Parameter layout (all leaves jax arrays; L layers, V vocab, d hidden size):
    {"embed": (V, d), "blocks": <DecoderBlock pure dict, every leaf stacked to (L, ...)>,
     "norm": {"weight": (d,)}, "lm_head": (V, d)  # absent when embeddings are tied}
Blocks run under `lax.scan` over the stacked leaves, so compile time does not grow with depth and the
steered layer is a traced integer (one compilation serves every layer). Layers that differ (Gemma 3's
sliding-window layers with their local RoPE) take their tables and mask by a scanned per-layer flag
(`LocalInputs`, `layer_inputs`), never by Python branching on the layer index.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from steerjax import xla
from steerjax.models.config import ModelConfig
from steerjax.models.layers import HIGHEST, DecoderBlock, make_norm, rope_cos_sin, rope_inv_freq, softcap


@functools.lru_cache(maxsize=None)
def block_graphdef(config: ModelConfig, dtype_name: str) -> nnx.GraphDef:
    """Static structure of one DecoderBlock (shared by all layers)."""
    abstract = nnx.eval_shape(lambda: DecoderBlock(config, jnp.dtype(dtype_name)))
    return nnx.split(abstract)[0]


@functools.lru_cache(maxsize=None)
def norm_graphdef(config: ModelConfig, dtype_name: str) -> nnx.GraphDef:
    abstract = nnx.eval_shape(lambda: make_norm(config, config.hidden_size, jnp.dtype(dtype_name)))
    return nnx.split(abstract)[0]


def param_dtype(params) -> jnp.dtype:
    return params["embed"].dtype


def merged_block(config: ModelConfig, block_params) -> DecoderBlock:
    """A DecoderBlock module bound to one layer's pure-dict params (inside traced code)."""
    dtype_name = jax.tree.leaves(block_params)[0].dtype.name
    return nnx.merge(block_graphdef(config, dtype_name), nnx.State(block_params))


def apply_block(config: ModelConfig, block_params, h, cos, sin, mask, kv_prefix=None):
    """One decoder block from its pure-dict params: h (B, T, d) -> (h_next, (k, v))."""
    return merged_block(config, block_params)(h, cos, sin, mask, kv_prefix)


def final_norm(config: ModelConfig, params, h):
    """The final RMSNorm (of config's norm style) applied to h_L (..., d)."""
    norm = nnx.merge(norm_graphdef(config, params["norm"]["weight"].dtype.name), nnx.State(params["norm"]))
    return norm(h)


def unembedding(params) -> jax.Array:
    """W_U (V, d): lm_head, or the input embedding when tied."""
    return params.get("lm_head", params["embed"])


def logits_from_final_hidden(config: ModelConfig, params, h_last, unembed_matmul=None):
    """Logits (..., V) from the final-norm input h_L (..., d); computed in at least float32, softcapped where
    the config says (Gemma). unembed_matmul: optional x -> x @ W_U.T computed elsewhere (a CPU decode kernel,
    float32 out)."""
    normed = final_norm(config, params, h_last)
    if unembed_matmul is not None:
        return softcap(unembed_matmul(normed), config.final_logit_softcapping)
    w = unembedding(params)
    out_dtype = jnp.promote_types(normed.dtype, jnp.float32)
    logits = jnp.einsum("...d,vd->...v", normed, w, precision=HIGHEST, preferred_element_type=out_dtype)
    return softcap(logits, config.final_logit_softcapping)


def positions_from_mask(attention_mask: jax.Array) -> jax.Array:
    """Absolute positions (B, T) for left-padded rows: count of real tokens before each slot."""
    return jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=-1) - 1, 0)


def causal_mask(attention_mask: jax.Array) -> jax.Array:
    """(B, T, T) bool: query t may attend key s iff s <= t and s is a real token."""
    T = attention_mask.shape[-1]
    causal = jnp.tril(jnp.ones((T, T), bool))
    return causal[None] & attention_mask.astype(bool)[:, None, :]


def sliding_window_mask(attention_mask: jax.Array, window: int) -> jax.Array:
    """(B, T, T) bool: `causal_mask` restricted to the last `window` slots, keys t - window + 1 .. t (HF's
    sliding_window_overlay: kv_idx > q_idx - window, over slots; real tokens of a left-padded row are
    contiguous, so slot distance is position distance)."""
    T = attention_mask.shape[-1]
    slots = jnp.arange(T)
    near = slots[None, :] > slots[:, None] - window
    return causal_mask(attention_mask) & near[None]


def steer_at(index, steer_layer, steer_delta):
    """steer_delta where index == steer_layer (traced ints), else zeros."""
    return jnp.where(index == steer_layer, steer_delta, jnp.zeros_like(steer_delta))


class LocalInputs(NamedTuple):
    """What sliding-window (local) layers use instead of the global tables: cos, sin (B, T, h) of the local RoPE
    and the sliding-window mask (B, T, T)."""

    cos: jax.Array
    sin: jax.Array
    mask: jax.Array


def embed_scale(config: ModelConfig, dtype) -> jax.Array:
    """Gemma's embedding multiplier: sqrt(d) rounded to float32, then to the model dtype (HF's
    Gemma3TextScaledWordEmbedding buffer; 55.5 in bfloat16 for d = 3072)."""
    return jnp.asarray(np.float32(math.sqrt(config.hidden_size))).astype(dtype)


def embed_tokens(config: ModelConfig, params, ids) -> jax.Array:
    """h_0 (B, T, d) of ids (B, T): embedding rows, scaled where the config says (Gemma)."""
    h = params["embed"][ids]
    return h * embed_scale(config, h.dtype) if config.scale_embeddings else h


def rope_tables(config: ModelConfig, positions, dtype, local: bool = False):
    """cos, sin (B, T, h) for positions (B, T): of the global layers, or of the local ones when local."""
    inv_freq = jnp.asarray(rope_inv_freq(config, local), jnp.promote_types(dtype, jnp.float32))
    return rope_cos_sin(inv_freq, positions, dtype)


def local_inputs(config: ModelConfig, positions, attention_mask, dtype) -> LocalInputs | None:
    """LocalInputs of a left-padded batch (positions, attention_mask (B, T)), or None without local layers."""
    if not config.has_local_layers:
        return None
    cos, sin = rope_tables(config, positions, dtype, local=True)
    return LocalInputs(cos, sin, sliding_window_mask(attention_mask, config.sliding_window))


def embed_inputs(config: ModelConfig, params, ids, attention_mask):
    """h_0 (B, T, d), the global layers' RoPE tables (B, T, h) and causal mask (B, T, T) for left-padded ids,
    and the local layers' `LocalInputs` (None when every layer is global)."""
    dtype = param_dtype(params)
    positions = positions_from_mask(attention_mask)
    cos, sin = rope_tables(config, positions, dtype)
    local = local_inputs(config, positions, attention_mask, dtype)
    return embed_tokens(config, params, ids), cos, sin, causal_mask(attention_mask), local


def layer_inputs(is_local, cos, sin, mask, local: LocalInputs | None):
    """(cos, sin, mask) of one layer: the local ones where is_local (a traced per-layer bool), else the global."""
    if local is None:
        return cos, sin, mask
    pick = lambda glob, loc: jnp.where(is_local, loc, glob)
    return pick(cos, local.cos), pick(sin, local.sin), pick(mask, local.mask)


def run_blocks(config, params, h, cos, sin, mask, steer_layer, steer_delta, local: LocalInputs | None = None):
    """Blocks 0..L-1 on h_0 (B, T, d), adding steer_delta (B, T, d) to h_l when l == steer_layer
    (traced int; L steers the final-norm input, -1 steers nothing). Local (sliding-window) layers use `local`.
    Returns h_L, the entering states (L, B, T, d) and per-layer keys, values (L, B, T, K, h) each
    (unused outputs cost nothing under jit)."""

    def step(h, xs):
        block_params, index, is_local = xs
        h = h + steer_at(index, steer_layer, steer_delta)
        h_next, kv = apply_block(config, block_params, h, *layer_inputs(is_local, cos, sin, mask, local))
        return h_next, (h, kv)

    indices = jnp.arange(config.num_layers)
    flags = jnp.asarray(config.local_layers)
    h_final, (hidden, (keys, values)) = jax.lax.scan(step, h, (params["blocks"], indices, flags))
    return h_final + steer_at(config.num_layers, steer_layer, steer_delta), hidden, keys, values


def forward(config: ModelConfig, params, ids, attention_mask, steer_layer, steer_delta, return_hidden: bool,
            last_only: bool = False):
    """Full causal-LM pass. ids, attention_mask (B, T) int; steer_delta (B, T, d).
    Returns logits (B, T, V) ((B, 1, V) of the last position when last_only) and hidden (L + 1, B, T, d)
    or None."""
    h, cos, sin, mask, local = embed_inputs(config, params, ids, attention_mask)
    h_final, hidden, _, _ = run_blocks(config, params, h, cos, sin, mask, steer_layer,
                                       steer_delta.astype(h.dtype), local)
    logits = logits_from_final_hidden(config, params, h_final[:, -1:] if last_only else h_final)
    return logits, (jnp.concatenate([hidden, h_final[None]], axis=0) if return_hidden else None)


class CachedPass(NamedTuple):
    """What `forward_with_cache` returns: hidden (L + 1, B, T, d); per-layer keys and values (L, B, T, K, h)
    each; the global layers' RoPE tables cos, sin (B, T, h); and the local layers' `LocalInputs` (None when
    every layer is global)."""

    hidden: jax.Array
    keys: jax.Array
    values: jax.Array
    cos: jax.Array
    sin: jax.Array
    local: LocalInputs | None


def forward_with_cache(config: ModelConfig, params, ids, attention_mask, steer_layer=-1, steer_delta=None
                       ) -> CachedPass:
    """Pass that also returns what a later pass needs to re-run any tail of blocks or continue decoding
    (`CachedPass`)."""
    h, cos, sin, mask, local = embed_inputs(config, params, ids, attention_mask)
    delta = jnp.zeros_like(h) if steer_delta is None else steer_delta.astype(h.dtype)
    h_final, hidden, keys, values = run_blocks(config, params, h, cos, sin, mask, steer_layer, delta, local)
    return CachedPass(jnp.concatenate([hidden, h_final[None]], axis=0), keys, values, cos, sin, local)


@functools.lru_cache(maxsize=None)
def jitted_forward(config: ModelConfig, return_hidden: bool, last_only: bool = False):
    """jit-compiled `forward` for one config (cached)."""
    return xla.jit(functools.partial(forward, config, return_hidden=return_hidden, last_only=last_only))
