"""Starting and stopping the balancer: wires config, store, upstreams, proxy and admin together.

Stop sequence (SIGTERM or SIGINT): stop accepting, let in-flight requests finish
(bounded by `drain_timeout_s`), flush the outcome log, close connections, exit 0.
SIGHUP reloads the experiment file.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import signal
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import uvloop
from aiohttp import web

from balancer import native
from balancer.admin import build_admin_app
from balancer.config import ConfigError, LoadedConfig, ServerSettings, load_experiment
from balancer.events import EventLog
from balancer.http_server import HttpServer
from balancer.metrics import BalancerMetrics
from balancer.proxy import Proxy
from balancer.runtime import Runtime
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


def effective_server_settings(loaded: LoadedConfig, options: ServeOptions) -> ServerSettings:
    """The file's server settings with command-line flags applied on top."""
    overrides = {
        key: value
        for key in ("host", "port", "admin_host", "admin_port", "store")
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
                   recent_ids: int = 200_000, writer_priority: str = "idle") -> Core:
    """Open the outcome log, apply `loaded` (read from `config`) and build the proxy over them.

    Health checks and the file watch are not started: `Balancer.start` adds them; tests and
    `bench.instructions` run the parts without them.
    """
    events = EventLog(store, flush_interval_s=flush_interval_s, recent_ids=recent_ids, writer_priority=writer_priority)
    metrics = BalancerMetrics()
    registry = UpstreamRegistry(loaded.experiment.upstream)
    runtime = Runtime(config, events, metrics, registry)
    await runtime.start(loaded)
    return Core(events, metrics, registry, runtime, Proxy(runtime, registry, events, metrics))


class Balancer:
    """The running balancer: both ports, the store and the background tasks."""

    def __init__(self, options: ServeOptions) -> None:
        self.options = options
        self.loaded = load_experiment(options.config)
        self.settings = effective_server_settings(self.loaded, options)
        if not is_loopback(self.settings.admin_host) and not options.admin_token:
            raise ConfigError(
                f"{options.config}: server.admin_host = {self.settings.admin_host!r} listens beyond loopback; "
                "set BALANCER_ADMIN_TOKEN (or --admin-token) so admin endpoints require a bearer token"
            )
        self.stopped = asyncio.Event()
        self.public_server: HttpServer | None = None
        self.admin_runner: web.AppRunner | None = None

    async def start(self) -> None:
        """Open the store, apply the config, start listening."""
        settings = self.settings
        core = await assemble(self.options.config, self.loaded, settings.store,
                              flush_interval_s=settings.flush_interval_s, recent_ids=settings.recent_request_ids,
                              writer_priority=settings.store_writer_priority)
        self.events, self.metrics, self.registry = core.events, core.metrics, core.registry
        self.runtime, self.proxy = core.runtime, core.proxy
        self.session = aiohttp.ClientSession()
        self.registry.start(self.session)
        self.runtime.watch()
        try:
            await self.listen()
        except BaseException:
            await self.stop()  # a port in use: close the session, the health checks and the store cleanly
            raise

    async def listen(self) -> None:
        """Open the public and the admin ports."""
        settings = self.settings
        self.public_server = HttpServer(
            self.proxy, max_body_bytes=settings.max_body_bytes, body_timeout_s=settings.client_body_timeout_s,
            keepalive_timeout_s=settings.client_keepalive_timeout_s,
        )
        await self.public_server.start(settings.host, settings.port, backlog=1024)

        admin = build_admin_app(self.runtime, self.registry, self.events, token=self.options.admin_token)
        self.admin_runner = web.AppRunner(admin, handle_signals=False, access_log=None, shutdown_timeout=2.0)
        await self.admin_runner.setup()
        await web.TCPSite(self.admin_runner, settings.admin_host, settings.admin_port).start()
        logger.info(
            "balancer %r version %d: public http://%s:%d, admin http://%s:%d, store %s; event loop %s, request path %s",
            self.loaded.experiment.name, self.runtime.active.version if self.runtime.active else 0,
            settings.host, settings.port, settings.admin_host, settings.admin_port, settings.store,
            self.options.event_loop, native.MODE,
        )

    async def stop(self) -> None:
        """Graceful stop: no new connections, drain in-flight requests, flush the log."""
        logger.info("stopping: draining in-flight requests (at most %gs)", self.options.drain_timeout_s)
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
    try:
        balancer = Balancer(options)
    except ConfigError as exc:
        logger.error("%s", exc)
        return 2
    try:
        with asyncio.Runner(loop_factory=EVENT_LOOPS[options.event_loop]) as runner:
            runner.run(balancer.run_until_signalled())
    except OSError as exc:
        logger.error("cannot start: %s", exc)
        return 1
    return 0
