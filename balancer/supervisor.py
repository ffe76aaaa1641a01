"""Several worker processes on one public port (`server.workers` > 1), run by a supervisor.

One balancer process serves what one core can (`make bench`: "What bounds the balancer").
With `workers: N`, `balancer serve` becomes a supervisor that starts N workers, each a whole
balancer (`serve --worker-socket PATH`) listening on the public port with SO_REUSEPORT, so the
kernel spreads new connections over them. Each worker logs to the same store through its
own writer process (SQLite serialises the commits) and answers its own /feedback.

The supervisor serves the admin port and owns the config: it watches the file, numbers the
versions, stores them, and pushes each applied version's text to every worker before its
reload answers. Workers listen for it on a Unix socket of their own, which also gives the
supervisor their metrics (summed into one /metrics), health, upstream counters and a flush
(before a report). A worker that exits unexpectedly is started again and handed the current
config; SIGTERM drains every worker before the supervisor exits. Workers die with their
supervisor (PR_SET_PDEATHSIG), so no orphan keeps the port.
"""

from __future__ import annotations

import asyncio
import ctypes
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample
from prometheus_client.metrics_core import Metric

from balancer.admin import write_atomically
from balancer.runtime import ActiveConfig

logger = logging.getLogger(__name__)

READY_TIMEOUT_S = 60.0
WATCH_INTERVAL_S = 0.5
RESTART_BACKOFF_MAX_S = 30.0
CALL_TIMEOUT_S = 30.0  # a worker's answer to the supervisor (a flush waits for its store writer)
# A worker's answer to a pushed config: parsing and applying it takes milliseconds. A worker that does not
# take a version in that time, or refuses it, is replaced, so that every worker serves the same version.
APPLY_TIMEOUT_S = 5.0
# A worker's answer to /healthz, /metrics and /admin/upstreams, gathered for the supervisor's own: one worker
# that hangs must not hang the health check (it shows as not answering) or the scrape.
QUERY_TIMEOUT_S = 2.0
# Gauges whose per-worker values add up (each worker's own share); every other gauge is the same in all
# workers (weights, config version) and is merged as the largest.
SUMMED_GAUGES = frozenset({"balancer_in_flight_requests", "balancer_events_pending", "balancer_feedback_value_sum"})
_PR_SET_PDEATHSIG = 1
SUPERVISOR_ENVIRONMENT = "BALANCER_SUPERVISOR_PID"  # set for its workers: the pid they die with


class WorkerError(Exception):
    """A worker did not start (it exited first, or never answered)."""


def reserve_port(host: str, port: int) -> socket.socket:
    """Bind (not listen) a SO_REUSEPORT socket: fixes the port when `port` is 0 and holds it for the workers.

    A socket that does not listen takes no connections; the workers' listening sockets share the port with it.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    reserved = socket.socket(family, socket.SOCK_STREAM)
    try:
        reserved.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        reserved.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        reserved.bind((host, port))
    except BaseException:
        reserved.close()
        raise
    return reserved


def die_with_supervisor() -> None:
    """In a worker: get SIGTERM when the supervisor dies (PR_SET_PDEATHSIG); exit now if it already has.

    Set here, not between fork and exec: the supervisor has threads, and only async-signal-safe work is
    safe in a forked child before exec.
    """
    supervisor = int(os.environ.get(SUPERVISOR_ENVIRONMENT, "0"))
    if ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM) != 0:
        logger.warning("cannot ask to be stopped with the supervisor: %s", os.strerror(ctypes.get_errno()))
    if supervisor and os.getppid() != supervisor:
        raise SystemExit(f"the supervisor (pid {supervisor}) is gone; this worker stops")


@dataclass
class Worker:
    """One worker process and the Unix socket its supervisor talks to it on."""

    index: int
    socket_path: Path
    process: subprocess.Popen[bytes] | None = None
    session: aiohttp.ClientSession | None = None
    ready: bool = False
    restarts: int = 0
    last_exit: int | None = None
    failed_starts: int = 0  # in a row; reset once it is ready
    restart_at: float = 0.0  # loop time before which an exited worker is not started again
    starting: asyncio.Task[None] | None = None
    replacing: asyncio.Task[None] | None = None  # stopping a worker that did not take a version


class Workers:
    """The supervisor's view of its workers: start, push config, gather, restart, stop."""

    def __init__(self, count: int, serve_arguments: list[str], *, drain_timeout_s: float,
                 registry: CollectorRegistry) -> None:
        self._folder = tempfile.TemporaryDirectory(prefix="balancer-workers-")  # mode 0700: only this user
        self.folder = Path(self._folder.name)
        # The active config's text, where a worker (re)starting reads it: valid even while the user's file is not.
        self.config_copy = self.folder / "experiment.yaml"
        # `python -m balancer ... serve ...` for one worker, but for its --config and --worker-socket
        self.command = [sys.executable, "-m", "balancer", *serve_arguments, "--config", str(self.config_copy)]
        self.drain_timeout_s = drain_timeout_s
        self.workers = [Worker(index, self.folder / f"worker-{index}.sock") for index in range(count)]
        self.active: ActiveConfig | None = None
        self.stopping = False
        self._watch_task: asyncio.Task[None] | None = None
        self._alive = Gauge("balancer_workers", "Worker processes serving the public port now.", registry=registry)
        self._restarted = Counter("balancer_worker_restarts", "Workers started again after exiting unexpectedly.",
                                  registry=registry)

    async def start(self, active: ActiveConfig) -> None:
        """Start every worker, wait until all answer, hand them `active`; then keep them running."""
        await self._keep(active)
        for worker in self.workers:
            self._spawn(worker)
        await asyncio.gather(*(self._become_ready(worker) for worker in self.workers))
        self._watch_task = asyncio.get_running_loop().create_task(self._watch())

    async def push(self, active: ActiveConfig) -> None:
        """Hand an applied config to every ready worker (Runtime.on_applied); one that refuses it or does not
        answer in APPLY_TIMEOUT_S is replaced: stopped (it drains and flushes its log first), then started again
        on this version by the watch."""
        await self._keep(active)
        ready = [worker for worker in self.workers if worker.ready]
        taken = await asyncio.gather(*(self._push_one(worker, active) for worker in ready))
        for worker, took in zip(ready, taken, strict=True):
            if not took and worker.ready and not self.stopping:
                self._replace(worker, f"did not take config version {active.version}")

    async def flush(self) -> None:
        """Every worker commits what it logged so far (before a report reads the store)."""
        await asyncio.gather(*(self._call(worker, "POST", "/internal/flush") for worker in self.workers if worker.ready),
                             return_exceptions=True)

    async def metrics_texts(self) -> list[str]:
        """Each ready worker's /metrics exposition (a worker that does not answer is left out and logged)."""
        answers = await self._gather("GET", "/metrics")
        return [text for text in answers if isinstance(text, str)]

    async def health(self) -> list[dict[str, Any]]:
        """Each worker's pid, state and /healthz (null when it did not answer)."""
        answers = await self._gather("GET", "/healthz")
        return [{
            "index": worker.index, "pid": worker.process.pid if worker.process else None, "ready": worker.ready,
            "restarts": worker.restarts, "last_exit": worker.last_exit,
            "health": json.loads(answer) if isinstance(answer, str) else None,
        } for worker, answer in zip(self.workers, answers)]

    async def upstreams(self) -> list[list[dict[str, Any]]]:
        """Each answering worker's /admin/upstreams list."""
        answers = await self._gather("GET", "/admin/upstreams")
        return [json.loads(answer) for answer in answers if isinstance(answer, str)]

    async def stop(self) -> None:
        """SIGTERM every worker (each drains its requests), wait, SIGKILL what is left; close the sockets."""
        self.stopping = True
        tasks = [task for task in (self._watch_task, *(worker.starting for worker in self.workers),
                                   *(worker.replacing for worker in self.workers)) if task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        running = [worker.process for worker in self.workers if worker.process is not None and worker.process.poll() is None]
        for process in running:
            process.send_signal(signal.SIGTERM)
        await asyncio.gather(*(asyncio.to_thread(_wait_or_kill, process, self.drain_timeout_s + 10) for process in running))
        for worker in self.workers:
            if worker.session is not None:
                await worker.session.close()
        self._alive.set(0)
        self._folder.cleanup()

    # ---- internals

    def _count_ready(self) -> None:
        self._alive.set(sum(worker.ready for worker in self.workers))

    async def _keep(self, active: ActiveConfig) -> None:
        """`active` is what workers get from now on: pushed once ready, read from `config_copy` at start."""
        self.active = active
        await asyncio.to_thread(write_atomically, self.config_copy, active.loaded.body)

    def _spawn(self, worker: Worker) -> None:
        worker.socket_path.unlink(missing_ok=True)
        worker.ready = False
        worker.process = subprocess.Popen([*self.command, "--worker-socket", str(worker.socket_path)],
                                          env={**os.environ, SUPERVISOR_ENVIRONMENT: str(os.getpid())})
        logger.info("worker %d started (pid %d)", worker.index, worker.process.pid)

    async def _become_ready(self, worker: Worker) -> None:
        """Wait until `worker` answers /healthz, then hand it the current config; WorkerError if it cannot."""
        assert worker.process is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + READY_TIMEOUT_S
        while True:
            if worker.process.poll() is not None:
                raise WorkerError(f"worker {worker.index} exited with {worker.process.returncode} before it was ready")
            if worker.socket_path.exists():
                try:
                    await self._call(worker, "GET", "/healthz")
                    break
                except (aiohttp.ClientError, OSError, asyncio.TimeoutError):
                    pass
            if loop.time() > deadline:
                worker.process.kill()  # hung: the watch starts another
                raise WorkerError(f"worker {worker.index} not ready after {READY_TIMEOUT_S:g}s; killed")
            await asyncio.sleep(0.05)
        handed: ActiveConfig | None = None
        while self.active is not None and self.active is not handed:  # a version applied meanwhile goes too
            handed = self.active
            if not await self._push_one(worker, handed):
                worker.process.kill()  # it has served nothing yet: nothing to drain
                raise WorkerError(f"worker {worker.index} did not take config version {handed.version}; killed")
        worker.ready = True  # no await since the last check: no push can slip in between
        worker.failed_starts = 0
        self._count_ready()

    async def _push_one(self, worker: Worker, active: ActiveConfig) -> bool:
        """Hand `active` to `worker`: whether it applied it (a refusal or no answer is logged)."""
        try:
            answer = json.loads(await self._call(worker, "POST", "/internal/apply",
                                                 {"version": active.version, "body": active.loaded.body},
                                                 timeout_s=APPLY_TIMEOUT_S))
        except (aiohttp.ClientError, OSError, asyncio.TimeoutError, ValueError) as exc:
            logger.error("worker %d: config version %d not handed over: %s", worker.index, active.version,
                         exc or type(exc).__name__)
            return False
        if not answer.get("applied"):
            logger.error("worker %d refused config version %d: %s", worker.index, active.version, answer.get("message"))
            return False
        return True

    def _replace(self, worker: Worker, why: str) -> None:
        """Stop `worker` (SIGTERM: it drains and flushes; SIGKILL if it has not exited after the drain timeout
        and 10 s); the watch then starts it again, on the current version."""
        process = worker.process
        assert process is not None
        worker.ready = False
        self._count_ready()
        logger.error("worker %d (pid %d) %s; replacing it", worker.index, process.pid, why)
        process.send_signal(signal.SIGTERM)
        worker.replacing = asyncio.get_running_loop().create_task(
            asyncio.to_thread(_wait_or_kill, process, self.drain_timeout_s + 10))

    async def _watch(self) -> None:
        """Start again any worker that exited while the balancer was not stopping (waiting longer after each
        start that failed: 0.5 s, 1 s, 2 s, ... up to RESTART_BACKOFF_MAX_S)."""
        loop = asyncio.get_running_loop()
        while not self.stopping:
            await asyncio.sleep(WATCH_INTERVAL_S)
            for worker in self.workers:
                process = worker.process
                if self.stopping or process is None or process.poll() is None or loop.time() < worker.restart_at:
                    continue
                worker.ready = False
                worker.last_exit = process.returncode
                worker.restarts += 1
                self._restarted.inc()
                self._count_ready()
                logger.error("worker %d (pid %d) exited with %d; starting it again", worker.index, process.pid,
                             process.returncode)
                self._spawn(worker)
                worker.starting = loop.create_task(self._restart(worker))

    async def _restart(self, worker: Worker) -> None:
        try:
            await self._become_ready(worker)
        except WorkerError as exc:
            worker.failed_starts += 1
            backoff = min(RESTART_BACKOFF_MAX_S, WATCH_INTERVAL_S * 2 ** (worker.failed_starts - 1))
            worker.restart_at = asyncio.get_running_loop().time() + backoff
            logger.error("%s; the next start in %gs at the earliest", exc, backoff)

    async def _call(self, worker: Worker, method: str, path: str, document: object = None, *,
                    timeout_s: float = CALL_TIMEOUT_S) -> str:
        if worker.session is None or worker.session.closed:
            worker.session = aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(worker.socket_path)))
        async with worker.session.request(method, f"http://worker{path}", json=document,
                                          timeout=aiohttp.ClientTimeout(total=timeout_s)) as response:
            text = await response.text()
            if response.status >= 500:
                raise aiohttp.ClientResponseError(response.request_info, (), status=response.status, message=text[:200])
            return text

    async def _gather(self, method: str, path: str) -> list[str | BaseException | None]:
        async def one(worker: Worker) -> str | BaseException | None:
            if not worker.ready:
                return None
            try:
                return await self._call(worker, method, path, timeout_s=QUERY_TIMEOUT_S)
            except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as exc:
                logger.warning("worker %d did not answer %s %s: %s", worker.index, method, path, exc)
                return exc
        return list(await asyncio.gather(*(one(worker) for worker in self.workers)))


def _wait_or_kill(process: subprocess.Popen[bytes], timeout: float) -> None:
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        logger.error("worker pid %d did not stop within %gs; killing it", process.pid, timeout)
        process.kill()
        process.wait()


# ---- one /metrics from several processes

class _Merged(Collector):
    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterable[Metric]:
        return self.families


def merge_expositions(texts: Iterable[str]) -> bytes:
    """Prometheus text expositions of several processes as one: counters and histograms summed per label set.

    Gauges in SUMMED_GAUGES are summed too; every other gauge (the same in every worker) is the largest value,
    and `_created` samples the earliest.
    """
    families: dict[str, Metric] = {}
    values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
    for text in texts:
        for family in text_string_to_metric_families(text):
            merged = families.get(family.name)
            if merged is None:
                merged = families[family.name] = Metric(family.name, family.documentation, family.type, family.unit)
                values[family.name] = {}
            slots = values[family.name]
            for sample in family.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                previous = slots.get(key)
                if previous is None:
                    slots[key] = sample.value
                elif sample.name.endswith("_created"):
                    slots[key] = min(previous, sample.value)
                elif family.type == "gauge" and family.name not in SUMMED_GAUGES:
                    slots[key] = max(previous, sample.value)
                else:
                    slots[key] = previous + sample.value
    for name, merged in families.items():
        merged.samples = [Sample(sample_name, dict(labels), value) for (sample_name, labels), value in values[name].items()]
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Merged(list(families.values())))
    return generate_latest(registry)


def merge_upstreams(per_worker: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Workers' /admin/upstreams as one list, an entry per variant, URL and address (a host name's URL has one per
    address it resolves to): counters summed; healthy and available only if so in every worker, and available only
    once every worker has it (a replica one worker has resolved and another not yet takes half the traffic)."""
    merged: dict[tuple[str, str, str], dict[str, Any]] = {}
    listed: dict[tuple[str, str, str], int] = {}
    for endpoints in per_worker:
        for endpoint in endpoints:
            key = (str(endpoint["variant"]), str(endpoint["url"]), str(endpoint["address"]))
            listed[key] = listed.get(key, 0) + 1
            total = merged.get(key)
            if total is None:
                merged[key] = dict(endpoint)
                continue
            for counter in ("requests", "failures", "idle_connections"):
                total[counter] += endpoint[counter]
            total["healthy"] = total["healthy"] and endpoint["healthy"]
            total["available"] = total["available"] and endpoint["available"]
            total["ejected"] = total["ejected"] or endpoint["ejected"]
    for key, total in merged.items():
        total["available"] = total["available"] and listed[key] == len(per_worker)
    return list(merged.values())
