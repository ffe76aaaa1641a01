"""The C parsers read no byte outside the messages they are given: checked under AddressSanitizer.

`parse_request` and `parse_response` (balancer/_headers.c) scan without bounds checks, relying on the NUL
that ends every bytes object. Here they are compiled with `-fsanitize=address` and run over random and
damaged messages in a Python whose objects all come from malloc, so a read past that NUL is reported.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from balancer import native
from tests.processes import REPO

OVERREAD = r"""
#define PY_SSIZE_T_CLEAN
#include <Python.h>
static PyObject *past_the_end(PyObject *module, PyObject *data) {  /* reads the byte after the NUL */
    return PyLong_FromLong(PyBytes_AS_STRING(data)[PyBytes_GET_SIZE(data) + 1]);
}
static PyMethodDef methods[] = {{"past_the_end", past_the_end, METH_O, ""}, {NULL, NULL, 0, NULL}};
static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "overread", "", -1, methods};
PyMODINIT_FUNC PyInit_overread(void) { return PyModule_Create(&module); }
"""


@pytest.fixture(scope="module")
def asan(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """(C compiler, libasan to preload); a skip where either is missing, a failure under BALANCER_REQUIRE_NATIVE=1."""
    compiler = shutil.which("gcc")
    library = subprocess.run([compiler, "-print-file-name=libasan.so"], capture_output=True, text=True,
                             check=False).stdout.strip() if compiler else ""
    if compiler is None or not os.path.isabs(library):
        reason = "no gcc with AddressSanitizer (libasan) to check the C parsers' memory use"
        if native.is_set(os.environ, native.REQUIRE_ENVIRONMENT):
            pytest.fail(f"{native.REQUIRE_ENVIRONMENT} is set but there is {reason}")
        pytest.skip(reason)
    return compiler, library


def build(compiler: str, source: Path, output: Path) -> Path:
    subprocess.run([compiler, "-shared", "-fPIC", "-O1", "-g", "-fsanitize=address", "-fno-omit-frame-pointer",
                    f"-I{sysconfig.get_paths()['include']}", "-o", str(output), str(source)], check=True)
    return output


def run_sanitized(library: str, *arguments: str) -> subprocess.CompletedProcess[str]:
    environment = {**os.environ, "LD_PRELOAD": library, "PYTHONMALLOC": "malloc",
                   "ASAN_OPTIONS": "detect_leaks=0:exitcode=23"}
    return subprocess.run([sys.executable, *arguments], cwd=REPO, env=environment, capture_output=True, text=True,
                          timeout=300, check=False)


def test_a_read_past_a_bytes_objects_end_is_caught(asan: tuple[str, str], tmp_path: Path) -> None:
    compiler, library = asan
    source = tmp_path / "overread.c"
    source.write_text(OVERREAD)
    build(compiler, source, tmp_path / "overread.so")
    loader = (f"import importlib.util as u; s = u.spec_from_file_location('overread', {str(tmp_path / 'overread.so')!r}); "
              "m = u.module_from_spec(s); s.loader.exec_module(m); m.past_the_end(b'x' * 100)")
    result = run_sanitized(library, "-c", loader)
    assert result.returncode == 23 and "heap-buffer-overflow" in result.stderr


def test_the_parsers_stay_inside_every_message(asan: tuple[str, str], tmp_path: Path) -> None:
    compiler, library = asan
    extension = build(compiler, REPO / "balancer" / "_headers.c", tmp_path / "_headers_asan.so")
    result = run_sanitized(library, "tests/asan_driver.py", str(extension), "4000")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "checked 4000"
