"""Upstream pools: round-robin, ejection and re-admission, DNS scaling with deferred admission."""

from __future__ import annotations

import asyncio
import socket
import time
from collections import Counter
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from balancer import upstreams as upstreams_module
from balancer.config import Experiment
from balancer.upstreams import UpstreamRegistry


def experiment(**upstream: object) -> Experiment:
    return Experiment.model_validate({
        "name": "exp",
        "variants": [
            {"name": "a", "weight": 1, "upstreams": ["http://replicas-a:8001"]},
            {"name": "b", "weight": 1, "upstreams": ["http://10.0.0.9:8002"]},
        ],
        "upstream": {"eject_after_failures": 2, "eject_for_s": 0.2, **upstream},
    })


@pytest.fixture
def dns(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[str]]:
    """A fake DNS at the event loop's getaddrinfo: host -> addresses, editable by the test.

    Faked below the module (whose functions may be compiled, so a replaced module
    function would go unseen): `upstreams.resolve` runs for real.
    """
    records = {"replicas-a": ["10.0.0.1", "10.0.0.2"]}
    real_getaddrinfo = asyncio.BaseEventLoop.getaddrinfo

    async def getaddrinfo(loop: asyncio.BaseEventLoop, host: str, port: int, **kwargs: Any) -> list[Any]:
        if host in records:
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, port)) for address in records[host]]
        return await real_getaddrinfo(loop, host, port, **kwargs)

    monkeypatch.setattr(asyncio.BaseEventLoop, "getaddrinfo", getaddrinfo)
    return records


async def test_every_address_is_an_endpoint_chosen_round_robin(dns: dict[str, list[str]]) -> None:
    registry = UpstreamRegistry(experiment().upstream)
    await registry.configure(experiment())
    picks = Counter(registry.variants["a"].pick().address for _ in range(10))  # type: ignore[union-attr]
    assert picks == {"10.0.0.1:8001": 5, "10.0.0.2:8001": 5}
    first = registry.variants["a"].pick()
    assert registry.variants["a"].pick(exclude=[first]) is not first  # type: ignore[list-item]
    await registry.close()


async def test_ejection_after_consecutive_failures_and_readmission(dns: dict[str, list[str]]) -> None:
    registry = UpstreamRegistry(experiment().upstream)
    await registry.configure(experiment())
    bad = registry.variants["a"].endpoints[0]
    registry.record_failure(bad)
    assert bad.available(time.monotonic())  # one failure: still in rotation
    registry.record_failure(bad)
    assert not bad.available(time.monotonic())
    assert {registry.variants["a"].pick().address for _ in range(6)} == {"10.0.0.2:8001"}  # type: ignore[union-attr]
    await asyncio.sleep(0.25)
    # half-open: exactly one trial request goes to it
    picks = [registry.variants["a"].pick() for _ in range(4)]
    assert picks.count(bad) == 1
    registry.record_failure(bad)  # the trial failed: ejected again at once
    assert not bad.available(time.monotonic())
    await asyncio.sleep(0.25)
    assert registry.variants["a"].pick(exclude=[registry.variants["a"].endpoints[1]]) is bad
    registry.record_success(bad)  # the trial passed: closed again
    assert bad.available(time.monotonic()) and bad.consecutive_failures == 0
    await registry.close()


async def test_a_variant_with_no_available_endpoint_is_down(dns: dict[str, list[str]]) -> None:
    registry = UpstreamRegistry(experiment().upstream)
    await registry.configure(experiment())
    for endpoint in registry.variants["a"].endpoints:
        registry.record_failure(endpoint)
        registry.record_failure(endpoint)
    assert registry.variants["a"].pick() is None
    await registry.close()


async def test_scaled_replicas_join_after_a_passing_health_check(dns: dict[str, list[str]]) -> None:
    healthy = {"ok": False}

    async def healthz(request: web.Request) -> web.Response:
        return web.Response(status=200 if healthy["ok"] else 503)

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    dns["replicas-a"] = ["127.0.0.3"]  # the first replica (nothing is sent to it here)
    config = Experiment.model_validate({
        "name": "exp",
        "variants": [
            {"name": "a", "weight": 1, "upstreams": [f"http://replicas-a:{server.port}"]},
            {"name": "b", "weight": 1, "upstreams": ["http://127.0.0.1:9"]},
        ],
        "upstream": {"health_check_interval_s": 0},
    })
    registry = UpstreamRegistry(config.upstream)
    await registry.configure(config)
    async with aiohttp.ClientSession() as session:
        registry.start(session)
        known = registry.variants["a"].endpoints[0]
        dns["replicas-a"] = ["127.0.0.3", "127.0.0.1"]  # a second replica appears, still starting
        await registry.refresh_dns()
        endpoints = {endpoint.pool.host: endpoint for endpoint in registry.variants["a"].endpoints}
        assert endpoints["127.0.0.3"] is known and len(endpoints) == 2
        new = endpoints["127.0.0.1"]
        assert not new.available(time.monotonic())
        assert {registry.variants["a"].pick() for _ in range(4)} == {known}
        healthy["ok"] = True
        for _ in range(40):
            if new.healthy:
                break
            await asyncio.sleep(0.1)
        assert new.available(time.monotonic())
        dns["replicas-a"] = ["127.0.0.1"]  # the first replica goes away
        await registry.refresh_dns()
        assert registry.variants["a"].endpoints == [new]
        await registry.close()
    await server.close()


async def test_a_single_replica_is_picked_while_in_rotation_and_trialled_once_after_ejection(dns: dict[str, list[str]]) -> None:
    registry = UpstreamRegistry(experiment().upstream)
    await registry.configure(experiment())
    only = registry.variants["b"]
    endpoint = only.endpoints[0]
    assert [only.pick() for _ in range(3)] == [endpoint] * 3
    registry.record_failure(endpoint)
    registry.record_failure(endpoint)
    assert only.pick() is None and only.pick(exclude=[endpoint]) is None
    await asyncio.sleep(0.25)
    assert only.pick() is endpoint and only.pick() is None  # half-open: one trial at a time
    registry.record_success(endpoint)
    assert only.pick() is endpoint
    endpoint.healthy = False  # failed its active health check
    assert only.pick() is None
    await registry.close()


async def test_a_host_name_that_cannot_be_encoded_does_not_resolve() -> None:
    assert await upstreams_module.resolve("127..0.1", 8001) == []  # getaddrinfo raises UnicodeError for it
