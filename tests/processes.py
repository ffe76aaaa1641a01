"""Starting real processes on loopback for integration tests: free ports, readiness, clean stops."""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def ephemeral_range() -> tuple[int, int]:
    """The kernel's range for outgoing connections' local ports (Linux; the IANA range elsewhere)."""
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 49152, 65535


_handed_out: set[int] = set()
_ports = random.Random()


def free_port() -> int:
    """A TCP port nobody listens on right now, never handed out before by this process.

    Ports come from below the kernel's ephemeral range: bind-to-0 would draw from that
    range, where any outgoing connection (a client's, a balancer's upstream pool) can take
    the port between this probe and the server's bind, and two calls may return the same port.
    """
    low, _ = ephemeral_range()
    for _ in range(1000):
        port = _ports.randrange(max(1024, low - 12000), low)
        if port in _handed_out:
            continue
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise RuntimeError(f"no free loopback port below {low}")


def wait_http(url: str, timeout: float = 30.0, process: subprocess.Popen[bytes] | None = None) -> None:
    """Wait until GET `url` answers 200; fail early if `process` died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"process exited with {process.returncode} before {url} was ready")
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.05)
    raise TimeoutError(f"{url} not ready after {timeout}s")


@contextmanager
def running(args: list[str], ready_url: str, *, log: Path, env: dict[str, str] | None = None,
            timeout: float = 30.0) -> Iterator[subprocess.Popen[bytes]]:
    """Run `python args...` until the block ends; SIGTERM then SIGKILL on the way out."""
    with open(log, "ab") as output:
        process = subprocess.Popen(
            [sys.executable, *args], cwd=REPO, stdout=output, stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
        )
    try:
        try:
            wait_http(ready_url, timeout, process)
        except (RuntimeError, TimeoutError) as error:
            raise RuntimeError(f"{error}; the end of {log}:\n{log_tail(log)}") from None
        yield process
    finally:
        stop(process)


def may_lower_niceness() -> bool:
    """Whether a process started from here may lower its niceness (root, CAP_SYS_NICE or RLIMIT_NICE)."""
    probe = f"import os; os.setpriority(os.PRIO_PROCESS, 0, {os.getpriority(os.PRIO_PROCESS, 0) - 1})"
    return subprocess.run([sys.executable, "-c", probe], capture_output=True, check=False).returncode == 0


def log_tail(log: Path, lines: int = 20) -> str:
    """The last `lines` lines of a process's log, for a failure message."""
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError as error:
        return f"(unreadable: {error})"


def stop(process: subprocess.Popen[bytes], timeout: float = 15.0) -> int:
    """SIGTERM, wait, SIGKILL if needed; the exit code."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return int(process.returncode)


def artifacts_dir() -> Path:
    """Trained artifacts: $MODEL_ARTIFACTS_DIR or ./artifacts, trained now if missing."""
    directory = Path(os.environ.get("MODEL_ARTIFACTS_DIR", REPO / "artifacts"))
    if not (directory / "model_b.joblib").exists():
        subprocess.run([sys.executable, "-m", "modelserver.train", "--out", str(directory)], cwd=REPO, check=True)
    return directory


def write_experiment(path: Path, *, ports: dict[str, list[int]], weights: dict[str, float] | None = None,
                     extra: str = "", server: str = "") -> Path:
    """An experiment YAML on loopback upstreams."""
    weights = weights or {name: 50 for name in ports}
    variants = "".join(
        f"  - name: {name}\n    weight: {weights[name]}\n    upstreams: {[f'http://127.0.0.1:{p}' for p in port_list]}\n"
        for name, port_list in ports.items()
    ).replace("'", '"')
    path.write_text(
        f"name: it-exp\nstrategy: sticky\nsticky_key: header:X-User-ID\nseed: 42\nvariants:\n{variants}{extra}"
        f"server:\n  flush_interval_s: 0.1\n{server}"
    )
    return path


NOOP_BACKEND = REPO / "tests" / "noop_backend.py"


@dataclass(frozen=True)
class NoopStack:
    """A balancer in front of two no-op backends (model_a, model_b), started by `noop_stack`."""

    url: str
    admin: str
    config: Path
    store: Path
    ports: dict[str, list[int]]
    process: subprocess.Popen[bytes]


@contextmanager
def noop_stack(folder: Path, *, weights: dict[str, float] | None = None, server: str = "",
               serve_args: tuple[str, ...] = ()) -> Iterator[NoopStack]:
    """Two no-op backends and `balancer serve` over them (experiment, store and logs in `folder`), until the block ends."""
    ports = {"model_a": [free_port()], "model_b": [free_port()]}
    port, admin_port = free_port(), free_port()
    config = write_experiment(folder / "exp.yaml", ports=ports, weights=weights, server=server)
    store = folder / "outcomes.db"
    with (
        running([str(NOOP_BACKEND), "--port", str(ports["model_a"][0]), "--name", "model_a"],
                f"http://127.0.0.1:{ports['model_a'][0]}/healthz", log=folder / "a.log"),
        running([str(NOOP_BACKEND), "--port", str(ports["model_b"][0]), "--name", "model_b"],
                f"http://127.0.0.1:{ports['model_b'][0]}/healthz", log=folder / "b.log"),
        running(["-m", "balancer", "serve", "--config", str(config), "--port", str(port), "--admin-port",
                 str(admin_port), "--store", str(store), *serve_args], f"http://127.0.0.1:{admin_port}/healthz",
                log=folder / "balancer.log") as process,
    ):
        yield NoopStack(f"http://127.0.0.1:{port}", f"http://127.0.0.1:{admin_port}", config, store, ports, process)
