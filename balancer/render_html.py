"""The report as one self-contained HTML page: inline CSS and inline SVG plots, no scripts, no external files.

Plots carry stable ids for tests and links: `plot-cumulative-lift` (lift over time with its
interval band), `plot-latency` (latency distribution per variant), `plot-traffic` (traffic
split over time).
"""

from __future__ import annotations

import html
import math
from collections.abc import Callable
from typing import Any, Final

from balancer.render import format_interval, format_number, format_p, format_percent

PALETTE: Final = ("#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3", "#8c8c8c")
_WIDTH: Final = 760
_HEIGHT: Final = 300
_MARGIN: Final = {"left": 64, "right": 150, "top": 20, "bottom": 44}
_VERDICT_COLORS: Final = {
    "winner": "#1b7f3b", "control_wins": "#9a6b00", "no_difference": "#1f5f8b",
    "insufficient_data": "#7a6a00", "srm": "#b00020", "no_data": "#666666",
}
_CSS: Final = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:24px auto;max-width:1000px;color:#222;
background:#fff;padding:0 16px}
h1{font-size:1.5em;margin-bottom:4px}h2{font-size:1.15em;margin-top:28px;border-bottom:1px solid #ddd;padding-bottom:4px}
.meta{color:#555;font-size:.9em}.verdict{padding:14px 18px;border-radius:6px;color:#fff;font-size:1.1em;margin:16px 0}
.verdict ul{margin:8px 0 0 0;font-size:.85em}table{border-collapse:collapse;font-size:.85em;margin:8px 0}
th,td{border-bottom:1px solid #e4e4e4;padding:4px 8px;text-align:right}th{background:#f5f5f5}
td:first-child,th:first-child{text-align:left}.pass{color:#1b7f3b}.fail{color:#b00020;font-weight:bold}
.inconclusive{color:#9a6b00}.warn{background:#fff6d5;border-left:4px solid #e0b000;padding:6px 10px;margin:4px 0}
svg{background:#fff;border:1px solid #eee}svg text{font-size:11px;fill:#333}.caption{color:#555;font-size:.85em}
"""

Scale = Callable[[float], float]


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _escaped_p(value: float | None) -> str:
    return _e(format_p(value))


def _linear(domain: tuple[float, float], pixels: tuple[float, float]) -> Scale:
    low, high = domain
    if high == low:
        high = low + 1.0
    return lambda value: pixels[0] + (value - low) / (high - low) * (pixels[1] - pixels[0])


def _ticks(low: float, high: float, count: int = 5) -> list[float]:
    """Round-numbered ticks covering [low, high]."""
    if not (math.isfinite(low) and math.isfinite(high)) or high <= low:
        return [low]
    raw = (high - low) / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = min((m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw), default=raw)
    first = math.ceil(low / step) * step
    return [first + i * step for i in range(int((high - first) / step) + 1)]


def _frame(plot_id: str, title: str, body: list[str]) -> str:
    return (
        f'<svg id="{plot_id}" xmlns="http://www.w3.org/2000/svg" width="{_WIDTH}" height="{_HEIGHT}" '
        f'viewBox="0 0 {_WIDTH} {_HEIGHT}" role="img" aria-label="{_e(title)}"><title>{_e(title)}</title>'
        + "".join(body) + "</svg>"
    )


def _axes(x: Scale, y: Scale, x_ticks: list[tuple[float, str]], y_ticks: list[tuple[float, str]],
          y_label: str) -> list[str]:
    left, bottom = _MARGIN["left"], _HEIGHT - _MARGIN["bottom"]
    right, top = _WIDTH - _MARGIN["right"], _MARGIN["top"]
    parts = [f'<line x1="{left}" y1="{bottom}" x2="{right}" y2="{bottom}" stroke="#888"/>',
             f'<line x1="{left}" y1="{top}" x2="{left}" y2="{bottom}" stroke="#888"/>']
    for value, label in x_ticks:
        px = x(value)
        parts.append(f'<line x1="{px:.1f}" y1="{bottom}" x2="{px:.1f}" y2="{bottom + 4}" stroke="#888"/>'
                     f'<text x="{px:.1f}" y="{bottom + 16}" text-anchor="middle">{_e(label)}</text>')
    for value, label in y_ticks:
        py = y(value)
        parts.append(f'<line x1="{left}" y1="{py:.1f}" x2="{right}" y2="{py:.1f}" stroke="#f0f0f0"/>'
                     f'<text x="{left - 6}" y="{py + 4:.1f}" text-anchor="end">{_e(label)}</text>')
    parts.append(f'<text x="14" y="{(top + bottom) / 2:.0f}" text-anchor="middle" '
                 f'transform="rotate(-90 14 {(top + bottom) / 2:.0f})">{_e(y_label)}</text>')
    return parts


def _legend(names: list[str], colors: list[int] | None = None) -> list[str]:
    x = _WIDTH - _MARGIN["right"] + 14
    colors = colors or list(range(len(names)))
    return [
        f'<rect x="{x}" y="{_MARGIN["top"] + 18 * i}" width="12" height="12" '
        f'fill="{PALETTE[colors[i] % len(PALETTE)]}"/>'
        f'<text x="{x + 18}" y="{_MARGIN["top"] + 18 * i + 10}">{_e(name)}</text>'
        for i, name in enumerate(names)
    ]


def _time_ticks(ts: list[float], x: Scale) -> list[tuple[float, str]]:
    from datetime import UTC, datetime

    if not ts:
        return []
    span = ts[-1] - ts[0]
    fmt = "%H:%M:%S" if span < 600 else "%H:%M" if span < 2 * 86_400 else "%m-%d"  # ticks must differ
    picks = [ts[round(i * (len(ts) - 1) / 4)] for i in range(5)]
    return [(t, datetime.fromtimestamp(t, tz=UTC).strftime(fmt)) for t in picks]


def _empty_plot(plot_id: str, title: str, message: str) -> str:
    return _frame(plot_id, title, [f'<text x="{_WIDTH / 2}" y="{_HEIGHT / 2}" text-anchor="middle">{_e(message)}</text>'])


def _lift_plot(report: dict[str, Any]) -> str:
    title = "Cumulative lift over time"
    timeline = report.get("timeline") or {}
    series = timeline.get("lift") or {}
    ts = timeline.get("ts") or []
    values = [v for s in series.values() for v in s["estimate"] if v is not None]
    if not values or not ts:
        return _empty_plot("plot-cumulative-lift", title, "no lift to show yet (too few outcomes per variant)")
    # Scale to the estimates and the later half of the bands, so early wide bands do not flatten the plot.
    for data in series.values():
        valid = [i for i, e in enumerate(data["estimate"]) if e is not None]
        for i in valid[len(valid) // 2:]:
            values += [v for v in (data["low"][i], data["high"][i]) if v is not None]
    low, high = min(min(values), 0.0), max(max(values), 0.0)
    pad = (high - low) * 0.05 or 0.01
    x = _linear((ts[0], ts[-1]), (_MARGIN["left"], _WIDTH - _MARGIN["right"]))
    y_clamped = _linear((low - pad, high + pad), (_HEIGHT - _MARGIN["bottom"], _MARGIN["top"]))

    def y(value: float) -> float:
        return y_clamped(min(max(value, low - pad), high + pad))

    parts = _axes(x, y, _time_ticks(ts, x), [(t, f"{t * 100:+.0f}%" if abs(high - low) > 0.05 else f"{t * 100:+.1f}%")
                                              for t in _ticks(low - pad, high + pad)], "lift vs control")
    parts.append(f'<line x1="{_MARGIN["left"]}" y1="{y(0):.1f}" x2="{_WIDTH - _MARGIN["right"]}" y2="{y(0):.1f}" '
                 'stroke="#333" stroke-dasharray="4 3"/>')
    names = [v["name"] for v in report["variants"]]
    for name, data in series.items():
        color = PALETTE[names.index(name) % len(PALETTE)] if name in names else PALETTE[0]
        points = [(t, e, lo, hi) for t, e, lo, hi in zip(ts, data["estimate"], data["low"], data["high"], strict=True)
                  if None not in (e, lo, hi)]
        if not points:
            continue
        band = [f"{x(t):.1f},{y(hi):.1f}" for t, _, _, hi in points]
        band += [f"{x(t):.1f},{y(lo):.1f}" for t, _, lo, _ in reversed(points)]
        parts.append(f'<polygon class="band" points="{" ".join(band)}" fill="{color}" fill-opacity="0.18"/>')
        line = " ".join(f"{x(t):.1f},{y(e):.1f}" for t, e, _, _ in points)
        parts.append(f'<polyline class="lift" points="{line}" fill="none" stroke="{color}" stroke-width="2"/>')
    parts += _legend(list(series), [names.index(name) if name in names else 0 for name in series])
    return _frame("plot-cumulative-lift", title, parts)


def _latency_plot(report: dict[str, Any]) -> str:
    title = "Latency distribution per variant"
    histogram = report["latency"]["histogram"]
    edges = histogram.get("edges_ms") or []
    if len(edges) < 2:
        return _empty_plot("plot-latency", title, "no latency data yet")
    fractions = histogram["fractions"]
    top = max((f for series in fractions.values() for f in series), default=0.0) or 1.0
    log_edges = [math.log10(edge) for edge in edges]
    x = _linear((log_edges[0], log_edges[-1]), (_MARGIN["left"], _WIDTH - _MARGIN["right"]))
    y = _linear((0.0, top * 1.05), (_HEIGHT - _MARGIN["bottom"], _MARGIN["top"]))
    x_ticks = [(math.log10(v), f"{v:g}") for v in (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000)
               if edges[0] <= v <= edges[-1]] or [(log_edges[0], f"{edges[0]:.3g}"), (log_edges[-1], f"{edges[-1]:.3g}")]
    parts = _axes(x, y, x_ticks, [(t, f"{t * 100:.0f}%") for t in _ticks(0.0, top * 1.05)], "share of requests")
    names = [v["name"] for v in report["variants"]]
    for index, name in enumerate(names):
        series = fractions.get(name) or []
        if not series:
            continue
        points = [f"{x(log_edges[0]):.1f},{y(0):.1f}"]
        for i, fraction in enumerate(series):
            points += [f"{x(log_edges[i]):.1f},{y(fraction):.1f}", f"{x(log_edges[i + 1]):.1f},{y(fraction):.1f}"]
        points.append(f"{x(log_edges[-1]):.1f},{y(0):.1f}")
        color = PALETTE[index % len(PALETTE)]
        parts.append(f'<polyline class="latency" points="{" ".join(points)}" fill="{color}" fill-opacity="0.12" '
                     f'stroke="{color}" stroke-width="1.5"/>')
    parts.append(f'<text x="{(_MARGIN["left"] + _WIDTH - _MARGIN["right"]) / 2}" y="{_HEIGHT - 8}" '
                 'text-anchor="middle">latency (ms, log scale)</text>')
    parts += _legend(names)
    return _frame("plot-latency", title, parts)


def _traffic_plot(report: dict[str, Any]) -> str:
    title = "Traffic split over time"
    timeline = report.get("timeline") or {}
    ts, traffic = timeline.get("ts") or [], timeline.get("traffic") or {}
    names = [v["name"] for v in report["variants"]]
    totals = [sum(traffic.get(name, [0] * len(ts))[i] for name in names) for i in range(len(ts))]
    if not ts or not any(totals):
        return _empty_plot("plot-traffic", title, "no traffic yet")
    step = (ts[-1] - ts[0]) / max(len(ts) - 1, 1) if len(ts) > 1 else 1.0
    x = _linear((ts[0] - step, ts[-1]), (_MARGIN["left"], _WIDTH - _MARGIN["right"]))
    y = _linear((0.0, 1.0), (_HEIGHT - _MARGIN["bottom"], _MARGIN["top"]))
    parts = _axes(x, y, _time_ticks(ts, x), [(t, f"{t * 100:.0f}%") for t in (0, 0.25, 0.5, 0.75, 1.0)],
                  "share of requests")
    for i, (t, total) in enumerate(zip(ts, totals, strict=True)):
        if not total:
            continue
        bottom = 0.0
        for index, name in enumerate(names):
            share = traffic.get(name, [0] * len(ts))[i] / total
            if share <= 0:
                continue
            parts.append(
                f'<rect class="traffic" x="{x(t - step):.1f}" y="{y(bottom + share):.1f}" '
                f'width="{max(x(t) - x(t - step) - 1, 1):.1f}" height="{y(bottom) - y(bottom + share):.1f}" '
                f'fill="{PALETTE[index % len(PALETTE)]}"><title>{_e(name)}: {share * 100:.1f}%</title></rect>'
            )
            bottom += share
    expected_share = timeline.get("expected_share") or {}
    cumulative = [0.0] * len(ts)
    for name in names[:-1]:
        shares = expected_share.get(name) or []
        points = []
        for i, (t, share) in enumerate(zip(ts, shares, strict=False)):
            if share is None:
                continue
            cumulative[i] += share
            points += [f"{x(t - step):.1f},{y(cumulative[i]):.1f}", f"{x(t):.1f},{y(cumulative[i]):.1f}"]
        if points:
            parts.append(f'<polyline class="expected" points="{" ".join(points)}" fill="none" stroke="#000" '
                         'stroke-dasharray="5 4" stroke-opacity="0.7"/>')
    parts += _legend(names)
    return _frame("plot-traffic", title, parts)


def _table(headers: list[str], rows: list[list[str]], table_id: str) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>" for row in rows)
    return f'<table id="{table_id}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _variant_rows(report: dict[str, Any]) -> list[list[str]]:
    return [[
        _e(v["name"]) + (" <em>(control)</em>" if v["is_control"] else ""), f"{v['requests']:,}",
        f"{v['analyzed_requests']:,}", f"{format_percent(v['observed_share'])} ({format_percent(v['expected_share'])})",
        f"{v['excluded']['fallback']:,}", format_percent(v["error_rate"]),
        " / ".join(format_number(v["latency_ms"][k], 3) for k in ("p50", "p95", "p99")),
        f"{v['feedback']['count']:,} ({format_percent(v['feedback']['coverage'])})",
        f"{format_number(v['outcome']['mean'])} {format_interval(v['outcome']['ci'])}",
    ] for v in report["variants"]]


def _comparison_rows(report: dict[str, Any]) -> list[list[str]]:
    return [[
        _e(r["variant"]), format_percent(r["lift"], signed=True), format_interval(r["lift_ci"], percent=True), format_interval(r["difference_ci"]),
        _escaped_p(r["p_value_adjusted"]), format_percent(r["bayes"]["probability_beats_control"]),
        format_number(r["bayes"]["expected_loss_treatment"], 3),
        ("<strong>yes</strong>" if r["significant"] else "no"),
    ] for r in report["comparisons"]]


def _guardrail_rows(report: dict[str, Any]) -> list[list[str]]:
    rows = []
    for g in report["guardrails"]:
        show = (lambda v: format_percent(v, signed=True)) if g["unit"] == "proportion" else (lambda v: format_number(v, 3))
        rows.append([_e(g["variant"]), _e(g["metric"]), show(g["difference"]), show(g["upper_bound"]),
                     show(g["margin"]), f'<span class="{_e(g["status"])}">{_e(g["status"])}</span>'])
    return rows


def _latency_rows(report: dict[str, Any]) -> list[list[str]]:
    return [[_e(r["variant"])] + [
        f"{r['percentiles'][k]['difference']:+.3g} {format_interval(r['percentiles'][k]['ci'])}" for k in ("p50", "p95", "p99")
    ] + [f"{r['hodges_lehmann']['shift']:+.3g} {format_interval(r['hodges_lehmann']['ci'])}",
         _escaped_p(r["mann_whitney"]["p_value"])] for r in report["latency"]["comparisons"]]


def _version_rows(report: dict[str, Any]) -> list[list[str]]:
    rows = []
    for v in report["versions"]:
        srm = v["srm"]
        srm_cell = "-" if srm is None else (f'<span class="fail">{_escaped_p(srm["p_value"])}</span>' if srm["flagged"]
                                            else _escaped_p(srm["p_value"]))
        lifts = ", ".join(f"{_e(c['variant'])} {format_percent(c['lift'], signed=True)} (p {_escaped_p(c['p_value'])})"
                          for c in v["comparisons"])
        rows.append([str(v["version"]), _e(v["applied_at"] or "-"), _e(v["status"]),
                     _e(", ".join(f"{k}={w:g}" for k, w in v["weights"].items()) or "-"),
                     f"{v['analyzed_requests']:,}", srm_cell, lifts or "-"])
    return rows


def html_page(report: dict[str, Any]) -> str:
    """One self-contained HTML page: verdict, tables and three inline SVG plots."""
    verdict = report["verdict"]
    color = _VERDICT_COLORS["control_wins"] if verdict["guardrail_failures"] else _VERDICT_COLORS.get(
        verdict["status"], "#444")
    details = "".join(f"<li>{_e(d)}</li>" for d in verdict["details"])
    srm = report["srm"]
    interval = (report.get("timeline") or {}).get("interval", "interval")
    sections = [
        f"<h1>Experiment {_e(report['experiment'])}</h1>",
        f'<p class="meta">control <strong>{_e(report["control"])}</strong> · mode {_e(report["mode"])} · outcome '
        f'{_e(report["outcome_type"] or "none yet")} · {_e(report["period"]["start"] or "")} → '
        f'{_e(report["period"]["end"] or "")} · generated {_e(report["generated_at"])}</p>',
        f'<div id="verdict" class="verdict" style="background:{color}" data-status="{_e(verdict["status"])}">'
        f'{_e(verdict["headline"])}' + (f"<ul>{details}</ul>" if details else "") + "</div>",
        "<h2>Variants</h2>",
        _table(["variant", "requests", "analyzed", "share (expected)", "fallback", "errors", "p50 / p95 / p99 ms",
                "feedback", "outcome mean [95% CI]"], _variant_rows(report), "table-variants"),
        "<h2>Outcome vs control</h2>",
        _table(["variant", "lift", "lift interval", "difference interval", "p (Holm)", "P(beats control)",
                "expected loss", "significant"], _comparison_rows(report), "table-comparisons"),
        _lift_plot(report),
        f'<p class="caption">Cumulative relative lift with its {_e(interval)} band '
        f'({"valid at every look" if report["mode"] == "sequential" else "valid only at the planned sample size"}).</p>',
        "<h2>Guardrails</h2>",
        _table(["variant", "metric", "difference", "worst case", "margin", "status"], _guardrail_rows(report),
               "table-guardrails"),
        "<h2>Latency</h2>",
        _table(["variant", "p50 diff", "p95 diff", "p99 diff", "Hodges-Lehmann shift", "Mann-Whitney p"],
               _latency_rows(report), "table-latency"),
        _latency_plot(report),
        "<h2>Traffic</h2>",
        f"<p>Sample ratio: {'<strong class=fail>MISMATCH</strong>' if srm['flagged'] else 'ok'} "
        f"(chi-square p = {_escaped_p(srm['p_value'])}, {srm['units_total']:,} units; "
        f"feedback coverage {format_percent(report['feedback']['coverage'])})</p>",
        _traffic_plot(report),
        '<p class="caption">Share of analyzed requests per time bucket; dashed lines: configured split.</p>',
        "<h2>Config versions</h2>",
        _table(["version", "applied", "status", "weights", "analyzed", "SRM p", "lift by variant"],
               _version_rows(report), "table-versions"),
    ]
    sections += [f'<div class="warn">{_e(w)}</div>' for w in report["warnings"]]
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>A/B report: {_e(report['experiment'])}</title><style>{_CSS}</style></head><body>"
        + "\n".join(sections) + "</body></html>\n"
    )
