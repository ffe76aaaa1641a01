"""Every process a benchmark talks to, started on loopback and stopped on the way out.

Backends come in two kinds: `noop` (tests/noop_backend.py, nearly free, so the hop is
what is measured) and `model` (the real model_a / model_b servers). In front of each
kind: one or more balancers (one per configuration under test) and one nginx.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
import urllib.request
from collections import Counter
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from balancer import native
from balancer.config import parse_experiment
from bench.errors import BenchError
from bench.nginx import nginx_command, render_nginx_config, write_nginx_prefix
from tests.processes import REPO, free_port, stop, wait_http

logger = logging.getLogger(__name__)

VARIANTS = ("model_a", "model_b")
WEIGHTS = {"model_a": 50.0, "model_b": 50.0}
PREDICT_PATH = "/predict"
HOST = "127.0.0.1"


@dataclass(frozen=True)
class BalancerOptions:
    """One balancer configuration under test: the YAML's strategy and `server:` switches."""

    label: str
    strategy: str = "sticky"
    record_outcomes: bool = True
    export_metrics: bool = True
    event_loop: str = "uvloop"  # `serve --event-loop`
    interpreted: bool = False  # BALANCER_PURE_PYTHON=1: the .py sources instead of the compiled modules
    workers: int = 1  # server.workers
    priority: int | None = None  # server.priority (the balancer's niceness)


KINDS = ("noop", "model")
WORKERS = 2  # the worker processes of the multi-process balancer and nginx compared (one per core here)
# The niceness the balancer (server.priority) and nginx (worker_priority) are also measured at: ahead of the
# backends and the load generator (niceness 0) on the CPUs they share.
PRIORITY = -5


def workers_label(workers: int) -> str:
    """How targets with several worker processes are labelled: 'noop balancer (2 workers)'."""
    return f"{workers} workers"


def priority_label(niceness: int) -> str:
    """How targets run at another niceness are labelled: 'noop nginx (priority -5)'."""
    return f"priority {niceness}"

FEATURE_BASELINE = "outcomes and metrics off"
# every balancer configuration measured on the no-op backends; the first is the production default
FLOOR_LABEL = "floor: the balancer's server + upstream client only"
AIOHTTP_FLOOR_LABEL = "aiohttp floor: aiohttp's server + upstream client only"
FLOOR_LABELS = {"balancer": FLOOR_LABEL, "aiohttp": AIOHTTP_FLOOR_LABEL}
ASYNCIO_LABEL = "asyncio event loop"
INTERPRETED_LABEL = "interpreted"
INTERPRETED_ASYNCIO_LABEL = "interpreted, asyncio event loop"
FEATURE_CONFIGURATIONS = (
    BalancerOptions("default"),
    BalancerOptions("outcomes off", record_outcomes=False),
    BalancerOptions("metrics off", export_metrics=False),
    BalancerOptions(FEATURE_BASELINE, record_outcomes=False, export_metrics=False),
    BalancerOptions("random", strategy="random"),
    BalancerOptions(ASYNCIO_LABEL, event_loop="asyncio"),
    BalancerOptions(INTERPRETED_LABEL, interpreted=True),
    BalancerOptions(INTERPRETED_ASYNCIO_LABEL, interpreted=True, event_loop="asyncio"),
)


@dataclass(frozen=True)
class Target:
    """Something to send load to: a URL, and whose CPU the requests are charged to."""

    name: str
    kind: str
    hop: str  # "direct", "balancer" or "nginx"
    url: str
    spread: tuple[str, ...] = ()  # direct runs: connect to these host:ports instead of the URL's
    proxy_pid: int | None = None  # the hop's process (nginx: the master; its workers are found at run time)
    backend_pids: tuple[int, ...] = ()
    command: tuple[str, ...] = field(default=(), compare=False)


def balancer_yaml(options: BalancerOptions, upstreams: Mapping[str, str]) -> str:
    """The experiment file of a benchmark balancer; validated here so a schema change fails before any load."""
    server: dict[str, object] = {"record_outcomes": options.record_outcomes, "export_metrics": options.export_metrics,
                                  "workers": options.workers}
    if options.priority is not None:
        server["priority"] = options.priority
    document = {
        "name": "bench",
        "strategy": options.strategy,
        "sticky_key": "header:X-User-ID",
        "seed": 9,
        "variants": [{"name": name, "weight": WEIGHTS[name], "upstreams": [f"http://{upstreams[name]}"]}
                     for name in VARIANTS],
        "server": server,
    }
    text = yaml.safe_dump(document, sort_keys=False)
    parse_experiment(text, source=f"<bench {options.label}>")
    return text


@contextmanager
def scratch_folder(prefix: str) -> Iterator[Path]:
    """A temporary folder for a Stack, removed afterwards."""
    with tempfile.TemporaryDirectory(prefix=prefix) as scratch:
        folder = Path(scratch)
        folder.chmod(0o711)  # nginx workers run as nobody when started by root
        yield folder


class Stack:
    """Starts processes into `workdir` (logs, configs, stores) and stops them all on exit."""

    def __init__(self, workdir: Path, *, nginx: str, artifacts: Path) -> None:
        self.workdir = workdir
        self.nginx = nginx
        self.artifacts = artifacts
        self.body = sample_body(artifacts)
        self.body_file = workdir / "body.json"  # what the load generators send
        self.body_file.write_bytes(self.body)
        self._exit = ExitStack()
        self._pending: list[tuple[str, subprocess.Popen[bytes], str, Path]] = []

    def __enter__(self) -> Stack:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._exit.close()

    def backends(self, kind: str, *, event_loop: str = "uvloop") -> tuple[dict[str, str], tuple[int, ...]]:
        """Start the two backends of `kind` (ready after `ready()`): variant -> host:port, and their pids.

        `event_loop`: what the no-op backends run on (`tests/noop_backend.py --event-loop`).
        """
        addresses: dict[str, str] = {}
        pids = []
        for variant in VARIANTS:
            port = free_port()
            if kind == "noop":
                command = [sys.executable, "tests/noop_backend.py", "--port", str(port), "--name", variant,
                           "--event-loop", event_loop]
                ready = f"http://{HOST}:{port}/healthz"
            else:
                command = [sys.executable, "-m", variant, "--port", str(port), "--artifacts", str(self.artifacts)]
                ready = f"http://{HOST}:{port}/readyz"
            pids.append(self._spawn(f"{kind}-{variant}-{event_loop}" if kind == "noop" else f"{kind}-{variant}",
                                    command, ready).pid)
            addresses[variant] = f"{HOST}:{port}"
        return addresses, tuple(pids)

    def direct(self, kind: str, upstreams: Mapping[str, str], backend_pids: tuple[int, ...]) -> Target:
        """Load straight at the backends, spread evenly over both (as the proxies split it)."""
        first = upstreams[VARIANTS[0]]
        return Target(name=f"{kind} direct", kind=kind, hop="direct", url=f"http://{first}{PREDICT_PATH}",
                      spread=tuple(upstreams[name] for name in VARIANTS), backend_pids=backend_pids)

    def balancer(self, kind: str, options: BalancerOptions, upstreams: Mapping[str, str],
                 backend_pids: tuple[int, ...], *, source: Path = REPO) -> Target:
        """Start a balancer in front of `upstreams` configured by `options` (ready after `ready()`).

        `source`: the checkout whose `balancer` package runs (another commit's worktree, for `bench.compare`).
        """
        slug = f"{kind}-balancer-{options.label.replace(' ', '-').replace(',', '')}"
        config = self.workdir / f"{slug}.yaml"
        config.write_text(balancer_yaml(options, upstreams))
        port, admin_port = free_port(), free_port()
        command = [sys.executable, "-m", "balancer", "--log-level", "WARNING", "serve", "--config", str(config),
                   "--port", str(port), "--admin-port", str(admin_port), "--store", str(self.workdir / f"{slug}.db"),
                   "--event-loop", options.event_loop]
        environment = {native.PURE_ENVIRONMENT: "1" if options.interpreted else ""}
        if source != REPO:
            environment["PYTHONPATH"] = str(source)
        process = self._spawn(slug, command, f"http://{HOST}:{admin_port}/healthz", environment, cwd=source)
        return Target(name=f"{kind} balancer" + ("" if options.label == "default" else f" ({options.label})"),
                      kind=kind, hop="balancer", url=f"http://{HOST}:{port}{PREDICT_PATH}",
                      proxy_pid=process.pid, backend_pids=backend_pids, command=tuple(command))

    def floor(self, kind: str, upstreams: Mapping[str, str], backend_pids: tuple[int, ...], server: str) -> Target:
        """Start `bench/floor_proxy.py`: `server` ("balancer" or "aiohttp") + the balancer's upstream client, no features."""
        port = free_port()
        command = [sys.executable, "-m", "bench.floor_proxy", "--server", server, "--port", str(port),
                   *(f"--upstream={name}={upstreams[name]}" for name in VARIANTS)]
        process = self._spawn(f"{kind}-floor-{server}", command, f"http://{HOST}:{port}/healthz")
        return Target(name=f"{kind} balancer ({FLOOR_LABELS[server]})", kind=kind, hop="balancer",
                      url=f"http://{HOST}:{port}{PREDICT_PATH}", proxy_pid=process.pid,
                      backend_pids=backend_pids, command=tuple(command))

    def nginx_proxy(self, kind: str, upstreams: Mapping[str, str], backend_pids: tuple[int, ...], *,
                    workers: int = 1, priority: int | None = None) -> Target:
        """Start nginx (`workers` workers at niceness `priority`, sticky 50/50 on X-User-ID, upstream keep-alive);
        ready after `ready()`."""
        suffix = ("" if workers == 1 else f"-{workers}-workers") + ("" if priority is None else f"-priority{priority}")
        prefix = self.workdir / f"nginx-{kind}{suffix}"
        port = free_port()
        config = render_nginx_config(listen=f"{HOST}:{port}", upstreams={name: [upstreams[name]] for name in VARIANTS},
                                     weights=WEIGHTS, strategy="sticky", workers=workers, priority=priority)
        write_nginx_prefix(prefix, config)
        command = nginx_command(self.nginx, prefix)
        process = self._spawn(f"nginx-{kind}{suffix}", command, f"http://{HOST}:{port}/healthz")
        label = ", ".join([*([] if workers == 1 else [workers_label(workers)]),
                           *([] if priority is None else [priority_label(priority)])])
        return Target(name=f"{kind} nginx" + (f" ({label})" if label else ""), kind=kind, hop="nginx",
                      url=f"http://{HOST}:{port}{PREDICT_PATH}",
                      proxy_pid=process.pid, backend_pids=backend_pids, command=tuple(command))

    def ready(self) -> None:
        """Wait until every process started since the last call answers its readiness URL."""
        pending, self._pending = self._pending, []
        for name, process, ready_url, log in pending:
            try:
                wait_http(ready_url, timeout=60, process=process)
            except (RuntimeError, TimeoutError) as exc:
                raise BenchError(f"{name} did not start ({exc}); its log {log} ends with:\n{tail(log)}") from exc
            logger.info("started %s (pid %d)", name, process.pid)

    def _spawn(self, name: str, command: list[str], ready_url: str,
               environment: Mapping[str, str] | None = None, cwd: Path = REPO) -> subprocess.Popen[bytes]:
        log = self.workdir / f"{name}.log"
        with open(log, "ab") as output:
            process = subprocess.Popen(command, cwd=cwd, stdout=output, stderr=subprocess.STDOUT,
                                       env={**os.environ, **(environment or {})})
        self._exit.callback(stop, process)
        self._pending.append((name, process, ready_url, log))
        return process


def check_split(target: Target, body: bytes, requests: int = 40) -> None:
    """POST a few requests through a proxy: every one must succeed, and both variants must answer."""
    seen: Counter[str] = Counter()
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    for user in range(requests):
        request = urllib.request.Request(target.url, data=body, method="POST", headers={
            "Content-Type": "application/json", "X-User-ID": f"user-{user}"})
        try:
            with opener.open(request, timeout=10) as response:
                seen[response.headers.get("X-Variant", "?")] += 1
        except OSError as exc:
            raise BenchError(f"{target.name} at {target.url} failed a sanity request: {exc}") from exc
    if set(seen) != set(VARIANTS):
        raise BenchError(f"{target.name} split {requests} users as {dict(seen)}; expected both of {VARIANTS}")


def sample_body(artifacts: Path) -> bytes:
    """The request body: the first held-out row, as the model servers expect it."""
    holdout_file = artifacts / "holdout.json"
    try:
        holdout = json.loads(holdout_file.read_text())
    except FileNotFoundError as exc:
        raise BenchError(f"{holdout_file} is missing: run `make train` first") from exc
    return json.dumps({"instances": [holdout["X"][0]]}).encode()


def tail(path: Path, lines: int = 15) -> str:
    """The last lines of a log file."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log)"
