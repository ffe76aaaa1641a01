"""Turn the store's aggregates into the comparison report (pure: plain arrays in, a JSON-ready dict out).

The arrays are indexed (config version, variant, assignment kind, time bucket), as
`report` reads them. Only randomly assigned requests (`ANALYZED_KINDS`) enter the
comparisons; fallback, forced, paused and winner requests are counted but excluded.
The dict layout is documented in docs/report-schema.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

import numpy as np
from numpy.typing import NDArray

from balancer import store
from balancer.config import AnalysisSettings
from balancer.report_compare import OutcomeArrays, compare_outcomes, latency_section, power_estimate
from balancer.report_verdict import verdict
from balancer.stats import coverage_difference_p_value, error_rate_guardrail, srm_test, wilson_interval
from balancer.stats_latency import latency_percentiles

SCHEMA_VERSION: Final = 1
ANALYZED_KINDS: Final = ("sticky", "random", "random_no_key")
_ANALYZED_MASK: Final = np.array([kind in ANALYZED_KINDS for kind in store.ASSIGNMENT_KINDS])


@dataclass(frozen=True, slots=True)
class VersionInfo:
    """One row of the `configs` table."""

    version: int
    applied_at: float
    status: str
    control: str
    weights: dict[str, float]
    body: str


@dataclass(frozen=True, slots=True)
class ExperimentData:
    """Everything the analysis needs, aggregated by (version, variant, assignment kind, time bucket)."""

    experiment: str
    versions: list[VersionInfo]
    variants: list[str]
    control: str
    bucket_edges: NDArray[np.float64]
    requests: NDArray[np.float64]
    errors: NDArray[np.float64]
    feedback: NDArray[np.float64]
    value_sum: NDArray[np.float64]
    value_sum_squares: NDArray[np.float64]
    value_shift: float
    non_binary_values: int
    units: NDArray[np.float64]
    latencies: dict[str, NDArray[np.float64]]


def _analyzed(array: NDArray[np.float64]) -> NDArray[np.float64]:
    """(version, variant, kind, bucket) -> (version, variant, bucket), analyzed kinds only."""
    return array[:, :, _ANALYZED_MASK, :].sum(axis=2)


def _iso(ts: float) -> str | None:
    return None if not math.isfinite(ts) else datetime.fromtimestamp(ts, tz=UTC).isoformat(timespec="seconds")


def analyze(data: ExperimentData, settings: AnalysisSettings, *, include_timeline: bool = True) -> dict[str, Any]:
    """The whole report dict (see docs/report-schema.md)."""
    warnings: list[str] = []
    control_index = data.variants.index(data.control) if data.control in data.variants else 0
    requests = _analyzed(data.requests)
    feedback = _analyzed(data.feedback)
    outcome_type = _outcome_type(settings, int(feedback.sum()), data.non_binary_values, warnings)
    binary = outcome_type == "binary"
    # Per variant, per bucket, over all versions; and per version, over all buckets.
    by_bucket = OutcomeArrays.from_cells(
        feedback.sum(axis=0), _analyzed(data.value_sum).sum(axis=0),
        _analyzed(data.value_sum_squares).sum(axis=0), data.value_shift, binary,
    )
    overall = by_bucket.total()
    srm = _srm(data, settings, warnings)
    comparisons = compare_outcomes(overall, control_index, data.variants, settings, binary, cumulative=by_bucket)
    latency = latency_section(data.latencies, data.variants, control_index, settings)
    variants = _variant_rows(data, settings, srm, overall, control_index)
    errors = _error_guardrails(data, settings, control_index)
    coverage = _coverage(data, settings, warnings)
    power = power_estimate(overall, control_index, variants, settings, binary, len(data.variants) - 1)
    versions = _versions(data, settings, binary, control_index, warnings)
    _general_warnings(data, settings, warnings)
    report: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "generated_at": datetime.now(tz=UTC).isoformat(timespec="seconds"),
        "experiment": data.experiment,
        "control": data.control,
        "settings": settings.model_dump(),
        "mode": "sequential" if settings.sequential else "fixed_horizon",
        "outcome_type": outcome_type,
        "period": {
            "start": _iso(float(data.bucket_edges[0])),
            "end": _iso(float(data.bucket_edges[-1])),
            "start_ts": float(data.bucket_edges[0]),
            "end_ts": float(data.bucket_edges[-1]),
        },
        "totals": {
            "requests": int(data.requests.sum()),
            "analyzed": int(requests.sum()),
            "excluded": {
                kind: int(data.requests[:, :, index, :].sum())
                for index, kind in enumerate(store.ASSIGNMENT_KINDS)
                if kind not in ANALYZED_KINDS
            },
        },
        "variants": variants,
        "comparisons": comparisons["rows"],
        "guardrails": errors + latency["guardrails"],
        "latency": {"comparisons": latency["comparisons"], "histogram": latency["histogram"]},
        "srm": srm,
        "feedback": coverage,
        "power": power,
        "versions": versions,
        "mixed_weights": _mixed_weights(versions),
        "timeline": _timeline(data, requests, comparisons["timeline"]) if include_timeline else None,
        "warnings": warnings,
    }
    report["verdict"] = verdict(report, settings)
    return _json_safe(report)


def _outcome_type(settings: AnalysisSettings, feedback: int, non_binary: int, warnings: list[str]) -> str | None:
    if feedback == 0:
        return None
    if settings.outcome == "binary" and non_binary:
        warnings.append(f"outcome is configured binary but {non_binary:,} feedback values are not 0/1; analysed as numeric")
        return "numeric"
    if settings.outcome == "auto":
        return "numeric" if non_binary else "binary"
    return settings.outcome


def _variant_rows(
    data: ExperimentData, settings: AnalysisSettings, srm: dict[str, Any], overall: OutcomeArrays, control_index: int
) -> list[dict[str, Any]]:
    requests_all = data.requests.sum(axis=(0, 3))  # (variant, kind)
    analyzed = _analyzed(data.requests).sum(axis=(0, 2))
    errors = _analyzed(data.errors).sum(axis=(0, 2))
    feedback = _analyzed(data.feedback).sum(axis=(0, 2))
    latest_weights = data.versions[-1].weights if data.versions else {}
    weight_total = sum(latest_weights.values()) or 1.0
    rows = []
    for index, name in enumerate(data.variants):
        n = int(analyzed[index])
        summary = overall.summary(index)
        interval = overall.mean_interval(index, alpha=settings.alpha)
        rows.append({
            "name": name,
            "is_control": index == control_index,
            "requests": int(requests_all[index].sum()),
            "analyzed_requests": n,
            "excluded": {
                kind: int(requests_all[index, k])
                for k, kind in enumerate(store.ASSIGNMENT_KINDS)
                if kind not in ANALYZED_KINDS
            },
            "units": srm["observed"].get(name, 0),
            "configured_weight": latest_weights.get(name, 0.0) / weight_total,
            "expected_share": srm["expected_share"].get(name),
            "observed_share": srm["observed_share"].get(name),
            "errors": int(errors[index]),
            "error_rate": errors[index] / n if n else None,
            "error_rate_ci": wilson_interval(int(errors[index]), n, alpha=settings.alpha) if n else None,
            "latency_ms": latency_percentiles(data.latencies.get(name, np.zeros(0))),
            "feedback": {"count": int(feedback[index]), "coverage": feedback[index] / n if n else None},
            "outcome": {
                "n": summary.n,
                "mean": summary.mean if summary.n else None,
                "std": math.sqrt(summary.variance) if summary.n > 1 else None,
                "ci": interval,
            },
        })
    return rows


def _version_expected(data: ExperimentData, version_index: int) -> NDArray[np.float64] | None:
    weights = data.versions[version_index].weights
    total = sum(weights.values())
    if total <= 0:
        return None
    shares = np.array([weights.get(name, 0.0) / total for name in data.variants])
    return shares * data.units[version_index].sum()


def _srm_result(observed: NDArray[np.float64], expected: NDArray[np.float64], names: list[str],
                settings: AnalysisSettings) -> dict[str, Any]:
    """Chi-square of observed units against expected units; variants nobody should get are flagged outright."""
    total = float(observed.sum())
    unexpected = [name for name, o, e in zip(names, observed, expected, strict=True) if e <= 0 < o]
    positive = expected > 0
    statistic, p_value = srm_test(observed[positive].tolist(), expected[positive].tolist())
    checked = total >= settings.srm_min_units
    return {
        "statistic": statistic,
        "p_value": p_value,
        "checked": checked,
        "flagged": checked and (p_value < settings.srm_alpha or bool(unexpected)),
        "units_total": int(total),
        "unexpected_variants": unexpected,
        "observed": {name: int(o) for name, o in zip(names, observed, strict=True)},
        "expected": {name: float(e) for name, e in zip(names, expected, strict=True)},
        "observed_share": {name: (o / total if total else None) for name, o in zip(names, observed, strict=True)},
        "expected_share": {
            name: (e / expected.sum() if expected.sum() else None) for name, e in zip(names, expected, strict=True)
        },
    }


def _srm(data: ExperimentData, settings: AnalysisSettings, warnings: list[str]) -> dict[str, Any]:
    observed = np.zeros(len(data.variants))
    expected = np.zeros(len(data.variants))
    for index, version in enumerate(data.versions):
        version_expected = _version_expected(data, index)
        if version_expected is None:
            if data.units[index].sum():
                warnings.append(f"config version {version.version} has no recorded weights; left out of the SRM check")
            continue
        observed += data.units[index]
        expected += version_expected
    result = _srm_result(observed, expected, data.variants, settings)
    result["method"] = "chi-square goodness of fit of randomization units against each config version's weights"
    return result


def _error_guardrails(data: ExperimentData, settings: AnalysisSettings, control_index: int) -> list[dict[str, Any]]:
    analyzed = _analyzed(data.requests).sum(axis=(0, 2))
    errors = _analyzed(data.errors).sum(axis=(0, 2))
    rows = []
    for index, name in enumerate(data.variants):
        if index == control_index or not analyzed[index] or not analyzed[control_index]:
            continue
        result = error_rate_guardrail(
            int(errors[index]), int(analyzed[index]), int(errors[control_index]), int(analyzed[control_index]),
            margin=settings.guardrail_error_rate_margin, alpha=settings.alpha,
        )
        rows.append({"variant": name, "metric": "error_rate", "unit": "proportion", **_guardrail_dict(result)})
    return rows


def _guardrail_dict(result: Any) -> dict[str, Any]:
    return {
        "difference": result.difference,
        "lower_bound": result.lower_bound,
        "upper_bound": result.upper_bound,
        "margin": result.margin,
        "p_value": result.p_value,
        "status": result.status,
    }


def _coverage(data: ExperimentData, settings: AnalysisSettings, warnings: list[str]) -> dict[str, Any]:
    analyzed = _analyzed(data.requests).sum(axis=(0, 2))
    feedback = _analyzed(data.feedback).sum(axis=(0, 2))
    p_value = coverage_difference_p_value(feedback.astype(int).tolist(), analyzed.astype(int).tolist())
    flagged = feedback.sum() >= settings.srm_min_units and p_value < settings.srm_alpha
    if flagged:
        warnings.append(
            f"feedback coverage differs between variants (p = {p_value:.2g}): missing feedback may bias the outcome"
        )
    return {
        "total": int(feedback.sum()),
        "coverage": float(feedback.sum() / analyzed.sum()) if analyzed.sum() else None,
        "by_variant": {n: (f / a if a else None) for n, f, a in zip(data.variants, feedback, analyzed, strict=True)},
        "differential_p_value": p_value,
        "flagged": bool(flagged),
    }


def _versions(data: ExperimentData, settings: AnalysisSettings, binary: bool, control_index: int,
              warnings: list[str]) -> list[dict[str, Any]]:
    rows = []
    requests = _analyzed(data.requests).sum(axis=2)
    feedback = _analyzed(data.feedback).sum(axis=2)
    sums = _analyzed(data.value_sum).sum(axis=2)
    squares = _analyzed(data.value_sum_squares).sum(axis=2)
    for index, version in enumerate(data.versions):
        arrays = OutcomeArrays.from_cells(feedback[index], sums[index], squares[index], data.value_shift, binary)
        expected = _version_expected(data, index)
        srm = None if expected is None else _srm_result(data.units[index], expected, data.variants, settings)
        version_control = data.variants.index(version.control) if version.control in data.variants else control_index
        comparisons = compare_outcomes(arrays, version_control, data.variants, settings, binary, cumulative=None)
        rows.append({
            "version": version.version,
            "applied_at": _iso(version.applied_at),
            "status": version.status,
            "control": version.control or None,
            "weights": version.weights,
            "requests": int(data.requests[index].sum()),
            "analyzed_requests": int(requests[index].sum()),
            "variants": [
                {"name": name, "analyzed_requests": int(requests[index, k]), "outcome_n": int(feedback[index, k]),
                 "outcome_mean": arrays.summary(k).mean if feedback[index, k] else None}
                for k, name in enumerate(data.variants)
            ],
            "srm": srm,
            "comparisons": [
                {key: row[key] for key in ("variant", "difference", "lift", "p_value", "difference_ci", "lift_ci")}
                for row in comparisons["rows"]
            ],
        })
    if _mixed_weights(rows):
        warnings.append(
            "weights changed between config versions: the pooled comparison mixes periods with different splits "
            "(time trends can bias it); check the per-version results"
        )
    return rows


def _normalized(weights: dict[str, float]) -> dict[str, float]:
    total = sum(weights.values())
    return {k: round(v / total, 9) for k, v in weights.items() if v > 0} if total > 0 else {}


def _mixed_weights(versions: list[dict[str, Any]]) -> bool:
    splits = {tuple(sorted(_normalized(v["weights"]).items())) for v in versions if v["analyzed_requests"]}
    return len(splits) > 1


def _general_warnings(data: ExperimentData, settings: AnalysisSettings, warnings: list[str]) -> None:
    if not settings.sequential:
        warnings.append(
            "fixed-horizon mode: p-values and intervals hold only at a sample size fixed in advance; "
            "stopping when they first cross alpha inflates false positives (set analysis.sequential: true to peek)"
        )
    sticky = int(data.requests[:, :, store.ASSIGNMENT_KINDS.index("sticky"), :].sum())
    others = int(_analyzed(data.requests).sum()) - sticky
    units = int(data.units.sum()) - others
    if sticky and units and sticky > 1.2 * units:
        warnings.append(
            f"sticky assignment: {sticky:,} requests come from {units:,} units; request-level intervals ignore "
            "the correlation within a unit and may be too narrow"
        )
    fallback = int(data.requests[:, :, store.ASSIGNMENT_KINDS.index("fallback"), :].sum())
    if fallback:
        warnings.append(f"{fallback:,} fallback requests (variant down, served by the control) are excluded")


def _timeline(data: ExperimentData, requests: NDArray[np.float64], lift: dict[str, Any]) -> dict[str, Any]:
    ends = data.bucket_edges[1:]
    per_bucket = requests.sum(axis=0)  # (variant, bucket)
    # Expected split per bucket: each version's normalized weights, weighted by its traffic in the bucket.
    by_version = requests.sum(axis=1)  # (version, bucket)
    expected = np.zeros(per_bucket.shape)
    for index, version in enumerate(data.versions):
        total = sum(version.weights.values())
        if total > 0:
            shares = np.array([version.weights.get(name, 0.0) / total for name in data.variants])
            expected += shares[:, None] * by_version[index][None, :]
    with np.errstate(divide="ignore", invalid="ignore"):
        expected_share = expected / expected.sum(axis=0, keepdims=True)
    return {
        "ts": ends.tolist(),
        "time": [_iso(float(ts)) for ts in ends],
        "traffic": {name: per_bucket[k].astype(int).tolist() for k, name in enumerate(data.variants)},
        "expected_share": {name: expected_share[k].tolist() for k, name in enumerate(data.variants)},
        **(lift or {}),
    }


def _json_safe(value: Any) -> Any:
    """NaN/inf -> None, numpy scalars -> Python, tuples -> lists."""
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    return value
