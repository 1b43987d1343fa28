"""steerjax.studies (protocols, norm-matched directions, steered last-position logits) and
experiments/logit_equivalence.py end to end on the embedded SmolLM2."""

from __future__ import annotations

import csv
import dataclasses
import json

import numpy as np
import pytest

import steerjax as sj
from conftest import load_experiment
from steerjax import studies

@pytest.fixture
def cli(monkeypatch, smollm2):
    monkeypatch.setattr(sj, "load_model", lambda spec=None, dtype="float32": smollm2)
    return load_experiment("logit_equivalence")


def cosine(a, b) -> float:
    return float(abs(a @ b) / (np.linalg.norm(a) * np.linalg.norm(b)))


# ----------------------------------------------------------------------------- directions

@pytest.mark.parametrize("d", [2, 7, 576])
def test_orthogonal_to_is_norm_matched_and_orthogonal(d):
    rng = np.random.default_rng(0)
    for _ in range(20):
        v = rng.normal(size=d) * rng.uniform(0.01, 100)
        x = studies.orthogonal_to(v, rng)
        assert x.shape == (d,) and x.dtype == np.float64
        assert np.linalg.norm(x) == pytest.approx(np.linalg.norm(v), rel=1e-12)
        assert cosine(x, v) < 1e-10
    v = np.arange(1.0, d + 1)
    np.testing.assert_array_equal(studies.orthogonal_to(v, np.random.default_rng(3)),
                                  studies.orthogonal_to(v, np.random.default_rng(3)))
    assert not np.allclose(studies.orthogonal_to(v, np.random.default_rng(3)),
                           studies.orthogonal_to(v, np.random.default_rng(4)))


def test_random_like_is_norm_matched_and_not_orthogonalised():
    rng = np.random.default_rng(1)
    v = rng.normal(size=576) * 3.0
    xs = np.stack([studies.random_like(v, rng) for _ in range(200)])
    np.testing.assert_allclose(np.linalg.norm(xs, axis=1), np.linalg.norm(v), rtol=1e-12)
    cos = xs @ v / np.linalg.norm(v) ** 2
    # a Gaussian direction has cos(angle with v) ~ N(0, 1/d): not orthogonal, not biased
    assert np.std(cos) == pytest.approx(1 / np.sqrt(576), rel=0.2) and abs(np.mean(cos)) < 0.02
    # the paper's norm confound: ||v - r|| ~ sqrt(2) ||v|| while ||(v + v_perp) - v|| = ||v||
    assert np.mean(np.linalg.norm(xs - v, axis=1)) / np.linalg.norm(v) == pytest.approx(np.sqrt(2), rel=0.02)


@pytest.mark.parametrize("bad", [np.zeros(5), np.ones((2, 3)), np.array([1.0, np.nan]), np.ones(1)])
def test_direction_helpers_reject_bad_vectors(bad):
    with pytest.raises(sj.InputError):
        studies.orthogonal_to(bad, np.random.default_rng(0))
    with pytest.raises(sj.InputError):
        studies.random_like(bad, np.random.default_rng(0))


def test_kernel_direction_lies_in_the_smallest_singular_subspace():
    rng = np.random.default_rng(2)
    d, k = 40, 6
    u, _ = np.linalg.qr(rng.normal(size=(d, d)))
    w, _ = np.linalg.qr(rng.normal(size=(d, d)))
    s = np.concatenate([np.logspace(2, 0, d - k), np.logspace(-8, -10, k)])
    factor = u @ np.diag(s) @ w.T
    basis, rel = studies.kernel_basis(factor, k)
    assert basis.shape == (k, d) and rel.shape == (k,)
    np.testing.assert_allclose(rel, s[-k:] / s[0], rtol=1e-5, atol=1e-17)
    v = rng.normal(size=d) * 5
    for _ in range(10):
        x = studies.kernel_direction(factor, v, rng, k)
        assert np.linalg.norm(x) == pytest.approx(np.linalg.norm(v), rel=1e-12)
        assert cosine(x, v) < 1e-10
        # inside span(basis): orthogonalising against v must not leak a multiple of v back in
        assert np.linalg.norm(x - basis.T @ (basis @ x)) / np.linalg.norm(x) < 1e-10
        # ||C x|| tiny relative to ||C v||: x is (nearly) inside the k-dim null space
        assert np.linalg.norm(factor @ x) / np.linalg.norm(factor @ v) < 1e-5
    # the precomputed basis gives the same draw as the factor
    np.testing.assert_allclose(studies.kernel_direction(factor, v, np.random.default_rng(9), k),
                               studies.kernel_direction(None, v, np.random.default_rng(9), basis=basis),
                               atol=1e-12)
    with pytest.raises(sj.InputError):
        studies.kernel_basis(factor, d)
    with pytest.raises(sj.InputError):
        studies.kernel_basis(factor[0], 2)


def test_kernel_direction_is_invisible_to_the_dense_jacobian(tiny_checkpoints):
    """Tiny random Llama, layer 1: a direction built from the QR factors (`JacobianOperator.factors`) is
    bounded by the k-th smallest singular value of the dense V x d Jacobian (independent route: jacfwd to
    V x d, then SVD), and moves the logits far less than a random orthogonal direction."""
    lm = sj.load_model(tiny_checkpoints["llama3_untied_gqa2"][0])
    ids, layer, k = np.array([5, 17, 33, 90, 12, 7]), 1, 8
    J = np.asarray(sj.jacobian(lm, ids, layer), np.float64)
    factor = sj.jacobian_operator(lm, ids, layer).factors()[0]
    s_dense = np.linalg.svd(J, compute_uv=False)
    rng = np.random.default_rng(0)
    v = rng.normal(size=lm.d)
    kernel = [np.linalg.norm(J @ studies.kernel_direction(factor, v, rng, k)) for _ in range(5)]
    orth = [np.linalg.norm(J @ studies.orthogonal_to(v, rng)) for _ in range(5)]
    assert max(kernel) <= s_dense[-k] * np.linalg.norm(v) * (1 + 1e-4)
    assert np.mean(kernel) < 0.2 * np.mean(orth) and max(kernel) < min(orth)


# ----------------------------------------------------------------------------- protocols

def test_protocol_layers():
    paper, corrected = studies.StudyProtocol.paper(), studies.StudyProtocol.corrected()
    assert studies.protocol_layers(corrected, 30) == (15, 15)
    assert studies.protocol_layers(paper, 30) == (15, 16)
    for L in (1, 2, 7, 30):
        rp, sp = studies.protocol_layers(paper, L)
        rc, sc = studies.protocol_layers(corrected, L)
        assert rp == rc == L // 2 and sp == sc + 1
    assert studies.protocol_layers(paper, 30, read_layer=3) == (3, 4)
    assert studies.StudyProtocol.from_name("paper") == paper and paper.positions == corrected.positions == "last"
    with pytest.raises(dataclasses.FrozenInstanceError):
        paper.steer_offset = 0
    with pytest.raises(sj.SteeringError):
        studies.protocol_layers(paper, 30, read_layer=30)
    with pytest.raises(sj.InputError):
        studies.StudyProtocol.from_name("released")


def test_steered_last_logits_matches_forward(smollm2):
    lm = smollm2
    batch = lm.tokenize(["Water boils at", "Once upon a time, there"])
    rng = np.random.default_rng(0)
    v, w = rng.normal(size=(2, lm.d))
    shared = studies.steered_last_logits(lm, batch, 20, v, 3.0)
    ref = np.asarray(lm.forward(batch, steer=sj.Steer(20, v, 3.0, "last")).logits[:, -1], np.float64)
    np.testing.assert_allclose(shared, ref, rtol=0, atol=1e-4)
    np.testing.assert_allclose(studies.steered_last_logits(lm, batch, None),
                               np.asarray(lm.forward(batch).logits[:, -1]), atol=1e-4)
    rows = studies.steered_last_logits(lm, batch, 20, np.stack([v, w]), 3.0)
    np.testing.assert_allclose(rows[0], shared[0], atol=1e-4)
    np.testing.assert_allclose(rows[1], ref_w := np.asarray(
        lm.forward(batch, steer=sj.Steer(20, w, 3.0, "last")).logits[1, -1]), atol=1e-4)
    assert not np.allclose(ref_w, shared[1], atol=1e-2)
    tiled = studies.tile_batch(batch, 3)
    assert tiled.ids.shape == (6, batch.ids.shape[1])
    np.testing.assert_allclose(studies.steered_last_logits(lm, tiled, 20, v, 3.0), np.tile(shared, (3, 1)), atol=1e-4)
    with pytest.raises(sj.SteeringError):
        studies.steered_last_logits(lm, batch, 20, np.ones((3, lm.d)))
    with pytest.raises(sj.SteeringError):
        studies.steered_last_logits(lm, batch, 31, v)


# ----------------------------------------------------------------------------- CLI

@pytest.mark.slow  # 23-32 s; the directions and steered logits it uses are tested above
def test_cli_end_to_end(cli, tmp_path, capsys, monkeypatch):
    from steerjax import data

    full = data.trait_pairs
    monkeypatch.setattr(data, "trait_pairs", lambda trait: tuple(side[:8] for side in full(trait)))  # speed
    out = tmp_path / "run"
    argv = ["--quick", "--n-prompts", "3", "--seeds", "1", "--alphas", "0.5", "--read-layer", "26",
            "--k-smallest", "16", "--out", str(out)]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "Table 3 format" in printed and "Agreement%" in printed and "wrote" in printed
    result = json.loads((out / "logit_equivalence.json").read_text())
    assert result["protocol"] == {"name": "corrected", "description": result["protocol"]["description"],
                                  "read_layer": 26, "steer_layer": 26, "positions": "last"}
    assert result["settings"]["traits"] == ["formality"] and result["settings"]["n_prompts"] == 3
    assert len(result["prompts"]) == 3 and result["d"] == 576 and result["num_layers"] == 30
    rows = {r["kind"]: r for r in result["rows"]}
    assert set(rows) == {"orthogonal", "random", "kernel", "paper_random"}
    for r in rows.values():
        for key in ("l2_mean", "kl_mean", "top1_mean", "top10_mean", "R_vs_random", "R_vs_paper_random",
                    "l2_rel_steer", "jvp_ratio_mean", "steer_l2_mean"):
            assert np.isfinite(r[key]), key
        assert 0 <= r["top1_mean"] <= 1 and 0 <= r["top10_mean"] <= 1
    assert rows["random"]["R_vs_random"] == pytest.approx(1.0)
    # the point: a measured-kernel perturbation moves the output far less than a random orthogonal one
    assert rows["kernel"]["kl_mean"] < 0.1 * rows["orthogonal"]["kl_mean"]
    assert rows["kernel"]["jvp_ratio_mean"] < 0.1 * rows["orthogonal"]["jvp_ratio_mean"]
    assert len(result["kernel"]["max_rel_singular_value_per_prompt"]) == 3
    with open(out / "logit_equivalence.csv") as f:
        assert len(list(csv.DictReader(f))) == 4
    assert (out / "kl_by_kind.png").stat().st_size > 10_000
    md = load_experiment("report").folder_markdown(out)       # Table 3 in the paper's format, from the JSON
    orth = rows["orthogonal"]
    assert f"| formality | 0.5 | {orth['R_vs_paper_random']:.2f} | {orth['top1_mean']:.0%} |" in md
    assert f"{rows['kernel']['kl_vs_orthogonal']:.3f} | {rows['kernel']['jvp_ratio_mean']:.1e}" in md


def test_cli_errors(cli, tmp_path, capsys):
    # the paper protocol steers read + 1: reading h_30 would steer a layer that does not exist
    assert cli.main(["--protocol", "paper", "--read-layer", "30", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "31" in err and len(err.strip().splitlines()) == 1
    with pytest.raises(SystemExit) as exc:
        cli.main(["--traits", "sarcasm"])
    assert exc.value.code == 2


def test_default_output_folder_depends_on_the_protocol(cli):
    """A paper-protocol run must not overwrite the corrected run's results (it once did)."""
    assert cli.parse_args([]).out == "results/logit_equivalence_corrected"
    assert cli.parse_args(["--protocol", "paper"]).out == "results/logit_equivalence_paper"
    assert cli.parse_args(["--out", "x"]).out == "x"
