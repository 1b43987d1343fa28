"""Flax NNX modules of a Llama / Qwen2 / Qwen3 / Gemma 3 decoder block: RMSNorm, RoPE, GQA attention (optional
per-head q/k norms and score softcapping), gated MLP (SwiGLU or GeGLU), and Gemma's sandwich norms.

Shapes: B batch, T query positions, S key positions, d hidden size, H query heads, K key/value heads,
h head dim. Matmuls run at HIGHEST precision so float32 results do not depend on the backend. With
bfloat16 weights every matmul accumulates in float32 (`preferred_element_type`) and rounds its output once;
RMSNorm statistics, attention scores and softmax, and the logits stay in float32.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from steerjax.models.config import ModelConfig

HIGHEST = jax.lax.Precision.HIGHEST


def inv_freq_for(dim: int, theta: float, scaling: tuple) -> np.ndarray:
    """Inverse RoPE frequencies (dim/2,) in float64 for base theta, with linear or Llama-3 scaling applied
    (scaling: sorted (key, value) pairs, () = plain RoPE)."""
    inv_freq = 1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    scaling = dict(scaling)
    rope_type = scaling.get("rope_type", "default")
    if rope_type == "linear":
        return inv_freq / scaling["factor"]
    if rope_type == "llama3":
        factor = scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        return np.where(is_medium, smoothed, scaled)
    return inv_freq


def rope_inv_freq(config: ModelConfig, local: bool = False) -> np.ndarray:
    """Inverse RoPE frequencies (h/2,) in float64: of the global layers, or of the sliding-window (local)
    layers when local (the global ones where the config has no local RoPE)."""
    if local and config.rope_local_theta is not None:
        return inv_freq_for(config.head_dim, config.rope_local_theta, config.rope_local_scaling)
    return inv_freq_for(config.head_dim, config.rope_theta, config.rope_scaling)


def rope_cos_sin(inv_freq: jax.Array, positions: jax.Array, dtype) -> tuple[jax.Array, jax.Array]:
    """cos, sin tables (B, T, h) for integer positions (B, T), HF's concatenated-halves layout."""
    freqs = positions[..., None].astype(inv_freq.dtype) * inv_freq
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate x (B, T, heads, h) by the tables (B, T, h)."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[:, :, None, :] + rotated * sin[:, :, None, :]


class RMSNorm(nnx.Module):
    """y = w * x / sqrt(mean(x^2) + eps), normalised in at least float32 (as HF does)."""

    def __init__(self, dim: int, eps: float, dtype=jnp.float32):
        self.weight = nnx.Param(jnp.ones((dim,), dtype))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        compute = jnp.promote_types(x.dtype, jnp.float32)
        xf = x.astype(compute)
        normed = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return self.weight[...] * normed.astype(x.dtype)


class GemmaRMSNorm(RMSNorm):
    """y = (1 + w) * x / sqrt(mean(x^2) + eps), all in at least float32, rounded once to x's dtype (Gemma3RMSNorm:
    the product is taken before the cast, unlike Llama's)."""

    def __call__(self, x: jax.Array) -> jax.Array:
        compute = jnp.promote_types(x.dtype, jnp.float32)
        xf = x.astype(compute)
        normed = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return (normed * (1.0 + self.weight[...].astype(compute))).astype(x.dtype)


def make_norm(config: ModelConfig, dim: int, dtype) -> RMSNorm:
    """The RMSNorm of config's family over the last axis of size dim."""
    cls = GemmaRMSNorm if config.norm_style == "gemma" else RMSNorm
    return cls(dim, config.rms_norm_eps, dtype)


def activation(name: str, x: jax.Array) -> jax.Array:
    """The gated MLP's activation: silu, or gelu with the tanh approximation (HF's gelu_pytorch_tanh)."""
    return jax.nn.silu(x) if name == "silu" else jax.nn.gelu(x, approximate=True)


def softcap(x: jax.Array, cap: float | None) -> jax.Array:
    """cap * tanh(x / cap) (Gemma's logit softcapping); x unchanged when cap is None."""
    return x if cap is None else jnp.tanh(x / cap) * cap


def accumulation_dtype(dtype) -> jnp.dtype:
    """Matmul accumulator dtype: float32 for bfloat16 / float32 operands, float64 for float64."""
    return jnp.promote_types(dtype, jnp.float32)


class Linear(nnx.Linear):
    """nnx.Linear accumulating in at least float32, output rounded once to the compute dtype."""

    def __call__(self, x: jax.Array) -> jax.Array:
        return super().__call__(x).astype(self.dtype)


def project(linear: Linear, x: jax.Array, matmul=None) -> jax.Array:
    """linear(x); or, given `matmul` (x -> x @ this layer's kernel in float32, computed elsewhere, e.g. by a
    CPU decode kernel over packed weights), that product plus the bias, rounded once like Linear."""
    if matmul is None:
        return linear(x)
    y = matmul(x)
    if linear.bias is not None:
        y = y + linear.bias[...].astype(y.dtype)
    return y.astype(linear.dtype)


def _linear(fan_in: int, fan_out: int, bias: bool, dtype, rngs: nnx.Rngs) -> Linear:
    return Linear(fan_in, fan_out, use_bias=bias, dtype=dtype, param_dtype=dtype, precision=HIGHEST,
                  preferred_element_type=accumulation_dtype(dtype), rngs=rngs)


class Attention(nnx.Module):
    """Grouped-query causal self-attention with optional q/k/v (and o) biases, per-head q/k RMSNorms (applied
    after the projection, before RoPE) and tanh softcapping of the scores."""

    def __init__(self, config: ModelConfig, dtype, rngs: nnx.Rngs):
        d, h = config.hidden_size, config.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, h
        self.score_scale = math.sqrt(config.query_pre_attn_scalar or h)  # scores are divided by it
        self.softcap = config.attn_logit_softcapping
        self.q_proj = _linear(d, config.num_heads * h, config.qkv_bias, dtype, rngs)
        self.k_proj = _linear(d, config.num_kv_heads * h, config.qkv_bias, dtype, rngs)
        self.v_proj = _linear(d, config.num_kv_heads * h, config.qkv_bias, dtype, rngs)
        self.o_proj = _linear(config.num_heads * h, d, config.o_bias, dtype, rngs)
        self.q_norm = make_norm(config, h, dtype) if config.qk_norm else None
        self.k_norm = make_norm(config, h, dtype) if config.qk_norm else None

    def project_qkv(self, x, cos, sin, matmuls=None):
        """Rotated queries (B, T, H, h) and keys, values (B, T, K, h) of x (B, T, d).
        matmuls: optional {"q_proj": fn, ...} replacing the weight products (see `project`)."""
        B, T, _ = x.shape
        matmuls = matmuls or {}
        q = project(self.q_proj, x, matmuls.get("q_proj")).reshape(B, T, self.num_heads, self.head_dim)
        k = project(self.k_proj, x, matmuls.get("k_proj")).reshape(B, T, self.num_kv_heads, self.head_dim)
        v = project(self.v_proj, x, matmuls.get("v_proj")).reshape(B, T, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def attend(self, q, k, v, mask, kv_prefix=None, o_matmul=None):
        """Softmax attention of q (B, T, H, h) over k, v (B, S, K, h) with mask (B, T, S) -> (B, T, d).
        With kv_prefix (k_p, v_p), each (B, S - T, K, h), k and v hold only this call's T positions and the
        keys are [k_p; k]: the prefix enters the products directly instead of through a concatenation, so
        under jvp / vmap no zero tangent of the cached prefix is materialised (once per tangent)."""
        B, T = q.shape[:2]
        groups = self.num_heads // self.num_kv_heads
        q = q.reshape(B, T, self.num_kv_heads, groups, self.head_dim)
        acc = accumulation_dtype(v.dtype)
        keys = [k] if kv_prefix is None else [kv_prefix[0], k]
        values = [v] if kv_prefix is None else [kv_prefix[1], v]
        scores = jnp.concatenate([jnp.einsum("btkgh,bskh->bkgts", q, part, precision=HIGHEST,
                                             preferred_element_type=acc) for part in keys], axis=-1)
        scores = softcap(scores / self.score_scale, self.softcap)
        scores = jnp.where(mask[:, None, None, :, :], scores, jnp.finfo(scores.dtype).min)
        probs = jax.nn.softmax(scores, axis=-1)  # kept in float32: probs @ v accumulates in float32
        splits = np.cumsum([part.shape[1] for part in values])[:-1]
        out = functools.reduce(jnp.add, [jnp.einsum("bkgts,bskh->btkgh", p, part.astype(acc), precision=HIGHEST)
                                         for p, part in zip(jnp.split(probs, splits, axis=-1), values)])
        out = out.astype(v.dtype)
        return project(self.o_proj, out.reshape(B, T, self.num_heads * self.head_dim), o_matmul)

    def __call__(self, x, cos, sin, mask, kv_prefix=None):
        """x (B, T, d); cos/sin (B, T, h); mask (B, T, S) bool, True = may attend;
        kv_prefix: optional cached (k, v), each (B, S - T, K, h).
        Returns output (B, T, d) and this call's full (k, v), each (B, S, K, h)."""
        q, k, v = self.project_qkv(x, cos, sin)
        out = self.attend(q, k, v, mask, kv_prefix)
        if kv_prefix is not None:
            k = jnp.concatenate([kv_prefix[0], k], axis=1)
            v = jnp.concatenate([kv_prefix[1], v], axis=1)
        return out, (k, v)

    def decode(self, x, cos, sin, mask, cache_k, cache_v, slot, matmuls=None):
        """One KV-cache step: x (B, 1, d) is written to cache slot `slot` (traced int) of the
        preallocated caches (B, S, K, h), then attends over the cache with mask (B, 1, S).
        matmuls: optional {"q_proj": fn, ..., "o_proj": fn} replacing the weight products."""
        q, k, v = self.project_qkv(x, cos, sin, matmuls)
        cache_k = jax.lax.dynamic_update_slice(cache_k, k.astype(cache_k.dtype), (0, slot, 0, 0))
        cache_v = jax.lax.dynamic_update_slice(cache_v, v.astype(cache_v.dtype), (0, slot, 0, 0))
        o_matmul = (matmuls or {}).get("o_proj")
        return self.attend(q, cache_k, cache_v, mask, o_matmul=o_matmul), (cache_k, cache_v)


class MLP(nnx.Module):
    """Gated MLP: down(act(gate(x)) * up(x)); act silu (SwiGLU) or tanh-approximated gelu (GeGLU)."""

    def __init__(self, config: ModelConfig, dtype, rngs: nnx.Rngs):
        d, f, b = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.act = config.hidden_act
        self.gate_proj = _linear(d, f, b, dtype, rngs)
        self.up_proj = _linear(d, f, b, dtype, rngs)
        self.down_proj = _linear(f, d, b, dtype, rngs)

    def __call__(self, x, matmuls=None):
        """x (B, T, d) -> (B, T, d); matmuls: optional {"gate_proj": fn, ...} (see `project`)."""
        matmuls = matmuls or {}
        gate = project(self.gate_proj, x, matmuls.get("gate_proj"))
        up = project(self.up_proj, x, matmuls.get("up_proj"))
        return project(self.down_proj, activation(self.act, gate) * up, matmuls.get("down_proj"))


class DecoderBlock(nnx.Module):
    """Pre-norm residual block: h + attn(norm(h)), then + mlp(norm(.)). With sandwich norms (Gemma) the
    branches are h + post_attention_layernorm(attn(input_layernorm(h))), then
    + post_feedforward_layernorm(mlp(pre_feedforward_layernorm(.))); otherwise post_attention_layernorm is the
    pre-MLP norm (HF's names either way)."""

    def __init__(self, config: ModelConfig, dtype=jnp.float32, rngs: nnx.Rngs | None = None):
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        d = config.hidden_size
        self.input_layernorm = make_norm(config, d, dtype)
        self.self_attn = Attention(config, dtype, rngs)
        self.post_attention_layernorm = make_norm(config, d, dtype)
        self.mlp = MLP(config, dtype, rngs)
        self.sandwich = config.sandwich_norms
        self.pre_feedforward_layernorm = make_norm(config, d, dtype) if self.sandwich else None
        self.post_feedforward_layernorm = make_norm(config, d, dtype) if self.sandwich else None

    def __call__(self, h, cos, sin, mask, kv_prefix=None):
        """h (B, T, d) -> (h_next (B, T, d), (k, v))."""
        attn_out, kv = self.self_attn(self.input_layernorm(h), cos, sin, mask, kv_prefix)
        return self.residual_mlp(h + self.attention_branch(attn_out)), kv

    def decode(self, h, cos, sin, mask, cache_k, cache_v, slot, matmuls=None):
        """One KV-cache step for h (B, 1, d); see Attention.decode. -> (h_next, (cache_k, cache_v)).
        matmuls: optional {"self_attn": {...}, "mlp": {...}} of weight products (see `project`)."""
        matmuls = matmuls or {}
        attn_out, caches = self.self_attn.decode(self.input_layernorm(h), cos, sin, mask, cache_k, cache_v, slot,
                                                 matmuls.get("self_attn"))
        return self.residual_mlp(h + self.attention_branch(attn_out), matmuls.get("mlp")), caches

    def attention_branch(self, attn_out):
        """What the attention adds to the residual stream: its output, post-normed with sandwich norms."""
        return self.post_attention_layernorm(attn_out) if self.sandwich else attn_out

    def residual_mlp(self, h, matmuls=None):
        if self.sandwich:
            return h + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h), matmuls))
        return h + self.mlp(self.post_attention_layernorm(h), matmuls)
