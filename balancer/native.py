"""The request path compiled to C with mypyc, and the guard that never runs it stale.

The modules in `COMPILED_MODULES` are ordinary typed Python. `python scripts/build_native.py`
(run by `make`, and by the balancer's Dockerfile) compiles them with mypyc into C extensions
placed beside their sources, and writes `native.json` with the SHA-256 of every source it
compiled. Python prefers an extension over a source file of the same name, so at import
`select()` (called by `balancer/__init__`) checks those hashes: if any source changed since
the build, or `BALANCER_PURE_PYTHON=1` is set, every module is imported from its `.py` file
instead, and `MODE` says why. An edit therefore never runs stale compiled code.

`C_EXTENSIONS` are written in C (`balancer/_rows.c`, `_headers.c`, `_store.c`) and built in the
same step; their sources and the headers they share (`C_HEADERS`) are hashed too. Code using one
asks for it only when `MODE` is "compiled", and otherwise runs its Python equivalent
(`balancer/rows.py`, `hop_headers.python_strip`, the store writer's Python sqlite3 path, httptools
for every message instead of `_headers.parse_request` and `parse_response`). An
extension that links a library (`_store`: SQLite) is left out of a build where the library's
header is missing or too old, with a warning, and the manifest says so; the rest is built.

mypyc compiles only what mypy accepts, checks types at run time, and makes classes native:
methods cannot be monkeypatched and unknown attributes cannot be set. `make bench` measures
the compiled and interpreted request paths side by side.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

PACKAGE = "balancer"
PACKAGE_DIR = Path(__file__).resolve().parent
# Everything a proxied request runs.
COMPILED_MODULES = ("hop_names", "http_server", "upstream_client", "hop_headers", "proxy", "assignment", "metrics",
                    "events", "upstreams", "runtime")
# Extensions written in C, built alongside (`balancer/<name>.c` -> `balancer.<name>`), with the libraries each
# links; with no build of their current source, the code that uses them runs its Python equivalent (see
# balancer.rows.implementation, balancer.store_writer.fast_connection).
C_EXTENSIONS: dict[str, tuple[str, ...]] = {"_rows": (), "_headers": (), "_store": ("sqlite3",)}
C_HEADERS = ("rows_frame.h",)  # included by the C extensions
# The header each library is compiled against, the package that has it (Debian), and the preprocessor
# condition its version must meet (`_store.c` uses sqlite3_prepare_v3, new in SQLite 3.20).
LIBRARY_HEADERS = {"sqlite3": ("sqlite3.h", "libsqlite3-dev", "SQLITE_VERSION_NUMBER >= 3020000")}
SKIPPED = "skipped: "  # a manifest entry's prefix for an extension left out of the build
MANIFEST = "native.json"
GROUP = f"{PACKAGE}.native_group"  # one shared library: calls between the modules stay native
PURE_ENVIRONMENT = "BALANCER_PURE_PYTHON"  # set: run the sources even where a build is current
REQUIRE_ENVIRONMENT = "BALANCER_REQUIRE_NATIVE"  # set: a build that cannot happen is an error, not a warning

MODE = "interpreted (not built)"
"""How the request path runs in this process: "compiled", or "interpreted (reason)"."""


def is_set(environ: Mapping[str, str], name: str) -> bool:
    """Whether a switch like BALANCER_PURE_PYTHON is on: set, and neither empty nor "0"."""
    return environ.get(name, "") not in ("", "0")


def source_digests(package_dir: Path = PACKAGE_DIR) -> dict[str, str]:
    """SHA-256 of each compiled module's source, and of each C extension's (keyed by its file name)."""
    digests = {name: hashlib.sha256((package_dir / f"{name}.py").read_bytes()).hexdigest() for name in COMPILED_MODULES}
    for source in [package_dir / f"{name}.c" for name in C_EXTENSIONS] + [package_dir / name for name in C_HEADERS]:
        digests[source.name] = hashlib.sha256(source.read_bytes()).hexdigest() if source.exists() else "missing"
    return digests


def extensions(package_dir: Path = PACKAGE_DIR) -> list[Path]:
    """The compiled extension files present in the package."""
    suffixes = tuple(importlib.machinery.EXTENSION_SUFFIXES)
    return [path for path in package_dir.iterdir() if path.name.endswith(suffixes)]


def decide(package_dir: Path, environ: Mapping[str, str]) -> tuple[bool, str]:
    """(use the compiled modules?, the mode to report): compiled only when built from these exact sources."""
    if not extensions(package_dir):
        return False, "interpreted (not built: make native)"
    if is_set(environ, PURE_ENVIRONMENT):
        return False, f"interpreted ({PURE_ENVIRONMENT} is set)"
    try:
        built = json.loads((package_dir / MANIFEST).read_text())
    except (OSError, ValueError):
        return False, f"interpreted (no valid {MANIFEST}: rebuild with make native)"
    current = source_digests(package_dir)
    changed = sorted(name for name in current
                     if built.get(name) != current[name] and not str(built.get(name)).startswith(SKIPPED))
    if changed:
        return False, f"interpreted (changed since the build: {', '.join(changed)}; rebuild with make native)"
    return True, "compiled"


class _SourceFinder(importlib.abc.MetaPathFinder):
    """Imports `balancer.<module>` from its .py file even where an extension sits beside it."""

    def __init__(self, package_dir: Path) -> None:
        self.package_dir = package_dir

    def find_spec(self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None) -> importlib.machinery.ModuleSpec | None:
        package, _, name = fullname.rpartition(".")
        if package != PACKAGE or name not in COMPILED_MODULES:
            return None
        return importlib.util.spec_from_file_location(fullname, self.package_dir / f"{name}.py")


def select(environ: Mapping[str, str] = os.environ) -> str:
    """Choose compiled or source modules for this process (before any of them is imported); the mode."""
    global MODE
    use_compiled, MODE = decide(PACKAGE_DIR, environ)
    if not use_compiled and not any(isinstance(finder, _SourceFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _SourceFinder(PACKAGE_DIR))
    return MODE


def c_function(extension: str, name: str) -> Any:
    """`name` from the C extension `extension` (one of C_EXTENSIONS) where this process runs the compiled
    modules, else None: callers then do without it."""
    if MODE != "compiled":
        return None
    return getattr(importlib.import_module(f"{PACKAGE}.{extension}"), name)


def missing_header(library: str, compiler: str = "cc") -> str:
    """Why `library`'s header cannot be compiled against here, or "" when it can."""
    header, package, condition = LIBRARY_HEADERS[library]

    def compiles(source: str) -> bool:
        probe = subprocess.run([*compiler.split(), "-fsyntax-only", "-x", "c", "-"], input=source,
                               capture_output=True, text=True, check=False)
        return probe.returncode == 0

    if not compiles(f"#include <{header}>\n"):
        return f"no {header} (apt-get install {package})"
    if not compiles(f"#include <{header}>\n#if !({condition})\n#error too old\n#endif\n"):
        return f"{header} is too old (needs {condition})"
    return ""


def buildable(compiler: str = "cc") -> dict[str, str]:
    """C extension -> why it cannot be built here ("" when it can)."""
    return {name: next(filter(None, (missing_header(library, compiler) for library in libraries)), "")
            for name, libraries in C_EXTENSIONS.items()}


def build(package_dir: Path = PACKAGE_DIR, *, required: bool = False) -> list[str]:
    """Compile `COMPILED_MODULES` with mypyc and `C_EXTENSIONS`, place the extensions beside their sources, record
    the sources' hashes; the warnings for extensions left out (`required`: an error instead).

    Needs a C compiler and Python's headers. The build runs in a scratch copy of the package
    (so no project configuration of ours is read, and a failed build leaves nothing behind).
    """
    from mypyc.build import mypycify  # build-time only: mypy is not a runtime dependency
    from setuptools import Extension, setup

    digests = source_digests(package_dir)  # hashed before compiling: an edit during the build shows as stale
    compiler = os.environ.get("CC", "cc")
    left_out = {name: reason for name, reason in buildable(compiler).items() if reason}
    if left_out and required:
        raise RuntimeError("; ".join(f"cannot build balancer.{name}: {reason}" for name, reason in left_out.items()))
    for name, reason in left_out.items():
        digests[f"{name}.c"] = SKIPPED + reason
    previous = Path.cwd()
    with tempfile.TemporaryDirectory(prefix="balancer-native-") as scratch:
        workdir = Path(scratch)
        shutil.copytree(package_dir, workdir / PACKAGE, ignore=shutil.ignore_patterns("__pycache__", "*.so", MANIFEST))
        os.chdir(workdir)  # mypyc names modules by their path from here
        try:
            modules = mypycify(["--ignore-missing-imports", *(f"{PACKAGE}/{name}.py" for name in COMPILED_MODULES)],
                               opt_level="3", group_name=GROUP, target_dir="build/c")
            modules += [Extension(f"{PACKAGE}.{name}", [f"{PACKAGE}/{name}.c"], extra_compile_args=["-O2"],
                                  depends=[f"{PACKAGE}/{header}" for header in C_HEADERS], libraries=list(libraries))
                        for name, libraries in C_EXTENSIONS.items() if name not in left_out]
            setup(name="balancer-native", ext_modules=modules, py_modules=[],
                  script_args=["--quiet", "build_ext", "--inplace", "--build-temp", "build/objects"])
        finally:
            os.chdir(previous)
        built = extensions(workdir / PACKAGE)
        # one per module, the group's shared library, the C ones built
        expected = len(COMPILED_MODULES) + 1 + len(C_EXTENSIONS) - len(left_out)
        if len(built) != expected:
            raise RuntimeError(f"the build made {[path.name for path in built]}, expected {expected} extensions")
        for stale in extensions(package_dir):
            stale.unlink()
        for extension in built:
            shutil.copy2(extension, package_dir / extension.name)
    (package_dir / MANIFEST).write_text(json.dumps(digests, indent=1, sort_keys=True) + "\n")
    return [f"balancer.{name} is not built ({reason}): the code using it runs its Python equivalent, which costs "
            "more CPU per request; install it, then run python scripts/build_native.py"
            for name, reason in left_out.items()]
