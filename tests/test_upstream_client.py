"""The lean upstream client against small in-process servers: framing, reuse, HEAD, timeouts."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import pytest

from balancer.upstream_client import ConnectionPool, UpstreamResponse, serialize_request
from balancer.upstream_errors import (
    UpstreamClosedError,
    UpstreamConnectError,
    UpstreamError,
    UpstreamTimeoutError,
)

Reply = Callable[[bytes], bytes | None]


@pytest.fixture
async def server() -> AsyncIterator[Callable[[Reply], asyncio.Future[tuple[int, list[int]]]]]:
    """Start a raw TCP server answering each request head with `reply(head)`; yields (port, connection count)."""
    servers: list[asyncio.Server] = []

    async def start(reply: Reply) -> tuple[int, list[int]]:
        connections = [0]

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            connections[0] += 1
            try:
                while True:
                    head = await reader.readuntil(b"\r\n\r\n")
                    length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                                   if line.lower().startswith(b"content-length:")), 0)
                    await reader.readexactly(length)
                    answer = reply(head)
                    if answer is None:
                        writer.close()
                        return
                    writer.write(answer)
                    await writer.drain()
            except (asyncio.IncompleteReadError, ConnectionError):
                writer.close()

        tcp = await asyncio.start_server(handle, "127.0.0.1", 0)
        servers.append(tcp)
        return tcp.sockets[0].getsockname()[1], connections

    yield start  # type: ignore[misc]
    for tcp in servers:
        tcp.close()


def request(pool: ConnectionPool, method: str = "POST", body: bytes = b"{}") -> bytes:
    return serialize_request(method, "/predict?x=1", pool.authority, b"X-Test: 1\r\n", body)


async def test_keep_alive_connections_are_reused(server) -> None:  # type: ignore[no-untyped-def]
    port, connections = await server(lambda head: b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    pool = ConnectionPool("127.0.0.1", port)
    for _ in range(5):
        response = await pool.request(request(pool), 1.0)
        assert (response.status, response.body) == (200, b"ok")
    assert connections[0] == 1 and pool.idle_count == 1
    pool.close()


async def test_idle_connections_past_the_idle_timeout_are_closed_not_reused(server) -> None:  # type: ignore[no-untyped-def]
    port, connections = await server(lambda head: b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    pool = ConnectionPool("127.0.0.1", port, idle_timeout=0.2)
    first, second = await asyncio.gather(pool.request(request(pool), 1.0), pool.request(request(pool), 1.0))
    assert first.body == second.body == b"ok" and connections[0] == 2 and pool.idle_count == 2
    await pool.request(request(pool), 1.0)  # reuses the freshest within the timeout
    assert connections[0] == 2
    await asyncio.sleep(0.3)
    await pool.request(request(pool), 1.0)  # both idle too long: closed, a new connection instead
    assert connections[0] == 3 and pool.idle_count == 1
    pool.close()


async def test_a_release_closes_the_connections_idle_too_long(server) -> None:  # type: ignore[no-untyped-def]
    port, connections = await server(lambda head: b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    pool = ConnectionPool("127.0.0.1", port, idle_timeout=5.0)
    await asyncio.gather(pool.request(request(pool), 1.0), pool.request(request(pool), 1.0))
    assert pool.idle_count == 2
    oldest = pool._idle[0]
    oldest.idle_since -= 10  # waited past the timeout while the other was reused
    await pool.request(request(pool), 1.0)  # takes the fresh one; its release drops the stale one
    assert pool.idle_count == 1 and oldest.closed and connections[0] == 2
    pool.close()


@pytest.mark.parametrize("stray", [b"HTTP/1.1 200 OK\r\nContent-Le", b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nstray"])
@pytest.mark.parametrize("later", [False, True], ids=["same read", "later read"])
async def test_bytes_after_the_response_retire_the_connection(server, stray: bytes, later: bool) -> None:  # type: ignore[no-untyped-def]
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    port, connections = await server(lambda head: answer if later else answer + stray)
    pool = ConnectionPool("127.0.0.1", port)
    first = await pool.request(request(pool), 1.0)
    if later:  # the stray bytes reach the connection while it sits idle in the pool
        connection = pool._idle[-1]
        assert connection.transport is not None
        connection.data_received(stray)
    second = await pool.request(request(pool), 1.0)  # read as its own answer, on a new connection
    assert first.body == second.body == b"ok" and connections[0] == 2
    pool.close()


async def test_chunked_response_is_reassembled(server) -> None:  # type: ignore[no-untyped-def]
    port, _ = await server(lambda head: b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n")
    pool = ConnectionPool("127.0.0.1", port)
    response = await pool.request(request(pool), 1.0)
    assert response.body == b"abcde"
    pool.close()


async def test_head_response_with_content_length_does_not_wait_for_a_body(server) -> None:  # type: ignore[no-untyped-def]
    port, _ = await server(lambda head: b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n")
    pool = ConnectionPool("127.0.0.1", port)
    response = await asyncio.wait_for(pool.request(request(pool, "HEAD", b""), 2.0, head=True), 1.0)
    assert response.status == 200 and response.body == b""
    assert pool.idle_count == 0  # the connection is retired, never reused half-parsed
    pool.close()


async def test_a_stale_pooled_connection_is_retried_once_on_a_fresh_one(server) -> None:  # type: ignore[no-untyped-def]
    answers = iter([b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\na", None, b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nb"])
    port, connections = await server(lambda head: next(answers))
    pool = ConnectionPool("127.0.0.1", port)
    assert (await pool.request(request(pool), 1.0)).body == b"a"
    assert (await pool.request(request(pool), 1.0)).body == b"b"  # first try hit a closing socket
    assert connections[0] == 2
    pool.close()


async def test_timeout_and_refused_connection(server) -> None:  # type: ignore[no-untyped-def]
    never = asyncio.get_running_loop().create_future()
    port, _ = await server(lambda head: b"")  # reads the request, never answers
    pool = ConnectionPool("127.0.0.1", port)
    with pytest.raises(UpstreamTimeoutError, match="within 0.2s"):
        await pool.request(request(pool), 0.2)
    refused = ConnectionPool("127.0.0.1", 1, connect_timeout=0.5)
    with pytest.raises(UpstreamConnectError) as error:
        await refused.request(request(refused), 1.0)
    assert error.value.retryable
    pool.close()
    never.cancel()


async def test_callback_send_on_an_idle_connection_reports_each_outcome_once(server) -> None:  # type: ignore[no-untyped-def]
    answers = iter([b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\na", b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nb",
                    None, b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nc", b""])
    port, connections = await server(lambda head: next(answers))
    pool = ConnectionPool("127.0.0.1", port)
    assert pool.take_idle() is None  # nothing to reuse yet: the caller must connect (`request`)
    assert (await pool.request(request(pool), 1.0)).body == b"a"
    outcomes: list[tuple[UpstreamResponse | None, UpstreamError | None]] = []

    async def send_on_idle(timeout: float) -> tuple[UpstreamResponse | None, UpstreamError | None]:
        connection = pool.take_idle()
        assert connection is not None
        done = asyncio.get_running_loop().create_future()

        def on_done(response: UpstreamResponse | None, error: UpstreamError | None) -> None:
            outcomes.append((response, error))
            done.set_result((response, error))

        pool.send(connection, request(pool), timeout, False, on_done)
        return await done  # type: ignore[no-any-return]

    response, error = await send_on_idle(1.0)
    assert response is not None and response.body == b"b" and error is None
    response, error = await send_on_idle(1.0)  # the upstream closes instead of answering
    assert response is None and isinstance(error, UpstreamClosedError) and error.retryable
    # the caller's one retry, on a new connection even though none is idle-checked first
    assert (await pool.request(request(pool), 1.0, fresh=True)).body == b"c"
    response, error = await send_on_idle(0.2)  # never answered: the pool's sweep times it out
    assert response is None and isinstance(error, UpstreamTimeoutError)
    await asyncio.sleep(0.2)  # nothing reports twice
    assert len(outcomes) == 3 and connections[0] == 2
    pool.close()



    payload = serialize_request("POST", "/p?q=1", "model_a:8001", b"X-A: 1\r\n", b"abc")
    assert payload == b"POST /p?q=1 HTTP/1.1\r\nHost: model_a:8001\r\nX-A: 1\r\nContent-Length: 3\r\n\r\nabc"
    assert b"Content-Length" not in serialize_request("GET", "/", "h", b"", b"")
