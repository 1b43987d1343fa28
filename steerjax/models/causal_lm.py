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


def apply_block(config: ModelConfig, block_params, h, cos, sin, mask, kv_prefix=None):
    """One decoder block from its pure-dict params: h (B, T, d) -> (h_next, (k, v))."""
    dtype_name = jax.tree.leaves(block_params)[0].dtype.name
    block = nnx.merge(block_graphdef(config, dtype_name), nnx.State(block_params))
    return block(h, cos, sin, mask, kv_prefix)


def final_norm(config: ModelConfig, params, h):
    """The final RMSNorm applied to h_L (..., d)."""
    norm = nnx.merge(norm_graphdef(config, params["norm"]["weight"].dtype.name), nnx.State(params["norm"]))
    return norm(h)


def unembedding(params) -> jax.Array:
    """W_U (V, d): lm_head, or the input embedding when tied."""
    return params.get("lm_head", params["embed"])


def logits_from_final_hidden(config: ModelConfig, params, h_last):
    """Logits (..., V) from the final-norm input h_L (..., d); computed in at least float32."""
    normed = final_norm(config, params, h_last)
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


def layer_params(params, layer: int):
    """Pure-dict params of block `layer` (static int)."""
    return jax.tree.map(lambda x: x[layer], params["blocks"])


def run_blocks(config, params, h, cos, sin, mask, steer_layer, steer_delta, return_hidden: bool):
    """Blocks 0..L-1 on h_0 (B, T, d), adding steer_delta (B, T, d) to h_l when l == steer_layer
    (traced int; L steers the final-norm input, -1 steers nothing).
    Returns h_L and, if return_hidden, the stacked entering states (L, B, T, d)."""

    def step(h, xs):
        block_params, index = xs
        h = h + jnp.where(index == steer_layer, steer_delta, jnp.zeros_like(steer_delta))
        h_next, _ = apply_block(config, block_params, h, cos, sin, mask)
        return h_next, (h if return_hidden else None)

    indices = jnp.arange(config.num_layers)
    h_final, hidden = jax.lax.scan(step, h, (params["blocks"], indices))
    h_final = h_final + jnp.where(steer_layer == config.num_layers, steer_delta, jnp.zeros_like(steer_delta))
    return h_final, hidden


def forward(config: ModelConfig, params, ids, attention_mask, steer_layer, steer_delta, return_hidden: bool):
    """Full causal-LM pass. ids, attention_mask (B, T) int; steer_delta (B, T, d).
    Returns logits (B, T, V) and hidden (L + 1, B, T, d) or None."""
    dtype = param_dtype(params)
    h = params["embed"][ids]
    inv_freq = jnp.asarray(rope_inv_freq(config), jnp.promote_types(dtype, jnp.float32))
    cos, sin = rope_cos_sin(inv_freq, positions_from_mask(attention_mask), dtype)
    mask = causal_mask(attention_mask)
    h_final, hidden = run_blocks(config, params, h, cos, sin, mask, steer_layer,
                                 steer_delta.astype(dtype), return_hidden)
    logits = logits_from_final_hidden(config, params, h_final)
    if return_hidden:
        hidden = jnp.concatenate([hidden, h_final[None]], axis=0)
    return logits, hidden


def forward_with_cache(config: ModelConfig, params, ids, attention_mask):
    """Unsteered pass that also returns what a later pass needs to re-run any tail of blocks:
    hidden (L + 1, B, T, d), per-layer keys and values (L, B, T, K, h) each, and cos/sin (B, T, h)."""
    dtype = param_dtype(params)
    h = params["embed"][ids]
    inv_freq = jnp.asarray(rope_inv_freq(config), jnp.promote_types(dtype, jnp.float32))
    cos, sin = rope_cos_sin(inv_freq, positions_from_mask(attention_mask), dtype)
    mask = causal_mask(attention_mask)

    def step(h, block_params):
        h_next, kv = apply_block(config, block_params, h, cos, sin, mask)
        return h_next, (h, kv)

    h_final, (hidden, (keys, values)) = jax.lax.scan(step, h, params["blocks"])
    return jnp.concatenate([hidden, h_final[None]], axis=0), keys, values, cos, sin


@functools.lru_cache(maxsize=None)
def jitted_forward(config: ModelConfig, return_hidden: bool):
    """jit-compiled `forward` for one config (cached)."""
    return jax.jit(functools.partial(forward, config, return_hidden=return_hidden))
