"""bench/tail_episodes.py: grouping slow answers into episodes, the serving thread's shares, the report section."""

from __future__ import annotations

import math
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench import tail_episodes
from bench.report import render_report
from bench.tail_episodes import (
    EPISODE_LEAD_S,
    Episode,
    TailRun,
    ThreadSampler,
    episode_shares,
    find_episodes,
    read_trace,
    shares,
)
from tests.test_bench import _results, saved_and_loaded


def test_episodes_group_slow_answers_dispatched_close_together_and_drop_short_ones() -> None:
    offsets = [index * 0.001 for index in range(1000)]  # one answer a millisecond
    latencies = [0.2] * 1000
    for index in range(100, 160):  # 60 slow in a row: an episode
        latencies[index] = 9.0
    for index in range(300, 340, 2):  # 20 slow, every other one: too few
        latencies[index] = 6.0
    for index in (500, 515, 530, 545, 560, 575, 590) + tuple(range(600, 650)):  # 15 ms apart, then a run: one episode
        latencies[index] = 7.0
    latencies[900] = 50.0  # one very slow answer alone
    episodes = find_episodes(offsets, latencies, 5.0, gap_s=0.02, min_requests=50)
    assert [(round(episode.start_s, 3), round(episode.end_s, 3), episode.requests) for episode in episodes] == [
        (0.1, 0.159, 60), (0.5, 0.649, 57)]
    # with a 10 ms gap the second one's 15 ms steps no longer join it
    assert [episode.requests for episode in find_episodes(offsets, latencies, 5.0, gap_s=0.01, min_requests=50)] == [
        60, 50]
    assert find_episodes(offsets, latencies, 100.0) == []
    assert find_episodes([], [], 5.0) == []


def test_an_episode_at_the_end_of_the_run_counts() -> None:
    offsets = [index * 0.001 for index in range(100)]
    episodes = find_episodes(offsets, [0.1] * 40 + [8.0] * 60, 5.0, min_requests=50)
    assert [(episode.requests, round(episode.end_s, 3)) for episode in episodes] == [(60, 0.099)]


def test_shares_come_from_the_samples_bracketing_the_window() -> None:
    # ran 6 ms and waited 3 ms of every 10 ms
    samples = [(100.0 + index * 0.01, index * 6_000_000, index * 3_000_000) for index in range(11)]
    running, waiting = shares(samples, 100.0, 100.1)
    assert (running, waiting) == (pytest.approx(0.6), pytest.approx(0.3))
    assert shares(samples, 100.025, 100.075) == (pytest.approx(0.6), pytest.approx(0.3))  # 100.03 to 100.07
    assert all(math.isnan(share) for share in shares(samples, 100.031, 100.039))  # no sample inside
    assert all(math.isnan(share) for share in shares(samples, 200.0, 201.0))


def test_episode_shares_weigh_each_episode_by_its_length() -> None:
    short = Episode(0.0, 0.02 - EPISODE_LEAD_S + 0.02, 50, running=0.2, waiting=0.7)  # 40 ms with the lead
    long = Episode(1.0, 1.0 + 0.14, 500, running=0.6, waiting=0.35)  # 160 ms
    unsampled = Episode(2.0, 2.5, 900)  # NaN shares: left out
    runs = [TailRun(hop="noop balancer", rate=1.0, requests=10_000, p99_ms=9.0, slow=1_500, slow_ms=5.0,
                    running=0.5, waiting=0.2, episodes=[short, unsampled]),
            TailRun(hop="noop balancer", rate=1.0, requests=10_000, p99_ms=9.0, slow=600, slow_ms=5.0,
                    running=0.5, waiting=0.2, episodes=[long])]
    running, waiting = episode_shares(runs)
    assert running == pytest.approx((0.04 * 0.2 + 0.16 * 0.6) / 0.2)
    assert waiting == pytest.approx((0.04 * 0.7 + 0.16 * 0.35) / 0.2)
    assert all(math.isnan(share) for share in episode_shares([]))
    assert runs[0].slow_in_episodes == pytest.approx(950 / 1500)


def test_the_sampler_reads_a_threads_run_and_wait_times() -> None:
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])  # a thread that runs throughout
    try:
        with ThreadSampler(spinner.pid, spinner.pid) as sampler:
            time.sleep(0.2)
    finally:
        spinner.kill()
        spinner.wait()
    assert len(sampler.samples) >= 10  # one every 2 ms, give or take the sampler's own scheduling
    times, ran, waited = zip(*sampler.samples)
    assert list(times) == sorted(times) and list(ran) == sorted(ran) and list(waited) == sorted(waited)
    assert ran[-1] - ran[0] > 0.05e9  # it ran for a good part of the 0.2 s (two CPUs, shared)


def test_the_sampler_sums_each_groups_threads_and_reads_the_idle_time() -> None:
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; print(flush=True); time.sleep(60)"],
                               stdout=subprocess.PIPE)
    try:
        assert sleeper.stdout is not None and sleeper.stdout.readline() == b"\n"  # started
        settled(Path(f"/proc/{sleeper.pid}/task/{sleeper.pid}/schedstat"))  # and asleep, even on a loaded machine
        groups = {"spinners": tail_episodes.thread_files(spinner.pid for spinner in spinners),
                  "sleeper": tail_episodes.thread_files([sleeper.pid]), "gone": [Path("/proc/0/task/0/schedstat")]}
        assert len(groups["spinners"]) == 2
        with ThreadSampler(sleeper.pid, sleeper.pid, groups, idle=True) as sampler:
            time.sleep(0.2)
            spinners[1].kill()  # a thread that ends keeps its last times
            spinners[1].wait()
            time.sleep(0.1)
    finally:
        for process in (*spinners, sleeper):
            process.kill()
            process.wait()
    samples = sampler.group_samples
    assert set(samples) == {"spinners", "sleeper", "gone", tail_episodes.IDLE}
    assert all(len(series) == len(sampler.samples) for series in samples.values())
    times, ran, waited = zip(*samples["spinners"])
    assert list(ran) == sorted(ran) and list(waited) == sorted(waited)
    running, _ = shares(samples["spinners"], times[0], times[-1])
    assert running > 0.2  # two spinners, one of them for 0.2 s of the 0.3 s, on two CPUs shared with whatever runs
    assert shares(samples["sleeper"], times[0], times[-1]) == (pytest.approx(0.0, abs=0.01), pytest.approx(0.0, abs=0.01))
    assert shares(samples["gone"], times[0], times[-1]) == (0.0, 0.0)  # nothing to read: no time
    idle = [sample[1] for sample in samples[tail_episodes.IDLE]]
    assert idle == sorted(idle) and idle[-1] > 1e9  # /proc/uptime's idle seconds since boot, in ns


def settled(schedstat: Path, timeout_s: float = 5.0) -> None:
    """Wait until the thread of `schedstat` neither ran nor waited for a CPU over 50 ms."""
    deadline = time.monotonic() + timeout_s
    before = schedstat.read_text().split()[:2]
    while time.monotonic() < deadline:
        time.sleep(0.05)
        now = schedstat.read_text().split()[:2]
        if now == before:
            return
        before = now
    raise AssertionError(f"{schedstat} kept running for {timeout_s:g} s")


def test_softirq_threads_are_found_by_name(tmp_path: Path) -> None:
    for pid, comm in ((14, "ksoftirqd/0\n"), (22, "ksoftirqd/1\n"), (300, "python\n")):
        (tmp_path / str(pid)).mkdir()
        (tmp_path / str(pid) / "comm").write_text(comm)
    (tmp_path / "self").mkdir()
    assert tail_episodes.softirq_threads(tmp_path) == [14, 22]
    assert tail_episodes.softirq_threads()  # this machine's


def test_group_shares_weigh_each_episode_by_its_length() -> None:
    short = Episode(0.0, 0.02, 50, running=0.5, waiting=0.4, groups={"backends": (0.2, 0.1), tail_episodes.IDLE: (0.5, 0.0)})
    long = Episode(1.0, 1.14, 500, running=0.5, waiting=0.4, groups={"backends": (0.6, 0.3)})  # 160 ms with the lead
    unsampled = Episode(2.0, 2.1, 60, groups={"backends": (math.nan, math.nan)})
    runs = [TailRun(hop="noop balancer", rate=1.0, requests=100, p99_ms=9.0, slow=700, slow_ms=5.0, running=0.5,
                    waiting=0.2, episodes=[short, long, unsampled])]
    measured = tail_episodes.group_episode_shares(runs)
    assert measured["backends"] == (pytest.approx((0.04 * 0.2 + 0.16 * 0.6) / 0.2), pytest.approx((0.04 * 0.1 + 0.16 * 0.3) / 0.2))
    assert measured[tail_episodes.IDLE] == (0.5, 0.0)  # only the episode that had it
    assert tail_episodes.group_episode_shares([]) == {}


def test_the_trace_says_when_its_first_answer_was_dispatched(tmp_path: Path) -> None:
    trace = tmp_path / "trace.txt"
    trace.write_text("# first dispatch at 1765000000.250000\n0.000000 0.412\n0.000500 6.100\n")
    assert read_trace(trace) == (1765000000.25, [0.0, 0.0005], [0.412, 6.1])


def test_the_report_reads_the_episodes_and_says_when_they_are_cpu_contention(tmp_path: Path) -> None:
    results = _results()
    results.tail_runs = [
        TailRun(hop="noop balancer", rate=11500.0, requests=46_000, p99_ms=8.1, slow=900, slow_ms=5.0, running=0.58,
                waiting=0.16, episodes=[Episode(1.0, 1.04, 500, running=0.62, waiting=0.35),
                                        Episode(3.0, 3.02, 300, running=0.55, waiting=0.40)]),
        TailRun(hop="noop nginx", rate=11500.0, requests=46_000, p99_ms=1.2, slow=10, slow_ms=5.0, running=0.48,
                waiting=0.14),
    ]
    for loaded in (results, saved_and_loaded(results, tmp_path)):
        report = render_report(loaded)
        assert "## What the slow answers are made of" in report
        assert "`python -m bench.tail_episodes --rate 11500 --rounds 1 " in report
        assert "| noop balancer | 8.1 | 2.0 % | 88.9 % | 2 | 30 | 58.0 % | 16.0 % | 59.2 % | 37.0 % |" in report
        assert "| noop nginx | 1.2 | 0.0 % | 0.0 % | 0 | n/a | 48.0 % | 14.0 % | n/a | n/a |" in report
        assert "running or runnable 96.2 % of the time, so it always had work" in report
        assert "Who had the two CPUs meanwhile" not in report  # runs from before the other threads were sampled
    results.tail_runs[0] = TailRun(**{**results.tail_runs[0].__dict__, "episodes": [
        Episode(1.0, 1.04, 500, running=0.3, waiting=0.2)]})
    assert "running or runnable only 50.0 % of the time, so something other than" in render_report(results)
    results.tail_runs = []
    assert "What the slow answers are made of" not in render_report(results)


def test_the_serving_thread_of_nginx_is_its_worker(monkeypatch: pytest.MonkeyPatch) -> None:
    from bench.stack import Target
    monkeypatch.setattr(tail_episodes, "process_tree", lambda pid: [pid, pid + 1])
    nginx = Target(name="noop nginx", kind="noop", hop="nginx", url="u", proxy_pid=10)
    balancer = Target(name="noop balancer", kind="noop", hop="balancer", url="u", proxy_pid=20)
    assert (tail_episodes.serving_pid(nginx), tail_episodes.serving_pid(balancer)) == (11, 20)


def test_the_report_says_who_had_the_cpus_and_when_one_sat_idle_while_the_hop_waited(tmp_path: Path) -> None:
    results = _results()
    groups = {"hop's other threads": (0.05, 0.1), "backends": (0.35, 0.3), "client": (0.4, 0.15), "ksoftirqd": (0.0, 0.0),
              "harness": (0.01, 0.0), tail_episodes.IDLE: (0.3, 0.0)}
    whole = {**groups, tail_episodes.IDLE: (0.5, 0.0), "backends": (0.3, 0.2)}
    results.tail_runs = [
        TailRun(hop="noop balancer", rate=17000.0, requests=68_000, p99_ms=12.0, slow=900, slow_ms=5.0, running=0.6,
                waiting=0.18, groups=whole, episodes=[Episode(1.0, 1.06, 900, running=0.56, waiting=0.4, groups=groups)]),
        TailRun(hop="noop nginx", rate=17000.0, requests=68_000, p99_ms=1.5, slow=0, slow_ms=5.0, running=0.55,
                waiting=0.15, groups=whole),
    ]
    for loaded in (results, saved_and_loaded(results, tmp_path)):
        report = render_report(loaded)
        assert ("| hop, stretch | serving thread: ran / waited | hop's other threads: ran / waited | backends: ran / "
                "waited | client: ran / waited | ksoftirqd: ran / waited | harness: ran / waited | idle CPUs |") in report
        assert ("| noop balancer, in episodes | 56.0 % / 40.0 % | 5.0 % / 10.0 % | 35.0 % / 30.0 % | 40.0 % / 15.0 % "
                "| 0.0 % / 0.0 % | 1.0 % / 0.0 % | 30.0 % |") in report
        assert "| noop balancer, whole runs | 60.0 % / 18.0 % | 5.0 % / 10.0 % | 30.0 % / 20.0 % |" in report
        assert "| noop nginx, in episodes" not in report  # it had none
        assert "| noop nginx, whole runs | 55.0 % / 15.0 % |" in report
        assert ("In the noop balancer's episodes the CPUs were idle 30.0 % of the time (out of 200 %; 50.0 % over "
                "whole runs) while, over the same stretches, its serving thread waited for a CPU 40.0 % and the "
                "other threads sampled 55.0 % between them.") in report
        # the serving thread was runnable 96 % of its episodes: not contention with busy CPUs, since one sat idle
        assert "blocked on nothing but a CPU; who had the CPUs meanwhile is below." in report
        assert "a core that the load generator and the backends were using" not in report
    results.tail_runs[0].episodes[0].groups[tail_episodes.IDLE] = (0.01, 0.0)  # no idle CPU: no such sentence
    report = render_report(results)
    assert "were idle" not in report
    assert "a core that the load generator and the backends were using" in report
