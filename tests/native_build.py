"""Tests that need the compiled extensions (`make native`)."""

from __future__ import annotations

import os

import pytest

from balancer import native


def require_native_build() -> None:
    """Skip where nothing was compiled (no C compiler), except under BALANCER_REQUIRE_NATIVE=1 (CI)."""
    compiled, reason = native.decide(native.PACKAGE_DIR, {})
    if compiled:
        return
    if native.is_set(os.environ, native.REQUIRE_ENVIRONMENT):
        pytest.fail(f"{native.REQUIRE_ENVIRONMENT} is set but the request path is {reason}")
    pytest.skip(f"the request path is {reason}")
