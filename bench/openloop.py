"""Fixed-rate (open-loop) load: requests start on a schedule, whether or not earlier ones have finished.

wrk is closed-loop (a connection sends its next request only when the last one is
answered) and Debian has no wrk2, so latency at a fixed rate comes from this client. Its
engine is `bench/openloop.c`: one thread, epoll, non-blocking keep-alive TCP connections
with TCP_NODELAY, one ready-to-send request per user built up front. The asyncio +
httptools client it replaced burned more CPU per request than the proxy it measured, on
the same two cores, and its own CPU contention and timer lateness showed up in the p99
it reported.

Timing: request i is due at start + i / rate. The client sleeps until a request is due
(to the microsecond, not the event loop's millisecond) and *dispatches* it then; how late
that was is reported as `late_ms_p99`. Its latency runs from dispatch to the moment the
last byte of the answer reached the host (the kernel's receive timestamp, so the client's
own scheduling delays stay out of it). If no connection is free at dispatch it waits in a
queue and that wait counts (the server's slowness, not hidden: no coordinated omission).
bench/openloop.c's opening comment has the details.

    python -m bench.openloop --url http://127.0.0.1:8080/predict --rate 1000 --seconds 8 \\
        --body-file body.json [--warmup 1] [--connections 32] [--users 1000] \\
        [--spread 127.0.0.1:9001,127.0.0.1:9002]

compiles bench/openloop.c with the system C compiler on first use (cached in
build/bench/, keyed by the source's hash), then runs it in this process's place. It
prints one JSON line: rate, sent, completed, errors, latency percentiles in ms, client CPU.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from bench.errors import BenchError

SOURCE = Path(__file__).resolve().with_name("openloop.c")
BUILD_DIR = SOURCE.parents[1] / "build" / "bench"
COMPILERS = ("cc", "gcc")
COMPILE_FLAGS = ("-O2", "-Wall", "-Wextra", "-std=gnu11")
PROGRAM = "python -m bench.openloop"  # the name its usage and error messages show


def find_compiler() -> str | None:
    """The C compiler on PATH (cc, else gcc); None if there is none."""
    for name in COMPILERS:
        path = shutil.which(name)
        if path is not None:
            return path
    return None


def binary_path(source: Path = SOURCE, build_dir: Path = BUILD_DIR) -> Path:
    """Where the client compiled from this exact source (and these flags) is cached."""
    digest = hashlib.sha256(source.read_bytes() + " ".join(COMPILE_FLAGS).encode()).hexdigest()[:12]
    return build_dir / f"{source.stem}-{digest}"


def build_client(source: Path = SOURCE, build_dir: Path = BUILD_DIR) -> Path:
    """The compiled client, compiled now unless cached; BenchError if there is no C compiler or it fails.

    Compiles to a temporary name and renames it into place, so concurrent first uses
    never run (or leave behind) a half-written binary.
    """
    binary = binary_path(source, build_dir)
    if binary.is_file():
        return binary
    compiler = find_compiler()
    if compiler is None:
        raise BenchError(f"no C compiler ({' or '.join(COMPILERS)}) on PATH to build {source.name}, the fixed-rate "
                         "client: apt-get install -y gcc libc6-dev")
    build_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=build_dir, prefix=f".{binary.name}-") as scratch:
        temporary = Path(scratch) / binary.name
        compiled = subprocess.run([compiler, *COMPILE_FLAGS, "-o", str(temporary), str(source)],
                                  capture_output=True, text=True, timeout=120, check=False)
        if compiled.returncode != 0:
            raise BenchError(f"{compiler} could not compile {source}: {compiled.stderr.strip()[-2000:]}")
        os.replace(temporary, binary)
    for stale in build_dir.glob(f"{source.stem}-*"):  # clients compiled from earlier versions of the source
        if stale != binary and stale.is_file():
            stale.unlink(missing_ok=True)
    return binary


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: compile the client if needed, then become it (same arguments, its exit code)."""
    arguments = sys.argv[1:] if argv is None else list(argv)
    try:
        binary = build_client()
    except BenchError as exc:
        raise SystemExit(f"{PROGRAM}: {exc}") from exc
    sys.stdout.flush()
    os.execv(binary, [PROGRAM, *arguments])


if __name__ == "__main__":
    main()
