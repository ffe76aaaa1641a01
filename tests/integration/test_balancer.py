"""The balancer in front of the two real model servers, all as processes on loopback."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import sqlite3
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families
from scipy.stats import binomtest

from tests.processes import REPO, artifacts_dir, free_port, running, write_experiment


@dataclass(frozen=True)
class Stack:
    url: str
    admin: str
    store: Path
    rows: list[list[float]]
    labels: list[int]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("stack")
    artifacts = artifacts_dir()
    port_a, port_b, port, admin_port = free_port(), free_port(), free_port(), free_port()
    config = write_experiment(tmp / "exp.yaml", ports={"model_a": [port_a], "model_b": [port_b]})
    store = tmp / "outcomes.db"
    holdout = json.loads((artifacts / "holdout.json").read_text())
    model_args = ["--artifacts", str(artifacts)]
    with (
        running(["-m", "model_a", "--port", str(port_a), *model_args], f"http://127.0.0.1:{port_a}/readyz", log=tmp / "a.log"),
        running(["-m", "model_b", "--port", str(port_b), *model_args], f"http://127.0.0.1:{port_b}/readyz", log=tmp / "b.log"),
        running(["-m", "balancer", "serve", "--config", str(config), "--port", str(port), "--admin-port", str(admin_port),
                 "--store", str(store)], f"http://127.0.0.1:{admin_port}/healthz", log=tmp / "balancer.log"),
    ):
        yield Stack(f"http://127.0.0.1:{port}", f"http://127.0.0.1:{admin_port}", store, holdout["X"], holdout["y"])


async def predict(session: aiohttp.ClientSession, stack: Stack, row: int, headers: dict[str, str]) -> tuple[int, dict[str, str], dict]:
    async with session.post(f"{stack.url}/predict", json={"instances": [stack.rows[row]]}, headers=headers) as reply:
        return reply.status, dict(reply.headers), await reply.json()


async def drive(stack: Stack, users: list[str], concurrency: int = 16) -> list[tuple[str, str, int, dict]]:
    """One request per user id; returns (user, variant, status, body)."""
    results: list[tuple[str, str, int, dict]] = []
    async with aiohttp.ClientSession() as session:
        async def worker(chunk: list[tuple[int, str]]) -> None:
            for index, user in chunk:
                status, headers, body = await predict(session, stack, index % len(stack.rows), {"X-User-ID": user})
                results.append((user, headers["X-Variant"], status, {**body, "request_id": headers["X-Request-ID"]}))
        items = list(enumerate(users))
        await asyncio.wait_for(asyncio.gather(*(worker(items[i::concurrency]) for i in range(concurrency))), 120)
    return results


def store_rows(stack: Stack, query: str, expected: int | None = None, timeout: float = 5.0) -> list[tuple]:
    """Run a query on the store, waiting for the writer to flush up to `expected` rows."""
    deadline = time.monotonic() + timeout
    while True:
        with sqlite3.connect(stack.store) as connection:
            rows = connection.execute(query).fetchall()
        if expected is None or len(rows) >= expected or time.monotonic() > deadline:
            return rows
        time.sleep(0.05)


async def test_split_follows_weights_and_every_request_is_stored(stack: Stack) -> None:
    users = [f"split-{uuid.uuid4().hex}" for _ in range(2000)]
    results = await drive(stack, users)
    assert {status for _, _, status, _ in results} == {200}
    counts = Counter(variant for _, variant, _, _ in results)
    assert set(counts) == {"model_a", "model_b"}
    # the 50/50 split, judged by an exact binomial test rather than a fixed band
    assert binomtest(counts["model_a"], len(results), 0.5).pvalue > 1e-3
    # answers are real predictions from the model the header names
    assert all(body["model"] == variant and body["predictions"][0] in (0, 1) for _, variant, _, body in results)
    ids = {body["request_id"] for _, _, _, body in results}
    stored = store_rows(stack, "SELECT request_id, variant, assignment, status, unit_id FROM requests WHERE unit_id LIKE 'split-%'", 2000)
    assert len(stored) == 2000
    by_id = {row[0]: row for row in stored}
    assert set(by_id) == ids
    for user, variant, _, body in results:
        assert by_id[body["request_id"]][1:] == (variant, "sticky", 200, user)


async def test_same_user_always_sees_the_same_variant(stack: Stack) -> None:
    users = [f"sticky-{i}" for i in range(40)] * 5
    results = await drive(stack, users, concurrency=8)
    seen: dict[str, set[str]] = {}
    for user, variant, _, _ in results:
        seen.setdefault(user, set()).add(variant)
    assert all(len(variants) == 1 for variants in seen.values())
    assert {next(iter(v)) for v in seen.values()} == {"model_a", "model_b"}


async def test_override_header_forces_a_variant_and_is_logged(stack: Stack) -> None:
    async with aiohttp.ClientSession() as session:
        for forced in ("model_a", "model_b"):
            status, headers, body = await predict(session, stack, 0, {"X-User-ID": "qa", "X-Variant": forced})
            assert (status, headers["X-Variant"], body["model"]) == (200, forced, forced)
            rows = store_rows(stack, f"SELECT variant, assignment FROM requests WHERE request_id = '{headers['X-Request-ID']}'", 1)
            assert rows == [(forced, "forced")]
        status, _, body = await predict(session, stack, 0, {"X-Variant": "model_z"})
        assert status == 400 and "X-Variant" in body["error"] and "model_z" in body["error"]


async def test_request_id_is_kept_and_requests_without_key_are_marked(stack: Stack) -> None:
    async with aiohttp.ClientSession() as session:
        status, headers, _ = await predict(session, stack, 1, {"X-Request-ID": "caller-id-123"})
        assert status == 200 and headers["X-Request-ID"] == "caller-id-123"
    assert store_rows(stack, "SELECT assignment, unit_id FROM requests WHERE request_id = 'caller-id-123'", 1) == [("random_no_key", None)]


async def test_feedback_joins_even_before_the_record_is_flushed(stack: Stack) -> None:
    async with aiohttp.ClientSession() as session:
        status, headers, body = await predict(session, stack, 2, {"X-User-ID": "fb-user"})
        request_id = headers["X-Request-ID"]
        # immediately: the record is very likely still in the writer's buffer
        async with session.post(f"{stack.url}/feedback", json={"request_id": request_id, "value": 1}) as reply:
            assert reply.status == 202, await reply.text()
        async with session.post(f"{stack.url}/feedback", json={"request_id": "no-such-id", "value": 1}) as reply:
            assert reply.status == 404 and "no-such-id" in (await reply.json())["error"]
        for bad, field in (({"value": 1}, "request_id"), ({"request_id": request_id, "value": "x"}, "value"),
                           ({"request_id": request_id}, "value"), ([1, 2], "object")):
            async with session.post(f"{stack.url}/feedback", json=bad) as reply:
                assert reply.status == 400 and field in (await reply.json())["error"]
        async with session.post(f"{stack.url}/feedback", data=b"{not json") as reply:
            assert reply.status == 400 and "JSON" in (await reply.json())["error"]
    joined = store_rows(stack, f"SELECT r.variant, f.value FROM requests r JOIN feedback f USING (request_id) WHERE request_id = '{request_id}'", 1)
    assert joined == [(headers["X-Variant"], 1.0)]


async def test_metrics_match_the_store(stack: Stack) -> None:
    await drive(stack, [f"metrics-{i}" for i in range(100)])
    async with aiohttp.ClientSession() as session:
        deadline = time.monotonic() + 5
        while True:
            async with session.get(f"{stack.admin}/metrics") as reply:
                text = await reply.text()
            stored = dict(store_rows(stack, "SELECT variant, COUNT(*) FROM requests GROUP BY variant"))
            exported: Counter[str] = Counter()
            for family in text_string_to_metric_families(text):
                if family.name == "balancer_requests":
                    for sample in family.samples:
                        if sample.name == "balancer_requests_total":
                            exported[sample.labels["variant"]] += int(sample.value)
            if dict(exported) == stored or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.1)
    assert dict(exported) == stored
    assert "balancer_request_duration_seconds_bucket" in text
    assert 'balancer_variant_weight{experiment="it-exp",variant="model_b"} 0.5' in text
    assert "balancer_feedback_total" in text


async def test_admin_experiment_shows_version_and_hash(stack: Stack) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{stack.admin}/admin/experiment") as reply:
            described = await reply.json()
        async with session.get(f"{stack.admin}/admin/upstreams") as reply:
            endpoints = await reply.json()
    assert described["version"] >= 1 and len(described["hash"]) == 16
    assert described["weights"] == {"model_a": 50.0, "model_b": 50.0}
    assert {endpoint["variant"] for endpoint in endpoints} == {"model_a", "model_b"}
    assert all(endpoint["healthy"] for endpoint in endpoints)


async def test_live_report_on_the_admin_port(stack: Stack) -> None:
    users = [f"report-{i}" for i in range(200)]
    results = await drive(stack, users)
    async with aiohttp.ClientSession() as session:
        for _, _, _, body in results[:150]:
            async with session.post(f"{stack.url}/feedback", json={"request_id": body["request_id"], "value": 1}) as reply:
                assert reply.status == 202
        async with session.get(f"{stack.admin}/report.json") as reply:
            assert reply.status == 200
            report = await reply.json()
        async with session.get(f"{stack.admin}/report") as reply:
            assert reply.status == 200 and reply.content_type == "text/html"
            page = await reply.text()
    assert report["experiment"] == "it-exp"
    by_name = {variant["name"]: variant for variant in report["variants"]}
    assert set(by_name) == {"model_a", "model_b"}
    stored = dict(store_rows(stack, "SELECT variant, COUNT(*) FROM requests GROUP BY variant"))
    assert {name: variant["requests"] for name, variant in by_name.items()} == stored
    assert "srm" in report and "p_value" in report["srm"]
    assert 'id="plot-cumulative-lift"' in page and "model_b" in page


async def test_healthz_says_how_the_request_path_and_the_outcome_log_run(stack: Stack) -> None:
    from balancer import native

    async with aiohttp.ClientSession() as session, session.get(f"{stack.admin}/healthz") as reply:
        health = await reply.json()
    # the served process was started with this test run's environment
    assert health["event_loop"] == "uvloop"
    assert health["request_path"] == native.decide(native.PACKAGE_DIR, os.environ)[1]
    assert health["rejected_records"] == 0 and health["store_writer_restarts"] == 0 and health["store_error"] is None
    assert isinstance(health["pending_records"], int)
    assert health["gc_frozen_objects"] > 10_000  # what start-up created: never traversed again
    # the writer starts with the first flush; on this quiet machine it is never starved
    assert health["store_writer_priority"] == "idle" and health["store_writer_escalations"] == 0


def test_a_port_in_use_exits_1_naming_it_and_closes_cleanly(tmp_path: Path) -> None:
    """A taken port: exit code 1, the address in the message, the session and the store closed."""
    config = write_experiment(tmp_path / "exp.yaml", ports={"model_a": [free_port()], "model_b": [free_port()]})
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run(
            [sys.executable, "-m", "balancer", "serve", "--config", str(config), "--port", str(free_port()),
             "--admin-port", str(port), "--store", str(tmp_path / "outcomes.db")],
            cwd=REPO, capture_output=True, text=True, timeout=60,
        )
    assert done.returncode == 1, done.stderr
    assert f"cannot start: [Errno 98] error while attempting to bind on address ('127.0.0.1', {port})" in done.stderr
    assert "Unclosed" not in done.stderr, done.stderr
    assert "stopped; 0 request records" in done.stderr
