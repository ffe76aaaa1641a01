"""What crosses the hop: the headers the balancer forwards upstream and returns to the client.

Hop-by-hop headers (RFC 9110 §7.6.1, plus any the `Connection` header names) stop at the
balancer in both directions; framing is redone on each side (Content-Length); the balancer adds
X-Request-ID and X-Forwarded-* upstream, X-Variant and X-Request-ID to the client. Both
directions are built once per request, as bytes.
"""

from __future__ import annotations

from balancer.http_server import HttpRequest, HttpResponse
from balancer.upstream_client import UpstreamResponse

# Hop-by-hop headers (RFC 9110 §7.6.1) and the ones the proxy sets itself.
_NOT_FORWARDED = frozenset({
    b"connection", b"keep-alive", b"proxy-connection", b"proxy-authenticate", b"proxy-authorization",
    b"te", b"trailer", b"trailers", b"transfer-encoding", b"upgrade", b"host", b"content-length",
    b"x-variant", b"x-request-id", b"x-forwarded-for",
    b"expect",  # the body is already complete: upstream it could only provoke a 100 Continue
})
_NOT_RETURNED = frozenset({
    b"connection", b"keep-alive", b"proxy-connection", b"proxy-authenticate", b"te", b"trailer", b"trailers",
    b"transfer-encoding", b"upgrade", b"content-length", b"x-variant", b"x-request-id",
})


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

    Built once per request as bytes; `serialize_request` adds the request line, Host and framing.
    """
    connection_tokens: frozenset[bytes] = frozenset()
    forwarded_for = b""
    host = b""
    lines: list[bytes] = []
    for name, value in request.headers:
        lower = name.lower()
        if lower not in _NOT_FORWARDED:
            lines.append(b"%s: %s\r\n" % (name, value))
        elif lower == b"host":
            host = value
        elif lower == b"connection":
            connection_tokens = frozenset(token.strip().lower() for token in value.split(b","))
        elif lower == b"x-forwarded-for":
            forwarded_for += value + b", "
    if connection_tokens:  # headers the client named as hop-by-hop in Connection (rare)
        lines = [line for line in lines if line.split(b":", 1)[0].lower() not in connection_tokens]
    lines.append(
        b"X-Request-ID: %s\r\nX-Forwarded-For: %s%s\r\nX-Forwarded-Host: %s\r\nX-Forwarded-Proto: http\r\n"
        % (request_id.encode(), forwarded_for, (request.remote or "unknown").encode(), host)
    )
    return b"".join(lines)


def returned_answer(response: UpstreamResponse, variant: str, request_id: str) -> HttpResponse:
    """The upstream's answer for the client: its headers minus hop-by-hop and framing ones (the server
    re-frames the body), plus X-Variant and X-Request-ID."""
    lines: list[bytes] = []
    connection_tokens: frozenset[bytes] = frozenset()
    head_length: int | None = None
    for name, value in response.headers:
        lower = name.lower()
        if lower not in _NOT_RETURNED:
            lines.append(b"%s: %s\r\n" % (name, value))
        elif lower == b"connection":
            connection_tokens = frozenset(token.strip().lower() for token in value.split(b","))
        elif lower == b"content-length" and value.isdigit():
            head_length = int(value)  # what a HEAD answer announces
    if connection_tokens:
        lines = [line for line in lines if line.split(b":", 1)[0].lower() not in connection_tokens]
    lines.append(b"X-Variant: %s\r\nX-Request-ID: %s\r\n" % (variant.encode(), request_id.encode()))
    return HttpResponse(response.status, b"".join(lines), response.body, head_length)
