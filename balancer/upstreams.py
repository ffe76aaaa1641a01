"""Upstream endpoints per variant: round-robin choice, DNS discovery, health and ejection.

Each configured upstream URL may name a host that resolves to several addresses
(`docker compose up --scale model_b=3`); every address is one `Endpoint`. Names are
re-resolved every `dns_refresh_s`. An endpoint leaves rotation when its active health
check fails or after `eject_after_failures` consecutive failed requests (passive
ejection, Envoy-style); it comes back after `eject_for_s` on a trial request or a
passing health check (a per-endpoint circuit breaker: closed, open, half-open).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import time
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import urlsplit

import aiohttp

from balancer.config import Experiment, UpstreamSettings
from balancer.upstream_client import ConnectionPool

logger = logging.getLogger(__name__)


@dataclass(eq=False)
class Endpoint:
    """One upstream address serving a variant, with its connection pool and health state."""

    variant: str
    url: str  # as configured, e.g. http://model_b:8002
    pool: ConnectionPool
    requests: int = 0
    failures: int = 0
    consecutive_failures: int = 0
    ejected_until: float = 0.0  # monotonic time; 0 = in rotation
    healthy: bool = True  # last active health check
    trial_in_flight: bool = False

    @property
    def address(self) -> str:
        """host:port actually connected to."""
        return self.pool.address

    def available(self, now: float) -> bool:
        """In rotation: healthy and not ejected (or ejection expired, allowing one trial)."""
        if not self.healthy:
            return False
        if self.ejected_until == 0.0:
            return True
        return now >= self.ejected_until and not self.trial_in_flight

    def describe(self) -> dict[str, object]:
        """JSON-able state for /admin/upstreams."""
        now = time.monotonic()
        return {
            "variant": self.variant,
            "url": self.url,
            "address": self.address,
            "requests": self.requests,
            "failures": self.failures,
            "healthy": self.healthy,
            "ejected": self.ejected_until > now,
            "available": self.available(now),
            "idle_connections": self.pool.idle_count,
        }


class VariantUpstreams:
    """The endpoints of one variant, chosen round-robin among the available ones."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.endpoints: list[Endpoint] = []
        self._next = 0

    def pick(self, exclude: Iterable[Endpoint] = ()) -> Endpoint | None:
        """The next available endpoint not in `exclude`, or None when the variant is down."""
        endpoints = self.endpoints
        count = len(endpoints)
        if count == 0:
            return None
        now = time.monotonic()
        for offset in range(count):
            endpoint = endpoints[(self._next + offset) % count]
            if endpoint.available(now) and endpoint not in exclude:
                self._next = (self._next + offset + 1) % count
                if endpoint.ejected_until:
                    endpoint.trial_in_flight = True
                return endpoint
        return None


class UpstreamRegistry:
    """All endpoints of all variants for the active config; owns discovery and health checks."""

    def __init__(self, settings: UpstreamSettings) -> None:
        self.settings = settings
        self.variants: dict[str, VariantUpstreams] = {}
        self._urls: dict[str, tuple[str, ...]] = {}
        self._pools: dict[str, ConnectionPool] = {}  # address -> pool, shared across variants
        self._tasks: list[asyncio.Task[None]] = []
        self._session: aiohttp.ClientSession | None = None

    # configuration
    async def configure(self, experiment: Experiment) -> None:
        """Adopt the experiment's variants and upstream URLs, resolving host names now."""
        self.settings = experiment.upstream
        self._urls = {variant.name: variant.upstreams for variant in experiment.variants}
        self.variants = {name: self.variants.get(name) or VariantUpstreams(name) for name in self._urls}
        await self.refresh_dns()

    async def refresh_dns(self) -> None:
        """Re-resolve every upstream host; each address becomes an endpoint, state kept for known ones."""
        resolved: dict[str, list[tuple[str, str, int]]] = {}
        for variant, urls in self._urls.items():
            addresses: list[tuple[str, str, int]] = []
            for url in urls:
                host, port = split_upstream(url)
                for address in await resolve(host, port):
                    addresses.append((url, address, port))
            resolved[variant] = addresses
        live_addresses = set()
        for variant, addresses in resolved.items():
            upstreams = self.variants[variant]
            known = {(endpoint.url, endpoint.pool.host, endpoint.pool.port): endpoint for endpoint in upstreams.endpoints}
            endpoints = []
            for url, address, port in addresses:
                endpoint = known.get((url, address, port))
                if endpoint is None:
                    endpoint = Endpoint(variant=variant, url=url, pool=self._pool(address, port))
                    if upstreams.endpoints and self._session is not None:
                        # A replica that just appeared (e.g. `--scale`) may still be starting: it
                        # joins the rotation after its first passing health check, not before.
                        endpoint.healthy = False
                        self._admit_later(endpoint)
                        logger.info("variant %s: new upstream %s (%s), admitted once healthy", variant, endpoint.address, url)
                endpoints.append(endpoint)
                live_addresses.add(endpoint.pool.address)
            if not endpoints and upstreams.endpoints:
                logger.warning("variant %s: no upstream address resolves any more; keeping the last known", variant)
                continue
            upstreams.endpoints = endpoints
        for address in list(self._pools):
            if address not in live_addresses and not any(
                endpoint.pool.address == address for upstreams in self.variants.values() for endpoint in upstreams.endpoints
            ):
                self._pools.pop(address).close()

    def _pool(self, host: str, port: int) -> ConnectionPool:
        address = f"{host}:{port}"
        pool = self._pools.get(address)
        if pool is None:
            pool = ConnectionPool(
                host,
                port,
                max_idle=self.settings.max_idle_connections,
                connect_timeout=self.settings.connect_timeout_s,
                idle_timeout=self.settings.idle_connection_timeout_s,
            )
            self._pools[address] = pool
        pool.connect_timeout = self.settings.connect_timeout_s
        pool.max_idle = self.settings.max_idle_connections
        pool.idle_timeout = self.settings.idle_connection_timeout_s
        return pool

    # passive health
    def record_success(self, endpoint: Endpoint) -> None:
        """A request through `endpoint` got an answer: close its circuit."""
        endpoint.requests += 1
        if endpoint.consecutive_failures or endpoint.ejected_until:
            if endpoint.ejected_until:
                logger.info("upstream %s (%s) re-admitted", endpoint.address, endpoint.variant)
            endpoint.consecutive_failures = 0
            endpoint.ejected_until = 0.0
            endpoint.trial_in_flight = False

    def record_failure(self, endpoint: Endpoint) -> None:
        """A request through `endpoint` failed at the transport level: maybe eject it."""
        endpoint.requests += 1
        endpoint.failures += 1
        endpoint.consecutive_failures += 1
        endpoint.trial_in_flight = False
        if endpoint.ejected_until or endpoint.consecutive_failures >= self.settings.eject_after_failures:
            endpoint.ejected_until = time.monotonic() + self.settings.eject_for_s
            logger.warning(
                "upstream %s (%s) ejected for %gs after %d consecutive failures",
                endpoint.address, endpoint.variant, self.settings.eject_for_s, endpoint.consecutive_failures,
            )

    # background work
    def start(self, session: aiohttp.ClientSession) -> None:
        """Start DNS refresh and active health checks."""
        self._session = session
        self._tasks = [asyncio.create_task(self._dns_loop()), asyncio.create_task(self._health_loop())]

    async def close(self) -> None:
        """Stop background work and close every connection."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        for pool in self._pools.values():
            pool.close()
        self._pools.clear()

    def _admit_later(self, endpoint: Endpoint) -> None:
        task = asyncio.create_task(self._admit(endpoint))
        self._tasks.append(task)
        task.add_done_callback(lambda done: self._tasks.remove(done) if done in self._tasks else None)

    async def _admit(self, endpoint: Endpoint) -> None:
        """Check a new endpoint until it passes (then it joins the rotation) or a minute passes."""
        for _ in range(120):
            if await self._check(endpoint):
                endpoint.healthy = True
                logger.info("upstream %s (%s) passed its first health check", endpoint.address, endpoint.variant)
                return
            await asyncio.sleep(0.5)

    async def _dns_loop(self) -> None:
        while True:
            interval = self.settings.dns_refresh_s
            await asyncio.sleep(interval if interval > 0 else 3600)
            if interval > 0:
                try:
                    await self.refresh_dns()
                except Exception:  # keep the loop alive; the last good endpoints stay
                    logger.exception("DNS refresh failed")

    async def _health_loop(self) -> None:
        while True:
            interval = self.settings.health_check_interval_s
            if interval <= 0:
                await asyncio.sleep(3600)
                continue
            endpoints = {endpoint.address: endpoint for upstreams in self.variants.values() for endpoint in upstreams.endpoints}
            results = await asyncio.gather(*[self._check(endpoint) for endpoint in endpoints.values()])
            health = dict(zip(endpoints, results, strict=True))
            for upstreams in self.variants.values():
                for endpoint in upstreams.endpoints:
                    healthy = health.get(endpoint.address, endpoint.healthy)
                    if healthy != endpoint.healthy:
                        logger.warning("upstream %s (%s) is %s", endpoint.address, endpoint.variant,
                                       "healthy again" if healthy else "failing its health check")
                    endpoint.healthy = healthy
                    if healthy and endpoint.ejected_until and time.monotonic() >= endpoint.ejected_until:
                        self.record_success(endpoint)
                        endpoint.requests -= 1
            await asyncio.sleep(interval)

    async def _check(self, endpoint: Endpoint) -> bool:
        assert self._session is not None
        url = f"http://{endpoint.pool.authority}{self.settings.health_check_path}"
        timeout = aiohttp.ClientTimeout(total=min(self.settings.try_timeout_s, 2.0))
        try:
            async with self._session.get(url, timeout=timeout) as response:
                return response.status < 500
        except (TimeoutError, aiohttp.ClientError, OSError):
            return False

    def describe(self) -> list[dict[str, object]]:
        """Every endpoint's state, for /admin/upstreams."""
        return [endpoint.describe() for upstreams in self.variants.values() for endpoint in upstreams.endpoints]


def split_upstream(url: str) -> tuple[str, int]:
    """(host, port) of an http:// upstream URL."""
    parts = urlsplit(url)
    return parts.hostname or "", parts.port or 80


async def resolve(host: str, port: int) -> list[str]:
    """Every IPv4 address of `host` (IPv6 only if it has none), sorted; an IP literal is itself; [] if unknown."""
    try:
        ipaddress.ip_address(host)
        return [host]
    except ValueError:
        pass
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):  # UnicodeError: not a valid host name at all, e.g. "127..0.1"
        return []
    ipv4 = sorted({str(info[4][0]) for info in infos if info[0] == socket.AF_INET})
    return ipv4 or sorted({str(info[4][0]) for info in infos})
