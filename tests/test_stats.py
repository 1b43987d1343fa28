"""steerjax.stats against independent references (scipy, statsmodels, hand computation). Fast, no models."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import special, stats

from steerjax.errors import InputError
from steerjax import stats as S


def rng(seed=0):
    return np.random.default_rng(seed)


# ----------------------------------------------------------------------------- Cohen's d / Hedges' g

def test_cohens_d_hand_case_and_sign():
    a = [1.0, 2.0, 3.0]             # mean 2, var 1
    b = [4.0, 5.0, 6.0, 7.0, 8.0]   # mean 6, var 2.5
    # pooled var = (2*1 + 4*2.5) / 6 = 2  ->  d = (2 - 6) / sqrt(2)
    assert S.cohens_d(a, b) == pytest.approx(-4 / math.sqrt(2), rel=1e-12)
    assert S.cohens_d(b, a) == pytest.approx(4 / math.sqrt(2), rel=1e-12)
    assert S.pooled_sd(a, b) == pytest.approx(math.sqrt(2), rel=1e-12)


def test_cohens_d_equal_sizes_matches_textbook_formula():
    a, b = rng(1).normal(0.3, 1.0, 40), rng(2).normal(0.0, 2.0, 40)
    # equal n: pooled var = (var_a + var_b) / 2
    ref = (a.mean() - b.mean()) / math.sqrt((a.var(ddof=1) + b.var(ddof=1)) / 2)
    assert S.cohens_d(a, b) == pytest.approx(ref, rel=1e-12)


def test_paper_cohens_d_hand_case_and_relation_to_pooled():
    a = [1.0, 2.0, 3.0]             # mean 2, population var 2/3
    b = [4.0, 5.0, 6.0, 7.0, 8.0]   # mean 6, population var 2
    assert S.paper_cohens_d(a, b) == pytest.approx(4 / math.sqrt((2 / 3 + 2) / 2), rel=1e-12)
    assert S.paper_cohens_d(b, a) == S.paper_cohens_d(a, b)        # unsigned
    # equal n: population variances are (n-1)/n of the sample ones, so d_paper = |d| sqrt(n / (n-1))
    x, y = rng(5).normal(0.2, 1.0, 30), rng(6).normal(0.0, 1.5, 30)
    assert S.paper_cohens_d(x, y) == pytest.approx(abs(S.cohens_d(x, y)) * math.sqrt(30 / 29), rel=1e-12)
    with pytest.raises(InputError, match="constant"):
        S.paper_cohens_d([1.0, 1.0], [1.0, 1.0])


def test_cohens_d_shift_and_scale_invariant():
    a, b = rng(3).normal(size=25), rng(4).normal(size=31)
    d = S.cohens_d(a, b)
    assert S.cohens_d(3 * a + 7, 3 * b + 7) == pytest.approx(d, rel=1e-12)
    assert S.cohens_d(-a, -b) == pytest.approx(-d, rel=1e-12)


@pytest.mark.parametrize("df, exact", [
    (2, 1 / math.sqrt(math.pi)),                              # Gamma(1) / (1 * Gamma(1/2))
    (3, (math.sqrt(math.pi) / 2) / math.sqrt(1.5)),          # Gamma(3/2) / (sqrt(3/2) Gamma(1))
    (4, 1 / (math.sqrt(2) * math.sqrt(math.pi) / 2)),        # Gamma(2) / (sqrt(2) Gamma(3/2))
])
def test_hedges_correction_exact_small_df(df, exact):
    assert S.hedges_correction(df) == pytest.approx(exact, rel=1e-12)


def test_hedges_g_exact_small_case():
    a, b = [1.0, 2.0, 3.0], [2.0, 3.0, 4.0]   # d = -1, df = 4, J = 2 / sqrt(2 pi)
    assert S.cohens_d(a, b) == pytest.approx(-1.0, rel=1e-12)
    assert S.hedges_g(a, b) == pytest.approx(-2 / math.sqrt(2 * math.pi), rel=1e-12)


@pytest.mark.parametrize("df", [10, 30, 100, 1000])
def test_hedges_correction_close_to_common_approximation(df):
    approx = 1 - 3 / (4 * df - 1)
    # The approximation error is O(df^-2) (about 0.032 / df^2): tolerance 0.05 / df^2.
    assert S.hedges_correction(df) == pytest.approx(approx, abs=0.05 / df ** 2)
    assert S.hedges_correction(df) < approx  # the approximation slightly overestimates J
    # and the direct gamma-function formula (no log space) agrees where it does not overflow
    if df < 300:
        direct = special.gamma(df / 2) / (math.sqrt(df / 2) * special.gamma((df - 1) / 2))
        assert S.hedges_correction(df) == pytest.approx(direct, rel=1e-12)


def test_hedges_g_shrinks_toward_zero():
    a, b = rng(5).normal(1, 1, 6), rng(6).normal(0, 1, 7)
    d, g = S.cohens_d(a, b), S.hedges_g(a, b)
    assert abs(g) < abs(d) and np.sign(g) == np.sign(d)
    assert g == pytest.approx(d * S.hedges_correction(11), rel=1e-12)


def test_hedges_correction_huge_df_is_finite():
    assert S.hedges_correction(1e8) == pytest.approx(1.0, abs=1e-7)


# ----------------------------------------------------------------------------- bootstrap

def test_bootstrap_ci_contains_true_d_and_is_reproducible():
    true_d = 0.5
    a, b = rng(7).normal(true_d, 1.0, 200), rng(8).normal(0.0, 1.0, 200)
    lo, hi = S.cohens_d_ci(a, b, n_resamples=2000, seed=123)
    assert lo < true_d < hi
    assert lo < S.cohens_d(a, b) < hi
    assert hi - lo < 0.6  # SE of d at n=200/group is ~0.1, 95% width ~0.4
    assert S.cohens_d_ci(a, b, n_resamples=2000, seed=123) == (lo, hi)
    assert S.bootstrap_ci(S.cohens_d, a, b, n_resamples=2000, seed=123) == (lo, hi)
    assert S.cohens_d_ci(a, b, n_resamples=2000, seed=124) != (lo, hi)


def test_bootstrap_ci_matches_manual_percentile_bootstrap():
    a, b = rng(9).normal(size=15), rng(10).normal(size=12)

    def diff(x, y):
        return x.mean() - y.mean()

    g = np.random.default_rng(42)
    ia = g.integers(0, a.size, size=(500, a.size))
    ib = g.integers(0, b.size, size=(500, b.size))
    vals = a[ia].mean(axis=1) - b[ib].mean(axis=1)
    ref = np.quantile(vals, [0.05, 0.95])
    lo, hi = S.bootstrap_ci(diff, a, b, n_resamples=500, confidence=0.90, seed=42)
    np.testing.assert_allclose([lo, hi], ref, rtol=1e-12)


def test_bootstrap_ci_wider_at_higher_confidence():
    a, b = rng(11).normal(size=30), rng(12).normal(size=30)
    lo90, hi90 = S.cohens_d_ci(a, b, n_resamples=1000, confidence=0.90)
    lo99, hi99 = S.cohens_d_ci(a, b, n_resamples=1000, confidence=0.99)
    assert lo99 <= lo90 < hi90 <= hi99


def test_bootstrap_ci_undefined_resamples_raise():
    # n=2 groups with distinct values: some resamples are constant in both groups -> d undefined
    with pytest.raises(InputError, match="bootstrap resamples"):
        S.cohens_d_ci([0.0, 1.0], [0.0, 1.0], n_resamples=200)


@pytest.mark.parametrize("kwargs, msg", [
    (dict(n_resamples=0), "n_resamples"),
    (dict(n_resamples=2.5), "n_resamples"),
    (dict(confidence=1.0), "confidence"),
    (dict(confidence=0.0), "confidence"),
])
def test_bootstrap_ci_bad_arguments(kwargs, msg):
    a, b = rng(13).normal(size=10), rng(14).normal(size=10)
    with pytest.raises(InputError, match=msg):
        S.cohens_d_ci(a, b, **kwargs)


# ----------------------------------------------------------------------------- Pearson r

@pytest.mark.parametrize("seed, n, rho", [(0, 10, 0.0), (1, 50, 0.5), (2, 200, -0.3), (3, 5, 0.9)])
def test_pearson_r_matches_scipy(seed, n, rho):
    g = rng(seed)
    x = g.normal(size=n)
    y = rho * x + math.sqrt(1 - rho ** 2) * g.normal(size=n)
    r, p = S.pearson_r(x, y)
    ref = stats.pearsonr(x, y)
    assert r == pytest.approx(ref.statistic, rel=1e-10, abs=1e-12)
    assert p == pytest.approx(ref.pvalue, rel=1e-8, abs=1e-14)


def test_pearson_r_perfect_correlation():
    x = np.arange(6.0)
    assert S.pearson_r(x, 2 * x + 1) == (pytest.approx(1.0), 0.0)
    r, p = S.pearson_r(x, -x)
    assert r == pytest.approx(-1.0) and p == 0.0


# ----------------------------------------------------------------------------- TOST

def _tost_reference(a, b, margin):
    """Direct scipy.stats.t computation of pooled TOST."""
    na, nb = len(a), len(b)
    df = na + nb - 2
    sp2 = ((na - 1) * np.var(a, ddof=1) + (nb - 1) * np.var(b, ddof=1)) / df
    se = math.sqrt(sp2 * (1 / na + 1 / nb))
    diff = np.mean(a) - np.mean(b)
    p1 = stats.t.sf((diff + margin) / se, df)
    p2 = stats.t.cdf((diff - margin) / se, df)
    return max(p1, p2), p1, p2


@pytest.mark.parametrize("seed, shift, margin, na, nb", [
    (0, 0.0, 0.5, 40, 40), (1, 0.2, 0.3, 25, 35), (2, -0.4, 0.5, 60, 20), (3, 1.0, 0.2, 10, 12),
])
def test_tost_matches_statsmodels_and_scipy(seed, shift, margin, na, nb):
    smw = pytest.importorskip("statsmodels.stats.weightstats")
    g = rng(seed)
    a, b = g.normal(shift, 1.0, na), g.normal(0.0, 1.3, nb)
    res = S.tost_ind(a, b, margin)
    p_sm, (t1, p1, df1), (t2, p2, df2) = smw.ttost_ind(a, b, -margin, margin, usevar="pooled")
    assert res.p_value == pytest.approx(p_sm, rel=1e-9, abs=1e-15)
    assert res.t_lower == pytest.approx(t1, rel=1e-10)
    assert res.t_upper == pytest.approx(t2, rel=1e-10)
    assert res.p_lower == pytest.approx(p1, rel=1e-9, abs=1e-15)
    assert res.p_upper == pytest.approx(p2, rel=1e-9, abs=1e-15)
    assert res.df == pytest.approx(df1) and res.df == na + nb - 2
    assert res.diff == pytest.approx(a.mean() - b.mean(), rel=1e-12)
    p_ref, p1_ref, p2_ref = _tost_reference(a, b, margin)
    assert res.p_value == pytest.approx(p_ref, rel=1e-9, abs=1e-15)
    assert res.equivalent == (p_ref < 0.05)


def test_tost_welch_matches_statsmodels_unequal():
    smw = pytest.importorskip("statsmodels.stats.weightstats")
    g = rng(21)
    a, b = g.normal(0.1, 1.0, 30), g.normal(0.0, 3.0, 15)
    res = S.tost_ind(a, b, 1.0, pooled=False)
    p_sm, (t1, _, df1), (t2, _, _) = smw.ttost_ind(a, b, -1.0, 1.0, usevar="unequal")
    assert res.p_value == pytest.approx(p_sm, rel=1e-9)
    assert res.t_lower == pytest.approx(t1, rel=1e-10)
    assert res.t_upper == pytest.approx(t2, rel=1e-10)
    assert res.df == pytest.approx(df1, rel=1e-10)


def test_tost_equivalent_for_identical_distributions_not_for_shifted():
    g = rng(30)
    a, b = g.normal(0, 1, 2000), g.normal(0, 1, 2000)
    res = S.tost_ind(a, b, margin=0.2)
    assert res.equivalent and res.p_value < 1e-6
    shifted = S.tost_ind(a + 0.5, b, margin=0.2)
    assert not shifted.equivalent and shifted.p_value > 0.5
    # margin in d units: sd ~ 1, so d_margin 0.2 behaves like raw margin 0.2
    assert S.tost_ind_d(a, b, 0.2).equivalent
    assert not S.tost_ind_d(a + 0.5, b, 0.2).equivalent


def test_tost_small_samples_not_equivalent_despite_small_d():
    # The paper's defect: a small observed d at small n is not evidence of equivalence.
    g = rng(31)
    a, b = g.normal(0, 1, 10), g.normal(0, 1, 10)
    assert abs(S.cohens_d(a, b)) < 0.5
    assert not S.tost_ind_d(a, b, 0.2).equivalent


def test_tost_ind_d_uses_pooled_sd_margin():
    g = rng(32)
    a, b = g.normal(0, 2, 50), g.normal(0.1, 2, 60)
    res = S.tost_ind_d(a, b, 0.3)
    assert res.margin == pytest.approx(0.3 * S.pooled_sd(a, b), rel=1e-12)
    raw = S.tost_ind(a, b, res.margin)
    assert res.p_value == pytest.approx(raw.p_value, rel=1e-12)


def test_tost_alpha():
    g = rng(33)
    a, b = g.normal(0, 1, 100), g.normal(0, 1, 100)
    res = S.tost_ind(a, b, 0.3)
    assert S.tost_ind(a, b, 0.3, alpha=min(0.999, res.p_value * 1.01)).equivalent
    assert not S.tost_ind(a, b, 0.3, alpha=res.p_value * 0.99).equivalent


# ----------------------------------------------------------------------------- efficacy

def test_perp_only_efficacy_and_paper_ratio():
    base = [1.0, 1.0, 1.0]        # mean 1
    v = [3.0, 3.0, 3.0]           # mean 3
    perp = [1.5, 1.5]             # mean 1.5
    assert S.perp_only_efficacy(perp, v, base) == pytest.approx(0.25)
    # The paper's ratio ignores the baseline: 1.5 / 3 = 0.5
    assert S.paper_raw_ratio(perp, v) == pytest.approx(0.5)
    # No perp effect at all (perp == base) still gives a nonzero paper ratio
    assert S.perp_only_efficacy(base, v, base) == pytest.approx(0.0)
    assert S.paper_raw_ratio(base, v) == pytest.approx(1 / 3)
    assert S.paper_raw_ratio([-2.0], [4.0]) == pytest.approx(0.5)
    assert S.perp_only_efficacy([0.0], [-1.0], [1.0]) == pytest.approx(0.5)


def test_efficacy_zero_denominators_raise():
    with pytest.raises(InputError, match="mean\\(score_v\\) == mean\\(score_base\\)"):
        S.perp_only_efficacy([1.0], [2.0, 0.0], [1.0])
    with pytest.raises(InputError, match="mean\\(score_v\\) == 0"):
        S.paper_raw_ratio([1.0], [1.0, -1.0])


# ----------------------------------------------------------------------------- study summaries

def test_or_none_turns_undefined_statistics_into_none():
    const = np.full(10, 0.5)
    assert S.or_none(S.cohens_d, const, const) is None
    a, b = rng(60).normal(size=20), rng(61).normal(size=20)
    assert S.or_none(S.cohens_d, a, b) == S.cohens_d(a, b)
    with pytest.raises(TypeError):                       # only InputError means "undefined"
        S.or_none(S.cohens_d, a)


def test_correlation_none_for_constant_scores():
    a = rng(0).normal(0.6, 0.1, 50)
    assert S.correlation(np.full(10, 0.5), a[:10]) is None
    assert S.correlation(a, 2 * a + 1) == pytest.approx(1.0)
    assert S.correlation(a, -a) == pytest.approx(-1.0)


@pytest.mark.parametrize("n_a, n_b", [(100, 100), (100, 1000), (30, 60)])
def test_minimum_detectable_d_matches_statsmodels_power(n_a, n_b):
    power = pytest.importorskip("statsmodels.stats.power")
    ref = power.TTestIndPower().solve_power(nobs1=n_a, ratio=n_b / n_a, alpha=0.05, power=0.8)
    # normal approximation vs the noncentral t: within 2% at these sizes (df >= 88)
    assert S.minimum_detectable_d(n_a, n_b) == pytest.approx(ref, rel=0.02)


def test_equivalence_detects_equal_and_shifted_samples():
    r = np.random.default_rng(1)
    x, y = r.normal(0, 1, 4000), r.normal(0, 1, 4000)
    eq = S.equivalence(x, y)
    assert eq["equivalent"] and eq["tost_p"] < 0.05 and eq["d_ci95"][0] < eq["d"] < eq["d_ci95"][1]
    shifted = S.equivalence(x, y + 1.0)
    assert not shifted["equivalent"] and shifted["d"] == pytest.approx(-1.0, abs=0.1)
    small = S.equivalence(x[:20], y[:20])      # n = 20: too small to show |d| < 0.2
    assert not small["equivalent"] and small["minimum_detectable_d"] > 0.8
    assert S.equivalence(np.ones(5), np.ones(5))["d"] is None


def test_mean_ci_and_mean_sd_match_scipy():
    x = np.random.default_rng(2).normal(3, 2, 25)
    m, lo, hi = S.mean_ci(x)
    ref = stats.t.interval(0.95, 24, loc=x.mean(), scale=stats.sem(x))
    assert m == pytest.approx(x.mean()) and (lo, hi) == pytest.approx(ref)
    assert S.mean_sd([1.0, None, 3.0]) == {"mean": 2.0, "sd": pytest.approx(np.sqrt(2)), "n": 2}
    assert S.mean_sd([None]) == {"mean": None, "sd": None, "n": 0}


# ----------------------------------------------------------------------------- logit divergences

def softmax(x):
    return special.softmax(np.asarray(x, dtype=np.float64), axis=-1)


def test_kl_matches_rel_entr():
    g = rng(40)
    lp, lq = g.normal(size=(3, 4, 50)) * 3, g.normal(size=(3, 4, 50)) * 3
    kl = S.kl_divergence(lp, lq)
    assert kl.shape == (3, 4)
    ref = special.rel_entr(softmax(lp), softmax(lq)).sum(axis=-1)
    np.testing.assert_allclose(kl, ref, rtol=1e-10, atol=1e-13)
    assert (kl > 0).all()


def test_kl_single_row_and_self():
    g = rng(41)
    lp = g.normal(size=32)
    assert S.kl_divergence(lp, lp).shape == ()
    assert S.kl_divergence(lp, lp) == 0.0
    assert S.kl_divergence(lp, lp + 5.0) == pytest.approx(0.0, abs=1e-14)  # shift invariance
    assert S.js_divergence(lp, lp) == pytest.approx(0.0, abs=1e-15)


def test_js_symmetric_bounded_and_matches_reference():
    g = rng(42)
    lp, lq = g.normal(size=(5, 30)) * 4, g.normal(size=(5, 30)) * 4
    js = S.js_divergence(lp, lq)
    np.testing.assert_allclose(js, S.js_divergence(lq, lp), rtol=1e-12, atol=1e-15)
    p, q = softmax(lp), softmax(lq)
    m = (p + q) / 2
    ref = 0.5 * special.rel_entr(p, m).sum(-1) + 0.5 * special.rel_entr(q, m).sum(-1)
    np.testing.assert_allclose(js, ref, rtol=1e-10, atol=1e-13)
    # also scipy's jensenshannon distance (sqrt of the divergence), natural log
    from scipy.spatial.distance import jensenshannon
    np.testing.assert_allclose(np.sqrt(js), jensenshannon(p, q, axis=-1), rtol=1e-7)
    assert (js >= 0).all() and (js <= math.log(2) + 1e-15).all()


def test_extreme_logits_stay_finite():
    # nearly one-hot distributions on disjoint tokens: KL huge but finite, JS -> ln 2
    lp = np.array([[1e4, 0.0, -1e4, 0.0], [0.0, 1e4, 0.0, 0.0]])
    lq = np.array([[-1e4, 1e4, 0.0, 0.0], [0.0, 1e4, 0.0, -1e4]])
    kl = S.kl_divergence(lp, lq)
    js = S.js_divergence(lp, lq)
    assert np.isfinite(kl).all() and np.isfinite(js).all()
    assert kl[0] == pytest.approx(2e4, rel=1e-6)   # log p_0 - log q_0 = 0 - (-2e4)
    assert kl[1] == pytest.approx(0.0, abs=1e-12)
    assert js[0] == pytest.approx(math.log(2), rel=1e-9)
    assert js[1] == pytest.approx(0.0, abs=1e-12)
    big = rng(43).normal(size=(4, 20)) * 1e4
    assert np.isfinite(S.kl_divergence(big, big[::-1])).all()
    assert (S.js_divergence(big, big[::-1]) <= math.log(2)).all()


def test_masked_logits():
    lp = np.array([0.0, 0.0, -np.inf])
    lq = np.array([0.0, -np.inf, 0.0])
    assert S.kl_divergence(lp, np.zeros(3)) == pytest.approx(math.log(3) - math.log(2))
    assert S.kl_divergence(lp, lq) == np.inf
    assert S.js_divergence(lp, lq) == pytest.approx(0.5 * math.log(2))


def test_top1_agreement_hand_case():
    lp = np.array([[3.0, 1.0, 0.0], [0.0, 2.0, 1.0], [1.0, 0.0, 5.0], [0.0, 0.0, 1.0]])
    lq = np.array([[9.0, 1.0, 0.0], [0.0, 1.0, 2.0], [0.0, 0.0, 1.0], [4.0, 0.0, 1.0]])
    assert S.top1_agreement(lp, lq) == pytest.approx(0.5)
    assert S.top1_agreement(lp, lp) == 1.0
    assert S.top1_agreement(lp[0], lq[0]) == 1.0


def test_topk_overlap_hand_case():
    lp = np.array([[5.0, 4.0, 3.0, 2.0, 1.0], [5.0, 4.0, 3.0, 2.0, 1.0]])
    lq = np.array([[1.0, 2.0, 3.0, 4.0, 5.0], [5.0, 3.0, 4.0, 1.0, 2.0]])
    # k=2: row0 {0,1} vs {4,3} -> 0; row1 {0,1} vs {0,2} -> 1/2  => mean 0.25
    assert S.topk_overlap(lp, lq, k=2) == pytest.approx(0.25)
    # k=3: row0 {0,1,2} vs {4,3,2} -> 1/3; row1 {0,1,2} vs {0,2,1} -> 1  => mean 2/3
    assert S.topk_overlap(lp, lq, k=3) == pytest.approx(2 / 3)
    assert S.topk_overlap(lp, lq, k=5) == 1.0
    assert S.topk_overlap(lp, lp, k=1) == 1.0


def test_topk_overlap_random_matches_set_reference():
    g = rng(44)
    lp, lq = g.normal(size=(6, 100)), g.normal(size=(6, 100))
    lq[:3] = lp[:3] + 0.1 * g.normal(size=(3, 100))
    ref = np.mean([len(set(np.argsort(-a)[:10]) & set(np.argsort(-b)[:10])) / 10 for a, b in zip(lp, lq)])
    assert S.topk_overlap(lp, lq) == pytest.approx(ref)


def test_l2_distance():
    lp = np.array([[0.0, 3.0], [1.0, 1.0]])
    lq = np.array([[4.0, 0.0], [1.0, 1.0]])
    np.testing.assert_allclose(S.l2_distance(lp, lq), [5.0, 0.0])
    assert S.l2_distance(lp[0], lq[0]) == pytest.approx(5.0)


def test_log_softmax_matches_scipy():
    x = rng(45).normal(size=(3, 7)) * 100
    np.testing.assert_allclose(S.log_softmax(x), special.log_softmax(x, axis=-1), rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------- error cases

@pytest.mark.parametrize("fn", [S.cohens_d, S.hedges_g, S.pooled_sd,
                                lambda a, b: S.tost_ind(a, b, 0.1), lambda a, b: S.tost_ind_d(a, b, 0.1)])
@pytest.mark.parametrize("a, b, msg", [
    ([], [1.0, 2.0], "a is empty"),
    ([1.0, 2.0], [], "b is empty"),
    ([1.0], [1.0, 2.0], "at least 2"),
    ([1.0, 2.0], [3.0], "at least 2"),
    ([1.0, np.nan], [1.0, 2.0], "NaN"),
    ([1.0, 2.0], [np.inf, 2.0], "infinite"),
    ([[1.0, 2.0]], [1.0, 2.0], "1-D"),
    (["x", "y"], [1.0, 2.0], "array of numbers"),
])
def test_two_sample_input_errors(fn, a, b, msg):
    with pytest.raises(InputError, match=msg):
        fn(a, b)


def test_zero_variance_errors():
    with pytest.raises(InputError, match="pooled SD = 0"):
        S.cohens_d([1.0, 1.0], [2.0, 2.0])
    with pytest.raises(InputError, match="standard error = 0"):
        S.tost_ind([1.0, 1.0], [2.0, 2.0], 0.5)
    with pytest.raises(InputError, match="pooled SD = 0"):
        S.tost_ind_d([1.0, 1.0], [2.0, 2.0], 0.5)


@pytest.mark.parametrize("margin", [0.0, -0.1, np.nan, np.inf, "a"])
def test_tost_bad_margin(margin):
    a, b = rng(50).normal(size=10), rng(51).normal(size=10)
    with pytest.raises(InputError, match="margin"):
        S.tost_ind(a, b, margin)
    with pytest.raises(InputError, match="d_margin"):
        S.tost_ind_d(a, b, margin)


@pytest.mark.parametrize("alpha", [0.0, 1.0, -0.5])
def test_tost_bad_alpha(alpha):
    with pytest.raises(InputError, match="alpha"):
        S.tost_ind([1.0, 2.0, 3.0], [1.0, 2.5], 0.5, alpha=alpha)


def test_hedges_correction_bad_df():
    for df in (1, 0.5, -3, np.nan):
        with pytest.raises(InputError, match="df > 1"):
            S.hedges_correction(df)


def test_pearson_errors():
    with pytest.raises(InputError, match="same length"):
        S.pearson_r([1.0, 2.0, 3.0], [1.0, 2.0, 3.0, 4.0])
    with pytest.raises(InputError, match="at least 3"):
        S.pearson_r([1.0, 2.0], [2.0, 1.0])
    with pytest.raises(InputError, match="x is constant"):
        S.pearson_r([1.0, 1.0, 1.0], [1.0, 2.0, 3.0])
    with pytest.raises(InputError, match="y is constant"):
        S.pearson_r([1.0, 2.0, 3.0], [0.0, 0.0, 0.0])
    with pytest.raises(InputError, match="NaN"):
        S.pearson_r([1.0, np.nan, 3.0], [1.0, 2.0, 3.0])
    with pytest.raises(InputError, match="empty"):
        S.pearson_r([], [])


def test_efficacy_input_errors():
    with pytest.raises(InputError, match="score_perp is empty"):
        S.perp_only_efficacy([], [1.0], [0.0])
    with pytest.raises(InputError, match="score_base contains 1 NaN"):
        S.perp_only_efficacy([1.0], [2.0], [np.nan])
    with pytest.raises(InputError, match="score_v is empty"):
        S.paper_raw_ratio([1.0], [])


def test_bootstrap_input_errors():
    with pytest.raises(InputError, match="empty"):
        S.cohens_d_ci([], [1.0, 2.0])
    with pytest.raises(InputError, match="NaN"):
        S.cohens_d_ci([1.0, np.nan, 2.0], [1.0, 2.0])
    with pytest.raises(InputError, match="at least 2"):
        S.cohens_d_ci([1.0], [1.0, 2.0, 3.0])


@pytest.mark.parametrize("fn", [S.kl_divergence, S.js_divergence, S.top1_agreement, S.topk_overlap,
                                S.l2_distance])
def test_logit_input_errors(fn):
    with pytest.raises(InputError, match="same shape"):
        fn(np.zeros((2, 10)), np.zeros((3, 10)))
    with pytest.raises(InputError, match="NaN"):
        fn(np.array([[0.0] * 9 + [np.nan]]), np.zeros((1, 10)))
    with pytest.raises(InputError, match=r"\+inf"):
        fn(np.zeros((1, 10)), np.array([[0.0] * 9 + [np.inf]]))
    with pytest.raises(InputError, match="empty"):
        fn(np.zeros((0, 10)), np.zeros((0, 10)))
    with pytest.raises(InputError, match="scalar"):
        fn(1.0, 1.0)
    with pytest.raises(InputError, match="all -inf"):
        fn(np.full((1, 10), -np.inf), np.zeros((1, 10)))


def test_topk_bad_k_and_l2_masked():
    lp = np.zeros((2, 5))
    for k in (0, 6, 2.0, True):
        with pytest.raises(InputError, match="k must be"):
            S.topk_overlap(lp, lp, k=k)
    with pytest.raises(InputError, match="finite"):
        S.l2_distance(np.array([0.0, -np.inf]), np.zeros(2))
