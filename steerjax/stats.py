"""Statistics for steering experiments: effect sizes, bootstrap CIs, correlation, equivalence tests
(TOST), perp-only efficacy, summaries of repeated measurements, and divergences between next-token
distributions.

Pure NumPy/SciPy, float64 throughout. One definition per quantity (the seed paper mixes three Cohen's
d definitions; here there is exactly one, `cohens_d`). Bad input raises `steerjax.errors.InputError`.

Shapes: sample functions take 1-D arrays of scores, shape (n,). Logit functions take arrays of shape
(..., V) (V = vocabulary size) whose leading axes index rows (prompts, positions, ...).
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Sequence

import numpy as np
from scipy import special
from scipy import stats as _st

from .checks import check_fraction, check_int, check_positive_int, check_positive_number
from .errors import InputError

__all__ = [
    "cohens_d",
    "hedges_g",
    "hedges_correction",
    "pooled_sd",
    "bootstrap_ci",
    "cohens_d_ci",
    "pearson_r",
    "TOSTResult",
    "tost_ind",
    "tost_ind_d",
    "perp_only_efficacy",
    "paper_raw_ratio",
    "or_none",
    "correlation",
    "minimum_detectable_d",
    "equivalence",
    "mean_sd",
    "mean_ci",
    "paired_t_p",
    "log_softmax",
    "kl_divergence",
    "js_divergence",
    "top1_agreement",
    "topk_overlap",
    "l2_distance",
]


# ----------------------------------------------------------------------------- input checks

def _sample(x, name: str, min_n: int = 1) -> np.ndarray:
    """`x` as a finite 1-D float64 array with at least `min_n` entries, else InputError."""
    try:
        arr = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise InputError(f"{name} must be a 1-D array of numbers ({exc})") from None
    if arr.ndim != 1:
        raise InputError(f"{name} must be 1-D (shape (n,)), got shape {arr.shape}; flatten it explicitly "
                         "if pooling all entries is intended")
    if arr.size == 0:
        raise InputError(f"{name} is empty")
    if np.isnan(arr).any():
        raise InputError(f"{name} contains {int(np.isnan(arr).sum())} NaN value(s)")
    if not np.isfinite(arr).all():
        raise InputError(f"{name} contains infinite value(s)")
    if arr.size < min_n:
        raise InputError(f"{name} needs at least {min_n} values (a sample variance needs n >= 2), "
                         f"got n={arr.size}")
    return arr


def _logits(x, name: str) -> np.ndarray:
    """`x` as a float64 array of shape (..., V), V >= 1, with no NaN or +inf (-inf allowed: masked)."""
    try:
        arr = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise InputError(f"{name} must be an array of logits ({exc})") from None
    if arr.ndim == 0:
        raise InputError(f"{name} must have shape (..., V), got a scalar")
    if arr.size == 0:
        raise InputError(f"{name} is empty (shape {arr.shape})")
    if np.isnan(arr).any():
        raise InputError(f"{name} contains {int(np.isnan(arr).sum())} NaN value(s)")
    if np.isposinf(arr).any():
        raise InputError(f"{name} contains +inf")
    if np.isneginf(arr).all(axis=-1).any():
        raise InputError(f"{name} has a row whose logits are all -inf (no distribution)")
    return arr


def _logit_pair(p, q) -> tuple[np.ndarray, np.ndarray]:
    lp, lq = _logits(p, "logits_p"), _logits(q, "logits_q")
    if lp.shape != lq.shape:
        raise InputError(f"logits_p and logits_q must have the same shape, got {lp.shape} and {lq.shape}")
    return lp, lq


# ----------------------------------------------------------------------------- effect sizes

def pooled_sd(a, b) -> float:
    """Pooled standard deviation sqrt(((na-1) var_a + (nb-1) var_b) / (na + nb - 2)), var with ddof=1.

    a: (na,), b: (nb,), each n >= 2."""
    a, b = _sample(a, "a", 2), _sample(b, "b", 2)
    return _pooled_sd(a, b)


def _pooled_sd(a: np.ndarray, b: np.ndarray) -> float:
    na, nb = a.size, b.size
    return float(np.sqrt(((na - 1) * a.var(ddof=1) + (nb - 1) * b.var(ddof=1)) / (na + nb - 2)))


def cohens_d(a, b) -> float:
    """Signed Cohen's d = (mean(a) - mean(b)) / s_p with the pooled SD
    s_p = sqrt(((na-1) var_a + (nb-1) var_b) / (na + nb - 2)) (sample variances, ddof=1).

    a: (na,), b: (nb,), each n >= 2. Positive when a's mean is larger. Raises if s_p == 0."""
    a, b = _sample(a, "a", 2), _sample(b, "b", 2)
    sp = _pooled_sd(a, b)
    if sp == 0.0:
        raise InputError("Cohen's d is undefined: both samples are constant (pooled SD = 0)")
    return float((a.mean() - b.mean()) / sp)


def paper_cohens_d(a, b) -> float:
    """The seed paper's released-code Cohen's d: |mean(a) - mean(b)| / sqrt((var_a + var_b) / 2) with
    population variances (ddof=0), unsigned. Kept for `--protocol paper` only; prefer `cohens_d`.

    a: (na,), b: (nb,), each n >= 2. Raises if both samples are constant."""
    a, b = _sample(a, "a", 2), _sample(b, "b", 2)
    s = float(np.sqrt((a.var() + b.var()) / 2.0))
    if s == 0.0:
        raise InputError("Cohen's d is undefined: both samples are constant (SD = 0)")
    return float(abs(a.mean() - b.mean()) / s)


def hedges_correction(df: float) -> float:
    """Exact small-sample bias correction J(df) = Gamma(df/2) / (sqrt(df/2) Gamma((df-1)/2)), df > 1.

    Computed in log space with scipy.special.gammaln; J -> 1 as df -> inf, and J ~ 1 - 3/(4 df - 1)."""
    df = float(df)
    if not np.isfinite(df) or df <= 1:
        raise InputError(f"Hedges' correction needs df > 1, got df={df}")
    return float(np.exp(special.gammaln(df / 2) - 0.5 * np.log(df / 2) - special.gammaln((df - 1) / 2)))


def hedges_g(a, b) -> float:
    """Hedges' g = J(df) * cohens_d(a, b), df = na + nb - 2, with the exact correction
    J(df) = Gamma(df/2) / (sqrt(df/2) Gamma((df-1)/2)) (see `hedges_correction`).

    a: (na,), b: (nb,), each n >= 2 (so df >= 2)."""
    d = cohens_d(a, b)
    return d * hedges_correction(np.size(a) + np.size(b) - 2)


# ----------------------------------------------------------------------------- bootstrap

def bootstrap_ci(stat_fn: Callable[[np.ndarray, np.ndarray], float], a, b, n_resamples: int = 2000,
                 confidence: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap CI (low, high) of stat_fn(a, b).

    Each group is resampled independently with replacement (sizes na, nb) n_resamples times using
    numpy.random.default_rng(seed); the bounds are the (1-confidence)/2 and (1+confidence)/2 quantiles
    of the resampled statistics. Deterministic for a fixed seed. a: (na,), b: (nb,).
    Raises InputError if stat_fn is undefined on the data or on any resample (e.g. a constant
    resample of a tiny or heavily tied sample) rather than silently dropping resamples."""
    a, b = _sample(a, "a"), _sample(b, "b")
    n_resamples = check_positive_int(n_resamples, "n_resamples")
    confidence = check_fraction(confidence, "confidence")
    stat_fn(a, b)  # surfaces input errors (n too small, zero variance) on the original data
    rng = np.random.default_rng(seed)
    ia = rng.integers(0, a.size, size=(n_resamples, a.size))
    ib = rng.integers(0, b.size, size=(n_resamples, b.size))
    values = np.empty(n_resamples)
    failed = 0
    for i in range(n_resamples):
        try:
            values[i] = stat_fn(a[ia[i]], b[ib[i]])
        except InputError:
            values[i] = np.nan
        if not np.isfinite(values[i]):
            failed += 1
    if failed:
        raise InputError(f"the statistic is undefined on {failed} of {n_resamples} bootstrap resamples "
                         "(e.g. zero variance); the samples are too small or too tied for a bootstrap CI")
    alpha = 1.0 - confidence
    low, high = np.quantile(values, [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)


def cohens_d_ci(a, b, n_resamples: int = 2000, confidence: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap CI of `cohens_d(a, b)`; see `bootstrap_ci`."""
    return bootstrap_ci(cohens_d, a, b, n_resamples=n_resamples, confidence=confidence, seed=seed)


# ----------------------------------------------------------------------------- correlation

def pearson_r(x, y) -> tuple[float, float]:
    """Pearson correlation r = sum(xc yc) / sqrt(sum(xc^2) sum(yc^2)) (xc = x - mean x) and its
    two-sided p-value from t = r sqrt((n-2) / (1-r^2)) ~ t(n-2) under H0: rho = 0.

    x, y: paired, shape (n,), n >= 3, neither constant. Returns (r, p_value)."""
    x, y = _sample(x, "x", 3), _sample(y, "y", 3)
    if x.size != y.size:
        raise InputError(f"x and y must be paired (same length), got {x.size} and {y.size}")
    xc, yc = x - x.mean(), y - y.mean()
    sxx, syy = float(xc @ xc), float(yc @ yc)
    if sxx == 0.0 or syy == 0.0:
        raise InputError("Pearson r is undefined: " + ("x" if sxx == 0.0 else "y") + " is constant")
    r = float(np.clip((xc @ yc) / np.sqrt(sxx * syy), -1.0, 1.0))
    df = x.size - 2
    if abs(r) == 1.0:
        return r, 0.0
    t = r * np.sqrt(df / (1.0 - r * r))
    return r, float(2.0 * _st.t.sf(abs(t), df))


# ----------------------------------------------------------------------------- equivalence (TOST)

class TOSTResult(NamedTuple):
    """Two one-sided tests of H0: |mu_a - mu_b| >= margin against H1: |mu_a - mu_b| < margin."""
    p_value: float      # max(p_lower, p_upper)
    t_lower: float      # (diff + margin) / se, tests H0: diff <= -margin (upper tail)
    t_upper: float      # (diff - margin) / se, tests H0: diff >= +margin (lower tail)
    p_lower: float
    p_upper: float
    df: float
    diff: float         # mean(a) - mean(b)
    se: float           # standard error of diff
    margin: float       # in raw units
    alpha: float
    equivalent: bool    # p_value < alpha


def _tost(a: np.ndarray, b: np.ndarray, margin: float, pooled: bool, alpha: float) -> TOSTResult:
    na, nb = a.size, b.size
    va, vb = a.var(ddof=1), b.var(ddof=1)
    if pooled:
        df = float(na + nb - 2)
        se = float(np.sqrt(((na - 1) * va + (nb - 1) * vb) / df * (1.0 / na + 1.0 / nb)))
    else:
        ga, gb = va / na, vb / nb
        se = float(np.sqrt(ga + gb))
        df = float((ga + gb) ** 2 / (ga ** 2 / (na - 1) + gb ** 2 / (nb - 1))) if se > 0 else np.nan
    if se == 0.0:
        raise InputError("TOST is undefined: both samples are constant (standard error = 0)")
    diff = float(a.mean() - b.mean())
    t_lower = (diff + margin) / se
    t_upper = (diff - margin) / se
    p_lower = float(_st.t.sf(t_lower, df))
    p_upper = float(_st.t.cdf(t_upper, df))
    p = max(p_lower, p_upper)
    return TOSTResult(p_value=p, t_lower=float(t_lower), t_upper=float(t_upper), p_lower=p_lower,
                      p_upper=p_upper, df=df, diff=diff, se=se, margin=margin, alpha=alpha,
                      equivalent=bool(p < alpha))


def tost_ind(a, b, margin: float, pooled: bool = True, alpha: float = 0.05) -> TOSTResult:
    """TOST equivalence test of two independent means with a symmetric margin in raw units.

    H0: |mu_a - mu_b| >= margin. diff = mean(a) - mean(b);
    pooled=True: se = s_p sqrt(1/na + 1/nb), df = na + nb - 2 (Student);
    pooled=False: se = sqrt(va/na + vb/nb), Welch-Satterthwaite df.
    t_lower = (diff + margin)/se, p_lower = P(T >= t_lower); t_upper = (diff - margin)/se,
    p_upper = P(T <= t_upper); p_value = max(p_lower, p_upper); equivalent = p_value < alpha.
    a: (na,), b: (nb,), each n >= 2. Matches statsmodels ttost_ind(a, b, -margin, margin)."""
    a, b = _sample(a, "a", 2), _sample(b, "b", 2)
    return _tost(a, b, check_positive_number(margin, "margin"), bool(pooled), check_fraction(alpha, "alpha"))


def tost_ind_d(a, b, d_margin: float, pooled: bool = True, alpha: float = 0.05) -> TOSTResult:
    """`tost_ind` with the margin given in Cohen's d units: margin = d_margin * pooled_sd(a, b).

    The raw margin is estimated from the same data, so the test is approximate (the usual practice);
    the raw margin used is reported in the result's `margin` field."""
    a, b = _sample(a, "a", 2), _sample(b, "b", 2)
    d_margin = check_positive_number(d_margin, "d_margin")
    sp = _pooled_sd(a, b)
    if sp == 0.0:
        raise InputError("TOST in d units is undefined: both samples are constant (pooled SD = 0)")
    return _tost(a, b, d_margin * sp, bool(pooled), check_fraction(alpha, "alpha"))


# ----------------------------------------------------------------------------- steering efficacy

def perp_only_efficacy(score_perp, score_v, score_base) -> float:
    """Baseline-subtracted perp-only efficacy (mean(perp) - mean(base)) / (mean(v) - mean(base)).

    1 means steering with v_perp alone moves the score as much as v does, 0 means no more than the
    unsteered baseline. Inputs are 1-D score arrays (lengths may differ). Raises if
    mean(v) == mean(base) (v has no effect to compare against)."""
    perp = _sample(score_perp, "score_perp")
    v = _sample(score_v, "score_v")
    base = _sample(score_base, "score_base")
    denom = v.mean() - base.mean()
    if denom == 0.0:
        raise InputError("perp-only efficacy is undefined: mean(score_v) == mean(score_base), "
                         "so steering with v has no effect to normalise by")
    return float((perp.mean() - base.mean()) / denom)


def paper_raw_ratio(score_perp, score_v) -> float:
    """The seed paper's "Perp-Only Effect": |mean(perp)| / |mean(v)|, with NO unsteered baseline.

    Kept for reproduction only: without subtracting the baseline, any score the unsteered model already
    gets counts as "efficacy" (a ratio near 1 is expected when steering does little). Prefer
    `perp_only_efficacy`."""
    perp = _sample(score_perp, "score_perp")
    v = _sample(score_v, "score_v")
    if v.mean() == 0.0:
        raise InputError("paper_raw_ratio is undefined: mean(score_v) == 0")
    return float(abs(perp.mean()) / abs(v.mean()))


# ----------------------------------------------------------------------------- study summaries

def or_none(fn: Callable, *args):
    """fn(*args), or None where the statistic is undefined on the data (fn raised InputError: a constant
    sample, too few values, ...). For study tables, where an undefined cell is shown as "-"."""
    try:
        return fn(*args)
    except InputError:
        return None


def correlation(a, b) -> float | None:
    """Pearson r of row-aligned scores a, b (n,) (None if either is constant)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.std() == 0 or b.std() == 0:
        return None
    return float(pearson_r(a, b)[0])


def minimum_detectable_d(n_a: int, n_b: int, alpha: float = 0.05, power: float = 0.8) -> float:
    """Smallest |d| a two-sided two-sample test detects with the given power (normal approximation):
    (z_{1-alpha/2} + z_power) sqrt(1/n_a + 1/n_b)."""
    z = _st.norm.ppf(1 - alpha / 2) + _st.norm.ppf(power)
    return float(z * np.sqrt(1.0 / n_a + 1.0 / n_b))


def equivalence(a, b, d_margin: float = 0.2) -> dict:
    """TOST of a (na,) vs b (nb,) with equivalence bounds +-d_margin pooled SDs, the pooled d with its
    bootstrap 95% CI, and the minimum detectable |d| (80% power). Keys: d_margin, n_a, n_b,
    minimum_detectable_d, d, d_ci95, tost_p, equivalent (the last four None when d is undefined)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    out = {"d_margin": d_margin, "n_a": a.size, "n_b": b.size,
           "minimum_detectable_d": minimum_detectable_d(a.size, b.size)}
    d = or_none(cohens_d, a, b)
    if d is None:
        return {**out, "d": None, "d_ci95": None, "tost_p": None, "equivalent": None}
    t = tost_ind_d(a, b, d_margin)
    ci = or_none(cohens_d_ci, a, b, 1000)   # None when too many resamples are constant (tiny samples)
    return {**out, "d": d, "d_ci95": None if ci is None else list(ci), "tost_p": t.p_value,
            "equivalent": bool(t.equivalent)}


def mean_sd(values: Sequence[float | None]) -> dict:
    """mean, sd (ddof 1) and n over the non-None values (mean None when there are none, sd None below 2)."""
    x = np.array([v for v in values if v is not None], np.float64)
    return {"mean": float(x.mean()) if x.size else None, "sd": float(x.std(ddof=1)) if x.size > 1 else None,
            "n": int(x.size)}


def paired_t_p(differences) -> float:
    """Two-sided one-sample t-test p-value of mean(differences) = 0 (n >= 2 unit-level differences)."""
    d = _sample(differences, "differences", 2)
    return float(_st.ttest_1samp(d, 0.0).pvalue)


def mean_ci(x, confidence: float = 0.95) -> tuple[float, float, float]:
    """(mean, lower, upper) t-interval of the mean of x (n,), n >= 2."""
    x = np.asarray(x, np.float64)
    half = _st.t.ppf(0.5 + confidence / 2, x.size - 1) * x.std(ddof=1) / np.sqrt(x.size)
    return float(x.mean()), float(x.mean() - half), float(x.mean() + half)


# ----------------------------------------------------------------------------- logit divergences

def log_softmax(logits) -> np.ndarray:
    """Stable log-softmax over the last axis: x - max(x) - log(sum(exp(x - max(x)))). (..., V) -> (..., V)."""
    x = _logits(logits, "logits")
    return _log_softmax(x)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    m = x.max(axis=-1, keepdims=True)
    z = x - m
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def _kl_from_log(lp: np.ndarray, lq: np.ndarray) -> np.ndarray:
    p = np.exp(lp)
    with np.errstate(invalid="ignore"):
        terms = np.where(p > 0, p * (lp - lq), 0.0)
    return np.maximum(terms.sum(axis=-1), 0.0)


def kl_divergence(logits_p, logits_q) -> np.ndarray:
    """KL(P || Q) = sum_i p_i (log p_i - log q_i) in nats, P = softmax(logits_p), Q = softmax(logits_q).

    Computed from log_softmax (stable for logits of any finite scale); terms with p_i = 0 are 0; +inf
    where Q puts zero mass (a -inf logit) on a token P does not. (..., V), (..., V) -> (...,)."""
    lp, lq = _logit_pair(logits_p, logits_q)
    return _kl_from_log(_log_softmax(lp), _log_softmax(lq))


def js_divergence(logits_p, logits_q) -> np.ndarray:
    """Jensen-Shannon divergence 0.5 KL(P||M) + 0.5 KL(Q||M), M = (P+Q)/2, natural log, in [0, ln 2].

    log M = logaddexp(log P, log Q) - ln 2 keeps it stable. (..., V), (..., V) -> (...,)."""
    lp, lq = _logit_pair(logits_p, logits_q)
    lp, lq = _log_softmax(lp), _log_softmax(lq)
    lm = np.logaddexp(lp, lq) - np.log(2.0)
    js = 0.5 * _kl_from_log(lp, lm) + 0.5 * _kl_from_log(lq, lm)
    return np.clip(js, 0.0, np.log(2.0))


def top1_agreement(logits_p, logits_q) -> float:
    """Fraction of rows whose argmax token agrees (ties go to the lowest index). (..., V) x2 -> scalar."""
    lp, lq = _logit_pair(logits_p, logits_q)
    return float(np.mean(lp.argmax(axis=-1) == lq.argmax(axis=-1)))


def topk_overlap(logits_p, logits_q, k: int = 10) -> float:
    """Mean over rows of |topk(p) ∩ topk(q)| / k, 1 <= k <= V (ties broken by lowest index).
    (..., V) x2 -> scalar."""
    lp, lq = _logit_pair(logits_p, logits_q)
    V = lp.shape[-1]
    k = check_int(k, "k", low=1, high=V)  # top-k of V logits
    tp = np.argsort(-lp, axis=-1, kind="stable")[..., :k]
    tq = np.argsort(-lq, axis=-1, kind="stable")[..., :k]
    in_p = np.zeros(lp.shape, dtype=bool)
    np.put_along_axis(in_p, tp, True, axis=-1)
    shared = np.take_along_axis(in_p, tq, axis=-1).sum(axis=-1)
    return float(np.mean(shared / k))


def l2_distance(logits_p, logits_q) -> np.ndarray:
    """Euclidean distance ||logits_p - logits_q||_2 over the last axis (raw logits, as in the paper's
    logit test; note logits are shift-invariant, so prefer KL/JS). Finite logits only.
    (..., V), (..., V) -> (...,)."""
    lp, lq = _logit_pair(logits_p, logits_q)
    if not (np.isfinite(lp).all() and np.isfinite(lq).all()):
        raise InputError("l2_distance needs finite logits (got -inf)")
    return np.linalg.norm(lp - lq, axis=-1)
