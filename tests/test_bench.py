"""The benchmark harness: wrk output, CPU accounting, nginx config, report; the fixed-rate client on loopback."""

from __future__ import annotations

import asyncio
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from balancer import native
from balancer.config import parse_experiment
from bench import backend_cost, openloop, results_file, tail_episodes, tools
from bench.__main__ import main as bench_main
from bench.errors import BenchError
from bench.instructions import KINDS as INSTRUCTION_KINDS
from bench.instructions import drive
from bench.instructions import parse_annotated as instruction_functions
from bench.nginx import (
    nginx_command,
    render_nginx_config,
    split_percentages,
    write_nginx_prefix,
)
from bench.procstat import (
    CLOCK_TICKS_PER_SECOND,
    CpuUsage,
    busy_seconds,
    cpu_between,
    descendants,
    machine_times,
    microseconds_per_request,
    parse_stat,
    pinned_apart,
    process_tree,
    serving_waits,
    snapshot,
    split_cpus,
    steal_share,
    tree_cpu_between,
    wait_between,
)
from bench.loop_stalls import WRITERS, Stalls
from bench.profile import Profile, parse_collapsed
from bench.report import render_report
from bench.report_tail import steal_correlation
from bench.results import BenchResults
from bench.targets import Check, evaluate_targets
from bench.runs import (FULL, QUICK, FixedRateSample, SaturationSample, measure_fixed_rate, openloop_command, paired_samples,
                        throughput_ratio)
from bench.stack import (ASYNCIO_LABEL, FEATURE_CONFIGURATIONS, INTERPRETED_LABEL, BalancerOptions, Target,
                         balancer_yaml)
from bench.tools import ensure_tools, find_tool
from bench.wrk import parse_wrk_output, wrk_command, wrk_environment
from tests.processes import REPO, free_port, running

WRK_STDOUT = """\
Running 4s test @ http://127.0.0.1:19010/predict
  2 threads and 64 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency    26.75ms   11.52ms  98.15ms   83.52%
    Req/Sec     1.22k   339.46     2.21k    73.75%
  9821 requests in 4.05s, 2.55MB read
Requests/sec:   2426.69
Transfer/sec:    644.59KB
BENCH_JSON {"requests": 9821, "duration_us": 4047084, "bytes": 2671312, "connect_errors": 0, "read_errors": 1, \
"write_errors": 0, "status_errors": 3, "timeouts": 2, "latency_p50_us": 24584, "latency_p99_us": 80978, \
"latency_max_us": 98152}
"""
# /proc/<pid>/stat of a process whose name holds a space and a ')': utime 250, stime 40 ticks
STAT_LINE = ("4242 (nginx: worker) x) S 4241 4241 4241 0 -1 4194624 2000 0 0 0 250 40 0 0 20 0 1 0 "
             "1000 100000000 2000 18446744073709551615 1 1 0 0 0 0 0 4096 0 0 0 0 17 1 0 0 0 0 0\n")


def test_wrk_summary_line_is_parsed_and_errors_summed() -> None:
    result = parse_wrk_output(WRK_STDOUT)
    assert (result.requests, result.errors) == (9821, 6)
    assert result.seconds == pytest.approx(4.047084)
    assert result.requests_per_second == pytest.approx(2426.7, abs=0.1)
    assert (result.p50_ms, result.p99_ms) == (pytest.approx(24.584), pytest.approx(80.978))


def test_wrk_output_without_summary_line_is_an_error_showing_the_output() -> None:
    with pytest.raises(BenchError, match="Usage: wrk"):
        parse_wrk_output("Usage: wrk <options> <url>\n")


def test_wrk_command_rounds_seconds_up_and_environment_names_the_spread() -> None:
    command = wrk_command("http://127.0.0.1:1/predict", threads=2, connections=64, seconds=0.5)
    assert command[:7] == ["wrk", "-t", "2", "-c", "64", "-d", "1s"]
    assert command[-1] == "http://127.0.0.1:1/predict"
    environment = wrk_environment(body_file=Path("b.json"), users=10, spread=("127.0.0.1:1", "127.0.0.1:2"))
    assert environment == {"BENCH_BODY_FILE": "b.json", "BENCH_USERS": "10", "BENCH_TARGETS": "127.0.0.1:1,127.0.0.1:2"}


def test_stat_parsing_survives_odd_command_names() -> None:
    times = parse_stat(STAT_LINE)
    assert (times.pid, times.parent_pid, times.user_ticks, times.system_ticks) == (4242, 4241, 250, 40)
    assert times.cpu_ticks == 290
    with pytest.raises(ValueError, match="not a /proc"):
        parse_stat("garbage")


def test_cpu_accounting_over_a_fake_proc_tree(tmp_path: Path) -> None:
    def write(pid: int, parent: int, user: int, system: int) -> None:
        (tmp_path / str(pid)).mkdir(exist_ok=True)
        (tmp_path / str(pid) / "stat").write_text(
            f"{pid} (proc {pid}) S {parent} 1 1 0 -1 0 0 0 0 0 {user} {system} 0 0 20 0 1 0 1 1 1\n")

    write(100, 1, 10, 5)   # nginx master
    write(101, 100, 200, 100)  # its worker
    write(200, 1, 999, 999)  # unrelated
    (tmp_path / "self").mkdir()
    assert process_tree(100, tmp_path) == [100, 101]
    before = snapshot([100, 101, 555], tmp_path)  # 555 does not exist
    assert {pid: times.cpu_ticks for pid, times in before.items()} == {100: 15, 101: 300}
    write(101, 100, 300, 150)
    used = cpu_between(before, snapshot([100, 101], tmp_path))
    assert (used.user_s, used.system_s) == (100 / CLOCK_TICKS_PER_SECOND, 50 / CLOCK_TICKS_PER_SECOND)
    assert used.system_share == pytest.approx(1 / 3)
    assert microseconds_per_request(1.5, 10_000) == pytest.approx(150.0)
    assert math.isnan(microseconds_per_request(1.0, 0))


def test_a_tree_whose_child_was_replaced_counts_the_old_childs_end_and_the_new_one_in_full(tmp_path: Path) -> None:
    def write(pid: int, parent: int, user: int, system: int, children: tuple[int, int] = (0, 0)) -> None:
        (tmp_path / str(pid)).mkdir(exist_ok=True)
        (tmp_path / str(pid) / "stat").write_text(
            f"{pid} (python) S {parent} 1 1 0 -1 0 0 0 0 0 {user} {system} {children[0]} {children[1]} 20 0 1 0 1 1 1\n")

    write(100, 1, 1000, 500)  # a balancer
    write(101, 100, 40, 10)  # its store writer
    (tmp_path / "self").mkdir()
    before = snapshot(process_tree(100, tmp_path), tmp_path)
    assert before[100].children_user_ticks == 0
    # the writer used 30 + 5 ticks more, was killed and reaped (its 70 + 15 land in the balancer's
    # cutime and cstime); its replacement used 20 + 4 from its start
    write(100, 1, 1300, 600, children=(70, 15))
    (tmp_path / "101" / "stat").unlink()
    (tmp_path / "101").rmdir()
    write(102, 100, 20, 4)
    total, writers = tree_cpu_between(100, before, snapshot(process_tree(100, tmp_path), tmp_path))
    ticks = CLOCK_TICKS_PER_SECOND
    assert (total.user_s, total.system_s) == pytest.approx(((300 + 30 + 20) / ticks, (100 + 5 + 4) / ticks))
    assert (writers.user_s, writers.system_s) == pytest.approx(((30 + 20) / ticks, (5 + 4) / ticks))


def test_descendants_follow_grandchildren_only() -> None:
    assert descendants(1, {2: 1, 3: 2, 4: 9, 5: 3}) == [1, 2, 3, 5]


def test_nginx_config_splits_like_the_balancer() -> None:
    config = render_nginx_config(listen="127.0.0.1:8088", upstreams={"model_a": ["127.0.0.1:9001"], "model_b": [
        "127.0.0.1:9002"]}, weights={"model_a": 50, "model_b": 50}, strategy="sticky")
    assert "worker_processes 1;" in config
    assert "access_log off;" in config
    assert 'split_clients "${http_x_user_id}" $variant {\n        50.00% model_a;\n        * model_b;\n' in config
    assert "upstream model_b {\n        server 127.0.0.1:9002;\n        keepalive 64;" in config
    assert "listen 127.0.0.1:8088 backlog=1024;" in config
    assert "@" not in config  # every placeholder filled
    random = render_nginx_config(listen="127.0.0.1:8088", upstreams={"a": ["h:1"], "b": ["h:2"]},
                                 weights={"a": 1, "b": 3}, strategy="random")
    assert 'split_clients "${request_id}"' in random and "25.00% a;" in random


def test_nginx_config_rejects_what_it_cannot_express() -> None:
    with pytest.raises(ValueError, match="strategy = 'weighted'"):
        render_nginx_config(listen="h:1", upstreams={"a": ["h:2"]}, weights={"a": 1}, strategy="weighted")
    with pytest.raises(ValueError, match="differ"):
        render_nginx_config(listen="h:1", upstreams={"a": ["h:2"]}, weights={"b": 1}, strategy="sticky")
    assert split_percentages({"a": 1, "b": 0, "c": 2}) == [("33.33%", "a"), ("*", "c")]


@pytest.mark.skipif(find_tool("nginx") is None, reason="nginx not installed")
def test_nginx_accepts_the_rendered_config(tmp_path: Path) -> None:
    write_nginx_prefix(tmp_path, render_nginx_config(
        listen="127.0.0.1:1", upstreams={"a": ["127.0.0.1:2"], "b": ["127.0.0.1:3"]}, weights={"a": 1, "b": 1},
        strategy="sticky"))
    nginx = find_tool("nginx")
    assert nginx is not None
    command = nginx_command(nginx, tmp_path)
    checked = subprocess.run([*command[:-2], "-t"], capture_output=True, text=True, timeout=30, check=False)
    assert checked.returncode == 0, checked.stderr


def test_missing_tools_without_root_name_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tools, "find_tool", lambda name: None if name == "wrk" else "/usr/sbin/nginx")
    monkeypatch.setattr(tools.os, "geteuid", lambda: 1000)
    with pytest.raises(BenchError, match=r"wrk not found: install with `sudo apt-get install -y wrk`"):
        ensure_tools()


def test_every_balancer_configuration_is_a_valid_experiment() -> None:
    upstreams = {"model_a": "127.0.0.1:9001", "model_b": "127.0.0.1:9002"}
    for options in FEATURE_CONFIGURATIONS:
        experiment = parse_experiment(balancer_yaml(options, upstreams)).experiment
        assert experiment.strategy == options.strategy
        assert experiment.server.record_outcomes is options.record_outcomes
        assert experiment.server.export_metrics is options.export_metrics
        assert experiment.weights == {"model_a": 50.0, "model_b": 50.0}


def test_collapsed_stacks_count_self_and_total_time_per_function_of_the_main_thread() -> None:
    profile = parse_collapsed("thread (7): MainThread;main (m.py:1);run (r.py:5);send (s.py:9) 3\n"
                              "thread (7): MainThread;main (m.py:1);run (r.py:7) 1\n"
                              "thread (7): MainThread;main (m.py:2);run (r.py:5);run (r.py:6) 2\n"
                              "thread (8): event-log-writer;_write (e.py:3) 4\n")
    assert (profile.samples, dict(profile.thread_samples)) == (6, {"MainThread": 6, "event-log-writer": 4})
    assert profile.self_counts.most_common() == [("send (s.py)", 3), ("run (r.py)", 3)]
    assert profile.total_counts["run (r.py)"] == 6  # counted once per stack even when recursive
    assert "_write (e.py)" not in profile.total_counts
    assert profile.thread_top_frame == {"MainThread": ("send (s.py)", 3), "event-log-writer": ("_write (e.py)", 4)}
    assert parse_collapsed("main (m.py:1);run (r.py:5) 2\n").self_counts == {"run (r.py)": 2}  # without --threads


def fixed_rate_sample(p99_ms: float, *, p50_ms: float = 0.2, errors: int = 0, rate: float = 500) -> FixedRateSample:
    """A fixed-rate run that met its rate, with these percentiles."""
    return FixedRateSample(rate=rate, achieved_rps=rate, completed=int(rate), errors=errors, queued=0, p50_ms=p50_ms,
                           p99_ms=p99_ms, p999_ms=p99_ms, late_ms_p99=0.1, client_cpu_s=0.1)


def fixed_runs(p99s: list[float], hop_cpu_s: float | None, *, rate: float = 500) -> list[FixedRateSample]:
    """Fixed-rate runs of 10 s that met `rate`, one per p99; the hop's processes used `hop_cpu_s` in each."""
    return [FixedRateSample(rate=rate, achieved_rps=rate, completed=int(rate * 10), errors=0, queued=0, p50_ms=0.2,
                            p99_ms=p99, p999_ms=p99, late_ms_p99=0.5, client_cpu_s=0.2, dispatched=int(rate * 11),
                            seconds=10.0, steal=0.0,
                            proxy_cpu=None if hop_cpu_s is None else CpuUsage(user_s=hop_cpu_s, system_s=0.0))
            for p99 in p99s]


def saved_and_loaded(results: BenchResults, folder: Path) -> BenchResults:
    """`results` after a round trip through a results file in `folder`."""
    path = folder / "BENCHMARKS.json"
    results_file.save(results, path)
    return results_file.load(path)


def _results() -> BenchResults:
    def saturation(rps: float, hop_cpu: float | None) -> list[SaturationSample]:
        hop = None if hop_cpu is None else CpuUsage(user_s=hop_cpu * rps * 10 / 1e6 * 0.75,
                                                   system_s=hop_cpu * rps * 10 / 1e6 * 0.25)
        return [SaturationSample(requests=int(rps * 10), seconds=10.0, errors=0, p50_ms=1.0, p99_ms=2.0,
                                 proxy_cpu=hop, backend_cpu=CpuUsage(user_s=0.1, system_s=0.0), steal=0.05,
                                 machine_busy_s=18.0)]

    def fixed(p50: float, p99: float, hop_cpu_s: float | None = None) -> list[FixedRateSample]:
        return [FixedRateSample(rate=500, achieved_rps=500, completed=5000, errors=0, queued=0, p50_ms=p50,
                                p99_ms=p99, p999_ms=p99, late_ms_p99=0.5, client_cpu_s=0.22, dispatched=5500,
                                seconds=11.0, steal=0.04,
                                proxy_cpu=None if hop_cpu_s is None else CpuUsage(user_s=hop_cpu_s, system_s=0.0),
                                backend_cpu=CpuUsage(user_s=0.11, system_s=0.055))]

    targets = [Target(name=f"noop {hop}", kind="noop", hop=hop, url="http://h:1/predict")
               for hop in ("direct", "balancer", "nginx")]
    targets.append(Target(name="noop balancer (outcomes and metrics off)", kind="noop", hop="balancer", url="u"))
    return BenchResults(
        settings=QUICK, quick=True, targets=targets,
        saturation={"noop direct": saturation(10_000, None), "noop balancer": saturation(1_000, 200),
                    "noop nginx": saturation(5_000, 50), "noop balancer (outcomes and metrics off)": saturation(1_250, 150)},
        fixed_rate={"noop direct": fixed(0.3, 2.0), "noop balancer": fixed(0.8, 9.0, 2.2), "noop nginx": fixed(0.5, 3.0, 0.55)},
        rates={"noop": 500.0}, machine={"nproc": "2"}, load_before="1 / 1 / 1", load_after="2 / 1 / 1",
        started=datetime(2026, 1, 1, tzinfo=UTC), seconds=60.0, commands={"harness": "make bench"},
        feature_labels=["default", "outcomes and metrics off"],
    )


def test_targets_say_by_how_much_they_are_missed() -> None:
    checks = {check.goal: check for check in evaluate_targets(_results())}
    assert checks["added latency p50 at half saturation (balancer − direct)"].met is True
    p99 = checks["added latency p99 at half saturation (balancer − direct)"]
    assert (p99.met, p99.shortfall) == (False, "2.00 ms over (1.4× the limit)")
    assert checks["balancer CPU per request, outcome logging + metrics on"].shortfall == "80 µs over (1.7× the limit)"
    assert checks["saturation throughput, balancer / direct"].shortfall == "40 points short"
    assert checks["throughput cost of outcome logging + metrics (medians over rounds)"].shortfall == "10 points over"


def test_the_logging_cost_comes_from_the_paired_runs_when_there_are_some() -> None:
    results = _results()
    results.cost_ratios = [0.97, 0.93, 0.95, 0.80, 0.96]  # median 0.95; the rounds' medians say 20 %
    checks = {check.goal: check for check in evaluate_targets(results)}
    paired = checks["throughput cost of outcome logging + metrics (back-to-back pairs)"]
    assert paired.met is True and paired.measured == pytest.approx(5.0)
    report = render_report(results)
    assert "**Outcome logging + metrics cost 5.0 % of throughput** (target < 10 %): the median over 5 back-to-back" in report
    assert "(the pairs ranged from 3.0 % to 20.0 %)" in report
    assert "In the rounds above (medians), outcome logging + metrics cost 20.0 % of throughput" in report


def test_paired_samples_alternate_the_order_and_ratios_divide_within_each_pair() -> None:
    first, second = (Target(name=name, kind="noop", hop="balancer", url="u") for name in ("full", "lean"))
    order: list[str] = []
    # the machine slows down by half; each pair keeps its ratio. In the second pair the hypervisor takes
    # half the CPU during lean's run only: per second of CPU given, lean was 1600 and full 1000.
    runs = iter([(900, 0.0), (1000, 0.0), (800, 0.5), (1000, 0.0), (450, 0.1), (500, 0.1)])

    def measure(target: Target) -> SaturationSample:
        order.append(target.name)
        requests, steal = next(runs)
        return SaturationSample(requests=requests, seconds=1.0, errors=0, p50_ms=1.0, p99_ms=2.0,
                                proxy_cpu=None, backend_cpu=CpuUsage(user_s=0.0, system_s=0.0), steal=steal)

    pairs = paired_samples(first, second, 3, measure, pause_s=0.0)
    assert order == ["full", "lean", "lean", "full", "full", "lean"]
    assert [throughput_ratio(pair) for pair in pairs] == pytest.approx([0.9, 1.25, 0.9])
    assert [throughput_ratio(pair, steal_adjusted=True) for pair in pairs] == pytest.approx([0.9, 0.625, 0.9])


def test_the_steal_adjusted_logging_cost_is_its_own_target_row_beside_the_raw_one() -> None:
    results = _results()
    results.cost_ratios = [0.97, 0.93, 0.95, 0.80, 0.96, 1.20]  # costs 3 7 5 20 4 -20 %: median 4.5 %
    # the -20 % pair lost a third of its lean run to steal: per second of CPU given, lean was the faster
    results.cost_steal = [(0.0, 0.0)] * 5 + [(0.0, 1 / 3)]
    assert results.adjusted_cost_ratios() == pytest.approx([0.97, 0.93, 0.95, 0.80, 0.96, 0.8])
    checks = {check.goal: check for check in evaluate_targets(results)}
    adjusted = checks["throughput cost of outcome logging + metrics (the same pairs, steal-adjusted)"]
    assert adjusted.measured == pytest.approx(6.0) and adjusted.samples == pytest.approx((3, 7, 5, 20, 4, 20))
    assert checks["throughput cost of outcome logging + metrics (back-to-back pairs)"].measured == pytest.approx(4.5)
    report = render_report(results)
    assert "The hypervisor took 0.0 % to 33.3 % of the machine's CPU time during these runs" in report
    # quartiles (exclusive method) of the raw costs -20 3 4 5 7 20: -2.75 and 10.25; adjusted 3 4 5 7 20 20: 3.75 and 20
    assert ("the same pairs give **6.0 %**, ranging from 3.0 % to 20.0 % (interquartile range 16.2 points, against "
            "13.0 unadjusted: steal explains little of the spread between pairs).") in report
    from bench.report_bounds import spread_comparison
    assert spread_comparison([0, 10, 20, 30, 40], [14, 18, 20, 22, 26]).endswith("steal explains part of the spread between pairs)")
    assert spread_comparison([0, 10, 20], [10, 10, 10]) == ""
    results.cost_steal = []  # a run from before steal was recorded: no adjusted row
    assert not any("steal-adjusted" in check.goal for check in evaluate_targets(results))
    assert "during these runs (steal" not in render_report(results)


def test_report_has_every_section_and_a_profile_placeholder() -> None:
    report = render_report(_results())
    for heading in ("## Machine", "## Method", "## No-op backends", "## Feature cost", "## Targets", "## Profile",
                    "## Every run"):
        assert heading in report
    assert "Real model servers" not in report  # not measured, not shown
    assert "| balancer | 1,000 (1,000–1,000) | 0.10× | 0.80 | 9.00 | +0.50 | +7.00 | 200 (25 % kernel) |" in report
    assert "In the rounds above (medians), outcome logging + metrics cost 20.0 % of throughput" in report
    assert "_Not recorded in this run._" in report


def test_instruction_counts_render_with_their_increments() -> None:
    results = _results()
    assert "## Instructions per request\n\n_Not measured in this run:_ skipped" in render_report(results)
    results.instructions = {"floor": 76_000.4, "lean": 124_000.0, "default": 176_500.0}
    report = render_report(results)
    assert "| the floor (server + upstream client, forwarding only) | 76,000 |  |" in report
    assert "| + the balancer's logic (outcome log and metrics off) | 124,000 | +48,000 |" in report
    assert "the balancer as it ships | 176,500 | +52,500 |" in report
    assert "of which in the balancer's process" not in report  # the writer's share was not counted
    results.instructions["writer"] = 40_000.0
    report = render_report(results)
    assert "| &nbsp;&nbsp;of which in the balancer's process | 136,500 | +12,500 |" in report
    assert "| &nbsp;&nbsp;of which in its store writer process (SQLite) | 40,000 | |" in report


@pytest.mark.parametrize("kind", list(INSTRUCTION_KINDS))
def test_the_instruction_harness_answers_every_request(kind: str, tmp_path: Path) -> None:
    assert asyncio.run(drive(kind, 50, tmp_path)) == 50  # what callgrind counts is a working request path


def test_lua_script_is_shipped_next_to_the_harness() -> None:
    assert Path(wrk_command("u", threads=1, connections=1, seconds=1)[-2]).is_file()


def test_the_store_writer_cpu_is_the_balancer_process_trees_children() -> None:
    spin = "import time\nend = time.process_time() + 0.4\nwhile time.process_time() < end: pass\n"
    parent = subprocess.Popen([sys.executable, "-c", f"import subprocess, sys; subprocess.run([sys.executable, '-c', {spin!r}])"])
    try:
        deadline = time.monotonic() + 10
        while len(tree := process_tree(parent.pid)) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        before = snapshot(tree)
        time.sleep(0.3)  # the child spins; the parent waits for it
        after = snapshot(tree)
    finally:
        parent.wait(timeout=30)
    child, everything = tree_cpu_between(tree[0], before, after)[1], cpu_between(before, after)
    assert child.total_s >= 0.15 and everything.total_s - child.total_s <= 0.05


def test_the_feature_table_shows_the_store_writers_share() -> None:
    results = _results()
    results.saturation["noop balancer"] = [replace(sample, writer_cpu=CpuUsage(user_s=0.03, system_s=0.01))
                                           for sample in results.saturation["noop balancer"]]
    report = render_report(results)
    requests = results.saturation["noop balancer"][0].requests
    writer = f"{0.04 / requests * 1e6:,.1f}"
    assert f"| default | 1,000 | -20.0 % | 200 | {writer} | +50 | 1,800 |" in report  # 18 CPU-s / 10,000 requests
    assert f"the writer alone ran {writer} µs per request); the whole machine's CPU per request, load generator and backends included, differed by +360 µs (+25.0 %)." in report
    assert "| outcomes and metrics off | 1,250 | +0.0 % | 150 | n/a | +0 | 1,440 |" in report


def test_throughput_against_direct_is_split_into_cpu_per_request_and_busy_cores() -> None:
    results = _results()
    results.saturation["noop balancer"] = [replace(results.saturation["noop balancer"][0], machine_busy_s=15.0)]
    report = render_report(results)
    section = report[report.index("## What bounds throughput against direct calls"):]
    # direct: 18 CPU-s over 100,000 requests in 10 s; balancer: 15 over 10,000; nginx: 18 over 50,000
    assert "| No-op backends | direct | 10,000 | 180 | 1.80 | 1.00× | 1.00× | 1.00× |" in section
    assert "| No-op backends | balancer | 1,000 | 1,500 | 1.50 | 0.12× | 0.83× | 0.10× |" in section
    assert "| No-op backends | nginx | 5,000 | 360 | 1.80 | 0.50× | 1.00× | 0.50× |" in section
    assert ("a direct call cost the machine 180 µs of CPU and a call through the balancer 1,500 µs (8.3×), "
            "through nginx 360 µs. Half of direct calls' throughput") in section
    assert "needs a path of at most 360 µs per request" in section
    results.saturation = {name: [replace(sample, machine_busy_s=math.nan) for sample in samples]
                          for name, samples in results.saturation.items()}  # a run from before this was recorded
    assert "## What bounds throughput against direct calls\n\n_Not measured in this run._" in render_report(results)


def test_the_model_cpu_paragraph_says_how_busy_each_hop_was_at_saturation() -> None:
    from bench.report_bounds import model_cpu_paragraph

    results = _results()
    assert model_cpu_paragraph(results) == ""  # no model targets in this run: nothing to say
    for hop, rps, cpu in (("balancer", 300, 400), ("nginx", 350, 120)):
        results.targets.append(Target(name=f"model {hop}", kind="model", hop=hop, url="u"))
        results.saturation[f"model {hop}"] = [replace(results.saturation[f"noop {hop}"][0], requests=rps * 10,
                                                      proxy_cpu=CpuUsage(user_s=cpu * rps * 10 / 1e6, system_s=0.0))]
    paragraph = model_cpu_paragraph(results)
    assert "a request costs the balancer 400 µs of CPU, against 200 µs with the no-op backends" in paragraph
    assert "and nginx 120 against 50 µs" in paragraph
    # busy = CPU per request × requests per second: 400 µs × 300/s = 12 %; 200 µs × 1,000/s = 20 %
    assert "the balancer was busy 12 % of one core (against 20 % with the no-op backends) and nginx 4 % (against 25 %)" in paragraph


def test_the_compiled_path_and_uvloop_are_compared_with_the_default() -> None:
    results = _results()
    for label, rps, cpu in ((INTERPRETED_LABEL, 800, 250), (ASYNCIO_LABEL, 900, 220)):
        name = f"noop balancer ({label})"
        results.targets.append(Target(name=name, kind="noop", hop="balancer", url="u"))
        results.saturation[name] = results.saturation["noop balancer"][:0] + [
            replace(results.saturation["noop balancer"][0], requests=rps * 10,
                    proxy_cpu=CpuUsage(user_s=cpu * rps * 10 / 1e6, system_s=0.0))]
        results.feature_labels.append(label)
    report = render_report(results)
    assert "Compiled request path (mypyc) vs interpreted: default -50 µs/request, +25.0 % throughput." in report
    assert "uvloop vs asyncio's event loop: default -20 µs/request, +11.1 % throughput." in report
    assert "Both (the balancer as it ran before them)" not in report  # not measured, not claimed


def test_loop_stalls_render_per_writer_and_mark_the_one_used() -> None:

    results = _results()
    results.loop_stalls = [Stalls(writer="writer process", rows=30_000, seconds=6.0, gaps=[0.0012, 0.0030], steal=0.05),
                           Stalls(writer="writer thread", rows=30_000, seconds=6.0, gaps=[0.002] * 30, steal=0.031),
                           Stalls(writer="no outcome log", rows=30_000, seconds=6.0, gaps=[0.0015], steal=0.2)]
    report = render_report(results)
    assert "`python -m bench.loop_stalls --rate 5000 --seconds 6`" in report
    assert "| writer process (used) | 2 | 3.00 | 3.00 | 0.07 % | 5.0 % |" in report
    assert "| writer thread (before) | 30 | 2.00 | 2.00 | 1.00 % | 3.1 % |" in report
    assert "| no outcome log: the machine's own stalls | 1 | 1.50 | 1.50 | 0.03 % | 20.0 % |" in report
    assert "the last records nothing, so its stalls are the machine's own" in report
    assert "stalled the loop more than the thread" not in report
    results.loop_stalls[1] = Stalls(writer="writer thread", rows=30_000, seconds=6.0, gaps=[], steal=0.0)
    report = render_report(results)
    assert "In this run the writer process stalled the loop more than the thread (2 stalls against 0)" in report
    results.loop_stalls = [Stalls(writer="writer process", rows=30_000, seconds=6.0, gaps=[])]  # from before steal
    report = render_report(results)
    assert "| writer process (used) | 0 | 0.00 | 0.00 | 0.00 % | n/a |" in report
    assert "the last records nothing" not in report  # no baseline run, no sentence about one


def test_loop_stalls_are_measured_against_a_real_outcome_log() -> None:
    from bench.loop_stalls import measure

    for writer in ("writer process", "writer thread", "no outcome log"):
        stalls = measure(writer, rate=2000, seconds=0.5)  # measure() checks every row reached the store
        assert 900 <= stalls.rows <= 1001 and stalls.writer == writer  # a loaded machine may end the run a little short
        assert 0 <= stalls.steal < 1
    with pytest.raises(ValueError, match="writer must be one of"):
        measure("a cloud", rate=2000, seconds=0.5)
    assert all(gap > 0.001 for gap in stalls.gaps)


# The fixed-rate client (bench/openloop.c, run as `make bench` runs it) against real loopback servers.

DRAIN_TIMEOUT_S = 5.0  # bench/openloop.c's DRAIN_TIMEOUT
SUMMARY_KEYS = ["rate", "seconds", "sent", "completed", "errors", "non_2xx", "connection_errors", "queued",
                "achieved_rps", "latency_ms", "late_ms_p99", "client_cpu_s"]
BODY = b'{"instances": [[1.0, 2.0]]}'


@pytest.fixture(scope="module")
def openloop_client() -> Path:
    """The compiled client; without a C compiler a skip, or a failure under BALANCER_REQUIRE_NATIVE=1 (CI)."""
    if openloop.find_compiler() is None and not openloop.binary_path().is_file():
        if native.is_set(os.environ, native.REQUIRE_ENVIRONMENT):
            pytest.fail(f"{native.REQUIRE_ENVIRONMENT} is set but there is no C compiler to build bench/openloop.c")
        pytest.skip("no C compiler (cc or gcc) to build bench/openloop.c: apt-get install -y gcc libc6-dev; "
                    f"set {native.REQUIRE_ENVIRONMENT}=1 to fail instead")
    return openloop.build_client()


@pytest.fixture
def body_file(tmp_path: Path) -> Path:
    path = tmp_path / "body.json"
    path.write_bytes(BODY)
    return path


def run_openloop(url: str, body_file: Path, *, rate: float, seconds: float = 0.5, warmup: float = 0.1,
                 connections: int = 4, users: int = 10, spread: Sequence[str] = ()) -> dict[str, Any]:
    """One run with the command line `make bench` uses; its JSON summary, checked to come within the time bound."""
    settings = replace(QUICK, fixed_rate_s=seconds, warmup_s=warmup, rate_connections=connections, users=users)
    target = Target(name="test", kind="noop", hop="direct", url=url, spread=tuple(spread))
    limit = warmup + seconds + DRAIN_TIMEOUT_S + 5
    started = time.monotonic()
    completed = subprocess.run(openloop_command(target, rate, settings, body_file), cwd=REPO, capture_output=True,
                               text=True, timeout=limit, check=False)
    assert completed.returncode == 0, completed.stderr
    assert time.monotonic() - started < limit
    [line] = completed.stdout.splitlines()
    summary: dict[str, Any] = json.loads(line)
    assert list(summary) == SUMMARY_KEYS
    return summary


class InlineServer:
    """A tiny HTTP/1.1 server: reads each request whole and writes `answer` in three pieces (None: hangs up)."""

    def __init__(self, answer: bytes | None, *, close_after: bool = False, split: bool = True) -> None:
        self.answer = answer
        self.close_after = close_after
        self.split = split
        self.requests: list[bytes] = []
        self.connections = 0

    async def start(self) -> tuple[asyncio.Server, str]:
        """Listening on a free loopback port: the server and its host:port."""
        server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        return server, "127.0.0.1:%d" % server.sockets[0].getsockname()[1]

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = re.search(rb"\r\nContent-Length: (\d+)\r\n", head)
                assert length is not None
                self.requests.append(head + await reader.readexactly(int(length[1])))
                if self.answer is None:
                    break
                # cut 20 bytes in and 3 from the end: the client must parse answers that span reads
                pieces = [self.answer[:20], self.answer[20:-3], self.answer[-3:]] if self.split else [self.answer]
                for piece in pieces:
                    writer.write(piece)
                    await writer.drain()
                    await asyncio.sleep(0.001)
                if self.close_after:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


async def run_openloop_against(*servers: InlineServer, **options: Any) -> dict[str, Any]:
    """run_openloop spread over `servers`, which serve meanwhile in this event loop."""
    started = [await server.start() for server in servers]
    try:
        spread = [address for _, address in started]
        return await asyncio.to_thread(run_openloop, "http://127.0.0.1:1/predict", spread=spread, **options)
    finally:
        for server, _ in started:
            server.close()


@pytest.mark.usefixtures("openloop_client")
def test_openloop_holds_the_rate_against_the_noop_backend(tmp_path: Path, body_file: Path) -> None:
    port = free_port()
    with running(["tests/noop_backend.py", "--port", str(port), "--name", "model_a"],
                 f"http://127.0.0.1:{port}/healthz", log=tmp_path / "backend.log"):
        summary = run_openloop(f"http://127.0.0.1:{port}/predict", body_file, rate=500, seconds=1.0, warmup=0.2,
                               connections=32, users=1000)
    assert summary["sent"] == pytest.approx(500, abs=1)
    assert summary["completed"] == summary["sent"]
    assert (summary["errors"], summary["non_2xx"], summary["connection_errors"]) == (0, 0, 0)
    assert summary["achieved_rps"] == pytest.approx(500, rel=0.05)
    assert summary["seconds"] == pytest.approx(1.0, abs=0.05)
    latency = summary["latency_ms"]
    assert list(latency) == ["p50", "p90", "p99", "p99.9", "p100"]
    assert 0 < latency["p50"] <= latency["p90"] <= latency["p99"] <= latency["p99.9"] <= latency["p100"]
    assert summary["late_ms_p99"] >= 0
    # CPU of warm-up + measured + drain per measured request, as the report counts it. About 60-75 µs on
    # the 2-core nested VM this was written on (a timed sleep costs ~30 µs there, the loopback send ~25);
    # the asyncio client before it used ~300 µs at this rate.
    assert summary["client_cpu_s"] / summary["completed"] < 150e-6


@pytest.mark.usefixtures("openloop_client")
def test_openloop_writes_the_header_and_one_line_per_answer(tmp_path: Path, body_file: Path) -> None:
    port = free_port()
    trace = tmp_path / "trace.txt"
    before = time.time()
    with running(["tests/noop_backend.py", "--port", str(port)], f"http://127.0.0.1:{port}/healthz",
                 log=tmp_path / "backend.log"):
        subprocess.run([sys.executable, "-m", "bench.openloop", "--url", f"http://127.0.0.1:{port}/predict", "--rate", "200",
                        "--seconds", "0.5", "--warmup", "0.1", "--body-file", str(body_file), "--trace", str(trace)],
                       cwd=REPO, check=True, capture_output=True, timeout=30)
    first, offsets, latencies = tail_episodes.read_trace(trace)
    assert before < first < time.time()
    assert len(offsets) == len(latencies) == 100
    assert offsets[0] == 0 and offsets == sorted(offsets)
    assert all(latency > 0 for latency in latencies)


@pytest.mark.usefixtures("openloop_client")
def test_a_fixed_rate_run_measures_the_hops_and_the_backends_wait_for_a_cpu(tmp_path: Path, body_file: Path) -> None:
    ports = free_port(), free_port()
    with (running(["tests/noop_backend.py", "--port", str(ports[0])], f"http://127.0.0.1:{ports[0]}/healthz",
                  log=tmp_path / "hop.log") as hop,
          running(["tests/noop_backend.py", "--port", str(ports[1]), "--event-loop", "asyncio"],
                  f"http://127.0.0.1:{ports[1]}/healthz", log=tmp_path / "backend.log") as backend):
        # the "hop" is a no-op backend too: only the accounting is under test
        target = Target(name="noop balancer", kind="noop", hop="balancer", url=f"http://127.0.0.1:{ports[0]}/predict",
                        proxy_pid=hop.pid, backend_pids=(backend.pid,))
        settings = replace(QUICK, fixed_rate_s=1.0, warmup_s=0.2)
        sample = measure_fixed_rate(target, 400, settings, body_file)
        direct = measure_fixed_rate(Target(name="noop direct", kind="noop", hop="direct",
                                           url=f"http://127.0.0.1:{ports[1]}/predict", backend_pids=(backend.pid,)),
                                    400, settings, body_file)
    assert sample.completed == 400 and sample.errors == 0
    assert sample.proxy_cpu is not None and sample.proxy_cpu.total_s > 0
    assert 0 <= sample.proxy_wait_s < sample.seconds and 0 <= sample.proxy_wait_share < 1
    assert sample.backend_wait_s == 0  # no request reached it: it slept throughout
    assert sample.backend_wait_share == 0
    assert sample.backend_us_per_request < direct.backend_us_per_request  # (asyncio's loop) it served the second run
    assert direct.completed == 400 and direct.errors == 0 and direct.proxy_cpu is None
    assert 0 < direct.client_us_per_request < 1000


def test_backend_cost_prints_each_event_loops_medians_and_rounds() -> None:
    def run(backend_s: float) -> FixedRateSample:
        return replace(fixed_rate_sample(2.0), client_cpu_s=0.3, dispatched=10_000, errors=1,
                       backend_cpu=CpuUsage(user_s=backend_s, system_s=0.0))

    lines = backend_cost.summarize({"uvloop": [run(0.25), run(0.2), run(0.3)], "asyncio": [run(0.35)]})
    assert lines == ["uvloop   backends  25.0 µs/req (rounds: 25.0, 20.0, 30.0), client  30.0 µs/req, p99 2.00 ms, errors 3",
                     "asyncio  backends  35.0 µs/req (rounds: 35.0), client  30.0 µs/req, p99 2.00 ms, errors 1"]


@pytest.mark.usefixtures("openloop_client")
def test_queue_wait_counts_in_the_latency_when_the_server_is_slower_than_the_rate(
        tmp_path: Path, body_file: Path) -> None:
    port = free_port()  # 2 connections x 1 answer per 50 ms = 40 answers/s, asked for 100/s
    with running(["tests/noop_backend.py", "--port", str(port), "--name", "model_a", "--delay-ms", "50"],
                 f"http://127.0.0.1:{port}/healthz", log=tmp_path / "backend.log"):
        summary = run_openloop(f"http://127.0.0.1:{port}/predict", body_file, rate=100, connections=2)
    assert summary["completed"] == summary["sent"] == 50
    assert summary["queued"] > 0
    assert summary["latency_ms"]["p50"] > 50
    assert summary["latency_ms"]["p99"] > 500  # the last ones waited most of a second for a connection


ANSWERS = {  # name: (answer, whether the server closes after it)
    "chunked": (b"HTTP/1.1 200 OK\r\ntransfer-encoding: Chunked\r\n\r\n5\r\nhello\r\n7;note=x\r\n world!\r\n"
                b"0\r\nX-Trailer: 1\r\n\r\n", False),
    "Connection: close": (b"HTTP/1.1 200 OK\r\nCONTENT-LENGTH: 5\r\nConnection: close\r\n\r\nhello", True),
    "body until the server closes": (b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nhello", True),
    "HTTP/1.0": (b"HTTP/1.0 200 OK\r\nContent-Length: 5\r\n\r\nhello", True),
    "interim 100 then 204": (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n", False),
}


@pytest.mark.usefixtures("openloop_client")
@pytest.mark.parametrize("name", list(ANSWERS))
def test_every_way_an_answer_can_end_is_understood(name: str, body_file: Path) -> None:
    answer, close_after = ANSWERS[name]
    server = InlineServer(answer, close_after=close_after)
    summary = asyncio.run(run_openloop_against(server, body_file=body_file, rate=200))
    assert summary["completed"] == summary["sent"] == 100
    assert (summary["errors"], summary["connection_errors"]) == (0, 0)
    if close_after:  # a new connection for each answer (the last ones may be left unused)
        assert len(server.requests) <= server.connections <= len(server.requests) + 4
    else:  # the same 4 kept alive throughout
        assert server.connections == 4


@pytest.mark.usefixtures("openloop_client")
@pytest.mark.parametrize("answer", [None, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhello",
                                    b"HTTP/1.1 2OO OK\r\n\r\n", b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n"],
                         ids=["hangs up", "bytes beyond the answer", "malformed status", "malformed length"])
def test_a_lost_or_broken_answer_is_a_connection_error_and_the_run_goes_on(answer: bytes | None,
                                                                          body_file: Path) -> None:
    server = InlineServer(answer, split=False)
    summary = asyncio.run(run_openloop_against(server, body_file=body_file, rate=200))
    assert summary["sent"] == 100
    assert summary["completed"] == 0
    assert summary["connection_errors"] == summary["errors"] == 100
    assert summary["latency_ms"]["p50"] is None  # no samples: JSON null, never a bare NaN


@pytest.mark.usefixtures("openloop_client")
def test_non_2xx_answers_are_completed_but_errors(body_file: Path) -> None:
    server = InlineServer(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n")
    summary = asyncio.run(run_openloop_against(server, body_file=body_file, rate=200))
    assert summary["completed"] == summary["non_2xx"] == summary["errors"] == 100
    assert summary["connection_errors"] == 0


@pytest.mark.usefixtures("openloop_client")
def test_spread_sends_the_same_requests_to_every_address_in_turn(body_file: Path) -> None:
    servers = [InlineServer(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}") for _ in range(2)]
    summary = asyncio.run(run_openloop_against(*servers, body_file=body_file, rate=200, users=10))
    assert summary["completed"] == summary["sent"] == 100
    requests = [request for server in servers for request in server.requests]
    assert len(requests) == 120  # warm-up included; the URL's own port (1) is never used
    assert all(len(server.requests) >= 50 for server in servers)  # idle connections are used round-robin
    expected = {b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1:1\r\nContent-Type: application/json\r\n"
                b"X-User-ID: user-%d\r\nContent-Length: %d\r\n\r\n%s" % (user, len(BODY), BODY) for user in range(10)}
    assert set(requests) == expected


VALID_ARGUMENTS = {"--url": "http://127.0.0.1:1/predict", "--rate": "10", "--seconds": "1", "--body-file": "body.json"}


# (changes to VALID_ARGUMENTS, None: left out; the error message)
BAD_ARGUMENTS: list[tuple[dict[str, str | None], str]] = [
    ({"--rate": "fast"}, "--rate 'fast' is not a number"),
    ({"--rate": "0"}, "--rate 0 must be > 0"),
    ({"--connections": "0"}, "--connections 0 must be between 1"),
    ({"--url": "ftp://127.0.0.1:1/predict"}, "--url 'ftp://127.0.0.1:1/predict' must be http://host:port/path"),
    ({"--url": "http://127.0.0.1/predict"}, "--url 'http://127.0.0.1/predict' must be http://host:port/path"),
    ({"--spread": "127.0.0.1"}, "--spread '127.0.0.1': '127.0.0.1' is not host:port"),
    ({"--body-file": "missing.json"}, "--body-file 'missing.json': No such file"),
    ({"--url": None}, "--url is required"),
    ({"--bogus": "1"}, "unrecognized argument '--bogus'"),
]


@pytest.mark.usefixtures("openloop_client")
@pytest.mark.parametrize(("changes", "message"), BAD_ARGUMENTS,
                         ids=[" ".join(f"{flag} {value}" for flag, value in changes.items())
                              for changes, _ in BAD_ARGUMENTS])
def test_bad_arguments_exit_2_naming_the_flag(changes: dict[str, str | None], message: str, tmp_path: Path) -> None:
    (tmp_path / "body.json").write_bytes(BODY)
    arguments = [part for flag, value in {**VALID_ARGUMENTS, **changes}.items() if value is not None
                 for part in (flag, value)]
    completed = subprocess.run([sys.executable, "-m", "bench.openloop", *arguments], cwd=tmp_path,
                               env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=30)
    assert completed.returncode == 2
    assert completed.stderr.startswith("usage: python -m bench.openloop --url")
    assert f"python -m bench.openloop: error: {message}" in completed.stderr


def test_without_a_c_compiler_the_client_names_the_packages_to_install(monkeypatch: pytest.MonkeyPatch,
                                                                         tmp_path: Path) -> None:
    monkeypatch.setattr(openloop.shutil, "which", lambda name: None)
    with pytest.raises(BenchError, match=r"no C compiler \(cc or gcc\).*apt-get install -y gcc libc6-dev"):
        openloop.build_client(build_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.usefixtures("openloop_client")
def test_concurrent_first_uses_compile_one_cached_binary_per_source(tmp_path: Path) -> None:
    with ThreadPoolExecutor(max_workers=2) as pool:
        built = list(pool.map(lambda _: openloop.build_client(build_dir=tmp_path), range(2)))
    assert built[0] == built[1] == openloop.binary_path(build_dir=tmp_path)
    assert re.fullmatch(r"openloop-[0-9a-f]{12}", built[0].name)
    assert [path.name for path in tmp_path.iterdir()] == [built[0].name]  # no temporary left behind
    assert os.access(built[0], os.X_OK)
    assert openloop.build_client(build_dir=tmp_path) == built[0]  # cached: not compiled again


@pytest.mark.usefixtures("openloop_client")
def test_a_client_built_from_an_edited_source_replaces_the_earlier_one(tmp_path: Path) -> None:
    edited = tmp_path / "openloop.c"
    edited.write_text(openloop.SOURCE.read_text())
    build = tmp_path / "build"
    first = openloop.build_client(edited, build)
    edited.write_text(openloop.SOURCE.read_text() + "\n/* edited */\n")
    second = openloop.build_client(edited, build)
    assert first != second
    assert [path.name for path in build.iterdir()] == [second.name]  # the earlier binary is gone


def test_compare_refuses_bad_arguments_and_unknown_commits(tmp_path: Path) -> None:
    from bench import compare

    with pytest.raises(SystemExit) as exited:
        compare.main(["--base", "HEAD", "--pairs", "0"])
    assert exited.value.code == 2
    with pytest.raises(BenchError, match="git worktree add no-such-commit failed"):
        compare.checkout("no-such-commit", tmp_path)


def test_machine_times_read_steal_from_the_first_line_of_proc_stat(tmp_path: Path) -> None:
    (tmp_path / "stat").write_text("cpu  100 5 30 800 10 0 5 50 7 0\ncpu0 50 2 15 400 5 0 2 25 0 0\n")
    before = machine_times(tmp_path)
    assert (before.total_ticks, before.steal_ticks) == (1000, 50)  # guest time (7) is inside user already
    (tmp_path / "stat").write_text("cpu  200 5 30 1600 10 0 5 150 7 0\n")
    assert steal_share(before, machine_times(tmp_path)) == pytest.approx(100 / 1000)
    # 1000 ticks passed: 800 idle, 100 stolen, 100 of user work
    assert busy_seconds(before, machine_times(tmp_path)) == pytest.approx(100 / CLOCK_TICKS_PER_SECOND)
    (tmp_path / "stat").write_text("cpu  100 5 30 800 60 0 5 50 7 0\n")  # only iowait grew: no work ran
    assert busy_seconds(before, machine_times(tmp_path)) == 0
    assert math.isnan(steal_share(before, before))
    (tmp_path / "stat").write_text("intr 1 2 3\n")
    with pytest.raises(ValueError, match="not the first line of /proc/stat"):
        machine_times(tmp_path)


def test_the_tail_section_compares_cpu_per_request_at_the_fixed_rate_with_saturation() -> None:
    results = _results()
    sample = results.fixed_rate["noop balancer"][0]
    assert sample.proxy_us_per_request == pytest.approx(400.0)  # 2.2 s over 5,500 requests
    assert sample.proxy_busy == pytest.approx(0.2)  # 2.2 s of CPU in 11 s
    assert results.fixed_rate["noop direct"][0].proxy_us_per_request is None
    report = render_report(results)
    assert "## What bounds the tail latency" in report
    # saturation: 200 µs/req for the balancer, 50 for nginx
    assert "| balancer | 9.00 | +7.00 | 400 | 200 | 2.0× | 20 % |" in report
    assert "| nginx | 3.00 | +1.00 | 100 | 50 | 2.0× | 5 % |" in report
    assert "outcomes and metrics off |" not in report.split("## What bounds the tail latency")[1].split("##")[0]
    assert "The hypervisor took 4.0 % of the machine's CPU time during the fixed-rate runs" in report
    assert "hop 400 µs/req (busy 20 %), backends 30 µs/req, steal 4.0 %" in report


def test_the_tail_section_counts_the_client_and_the_backends_per_request_dispatched_warm_up_included(
        tmp_path: Path) -> None:
    results = _results()
    sample = results.fixed_rate["noop balancer"][0]
    # 0.22 s of client CPU and 0.165 s of the backends' over 5,500 requests (5,000 measured + the warm-up's)
    assert (sample.client_us_per_request, sample.backend_us_per_request) == (pytest.approx(40.0), pytest.approx(30.0))
    report = render_report(results)
    assert "client CPU 40 µs/req" in report
    # cores: (40 + 30 + 400) µs per request at 500 req/s = 0.235; direct has no hop
    assert "| balancer | 40 | 30 | 400 | 0.23 |" in report
    assert "| direct | 40 | 30 | — | 0.04 |" in report
    earlier = replace(sample, backend_cpu=None)  # a results file from before backends were measured at the rate
    assert math.isnan(earlier.backend_us_per_request)
    results.fixed_rate = {name: [replace(run, backend_cpu=None) for run in runs]
                          for name, runs in results.fixed_rate.items()}
    assert "| path | client µs/req | backends µs/req |" not in render_report(results)
    assert saved_and_loaded(_results(), tmp_path).fixed_rate["noop balancer"][0].backend_cpu == sample.backend_cpu


def test_a_verdict_stands_only_when_the_rounds_interval_is_on_one_side_of_the_goal() -> None:
    clear = Check("added p99", "noop", 3.0, 5.0, "ms", True, (2.0, 3.0, 4.5, 2.5, 3.5))
    assert clear.interval == (2.0, 4.5)  # with 5 rounds: their range (94 % coverage)
    assert (clear.met, clear.established, clear.verdict) == (True, True, "met")
    straddling = Check("added p99", "noop", 3.0, 5.0, "ms", True, (2.0, 3.0, 40.0, 2.5, 3.5))
    assert (straddling.met, straddling.established, straddling.verdict) == (True, False, "met, not established")
    missed = Check("share of direct", "noop", 20.0, 50.0, "%", False, (18.0, 20.0, 22.0, 21.0, 19.0))
    assert (missed.verdict, missed.shortfall) == ("missed", "30 points short")
    eight = Check("added p99", "noop", 3.0, 5.0, "ms", True, (2.0, 3.0, 40.0, 2.5, 3.5, 4.0, 3.2, 2.8))
    assert eight.interval == (2.5, 4.0)  # with 8 rounds (the fixed-rate runs'): one outlier on each side left out
    assert (eight.met, eight.established, eight.verdict) == (True, True, "met")
    few = Check("added p99", "noop", 3.0, 5.0, "ms", True, (2.0, 9.0))
    assert (few.interval, few.verdict) == (None, "met")  # too few rounds to weigh: the median decides
    assert Check("x", "noop", math.nan, 5.0, "ms", True).verdict == "not measured"


def test_the_logging_cost_interval_comes_from_the_pairs_and_per_round_samples_feed_the_others() -> None:
    results = _results()
    results.cost_ratios = [0.97, 0.93, 0.95, 0.80, 0.96, 1.02, 0.70, 0.99]  # costs 3 7 5 20 4 -2 30 1 %
    checks = {check.goal: check for check in evaluate_targets(results)}
    cost = checks["throughput cost of outcome logging + metrics (back-to-back pairs)"]
    assert cost.measured == pytest.approx(4.5)
    low, high = cost.interval or (math.nan, math.nan)
    assert (low, high) == (pytest.approx(1.0), pytest.approx(20.0))  # 8 pairs: 2nd and 7th of the sorted costs
    assert cost.verdict == "met, not established"
    p99 = checks["added latency p99 at half saturation (balancer − direct)"]
    assert p99.samples == (7.0,)  # one round: 9.0 − 2.0
    report = render_report(results)
    assert ("| throughput cost of outcome logging + metrics (back-to-back pairs) | noop | 5 % | 1 to 20 % (8) "
            "| ≤ 10 % | met, not established |  |") in report


def test_the_tail_section_ranks_each_runs_p99_against_the_steal_during_it() -> None:
    def run(p99: float, steal: float) -> FixedRateSample:
        return FixedRateSample(rate=500, achieved_rps=500, completed=5000, errors=0, queued=0, p50_ms=0.3,
                               p99_ms=p99, p999_ms=p99, late_ms_p99=0.5, client_cpu_s=0.2, steal=steal)

    runs = {"direct": [run(1.0, 0.01), run(2.0, 0.05), run(4.0, 0.20)],
            "balancer": [run(5.0, 0.02), run(10.0, 0.10), run(40.0, 0.30)]}
    sentence = steal_correlation(runs)
    assert sentence.startswith("Over the 6 fixed-rate runs of the no-op backends")
    assert "Spearman rank correlation of 0.97" in sentence  # ranks worked by hand: 16.5 / √(17.5 × 16.5)
    runs["balancer"] = [run(5.0, 0.30), run(10.0, 0.10), run(40.0, 0.02)]
    assert "correlation of -0.09" in steal_correlation(runs)  # -1.5 / √(17.5 × 16.5)
    assert steal_correlation({"direct": [run(1.0, 0.01), run(2.0, 0.01)]}) == ""  # too few runs to rank


def test_saved_results_render_the_same_report_and_bad_files_are_refused(tmp_path: Path) -> None:
    results = _results()
    results.cost_ratios = [0.97, 0.93, 0.95, 0.80, 0.96]
    results.cost_steal = [(0.01, 0.02), (0.0, 0.0), (0.3, 0.1), (0.05, 0.05), (0.0, 0.2)]
    results.instructions = {"floor": 76_000.0, "lean": 124_000.0, "default": 176_500.0, "writer": 40_000.0}
    results.loop_stalls = [Stalls(writer=WRITERS[0], rows=30_000, seconds=6.0, gaps=[0.002, 0.004], steal=0.02)]
    results.profile = Profile(thread="MainThread", samples=6, self_counts=Counter({"send (s.py)": 3}),
                              total_counts=Counter({"run (r.py)": 6}), thread_samples=Counter({"MainThread": 6}),
                              thread_top_frame={"MainThread": ("send (s.py)", 3)})
    results.fixed_rate["noop direct"][0] = replace(results.fixed_rate["noop direct"][0], p999_ms=math.nan)
    path = tmp_path / "BENCHMARKS.json"
    results_file.save(results, path)
    again = results_file.load(path)
    assert again == replace(results, fixed_rate=again.fixed_rate)  # NaN != NaN: the fixed-rate samples are checked below
    assert math.isnan(again.fixed_rate["noop direct"][0].p999_ms)
    assert render_report(again) == render_report(results)

    output = tmp_path / "report.md"
    assert bench_main(["--render", str(path), "--output", str(output)]) == 0
    assert output.read_text() == render_report(results)

    path.write_text('{"format": 0, "results": {}}')
    with pytest.raises(BenchError, match="holds bench results of format 0; this harness reads format 1"):
        results_file.load(path)
    path.write_text('{"format": 1, "results": {"settings": {}}}')
    with pytest.raises(BenchError, match="is not a complete bench results file"):
        results_file.load(path)
    with pytest.raises(BenchError, match="cannot read bench results"):
        results_file.load(tmp_path / "missing.json")


def test_compare_states_an_interval_and_what_it_establishes() -> None:
    from bench import compare

    faster = compare.summarize([1.10, 1.05, 1.20, 1.08, 1.12], 4.0)
    assert faster.startswith("median 1.100 over 5 pairs of 4 s (range 1.050 to 1.200")
    assert faster.endswith("90 % interval of the median 1.050 to 1.200: this tree is faster")
    assert compare.summarize([0.90, 0.95, 0.93, 0.97, 0.92], 4.0).endswith("this tree is slower")
    assert compare.summarize([0.79, 0.96, 1.14, 1.00, 1.08, 0.93], 4.0).endswith("no difference established")
    assert compare.summarize([1.1, 1.2], 4.0).endswith("too few pairs for an interval (5 or more)")


def test_the_latency_comparison_states_the_p99_difference_and_what_it_establishes() -> None:
    from bench import compare

    shorter = compare.summarize_latency([(fixed_rate_sample(this), fixed_rate_sample(base)) for this, base in
                                         ((4.0, 9.0), (5.0, 8.0), (3.5, 8.5), (4.5, 12.0), (6.0, 7.0))], 4.0)
    assert shorter.startswith("median p99 4.50 ms against 8.50 ms; median difference -5.00 ms over 5 pairs of 4 s "
                              "(range -7.50 to -1.00 ms")
    assert shorter.endswith("90 % interval of the median -7.50 to -1.00 ms: this tree's tail is shorter")
    longer = compare.summarize_latency([(fixed_rate_sample(9.0, errors=1), fixed_rate_sample(4.0))] * 5, 4.0)
    assert "5 errors" in longer and longer.endswith("this tree's tail is longer")
    mixed = [(fixed_rate_sample(5.0), fixed_rate_sample(4.0)), (fixed_rate_sample(4.0), fixed_rate_sample(5.0))] * 3
    assert compare.summarize_latency(mixed, 4.0).endswith("no difference established")
    assert compare.summarize_latency(mixed[:2], 4.0).endswith("too few pairs for an interval (5 or more)")


PERF_BY_BINARY = """\
# Total Lost Samples: 0
#
# Samples: 3K of event 'cpu-clock'
# Event count (approx.): 3003003000
#
# Overhead  Shared Object
# ........  ........................................
#
    47.12%  [kernel.kallsyms]
    24.50%  libpython3.11.so.1.0
     9.03%  native_group__mypyc.cpython-311-x86_64-linux-gnu.so
     0.61%  [vdso]

"""
PERF_FUNCTIONS = """\
# Overhead  Shared Object                             Symbol
# ........  ........................................  ..........................................
#
     6.20%  [kernel.kallsyms]                         [k] __schedule
     5.04%  libpython3.11.so.1.0                      [.] _PyEval_EvalFrameDefault
     2.31%  libc.so.6                                 [.] malloc
"""


def test_perf_reports_are_read_by_binary_and_by_function() -> None:
    from bench.perf_profile import PerfProfile, parse_by_binary, parse_cpu_seconds, parse_functions

    by_binary = parse_by_binary(PERF_BY_BINARY)
    assert by_binary == [("[kernel.kallsyms]", 47.12), ("libpython3.11.so.1.0", 24.5),
                         ("native_group__mypyc.cpython-311-x86_64-linux-gnu.so", 9.03), ("[vdso]", 0.61)]
    assert parse_cpu_seconds(PERF_BY_BINARY) == pytest.approx(3.003003)
    functions = parse_functions(PERF_FUNCTIONS)
    assert functions == [("[kernel.kallsyms]", "__schedule", 6.2), ("libpython3.11.so.1.0", "_PyEval_EvalFrameDefault", 5.04),
                         ("libc.so.6", "malloc", 2.31)]
    assert parse_functions(PERF_FUNCTIONS, limit=1) == functions[:1]
    results = _results()
    results.perf_profiles = [PerfProfile("balancer", 3.0, by_binary, functions)]
    report = render_report(results)
    assert ("| balancer | 47.1 % | kernel 47.1 %; `libpython3.11.so.1.0` 24.5 %; "
            "`native_group__mypyc.cpython-311-x86_64-linux-gnu.so` 9.0 %; `[vdso]` 0.6 % |") in report
    assert "| 6.2 % | kernel | `__schedule` |" in report
    assert "`perf record -e cpu-clock -F 999` on the hop's processes" in report
    results.perf_profiles, results.perf_error = [], "perf is not installed (Debian: apt-get install -y linux-perf)"
    assert "_Not recorded in this run: perf is not installed (Debian: apt-get install -y linux-perf)._" in render_report(results)


@pytest.mark.skipif(shutil.which("perf") is None or find_tool("wrk") is None, reason="perf or wrk not installed")
def test_perf_samples_a_saturated_process_kernel_included(tmp_path: Path, body_file: Path) -> None:
    from bench.perf_profile import KERNEL, record

    port = free_port()
    with running(["tests/noop_backend.py", "--port", str(port), "--name", "model_a"],
                 f"http://127.0.0.1:{port}/healthz", log=tmp_path / "backend.log") as backend:
        target = Target(name="noop backend", kind="noop", hop="direct", url=f"http://127.0.0.1:{port}/predict",
                        proxy_pid=backend.pid)
        profile = record(target, replace(QUICK, connections=8), body_file, wrk=str(find_tool("wrk")),
                         workdir=tmp_path, seconds=1.0)
    assert 0.3 < profile.cpu_seconds < 2.5  # one busy process, sampled for a second
    binaries = dict(profile.by_binary)
    assert binaries.get(KERNEL, 0) > 5 and any(binary.startswith("libpython3") for binary in binaries)
    assert 50 < sum(binaries.values()) <= 100.01 and profile.top_functions


def test_pinned_fixed_rate_runs_give_their_own_p99_row_and_table(tmp_path: Path) -> None:
    results = _results()

    results.fixed_rate_pinned = {"noop direct": fixed_runs([1.0, 1.5, 1.0, 2.0, 1.0], None),
                                 "noop balancer": fixed_runs([3.0, 4.5, 3.5, 4.0, 9.0], 6.0),
                                 "noop nginx": fixed_runs([2.0] * 5, 4.0)}
    results.fixed_rate_pinned["noop balancer"] = [replace(sample, proxy_wait_s=0.1 * index, backend_wait_s=3.0)
                                                  for index, sample in enumerate(results.fixed_rate_pinned["noop balancer"])]
    checks = {check.goal: check for check in evaluate_targets(results)}
    pinned_p99 = checks["added latency p99 at half saturation, the hop on a CPU of its own (balancer − direct)"]
    assert pinned_p99.measured == pytest.approx(4.0 - 1.0)  # medians of each path's rounds
    assert pinned_p99.samples == pytest.approx((2.0, 3.0, 2.5, 2.0, 8.0))  # round by round
    assert pinned_p99.met is True
    report = render_report(results)
    assert "The same fixed-rate runs once more, the hop on a CPU of its own" in report
    # waits over 10 s runs: the hop's median 0.2 s, the backends' 3 s (both together)
    assert "| balancer | 4.00 | +3.00 | 9.00 | 3.0, 4.5, 3.5, 4.0, 9.0 | 60 % | 2.0 % | 30.0 % |" in report
    assert "| direct | 1.00 | — | 2.00 | 1.0, 1.5, 1.0, 2.0, 1.0 | — | — | n/a |" in report
    assert render_report(saved_and_loaded(results, tmp_path)) == report


def test_a_process_pinned_apart_gets_every_cpu_back(tmp_path: Path) -> None:
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs two CPUs")
    everywhere = os.sched_getaffinity(0)
    first, second = (subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"]) for _ in range(2))
    try:
        hop_cpus, other_cpus = split_cpus() or (set(), set())
        with pinned_apart([first.pid], [second.pid], hop_cpus, other_cpus):
            assert os.sched_getaffinity(first.pid) == hop_cpus and os.sched_getaffinity(second.pid) == other_cpus
        assert os.sched_getaffinity(first.pid) == os.sched_getaffinity(second.pid) == everywhere
    finally:
        for process in (first, second):
            process.kill()
            process.wait()


def test_the_cold_start_summary_gives_each_windows_median_and_the_first_over_the_last() -> None:
    from bench import cold_start

    starts = [[fixed_rate_sample(p99) for p99 in (9.0, 2.0, 1.0)], [fixed_rate_sample(p99) for p99 in (6.0, 1.0, 1.5)],
              [fixed_rate_sample(p99) for p99 in (12.0, 3.0, 2.0)]]
    lines = cold_start.summarize(starts, 1.0)
    assert lines[0] == "window 1 (0-1 s after ready): p50 0.20 ms, p99 9.00 ms (each start: 9.00, 6.00, 12.00), errors 0"
    assert lines[2].startswith("window 3 (2-3 s after ready): p50 0.20 ms, p99 1.50 ms")
    assert lines[3] == "first window's p99 over the last window's: 6.00x (median over 3 starts)"


def test_the_cold_start_section_shows_each_window_and_survives_the_results_file(tmp_path: Path) -> None:
    results = _results()
    assert "## The first seconds after a start" not in render_report(results)  # results from before it

    results.cold_start = [[fixed_rate_sample(p99, p50_ms=p50, rate=12000) for p50, p99 in start]
                          for start in (((0.3, 12.0), (0.2, 3.0)), ((0.2, 6.0), (0.2, 2.0)), ((0.4, 9.0), (0.1, 2.5)))]
    report = render_report(results)
    assert "each, the moment its health check answered, got 2 consecutive fixed-rate windows of 1 s at 12000" in report
    assert "| 0–1 s | 0.30 | 9.00 | 12.0, 6.0, 9.0 | 0 |" in report
    assert "| 1–2 s | 0.20 | 2.50 | 3.0, 2.0, 2.5 | 0 |" in report
    assert "First window's p99 over the last window's: 3.60x (median over 3 starts)." in report
    assert render_report(saved_and_loaded(results, tmp_path)) == report


def test_worker_processes_get_their_own_section_and_targets_at_their_own_rate(tmp_path: Path) -> None:
    results = _results()
    assert "## Several worker processes" not in render_report(results)  # results from before them
    results.targets += [Target(name="noop balancer (2 workers)", kind="noop", hop="balancer", url="u"),
                        Target(name="noop nginx (2 workers)", kind="noop", hop="nginx", url="u")]
    rps = {"noop balancer (2 workers)": 1_600, "noop nginx (2 workers)": 6_400}
    for name, rate in rps.items():
        results.saturation[name] = [SaturationSample(
            requests=rate * 10, seconds=10.0, errors=0, p50_ms=1.0, p99_ms=2.0, steal=0.0, machine_busy_s=18.0,
            proxy_cpu=CpuUsage(user_s=0.5, system_s=0.5), backend_cpu=CpuUsage(user_s=0.1, system_s=0.0))]
    results.workers, results.workers_rate = 2, 800.0

    results.workers_fixed_rate = {"noop direct": fixed_runs([1.0, 1.0, 2.0], None, rate=800),
                                  "noop balancer (2 workers)": fixed_runs([4.0, 3.0, 9.0], 5.0, rate=800),
                                  "noop nginx (2 workers)": fixed_runs([2.0, 2.0, 2.0], 3.0, rate=800)}
    checks = {check.goal: check for check in evaluate_targets(results)}
    p99 = checks["added latency p99 at half saturation, 2 workers (balancer − direct)"]
    assert p99.measured == pytest.approx(4.0 - 1.0) and p99.samples == pytest.approx((3.0, 2.0, 7.0))
    assert checks["saturation throughput, balancer / nginx, 2 workers each"].measured == pytest.approx(25.0)
    assert checks["saturation throughput, balancer / direct, 2 workers"].measured == pytest.approx(16.0)
    # the one-process targets still come from the one-process runs
    assert checks["added latency p99 at half saturation (balancer − direct)"].measured == pytest.approx(7.0)
    report = render_report(results)
    assert "## Several worker processes (`server.workers: 2`)" in report
    assert "half this balancer's own median saturation rate (800 req/s)" in report
    assert "| balancer, 2 workers | 1,600 | 0.16× | 0.20 | 4.00 | +0.00 | +3.00 |" in report
    assert "| 50 % | 4.0, 3.0, 9.0 |" in report  # busy: 5 CPU seconds over 10 s
    assert "balancer with 2 workers / with one process, saturation: **1.60×**; / nginx with 2 workers: **0.25×**" in report
    assert "| fixed rate, 2 workers' rate | noop balancer (2 workers) | 3 |" in report
    assert render_report(saved_and_loaded(results, tmp_path)) == report


def test_the_wait_for_a_cpu_counts_serving_threads_and_leaves_the_store_writer_out(tmp_path: Path) -> None:
    def write(pid: int, command: bytes, waited_ns: int) -> None:
        (tmp_path / str(pid)).mkdir(exist_ok=True)
        (tmp_path / str(pid) / "cmdline").write_bytes(command)
        (tmp_path / str(pid) / "schedstat").write_text(f"123456 {waited_ns} 789\n")

    write(100, b"python\0-m\0balancer\0serve\0", 2_000_000)
    write(101, b"python\0-m\0balancer.store_writer\0--store\0x.db\0", 9_000_000_000)
    before = serving_waits([100, 101, 555], tmp_path)  # 555 does not exist
    assert before == {100: 2_000_000}
    write(100, b"python\0-m\0balancer\0serve\0", 502_000_000)
    write(101, b"python\0-m\0balancer.store_writer\0--store\0x.db\0", 19_000_000_000)
    assert wait_between(before, serving_waits([100, 101], tmp_path)) == pytest.approx(0.5)
    sample = fixed_runs([1.0], 1.0)[0]
    assert math.isnan(sample.proxy_wait_share)  # runs from before it was measured
    assert replace(sample, proxy_wait_s=2.5).proxy_wait_share == pytest.approx(0.25)


def test_nginx_takes_the_priority_the_balancer_is_measured_at() -> None:
    upstreams, weights = {"a": ["h:1"], "b": ["h:2"]}, {"a": 1, "b": 1}
    plain = render_nginx_config(listen="127.0.0.1:1", upstreams=upstreams, weights=weights, strategy="sticky")
    ahead = render_nginx_config(listen="127.0.0.1:1", upstreams=upstreams, weights=weights, strategy="sticky",
                                priority=-5)
    assert "\nworker_priority" not in plain and "@" not in plain
    assert "\nworker_priority -5;\n" in ahead
    assert "priority: -5" in balancer_yaml(BalancerOptions("priority -5", priority=-5), {"model_a": "h:1",
                                                                                       "model_b": "h:2"})


def test_the_priority_runs_get_their_own_section_and_target_beside_the_default(tmp_path: Path) -> None:
    results = _results()
    assert "## Ahead of the backends" not in render_report(results)  # results from before them
    results.priority = -5
    results.priority_targets = [Target(name="noop balancer (priority -5)", kind="noop", hop="balancer", url="u"),
                                Target(name="noop nginx (priority -5)", kind="noop", hop="nginx", url="u")]
    results.fixed_rate["noop balancer (priority -5)"] = [
        replace(sample, proxy_wait_s=1.1, queued=250) for sample in fixed_runs([3.5], 6.6, rate=500)]
    results.fixed_rate["noop nginx (priority -5)"] = fixed_runs([2.5], 4.4, rate=500)
    checks = {check.goal: check for check in evaluate_targets(results)}
    ahead = checks["added latency p99 at half saturation, `server.priority: -5` (balancer − direct)"]
    assert ahead.measured == pytest.approx(3.5 - 2.0) and ahead.met
    assert checks["added latency p99 at half saturation (balancer − direct)"].measured == pytest.approx(7.0)
    report = render_report(results)
    assert "## Ahead of the backends on shared cores (`server.priority: -5`)" in report
    assert "weighs the hop's threads 3,121 against their 1,024" in report
    # 250 of 5,000 requests queued in the client for a connection
    assert "| balancer, `server.priority: -5` | 3.50 | +1.50 | 3.5 | 66 % | 11.0 % | 5.0 % |\n" in report
    assert "| nginx, `worker_priority -5` | 2.50 | +0.50 | 2.5 | 44 % | n/a | 0.0 % |\n" in report
    assert render_report(saved_and_loaded(results, tmp_path)) == report


def test_the_tail_section_ranks_each_runs_p99_against_its_share_of_requests_queued_in_the_client() -> None:
    results = _results()
    results.fixed_rate["noop balancer"] = [replace(sample, queued=queued) for sample, queued in
                                           zip(fixed_runs([9.0, 4.0, 20.0], 2.2), (400, 100, 900), strict=True)]
    results.fixed_rate["noop nginx"] = [replace(sample, queued=queued) for sample, queued in
                                        zip(fixed_runs([3.0, 2.0, 5.0], 0.55), (50, 0, 200), strict=True)]
    report = render_report(results)
    # the balancer's median run queued 400 of its 5,000 requests
    assert "| 8.0 % |\n| nginx |" in report
    assert "32 / 500 req/s = 64.00 ms" in report
    assert ("Over the 6 fixed-rate runs through a hop above, a run's p99 and its share of such requests "
            "(\"queued\") have a Spearman rank correlation of 1.00") in report


def test_callgrind_annotate_lines_become_instructions_per_function() -> None:
    annotated = """\
--------------------------------------------------------------------------------
Ir                   file:function
--------------------------------------------------------------------------------
2,049,868,669 (369.0%)  /tmp/build/Python/ceval.c:_PyEval_EvalFrameDefault'2 [/lib/libpython3.11.so.1.0]
  222,265,172 (40.01%)  /tmp/build/Modules/_sqlite/cursor.c:_pysqlite_query_execute [/lib/_sqlite3.so]
   80,467,743 (14.49%)  /tmp/build/Modules/_sqlite/cursor.c:bind_param [/lib/_sqlite3.so]
   10,275,100 ( 1.85%)  ???:0x00000000000392c0 [/usr/lib/libsqlite3.so.0.8.6]
    5,720,000 ( 1.03%)  ???:sqlite3_step [/usr/lib/libsqlite3.so.0.8.6]
    1,000,000 ( 0.18%)  /other/place/cursor.c:bind_param [/lib/_sqlite3.so]
"""
    assert instruction_functions(annotated) == {
        "cursor.c:_pysqlite_query_execute": 222_265_172,
        "cursor.c:bind_param": 81_467_743,  # one name in two places: summed
        "???:sqlite3_step": 5_720_000,
    }  # recursion markers ('2) and bare addresses left out


def test_a_function_shown_with_its_call_count_is_the_same_function() -> None:
    annotated = """\
    1,647,000 ( 2.00%)  /src/mypyc/lib-rt/dict_ops.c:CPyDict_Get (15,367x) [/lib/native.so]
      500,000 ( 0.61%)  /src/mypyc/lib-rt/dict_ops.c:CPyDict_Get [/lib/native.so]
"""
    assert instruction_functions(annotated) == {"dict_ops.c:CPyDict_Get": 2_147_000}


def test_a_layer_below_zero_is_explained_as_noise_and_only_then() -> None:
    from bench.report_bounds import negative_layer_sentence

    assert "A layer below zero is not a saving" in negative_layer_sentence(46.0, 40.0, 41.0)  # the floor above lean
    assert "A layer below zero is not a saving" in negative_layer_sentence(30.0, 40.0, 39.0)  # lean above default
    assert negative_layer_sentence(30.0, 35.0, 40.0) == ""


def test_the_fixed_rate_rounds_are_named_and_files_from_before_them_ran_as_many_as_the_others(tmp_path: Path) -> None:
    results = _results()
    results.settings = FULL
    report = render_report(results)
    assert "5 interleaved rounds (8 for the fixed-rate runs of the tables by backend kind), every figure" in report
    assert "Saturation rounds first, then 8 fixed-rate\n  rounds." in report
    path = tmp_path / "BENCHMARKS.json"
    results_file.save(results, path)
    document = json.loads(path.read_text())
    del document["results"]["settings"]["fixed_rate_rounds"]
    path.write_text(json.dumps(document))
    assert results_file.load(path).settings == replace(FULL, fixed_rate_rounds=5)
    assert "5 interleaved rounds, every figure" in render_report(results_file.load(path))
