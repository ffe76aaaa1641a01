"""`make demo`'s loop: a short full run, and Ctrl-C stopping every process it started."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.processes import REPO, artifacts_dir

DEMO_PORTS = (8001, 8002, 8080, 8081)  # experiments/default.yaml


def ports_free() -> bool:
    for port in DEMO_PORTS:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return False
    return True


pytestmark = pytest.mark.skipif(not ports_free(), reason=f"the demo's ports {DEMO_PORTS} are in use")


def started_pids(output: str) -> list[int]:
    return [int(pid) for pid in re.findall(r"started \w+ \(pid (\d+)\)", output)]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    state = Path(f"/proc/{pid}/stat").read_text().split()[2] if Path(f"/proc/{pid}/stat").exists() else "X"
    return state != "Z"


def test_demo_runs_the_loop_and_prints_the_report(tmp_path: Path) -> None:
    env = {**os.environ, "MODEL_ARTIFACTS_DIR": str(artifacts_dir()), "COLUMNS": "160"}
    done = subprocess.run(
        [sys.executable, "-m", "balancer", "demo", "--requests", "400", "--users", "100", "--workdir", str(tmp_path)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=240,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "model_a" in done.stdout and "model_b" in done.stdout and "Verdict" in done.stdout
    assert (tmp_path / "report.html").read_text().count("plot-") >= 3
    assert not any(alive(pid) for pid in started_pids(done.stdout))


def test_ctrl_c_stops_every_process(tmp_path: Path) -> None:
    env = {**os.environ, "MODEL_ARTIFACTS_DIR": str(artifacts_dir())}
    log = tmp_path / "demo.out"
    with open(log, "w") as output:
        demo = subprocess.Popen(
            [sys.executable, "-m", "balancer", "demo", "--requests", "100000", "--workdir", str(tmp_path)],
            cwd=REPO, env=env, stdout=output, stderr=subprocess.STDOUT,
            # As from a terminal: a suite started in the background (`cmd &` in a script) inherits
            # SIGINT ignored, and the demo would never see the Ctrl-C this test sends.
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
    try:
        deadline = time.monotonic() + 120
        while "driving" not in log.read_text() and time.monotonic() < deadline:
            assert demo.poll() is None, log.read_text()
            time.sleep(0.2)
        time.sleep(1.0)  # mid-load
        demo.send_signal(signal.SIGINT)
        assert demo.wait(60) == 130
    finally:
        if demo.poll() is None:  # the demo hung: kill what it started too, or its ports stay taken
            demo.kill()
            demo.wait()
            for pid in started_pids(log.read_text()):
                if alive(pid):
                    os.kill(pid, signal.SIGKILL)
    text = log.read_text()
    assert "interrupted: every process is stopped" in text and "Traceback" not in text
    pids = started_pids(text)
    assert len(pids) == 3 and not any(alive(pid) for pid in pids)
    assert ports_free()
