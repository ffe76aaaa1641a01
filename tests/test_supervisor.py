"""balancer/supervisor.py: one /metrics and one /admin/upstreams from several workers; workers that do not take a version."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from balancer.metrics import BalancerMetrics
from balancer.supervisor import Worker, WorkerError, Workers, merge_expositions, merge_upstreams


def worker_exposition(requests: int, seconds: float, in_flight: int, weight: float) -> str:
    metrics = BalancerMetrics(CollectorRegistry())
    children = metrics.children("exp", "a")
    for _ in range(requests):
        children.observe(200, seconds)
    metrics.in_flight.set(in_flight)
    metrics.weight.labels("exp", "a").set(weight)
    metrics.config_version.set(3)
    return generate_latest(metrics.registry).decode()


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def test_counters_and_histograms_add_up_and_shared_gauges_do_not() -> None:
    first, second = worker_exposition(3, 0.002, 4, 0.5), worker_exposition(5, 0.2, 1, 0.5)
    merged = samples(merge_expositions([first, second]).decode())
    ones, twos = samples(first), samples(second)
    requests = ("balancer_requests_total", (("experiment", "exp"), ("status_class", "2xx"), ("variant", "a")))
    assert ones[requests] == 3 and twos[requests] == 5 and merged[requests] == 8
    bucket = ("balancer_request_duration_seconds_bucket", (("experiment", "exp"), ("le", "0.005"), ("variant", "a")))
    assert (ones[bucket], twos[bucket], merged[bucket]) == (3, 0, 3)
    count = ("balancer_request_duration_seconds_count", (("experiment", "exp"), ("variant", "a")))
    assert merged[count] == 8
    assert merged[("balancer_in_flight_requests", ())] == 5  # each worker's own: summed
    assert merged[("balancer_variant_weight", (("experiment", "exp"), ("variant", "a")))] == 0.5  # the same in each
    assert merged[("balancer_config_version", ())] == 3
    assert set(merged) == set(ones)  # nothing lost, nothing invented


def test_created_is_the_earliest_and_a_series_only_one_worker_has_is_kept() -> None:
    first = "# TYPE x counter\nx_total{k=\"1\"} 2.0\nx_created{k=\"1\"} 100.0\n"
    second = "# TYPE x counter\nx_total{k=\"1\"} 3.0\nx_created{k=\"1\"} 50.0\nx_total{k=\"2\"} 7.0\n"
    merged = samples(merge_expositions([first, second]).decode())
    assert merged == {("x_total", (("k", "1"),)): 5.0, ("x_created", (("k", "1"),)): 50.0, ("x_total", (("k", "2"),)): 7.0}


def test_upstreams_sum_their_counters_and_are_healthy_only_if_healthy_everywhere() -> None:
    def endpoint(requests: int, healthy: bool, ejected: bool) -> dict[str, object]:
        return {"variant": "a", "url": "http://127.0.0.1:1", "address": "127.0.0.1:1", "requests": requests,
                "failures": 1, "healthy": healthy, "ejected": ejected, "available": healthy and not ejected,
                "idle_connections": 2}
    merged = merge_upstreams([[endpoint(10, True, False)], [endpoint(5, False, True)]])
    assert merged == [{"variant": "a", "url": "http://127.0.0.1:1", "address": "127.0.0.1:1", "requests": 15,
                       "failures": 2, "healthy": False, "ejected": True, "available": False, "idle_connections": 4}]


def test_each_address_a_host_name_resolves_to_stays_its_own_upstream() -> None:
    def endpoint(address: str, requests: int) -> dict[str, object]:
        return {"variant": "b", "url": "http://model_b:8002", "address": address, "requests": requests, "failures": 0,
                "healthy": True, "ejected": False, "available": True, "idle_connections": 1}
    first, second = endpoint("172.23.0.3:8002", 4), endpoint("172.23.0.5:8002", 6)  # `--scale model_b=2`
    merged = merge_upstreams([[first, second], [endpoint("172.23.0.3:8002", 1), endpoint("172.23.0.5:8002", 2)]])
    assert [(entry["address"], entry["requests"], entry["available"]) for entry in merged] == [
        ("172.23.0.3:8002", 5, True), ("172.23.0.5:8002", 8, True)]
    # a replica only the first worker has resolved yet: listed, healthy there, not available to all the traffic
    merged = merge_upstreams([[first, second], [endpoint("172.23.0.3:8002", 1)]])
    assert [(entry["address"], entry["healthy"], entry["available"]) for entry in merged] == [
        ("172.23.0.3:8002", True, True), ("172.23.0.5:8002", True, False)]


async def test_a_starting_worker_that_does_not_take_the_version_is_killed_and_not_counted_ready(tmp_path: Path) -> None:
    workers = Workers(1, ["serve"], drain_timeout_s=1.0, registry=CollectorRegistry())
    (worker,) = workers.workers
    worker.process = subprocess.Popen(["sleep", "60"])  # stands in for a worker that answers /healthz only
    worker.socket_path.touch()
    workers.active = SimpleNamespace(version=7)  # type: ignore[assignment]
    pushed = []

    async def answer(target: object, method: str, path: str, document: object = None, **options: object) -> str:
        return "{}"

    async def refuse(target: object, active: object) -> bool:
        pushed.append(active)
        return False

    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(workers, "_call", answer)
            patch.setattr(workers, "_push_one", refuse)
            with pytest.raises(WorkerError, match="worker 0 did not take config version 7; killed"):
                await workers._become_ready(worker)
        assert pushed == [workers.active]
        assert worker.process.wait(timeout=5) == -signal.SIGKILL and not worker.ready
    finally:
        if worker.process.poll() is None:
            worker.process.kill()
        await workers.stop()


async def test_a_ready_worker_that_does_not_take_a_pushed_version_is_stopped_to_be_started_again(tmp_path: Path) -> None:
    workers = Workers(2, ["serve"], drain_timeout_s=1.0, registry=CollectorRegistry())
    for worker in workers.workers:
        worker.process = subprocess.Popen(["sleep", "60"])
        worker.ready = True
    taken = {workers.workers[0].index: True, workers.workers[1].index: False}

    async def push_one(target: Worker, active: object) -> bool:
        return taken[target.index]

    active = SimpleNamespace(version=8, loaded=SimpleNamespace(body="name: x\n"))
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(workers, "_push_one", push_one)
            await workers.push(active)  # type: ignore[arg-type]
        kept, replaced = workers.workers
        assert kept.ready and kept.process is not None and kept.process.poll() is None
        assert not replaced.ready and replaced.replacing is not None
        await replaced.replacing  # SIGTERM ends `sleep` at once
        assert replaced.process is not None and replaced.process.returncode == -signal.SIGTERM
        assert workers.config_copy.read_text() == "name: x\n"  # what the watch starts it again from
    finally:
        await workers.stop()
