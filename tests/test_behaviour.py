"""steerjax.behaviour (generation plans, paired sampling, comparisons), io.UnitStore / write_csv and the
protocol fields the behavioural studies use. The pure statistics are tested in test_stats.py."""

from __future__ import annotations

import csv
import json

import numpy as np
from scipy import stats as st
import pytest

import steerjax as sj
from steerjax import behaviour, io, sequence, stats, studies

PAPER = studies.StudyProtocol.paper("last+generated")
CORRECTED = studies.StudyProtocol.corrected("last+generated")


def test_protocol_fields():
    assert (PAPER.steer_offset, PAPER.score_prompt, PAPER.paired_sampling) == (1, True, False)
    assert (PAPER.effect_size, PAPER.efficacy) == ("paper_cohens_d", "raw_ratio")
    assert (CORRECTED.steer_offset, CORRECTED.score_prompt, CORRECTED.paired_sampling) == (0, False, True)
    assert (CORRECTED.effect_size, CORRECTED.efficacy) == ("cohens_d", "baseline")
    assert PAPER.positions == CORRECTED.positions == "last+generated"


def test_generation_plan_rows_are_prompt_major():
    plan = behaviour.GenerationPlan(("a", "b", "c"), samples_per_prompt=2)
    assert plan.row_prompts == ["a", "a", "b", "b", "c", "c"] and plan.n_rows == 6


@pytest.mark.parametrize("kw, match", [
    (dict(prompts=()), "prompt"), (dict(prompts=("a", " ")), "prompt"), (dict(samples_per_prompt=0), "samples"),
    (dict(max_new_tokens=0), "tokens"), (dict(temperature=0.0), "temperature"),
    (dict(temperature=np.nan), "temperature"),
])
def test_generation_plan_rejects_bad_settings(kw, match):
    with pytest.raises(sj.InputError, match=match):
        behaviour.GenerationPlan(**{"prompts": ("a",), **kw})


def test_condition_seeds_paired_vs_fresh():
    assert behaviour.condition_seed(CORRECTED, 7, "x/v") == behaviour.condition_seed(CORRECTED, 7, "x/perp0") == 7
    seeds = {behaviour.condition_seed(PAPER, 7, k) for k in ("base", "x/v", "x/perp0", "x/v+perp0")}
    assert len(seeds) == 4                                                  # fresh noise per condition
    assert behaviour.condition_seed(PAPER, 7, "x/v") == behaviour.condition_seed(PAPER, 7, "x/v")  # reproducible
    assert behaviour.condition_seed(PAPER, 8, "x/v") != behaviour.condition_seed(PAPER, 7, "x/v")


def test_framed_pairs():
    pos, neg = behaviour.framed_pairs("humor", ["P1", "P2"])
    assert pos == [behaviour.TRAIT_FRAMINGS["humor"][0] + "\n\nP1", behaviour.TRAIT_FRAMINGS["humor"][0] + "\n\nP2"]
    assert neg[1].endswith("\n\nP2") and neg[1].startswith(behaviour.TRAIT_FRAMINGS["humor"][1])
    with pytest.raises(sj.InputError, match="trait"):
        behaviour.framed_pairs("sarcasm", ["P"])


# ----------------------------------------------------------------------------- io

def test_unit_store_resumes_refuses_other_settings_and_fresh_resets(tmp_path):
    path = tmp_path / "units.json"
    store = io.UnitStore(path, {"a": (1, 2), "x": np.float64(0.5)})
    assert len(store) == 0 and store.resumed == 0
    store.put("u1", {"scores": np.arange(3.0)})
    store.put("u2", {"scores": [4.0]})
    # tuples / numpy in the settings compare equal to their JSON form
    again = io.UnitStore(path, {"a": [1, 2], "x": 0.5})
    assert again.resumed == 2 and "u1" in again and again["u1"]["scores"] == [0.0, 1.0, 2.0]
    with pytest.raises(sj.InputError, match="different settings.*--fresh"):
        io.UnitStore(path, {"a": [1, 3], "x": 0.5})
    assert json.loads(path.read_text())["units"]["u2"] == {"scores": [4.0]}      # the refusal kept the file
    fresh = io.UnitStore(path, {"a": [1, 3]}, fresh=True)
    assert len(fresh) == 0
    fresh.put("v", 1)
    assert set(json.loads(path.read_text())["units"]) == {"v"}


def test_write_csv_round_trip(tmp_path):
    rows = [{"trait": "humor", "d": 0.25, "n": 5}, {"trait": "formality", "d": None, "n": 10}]
    io.write_csv(rows, tmp_path / "sub" / "t.csv")
    with open(tmp_path / "sub" / "t.csv") as f:
        back = list(csv.DictReader(f))
    assert back == [{"trait": "humor", "d": "0.25", "n": "5"}, {"trait": "formality", "d": "", "n": "10"}]
    assert not list((tmp_path / "sub").glob(".*tmp"))


# ----------------------------------------------------------------------------- comparisons

def test_effect_size_and_efficacy_follow_the_protocol():
    rng = np.random.default_rng(0)
    a, b, base = rng.normal(0.6, 0.1, 50), rng.normal(0.5, 0.1, 50), rng.normal(0.4, 0.1, 50)
    assert behaviour.effect_size(CORRECTED, b, a) == pytest.approx(stats.cohens_d(b, a))
    assert behaviour.effect_size(CORRECTED, b, a) < 0
    assert behaviour.effect_size(PAPER, b, a) == pytest.approx(stats.paper_cohens_d(b, a)) and \
        behaviour.effect_size(PAPER, b, a) > 0
    assert behaviour.efficacy(PAPER, b, a, base) == pytest.approx(b.mean() / a.mean())
    expected = (b.mean() - base.mean()) / (a.mean() - base.mean())
    assert behaviour.efficacy(CORRECTED, b, a, base) == pytest.approx(expected)
    const = np.full(10, 0.5)
    assert behaviour.effect_size(CORRECTED, const, const) is None
    assert behaviour.efficacy(CORRECTED, a, const, const) is None          # v has no effect: undefined, not inf


def test_repetition_rate():
    assert behaviour.repetition_rate([1, 2, 3, 4, 5], n=3) == 0.0
    assert behaviour.repetition_rate([7] * 10, n=3) == pytest.approx(1 - 1 / 8)
    assert behaviour.repetition_rate([1, 2, 1, 2, 1, 2], n=2) == pytest.approx(1 - 2 / 5)
    assert behaviour.repetition_rate([1, 2], n=3) is None


def test_study_probes_route_the_second_probe_to_the_steered_trait():
    study = behaviour.StudyProbes({}, {"formality": None, "humor": None}, "model", second_skips=("perp", "2v"))
    assert study.second_traits("base") == ["formality", "humor"]               # no trait named: every trait
    assert study.second_traits("humor/v+perp3") == ["humor"]
    assert study.second_traits("in_distribution/formality/v_e") == ["formality"]
    assert study.second_traits("humor/perp12") == [] and study.second_traits("formality/2v") == []


def test_prompt_level_summaries_against_direct_computation():
    rng = np.random.default_rng(7)
    clusters = np.repeat(np.arange(12), 3)
    base, v = rng.normal(0.4, 0.1, 36), rng.normal(0.5, 0.1, 36)
    perps = rng.normal(0.5, 0.1, (4, 36))
    out = behaviour.perturbation_comparison(base, v, {"v_plus_perp": perps}, clusters, margin_fraction=0.3)
    per_prompt = lambda x: x.reshape(12, 3).mean(axis=1)
    effect = per_prompt(v - base).mean()
    assert out["v_minus_base"]["mean"] == pytest.approx(effect)
    pooled = out["pooled_v_plus_perp_minus_v"]
    diffs = per_prompt(perps.mean(axis=0) - v)
    assert pooled["mean"] == pytest.approx(diffs.mean()) and pooled["margin"] == pytest.approx(0.3 * abs(effect))
    assert pooled["p"] == pytest.approx(st.ttest_1samp(diffs, 0.0).pvalue)
    assert [r["mean"] for r in out["per_seed_v_plus_perp_minus_v"]] == pytest.approx(
        [per_prompt(p - v).mean() for p in perps])
    assert out["heterogeneity_v_plus_perp_minus_v"]["k"] == 4
    # Holm across entries, as clustered.holm; entries without the key are left alone
    entries = [{"p": 0.01}, {"p": 0.04}, {"p": None}, {"p": 0.03}]
    behaviour.holm_entries(entries, "p")
    assert [e.get("p_holm") for e in entries] == pytest.approx([0.03, 0.06, None, 0.06])
    # fluency: mean of per-prompt means, rows without a value left out of their prompt
    unit = {"fluency": {"repetition": [0.0, None, 0.2, 0.4, 0.6, None], "unsteered_loglik": [None] * 6}}
    summary = behaviour.fluency_summary(unit, np.repeat(np.arange(3), 2))
    assert summary["repetition"]["mean"] == pytest.approx(np.mean([0.0, 0.3, 0.6]))
    assert summary["repetition"]["ci_low"] <= summary["repetition"]["mean"] <= summary["repetition"]["ci_high"]
    assert summary["unsteered_loglik"] is None


# ----------------------------------------------------------------------------- generation on SmolLM2

def test_run_conditions_pairs_sampling_and_matches_direct_generation(smollm2, tmp_path):
    lm = smollm2
    plan = behaviour.GenerationPlan(("The weather today is", "My favourite food is"), samples_per_prompt=2,
                                    max_new_tokens=6)
    v = np.random.default_rng(3).normal(size=lm.d) * 3.0
    conditions = {"base": (None, None, 0.0), "base_again": (None, None, 0.0), "v": (15, v, 2.0)}
    probes = behaviour.make_probes("lexical", ["formality", "humor"])
    # a second probe kind (here the lexical probes again under another name: the routing is what is tested)
    study = behaviour.StudyProbes(probes, behaviour.make_probes("lexical", ["formality", "humor"]), "other",
                                  second_skips=("base_again",))
    units = {}
    for protocol in (CORRECTED, PAPER):
        store = io.UnitStore(tmp_path / f"{protocol.name}.json", {"p": protocol.name})
        behaviour.run_conditions(lm, plan, conditions, store, study, protocol, base_seed=11)
        assert "second_scores" not in store["base_again"]                        # skipped condition
        np.testing.assert_array_equal(behaviour.scores_of(store["base"], protocol, "humor", "other"),
                                      probes["humor"].score(store["base"]["texts"]))
        assert behaviour.has_second_scores(store["v"], "other", "formality")
        units[protocol.name] = store
        unit = store["v"]
        assert len(unit["texts"]) == plan.n_rows and set(unit["scores"]) == {"formality", "humor"}
        # scores are the probe's, on generated text or prompt + text
        np.testing.assert_allclose(unit["scores"]["humor"]["generated"], probes["humor"].score(unit["texts"]))
        np.testing.assert_allclose(unit["scores"]["humor"]["with_prompt"],
                                   probes["humor"].score([p + t for p, t in zip(plan.row_prompts, unit["texts"])]))
        np.testing.assert_array_equal(behaviour.scores_of(unit, protocol, "humor"),
                                      unit["scores"]["humor"]["with_prompt" if protocol.score_prompt else "generated"])
        # the stored texts are exactly a direct steered generation with the condition's seed
        out = sj.generate(lm, lm.tokenize(plan.row_prompts), sj.Steer(15, v, 2.0, "last+generated"),
                          max_new_tokens=6, temperature=0.8, seed=unit["seed"])
        assert unit["texts"] == sj.generated_texts(lm, out)
        # fluency: the unsteered model's mean log-likelihood of each stored continuation, and its repetition rate
        logp = sequence.continuation_logprobs(lm, out.tokens, out.attention_mask, out.prompt_len)
        np.testing.assert_allclose(unit["fluency"]["unsteered_loglik"], np.nanmean(logp, axis=1), rtol=1e-6)
        assert all(r is None or 0 <= r < 1 for r in unit["fluency"]["repetition"])
    # paired sampling: identical conditions give identical samples; the paper's fresh noise does not
    assert units["corrected"]["base"]["texts"] == units["corrected"]["base_again"]["texts"]
    assert units["paper"]["base"]["texts"] != units["paper"]["base_again"]["texts"]
