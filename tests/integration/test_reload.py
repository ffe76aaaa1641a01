"""Live experiments: reload under load with zero dropped requests, lifecycle, admin token."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

from tests.processes import REPO, NoopStack, free_port, noop_stack, running, stop, write_experiment

NOOP = str(REPO / "tests" / "noop_backend.py")


Live = NoopStack


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    with noop_stack(tmp_path_factory.mktemp("live"), weights={"model_a": 90, "model_b": 10}) as stack:
        yield stack


async def admin(session: aiohttp.ClientSession, live: Live, method: str, path: str, **kwargs: object) -> tuple[int, dict]:
    async with session.request(method, f"{live.admin}{path}", **kwargs) as reply:
        return reply.status, await reply.json()


def valid_body(live: Live, weight_b: int) -> str:
    write_experiment(live.config.with_suffix(".tmp"), ports=live.ports, weights={"model_a": 100 - weight_b, "model_b": weight_b})
    return live.config.with_suffix(".tmp").read_text()


INVALID_EDITS = [
    (lambda body: body.replace("seed: 42", "seed: [42"), "invalid YAML"),
    (lambda body: body.replace("weight: 50", "weight: -50"), "weight = -50"),
    (lambda body: body.replace("seed: 42", "seed: 42\nstrategy_typo: x"), "unknown key 'strategy_typo'"),
    (lambda body: re.sub(r"http://127\.0\.0\.1:\d+", "http://127.0.0.1:1", body, count=1), "unreachable"),
    (lambda body: body.replace("sticky_key: header:X-User-ID", "sticky_key: nowhere"), "sticky_key = 'nowhere'"),
]


async def test_fifty_rewrites_under_load_drop_nothing(live: Live) -> None:
    """Valid and invalid configs alternately, while traffic flows: zero failures, every change accounted for."""
    statuses: Counter[int] = Counter()
    request_ids: list[str] = []
    stop_load = asyncio.Event()

    async def load(session: aiohttp.ClientSession, worker: int) -> None:
        deadline = time.monotonic() + 90
        i = 0
        while not stop_load.is_set() and time.monotonic() < deadline:
            i += 1
            try:
                async with session.post(f"{live.url}/predict", json={"instances": [[1.0]]},
                                        headers={"X-User-ID": f"w{worker}-{i % 50}"}) as reply:
                    await reply.read()
                    statuses[reply.status] += 1
                    request_ids.append(reply.headers["X-Request-ID"])
            except aiohttp.ClientError:
                statuses[0] += 1

    async with aiohttp.ClientSession() as session:
        _, before = await admin(session, live, "GET", "/admin/experiment")
        workers = [asyncio.create_task(load(session, w)) for w in range(6)]
        applied_versions: list[int] = []
        try:
            await rewrite_fifty_times(session, live, applied_versions)
        finally:
            stop_load.set()
            await asyncio.gather(*workers)
        async with session.get(f"{live.admin}/metrics") as reply:
            metrics = await reply.text()

    assert applied_versions == list(range(before["version"] + 1, before["version"] + 26))
    assert statuses[200] > 300 and set(statuses) == {200}, statuses
    assert "balancer_config_reload_failures_total" in metrics
    failures = [line for line in metrics.splitlines() if line.startswith("balancer_config_reload_failures_total")]
    assert float(failures[0].split()[-1]) >= 25
    # every answered request is in the store, tagged with the version it ran under
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        with sqlite3.connect(live.store) as connection:
            stored = dict(connection.execute("SELECT request_id, config_version FROM requests").fetchall())
        if set(request_ids) <= set(stored):
            break
        await asyncio.sleep(0.1)
    assert set(request_ids) <= set(stored)
    versions = {stored[request_id] for request_id in request_ids}
    assert len(versions) > 5 and versions <= set(applied_versions) | {before["version"]}
    with sqlite3.connect(live.store) as connection:
        configs = {row[0] for row in connection.execute("SELECT version FROM configs")}
    assert set(applied_versions) <= configs


async def rewrite_fifty_times(session: aiohttp.ClientSession, live: Live, applied_versions: list[int]) -> None:
    """Write 50 configs, valid and invalid alternately, reloading after each."""
    for step in range(50):
        weight_b = 11 + step  # the fixture starts at 10: every valid step is a real change
        body = valid_body(live, weight_b)
        if step % 2:
            edit, reason = INVALID_EDITS[(step // 2) % len(INVALID_EDITS)]
            body = edit(body.replace("weight: %d" % (100 - weight_b), "weight: 50", 1))
        live.config.write_text(body)
        status, result = await admin(session, live, "POST", "/admin/reload")
        _, state = await admin(session, live, "GET", "/admin/experiment")
        if step % 2:
            assert status == 422, result
            assert reason in result["message"] and str(live.config) in result["message"]
            assert reason in state["last_error"]
            assert state["version"] == applied_versions[-1]  # the running config stayed
        else:
            assert status == 200 and result["applied"], result
            assert state["weights"]["model_b"] == weight_b and state["last_error"] is None
            applied_versions.append(state["version"])
        await asyncio.sleep(0.02)


async def test_file_watch_and_sighup_reload(live: Live) -> None:
    async with aiohttp.ClientSession() as session:
        _, before = await admin(session, live, "GET", "/admin/experiment")
        live.config.write_text(valid_body(live, 33))
        for _ in range(50):  # the watcher polls twice a second
            _, state = await admin(session, live, "GET", "/admin/experiment")
            if state["version"] > before["version"]:
                break
            await asyncio.sleep(0.1)
        assert state["weights"]["model_b"] == 33
        # SIGHUP: write without letting the watcher see it first is racy, so accept either trigger
        live.config.write_text(valid_body(live, 44))
        live.process.send_signal(signal.SIGHUP)
        for _ in range(50):
            _, state = await admin(session, live, "GET", "/admin/experiment")
            if state["weights"]["model_b"] == 44:
                break
            await asyncio.sleep(0.1)
        assert state["weights"]["model_b"] == 44 and state["version"] == before["version"] + 2


async def test_pause_and_stop_through_the_admin_api(live: Live) -> None:
    live.config.write_text(valid_body(live, 50))
    async with aiohttp.ClientSession() as session:
        await admin(session, live, "POST", "/admin/reload")

        async def variants_seen() -> Counter[tuple[str, str]]:
            seen: Counter[tuple[str, str]] = Counter()
            for i in range(40):
                async with session.post(f"{live.url}/predict", json={}, headers={"X-User-ID": f"life-{i}"}) as reply:
                    seen[(reply.headers["X-Variant"], (await reply.json())["model"])] += 1
            return seen

        assert set(await variants_seen()) == {("model_a", "model_a"), ("model_b", "model_b")}
        status, result = await admin(session, live, "POST", "/admin/status", json={"status": "paused"})
        assert status == 200 and result["experiment"]["status"] == "paused"
        assert set(await variants_seen()) == {("model_a", "model_a")}  # the control
        assert "status: paused" in live.config.read_text()
        status, result = await admin(session, live, "POST", "/admin/status", json={"status": "stopped"})
        assert status == 400 and "winner" in result["error"]
        status, result = await admin(session, live, "POST", "/admin/status", json={"status": "stopped", "winner": "model_b"})
        assert status == 200
        assert set(await variants_seen()) == {("model_b", "model_b")}
        status, _ = await admin(session, live, "POST", "/admin/status", json={"status": "running"})
        assert status == 200 and "winner" not in live.config.read_text()
        assert len(await variants_seen()) == 2
    with sqlite3.connect(live.store) as connection:
        kinds = {row[0] for row in connection.execute("SELECT DISTINCT assignment FROM requests WHERE unit_id IS NULL")}
    assert {"paused", "winner"} <= kinds


def test_admin_beyond_loopback_requires_a_token(tmp_path: Path) -> None:
    ports = {"a": [free_port()], "b": [free_port()]}
    config = write_experiment(tmp_path / "exp.yaml", ports=ports)
    admin_port = free_port()
    args = ["-m", "balancer", "serve", "--config", str(config), "--port", str(free_port()),
            "--admin-host", "0.0.0.0", "--admin-port", str(admin_port), "--store", str(tmp_path / "o.db")]
    refused = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=60,
                             env={k: v for k, v in os.environ.items() if k != "BALANCER_ADMIN_TOKEN"})
    assert refused.returncode == 2 and "BALANCER_ADMIN_TOKEN" in refused.stderr
    with running(args, f"http://127.0.0.1:{admin_port}/healthz", log=tmp_path / "b.log",
                 env={"BALANCER_ADMIN_TOKEN": "s3cret"}) as process:
        import urllib.error
        import urllib.request

        with pytest.raises(urllib.error.HTTPError) as error:
            urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/admin/experiment", timeout=5)
        assert error.value.code == 401
        request = urllib.request.Request(f"http://127.0.0.1:{admin_port}/admin/experiment",
                                         headers={"Authorization": "Bearer s3cret"})
        with urllib.request.urlopen(request, timeout=5) as reply:
            assert reply.status == 200
        assert stop(process) == 0
