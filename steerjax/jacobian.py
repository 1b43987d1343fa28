"""JacobianOperator: exact Jacobians of the last-position observable with respect to the steered h_l, taken
at a point.

For a prompt, f(x) = observable(last position | h_l + x at the steered positions) (`steerjax.tail`), and the
operator is J = df/dx at x = `at` (V x d; `at` None is the unsteered point 0, like lineax's
`JacobianLinearOperator(fn, x, args)` the point is a field). Products J v, J^T u and the stacked Gram
sum_i J_i^T J_i x run matrix-free (jvp / vjp through the tail, vmapped over prompts).

Exact spectra without forming V x d or squaring the condition number: with D = d norm(h_L) / dx (d x d,
from d JVPs) and the thin QR W_U = Q R (once per model), J_logits = Q (R D), so sigma(J) = sigma(R D).
For log-probabilities J = (I - 1 p^T) W_U D, and with 1 = Q b + r the same reduction gives a (d+1) x d
factor (see `observable_factor`). `JacobianOperator.factors()` is the one place the exact factor C = M D is
formed. Stacking factors of many prompts gives the stacked operator sum_i J_i^T J_i = C^T C with
C = [C_1; ...; C_n], again without squaring.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from steerjax import blas, lanczos, spectrum, xla
from steerjax.checks import check_index, check_int, check_layer, finite_array
from steerjax.errors import InputError
from steerjax.model import LanguageModel, TokenBatch, as_token_batch
from steerjax.models import causal_lm
from steerjax.tail import (TAIL_POSITIONS, TailContext, default_chunk, jacfwd_chunked, observe, tail_context,
                           tail_fn)
from steerjax.tail import OBSERVABLES as FUNCTION_OBSERVABLES

# "fisher": the whitened logit Jacobian J_F = diag(sqrt p)(I - 1 p^T) J_logits (p: next-token probabilities at the
# point), so ||J_F u||^2 = u^T F u with F the categorical Fisher information in h_l: a steer s u changes the
# next-token distribution by KL = 0.5 s^2 ||J_F u||^2 nats to second order (either direction of the KL)
OBSERVABLES = (*FUNCTION_OBSERVABLES, "fisher")
JACOBIAN_POSITIONS = TAIL_POSITIONS
UNEMBEDDING_QR = "unembedding_qr"

TOP_SINGULAR_METHODS = ("auto", "lanczos", "dense")
# rounds block Lanczos is assumed to need in `dense_is_cheaper` (5-6 on SmolLM2's J at k = 8-64, 10 on a
# random-weight model's flat spectrum). Measured on SmolLM2 (d 576, float32, 2 cores): k = 16 / 32 / 64
# took 1.7 / 1.7 / 1.9 s dense and 3.6 / 3.3 / 2.6 s by block Lanczos; k = 8 was 3.4 vs 2.7 s
EXPECTED_LANCZOS_ROUNDS = 6


def dense_is_cheaper(d: int, k: int, block: int | None = None, rounds: int = EXPECTED_LANCZOS_ROUNDS) -> bool:
    """Cost model for top-k: the exact route takes d JVPs; block Lanczos takes `rounds` rounds of a block of
    JVPs and a block of VJPs (a VJP ~ 2 JVPs), i.e. 3 * block * rounds JVP-equivalents."""
    return d <= 3 * (block or lanczos.default_block(k)) * rounds


class OperatorFunctions(NamedTuple):
    """The compiled routines of one operator configuration (config, observable, positions, recompute, chunk).

    Batched (vmapped over prompts, jit-compiled), arguments (params, ctx (B, ...), at (B, d), ...):
      value, probs -> (B, V); matvec(v (B, d)) -> (B, V); rmatvec(u (B, V)) -> (B, d);
      gram_matvec(x (d,)) -> (d,); dense -> (B, V, d); normed_jacobian -> (B, d, d).
    One prompt (ctx and at without the B axis), jit-compiled: matvec_block(vs (k, d)) -> (k, V),
      rmatvec_block(us (k, V)) -> (k, d).
    For the Krylov solvers (un-jitted, traced inside them; args-first):
      linearise((params, ctx, at)) -> (v -> J v, u -> J^T u) from one linearisation;
      linearise_reduced((params, ctx, at, M)) -> (v -> M D v, y -> D^T M^T y);
      apply_forward / apply_transpose((fwd, bwd), x): the products of a linearisation;
      gram_sum((params, ctx (B, ...), at (B, d)), v) -> sum_i J_i^T J_i v."""

    value: Callable
    probs: Callable
    matvec: Callable
    rmatvec: Callable
    gram_matvec: Callable
    dense: Callable
    normed_jacobian: Callable
    matvec_block: Callable
    rmatvec_block: Callable
    linearise: Callable
    linearise_reduced: Callable
    apply_forward: Callable
    apply_transpose: Callable
    gram_sum: Callable


def apply_forward(fns, v):
    return fns[0](v)


def apply_transpose(fns, u):
    return fns[1](u)


def whiten(probs, y):
    """diag(sqrt p)(I - 1 p^T) y for logit tangents y (..., V) and probabilities p (..., V)."""
    return jnp.sqrt(probs) * (y - jnp.sum(probs * y, axis=-1, keepdims=True))


def whiten_transpose(probs, u):
    """(I - p 1^T) diag(sqrt p) u: the transpose of `whiten` applied to cotangents u (..., V)."""
    su = jnp.sqrt(probs) * u
    return su - probs * jnp.sum(su, axis=-1, keepdims=True)


@functools.lru_cache(maxsize=None)
def operator_functions(config, observable: str, positions: str, recompute: bool, chunk: int) -> OperatorFunctions:
    """`OperatorFunctions` for one configuration, built once (their identities are stable, so the jit caches of
    the Krylov solvers, which take them as static arguments, are shared by every operator)."""
    tail = tail_fn(config, positions, recompute)
    fisher = observable == "fisher"
    function_observable = "logits" if fisher else observable   # the fisher map whitens the logits' tangents

    def f_obs(params, ctx, x):
        return observe(config, params, tail(params["blocks"], ctx, x), function_observable)

    def out_tangent(primal, y):
        """J v from the function's tangent y: whitened for the fisher observable (p from the primal logits)."""
        return whiten(jax.nn.softmax(primal, axis=-1), y) if fisher else y

    def in_cotangent(primal, u):
        return whiten_transpose(jax.nn.softmax(primal, axis=-1), u) if fisher else u

    def normed(params, ctx, x):
        return causal_lm.final_norm(config, params, tail(params["blocks"], ctx, x))

    def matvec(params, ctx, at, v):
        primal, y = jax.jvp(lambda x: f_obs(params, ctx, x), (at,), (v,))
        return out_tangent(primal, y)

    def rmatvec(params, ctx, at, u):
        primal, pullback = jax.vjp(lambda x: f_obs(params, ctx, x), at)
        return pullback(in_cotangent(primal, u).astype(primal.dtype))[0]

    def gram_matvec(params, ctx, at, v):
        return rmatvec(params, ctx, at, matvec(params, ctx, at, v))

    def dense(params, ctx, at):
        jac = jacfwd_chunked(lambda x: f_obs(params, ctx, x), at, chunk)  # (V, d)
        if not fisher:
            return jac
        return out_tangent(f_obs(params, ctx, at), jac.T).T          # whiten each column J e_k

    def normed_jacobian(params, ctx, at):
        return jacfwd_chunked(lambda x: normed(params, ctx, x), at, chunk)

    def probs(params, ctx, at):
        return jax.nn.softmax(observe(config, params, tail(params["blocks"], ctx, at), "logits"))

    def linearise(args):
        """(J v, J^T u) closures over one linearisation (the primal runs once, not at every product)."""
        params, ctx, at = args
        out, jvp_fn = jax.linearize(lambda x: f_obs(params, ctx, x), at)
        transpose = jax.linear_transpose(jvp_fn, at)
        return ((lambda v: out_tangent(out, jvp_fn(v)).astype(ctx.h.dtype)),
                (lambda u: transpose(in_cotangent(out, u).astype(out.dtype))[0]))

    def linearise_reduced(args):
        """Closures (v -> M D v, y -> D^T M^T y) for the reduced operator M D (r x d) with the same singular
        triplets as J = E M D (see `observable_factor`); D = d norm(h_L)/dx is linearised once."""
        params, ctx, at, factor = args
        _, jvp_fn = jax.linearize(lambda x: normed(params, ctx, x), at)
        transpose = jax.linear_transpose(jvp_fn, at)
        return (lambda v: factor @ jvp_fn(v).astype(factor.dtype),
                lambda y: transpose((factor.T @ y).astype(ctx.h.dtype))[0])

    def gram_sum(args, v):
        params, ctx, at = args
        return jnp.sum(jax.vmap(gram_matvec, in_axes=(None, 0, 0, None))(params, ctx, at, v), axis=0)

    def value(params, ctx, at):
        out = f_obs(params, ctx, at)
        return jax.nn.log_softmax(out, axis=-1) if fisher else out

    over_prompts = lambda fn, *axes: xla.jit(jax.vmap(fn, in_axes=(None, 0, 0, *axes)))
    return OperatorFunctions(
        value=over_prompts(value),
        probs=over_prompts(probs),
        matvec=over_prompts(matvec, 0),
        rmatvec=over_prompts(rmatvec, 0),
        gram_matvec=xla.jit(lambda p, ctx, at, v: gram_sum((p, ctx, at), v)),
        dense=over_prompts(dense),
        normed_jacobian=over_prompts(normed_jacobian),
        matvec_block=xla.jit(lambda p, ctx, at, vs: jax.vmap(lambda v: matvec(p, ctx, at, v))(vs)),
        rmatvec_block=xla.jit(lambda p, ctx, at, us: jax.vmap(lambda u: rmatvec(p, ctx, at, u))(us)),
        linearise=linearise, linearise_reduced=linearise_reduced, apply_forward=apply_forward,
        apply_transpose=apply_transpose, gram_sum=gram_sum)


# ----------------------------------------------------------------------------- unembedding reduction

def unembedding_reduction(lm: LanguageModel) -> dict[str, np.ndarray]:
    """Thin QR of W_U (V, d) in float64, cached with the model (`lm.cache`, tied to the W_U array it came from):
    R (d, d), b = Q^T 1 (d,), and r_norm = ||1 - Q b|| (the part of the all-ones vector outside range(W_U))."""
    w_unembed = lm.unembedding

    def reduce():
        w = np.asarray(w_unembed, np.float64)
        q, r = np.linalg.qr(w, mode="reduced")
        b = q.T @ np.ones(w.shape[0])
        r_norm = float(np.linalg.norm(np.ones(w.shape[0]) - q @ b))
        return {"R": r, "b": b, "r_norm": r_norm}

    return lm.cache.get(UNEMBEDDING_QR, (w_unembed,), reduce)


def observable_factor(reduction: dict[str, np.ndarray], w_unembed: np.ndarray, observable: str,
                      probs: np.ndarray | None = None) -> np.ndarray:
    """M with orthonormal-column E such that (output map) = E M: logits W_U = Q R gives M = R (d, d);
    log-probs (I - 1 p^T) W_U = [Q, r/|r|] [[R - b wbar^T], [-|r| wbar^T]] with wbar = W_U^T p, so
    M is (d + 1, d); fisher: `fisher_factor` (d, d). sigma(J) = sigma(M D) for D = d norm(h_L)/dx."""
    if observable == "logits":
        return reduction["R"]
    if observable == "fisher":
        return fisher_factor(w_unembed, probs)
    wbar = w_unembed.T @ np.asarray(probs, np.float64)
    top = reduction["R"] - np.outer(reduction["b"], wbar)
    return np.vstack([top, -reduction["r_norm"] * wbar[None, :]])


def fisher_factor(w_unembed: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """M_F (d, d) float64 with M_F^T M_F = W_U^T (diag p - p p^T) W_U, the categorical Fisher in the final-norm
    output, so that sigma(J_F) = sigma(M_F D) and J_F^T J_F = D^T M_F^T M_F D for the whitened logit Jacobian
    J_F = diag(sqrt p)(I - 1 p^T) W_U D. One V x d product and a d x d eigendecomposition (0.3 s on SmolLM2; a QR
    of the whitened V x d matrix took 3 s): the rounding is absolute, ~1e-16 of the largest eigenvalue, so second-order
    KLs (eigenvalues) keep ~1e-16 of the largest and singular values ~1e-8 of sigma_max."""
    p = np.asarray(probs, np.float64)
    w = np.asarray(w_unembed, np.float64)
    wbar = p @ w
    gram = (w * p[:, None]).T @ w - np.outer(wbar, wbar)      # V x d: every BLAS thread (2x faster on 2 cores)
    with blas.dense_threads(w.shape[1]):
        lam, vec = np.linalg.eigh(0.5 * (gram + gram.T))
    return np.sqrt(np.maximum(lam, 0.0))[:, None] * vec.T


# ----------------------------------------------------------------------------- public operator

@dataclasses.dataclass
class JacobianOperator:
    """Jacobians J_i (V x d) of the last-position observable w.r.t. h_layer for a batch of prompts, taken at
    the point h_layer + at_i (at None: the unsteered point; (d,) or (B, d): a steering offset added at the
    steered positions before linearising).

    matvec(v (d,) or (B, d)) -> J_i v (B, V); rmatvec(u (B, V)) -> J_i^T u_i (B, d);
    gram_matvec(x (d,)) -> sum_i J_i^T J_i x (d,); dense() -> (B, V, d); value() / probs() -> (B, V) at the
    point; normed_tail_jacobian() -> D_i (B, d, d); factors() -> C_i (B, r, d) float64 with
    J_i^T J_i = C_i^T C_i; singular_values() -> (B, d) float64, the exact spectra.
    All prompt loops are vmapped."""

    lm: LanguageModel
    batch: TokenBatch
    layer: int
    observable: str = "logits"
    positions: str = "last"
    recompute: bool = False
    chunk: int | None = None  # JVP tangents per chunk; None: default_chunk(positions, recompute)
    at: Any = None  # steering offset (d,) or (B, d) the Jacobians are taken at; None: 0

    def __post_init__(self):
        if self.observable not in OBSERVABLES:
            raise InputError(f"unknown observable {self.observable!r}; choose one of {OBSERVABLES}")
        if self.positions not in JACOBIAN_POSITIONS:
            raise InputError(f"Jacobian positions must be one of {JACOBIAN_POSITIONS}, got {self.positions!r}")
        self.layer = check_layer(self.layer, self.lm.num_layers)
        self.batch = as_token_batch(self.batch)
        self.lm.check_ids(self.batch)
        self.ctx = tail_context(self.lm.config, self.lm.params,
                                TokenBatch(self.lm.to_device(self.batch.ids),
                                           self.lm.to_device(self.batch.attention_mask)),
                                self.layer)
        self.point = self.lm.to_device(self._point_array(self.at))
        self.chunk = default_chunk(self.positions, self.recompute) if self.chunk is None else check_int(
            self.chunk, "chunk", low=1)
        self.fns = operator_functions(self.lm.config, self.observable, self.positions, self.recompute, self.chunk)

    def _point_array(self, at) -> np.ndarray:
        """at as a (B, d) array in the model dtype (zeros for None)."""
        shape = (self.num_prompts, self.lm.d)
        if at is None:
            return jnp.zeros(shape, self.lm.dtype)
        at = finite_array(at, "at (the steering offset of the operator's point)", (1, 2))
        if at.shape not in (shape[1:], shape):
            raise InputError(f"at must be ({self.lm.d},) or ({self.num_prompts}, {self.lm.d}) (one offset per "
                             f"prompt), got shape {at.shape}")
        return jnp.asarray(np.broadcast_to(at, shape), self.lm.dtype)

    @property
    def num_prompts(self) -> int:
        return int(self.batch.ids.shape[0])

    def _call(self, fn, *args):
        return fn(self.lm.params, self.ctx, self.point, *args)

    def value(self):
        """Observable at the last position at the operator's point (B, V) (log-probabilities for "fisher")."""
        return self._call(self.fns.value)

    def probs(self):
        """Next-token probabilities at the last position at the operator's point (B, V)."""
        return self._call(self.fns.probs)

    def value_at(self, at):
        """Observable at the last position (B, V) at the point h_layer + at instead of the operator's own point
        (at (d,) or (B, d), added at the operator's steered positions): exact forward passes of the tail, e.g.
        for the KL of finite steers (`steerjax.strength`)."""
        return self.fns.value(self.lm.params, self.ctx, self.lm.to_device(self._point_array(at)))

    def matvec(self, v):
        v = jnp.asarray(v, self.lm.dtype)
        v = jnp.broadcast_to(v, (self.num_prompts, self.lm.d)) if v.ndim == 1 else v
        return self._call(self.fns.matvec, v)

    def rmatvec(self, u):
        return self._call(self.fns.rmatvec, jnp.asarray(u, self.lm.dtype))

    def gram_matvec(self, x):
        return self._call(self.fns.gram_matvec, jnp.asarray(x, self.lm.dtype))

    def dense(self):
        return self._call(self.fns.dense)

    def normed_tail_jacobian(self):
        """D_i = d final_norm(h_L) / dx at the point (B, d, d): the logit Jacobian is J_i = W_U D_i."""
        return self._call(self.fns.normed_jacobian)

    def steered_states(self) -> np.ndarray:
        """h_layer at the last prompt token of each prompt, unsteered (B, d) float64 (e.g. for ||h_l||)."""
        return np.asarray(self.ctx.h[:, -1], np.float64)

    def prompt_context(self, index: int) -> TailContext:
        """The TailContext of one prompt (no leading B axis)."""
        index = check_index(index, self.num_prompts, "prompt", f"this operator holds {self.num_prompts} prompts")
        return jax.tree.map(lambda x: x[index], self.ctx)

    def tail_args(self, prompts: slice | None = None) -> tuple:
        """(params, ctx) of the operator's prompts (optionally a slice of them): the `aux` argument of
        `steerjax.tail.steered_observable(config, observable)`, which adds its v to h_layer directly (add the
        operator's `at` yourself to evaluate around the point)."""
        ctx = self.ctx if prompts is None else jax.tree.map(lambda x: x[prompts], self.ctx)
        return (self.lm.params, ctx)

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
        k = check_int(k, "k (the number of singular triplets)", 1, self.lm.d)
        ctx = self.prompt_context(prompt)
        at = self.point[prompt]
        if method == "dense" or (method == "auto" and dense_is_cheaper(self.lm.d, k, block)):
            return self._top_singular_dense(k, prompt, ctx, tol)
        if not reduced:
            return lanczos.top_singular_triplets(self.fns.apply_forward, self.fns.apply_transpose,
                                                 (self.lm.params, ctx, at), self.lm.config.vocab_size,
                                                 self.lm.d, k, block, max_blocks, tol, seed, self.lm.dtype,
                                                 prepare=self.fns.linearise)
        factor = jnp.asarray(self.observable_factor(prompt), self.lm.dtype)
        res = lanczos.top_singular_triplets(self.fns.apply_forward, self.fns.apply_transpose,
                                            (self.lm.params, ctx, at, factor), factor.shape[0],
                                            self.lm.d, k, block, max_blocks, tol, seed, self.lm.dtype,
                                            prepare=self.fns.linearise_reduced)
        u = self._left_vectors(prompt, res.s, res.v)
        return res._replace(u=u, products=res.products + k)

    def _left_vectors(self, prompt: int, s, v):
        """u = J v / s (V, k) from one block of k JVPs (v (d, k), s (k,))."""
        images = self.fns.matvec_block(self.lm.params, self.prompt_context(prompt), self.point[prompt], v.T)
        return (images / jnp.maximum(s, jnp.finfo(s.dtype).tiny)[:, None]).T.astype(v.dtype)

    def _top_singular_dense(self, k: int, prompt: int, ctx: TailContext, tol: float | None) -> lanczos.SVDResult:
        """Top-k triplets from the exact route: C = M D (float64), its SVD, u = J v / s; residuals
        ||J^T u - s v|| from k VJPs (d + 2k products)."""
        rows = slice(prompt, prompt + 1)
        one = jax.tree.map(lambda x: x[rows], self.ctx)
        d_mat = np.asarray(self.fns.normed_jacobian(self.lm.params, one, self.point[rows])[0], np.float64)
        with blas.dense_threads(self.lm.d):
            _, s64, vt = np.linalg.svd(self.observable_factor(prompt) @ d_mat, full_matrices=False)
        s, v = jnp.asarray(s64[:k], self.lm.dtype), jnp.asarray(vt[:k].T, self.lm.dtype)
        u = self._left_vectors(prompt, s, v)
        back = self.fns.rmatvec_block(self.lm.params, ctx, self.point[prompt], u.T)  # (k, d): J^T u_i
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
        res = lanczos.lanczos_eigh(self.fns.gram_sum, (self.lm.params, ctx, self.point[:n]), self.lm.d,
                                   k, steps, seed, self.lm.dtype, tol)
        s = jnp.sqrt(jnp.maximum(res.w, 0.0))
        return lanczos.SVDResult(s, jnp.zeros((0, k), res.v.dtype), res.v,
                                 res.residuals / jnp.maximum(s, jnp.finfo(s.dtype).tiny), res.converged)

    def observable_factors(self, prompts: list[int] | None = None) -> np.ndarray:
        """M_i (B, r, d) float64 for the prompt indices `prompts` (default all): the output map
        restricted to the final-norm output is E_i M_i with orthonormal-column E_i (r = d for logits, the
        same R for every prompt; d + 1 for log-probs and d for fisher, from the probabilities at the point; see
        `observable_factor`)."""
        reduction = None if self.observable == "fisher" else unembedding_reduction(self.lm)   # fisher needs no QR
        count = self.num_prompts if prompts is None else len(prompts)
        if self.observable == "logits":
            return np.broadcast_to(reduction["R"], (count, *reduction["R"].shape))
        w = np.asarray(self.lm.unembedding, np.float64)
        probs = np.asarray(self.probs(), np.float64)
        probs = probs if prompts is None else probs[prompts]
        return np.stack([observable_factor(reduction, w, self.observable, p) for p in probs])

    def observable_factor(self, prompt: int = 0) -> np.ndarray:
        """M (r, d) float64 of one prompt (see `observable_factors`)."""
        return self.observable_factors([prompt])[0]

    def factors(self, normed_jacobians=None, observable_factors=None) -> np.ndarray:
        """Exact float64 factors C_i = M_i D_i (B, r, d) at the point, r = d (logits, fisher) or d + 1 (logprobs):
        sigma(J_i) = sigma(C_i) and J_i^T J_i = C_i^T C_i. The one place the exact factor is formed. Pass
        `normed_tail_jacobian()`'s D (B, d, d) or `observable_factors()`'s M (B, r, d) if you already have them
        (M depends on the prompt and the point, not on the layer: reuse it across layers)."""
        d_mats = np.asarray(self.normed_tail_jacobian() if normed_jacobians is None else normed_jacobians,
                            np.float64)
        m = self.observable_factors() if observable_factors is None else np.asarray(observable_factors, np.float64)
        with blas.dense_threads(self.lm.d):
            return np.matmul(m, d_mats)  # BLAS (np.einsum here would loop in C)

    def singular_values(self) -> np.ndarray:
        """Exact singular values (B, d) float64, descending, of every J_i: SVDs of `factors()`, under the
        BLAS thread policy of `steerjax.blas` (one thread for d <= 768)."""
        return spectrum.factor_singular_values(self.factors())


def jacobian_operator(lm: LanguageModel, ids, layer: int, observable: str = "logits", positions: str = "last",
                      recompute: bool = False, chunk: int | None = None, at=None) -> JacobianOperator:
    """JacobianOperator for a batch of prompts (TokenBatch, (B, T) ids or ragged lists), taken at the steering
    offset `at` ((d,) or (B, d); None: unsteered)."""
    return JacobianOperator(lm, ids, layer, observable, positions, recompute, chunk, at)


def jacobian(lm: LanguageModel, ids, layer: int, observable: str = "logits", positions: str = "last",
             recompute: bool = False, at=None):
    """Exact dense Jacobian (V, d) of the last-position observable w.r.t. h_layer for one prompt
    (ids (T,) or (1, T)), at the steering offset `at` (d,) (None: unsteered)."""
    op = jacobian_operator(lm, ids, layer, observable, positions, recompute, at=at)
    if op.num_prompts != 1:
        raise InputError(f"sj.jacobian takes one prompt, got {op.num_prompts}; use sj.jacobian_operator")
    return op.dense()[0]
