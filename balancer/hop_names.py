"""The header names that stop at the hop (balancer/hop_headers.py says why), in the form `balancer._headers` takes,
and what a request or response parsed with them carries.

Here, not in hop_headers, because the server and the upstream client need them too: where they parse a message in
one C call, the same pass splits its headers into the lines that cross and the ones held back.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

from balancer import native

# Hop-by-hop headers (RFC 9110 §7.6.1) and the ones the proxy sets itself. The first names of each are the ones
# the proxy reads from what it holds back.
NOT_FORWARDED: Final[tuple[bytes, ...]] = (
    b"host", b"connection", b"x-forwarded-for",
    b"keep-alive", b"proxy-connection", b"proxy-authenticate", b"proxy-authorization",
    b"te", b"trailer", b"trailers", b"transfer-encoding", b"upgrade", b"content-length",
    b"x-variant", b"x-request-id",
    b"expect",  # the body is already complete: upstream it could only provoke a 100 Continue
)
HOST: Final = 0
CONNECTION: Final = 1
FORWARDED_FOR: Final = 2
NOT_RETURNED: Final[tuple[bytes, ...]] = (
    b"connection", b"content-length",
    b"keep-alive", b"proxy-connection", b"proxy-authenticate", b"te", b"trailer", b"trailers",
    b"transfer-encoding", b"upgrade", b"x-variant", b"x-request-id",
)
RETURNED_CONNECTION: Final = 0
CONTENT_LENGTH: Final = 1

Held = list[tuple[int, bytes]]
Stripped = tuple[bytes, Held]
"""`balancer._headers.strip`'s result: the lines that cross, joined, and (position in the names, value) of the others."""

# (name, value) pairs of a message `_headers.parse_request` or `parse_response` took; None where they are not built.
_header_pairs: Callable[[bytes], list[tuple[bytes, bytes]]] | None = native.c_function("_headers", "header_pairs")


class ParsedHeaders:
    """A message's headers: the (name, value) pairs as sent, and where a C parser made it, their split for the hop.

    A message parsed in one C call comes with `stripped` and without the pairs, which `headers` then builds from
    the message's bytes (`raw`) if ever asked for: only the rare caller that needs them pays for them.
    """

    __slots__ = ("pairs", "raw", "stripped")

    def __init__(self, pairs: list[tuple[bytes, bytes]] | None, raw: bytes, stripped: Stripped | None) -> None:
        self.pairs = pairs
        self.raw = raw  # the bytes the message was parsed from in one call; else empty
        self.stripped = stripped  # `hop_headers.strip(headers, NOT_FORWARDED or NOT_RETURNED)`, made by the parser

    @property
    def headers(self) -> list[tuple[bytes, bytes]]:
        """The (name, value) pairs as sent."""
        pairs = self.pairs
        if pairs is None:
            assert _header_pairs is not None  # only messages the C parsers took come without them
            pairs = self.pairs = _header_pairs(self.raw)
        return pairs
