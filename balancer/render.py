"""Render the report dict: a terminal view (rich), JSON, and a self-contained HTML page (`render_html`).

    >>> from rich.console import Console
    >>> render_text(build_report("var/outcomes.db"), Console())  # doctest: +SKIP
"""

from __future__ import annotations

import json
from typing import Any, Final

from rich.console import Console
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

__all__ = ["VERDICT_STYLES", "format_interval", "format_percent", "render_html", "render_json", "render_text"]

VERDICT_STYLES: Final = {
    "winner": "bold green",
    "control_wins": "bold yellow",
    "no_difference": "bold cyan",
    "insufficient_data": "yellow",
    "srm": "bold white on red",
    "no_data": "dim",
}
_GUARDRAIL_STYLES: Final = {"pass": "green", "fail": "bold red", "inconclusive": "yellow"}


def report_console() -> Console:
    """A console for the text report: the terminal's width, or 120 columns when writing to a pipe or file."""
    console = Console()
    return console if console.is_terminal else Console(width=120)


def render_json(report: dict[str, Any]) -> str:
    """The report as indented JSON (NaN never appears: missing numbers are null)."""
    return json.dumps(report, indent=2, allow_nan=False)


def render_html(report: dict[str, Any]) -> str:
    """One self-contained HTML page (inline CSS and SVG plots, no scripts or external files)."""
    from balancer.render_html import html_page  # render_html imports this module's formatters

    return html_page(report)


def format_percent(value: float | None, *, signed: bool = False) -> str:
    """0.0123 -> "1.23%" ("+1.23%" when signed); None -> "-"."""
    if value is None:
        return "-"
    return f"{value * 100:+.2f}%" if signed else f"{value * 100:.2f}%"


def format_number(value: float | None, digits: int = 4) -> str:
    """A compact number; None -> "-"."""
    return "-" if value is None else f"{value:.{digits}g}"


def format_interval(interval: list[float | None] | None, *, percent: bool = False, signed: bool = True) -> str:
    """[low, high] as text; "-" when missing."""
    if not interval or None in interval:
        return "-"
    low, high = interval
    if percent:
        return f"[{format_percent(low, signed=signed)}, {format_percent(high, signed=signed)}]"
    return f"[{low:+.4g}, {high:+.4g}]" if signed else f"[{low:.4g}, {high:.4g}]"


def format_p(value: float | None) -> str:
    """p-values: 3 significant digits, '<0.0001' below that."""
    if value is None:
        return "-"
    return "<0.0001" if value < 1e-4 else f"{value:.3g}"


def _variants_table(report: dict[str, Any]) -> Table:
    table = Table(title="Variants", title_justify="left")
    for column in ("variant", "requests", "analyzed", "share (expected)", "fallback", "errors",
                   "p50 / p95 / p99 ms", "feedback", "outcome mean [95% CI]"):
        table.add_column(column, justify="left" if column == "variant" else "right")
    for variant in report["variants"]:
        latency = variant["latency_ms"]
        table.add_row(
            variant["name"] + (" (control)" if variant["is_control"] else ""),
            f"{variant['requests']:,}",
            f"{variant['analyzed_requests']:,}",
            f"{format_percent(variant['observed_share'])} ({format_percent(variant['expected_share'])})",
            f"{variant['excluded']['fallback']:,}",
            format_percent(variant["error_rate"]),
            " / ".join(format_number(latency[key], 3) for key in ("p50", "p95", "p99")),
            f"{variant['feedback']['count']:,} ({format_percent(variant['feedback']['coverage'])})",
            f"{format_number(variant['outcome']['mean'])} {format_interval(variant['outcome']['ci'], signed=False)}",
        )
    return table


def _comparisons_table(report: dict[str, Any]) -> Table:
    mode = "always-valid" if report["mode"] == "sequential" else "fixed-horizon"
    table = Table(title=f"Outcome vs control ({mode}, Holm-adjusted)", title_justify="left")
    for column in ("variant", "lift", "lift interval", "difference interval", "p (adj.)", "P(beats control)",
                   "expected loss", "significant"):
        table.add_column(column, justify="left" if column == "variant" else "right")
    for row in report["comparisons"]:
        style = "green" if row["significant"] and row["direction"] == "better" else (
            "red" if row["significant"] else "")
        table.add_row(
            row["variant"],
            format_percent(row["lift"], signed=True),
            format_interval(row["lift_ci"], percent=True),
            format_interval(row["difference_ci"]),
            format_p(row["p_value_adjusted"]),
            format_percent(row["bayes"]["probability_beats_control"]),
            format_number(row["bayes"]["expected_loss_treatment"], 3),
            Text("yes" if row["significant"] else "no", style=style),
        )
    return table


def _guardrails_table(report: dict[str, Any]) -> Table:
    table = Table(title="Guardrails (treatment minus control, one-sided)", title_justify="left")
    for column in ("variant", "metric", "difference", "worst case", "margin", "status"):
        table.add_column(column, justify="left" if column in ("variant", "metric") else "right")
    for guard in report["guardrails"]:
        percent = guard["unit"] == "proportion"
        show = (lambda v: format_percent(v, signed=True)) if percent else (lambda v: format_number(v, 3))
        table.add_row(
            guard["variant"], guard["metric"], show(guard["difference"]), show(guard["upper_bound"]),
            show(guard["margin"]), Text(guard["status"], style=_GUARDRAIL_STYLES[guard["status"]]),
        )
    return table


def _latency_table(report: dict[str, Any]) -> Table:
    table = Table(title="Latency vs control (ms, 95% bootstrap intervals)", title_justify="left")
    for column in ("variant", "p50", "p95", "p99", "Hodges-Lehmann shift", "Mann-Whitney p"):
        table.add_column(column, justify="left" if column == "variant" else "right")
    for row in report["latency"]["comparisons"]:
        cells = [
            f"{row['percentiles'][key]['difference']:+.3g} {format_interval(row['percentiles'][key]['ci'])}"
            for key in ("p50", "p95", "p99")
        ]
        shift = row["hodges_lehmann"]
        table.add_row(row["variant"], *cells, f"{shift['shift']:+.3g} {format_interval(shift['ci'])}",
                      format_p(row["mann_whitney"]["p_value"]))
    return table


def _versions_table(report: dict[str, Any]) -> Table:
    table = Table(title="Config versions", title_justify="left")
    for column in ("version", "applied", "status", "weights", "analyzed", "SRM p", "lift by variant"):
        table.add_column(column, justify="left")
    for version in report["versions"]:
        srm = version["srm"]
        lifts = ", ".join(
            f"{row['variant']} {format_percent(row['lift'], signed=True)} (p {format_p(row['p_value'])})"
            for row in version["comparisons"]
        )
        table.add_row(
            str(version["version"]), version["applied_at"] or "-", version["status"],
            ", ".join(f"{k}={v:g}" for k, v in version["weights"].items()) or "-",
            f"{version['analyzed_requests']:,}",
            "-" if srm is None else Text(format_p(srm["p_value"]), style="bold red" if srm["flagged"] else ""),
            lifts or "-",
        )
    return table


def render_text(report: dict[str, Any], console: Console) -> None:
    """Print the report to a rich console: verdict first, then the tables and warnings."""
    verdict = report["verdict"]
    period = report["period"]
    console.print(
        f"[bold]Experiment {report['experiment']}[/]  control [bold]{report['control']}[/]  "
        f"mode {report['mode']}  outcome {report['outcome_type'] or 'none yet'}  "
        f"{period['start'] or ''} -> {period['end'] or ''}"
    )
    style = VERDICT_STYLES["control_wins"] if verdict["guardrail_failures"] else VERDICT_STYLES.get(
        verdict["status"], "bold")
    body = Text(verdict["headline"], style=style)
    for detail in verdict["details"]:
        body.append("\n  " + detail, style="default")
    console.print(Panel(body, title="Verdict", title_align="left"))
    console.print(_variants_table(report))
    if report["comparisons"]:
        console.print(_comparisons_table(report))
    if report["guardrails"]:
        console.print(_guardrails_table(report))
    if report["latency"]["comparisons"]:
        console.print(_latency_table(report))
    srm = report["srm"]
    srm_style = "bold red" if srm["flagged"] else ("green" if srm["checked"] else "dim")
    srm_state = "MISMATCH" if srm["flagged"] else ("ok" if srm["checked"] else "not checked yet")
    console.print(
        f"Sample ratio: [{srm_style}]{srm_state}[/] (chi-square p = {format_p(srm['p_value'])}, "
        f"{srm['units_total']:,} units)   Feedback coverage: {format_percent(report['feedback']['coverage'])}"
    )
    power = report["power"]
    if power["required_per_variant"] is not None:
        console.print(
            f"Power: {power['required_per_variant']:,} outcomes per variant detect a {power['mde']:.0%} lift "
            f"with {power['power']:.0%} power ({power['method']}); "
            f"{(power['more_requests_per_variant'] or 0):,} more requests per variant needed."
        )
    if len(report["versions"]) > 1:
        console.print(_versions_table(report))
    for warning in report["warnings"]:
        console.print(f"[yellow]warning:[/] {warning}")
