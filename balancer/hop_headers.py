"""What crosses the hop: the headers the balancer forwards upstream and returns to the client.

Hop-by-hop headers (RFC 9110 §7.6.1, plus any the `Connection` header names) stop at the
balancer in both directions; framing is redone on each side (Content-Length); the balancer adds
X-Request-ID and X-Forwarded-* upstream, X-Variant and X-Request-ID to the client. Both
directions are built once per request, as bytes. The names that stop are in `balancer.hop_names`; where a
message was parsed in one C call, the parser already split its headers by them (`stripped`).
"""

from __future__ import annotations

from collections.abc import Callable

from balancer import native
from balancer.hop_names import (
    CONNECTION,
    CONTENT_LENGTH,
    FORWARDED_FOR,
    HOST,
    NOT_FORWARDED,
    NOT_RETURNED,
    RETURNED_CONNECTION,
    Held,
    Stripped,
)
from balancer.http_server import HttpRequest, HttpResponse
from balancer.upstream_client import UpstreamResponse

Strip = Callable[[list[tuple[bytes, bytes]], tuple[bytes, ...]], Stripped]

_NOT_FORWARDED_SET = frozenset(NOT_FORWARDED)
_NOT_RETURNED_SET = frozenset(NOT_RETURNED)
_POSITIONS: dict[tuple[bytes, ...], dict[bytes, int]] = {
    names: {name: position for position, name in enumerate(names)} for names in (NOT_FORWARDED, NOT_RETURNED)
}


def python_strip(headers: list[tuple[bytes, bytes]], dropped: tuple[bytes, ...]) -> Stripped:
    """`balancer._headers.strip` in Python (for `NOT_FORWARDED` and `NOT_RETURNED`): the headers not in `dropped`
    as joined lines, and (position in `dropped`, value) for the others."""
    positions = _POSITIONS[dropped]
    lines: list[bytes] = []
    held: Held = []
    for name, value in headers:
        position = positions.get(name.lower())
        if position is None:
            lines.append(b"%s: %s\r\n" % (name, value))
        else:
            held.append((position, value))
    return b"".join(lines), held


def _strip_implementation() -> Strip:
    """`balancer._headers.strip` where this process runs the compiled modules (see balancer/native.py), else
    `python_strip`."""
    strip: Strip | None = native.c_function("_headers", "strip")
    return strip or python_strip


strip = _strip_implementation()


def _without_listed(headers: list[tuple[bytes, bytes]], lines: bytes, connection: bytes,
                    dropped: frozenset[bytes]) -> bytes:
    """`lines`, or, where the Connection header names headers beyond `dropped` (rare, and a list of any size, so
    through a set rather than `strip`'s scan), the lines of `headers` without those either."""
    listed = frozenset(token.strip().lower() for token in connection.split(b","))
    if listed <= dropped:
        return lines
    names = dropped | listed
    return b"".join([b"%s: %s\r\n" % (name, value) for name, value in headers if name.lower() not in names])


def cookie_value(header: str | None, name: str) -> str | None:
    """The value of cookie `name` in a Cookie header (`a=1; b=2`), quotes removed; None if absent."""
    if not header:
        return None
    for pair in header.split(";"):
        key, sep, value = pair.partition("=")
        if sep and key.strip() == name:
            value = value.strip()
            if len(value) >= 2 and value[0] == value[-1] == '"':
                value = value[1:-1]
            return value
    return None


def forwarded_headers(request: HttpRequest, request_id: str) -> bytes:
    """The header lines sent upstream: the client's minus hop-by-hop ones, plus X-Request-ID and X-Forwarded-*.

    Built once per request as bytes; `serialize_request` adds the request line, Host and framing. A request the
    server parsed in one C call comes with its headers already split (`request.stripped`).
    """
    stripped = request.stripped
    lines, held = stripped if stripped is not None else strip(request.headers, NOT_FORWARDED)
    forwarded_for = b""
    host = b""
    connection: bytes | None = None
    for position, value in held:
        if position == HOST:
            host = value
        elif position == CONNECTION:
            connection = value
        elif position == FORWARDED_FOR:
            forwarded_for += value + b", "
    if connection is not None:  # never for a request parsed in one call: its pairs are built only here
        lines = _without_listed(request.headers, lines, connection, _NOT_FORWARDED_SET)
    return b"%sX-Request-ID: %s\r\nX-Forwarded-For: %s%s\r\nX-Forwarded-Host: %s\r\nX-Forwarded-Proto: http\r\n" % (
        lines, request_id.encode(), forwarded_for, (request.remote or "unknown").encode(), host)


def returned_answer(response: UpstreamResponse, variant: str, request_id: str) -> HttpResponse:
    """The upstream's answer for the client: its headers minus hop-by-hop and framing ones (the server
    re-frames the body), plus X-Variant and X-Request-ID."""
    stripped = response.stripped
    lines, held = stripped if stripped is not None else strip(response.headers, NOT_RETURNED)
    connection: bytes | None = None
    head_length: int | None = None
    for position, value in held:
        if position == RETURNED_CONNECTION:
            connection = value
        elif position == CONTENT_LENGTH and value.isdigit():
            head_length = int(value)  # what a HEAD answer announces
    if connection is not None:  # never for a response parsed in one call: its pairs are built only here
        lines = _without_listed(response.headers, lines, connection, _NOT_RETURNED_SET)
    return HttpResponse(response.status, b"%sX-Variant: %s\r\nX-Request-ID: %s\r\n"
                        % (lines, variant.encode(), request_id.encode()), response.body, head_length)
