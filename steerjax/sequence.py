"""Teacher-forced observables over a fixed continuation: the intervention that generation actually runs.

Generation steers the last prompt token and every generated one (`Steer(positions="last+generated")`). Here a
row is a prompt followed by the first G - 1 tokens of a fixed continuation c_1..c_G, left-padded; its last G
slots (the last prompt token and c_1..c_{G-1}) form the steered *window*, and their next-token distributions
predict c_1..c_G. For one steer x (d,) added to h_l at every window slot at once:

  - `sequence_fisher_factors`: exact float64 factors C_g (d x d) per window slot g with
    ||C_g u||^2 = ||J_F,g u||^2, J_F,g = diag(sqrt p_g)(I - 1 p_g^T) d logits_g / dx the whitened Jacobian of
    slot g's next-token distribution; 0.5 s^2 sum_g ||C_g u||^2 is the second-order teacher-forced sequence KL
    of a steer s u (nats), and the stacked factor [C_1; ...; C_G] is the multi-position analogue of the one-token
    fisher factor (`JacobianOperator(observable="fisher").factors()`, which is the G = 1 case).
  - `sequence_kl`: the exact per-token KL(p_a || p_b) between two steered models along given token sequences
    (teacher forcing), e.g. samples from the a-steered model.

Shapes: B rows, T slots, G window slots, d hidden size, V vocabulary.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from steerjax import blas, stats, xla
from steerjax.checks import check_int, check_layer
from steerjax.errors import InputError
from steerjax.jacobian import fisher_factor
from steerjax.model import LanguageModel, TokenBatch, as_token_batch, left_pad
from steerjax.models import causal_lm
from steerjax.steering import Steer
from steerjax.tail import TAIL_CHUNK, jacfwd_chunked, tail_context, tail_window


def continuation_rows(prompts: Sequence[Sequence[int]], continuations, pad_id: int) -> TokenBatch:
    """Left-padded rows prompt_b + c_b[:G - 1] for prompt token lists and continuations (B, G) ints: the last G
    slots of every row are its steered window (last prompt token, c_1..c_{G-1})."""
    cont = np.asarray(continuations)
    if cont.ndim != 2 or cont.shape[1] < 1:
        raise InputError(f"continuations must be a (B, G) array of token ids with G >= 1, got shape {cont.shape}")
    if len(prompts) != cont.shape[0]:
        raise InputError(f"{len(prompts)} prompts but {cont.shape[0]} continuations")
    if any(len(p) == 0 for p in prompts):
        raise InputError("every prompt needs at least one token")
    return left_pad([list(map(int, p)) + [int(t) for t in c[:-1]] for p, c in zip(prompts, cont)], pad_id)


def window_prompt_len(batch: TokenBatch, window: int) -> int:
    """The `prompt_len` under which Steer(positions="last+generated") steers exactly the last `window` slots."""
    return int(np.shape(batch.ids)[1]) - window + 1


def default_window_chunk(window: int) -> int:
    """JVP tangents per chunk when each tangent carries `window` tokens through the tail."""
    return max(16, TAIL_CHUNK // window)


@functools.lru_cache(maxsize=None)
def window_functions(config, window: int, chunk: int):
    """(normed_jacobians, logits) for one configuration, vmapped over rows and jit-compiled:
    normed_jacobians(params, ctx (B, ...)) -> D (B, window, d, d) = d final_norm(h_L[slot g]) / dx;
    logits(params, ctx) -> (B, window, V) at x = 0."""

    def normed(params, ctx, x):
        return causal_lm.final_norm(config, params, tail_window(config, params["blocks"], ctx, x, window))

    def jac(params, ctx):
        return jacfwd_chunked(lambda x: normed(params, ctx, x), jnp.zeros_like(ctx.h[-1]), chunk)

    def logits(params, ctx):
        return causal_lm.logits_from_final_hidden(config, params, tail_window(config, params["blocks"], ctx,
                                                                               jnp.zeros_like(ctx.h[-1]), window))

    over_rows = lambda fn: xla.jit(jax.vmap(fn, in_axes=(None, 0)))
    return over_rows(jac), over_rows(logits)


def sequence_fisher_factors(lm: LanguageModel, batch, layer: int, window: int, chunk: int | None = None) -> np.ndarray:
    """Exact float64 fisher factors C (B, window, d, d) of the last `window` slots of each row w.r.t. one steer
    x (d,) added to h_layer at all of them (see the module docstring): C_g = M_F(p_g) D_g with
    C_g^T C_g = J_F,g^T J_F,g."""
    batch = as_token_batch(batch)
    lm.check_ids(batch)
    layer = check_layer(layer, lm.num_layers)
    T = int(np.shape(batch.ids)[1])
    window = check_int(window, "window (steered slots)", 1, T - 1)
    if not np.all(np.asarray(batch.attention_mask)[:, -window - 1:]):
        raise InputError(f"every row needs at least {window + 1} real tokens at its end (window + one prompt "
                         "token before it): left-pad rows (`continuation_rows`)")
    chunk = default_window_chunk(window) if chunk is None else check_int(chunk, "chunk", low=1)
    ctx = tail_context(lm.config, lm.params, TokenBatch(lm.to_device(batch.ids), lm.to_device(batch.attention_mask)),
                       layer)
    jac_fn, logits_fn = window_functions(lm.config, window, chunk)
    d_mats = np.asarray(jac_fn(lm.params, ctx), np.float64)                        # (B, G, d, d)
    probs = np.exp(stats.log_softmax(np.asarray(logits_fn(lm.params, ctx), np.float64)))
    w = np.asarray(lm.unembedding, np.float64)
    m = np.stack([[fisher_factor(w, p) for p in row] for row in probs])           # (B, G, d, d)
    with blas.dense_threads(lm.d):
        return np.matmul(m, d_mats)


def steer_rows(steer: Steer | None, rows: slice) -> Steer | None:
    """The steer of a slice of rows (a per-row vector (B, d) is sliced with them)."""
    if steer is None or np.ndim(steer.vector) == 1:
        return steer
    return dataclasses.replace(steer, vector=np.asarray(steer.vector)[rows])


def check_sequences(tokens, attention_mask, prompt_len: int, rows_per_call: int):
    """(tokens, mask (B, T) arrays, prompt_len, rows_per_call) checked: equal 2-D shapes, 1 <= P < T."""
    tokens = np.asarray(tokens)
    mask = np.asarray(attention_mask)
    if tokens.ndim != 2 or tokens.shape != mask.shape:
        raise InputError(f"tokens and attention_mask must be equal (B, T) arrays, got {tokens.shape}, {mask.shape}")
    P = check_int(prompt_len, "prompt_len", 1, tokens.shape[1] - 1)
    return tokens, mask, P, check_int(rows_per_call, "rows_per_call", low=1)


def generated_logits(lm: LanguageModel, tokens, mask, prompt_len: int, steers, rows_per_call: int):
    """Per chunk of rows_per_call rows: (rows slice, [float64 logits (b, G, V) that predict the G generated tokens,
    one array per steer in `steers`]), each steer applied as in generation (teacher forcing)."""
    for start in range(0, tokens.shape[0], rows_per_call):
        rows = slice(start, start + rows_per_call)
        yield rows, [np.asarray(lm.forward(tokens[rows], steer_rows(steer, rows), attention_mask=mask[rows],
                                           prompt_len=prompt_len).logits[:, prompt_len - 1:-1], np.float64)
                     for steer in steers]


def sequence_kl(lm: LanguageModel, tokens, attention_mask, prompt_len: int, steer_a: Steer | None,
                steer_b: Steer | None, rows_per_call: int = 8) -> np.ndarray:
    """Exact KL(p_a || p_b) (B, G) nats at each generated position of teacher-forced sequences tokens (B, P + G)
    (a left-padded prompt of P slots then G generated tokens, e.g. `GenerationOutput`), where p_a, p_b are the
    next-token distributions of the model steered by steer_a / steer_b (None: unsteered) applied as in
    generation (vectors (d,) or one per row (B, d)): column g is the distribution that predicts generated
    token g; NaN where that token is padding (after an EOS)."""
    tokens, mask, P, rows_per_call = check_sequences(tokens, attention_mask, prompt_len, rows_per_call)
    kl = np.concatenate([stats.kl_divergence(*logits)
                         for _, logits in generated_logits(lm, tokens, mask, P, (steer_a, steer_b), rows_per_call)])
    return np.where(mask[:, P:].astype(bool), kl, np.nan)


def continuation_logprobs(lm: LanguageModel, tokens, attention_mask, prompt_len: int, steer: Steer | None = None,
                          rows_per_call: int = 8) -> np.ndarray:
    """log p(token g | prefix) (B, G) of each generated token of sequences tokens (B, P + G) under the model
    steered by `steer` (None: unsteered) as in generation; NaN where the token is padding (after an EOS). The
    unsteered model's mean over g is a fluency measure of a continuation (per-token log-likelihood)."""
    tokens, mask, P, rows_per_call = check_sequences(tokens, attention_mask, prompt_len, rows_per_call)
    out = [np.take_along_axis(stats.log_softmax(logits), tokens[rows, P:, None].astype(np.int64), axis=-1)[..., 0]
           for rows, (logits,) in generated_logits(lm, tokens, mask, P, (steer,), rows_per_call)]
    return np.where(mask[:, P:].astype(bool), np.concatenate(out), np.nan)
