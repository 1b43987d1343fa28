"""Pure functions of the causal LM over a parameter pytree.

Parameter layout (all leaves jax arrays; L layers, V vocab, d hidden size):
    {"embed": (V, d), "blocks": <DecoderBlock pure dict, every leaf stacked to (L, ...)>,
     "norm": {"weight": (d,)}, "lm_head": (V, d)  # absent when embeddings are tied}
Blocks run under `lax.scan` over the stacked leaves, so compile time does not grow with depth and the
steered layer is a traced integer (one compilation serves every layer).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from steerjax import xla
from steerjax.models.config import ModelConfig
from steerjax.models.layers import HIGHEST, DecoderBlock, RMSNorm, rope_cos_sin, rope_inv_freq


@functools.lru_cache(maxsize=None)
def block_graphdef(config: ModelConfig, dtype_name: str) -> nnx.GraphDef:
    """Static structure of one DecoderBlock (shared by all layers)."""
    abstract = nnx.eval_shape(lambda: DecoderBlock(config, jnp.dtype(dtype_name)))
    return nnx.split(abstract)[0]


@functools.lru_cache(maxsize=None)
def norm_graphdef(config: ModelConfig, dtype_name: str) -> nnx.GraphDef:
    abstract = nnx.eval_shape(lambda: RMSNorm(config.hidden_size, config.rms_norm_eps, jnp.dtype(dtype_name)))
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
    """The final RMSNorm applied to h_L (..., d)."""
    norm = nnx.merge(norm_graphdef(config, params["norm"]["weight"].dtype.name), nnx.State(params["norm"]))
    return norm(h)


def unembedding(params) -> jax.Array:
    """W_U (V, d): lm_head, or the input embedding when tied."""
    return params.get("lm_head", params["embed"])


def logits_from_final_hidden(config: ModelConfig, params, h_last, unembed_matmul=None):
    """Logits (..., V) from the final-norm input h_L (..., d); computed in at least float32.
    unembed_matmul: optional x -> x @ W_U.T computed elsewhere (a CPU decode kernel, float32 out)."""
    normed = final_norm(config, params, h_last)
    if unembed_matmul is not None:
        return unembed_matmul(normed)
    w = unembedding(params)
    out_dtype = jnp.promote_types(normed.dtype, jnp.float32)
    return jnp.einsum("...d,vd->...v", normed, w, precision=HIGHEST, preferred_element_type=out_dtype)


def positions_from_mask(attention_mask: jax.Array) -> jax.Array:
    """Absolute positions (B, T) for left-padded rows: count of real tokens before each slot."""
    return jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=-1) - 1, 0)


def causal_mask(attention_mask: jax.Array) -> jax.Array:
    """(B, T, T) bool: query t may attend key s iff s <= t and s is a real token."""
    T = attention_mask.shape[-1]
    causal = jnp.tril(jnp.ones((T, T), bool))
    return causal[None] & attention_mask.astype(bool)[:, None, :]


def steer_at(index, steer_layer, steer_delta):
    """steer_delta where index == steer_layer (traced ints), else zeros."""
    return jnp.where(index == steer_layer, steer_delta, jnp.zeros_like(steer_delta))


def embed_inputs(config: ModelConfig, params, ids, attention_mask):
    """h_0 (B, T, d), RoPE tables (B, T, h) and the causal mask (B, T, T) for left-padded ids."""
    dtype = param_dtype(params)
    inv_freq = jnp.asarray(rope_inv_freq(config), jnp.promote_types(dtype, jnp.float32))
    cos, sin = rope_cos_sin(inv_freq, positions_from_mask(attention_mask), dtype)
    return params["embed"][ids], cos, sin, causal_mask(attention_mask)


def run_blocks(config, params, h, cos, sin, mask, steer_layer, steer_delta):
    """Blocks 0..L-1 on h_0 (B, T, d), adding steer_delta (B, T, d) to h_l when l == steer_layer
    (traced int; L steers the final-norm input, -1 steers nothing).
    Returns h_L, the entering states (L, B, T, d) and per-layer keys, values (L, B, T, K, h) each
    (unused outputs cost nothing under jit)."""

    def step(h, xs):
        block_params, index = xs
        h = h + steer_at(index, steer_layer, steer_delta)
        h_next, kv = apply_block(config, block_params, h, cos, sin, mask)
        return h_next, (h, kv)

    indices = jnp.arange(config.num_layers)
    h_final, (hidden, (keys, values)) = jax.lax.scan(step, h, (params["blocks"], indices))
    return h_final + steer_at(config.num_layers, steer_layer, steer_delta), hidden, keys, values


def forward(config: ModelConfig, params, ids, attention_mask, steer_layer, steer_delta, return_hidden: bool,
            last_only: bool = False):
    """Full causal-LM pass. ids, attention_mask (B, T) int; steer_delta (B, T, d).
    Returns logits (B, T, V) ((B, 1, V) of the last position when last_only) and hidden (L + 1, B, T, d)
    or None."""
    h, cos, sin, mask = embed_inputs(config, params, ids, attention_mask)
    h_final, hidden, _, _ = run_blocks(config, params, h, cos, sin, mask, steer_layer,
                                       steer_delta.astype(h.dtype))
    logits = logits_from_final_hidden(config, params, h_final[:, -1:] if last_only else h_final)
    return logits, (jnp.concatenate([hidden, h_final[None]], axis=0) if return_hidden else None)


def forward_with_cache(config: ModelConfig, params, ids, attention_mask, steer_layer=-1, steer_delta=None):
    """Pass that also returns what a later pass needs to re-run any tail of blocks or continue decoding:
    hidden (L + 1, B, T, d), per-layer keys and values (L, B, T, K, h) each, and cos/sin (B, T, h)."""
    h, cos, sin, mask = embed_inputs(config, params, ids, attention_mask)
    delta = jnp.zeros_like(h) if steer_delta is None else steer_delta.astype(h.dtype)
    h_final, hidden, keys, values = run_blocks(config, params, h, cos, sin, mask, steer_layer, delta)
    return jnp.concatenate([hidden, h_final[None]], axis=0), keys, values, cos, sin


@functools.lru_cache(maxsize=None)
def jitted_forward(config: ModelConfig, return_hidden: bool, last_only: bool = False):
    """jit-compiled `forward` for one config (cached)."""
    return xla.jit(functools.partial(forward, config, return_hidden=return_hidden, last_only=last_only))
