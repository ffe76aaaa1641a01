"""The running experiment: the active config version, and how a new one replaces it.

A request reads `runtime.active` once and finishes on that snapshot, so a reload
never changes a request half-way. A reload (file watch, SIGHUP, POST /admin/reload)
validates the new file completely, checks its new upstreams resolve and accept a
connection, and only then swaps the snapshot; anything invalid leaves the running
config in place, is logged with file, line and key, counted in
`balancer_config_reload_failures_total` and shown in /admin/experiment.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from balancer.assignment import Assigner
from balancer.config import ConfigError, Experiment, LoadedConfig, load_experiment, parse_experiment
from balancer.events import EventLog
from balancer.metrics import BalancerMetrics, VariantMetrics
from balancer.upstreams import UpstreamRegistry, resolve, split_upstream

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ActiveConfig:
    """One applied config version and everything derived from it for the hot path."""

    version: int
    loaded: LoadedConfig
    assigner: Assigner
    variant_metrics: dict[str, VariantMetrics]
    applied_at: float
    sticky_source: tuple[str, str]  # (header|cookie|json, name), parsed once
    sticky_header: bytes  # a header source's name, lower-case bytes as `HttpRequest.header` takes it
    # Read on every request: copied out of the pydantic models, whose attribute reads (through their
    # class's __getattr__ hook) cost ~200 instructions each.
    experiment_name: str
    try_timeout_s: float

    @property
    def experiment(self) -> Experiment:
        """The validated experiment."""
        return self.loaded.experiment


class Runtime:
    """Holds the active config and applies new ones safely."""

    def __init__(self, config_path: str | Path, events: EventLog, metrics: BalancerMetrics, registry: UpstreamRegistry,
                 *, record_configs: bool = True) -> None:
        self.config_path = Path(config_path)
        # False in a worker process: its supervisor numbers the versions and stores them (see `adopt`).
        self.record_configs = record_configs
        # Awaited, in order, after every config applied (the supervisor hands it to its workers).
        self.on_applied: list[Callable[[ActiveConfig], Awaitable[None]]] = []
        self.events = events
        self.metrics = metrics
        self.registry = registry
        self.active: ActiveConfig | None = None
        self.last_error: str | None = None
        self.last_error_at: float | None = None
        self.reload_failures = 0
        self._lock = asyncio.Lock()
        self._watched: tuple[float, int, str] | None = None
        self._watch_task: asyncio.Task[None] | None = None

    async def start(self, loaded: LoadedConfig) -> None:
        """Apply the first config (unreachable upstreams are only warned about at start)."""
        previous = await asyncio.to_thread(self.events.latest_config)
        version = 1 if previous is None else previous[0] + (previous[1] != loaded.hash)
        await self._apply(loaded, version)
        self._watched = self._file_signature()

    async def reload(self, trigger: str) -> tuple[bool, str]:
        """Re-read the config file; apply it if valid and different. Returns (applied or unchanged, message)."""
        async with self._lock:
            assert self.active is not None
            try:
                loaded = await asyncio.to_thread(load_experiment, self.config_path)
                if loaded.hash == self.active.loaded.hash:
                    return True, f"config unchanged (version {self.active.version})"
                await self._check_upstreams(loaded)
            except ConfigError as exc:
                return False, self._reject(str(exc), trigger)
            if loaded.experiment.server != self.active.experiment.server:
                logger.warning("%s: the server: section changed; it takes effect only after a restart", loaded.path)
            await self._apply(loaded, self.active.version + 1)
            message = f"applied config version {self.active.version} ({loaded.hash}) on {trigger}"
            logger.info("%s", message)
            return True, message

    async def adopt(self, body: str, version: int) -> tuple[bool, str]:
        """Apply config text as `version`, numbered and checked by the supervisor (a worker's reload).

        Returns (applied or unchanged, message); text that does not validate is refused and changes nothing.
        """
        async with self._lock:
            try:
                loaded = await asyncio.to_thread(parse_experiment, body, source=str(self.config_path))
            except ConfigError as exc:
                return False, self._reject(str(exc), "the supervisor's push")
            if self.active is not None and self.active.version == version and self.active.loaded.hash == loaded.hash:
                return True, f"config unchanged (version {version})"
            await self._apply(loaded, version)
            return True, f"applied config version {version} ({loaded.hash}) from the supervisor"

    def _reject(self, reason: str, trigger: str) -> str:
        self.last_error = reason
        self.last_error_at = time.time()
        self.reload_failures += 1
        self.metrics.reload_failures.inc()
        logger.error("config reload on %s rejected, keeping version %s:\n%s", trigger,
                     self.active.version if self.active else "-", reason)
        return reason

    async def _check_upstreams(self, loaded: LoadedConfig) -> None:
        """Every new upstream must resolve and accept a TCP connection."""
        assert self.active is not None
        known = {url for variant in self.active.experiment.variants for url in variant.upstreams}
        timeout = loaded.experiment.upstream.connect_timeout_s
        for index, variant in enumerate(loaded.experiment.variants):
            for url in variant.upstreams:
                if url in known:
                    continue
                host, port = split_upstream(url)
                addresses = await resolve(host, port)
                if not addresses:
                    raise ConfigError(f"{loaded.path}: variants[{index}].upstreams = {url!r}: host {host!r} does not resolve")
                try:
                    async with asyncio.timeout(timeout):
                        _, writer = await asyncio.open_connection(addresses[0], port)
                    writer.close()
                except (OSError, TimeoutError) as exc:
                    raise ConfigError(
                        f"{loaded.path}: variants[{index}].upstreams = {url!r}: unreachable ({exc or 'timeout'})"
                    ) from exc

    async def _apply(self, loaded: LoadedConfig, version: int) -> None:
        experiment = loaded.experiment
        await self.registry.configure(experiment)
        for variant in experiment.variants:
            if not self.registry.variants[variant.name].endpoints:
                logger.warning("variant %s: no upstream resolves yet (%s)", variant.name, ", ".join(variant.upstreams))
        total = sum(experiment.weights.values())
        metrics = self.metrics
        if self.active is not None:
            for variant in self.active.experiment.variants:
                metrics.weight.labels(self.active.experiment.name, variant.name).set(0)
            metrics.config_info.labels(self.active.experiment.name, self.active.loaded.hash, self.active.experiment.status).set(0)
        for variant in experiment.variants:
            metrics.weight.labels(experiment.name, variant.name).set(variant.weight / total)
        metrics.config_version.set(version)
        metrics.config_info.labels(experiment.name, loaded.hash, experiment.status).set(1)
        if self.record_configs:
            self.events.record_config(version, loaded.hash, experiment, loaded.body)
        self.active = ActiveConfig(
            version=version,
            loaded=loaded,
            assigner=Assigner.for_experiment(experiment),
            variant_metrics={v.name: metrics.children(experiment.name, v.name) for v in experiment.variants},
            applied_at=time.time(),
            sticky_source=experiment.sticky_source,
            sticky_header=experiment.sticky_source[1].lower().encode("latin-1"),
            experiment_name=experiment.name,
            try_timeout_s=experiment.upstream.try_timeout_s,
        )
        self.last_error = None
        for hook in self.on_applied:
            await hook(self.active)

    # watching the file
    def _file_signature(self) -> tuple[float, int, str] | None:
        try:
            stat = os.stat(self.config_path)
            digest = hashlib.sha256(self.config_path.read_bytes()).hexdigest()
        except OSError:
            return None
        return stat.st_mtime, stat.st_size, digest

    def watch(self, interval_s: float = 0.5) -> None:
        """Poll the config file (mtime, size and content) and reload when it changes."""
        self._watch_task = asyncio.create_task(self._watch(interval_s))

    async def _watch(self, interval_s: float) -> None:
        while True:
            await asyncio.sleep(interval_s)
            signature = await asyncio.to_thread(self._file_signature)
            if signature is None or signature == self._watched:
                continue
            changed_content = self._watched is None or signature[2] != self._watched[2]
            self._watched = signature
            if changed_content:
                await self.reload("file change")

    async def close(self) -> None:
        """Stop watching."""
        if self._watch_task is not None:
            self._watch_task.cancel()
            await asyncio.gather(self._watch_task, return_exceptions=True)

    def describe(self) -> dict[str, object]:
        """The active config for /admin/experiment."""
        assert self.active is not None
        experiment = self.active.experiment
        total = sum(experiment.weights.values())
        return {
            "name": experiment.name,
            "version": self.active.version,
            "hash": self.active.loaded.hash,
            "path": str(self.config_path),
            "applied_at": self.active.applied_at,
            "status": experiment.status,
            "strategy": experiment.strategy,
            "sticky_key": experiment.sticky_key,
            "control": experiment.control_name,
            "winner": experiment.winner,
            "weights": experiment.weights,
            "shares": {name: weight / total for name, weight in experiment.weights.items()},
            "config": experiment.model_dump(mode="json"),
            "last_error": self.last_error,
            "last_error_at": self.last_error_at,
            "reload_failures": self.reload_failures,
        }
