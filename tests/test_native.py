"""The compiled request path (balancer/native.py): used only when built from the current sources."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from balancer import native
from tests.native_build import require_native_build
from tests.processes import REPO

EXTENSION = "proxy.cpython-311-x86_64-linux-gnu.so"


@pytest.fixture
def package(tmp_path: Path) -> Path:
    """A package directory holding the compiled modules' sources (copies of the real ones)."""
    folder = tmp_path / "balancer"
    folder.mkdir()
    for name in native.COMPILED_MODULES:
        shutil.copy(native.PACKAGE_DIR / f"{name}.py", folder / f"{name}.py")
    return folder


def built(folder: Path) -> None:
    """Pretend a build ran: an extension file and a manifest of the current sources."""
    (folder / EXTENSION).write_bytes(b"")
    (folder / native.MANIFEST).write_text(json.dumps(native.source_digests(folder)))


def test_nothing_built_runs_interpreted(package: Path) -> None:
    assert native.decide(package, {}) == (False, "interpreted (not built: make native)")


def test_a_build_of_the_current_sources_runs_compiled(package: Path) -> None:
    built(package)
    assert native.decide(package, {}) == (True, "compiled")
    assert native.decide(package, {native.PURE_ENVIRONMENT: "0"}) == (True, "compiled")


def test_an_edited_source_switches_every_module_to_its_source_and_says_which(package: Path) -> None:
    built(package)
    with (package / "proxy.py").open("a") as source:
        source.write("\n# edited after the build\n")
    use_compiled, mode = native.decide(package, {})
    assert not use_compiled
    assert mode == "interpreted (changed since the build: proxy; rebuild with make native)"


def test_a_missing_or_broken_manifest_runs_interpreted(package: Path) -> None:
    built(package)
    (package / native.MANIFEST).write_text("{not json")
    assert native.decide(package, {})[0] is False
    (package / native.MANIFEST).unlink()
    assert "no valid native.json" in native.decide(package, {})[1]


def test_the_environment_variable_forces_the_sources(package: Path) -> None:
    built(package)
    assert native.decide(package, {native.PURE_ENVIRONMENT: "1"}) == (False, "interpreted (BALANCER_PURE_PYTHON is set)")


def _imported_from(environment: dict[str, str], pythonpath: Path = REPO) -> tuple[str, str]:
    """(mode, file balancer.proxy was loaded from) in a fresh interpreter."""
    script = "import balancer.proxy, balancer.native as n; print(n.MODE); print(balancer.proxy.__file__)"
    env = {**os.environ, **environment, "PYTHONPATH": str(pythonpath)}
    result = subprocess.run([sys.executable, "-c", script], env=env, cwd=pythonpath, capture_output=True, text=True,
                            timeout=60, check=True)
    mode, path = result.stdout.strip().splitlines()
    return mode, path


def test_the_built_tree_imports_the_extensions_unless_told_not_to() -> None:
    require_native_build()
    mode, path = _imported_from({native.PURE_ENVIRONMENT: ""})
    assert (mode, Path(path).suffix) == ("compiled", ".so")
    mode, path = _imported_from({native.PURE_ENVIRONMENT: "1"})
    assert (mode, Path(path).name) == ("interpreted (BALANCER_PURE_PYTHON is set)", "proxy.py")


def test_an_edit_after_the_build_never_runs_the_stale_extension(tmp_path: Path) -> None:
    require_native_build()
    shutil.copytree(native.PACKAGE_DIR, tmp_path / "balancer", ignore=shutil.ignore_patterns("__pycache__"))
    source = tmp_path / "balancer" / "hop_headers.py"
    source.write_text(source.read_text() + "\nEDITED = True\n")
    mode, path = _imported_from({native.PURE_ENVIRONMENT: ""}, pythonpath=tmp_path)
    assert mode == "interpreted (changed since the build: hop_headers; rebuild with make native)"
    assert path == str(tmp_path / "balancer" / "proxy.py")
    edited = subprocess.run([sys.executable, "-c", "import balancer.hop_headers as h; print(h.EDITED)"], cwd=tmp_path,
                            env={**os.environ, "PYTHONPATH": str(tmp_path)}, capture_output=True, text=True, timeout=60)
    assert edited.stdout.strip() == "True", edited.stderr


@pytest.mark.parametrize("required", ["", "1"])
def test_without_a_compiler_the_build_warns_or_fails_as_asked(required: str) -> None:
    script = REPO / "scripts" / "build_native.py"
    env = {**os.environ, "CC": "no-such-compiler", native.REQUIRE_ENVIRONMENT: required}
    result = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=60)
    if required:
        assert result.returncode == 1
        assert "cannot compile the request path: no C compiler ('no-such-compiler' is not on PATH" in result.stderr
    else:
        assert result.returncode == 0, result.stderr
        assert "warning: not compiling the request path (no C compiler" in result.stderr
        assert result.stdout.startswith("balancer request path: ")


def test_an_extension_left_out_of_the_build_leaves_the_rest_compiled(package: Path) -> None:
    built(package)
    manifest = json.loads((package / native.MANIFEST).read_text())
    manifest["_store.c"] = native.SKIPPED + "no sqlite3.h (apt-get install libsqlite3-dev)"
    (package / native.MANIFEST).write_text(json.dumps(manifest))
    (package / "_store.c").write_text("/* edited, or first present, after a build that left it out */\n")
    assert native.decide(package, {}) == (True, "compiled")
    (package / "rows_frame.h").write_text("/* a shared header edited after the build */\n")
    assert native.decide(package, {}) == (False, "interpreted (changed since the build: rows_frame.h; "
                                                 "rebuild with make native)")


def test_a_missing_library_header_is_named_with_its_package_and_fails_a_required_build(
        package: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if shutil.which("cc") is None:
        pytest.skip("no C compiler to probe headers with")
    monkeypatch.setitem(native.LIBRARY_HEADERS, "nothing", ("no_such_header_zz.h", "libnothing-dev", "1"))
    monkeypatch.setitem(native.LIBRARY_HEADERS, "old", ("limits.h", "libc6-dev", "INT_MAX < 0"))
    assert native.missing_header("old") == "limits.h is too old (needs INT_MAX < 0)"
    monkeypatch.setitem(native.C_EXTENSIONS, "_nothing", ("nothing",))
    assert native.missing_header("nothing") == "no no_such_header_zz.h (apt-get install libnothing-dev)"
    assert native.buildable()["_nothing"] == "no no_such_header_zz.h (apt-get install libnothing-dev)"
    with pytest.raises(RuntimeError, match=r"cannot build balancer._nothing: no no_such_header_zz.h"):
        native.build(package, required=True)
    assert not native.extensions(package)  # refused before anything was compiled


def test_the_build_here_includes_the_store_writers_connection() -> None:
    require_native_build()
    manifest = json.loads((native.PACKAGE_DIR / native.MANIFEST).read_text())
    if manifest["_store.c"].startswith(native.SKIPPED) and not native.is_set(os.environ, native.REQUIRE_ENVIRONMENT):
        pytest.skip(f"balancer._store was left out of the build here: {manifest['_store.c']}")
    assert manifest["_store.c"] == native.source_digests()["_store.c"]
    assert any(path.name.startswith("_store.") for path in native.extensions())
