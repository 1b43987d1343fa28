"""steerjax.identifiability on small exact cases (float64, known quadratic forms), and
experiments/identifiability.py end to end on the embedded SmolLM2 at a tiny size."""

from __future__ import annotations

import json

import numpy as np
import pytest

import steerjax as sj
from conftest import load_experiment
from steerjax import identifiability, spectrum


def test_disjoint_splits():
    splits = identifiability.disjoint_splits(50, 16, 8, 5, seed=3)
    assert len(splits) == 5
    for split in splits:
        assert len(split.train) == 16 and len(split.heldout) == 8
        assert not set(split.train) & set(split.heldout)
        assert len(set(split.train)) == 16 and max(split.train.max(), split.heldout.max()) < 50
    assert len({tuple(s.train) for s in splits}) == 5                       # different splits
    again = identifiability.disjoint_splits(50, 16, 8, 5, seed=3)
    assert all(np.array_equal(a.train, b.train) for a, b in zip(splits, again))   # reproducible
    with pytest.raises(sj.InputError, match="exceeds the pool of 20"):
        identifiability.disjoint_splits(20, 16, 8, 1, seed=0)


def test_invisible_basis_and_held_out_kls():
    """Against dense eigendecompositions: the basis spans exactly the directions of mean KL <= tau on the
    training prompts; the held-out KL per direction is the trace formula; a random unit direction's expected
    KL is tr(G) / d (checked by Monte Carlo); the visible direction is orthogonal to v and maximal."""
    rng = np.random.default_rng(5)
    d, s_norm, tau = 30, 1.5, 1e-3
    train = rng.normal(size=(4, d, d)) * np.geomspace(1.0, 1e-3, d)
    heldout = rng.normal(size=(3, d, d)) * np.geomspace(1.0, 1e-3, d)[::-1]
    stacked = list(spectrum.stack_factors(train))[-1]
    basis, kl = identifiability.invisible_basis(stacked, 4, s_norm, tau)
    gram = identifiability.mean_gram(train)
    np.testing.assert_allclose(gram, sum(c.T @ c for c in train) / 4, rtol=1e-12)
    w = 0.5 * s_norm**2 * np.linalg.eigvalsh(gram)
    assert basis.shape == (d, int(np.sum(w <= tau))) and 0 < basis.shape[1] < d
    np.testing.assert_allclose(basis.T @ basis, np.eye(basis.shape[1]), atol=1e-12)
    np.testing.assert_allclose(np.sort(kl), np.sort(w[w <= tau]), rtol=1e-8, atol=1e-18)
    assert np.all(0.5 * s_norm**2 * np.einsum("dk,de,ek->k", basis, gram, basis) <= tau * (1 + 1e-9))
    g_ho = identifiability.mean_gram(heldout)
    inv = identifiability.mean_kl_per_direction(basis, g_ho, s_norm)
    assert inv == pytest.approx(np.mean([0.5 * s_norm**2 * b @ g_ho @ b for b in basis.T]))
    assert identifiability.mean_kl_per_direction(np.zeros((d, 0)), g_ho, s_norm) is None
    random_kl = identifiability.random_direction_kl(g_ho, s_norm)
    u = identifiability.unit_combinations(np.eye(d), 20000, np.random.default_rng(6))
    mc = 0.5 * s_norm**2 * np.einsum("nd,de,ne->n", u, g_ho, u)
    assert abs(mc.mean() - random_kl) < 4 * mc.std() / np.sqrt(mc.size)
    # these held-out prompts are most sensitive where the training ones are not: the "invisible" subspace is
    # very visible on them (ratio >> 1), the case a held-out test exists to catch
    assert inv / random_kl > 1.5
    v = rng.normal(size=d)
    visible = identifiability.most_visible_orthogonal(stacked, v)
    assert abs(visible @ v) < 1e-12 * np.linalg.norm(v) and np.linalg.norm(visible) == pytest.approx(1.0)
    others = identifiability.unit_combinations(np.eye(d), 2000, rng)
    others -= np.outer(others @ v, v) / (v @ v)
    others /= np.linalg.norm(others, axis=1, keepdims=True)
    assert visible @ gram @ visible >= np.max(np.einsum("nd,de,ne->n", others, gram, others)) - 1e-12
    assert identifiability.first_below([1, 2, 4, 8], [1.1, None, 0.6, 0.4]) == 8
    assert identifiability.first_below([1, 2], [0.9, 0.7]) is None


@pytest.mark.slow  # 38 s; its computations are unit-tested above and in test_identifiability_studies
def test_identifiability_cli(monkeypatch, smollm2, tmp_path, capsys):
    """Tiny run on SmolLM2 (layer 28, N up to 4, 4 held-out prompts, 2 splits): outputs, the recomputed ratio,
    exact KL close to the second-order one at this small steer, and resume after a lost unit."""
    monkeypatch.setattr(sj, "load_model", lambda spec=None, dtype="float32": smollm2)
    cli = load_experiment("identifiability")
    out = tmp_path / "ident"
    argv = ["--layers", "28", "--schedule", "1,2,4", "--n-heldout", "4", "--splits", "2", "--taus", "1e-3",
            "--exact-directions", "2", "--steer-fraction", "0.02", "--out", str(out)]
    assert cli.main(argv) == 0
    assert "held-out KL" in capsys.readouterr().out
    result = json.loads((out / "identifiability.json").read_text())
    units = json.loads((out / "identifiability_units.json").read_text())["units"]
    assert set(units) == {"layer=28/split=0", "layer=28/split=1"}
    for unit in units.values():
        assert not set(unit["train"]) & set(unit["heldout"])
        for row in unit["rows"]:
            if row["heldout_kl_invisible"] is not None:
                assert row["ratio_invisible_random"] == pytest.approx(row["heldout_kl_invisible"]
                                                                      / row["heldout_kl_random"])
                # a small steer: the exact KL of sampled directions is near the second-order value of their kind
                assert row["exact_heldout_kl_random"] == pytest.approx(row["heldout_kl_random"], rel=0.5)
            assert row["train_kl_invisible_mean"] is None or row["train_kl_invisible_mean"] <= 1e-3
    summary = result["summary"]
    assert [r["n_train"] for r in summary] == [1, 2, 4]
    assert all(0 < r["invisible_dim_mean"] < 576 for r in summary)
    assert (out / "identifiability.png").stat().st_size > 10_000
    assert cli.main(["--report", str(out / "identifiability.json")]) == 0      # the docs' tables, from the file
    table = capsys.readouterr().out
    assert "| layer | tau (nats) | N |" in table and table.count("\n| 28 | 0.001 |") == 3
    # resume: a lost unit is recomputed, a finished one is not
    store = json.loads((out / "identifiability_units.json").read_text())
    del store["units"]["layer=28/split=1"]
    (out / "identifiability_units.json").write_text(json.dumps(store))
    assert cli.main(argv) == 0
    assert "resuming: 1 finished" in capsys.readouterr().err
    again = json.loads((out / "identifiability_units.json").read_text())["units"]
    assert again["layer=28/split=0"] == units["layer=28/split=0"]
    assert again["layer=28/split=1"]["rows"] == units["layer=28/split=1"]["rows"]


def test_first_order_radius():
    """A ratio 1 + c s^2 crosses 1.1 at s = sqrt(0.1 / c): the log-linear interpolation between sweep points
    lands within the sweep's grid error; the edge cases say which side of the sweep the radius is on."""
    sizes = np.geomspace(0.01, 1.0, 41)
    c = 2.5
    radius = identifiability.first_order_radius(sizes, 1 + c * sizes**2)
    assert radius.status == "crossed"
    assert radius.value == pytest.approx(np.sqrt(0.1 / c), rel=0.01)
    falling = identifiability.first_order_radius(sizes, 1 - 0.5 * sizes)    # the second order can also overshoot
    assert falling.value == pytest.approx(0.2, rel=0.01)
    assert identifiability.first_order_radius(sizes, np.ones(41)) == (None, "beyond_sweep")
    assert identifiability.first_order_radius(sizes, np.full(41, 1.5)) == (0.01, "below_sweep")
    with pytest.raises(sj.InputError, match="increasing"):
        identifiability.first_order_radius(sizes[::-1], np.ones(41))


def test_subspace_angles_match_scipy():
    from scipy.linalg import subspace_angles

    rng = np.random.default_rng(8)
    a = np.linalg.qr(rng.normal(size=(20, 5)))[0]
    b = np.linalg.qr(np.hstack([a[:, :2], rng.normal(size=(20, 4))]))[0]      # shares a 2-dim subspace with a
    ours = identifiability.subspace_angles_deg(a, b)
    np.testing.assert_allclose(ours, np.sort(np.degrees(subspace_angles(a, b))), atol=1e-6)
    assert ours.shape == (5,) and np.all(ours[:2] < 1e-5) and ours[2] > 1.0
    assert identifiability.subspace_angles_deg(a, np.zeros((20, 0))).size == 0


def test_invisible_basis_from_gram_is_the_stacked_one():
    rng = np.random.default_rng(9)
    d = 25
    factors = rng.normal(size=(6, d, d)) * np.geomspace(1.0, 1e-3, d)
    stacked = list(spectrum.stack_factors(factors))[-1]
    a, kl_a = identifiability.invisible_basis(stacked, 6, 0.8, 1e-4)
    b, kl_b = identifiability.invisible_basis_from_gram(identifiability.mean_gram(factors), 0.8, 1e-4)
    assert 0 < a.shape[1] == b.shape[1] < d
    np.testing.assert_allclose(np.sort(kl_a), np.sort(kl_b), rtol=1e-6, atol=1e-15)
    assert np.all(identifiability.subspace_angles_deg(a, b) < 1e-3)
