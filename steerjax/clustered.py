"""Statistics for clustered, paired behavioural designs: the prompt (what was sampled independently) is the unit.

A behavioural study draws prompts, then several samples per prompt, and runs every condition on the same rows
with the same sampling keys. So samples of one prompt are correlated (clusters) and conditions are paired by row.
Here: per-prompt paired differences, a cluster bootstrap over prompts, the one-way ICC and design effect, a linear
mixed model `score ~ condition + (1 | prompt)` (statsmodels), TOST on prompt-level paired differences at a margin
tied to the steering effect, its exact power for the design run, between-direction heterogeneity (DerSimonian-Laird
tau^2 with Cochran's Q test) and Holm's step-down correction.

Pure NumPy / SciPy (statsmodels for the mixed model), float64. Bad input raises `steerjax.errors.InputError`.
Shapes: rows (n,) with a cluster label per row (n,); per-cluster arrays (k,) in the order of `np.unique(clusters)`.
"""

from __future__ import annotations

import warnings
from typing import Callable, NamedTuple, Sequence

import numpy as np
import statsmodels.api as sm
from scipy import integrate
from scipy import stats as st

from steerjax.checks import check_fraction, check_int, check_positive_number, finite_array
from steerjax.errors import InputError


def _rows_and_clusters(values, clusters, name: str = "values") -> tuple[np.ndarray, np.ndarray]:
    x = finite_array(values, name, (1,))
    c = np.asarray(clusters)
    if c.shape != x.shape:
        raise InputError(f"{name} {x.shape} and clusters {c.shape} must have one cluster label per row")
    return x, c


def cluster_means(values, clusters) -> np.ndarray:
    """Mean of each cluster's rows (k,), clusters in np.unique order."""
    x, c = _rows_and_clusters(values, clusters)
    labels, inverse = np.unique(c, return_inverse=True)
    return np.bincount(inverse, weights=x) / np.bincount(inverse)


def paired_differences(a, b, clusters) -> np.ndarray:
    """Per-cluster mean of the row-paired differences a - b (k,): rows r of a and b share a prompt and sampling
    key (the studies' paired design), so the unit is the prompt's mean difference."""
    a, c = _rows_and_clusters(a, clusters, "a")
    b, _ = _rows_and_clusters(b, clusters, "b")
    return cluster_means(a - b, c)


class Interval(NamedTuple):
    estimate: float
    low: float
    high: float


def cluster_bootstrap_ci(values, clusters, statistic: Callable[[np.ndarray], float] = np.mean,
                         n_resamples: int = 2000, confidence: float = 0.95, seed: int = 0) -> Interval:
    """Percentile interval of statistic(rows) when whole clusters are resampled with replacement (a prompt's
    samples stay together), for values (n,) with cluster labels (n,)."""
    x, c = _rows_and_clusters(values, clusters)
    check_int(n_resamples, "n_resamples", low=100)
    check_fraction(confidence, "confidence")
    labels, inverse = np.unique(c, return_inverse=True)
    if labels.size < 2:
        raise InputError("a cluster bootstrap needs at least 2 clusters")
    members = [np.flatnonzero(inverse == k) for k in range(labels.size)]
    rng = np.random.default_rng(seed)
    stats = np.empty(n_resamples)
    for i in range(n_resamples):
        pick = rng.integers(0, labels.size, labels.size)
        stats[i] = statistic(x[np.concatenate([members[k] for k in pick])])
    tail = 50 * (1 - confidence)
    return Interval(float(statistic(x)), float(np.percentile(stats, tail)), float(np.percentile(stats, 100 - tail)))


class ICC(NamedTuple):
    """One-way random-effects ICC(1) (may be negative: no clustering beyond chance), the mean cluster size, and the
    design effect 1 + (m - 1) ICC: the factor by which clustering inflates the variance of a mean of rows."""

    icc: float
    mean_cluster_size: float
    design_effect: float


def icc_oneway(values, clusters) -> ICC:
    """ICC(1) from the one-way ANOVA mean squares, (MSB - MSW) / (MSB + (n0 - 1) MSW), with n0 the
    unbalanced-design cluster size (n - sum n_k^2 / n) / (k - 1)."""
    x, c = _rows_and_clusters(values, clusters)
    labels, inverse = np.unique(c, return_inverse=True)
    k, n = labels.size, x.size
    if k < 2 or n <= k:
        raise InputError(f"the ICC needs >= 2 clusters and more rows than clusters, got {k} clusters, {n} rows")
    sizes = np.bincount(inverse)
    means = np.bincount(inverse, weights=x) / sizes
    msb = float(np.sum(sizes * (means - x.mean()) ** 2) / (k - 1))
    msw = float(np.sum((x - means[inverse]) ** 2) / (n - k))
    n0 = (n - np.sum(sizes**2) / n) / (k - 1)
    denom = msb + (n0 - 1) * msw
    icc = 0.0 if denom == 0 else (msb - msw) / denom
    m = n / k
    return ICC(float(icc), float(m), float(1 + (m - 1) * icc))


class MixedEffect(NamedTuple):
    """Fixed effect of condition b over a in score ~ condition + (1 | prompt), with its standard error, Wald
    p-value and 95% interval, and the variance components (prompt intercept, residual)."""

    effect: float
    se: float
    p: float
    low: float
    high: float
    prompt_variance: float
    residual_variance: float


def mixed_model_effect(a, b, clusters_a, clusters_b=None) -> MixedEffect:
    """statsmodels MixedLM (REML) of score ~ condition + (1 | prompt) on the rows of conditions a and b."""
    a, ca = _rows_and_clusters(a, clusters_a, "a")
    b, cb = _rows_and_clusters(b, clusters_a if clusters_b is None else clusters_b, "b")
    y = np.concatenate([a, b])
    exog = sm.add_constant(np.concatenate([np.zeros(a.size), np.ones(b.size)]))
    groups = np.concatenate([ca, cb])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")            # boundary fits (prompt variance 0) warn; the estimate stands
        fit = sm.MixedLM(y, exog, groups=groups).fit(reml=True)
    effect, se = float(fit.fe_params[1]), float(fit.bse_fe[1])
    p = float(2 * st.norm.sf(abs(effect / se))) if se > 0 else float("nan")
    z = st.norm.ppf(0.975)
    return MixedEffect(effect, se, p, effect - z * se, effect + z * se, float(np.asarray(fit.cov_re)[0, 0]),
                       float(fit.scale))


class TOST(NamedTuple):
    """Two one-sided t-tests of |mean difference| < margin on n unit-level differences: p = max of the two
    one-sided p-values; equivalent at level alpha iff p < alpha (iff the 1 - 2 alpha interval lies in the
    margin)."""

    mean: float
    margin: float
    p: float
    p_lower: float
    p_upper: float
    low: float              # the 1 - 2 alpha confidence interval of the mean difference
    high: float
    n: int
    equivalent: bool


def tost_paired(differences, margin: float, alpha: float = 0.05) -> TOST:
    """TOST on unit-level paired differences (n,) (one per prompt) against the margin (-margin, margin)."""
    d = finite_array(differences, "differences", (1,))
    check_positive_number(margin, "margin")
    check_fraction(alpha, "alpha")
    if d.size < 2:
        raise InputError(f"TOST needs at least 2 units, got {d.size}")
    n, mean, se = d.size, float(d.mean()), float(d.std(ddof=1) / np.sqrt(d.size))
    if se == 0:
        inside = abs(mean) < margin
        return TOST(mean, margin, 0.0 if inside else 1.0, 0.0 if inside else 1.0, 0.0 if inside else 1.0,
                    mean, mean, n, inside)
    p_lower = float(st.t.sf((mean + margin) / se, n - 1))       # H0: mean <= -margin
    p_upper = float(st.t.cdf((mean - margin) / se, n - 1))      # H0: mean >= margin
    half = st.t.ppf(1 - alpha, n - 1) * se
    p = max(p_lower, p_upper)
    return TOST(mean, float(margin), p, p_lower, p_upper, mean - half, mean + half, n, p < alpha)


def effect_margin(steering_effect: float, fraction: float = 0.2) -> float:
    """The equivalence margin tied to the effect being compared: fraction x |mean(v) - mean(base)|."""
    check_fraction(fraction, "margin fraction")
    if not np.isfinite(steering_effect) or steering_effect == 0:
        raise InputError(f"the steering effect must be finite and non-zero to set a margin, got {steering_effect}")
    return float(fraction * abs(steering_effect))


def tost_power(n: int, sd: float, margin: float, true_difference: float = 0.0, alpha: float = 0.05) -> float:
    """Exact power of `tost_paired` with n units whose differences are N(true_difference, sd^2): the probability
    that -margin + t s / sqrt(n) < mean < margin - t s / sqrt(n), integrated over the sampling distribution of
    the sample sd s (chi with n - 1 degrees of freedom)."""
    n = check_int(n, "n (units)", low=2)
    check_positive_number(sd, "sd")
    check_positive_number(margin, "margin")
    t = st.t.ppf(1 - alpha, n - 1)
    df = n - 1
    se_true = sd / np.sqrt(n)

    def given_chi2(q):
        half = margin - t * sd * np.sqrt(q / df) / np.sqrt(n)
        if half <= 0:
            return 0.0
        return (st.norm.cdf((half - true_difference) / se_true) - st.norm.cdf((-half - true_difference) / se_true)) \
            * st.chi2.pdf(q, df)

    q_max = df * (margin * np.sqrt(n) / (t * sd)) ** 2           # beyond it the interval cannot fit in the margin
    value, _ = integrate.quad(given_chi2, 0.0, q_max, limit=200)
    return float(min(max(value, 0.0), 1.0))


def margin_for_power(n: int, sd: float, power: float = 0.8, alpha: float = 0.05) -> float:
    """The smallest equivalence margin that `tost_paired` on n units with difference SD `sd` confirms with
    probability `power` when the true difference is 0 (the inverse of `tost_power` in the margin): what a design
    of n units can show equivalence to."""
    n = check_int(n, "n (units)", low=2)
    check_positive_number(sd, "sd")
    check_fraction(power, "power")
    lo, hi = 0.0, (st.t.ppf(1 - alpha, n - 1) + st.norm.ppf((1 + power) / 2)) * sd / np.sqrt(n)
    while tost_power(n, sd, hi, alpha=alpha) < power:
        lo, hi = hi, 2 * hi
    for _ in range(60):                                   # bisection to ~1e-15 of the bracket
        mid = 0.5 * (lo + hi)
        lo, hi = (lo, mid) if tost_power(n, sd, mid, alpha=alpha) >= power else (mid, hi)
    return float(hi)


def units_for_power(sd: float, margin: float, power: float = 0.8, true_difference: float = 0.0,
                    alpha: float = 0.05, max_units: int = 100_000) -> int:
    """The smallest number of units at which `tost_power` reaches `power`."""
    check_fraction(power, "power")
    check_positive_number(sd, "sd")
    check_positive_number(margin, "margin")
    # normal-theory guess (z_{1-alpha} + z_{(1+power)/2})^2 sd^2 / (margin - |delta|)^2, then an exact search
    slack = margin - abs(true_difference)
    if slack <= 0:
        raise InputError(f"a true difference of {true_difference} is not inside the margin {margin}: TOST cannot "
                         "reach any power")
    guess = ((st.norm.ppf(1 - alpha) + st.norm.ppf((1 + power) / 2)) * sd / slack) ** 2
    if guess > max_units:
        raise InputError(f"about {guess:.0f} units would be needed for power {power} (more than {max_units})")
    lo, hi = 2, max(4, int(guess))
    while tost_power(hi, sd, margin, true_difference, alpha) < power:
        lo, hi = hi, hi * 2
        if hi > 2 * max_units:
            raise InputError(f"more than {max_units} units would be needed for power {power}")
    while lo < hi:
        mid = (lo + hi) // 2
        if tost_power(mid, sd, margin, true_difference, alpha) >= power:
            hi = mid
        else:
            lo = mid + 1
    return int(lo)


class Heterogeneity(NamedTuple):
    """DerSimonian-Laird random-effects summary of k effects: tau^2 (between-effect variance), Cochran's Q, its
    chi^2 (k - 1) p-value, I^2, and the random-effects mean with its standard error."""

    tau2: float
    q: float
    p: float
    i2: float
    mean: float
    se: float
    k: int

    def to_dict(self) -> dict:
        return dict(zip(self._fields, self))


def heterogeneity(effects, variances) -> Heterogeneity:
    """Between-direction heterogeneity of effects (k,) with sampling variances (k,) (e.g. one effect per v_perp
    direction, each a prompt-level mean difference with its squared standard error)."""
    y = finite_array(effects, "effects", (1,))
    v = finite_array(variances, "variances", (1,))
    if y.shape != v.shape or y.size < 2:
        raise InputError(f"need >= 2 effects with one variance each, got {y.size} effects and {v.size} variances")
    if np.any(v <= 0):
        raise InputError("every sampling variance must be > 0")
    w = 1.0 / v
    fixed = float(np.sum(w * y) / np.sum(w))
    q = float(np.sum(w * (y - fixed) ** 2))
    k = y.size
    c = float(np.sum(w) - np.sum(w**2) / np.sum(w))
    tau2 = max(0.0, (q - (k - 1)) / c)
    w_re = 1.0 / (v + tau2)
    mean = float(np.sum(w_re * y) / np.sum(w_re))
    i2 = max(0.0, (q - (k - 1)) / q) if q > 0 else 0.0
    return Heterogeneity(float(tau2), q, float(st.chi2.sf(q, k - 1)), float(i2), mean,
                         float(np.sqrt(1.0 / np.sum(w_re))), int(k))


def holm(pvalues: Sequence[float]) -> np.ndarray:
    """Holm's step-down adjusted p-values (m,) for the m tests of one table (family-wise error control)."""
    p = finite_array(pvalues, "pvalues", (1,))
    if np.any((p < 0) | (p > 1)):
        raise InputError("p-values must lie in [0, 1]")
    m = p.size
    order = np.argsort(p)
    adjusted = np.maximum.accumulate((m - np.arange(m)) * p[order])
    out = np.empty(m)
    out[order] = np.minimum(adjusted, 1.0)
    return out
