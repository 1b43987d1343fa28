"""steerjax.clustered against statsmodels / SciPy and against simulations with known answers, including a clustered
design where the row-level test is anti-conservative and the prompt-level one holds its 5% level."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats as st

import steerjax as sj
from steerjax import clustered


def clustered_rows(rng, prompts: int, samples: int, prompt_sd: float, noise_sd: float, reps: int = 1):
    """Scores (reps, prompts * samples) with a random prompt intercept, and the cluster labels (prompt-major)."""
    intercept = rng.normal(0, prompt_sd, size=(reps, prompts, 1))
    rows = (intercept + rng.normal(0, noise_sd, size=(reps, prompts, samples))).reshape(reps, -1)
    return rows, np.repeat(np.arange(prompts), samples)


def test_cluster_means_and_paired_differences():
    clusters = np.array([2, 2, 0, 0, 0, 1])
    a = np.array([1.0, 3.0, 0.0, 3.0, 6.0, 5.0])
    np.testing.assert_allclose(clustered.cluster_means(a, clusters), [3.0, 5.0, 2.0])
    np.testing.assert_allclose(clustered.paired_differences(a, a - 1.0, clusters), [1.0, 1.0, 1.0])
    with pytest.raises(sj.InputError, match="one cluster label per row"):
        clustered.cluster_means(a, clusters[:3])


def test_icc_matches_the_simulated_value_and_the_anova_formula():
    rng = np.random.default_rng(0)
    rows, clusters = clustered_rows(rng, 400, 5, prompt_sd=1.0, noise_sd=1.0)
    icc = clustered.icc_oneway(rows[0], clusters)
    assert icc.icc == pytest.approx(0.5, abs=0.05)               # sigma_b^2 / (sigma_b^2 + sigma_w^2)
    assert icc.design_effect == pytest.approx(1 + 4 * icc.icc)
    # balanced design: the ANOVA estimator from scipy's one-way F statistic, ICC = (F - 1) / (F + m - 1)
    f = st.f_oneway(*rows[0].reshape(400, 5)).statistic
    assert icc.icc == pytest.approx((f - 1) / (f + 4), rel=1e-10)
    with pytest.raises(sj.InputError, match="2 clusters"):
        clustered.icc_oneway([1.0, 2.0], [0, 0])


def test_mixed_model_matches_statsmodels_formula_api():
    import pandas as pd
    import statsmodels.formula.api as smf

    rng = np.random.default_rng(1)
    prompts, samples = 30, 4
    intercept = np.repeat(rng.normal(0, 0.8, prompts), samples)
    clusters = np.repeat(np.arange(prompts), samples)
    a = intercept + rng.normal(0, 1, prompts * samples)
    b = intercept + 0.5 + rng.normal(0, 1, prompts * samples)
    ours = clustered.mixed_model_effect(a, b, clusters)
    frame = pd.DataFrame({"score": np.concatenate([a, b]), "condition": [0] * a.size + [1] * b.size,
                          "prompt": np.concatenate([clusters, clusters])})
    ref = smf.mixedlm("score ~ condition", frame, groups=frame["prompt"]).fit(reml=True)
    assert ours.effect == pytest.approx(ref.fe_params["condition"], rel=1e-8)
    assert ours.se == pytest.approx(ref.bse_fe["condition"], rel=1e-6)
    assert ours.p == pytest.approx(ref.pvalues["condition"], rel=1e-5)
    assert ours.prompt_variance == pytest.approx(0.64, rel=0.5) and ours.low < 0.5 < ours.high


def test_tost_paired_matches_statsmodels_ttost():
    from statsmodels.stats.weightstats import ttost_paired

    rng = np.random.default_rng(2)
    a, b = rng.normal(0, 1, 40), rng.normal(0.05, 1, 40)
    ours = clustered.tost_paired(a - b, margin=0.4)
    p_ref, lower, upper = ttost_paired(a, b, -0.4, 0.4)
    assert ours.p == pytest.approx(p_ref, rel=1e-10)
    assert ours.p_lower == pytest.approx(lower[1], rel=1e-10) and ours.p_upper == pytest.approx(upper[1], rel=1e-10)
    # the p < alpha decision equals the 90% interval lying inside the margin
    assert ours.equivalent == (-0.4 < ours.low and ours.high < 0.4)
    with pytest.raises(sj.InputError, match="margin"):
        clustered.tost_paired(a - b, margin=0.0)


def test_tost_power_against_simulation():
    rng = np.random.default_rng(3)
    for n, sd, margin, delta in ((20, 1.0, 0.6, 0.0), (30, 0.5, 0.2, 0.05), (12, 1.0, 1.0, 0.3)):
        exact = clustered.tost_power(n, sd, margin, delta)
        d = rng.normal(delta, sd, size=(20000, n))
        mean, se = d.mean(axis=1), d.std(axis=1, ddof=1) / np.sqrt(n)
        t = st.t.ppf(0.95, n - 1)
        simulated = np.mean((mean - t * se > -margin) & (mean + t * se < margin))
        assert exact == pytest.approx(simulated, abs=4 * np.sqrt(simulated * (1 - simulated) / 20000) + 1e-3)
    n80 = clustered.units_for_power(1.0, 0.3)
    assert clustered.tost_power(n80, 1.0, 0.3) >= 0.8 > clustered.tost_power(n80 - 1, 1.0, 0.3)
    assert clustered.effect_margin(-0.5) == pytest.approx(0.1)
    # the inverse in the margin: a simulated TOST at the returned margin holds 80% power at a true difference of 0
    margin = clustered.margin_for_power(40, 0.7)
    assert clustered.tost_power(40, 0.7, margin) == pytest.approx(0.8, abs=1e-6)
    d = rng.normal(0.0, 0.7, size=(20000, 40))
    half = st.t.ppf(0.95, 39) * d.std(axis=1, ddof=1) / np.sqrt(40)
    assert np.mean(np.abs(d.mean(axis=1)) + half < margin) == pytest.approx(0.8, abs=0.012)


def test_heterogeneity_matches_statsmodels_dl():
    from statsmodels.stats.meta_analysis import combine_effects

    rng = np.random.default_rng(4)
    variances = rng.uniform(0.01, 0.05, 10)
    effects = rng.normal(0.2, 0.3, 10) + rng.normal(0, np.sqrt(variances))
    ours = clustered.heterogeneity(effects, variances)
    ref = combine_effects(effects, variances, method_re="dl")
    assert ours.tau2 == pytest.approx(ref.tau2, rel=1e-10)
    assert ours.q == pytest.approx(ref.q, rel=1e-10)
    assert ours.mean == pytest.approx(ref.mean_effect_re, rel=1e-10)
    assert ours.se == pytest.approx(ref.sd_eff_w_re, rel=1e-10)
    assert ours.p < 0.05 and ours.tau2 > 0                             # tau = 0.3 is far above the sampling noise
    same = clustered.heterogeneity(np.full(10, 0.2), variances)
    assert same.tau2 == 0.0 and same.p == pytest.approx(1.0)


def test_holm_matches_statsmodels():
    from statsmodels.stats.multitest import multipletests

    p = np.array([0.01, 0.04, 0.03, 0.2, 0.001, 0.5])
    np.testing.assert_allclose(clustered.holm(p), multipletests(p, method="holm")[1], rtol=1e-12)
    with pytest.raises(sj.InputError, match=r"\[0, 1\]"):
        clustered.holm([0.5, 1.5])


def test_row_level_test_is_anti_conservative_and_the_prompt_level_one_is_not():
    """20 prompts x 5 samples, two conditions on the same prompts with a prompt-specific condition effect
    (sd 0.5) and no mean effect: a paired t-test on the 100 row differences (rows taken as independent pairs)
    rejects far more often than 5%; the paired t-test on the 20 prompt-level differences holds 5% (within Monte
    Carlo error), and the cluster bootstrap interval of the paired differences keeps close to its coverage."""
    rng = np.random.default_rng(5)
    reps, prompts, samples = 2000, 20, 5
    base, clusters = clustered_rows(rng, prompts, samples, prompt_sd=1.0, noise_sd=1.0, reps=reps)
    slope = np.repeat(rng.normal(0, 0.5, size=(reps, prompts)), samples, axis=1)
    steered = base + slope + rng.normal(0, 0.3, size=base.shape)
    row_p = st.ttest_1samp(steered - base, 0.0, axis=1).pvalue
    diffs = (steered - base).reshape(reps, prompts, samples).mean(axis=2)
    prompt_p = st.ttest_1samp(diffs, 0.0, axis=1).pvalue
    mc = 3 * np.sqrt(0.05 * 0.95 / reps)
    assert np.mean(row_p < 0.05) > 0.05 + 3 * mc
    assert abs(np.mean(prompt_p < 0.05) - 0.05) < mc
    covered = []
    for r in range(200):
        ci = clustered.cluster_bootstrap_ci((steered - base)[r], clusters, n_resamples=400, seed=r)
        covered.append(ci.low < 0 < ci.high)
    assert np.mean(covered) > 0.88                  # nominal 95%; percentile intervals with 20 clusters run a bit low
