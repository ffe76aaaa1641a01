"""The report's comparisons: outcome (fixed-horizon, sequential, Bayesian), latency, and power.

Pure functions over per-variant sufficient statistics (`OutcomeArrays`); with a time
dimension they also give the cumulative timeline, whose looks feed the running minimum of
the always-valid p-value and the running intersection of the confidence sequence.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray
from scipy import stats as scipy_stats

from balancer.config import AnalysisSettings
from balancer.stats import (
    Interval,
    OutcomeSummary,
    compare_binary,
    compare_numeric,
    holm_adjust,
    mean_interval,
    required_sample_size,
    wilson_interval,
)
from balancer.stats_bayes import beta_binomial_comparison, normal_comparison
from balancer.stats_latency import (
    bootstrap_quantile_differences,
    latency_guardrail,
    latency_histogram,
    mann_whitney_shift,
    quantile_name,
)
from balancer.stats_sequential import (
    always_valid_p_value,
    confidence_sequence_half_width,
    sequential_sample_size,
)

_GUARDRAIL_QUANTILE_INDEX = 1  # p95 in stats_latency.QUANTILES


@dataclass(frozen=True, slots=True)
class OutcomeArrays:
    """Per-variant outcome count, sum(x - shift) and sum((x - shift)^2); any trailing axis is time."""

    n: NDArray[np.float64]
    sums: NDArray[np.float64]
    squares: NDArray[np.float64]
    shift: float
    binary: bool

    @classmethod
    def from_cells(cls, n: NDArray[np.float64], sums: NDArray[np.float64], squares: NDArray[np.float64],
                   shift: float, binary: bool) -> OutcomeArrays:
        """Wrap aggregated cells."""
        return cls(np.asarray(n, float), np.asarray(sums, float), np.asarray(squares, float), shift, binary)

    def total(self) -> OutcomeArrays:
        """Summed over the time axis."""
        return OutcomeArrays(self.n.sum(-1), self.sums.sum(-1), self.squares.sum(-1), self.shift, self.binary)

    def cumulative(self) -> OutcomeArrays:
        """Running totals along the time axis."""
        return OutcomeArrays(
            self.n.cumsum(-1), self.sums.cumsum(-1), self.squares.cumsum(-1), self.shift, self.binary
        )

    def successes(self, index: int) -> int:
        """Number of 1s of a binary outcome."""
        return int(round(float(self.sums[index] + self.n[index] * self.shift)))

    def summary(self, index: int) -> OutcomeSummary:
        """Sufficient statistics of one variant (totals only)."""
        n = int(self.n[index])
        if self.binary:
            return OutcomeSummary.binary(self.successes(index), n)
        return OutcomeSummary.from_sums(n, float(self.sums[index]), float(self.squares[index]), shift=self.shift)

    def mean_interval(self, index: int, *, alpha: float) -> Interval | None:
        """Wilson interval (binary) or t interval (numeric) for one variant's mean."""
        n = int(self.n[index])
        if n == 0:
            return None
        if self.binary:
            return wilson_interval(self.successes(index), n, alpha=alpha)
        return mean_interval(self.summary(index), alpha=alpha)

    def moments(self) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
        """Vectorised means and per-observation variances (p(1-p) for binary, ddof=1 otherwise)."""
        with np.errstate(divide="ignore", invalid="ignore"):
            centred = self.sums / self.n
            means = centred + self.shift
            if self.binary:
                variances = means * (1 - means)
            else:
                variances = np.maximum(self.squares - self.n * centred**2, 0) / (self.n - 1)
        return means, variances


def _look_intervals(
    means: NDArray[np.float64], variances: NDArray[np.float64], n: NDArray[np.float64],
    treatment: int, control: int, half_width: Any,
) -> dict[str, NDArray[np.float64]]:
    """Difference and relative lift with intervals at each look; `half_width(V, sigma2)` sets the rule."""
    with np.errstate(divide="ignore", invalid="ignore"):
        m_t, m_c = means[treatment], means[control]
        v_t, v_c = variances[treatment], variances[control]
        n_t, n_c = n[treatment], n[control]
        difference = m_t - m_c
        variance = v_t / n_t + v_c / n_c
        difference_half = half_width(variance, (v_t + v_c) / 2)
        positive = (m_t > 0) & (m_c > 0)
        cv2_t, cv2_c = v_t / m_t**2, v_c / m_c**2
        log_ratio = np.where(positive, np.log(np.where(positive, m_t / m_c, 1.0)), np.nan)
        log_half = half_width(cv2_t / n_t + cv2_c / n_c, (cv2_t + cv2_c) / 2)
        return {
            "difference": difference,
            "variance": variance,
            "sigma2": (v_t + v_c) / 2,
            "difference_low": difference - difference_half,
            "difference_high": difference + difference_half,
            "lift": m_t / m_c - 1,
            "lift_low": np.expm1(log_ratio - log_half),
            "lift_high": np.expm1(log_ratio + log_half),
        }


def _running_intersection(looks: dict[str, NDArray[np.float64]], valid: NDArray[np.bool_]) -> None:
    """Intersect the confidence sequence over the valid looks (valid at every time, so still valid)."""
    for name in ("difference", "lift"):
        low = np.where(valid, looks[f"{name}_low"], -np.inf)
        high = np.where(valid, looks[f"{name}_high"], np.inf)
        running_low = np.fmax.accumulate(np.nan_to_num(low, nan=-np.inf))
        running_high = np.fmin.accumulate(np.nan_to_num(high, nan=np.inf))
        looks[f"{name}_low"] = np.where(valid, running_low, looks[f"{name}_low"])
        looks[f"{name}_high"] = np.where(valid, running_high, looks[f"{name}_high"])


def _pair(looks: dict[str, NDArray[np.float64]], name: str) -> Interval:
    return (float(looks[f"{name}_low"][-1]), float(looks[f"{name}_high"][-1]))


def compare_outcomes(
    overall: OutcomeArrays, control: int, names: list[str], settings: AnalysisSettings, binary: bool,
    *, cumulative: OutcomeArrays | None,
) -> dict[str, Any]:
    """Each treatment vs the control: rows for the report and (with `cumulative`) the lift timeline."""
    minimum = 1 if binary else 2
    treatments = [k for k in range(len(names)) if k != control and overall.n[k] >= minimum]
    if overall.n[control] < minimum:
        treatments = []
    count = max(len(treatments), 1)
    alpha_ci = settings.alpha / count  # Bonferroni-level intervals, consistent with Holm-adjusted p-values
    if cumulative is not None:
        by_time = cumulative.cumulative()
    else:
        by_time = OutcomeArrays(overall.n[:, None], overall.sums[:, None], overall.squares[:, None],
                                overall.shift, binary)
    means, variances = by_time.moments()
    z = float(scipy_stats.norm.ppf(1 - alpha_ci / 2))

    def fixed_half(variance: NDArray[np.float64], sigma2: NDArray[np.float64]) -> NDArray[np.float64]:
        return z * np.sqrt(variance)

    def sequential_half(variance: NDArray[np.float64], sigma2: NDArray[np.float64]) -> NDArray[np.float64]:
        return confidence_sequence_half_width(variance, sigma2, tau=settings.sequential_tau, alpha=alpha_ci)

    rows: list[dict[str, Any]] = []
    timeline: dict[str, Any] = {}
    for k in treatments:
        fixed = _fixed(overall, k, control, binary, alpha_ci)
        looks = _look_intervals(means, variances, by_time.n, k, control, sequential_half)
        enough = (by_time.n[k] >= settings.min_sample) & (by_time.n[control] >= settings.min_sample)
        valid = enough & (looks["variance"] > 0)
        valid[-1] = bool(looks["variance"][-1] > 0)
        p_looks = np.where(valid, always_valid_p_value(
            looks["difference"], looks["variance"], looks["sigma2"], tau=settings.sequential_tau
        ), 1.0)
        p_running = np.minimum.accumulate(p_looks)
        _running_intersection(looks, valid)
        gain = fixed.difference if settings.higher_is_better else -fixed.difference
        rows.append({
            "variant": names[k],
            "control": names[control],
            "n": int(overall.n[k]),
            "n_control": int(overall.n[control]),
            "mean": float(means[k][-1]),
            "mean_control": float(means[control][-1]),
            "difference": fixed.difference,
            "lift": fixed.lift,
            "direction": "better" if gain > 0 else ("worse" if gain < 0 else None),
            "ci_level": 1 - alpha_ci,
            "fixed_horizon": {
                "p_value": fixed.p_value, "difference_ci": fixed.difference_ci, "lift_ci": fixed.lift_ci,
                "method": fixed.method,
            },
            "sequential": {
                "p_value": float(p_running[-1]), "difference_ci": _pair(looks, "difference"),
                "lift_ci": _pair(looks, "lift"), "tau": settings.sequential_tau,
                "method": "mSPRT always-valid p-value; normal-mixture confidence sequence",
            },
            "bayes": _bayes(overall, k, control, binary, settings),
        })
        if cumulative is not None:
            display = looks if settings.sequential else _look_intervals(
                means, variances, by_time.n, k, control, fixed_half
            )
            # Looks before min_sample outcomes per arm are left out (null): their intervals are noise.
            def shown(values: NDArray[np.float64]) -> list[float]:
                return np.where(enough, values, np.nan).tolist()

            timeline[names[k]] = {
                "estimate": shown(display["lift"]), "low": shown(display["lift_low"]),
                "high": shown(display["lift_high"]), "difference": shown(display["difference"]),
                "difference_low": shown(display["difference_low"]),
                "difference_high": shown(display["difference_high"]),
                "p_value": shown(p_running if settings.sequential else np.full(p_running.shape, np.nan)),
            }
    _choose_primary(rows, settings)
    lift_timeline = None
    if cumulative is not None:
        lift_timeline = {
            "interval": "confidence sequence" if settings.sequential else "confidence interval",
            "level": 1 - alpha_ci,
            "cumulative_outcomes": {name: by_time.n[k].astype(int).tolist() for k, name in enumerate(names)},
            "lift": timeline,
        }
    return {"rows": rows, "timeline": lift_timeline}


def _fixed(overall: OutcomeArrays, treatment: int, control: int, binary: bool, alpha: float) -> Any:
    if binary:
        return compare_binary(
            overall.successes(treatment), int(overall.n[treatment]),
            overall.successes(control), int(overall.n[control]), alpha=alpha,
        )
    return compare_numeric(overall.summary(treatment), overall.summary(control), alpha=alpha)


def _bayes(overall: OutcomeArrays, treatment: int, control: int, binary: bool,
           settings: AnalysisSettings) -> dict[str, Any]:
    if binary:
        result = beta_binomial_comparison(
            overall.successes(treatment), int(overall.n[treatment]),
            overall.successes(control), int(overall.n[control]),
            alpha=settings.alpha, higher_is_better=settings.higher_is_better, seed=treatment,
        )
    else:
        result = normal_comparison(
            overall.summary(treatment), overall.summary(control),
            alpha=settings.alpha, higher_is_better=settings.higher_is_better,
        )
    return {
        "probability_beats_control": result.probability_beats_control,
        "expected_loss_treatment": result.expected_loss_treatment,
        "expected_loss_control": result.expected_loss_control,
        "difference_credible_interval": result.difference_credible_interval,
        "lift_credible_interval": result.lift_credible_interval,
        "method": result.method,
    }


def _choose_primary(rows: list[dict[str, Any]], settings: AnalysisSettings) -> None:
    """Holm-adjust both families of p-values and copy the configured mode's numbers to the top level."""
    for family in ("fixed_horizon", "sequential"):
        adjusted = holm_adjust([row[family]["p_value"] for row in rows])
        for row, p in zip(rows, adjusted, strict=True):
            row[family]["p_value_adjusted"] = p
    primary = "sequential" if settings.sequential else "fixed_horizon"
    for row in rows:
        chosen = row[primary]
        row["primary"] = primary
        row["p_value"] = chosen["p_value"]
        row["p_value_adjusted"] = chosen["p_value_adjusted"]
        row["difference_ci"] = chosen["difference_ci"]
        row["lift_ci"] = chosen["lift_ci"]
        row["significant"] = chosen["p_value_adjusted"] < settings.alpha


def latency_section(latencies: dict[str, NDArray[np.float64]], names: list[str], control: int,
                    settings: AnalysisSettings) -> dict[str, Any]:
    """Percentile differences with bootstrap intervals, Mann-Whitney/Hodges-Lehmann, p95 guardrail."""
    control_values = latencies.get(names[control], np.zeros(0))
    comparisons, guardrails = [], []
    for k, name in enumerate(names):
        values = latencies.get(name, np.zeros(0))
        if k == control or values.size < 2 or control_values.size < 2:
            continue
        differences = bootstrap_quantile_differences(values, control_values, seed=k)
        rank = mann_whitney_shift(values, control_values, alpha=settings.alpha, seed=k)
        comparisons.append({
            "variant": name,
            "percentiles": {
                quantile_name(q): {
                    "difference": float(differences.estimates[i]),
                    "ci": differences.interval(i, alpha=settings.alpha),
                }
                for i, q in enumerate(differences.quantiles)
            },
            "bootstrap_sample_fraction": differences.sample_fraction,
            "mann_whitney": {"u_statistic": rank.u_statistic, "p_value": rank.p_value},
            "hodges_lehmann": {"shift": rank.shift, "ci": rank.shift_ci, "sample_size": rank.sample_size},
        })
        control_p95 = float(np.quantile(control_values, differences.quantiles[_GUARDRAIL_QUANTILE_INDEX]))
        guard = latency_guardrail(
            differences, control_p95, index=_GUARDRAIL_QUANTILE_INDEX,
            margin=settings.guardrail_latency_margin, alpha=settings.alpha,
        )
        guardrails.append({
            "variant": name, "metric": "latency_p95", "unit": "ms",
            "difference": guard.difference, "lower_bound": guard.lower_bound, "upper_bound": guard.upper_bound,
            "margin": guard.margin, "p_value": guard.p_value, "status": guard.status,
        })
    return {"comparisons": comparisons, "guardrails": guardrails, "histogram": latency_histogram(latencies)}


def power_estimate(overall: OutcomeArrays, control: int, variants: list[dict[str, Any]],
                   settings: AnalysisSettings, binary: bool, treatments: int) -> dict[str, Any]:
    """Outcomes (and requests, at the current feedback coverage) per variant still needed for the MDE."""
    summary = overall.summary(control)
    alpha = settings.alpha / max(treatments, 1)
    required: int | None = None
    if summary.n >= 2 and summary.mean and math.isfinite(summary.mean):
        if settings.sequential:
            required = sequential_sample_size(
                settings.mde * abs(summary.mean), summary.variance, tau=settings.sequential_tau,
                alpha=alpha, power=settings.power,
            )
        else:
            required = required_sample_size(summary, binary=binary, mde=settings.mde, alpha=alpha,
                                            power=settings.power)
    current = min((int(n) for n in overall.n), default=0)
    coverages = [v["feedback"]["coverage"] for v in variants if v["feedback"]["coverage"]]
    more = None if required is None else max(required - current, 0)
    more_requests = None
    if more is not None and coverages:
        more_requests = int(math.ceil(more / min(coverages)))
    return {
        "mde": settings.mde,
        "power": settings.power,
        "alpha": alpha,
        "method": "mSPRT boundary crossing" if settings.sequential else "fixed-horizon z-test (statsmodels)",
        "required_per_variant": required,
        "current_per_variant": current,
        "more_outcomes_per_variant": more,
        "more_requests_per_variant": more_requests,
    }
