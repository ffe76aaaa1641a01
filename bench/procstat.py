"""CPU accounting from /proc: user + system seconds of whole processes (all their threads)."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

CLOCK_TICKS_PER_SECOND = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class ProcessTimes:
    """One line of /proc/<pid>/stat, reduced to what CPU accounting needs."""

    pid: int
    parent_pid: int
    user_ticks: int
    system_ticks: int
    children_user_ticks: int = 0  # cutime, cstime: the children it has reaped (waited for)
    children_system_ticks: int = 0

    @property
    def cpu_ticks(self) -> int:
        """utime + stime: every thread of the process, live or exited (not reaped children)."""
        return self.user_ticks + self.system_ticks


def parse_stat(text: str) -> ProcessTimes:
    """Parse /proc/<pid>/stat; the command name may hold spaces and parentheses, so split after the last ')'."""
    pid_text, _, rest = text.partition(" (")
    _, _, after_name = rest.rpartition(") ")
    fields = after_name.split()
    if not pid_text.strip().isdigit() or len(fields) < 13:
        raise ValueError(f"not a /proc/<pid>/stat line: {text[:80]!r}")
    # after the name: state(3) ppid(4) ... utime(14) stime(15) cutime(16) cstime(17), numbered as in proc(5)
    return ProcessTimes(pid=int(pid_text), parent_pid=int(fields[1]),
                        user_ticks=int(fields[11]), system_ticks=int(fields[12]),
                        children_user_ticks=int(fields[13]) if len(fields) > 14 else 0,
                        children_system_ticks=int(fields[14]) if len(fields) > 14 else 0)


def read_times(pid: int, proc: Path = Path("/proc")) -> ProcessTimes | None:
    """The process's times, or None if it is gone."""
    try:
        return parse_stat((proc / str(pid) / "stat").read_text())
    except (FileNotFoundError, ProcessLookupError):
        return None


def process_tree(root_pid: int, proc: Path = Path("/proc")) -> list[int]:
    """`root_pid` and all its descendants (an nginx master and its workers)."""
    parents: dict[int, int] = {}
    for entry in proc.iterdir():
        if entry.name.isdigit():
            times = read_times(int(entry.name), proc)
            if times is not None:
                parents[times.pid] = times.parent_pid
    return descendants(root_pid, parents)


def descendants(root_pid: int, parents: Mapping[int, int]) -> list[int]:
    """`root_pid` followed by every pid whose chain of parents reaches it."""
    tree = [root_pid]
    frontier = {root_pid}
    while frontier:
        frontier = {pid for pid, parent in parents.items() if parent in frontier and pid not in tree}
        tree.extend(sorted(frontier))
    return tree


@dataclass(frozen=True)
class CpuUsage:
    """CPU seconds a set of processes used over an interval, split into user and kernel time."""

    user_s: float
    system_s: float

    @property
    def total_s(self) -> float:
        """User + system seconds."""
        return self.user_s + self.system_s

    @property
    def system_share(self) -> float:
        """Fraction of the time spent in the kernel (NaN if none was used)."""
        return self.system_s / self.total_s if self.total_s > 0 else float("nan")


def snapshot(pids: Iterable[int], proc: Path = Path("/proc")) -> dict[int, ProcessTimes]:
    """pid -> times so far, for the pids that still exist."""
    times = {}
    for pid in pids:
        current = read_times(pid, proc)
        if current is not None:
            times[pid] = current
    return times


def cpu_between(before: Mapping[int, ProcessTimes], after: Mapping[int, ProcessTimes]) -> CpuUsage:
    """CPU the processes of `before` used until `after` (a process that vanished counts 0)."""
    pairs = [(start, after[pid]) for pid, start in before.items() if pid in after]
    user = sum(end.user_ticks - start.user_ticks for start, end in pairs)
    system = sum(end.system_ticks - start.system_ticks for start, end in pairs)
    return CpuUsage(user_s=user / CLOCK_TICKS_PER_SECOND, system_s=system / CLOCK_TICKS_PER_SECOND)


def tree_cpu_between(root_pid: int, before: Mapping[int, ProcessTimes],
                     after: Mapping[int, ProcessTimes]) -> tuple[CpuUsage, CpuUsage]:
    """(all, all but the root's own): CPU a process tree used between two snapshots of it.

    Unlike `cpu_between`, the tree may change in between (a balancer replacing its store writer):
    a process started since counts in full, and a child of the root that ended and was reaped
    counts what it used after `before`, from the root's cutime and cstime.
    """
    user = system = 0
    for pid, end in after.items():
        start = before.get(pid)
        user += end.user_ticks - (start.user_ticks if start else 0)
        system += end.system_ticks - (start.system_ticks if start else 0)
    root_before, root_after = before.get(root_pid), after.get(root_pid)
    own_user = own_system = 0
    if root_before is not None and root_after is not None:
        reaped = [times for pid, times in before.items() if pid not in after and times.parent_pid == root_pid]
        user += root_after.children_user_ticks - root_before.children_user_ticks - sum(t.user_ticks for t in reaped)
        system += (root_after.children_system_ticks - root_before.children_system_ticks
                   - sum(t.system_ticks for t in reaped))
        own_user = root_after.user_ticks - root_before.user_ticks
        own_system = root_after.system_ticks - root_before.system_ticks
    total = CpuUsage(user_s=user / CLOCK_TICKS_PER_SECOND, system_s=system / CLOCK_TICKS_PER_SECOND)
    children = CpuUsage(user_s=(user - own_user) / CLOCK_TICKS_PER_SECOND,
                        system_s=(system - own_system) / CLOCK_TICKS_PER_SECOND)
    return total, children


def serving_waits(pids: Iterable[int], proc: Path = Path("/proc")) -> dict[int, int]:
    """pid -> nanoseconds its main thread has spent runnable but waiting for a CPU (`/proc/<pid>/schedstat`'s
    second field), for the pids that still exist and are not a balancer's store writer: that one waits by
    design, at idle priority, while the event loop's (or an nginx worker's) wait delays requests."""
    waits = {}
    for pid in pids:
        try:
            if b"balancer.store_writer" in (proc / str(pid) / "cmdline").read_bytes():
                continue
            waits[pid] = int((proc / str(pid) / "schedstat").read_text().split()[1])
        except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
            continue
    return waits


def wait_between(before: Mapping[int, int], after: Mapping[int, int]) -> float:
    """Seconds of CPU wait the processes of both snapshots added in between (see `serving_waits`)."""
    return sum(after[pid] - start for pid, start in before.items() if pid in after) / 1e9


def microseconds_per_request(cpu_seconds: float, requests: int) -> float:
    """CPU cost of one request in µs (NaN when nothing was served)."""
    return cpu_seconds / requests * 1e6 if requests > 0 else float("nan")


@dataclass(frozen=True)
class MachineTimes:
    """The first line of /proc/stat: CPU time of every core so far, in clock ticks."""

    total_ticks: int
    steal_ticks: int  # time the hypervisor ran something else while this machine had work
    idle_ticks: int = 0  # idle + iowait: no runnable work


def machine_times(proc: Path = Path("/proc")) -> MachineTimes:
    """All cores' CPU time so far; the fields after the label are user nice system idle iowait irq softirq steal ..."""
    fields = (proc / "stat").read_text().split("\n", 1)[0].split()
    if not fields or fields[0] != "cpu" or len(fields) < 9:
        raise ValueError(f"not the first line of /proc/stat: {fields[:10]!r}")
    # guest time (fields 9 and 10) is already counted in user and nice
    ticks = [int(value) for value in fields[1:9]]
    return MachineTimes(total_ticks=sum(ticks), steal_ticks=ticks[7], idle_ticks=ticks[3] + ticks[4])


def steal_share(before: MachineTimes, after: MachineTimes) -> float:
    """Fraction of all cores' time in between that the hypervisor took (NaN over no time)."""
    total = after.total_ticks - before.total_ticks
    return (after.steal_ticks - before.steal_ticks) / total if total > 0 else float("nan")


def busy_seconds(before: MachineTimes, after: MachineTimes) -> float:
    """CPU seconds all cores ran work in between (every process and the kernel; idle and stolen time left out)."""
    total = after.total_ticks - before.total_ticks
    idle = after.idle_ticks - before.idle_ticks
    steal = after.steal_ticks - before.steal_ticks
    return (total - idle - steal) / CLOCK_TICKS_PER_SECOND


def pin_process(pid: int, cpus: set[int], proc: Path = Path("/proc")) -> None:
    """Move every thread of a process onto `cpus` (a process or thread that ended meanwhile is skipped)."""
    try:
        tasks = list((proc / str(pid) / "task").iterdir())
    except FileNotFoundError:
        return
    for task in tasks:
        try:
            os.sched_setaffinity(int(task.name), cpus)
        except (ProcessLookupError, FileNotFoundError):
            pass


@contextmanager
def pinned_apart(hop_pids: Sequence[int], other_pids: Sequence[int], hop_cpus: set[int],
                 other_cpus: set[int]) -> Iterator[None]:
    """`hop_pids` on `hop_cpus` and `other_pids` on `other_cpus` until the block ends, then every CPU again."""
    everywhere = os.sched_getaffinity(0)
    try:
        for pid in hop_pids:
            pin_process(pid, hop_cpus)
        for pid in other_pids:
            pin_process(pid, other_cpus)
        yield
    finally:
        for pid in (*hop_pids, *other_pids):
            pin_process(pid, everywhere)


def split_cpus() -> tuple[set[int], set[int]] | None:
    """(one CPU for the hop under test, the others for everything else) with two CPUs or more, else None."""
    cpus = sorted(os.sched_getaffinity(0))
    return ({cpus[0]}, set(cpus[1:])) if len(cpus) >= 2 else None
