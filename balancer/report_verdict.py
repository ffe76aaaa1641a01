"""The verdict: one plain sentence (and a status code) saying what the report supports.

Checked in order: no data; sample ratio mismatch (nothing else can be trusted); too little
data for any verdict; a treatment significantly better than the control (the winner);
every treatment significantly worse (the control wins); otherwise no significant
difference yet, with how much more traffic the minimum detectable effect needs.
"""

from __future__ import annotations

from typing import Any, Literal

from balancer.config import AnalysisSettings

VerdictStatus = Literal["no_data", "srm", "insufficient_data", "winner", "control_wins", "no_difference"]


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{value * 100:+.1f}%"


def _interval(row: dict[str, Any]) -> str:
    if row.get("lift_ci") and None not in row["lift_ci"]:
        low, high = row["lift_ci"]
        return f"[{low * 100:+.1f}%, {high * 100:+.1f}%]"
    low, high = row["difference_ci"]
    return f"difference in [{low:+.4g}, {high:+.4g}]"


def _describe(row: dict[str, Any]) -> str:
    return (
        f"{row['variant']} vs {row['control']}: lift {_percent(row['lift'])} {_interval(row)}, "
        f"adjusted p = {row['p_value_adjusted']:.3g}, P(beats control) = {row['bayes']['probability_beats_control']:.1%}"
    )


def _more_traffic(report: dict[str, Any], settings: AnalysisSettings) -> str:
    power = report["power"]
    more = power.get("more_requests_per_variant")
    if more is None:
        more = power.get("more_outcomes_per_variant")
    if more is None:
        return ""
    if more == 0:
        return f"; the sample already suffices to detect a {settings.mde:.0%} lift, so any true effect is likely smaller"
    return f": about {more:,} more requests per variant to detect a {settings.mde:.0%} lift"


def verdict(report: dict[str, Any], settings: AnalysisSettings) -> dict[str, Any]:
    """{"status", "winner", "headline", "details", "guardrail_failures"} for the report dict."""
    details: list[str] = []
    rows = report["comparisons"]
    status: VerdictStatus
    winner = None
    failures: list[str] = []
    outcome_counts = [v["outcome"]["n"] for v in report["variants"]]
    smallest = min(outcome_counts, default=0)
    if report["totals"]["analyzed"] == 0:
        status, headline = "no_data", f"No data yet for experiment {report['experiment']!r}."
    elif report["srm"]["flagged"]:
        status = "srm"
        headline = (
            f"SRM detected (p = {report['srm']['p_value']:.2g}): the traffic split does not match the configured "
            "weights; do not trust this comparison."
        )
        details.append("look for assignment bugs, variants that crash or time out, or bots hitting one variant")
    elif report["outcome_type"] is None or smallest < settings.min_sample or not rows:
        status = "insufficient_data"
        headline = (
            f"Not enough data: need {settings.min_sample:,} outcomes per variant "
            f"(the smallest variant has {smallest:,})."
        )
    else:
        better = [row for row in rows if row["significant"] and row["direction"] == "better"]
        worse = [row for row in rows if row["significant"] and row["direction"] == "worse"]
        if better:
            best = max(better, key=lambda row: row["mean"] if settings.higher_is_better else -row["mean"])
            status, winner = "winner", best["variant"]
            headline = f"{winner} beats {best['control']} on the outcome: lift {_percent(best['lift'])} {_interval(best)}."
            failures = [
                g["metric"] for g in report["guardrails"]
                if g["variant"] == winner and g["status"] == "fail"
            ]
            if failures:
                headline = headline[:-1] + f", but it fails the {' and '.join(failures)} guardrail{'s' if len(failures) > 1 else ''}."
        elif worse and len(worse) == len(rows):
            status, winner = "control_wins", rows[0]["control"]
            headline = f"{winner} (control) beats " + ", ".join(row["variant"] for row in worse) + " on the outcome."
        else:
            status = "no_difference"
            headline = "No significant difference yet" + _more_traffic(report, settings) + "."
            if worse:
                details.append("significantly worse than the control: " + ", ".join(r["variant"] for r in worse))
    if status not in ("no_data", "srm"):
        details.extend(_describe(row) for row in rows)
    if status == "insufficient_data":
        details.append("keep the experiment running" + _more_traffic(report, settings))
    for guard in report["guardrails"]:
        if guard["status"] == "fail":
            details.append(f"guardrail {guard['metric']} fails for {guard['variant']}")
    return {"status": status, "winner": winner, "headline": headline, "details": details,
            "guardrail_failures": failures}
