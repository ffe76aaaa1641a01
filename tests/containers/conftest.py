"""Fixtures for the container tests: the real docker-compose stack, started once per module.

Without a reachable Docker engine every test here is skipped with one reason;
with REQUIRE_DOCKER=1 (CI) that is an error instead.
"""

from __future__ import annotations

import os
import secrets
import sys
from collections.abc import Iterator

import pytest

from tests.containers.compose_stack import (
    PUBLISHED_PORTS,
    START_TIMEOUT_S,
    Stack,
    all_variants_healthy,
    build_images,
    compose_command,
    docker_unavailable_reason,
    port_in_use,
    wait_until,
)


@pytest.fixture(scope="module")
def stack(request: pytest.FixtureRequest) -> Iterator[Stack]:
    """Build the images, bring the compose stack up once, and always tear it down (`down -v`)."""
    reason = docker_unavailable_reason()
    if reason is not None:
        if os.environ.get("REQUIRE_DOCKER") == "1":
            pytest.fail(f"REQUIRE_DOCKER=1 but {reason}", pytrace=False)
        pytest.skip(f"{reason}; container tests need one (REQUIRE_DOCKER=1 makes this an error)")
    token = secrets.token_urlsafe(24)
    environment = {**os.environ, "BALANCER_ADMIN_TOKEN": token}
    stack = Stack(compose=compose_command(), admin_token=token, environment=environment)
    stack.run("down", "--volumes", "--remove-orphans", check=False)  # leftovers of a killed run
    busy = [port for port in PUBLISHED_PORTS if port_in_use(port)]
    if busy:
        pytest.fail(f"127.0.0.1 ports {busy} are taken (a `make up` stack? run `make down`); "
                    "the compose stack publishes 8080, 8081 and 9090", pytrace=False)
    build_images()
    failures_before = request.session.testsfailed
    try:
        stack.run("up", "-d", "--no-build")
        wait_until(lambda: all_variants_healthy(stack), timeout=START_TIMEOUT_S,
                   what="both variants healthy behind the balancer")
        yield stack
    finally:
        if request.session.testsfailed > failures_before or sys.exc_info()[0] is not None:
            logs = stack.run("logs", "--no-color", "--tail=60", check=False, timeout=60)
            sys.stderr.write(f"\n[containers] compose logs:\n{logs.stdout[-20000:]}\n")
        stack.run("down", "--volumes", "--remove-orphans", "--timeout", "10", check=False, timeout=180)
