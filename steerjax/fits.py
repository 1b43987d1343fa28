"""Iterative fits of a steering vector with optax: maximum likelihood from token counts, KL recovery from
observed distributions, and the jit(vmap(while_loop)) runner under both.

Model functions have the signature `logits_fn(v (d,), aux) -> (B, K)`, so a toy linear model
(`linear_logits`) and a transformer tail (`steerjax.tail.steered_observable`) plug in alike. Fits are
jit-compiled and vmapped over restarts. Bad input raises `steerjax.errors.InputError`.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from steerjax import xla
from steerjax.checks import check_positive_int, finite_array
from steerjax.errors import InputError

class FitResult(NamedTuple):
    """Result of `minimise` for R restarts: v (R, d); loss (R,) and grad_norm (R,) at v; history (R, steps) the
    loss before each step (NaN after an early stop); n_steps (R,) steps taken."""

    v: Any
    loss: Any
    grad_norm: Any
    history: Any
    n_steps: Any


def minimise(loss: Callable, v0, data=None, aux=None, optimizer=None, steps: int = 200, gtol: float = 0.0) -> FitResult:
    """Minimise loss(v (d,), data_r, aux) -> scalar from each start v0[r] (R, d), at most `steps` optax steps
    under `jit(vmap(lax.while_loop))`, stopping a restart once ||grad|| <= gtol * ||grad at v0|| (gtol 0: run
    every step; the loop ends when every restart has stopped). `data` (pytree with leading axis R, or None)
    differs per restart, `aux` is shared (model parameters, targets); both are jit arguments, never baked-in
    constants. The compiled runner is cached per (loss, optimizer, steps): reuse the same loss function
    object to skip recompiling.

    Default optimizer: optax.lbfgs() (zoom line search). L-BFGS, plain or momentum SGD update along
    combinations of past gradients, and every gradient lies in the row space of the model's Jacobians, so
    these never change v's null-space component; Adam's per-coordinate scaling does."""
    check_positive_int(steps, "steps")
    if not (isinstance(gtol, (int, float, np.floating)) and 0 <= gtol < 1):
        raise InputError(f"gtol must be a number in [0, 1), got {gtol!r}")
    v0 = jnp.asarray(v0)
    if v0.ndim != 2:
        raise InputError(f"v0 must be (restarts, d), got shape {v0.shape}")
    run = _runner(loss, _default_optimizer() if optimizer is None else optimizer, int(steps), data is not None)
    with x64_matching(v0.dtype):
        return FitResult(*run(v0, data, aux, jnp.asarray(gtol, v0.dtype)))


def x64_matching(dtype):
    """A context tracing a float32 fit with jax_enable_x64 off when a float64 model turned it on earlier in
    the process: optax's backtracking line search transposes the loss's linearisation with the cotangent
    1.0, a float64 under x64, and jax rejects it for a float32 loss (TypeError "cotangent type does not
    match function output")."""
    if jax.config.jax_enable_x64 and np.dtype(dtype) != np.float64:
        return jax.enable_x64(False)
    return contextlib.nullcontext()


@functools.lru_cache(maxsize=1)
def _default_optimizer():
    return optax.lbfgs()


@functools.lru_cache(maxsize=64)
def _runner(loss: Callable, optimizer, steps: int, per_start_data: bool):
    opt = optax.with_extra_args_support(optimizer)

    def one(v_start, data_r, aux, gtol):
        f = lambda v: loss(v, data_r, aux)
        value_and_grad = jax.value_and_grad(f)
        state = opt.init(v_start)
        # line searches (L-BFGS) store the value and gradient at the accepted point: reuse them rather than
        # evaluating again (under vmap, optax.value_and_grad_from_state's lax.cond would run both branches)
        stored = optax.tree.get(state, "value") is not None and optax.tree.get(state, "grad") is not None
        value, grad = value_and_grad(v_start)
        stop = gtol * jnp.linalg.norm(grad)

        def cond(carry):
            k, _, _, _, grad, _ = carry
            return (k < steps) & (jnp.linalg.norm(grad) > stop)

        def body(carry):
            k, v, state, value, grad, history = carry
            history = history.at[k].set(value)
            updates, state = opt.update(grad, state, v, value=value, grad=grad, value_fn=f)
            v = optax.apply_updates(v, updates)
            value, grad = ((optax.tree.get(state, "value"), optax.tree.get(state, "grad")) if stored
                           else value_and_grad(v))
            return k + 1, v, state, value, grad, history

        history = jnp.full(steps, jnp.nan, value.dtype)
        k, v, _, value, grad, history = jax.lax.while_loop(cond, body, (0, v_start, state, value, grad, history))
        return v, value, jnp.linalg.norm(grad), history, k

    return xla.jit(jax.vmap(one, in_axes=(0, 0 if per_start_data else None, None, None)))


def linear_logits(v, aux):
    """Toy / linearised model: logits z + J v for aux = (z (B, K), J (B, K, d)) -> (B, K)."""
    z, J = aux
    return z + jnp.einsum("bkd,d->bk", J, v)


@functools.lru_cache(maxsize=None)
def categorical_nll(logits_fn: Callable) -> Callable:
    """loss(v, counts (B, K), aux) = -sum counts * log softmax(logits_fn(v, aux)) / sum counts: the
    per-token negative log-likelihood of observed token counts (a sufficient statistic). Cached per logits_fn."""
    def loss(v, counts, aux):
        logp = jax.nn.log_softmax(logits_fn(v, aux), axis=-1)
        return -jnp.sum(counts * logp) / jnp.sum(counts)

    return loss


def sample_counts(p, n_tokens: int, replicates: int, rng: np.random.Generator) -> np.ndarray:
    """Token counts (replicates, B, K) of n_tokens independent draws per prompt from p (B, K)."""
    p = finite_array(p, "p", (2,))
    check_positive_int(n_tokens, "n_tokens")
    check_positive_int(replicates, "replicates")
    p = p / p.sum(axis=1, keepdims=True)
    return np.stack([rng.multinomial(n_tokens, row, size=replicates) for row in p], axis=1).astype(np.float64)


def categorical_mle(logits_fn: Callable, counts, v0, aux, optimizer=None, steps: int = 200,
                    gtol: float = 0.0) -> FitResult:
    """Maximum-likelihood v for each replicate's counts (R, B, K) (e.g. from `sample_counts`), started
    from v0 (R, d); see `minimise`."""
    counts = jnp.asarray(counts)
    if counts.ndim != 3 or counts.shape[0] != np.shape(v0)[0]:
        raise InputError(f"counts must be (R, B, K) with R = {np.shape(v0)[0]} starts, got shape {counts.shape}")
    return minimise(categorical_nll(logits_fn), v0, counts, aux, optimizer, steps, gtol)


@functools.lru_cache(maxsize=None)
def kl_objective(logits_fn: Callable) -> Callable:
    """loss(v, weights, (model_aux, target_logprobs (B, V))) = sum_b w_b KL(p*_b || softmax(logits_fn(v, model_aux))_b):
    how far the distributions at v are from observed ones; weights (B,) (e.g. 0/1 to use a subset of the
    prompts) or None for all ones. Cached per logits_fn."""
    def loss(v, weights, aux):
        model_aux, target = aux
        logq = jax.nn.log_softmax(logits_fn(v, model_aux), axis=-1)
        kl = jnp.sum(jnp.exp(target) * (target - logq), axis=-1)
        return jnp.sum(kl if weights is None else weights * kl)

    return loss


def recover(logits_fn: Callable, target_logits, v0, model_aux, optimizer=None, steps: int = 200,
            gtol: float = 0.0, weights=None) -> FitResult:
    """Recover a hidden steering vector from observed distributions softmax(target_logits (B, V)) by
    minimising `kl_objective` from each start v0 (R, d); weights (R, B) per start (or None: every prompt
    counts) let one compiled fit serve several prompt subsets. See `minimise`."""
    target = jax.nn.log_softmax(jnp.asarray(target_logits), axis=-1)
    if weights is not None:
        weights = jnp.asarray(weights, target.dtype)
        if weights.shape != (np.shape(v0)[0], target.shape[0]):
            raise InputError(f"weights must be (R, B) = ({np.shape(v0)[0]}, {target.shape[0]}), got {weights.shape}")
    return minimise(kl_objective(logits_fn), v0, weights, (model_aux, target), optimizer, steps, gtol)
