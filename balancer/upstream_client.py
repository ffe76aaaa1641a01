"""A lean keep-alive HTTP/1.1 client for the proxy's hot path (asyncio.Protocol + httptools).

aiohttp's ClientSession costs ~225 µs of CPU per proxied request on this class of
machine; this client, which does only what a reverse proxy needs (one request per
connection at a time, buffered bodies, idle-connection reuse), brings the whole hop
near 100 µs. The shared ClientSession is still used for everything off the hot path
(health checks, the traffic generator).
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass

import httptools


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


@dataclass(slots=True)
class UpstreamResponse:
    """A complete upstream answer: status, raw header pairs and the (de-chunked) body."""

    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes


class _Connection(asyncio.Protocol):
    """One keep-alive connection; carries one request at a time."""

    __slots__ = (
        "transport", "parser", "waiter", "headers", "body", "closed", "keep_alive",
        "received_any", "address", "timer", "response_headers", "head",
    )

    def __init__(self, address: str) -> None:
        self.address = address
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.waiter: asyncio.Future[UpstreamResponse] | None = None
        self.headers: list[tuple[bytes, bytes]] = []
        self.body: list[bytes] = []
        self.closed = False
        self.keep_alive = False
        self.received_any = False
        self.timer: asyncio.TimerHandle | None = None
        self.response_headers: list[tuple[bytes, bytes]] = []
        self.head = False

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.received_any = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(UpstreamProtocolError(self.address, "upgrade responses are not proxied"))
        except httptools.HttpParserError as exc:
            self._fail(UpstreamProtocolError(self.address, f"invalid HTTP response: {exc}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.waiter is not None and not self.waiter.done():
            error = UpstreamClosedError(self.address, "connection closed before the response completed")
            # A reused connection the server closed while idle: nothing was processed.
            error.retryable = not self.received_any
            self.waiter.set_exception(error)

    # httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        # httptools reports a chunked body's trailer fields through on_header too: from here on they
        # land in a list nobody reads, never promoted to response headers (RFC 9110 §6.5.1).
        self.response_headers = self.headers
        self.headers = []
        if self.head and self.parser.get_status_code() >= 200:
            # A HEAD response has no body whatever its Content-Length says, but the parser cannot be
            # told so: answer now and retire the connection rather than wait for bytes that never come.
            self.keep_alive = False
            if self.timer is not None:
                self.timer.cancel()
            if self.waiter is not None and not self.waiter.done():
                self.waiter.set_result(UpstreamResponse(self.parser.get_status_code(), self.response_headers, b""))

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        status = self.parser.get_status_code()
        if status < 200:  # interim (100 Continue, 103 Early Hints): the final response follows
            self.headers = []
            self.body = []
            return
        self.keep_alive = self.parser.should_keep_alive()
        if self.timer is not None:
            self.timer.cancel()
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            body = self.body[0] if len(self.body) == 1 else b"".join(self.body)
            waiter.set_result(UpstreamResponse(status, self.response_headers, body))

    # client side
    def send(self, payload: bytes, timeout: float, head: bool = False) -> asyncio.Future[UpstreamResponse]:
        """Write one request (`head`: it is a HEAD request); the future resolves with its response."""
        loop = asyncio.get_running_loop()
        self.head = head
        self.waiter = loop.create_future()
        self.headers = []
        self.body = []
        self.received_any = False
        self.timer = loop.call_later(timeout, self._on_timeout, timeout)
        assert self.transport is not None
        self.transport.write(payload)
        return self.waiter

    def _on_timeout(self, timeout: float) -> None:
        self._fail(UpstreamTimeoutError(self.address, f"no complete response within {timeout:g}s"))

    def _fail(self, error: UpstreamError) -> None:
        if self.timer is not None:
            self.timer.cancel()
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(error)
        self.close()

    def close(self) -> None:
        """Close the socket; a pending request fails."""
        self.closed = True
        if self.transport is not None:
            self.transport.close()


class ConnectionPool:
    """Idle keep-alive connections to one upstream address (host, port)."""

    def __init__(self, host: str, port: int, *, max_idle: int = 64, connect_timeout: float = 1.0) -> None:
        self.host = host
        self.port = port
        self.address = f"{host}:{port}"
        self.authority = (f"[{host}]" if ":" in host else host) + ("" if port == 80 else f":{port}")
        self.max_idle = max_idle
        self.connect_timeout = connect_timeout
        self._idle: deque[_Connection] = deque()
        self._closed = False

    async def request(self, payload: bytes, timeout: float, *, head: bool = False) -> UpstreamResponse:
        """Send one serialized request and return the complete response.

        A reused connection that turns out to have been closed by the upstream while
        idle is retried once on a fresh connection: no byte was processed.
        """
        connection = self._take_idle()
        if connection is not None:
            try:
                return await self._exchange(connection, payload, timeout, head)
            except UpstreamClosedError as exc:
                if not exc.retryable:
                    raise
        connection = await self._connect()
        return await self._exchange(connection, payload, timeout, head)

    async def _exchange(self, connection: _Connection, payload: bytes, timeout: float, head: bool) -> UpstreamResponse:
        try:
            response = await connection.send(payload, timeout, head)
        except asyncio.CancelledError:
            connection.close()
            raise
        if connection.keep_alive and not connection.closed and not self._closed and len(self._idle) < self.max_idle:
            self._idle.append(connection)
        else:
            connection.close()
        return response

    def _take_idle(self) -> _Connection | None:
        idle = self._idle
        while idle:
            connection = idle.pop()
            if not connection.closed:
                return connection
        return None

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.connect_timeout):
                _, protocol = await loop.create_connection(
                    lambda: _Connection(self.address), self.host, self.port
                )
        except TimeoutError as exc:
            raise UpstreamConnectError(self.address, f"connect timed out after {self.connect_timeout:g}s") from exc
        except OSError as exc:
            raise UpstreamConnectError(self.address, f"connect failed: {exc.strerror or exc}") from exc
        return protocol

    def close(self) -> None:
        """Close every idle connection; in-flight ones close when they finish."""
        self._closed = True
        while self._idle:
            self._idle.pop().close()

    @property
    def idle_count(self) -> int:
        """Idle connections kept for reuse."""
        return len(self._idle)


def serialize_request(
    method: str, target: str, authority: str, headers: list[tuple[bytes, bytes]], body: bytes
) -> bytes:
    """HTTP/1.1 request bytes with Host and Content-Length set; `headers` are already filtered."""
    lines = [f"{method} {target} HTTP/1.1\r\nHost: {authority}\r\n".encode("latin-1")]
    for name, value in headers:
        lines.append(name + b": " + value + b"\r\n")
    if body or method not in ("GET", "HEAD", "DELETE", "OPTIONS"):
        lines.append(b"Content-Length: %d\r\n" % len(body))
    lines.append(b"\r\n")
    lines.append(body)
    return b"".join(lines)
