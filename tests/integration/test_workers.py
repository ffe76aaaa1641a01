"""`server.workers: 2`: a supervisor and two worker processes on one public port (balancer/supervisor.py)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.processes import REPO, NoopStack, noop_stack, stop, write_experiment
ID_PREFIX_CHARS = 10  # balancer/proxy.py: a request id starts with its process's random 5-byte prefix, in hex


Pool = NoopStack


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pool]:
    with noop_stack(tmp_path_factory.mktemp("workers"), server="  workers: 2\n") as stack:
        yield stack


async def predict(pool: Pool, user: str) -> tuple[int, str, str]:
    """One request on a connection of its own (so the kernel may hand it to either worker): status, id, variant."""
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session:
        async with session.post(f"{pool.url}/predict", json={"instances": [[1.0]]}, headers={"X-User-ID": user}) as reply:
            await reply.read()
            return reply.status, reply.headers["X-Request-ID"], reply.headers["X-Variant"]


async def admin_json(pool: Pool, path: str) -> dict:
    async with aiohttp.ClientSession() as session, session.get(f"{pool.admin}{path}") as reply:
        assert reply.status == 200, await reply.text()
        return await reply.json()


async def served_2xx(pool: Pool) -> float:
    async with aiohttp.ClientSession() as session, session.get(f"{pool.admin}/metrics") as reply:
        text = await reply.text()
    return sum(sample.value for family in text_string_to_metric_families(text) if family.name == "balancer_requests"
               for sample in family.samples
               if sample.name == "balancer_requests_total" and sample.labels["status_class"] == "2xx")


async def test_connections_are_spread_over_both_workers_and_counted_once(pool: Pool) -> None:
    before = await served_2xx(pool)
    answers = [await predict(pool, f"spread-{index}") for index in range(60)]
    assert {status for status, _, _ in answers} == {200}
    prefixes = {request_id[:ID_PREFIX_CHARS] for _, request_id, _ in answers}
    assert len(prefixes) == 2, prefixes  # 60 connections, both workers: all on one has probability 2**-59
    assert await served_2xx(pool) - before == 60  # the supervisor's /metrics sums both workers


async def test_feedback_reaches_any_worker_and_the_report_counts_every_request(pool: Pool) -> None:
    answers = [await predict(pool, f"feedback-{index}") for index in range(30)]
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session:
        for _, request_id, variant in answers:  # at once: often before the worker that answered committed it
            async with session.post(f"{pool.url}/feedback", json={"request_id": request_id, "value": 1}) as reply:
                assert reply.status == 202, await reply.text()
                assert (await reply.json())["variant"] == variant
        started = time.monotonic()
        async with session.post(f"{pool.url}/feedback", json={"request_id": "unknown-id", "value": 1}) as reply:
            assert reply.status == 404
        assert time.monotonic() - started < 5
    report = await admin_json(pool, "/report.json")  # flushes every worker first
    with sqlite3.connect(pool.store) as connection:
        stored = dict(connection.execute("SELECT variant, COUNT(*) FROM requests GROUP BY variant").fetchall())
        with_feedback = connection.execute(
            f"SELECT COUNT(*) FROM feedback WHERE request_id IN ({','.join('?' * len(answers))})",
            [request_id for _, request_id, _ in answers]).fetchone()[0]
    assert {variant["name"]: variant["requests"] for variant in report["variants"]} == stored
    assert with_feedback == len(answers)


async def test_a_config_edit_reaches_every_worker_with_one_version(pool: Pool) -> None:
    original = pool.config.read_text()
    version = (await admin_json(pool, "/admin/experiment"))["version"]
    try:
        write_experiment(pool.config, ports=pool.ports, weights={"model_a": 0, "model_b": 100}, server="  workers: 2\n")
        deadline = time.monotonic() + 10
        while [worker["health"]["version"] for worker in (await admin_json(pool, "/healthz"))["workers"]] != [version + 1] * 2:
            assert time.monotonic() < deadline, "the edit did not reach both workers"
            await asyncio.sleep(0.1)
        assert (await admin_json(pool, "/admin/experiment"))["version"] == version + 1
        variants = {variant for _, _, variant in [await predict(pool, f"edit-{index}") for index in range(30)]}
        assert variants == {"model_b"}
    finally:
        pool.config.write_text(original)
        deadline = time.monotonic() + 10
        while (await admin_json(pool, "/admin/experiment"))["version"] != version + 2:
            assert time.monotonic() < deadline, "the restored file was not applied"
            await asyncio.sleep(0.1)
    with sqlite3.connect(pool.store) as connection:
        versions = [row[0] for row in connection.execute("SELECT version FROM configs ORDER BY version")]
    assert versions == list(range(1, version + 3))  # stored once each, by the supervisor


async def test_a_worker_that_does_not_take_a_version_is_replaced_and_serves_it(pool: Pool) -> None:
    """A worker that cannot answer a pushed config (stopped here) is replaced: every worker serves one version."""
    health = await admin_json(pool, "/healthz")
    version = health["version"]
    stuck = health["workers"][0]
    original = pool.config.read_text()
    os.kill(stuck["pid"], signal.SIGSTOP)
    try:
        write_experiment(pool.config, ports=pool.ports, weights={"model_a": 30, "model_b": 70}, server="  workers: 2\n")
        deadline = time.monotonic() + 20  # the watch notices the edit, the push waits APPLY_TIMEOUT_S (5 s)
        while (await admin_json(pool, "/healthz"))["workers"][0]["ready"]:
            assert time.monotonic() < deadline, "the stuck worker was not given up on"
            await asyncio.sleep(0.2)
        degraded = await admin_json(pool, "/healthz")  # answered at once, though one worker hangs
        assert degraded["status"] == "degraded" and degraded["version"] == version + 1
    finally:
        os.kill(stuck["pid"], signal.SIGCONT)  # the SIGTERM it was sent now arrives: it drains and exits
    deadline = time.monotonic() + 30
    while True:
        workers = (await admin_json(pool, "/healthz"))["workers"]
        if all(worker["ready"] and worker["health"] and worker["health"]["version"] == version + 1 for worker in workers):
            break
        assert time.monotonic() < deadline, f"not every worker serves version {version + 1}: {workers}"
        await asyncio.sleep(0.2)
    assert workers[0]["pid"] != stuck["pid"] and workers[0]["restarts"] == stuck["restarts"] + 1
    assert workers[0]["last_exit"] == 0  # it stopped cleanly, its log flushed
    assert workers[1]["pid"] == health["workers"][1]["pid"]  # the other one kept serving
    pool.config.write_text(original)
    deadline = time.monotonic() + 10
    while (await admin_json(pool, "/admin/experiment"))["version"] != version + 2:
        assert time.monotonic() < deadline, "the restored file was not applied"
        await asyncio.sleep(0.1)


async def test_a_worker_that_dies_is_started_again_with_the_current_config(pool: Pool) -> None:
    health = await admin_json(pool, "/healthz")
    victim, restarts = health["workers"][0]["pid"], health["workers"][0]["restarts"]
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while True:
        health = await admin_json(pool, "/healthz")
        first = health["workers"][0]
        if first["pid"] != victim and first["ready"] and first["health"] is not None:
            break
        assert time.monotonic() < deadline, health
        await asyncio.sleep(0.1)
    assert first["restarts"] == restarts + 1 and first["last_exit"] == -signal.SIGKILL
    assert first["health"]["version"] == health["version"]
    assert {status for status, _, _ in [await predict(pool, f"after-{index}") for index in range(20)]} == {200}
    async with aiohttp.ClientSession() as session, session.get(f"{pool.admin}/metrics") as reply:
        assert f"balancer_worker_restarts_total {restarts + 1:.1f}" in await reply.text()


def send_predictions(stack: NoopStack, users: list[str]) -> None:
    for user in users:
        request = urllib.request.Request(f"{stack.url}/predict", data=b'{"instances": [[1.0]]}',
                                         headers={"X-User-ID": user})
        with urllib.request.urlopen(request, timeout=5) as reply:
            assert reply.status == 200


def worker_pids(stack: NoopStack) -> list[int]:
    with urllib.request.urlopen(f"{stack.admin}/healthz", timeout=5) as reply:
        return [worker["pid"] for worker in json.load(reply)["workers"]]


def stored_units(store: Path, pattern: str) -> int:
    with sqlite3.connect(store) as connection:
        return int(connection.execute("SELECT COUNT(*) FROM requests WHERE unit_id LIKE ?", (pattern,)).fetchone()[0])


def test_sigterm_stops_every_worker_after_it_flushed_its_log(tmp_path: Path) -> None:
    with noop_stack(tmp_path, serve_args=("--workers", "3")) as stack:
        pids = worker_pids(stack)
        assert len(pids) == 3
        send_predictions(stack, [f"term-{index}" for index in range(30)])
        assert stop(stack.process) == 0
    assert not any(map(alive, pids))
    assert stored_units(stack.store, "term-%") == 30


def test_a_worker_count_out_of_range_is_refused(tmp_path: Path) -> None:
    config = write_experiment(tmp_path / "exp.yaml", ports={"model_a": [1], "model_b": [2]}, server="  workers: 0\n")
    completed = subprocess.run([sys.executable, "-m", "balancer", "serve", "--config", str(config)], cwd=REPO,
                               capture_output=True, text=True, timeout=60)
    assert completed.returncode == 2
    assert "server.workers" in completed.stderr and "0" in completed.stderr
    config = write_experiment(tmp_path / "exp.yaml", ports={"model_a": [1], "model_b": [2]})
    completed = subprocess.run([sys.executable, "-m", "balancer", "serve", "--config", str(config), "--workers", "65"],
                               cwd=REPO, capture_output=True, text=True, timeout=60)
    assert completed.returncode == 2 and "--workers 65: must be between 1 and 64" in completed.stderr
    completed = subprocess.run([sys.executable, "-m", "balancer", "serve", "--config", str(config), "--workers", "many"],
                               cwd=REPO, capture_output=True, text=True, timeout=60)
    assert completed.returncode == 2 and "--workers: 'many': a whole number, or auto" in completed.stderr


def alive(pid: int) -> bool:
    """Running (a zombie left to an init that does not reap counts as gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def test_workers_flush_and_stop_when_their_supervisor_is_killed(tmp_path: Path) -> None:
    with noop_stack(tmp_path, server="  workers: 2\n") as stack:
        pids = worker_pids(stack)
        send_predictions(stack, [f"orphan-{index}" for index in range(20)])
        stack.process.kill()
        stack.process.wait()
        deadline = time.monotonic() + 30
        while any(map(alive, pids)):
            assert time.monotonic() < deadline, "workers outlived their supervisor"
            time.sleep(0.1)
    assert stored_units(stack.store, "orphan-%") == 20  # each worker flushed its log on the way out


def test_a_public_port_another_process_holds_stops_the_start_with_a_clear_error(tmp_path: Path) -> None:
    config = write_experiment(tmp_path / "exp.yaml", ports={"model_a": [1], "model_b": [2]})
    with socket.socket() as holder:  # a plain listener: no SO_REUSEPORT, so nobody can share its port
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        completed = subprocess.run([sys.executable, "-m", "balancer", "serve", "--config", str(config), "--port",
                                    str(port), "--admin-port", "0", "--store", str(tmp_path / "o.db"), "--workers", "2"],
                                   cwd=REPO, capture_output=True, text=True, timeout=60)
    assert completed.returncode == 1
    assert "cannot start" in completed.stderr and "Address already in use" in completed.stderr
    assert "worker 0 started" not in completed.stderr  # refused before any worker
