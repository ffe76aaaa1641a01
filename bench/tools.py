"""The tools a run needs (nginx, wrk, valgrind: installed with apt-get when missing) and what the machine is."""

from __future__ import annotations

import logging
import os
import platform
import re
import shutil
import subprocess
from pathlib import Path

import aiohttp

from bench.errors import BenchError

logger = logging.getLogger(__name__)

DEBIAN_PACKAGES = {"nginx": "nginx", "wrk": "wrk", "valgrind": "valgrind"}
# nginx lives in /usr/sbin, which a non-root PATH often lacks
SEARCH_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/local/sbin", "/usr/sbin", "/sbin"])
APT_TIMEOUT_S = 900


def find_tool(name: str) -> str | None:
    """Absolute path of an executable, looking in the sbin folders too."""
    return shutil.which(name, path=SEARCH_PATH)


def ensure_tools() -> dict[str, str]:
    """nginx, wrk and valgrind, installed with apt-get when missing and running as root; BenchError otherwise."""
    missing = [name for name in DEBIAN_PACKAGES if find_tool(name) is None]
    if missing:
        packages = [DEBIAN_PACKAGES[name] for name in missing]
        if os.geteuid() != 0 or shutil.which("apt-get") is None:
            raise BenchError(f"{' and '.join(missing)} not found: install with `sudo apt-get install -y "
                             f"{' '.join(packages)}` (Debian/Ubuntu) or your package manager, then re-run `make bench`")
        _apt_install(packages)
    found = {name: find_tool(name) for name in DEBIAN_PACKAGES}
    still_missing = [name for name, path in found.items() if path is None]
    if still_missing:
        raise BenchError(f"{still_missing} still not found after apt-get install")
    return {name: path for name, path in found.items() if path is not None}


def _apt_install(packages: list[str]) -> None:
    environment = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "--no-install-recommends", *packages]
    logger.info("installing %s: %s", packages, " ".join(install))
    try:
        if subprocess.run(install, env=environment, timeout=APT_TIMEOUT_S, check=False).returncode == 0:
            return
        logger.info("apt-get install failed; refreshing the package lists and trying again")
        subprocess.run(["apt-get", "update"], env=environment, timeout=APT_TIMEOUT_S, check=True)
        subprocess.run(install, env=environment, timeout=APT_TIMEOUT_S, check=True)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
        raise BenchError(f"could not install {packages} with apt-get: {exc}") from exc


def tool_version(command: list[str], pattern: str) -> str:
    """The first match of `pattern` in a tool's version output (stdout or stderr), or 'unknown'."""
    try:
        completed = subprocess.run(command, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    match = re.search(pattern, completed.stdout + completed.stderr)
    return match.group(1) if match else "unknown"


def load_average() -> str:
    """1, 5 and 15 minute load averages, as /proc/loadavg has them."""
    return " / ".join(Path("/proc/loadavg").read_text().split()[:3])


MEASURED_CODE = ("balancer", "modelserver", "model_a", "model_b", "tests/noop_backend.py")


def describe_code(repository: Path) -> str:
    """The commit measured, and which measured files differed from it (a shared working tree moves)."""
    def git(*arguments: str) -> str:
        completed = subprocess.run(["git", "-C", str(repository), *arguments], capture_output=True, text=True,
                                   timeout=30, check=False)
        return completed.stdout.rstrip("\n") if completed.returncode == 0 else ""  # porcelain lines start with a space

    commit = git("rev-parse", "--short", "HEAD").strip() or "unknown"
    changed = [line[3:] for line in git("status", "--porcelain", "--", *MEASURED_CODE).splitlines()]
    return f"`{commit}`" + (f" + uncommitted changes to {', '.join(f'`{path}`' for path in changed)}" if changed else "")


def describe_machine(tools: dict[str, str]) -> dict[str, str]:
    """Name -> value rows for the report's machine table."""
    cpu_model = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu_model = line.partition(":")[2].strip()
            break
    memory_kb = next((int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                      if line.startswith("MemTotal:")), 0)
    os_release = Path("/etc/os-release")
    pretty = re.search(r'^PRETTY_NAME="?([^"\n]*)', os_release.read_text(), re.M) if os_release.exists() else None
    return {
        "nproc": f"{os.cpu_count()} (usable by this process: {len(os.sched_getaffinity(0))})",
        "CPU": cpu_model,
        "memory": f"{memory_kb / 1024 / 1024:.1f} GiB",
        "OS": pretty.group(1) if pretty else platform.system(),
        "kernel": platform.release(),
        "Python": platform.python_version(),
        "aiohttp": aiohttp.__version__,
        "nginx": tool_version([tools["nginx"], "-v"], r"nginx/(\S+)"),
        "wrk": tool_version([tools["wrk"], "-v"], r"^wrk (\S+)"),
    }
