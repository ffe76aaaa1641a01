"""Bayesian summaries: probability that a variant beats the control, expected loss, credible interval.

Binary outcomes use independent Beta(1, 1) priors (posterior Beta(1 + s, 1 + n - s)) and a
seeded Monte Carlo over the two posteriors. Numeric outcomes use the flat-prior normal
approximation mean ~ N(x_bar, s^2 / n), for which everything has a closed form.
"Beats" and "loss" follow the outcome's direction (`higher_is_better`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import stats as scipy_stats

from balancer.stats import Interval, OutcomeSummary

MONTE_CARLO_DRAWS = 200_000


@dataclass(frozen=True, slots=True)
class BayesComparison:
    """P(treatment beats control), expected losses of shipping either, and a credible interval."""

    probability_beats_control: float
    expected_loss_treatment: float
    expected_loss_control: float
    difference_credible_interval: Interval
    lift_credible_interval: Interval | None
    method: str


def beta_binomial_comparison(
    treatment_successes: int,
    treatment_n: int,
    control_successes: int,
    control_n: int,
    *,
    alpha: float,
    higher_is_better: bool = True,
    draws: int = MONTE_CARLO_DRAWS,
    seed: int = 0,
) -> BayesComparison:
    """Beta-binomial model with uniform priors, by seeded Monte Carlo."""
    rng = np.random.default_rng(seed)
    treatment = rng.beta(1 + treatment_successes, 1 + treatment_n - treatment_successes, size=draws)
    control = rng.beta(1 + control_successes, 1 + control_n - control_successes, size=draws)
    sign = 1.0 if higher_is_better else -1.0
    gain = sign * (treatment - control)
    difference = treatment - control
    lift = treatment / control - 1
    tails = [alpha / 2, 1 - alpha / 2]
    difference_low, difference_high = np.quantile(difference, tails)
    lift_low, lift_high = np.quantile(lift, tails)
    return BayesComparison(
        probability_beats_control=float(np.mean(gain > 0)),
        expected_loss_treatment=float(np.mean(np.maximum(-gain, 0))),
        expected_loss_control=float(np.mean(np.maximum(gain, 0))),
        difference_credible_interval=(float(difference_low), float(difference_high)),
        lift_credible_interval=(float(lift_low), float(lift_high)),
        method=f"Beta(1,1) priors, {draws:,} seeded Monte Carlo draws",
    )


def _expected_shortfall(mean: float, sd: float) -> float:
    """E[max(-X, 0)] for X ~ N(mean, sd^2)."""
    if sd == 0:
        return max(-mean, 0.0)
    z = mean / sd
    return float(sd * scipy_stats.norm.pdf(z) - mean * scipy_stats.norm.cdf(-z))


def normal_comparison(
    treatment: OutcomeSummary, control: OutcomeSummary, *, alpha: float, higher_is_better: bool = True
) -> BayesComparison:
    """Flat-prior normal approximation of the difference of means (closed form)."""
    difference = treatment.mean - control.mean
    sd = math.sqrt(treatment.variance / treatment.n + control.variance / control.n)
    gain = difference if higher_is_better else -difference
    if sd > 0:
        probability = float(scipy_stats.norm.cdf(gain / sd))
    else:
        probability = 1.0 if gain > 0 else (0.0 if gain < 0 else 0.5)
    z = float(scipy_stats.norm.ppf(1 - alpha / 2))
    return BayesComparison(
        probability_beats_control=probability,
        expected_loss_treatment=_expected_shortfall(gain, sd),
        expected_loss_control=_expected_shortfall(-gain, sd),
        difference_credible_interval=(difference - z * sd, difference + z * sd),
        lift_credible_interval=None,
        method="flat prior, normal approximation (closed form)",
    )
