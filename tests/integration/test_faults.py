"""Fault injection with real processes on loopback: keep serving, lose nothing answered, let nobody pin a slot.

Every test starts no-op backends and the balancer as subprocesses, drives traffic
bounded in count and time, injects one fault and prints what it measured:

    .venv/bin/python -m pytest -s tests/integration/test_faults.py
"""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import sqlite3
import subprocess
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import aiohttp
import httptools
import pytest

from balancer.assignment import choose_variant
from balancer.config import Experiment, load_experiment
from tests.processes import REPO, free_port, running, stop, write_experiment

NOOP = str(REPO / "tests" / "noop_backend.py")


def report(case: str, message: str) -> None:
    """One line of numbers per test, visible with `pytest -s`."""
    print(f"\n[faults] {case}: {message}")


# --- processes ------------------------------------------------------------------

@dataclass
class Cluster:
    """No-op backends and one balancer, all subprocesses on loopback."""

    tmp: Path
    config: Path
    store: Path
    ports: dict[str, list[int]]
    stack: ExitStack
    backends: dict[int, subprocess.Popen[bytes]] = field(default_factory=dict)
    balancer: subprocess.Popen[bytes] | None = None
    url: str = ""
    admin: str = ""

    def start_backend(self, variant: str, port: int, delay_ms: float = 0) -> None:
        """Start (or restart) the no-op backend of `variant` on `port`."""
        self.backends[port] = self.stack.enter_context(running(
            [NOOP, "--port", str(port), "--name", variant, "--delay-ms", str(delay_ms)],
            f"http://127.0.0.1:{port}/healthz", log=self.tmp / f"{variant}-{port}.log"))

    def start_balancer(self, config: Path | None = None) -> None:
        """Start a balancer on fresh ports over this cluster's (or another) config and store."""
        port, admin_port = free_port(), free_port()
        self.balancer = self.stack.enter_context(running(
            ["-m", "balancer", "serve", "--config", str(config or self.config), "--port", str(port),
             "--admin-port", str(admin_port), "--store", str(self.store)],
            f"http://127.0.0.1:{admin_port}/healthz", log=self.tmp / "balancer.log"))
        self.url, self.admin = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{admin_port}"

    def kill_backend(self, port: int) -> None:
        """SIGKILL one backend."""
        self.backends[port].kill()
        self.backends[port].wait()

    @cached_property
    def experiment(self) -> Experiment:
        """The experiment as the balancer read it at start."""
        return load_experiment(self.config).experiment

    def expected_variant(self, user: str) -> str:
        """The sticky variant of `user` under the config."""
        return choose_variant(user, self.experiment)


def settings_yaml(section: str, values: dict[str, Any]) -> str:
    """A YAML `section:` block of scalar settings."""
    return f"{section}:\n" + "".join(f"  {key}: {value}\n" for key, value in values.items()) if values else ""


@contextmanager
def cluster(tmp: Path, *, replicas: dict[str, int] | None = None, upstream: dict[str, Any] | None = None,
            server: dict[str, Any] | None = None, delays: dict[str, float] | None = None,
            absent: tuple[tuple[str, int], ...] = ()) -> Iterator[Cluster]:
    """Backends (`replicas` per variant, `absent` (variant, index) not started) behind one balancer."""
    replicas = replicas or {"model_a": 1, "model_b": 1}
    ports = {variant: [free_port() for _ in range(count)] for variant, count in replicas.items()}
    server = dict(server or {})
    flush = server.pop("flush_interval_s", 0.1)
    config = write_experiment(tmp / "exp.yaml", ports=ports, extra=settings_yaml("upstream", upstream or {}),
                              server="".join(f"  {key}: {value}\n" for key, value in server.items()))
    config.write_text(config.read_text().replace("flush_interval_s: 0.1", f"flush_interval_s: {flush}"))
    with ExitStack() as stack:
        nodes = Cluster(tmp, config, tmp / "outcomes.db", ports, stack)
        for variant, variant_ports in ports.items():
            for index, port in enumerate(variant_ports):
                if (variant, index) not in absent:
                    nodes.start_backend(variant, port, (delays or {}).get(variant, 0))
        nodes.start_balancer()
        yield nodes


# --- traffic --------------------------------------------------------------------

@dataclass(frozen=True)
class Answer:
    """What the client saw for one request (status 0: no HTTP answer at all)."""

    user: str
    status: int
    variant: str | None
    request_id: str | None
    seconds: float
    at: float  # when it was sent, seconds after the load started
    body: Any
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class Load:
    """The answers of one load run and when its fault was injected."""

    answers: list[Answer]
    fault_at: float | None = None
    fault_result: Any = None
    seconds: float = 0.0

    def where(self, predicate: Callable[[Answer], bool]) -> list[Answer]:
        """The answers matching `predicate`."""
        return [answer for answer in self.answers if predicate(answer)]

    def summary(self, answers: list[Answer] | None = None) -> str:
        """Request count, statuses and latency percentiles."""
        answers = self.answers if answers is None else answers
        latencies = sorted(answer.seconds for answer in answers if answer.status)
        statuses = dict(sorted(Counter(answer.status for answer in answers).items()))
        if not latencies:
            return f"{len(answers)} requests, statuses {statuses}"
        p50, p99 = (latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000 for q in (0.5, 0.99))
        return f"{len(answers)} requests, statuses {statuses}, p50 {p50:.1f} ms, p99 {p99:.1f} ms"


async def drive(url: str, *, seconds: float, concurrency: int = 6, max_requests: int = 20_000, users: int = 400,
                headers: dict[str, str] | None = None, fault: Callable[[], Any] | None = None,
                fault_after: float = 1.0) -> Load:
    """Sticky users POST /predict until `seconds` or `max_requests`; `fault()` runs once, in a thread, after `fault_after`."""
    load = Load([])
    started = time.monotonic()
    deadline = started + seconds
    numbers = itertools.count()

    async def worker(session: aiohttp.ClientSession) -> None:
        while time.monotonic() < deadline and (number := next(numbers)) < max_requests:
            user = f"user-{number % users}"
            sent = time.monotonic()
            try:
                async with session.post(f"{url}/predict", json={"instances": [[1.0]]},
                                        headers={"X-User-ID": user, **(headers or {})}) as reply:
                    raw = await reply.read()
                    try:
                        body = json.loads(raw)
                    except ValueError:
                        body = raw
                    load.answers.append(Answer(user, reply.status, reply.headers.get("X-Variant"),
                                               reply.headers.get("X-Request-ID"), time.monotonic() - sent,
                                               sent - started, body, dict(reply.headers)))
            except (TimeoutError, aiohttp.ClientError) as exc:
                load.answers.append(Answer(user, 0, None, None, time.monotonic() - sent, sent - started, type(exc).__name__))
                await asyncio.sleep(0.05)  # the balancer is gone or going: do not spin

    async def inject() -> None:
        if fault is None:
            return
        await asyncio.sleep(fault_after)
        load.fault_at = time.monotonic() - started
        load.fault_result = await asyncio.to_thread(fault)

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        await asyncio.gather(inject(), *(worker(session) for _ in range(concurrency)))
    load.seconds = time.monotonic() - started
    return load


async def get_json(url: str) -> Any:
    """GET a JSON document."""
    async with aiohttp.ClientSession() as session, session.get(url) as reply:
        return await reply.json()


async def in_flight(nodes: Cluster) -> float:
    """The balancer's in-flight gauge, from /metrics."""
    async with aiohttp.ClientSession() as session, session.get(f"{nodes.admin}/metrics") as reply:
        text = await reply.text()
    return float(re.search(r"^balancer_in_flight_requests (\S+)$", text, re.MULTILINE).group(1))  # type: ignore[union-attr]


def stored(store: Path, query: str) -> list[tuple[Any, ...]]:
    """Rows of a query on the outcome store."""
    with sqlite3.connect(store) as connection:
        return connection.execute(query).fetchall()


def wait_stored(store: Path, request_ids: set[str], timeout: float = 5.0) -> set[str]:
    """The stored request ids, once they include `request_ids` (or the timeout passed)."""
    deadline = time.monotonic() + timeout
    while True:
        ids = {row[0] for row in stored(store, "SELECT request_id FROM requests")}
        if request_ids <= ids or time.monotonic() > deadline:
            return ids
        time.sleep(0.05)


# --- (a)-(c) replicas and variants going down -----------------------------------------------

async def test_a_replica_killed_mid_load_costs_no_client_error(tmp_path: Path) -> None:
    with cluster(tmp_path, replicas={"model_a": 2, "model_b": 2}) as nodes:
        victim = nodes.ports["model_b"][0]
        load = await drive(nodes.url, seconds=2.5, fault=lambda: nodes.kill_backend(victim))
        endpoints = {endpoint["address"]: endpoint for endpoint in await get_json(f"{nodes.admin}/admin/upstreams")}
    after = load.where(lambda answer: answer.at > load.fault_at + 0.1)
    state = endpoints[f"127.0.0.1:{victim}"]
    report("(a) one of two model_b replicas SIGKILLed", f"{load.summary()}; after the kill: "
           f"{load.summary(after)}, {Counter(a.variant for a in after)}; victim failures {state['failures']}, "
           f"available {state['available']}")
    assert {answer.status for answer in load.answers} == {200}, load.summary()
    assert Counter(answer.variant for answer in after)["model_b"] > 50
    assert not state["available"]


async def test_b_variant_down_with_fallback_serves_the_control_and_logs_every_fallback(tmp_path: Path) -> None:
    with cluster(tmp_path, upstream={"on_variant_down": "fallback"}) as nodes:
        load = await drive(nodes.url, seconds=2.5, fault=lambda: nodes.kill_backend(nodes.ports["model_b"][0]))
        answered = {answer.request_id for answer in load.answers if answer.request_id}
        stored_ids = wait_stored(nodes.store, answered)
        logged = dict(stored(nodes.store, "SELECT request_id, variant FROM requests WHERE assignment = 'fallback'"))
        fallbacks = load.where(lambda answer: nodes.expected_variant(answer.user) == "model_b" and answer.variant == "model_a")
    report("(b) model_b killed, on_variant_down: fallback", f"{load.summary()}; {len(fallbacks)} answered by the "
           f"control for model_b users, {len(logged)} rows with assignment='fallback'")
    assert {answer.status for answer in load.answers} == {200}, load.summary()
    assert answered <= stored_ids
    assert len(fallbacks) > 50
    assert set(logged) == {answer.request_id for answer in fallbacks}  # every fallback logged, no other
    assert set(logged.values()) == {"model_b"}  # logged under the variant the user was assigned
    assert all(answer.body["model"] == "model_a" for answer in fallbacks)


async def test_c_variant_down_with_fail_answers_503_only_to_its_users(tmp_path: Path) -> None:
    with cluster(tmp_path, upstream={"on_variant_down": "fail"}) as nodes:
        load = await drive(nodes.url, seconds=2.5, fault=lambda: nodes.kill_backend(nodes.ports["model_b"][0]))
        users_of = {variant: load.where(lambda answer, v=variant: nodes.expected_variant(answer.user) == v)
                    for variant in ("model_a", "model_b")}
    failed = [answer for answer in users_of["model_b"] if answer.status != 200]
    report("(c) model_b killed, on_variant_down: fail", f"model_a users: {load.summary(users_of['model_a'])}; "
           f"model_b users: {load.summary(users_of['model_b'])}; the first 503 was sent "
           f"{min((a.at for a in failed), default=0) - load.fault_at:+.3f} s from the kill")
    assert {answer.status for answer in users_of["model_a"]} == {200}
    assert {answer.status for answer in users_of["model_b"]} == {200, 503}
    assert len(failed) > 50
    for answer in failed:
        assert answer.variant == "model_b" and answer.body["variant"] == "model_b"
        assert "model_b" in answer.body["error"] and "down" in answer.body["error"]


# --- (d)-(e) the balancer itself going down ------------------------------------------------

async def test_d_sigterm_under_load_exits_0_and_stores_every_answered_request(tmp_path: Path) -> None:
    with cluster(tmp_path) as nodes:
        balancer = nodes.balancer
        assert balancer is not None
        load = await drive(nodes.url, seconds=2.5, fault=lambda: stop(balancer))
        answered = {answer.request_id for answer in load.answers if answer.status == 200}
        stored_ids = {row[0] for row in stored(nodes.store, "SELECT request_id FROM requests")}
    cut = Counter(answer.body for answer in load.answers if answer.status == 0)
    report("(d) SIGTERM under load", f"exit code {load.fault_result}; {load.summary()}; {len(answered)} answered, "
           f"{len(answered & stored_ids)} of them stored, {len(stored_ids - answered)} stored but not received; "
           f"after the signal the client saw {dict(cut)}")
    assert load.fault_result == 0
    assert len(answered) > 200
    assert answered <= stored_ids
    assert stored_ids == answered  # drained: nothing the balancer processed was cut off before its answer


async def test_e_kill_9_under_load_keeps_the_store_sound_and_loses_at_most_the_flush_window(tmp_path: Path) -> None:
    window = 0.2
    with cluster(tmp_path, server={"flush_interval_s": window}) as nodes:
        balancer = nodes.balancer
        assert balancer is not None
        load = await drive(nodes.url, seconds=2.5, fault_after=1.5, fault=lambda: (balancer.kill(), balancer.wait()))
        integrity = stored(nodes.store, "PRAGMA integrity_check")
        answered = {answer.request_id for answer in load.answers if answer.status == 200}
        stored_ids = {row[0] for row in stored(nodes.store, "SELECT request_id FROM requests")}
        lost = answered - stored_ids
        rate = len(answered) / load.fault_at
        # Unflushed at the kill: what arrived since the last swap, plus the batch being committed.
        bound = rate * (2 * window + 0.2)
        nodes.start_balancer()  # a restart on the same store recovers its WAL and serves again
        after_restart = await drive(nodes.url, seconds=0.5, max_requests=50)
    report("(e) kill -9 under load", f"integrity_check {integrity[0][0]}; {len(answered)} answered at "
           f"{rate:.0f}/s, {len(lost)} not stored = {1000 * len(lost) / rate:.0f} ms of traffic (bound "
           f"{bound:.0f} = rate x (2 x {window} s + 0.2 s)); after a restart: {after_restart.summary()}")
    assert integrity == [("ok",)]
    assert len(answered) > 200
    assert len(lost) <= bound
    assert {answer.status for answer in after_restart.answers} == {200}


# --- (f)-(g) slow and refusing upstreams ------------------------------------------------

async def test_f_slow_upstream_gets_504_on_time_while_the_other_variant_stays_fast(tmp_path: Path) -> None:
    try_timeout = 1.0
    upstream = {"try_timeout_s": try_timeout, "total_timeout_s": 1.5, "eject_after_failures": 1000}
    with cluster(tmp_path, upstream=upstream, delays={"model_b": 5000}) as nodes:
        fast, slow = await asyncio.gather(
            drive(nodes.url, seconds=2.5, concurrency=3, headers={"X-Variant": "model_a"}),
            drive(nodes.url, seconds=2.5, concurrency=6, headers={"X-Variant": "model_b"}),
        )
    slow_latencies = sorted(answer.seconds for answer in slow.answers)
    fast_p99 = sorted(answer.seconds for answer in fast.answers)[int(0.99 * len(fast.answers))]
    report("(f) model_b 5 s slow, try_timeout_s 1.0", f"model_b: {slow.summary()}, 504 after "
           f"{slow_latencies[0]:.2f}-{slow_latencies[-1]:.2f} s; model_a meanwhile: {fast.summary()}")
    assert {answer.status for answer in slow.answers} == {504}
    assert all("did not answer in time" in answer.body["error"] for answer in slow.answers)
    assert try_timeout <= slow_latencies[0] and slow_latencies[-1] < try_timeout + 0.5
    assert {answer.status for answer in fast.answers} == {200} and len(fast.answers) > 100
    assert fast_p99 < try_timeout / 2  # never waits behind the slow variant


async def test_g_refusing_replica_is_ejected_then_readmitted_when_it_returns(tmp_path: Path) -> None:
    upstream = {"health_check_interval_s": 0, "eject_after_failures": 2, "eject_for_s": 1.0}  # passive only
    with cluster(tmp_path, replicas={"model_a": 2, "model_b": 1}, upstream=upstream, absent=(("model_a", 1),)) as nodes:
        refusing = f"127.0.0.1:{nodes.ports['model_a'][1]}"

        async def state() -> dict[str, Any]:
            endpoints = await get_json(f"{nodes.admin}/admin/upstreams")
            return next(endpoint for endpoint in endpoints if endpoint["address"] == refusing)

        forced = {"X-Variant": "model_a"}
        before = await drive(nodes.url, seconds=2.0, concurrency=1, max_requests=20, headers=forced)
        ejected = await state()
        nodes.start_backend("model_a", nodes.ports["model_a"][1])
        returned = time.monotonic()
        during = Load([])
        while time.monotonic() - returned < 6.0:
            during.answers += (await drive(nodes.url, seconds=1.0, concurrency=1, max_requests=5, headers=forced)).answers
            readmitted = await state()
            if not readmitted["ejected"] and readmitted["requests"] > readmitted["failures"]:
                break
            await asyncio.sleep(0.1)
        readmitted_after = time.monotonic() - returned
    report("(g) refusing model_a replica", f"before: {before.summary()}, replica failures {ejected['failures']}, "
           f"ejected {ejected['ejected']}; back after restart in {readmitted_after:.2f} s (eject_for_s 1.0), "
           f"meanwhile {during.summary()}; then requests {readmitted['requests']}, failures {readmitted['failures']}")
    assert {answer.status for answer in before.answers + during.answers} == {200}
    assert ejected["ejected"] and not ejected["available"] and ejected["failures"] >= 2
    assert not readmitted["ejected"] and readmitted["available"]
    assert readmitted["requests"] > readmitted["failures"]
    assert readmitted_after < 3.0


# --- (h)-(j) limits: in flight, body size, slow clients ----------------------------------------

@pytest.fixture(scope="module")
def limited(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """A balancer with small limits; model_b answers after 800 ms."""
    server = {"max_in_flight": 4, "max_body_bytes": 1024, "client_body_timeout_s": 0.5, "client_keepalive_timeout_s": 1.0}
    with cluster(tmp_path_factory.mktemp("limited"), server=server, delays={"model_b": 800}) as nodes:
        yield nodes


async def test_h_overload_beyond_max_in_flight_gets_503_with_retry_after(limited: Cluster) -> None:
    load = await drive(limited.url, seconds=5.0, concurrency=16, max_requests=16, headers={"X-Variant": "model_b"})
    rejected = load.where(lambda answer: answer.status == 503)
    recovered = await drive(limited.url, seconds=2.0, concurrency=1, max_requests=3)
    report("(h) 16 concurrent requests, max_in_flight 4", f"{load.summary()}; then {recovered.summary()}")
    assert {answer.status for answer in load.answers} == {200, 503}
    assert len(load.where(lambda answer: answer.status == 200)) <= 4
    assert all(answer.headers.get("Retry-After") == "1" and "max_in_flight" in answer.body["error"] for answer in rejected)
    assert {answer.status for answer in recovered.answers} == {200}


async def test_i_body_over_max_body_bytes_gets_413(limited: Cluster) -> None:
    async def chunked(size: int) -> Any:
        for _ in range(size // 256):
            yield b"x" * 256

    results = {}
    async with aiohttp.ClientSession() as session:
        for name, path, data in (("1000 bytes", "/predict", b"x" * 1000), ("2048 bytes", "/predict", b"x" * 2048),
                                 ("2048 chunked", "/predict", chunked(2048)), ("2048 feedback", "/feedback", b"x" * 2048)):
            async with session.post(f"{limited.url}{path}", data=data, headers={"X-Variant": "model_a"}) as reply:
                results[name] = (reply.status, await reply.json(content_type=None))
    report("(i) max_body_bytes 1024", ", ".join(f"{name} -> {status}" for name, (status, _) in results.items()))
    assert results["1000 bytes"][0] == 200
    for name in ("2048 bytes", "2048 chunked", "2048 feedback"):
        status, body = results[name]
        assert status == 413 and "max_body_bytes" in body["error"], (name, body)


class _ResponseReader:
    """httptools callbacks collecting one response."""

    def __init__(self) -> None:
        self.headers: list[tuple[str, str]] = []
        self.body = b""
        self.complete = False

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.decode().lower(), value.decode()))

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        self.complete = True


async def raw_exchange(url: str, data: bytes, *, until_answered: bool, wait: float = 5.0) -> tuple[bytes, float]:
    """Send raw bytes; read until one whole response arrived (`until_answered`) or the server closed: (bytes, seconds)."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    started = time.monotonic()
    writer.write(data)
    received = b""
    response = _ResponseReader()
    parser = httptools.HttpResponseParser(response)
    try:
        async with asyncio.timeout(wait):
            while chunk := await reader.read(65536):
                received += chunk
                if until_answered:
                    parser.feed_data(chunk)
                    if response.complete:
                        break
    except TimeoutError:
        pass
    finally:
        writer.close()
    return received, time.monotonic() - started


# The balancer's clock (uvloop's loop.time and timers) counts whole milliseconds, so a timeout
# can end up to a millisecond before the same span measured here with time.monotonic().
CLOCK_SLACK_S = 0.005


async def test_j_stalled_and_idle_clients_time_out_and_free_their_slot(limited: Cluster) -> None:
    stalled_body = (b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n"
                    b"X-Variant: model_a\r\n\r\n{\"instances\"")
    # As many stalled clients as max_in_flight: while they hold every slot, others are turned away...
    stalls = [asyncio.create_task(raw_exchange(limited.url, stalled_body, until_answered=True)) for _ in range(4)]
    await asyncio.sleep(0.2)
    pinned = await drive(limited.url, seconds=1.0, concurrency=1, max_requests=1)
    pinned_gauge = await in_flight(limited)
    answers = await asyncio.gather(*stalls)
    # ...but only for client_body_timeout_s: then they get 408 and the slots are free again.
    freed_gauge = await in_flight(limited)
    served = await drive(limited.url, seconds=1.0, concurrency=1, max_requests=1)
    feedback, feedback_seconds = await raw_exchange(
        limited.url, stalled_body.replace(b"/predict", b"/feedback"), until_answered=True)
    idle, idle_seconds = await raw_exchange(limited.url, b"GET /predict HTTP/1.1\r\nHost: x\r\nX-Variant: model_a\r\n\r\n",
                                              until_answered=False)
    half_headers, half_seconds = await raw_exchange(limited.url, b"GET /predict HTTP/1.1\r\nHost: x\r\n", until_answered=False)
    report("(j) stalled bodies, client_body_timeout_s 0.5, keep-alive 1.0",
           f"4 stalled clients: in flight {pinned_gauge:.0f}, another client got {pinned.summary()}; stalled ones "
           f"answered {sorted({a[0][:12].decode() for a in answers})} after {min(a[1] for a in answers):.2f}-"
           f"{max(a[1] for a in answers):.2f} s, then in flight {freed_gauge:.0f} and {served.summary()}; stalled "
           f"feedback {feedback[:12].decode()!r} after {feedback_seconds:.2f} s; idle keep-alive closed after "
           f"{idle_seconds:.2f} s, half-sent headers closed after {half_seconds:.2f} s")
    assert {answer.status for answer in pinned.answers} == {503} and pinned_gauge == 4
    for received, seconds in answers:
        assert received.startswith(b"HTTP/1.1 408 ") and b"client_body_timeout_s" in received
        assert 0.5 - CLOCK_SLACK_S <= seconds < 2.0
    assert freed_gauge == 0 and {answer.status for answer in served.answers} == {200}
    assert feedback.startswith(b"HTTP/1.1 408 ") and feedback_seconds < 2.0
    assert idle.startswith(b"HTTP/1.1 200 ") and 1.0 - CLOCK_SLACK_S <= idle_seconds < 3.0  # answered, then closed when idle
    assert half_headers == b"" and 1.0 - CLOCK_SLACK_S <= half_seconds < 3.0


# --- (k) an upstream that speaks hop-by-hop ---------------------------------------------------

async def read_response(reader: asyncio.StreamReader) -> _ResponseReader:
    """Parse exactly one HTTP/1.1 response off a connection."""
    response = _ResponseReader()
    parser = httptools.HttpResponseParser(response)
    async with asyncio.timeout(5):
        while not response.complete:
            parser.feed_data(await reader.read(1))  # byte by byte: never read into the next response
    response.headers.append((":status", str(parser.get_status_code())))
    return response


HOP_RESPONSE = (  # two interim responses first, as an aiohttp app answering `Expect` or a CDN would send
    b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n"
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: keep-alive, Upgrade, X-Hop-Secret\r\n"
    b"X-Hop-Secret: internal\r\nKeep-Alive: timeout=5\r\nUpgrade: h2c\r\nProxy-Authenticate: Basic\r\n"
    b"Trailer: X-Checksum\r\nX-End-To-End: kept\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"9\r\n{\"model\":\r\n8\r\n \"hops\"}\r\n0\r\nX-Checksum: 42\r\n\r\n"
)


async def test_k_hop_by_hop_headers_are_stripped_both_ways_and_the_body_reframed(tmp_path: Path) -> None:
    received: list[tuple[bytes, bytes]] = []

    async def misbehaving(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = re.search(rb"(?im)^content-length: *(\d+)", head)
                received.append((head, await reader.readexactly(int(length.group(1))) if length else b""))
                writer.write(HOP_RESPONSE)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    upstream = await asyncio.start_server(misbehaving, "127.0.0.1", 0)
    upstream_port = upstream.sockets[0].getsockname()[1]
    config = write_experiment(tmp_path / "exp.yaml", ports={"model_a": [upstream_port], "model_b": [upstream_port]},
                              extra=settings_yaml("upstream", {"health_check_interval_s": 0}))
    port, admin_port = free_port(), free_port()
    with ExitStack() as stack:
        await asyncio.to_thread(stack.enter_context, running(
            ["-m", "balancer", "serve", "--config", str(config), "--port", str(port), "--admin-port", str(admin_port),
             "--store", str(tmp_path / "outcomes.db")], f"http://127.0.0.1:{admin_port}/healthz",
            log=tmp_path / "balancer.log"))
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        body = b'{"instances": [[1.0]]}'
        writer.write(  # a chunked request carrying the client's own hop-by-hop headers
            b"POST /predict HTTP/1.1\r\nHost: x\r\nConnection: keep-alive, X-Client-Hop\r\nX-Client-Hop: secret\r\n"
            b"Keep-Alive: 300\r\nTE: trailers\r\nProxy-Authorization: Basic Zm9v\r\nTransfer-Encoding: chunked\r\n"
            b"X-User-ID: hop-user\r\n\r\n" + b"%x\r\n" % len(body) + body + b"\r\n0\r\n\r\n")
        first = await read_response(reader)
        writer.write(b"GET /predict HTTP/1.1\r\nHost: x\r\n\r\n")  # same connection: the framing held
        second = await read_response(reader)
        # A strict client: sends the body only after the balancer's 100 Continue.
        writer.write(b"POST /predict HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: %d\r\n\r\n" % len(body))
        async with asyncio.timeout(2):
            interim = await reader.readuntil(b"\r\n\r\n")
        writer.write(body)
        third = await read_response(reader)
        writer.close()
    upstream.close()
    names = [name for name, _ in first.headers]
    upstream_head, upstream_body = received[0]
    upstream_names = {line.split(b":")[0].strip().lower() for line in upstream_head.split(b"\r\n")[1:] if b":" in line}
    report("(k) hop-by-hop upstream, 100 + 103 before each answer", f"client got headers {sorted(set(names))} and body {first.body!r}; "
           f"upstream got headers {sorted(name.decode() for name in upstream_names)}")
    assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
    for response in (first, second, third):
        headers = dict(response.headers)
        assert headers[":status"] == "200" and response.body == b'{"model": "hops"}'
        assert [name for name, _ in response.headers].count("content-length") == 1
        assert headers["content-length"] == str(len(response.body))
        assert not {"transfer-encoding", "x-hop-secret", "keep-alive", "upgrade", "proxy-authenticate", "trailer",
                    "x-checksum"} & set(headers)
        assert "x-hop-secret" not in headers.get("connection", "").lower()
        assert headers["x-end-to-end"] == "kept" and headers["x-variant"] in ("model_a", "model_b")
    assert not {b"connection", b"x-client-hop", b"keep-alive", b"te", b"proxy-authorization",
                b"transfer-encoding"} & upstream_names
    assert not any(re.search(rb"(?im)^expect:", head) for head, _ in received)  # the balancer has the body already
    assert upstream_body == body and re.search(rb"(?im)^content-length: %d\r$" % len(body), upstream_head)
    assert b"x-forwarded-for" in upstream_names and b"x-request-id" in upstream_names


# --- (l) who may force a variant ------------------------------------------------------------

async def test_l_override_header_obeys_the_switch_and_the_trusted_sources(tmp_path: Path) -> None:
    cases = {  # server setting -> may a loopback client force a variant?
        "allow_override_header: false": False,
        "trusted_override_sources: [10.0.0.0/8]": False,  # the X-Forwarded-For sent below must not fool it
        "trusted_override_sources: [127.0.0.1/32]": True,
    }
    seen = {}
    with cluster(tmp_path) as nodes:
        user = next(f"override-{i}" for i in itertools.count() if nodes.expected_variant(f"override-{i}") == "model_a")
        async with aiohttp.ClientSession() as session:
            for number, (setting, allowed) in enumerate(cases.items()):
                config = tmp_path / f"override-{number}.yaml"
                config.write_text(nodes.config.read_text() + f"  {setting}\n")
                await asyncio.to_thread(nodes.start_balancer, config)
                headers = {"X-User-ID": user, "X-Variant": "model_b", "X-Forwarded-For": "10.1.2.3"}
                async with session.post(f"{nodes.url}/predict", json={}, headers=headers) as reply:
                    status, variant, request_id = reply.status, reply.headers["X-Variant"], reply.headers["X-Request-ID"]
                async with session.post(f"{nodes.url}/predict", json={}, headers={"X-Variant": "no-such-variant"}) as reply:
                    invalid = reply.status
                wait_stored(nodes.store, {request_id})
                logged = stored(nodes.store, f"SELECT variant, assignment FROM requests WHERE request_id = '{request_id}'")
                seen[setting] = (status, variant, logged[0][1], invalid)
                assert status == 200
                assert (variant, *logged[0]) == (("model_b", "model_b", "forced") if allowed else ("model_a", "model_a", "sticky"))
                assert invalid == (400 if allowed else 200)  # an ignored header is not even validated
    report("(l) X-Variant: model_b from 127.0.0.1 with X-Forwarded-For: 10.1.2.3",
           "; ".join(f"{setting} -> {status} {variant} ({kind}), unknown X-Variant -> {invalid}"
                     for setting, (status, variant, kind, invalid) in seen.items()))
