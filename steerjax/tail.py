"""The steered tail: blocks l..L-1 re-run for a steered h_l against the prefix's cached keys and values.

For a prompt, the observable of the last position with x (d,) added to h_l at the steered positions is
f(x) = observe(tail(ctx, x)). `positions="last"` uses the tail trick: steering the last position cannot
change earlier ones (causal attention), so only blocks l..L-1 run, for ONE token, against the keys and
values cached from the unsteered pass (`tail_last`). `positions="all"` (x added at every real token)
re-runs the tail over the whole sequence (`tail_full`); so does `recompute=True` for "last" (a cross-check
of the tail trick). Jacobians of these maps are taken in `steerjax.jacobian`.

Shapes: B prompts, T positions, L blocks, K key/value heads, hd head dim, d hidden size, V vocabulary.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from steerjax import xla
from steerjax.model import TokenBatch
from steerjax.models import causal_lm

OBSERVABLES = ("logits", "logprobs")
TAIL_POSITIONS = ("last", "all")
# JVP tangents per vmapped chunk: the one-token tail holds one token's activations per tangent, so wide
# chunks (matmul-shaped: on SmolLM2, the d = 576 JVPs at layer 15 took 0.32 s in chunks of 256 (3 x 192)
# and 0.25 s in one chunk of 576; on the Qwen2.5-0.5B shape, d = 896 at layer 12, 1.45 s in 4 x 224 and
# 1.24 s in 2 x 448 or 1 x 896), so d <= 1024 runs in one chunk and d = 4096 in 4; a tail over the sequence
# holds T tokens' activations per tangent
TAIL_CHUNK, SEQUENCE_CHUNK = 1024, 64
TAIL_NAME = "the steered tail (Jacobian operators, steered observables)"


def default_chunk(positions: str = "last", recompute: bool = False) -> int:
    """JVP chunk for the one-token tail (TAIL_CHUNK) or a tail re-run over the sequence (SEQUENCE_CHUNK)."""
    return TAIL_CHUNK if positions == "last" and not recompute else SEQUENCE_CHUNK


class TailContext(NamedTuple):
    """Unsteered state from which blocks l..L-1 can be re-run, for B prompts (leading axis B).
    h (B, T, d): h_l at every position; keys, values (B, L - l, T, K, hd); cos, sin (B, T, hd) of the global
    layers; attention_mask (B, T); local_cos, local_sin (B, T, hd): the RoPE of sliding-window layers (None
    when the model has none)."""

    h: Any
    keys: Any
    values: Any
    cos: Any
    sin: Any
    attention_mask: Any
    local_cos: Any = None
    local_sin: Any = None


@functools.partial(xla.jit, static_argnums=(0, 3))
def tail_context(config, params, batch: TokenBatch, layer: int) -> TailContext:
    """TailContext of a left-padded batch (ids, attention_mask (B, T)) at residual stream h_layer."""
    cached = causal_lm.forward_with_cache(config, params, batch.ids, batch.attention_mask)
    to_batch_major = lambda x: jnp.moveaxis(x[layer:], 0, 1)
    local = cached.local
    return TailContext(cached.hidden[layer], to_batch_major(cached.keys), to_batch_major(cached.values), cached.cos,
                       cached.sin, batch.attention_mask, None if local is None else local.cos,
                       None if local is None else local.sin)


def scan_tail(step, h, blocks, num_tail: int, xs=None):
    """h after `step(h, block_params, x)` over the last num_tail blocks of the full stacked `blocks`
    (leading axis L), each indexed in place inside the scan: an operator at layer l never copies the weights
    of blocks l..L-1 out of the model (a sliced copy cost 58 ms per operator on SmolLM2)."""
    num_layers = jax.tree.leaves(blocks)[0].shape[0]

    def body(h, args):
        index, x = args
        block = jax.tree.map(lambda w: jax.lax.dynamic_index_in_dim(w, index, keepdims=False), blocks)
        return step(h, block, x), None

    h, _ = jax.lax.scan(body, h, (jnp.arange(num_layers - num_tail, num_layers), xs))
    return h


def tail_layer_flags(config, num_tail: int) -> jax.Array:
    """Per tail block (the last num_tail): whether it is a sliding-window (local) layer."""
    return jnp.asarray(config.local_layers[config.num_layers - num_tail:])


def tail_layer_inputs(config, ctx: TailContext, rows: slice, mask) -> tuple:
    """The (global cos, sin, mask) of ONE prompt's positions `rows` for the tail blocks, and the local layers'
    `LocalInputs` (None without local layers): mask (1, Tq, T) is the causal mask of those rows, and the local
    one restricts it to the sliding window."""
    cos, sin = ctx.cos[None, rows], ctx.sin[None, rows]
    if not config.has_local_layers:
        return cos, sin, mask, None
    window = causal_lm.sliding_window_mask(ctx.attention_mask[None], config.sliding_window)[:, rows]
    return cos, sin, mask, causal_lm.LocalInputs(ctx.local_cos[None, rows], ctx.local_sin[None, rows], window)


def tail_window(config, blocks, ctx: TailContext, x, window: int):
    """h_L (window, d) at the last `window` positions of ONE prompt (ctx without batch axis) with x (d,) added
    to h_l at each of them; blocks (the model's full stack) l..L-1 run on those `window` tokens against the
    cached keys/values of the earlier positions (l = L - ctx.keys.shape[0]). Causal attention makes this exact:
    no earlier position sees the steer (sliding-window layers see the keys of their window only)."""
    h = (ctx.h[-window:] + x)[None]
    rows = slice(-window, None)
    inputs = tail_layer_inputs(config, ctx, rows, causal_lm.causal_mask(ctx.attention_mask[None])[:, rows])
    num_tail = ctx.keys.shape[0]

    def step(h, block_params, xs):
        k, v, is_local = xs
        prefix = (k[None, :-window], v[None, :-window])
        return causal_lm.apply_block(config, block_params, h, *causal_lm.layer_inputs(is_local, *inputs),
                                     kv_prefix=prefix)[0]

    return scan_tail(step, h, blocks, num_tail, (ctx.keys, ctx.values, tail_layer_flags(config, num_tail)))[0]


def tail_last(config, blocks, ctx: TailContext, x):
    """h_L (d,) at the last position of ONE prompt with x (d,) added to h_l at the last position only: the
    one-token `tail_window`."""
    return tail_window(config, blocks, ctx, x, 1)[0]


def tail_full(config, blocks, ctx: TailContext, x, steer_mask):
    """As `tail_last`, but x is added at the positions of steer_mask (T,) and blocks l..L-1 are
    re-run over the whole sequence (no cache)."""
    h = (ctx.h + steer_mask[:, None].astype(ctx.h.dtype) * x)[None]
    rows = slice(None)
    inputs = tail_layer_inputs(config, ctx, rows, causal_lm.causal_mask(ctx.attention_mask[None]))
    num_tail = ctx.keys.shape[0]

    def step(h, block_params, is_local):
        return causal_lm.apply_block(config, block_params, h, *causal_lm.layer_inputs(is_local, *inputs))[0]

    return scan_tail(step, h, blocks, num_tail, tail_layer_flags(config, num_tail))[0, -1]


def tail_fn(config, positions: str = "last", recompute: bool = False) -> Callable:
    """Single-prompt map (blocks, ctx, x (d,)) -> h_L (d,) at the last position, x added to h_l at the
    positions of mode `positions` ("last" or "all"; blocks: the model's full stack)."""
    if positions == "last" and not recompute:
        return functools.partial(tail_last, config)

    def fn(blocks, ctx, x):
        real = ctx.attention_mask.astype(bool)
        steer_mask = real if positions == "all" else jnp.arange(real.shape[0]) == real.shape[0] - 1
        return tail_full(config, blocks, ctx, x, steer_mask)

    return fn


def observe(config, params, h_final, observable: str):
    """Observable (..., V) from the final-norm input h_L (..., d): logits or log-probabilities."""
    logits = causal_lm.logits_from_final_hidden(config, params, h_final)
    return logits if observable == "logits" else jax.nn.log_softmax(logits, axis=-1)


def jacfwd_chunked(fn, x0, chunk: int):
    """Dense Jacobian (out, d) of fn at x0 (d,) by JVPs along the basis, at most `chunk` tangents at a time
    (in ceil(d / chunk) equal chunks, so little padding: d = 896 with chunk 256 runs 4 x 224, not 4 x 256)."""
    d = x0.shape[0]
    n_chunks = -(-d // max(1, min(chunk, d)))
    chunk = -(-d // n_chunks)
    pad = (-d) % chunk
    basis = jnp.concatenate([jnp.eye(d, dtype=x0.dtype), jnp.zeros((pad, d), x0.dtype)])
    jvp_one = lambda t: jax.jvp(fn, (x0,), (t,))[1]
    cols = jax.lax.map(jax.vmap(jvp_one), basis.reshape(-1, chunk, d))  # (n_chunks, chunk, out...)
    cols = cols.reshape(-1, *cols.shape[2:])[:d]
    return jnp.moveaxis(cols, 0, -1)


@functools.lru_cache(maxsize=None)
def steered_observable(config, observable: str = "logits") -> Callable:
    """fn(v (d,) or (B, d), aux) -> (B, V): the last-position observable of B prompts with v added to h_l at
    the last prompt token, for aux = (params, ctx) (`JacobianOperator.tail_args()`); the one-token tail, so
    exact and cheap, and differentiable in v; jit-compiled (it also traces inside other transformations). Cached
    per (config, observable): keep the function's identity to reuse compilations that take it (`steerjax.fits`)."""

    def fn(v, aux):
        params, ctx = aux
        v = jnp.broadcast_to(v, ctx.h[:, -1].shape).astype(ctx.h.dtype)
        h_final = jax.vmap(lambda c, x: tail_last(config, params["blocks"], c, x))(ctx, v)
        return observe(config, params, h_final, observable)

    return xla.jit(fn)
