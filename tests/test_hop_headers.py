"""The headers that cross the hop (balancer/hop_headers.py, balancer/_headers.c): the C and the Python `strip`
agree on any headers, and both directions give exactly what the frozenset-based code before them gave."""

from __future__ import annotations

import random
from collections.abc import Callable
from types import ModuleType
from typing import Any

import pytest

from balancer import hop_headers, hop_names, native
from balancer.http_server import HttpRequest
from balancer.upstream_client import UpstreamResponse
from tests.native_build import require_native_build

Headers = list[tuple[bytes, bytes]]

NAMES = [b"Host", b"host", b"HOST", b"Connection", b"connection", b"X-Forwarded-For", b"x-forwarded-for",
         b"Content-Length", b"content-length", b"Transfer-Encoding", b"Keep-Alive", b"TE", b"Trailer", b"Upgrade",
         b"X-Variant", b"X-Request-ID", b"Expect", b"Proxy-Authorization", b"Accept", b"Content-Type", b"X-User-ID",
         b"X-Custom", b"x-custom", b"Date", b"Server", b"Set-Cookie", b"A", b"hostx", b"hos", b"X-" + b"y" * 100]
VALUES = [b"", b"1", b"42", b"close", b"keep-alive", b"X-Custom, Upgrade", b" x-custom ,date", b"application/json",
          b"10.0.0.1", b"\xff\x00bin", b"12a", b"v" * 300]


def c_headers() -> ModuleType:
    require_native_build()
    import balancer._headers as module  # type: ignore[import-not-found]  # built by `make native`

    return module


@pytest.fixture(params=["C", "Python"])
def strip(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Callable[..., Any]:
    """Each implementation, also set as the one hop_headers uses."""
    function = c_headers().strip if request.param == "C" else hop_headers.python_strip
    monkeypatch.setattr(hop_headers, "strip", function)
    return function


def random_headers(generator: random.Random) -> Headers:
    return [(generator.choice(NAMES), generator.choice(VALUES)) for _ in range(generator.randint(0, 12))]


# The code before `strip`, kept as the reference for what crosses.
_REFERENCE_NOT_FORWARDED = frozenset(hop_names.NOT_FORWARDED)
_REFERENCE_NOT_RETURNED = frozenset(hop_names.NOT_RETURNED)


def reference_forwarded(headers: Headers, remote: str | None, request_id: str) -> bytes:
    connection_tokens: frozenset[bytes] = frozenset()
    forwarded_for = b""
    host = b""
    lines: list[bytes] = []
    for name, value in headers:
        lower = name.lower()
        if lower not in _REFERENCE_NOT_FORWARDED:
            lines.append(b"%s: %s\r\n" % (name, value))
        elif lower == b"host":
            host = value
        elif lower == b"connection":
            connection_tokens = frozenset(token.strip().lower() for token in value.split(b","))
        elif lower == b"x-forwarded-for":
            forwarded_for += value + b", "
    if connection_tokens:
        lines = [line for line in lines if line.split(b":", 1)[0].lower() not in connection_tokens]
    lines.append(b"X-Request-ID: %s\r\nX-Forwarded-For: %s%s\r\nX-Forwarded-Host: %s\r\nX-Forwarded-Proto: http\r\n"
                 % (request_id.encode(), forwarded_for, (remote or "unknown").encode(), host))
    return b"".join(lines)


def reference_returned(headers: Headers, variant: str, request_id: str) -> tuple[bytes, int | None]:
    lines: list[bytes] = []
    connection_tokens: frozenset[bytes] = frozenset()
    head_length: int | None = None
    for name, value in headers:
        lower = name.lower()
        if lower not in _REFERENCE_NOT_RETURNED:
            lines.append(b"%s: %s\r\n" % (name, value))
        elif lower == b"connection":
            connection_tokens = frozenset(token.strip().lower() for token in value.split(b","))
        elif lower == b"content-length" and value.isdigit():
            head_length = int(value)
    if connection_tokens:
        lines = [line for line in lines if line.split(b":", 1)[0].lower() not in connection_tokens]
    lines.append(b"X-Variant: %s\r\nX-Request-ID: %s\r\n" % (variant.encode(), request_id.encode()))
    return b"".join(lines), head_length


def test_the_c_and_the_python_strip_agree_on_any_headers() -> None:
    c_strip = c_headers().strip
    generator = random.Random(3)
    for _ in range(3_000):
        headers = random_headers(generator)
        for dropped in (hop_names.NOT_FORWARDED, hop_names.NOT_RETURNED):
            assert c_strip(headers, dropped) == hop_headers.python_strip(headers, dropped)


def test_both_directions_give_what_the_code_before_gave(strip: Callable[..., Any]) -> None:
    generator = random.Random(9)
    for index in range(3_000):
        headers = random_headers(generator)
        remote = generator.choice([None, "127.0.0.1", "::1"])
        request = HttpRequest("POST", "/predict", headers, {}, remote, "1.1")
        request_id = f"id-{index}"
        assert hop_headers.forwarded_headers(request, request_id) == reference_forwarded(headers, remote, request_id)
        answer = hop_headers.returned_answer(UpstreamResponse(200, headers, b"{}"), "model_b", request_id)
        assert (answer.header_lines, answer.head_length) == reference_returned(headers, "model_b", request_id)
        assert (answer.status, answer.body) == (200, b"{}")


def test_a_header_the_connection_header_names_stops_at_the_hop(strip: Callable[..., Any]) -> None:
    headers = [(b"Host", b"api"), (b"Connection", b"keep-alive, X-Secret"), (b"x-secret", b"1"), (b"Accept", b"*/*"),
               (b"Content-Length", b"2")]
    request = HttpRequest("POST", "/", headers, {}, "10.1.2.3", "1.1")
    assert hop_headers.forwarded_headers(request, "r1") == (
        b"Accept: */*\r\nX-Request-ID: r1\r\nX-Forwarded-For: 10.1.2.3\r\nX-Forwarded-Host: api\r\n"
        b"X-Forwarded-Proto: http\r\n")
    answer = hop_headers.returned_answer(UpstreamResponse(200, headers, b"ok"), "model_a", "r1")
    assert answer.header_lines == b"Host: api\r\nAccept: */*\r\nX-Variant: model_a\r\nX-Request-ID: r1\r\n"
    assert answer.head_length == 2


@pytest.mark.parametrize("arguments, message", [
    (((b"a", b"b"), ()), "strip\\(headers: list, dropped: tuple\\)"),
    (([(b"a", b"b")], [b"a"]), "strip\\(headers: list, dropped: tuple\\)"),
    (([(b"a", "text")], ()), "headers\\[0\\] is not a \\(name, value\\) pair of bytes"),
    (([(b"a", b"b"), (b"a",)], ()), "headers\\[1\\] is not a \\(name, value\\) pair of bytes"),
    (([(b"a", b"b")], ("a",)), "dropped\\[0\\] is not bytes"),
])
def test_the_c_strip_refuses_what_is_not_headers(arguments: tuple[Any, Any], message: str) -> None:
    with pytest.raises(TypeError, match=message):
        c_headers().strip(*arguments)


def test_the_compiled_modules_use_the_c_strip() -> None:
    expected = "strip" if native.MODE == "compiled" else "python_strip"
    assert hop_headers._strip_implementation().__name__ == expected


def test_a_message_parsed_in_one_call_crosses_without_its_pairs_being_built() -> None:
    # The parsers split the headers as they parse (`stripped`); the pairs are built from `raw` only if asked for.
    # Here `raw` is no message, so building them would fail: forwarding and answering must not need them.
    headers = [(b"Host", b"api"), (b"X-User-ID", b"u1"), (b"Content-Length", b"2")]
    request = HttpRequest("POST", "/", None, {}, "10.1.2.3", None, b"", hop_headers.python_strip(headers, hop_names.NOT_FORWARDED))
    assert hop_headers.forwarded_headers(request, "r1") == reference_forwarded(headers, "10.1.2.3", "r1")
    response = UpstreamResponse(200, None, b"ok", b"", hop_headers.python_strip(headers, hop_names.NOT_RETURNED))
    answer = hop_headers.returned_answer(response, "model_a", "r1")
    assert (answer.header_lines, answer.head_length) == reference_returned(headers, "model_a", "r1")
    if native.MODE == "compiled":  # asked for, they are built from the bytes (nothing to build them from here)
        with pytest.raises(ValueError, match="not a message parse_request or parse_response took"):
            request.headers
        raw = b"HTTP/1.1 200 OK\r\nX-A: 1\r\nContent-Length: 2\r\n\r\nok"
        assert UpstreamResponse(200, None, b"ok", raw, (b"", [])).headers == [(b"X-A", b"1"), (b"Content-Length", b"2")]
