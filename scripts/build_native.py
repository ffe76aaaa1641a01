"""Compile the balancer's request path with mypyc (see balancer/native.py); needs gcc and mypy.

    python scripts/build_native.py             # build, then print the mode a new process runs in
    python scripts/build_native.py --if-stale  # build only if the compiled modules are missing or stale
    python scripts/build_native.py --status    # only print that mode

`make native` (a step of `make demo`, `make test` and `make bench`) runs it with --if-stale;
the balancer's Dockerfile runs it in a build stage. Without a C compiler it warns and
everything runs interpreted, unless BALANCER_REQUIRE_NATIVE=1 (CI) makes that an error.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from balancer import native  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--status", action="store_true", help="print the mode only")
    parser.add_argument("--if-stale", action="store_true", help="build only when not built from the current sources")
    args = parser.parse_args()
    compiled, _ = native.decide(native.PACKAGE_DIR, {})
    if not args.status and not (args.if_stale and compiled):
        missing = _missing_tools()
        if missing and native.is_set(os.environ, native.REQUIRE_ENVIRONMENT):
            raise SystemExit(f"cannot compile the request path: {missing} ({native.REQUIRE_ENVIRONMENT} is set)")
        if missing:
            print(f"warning: not compiling the request path ({missing}); unless an earlier build of the same sources "
                  "is present, it runs interpreted, which is slower: see BENCHMARKS.md", file=sys.stderr)
        else:
            for warning in native.build(required=native.is_set(os.environ, native.REQUIRE_ENVIRONMENT)):
                print(f"warning: {warning}", file=sys.stderr)
    print(f"balancer request path: {native.decide(native.PACKAGE_DIR, os.environ)[1]}")


def _missing_tools() -> str:
    """Why mypyc cannot build here, or "" if it can."""
    compiler = os.environ.get("CC", "cc").split()[0]
    if shutil.which(compiler) is None:
        return f"no C compiler ({compiler!r} is not on PATH; apt-get install gcc)"
    if importlib.util.find_spec("mypyc") is None:
        return "mypyc is not installed (it comes with mypy: pip install mypy)"
    return ""


if __name__ == "__main__":
    main()
