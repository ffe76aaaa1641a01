"""The admin port: metrics, health, the active experiment, reload, lifecycle, upstreams and the live report.

`/healthz` and `/metrics` are open (probes and scrapers); everything under `/admin`
and `/report` requires `Authorization: Bearer <token>` when a token is configured,
and one must be configured when the admin port listens beyond loopback.

With worker processes (balancer/supervisor.py) the supervisor serves this port, gathering
metrics, health and upstream counters from its workers; each worker answers its supervisor
on a Unix socket of its own (`build_worker_app`).
"""

from __future__ import annotations

import asyncio
import gc
import hmac
import logging
import os
import re
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.aiohttp import make_aiohttp_handler

from balancer import native
from balancer.config import ConfigError, parse_experiment
from balancer.events import EventLog
from balancer.runtime import Runtime
from balancer.upstreams import UpstreamRegistry

if TYPE_CHECKING:
    from balancer.supervisor import Workers

logger = logging.getLogger(__name__)

_TOP_LEVEL_KEY = "^{key}:[^\\n]*$"
_PROTECTED_PREFIXES = ("/admin", "/report")

RUNTIME_KEY = web.AppKey("runtime", Runtime)
REGISTRY_KEY = web.AppKey("registry", UpstreamRegistry)
EVENTS_KEY = web.AppKey("events", EventLog)
TOKEN_KEY = web.AppKey("token", str)
WORKERS_KEY = web.AppKey("workers", object)  # the supervisor's Workers, or None in a single process


def json_error(status: int, message: str) -> web.Response:
    """The one way the admin port reports an error: JSON naming what is wrong."""
    return web.json_response({"error": message}, status=status)


def build_admin_app(runtime: Runtime, registry: UpstreamRegistry, events: EventLog, *, token: str | None,
                    workers: Workers | None = None) -> web.Application:
    """The admin aiohttp application; `workers`: the supervisor's, whose answers it gathers."""
    app = web.Application(middlewares=[_require_token])
    app[RUNTIME_KEY] = runtime
    app[REGISTRY_KEY] = registry
    app[EVENTS_KEY] = events
    app[TOKEN_KEY] = token or ""
    app[WORKERS_KEY] = workers
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", make_aiohttp_handler(runtime.metrics.registry) if workers is None else merged_metrics)
    app.router.add_get("/admin/experiment", experiment)
    app.router.add_post("/admin/reload", reload)
    app.router.add_post("/admin/status", set_status)
    app.router.add_get("/admin/upstreams", upstreams)
    app.router.add_get("/report", report_html)
    app.router.add_get("/report.json", report_json)
    return app


def build_worker_app(runtime: Runtime, registry: UpstreamRegistry, events: EventLog) -> web.Application:
    """What a worker answers its supervisor on its Unix socket: health, metrics, upstreams, config, flush."""
    app = web.Application()
    app[RUNTIME_KEY] = runtime
    app[REGISTRY_KEY] = registry
    app[EVENTS_KEY] = events
    app[TOKEN_KEY] = ""
    app[WORKERS_KEY] = None
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", make_aiohttp_handler(runtime.metrics.registry))
    app.router.add_get("/admin/upstreams", upstreams)
    app.router.add_post("/internal/apply", apply_pushed)
    app.router.add_post("/internal/flush", flush_log)
    return app


def _workers(request: web.Request) -> Workers | None:
    return request.app[WORKERS_KEY]  # type: ignore[return-value]


@web.middleware
async def _require_token(request: web.Request, handler: Any) -> web.StreamResponse:
    token = request.app[TOKEN_KEY]
    if token and request.path.startswith(_PROTECTED_PREFIXES):
        sent = request.headers.get("Authorization", "")
        if not hmac.compare_digest(sent.encode(), f"Bearer {token}".encode()):
            return json_error(401, "admin endpoints need 'Authorization: Bearer <token>'")
    return await handler(request)


async def healthz(request: web.Request) -> web.Response:
    """Alive, with the active version, the outcome log's state, and how the request path runs."""
    runtime = request.app[RUNTIME_KEY]
    events = request.app[EVENTS_KEY]
    assert runtime.active is not None
    loop_module = type(asyncio.get_running_loop()).__module__
    workers = _workers(request)
    if workers is not None:
        states = await workers.health()
        ready = sum(state["ready"] and state["health"] is not None for state in states)
        current = sum(state["health"] is not None and state["health"]["version"] == runtime.active.version
                      for state in states)
        return web.json_response({
            "status": "ok" if ready == current == len(states) else "degraded", "version": runtime.active.version,
            "workers": states, "store_error": events.last_error, "niceness": os.getpriority(os.PRIO_PROCESS, 0),
        }, status=200 if ready else 503)
    return web.json_response({
        "status": "ok", "version": runtime.active.version, "pending_records": events.pending,
        "rejected_records": events.rejected_records, "store_writer_restarts": events.writer_restarts,
        "store_writer_priority": events.running_priority, "store_writer_escalations": events.writer_escalations,
        "store_error": events.last_error,
        "event_loop": "uvloop" if loop_module.startswith("uvloop") else "asyncio", "request_path": native.MODE,
        "gc_frozen_objects": gc.get_freeze_count(),  # start-up objects full collections skip (app.py)
        "niceness": os.getpriority(os.PRIO_PROCESS, 0),  # the event loop's thread's (server.priority)
    })


async def experiment(request: web.Request) -> web.Response:
    """The active config, its version, hash and the last reload error."""
    return web.json_response(request.app[RUNTIME_KEY].describe())


async def reload(request: web.Request) -> web.Response:
    """Re-read the config file now."""
    applied, message = await request.app[RUNTIME_KEY].reload("POST /admin/reload")
    runtime = request.app[RUNTIME_KEY]
    body = {"applied": applied, "message": message, "version": runtime.active.version if runtime.active else None}
    return web.json_response(body, status=200 if applied else 422)


async def set_status(request: web.Request) -> web.Response:
    """POST {"status": "running|paused|stopped", "winner": NAME}: edit the YAML file and apply it."""
    runtime = request.app[RUNTIME_KEY]
    try:
        document = await request.json()
    except ValueError:
        return json_error(400, "body is not valid JSON")
    if not isinstance(document, dict) or document.get("status") not in ("running", "paused", "stopped"):
        return json_error(400, "field 'status' must be one of 'running', 'paused', 'stopped'")
    winner = document.get("winner")
    if winner is not None and not isinstance(winner, str):
        return json_error(400, "field 'winner' must be a variant name")
    path = runtime.config_path
    body = await asyncio.to_thread(path.read_text, encoding="utf-8")
    updated = set_top_level_keys(body, {"status": document["status"], "winner": winner})
    try:
        parse_experiment(updated, source=str(path))
    except ConfigError as exc:
        return json_error(400, str(exc))
    await asyncio.to_thread(write_atomically, path, updated)
    applied, message = await runtime.reload("POST /admin/status")
    return web.json_response({"applied": applied, "message": message, "experiment": runtime.describe()},
                             status=200 if applied else 422)


async def upstreams(request: web.Request) -> web.Response:
    """Every endpoint of every variant with its counters and health (summed over the workers, if any)."""
    workers = _workers(request)
    if workers is not None:
        from balancer.supervisor import merge_upstreams

        return web.json_response(merge_upstreams(await workers.upstreams()))
    return web.json_response(request.app[REGISTRY_KEY].describe())


async def merged_metrics(request: web.Request) -> web.Response:
    """The supervisor's /metrics: its own and every worker's, summed (balancer.supervisor.merge_expositions)."""
    from balancer.supervisor import merge_expositions

    workers = _workers(request)
    assert workers is not None
    own = generate_latest(request.app[RUNTIME_KEY].metrics.registry).decode()
    body = merge_expositions([own, *await workers.metrics_texts()])
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def apply_pushed(request: web.Request) -> web.Response:
    """A worker's POST /internal/apply {"version": N, "body": "<YAML>"}: the supervisor's config, as numbered."""
    document = await request.json()
    applied, message = await request.app[RUNTIME_KEY].adopt(str(document["body"]), int(document["version"]))
    return web.json_response({"applied": applied, "message": message})


async def flush_log(request: web.Request) -> web.Response:
    """A worker's POST /internal/flush: commit everything logged so far."""
    events = request.app[EVENTS_KEY]
    await asyncio.to_thread(events.flush)
    return web.json_response({"pending_records": events.pending})


async def _build_report(request: web.Request) -> dict[str, Any] | web.Response:
    """The report of the active experiment, or a JSON error when there is nothing to report yet."""
    from balancer.report import ReportError, build_report  # imported lazily: scipy and statsmodels are heavy

    events = request.app[EVENTS_KEY]
    runtime = request.app[RUNTIME_KEY]
    assert runtime.active is not None
    await asyncio.to_thread(events.flush)
    workers = _workers(request)
    if workers is not None:
        await workers.flush()
    try:
        return await asyncio.to_thread(build_report, events.path, experiment=runtime.active.experiment.name)
    except ReportError as exc:
        return json_error(404, str(exc))


async def report_json(request: web.Request) -> web.Response:
    """The comparison report as JSON, computed from the store now."""
    from balancer.render import render_json

    report = await _build_report(request)
    if isinstance(report, web.Response):
        return report
    return web.Response(text=render_json(report), content_type="application/json")


async def report_html(request: web.Request) -> web.Response:
    """The comparison report as a self-contained HTML page."""
    from balancer.render import render_html

    report = await _build_report(request)
    if isinstance(report, web.Response):
        return report
    return web.Response(text=render_html(report), content_type="text/html")


def set_top_level_keys(body: str, values: dict[str, str | None]) -> str:
    """Set (or remove, for None) top-level `key: value` lines in YAML text, keeping everything else."""
    for key, value in values.items():
        pattern = re.compile(_TOP_LEVEL_KEY.format(key=re.escape(key)), re.MULTILINE)
        line = f"{key}: {value}" if value is not None else ""
        if pattern.search(body):
            body = pattern.sub(line, body, count=1)
        elif value is not None:
            body = body.rstrip("\n") + f"\n{line}\n"
    return body


def write_atomically(path: Path, text: str) -> None:
    """Replace a file's content so a reader never sees half of it."""
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
