"""The code is typed and mypy-clean (STYLE.md §7): checked here so it stays that way."""

from __future__ import annotations

import subprocess
import sys

from tests.processes import REPO


def test_mypy_finds_no_issues() -> None:
    checked = subprocess.run(
        [sys.executable, "-m", "mypy", "balancer", "modelserver", "model_a", "model_b", "bench"],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    assert checked.returncode == 0, checked.stdout[-4000:] + checked.stderr[-2000:]
