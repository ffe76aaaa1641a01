"""`--profile`: py-spy samples the balancer at saturation; the report lists where the time goes."""

from __future__ import annotations

import logging
import re
import subprocess
import sys
import time
from collections import Counter
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path

from bench.errors import BenchError
from bench.procstat import pinned_apart, split_cpus
from bench.runs import Settings
from bench.stack import Target
from bench.wrk import run_wrk, wrk_command, wrk_environment

logger = logging.getLogger(__name__)

SAMPLE_RATE_HZ = 250
MAIN_THREAD = "MainThread"  # the event loop: every request's Python work happens on it
_THREAD = re.compile(r"^thread \(\d+\): (?P<name>.*)$")
_LINE_NUMBER = re.compile(r"^(?P<function>.*) \((?P<file>.*?)(?::\d+)?\)$")


@dataclass(frozen=True)
class Profile:
    """Samples per thread, and per function of one thread: where it was running (self) and inside (total)."""

    thread: str
    samples: int
    self_counts: Counter[str]
    total_counts: Counter[str]
    thread_samples: Counter[str]
    thread_top_frame: dict[str, tuple[str, int]]  # thread -> its most sampled leaf function and count
    pinning: str = ""


def frame_name(frame: str) -> str:
    """'write (asyncio/selector_events.py:1037)' -> 'write (asyncio/selector_events.py)': one row per function."""
    match = _LINE_NUMBER.match(frame.strip())
    return f"{match['function']} ({match['file']})" if match else frame.strip()


def parse_collapsed(text: str, thread: str = MAIN_THREAD) -> Profile:
    """py-spy's raw output ('[thread (TID): NAME;]frame;...;leaf COUNT' a line); functions of `thread` only."""
    self_counts: Counter[str] = Counter()
    total_counts: Counter[str] = Counter()
    thread_samples: Counter[str] = Counter()
    thread_leaves: dict[str, Counter[str]] = {}
    for line in text.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        first, _, rest = stack.partition(";")
        name = _THREAD.match(first)
        if name is not None:
            stack = rest
        thread_name = name["name"] if name is not None else thread
        thread_samples[thread_name] += count
        frames = [frame_name(frame) for frame in stack.split(";") if frame]
        if frames:
            thread_leaves.setdefault(thread_name, Counter())[frames[-1]] += count
        if thread_name != thread or not frames:
            continue
        self_counts[frames[-1]] += count
        for frame in set(frames):
            total_counts[frame] += count
    return Profile(thread=thread, samples=thread_samples[thread], self_counts=self_counts,
                   total_counts=total_counts, thread_samples=thread_samples,
                   thread_top_frame={name: leaves.most_common(1)[0] for name, leaves in thread_leaves.items()})


def py_spy_path() -> Path:
    """py-spy in the virtualenv, installed with pip when missing; BenchError if that fails."""
    path = Path(sys.executable).parent / "py-spy"
    if not path.exists():
        logger.info("installing py-spy into the virtualenv")
        completed = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "py-spy"], capture_output=True,
                                   text=True, timeout=300, check=False)
        if completed.returncode != 0 or not path.exists():
            raise BenchError(f"could not install py-spy with pip: {completed.stderr.strip()[-500:]}")
    return path


def record_profile(target: Target, settings: Settings, body_file: Path, *, wrk: str, workdir: Path,
                   seconds: float) -> Profile:
    """Sample `target`'s proxy process with py-spy while wrk saturates it.

    The balancer gets a CPU of its own meanwhile (wrk and the backends the others): on a
    loopback `send` the kernel wakes the receiver, which would otherwise often preempt the
    balancer inside the syscall, and py-spy counts a preempted (runnable) thread as busy
    in whatever it was doing, inflating the socket-write frames.
    """
    assert target.proxy_pid is not None
    split = split_cpus()
    pinning = ("not pinned (one CPU)" if split is None else
               f"balancer pinned to CPU {_cpu_list(split[0])}, wrk and the backends to CPU {_cpu_list(split[1])}")
    with nullcontext() if split is None else pinned_apart([target.proxy_pid], target.backend_pids, *split):
        profile = _sample(target, settings, body_file, wrk=wrk, workdir=workdir, seconds=seconds,
                          wrk_cpus=None if split is None else split[1])
    return replace(profile, pinning=pinning)


def _cpu_list(cpus: set[int]) -> str:
    return ",".join(str(cpu) for cpu in sorted(cpus))


def _sample(target: Target, settings: Settings, body_file: Path, *, wrk: str, workdir: Path, seconds: float,
            wrk_cpus: set[int] | None) -> Profile:
    assert target.proxy_pid is not None
    output = workdir / "profile.txt"
    command = [str(py_spy_path()), "record", "--pid", str(target.proxy_pid), "--duration", f"{seconds:.0f}",
               "--rate", str(SAMPLE_RATE_HZ), "--format", "raw", "--threads", "--output", str(output)]
    with open(workdir / "py-spy.log", "wb") as log:
        sampler = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    try:
        time.sleep(1.0)  # attach before the load starts
        load = wrk_command(target.url, threads=settings.threads, connections=settings.connections,
                           seconds=seconds + 1, wrk=wrk)
        run_wrk(load, wrk_environment(body_file=body_file, users=settings.users), seconds + 1, cpus=wrk_cpus)
        sampler.wait(timeout=seconds + 30)
    finally:
        if sampler.poll() is None:
            sampler.kill()
            sampler.wait()
    if sampler.returncode != 0 or not output.exists():
        log_text = (workdir / "py-spy.log").read_text(errors="replace")[-800:]
        raise BenchError(f"py-spy exited with {sampler.returncode}: {log_text}")
    return parse_collapsed(output.read_text())
