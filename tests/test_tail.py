"""steerjax.tail: the steered observable of the one-token tail equals the model's own steered forward, and its
JVP at a steering offset v is the JacobianOperator taken at v (SmolLM2, layer 27: 3 tail blocks keep it fast;
a float32 model, so tolerances are float32-level)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import steerjax as sj
from steerjax import studies, tail

# float32 logits of magnitude ~10-30 through 3 blocks: rounding differences between the tail and the full
# forward are ~1e-5 absolute; 2e-4 leaves a margin and is still 1e-3 of a typical steering effect here
LOGIT_ATOL = 2e-4
# ||C x|| against a float32 JVP: float32 rounding of a 576-wide product chain
NORM_RTOL = 1e-4


def test_steered_observable_is_the_steered_forward(smollm2):
    lm, layer = smollm2, 27
    batch = lm.tokenize(["Water boils at", "The three primary colours are"])
    v = np.random.default_rng(0).normal(size=lm.d) * 3.0
    op = sj.jacobian_operator(lm, batch, layer)
    fn = tail.steered_observable(lm.config, "logits")
    assert fn is tail.steered_observable(lm.config, "logits")  # cached: one compilation per (config, observable)
    logits = np.asarray(fn(jnp.asarray(v, jnp.float32), op.tail_args()))
    np.testing.assert_allclose(logits, studies.steered_last_logits(lm, batch, layer, v), atol=LOGIT_ATOL)
    # a prompt slice of the tail arguments is that prompt alone
    one = np.asarray(fn(jnp.asarray(v, jnp.float32), op.tail_args(slice(1, 2))))
    np.testing.assert_allclose(one[0], logits[1], atol=LOGIT_ATOL)
    # per-prompt vectors (B, d)
    rows = np.stack([v, -v])
    both = np.asarray(fn(jnp.asarray(rows, jnp.float32), op.tail_args()))
    np.testing.assert_allclose(both[1], studies.steered_last_logits(lm, batch, layer, -v)[1], atol=LOGIT_ATOL)
    # log-probabilities are the log-softmax of the logits
    lp = np.asarray(tail.steered_observable(lm.config, "logprobs")(jnp.asarray(v, jnp.float32), op.tail_args()))
    np.testing.assert_allclose(lp, np.asarray(jax.nn.log_softmax(logits, axis=-1)), atol=1e-5)
    # h_27 after 27 float32 blocks (entries up to ~20): the cached pass and a fresh forward differ by ~1e-4
    h_ref = np.asarray(lm.forward(batch, return_hidden=True).hidden[layer][:, -1], np.float64)
    np.testing.assert_allclose(op.steered_states(), h_ref, rtol=0, atol=1e-5 * np.abs(h_ref).max() * 20)


def test_operator_at_v_is_the_jvp_of_the_steered_observable(smollm2):
    lm, layer = smollm2, 27
    batch = lm.tokenize(["Water boils at", "The three primary colours are"])
    rng = np.random.default_rng(1)
    v = rng.normal(size=lm.d) * 3.0
    op0 = sj.jacobian_operator(lm, batch, layer, observable="logprobs")
    op_v = sj.jacobian_operator(lm, batch, layer, observable="logprobs", at=v)
    c0, cv = op0.factors(), op_v.factors()
    assert cv.shape == (2, lm.d + 1, lm.d)
    lp = tail.steered_observable(lm.config, "logprobs")
    np.testing.assert_allclose(np.asarray(op_v.value()), np.asarray(lp(jnp.asarray(v, jnp.float32), op0.tail_args())),
                               atol=LOGIT_ATOL)
    # one compiled JVP (jit over the whole transformation, with the model as an argument, not a constant)
    jvp = jax.jit(lambda aux, y, t: jax.jvp(lambda z: lp(z, aux), (y,), (t,))[1])
    for x in rng.normal(size=(2, lm.d)):
        jx = jvp(op0.tail_args(), jnp.asarray(v, jnp.float32), jnp.asarray(x, jnp.float32))
        np.testing.assert_allclose(np.linalg.norm(cv @ x, axis=1), np.linalg.norm(np.asarray(jx, np.float64), axis=1),
                                   rtol=NORM_RTOL)
    # the Jacobian did move: J(v) differs from J(0)
    assert np.abs(cv - c0).max() > 1e-3 * np.abs(c0).max()
