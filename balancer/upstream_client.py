"""A lean keep-alive HTTP/1.1 client for the proxy's hot path (asyncio.Protocol + httptools).

aiohttp's ClientSession costs ~225 µs of CPU per proxied request on this class of
machine; this client, which does only what a reverse proxy needs (one request per
connection at a time, buffered bodies, idle-connection reuse), brings the whole hop
near 100 µs. The shared ClientSession is still used for everything off the hot path
(health checks, the traffic generator). Where the request path is compiled, a plain response that
arrives whole in one read is parsed in one C call (`balancer._headers.parse_response`).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable

import httptools

from balancer import native
from balancer.hop_names import NOT_RETURNED, ParsedHeaders, Stripped
from balancer.upstream_errors import (
    UpstreamClosedError,
    UpstreamConnectError,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamTimeoutError,
)


_BODYLESS = frozenset({"GET", "HEAD", "DELETE", "OPTIONS"})
SWEEP_INTERVAL_S = 0.05  # timeout resolution


class UpstreamResponse(ParsedHeaders):
    """A complete upstream answer: status, raw header pairs and the (de-chunked) body."""

    __slots__ = ("status", "body")

    def __init__(self, status: int, pairs: list[tuple[bytes, bytes]] | None, body: bytes, raw: bytes = b"",
                 stripped: Stripped | None = None) -> None:
        super().__init__(pairs, raw, stripped)
        self.status = status
        self.body = body

    def __repr__(self) -> str:
        return f"UpstreamResponse(status={self.status!r}, headers={self.headers!r}, body={self.body!r})"


ResponseCallback = Callable[[UpstreamResponse | None, UpstreamError | None], None]
"""Called exactly once per request, from the connection's own callbacks: (response, None) or (None, error)."""

ParseResponse = Callable[[bytes, tuple[bytes, ...]], "tuple[int, bytes, list[tuple[int, bytes]], bytes] | None"]
# A whole plain response in one call instead of httptools' callbacks, its headers split for the hop as it is parsed
# (balancer/_headers.c); None where the request path runs interpreted, and httptools parses all.
parse_response: ParseResponse | None = native.c_function("_headers", "parse_response")


class UpstreamConnection(asyncio.Protocol):
    """One keep-alive connection; carries one request at a time."""

    __slots__ = (
        "transport", "parser", "on_done", "headers", "body", "closed", "keep_alive",
        "received_any", "address", "deadline", "idle_since", "timeout", "response_headers", "head", "pool",
        "at_start",
    )

    def __init__(self, pool: ConnectionPool) -> None:
        self.pool = pool
        self.address = pool.address
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.on_done: ResponseCallback | None = None
        self.headers: list[tuple[bytes, bytes]] = []
        self.body: list[bytes] = []
        self.closed = False
        self.keep_alive = False
        self.received_any = False
        self.deadline = 0.0  # loop time after which the pool's sweep fails the request
        self.idle_since = 0.0  # loop time it went back into the pool
        self.timeout = 0.0
        self.response_headers: list[tuple[bytes, bytes]] = []
        self.head = False
        # No byte of the pending request's response has reached httptools yet: a read holding all of it may
        # be parsed in one call (`parse_response`).
        self.at_start = False

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.on_done is None:
            # Bytes nobody asked for (an idle connection, or one whose request already failed): they would be
            # read as the start of the next request's response, so the connection is not used again.
            self.close()
            return
        self.received_any = True
        if self.at_start:
            self.at_start = False
            if parse_response is not None and not self.head:
                parsed = parse_response(data, NOT_RETURNED)
                if parsed is not None:
                    status, lines, held, body = parsed
                    self.keep_alive = True  # HTTP/1.1 without a Connection header
                    self.pool.release(self)
                    self._complete(UpstreamResponse(status, None, body, data, (lines, held)), None)
                    return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(UpstreamProtocolError(self.address, "upgrade responses are not proxied"))
        except httptools.HttpParserError as exc:
            self._fail(UpstreamProtocolError(self.address, f"invalid HTTP response: {exc}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool.forget(self)
        if self.on_done is not None:
            error = UpstreamClosedError(self.address, "connection closed before the response completed")
            # A reused connection the server closed while idle: nothing was processed.
            error.retryable = not self.received_any
            self._complete(None, error)

    # httptools callbacks
    def on_message_begin(self) -> None:
        if self.on_done is None:  # a response after the one asked for, in the same read: the upstream is out of step
            self.close()

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
            if self.on_done is not None:
                self.pool.release(self)
                self._complete(UpstreamResponse(self.parser.get_status_code(), self.response_headers, b""), None)

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        status = self.parser.get_status_code()
        if status < 200:  # interim (100 Continue, 103 Early Hints): the final response follows
            self.headers = []
            self.body = []
            return
        self.keep_alive = self.parser.should_keep_alive()
        if self.on_done is not None:
            body = self.body[0] if len(self.body) == 1 else b"".join(self.body)
            self.pool.release(self)
            self._complete(UpstreamResponse(status, self.response_headers, body), None)

    def _complete(self, response: UpstreamResponse | None, error: UpstreamError | None) -> None:
        # Cleared before the call: the callback may send the next request on this very connection.
        on_done, self.on_done = self.on_done, None
        if on_done is not None:
            on_done(response, error)

    # client side
    def send(self, payload: bytes, deadline: float, timeout: float, head: bool, on_done: ResponseCallback) -> None:
        """Write one request (`head`: it is a HEAD request); `on_done` gets its response or error."""
        self.head = head
        self.on_done = on_done
        self.headers = []
        self.body = []
        self.received_any = False
        self.at_start = True
        self.deadline = deadline
        self.timeout = timeout
        assert self.transport is not None
        self.transport.write(payload)

    def on_deadline(self) -> None:
        """Called by the pool's sweep when the request outlived its deadline."""
        self._fail(UpstreamTimeoutError(self.address, f"no complete response within {self.timeout:g}s"))

    def _fail(self, error: UpstreamError) -> None:
        self.close()
        self._complete(None, error)

    def close(self) -> None:
        """Close the socket; a pending request fails."""
        self.closed = True
        self.pool.forget(self)
        if self.transport is not None:
            self.transport.close()


class ConnectionPool:
    """Idle keep-alive connections to one upstream address (host, port)."""

    def __init__(self, host: str, port: int, *, max_idle: int = 64, connect_timeout: float = 1.0,
                 idle_timeout: float = 4.0) -> None:
        self.host = host
        self.port = port
        self.address = f"{host}:{port}"
        self.authority = (f"[{host}]" if ":" in host else host) + ("" if port == 80 else f":{port}")
        self.max_idle = max_idle
        self.connect_timeout = connect_timeout
        self.idle_timeout = idle_timeout  # seconds an idle connection may wait for reuse before it is closed
        self._idle: deque[UpstreamConnection] = deque()
        self._busy: set[UpstreamConnection] = set()
        self._sweep_handle: asyncio.TimerHandle | None = None
        self._closed = False
        self._loop: asyncio.AbstractEventLoop | None = None

    async def request(self, payload: bytes, timeout: float, *, head: bool = False, fresh: bool = False) -> UpstreamResponse:
        """Send one serialized request and return the complete response.

        A reused connection that turns out to have been closed by the upstream while
        idle is retried once on a fresh connection: no byte was processed. `fresh`: that
        retry itself (the caller already found its idle connection closed), on a new connection.
        """
        connection = None if fresh else self.take_idle()
        if connection is None:
            connection = await self._connect()
        try:
            return await self._exchange(connection, payload, timeout, head)
        except UpstreamClosedError as exc:
            if not exc.retryable or fresh:
                raise
        except asyncio.CancelledError:  # the caller gave up mid-exchange: the connection is unusable
            connection.close()
            raise
        connection = await self._connect()
        try:
            return await self._exchange(connection, payload, timeout, head)
        except asyncio.CancelledError:
            connection.close()
            raise

    def _exchange(self, connection: UpstreamConnection, payload: bytes, timeout: float, head: bool) -> asyncio.Future[UpstreamResponse]:
        waiter: asyncio.Future[UpstreamResponse] = asyncio.get_running_loop().create_future()

        def resolve(response: UpstreamResponse | None, error: UpstreamError | None) -> None:
            if waiter.done():
                return
            if response is not None:
                waiter.set_result(response)
            else:
                waiter.set_exception(error or UpstreamClosedError(self.address, "no response"))

        self.send(connection, payload, timeout, head, resolve)
        return waiter

    def send(self, connection: UpstreamConnection, payload: bytes, timeout: float, head: bool, on_done: ResponseCallback) -> None:
        """Send one request on `connection` (from `take_idle`); `on_done` is called with its response or error.

        The callback form of `request`, for callers that can continue without a task; it does
        not retry on a fresh connection (the caller sees the retryable UpstreamClosedError).
        """
        loop = self._running_loop()
        connection.send(payload, loop.time() + timeout, timeout, head, on_done)
        self._busy.add(connection)
        if self._sweep_handle is None:
            self._sweep_handle = loop.call_later(SWEEP_INTERVAL_S, self._sweep)

    def release(self, connection: UpstreamConnection) -> None:
        """A connection finished its exchange: keep it for reuse if it may be reused; close the long idle ones."""
        self._busy.discard(connection)
        idle = self._idle
        if connection.keep_alive and not connection.closed and not self._closed and len(idle) < self.max_idle:
            now = self._now()
            connection.idle_since = now
            idle.append(connection)
            stale = now - self.idle_timeout
            while idle[0].idle_since < stale:  # the oldest sit on the left; the one just added is fresh
                idle.popleft().close()
        else:
            connection.close()

    def _running_loop(self) -> asyncio.AbstractEventLoop:
        """The event loop, kept: on Python 3.11 every get_running_loop() costs a getpid() system call."""
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        return loop

    def _now(self) -> float:
        return self._running_loop().time()

    def forget(self, connection: UpstreamConnection) -> None:
        """A connection closed: it is neither busy nor idle any more (idle ones are skipped when taken)."""
        self._busy.discard(connection)

    def _sweep(self) -> None:
        """Fail requests past their deadline: one timer per pool instead of one per request."""
        now = asyncio.get_running_loop().time()
        for connection in [c for c in self._busy if c.deadline <= now]:
            connection.on_deadline()
        self._sweep_handle = (
            asyncio.get_running_loop().call_later(SWEEP_INTERVAL_S, self._sweep) if self._busy and not self._closed else None
        )

    def take_idle(self) -> UpstreamConnection | None:
        """The most recently used idle keep-alive connection, or None (then `request` connects).

        One idle longer than `idle_timeout` is closed instead: the upstream may be closing it
        right now, and a request sent into that race fails or runs twice. The others are older.
        """
        idle = self._idle
        while idle:
            connection = idle.pop()
            if connection.closed:
                continue
            if connection.idle_since < self._now() - self.idle_timeout:
                connection.close()
                while idle:
                    idle.pop().close()
                return None
            return connection
        return None

    async def _connect(self) -> UpstreamConnection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.connect_timeout):
                _, protocol = await loop.create_connection(
                    lambda: UpstreamConnection(self), self.host, self.port
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
        if self._sweep_handle is not None and not self._busy:
            self._sweep_handle.cancel()
            self._sweep_handle = None

    @property
    def idle_count(self) -> int:
        """Idle connections kept for reuse."""
        return len(self._idle)


def serialize_request(method: str, target: str, authority: str, header_lines: bytes, body: bytes) -> bytes:
    """HTTP/1.1 request bytes: request line, Host, the already-filtered `header_lines`, Content-Length, body."""
    length = b"Content-Length: %d\r\n" % len(body) if body or method not in _BODYLESS else b""
    return b"%s %s HTTP/1.1\r\nHost: %s\r\n%s%s\r\n%s" % (
        method.encode(), target.encode("latin-1"), authority.encode(), header_lines, length, body,
    )
