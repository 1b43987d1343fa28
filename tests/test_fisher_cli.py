"""experiments/fisher_cramer_rao.py, recovery.py and linearization.py end to end on the embedded SmolLM2.

Small settings at layer 27 (the exact tail is 3 blocks, so Jacobians take seconds); the numbers checked are
the ones each script exists to show, with tolerances stated where they are set."""

from __future__ import annotations

import csv
import json

import pytest

import steerjax as sj
from conftest import load_experiment

LAYER = 27


@pytest.fixture
def patched(monkeypatch, smollm2):
    from steerjax import data

    monkeypatch.setattr(sj, "load_model", lambda spec=None, dtype="float32": smollm2)
    full = data.trait_pairs
    monkeypatch.setattr(data, "trait_pairs", lambda trait: tuple(side[:8] for side in full(trait)))  # speed


@pytest.fixture(scope="module")
def smollm2_f64(smollm2):
    """The embedded model with its (dequantised) weights cast to float64, sharing the loaded tokenizer
    (what `sj.load_model(None, dtype="float64")` gives, without reading the file again)."""
    import jax

    jax.config.update("jax_enable_x64", True)      # as load_model(dtype="float64") does
    params = jax.tree.map(lambda x: x.astype("float64"), smollm2.params)
    return smollm2.replace(params=params)


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.mark.slow  # 27 s; the Fisher matrices, bounds and fits it reports are unit-tested in test_fisher / test_fits
def test_fisher_cramer_rao_cli(patched, tmp_path, capsys):
    cli = load_experiment("fisher_cramer_rao")
    out = tmp_path / "fcr"
    argv = ["--layer", str(LAYER), "--n-prompts", "2", "--n-obs", "3000", "--replicates", "400", "--top-k", "8",
            "--eps", "1e-2,1e-6", "--out", str(out)]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "Gaussian model" in printed and "categorical model" in printed and "wrote" in printed
    result = json.loads((out / "fisher_cramer_rao.json").read_text())
    assert result["layer"] == LAYER and result["d"] == 576 and len(result["prompts"]) == 2
    gauss = result["gaussian"]
    assert {(r["n_prompts"], r["eps"]) for r in gauss} == {(1, 1e-2), (1, 1e-6), (2, 1e-2), (2, 1e-6)}
    for r in gauss:
        assert r["rank"] == r["rank_from_singular_values"] and r["rank"] + r["null_dim"] == 576
        # Gaussian LS attains the bound: n_obs = 3000 -> per-direction MC sd 0.026; the mean over >= 400
        # directions has sd ~0.0013 -> allow 0.01; whitened error within 25% of its MC expectation
        assert abs(r["variance_ratio_mean"] - 1) < 0.01
        assert abs(r["whitened_rel_error"] / r["expected_whitened_rel_error"] - 1) < 0.25
        assert r["ls_null_fraction_max"] < 1e-9                    # min-norm LS: nothing in the null space
    # stacking prompts removes eps-null directions (paper eq. 33)
    by = {(r["n_prompts"], r["eps"]): r for r in gauss}
    assert by[(2, 1e-2)]["null_dim"] < by[(1, 1e-2)]["null_dim"]
    # where an eps-null space carries (almost) no information, the MAP estimate keeps the prior's component
    for r in gauss:
        if r["null_dim"] and r["null_information_times_tau2"] < 1e-6:
            assert r["map_null_minus_prior_rel_max"] < 1e-2
            assert abs(r["map_null_variance_over_tau2"] - 1) < 0.2          # the prior's variance
            assert r["gd_null_moved_rel_max"] < 1e-6
    cat = result["categorical"]
    assert [r["n_prompts"] for r in cat] == [1, 2]
    for r in cat:
        assert r["rank"] == r["expected_rank"] == r["n_prompts"] * 7
        assert r["converged_replicates"] == 400
        # 400 replicates: per-direction sd 0.071, mean over 7-14 directions sd <= 0.027 -> 0.1 (~4 sd)
        assert abs(r["variance_ratio_mean"] - 1) < 0.1
        assert r["null_moved_rel_max"] < 1e-6                      # L-BFGS never touches the null space
    assert len(read_csv(out / "gaussian.csv")) == 4 and len(read_csv(out / "categorical.csv")) == 2
    assert (out / "fisher_cramer_rao.png").stat().st_size > 10_000


@pytest.mark.slow  # 130 s on 2 cores; fast tests cover its parts: test_fits (recover on the row / null space),
# test_tail (the steered observable and the operator at v*), test_cli_rejects_bad_layer[recovery]
def test_recovery_cli(patched, tmp_path, capsys):
    cli = load_experiment("recovery")
    out = tmp_path / "rec"
    argv = ["--quick", "--layer", str(LAYER), "--n-prompts", "2", "--n-heldout", "1", "--restarts", "2",
            "--eps", "1e-1,1e-2", "--out", str(out)]
    assert cli.main(argv) == 0
    assert "observed prompts" in capsys.readouterr().out
    result = json.loads((out / "recovery.json").read_text())
    designs = {d["n_prompts"]: d for d in result["designs"]}
    assert set(designs) == {1, 2}
    # stacking prompts shrinks the null space
    assert designs[2]["null_dim"]["logprobs"]["1e-01"] < designs[1]["null_dim"]["logprobs"]["1e-01"]
    for n, design in designs.items():
        for r in design["restarts"]:
            # the fit reproduces the observed distributions and v* on the well-determined directions (Fisher
            # row space at eps 0.1; float32 model, so ~1e-2 is the attainable level)
            assert r["kl_fit"] < 1e-3 * n
            assert r["fisher_1e-01_row_err"] < 0.05
    # with one prompt, v is not identified: each start keeps a different, large error along the null space
    one = designs[1]["restarts"]
    for r in one:
        assert r["fisher_1e-01_null_err"] > 0.3 and r["fisher_1e-01_null_err"] > 10 * r["fisher_1e-01_row_err"]
    # the two recovered vectors agree on the row space and differ along the null space (random starts in
    # ~480 null dimensions: their null *errors* have nearly equal norms, but point in different directions).
    # Measured at this seed: ||P_null (v_1 - v_2)|| = 0.28 ||v*||, ||P_row (v_1 - v_2)|| = 3e-3 ||v*||
    spread = designs[1]["pairwise"]
    assert spread["fisher_1e-01_null"] > 0.15 and spread["fisher_1e-01_null"] > 10 * spread["fisher_1e-01_row"]
    # ... so it fits the observed prompt but not a held-out one; two prompts pin v down far better
    # (measured at this seed: held-out KL 3e-3 with N = 1 vs 3e-5 with N = 2; margin 10x)
    assert min(r["kl_unobserved_mean"] for r in one) > 10 * max(
        r["kl_unobserved_mean"] for r in designs[2]["restarts"])
    assert len(read_csv(out / "recovery.csv")) == 4
    assert (out / "recovery.png").stat().st_size > 10_000
    # each N's fit is a unit saved when it finishes: drop N = 2 (as a kill after N = 1 would leave it) and
    # rerun: N = 1 is not refitted, N = 2 is, and the result equals the uninterrupted run's
    from steerjax import io

    units_path = out / "recovery_units.json"
    units = json.loads(units_path.read_text())
    assert set(units["units"]) == {"N=1", "N=2"}
    first_n1 = units["units"]["N=1"]
    del units["units"]["N=2"]
    units_path.write_text(json.dumps(units))
    assert cli.main(argv) == 0
    err = capsys.readouterr().err
    assert "resuming: 1 N already fitted" in err and "fitting N = 1:" not in err and "fitting N = 2:" in err
    resumed = json.loads(units_path.read_text())["units"]
    assert resumed["N=1"] == first_n1                           # kept as it was, timing included
    assert io.strip_volatile(json.loads((out / "recovery.json").read_text())) == io.strip_volatile(result)


@pytest.mark.slow  # 21 s; the residuals and slopes: test_linearization (default run)
def test_linearization_cli(patched, monkeypatch, smollm2_f64, tmp_path, capsys):
    monkeypatch.setattr(sj, "load_model", lambda spec=None, dtype="float64": smollm2_f64)
    cli = load_experiment("linearization")
    out = tmp_path / "lin"
    argv = ["--quick", "--layer", str(LAYER), "--n-prompts", "1", "--n-a", "13", "--out", str(out)]
    assert cli.main(argv) == 0
    assert "summary" in capsys.readouterr().out
    result = json.loads((out / "linearization.json").read_text())
    assert result["dtype"] == "float64" and len(result["a_values"]) == 13
    rows = {r["direction"]: r for r in result["rows"]}
    assert set(rows) == {"v", "v+v_null", "v_null", "v_perp"}
    for r in rows.values():
        # Taylor: the first-order residual is quadratic in a; the fit uses >= 4 points above the float64 floor
        assert 1.8 <= r["slope"] <= 2.2 and r["n_fit"] >= 4
    # the measured-kernel direction is far less visible to J than a random orthogonal one. At layer 27 (3 tail
    # blocks) the 32 smallest singular values are not tiny: measured ||J v_null|| / ||J v|| = 0.06 against
    # 0.54 for v_perp (ratio 0.12); bar 0.25
    assert rows["v_null"]["jw_over_jv"] < 0.25 * rows["v_perp"]["jw_over_jv"]
    assert rows["v_null"]["kernel_max_rel_singular_value"] < 0.05
    assert len(read_csv(out / "linearization.csv")) == 4
    assert (out / "linearization.png").stat().st_size > 10_000


@pytest.mark.parametrize("script", ["fisher_cramer_rao", "recovery", "linearization"])
def test_cli_rejects_bad_layer(patched, tmp_path, capsys, script):
    cli = load_experiment(script)
    assert cli.main(["--quick", "--layer", "31", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "31" in err and len(err.strip().splitlines()) == 1
