"""Every way a try against an upstream can fail: one tree rooted in `UpstreamError`.

Kept apart from `upstream_client` (which mypyc compiles): these classes also inherit from
the stdlib's exception types, which compiled classes cannot.
"""

from __future__ import annotations

import asyncio


class UpstreamError(Exception):
    """Base of every failure talking to an upstream; `retryable` if no byte of a response arrived."""

    retryable = False

    def __init__(self, address: str, message: str) -> None:
        super().__init__(f"{address}: {message}")
        self.address = address
        self.reason = message


class UpstreamConnectError(UpstreamError, ConnectionError):
    """The TCP connection could not be made (refused, unreachable, connect timeout)."""

    retryable = True


class UpstreamClosedError(UpstreamError, ConnectionError):
    """The connection closed before the response was complete."""


class UpstreamTimeoutError(UpstreamError, asyncio.TimeoutError):
    """The upstream did not answer within the per-try timeout."""


class UpstreamProtocolError(UpstreamError):
    """The upstream sent bytes that are not valid HTTP."""
