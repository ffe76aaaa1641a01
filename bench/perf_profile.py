"""Where a hop's CPU goes at saturation, kernel included: `perf record` on its processes, summed by binary.

    perf record -e cpu-clock -F 999 -p <pids> -o hop.data -- sleep <seconds>   (while wrk saturates the hop)
    perf report -i hop.data --no-children --sort dso --stdio -g none            (share per binary)
    perf report -i hop.data --no-children --sort dso,sym --stdio -g none        (the heaviest functions)

py-spy (`--profile`) sees the balancer's Python frames only; half of its CPU is in the kernel,
which perf samples too. `cpu-clock` is a software event, so this works in a VM without hardware
counters. `make bench` runs it for the balancer and for nginx when `perf` is installed
(Debian: `linux-perf`); where it is missing or not permitted the report says so.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.errors import BenchError
from bench.procstat import process_tree
from bench.runs import Settings
from bench.stack import Target
from bench.wrk import run_wrk, wrk_command, wrk_environment

SAMPLE_RATE_HZ = 999
KERNEL = "[kernel.kallsyms]"
TOP_FUNCTIONS = 12
_SHARE = re.compile(r"^\s+(?P<percent>\d+\.\d+)%\s+(?P<rest>\S.*?)\s*$")


@dataclass(frozen=True)
class PerfProfile:
    """One hop's samples: the share of each binary, and the heaviest functions as (binary, function, share %)."""

    hop: str
    cpu_seconds: float  # CPU time the samples stand for (cpu-clock counts nanoseconds)
    by_binary: list[tuple[str, float]]
    top_functions: list[tuple[str, str, float]] = field(default_factory=list)

    @property
    def kernel_share(self) -> float:
        """Per cent of the samples in the kernel."""
        return sum(share for binary, share in self.by_binary if binary == KERNEL)


def parse_by_binary(text: str) -> list[tuple[str, float]]:
    """`perf report --sort dso --stdio -g none` -> [(binary, per cent)], heaviest first."""
    shares = []
    for line in text.splitlines():
        match = _SHARE.match(line)
        if match and not line.lstrip().startswith("#"):
            shares.append((match["rest"], float(match["percent"])))
    return shares


def parse_functions(text: str, limit: int = TOP_FUNCTIONS) -> list[tuple[str, str, float]]:
    """`perf report --sort dso,sym --stdio -g none` -> [(binary, function, per cent)], heaviest first.

    A line reads `  12.34%  libpython3.11.so.1.0  [.] _PyEval_EvalFrameDefault`; `[k]` marks kernel functions.
    """
    functions = []
    for line in text.splitlines():
        match = _SHARE.match(line)
        if not match or line.lstrip().startswith("#"):
            continue
        binary, _, symbol = match["rest"].partition(" ")
        symbol = symbol.strip()
        symbol = symbol[4:] if symbol[:3] in ("[.]", "[k]") else symbol
        functions.append((binary, symbol.strip(), float(match["percent"])))
    return functions[:limit]


def parse_cpu_seconds(text: str) -> float:
    """The CPU time a `perf report` header stands for: cpu-clock's event count is in nanoseconds."""
    match = re.search(r"^# Event count \(approx\.\): (\d+)", text, re.MULTILINE)
    return int(match.group(1)) / 1e9 if match else 0.0


def _report(data: Path, sort: str) -> str:
    command = ["perf", "report", "-i", str(data), "--no-children", "--sort", sort, "--stdio", "-g", "none",
               "--percent-limit", "0.5"]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    if completed.returncode != 0:
        raise BenchError(f"perf report failed ({completed.returncode}): {completed.stderr.strip()[-500:]}")
    return completed.stdout


def record(target: Target, settings: Settings, body_file: Path, *, wrk: str, workdir: Path,
           seconds: float) -> PerfProfile:
    """Saturate `target` with wrk for `seconds` while perf samples its processes (nginx: master and workers)."""
    if shutil.which("perf") is None:
        raise BenchError("perf is not installed (Debian: apt-get install -y linux-perf)")
    if target.proxy_pid is None:
        raise BenchError(f"{target.name} has no process of its own to profile")
    pids = process_tree(target.proxy_pid)
    data = workdir / f"perf-{target.name.replace(' ', '-')}.data"
    perf = subprocess.Popen(
        ["perf", "record", "-e", "cpu-clock", "-F", str(SAMPLE_RATE_HZ), "-p", ",".join(map(str, pids)),
         "-o", str(data), "--", "sleep", f"{seconds:g}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    time.sleep(0.3)  # perf attached before the load starts
    try:
        run_wrk(wrk_command(target.url, threads=settings.threads, connections=settings.connections,
                            seconds=seconds, wrk=wrk),
                wrk_environment(body_file=body_file, users=settings.users, spread=target.spread), seconds)
    finally:
        try:
            _, errors = perf.communicate(timeout=seconds + 60)
        except subprocess.TimeoutExpired:
            perf.kill()
            _, errors = perf.communicate()
    if perf.returncode != 0 or not data.exists():
        raise BenchError(f"perf record failed ({perf.returncode}): {errors.strip()[-500:]}")
    by_binary_text = _report(data, "dso")
    return PerfProfile(hop=target.hop, cpu_seconds=parse_cpu_seconds(by_binary_text), by_binary=parse_by_binary(by_binary_text),
                       top_functions=parse_functions(_report(data, "dso,sym")))
