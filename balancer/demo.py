"""`make demo`: start both model servers and the balancer, drive traffic with feedback, show the report.

Everything runs as local processes on loopback with `experiments/default.yaml`; every
process is stopped on the way out, also on Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import ExitStack
from pathlib import Path

from balancer.config import load_experiment
from balancer.loadgen import default_holdout_path, load_holdout, print_summary, run_load
from balancer.render import render_html, render_text, report_console

CONFIG = Path("experiments/default.yaml")


def _wait_ready(url: str, process: subprocess.Popen[bytes], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args!r} exited with {process.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.1)
    raise TimeoutError(f"{url} not ready after {timeout:g}s")


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def demo_command(args: argparse.Namespace) -> int:
    """Run the whole loop once and print the report; Ctrl-C stops every process and exits 130."""
    try:
        return _run_demo(args)
    except KeyboardInterrupt:
        report_console().print("[yellow]interrupted: every process is stopped[/yellow]")
        return 130


def _run_demo(args: argparse.Namespace) -> int:
    console = report_console()
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    store = workdir / "outcomes.db"
    for stale in (store, Path(f"{store}-wal"), Path(f"{store}-shm")):
        stale.unlink(missing_ok=True)
    experiment = load_experiment(CONFIG).experiment
    server = experiment.server
    artifacts = os.environ.get("MODEL_ARTIFACTS_DIR", "artifacts")
    rows, labels = load_holdout(default_holdout_path())

    with ExitStack() as stack:
        def start(name: str, command: list[str], ready_url: str) -> None:
            log = open(workdir / f"{name}.log", "wb")  # noqa: SIM115 - closed by the exit stack
            stack.callback(log.close)
            process = subprocess.Popen([sys.executable, *command], stdout=log, stderr=subprocess.STDOUT)
            stack.callback(_stop, process)
            _wait_ready(ready_url, process)
            console.print(f"[green]started[/green] {name} (pid {process.pid}), log {workdir / f'{name}.log'}")

        for variant in experiment.variants:
            port = variant.upstreams[0].rsplit(":", 1)[1]
            start(variant.name, ["-m", variant.name, "--port", port, "--artifacts", artifacts],
                  f"{variant.upstreams[0]}/readyz")
        start("balancer", ["-m", "balancer", "serve", "--config", str(CONFIG), "--store", str(store)],
              f"http://{server.admin_host}:{server.admin_port}/healthz")

        url = f"http://{server.host}:{server.port}"
        console.print(f"[bold]driving {args.requests} requests from {args.users} users through {url} (with feedback)[/bold]")
        result = asyncio.run(run_load(
            url, requests=args.requests, concurrency=args.concurrency, users=args.users,
            rows=rows, labels=labels, feedback=True, duration_s=600,
        ))
        print_summary(console, result.summary())
    # all processes stopped: the balancer flushed its log on SIGTERM

    from balancer.report import build_report  # scipy and statsmodels: imported once the traffic is done

    report = build_report(store)
    render_text(report, report_console())
    html = workdir / "report.html"
    html.write_text(render_html(report), encoding="utf-8")
    console.print(f"HTML report: {html.resolve()}")
    return 0 if result.ok else 1
