"""The public port's HTTP/1.1 server with a tiny handler: framing, pipelining, limits, early answers."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import httptools
import pytest

from balancer import http_server
from balancer.http_server import HttpRequest, HttpResponse, HttpServer


@dataclass
class EchoHandler:
    """Answers with what it received; `X-Delay` (seconds) answers later, `/fail` raises, `/busy` is refused."""

    admitted: Counter[str] = field(default_factory=Counter)
    finished_count: Counter[str] = field(default_factory=Counter)
    rejections: list[str] = field(default_factory=list)

    def admit(self, request: HttpRequest) -> HttpResponse | None:
        if request.target == "/busy":
            return HttpResponse(503, b"Retry-After: 1\r\n", b"busy")
        self.admitted[request.target] += 1
        return None

    def finished(self, request: HttpRequest) -> None:
        self.finished_count[request.target] += 1

    def rejected(self, reason: str) -> None:
        self.rejections.append(reason)

    def handle(self, request: HttpRequest, respond: Callable[[HttpResponse], None]) -> None:
        if request.target == "/fail":
            raise RuntimeError("handler bug")
        document = {"method": request.method, "target": request.target, "body": request.body.decode(),
                    "user": request.header(b"x-user-id")}
        status = int(request.header(b"x-status") or 200)
        response = HttpResponse(status, b"Content-Type: application/json\r\n", json.dumps(document).encode(),
                                head_length=1234)
        delay = float(request.header(b"x-delay") or 0)
        if delay:
            asyncio.get_running_loop().call_later(delay, respond, response)
        else:
            respond(response)


@dataclass
class Running:
    handler: EchoHandler
    server: HttpServer
    port: int


@pytest.fixture
async def running() -> AsyncIterator[Running]:
    handler = EchoHandler()
    server = HttpServer(handler, max_body_bytes=100, body_timeout_s=0.3, keepalive_timeout_s=0.6)
    port = await server.start("127.0.0.1", 0)
    yield Running(handler, server, port)
    await server.stop()


class Reply:
    """One parsed response."""

    def __init__(self) -> None:
        self.headers: dict[str, str] = {}
        self.body = b""
        self.complete = False
        self.status = 0

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.decode().lower()] = value.decode()

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        self.complete = True

    def json(self) -> dict[str, object]:
        return json.loads(self.body)  # type: ignore[no-any-return]


async def read_reply(reader: asyncio.StreamReader) -> Reply:
    """Exactly one response off the connection (byte by byte, never into the next one)."""
    reply = Reply()
    parser = httptools.HttpResponseParser(reply)
    async with asyncio.timeout(3):
        while not reply.complete:
            byte = await reader.read(1)
            if not byte:
                raise ConnectionError("closed before the response completed")
            parser.feed_data(byte)
    reply.status = parser.get_status_code()
    return reply


async def connect(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", port)


def post(target: str, body: bytes, *extra: str) -> bytes:
    lines = "".join(f"{line}\r\n" for line in extra)
    return f"POST {target} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n{lines}\r\n".encode() + body


async def closed_within(reader: asyncio.StreamReader, seconds: float) -> bool:
    """True if the server closes the connection within `seconds` (anything it still sends is read and dropped)."""
    try:
        async with asyncio.timeout(seconds):
            while await reader.read(4096):
                pass
    except TimeoutError:
        return False
    return True


async def test_keep_alive_serves_several_requests_on_one_connection(running: Running) -> None:
    reader, writer = await connect(running.port)
    for index in range(3):
        writer.write(post("/predict", b'{"i": %d}' % index, "X-User-ID: u1"))
        reply = await read_reply(reader)
        assert reply.status == 200 and reply.json()["body"] == '{"i": %d}' % index and reply.json()["user"] == "u1"
        assert reply.headers["content-length"] == str(len(reply.body)) and "connection" not in reply.headers
    writer.close()
    assert running.handler.admitted["/predict"] == running.handler.finished_count["/predict"] == 3


async def test_pipelined_requests_are_answered_in_order(running: Running) -> None:
    reader, writer = await connect(running.port)
    # the first answer is the slowest: it must still come first
    writer.write(post("/a", b"1", "X-Delay: 0.2") + post("/b", b"2", "X-Delay: 0.05") + post("/c", b"3"))
    targets = [(await read_reply(reader)).json()["target"] for _ in range(3)]
    writer.close()
    assert targets == ["/a", "/b", "/c"]


async def test_chunked_body_and_expect_100_continue(running: Running) -> None:
    reader, writer = await connect(running.port)
    writer.write(b"POST /chunked HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n")
    assert (await read_reply(reader)).json()["body"] == "abcde"
    writer.write(b"POST /expect HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n")
    async with asyncio.timeout(2):
        assert await reader.readuntil(b"\r\n\r\n") == b"HTTP/1.1 100 Continue\r\n\r\n"
    writer.write(b"ok")
    assert (await read_reply(reader)).json()["body"] == "ok"
    writer.close()


async def test_declared_oversized_body_gets_413_before_it_is_sent(running: Running) -> None:
    reader, writer = await connect(running.port)
    writer.write(b"POST /big HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n")  # no body: the answer must not wait for it
    reply = await read_reply(reader)
    assert reply.status == 413 and "max_body_bytes = 100" in str(reply.json()["error"])
    assert reply.headers["connection"] == "close"
    writer.write(b"x" * 5000)  # a client that sends anyway is read and dropped, then the connection ends
    assert await closed_within(reader, 3.0)
    writer.close()
    assert running.handler.rejections == ["body_too_large"] and running.handler.admitted["/big"] == 0


async def test_chunked_body_growing_past_the_limit_gets_413_and_the_slot_back(running: Running) -> None:
    reader, writer = await connect(running.port)
    writer.write(b"POST /grow HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" + b"40\r\n" + b"x" * 64 + b"\r\n")
    await asyncio.sleep(0.05)
    writer.write(b"40\r\n" + b"x" * 64 + b"\r\n")
    reply = await read_reply(reader)
    writer.close()
    assert reply.status == 413
    assert running.handler.admitted["/grow"] == running.handler.finished_count["/grow"] == 1


async def test_malformed_request_gets_400_json_and_the_connection_closes(running: Running) -> None:
    reader, writer = await connect(running.port)
    writer.write(b"GARBAGE\x00 / HTTP/1.1\r\n\r\n")
    reply = await read_reply(reader)
    assert reply.status == 400 and "malformed HTTP request" in str(reply.json()["error"])
    assert await closed_within(reader, 3.0)
    writer.close()


async def test_head_announces_the_length_without_a_body_and_204_has_no_framing(running: Running) -> None:
    reader, writer = await connect(running.port)
    writer.write(b"HEAD /h HTTP/1.1\r\nHost: x\r\n\r\nGET /after HTTP/1.1\r\nHost: x\r\nX-Status: 204\r\n\r\n"
                 b"GET /last HTTP/1.1\r\nHost: x\r\n\r\n")
    async with asyncio.timeout(3):
        head = await reader.readuntil(b"\r\n\r\n")
        no_content = await reader.readuntil(b"\r\n\r\n")
    last = await read_reply(reader)  # had either answer carried a body, it would be read here instead
    writer.close()
    assert head.startswith(b"HTTP/1.1 200 ") and b"Content-Length: 1234\r\n" in head
    assert no_content.startswith(b"HTTP/1.1 204 ") and b"Content-Length" not in no_content
    assert last.status == 200 and last.json()["target"] == "/last"


async def test_http_10_gets_keep_alive_only_when_it_asks(running: Running) -> None:
    reader, writer = await connect(running.port)
    writer.write(b"GET /k HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
    reply = await read_reply(reader)
    assert reply.headers["connection"] == "keep-alive"
    writer.write(b"GET /once HTTP/1.0\r\n\r\n")
    reply = await read_reply(reader)
    assert reply.headers["connection"] == "close" and await closed_within(reader, 2.0)
    writer.close()


async def test_the_version_is_read_where_it_matters_expect_and_keep_alive(running: Running) -> None:
    reader, writer = await connect(running.port)
    writer.write(b"POST /e HTTP/1.0\r\nExpect: 100-continue\r\nConnection: Keep-Alive\r\nContent-Length: 2\r\n\r\nok")
    reply = await read_reply(reader)  # no 100 Continue for HTTP/1.0: the first thing read is the answer
    assert reply.status == 200 and reply.json()["body"] == "ok" and reply.headers["connection"] == "keep-alive"
    writer.write(b"GET /k HTTP/1.1\r\nHost: x\r\nConnection: keep-alive\r\n\r\n")
    reply = await read_reply(reader)
    assert reply.status == 200 and "connection" not in reply.headers  # HTTP/1.1 keeps alive without saying so
    writer.close()


async def test_stalled_body_gets_408_and_frees_its_slot(running: Running) -> None:
    reader, writer = await connect(running.port)
    writer.write(b"POST /stall HTTP/1.1\r\nHost: x\r\nContent-Length: 50\r\n\r\nonly part")
    started = asyncio.get_running_loop().time()
    reply = await read_reply(reader)
    waited = asyncio.get_running_loop().time() - started
    writer.close()
    assert reply.status == 408 and "client_body_timeout_s = 0.3s" in str(reply.json()["error"])
    assert 0.25 <= waited < 1.5
    assert running.handler.admitted["/stall"] == running.handler.finished_count["/stall"] == 1
    assert running.handler.rejections == ["body_timeout"]


async def test_idle_and_half_sent_connections_close_after_the_keepalive_timeout(running: Running) -> None:
    idle_reader, idle_writer = await connect(running.port)
    idle_writer.write(post("/once", b"1"))
    await read_reply(idle_reader)
    half_reader, half_writer = await connect(running.port)
    half_writer.write(b"GET /never HTTP/1.1\r\nHost: x\r\n")  # headers never finished
    started = asyncio.get_running_loop().time()
    assert await closed_within(idle_reader, 3.0) and await closed_within(half_reader, 3.0)
    assert 0.5 <= asyncio.get_running_loop().time() - started < 2.5
    idle_writer.close()
    half_writer.close()


async def test_refused_at_admission_is_answered_in_order_and_the_connection_stays_usable(running: Running) -> None:
    reader, writer = await connect(running.port)
    writer.write(post("/slow", b"1", "X-Delay: 0.1") + post("/busy", b"dropped") + post("/next", b"3"))
    replies = [await read_reply(reader) for _ in range(3)]
    writer.close()
    assert [reply.status for reply in replies] == [200, 503, 200]
    assert replies[1].headers["retry-after"] == "1" and replies[2].json()["target"] == "/next"
    assert running.handler.finished_count["/busy"] == 0  # never admitted, so never finished


async def test_handler_error_gets_500_and_the_connection_stays_usable(running: Running) -> None:
    reader, writer = await connect(running.port)
    writer.write(post("/fail", b"") + post("/ok", b""))
    first, second = await read_reply(reader), await read_reply(reader)
    writer.close()
    assert first.status == 500 and second.status == 200
    assert running.handler.finished_count["/fail"] == 1


async def test_client_gone_mid_body_or_mid_answer_still_finishes_each_request_once(running: Running) -> None:
    reader, writer = await connect(running.port)
    writer.write(b"POST /cut HTTP/1.1\r\nHost: x\r\nContent-Length: 50\r\n\r\npart")
    await asyncio.sleep(0.05)
    writer.close()
    reader, writer = await connect(running.port)
    writer.write(post("/late", b"1", "X-Delay: 0.1") + post("/queued", b"2"))
    await asyncio.sleep(0.02)
    writer.close()
    await asyncio.sleep(0.3)
    handler = running.handler
    assert handler.admitted["/cut"] == handler.finished_count["/cut"] == 1
    assert handler.admitted["/late"] == handler.finished_count["/late"] == 1
    assert handler.admitted["/queued"] == handler.finished_count["/queued"] == 1


async def test_stop_closes_idle_connections_and_finishes_the_answer_in_progress(running: Running) -> None:
    idle_reader, idle_writer = await connect(running.port)
    busy_reader, busy_writer = await connect(running.port)
    busy_writer.write(post("/draining", b"1", "X-Delay: 0.2"))
    await asyncio.sleep(0.05)
    running.server.close()
    assert await closed_within(idle_reader, 1.0)
    reply = await read_reply(busy_reader)
    assert reply.status == 200 and reply.headers["connection"] == "close"
    idle_writer.close()
    busy_writer.close()


async def test_endless_headers_get_431_before_they_fill_memory(running: Running) -> None:
    reader, writer = await connect(running.port)
    writer.write(b"GET /h HTTP/1.1\r\nHost: x\r\nX-Big: ")
    for _ in range(40):  # one header value of 40 x 4 KiB, never finished
        writer.write(b"y" * 4096)
        await asyncio.sleep(0.005)
    reply = await read_reply(reader)
    assert reply.status == 431 and "65536 bytes" in str(reply.json()["error"])
    assert await closed_within(reader, 3.0)
    writer.close()
    assert running.handler.rejections == ["headers_too_large"]


async def test_many_pipelined_requests_in_one_read_are_not_mistaken_for_large_headers(running: Running) -> None:
    reader, writer = await connect(running.port)
    count = 15  # under MAX_PIPELINED; together they are far over the header limit, and reads end mid-headers
    stream = b"".join(post(f"/p{index}", b"x" * 90, "X-Pad: " + "z" * 6000) for index in range(count))
    for start in range(0, len(stream), 5000):
        writer.write(stream[start:start + 5000])
        await writer.drain()
        await asyncio.sleep(0.002)
    replies = [await read_reply(reader) for _ in range(count)]
    writer.close()
    assert [reply.status for reply in replies] == [200] * count


async def test_nothing_is_answered_after_connection_close_and_only_the_last_answer_says_close(running: Running) -> None:
    reader, writer = await connect(running.port)
    writer.write(post("/first", b"1", "Connection: close") + post("/never", b"2"))
    first = await read_reply(reader)
    async with asyncio.timeout(2):
        rest = await reader.read()  # up to the server's close
    writer.close()
    assert first.headers["connection"] == "close" and rest == b""
    assert running.handler.admitted["/never"] == running.handler.finished_count["/never"] <= 1
    reader, writer = await connect(running.port)
    # two requests, then a malformed one: both are answered, the 400 last, and only it closes
    writer.write(post("/a", b"1", "X-Delay: 0.05") + post("/b", b"2") + b"BROKEN\x00\r\n\r\n")
    replies = [await read_reply(reader) for _ in range(3)]
    writer.close()
    assert [reply.status for reply in replies] == [200, 200, 400]
    assert [reply.headers.get("connection") for reply in replies] == [None, None, "close"]


@pytest.fixture
def one_call_parses(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Whether each read offered to `parse_request` was parsed in one call (skipped where it is not built)."""
    parse = http_server.parse_request
    if parse is None:
        pytest.skip("the request path is interpreted: every request goes to httptools")
    outcomes: list[bool] = []

    def counting(data: bytes, max_head: int, dropped: tuple[bytes, ...]) -> object:
        parsed = parse(data, max_head, dropped)
        outcomes.append(parsed is not None)
        return parsed

    monkeypatch.setattr(http_server, "parse_request", counting)
    return outcomes


async def test_plain_requests_are_parsed_in_one_call_between_httptools_ones(
        running: Running, one_call_parses: list[bool]) -> None:
    reader, writer = await connect(running.port)
    writer.write(post("/one", b'{"a": 1}', "X-User-ID: u1"))
    first = await read_reply(reader)
    writer.write(b"POST /chunked HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n")
    second = await read_reply(reader)
    writer.write(post("/two", b"", "X-User-ID: u2"))  # the connection is back between requests
    third = await read_reply(reader)
    writer.write(b"HEAD /three HTTP/1.1\r\nHost: x\r\n\r\n")
    async with asyncio.timeout(3):
        fourth = await reader.readuntil(b"\r\n\r\n")  # a HEAD answer: no body follows
    writer.close()
    assert one_call_parses == [True, False, True, True]
    assert (first.json(), third.json()) == ({"method": "POST", "target": "/one", "body": '{"a": 1}', "user": "u1"},
                                           {"method": "POST", "target": "/two", "body": "", "user": "u2"})
    assert second.json()["body"] == "abc"
    assert fourth.startswith(b"HTTP/1.1 200 ") and b"Content-Length: 1234\r\n" in fourth
    assert running.handler.finished_count == Counter({"/one": 1, "/chunked": 1, "/two": 1, "/three": 1})


async def test_a_whole_oversized_request_in_one_read_gets_413_and_its_body_is_not_kept(
        running: Running, one_call_parses: list[bool]) -> None:
    reader, writer = await connect(running.port)
    writer.write(post("/big", b"x" * 500))
    reply = await read_reply(reader)
    assert reply.status == 413 and reply.headers["connection"] == "close"
    assert await closed_within(reader, 3.0)
    writer.close()
    assert one_call_parses == [True]
    assert running.handler.rejections == ["body_too_large"] and running.handler.admitted["/big"] == 0


async def test_a_request_refused_at_admission_in_one_read_keeps_the_connection(
        running: Running, one_call_parses: list[bool]) -> None:
    reader, writer = await connect(running.port)
    writer.write(post("/busy", b"dropped"))
    busy = await read_reply(reader)
    writer.write(post("/after", b"kept"))
    after = await read_reply(reader)
    writer.close()
    assert one_call_parses == [True, True]
    assert (busy.status, after.json()["body"]) == (503, "kept")
