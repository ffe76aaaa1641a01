"""bench/same_core.py: two configurations at once on one core, and how the report reads them."""

from __future__ import annotations

import os
import statistics
from dataclasses import replace
from pathlib import Path

import pytest

from bench import results_file, same_core
from bench.errors import BenchError
from bench.report import render_report
from bench.targets import evaluate_targets
from bench.report_cost import same_core_costs, without_writer_costs
from bench.runs import QUICK
from bench.same_core import CoreShare, SameCorePair, measure_pairs
from bench.stack import Target
from bench.tools import find_tool
from tests.processes import free_port, running
from tests.test_bench import BODY, _results


def _pair(first_us: float, second_us: float, writer_us: float = 0.0) -> SameCorePair:
    requests = 10_000
    return SameCorePair(first=CoreShare(requests=requests, errors=0, cpu_s=first_us * requests / 1e6,
                                        writer_s=writer_us * requests / 1e6),
                        second=CoreShare(requests=requests, errors=0, cpu_s=second_us * requests / 1e6, writer_s=0.0),
                        busy=0.97)


def test_a_pair_costs_the_share_of_cpu_per_request_the_lean_one_saves() -> None:
    pair = _pair(100.0, 88.0, writer_us=4.0)
    assert pair.first.us_per_request == pytest.approx(100.0) and pair.first.writer_us_per_request == pytest.approx(4.0)
    assert pair.cost == pytest.approx(0.12)
    assert same_core_costs([pair]) == pytest.approx([12.0])
    assert without_writer_costs([pair]) == pytest.approx([100 * (1 - 88 / 96)])
    assert _pair(100.0, 110.0).cost == pytest.approx(-0.10)  # the first is the cheaper one


def test_same_core_pairs_give_the_logging_target_its_interval_and_paragraph(tmp_path: Path) -> None:
    results = _results()  # its rounds' medians say 20 %; the same-core pairs take precedence
    results.cost_ratios = [0.5] * 5  # and over back-to-back pairs too
    results.same_core = {
        "default": [_pair(100.0, second, writer_us=3.0) for second in (93.0, 92.0, 94.0, 91.0, 93.5, 92.5)],
        "metrics off": [_pair(100.0, 94.0)] * 5,
        "outcomes off": [_pair(100.0, 99.0), _pair(100.0, 101.0)],
    }
    checks = {check.goal: check for check in evaluate_targets(results)}
    check = checks["throughput cost of outcome logging + metrics (both on one core at once, CPU per request)"]
    assert check.measured == pytest.approx(7.25) and check.met is True and check.established
    assert not any("back-to-back" in goal for goal in checks)
    spared = checks["throughput cost of outcome logging + metrics (the same runs, the store writer on a core of its own)"]
    assert spared.measured == pytest.approx(statistics.median(100 * (1 - second / 97.0) for second in
                                                              (93.0, 92.0, 94.0, 91.0, 93.5, 92.5)))
    assert spared.met is True
    report = render_report(results)
    assert "**Outcome logging + metrics cost 7.2 % of throughput** (target < 10 %; 90 % interval of the median" in report
    assert "so the runs agree to within 3.0 points (6.0 % to 9.0 %)" in report
    assert "The default's store writer ran 3.0 µs per request" in report
    assert ("Each feature alone, measured the same way against the same lean balancer: the outcome log alone 6.0 % "
            "(5 runs, 6.0 % to 6.0 %); metrics alone 0.0 % (2 runs, -1.0 % to 1.0 %).") in report
    assert "In the rounds above (medians), outcome logging + metrics cost 20.0 % of throughput" in report

    path = tmp_path / "BENCHMARKS.json"
    results_file.save(results, path)
    again = results_file.load(path)
    assert again.same_core == results.same_core
    assert render_report(again) == report


def test_one_cpu_is_not_enough(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(same_core, "split_cpus", lambda: None)
    target = Target(name="t", kind="noop", hop="balancer", url="http://127.0.0.1:9/predict", proxy_pid=os.getpid())
    with pytest.raises(BenchError, match="needs two CPUs"):
        measure_pairs(target, target, 1, settings=QUICK, body_file=Path("body.json"), wrk="wrk", seconds=1.0)


@pytest.mark.skipif(find_tool("wrk") is None, reason="wrk not installed")
@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs")
def test_two_servers_share_one_cpu_and_get_their_cpus_back(tmp_path: Path) -> None:
    body_file = tmp_path / "body.json"
    body_file.write_bytes(BODY)
    everywhere = os.sched_getaffinity(0)
    ports = [free_port(), free_port()]
    commands = [["tests/noop_backend.py", "--port", str(port), "--name", f"model_{index}"]
                for index, port in enumerate(ports)]
    with running(commands[0], f"http://127.0.0.1:{ports[0]}/healthz", log=tmp_path / "a.log") as first_process, \
            running(commands[1], f"http://127.0.0.1:{ports[1]}/healthz", log=tmp_path / "b.log") as second_process:
        first, second = (Target(name=f"server {index}", kind="noop", hop="balancer",
                                url=f"http://127.0.0.1:{port}/predict", proxy_pid=process.pid)
                         for index, (port, process) in enumerate(zip(ports, (first_process, second_process))))
        pairs = measure_pairs(first, second, 2, settings=replace(QUICK, connections=8), body_file=body_file,
                              wrk=str(find_tool("wrk")), seconds=1.0)
        assert [os.sched_getaffinity(process.pid) for process in (first_process, second_process)] == [everywhere] * 2
    assert len(pairs) == 2
    for pair in pairs:
        assert pair.first.requests > 100 and pair.second.requests > 100
        assert pair.first.errors == pair.second.errors == 0
        # two identical servers: neither costs much more than the other per request
        assert abs(pair.cost) < 0.35
        # both ran on one CPU, which they kept mostly busy and could not exceed
        assert 0.3 < pair.busy <= 1.05
