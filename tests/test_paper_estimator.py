"""The paper's null-space estimator (steerjax.studies.paper_null_space_estimate) on linear maps whose spectrum is
known, and experiments/paper_estimator.py end to end on SmolLM2 at a small size."""

from __future__ import annotations

import json

import numpy as np
import pytest

import steerjax as sj
from conftest import load_experiment
from steerjax import studies


def known_map(rng, V: int, singular_values) -> np.ndarray:
    """A (V, d) with the given singular values (d = len(singular_values))."""
    d = len(singular_values)
    u, _ = np.linalg.qr(rng.normal(size=(V, d)))
    w, _ = np.linalg.qr(rng.normal(size=(d, d)))
    return (u * np.asarray(singular_values)) @ w.T


def test_estimator_on_known_spectra():
    """Central differences of a linear map are exact, so the estimator's rank at 5% follows the spectrum when the
    gap is wide (5 values in [0.5, 1], the rest 1e-4); its null fraction divides by the number of probes, so a
    full-rank map still reports 1 - d / n (0.98 here) instead of 0."""
    rng = np.random.default_rng(0)
    d, n = 20, 1000
    low_rank = known_map(rng, 50, [1.0, 0.9, 0.8, 0.6, 0.5] + [1e-4] * 15)
    est = studies.paper_null_space_estimate(lambda x: x @ low_rank.T, d, n_directions=n, seed=1)
    assert est.rank == 5 and est.null_fraction == pytest.approx(1 - 5 / n)
    assert est.singular_values.shape == (50,)                   # min(n, V) values, at most d non-zero
    assert np.all(est.singular_values[d:] < 1e-10 * est.singular_values[0])
    full = known_map(rng, 50, np.linspace(1.0, 0.5, d))
    est_full = studies.paper_null_space_estimate(lambda x: x @ full.T, d, n_directions=n, seed=1)
    assert est_full.rank == d and est_full.null_fraction == pytest.approx(1 - d / n)   # the floor, not 0
    # outputs rounded to float16 as the released pipeline's are: the central differences of nearby outputs are
    # rounding noise, which inflates the rank past d (outputs near 1) or erases it (outputs near 30, where the
    # float16 spacing 0.016 exceeds every difference): the estimate then measures the precision, not J
    def rounded(offset):
        return studies.paper_null_space_estimate(lambda x: (x @ low_rank.T + offset).astype(np.float16), d,
                                                 n_directions=n, seed=1)
    assert rounded(1.0).rank > d and rounded(30.0).rank == 0
    # outputs past float16's range (Gemma 3's residual stream) are inf: a clear error, not an SVD failure
    with pytest.raises(sj.NonFiniteError, match="not finite.*overflow"):
        studies.paper_null_space_estimate(lambda x: (x @ low_rank.T * 1e8).astype(np.float16), d, n_directions=n)


def test_a_non_finite_row_is_reported_not_fatal(capsys):
    """A dtype whose probes overflow is a table row saying so (the file keeps the message)."""
    paper_estimator = load_experiment("paper_estimator")
    result = {"model_name": "m", "layer": 9, "prompt": "p", "paper_formula_floor": 0.36,
              "settings": {"threshold": 0.05, "n_directions": 1000},
              "rows": [{"method": "exact", "rank": 600, "null_fraction_over_d": 0.0625,
                        "null_fraction_paper_formula": 0.4},
                       {"method": "paper estimator, float16 model", "rank": None, "null_fraction_over_d": None,
                        "null_fraction_paper_formula": None, "failed": "overflow"}]}
    paper_estimator.report(result)
    out = capsys.readouterr().out
    assert "not finite" in out
    assert "| 9 | paper estimator, float16 model | - | not finite (outputs overflow) | - |" in out


@pytest.mark.slow  # 17 s; the estimator itself: test_estimator_on_known_spectra (default run)
def test_paper_estimator_cli(monkeypatch, smollm2, tmp_path, capsys):
    monkeypatch.setattr(sj, "load_model", lambda spec=None, dtype="float32": smollm2)
    cli = load_experiment("paper_estimator")
    out = tmp_path / "est"
    assert cli.main(["--layer", "15", "--n-directions", "200", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "paper estimator, float16 model" in printed and "cannot fall below" in printed
    result = json.loads((out / "paper_estimator.json").read_text())
    exact, f32, f16 = result["rows"]
    assert result["paper_formula_floor"] == pytest.approx(1 - 576 / 200)
    s = sj.jacobian_operator(smollm2, smollm2.tokenize([result["prompt"]]), 15).singular_values()[0]
    assert exact["rank"] == int(np.sum(s > 0.05 * s[0]))
    # float32 central differences recover the exact rank within a few directions near the threshold
    assert abs(f32["rank"] - exact["rank"]) <= max(3, 0.2 * exact["rank"])
    for row in (exact, f32, f16):
        assert row["null_fraction_paper_formula"] == pytest.approx(1 - row["rank"] / 200)
    assert cli.main(["--report", str(out / "paper_estimator.json")]) == 0       # the table again, from the file
    assert "paper estimator, float32 model" in capsys.readouterr().out
