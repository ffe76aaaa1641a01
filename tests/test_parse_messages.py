"""balancer._headers.parse_request and parse_response: where they parse a message, they answer as httptools does.

They give the headers in the hop's form (the lines that cross and the ones held back, as `strip` gives them for
the pairs httptools reports; for a request also the lower-case lookup the server builds), and `header_pairs` the
pairs themselves: each is checked against what httptools' pairs give.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import httptools
import pytest

from balancer import http_server, native, upstream_client
from balancer.hop_headers import python_strip
from balancer.hop_names import NOT_FORWARDED, NOT_RETURNED
from tests.test_hop_headers import c_headers

Parsed = tuple[int, list[tuple[bytes, bytes]], bytes]
Pairs = list[tuple[bytes, bytes]]

PLAIN = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json; charset=utf-8\r\nContent-Length: 13\r\n"
         b"Date: Mon, 07 Dec 2026 05:00:00 GMT\r\nServer: Python/3.11 aiohttp/3.13.2\r\n\r\n{\"score\": 1}\n")


class _Collector:
    """What httptools reports for a byte string: messages begun, URL, headers, body, completion, keep-alive."""

    def __init__(self) -> None:
        self.begun = 0
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.body = b""
        self.complete = 0
        self.keep_alive = False
        self.parser: Any = None

    def on_message_begin(self) -> None:
        self.begun += 1

    def on_url(self, url: bytes) -> None:
        self.url += url

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


Forms = tuple[list[bytes], list[bytes]]

# Each list: (forms the C parser takes, forms it leaves to httptools or that make the response odd)
STATUSES = ([b"200", b"201", b"404", b"500", b"599"], [b"204", b"304", b"100", b"101", b"600", b"999", b"2x0", b"20"])
REASONS = ([b" OK", b" Not Found", b" ", b" A\tB"], [b"", b" caf\xc3\xa9", b" x\x01"])
VERSIONS = ([b"HTTP/1.1"], [b"HTTP/1.0", b"HTTP/2.0", b"http/1.1", b"HTTP/1.1 "])
NAMES = ([b"Content-Type", b"content-type", b"Date", b"Server", b"X-Model", b"Set-Cookie", b"Keep-Alive",
          b"X-A!#$%&'*+-.^_`|~"], [b"Transfer-Encoding", b"Connection", b"Bad Name", b"Bad(", b"", b"X-\xff"])
SEPARATORS: Forms = ([b" ", b"", b"  ", b"\t"], [])
VALUES = ([b"application/json", b"x", b"a b", b"a\tb", b"v" * 200, b"chunked", b"close"],
          [b"", b"trail ", b"trail\t", b"\xc3\xa9", b"a\x00b", b"a\x7fb"])
LENGTH_NAMES: Forms = ([b"Content-Length", b"content-length", b"CONTENT-LENGTH"], [])
LENGTHS = ([b"{n}", b"0{n}"], [b" {n}", b"{n} ", b"+{n}", b"{n}x", b"", b"99999999999999999999"])
ENDS = ([b"\r\n"], [b"\n", b"\r", b"\n\r"])


def pick(generator: random.Random, forms: Forms, odd: float) -> bytes:
    """A form the C parser takes, or with probability `odd` (when there are any) one it does not."""
    usual, unusual = forms
    return generator.choice(unusual if unusual and generator.random() < odd else usual)


def random_response(generator: random.Random) -> bytes:
    """A response in the plain form, or (often) with one or more of the forms httptools treats differently."""
    odd = generator.choice([0.0, 0.02, 0.1, 0.3])
    body = b"b" * generator.choice([0, 1, 13, 80, 4096])
    status_line = pick(generator, VERSIONS, odd) + b" " + pick(generator, STATUSES, odd) + pick(generator, REASONS, odd)
    headers = [pick(generator, NAMES, odd) + b":" + pick(generator, SEPARATORS, odd) + pick(generator, VALUES, odd)
               for _ in range(generator.randint(0, 6))]
    lengths = 2 if generator.random() < odd else 0 if generator.random() < odd else 1
    return assemble(generator, status_line, headers, lengths, body, odd, [b"x", b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"])


def assemble(generator: random.Random, first_line: bytes, headers: list[bytes], lengths: int, body: bytes,
             odd: float, followers: list[bytes]) -> bytes:
    """A message: `first_line`, `headers` with `lengths` Content-Length headers among them, `body`; with
    probabilities that grow with `odd`, a folded line, other line ends, one of `followers` after it, or cut short."""
    headers = list(headers)
    for _ in range(lengths):
        size = len(body) + (generator.choice([-1, 1]) if generator.random() < odd else 0)
        header = pick(generator, LENGTH_NAMES, odd) + b": " + pick(generator, LENGTHS, odd).replace(b"{n}", b"%d" % size)
        headers.insert(generator.randint(0, len(headers)), header)
    if generator.random() < odd / 4:
        headers.insert(generator.randint(0, len(headers)), b" folded")
    end = pick(generator, ENDS, odd)
    data = b"".join(line + end for line in [first_line, *headers]) + end + body
    if generator.random() < odd / 2:
        data += generator.choice(followers)
    if generator.random() < odd / 2:
        data = data[:generator.randint(0, len(data))]
    return data


def agreement(generate: Callable[[random.Random], bytes], parse: Callable[[bytes], object],
              reference: Callable[[bytes], object], messages: int, seed: int) -> tuple[int, int]:
    """Check `parse` against `reference` on `messages` generated ones: wherever `parse` answers, it answers as
    `reference` does. (How many it answered, how many both refused.)"""
    generator = random.Random(seed)
    answered = refused = 0
    for _ in range(messages):
        data = generate(generator)
        parsed = parse(data)
        expected = reference(data)
        if parsed is None:
            refused += expected is None
            continue
        answered += 1
        assert expected == parsed, data
    return answered, refused


def response_form(status: int, headers: Pairs, body: bytes) -> tuple[object, ...]:
    """What `c_response` gives for a response httptools reports as `status`, `headers`, `body`."""
    return (status, *python_strip(headers, NOT_RETURNED), body, headers)


def c_response(data: bytes) -> tuple[object, ...] | None:
    """parse_response's answer for `data`, and header_pairs' where it answered."""
    parsed = c_headers().parse_response(data, NOT_RETURNED)
    return None if parsed is None else (*parsed, c_headers().header_pairs(data))


def response_reference(data: bytes) -> object:
    """What `c_response` must give for `data`, from httptools: the response, None, or (for a response after
    which the connection closes) something parse_response never gives."""
    parsed = httptools_parse(data)
    return None if parsed is None else response_form(*parsed[0]) if parsed[1] else ("closes", parsed[0])


def test_where_parse_response_answers_httptools_gives_the_same_response_on_a_kept_connection() -> None:
    answered, refused = agreement(random_response, c_response, response_reference, 20_000, seed=9)
    # the comparison means something only if both outcomes happened many times
    assert answered > 3_000 and refused > 3_000


@pytest.mark.parametrize("data, expected", [
    (PLAIN, (200, [(b"Content-Type", b"application/json; charset=utf-8"), (b"Content-Length", b"13"),
                   (b"Date", b"Mon, 07 Dec 2026 05:00:00 GMT"), (b"Server", b"Python/3.11 aiohttp/3.13.2")],
             b"{\"score\": 1}\n")),
    (b"HTTP/1.1 404 \r\ncontent-length: 0\r\n\r\n", (404, [(b"content-length", b"0")], b"")),
    (b"HTTP/1.1 503 Service Unavailable\r\nRetry-After:\t1\r\nContent-Length: 2\r\n\r\n{}",
     (503, [(b"Retry-After", b"1"), (b"Content-Length", b"2")], b"{}")),
])
def test_plain_responses_are_parsed(data: bytes, expected: Parsed) -> None:
    assert c_response(data) == response_form(*expected)
    assert httptools_parse(data) == (expected, True)


def test_a_response_s_headers_are_split_for_the_hop() -> None:
    data = (b"HTTP/1.1 200 OK\r\nX-Model: b\r\nKeep-Alive: timeout=5\r\ncontent-length: 2\r\nX-Variant: spoofed\r\n"
            b"Date: today\r\n\r\n{}")
    assert c_headers().parse_response(data, NOT_RETURNED) == (
        200, b"X-Model: b\r\nDate: today\r\n", [(2, b"timeout=5"), (1, b"2"), (10, b"spoofed")], b"{}")


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
    assert c_headers().parse_response(data, NOT_RETURNED) is None


@pytest.mark.parametrize("call, message", [
    (lambda c: c.parse_response(bytearray(PLAIN), NOT_RETURNED), r"parse_response\(data: bytes, dropped: tuple\)"),
    (lambda c: c.parse_response(PLAIN), r"parse_response\(data: bytes, dropped: tuple\)"),
    (lambda c: c.parse_response(PLAIN, list(NOT_RETURNED)), r"parse_response\(data: bytes, dropped: tuple\)"),
    (lambda c: c.parse_response(PLAIN, ("x",)), r"dropped\[0\] is not bytes"),
    (lambda c: c.parse_request(bytearray(PLAIN_REQUEST), 100, NOT_FORWARDED),
     r"parse_request\(data: bytes, max_head: int, dropped: tuple\)"),
    (lambda c: c.parse_request(PLAIN_REQUEST, 100), r"parse_request\(data: bytes, max_head: int, dropped: tuple\)"),
    (lambda c: c.parse_request(PLAIN_REQUEST, 100, (b"a",) * 65), r"at most 64 dropped names, got 65"),
    (lambda c: c.header_pairs(bytearray(PLAIN)), r"header_pairs\(data: bytes\)"),
    (lambda c: c.header_pairs(b"HTTP/1.1 200 OK\r\nBad Name: x\r\n\r\n"), r"not a message parse_request or"),
])
def test_they_refuse_what_they_cannot_take(call: Callable[[Any], object], message: str) -> None:
    with pytest.raises((TypeError, ValueError), match=message):
        call(c_headers())


def test_the_compiled_request_path_uses_them_and_the_interpreted_one_does_not() -> None:
    compiled = native.MODE == "compiled"
    for module, name in ((upstream_client, "parse_response"), (http_server, "parse_request")):
        assert getattr(module, name) is (getattr(c_headers(), name) if compiled else None)
        assert native.c_function("_headers", name) is getattr(module, name)


# --- requests ---------------------------------------------------------------------------------------------------

PLAIN_REQUEST = (b"POST /predict?explain=1 HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nContent-Type: application/json\r\n"
                 b"X-User-ID: user-7\r\nContent-Length: 15\r\n\r\n{\"features\": 1}")


def httptools_parse_request(data: bytes) -> tuple[bytes, bytes, list[tuple[bytes, bytes]], bytes] | None:
    """(method, target, headers, body) if `data` is exactly one complete HTTP/1.1 request httptools accepts and
    the connection stays open after it; None otherwise."""
    collector = _Collector()
    parser = collector.parser = httptools.HttpRequestParser(collector)
    try:
        parser.feed_data(data)
    except (httptools.HttpParserError, httptools.HttpParserUpgrade):
        return None
    if collector.begun != 1 or collector.complete != 1 or not collector.keep_alive:
        return None
    if parser.get_http_version() != "1.1":
        return None
    return parser.get_method(), collector.url, collector.headers, collector.body


METHODS = ([b"GET", b"POST", b"PUT", b"PATCH", b"DELETE", b"HEAD", b"OPTIONS"],
           [b"get", b"CONNECT", b"TRACE", b"PROPFIND", b"POST\t", b"POS"])
TARGETS = ([b"/", b"/predict", b"/predict?x=1&y=%20z", b"/a/b;c=d", b"/~user/[x]", b"/!$&'()*+,;=:@", b"/feedback"],
           [b"*", b"http://h/x", b"/a b", b"/a#frag", b"/\x7f", b"/\xc3\xa9", b"", b"/a\"b", b"/<x>", b"/a{b}",
            b"/a|b", b"/a\\b", b"/a^b", b"/a`b", b"x/"])
REQUEST_VERSIONS = ([b"HTTP/1.1"], [b"HTTP/1.0", b"HTTP/2.0", b"HTTP/1.1 ", b"http/1.1"])
REQUEST_NAMES = ([b"Host", b"Content-Type", b"X-User-ID", b"x-variant", b"Accept", b"Cookie", b"Keep-Alive", b"TE"],
                 [b"Expect", b"Upgrade", b"Connection", b"Proxy-Connection", b"Transfer-Encoding", b"Bad Name", b""])
REQUEST_VALUES = ([b"127.0.0.1:8080", b"application/json", b"user-7", b"a=1; b=2", b"x\ty", b"100-continue",
                   b"chunked", b"close", b"websocket"], [b"", b"trail ", b"\xc3\xa9", b"a\x00b"])


def random_request(generator: random.Random) -> bytes:
    """A request in the plain form, or (often) with one or more of the forms httptools treats differently."""
    odd = generator.choice([0.0, 0.02, 0.1, 0.3])
    body = b"b" * generator.choice([0, 0, 1, 15, 4096])
    request_line = (pick(generator, METHODS, odd) + b" " + pick(generator, TARGETS, odd) + b" "
                    + pick(generator, REQUEST_VERSIONS, odd))
    headers = [pick(generator, REQUEST_NAMES, odd) + b":" + pick(generator, SEPARATORS, odd)
               + pick(generator, REQUEST_VALUES, odd) for _ in range(generator.randint(0, 6))]
    lengths = 2 if generator.random() < odd else 1 if body or generator.random() < 0.5 else 0
    return assemble(generator, request_line, headers, lengths, body, odd, [b"x", b"GET / HTTP/1.1\r\n\r\n", b"\r\n"])


def request_form(method: bytes, target: bytes, headers: Pairs, body: bytes) -> tuple[object, ...]:
    """What `c_request` gives for a request httptools reports as `method`, `target`, `headers`, `body`."""
    header_map = {name.lower(): value for name, value in reversed(headers)}  # the first of a name wins
    return (method.decode(), target.decode("latin-1"), header_map, *python_strip(headers, NOT_FORWARDED), body, headers)


def c_request(data: bytes, max_head: int = 65536) -> tuple[object, ...] | None:
    """parse_request's answer for `data`, and header_pairs' where it answered."""
    parsed = c_headers().parse_request(data, max_head, NOT_FORWARDED)
    return None if parsed is None else (*parsed, c_headers().header_pairs(data))


def request_reference(data: bytes) -> object:
    """What `c_request` must give for `data`, from httptools."""
    parsed = httptools_parse_request(data)
    return None if parsed is None else request_form(*parsed)


def test_where_parse_request_answers_httptools_gives_the_same_request_on_a_kept_connection() -> None:
    answered, refused = agreement(random_request, c_request, request_reference, 30_000, seed=11)
    # the comparison means something only if both outcomes happened many times
    assert answered > 5_000 and refused > 5_000


@pytest.mark.parametrize("data, expected", [
    (PLAIN_REQUEST, (b"POST", b"/predict?explain=1", [(b"Host", b"127.0.0.1:8080"), (b"Content-Type", b"application/json"),
                     (b"X-User-ID", b"user-7"), (b"Content-Length", b"15")], b"{\"features\": 1}")),
    (b"GET /healthz HTTP/1.1\r\n\r\n", (b"GET", b"/healthz", [], b"")),
    (b"DELETE /x HTTP/1.1\r\ncontent-length: 0\r\nAccept:\t*/*\r\n\r\n",
     (b"DELETE", b"/x", [(b"content-length", b"0"), (b"Accept", b"*/*")], b"")),
])
def test_plain_requests_are_parsed(data: bytes, expected: tuple[bytes, bytes, list[tuple[bytes, bytes]], bytes]) -> None:
    assert c_request(data) == request_form(*expected)
    assert httptools_parse_request(data) == expected


def test_a_request_s_headers_are_split_for_the_hop_and_looked_up_by_lower_case_name() -> None:
    data = (b"GET /x HTTP/1.1\r\nHost: h:1\r\nX-User-ID: u1\r\nx-user-id: u2\r\nX-Forwarded-For: 10.0.0.1\r\n"
            b"Accept: */*\r\nX-Forwarded-For: 10.0.0.2\r\n\r\n")
    method, target, header_map, lines, held, body = c_headers().parse_request(data, 65536, NOT_FORWARDED)
    assert (method, target, body) == ("GET", "/x", b"")
    assert header_map == {b"host": b"h:1", b"x-user-id": b"u1", b"x-forwarded-for": b"10.0.0.1", b"accept": b"*/*"}
    assert lines == b"X-User-ID: u1\r\nx-user-id: u2\r\nAccept: */*\r\n"
    assert held == [(0, b"h:1"), (2, b"10.0.0.1"), (2, b"10.0.0.2")]
    # one str per method, made when the module loads
    assert method is c_headers().parse_request(b"GET / HTTP/1.1\r\n\r\n", 100, ())[0]


@pytest.mark.parametrize("data", [
    PLAIN_REQUEST[:-1],  # the body's last byte is still to come
    PLAIN_REQUEST[:30],  # the headers too
    PLAIN_REQUEST + b"GET / HTTP/1.1\r\n\r\n",  # pipelined
    PLAIN_REQUEST.replace(b"HTTP/1.1", b"HTTP/1.0"),
    PLAIN_REQUEST.replace(b"Host:", b"Connection: keep-alive\r\nHost:"),
    PLAIN_REQUEST.replace(b"Host:", b"Expect: 100-continue\r\nHost:"),
    PLAIN_REQUEST.replace(b"Host:", b"Upgrade: websocket\r\nHost:"),
    PLAIN_REQUEST.replace(b"Content-Length: 15", b"Transfer-Encoding: chunked"),
    PLAIN_REQUEST.replace(b"Host:", b"Content-Length: 15\r\nHost:"),  # twice
    PLAIN_REQUEST.replace(b"/predict?explain=1", b"http://127.0.0.1/predict"),  # absolute form
    PLAIN_REQUEST.replace(b"/predict?explain=1", b"/predict#part"),
    b"GET / HTTP/1.1\r\nX-Empty:\r\n\r\n",
    b"GET / HTTP/1.1\nHost: x\n\n",
    b"CONNECT host:443 HTTP/1.1\r\n\r\n",
    b"GET / HTTP/1.1\r\n" + b"".join(b"X-%d: v\r\n" % index for index in range(40)) + b"\r\n",
])
def test_any_other_request_is_left_to_httptools(data: bytes) -> None:
    assert c_headers().parse_request(data, 65536, NOT_FORWARDED) is None


def test_a_request_head_over_max_head_is_left_to_httptools() -> None:
    head_length = PLAIN_REQUEST.index(b"\r\n\r\n") + 4
    assert c_request(PLAIN_REQUEST, head_length) is not None
    assert c_request(PLAIN_REQUEST, head_length - 1) is None


def mutated(generator: random.Random, message: bytes) -> bytes:
    """`message` with a few random bytes changed, inserted or removed, or cut short."""
    data = bytearray(message)
    for _ in range(generator.randint(1, 3)):
        at = generator.randrange(len(data) + 1)
        kind = generator.random()
        byte = generator.choice([0, 9, 10, 13, 32, 34, 35, 58, 127, 128, 255, generator.randrange(256)])
        if kind < 0.4 and at < len(data):
            data[at] = byte
        elif kind < 0.8:
            data.insert(at, byte)
        elif at < len(data):
            del data[at]
    if generator.random() < 0.1:
        del data[generator.randrange(len(data) + 1):]
    return bytes(data)


@pytest.mark.parametrize("message", [PLAIN, PLAIN_REQUEST], ids=["response", "request"])
def test_damaged_messages_are_parsed_as_httptools_parses_them_or_left_to_it(message: bytes) -> None:
    parse, reference = ((c_response, response_reference) if message is PLAIN else (c_request, request_reference))
    answered, refused = agreement(lambda generator: mutated(generator, message), parse, reference, 10_000, seed=5)
    assert answered > 300 and refused > 3_000
