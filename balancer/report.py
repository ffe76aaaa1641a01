"""The comparison report: read the outcome store, aggregate in SQL, hand the aggregates to the analysis.

This module is the thin shell: SQL and the `report` command. Everything statistical is in
`report_analysis` (pure) and the `stats*` modules; rendering is in `render`.

    >>> report = build_report("var/outcomes.db")  # doctest: +SKIP
    >>> report["verdict"]["headline"]  # doctest: +SKIP
    'No significant difference yet: about 4,200 more requests per variant to detect a 5% lift.'
"""

from __future__ import annotations

import argparse
import json
import logging
import sqlite3
import sys
from pathlib import Path
from typing import Any, Final

import numpy as np
import yaml
from pydantic import ValidationError

from balancer import store
from balancer.config import AnalysisSettings
from balancer.report_analysis import ANALYZED_KINDS, ExperimentData, VersionInfo, analyze

logger = logging.getLogger(__name__)

DEFAULT_STORE: Final = "var/outcomes.db"
FORMATS: Final = ("text", "json", "html")


class ReportError(ValueError):
    """The report cannot be built: the store or the experiment is missing."""


def build_report(
    store_path: str | Path,
    *,
    experiment: str | None = None,
    settings: AnalysisSettings | None = None,
    include_timeline: bool = True,
) -> dict[str, Any]:
    """The comparison report for `experiment` (default: the latest one in the store) as a JSON-ready dict."""
    try:
        connection = store.connect(store_path, read_only=True)
    except FileNotFoundError as exc:
        raise ReportError(str(exc)) from exc
    try:
        name = experiment or _latest_experiment(connection)
        if name is None:
            raise ReportError(f"outcome store {str(store_path)!r} has no experiment yet")
        versions = _load_versions(connection, name)
        chosen = settings or _settings_from_config(versions)
        data = _load_experiment(connection, name, versions, timeline_points=chosen.timeline_points)
    finally:
        connection.close()
    if data is None:
        raise ReportError(f"experiment {name!r} is not in outcome store {str(store_path)!r}")
    return analyze(data, chosen, include_timeline=include_timeline)


def _latest_experiment(connection: sqlite3.Connection) -> str | None:
    row = connection.execute("SELECT experiment FROM configs ORDER BY version DESC LIMIT 1").fetchone()
    if row is None:
        row = connection.execute("SELECT experiment FROM requests ORDER BY ts DESC LIMIT 1").fetchone()
    return None if row is None else str(row[0])


def _load_versions(connection: sqlite3.Connection, experiment: str) -> list[VersionInfo]:
    rows = connection.execute(
        "SELECT version, ts, status, control, weights, body FROM configs WHERE experiment = ? ORDER BY version",
        (experiment,),
    ).fetchall()
    versions = []
    for version, ts, status, control, weights, body in rows:
        try:
            parsed_weights = {str(k): float(v) for k, v in json.loads(weights).items()}
        except (ValueError, AttributeError):
            logger.warning("config version %s: unreadable weights %r", version, weights)
            parsed_weights = {}
        versions.append(VersionInfo(int(version), float(ts), str(status), str(control), parsed_weights, str(body)))
    return versions


def _settings_from_config(versions: list[VersionInfo]) -> AnalysisSettings:
    """The latest config version's `analysis:` section; defaults when absent or invalid."""
    if not versions:
        return AnalysisSettings()
    latest = versions[-1]
    try:
        document = yaml.safe_load(latest.body) or {}
        section = document.get("analysis") if isinstance(document, dict) else None
        return AnalysisSettings.model_validate(section or {})
    except (yaml.YAMLError, ValidationError) as exc:
        logger.warning("config version %d: invalid analysis section, using defaults: %s", latest.version, exc)
        return AnalysisSettings()


# Full scans (NOT INDEXED) beat walking the variant index: that index is not covering,
# and a lookup per row costs more than reading every page once.
_CELLS_SQL: Final = """
SELECT {key} AS cell,
       COUNT(*),
       SUM(r.status >= 500 OR r.error IS NOT NULL),
       COUNT(f.value),
       TOTAL(f.value - :shift),
       TOTAL((f.value - :shift) * (f.value - :shift)),
       TOTAL(f.value NOT IN (0.0, 1.0))
FROM requests AS r NOT INDEXED LEFT JOIN feedback AS f USING (request_id)
WHERE r.experiment = :experiment
GROUP BY cell
"""

# Randomization units per version and variant: a sticky unit counts once, any other request once.
_UNITS_SQL: Final = """
SELECT config_version, variant,
       COUNT(DISTINCT CASE WHEN assignment = 'sticky' THEN unit_id END)
       + SUM(assignment <> 'sticky' OR unit_id IS NULL)
FROM requests NOT INDEXED
WHERE experiment = ? AND assignment IN ({kinds})
GROUP BY 1, 2
"""

_LATENCY_SQL: Final = """
SELECT latency_ms FROM requests NOT INDEXED WHERE experiment = ? AND variant = ? AND assignment IN ({kinds})
"""


def _case(column: str, prefix: str, values: list[Any], parameters: dict[str, Any]) -> str:
    """SQL mapping `column` to the position of its value in `values` (bound parameters, never literals)."""
    branches = []
    for index, value in enumerate(values):
        parameters[f"{prefix}{index}"] = value
        branches.append(f"WHEN :{prefix}{index} THEN {index}")
    return f"(CASE {column} {' '.join(branches)} ELSE 0 END)"


def _load_experiment(
    connection: sqlite3.Connection, experiment: str, versions: list[VersionInfo], *, timeline_points: int
) -> ExperimentData | None:
    start, end = connection.execute(
        "SELECT MIN(ts), MAX(ts) FROM requests NOT INDEXED WHERE experiment = ?", (experiment,)
    ).fetchone()
    if start is None:
        return None if not versions else _empty(experiment, versions, timeline_points)
    pairs = connection.execute(
        "SELECT DISTINCT config_version, variant FROM requests WHERE experiment = ?", (experiment,)
    ).fetchall()
    version_numbers = sorted({int(version) for version, _ in pairs} | {v.version for v in versions})
    variants = _variant_order(versions, {str(variant) for _, variant in pairs})
    shift_row = connection.execute(
        "SELECT AVG(value) FROM (SELECT f.value FROM requests AS r JOIN feedback AS f USING (request_id) "
        "WHERE r.experiment = ? LIMIT 1000)",
        (experiment,),
    ).fetchone()
    shift = float(shift_row[0]) if shift_row and shift_row[0] is not None else 0.0
    width = max((end - start) / timeline_points, 1e-9)
    kinds = list(store.ASSIGNMENT_KINDS)
    shape = (len(version_numbers), len(variants), len(kinds), timeline_points)
    parameters: dict[str, Any] = {
        "start": start, "width": width, "last": timeline_points - 1, "shift": shift, "experiment": experiment
    }
    bucket = "MIN(MAX(CAST((r.ts - :start) / :width AS INTEGER), 0), :last)"
    key = (
        f"((({_case('r.config_version', 'version', version_numbers, parameters)} * {shape[1]}"
        f" + {_case('r.variant', 'variant', variants, parameters)}) * {shape[2]}"
        f" + {_case('r.assignment', 'kind', kinds, parameters)}) * {shape[3]} + {bucket})"
    )
    connection.execute("PRAGMA threads = 2")  # lets the GROUP BY sorter use a helper thread
    cells = np.zeros((6, int(np.prod(shape))))
    for cell, *values in connection.execute(_CELLS_SQL.format(key=key), parameters):
        cells[:, int(cell)] = values
    cells = cells.reshape((6, *shape))
    in_kinds = ", ".join(f"'{kind}'" for kind in ANALYZED_KINDS)
    version_index = {v: i for i, v in enumerate(version_numbers)}
    variant_index = {v: i for i, v in enumerate(variants)}
    units = np.zeros(shape[:2])
    for version, variant, count in connection.execute(_UNITS_SQL.format(kinds=in_kinds), (experiment,)):
        units[version_index[int(version)], variant_index[str(variant)]] = count
    latency_sql = _LATENCY_SQL.format(kinds=in_kinds)
    latencies = {
        variant: np.array(connection.execute(latency_sql, (experiment, variant)).fetchall(), dtype=float).reshape(-1)
        for variant in variants
    }
    return ExperimentData(
        experiment=experiment,
        versions=_complete_versions(versions, version_numbers),
        variants=variants,
        control=versions[-1].control if versions else variants[0],
        bucket_edges=start + width * np.arange(timeline_points + 1),
        requests=cells[0],
        errors=cells[1],
        feedback=cells[2],
        value_sum=cells[3],
        value_sum_squares=cells[4],
        value_shift=shift,
        non_binary_values=int(cells[5].sum()),
        units=units,
        latencies=latencies,
    )


def _variant_order(versions: list[VersionInfo], seen: set[str]) -> list[str]:
    """Control first, then the latest configured order, then variants only the data mentions."""
    ordered: list[str] = []
    if versions:
        ordered.append(versions[-1].control)
        for version in reversed(versions):
            ordered.extend(name for name in version.weights if name not in ordered)
    ordered.extend(sorted(seen - set(ordered)))
    return ordered


def _complete_versions(versions: list[VersionInfo], numbers: list[int]) -> list[VersionInfo]:
    """Versions in `numbers` order; a version seen only in requests gets an unknown (empty) config."""
    known = {v.version: v for v in versions}
    return [known.get(n) or VersionInfo(n, float("nan"), "unknown", "", {}, "") for n in numbers]


def _empty(experiment: str, versions: list[VersionInfo], timeline_points: int) -> ExperimentData:
    variants = _variant_order(versions, set())
    shape = (len(versions), len(variants), len(store.ASSIGNMENT_KINDS), timeline_points)
    zeros = np.zeros(shape)
    return ExperimentData(
        experiment=experiment,
        versions=versions,
        variants=variants,
        control=versions[-1].control,
        bucket_edges=np.full(timeline_points + 1, np.nan),
        requests=zeros,
        errors=zeros,
        feedback=zeros,
        value_sum=zeros,
        value_sum_squares=zeros,
        value_shift=0.0,
        non_binary_values=0,
        units=np.zeros(shape[:2]),
        latencies={variant: np.zeros(0) for variant in variants},
    )


def add_report_arguments(parser: argparse.ArgumentParser) -> None:
    """Add `--store`, `--experiment`, `--format` and `--out` to the `report` sub-command."""
    parser.add_argument("--store", default=DEFAULT_STORE, help=f"outcome store (default {DEFAULT_STORE})")
    parser.add_argument("--experiment", default=None, help="experiment name (default: the latest in the store)")
    parser.add_argument("--format", choices=FORMATS, default="text", help="output format (default text)")
    parser.add_argument("--out", default=None, help="write to this file instead of standard output")


def report_command(args: argparse.Namespace) -> int:
    """Run `balancer report`: 0 on success, 2 when the store or experiment is missing."""
    from rich.console import Console

    from balancer.render import render_html, render_json, render_text, report_console

    error_console = Console(stderr=True, soft_wrap=True)
    try:
        report = build_report(args.store, experiment=args.experiment)
    except ReportError as exc:
        error_console.print(f"[bold red]report:[/] {exc}")
        return 2
    output_format = getattr(args, "format", "text")
    out = getattr(args, "out", None)
    if output_format == "text":
        if out is None:
            render_text(report, report_console())
        else:
            with open(out, "w", encoding="utf-8") as handle:
                render_text(report, Console(file=handle, width=120, no_color=True))
        return 0
    text = render_json(report) if output_format == "json" else render_html(report)
    if out is None:
        sys.stdout.write(text + ("" if text.endswith("\n") else "\n"))
    else:
        Path(out).write_text(text, encoding="utf-8")
        error_console.print(f"report written to {out}")
    return 0
