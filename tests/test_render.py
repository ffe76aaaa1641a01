"""Tests for balancer.render: text, JSON, and the HTML page in headless Chromium."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from balancer.config import AnalysisSettings
from balancer.render import format_interval, format_p, format_percent, render_html, render_json, render_text
from balancer.report import build_report
from balancer.report_synthetic import write_synthetic_store

CHROMIUM = "/usr/bin/chromium"
PLOT_IDS = ("plot-cumulative-lift", "plot-latency", "plot-traffic")


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    path = tmp_path_factory.mktemp("render") / "outcomes.db"
    write_synthetic_store(path, requests=30_000, conversion={"model_a": 0.10, "model_b": 0.125},
                          latency_median_ms={"model_a": 40.0, "model_b": 46.0})
    return build_report(path)


@pytest.fixture(scope="module")
def empty_report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    path = tmp_path_factory.mktemp("render-empty") / "outcomes.db"
    write_synthetic_store(path, requests=50, feedback_rate=0.0)
    return build_report(path, settings=AnalysisSettings(sequential=False))


def test_formatters() -> None:
    assert format_percent(0.01234) == "1.23%" and format_percent(-0.5, signed=True) == "-50.00%"
    assert format_percent(None) == "-" and format_interval(None) == "-"
    assert format_interval([0.01, 0.02], percent=True) == "[+1.00%, +2.00%]"
    assert format_p(1e-9) == "<0.0001" and format_p(0.0312) == "0.0312"


def test_json_round_trips_without_nan(report: dict[str, Any], empty_report: dict[str, Any]) -> None:
    for item in (report, empty_report):
        text = render_json(item)
        assert "NaN" not in text and "Infinity" not in text
        assert json.loads(text) == item


def test_text_shows_verdict_and_tables(report: dict[str, Any]) -> None:
    buffer = io.StringIO()
    render_text(report, Console(file=buffer, width=140, no_color=True))
    text = buffer.getvalue()
    assert report["verdict"]["headline"][:40] in text.replace("\n", " ")
    for heading in ("Variants", "Outcome vs control", "Guardrails", "Latency vs control", "Sample ratio"):
        assert heading in text


def test_text_handles_a_report_without_outcomes(empty_report: dict[str, Any]) -> None:
    buffer = io.StringIO()
    render_text(empty_report, Console(file=buffer, width=140, no_color=True))
    assert "Not enough data" in buffer.getvalue()


def test_html_is_self_contained(report: dict[str, Any]) -> None:
    page = render_html(report)
    assert page.startswith("<!DOCTYPE html>")
    for plot_id in PLOT_IDS:
        assert f'id="{plot_id}"' in page
    assert "<script" not in page.lower()
    external = re.findall(r'(?:src|href)\s*=\s*["\']?(?:https?:)?//', page, flags=re.IGNORECASE)
    assert external == []
    assert "@import" not in page and "url(" not in page


def test_html_escapes_names(report: dict[str, Any]) -> None:
    hostile = json.loads(json.dumps(report))
    hostile["experiment"] = "<script>alert(1)</script>"
    hostile["warnings"] = ["<b>&</b>"]
    page = render_html(hostile)
    assert "<script>" not in page and "&lt;script&gt;" in page and "&lt;b&gt;&amp;&lt;/b&gt;" in page


def test_html_plots_draw_data(report: dict[str, Any], empty_report: dict[str, Any]) -> None:
    page = render_html(report)
    assert 'class="band"' in page and 'class="lift"' in page
    assert page.count('class="latency"') == 2 and 'class="traffic"' in page
    empty = render_html(empty_report)
    for plot_id in PLOT_IDS:
        assert f'id="{plot_id}"' in empty
    assert "no lift to show yet" in empty


def _chromium() -> str:
    if os.path.exists(CHROMIUM):
        return CHROMIUM
    found = shutil.which("chromium")
    if found:
        return found
    if os.environ.get("REQUIRE_CHROMIUM"):
        pytest.fail(f"REQUIRE_CHROMIUM is set but {CHROMIUM} is missing (apt-get install -y chromium)")
    pytest.skip(f"{CHROMIUM} is not installed (apt-get install -y chromium); set REQUIRE_CHROMIUM=1 to fail instead")


def _run_chromium(page: Path, profile: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    command = [
        _chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0", *extra, page.as_uri(),
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=90, check=False)


def test_html_renders_in_headless_chromium(report: dict[str, Any], tmp_path: Path) -> None:
    page = tmp_path / "report.html"
    page.write_text(render_html(report), encoding="utf-8")
    result = _run_chromium(page, tmp_path / "profile", "--dump-dom")
    assert result.returncode == 0, result.stderr[-2000:]
    dom = result.stdout
    for plot_id in PLOT_IDS:
        assert re.search(rf'<svg[^>]*id="{plot_id}"', dom), plot_id
    assert 'id="verdict"' in dom and "model_b" in dom
    console_errors = [line for line in result.stderr.splitlines()
                      if "Uncaught" in line or ("CONSOLE" in line and "error" in line.lower())]
    assert console_errors == []


def test_html_screenshot_is_not_blank(report: dict[str, Any], tmp_path: Path) -> None:
    page = tmp_path / "report.html"
    page.write_text(render_html(report), encoding="utf-8")
    shot = tmp_path / "report.png"
    result = _run_chromium(page, tmp_path / "profile", f"--screenshot={shot}", "--window-size=1100,2600",
                           "--hide-scrollbars")
    assert result.returncode == 0, result.stderr[-2000:]
    data = shot.read_bytes()
    assert data.startswith(b"\x89PNG") and len(data) > 20_000
