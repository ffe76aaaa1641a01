"""Fixed-horizon statistics for comparing a treatment variant against the control.

Pure functions over sufficient statistics (counts, means, variances): no I/O. The tests
themselves come from scipy and statsmodels; only the delta-method relative-lift interval
and the Holm step-down (see `holm_adjust`) are written here. Sequential (peeking-safe) inference lives in `stats_sequential`, the
Bayesian summaries in `stats_bayes`, latency comparisons in `stats_latency`.

    >>> result = compare_binary(60, 1000, 50, 1000, alpha=0.05)
    >>> round(result.difference, 3), round(result.lift, 2)
    (0.01, 0.2)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy import stats as scipy_stats
from statsmodels.stats.power import NormalIndPower
from statsmodels.stats.proportion import (
    confint_proportions_2indep,
    proportion_confint,
    proportion_effectsize,
    proportions_ztest,
    test_proportions_2indep,
)

Interval = tuple[float, float]
GuardrailStatus = Literal["pass", "fail", "inconclusive"]


@dataclass(frozen=True, slots=True)
class OutcomeSummary:
    """Sufficient statistics of one variant's outcome: count, mean and per-observation variance."""

    n: int
    mean: float
    variance: float

    @classmethod
    def binary(cls, successes: int, n: int) -> OutcomeSummary:
        """A 0/1 outcome; the variance is p(1 - p), as in the z-test and the delta method."""
        p = successes / n if n else math.nan
        return cls(n=n, mean=p, variance=p * (1 - p))

    @classmethod
    def from_sums(cls, n: int, total: float, total_squares: float, *, shift: float = 0.0) -> OutcomeSummary:
        """From n, sum(x - shift) and sum((x - shift)^2); shifting avoids cancellation in the variance."""
        if n == 0:
            return cls(n=0, mean=math.nan, variance=math.nan)
        centred_mean = total / n
        variance = max(total_squares - n * centred_mean**2, 0.0) / (n - 1) if n > 1 else math.nan
        return cls(n=n, mean=centred_mean + shift, variance=variance)

    @classmethod
    def from_values(cls, values: Sequence[float] | np.ndarray) -> OutcomeSummary:
        """From raw values (sample variance with ddof=1)."""
        array = np.asarray(values, dtype=float)
        variance = float(array.var(ddof=1)) if array.size > 1 else math.nan
        return cls(n=int(array.size), mean=float(array.mean()) if array.size else math.nan, variance=variance)

    @property
    def standard_error(self) -> float:
        """Standard error of the mean."""
        return math.sqrt(self.variance / self.n) if self.n else math.nan


@dataclass(frozen=True, slots=True)
class Comparison:
    """Treatment minus control: absolute difference, relative lift, their intervals and a p-value."""

    difference: float
    difference_ci: Interval
    lift: float | None
    lift_ci: Interval | None
    p_value: float
    method: str


def wilson_interval(successes: int, n: int, *, alpha: float) -> Interval:
    """Wilson score interval for a proportion (statsmodels)."""
    if n == 0:
        return (math.nan, math.nan)
    low, high = proportion_confint(successes, n, alpha=alpha, method="wilson")
    return (float(low), float(high))


def mean_interval(summary: OutcomeSummary, *, alpha: float) -> Interval:
    """Student-t interval for a mean."""
    if summary.n < 2 or not summary.variance > 0:
        return (summary.mean, summary.mean) if summary.n >= 2 else (math.nan, math.nan)
    low, high = scipy_stats.t.interval(1 - alpha, df=summary.n - 1, loc=summary.mean, scale=summary.standard_error)
    return (float(low), float(high))


def relative_lift_interval(treatment: OutcomeSummary, control: OutcomeSummary, *, alpha: float) -> Interval | None:
    """Delta-method interval for treatment.mean / control.mean - 1 (log scale when both means are positive)."""
    if not (treatment.n and control.n) or control.mean == 0 or math.isnan(control.mean):
        return None
    z = scipy_stats.norm.ppf(1 - alpha / 2)
    ratio = treatment.mean / control.mean
    if treatment.mean > 0 and control.mean > 0:
        # Var(log(t/c)) ~ cv_t^2 / n_t + cv_c^2 / n_c; exponentiating keeps the interval positive.
        log_se = math.sqrt(
            treatment.variance / (treatment.n * treatment.mean**2) + control.variance / (control.n * control.mean**2)
        )
        return (math.exp(math.log(ratio) - z * log_se) - 1, math.exp(math.log(ratio) + z * log_se) - 1)
    # Var(t / c) ~ Var(t) / c^2 + t^2 Var(c) / c^4 (independent arms).
    se = math.sqrt(
        treatment.variance / treatment.n / control.mean**2
        + treatment.mean**2 * control.variance / control.n / control.mean**4
    )
    return (ratio - 1 - z * se, ratio - 1 + z * se)


def _lift(treatment: OutcomeSummary, control: OutcomeSummary) -> float | None:
    if control.mean == 0 or math.isnan(control.mean):
        return None
    return treatment.mean / control.mean - 1


def compare_binary(
    treatment_successes: int, treatment_n: int, control_successes: int, control_n: int, *, alpha: float
) -> Comparison:
    """Two-proportion z-test (pooled), Newcomb interval for the difference, delta-method lift interval."""
    treatment = OutcomeSummary.binary(treatment_successes, treatment_n)
    control = OutcomeSummary.binary(control_successes, control_n)
    pooled = (treatment_successes + control_successes) / (treatment_n + control_n)
    if pooled in (0.0, 1.0):
        p_value = 1.0  # both arms all-0 or all-1: no evidence of a difference
    else:
        _, p_value = proportions_ztest([treatment_successes, control_successes], [treatment_n, control_n])
    with np.errstate(divide="ignore", invalid="ignore"):  # statsmodels also computes ratios, 0/0 included
        low, high = confint_proportions_2indep(
            treatment_successes, treatment_n, control_successes, control_n, method="newcomb", compare="diff",
            alpha=alpha,
        )
    return Comparison(
        difference=treatment.mean - control.mean,
        difference_ci=(float(low), float(high)),
        lift=_lift(treatment, control),
        lift_ci=relative_lift_interval(treatment, control, alpha=alpha),
        p_value=float(p_value),
        method="two-proportion z-test; Newcomb interval; delta-method lift",
    )


def welch_interval(treatment: OutcomeSummary, control: OutcomeSummary, *, alpha: float) -> Interval:
    """Welch-Satterthwaite t interval for the difference of two means."""
    var_t, var_c = treatment.variance / treatment.n, control.variance / control.n
    se = math.sqrt(var_t + var_c)
    difference = treatment.mean - control.mean
    if se == 0:
        return (difference, difference)
    df = (var_t + var_c) ** 2 / (var_t**2 / (treatment.n - 1) + var_c**2 / (control.n - 1))
    half = scipy_stats.t.ppf(1 - alpha / 2, df) * se
    return (float(difference - half), float(difference + half))


def compare_numeric(treatment: OutcomeSummary, control: OutcomeSummary, *, alpha: float) -> Comparison:
    """Welch's t-test, Welch interval for the difference, delta-method lift interval."""
    difference = treatment.mean - control.mean
    if treatment.variance + control.variance == 0:
        p_value = 1.0 if difference == 0 else 0.0
    else:
        _, p_value = scipy_stats.ttest_ind_from_stats(
            treatment.mean,
            math.sqrt(treatment.variance),
            treatment.n,
            control.mean,
            math.sqrt(control.variance),
            control.n,
            equal_var=False,
        )
    return Comparison(
        difference=difference,
        difference_ci=welch_interval(treatment, control, alpha=alpha),
        lift=_lift(treatment, control),
        lift_ci=relative_lift_interval(treatment, control, alpha=alpha),
        p_value=float(p_value),
        method="Welch's t-test; Welch interval; delta-method lift",
    )


def holm_adjust(p_values: Sequence[float]) -> list[float]:
    """Holm step-down adjusted p-values; strong family-wise error control.

    Equal to statsmodels' multipletests(method="holm") (tests check this), written out because
    that function runs a full gc.collect() on every call, which costs 0.1 s or more per report.
    """
    p = np.asarray(p_values, dtype=float)
    order = np.argsort(p)
    stepped = np.maximum.accumulate(p[order] * np.arange(p.size, 0, -1))
    adjusted = np.empty_like(p)
    adjusted[order] = np.minimum(stepped, 1.0)
    return adjusted.tolist()


def srm_test(observed: Sequence[float], expected: Sequence[float]) -> tuple[float, float]:
    """Chi-square goodness of fit of observed counts to expected counts (rescaled to the same total)."""
    observed_array = np.asarray(observed, dtype=float)
    expected_array = np.asarray(expected, dtype=float)
    if observed_array.size < 2 or observed_array.sum() == 0 or expected_array.sum() <= 0:
        return (0.0, 1.0)
    expected_array = expected_array * observed_array.sum() / expected_array.sum()
    statistic, p_value = scipy_stats.chisquare(observed_array, expected_array)
    return (float(statistic), float(p_value))


def coverage_difference_p_value(feedback_counts: Sequence[int], request_counts: Sequence[int]) -> float:
    """Chi-square test that every variant has the same feedback coverage (differential missingness)."""
    with_feedback = np.asarray(feedback_counts, dtype=float)
    without = np.asarray(request_counts, dtype=float) - with_feedback
    table = np.vstack([with_feedback, without])
    if table.shape[1] < 2 or (table.sum(axis=1) == 0).any() or (table.sum(axis=0) == 0).any():
        return 1.0
    return float(scipy_stats.chi2_contingency(table, correction=False).pvalue)


def required_sample_size(
    control: OutcomeSummary, *, binary: bool, mde: float, alpha: float, power: float
) -> int | None:
    """Requests per variant a fixed-horizon test needs to detect a relative lift of `mde` (statsmodels)."""
    if not control.n or math.isnan(control.mean) or control.mean == 0:
        return None
    if binary:
        target = min(max(control.mean * (1 + mde), 1e-9), 1 - 1e-9)
        effect_size = abs(proportion_effectsize(target, control.mean))
    else:
        if not control.variance > 0:
            return None
        effect_size = abs(control.mean * mde) / math.sqrt(control.variance)
    if effect_size == 0:
        return None
    n = NormalIndPower().solve_power(effect_size=effect_size, alpha=alpha, power=power, ratio=1.0)
    return int(math.ceil(float(np.asarray(n).item())))


@dataclass(frozen=True, slots=True)
class Guardrail:
    """A one-sided check that the treatment is not worse than the control by more than a margin."""

    difference: float
    upper_bound: float
    lower_bound: float
    margin: float
    p_value: float
    status: GuardrailStatus


def guardrail_status(lower_bound: float, upper_bound: float, margin: float) -> GuardrailStatus:
    """pass: even the worst case is within the margin; fail: even the best case exceeds it."""
    if upper_bound < margin:
        return "pass"
    if lower_bound > margin:
        return "fail"
    return "inconclusive"


def error_rate_guardrail(
    treatment_errors: int, treatment_n: int, control_errors: int, control_n: int, *, margin: float, alpha: float
) -> Guardrail:
    """Non-inferiority of the error rate: H0 is p_t - p_c >= margin (statsmodels Wald test)."""
    difference = treatment_errors / treatment_n - control_errors / control_n
    # A two-sided (1 - 2 alpha) interval gives the two one-sided (1 - alpha) bounds.
    with np.errstate(divide="ignore", invalid="ignore"):  # statsmodels also computes ratios, 0/0 without errors
        low, high = confint_proportions_2indep(
            treatment_errors, treatment_n, control_errors, control_n, method="newcomb", compare="diff",
            alpha=2 * alpha,
        )
        result = test_proportions_2indep(
            treatment_errors, treatment_n, control_errors, control_n,
            value=margin, compare="diff", alternative="smaller", method="score",
        )
    p_value = float(result.pvalue) if np.isfinite(result.pvalue) else (0.0 if difference < margin else 1.0)
    return Guardrail(
        difference=difference,
        upper_bound=float(high),
        lower_bound=float(low),
        margin=margin,
        p_value=p_value,
        status=guardrail_status(float(low), float(high), margin),
    )
