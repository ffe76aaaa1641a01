"""`server.priority`: the balancer's niceness, set for every thread and process it starts (balancer/app.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from tests.processes import may_lower_niceness, noop_stack, stop


def thread_niceness(pid: int) -> dict[str, int]:
    """Every thread of `pid`: 'tid name' -> its niceness (field 19 of /proc/<pid>/task/<tid>/stat)."""
    found = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
        name, fields = stat[stat.index("(") + 1:stat.rindex(")")], stat[stat.rindex(")") + 2:].split()
        found[f"{tid} {name}"] = int(fields[16])
    return found


def children(pid: int) -> list[int]:
    listing = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True, check=False).stdout
    return [int(child) for child in listing.split()]


def settled_niceness(pid: int, started: int, timeout_s: float = 10.0) -> set[int]:
    """The niceness of `pid`'s threads once it has moved off `started` (a store writer lowers its own as it starts)."""
    deadline = time.monotonic() + timeout_s
    while (found := set(thread_niceness(pid).values())) == {started} and time.monotonic() < deadline:
        time.sleep(0.05)
    return found


def health(admin: str) -> dict:
    with urllib.request.urlopen(f"{admin}/healthz", timeout=5) as reply:
        return json.load(reply)


def test_a_negative_priority_reaches_every_thread_and_the_store_writer_or_is_refused_aloud(tmp_path: Path) -> None:
    started_at = os.getpriority(os.PRIO_PROCESS, 0)
    with noop_stack(tmp_path, server="  priority: -3\n") as stack:
        balancer = thread_niceness(stack.process.pid)
        reported = health(stack.admin)["niceness"]
        (writer,) = children(stack.process.pid)  # the store writer process
        writer_niceness = settled_niceness(writer, started=reported)
    log = (tmp_path / "balancer.log").read_text()
    if may_lower_niceness():  # root here and in CI
        assert set(balancer.values()) == {-3}, balancer  # the event loop's thread and every helper thread
        assert reported == -3
        assert writer_niceness == {7}, writer_niceness  # the writer lowers itself 10 below the balancer
        assert "server.priority" not in log
    else:
        assert set(balancer.values()) == {started_at} and reported == started_at
        assert "server.priority = -3: the OS refused it" in log, log


def test_workers_and_their_writers_take_the_supervisors_priority(tmp_path: Path) -> None:
    """A niceness above the current one needs no privilege: this runs the same everywhere."""
    with noop_stack(tmp_path, server="  workers: 2\n  priority: 4\n") as stack:
        state = health(stack.admin)
        assert state["niceness"] == 4
        assert [worker["health"]["niceness"] for worker in state["workers"]] == [4, 4]
        supervisor = stack.process.pid
        assert set(thread_niceness(supervisor).values()) == {4}
        workers = [worker["pid"] for worker in state["workers"]]
        for worker in workers:
            assert set(thread_niceness(worker).values()) == {4}
            writers = children(worker)
            assert writers and {value for pid in writers for value in settled_niceness(pid, started=4)} == {14}


def test_a_priority_out_of_range_is_refused_naming_it(tmp_path: Path) -> None:
    with noop_stack(tmp_path) as stack:
        pass
    for arguments, expected in ((["--priority", "20"], "--priority 20: must be between -20 and 19"),
                                ([], "server.priority = -21")):
        config = stack.config
        if not arguments:
            config.write_text(config.read_text() + "  priority: -21\n")
        process = subprocess.Popen([sys.executable, "-m", "balancer", "serve", "--config", str(config), "--port", "0",
                                    "--admin-port", "0", "--store", str(tmp_path / "out.db"), *arguments],
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        try:
            output, _ = process.communicate(timeout=30)
        finally:
            stop(process)
        assert process.returncode == 2 and expected in output.decode(), output.decode()
