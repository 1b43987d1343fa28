"""experiments/first_order.py, sequence_identifiability.py and invisible_steering.py end to end on the embedded
SmolLM2 at tiny sizes (late layers, few prompts), and their direction constructions on exact synthetic cases."""

from __future__ import annotations

import json

import numpy as np
import pytest

import steerjax as sj
from conftest import load_experiment
from steerjax import clustered, identifiability, stats


@pytest.fixture
def patched(monkeypatch, smollm2):
    monkeypatch.setattr(sj, "load_model", lambda spec=None, dtype="float32": smollm2)
    return smollm2


def drop_unit(path, key: str) -> None:
    store = json.loads(path.read_text())
    del store["units"][key]
    path.write_text(json.dumps(store))


@pytest.mark.slow  # 40 s of XLA compilation for the sweep, the points and the report (run with -m slow)
def test_first_order_cli(patched, tmp_path, capsys):

    cli = load_experiment("first_order")
    out = tmp_path / "fo"
    argv = ["--layers", "28", "--n-train", "4", "--n-heldout", "3", "--directions", "2",
            "--fractions", "0.003,0.05,0.4", "--out", str(out)]
    assert cli.main(argv) == 0
    assert "| layer | direction |" in capsys.readouterr().out
    result = json.loads((out / "first_order.json").read_text())
    entry = result["layers"][0]
    sweep = entry["sweep"]
    for name, fam in sweep["families"].items():
        assert fam is not None and len(fam["ratio"]) == 3
        # the ratio is the quotient of the stored means, and the radius follows from the stored ratios
        np.testing.assert_allclose(fam["ratio"], np.asarray(fam["exact_kl"]) / np.asarray(fam["second_order_kl"]))
        radius = identifiability.first_order_radius(sweep["fractions"], fam["ratio"])
        assert (fam["radius"], fam["radius_status"]) == tuple(radius)
        # at a steer of 0.3% of ||h_l|| the exact KL is its second-order term to within a few percent
        assert abs(fam["ratio"][0] - 1) < 0.05, name
    # where the studies steer: alpha ||v|| / median ||h_l||, with sqrt(2) and 2 for v + v_perp and 2v
    t = entry["positions"]["traits"]["formality"]
    assert t["v_fraction_pool"] == pytest.approx(t["v_norm"] / sweep["steer_norms"][0] * sweep["fractions"][0])
    assert t["v+perp_fraction_pool"] == pytest.approx(np.sqrt(2) * t["v_fraction_pool"])
    assert t["2v_fraction_pool"] == pytest.approx(2 * t["v_fraction_pool"])
    for point in ("v", "v+perp"):
        u = entry[f"point={point}"]
        assert len(u["angles_deg"]) == min(u["invisible_dim_at_h"], u["invisible_dim_at_point"]) > 0
        assert 0 <= u["angle_median_deg"] <= u["angle_max_deg"] <= 90
    assert entry["point=v+perp"]["offset_norm"] == pytest.approx(np.sqrt(2) * entry["positions"]["traits"]["formality"]
                                                                 ["v_norm"], rel=1e-6)
    assert (out / "first_order.png").stat().st_size > 10_000
    assert cli.main(["--report", str(out / "first_order.json")]) == 0
    assert capsys.readouterr().out.count("\n| 28 | ") == 4 + 4 + 3 + 2     # ratios, exact KLs, traits, points
    drop_unit(out / "first_order_units.json", "layer=28/point=v")
    assert cli.main(argv) == 0
    assert "resuming: 3 finished" in capsys.readouterr().err
    again = json.loads((out / "first_order.json").read_text())["layers"][0]
    assert again["point=v"]["angles_deg"] == pytest.approx(entry["point=v"]["angles_deg"], abs=1e-6)


@pytest.mark.slow  # 22 s; window factors, sequence KL and the Gram route: test_sequence, test_identifiability
def test_sequence_identifiability_cli(patched, tmp_path, capsys):
    cli = load_experiment("sequence_identifiability")
    out = tmp_path / "seq"
    argv = ["--layers", "28", "--schedule", "2", "--n-heldout", "2", "--window", "3", "--taus", "1e-3",
            "--steer-fraction", "0.02", "--out", str(out)]
    assert cli.main(argv) == 0
    assert "| layer | N | tau |" in capsys.readouterr().out
    result = json.loads((out / "sequence_identifiability.json").read_text())
    (row,) = result["layers"][0]["rows"]
    assert 0 < row["dim_one_position"] < 576 and 0 < row["dim_sequence"] < 576
    assert row["ratio_seq_sequence"] == pytest.approx(row["heldout_seq_kl_of_sequence"] / row["heldout_seq_kl_random"])
    assert len(result["layers"][0]["continuations"]) == 4
    drop_unit(out / "sequence_identifiability_units.json", "layer=28")
    assert cli.main(argv) == 0
    again = json.loads((out / "sequence_identifiability.json").read_text())["layers"][0]["rows"][0]
    assert again["dim_sequence"] == row["dim_sequence"]
    assert again["ratio_seq_sequence"] == pytest.approx(row["ratio_seq_sequence"], rel=1e-4)


def test_invisible_steering_directions():
    """Every family's directions are unit and orthogonal to v; null ones lie in the invisible basis (minus their v
    component), visible ones are the successive maximisers of the stacked quadratic form off v."""
    cli = load_experiment("invisible_steering")
    rng = np.random.default_rng(11)
    d = 12
    stacked = rng.normal(size=(30, d)) * np.geomspace(1.0, 1e-3, d)
    v = rng.normal(size=d)
    basis = np.linalg.svd(stacked)[2][-4:].T                                       # the 4 least visible
    dirs = cli.family_directions(basis, stacked, v, 2, rng)
    for family, u in dirs.items():
        assert u.shape == (2, d)
        np.testing.assert_allclose(np.linalg.norm(u, axis=1), 1.0)
        assert np.all(np.abs(u @ v) < 1e-12 * np.linalg.norm(v)), family
    q_null = np.linalg.qr(np.column_stack([basis, v]))[0]           # null directions: in span(basis, v), off v
    assert np.all(np.abs(dirs["null"].T - q_null @ (q_null.T @ dirs["null"].T)) < 1e-12)
    q = np.linalg.qr(np.column_stack([v, dirs["visible"][0]]))[0]
    off = np.eye(d) - q @ q.T
    top = np.linalg.svd(stacked @ off)[2][0]
    assert abs(abs(top @ dirs["visible"][1]) - 1) < 1e-10
    assert np.linalg.norm(stacked @ dirs["visible"][0]) >= np.linalg.norm(stacked @ dirs["visible"][1])
    conds = cli.conditions_of(v, dirs, [30.0, 90.0])
    assert np.linalg.norm(conds["v+null0"]["vector"]) == pytest.approx(np.sqrt(2) * np.linalg.norm(v))
    assert np.linalg.norm(conds["rot30/visible1"]["vector"]) == pytest.approx(np.linalg.norm(v))
    cos = conds["rot30/random0"]["vector"] @ v / np.linalg.norm(v) ** 2
    assert cos == pytest.approx(np.cos(np.radians(30)))


@pytest.mark.slow  # 33-72 s; its statistics: test_clustered, its KL: test_sequence, its directions: below
def test_invisible_steering_cli(patched, tmp_path, capsys):
    cli = load_experiment("invisible_steering")
    out = tmp_path / "inv"
    argv = ["--layer", "28", "--n-train", "4", "--n-heldout", "2", "--samples", "2", "--max-new-tokens", "4",
            "--thetas", "90", "--directions", "1", "--out", str(out)]
    assert cli.main(argv) == 0
    assert "| condition |" in capsys.readouterr().out
    result = json.loads((out / "invisible_steering.json").read_text())
    units = json.loads((out / "invisible_steering_units.json").read_text())["units"]
    keys = {"base", "v", "v+null0", "rot90/null0", "v+random0", "rot90/random0", "v+visible0", "rot90/visible0"}
    assert {k.split("=", 1)[1] for k in units if k.startswith("cond=")} == keys
    assert {k.split("=", 1)[1] for k in units if k.startswith("kl=")} == keys - {"v"}
    rows = {r["condition"]: r for r in result["summary"]}
    for key, r in rows.items():
        if key == "v":
            assert r["kl_per_token"] is None and r["score_minus_v"] is None
            continue
        per_prompt = units[f"kl={key}"]["per_prompt"]
        assert len(per_prompt) == 2 and min(per_prompt) > 0
        # prompt-level: the mean of the prompts' means of their rows, and a t-interval over the 2 prompts
        rows_kl = np.asarray(units[f"kl={key}"]["per_row"]).reshape(2, 2).mean(axis=1)
        np.testing.assert_allclose(per_prompt, rows_kl)
        mean, lo, hi = stats.mean_ci(per_prompt)
        assert (r["kl_per_token"]["mean"], r["kl_per_token"]["ci_low"]) == pytest.approx((mean, lo))
    tested = [r for r in result["summary"] if r["score_tests"] is not None]
    assert len(tested) == len(keys) - 1
    np.testing.assert_allclose([r["score_tests"]["p_holm"] for r in tested],
                               clustered.holm([r["score_tests"]["p"] for r in tested]))
    assert rows["v+random0"]["norm_over_v"] == pytest.approx(np.sqrt(2))
    assert rows["rot90/visible0"]["norm_over_v"] == pytest.approx(1.0)
    assert (out / "invisible_steering.png").stat().st_size > 10_000
    drop_unit(out / "invisible_steering_units.json", "kl=rot90/null0")
    assert cli.main(argv) == 0
    again = json.loads((out / "invisible_steering_units.json").read_text())["units"]
    assert again["kl=rot90/null0"]["per_row"] == pytest.approx(units["kl=rot90/null0"]["per_row"], rel=1e-5)
    assert again["cond=v"] == units["cond=v"]
