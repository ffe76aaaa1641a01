"""Driving the real docker-compose stack from tests: compose command, HTTP helpers, polling, image builds."""

from __future__ import annotations

import functools
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import pytest

REPO: Final = Path(__file__).resolve().parents[2]
COMPOSE_FILE: Final = REPO / "docker-compose.yml"
PROJECT: Final = "abtest"
PUBLISHED_PORTS: Final = (8080, 8081, 9090)
PUBLIC_URL: Final = "http://127.0.0.1:8080"
ADMIN_URL: Final = "http://127.0.0.1:8081"
PROMETHEUS_URL: Final = "http://127.0.0.1:9090"
BUILD_TIMEOUT_S: Final = 2400.0
START_TIMEOUT_S: Final = 120.0


@functools.cache
def docker_unavailable_reason() -> str | None:
    """Why no Docker engine can be used here, or None when `docker info` answers."""
    if shutil.which("docker") is None:
        return "docker client not installed"
    try:
        result = subprocess.run(["docker", "info", "--format", "{{.ServerVersion}}"],
                                capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        return "`docker info` timed out after 20s"
    if result.returncode != 0:
        last_line = (result.stderr.strip().splitlines() or ["no output"])[-1]
        return f"Docker engine not reachable ({last_line})"
    return None


def compose_command() -> list[str]:
    """`docker compose` (v2 plugin) when present, else `docker-compose` (v1), as the Makefile picks."""
    override = os.environ.get("COMPOSE")
    if override:
        return override.split()
    if subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    raise RuntimeError("neither `docker compose` nor `docker-compose` is installed")


def port_in_use(port: int) -> bool:
    """Whether something already listens on 127.0.0.1:port."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.settimeout(0.5)
        return probe.connect_ex(("127.0.0.1", port)) == 0


def http_json(url: str, *, token: str | None = None, body: Any = None,
              headers: dict[str, str] | None = None, timeout: float = 5.0) -> tuple[int, dict[str, str], Any]:
    """One HTTP request to the stack: (status, headers, decoded JSON body or text)."""
    request_headers = dict(headers or {})
    if token:
        request_headers["Authorization"] = f"Bearer {token}"
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        request_headers["Content-Type"] = "application/json"
    request = urllib.request.Request(url, data=data, headers=request_headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, response_headers, raw = response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        status, response_headers, raw = error.code, dict(error.headers), error.read()
    text = raw.decode(errors="replace")
    try:
        return status, response_headers, json.loads(text)
    except ValueError:
        return status, response_headers, text


def wait_until(condition: Any, *, timeout: float, interval: float = 1.0, what: str) -> Any:
    """Poll `condition()` until it returns something truthy; fail naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            result = condition()
        except (OSError, ValueError, KeyError, TypeError) as exc:  # not up yet, or half-written answers
            last_error, result = exc, None
        if result:
            return result
        time.sleep(interval)
    detail = f" (last error: {last_error})" if last_error else ""
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}{detail}")


@dataclass
class Stack:
    """The running compose project, with helpers to drive it."""

    compose: list[str]
    admin_token: str
    environment: dict[str, str] = field(repr=False)

    def run(self, *args: str, timeout: float = 180.0, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run one compose subcommand against the project; raise with its output when it fails."""
        command = [*self.compose, "--project-name", PROJECT, "--file", str(COMPOSE_FILE), *args]
        result = subprocess.run(command, cwd=REPO, env=self.environment, capture_output=True, text=True,
                                timeout=timeout, stdin=subprocess.DEVNULL)
        if check and result.returncode != 0:
            raise AssertionError(f"{' '.join(command)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}")
        return result

    def exec(self, service: str, command: Sequence[str], timeout: float = 120.0) -> str:
        """Run a command inside the first container of `service` and return its standard output."""
        return self.run("exec", "-T", service, *command, timeout=timeout).stdout

    def container_ids(self, service: str) -> list[str]:
        """IDs of the service's running containers."""
        return self.run("ps", "-q", service).stdout.split()

    def admin(self, path: str) -> Any:
        """GET an admin endpoint (with the bearer token) and return its JSON."""
        status, _, body = http_json(ADMIN_URL + path, token=self.admin_token)
        assert status == 200, f"GET {path} on the admin port answered {status}: {body}"
        return body


def build_images() -> None:
    """The base image (if missing) and every image of the compose file, reusing cached layers."""
    started = time.monotonic()
    for command in (["bash", str(REPO / "scripts/build-base-image.sh")],
                    [sys.executable, str(REPO / "scripts/build_images.py"), "--quiet"]):
        result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S,
                                stdin=subprocess.DEVNULL)
        if result.returncode != 0:
            pytest.fail(f"{' '.join(command)} failed:\n{result.stdout[-5000:]}\n{result.stderr[-5000:]}")
    sys.stderr.write(f"\n[containers] images ready in {time.monotonic() - started:.0f}s\n")


def all_variants_healthy(stack: Stack) -> bool:
    """Whether the balancer is up and sees a healthy endpoint of both variants."""
    endpoints = stack.admin("/admin/upstreams")
    healthy = {endpoint["variant"] for endpoint in endpoints if endpoint["healthy"]}
    return {"model_a", "model_b"} <= healthy
