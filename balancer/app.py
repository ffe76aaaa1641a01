"""Starting and stopping the balancer: wires config, store, upstreams, proxy and admin together.

Stop sequence (SIGTERM or SIGINT): stop accepting, let in-flight requests finish
(bounded by `drain_timeout_s`), flush the outcome log, close connections, exit 0.
SIGHUP reloads the experiment file.

With `server.workers` > 1 the process started is a supervisor (balancer/supervisor.py): it
serves the admin port and owns the config, and worker processes (this same class, started
with `--worker-socket`) serve the public port.
"""

from __future__ import annotations

import asyncio
import gc
import ipaddress
import logging
import os
import signal
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import uvloop
from aiohttp import web

from balancer import native
from balancer.admin import build_admin_app, build_worker_app
from balancer.config import MAX_NICENESS, MAX_WORKERS, MIN_NICENESS, ConfigError, LoadedConfig, ServerSettings, load_experiment
from balancer.events import EventLog
from balancer.http_server import HttpServer
from balancer.metrics import BalancerMetrics
from balancer.proxy import Proxy
from balancer.runtime import Runtime
from balancer.supervisor import WorkerError, Workers, die_with_supervisor, reserve_port
from balancer.upstreams import UpstreamRegistry

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServeOptions:
    """Command-line overrides of the config file's `server:` section (None = keep the file's)."""

    config: Path
    host: str | None = None
    port: int | None = None
    admin_host: str | None = None
    admin_port: int | None = None
    store: str | None = None
    admin_token: str | None = None
    drain_timeout_s: float = 10.0
    event_loop: str = "uvloop"  # or "asyncio" (the standard library's loop); see EVENT_LOOPS
    workers: int | None = None
    priority: int | None = None
    worker_socket: str | None = None  # set by a supervisor for its workers: where this one answers it
    log_level: str = "INFO"  # handed on to workers


def effective_server_settings(loaded: LoadedConfig, options: ServeOptions) -> ServerSettings:
    """The file's server settings with command-line flags applied on top."""
    overrides = {
        key: value
        for key in ("host", "port", "admin_host", "admin_port", "store", "workers", "priority")
        if (value := getattr(options, key)) is not None
    }
    return loaded.experiment.server.model_copy(update=overrides)


def is_loopback(host: str) -> bool:
    """True if `host` only accepts connections from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass
class Core:
    """The balancer's parts behind its ports, wired together; the public port's handler is `proxy`."""

    events: EventLog
    metrics: BalancerMetrics
    registry: UpstreamRegistry
    runtime: Runtime
    proxy: Proxy


async def assemble(config: Path, loaded: LoadedConfig, store: str | Path, *, flush_interval_s: float,
                   recent_ids: int = 200_000, writer_priority: str = "idle", record_configs: bool = True) -> Core:
    """Open the outcome log, apply `loaded` (read from `config`) and build the proxy over them.

    Health checks and the file watch are not started: `Balancer.start` adds them; tests and
    `bench.instructions` run the parts without them.
    """
    events = EventLog(store, flush_interval_s=flush_interval_s, recent_ids=recent_ids, writer_priority=writer_priority)
    metrics = BalancerMetrics()
    registry = UpstreamRegistry(loaded.experiment.upstream)
    runtime = Runtime(config, events, metrics, registry, record_configs=record_configs)
    await runtime.start(loaded)
    return Core(events, metrics, registry, runtime, Proxy(runtime, registry, events, metrics))


def apply_priority(niceness: int | None, source: str) -> None:
    """Run this thread, and every thread and process it starts after, at `niceness` (None: as started).

    Linux keeps a niceness per thread, inherited when a thread or process is created: call this before
    any thread starts. A niceness below the current one the OS refuses without CAP_SYS_NICE or a raised
    RLIMIT_NICE; the balancer then logs why and serves at the one it has (`/healthz` shows it).
    """
    if niceness is None:
        return
    try:
        os.setpriority(os.PRIO_PROCESS, 0, niceness)
    except PermissionError:
        logger.error("%s: server.priority = %d: the OS refused it (it needs CAP_SYS_NICE, root, or an RLIMIT_NICE "
                     "of at least %d); serving at niceness %d", source, niceness, 20 - niceness,
                     os.getpriority(os.PRIO_PROCESS, 0))


def freeze_start_up_objects() -> None:
    """Move every object alive now (modules, classes, config; hundreds of thousands) out of the collector's sight.

    CPython's full (oldest-generation) collection traverses every tracked object; with everything the
    imports created that took tens of milliseconds in a balancer, a stall for every request in flight.
    What start-up left behind lives as long as the process anyway; frozen, it is never traversed again.
    """
    gc.collect()
    gc.freeze()


class Balancer:
    """The running balancer: both ports, the store and the background tasks."""

    def __init__(self, options: ServeOptions) -> None:
        self.options = options
        if options.workers is not None and not 1 <= options.workers <= MAX_WORKERS:
            raise ConfigError(f"--workers {options.workers}: must be between 1 and {MAX_WORKERS}")
        if options.priority is not None and not MIN_NICENESS <= options.priority <= MAX_NICENESS:
            raise ConfigError(f"--priority {options.priority}: must be between {MIN_NICENESS} and {MAX_NICENESS}")
        self.loaded = load_experiment(options.config)
        self.settings = effective_server_settings(self.loaded, options)
        # "single": one process does everything; "supervisor" and "worker": see balancer/supervisor.py.
        self.mode = "worker" if options.worker_socket else "supervisor" if self.settings.workers > 1 else "single"
        if self.mode != "worker" and not is_loopback(self.settings.admin_host) and not options.admin_token:
            raise ConfigError(
                f"{options.config}: server.admin_host = {self.settings.admin_host!r} listens beyond loopback; "
                "set BALANCER_ADMIN_TOKEN (or --admin-token) so admin endpoints require a bearer token"
            )
        self.stopped = asyncio.Event()
        self.public_server: HttpServer | None = None
        self.admin_runner: web.AppRunner | None = None
        self.workers: Workers | None = None
        self.reserved_port: socket.socket | None = None

    async def start(self) -> None:
        """Open the store, apply the config, start listening."""
        settings = self.settings
        core = await assemble(self.options.config, self.loaded, settings.store,
                              flush_interval_s=settings.flush_interval_s, recent_ids=settings.recent_request_ids,
                              writer_priority=settings.store_writer_priority, record_configs=self.mode != "worker")
        self.events, self.metrics, self.registry = core.events, core.metrics, core.registry
        self.runtime, self.proxy = core.runtime, core.proxy
        self.session = aiohttp.ClientSession()
        if self.mode != "supervisor":  # the supervisor proxies nothing: its workers check their upstreams
            self.registry.start(self.session)
        if self.mode == "worker":
            # Feedback may come here for a request a sibling answered and has not committed yet.
            self.events.peer_commit_s = 2 * settings.flush_interval_s + 1.0
        else:
            self.runtime.watch()
        freeze_start_up_objects()
        try:
            await self.listen()
        except BaseException:
            await self.stop()  # a port in use: close the session, the health checks and the store cleanly
            raise

    async def listen(self) -> None:
        """Open the public and the admin ports."""
        settings = self.settings
        if self.mode == "supervisor":
            await self._start_workers()
        else:
            self.public_server = HttpServer(
                self.proxy, max_body_bytes=settings.max_body_bytes, body_timeout_s=settings.client_body_timeout_s,
                keepalive_timeout_s=settings.client_keepalive_timeout_s,
            )
            await self.public_server.start(settings.host, settings.port, backlog=1024, reuse_port=self.mode == "worker")
        if self.mode == "worker":
            assert self.options.worker_socket is not None
            self.admin_runner = web.AppRunner(build_worker_app(self.runtime, self.registry, self.events),
                                              handle_signals=False, access_log=None, shutdown_timeout=2.0)
            await self.admin_runner.setup()
            await web.UnixSite(self.admin_runner, self.options.worker_socket).start()
            return

        admin = build_admin_app(self.runtime, self.registry, self.events, token=self.options.admin_token,
                                workers=self.workers)
        self.admin_runner = web.AppRunner(admin, handle_signals=False, access_log=None, shutdown_timeout=2.0)
        await self.admin_runner.setup()
        await web.TCPSite(self.admin_runner, settings.admin_host, settings.admin_port).start()
        logger.info(
            "balancer %r version %d: public http://%s:%d, admin http://%s:%d, store %s; event loop %s, request path %s",
            self.loaded.experiment.name, self.runtime.active.version if self.runtime.active else 0,
            settings.host, settings.port, settings.admin_host, settings.admin_port, settings.store,
            self.options.event_loop, native.MODE,
        )
        if self.workers is not None:
            logger.info("%d worker processes share the public port", len(self.workers.workers))

    async def _start_workers(self) -> None:
        """The supervisor's start: hold the public port, store the config version, start the workers."""
        settings, options = self.settings, self.options
        self.reserved_port = reserve_port(settings.host, settings.port)
        port = self.reserved_port.getsockname()[1]
        await asyncio.to_thread(self.events.flush)  # the version is in the store before a worker reads it
        self.workers = Workers(settings.workers, [
            "--log-level", options.log_level, "serve", "--host", settings.host, "--port", str(port),
            "--store", str(settings.store), "--event-loop", options.event_loop,
            "--drain-timeout", f"{options.drain_timeout_s:g}",
            *([] if settings.priority is None else ["--priority", str(settings.priority)]),
        ], drain_timeout_s=options.drain_timeout_s, registry=self.metrics.registry)
        self.runtime.on_applied.append(self.workers.push)
        assert self.runtime.active is not None
        await self.workers.start(self.runtime.active)

    async def stop(self) -> None:
        """Graceful stop: no new connections, drain in-flight requests, flush the log."""
        logger.info("stopping: draining in-flight requests (at most %gs)", self.options.drain_timeout_s)
        if self.workers is not None:
            await self.workers.stop()  # each drains its own requests
        if self.reserved_port is not None:
            self.reserved_port.close()
        if self.public_server is not None:
            self.public_server.close()  # no new connections; idle ones close, busy ones after their answer
        if not await self.proxy.wait_idle(self.options.drain_timeout_s):
            logger.warning("%d requests still in flight after the drain timeout", self.proxy.in_flight)
        if self.public_server is not None:
            await self.public_server.stop()
        await self.runtime.close()
        await self.registry.close()
        await self.session.close()
        if self.admin_runner is not None:
            await self.admin_runner.cleanup()
        await asyncio.to_thread(self.events.close)
        logger.info("stopped; %d request records and %d feedback values written this run",
                    self.events.written_requests, self.events.written_feedback)

    async def run_until_signalled(self) -> None:
        """Serve until SIGTERM/SIGINT; SIGHUP reloads the config."""
        loop = asyncio.get_running_loop()
        if self.mode == "worker":
            # Its supervisor stops it (SIGTERM) and reloads it; Ctrl-C in a terminal reaches the whole
            # process group, and a worker stopping on it first would look like a crash to be restarted.
            loop.add_signal_handler(signal.SIGTERM, self.stopped.set)
            for ignored in (signal.SIGINT, signal.SIGHUP):
                loop.add_signal_handler(ignored, lambda: None)
        else:
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(signum, self.stopped.set)
            loop.add_signal_handler(signal.SIGHUP, lambda: asyncio.ensure_future(self.runtime.reload("SIGHUP")))
        await self.start()
        try:
            await self.stopped.wait()
        finally:
            await self.stop()


EVENT_LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    # uvloop's transports are C, asyncio's are Python: `make bench` measures the difference.
    "uvloop": uvloop.new_event_loop,
    "asyncio": asyncio.new_event_loop,
}


def serve(options: ServeOptions) -> int:
    """Run the balancer until signalled; the exit code."""
    if options.worker_socket is not None:
        die_with_supervisor()
    try:
        balancer = Balancer(options)
    except ConfigError as exc:
        logger.error("%s", exc)
        return 2
    apply_priority(balancer.settings.priority, str(options.config))
    try:
        with asyncio.Runner(loop_factory=EVENT_LOOPS[options.event_loop]) as runner:
            runner.run(balancer.run_until_signalled())
    except (OSError, WorkerError) as exc:
        logger.error("cannot start: %s", exc)
        return 1
    return 0
