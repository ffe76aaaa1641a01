"""Latency comparisons: percentiles, bootstrap intervals for their differences, rank tests.

Latencies are skewed and heavy-tailed, so the comparisons avoid means: p50/p95/p99 with
bootstrap intervals, and the Mann-Whitney U test with the Hodges-Lehmann shift (the median
of all pairwise treatment-minus-control differences) and its distribution-free interval.
Work is bounded for large arms: the bootstrap runs on a seeded subsample of at most
`BOOTSTRAP_MAX_SAMPLE` per arm and rescales its spread by sqrt(m / n) (m-out-of-n
bootstrap, valid for quantiles), and the rank test and Hodges-Lehmann interval use a seeded
subsample of at most `RANK_MAX_SAMPLE` per arm (every request below that).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy import stats as scipy_stats

from balancer.stats import Guardrail, Interval, guardrail_status

QUANTILES = (0.5, 0.95, 0.99)
BOOTSTRAP_MAX_SAMPLE = 5_000
BOOTSTRAP_RESAMPLES = 999
RANK_MAX_SAMPLE = 20_000
_BISECTION_STEPS = 200
_BISECTION_TOLERANCE = 1e-10  # relative to the range of the differences


def quantile_name(quantile: float) -> str:
    """0.95 -> "p95"."""
    return f"p{round(quantile * 100):d}"


def latency_percentiles(values: ArrayLike, quantiles: tuple[float, ...] = QUANTILES) -> dict[str, float]:
    """{"p50": ..., "p95": ..., "p99": ...} (NaN when empty)."""
    array = np.asarray(values, dtype=float)
    if array.size == 0:
        return {quantile_name(q): math.nan for q in quantiles}
    return {quantile_name(q): float(v) for q, v in zip(quantiles, np.quantile(array, quantiles), strict=True)}


def _subsample(values: NDArray[np.float64], size: int, rng: np.random.Generator) -> NDArray[np.float64]:
    if size >= values.size:
        return values
    return rng.choice(values, size=size, replace=False)


@dataclass(frozen=True, slots=True)
class BootstrapDifferences:
    """Full-data quantile differences and their (rescaled) bootstrap replicates, one row per quantile."""

    quantiles: tuple[float, ...]
    estimates: NDArray[np.float64]
    replicates: NDArray[np.float64]
    sample_fraction: float

    def interval(self, index: int, *, alpha: float) -> Interval:
        """Percentile interval for quantile number `index`."""
        low, high = np.quantile(self.replicates[index], [alpha / 2, 1 - alpha / 2])
        return (float(low), float(high))


def bootstrap_quantile_differences(
    treatment: ArrayLike,
    control: ArrayLike,
    *,
    quantiles: tuple[float, ...] = QUANTILES,
    max_sample: int = BOOTSTRAP_MAX_SAMPLE,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = 0,
) -> BootstrapDifferences:
    """Bootstrap treatment-minus-control quantile differences (scipy.stats.bootstrap, seeded, vectorised)."""
    treatment_array = np.asarray(treatment, dtype=float)
    control_array = np.asarray(control, dtype=float)
    rng = np.random.default_rng(seed)
    # One common sampling fraction keeps both arms' rescaling factor equal.
    fraction = min(1.0, max_sample / max(treatment_array.size, control_array.size))
    treatment_sample = _subsample(treatment_array, max(2, round(fraction * treatment_array.size)), rng)
    control_sample = _subsample(control_array, max(2, round(fraction * control_array.size)), rng)
    q = np.asarray(quantiles)

    def statistic(t: NDArray[np.float64], c: NDArray[np.float64], axis: int = -1) -> NDArray[np.float64]:
        return np.quantile(t, q, axis=axis) - np.quantile(c, q, axis=axis)

    result = scipy_stats.bootstrap(
        (treatment_sample, control_sample),
        statistic,
        n_resamples=resamples,
        method="percentile",
        vectorized=True,
        batch=250,
        rng=rng,
    )
    estimates = np.quantile(treatment_array, q) - np.quantile(control_array, q)
    subsample_estimates = statistic(treatment_sample, control_sample)
    deviations = result.bootstrap_distribution - subsample_estimates[:, None]
    replicates = estimates[:, None] + math.sqrt(fraction) * deviations
    return BootstrapDifferences(tuple(quantiles), estimates, replicates, fraction)


def pairwise_difference_order_statistics(
    treatment: ArrayLike, control: ArrayLike, ranks: ArrayLike
) -> NDArray[np.float64]:
    """The k-th smallest (1-based) of all t_i - c_j, for each k in `ranks`, without forming the pairs."""
    t = np.sort(np.asarray(treatment, dtype=float))
    c = np.sort(np.asarray(control, dtype=float))
    k = np.asarray(ranks, dtype=float)
    low = np.full(k.shape, t[0] - c[-1])
    high = np.full(k.shape, t[-1] - c[0])
    tolerance = _BISECTION_TOLERANCE * max(float(high.max() - low.min()), 1e-300)
    for _ in range(_BISECTION_STEPS):
        if np.all(high - low <= tolerance):
            break
        middle = (low + high) / 2
        # pairs with t_i - c_j <= middle, i.e. c_j >= t_i - middle
        below = c.size * t.size - np.searchsorted(c, t[None, :] - middle.reshape(-1, 1), side="left").sum(axis=1)
        reached = below.reshape(k.shape) >= k
        high = np.where(reached, middle, high)
        low = np.where(reached, low, middle)
    return high


@dataclass(frozen=True, slots=True)
class RankComparison:
    """Mann-Whitney U test and Hodges-Lehmann shift (treatment minus control) with its interval."""

    u_statistic: float
    p_value: float
    shift: float
    shift_ci: Interval
    sample_size: int


def mann_whitney_shift(
    treatment: ArrayLike, control: ArrayLike, *, alpha: float, max_sample: int = RANK_MAX_SAMPLE, seed: int = 0
) -> RankComparison:
    """Mann-Whitney U (scipy) and the Hodges-Lehmann shift with the Moses interval."""
    rng = np.random.default_rng(seed)
    t = _subsample(np.asarray(treatment, dtype=float), max_sample, rng)
    c = _subsample(np.asarray(control, dtype=float), max_sample, rng)
    test = scipy_stats.mannwhitneyu(t, c, alternative="two-sided")
    pairs = t.size * c.size
    # Moses interval: order statistics C and N + 1 - C of the pairwise differences, with C from
    # the normal approximation to the null distribution of U (Hollander & Wolfe, sec. 4.3).
    z = scipy_stats.norm.ppf(1 - alpha / 2)
    lower_rank = max(1, math.floor(pairs / 2 - z * math.sqrt(pairs * (t.size + c.size + 1) / 12)))
    ranks = [(pairs + 1) // 2, pairs // 2 + 1, lower_rank, pairs + 1 - lower_rank]
    median_low, median_high, low, high = pairwise_difference_order_statistics(t, c, ranks)
    return RankComparison(
        u_statistic=float(test.statistic),
        p_value=float(test.pvalue),
        shift=float((median_low + median_high) / 2),
        shift_ci=(float(low), float(high)),
        sample_size=int(min(t.size, c.size)),
    )


def latency_guardrail(
    differences: BootstrapDifferences, control_quantile: float, *, index: int, margin: float, alpha: float
) -> Guardrail:
    """Non-inferiority of a latency quantile: treatment may exceed control by at most margin x control."""
    allowed = margin * control_quantile
    low, high = differences.interval(index, alpha=2 * alpha)
    # bootstrap p-value for H0: difference >= allowed
    p_value = float((np.sum(differences.replicates[index] >= allowed) + 1) / (differences.replicates.shape[1] + 1))
    return Guardrail(
        difference=float(differences.estimates[index]),
        upper_bound=high,
        lower_bound=low,
        margin=allowed,
        p_value=p_value,
        status=guardrail_status(low, high, allowed),
    )


def latency_histogram(samples: dict[str, NDArray[np.float64]], *, bins: int = 40) -> dict[str, object]:
    """Log-spaced bin edges over all variants and each variant's fraction of requests per bin."""
    non_empty = [values for values in samples.values() if values.size]
    if not non_empty:
        return {"edges_ms": [], "fractions": {name: [] for name in samples}}
    everything_min = min(float(values.min()) for values in non_empty)
    everything_max = max(float(values.max()) for values in non_empty)
    low = max(everything_min, 1e-3)
    high = max(everything_max, low * 1.01)
    edges = np.geomspace(low, high, bins + 1)
    fractions = {}
    for name, values in samples.items():
        counts, _ = np.histogram(np.clip(values, low, high), bins=edges)
        fractions[name] = (counts / max(values.size, 1)).round(6).tolist()
    return {"edges_ms": edges.round(4).tolist(), "fractions": fractions}
