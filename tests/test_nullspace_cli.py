"""experiments/nullspace.py end to end on the embedded SmolLM2 (shallow layers to stay fast)."""

from __future__ import annotations

import json

import numpy as np
import pytest

import steerjax as sj
from conftest import load_experiment

@pytest.fixture
def cli(monkeypatch, smollm2):
    """The CLI with model loading served from the session's SmolLM2 (saves ~15 s per run)."""
    monkeypatch.setattr(sj, "load_model", lambda spec, dtype="float32": smollm2)
    return load_experiment("nullspace")


def test_exact_run_writes_contract_json_plots_and_resumes(cli, tmp_path, capsys, smollm2):
    out = tmp_path / "run"
    argv = ["--layers", "29,30", "--n-prompts", "4", "--out", str(out)]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "null@1e-02" in printed and "wrote" in printed
    result = json.loads((out / "nullspace.json").read_text())
    for key in ("model", "d", "num_layers", "observable", "prompts", "layers"):
        assert key in result
    assert result["complete"] and result["d"] == 576 and result["num_layers"] == 30
    assert len(result["prompts"]) == 4 and all(p["token_ids"] and p["text"] for p in result["prompts"])
    assert [e["layer"] for e in result["layers"]] == [29, 30]
    for entry in result["layers"]:
        assert len(entry["per_prompt"]) == 4
        for p in entry["per_prompt"]:
            s = np.array(p["singular_values"])
            assert s.shape == (576,) and np.all(np.diff(s) <= 0)
            assert set(p["null_dim"]) == {"1e-02", "1e-03", "1e-04", "1e-06"}
            assert set(p["effective_rank"]) == {"numerical", "entropy", "stable", "participation_ratio"}
        assert [s["n_prompts"] for s in entry["stacked"]] == [1, 2, 4]
        # ||[J_1; ...; J_n]||_F^2 = sum_i ||J_i||_F^2
        frob = np.cumsum([np.sum(np.array(p["singular_values"]) ** 2) for p in entry["per_prompt"]])
        for stacked in entry["stacked"]:
            assert np.sum(np.array(stacked["singular_values"]) ** 2) == pytest.approx(frob[stacked["n_prompts"] - 1])
        assert 0 <= entry["orthogonal_null_fraction"]["1e-02"]["per_prompt_mean"] <= 1
        assert entry["principal_angles"]["set_a"] == [0, 1]
    # the reported spectrum is the dense Jacobian's (independent route: jacfwd to V x d, then SVD)
    ids = result["prompts"][0]["token_ids"]
    assert result["observable"] == "fisher"      # the gauge-free default
    J_F = np.asarray(sj.jacobian(smollm2, np.array(ids), 30, observable="fisher"), np.float64)
    s_dense = np.linalg.svd(J_F, compute_uv=False)
    s_json = np.array(result["layers"][1]["per_prompt"][0]["singular_values"])
    np.testing.assert_allclose(s_json[:50], s_dense[:50], rtol=1e-4)
    # the final-norm gauge: exactly one direction (h_L itself) is (nearly) annihilated at layer L
    assert result["layers"][1]["per_prompt"][0]["null_dim"]["1e-04"] == 1
    # absolute KL counts: a steer of norm s = 0.1 median ||h_l|| along u changes the next-token distribution by
    # 0.5 s^2 ||J_F u||^2 nats (mean over the stacked prompts); recount from the stored singular values
    hidden = smollm2.forward(smollm2.tokenize([p["text"] for p in result["prompts"]]), return_hidden=True).hidden
    for entry in result["layers"]:
        h_median = np.median(np.linalg.norm(np.asarray(hidden[entry["layer"]][:, -1], np.float64), axis=1))
        assert entry["h_norm_median"] == pytest.approx(h_median, rel=1e-4)
        s_norm = entry["steer"]["norm"]
        assert s_norm == pytest.approx(0.1 * entry["h_norm_median"])
        for item, n in [(p, 1) for p in entry["per_prompt"]] + [(st, st["n_prompts"]) for st in entry["stacked"]]:
            kl = 0.5 * s_norm**2 * np.array(item["singular_values"]) ** 2 / n
            assert item["kl_null_dim"] == {key: int(np.sum(kl <= float(key))) for key in ("1e-02", "1e-03", "1e-04")}
        assert 0.9 < entry["logit_top_direction_abs_cos_ones"]["median"] <= 1.0   # the logits' top: a constant shift
    assert "KL-null@1e-03" in printed
    for png in ("spectrum.png", "effective_rank.png", "stacked_null_dim.png"):
        assert (out / png).stat().st_size > 10_000

    # resume: finished layers are reused, only the new one is computed
    first_seconds = {e["layer"]: e["seconds"] for e in result["layers"]}
    assert cli.main(["--layers", "28,29,30", "--n-prompts", "4", "--out", str(out)]) == 0
    assert "resuming: 2 finished layer(s)" in capsys.readouterr().err
    resumed = json.loads((out / "nullspace.json").read_text())
    assert [e["layer"] for e in resumed["layers"]] == [28, 29, 30]
    assert {e["layer"]: e["seconds"] for e in resumed["layers"] if e["layer"] != 28} == first_seconds


@pytest.mark.slow  # 18 s; Lanczos against the dense spectrum on model Jacobians: test_lanczos (default run)
def test_lanczos_run_matches_exact_top_k(cli, tmp_path):
    exact_dir, lanczos_dir = tmp_path / "exact", tmp_path / "lanczos"
    common = ["--layers", "30", "--n-prompts", "3"]
    assert cli.main(common + ["--out", str(exact_dir)]) == 0
    assert cli.main(common + ["--method", "lanczos", "--k", "8", "--out", str(lanczos_dir)]) == 0
    exact = json.loads((exact_dir / "nullspace.json").read_text())["layers"][0]
    lz = json.loads((lanczos_dir / "nullspace.json").read_text())["layers"][0]
    for p_exact, p_lz in zip(exact["per_prompt"], lz["per_prompt"]):
        # float32 Krylov products vs float32 JVPs + float64 SVD
        np.testing.assert_allclose(p_lz["singular_values"], p_exact["singular_values"][:8], rtol=1e-4)
        assert p_lz["null_dim"]["1e-02"] is None  # all top-8 pass the threshold: null dim unknown
        assert p_lz["converged"] and p_lz["max_residual_over_sigma_max"] <= 1e-5  # float32 default tolerance
    np.testing.assert_allclose(lz["stacked"][-1]["singular_values"], exact["stacked"][-1]["singular_values"][:8],
                               rtol=1e-4)


@pytest.mark.parametrize("argv,message", [
    (["--layers", "31"], "outside [0, 30]"),
    (["--layers", "a,b"], "comma list of ints"),
    (["--prompts", "/nonexistent/prompts.txt"], "prompt file not found"),
])
def test_bad_arguments_exit_with_a_named_error(cli, tmp_path, capsys, argv, message):
    assert cli.main(argv + ["--out", str(tmp_path)]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "nullspace.json").exists()


def test_invalid_flag_values_are_rejected(cli, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--n-prompts", "0"])
    assert exc.value.code == 2 and "--n-prompts must be >= 1" in capsys.readouterr().err


def test_empty_prompt_file(cli, tmp_path, capsys):
    empty = tmp_path / "p.txt"
    empty.write_text("\n  \n")
    assert cli.main(["--prompts", str(empty), "--out", str(tmp_path)]) == 2
    assert "holds no prompts" in capsys.readouterr().err
