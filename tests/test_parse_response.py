"""balancer._headers.parse_response: where it parses an upstream response, it answers as httptools does."""

from __future__ import annotations

import random
from typing import Any

import httptools
import pytest

from balancer import native, upstream_client
from tests.test_hop_headers import c_headers

Parsed = tuple[int, list[tuple[bytes, bytes]], bytes]

PLAIN = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json; charset=utf-8\r\nContent-Length: 13\r\n"
         b"Date: Mon, 07 Dec 2026 05:00:00 GMT\r\nServer: Python/3.11 aiohttp/3.13.2\r\n\r\n{\"score\": 1}\n")


class _Collector:
    """What httptools reports for a byte string: messages begun, headers, body, completion, keep-alive."""

    def __init__(self) -> None:
        self.begun = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.body = b""
        self.complete = 0
        self.keep_alive = False
        self.parser: httptools.HttpResponseParser | None = None

    def on_message_begin(self) -> None:
        self.begun += 1

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        self.complete += 1
        assert self.parser is not None
        self.keep_alive = self.parser.should_keep_alive()  # read here, as the client does: later it is reset


def httptools_parse(data: bytes) -> tuple[Parsed, bool] | None:
    """(status, headers, body) and whether the connection stays open, if `data` is exactly one complete response
    httptools accepts; None otherwise."""
    collector = _Collector()
    parser = collector.parser = httptools.HttpResponseParser(collector)
    try:
        parser.feed_data(data)
    except httptools.HttpParserError:
        return None
    if collector.begun != 1 or collector.complete != 1:
        return None
    return (parser.get_status_code(), collector.headers, collector.body), collector.keep_alive


# Each list: (forms the C parser takes, forms it leaves to httptools or that make the response odd)
STATUSES = ([b"200", b"201", b"404", b"500", b"599"], [b"204", b"304", b"100", b"101", b"600", b"999", b"2x0", b"20"])
REASONS = ([b" OK", b" Not Found", b" ", b" A\tB"], [b"", b" caf\xc3\xa9", b" x\x01"])
VERSIONS = ([b"HTTP/1.1"], [b"HTTP/1.0", b"HTTP/2.0", b"http/1.1", b"HTTP/1.1 "])
NAMES = ([b"Content-Type", b"content-type", b"Date", b"Server", b"X-Model", b"Set-Cookie", b"Keep-Alive",
          b"X-A!#$%&'*+-.^_`|~"], [b"Transfer-Encoding", b"Connection", b"Bad Name", b"Bad(", b"", b"X-\xff"])
SEPARATORS = ([b" ", b"", b"  ", b"\t"], [])
VALUES = ([b"application/json", b"x", b"a b", b"a\tb", b"v" * 200, b"chunked", b"close"],
          [b"", b"trail ", b"trail\t", b"\xc3\xa9", b"a\x00b", b"a\x7fb"])
LENGTH_NAMES = ([b"Content-Length", b"content-length", b"CONTENT-LENGTH"], [])
LENGTHS = ([b"{n}", b"0{n}"], [b" {n}", b"{n} ", b"+{n}", b"{n}x", b"", b"99999999999999999999"])
ENDS = ([b"\r\n"], [b"\n", b"\r", b"\n\r"])


def pick(generator: random.Random, forms: tuple[list[bytes], list[bytes]], odd: float) -> bytes:
    """A form the C parser takes, or with probability `odd` (when there are any) one it does not."""
    usual, unusual = forms
    return generator.choice(unusual if unusual and generator.random() < odd else usual)


def random_response(generator: random.Random) -> bytes:
    """A response in the plain form, or (often) with one or more of the forms httptools treats differently."""
    odd = generator.choice([0.0, 0.02, 0.1, 0.3])
    body = b"b" * generator.choice([0, 1, 13, 80, 4096])
    lines = [pick(generator, VERSIONS, odd) + b" " + pick(generator, STATUSES, odd) + pick(generator, REASONS, odd)]
    headers = [pick(generator, NAMES, odd) + b":" + pick(generator, SEPARATORS, odd) + pick(generator, VALUES, odd)
               for _ in range(generator.randint(0, 6))]
    for _ in range(2 if generator.random() < odd else 0 if generator.random() < odd else 1):
        size = len(body) + (generator.choice([-1, 1]) if generator.random() < odd else 0)
        header = pick(generator, LENGTH_NAMES, odd) + b": " + pick(generator, LENGTHS, odd).replace(b"{n}", b"%d" % size)
        headers.insert(generator.randint(0, len(headers)), header)
    if generator.random() < odd / 4:
        headers.insert(generator.randint(0, len(headers)), b" folded")
    lines += headers
    end = pick(generator, ENDS, odd)
    data = b"".join(line + end for line in lines) + end + body
    if generator.random() < odd / 2:
        data += generator.choice([b"x", b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"])
    if generator.random() < odd / 2:
        data = data[:generator.randint(0, len(data))]
    return data


def test_where_the_c_parser_answers_httptools_gives_the_same_response_on_a_kept_connection() -> None:
    parse = c_headers().parse_response
    generator = random.Random(9)
    answered = refused_by_httptools = 0
    for _ in range(20_000):
        data = random_response(generator)
        parsed = parse(data)
        reference = httptools_parse(data)
        if parsed is None:
            refused_by_httptools += reference is None
            continue
        answered += 1
        assert reference == (parsed, True), data
    # the comparison means something only if both outcomes happened many times
    assert answered > 3_000 and refused_by_httptools > 3_000


@pytest.mark.parametrize("data, expected", [
    (PLAIN, (200, [(b"Content-Type", b"application/json; charset=utf-8"), (b"Content-Length", b"13"),
                   (b"Date", b"Mon, 07 Dec 2026 05:00:00 GMT"), (b"Server", b"Python/3.11 aiohttp/3.13.2")],
             b"{\"score\": 1}\n")),
    (b"HTTP/1.1 404 \r\ncontent-length: 0\r\n\r\n", (404, [(b"content-length", b"0")], b"")),
    (b"HTTP/1.1 503 Service Unavailable\r\nRetry-After:\t1\r\nContent-Length: 2\r\n\r\n{}",
     (503, [(b"Retry-After", b"1"), (b"Content-Length", b"2")], b"{}")),
])
def test_plain_responses_are_parsed(data: bytes, expected: Parsed) -> None:
    assert c_headers().parse_response(data) == expected
    assert httptools_parse(data) == (expected, True)


@pytest.mark.parametrize("data", [
    PLAIN[:-1],  # the body's last byte is still to come
    PLAIN[:40],  # the headers too
    PLAIN + b"HTTP/1.1 200 OK\r\n",  # something after the response
    PLAIN.replace(b"HTTP/1.1", b"HTTP/1.0"),  # closes after the response
    PLAIN.replace(b"Date:", b"Connection: close\r\nDate:"),
    PLAIN.replace(b"Content-Length: 13", b"Transfer-Encoding: chunked"),
    PLAIN.replace(b"Content-Length: 13\r\n", b""),  # a body until the server closes
    PLAIN.replace(b"Date:", b"Content-Length: 13\r\nDate:"),  # twice
    b"HTTP/1.1 100 Continue\r\n\r\n",
    b"HTTP/1.1 204 No Content\r\n\r\n",
    b"HTTP/1.1 304 Not Modified\r\nContent-Length: 5\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nX-Empty:\r\nContent-Length: 0\r\n\r\n",  # httptools drops or merges an empty value
    b"HTTP/1.1 200 OK\r\nX-Trailing: a \r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nX-Folded: a\r\n b\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 200\r\nContent-Length: 0\r\n\r\n",  # no space after the status
    b"HTTP/1.1 200 OK\nContent-Length: 0\n\n",  # bare line feeds
    b"HTTP/1.1 200 OK\r\n" + b"".join(b"X-%d: v\r\n" % index for index in range(40)) + b"Content-Length: 0\r\n\r\n",
])
def test_anything_else_is_left_to_httptools(data: bytes) -> None:
    assert c_headers().parse_response(data) is None


def test_it_refuses_what_is_not_bytes() -> None:
    with pytest.raises(TypeError, match=r"parse_response\(data: bytes\)"):
        c_headers().parse_response(bytearray(PLAIN))


def test_the_compiled_client_uses_it_and_the_interpreted_one_does_not() -> None:
    implementation: Any = upstream_client._parse_response_implementation()
    if native.MODE == "compiled":
        assert implementation is c_headers().parse_response
    else:
        assert implementation is None
