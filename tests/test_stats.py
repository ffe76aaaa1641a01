"""Reference and simulation tests for balancer.stats, stats_sequential, stats_bayes and stats_latency."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import integrate, special
from scipy import stats as scipy_stats
from statsmodels.stats.multitest import multipletests
from statsmodels.stats.power import NormalIndPower
from statsmodels.stats.proportion import (
    confint_proportions_2indep,
    proportion_effectsize,
    proportions_ztest,
)

from balancer.stats import (
    OutcomeSummary,
    compare_binary,
    compare_numeric,
    coverage_difference_p_value,
    error_rate_guardrail,
    guardrail_status,
    holm_adjust,
    relative_lift_interval,
    required_sample_size,
    srm_test,
    welch_interval,
    wilson_interval,
)
from balancer.stats_bayes import beta_binomial_comparison, normal_comparison
from balancer.stats_latency import (
    bootstrap_quantile_differences,
    latency_percentiles,
    mann_whitney_shift,
    pairwise_difference_order_statistics,
)
from balancer.stats_sequential import (
    always_valid_p_value,
    confidence_sequence_half_width,
    mixture_log_likelihood_ratio,
    sequential_sample_size,
)


def assert_not_above(failures: int, runs: int, rate: float) -> None:
    """The observed failure count is not significantly above `rate` (one-sided binomial test at 0.001)."""
    assert scipy_stats.binomtest(failures, runs, rate, alternative="greater").pvalue > 0.001, (failures, runs, rate)


def assert_near(failures: int, runs: int, rate: float) -> None:
    """The observed count is consistent with `rate` (two-sided binomial test at 0.001)."""
    assert scipy_stats.binomtest(failures, runs, rate).pvalue > 0.001, (failures, runs, rate)


# --- published worked examples and library equivalence -------------------------------------------


def test_wilson_interval_matches_newcombe_1998_example() -> None:
    # Newcombe (1998), Statistics in Medicine 17:857, table I: 81/263, Wilson score method.
    low, high = wilson_interval(81, 263, alpha=0.05)
    assert (round(low, 4), round(high, 4)) == (0.2553, 0.3662)


def test_binary_difference_interval_matches_newcombe_1998_example() -> None:
    # Newcombe (1998), Statistics in Medicine 17:873, table II example (a): 56/70 vs 48/80, method 10.
    result = compare_binary(56, 70, 48, 80, alpha=0.05)
    assert result.difference == pytest.approx(0.2)
    assert (round(result.difference_ci[0], 4), round(result.difference_ci[1], 4)) == (0.0524, 0.3339)


def test_binary_p_value_is_the_pooled_two_proportion_z_test() -> None:
    result = compare_binary(130, 1000, 100, 1000, alpha=0.05)
    _, expected = proportions_ztest([130, 100], [1000, 1000])
    assert result.p_value == pytest.approx(expected, rel=1e-12)
    pooled = 230 / 2000
    z = (0.13 - 0.10) / math.sqrt(pooled * (1 - pooled) * (2 / 1000))
    assert result.p_value == pytest.approx(2 * scipy_stats.norm.sf(z), rel=1e-9)


def test_binary_lift_interval_equals_the_log_ratio_interval() -> None:
    result = compare_binary(130, 1000, 100, 1000, alpha=0.05)
    low, high = confint_proportions_2indep(130, 1000, 100, 1000, compare="ratio", method="log")
    assert result.lift == pytest.approx(0.3)
    assert result.lift_ci == pytest.approx((low - 1, high - 1), rel=1e-9)


def test_numeric_comparison_matches_scipy_welch() -> None:
    rng = np.random.default_rng(3)
    treatment, control = rng.normal(10.5, 2.0, 80), rng.normal(10.0, 3.0, 120)
    result = compare_numeric(OutcomeSummary.from_values(treatment), OutcomeSummary.from_values(control), alpha=0.05)
    reference = scipy_stats.ttest_ind(treatment, control, equal_var=False)
    assert result.p_value == pytest.approx(reference.pvalue, rel=1e-9)
    interval = reference.confidence_interval(0.95)
    assert result.difference_ci == pytest.approx((interval.low, interval.high), rel=1e-9)


def test_summary_from_shifted_sums_equals_raw_values() -> None:
    values = np.array([1e9 + 0.1, 1e9 + 0.2, 1e9 + 0.4, 1e9 + 0.3])
    shift = 1e9
    summary = OutcomeSummary.from_sums(4, float((values - shift).sum()), float(((values - shift) ** 2).sum()), shift=shift)
    assert summary.mean == pytest.approx(values.mean(), rel=1e-15)
    assert summary.variance == pytest.approx(np.var(values - shift, ddof=1), rel=1e-9)


def test_mean_interval_is_student_t() -> None:
    values = np.array([2.0, 4.0, 4.0, 5.0, 7.0, 9.0])
    from balancer.stats import mean_interval

    low, high = mean_interval(OutcomeSummary.from_values(values), alpha=0.05)
    half = scipy_stats.t.ppf(0.975, 5) * values.std(ddof=1) / math.sqrt(6)
    assert (low, high) == pytest.approx((values.mean() - half, values.mean() + half))


def test_relative_lift_interval_delta_method_formula() -> None:
    treatment, control = OutcomeSummary(400, 11.0, 9.0), OutcomeSummary(500, 10.0, 16.0)
    low, high = relative_lift_interval(treatment, control, alpha=0.05)
    se = math.sqrt(9 / (400 * 121) + 16 / (500 * 100))
    assert (low, high) == pytest.approx((1.1 * math.exp(-1.959964 * se) - 1, 1.1 * math.exp(1.959964 * se) - 1), rel=1e-5)
    # negative means: linear delta method, still centred on the lift
    low, high = relative_lift_interval(OutcomeSummary(400, -11.0, 9.0), OutcomeSummary(500, -10.0, 16.0), alpha=0.05)
    assert low < 0.1 < high
    assert relative_lift_interval(treatment, OutcomeSummary(500, 0.0, 1.0), alpha=0.05) is None


def test_holm_adjustment_worked_example() -> None:
    # sorted: 0.01*3 = 0.03, 0.03*2 = 0.06, max(0.04*1, 0.06) = 0.06
    assert holm_adjust([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm_adjust([0.2]) == [0.2]
    assert holm_adjust([]) == []


def test_holm_adjustment_equals_statsmodels() -> None:
    p_values = np.random.default_rng(1).uniform(0, 0.2, size=(6, 5))
    for row in p_values:
        assert holm_adjust(row.tolist()) == pytest.approx(multipletests(row, method="holm")[1].tolist(), rel=1e-12)
    assert holm_adjust([0.4, 0.4, 0.9]) == pytest.approx(multipletests([0.4, 0.4, 0.9], method="holm")[1].tolist())


def test_srm_chi_square() -> None:
    statistic, p_value = srm_test([5100, 4900], [1, 1])
    assert statistic == pytest.approx(4.0)
    assert p_value == pytest.approx(scipy_stats.chi2.sf(4.0, 1))
    statistic, _ = srm_test([700, 300], [0.8, 0.2])
    assert statistic == pytest.approx(100**2 / 800 + 100**2 / 200)


def test_coverage_difference_detects_differential_missingness() -> None:
    assert coverage_difference_p_value([500, 500], [1000, 1000]) == pytest.approx(1.0)
    assert coverage_difference_p_value([600, 400], [1000, 1000]) < 1e-10


def test_required_sample_size_matches_closed_form() -> None:
    control = OutcomeSummary.binary(100, 1000)
    n = required_sample_size(control, binary=True, mde=0.05, alpha=0.05, power=0.8)
    h = abs(proportion_effectsize(0.105, 0.10))
    # Var(2 arcsin sqrt(p_hat)) = 1 / n, so n = 2 (z_alpha/2 + z_beta)^2 / h^2 per arm
    assert n == math.ceil(2 * ((scipy_stats.norm.ppf(0.975) + scipy_stats.norm.ppf(0.8)) / h) ** 2)
    assert n == math.ceil(NormalIndPower().solve_power(h, alpha=0.05, power=0.8))
    numeric = required_sample_size(OutcomeSummary(100, 10.0, 4.0), binary=False, mde=0.1, alpha=0.05, power=0.8)
    assert numeric == math.ceil(2 * (scipy_stats.norm.ppf(0.975) + scipy_stats.norm.ppf(0.8)) ** 2 * 4 / 1.0**2)


def test_error_rate_guardrail_statuses() -> None:
    assert error_rate_guardrail(10, 1000, 10, 1000, margin=0.02, alpha=0.05).status == "pass"
    assert error_rate_guardrail(80, 1000, 10, 1000, margin=0.02, alpha=0.05).status == "fail"
    assert error_rate_guardrail(2, 50, 1, 50, margin=0.02, alpha=0.05).status == "inconclusive"
    assert guardrail_status(-1.0, 0.5, 1.0) == "pass"


# --- sequential ------------------------------------------------------------------------------------


def test_mixture_likelihood_ratio_equals_numerical_integration() -> None:
    estimate, variance, mixing = 0.03, 0.0001, 0.0004

    def integrand(theta: float) -> float:
        ratio = scipy_stats.norm.pdf(estimate, theta, math.sqrt(variance)) / scipy_stats.norm.pdf(
            estimate, 0, math.sqrt(variance)
        )
        return ratio * scipy_stats.norm.pdf(theta, 0, math.sqrt(mixing))

    expected, _ = integrate.quad(integrand, -1, 1, points=[0, estimate], limit=200)
    assert math.exp(mixture_log_likelihood_ratio(estimate, variance, mixing)) == pytest.approx(expected, rel=1e-6)


def test_confidence_sequence_boundary_is_where_the_ratio_hits_one_over_alpha() -> None:
    variance, sigma2, tau, alpha = 2e-4, 1.0, 0.05, 0.05
    half = float(confidence_sequence_half_width(variance, sigma2, tau=tau, alpha=alpha))
    log_ratio = mixture_log_likelihood_ratio(0.01 + half, variance, tau**2 * sigma2, null=0.01)
    assert float(log_ratio) == pytest.approx(math.log(1 / alpha))
    p_value = always_valid_p_value(half, variance, sigma2, tau=tau)
    assert float(p_value) == pytest.approx(alpha)


def test_confidence_sequence_is_wider_than_the_fixed_interval() -> None:
    variance = 2 * 0.09 / 10_000
    half = float(confidence_sequence_half_width(variance, 0.09, tau=0.05, alpha=0.05))
    assert 1.3 < half / (1.959964 * math.sqrt(variance)) < 2.0


def test_sequential_sample_size_exceeds_fixed_horizon() -> None:
    fixed = 2 * (1.959964 + 0.841621) ** 2 * 0.09 / 0.005**2
    sequential = sequential_sample_size(0.005, 0.09, tau=0.05, alpha=0.05, power=0.8)
    assert sequential is not None and fixed < sequential < 4 * fixed


def _peeking_paths(runs: int, steps: int, p: float, seed: int, lift: float = 0.0):
    rng = np.random.default_rng(seed)
    treatment = np.cumsum(rng.random((runs, steps)) < p * (1 + lift), axis=1)
    control = np.cumsum(rng.random((runs, steps)) < p, axis=1)
    n = np.arange(1, steps + 1)
    m_t, m_c = treatment / n, control / n
    v_t, v_c = m_t * (1 - m_t), m_c * (1 - m_c)
    return m_t - m_c, (v_t + v_c) / n, (v_t + v_c) / 2, n


def test_sequential_test_under_continuous_peeking_stays_below_alpha() -> None:
    runs, steps, alpha, start = 1000, 3000, 0.05, 100
    difference, variance, sigma2, n = _peeking_paths(runs, steps, 0.2, seed=11)
    looks = slice(start - 1, None)
    p_values = always_valid_p_value(difference[:, looks], variance[:, looks], sigma2[:, looks], tau=0.05)
    rejected = int((p_values.min(axis=1) < alpha).sum())
    assert_not_above(rejected, runs, alpha)
    # the same looks with a fixed-horizon z-test reject far more often than alpha
    z = np.abs(difference[:, looks]) / np.sqrt(variance[:, looks])
    naive = int((z.max(axis=1) > 1.959964).sum())
    assert naive > 3 * alpha * runs


def test_confidence_sequence_covers_at_every_look() -> None:
    runs, steps, alpha, lift, p = 1000, 3000, 0.05, 0.2, 0.2
    difference, variance, sigma2, n = _peeking_paths(runs, steps, p, seed=12, lift=lift)
    truth = p * lift
    half = confidence_sequence_half_width(variance[:, 99:], sigma2[:, 99:], tau=0.05, alpha=alpha)
    missed = int((np.abs(difference[:, 99:] - truth) > half).any(axis=1).sum())
    assert_not_above(missed, runs, alpha)


# --- simulations: fixed horizon --------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["binary", "numeric"])
def test_a_a_false_positive_rate_is_near_alpha(kind: str) -> None:
    runs, n, alpha = 1200, 2000, 0.05
    rng = np.random.default_rng(21 if kind == "binary" else 22)
    if kind == "binary":
        successes = rng.binomial(n, 0.1, size=(runs, 2))
        p_values = [compare_binary(int(t), n, int(c), n, alpha=alpha).p_value for t, c in successes]
    else:
        data = rng.lognormal(1.0, 0.8, size=(runs, 2, n))
        summaries = [(OutcomeSummary.from_values(t), OutcomeSummary.from_values(c)) for t, c in data]
        p_values = [compare_numeric(t, c, alpha=alpha).p_value for t, c in summaries]
    assert_near(int((np.array(p_values) < alpha).sum()), runs, alpha)


@pytest.mark.parametrize("kind", ["binary", "numeric"])
def test_intervals_cover_a_known_lift(kind: str) -> None:
    runs, n, alpha, lift = 1500, 3000, 0.05, 0.10
    rng = np.random.default_rng(31 if kind == "binary" else 32)
    difference_misses = lift_misses = 0
    if kind == "binary":
        p = 0.2
        t_s, c_s = rng.binomial(n, p * (1 + lift), runs), rng.binomial(n, p, runs)
        results = [compare_binary(int(t), n, int(c), n, alpha=alpha) for t, c in zip(t_s, c_s, strict=True)]
        truth = p * lift
    else:
        mean = 5.0
        t_v = rng.gamma(2.0, mean * (1 + lift) / 2.0, size=(runs, n))
        c_v = rng.gamma(2.0, mean / 2.0, size=(runs, n))
        results = [compare_numeric(OutcomeSummary.from_values(t), OutcomeSummary.from_values(c), alpha=alpha)
                   for t, c in zip(t_v, c_v, strict=True)]
        truth = mean * lift
    for result in results:
        difference_misses += not result.difference_ci[0] <= truth <= result.difference_ci[1]
        lift_misses += not result.lift_ci[0] <= lift <= result.lift_ci[1]
    assert_near(difference_misses, runs, alpha)
    assert_near(lift_misses, runs, alpha)


def test_holm_controls_family_wise_error_with_three_treatments() -> None:
    runs, n, alpha = 800, 1000, 0.05
    rng = np.random.default_rng(41)
    successes = rng.binomial(n, 0.1, size=(runs, 4))
    false_positive = 0
    for row in successes:
        p_values = [compare_binary(int(row[k]), n, int(row[0]), n, alpha=alpha).p_value for k in (1, 2, 3)]
        false_positive += min(holm_adjust(p_values)) < alpha
    assert_not_above(false_positive, runs, alpha)


# --- Bayesian ----------------------------------------------------------------------------------------


def _evan_miller_probability(a_t: int, b_t: int, a_c: int, b_c: int) -> float:
    """Closed form P(p_t > p_c) for independent Beta posteriors (Evan Miller, 2015)."""
    total = 0.0
    for i in range(a_t):
        total += math.exp(
            special.betaln(a_c + i, b_c + b_t) - math.log(b_t + i) - special.betaln(1 + i, b_t)
            - special.betaln(a_c, b_c)
        )
    return total


def test_probability_to_beat_matches_closed_form() -> None:
    result = beta_binomial_comparison(60, 1000, 45, 1000, alpha=0.05, seed=5)
    expected = _evan_miller_probability(1 + 60, 1 + 940, 1 + 45, 1 + 955)
    assert result.probability_beats_control == pytest.approx(expected, abs=0.003)
    lower_better = beta_binomial_comparison(60, 1000, 45, 1000, alpha=0.05, higher_is_better=False, seed=5)
    assert lower_better.probability_beats_control == pytest.approx(1 - expected, abs=0.003)


def test_expected_loss_matches_numerical_integration() -> None:
    a_t, b_t, a_c, b_c = 1 + 48, 1 + 952, 1 + 55, 1 + 945
    result = beta_binomial_comparison(48, 1000, 55, 1000, alpha=0.05, seed=6)
    treatment = scipy_stats.beta(a_t, b_t)

    def inner(c: float) -> float:  # E[max(c - T, 0)] for a fixed control rate c
        partial_mean = a_t / (a_t + b_t) * scipy_stats.beta.cdf(c, a_t + 1, b_t)
        return c * treatment.cdf(c) - partial_mean

    expected, _ = integrate.quad(lambda c: inner(c) * scipy_stats.beta.pdf(c, a_c, b_c), 0, 0.2, limit=200)
    assert result.expected_loss_treatment == pytest.approx(expected, rel=0.02)


def test_normal_comparison_closed_form() -> None:
    treatment, control = OutcomeSummary(400, 10.5, 16.0), OutcomeSummary(400, 10.0, 16.0)
    result = normal_comparison(treatment, control, alpha=0.05)
    sd = math.sqrt(2 * 16 / 400)
    assert result.probability_beats_control == pytest.approx(scipy_stats.norm.cdf(0.5 / sd))
    draws = np.random.default_rng(0).normal(0.5, sd, 2_000_000)
    assert result.expected_loss_treatment == pytest.approx(np.maximum(-draws, 0).mean(), rel=0.02)
    assert result.expected_loss_control == pytest.approx(np.maximum(draws, 0).mean(), rel=0.01)


# --- latency -----------------------------------------------------------------------------------------


def test_percentiles_match_numpy() -> None:
    values = np.arange(1, 101, dtype=float)
    assert latency_percentiles(values) == {"p50": 50.5, "p95": pytest.approx(95.05), "p99": pytest.approx(99.01)}


def test_bootstrap_without_subsampling_equals_scipy() -> None:
    rng = np.random.default_rng(7)
    treatment, control = rng.lognormal(3, 0.5, 800), rng.lognormal(3, 0.5, 700)
    result = bootstrap_quantile_differences(treatment, control, quantiles=(0.5,), resamples=999, seed=9)
    reference = scipy_stats.bootstrap(
        (treatment, control), lambda t, c, axis=-1: np.quantile(t, 0.5, axis=axis) - np.quantile(c, 0.5, axis=axis),
        n_resamples=999, method="percentile", vectorized=True, batch=250, rng=np.random.default_rng(9),
    )
    assert result.sample_fraction == 1.0
    interval = reference.confidence_interval
    assert result.interval(0, alpha=0.05) == pytest.approx((interval.low, interval.high), rel=1e-6)


def test_subsampled_bootstrap_covers_true_quantile_difference() -> None:
    runs, n, alpha = 150, 5_000, 0.05
    rng = np.random.default_rng(8)
    truth = np.exp(3 + 0.5 * scipy_stats.norm.ppf(0.95)) * (1.1 - 1.0)
    missed = 0
    for run in range(runs):
        treatment, control = 1.1 * rng.lognormal(3, 0.5, n), rng.lognormal(3, 0.5, n)
        result = bootstrap_quantile_differences(treatment, control, quantiles=(0.95,), max_sample=1000,
                                                resamples=299, seed=run)
        low, high = result.interval(0, alpha=alpha)
        missed += not low <= truth <= high
    assert_near(missed, runs, alpha)


def test_hodges_lehmann_matches_brute_force() -> None:
    rng = np.random.default_rng(10)
    treatment, control = rng.lognormal(3, 0.5, 301), rng.lognormal(3, 0.5, 250) + 2
    differences = np.sort(np.subtract.outer(treatment, control).ravel())
    result = mann_whitney_shift(treatment, control, alpha=0.05)
    assert result.shift == pytest.approx(np.median(differences), rel=1e-8)
    pairs = differences.size
    c = math.floor(pairs / 2 - 1.959964 * math.sqrt(pairs * (301 + 250 + 1) / 12))
    assert result.shift_ci == pytest.approx((differences[c - 1], differences[pairs - c]), rel=1e-8)
    reference = scipy_stats.mannwhitneyu(treatment, control)
    assert (result.u_statistic, result.p_value) == (reference.statistic, pytest.approx(reference.pvalue))
    ranks = [1, 17, pairs // 3, pairs]
    assert pairwise_difference_order_statistics(treatment, control, ranks) == pytest.approx(
        differences[np.array(ranks) - 1], rel=1e-8
    )


def test_hodges_lehmann_interval_covers_a_known_shift() -> None:
    runs, n, alpha, shift = 300, 400, 0.05, 3.0
    rng = np.random.default_rng(13)
    missed = 0
    for _ in range(runs):
        treatment, control = rng.gumbel(20, 4, n) + shift, rng.gumbel(20, 4, n)
        low, high = mann_whitney_shift(treatment, control, alpha=alpha).shift_ci
        missed += not low <= shift <= high
    assert_near(missed, runs, alpha)


def test_welch_interval_collapses_without_variance() -> None:
    assert welch_interval(OutcomeSummary(5, 1.0, 0.0), OutcomeSummary(5, 1.0, 0.0), alpha=0.05) == (0.0, 0.0)
