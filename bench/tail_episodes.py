"""What a fixed-rate run's slow requests are made of, and what the hop's serving thread was doing meanwhile.

    python -m bench.tail_episodes [--rate 11500] [--rounds 4] [--seconds 6] [--slow-ms 5]

A p99 over the goal can come from requests slow all along, or from a few stretches in which the
hop fell behind and every request arriving then waited. This starts two no-op backends and, in
front of them, a balancer and nginx (one worker each, as `make bench`'s fixed-rate runs), then runs
`bench.openloop --trace` against each in turn, every round. During each run it samples
`/proc/<pid>/task/<tid>/schedstat` of the hop's serving thread (the balancer's event loop, nginx's
worker) every SAMPLE_S: the time it ran and the time it was runnable but waiting for a CPU.

An *episode* is a stretch of slow requests (over `--slow-ms`) whose dispatches are less than
EPISODE_GAP_S apart, with at least EPISODE_MIN_REQUESTS of them: the hop falling behind, not one
unlucky request. For each, the serving thread's share of the wall time on a CPU and waiting for
one, from EPISODE_LEAD_S before its first slow request to its last (the backlog builds before the
first request turns slow). Running + waiting near 100 % means the thread always had work and
was never blocked on anything but a CPU: the episode is CPU contention. The same samples are
taken of everything else the run keeps busy (GROUPS: the hop's other threads and processes, the
backends, the client), so an episode also says who had the two CPUs meanwhile.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import subprocess
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from bench.errors import BenchError
from bench.procstat import process_tree
from bench.runs import FULL, Settings, openloop_command
from bench.stack import BalancerOptions, Stack, Target, scratch_folder
from bench.tools import ensure_tools
from tests.processes import REPO, artifacts_dir

logger = logging.getLogger("bench.tail_episodes")

SAMPLE_S = 0.002
EPISODE_GAP_S = 0.02
EPISODE_MIN_REQUESTS = 50
EPISODE_LEAD_S = 0.02
TRACE_HEADER = "# first dispatch at "
SLOW_MS = 5.0  # the goal for the hop's added p99
# sampled beside the serving thread: every other thread of the hop's processes (the balancer's store writer, nginx's
# master), both backends' threads, the load generator's, the kernel's softirq threads (loopback TCP work the kernel
# defers from a busy CPU runs there) and the harness's own (this sampler among them)
GROUPS = ("hop's other threads", "backends", "client", "ksoftirqd", "harness")
IDLE = "idle"  # also sampled: the CPUs' idle time (/proc/uptime, all CPUs together, in 10 ms steps), as "running"


@dataclass(frozen=True)
class Episode:
    """A stretch of slow requests, and the serving thread's shares of its wall time."""

    start_s: float  # first slow request's dispatch, seconds since the run's first dispatch
    end_s: float  # last one's
    requests: int  # slow requests in it
    running: float = math.nan  # share of the wall time the serving thread ran
    waiting: float = math.nan  # share it was runnable but waiting for a CPU
    # GROUPS' (running, waiting) shares of the same wall time, summed over their threads (so up to 2.0 on 2 CPUs)
    groups: dict[str, tuple[float, float]] = field(default_factory=dict)


@dataclass(frozen=True)
class TailRun:
    """One traced fixed-rate run against one hop."""

    hop: str  # the target's name
    rate: float
    requests: int  # answers measured
    p99_ms: float
    slow: int  # answers over slow_ms
    slow_ms: float
    running: float  # the serving thread's shares over the whole run
    waiting: float
    episodes: list[Episode] = field(default_factory=list)
    groups: dict[str, tuple[float, float]] = field(default_factory=dict)  # GROUPS' shares over the whole run

    @property
    def slow_in_episodes(self) -> float:
        """Fraction of the slow answers that came in episodes (NaN with none slow)."""
        return sum(episode.requests for episode in self.episodes) / self.slow if self.slow else math.nan


def read_trace(path: Path) -> tuple[float, list[float], list[float]]:
    """A `bench.openloop --trace` file: (first dispatch's unix time, dispatch offsets in s, latencies in ms)."""
    first = math.nan
    offsets: list[float] = []
    latencies: list[float] = []
    with open(path) as lines:
        for line in lines:
            if line.startswith(TRACE_HEADER):
                first = float(line[len(TRACE_HEADER):])
            elif line.strip():
                offset, latency = line.split()
                offsets.append(float(offset))
                latencies.append(float(latency))
    return first, offsets, latencies


def find_episodes(offsets: Sequence[float], latencies: Sequence[float], slow_ms: float, *,
                  gap_s: float = EPISODE_GAP_S, min_requests: int = EPISODE_MIN_REQUESTS) -> list[Episode]:
    """Runs of answers over `slow_ms` whose dispatches (in order) are under `gap_s` apart, `min_requests` or more."""
    episodes = []
    start = end = math.nan
    count = 0
    for offset, latency in zip(offsets, latencies):
        if latency <= slow_ms:
            continue
        if count and offset - end < gap_s:
            end = offset
            count += 1
            continue
        if count >= min_requests:
            episodes.append(Episode(start, end, count))
        start = end = offset
        count = 1
    if count >= min_requests:
        episodes.append(Episode(start, end, count))
    return episodes


def shares(samples: Sequence[tuple[float, int, int]], start: float, end: float) -> tuple[float, float]:
    """(running, waiting) shares of the wall time between the samples that bracket [start, end].

    A sample is (unix time, nanoseconds run so far, nanoseconds waited so far), in time order. NaN
    when fewer than two samples fall in the window.
    """
    inside = [sample for sample in samples if start <= sample[0] <= end]
    if len(inside) < 2 or inside[-1][0] <= inside[0][0]:
        return math.nan, math.nan
    first, last = inside[0], inside[-1]
    wall = last[0] - first[0]
    return (last[1] - first[1]) / 1e9 / wall, (last[2] - first[2]) / 1e9 / wall


class ThreadSampler:
    """Samples one thread's schedstat every SAMPLE_S in a background thread while it is used as a context, and
    beside it `groups` of threads (name -> their schedstat files), each group's times summed over its threads.

    The files are opened once and read again with `pread` at offset 0, which procfs answers afresh: a sample of
    a dozen threads then costs the sampler a few microseconds each. A thread that ends keeps its last times.
    """

    def __init__(self, pid: int, tid: int, groups: Mapping[str, Sequence[Path]] | None = None, *,
                 idle: bool = False) -> None:
        self.path = Path(f"/proc/{pid}/task/{tid}/schedstat")
        self.samples: list[tuple[float, int, int]] = []
        self.idle = idle  # also sample the CPUs' idle time, as group IDLE
        self.group_samples: dict[str, list[tuple[float, int, int]]] = {name: [] for name in groups or {}}
        if idle:
            self.group_samples[IDLE] = []
        self._groups = {name: list(paths) for name, paths in (groups or {}).items()}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="schedstat-sampler", daemon=True)

    def _run(self) -> None:
        serving = _open(self.path)
        if serving is None:
            return
        groups = {name: [fd for fd in map(_open, paths) if fd is not None] for name, paths in self._groups.items()}
        uptime = _open(Path("/proc/uptime")) if self.idle else None
        last: dict[int, tuple[int, int]] = {}
        try:
            while not self._stop.is_set():
                times = _read(serving)
                if times is None:
                    return
                now = time.time()
                self.samples.append((now, *times))
                for name, fds in groups.items():
                    ran = waited = 0
                    for fd in fds:
                        last[fd] = _read(fd) or last.get(fd, (0, 0))
                        ran, waited = ran + last[fd][0], waited + last[fd][1]
                    self.group_samples[name].append((now, ran, waited))
                if uptime is not None:
                    self.group_samples[IDLE].append((now, round(float(os.pread(uptime, 64, 0).split()[1]) * 1e9), 0))
                self._stop.wait(SAMPLE_S)
        finally:
            for fd in [serving, *(fd for fds in groups.values() for fd in fds), *([uptime] if uptime else [])]:
                os.close(fd)

    def __enter__(self) -> ThreadSampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()


def _open(path: Path) -> int | None:
    try:
        return os.open(path, os.O_RDONLY)
    except (FileNotFoundError, ProcessLookupError):
        return None


def _read(fd: int) -> tuple[int, int] | None:
    """(ns run, ns waited) from an open schedstat file; None once its thread is gone."""
    try:
        ran, waited, _ = os.pread(fd, 128, 0).split()
    except (OSError, ValueError):
        return None
    return int(ran), int(waited)


def softirq_threads(proc: Path = Path("/proc")) -> list[int]:
    """The pids of the kernel's per-CPU softirq threads (`ksoftirqd/N`)."""
    pids = []
    for entry in proc.iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "comm").read_text().startswith("ksoftirqd/"):
                    pids.append(int(entry.name))
            except (FileNotFoundError, ProcessLookupError):
                continue
    return sorted(pids)


def thread_files(pids: Iterable[int]) -> list[Path]:
    """The schedstat files of every thread of `pids` (those still there)."""
    files = []
    for pid in pids:
        try:
            files += [Path(f"/proc/{pid}/task/{tid}/schedstat") for tid in sorted(os.listdir(f"/proc/{pid}/task"))]
        except FileNotFoundError:
            continue
    return files


def serving_pid(target: Target) -> int:
    """The process whose main thread serves requests: the balancer itself, nginx's (only) worker."""
    if target.proxy_pid is None:
        raise BenchError(f"{target.name} has no process to sample")
    tree = process_tree(target.proxy_pid)
    return tree[1] if target.hop == "nginx" and len(tree) > 1 else tree[0]


def measure_run(target: Target, rate: float, settings: Settings, body_file: Path, slow_ms: float,
                trace: Path) -> TailRun:
    """One traced fixed-rate run against `target`, its serving thread sampled throughout."""
    pid = serving_pid(target)
    command = openloop_command(target, rate, settings, body_file) + ["--trace", str(trace)]
    limit = settings.warmup_s + settings.fixed_rate_s + 30
    hop_files = [path for path in thread_files(process_tree(target.proxy_pid or pid))
                 if path != Path(f"/proc/{pid}/task/{pid}/schedstat")]
    # the client's interpreter execs the compiled client: the same thread throughout
    with subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as client:
        groups = dict(zip(GROUPS, (hop_files, thread_files(target.backend_pids),
                                   [Path(f"/proc/{client.pid}/task/{client.pid}/schedstat")],
                                   thread_files(softirq_threads()), thread_files([os.getpid()]))))
        with ThreadSampler(pid, pid, groups, idle=True) as sampler:
            try:
                stdout, stderr = client.communicate(timeout=limit)
            except subprocess.TimeoutExpired as exc:
                client.kill()
                raise BenchError(f"bench.openloop did not finish within {limit:g}s: {' '.join(command)}") from exc
    if client.returncode != 0:
        raise BenchError(f"bench.openloop exited with {client.returncode}: {stderr.strip()[-1500:]}")
    first, offsets, latencies = read_trace(trace)
    if not offsets:
        raise BenchError(f"{target.name}: no answers in the run's trace")

    def measured(start: float, end: float) -> tuple[float, float, dict[str, tuple[float, float]]]:
        running, waiting = shares(sampler.samples, start, end)
        return running, waiting, {name: shares(samples, start, end) for name, samples in sampler.group_samples.items()}

    episodes = []
    for episode in find_episodes(offsets, latencies, slow_ms):
        running, waiting, during = measured(first + episode.start_s - EPISODE_LEAD_S, first + episode.end_s)
        episodes.append(replace(episode, running=running, waiting=waiting, groups=during))
    running, waiting, whole = measured(first, first + offsets[-1])
    p99 = json.loads(stdout.strip().splitlines()[-1])["latency_ms"]["p99"]
    return TailRun(hop=target.name, rate=rate, requests=len(latencies), p99_ms=math.nan if p99 is None else p99,
                   slow=sum(latency > slow_ms for latency in latencies), slow_ms=slow_ms, running=running,
                   waiting=waiting, episodes=episodes, groups=whole)


def measure(targets: Sequence[Target], rate: float, rounds: int, settings: Settings, body_file: Path,
            slow_ms: float, folder: Path) -> list[TailRun]:
    """`rounds` traced runs against each target, interleaved."""
    runs = []
    for round_index in range(rounds):
        for target in targets:
            run = measure_run(target, rate, settings, body_file, slow_ms, folder / "trace.txt")
            logger.info("round %d/%d %s: %s", round_index + 1, rounds, target.name, describe(run))
            runs.append(run)
    return runs


def _length_s(episode: Episode) -> float:
    """The wall time an episode's shares were measured over: EPISODE_LEAD_S before its first slow answer to its last."""
    return episode.end_s - episode.start_s + EPISODE_LEAD_S


def _weighted(rows: Sequence[tuple[float, float, float]]) -> tuple[float, float]:
    """(length, running, waiting) rows as one (running, waiting), each row weighted by its length; NaN for none."""
    total = sum(length for length, _, _ in rows)
    if not total:
        return math.nan, math.nan
    return (sum(length * running for length, running, _ in rows) / total,
            sum(length * waiting for length, _, waiting in rows) / total)


def episode_shares(runs: Sequence[TailRun]) -> tuple[float, float]:
    """The serving thread's (running, waiting) shares over all the runs' episodes, each weighted by its length
    (EPISODE_LEAD_S included, as measured); NaN when there were none or none was sampled."""
    return _weighted([(_length_s(episode), episode.running, episode.waiting)
                      for run in runs for episode in run.episodes if not math.isnan(episode.running)])


def group_episode_shares(runs: Sequence[TailRun]) -> dict[str, tuple[float, float]]:
    """GROUPS' (running, waiting) shares over all the runs' episodes, weighted by length as `episode_shares`;
    groups not sampled in any episode are left out."""
    rows: dict[str, list[tuple[float, float, float]]] = {}
    for episode in (episode for run in runs for episode in run.episodes):
        for name, (running, waiting) in episode.groups.items():
            if not math.isnan(running):
                rows.setdefault(name, []).append((_length_s(episode), running, waiting))
    return {name: _weighted(group) for name, group in rows.items()}


def describe(run: TailRun) -> str:
    """One line about a run."""
    episodes = "; ".join(f"{1000 * (episode.end_s - episode.start_s):.0f} ms, {episode.requests} slow, ran "
                         f"{episode.running:.0%} waited {episode.waiting:.0%}" for episode in run.episodes)
    during = group_episode_shares([run])
    others = "; ".join(f"{name} ran {running:.0%} waited {waiting:.0%}" for name, (running, waiting) in during.items())
    return (f"p99 {run.p99_ms:.2f} ms, {run.slow} over {run.slow_ms:g} ms, ran {run.running:.0%} waited "
            f"{run.waiting:.0%}; episodes: {episodes or 'none'}" + (f"; in them {others}" if others else ""))


def start_hops(stack: Stack) -> list[Target]:
    """Two no-op backends and, in front of them, the balancer as it ships and nginx (one worker each)."""
    upstreams, backend_pids = stack.backends("noop")
    targets = [stack.balancer("noop", BalancerOptions("default"), upstreams, backend_pids),
               stack.nginx_proxy("noop", upstreams, backend_pids)]
    stack.ready()
    return targets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=11500.0, help="requests/s of every run")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=6.0, help="measured length of each run")
    parser.add_argument("--slow-ms", type=float, default=SLOW_MS, help="an answer slower than this is slow (the p99 goal)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    tools = ensure_tools()
    with scratch_folder("bench-tail-") as folder, Stack(folder, nginx=tools["nginx"], artifacts=artifacts_dir()) as stack:
        targets = start_hops(stack)
        settings = replace(FULL, fixed_rate_s=args.seconds)
        for target in targets:  # connection pools and caches filled; not measured
            measure_run(target, args.rate, replace(settings, fixed_rate_s=1.0), stack.body_file, args.slow_ms,
                        folder / "trace.txt")
        measure(targets, args.rate, args.rounds, settings, stack.body_file, args.slow_ms, folder)


if __name__ == "__main__":
    main()
