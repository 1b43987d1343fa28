"""experiments/orthogonal.py, scale_invariance.py and environments.py end to end on the embedded SmolLM2,
at tiny sizes (2 prompts x 2 samples, a few tokens): outputs, resume, protocol differences, errors. The
reported statistics are recomputed here from the stored per-row scores."""

from __future__ import annotations

import json

import numpy as np
import pytest

import steerjax as sj
from conftest import load_experiment
from steerjax import generation, stats

TINY = ["--n-prompts", "2", "--samples", "2", "--max-new-tokens", "4"]


@pytest.fixture
def serve_smollm2(monkeypatch, smollm2):
    monkeypatch.setattr(sj, "load_model", lambda spec=None, dtype="float32": smollm2)


def scores(units, key, trait, field="generated"):
    return np.array(units["units"][key]["scores"][trait][field])


@pytest.mark.slow  # 54 s; the shared pipeline runs end to end in test_scale_invariance_cli (default run)
def test_orthogonal_cli(serve_smollm2, tmp_path, capsys):
    cli = load_experiment("orthogonal")
    out = tmp_path / "orth"
    # the model's second probe is exercised in test_environments_cli (slow) and routed in test_behaviour; here it
    # would triple the run's compilations (99 s against 26 s)
    argv = ["--traits", "formality", "--seeds", "2", "--seed-counts", "2", "--no-second-probe", "--out", str(out),
            *TINY]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "Table 1 format" in printed and "wrote" in printed
    result = json.loads((out / "orthogonal.json").read_text())
    units = json.loads((out / "orthogonal_units.json").read_text())
    assert set(units["units"]) == {"base", "formality/v", "formality/2v", "formality/v+perp0", "formality/v+perp1",
                                   "formality/perp0", "formality/perp1", "formality/v+perp0/matched",
                                   "formality/v+perp1/matched"}
    assert result["settings"]["read_layer"] == result["settings"]["steer_layer"] == 15     # corrected: no off-by-one
    assert result["vectors"]["formality"]["max_abs_cos_perp"] < 1e-10
    r = result["traits"]["formality"]
    v = scores(units, "formality/v", "formality")
    for s, seed_row in enumerate(r["per_seed"]):
        vp = scores(units, f"formality/v+perp{s}", "formality")
        perp = scores(units, f"formality/perp{s}", "formality")
        base = scores(units, "base", "formality")
        ref_d = stats.cohens_d(v, vp) if np.std(v) + np.std(vp) > 0 else None
        assert seed_row["d"] == (pytest.approx(ref_d) if ref_d is not None else None)
        if v.mean() != base.mean():
            assert seed_row["efficacy"] == pytest.approx((perp.mean() - base.mean()) / (v.mean() - base.mean()))
    # prompt level: per-prompt means of the paired row differences (2 prompts x 2 samples), seeds pooled per row
    pl = r["prompt_level"]
    base = scores(units, "base", "formality")
    assert pl["v_minus_base"]["mean"] == pytest.approx(np.mean((v - base).reshape(2, 2).mean(axis=1)))
    pooled = np.mean([scores(units, f"formality/v+perp{s}", "formality") for s in range(2)], axis=0)
    assert pl["pooled_v_plus_perp_minus_v"]["mean"] == pytest.approx(np.mean(pooled - v))
    assert pl["pooled_v_plus_perp_minus_v"]["n_prompts"] == 2 and "pooled_matched_minus_v" in pl
    assert "prompt level" in printed
    assert r["second_probe"] is None and "second_scores" not in units["units"]["formality/v"]
    assert set(r["fluency"]) == {"base", "v", "2v", "v+perp", "matched", "perp"}
    ds = [s["d"] for s in r["per_seed"] if s["d"] is not None]
    assert r["table"][0]["n_seeds"] == 2 and (not ds or r["table"][0]["d_mean"] == pytest.approx(np.mean(ds)))
    assert len(units["units"]["base"]["texts"]) == 4
    decode = units["meta"]["decode"]                       # which decode path the run's generations took
    assert decode["paths_run"] == [generation.decode_path(sj.load_model())]
    assert decode["generate_calls"][decode["paths_run"][0]] == len(units["units"])
    assert result["meta"]["decode"]["paths_run"] == decode["paths_run"]
    for png in ("perp_only.png", "effect_sizes.png"):
        assert (out / png).stat().st_size > 5_000
    assert (out / "orthogonal.csv").read_text().startswith("trait,n_seeds,d_mean")

    report = load_experiment("report")
    md = report.folder_markdown(out)
    assert "| formality | n=2 |" in md and f"{r['mean_v']:.3f}" in md
    # --update rewrites report blocks from the folders they name, and a current page is left as it is
    page = "text\n<!-- report orth -->\nstale\n<!-- /report -->\n<!-- report-summary orth -->\n<!-- /report -->\n"
    new = report.update_text(page, tmp_path)
    assert report.study_markdown(out) in new and "stale" not in new and "- Table 1, formality, lexical probe" in new
    assert report.update_text(new, tmp_path) == new

    # resume: nothing is regenerated
    assert cli.main(argv) == 0
    assert "resuming: 9 of 9 conditions" in capsys.readouterr().err
    # another protocol into the same folder is refused (finished work is not overwritten; the paper protocol's
    # run with --fresh is test_orthogonal_cli_paper_protocol, under -m slow)
    assert cli.main([*argv, "--protocol", "paper"]) == 2
    assert "different settings" in capsys.readouterr().err


@pytest.mark.slow  # 20 s: a second full tiny run
def test_orthogonal_cli_paper_protocol(serve_smollm2, tmp_path, capsys):
    """--protocol paper (over a corrected run's folder, with --fresh): steer layer off by one, prompt scored, no 2v
    control, the paper's efficacy ratio."""
    cli = load_experiment("orthogonal")
    out = tmp_path / "orth"
    argv = ["--traits", "formality", "--seeds", "2", "--seed-counts", "2", "--no-second-probe", "--out", str(out),
            *TINY, "--protocol", "paper", "--fresh"]
    assert cli.main(argv) == 0
    paper = json.loads((out / "orthogonal.json").read_text())
    assert (paper["settings"]["read_layer"], paper["settings"]["steer_layer"]) == (15, 16)
    punits = json.loads((out / "orthogonal_units.json").read_text())
    assert "formality/2v" not in punits["units"]
    v = scores(punits, "formality/v", "formality", "with_prompt")
    perp = scores(punits, "formality/perp0", "formality", "with_prompt")
    assert paper["traits"]["formality"]["per_seed"][0]["efficacy"] == pytest.approx(abs(perp.mean()) / abs(v.mean()))


@pytest.mark.parametrize("argv, message", [
    (["--traits", "sarcasm"], "unknown trait"), (["--seeds", "1"], "--seeds"),
    (["--seed-counts", "5", "--seeds", "3"], "seed-counts"),
    (["--alpha", "nan"], "--alpha"), (["--temperature", "0"], "--temperature"), (["--n-prompts", "0"], "--n-prompts"),
])
def test_orthogonal_cli_rejects_bad_flags(argv, message, capsys):
    cli = load_experiment("orthogonal")
    with pytest.raises(SystemExit) as err:
        cli.parse_args(argv)
    assert err.value.code == 2 and message in capsys.readouterr().err


def test_scale_invariance_cli(serve_smollm2, tmp_path, capsys):
    cli = load_experiment("scale_invariance")
    out = tmp_path / "scale"
    assert cli.main(["--alphas", "0,2", "--seeds", "2", "--no-second-probe", "--out", str(out), *TINY]) == 0
    assert "wrote" in capsys.readouterr().out
    result = json.loads((out / "scale_invariance.json").read_text())
    units = json.loads((out / "scale_invariance_units.json").read_text())
    assert set(units["units"]) == {"base", "formality/a2/v", "formality/a2/v+perp0", "formality/a2/v+perp1"}
    zero, two = result["rows"]
    assert zero["alpha"] == 0 and zero["mean_v"] == zero["mean_v_plus_perp"] and zero["d_mean"] is None
    v = scores(units, "formality/a2/v", "formality")
    pooled = np.concatenate([scores(units, f"formality/a2/v+perp{s}", "formality") for s in range(2)])
    assert two["mean_v"] == pytest.approx(v.mean()) and two["mean_v_plus_perp"] == pytest.approx(pooled.mean())
    assert two["abs_mean_diff"] == pytest.approx(abs(v.mean() - pooled.mean()))
    # bands: t-interval over the 2 per-prompt means (prompt-major rows)
    pm = v.reshape(2, 2).mean(axis=1)
    half = 12.7062047 * pm.std(ddof=1) / np.sqrt(2)          # t_{0.975, 1}
    assert (two["ci_v_low"], two["ci_v_high"]) == pytest.approx((pm.mean() - half, pm.mean() + half))
    assert (out / "figure3.png").stat().st_size > 5_000
    assert f"| formality | 2 | {two['mean_v']:.3f}" in load_experiment("report").folder_markdown(out)
    # prompt level: the seeds pooled per row, minus v, averaged per prompt; v - base per prompt
    pl = two["prompt_level"]
    pooled_rows = np.mean([scores(units, f"formality/a2/v+perp{s}", "formality") for s in range(2)], axis=0)
    assert pl["pooled_v_plus_perp_minus_v"]["mean"] == pytest.approx(np.mean((pooled_rows - v).reshape(2, 2)))
    base = scores(units, "base", "formality")
    assert pl["v_minus_base"]["mean"] == pytest.approx(np.mean(v - base))
    assert zero["prompt_level"] is None and two["second_probe"] is None           # --no-second-probe
    assert result["settings"]["second_probe"] is None and "second_scores" not in units["units"]["base"]
    assert two["fluency"]["v"]["repetition"] is not None


@pytest.mark.slow  # two environments x generation + exact Jacobians + an independent SVD: minutes on 2 cores
def test_environments_cli(serve_smollm2, tmp_path, capsys, smollm2):
    cli = load_experiment("environments")
    out = tmp_path / "env"
    argv = ["--environments", "in_distribution,genre_shift", "--traits", "humor", "--seeds", "1",
            "--geometry-prompts", "2", "--k-smallest", "8", "--vector", "both", "--out", str(out), *TINY]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "Table 2 format" in printed and "principal angles" in printed
    result = json.loads((out / "environments.json").read_text())
    assert [(r["environment"], r["label"]) for r in result["rows"]] == [
        ("in_distribution", "v_e"), ("in_distribution", "v"), ("genre_shift", "v_e"), ("genre_shift", "v")]
    assert result["settings"]["max_new_tokens"] == 4 and result["settings"]["vector"] == "both"
    units = json.loads((out / "environments_units.json").read_text())
    assert {"genre_shift/humor/v_e", "genre_shift/humor/v_e+perp0", "genre_shift/humor/v",
            "genre_shift/humor/v+perp0", "genre_shift/base"} <= set(units["units"])
    # the prompt level of each cell, recomputed from the stored rows (2 prompts x 2 samples)
    row = result["rows"][2]
    v, base = scores(units, "genre_shift/humor/v_e", "humor"), scores(units, "genre_shift/base", "humor")
    assert row["prompt_level"]["v_minus_base"]["mean"] == pytest.approx(np.mean(v - base))
    second = np.array(units["units"]["genre_shift/humor/v_e"]["second_scores"]["model"]["humor"])
    assert row["second_probe"]["v_minus_base"]["mean"] == pytest.approx(
        np.mean(second - np.array(units["units"]["genre_shift/base"]["second_scores"]["model"]["humor"])))
    # in-environment vectors are rescaled to the shipped vector's norm; the raw norms are kept
    from steerjax import behaviour
    shipped = np.linalg.norm(behaviour.trait_vectors(smollm2, ["humor"], 15)["humor"])
    for env in ("in_distribution", "genre_shift"):
        assert result["vector_norms"][env]["humor"] == pytest.approx(shipped, rel=1e-9)
        assert 0 < result["environment_vector_raw_norms"][env]["humor"] < shipped
    g = result["geometry"]
    (pair,) = g["pairs"]
    assert pair["a"] == "in_distribution" and pair["b"] == "genre_shift"
    assert 0 <= pair["bottom_k"]["mean_cos2"] <= 1 and 0 <= pair["bottom_k"]["min_deg"] <= 90
    assert pair["bottom_k"]["random_mean_cos2"] == pytest.approx(8 / 576)
    # independent recomputation: bottom-8 right singular subspaces of the stacked dense factors via one SVD
    envs = sj_data_envs()
    bases = []
    for env in ("in_distribution", "genre_shift"):
        factors = sj.jacobian_operator(smollm2, smollm2.tokenize(envs[env][:2]), 15).factors()
        _, _, vt = np.linalg.svd(np.vstack(list(factors)), full_matrices=True)
        bases.append(vt[-8:].T)
    cos = np.linalg.svd(bases[0].T @ bases[1], compute_uv=False)
    assert pair["bottom_k"]["mean_cos2"] == pytest.approx(np.mean(cos**2), abs=1e-6)
    for env, e in g["environments"].items():
        assert set(e["null_dim_stacked"]) == {"1e-02", "1e-03", "1e-04", "1e-06"}
        # stacking can only shrink the null space
        assert all(e["null_dim_stacked"][k] <= e["null_dim_per_prompt_mean"][k] + 1e-9 for k in e["null_dim_stacked"])
    frac = g["v_perp_null_fraction"]["genre_shift"]["humor"]["1e-02"]
    assert 0 <= frac["stacked"] <= frac["per_prompt_mean"] + 1e-12 <= 1
    for png in ("table2.png", "principal_angles.png"):
        assert (out / png).stat().st_size > 5_000
    md = load_experiment("report").folder_markdown(out)
    assert "| humor |" in md and f"{pair['bottom_k']['mean_cos2']:.3f}" in md


def test_report_cli_rejects_a_folder_without_results(tmp_path, capsys):
    assert load_experiment("report").main([str(tmp_path)]) == 2
    assert "holds none of orthogonal.json" in capsys.readouterr().err


def sj_data_envs():
    from steerjax import data

    return data.environments()


def test_environments_cli_paper_defaults_to_150_tokens():
    cli = load_experiment("environments")
    assert cli.parse_args(["--protocol", "paper"]).max_new_tokens == 150
    assert cli.parse_args([]).max_new_tokens == 40 and cli.parse_args([]).vector == "environment"   # the paper's
    with pytest.raises(SystemExit):
        cli.parse_args(["--environments", "moon"])


def test_shared_number_formatting_and_trait_parsing(capsys):
    from steerjax import cli, data

    assert cli.fmt(None, ".3f") == "-" and cli.fmt(0.12345, "+.2f") == "+0.12"
    assert cli.fmt_pm(0.5, 0.25, ".3f") == "0.500 ± 0.250"                     # Markdown tables (report.py)
    assert cli.fmt_pm(0.5, 0.25, ".1%", sep=" +- ") == "50.0% +- 25.0%"        # terminal tables
    assert cli.fmt_pm(0.5, None, ".2f") == "0.50" and cli.fmt_pm(None, 0.1, ".2f") == "-"
    p = cli.ArgumentParser(prog="study")
    assert cli.parse_traits(p, "all") == list(data.TRAITS)
    assert cli.parse_traits(p, " humor, formality ,") == ["humor", "formality"]
    for bad in ("sarcasm,humor", ",", ""):
        with pytest.raises(SystemExit) as info:
            cli.parse_traits(p, bad)
        assert info.value.code == 2
        assert "unknown trait(s)" in capsys.readouterr().err
