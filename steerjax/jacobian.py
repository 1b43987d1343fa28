"""Exact Jacobians of the last-position output with respect to the steered residual stream h_l.

For a prompt, f(x) = observable(last position | h_l + x at the steered positions), and J = df/dx at 0
(V x d). `positions="last"` uses the tail trick: steering the last position cannot change earlier ones
(causal attention), so only blocks l..L-1 are re-run, for ONE token, against the keys and values cached
from the unsteered pass. `positions="all"` (x added at every real token) re-runs the tail over the whole
sequence; `recompute=True` does the same for "last" (a cross-check of the tail trick).

Exact spectra without forming V x d or squaring the condition number: with D = d norm(h_L) / dx (d x d,
from d JVPs) and the thin QR W_U = Q R (once per model), J_logits = Q (R D), so sigma(J) = sigma(R D).
For log-probabilities J = (I - 1 p^T) W_U D, and with 1 = Q b + r the same reduction gives a (d+1) x d
factor (see `observable_factor`). Stacking factors of many prompts gives the stacked operator
sum_i J_i^T J_i = C^T C with C = [C_1; ...; C_n], again without squaring.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from steerjax import blas, lanczos, spectrum, xla
from steerjax.errors import InputError, SteeringError
from steerjax.models import causal_lm
from steerjax.model import LanguageModel, TokenBatch, as_token_batch

OBSERVABLES = ("logits", "logprobs")
JACOBIAN_POSITIONS = ("last", "all")
# JVP tangents per vmapped chunk: the one-token tail holds one token's activations per tangent, so wide
# chunks (matmul-shaped: on SmolLM2, the d = 576 JVPs at layer 15 took 0.32 s in chunks of 256 (3 x 192)
# and 0.25 s in one chunk of 576; on the Qwen2.5-0.5B shape, d = 896 at layer 12, 1.45 s in 4 x 224 and
# 1.24 s in 2 x 448 or 1 x 896), so d <= 1024 runs in one chunk and d = 4096 in 4; a tail over the sequence
# holds T tokens' activations per tangent
TAIL_CHUNK, SEQUENCE_CHUNK = 1024, 64


def default_chunk(positions: str = "last", recompute: bool = False) -> int:
    """JVP chunk for the one-token tail (TAIL_CHUNK) or a tail re-run over the sequence (SEQUENCE_CHUNK)."""
    return TAIL_CHUNK if positions == "last" and not recompute else SEQUENCE_CHUNK


TOP_SINGULAR_METHODS = ("auto", "lanczos", "dense")
# rounds block Lanczos is assumed to need in `dense_is_cheaper` (5-6 on SmolLM2's J at k = 8-64, 10 on a
# random-weight model's flat spectrum). Measured on SmolLM2 (d 576, float32, 2 cores): k = 16 / 32 / 64
# took 1.7 / 1.7 / 1.9 s dense and 3.6 / 3.3 / 2.6 s by block Lanczos; k = 8 was 3.4 vs 2.7 s
EXPECTED_LANCZOS_ROUNDS = 6


def dense_is_cheaper(d: int, k: int, block: int | None = None, rounds: int = EXPECTED_LANCZOS_ROUNDS) -> bool:
    """Cost model for top-k: the exact route takes d JVPs; block Lanczos takes `rounds` rounds of a block of
    JVPs and a block of VJPs (a VJP ~ 2 JVPs), i.e. 3 * block * rounds JVP-equivalents."""
    return d <= 3 * (block or lanczos.default_block(k)) * rounds


class TailContext(NamedTuple):
    """Unsteered state from which blocks l..L-1 can be re-run, for B prompts (leading axis B).
    h (B, T, d): h_l at every position; keys, values (B, L - l, T, K, hd); cos, sin (B, T, hd);
    attention_mask (B, T)."""

    h: Any
    keys: Any
    values: Any
    cos: Any
    sin: Any
    attention_mask: Any


@functools.partial(xla.jit, static_argnums=(0, 3))
def _tail_context(config, params, batch: TokenBatch, layer: int) -> TailContext:
    hidden, keys, values, cos, sin = causal_lm.forward_with_cache(config, params, batch.ids, batch.attention_mask)
    to_batch_major = lambda x: jnp.moveaxis(x[layer:], 0, 1)  # noqa: E731
    return TailContext(hidden[layer], to_batch_major(keys), to_batch_major(values), cos, sin,
                       batch.attention_mask)


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


def tail_last(config, blocks, ctx: TailContext, x):
    """h_L (d,) at the last position of ONE prompt (ctx without batch axis) with x (d,) added to h_l
    at the last position only; blocks (the model's full stack) l..L-1 run on one token against the cached
    prefix keys/values (l = L - ctx.keys.shape[0])."""
    h = (ctx.h[-1] + x)[None, None, :]
    mask = ctx.attention_mask.astype(bool)[None, None, :]
    cos, sin = ctx.cos[None, -1:], ctx.sin[None, -1:]

    def step(h, block_params, kv):
        k, v = kv
        return causal_lm.apply_block(config, block_params, h, cos, sin, mask, kv_prefix=(k[None, :-1], v[None, :-1]))[0]

    return scan_tail(step, h, blocks, ctx.keys.shape[0], (ctx.keys, ctx.values))[0, 0]


def tail_full(config, blocks, ctx: TailContext, x, steer_mask):
    """As `tail_last`, but x is added at the positions of steer_mask (T,) and blocks l..L-1 are
    re-run over the whole sequence (no cache)."""
    h = (ctx.h + steer_mask[:, None].astype(ctx.h.dtype) * x)[None]
    mask = causal_lm.causal_mask(ctx.attention_mask[None])

    def step(h, block_params, _):
        return causal_lm.apply_block(config, block_params, h, ctx.cos[None], ctx.sin[None], mask)[0]

    return scan_tail(step, h, blocks, ctx.keys.shape[0])[0, -1]


def observe(config, params, h_final, observable: str):
    """Observable (..., V) from the final-norm input h_L (..., d)."""
    logits = causal_lm.logits_from_final_hidden(config, params, h_final)
    return logits if observable == "logits" else jax.nn.log_softmax(logits, axis=-1)


def _tail_fn(config, positions: str, recompute: bool):
    """Single-prompt map (blocks, ctx, x) -> h_L at the last position (blocks: the model's full stack)."""
    if positions == "last" and not recompute:
        return functools.partial(tail_last, config)

    def fn(blocks, ctx, x):
        real = ctx.attention_mask.astype(bool)
        steer_mask = real if positions == "all" else jnp.arange(real.shape[0]) == real.shape[0] - 1
        return tail_full(config, blocks, ctx, x, steer_mask)

    return fn


def jacfwd_chunked(fn, x0, chunk: int):
    """Dense Jacobian (out, d) of fn at x0 (d,) by JVPs along the basis, at most `chunk` tangents at a time
    (in ceil(d / chunk) equal chunks, so little padding: d = 896 with chunk 256 runs 4 x 224, not 4 x 256)."""
    d = x0.shape[0]
    n_chunks = -(-d // max(1, min(chunk, d)))
    chunk = -(-d // n_chunks)
    pad = (-d) % chunk
    basis = jnp.concatenate([jnp.eye(d, dtype=x0.dtype), jnp.zeros((pad, d), x0.dtype)])
    jvp_one = lambda t: jax.jvp(fn, (x0,), (t,))[1]  # noqa: E731
    cols = jax.lax.map(jax.vmap(jvp_one), basis.reshape(-1, chunk, d))  # (n_chunks, chunk, out...)
    cols = cols.reshape(-1, *cols.shape[2:])[:d]
    return jnp.moveaxis(cols, 0, -1)


@functools.lru_cache(maxsize=None)
def _compiled(config, observable: str, positions: str, recompute: bool, chunk: int):
    """jit-compiled batched (vmapped over prompts) Jacobian routines for one configuration."""
    tail = _tail_fn(config, positions, recompute)

    def f_obs(params, ctx, x):
        return observe(config, params, tail(params["blocks"], ctx, x), observable)

    def normed(params, ctx, x):
        return causal_lm.final_norm(config, params, tail(params["blocks"], ctx, x))

    def zero(ctx):
        return jnp.zeros(ctx.h.shape[-1], ctx.h.dtype)

    def matvec(params, ctx, v):
        return jax.jvp(lambda x: f_obs(params, ctx, x), (zero(ctx),), (v,))[1]

    def rmatvec(params, ctx, u):
        return jax.vjp(lambda x: f_obs(params, ctx, x), zero(ctx))[1](u)[0]

    def gram_matvec(params, ctx, v):
        return rmatvec(params, ctx, matvec(params, ctx, v))

    def dense(params, ctx):
        return jacfwd_chunked(lambda x: f_obs(params, ctx, x), zero(ctx), chunk)

    def normed_jacobian(params, ctx):
        return jacfwd_chunked(lambda x: normed(params, ctx, x), zero(ctx), chunk)

    def last_probs(params, ctx):
        return jax.nn.softmax(observe(config, params, tail(params["blocks"], ctx, zero(ctx)), "logits"))

    def linearise(args):
        """(J v, J^T u) closures over one linearisation (the primal runs once, not at every product)."""
        params, ctx = args
        out, jvp_fn = jax.linearize(lambda x: f_obs(params, ctx, x), zero(ctx))
        transpose = jax.linear_transpose(jvp_fn, zero(ctx))
        return (lambda v: jvp_fn(v).astype(ctx.h.dtype)), (lambda u: transpose(u.astype(out.dtype))[0])

    def linearise_reduced(args):
        """Closures (v -> M D v, y -> D^T M^T y) for the reduced operator M D (r x d) with the same singular
        triplets as J = E M D (see `observable_factor`); D = d norm(h_L)/dx is linearised once."""
        params, ctx, factor = args
        _, jvp_fn = jax.linearize(lambda x: normed(params, ctx, x), zero(ctx))
        transpose = jax.linear_transpose(jvp_fn, zero(ctx))
        return (lambda v: factor @ jvp_fn(v).astype(factor.dtype),
                lambda y: transpose((factor.T @ y).astype(ctx.h.dtype))[0])

    def gram_sum(args, v):
        params, ctx = args
        return jnp.sum(jax.vmap(gram_matvec, in_axes=(None, 0, None))(params, ctx, v), axis=0)

    over_prompts = lambda fn, *axes: xla.jit(jax.vmap(fn, in_axes=(None, 0, *axes)))  # noqa: E731
    return {
        # un-jitted, args-first single-prompt / stacked products for the Lanczos solvers
        "matvec_one": lambda args, v: matvec(*args, v),
        "rmatvec_one": lambda args, u: rmatvec(*args, u),
        "linearise": linearise,  # prepare step for Lanczos: then matvec = args[0], rmatvec = args[1]
        "linearise_reduced": linearise_reduced,
        "linear_matvec": lambda fns, v: fns[0](v),
        "linear_rmatvec": lambda fns, u: fns[1](u),
        "gram_sum": gram_sum,
        "matvec": over_prompts(matvec, 0),
        "rmatvec": over_prompts(rmatvec, 0),
        "matvec_block": xla.jit(lambda p, ctx, vs: jax.vmap(lambda v: matvec(p, ctx, v))(vs)),
        "rmatvec_block": xla.jit(lambda p, ctx, us: jax.vmap(lambda u: rmatvec(p, ctx, u))(us)),
        "gram_matvec": xla.jit(lambda p, ctx, v: gram_sum((p, ctx), v)),
        "dense": over_prompts(dense),
        "normed_jacobian": over_prompts(normed_jacobian),
        "probs": over_prompts(last_probs),
        "value": over_prompts(lambda p, ctx: f_obs(p, ctx, zero(ctx))),
    }


# ----------------------------------------------------------------------------- unembedding reduction

def unembedding_reduction(lm: LanguageModel) -> dict[str, np.ndarray]:
    """Thin QR of W_U (V, d) in float64, cached on the model: R (d, d), b = Q^T 1 (d,), and
    r_norm = ||1 - Q b|| (the part of the all-ones vector outside range(W_U))."""
    key = ("unembedding_qr", id(causal_lm.unembedding(lm.params)))
    if key not in lm.cache:
        w = np.asarray(causal_lm.unembedding(lm.params), np.float64)
        q, r = np.linalg.qr(w, mode="reduced")
        b = q.T @ np.ones(w.shape[0])
        r_norm = float(np.linalg.norm(np.ones(w.shape[0]) - q @ b))
        lm.cache[key] = {"R": r, "b": b, "r_norm": r_norm}
    return lm.cache[key]


def observable_factor(reduction: dict[str, np.ndarray], w_unembed: np.ndarray, observable: str,
                      probs: np.ndarray | None = None) -> np.ndarray:
    """M with orthonormal-column E such that (output map) = E M: logits W_U = Q R gives M = R (d, d);
    log-probs (I - 1 p^T) W_U = [Q, r/|r|] [[R - b wbar^T], [-|r| wbar^T]] with wbar = W_U^T p, so
    M is (d + 1, d). sigma(J) = sigma(M D) for D = d norm(h_L)/dx."""
    if observable == "logits":
        return reduction["R"]
    wbar = w_unembed.T @ np.asarray(probs, np.float64)
    top = reduction["R"] - np.outer(reduction["b"], wbar)
    return np.vstack([top, -reduction["r_norm"] * wbar[None, :]])


# ----------------------------------------------------------------------------- public operator

@dataclasses.dataclass
class JacobianOperator:
    """Jacobians J_i (V x d) of the last-position observable w.r.t. h_layer for a batch of prompts.

    matvec(v (d,) or (B, d)) -> J_i v (B, V); rmatvec(u (B, V)) -> J_i^T u_i (B, d);
    gram_matvec(x (d,)) -> sum_i J_i^T J_i x (d,); dense() -> (B, V, d);
    normed_tail_jacobian() -> D_i (B, d, d); factors() -> C_i (B, r, d) float64 with J_i^T J_i = C_i^T C_i;
    singular_values() -> (B, d) float64, the exact spectra.
    All prompt loops are vmapped."""

    lm: LanguageModel
    batch: TokenBatch
    layer: int
    observable: str = "logits"
    positions: str = "last"
    recompute: bool = False
    chunk: int | None = None  # JVP tangents per chunk; None: default_chunk(positions, recompute)

    def __post_init__(self):
        if self.observable not in OBSERVABLES:
            raise InputError(f"unknown observable {self.observable!r}; choose one of {OBSERVABLES}")
        if self.positions not in JACOBIAN_POSITIONS:
            raise InputError(f"Jacobian positions must be one of {JACOBIAN_POSITIONS}, got {self.positions!r}")
        L = self.lm.num_layers
        if isinstance(self.layer, bool) or not isinstance(self.layer, (int, np.integer)) or not 0 <= self.layer <= L:
            raise SteeringError(f"layer {self.layer!r} is outside [0, {L}] (this model has {L} blocks)")
        self.batch = as_token_batch(self.batch)
        self.lm.check_ids(self.batch)
        self.layer = int(self.layer)
        self.ctx = _tail_context(self.lm.config, self.lm.params,
                                 TokenBatch(self.lm.to_device(self.batch.ids),
                                            self.lm.to_device(self.batch.attention_mask)),
                                 self.layer)
        if self.chunk is None:
            self.chunk = default_chunk(self.positions, self.recompute)
        self._fns = _compiled(self.lm.config, self.observable, self.positions, self.recompute, int(self.chunk))

    @property
    def num_prompts(self) -> int:
        return int(self.batch.ids.shape[0])

    def _call(self, name, *args):
        return self._fns[name](self.lm.params, self.ctx, *args)

    def value(self):
        """Unsteered observable at the last position (B, V)."""
        return self._call("value")

    def probs(self):
        """Unsteered next-token probabilities at the last position (B, V)."""
        return self._call("probs")

    def matvec(self, v):
        v = jnp.asarray(v, self.lm.dtype)
        v = jnp.broadcast_to(v, (self.num_prompts, self.lm.d)) if v.ndim == 1 else v
        return self._call("matvec", v)

    def rmatvec(self, u):
        return self._call("rmatvec", jnp.asarray(u, self.lm.dtype))

    def gram_matvec(self, x):
        return self._call("gram_matvec", jnp.asarray(x, self.lm.dtype))

    def dense(self):
        return self._call("dense")

    def normed_tail_jacobian(self):
        return self._call("normed_jacobian")

    def prompt_context(self, index: int) -> TailContext:
        """The TailContext of one prompt (no leading B axis)."""
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or not 0 <= index < self.num_prompts:
            raise InputError(f"prompt {index!r} is outside [0, {self.num_prompts}) (this operator holds "
                             f"{self.num_prompts} prompts)")
        return jax.tree.map(lambda x: x[index], self.ctx)

    def top_singular(self, k: int, prompt: int = 0, block: int | None = None, max_blocks: int = 12,
                     tol: float | None = None, seed: int = 0, reduced: bool = True,
                     method: str = "auto") -> lanczos.SVDResult:
        """Top-k singular triplets (s (k,), u (V, k), v (d, k)) of J_prompt, with their residuals
        ||J^T u - s v|| and whether all are <= tol * s_1 (tol default `lanczos.default_tolerance`).

        method "lanczos": block Golub-Kahan (`lanczos.top_singular_triplets`, a ConvergenceWarning says when
        it stopped short), matrix-free in the tail: batched jvp / vjp of one linearisation. reduced=True
        (default) runs it on M D (r x d, r = d or d + 1) instead of J = E M D (V x d): same triplets, without
        the V x d unembedding in every product (W_U = Q R is factored once per model; `observable_factor`);
        u is then J v / s from one block of k JVPs. reduced=False runs on J itself.
        method "dense": the exact route (d JVPs give D, then a float64 SVD of M D), u = J v / s, and the
        residuals from one block of k VJPs. method "auto" (default) takes "dense" when
        `dense_is_cheaper(d, k, block)` (so for d up to 1152 at k = 32; Lanczos on 4096-wide models)."""
        if method not in TOP_SINGULAR_METHODS:
            raise InputError(f"top_singular method must be one of {TOP_SINGULAR_METHODS}, got {method!r}")
        if not 0 < k <= self.lm.d:
            raise InputError(f"need 0 < k <= d = {self.lm.d}; got k={k}")
        ctx = self.prompt_context(prompt)
        if method == "dense" or (method == "auto" and dense_is_cheaper(self.lm.d, k, block)):
            return self._top_singular_dense(k, prompt, ctx, tol)
        if not reduced:
            return lanczos.top_singular_triplets(self._fns["linear_matvec"], self._fns["linear_rmatvec"],
                                                 (self.lm.params, ctx), self.lm.config.vocab_size,
                                                 self.lm.d, k, block, max_blocks, tol, seed, self.lm.dtype,
                                                 prepare=self._fns["linearise"])
        factor = jnp.asarray(self.observable_factor(prompt), self.lm.dtype)
        res = lanczos.top_singular_triplets(self._fns["linear_matvec"], self._fns["linear_rmatvec"],
                                            (self.lm.params, ctx, factor), factor.shape[0],
                                            self.lm.d, k, block, max_blocks, tol, seed, self.lm.dtype,
                                            prepare=self._fns["linearise_reduced"])
        u = self._left_vectors(ctx, res.s, res.v)
        return res._replace(u=u, products=res.products + k)

    def _left_vectors(self, ctx: TailContext, s, v):
        """u = J v / s (V, k) from one block of k JVPs (v (d, k), s (k,))."""
        images = self._fns["matvec_block"](self.lm.params, ctx, v.T)  # (k, V): J v_i
        return (images / jnp.maximum(s, jnp.finfo(s.dtype).tiny)[:, None]).T.astype(v.dtype)

    def _top_singular_dense(self, k: int, prompt: int, ctx: TailContext, tol: float | None) -> lanczos.SVDResult:
        """Top-k triplets from the exact route: C = M D (float64), its SVD, u = J v / s; residuals
        ||J^T u - s v|| from k VJPs (d + 2k products)."""
        one = jax.tree.map(lambda x: x[prompt:prompt + 1], self.ctx)
        d_mat = np.asarray(self._fns["normed_jacobian"](self.lm.params, one)[0], np.float64)
        with blas.dense_threads(self.lm.d):
            _, s64, vt = np.linalg.svd(self.observable_factor(prompt) @ d_mat, full_matrices=False)
        s, v = jnp.asarray(s64[:k], self.lm.dtype), jnp.asarray(vt[:k].T, self.lm.dtype)
        u = self._left_vectors(ctx, s, v)
        back = self._fns["rmatvec_block"](self.lm.params, ctx, u.T)  # (k, d): J^T u_i
        resid = jnp.linalg.norm(back - s[:, None] * v.T, axis=1)
        tol = lanczos.default_tolerance(self.lm.dtype) if tol is None else float(tol)
        converged = lanczos.residuals_converged(resid, float(s[0]), tol, (
            f"top-{k} singular triplets from the exact route", "s_1",
            "the Jacobian is computed in too low a precision for this tol (load the model in float32/float64)"))
        return lanczos.SVDResult(s, u, v, resid, converged, self.lm.d + 2 * k)

    def top_stacked(self, k: int, n_prompts: int | None = None, steps: int | None = None,
                    seed: int = 0, tol: float | None = None) -> lanczos.SVDResult:
        """Top-k singular values / right vectors of the stacked J = [J_1; ...; J_n] (first n prompts) by
        Lanczos on sum_i J_i^T J_i; u is empty and residuals are ||J^T J v - s^2 v|| / s. Squares the
        condition number: for the top of the spectrum only (use `factors` for small singular values)."""
        n = n_prompts or self.num_prompts
        ctx = jax.tree.map(lambda x: x[:n], self.ctx)
        res = lanczos.lanczos_eigh(self._fns["gram_sum"], (self.lm.params, ctx), self.lm.d,
                                   k, steps, seed, self.lm.dtype, tol)
        s = jnp.sqrt(jnp.maximum(res.w, 0.0))
        return lanczos.SVDResult(s, jnp.zeros((0, k), res.v.dtype), res.v,
                                 res.residuals / jnp.maximum(s, jnp.finfo(s.dtype).tiny), res.converged)

    def observable_factors(self, prompts: list[int] | None = None) -> np.ndarray:
        """M_i (B, r, d) float64 for the prompt indices `prompts` (default all): the output map
        restricted to the final-norm output is E_i M_i with orthonormal-column E_i (r = d for logits, the
        same R for every prompt; d + 1 for log-probs; see `observable_factor`)."""
        reduction = unembedding_reduction(self.lm)
        count = self.num_prompts if prompts is None else len(prompts)
        if self.observable == "logits":
            return np.broadcast_to(reduction["R"], (count, *reduction["R"].shape))
        w = np.asarray(causal_lm.unembedding(self.lm.params), np.float64)
        probs = np.asarray(self.probs(), np.float64)
        probs = probs if prompts is None else probs[prompts]
        return np.stack([observable_factor(reduction, w, "logprobs", p) for p in probs])

    def observable_factor(self, prompt: int = 0) -> np.ndarray:
        """M (r, d) float64 of one prompt (see `observable_factors`)."""
        return self.observable_factors([prompt])[0]

    def factors(self) -> np.ndarray:
        """Exact float64 factors C_i = M_i D_i (B, r, d), r = d (logits) or d + 1 (logprobs):
        sigma(J_i) = sigma(C_i) and J_i^T J_i = C_i^T C_i."""
        d_mats = np.asarray(self.normed_tail_jacobian(), np.float64)
        with blas.dense_threads(self.lm.d):
            return np.matmul(self.observable_factors(), d_mats)  # BLAS (np.einsum here would loop in C)

    def singular_values(self) -> np.ndarray:
        """Exact singular values (B, d) float64, descending, of every J_i: SVDs of `factors()`, under the
        BLAS thread policy of `steerjax.blas` (one thread for d <= 768)."""
        return spectrum.factor_singular_values(self.factors())


def jacobian_operator(lm: LanguageModel, ids, layer: int, observable: str = "logits",
                      positions: str = "last", recompute: bool = False, chunk: int | None = None) -> JacobianOperator:
    """JacobianOperator for a batch of prompts (TokenBatch, (B, T) ids or ragged lists)."""
    return JacobianOperator(lm, ids, layer, observable, positions, recompute, chunk)


def jacobian(lm: LanguageModel, ids, layer: int, observable: str = "logits", positions: str = "last",
             recompute: bool = False):
    """Exact dense Jacobian (V, d) of the last-position observable w.r.t. h_layer for one prompt
    (ids (T,) or (1, T))."""
    op = jacobian_operator(lm, ids, layer, observable, positions, recompute)
    if op.num_prompts != 1:
        raise InputError(f"sj.jacobian takes one prompt, got {op.num_prompts}; use sj.jacobian_operator")
    return op.dense()[0]
