"""Peeking-safe inference: the mixture sequential probability ratio test (mSPRT).

For an asymptotically normal estimate of the difference, with estimate D and variance V
after n observations, mixing the likelihood ratio over a normal prior N(theta0, T^2) on
the true difference gives (Johari, Koomen, Pekelis & Walsh 2017, "Peeking at A/B tests",
eq. 11; Robbins 1970)::

    Lambda_n = sqrt(V / (V + T^2)) * exp(T^2 (D - theta0)^2 / (2 V (V + T^2)))

Lambda_n is a non-negative martingale under H0, so by Ville's inequality
P(exists n: Lambda_n >= 1/alpha) <= alpha: 1 / Lambda_n (running minimum) is an
always-valid p-value, and inverting it gives the normal-mixture confidence sequence of
Howard, Ramdas, McAuliffe & Sekhon (2021, "Time-uniform, nonparametric, nonasymptotic
confidence sequences", eq. 14)::

    |D - theta| < sqrt(2 V (V + T^2) / T^2 * (log(1/alpha) + log((V + T^2) / V) / 2))

Here T^2 = tau^2 * sigma^2: tau is the prior standard deviation of the standardized effect
(difference divided by the per-observation standard deviation sigma), so one tau suits
any outcome scale. The boundary is tightest when T^2 / V is about 8, i.e. around
16 / tau^2 observations per arm for a balanced two-arm test.
"""

from __future__ import annotations

import math

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy import optimize
from scipy import stats as scipy_stats


def mixture_log_likelihood_ratio(
    estimate: ArrayLike, variance: ArrayLike, mixing_variance: ArrayLike, *, null: float = 0.0
) -> NDArray[np.float64]:
    """log Lambda_n of the normal-mixture SPRT (vectorised over any shape)."""
    estimate_array = np.asarray(estimate, dtype=float)
    v = np.asarray(variance, dtype=float)
    t2 = np.asarray(mixing_variance, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        return 0.5 * np.log(v / (v + t2)) + t2 * (estimate_array - null) ** 2 / (2 * v * (v + t2))


def always_valid_p_value(
    estimate: ArrayLike, variance: ArrayLike, per_observation_variance: ArrayLike, *, tau: float, null: float = 0.0
) -> NDArray[np.float64]:
    """min(1, 1 / Lambda_n) at each look; take the running minimum over looks for the sequence."""
    mixing_variance = tau**2 * np.asarray(per_observation_variance, dtype=float)
    log_ratio = mixture_log_likelihood_ratio(estimate, variance, mixing_variance, null=null)
    with np.errstate(over="ignore"):
        p_value = np.minimum(1.0, np.exp(-log_ratio))
    return np.where(np.isfinite(log_ratio), p_value, 1.0)


def confidence_sequence_half_width(
    variance: ArrayLike, per_observation_variance: ArrayLike, *, tau: float, alpha: float
) -> NDArray[np.float64]:
    """Half-width of the (1 - alpha) normal-mixture confidence sequence around the estimate."""
    v = np.asarray(variance, dtype=float)
    t2 = tau**2 * np.asarray(per_observation_variance, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.sqrt(2 * v * (v + t2) / t2 * (math.log(1 / alpha) + 0.5 * np.log((v + t2) / v)))


def sequential_sample_size(
    effect: float, per_observation_variance: float, *, tau: float, alpha: float, power: float
) -> int | None:
    """Observations per arm at which a true difference `effect` clears the boundary with probability `power`."""
    if effect == 0 or not per_observation_variance > 0:
        return None
    z_power = scipy_stats.norm.ppf(power)

    def shortfall(log_n: float) -> float:
        variance = 2 * per_observation_variance / math.exp(log_n)
        half_width = confidence_sequence_half_width(variance, per_observation_variance, tau=tau, alpha=alpha)
        return abs(effect) - float(half_width) - z_power * math.sqrt(variance)

    low, high = math.log(2.0), math.log(1e13)
    if shortfall(low) >= 0:
        return 2
    if shortfall(high) < 0:
        return None
    return int(math.ceil(math.exp(optimize.brentq(shortfall, low, high, xtol=1e-6))))
