"""Exact Jacobians: against torch.func.jacfwd on the HF model, and between steerjax's own independent
float64 paths (full-sequence jax.jacfwd, the cached one-token tail, the QR route, central differences)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import steerjax as sj
from conftest import rel_err, random_ids
from steerjax.models import causal_lm

# HF's float64 model keeps RMSNorm and RoPE tables in float32 (~1e-7 relative), so the torch reference
# is not a true float64 one; 2e-6 is the bar.
TORCH_TOL = 2e-6
# steerjax float64 paths against each other: rounding only (measured ~1e-15); 1e-9 is the bar.
F64_TOL = 1e-9


@pytest.fixture(scope="module")
def tiny64(tiny_checkpoints):
    return {name: sj.load_model(folder, dtype="float64") for name, (folder, _) in tiny_checkpoints.items()
            if name in ("qwen2_tied_gqa1", "llama3_untied_gqa2")}


def full_forward_observable(lm, ids, mask, layer, steer_mask, observable):
    """x (d,) -> last-position observable of the FULL forward with x added to h_layer where steer_mask."""
    def f(x):
        delta = steer_mask[None, :, None] * x[None, None, :]
        logits = causal_lm.forward(lm.config, lm.params, ids[None], mask[None], layer, delta, False)[0][0, -1]
        return logits if observable == "logits" else jax.nn.log_softmax(logits)
    return f


def torch_jacobian(hf_model, ids, layer: int, observable: str, at=None) -> np.ndarray:
    """torch.func.jacfwd of the last-position observable w.r.t. an additive x at h_layer[-1], at x = `at`
    (default 0)."""
    model = hf_model.double()
    target = model.model.layers[layer] if layer < len(model.model.layers) else model.model.norm
    ids_t = torch.as_tensor(ids[None], dtype=torch.long)

    def f(x):
        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            hidden = torch.cat([hidden[:, :-1], hidden[:, -1:] + x], dim=1)
            return ((hidden, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": hidden})
        handle = target.register_forward_pre_hook(hook, with_kwargs=True)
        try:
            logits = model(input_ids=ids_t, attention_mask=torch.ones_like(ids_t)).logits[0, -1]
        finally:
            handle.remove()
        return logits if observable == "logits" else torch.log_softmax(logits, -1)

    try:
        x0 = torch.zeros(model.config.hidden_size, dtype=torch.float64) if at is None else torch.as_tensor(at)
        return torch.func.jacfwd(f)(x0).detach().numpy()
    finally:
        hf_model.float()


@pytest.mark.parametrize("name", ["qwen2_tied_gqa1", "llama3_untied_gqa2"])
@pytest.mark.parametrize("layer,observable", [(0, "logits"), (1, "logprobs"), (3, "logits")])
def test_jacobian_matches_torch_func_jacfwd(tiny_checkpoints, tiny64, name, layer, observable):
    _, hf_model = tiny_checkpoints[name]
    ids = random_ids(np.random.default_rng(layer), 1, 10)[0]
    ours = np.asarray(sj.jacobian(tiny64[name], ids, layer, observable))
    ref = torch_jacobian(hf_model, ids, layer, observable)
    assert ours.shape == ref.shape == (160, 64)
    assert rel_err(ours, ref) <= TORCH_TOL


@pytest.mark.parametrize("observable", ["logits", "logprobs"])
def test_jacobian_at_a_point_matches_torch_func_jacfwd(tiny_checkpoints, tiny64, observable):
    """J at h_l + a (a steering offset of O(1) relative size, so J(a) differs from J(0)) against torch's jacfwd
    at x = a through the HF model with the same additive hook."""
    name = "llama3_untied_gqa2"
    _, hf_model = tiny_checkpoints[name]
    lm, layer = tiny64[name], 1
    ids = random_ids(np.random.default_rng(21), 1, 10)[0]
    a = np.random.default_rng(22).normal(size=lm.d) * 2.0
    ours = np.asarray(sj.jacobian(lm, ids, layer, observable, at=a))
    ref = torch_jacobian(hf_model, ids, layer, observable, at=a)
    assert rel_err(ours, ref) <= TORCH_TOL
    assert rel_err(ours, np.asarray(sj.jacobian(lm, ids, layer, observable))) > 1e-2  # the point matters


# 22 s and 13 s: under -m slow; in the default run, the operator at a point is checked against the jvp of the steered
# observable by test_tail.py::test_operator_at_v_is_the_jvp_of_the_steered_observable, and positions="all" by
# test_positions_all_jacobian_on_padded_batch
@pytest.mark.slow
@pytest.mark.parametrize("observable,positions", [("logprobs", "last"), ("logits", "all")])
def test_operator_at_a_point_float64(tiny64, observable, positions):
    """Per-prompt points (B, d) on a padded batch: every product, the dense J, value / probs, the exact factors
    and top_singular at the point equal jax.jacfwd of the full forward at x = a_i (float64, rounding only)."""
    lm, layer = tiny64["qwen2_tied_gqa1"], 1
    rng = np.random.default_rng(23)
    batch = sj.model.left_pad([list(rng.integers(1, 150, size=n)) for n in (6, 9)], pad_id=0)
    at = rng.normal(size=(2, lm.d)) * 1.5
    op = sj.jacobian_operator(lm, batch, layer, observable, positions, at=at)
    dense = np.asarray(op.dense())
    for row in range(2):
        ids, mask = jnp.asarray(batch.ids[row]), jnp.asarray(batch.attention_mask[row])
        steer_mask = mask.astype(jnp.float64) if positions == "all" else (jnp.arange(ids.size) == ids.size - 1) * 1.0
        f = full_forward_observable(lm, ids, mask, layer, steer_mask, observable)
        ref = np.asarray(jax.jacfwd(f)(jnp.asarray(at[row])))
        assert rel_err(dense[row], ref) <= F64_TOL
        assert rel_err(np.asarray(op.value())[row], np.asarray(f(jnp.asarray(at[row])))) <= F64_TOL
        if observable == "logprobs":
            np.testing.assert_allclose(np.log(np.asarray(op.probs())[row]), np.asarray(f(jnp.asarray(at[row]))),
                                       atol=1e-12)
        factor = op.factors()[row]
        np.testing.assert_allclose(factor.T @ factor, ref.T @ ref, rtol=0, atol=F64_TOL * np.abs(ref.T @ ref).max())
        s_ref = np.linalg.svd(ref, compute_uv=False)
        assert np.max(np.abs(op.singular_values()[row] - s_ref[: lm.d])) <= F64_TOL * s_ref[0]
        for method in ("dense", "lanczos"):
            top = op.top_singular(4, prompt=row, method=method, tol=1e-8, block=16)
            np.testing.assert_allclose(np.asarray(top.s), s_ref[:4], rtol=1e-7)
    v, u = rng.normal(size=(2, lm.d)), rng.normal(size=(2, 160))
    assert rel_err(op.matvec(v), np.einsum("bvd,bd->bv", dense, v)) <= F64_TOL
    assert rel_err(op.rmatvec(u), np.einsum("bvd,bv->bd", dense, u)) <= F64_TOL
    x = rng.normal(size=lm.d)
    assert rel_err(op.gram_matvec(x), sum(j.T @ (j @ x) for j in dense)) <= F64_TOL
    # a shared (d,) point equals the same point given per prompt; at=0 equals the unsteered operator
    shared = sj.jacobian_operator(lm, batch, layer, observable, positions, at=at[0])
    per_row = sj.jacobian_operator(lm, batch, layer, observable, positions, at=np.stack([at[0], at[0]]))
    np.testing.assert_array_equal(np.asarray(shared.dense()), np.asarray(per_row.dense()))
    zero = sj.jacobian_operator(lm, batch, layer, observable, positions, at=np.zeros(lm.d))
    np.testing.assert_array_equal(np.asarray(zero.dense()),
                                  np.asarray(sj.jacobian_operator(lm, batch, layer, observable, positions).dense()))


def test_operator_point_bad_input(tiny64):
    lm = tiny64["qwen2_tied_gqa1"]
    with pytest.raises(sj.InputError, match=r"at must be \(64,\) or \(1, 64\)"):
        sj.jacobian_operator(lm, np.arange(1, 5), 1, at=np.ones(65))
    with pytest.raises(sj.InputError, match="NaN/inf"):
        sj.jacobian_operator(lm, np.arange(1, 5), 1, at=np.full(64, np.nan))


def fourth_order_central_difference(f, d: int, h: float = 2e-4) -> np.ndarray:
    """(V, d) Jacobian by the 5-point stencil (error O(h^4))."""
    cols = []
    for i in range(d):
        e = np.zeros(d)
        e[i] = h
        cols.append((-f(2 * e) + 8 * f(e) - 8 * f(-e) + f(-2 * e)) / (12 * h))
    return np.stack(cols, axis=1)


@pytest.mark.parametrize("layer", [0, 2, 3])
@pytest.mark.parametrize("observable", ["logits", "logprobs"])
def test_float64_paths_agree(tiny64, layer, observable):
    lm = tiny64["llama3_untied_gqa2"]
    ids = random_ids(np.random.default_rng(7), 1, 9)[0]
    mask = np.ones_like(ids)
    last = (np.arange(ids.size) == ids.size - 1).astype(np.float64)
    f = full_forward_observable(lm, jnp.asarray(ids), jnp.asarray(mask), layer, jnp.asarray(last), observable)
    full = np.asarray(jax.jacfwd(f)(jnp.zeros(lm.d)))
    tail = np.asarray(sj.jacobian(lm, ids, layer, observable))
    recompute = np.asarray(sj.jacobian(lm, ids, layer, observable, recompute=True))
    jf = jax.jit(f)
    fd = fourth_order_central_difference(lambda x: np.asarray(jf(jnp.asarray(x))), lm.d)
    assert rel_err(tail, full) <= F64_TOL
    assert rel_err(recompute, full) <= F64_TOL
    assert rel_err(fd, full) <= F64_TOL
    # QR route: sigma(J) from the small exact factor equals the dense SVD of J
    op = sj.jacobian_operator(lm, ids, layer, observable)
    factor = op.factors()[0]
    assert factor.shape == ((64, 64) if observable == "logits" else (65, 64))
    s_factor = np.linalg.svd(factor, compute_uv=False)
    s_dense = np.linalg.svd(full, compute_uv=False)
    assert np.max(np.abs(s_factor - s_dense)) / s_dense[0] <= F64_TOL
    s_op = op.singular_values()
    assert s_op.shape == (1, 64) and s_op.dtype == np.float64
    assert np.max(np.abs(s_op[0] - s_dense[:64])) / s_dense[0] <= F64_TOL
    np.testing.assert_allclose(factor.T @ factor, full.T @ full, rtol=0, atol=F64_TOL * s_dense[0] ** 2)


def test_positions_all_jacobian_on_padded_batch(tiny64):
    lm = tiny64["qwen2_tied_gqa1"]
    rng = np.random.default_rng(8)
    batch = sj.model.left_pad([list(rng.integers(1, 150, size=n)) for n in (6, 11)], pad_id=0)
    op = sj.jacobian_operator(lm, batch, layer=1, observable="logprobs", positions="all")
    dense = np.asarray(op.dense())
    for row in range(2):
        ids, mask = jnp.asarray(batch.ids[row]), jnp.asarray(batch.attention_mask[row])
        f = full_forward_observable(lm, ids, mask, 1, mask.astype(jnp.float64), "logprobs")
        assert rel_err(dense[row], np.asarray(jax.jacfwd(f)(jnp.zeros(lm.d)))) <= F64_TOL


def test_batched_operators_match_dense(tiny64):
    lm = tiny64["llama3_untied_gqa2"]
    rng = np.random.default_rng(9)
    prompts = [list(rng.integers(1, 150, size=n)) for n in (5, 9, 7)]
    op = sj.jacobian_operator(lm, prompts, layer=2, observable="logits")
    dense = np.asarray(op.dense())
    for row, prompt in enumerate(prompts):  # padded batch == each prompt alone
        assert rel_err(dense[row], sj.jacobian(lm, np.array(prompt), 2)) <= F64_TOL
    v, u, x = rng.normal(size=(3, lm.d)), rng.normal(size=(3, 160)), rng.normal(size=lm.d)
    assert rel_err(op.matvec(v), np.einsum("bvd,bd->bv", dense, v)) <= F64_TOL
    assert rel_err(op.rmatvec(u), np.einsum("bvd,bv->bd", dense, u)) <= F64_TOL
    gram = sum(j.T @ j for j in dense)
    assert rel_err(op.gram_matvec(x), gram @ x) <= F64_TOL
    stacked = np.concatenate(list(op.factors()))
    np.testing.assert_allclose(stacked.T @ stacked, gram, rtol=0, atol=F64_TOL * np.abs(gram).max())
    s_rows = np.stack([np.linalg.svd(j, compute_uv=False)[:lm.d] for j in dense])
    s_op = op.singular_values()
    assert s_op.shape == (3, lm.d) and np.all(np.diff(s_op, axis=1) <= 0)
    assert np.max(np.abs(s_op - s_rows)) <= F64_TOL * s_rows.max()


def test_tail_trick_in_float32(tiny_checkpoints):
    lm = sj.load_model(tiny_checkpoints["llama3_untied_gqa2"][0])
    ids = random_ids(np.random.default_rng(10), 1, 12)[0]
    tail = np.asarray(sj.jacobian(lm, ids, 1))
    assert tail.dtype == np.float32
    # float32 rounding through 2 blocks and the unembedding
    assert rel_err(tail, np.asarray(sj.jacobian(lm, ids, 1, recompute=True))) <= 1e-5


def test_jacobian_bad_input(tiny64):
    lm = tiny64["qwen2_tied_gqa1"]
    with pytest.raises(sj.SteeringError, match=r"layer 4 is outside \[0, 3\]"):
        sj.jacobian(lm, np.arange(1, 5), 4)
    with pytest.raises(sj.InputError, match="unknown observable 'probs'"):
        sj.jacobian(lm, np.arange(1, 5), 1, observable="probs")
    with pytest.raises(sj.InputError, match="positions must be one of"):
        sj.jacobian(lm, np.arange(1, 5), 1, positions="generated")
    with pytest.raises(sj.InputError, match="takes one prompt"):
        sj.jacobian(lm, np.ones((2, 4), np.int32), 1)


def test_unembedding_qr_follows_the_weights(tiny64):
    """New weights through lm.replace give a new W_U = Q R (and the old model keeps its own); a W_U swapped
    inside the params dict is seen too. Checked through the exact spectrum against the dense J."""
    lm = tiny64["llama3_untied_gqa2"]
    ids = random_ids(np.random.default_rng(24), 1, 7)[0]
    before = sj.jacobian_operator(lm, ids, 2).singular_values()
    scaled = lm.replace(params={**lm.params, "lm_head": 3.0 * lm.params["lm_head"]})
    np.testing.assert_allclose(sj.jacobian_operator(scaled, ids, 2).singular_values(), 3.0 * before,
                               rtol=0, atol=F64_TOL * before.max())
    np.testing.assert_array_equal(sj.jacobian_operator(lm, ids, 2).singular_values(), before)
    rotated = lm.replace(params=dict(lm.params))
    rotated.params["lm_head"] = jnp.flip(lm.params["lm_head"], axis=1)    # in place, new array, same shape
    s_dense = np.linalg.svd(np.asarray(sj.jacobian(rotated, ids, 2)), compute_uv=False)[: lm.d]
    np.testing.assert_allclose(sj.jacobian_operator(rotated, ids, 2).singular_values()[0], s_dense,
                               rtol=0, atol=F64_TOL * s_dense[0])


@pytest.mark.parametrize("positions", ["last", pytest.param("all", marks=pytest.mark.slow)])   # all: 16 s
def test_fisher_observable_is_the_whitened_logit_jacobian(tiny64, positions):
    """observable="fisher": J_F = diag(sqrt p)(I - 1 p^T) J_logits (p at the point), in every product, the dense
    J, the exact factors (QR of the whitened W_U) and top_singular; and 0.5 s^2 ||J_F u||^2 is the second-order
    term of the exact KL of a steer s u (float64: the ratio tends to 1 linearly in s)."""
    lm, layer = tiny64["llama3_untied_gqa2"], 1
    rng = np.random.default_rng(25)
    batch = sj.model.left_pad([list(rng.integers(1, 150, size=n)) for n in (7, 5)], pad_id=0)
    at = rng.normal(size=lm.d)
    logit_op = sj.jacobian_operator(lm, batch, layer, "logits", positions, at=at)
    op = sj.jacobian_operator(lm, batch, layer, "fisher", positions, at=at)
    p = np.asarray(logit_op.probs())
    J = np.asarray(logit_op.dense())
    ref = np.sqrt(p)[:, :, None] * (J - np.einsum("bv,bvd->bd", p, J)[:, None, :])
    assert rel_err(np.asarray(op.dense()), ref) <= F64_TOL
    v, u = rng.normal(size=(2, lm.d)), rng.normal(size=(2, 160))
    assert rel_err(op.matvec(v), np.einsum("bvd,bd->bv", ref, v)) <= F64_TOL
    assert rel_err(op.rmatvec(u), np.einsum("bvd,bv->bd", ref, u)) <= F64_TOL
    x = rng.normal(size=lm.d)
    assert rel_err(op.gram_matvec(x), sum(j.T @ (j @ x) for j in ref)) <= F64_TOL
    np.testing.assert_allclose(np.asarray(op.value()), np.log(p), atol=1e-12)
    factors = op.factors()
    assert factors.shape == (2, lm.d, lm.d)
    for row in range(2):
        gram = ref[row].T @ ref[row]
        np.testing.assert_allclose(factors[row].T @ factors[row], gram, rtol=0, atol=F64_TOL * np.abs(gram).max())
        s_ref = np.linalg.svd(ref[row], compute_uv=False)
        for method in ("dense", "lanczos"):
            top = op.top_singular(3, prompt=row, method=method, tol=1e-8, block=16)
            np.testing.assert_allclose(np.asarray(top.s), s_ref[:3], rtol=1e-7)
            assert rel_err(np.asarray(top.u), ref[row] @ np.asarray(top.v) / np.asarray(top.s)) <= 1e-7
    # the second-order KL: exact KL(p(at) || p(at + s w)) / (0.5 s^2 ||J_F w||^2) -> 1 as s -> 0, error O(s)
    w = rng.normal(size=lm.d)
    w /= np.linalg.norm(w)
    quad = 0.5 * np.linalg.norm(np.asarray(op.matvec(w)), axis=1) ** 2
    errors = []
    for s in (1e-2, 1e-3):
        steered = np.asarray(sj.jacobian_operator(lm, batch, layer, "logits", positions, at=at + s * w).probs())
        kl = np.sum(p * (np.log(p) - np.log(steered)), axis=1)
        errors.append(np.max(np.abs(kl / (s**2 * quad) - 1)))
    assert errors[1] < 2e-2 and errors[1] < 0.3 * errors[0]
