"""The public port: every request is assigned a variant, proxied, answered and logged; plus /feedback.

Flow of one request: read the active config snapshot → request id → body (size
limited) → unit key → variant (override header, status, strategy) → an endpoint of
that variant (round-robin; retry on connect failure to another replica of the *same*
variant; fallback to the control only if configured) → the answer, with `X-Variant`
and `X-Request-ID` → one outcome record, queued for the batched writer.
"""

from __future__ import annotations

import asyncio
import ipaddress
import itertools
import json
import logging
import math
import os
import re
import time
from typing import Any

from aiohttp import web
from multidict import CIMultiDict

from balancer.events import EventLog
from balancer.metrics import BalancerMetrics
from balancer.runtime import ActiveConfig, Runtime
from balancer.upstream_client import (
    UpstreamError,
    UpstreamResponse,
    UpstreamTimeoutError,
    serialize_request,
)
from balancer.upstreams import Endpoint, UpstreamRegistry

logger = logging.getLogger(__name__)

REQUEST_ID_PATTERN = re.compile(r"^[A-Za-z0-9._:\-]{1,128}\Z")  # \Z: `$` would let a trailing newline in
OVERRIDE_HEADER = "X-Variant"
# Hop-by-hop headers (RFC 9110 §7.6.1) and the ones the proxy sets itself.
_NOT_FORWARDED = frozenset({
    b"connection", b"keep-alive", b"proxy-connection", b"proxy-authenticate", b"proxy-authorization",
    b"te", b"trailer", b"trailers", b"transfer-encoding", b"upgrade", b"host", b"content-length",
    b"x-variant", b"x-request-id", b"x-forwarded-for",
    b"expect",  # the body is already complete: upstream it could only provoke a 100 Continue
})
_NOT_RETURNED = frozenset({
    "connection", "keep-alive", "proxy-connection", "proxy-authenticate", "te", "trailer", "trailers",
    "transfer-encoding", "upgrade", "content-length", "x-variant", "x-request-id",
})


def json_error(status: int, message: str, **extra: Any) -> web.Response:
    """The one way the balancer reports an error to a client: JSON naming what is wrong."""
    return web.json_response({"error": message, **extra}, status=status)


class ClientInputError(Exception):
    """The client's request is malformed; carries the HTTP status to answer with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class Proxy:
    """The public-port handler."""

    def __init__(self, runtime: Runtime, registry: UpstreamRegistry, events: EventLog, metrics: BalancerMetrics) -> None:
        self.runtime = runtime
        self.registry = registry
        self.events = events
        self.metrics = metrics
        assert runtime.active is not None
        server = runtime.active.experiment.server
        self.max_in_flight = server.max_in_flight
        self.max_body_bytes = server.max_body_bytes
        self.client_body_timeout_s = server.client_body_timeout_s
        self.allow_override = server.allow_override_header
        self.trusted_override_sources = tuple(ipaddress.ip_network(s, strict=False) for s in server.trusted_override_sources)
        self.log_request_data = server.log_request_data
        self.record_outcomes = server.record_outcomes
        self.export_metrics = server.export_metrics
        self.in_flight = 0
        metrics.in_flight.set_function(lambda: float(self.in_flight))
        self._idle = asyncio.Event()
        self._idle.set()
        self._id_prefix = os.urandom(5).hex()
        self._id_counter = itertools.count(1)
        self._id_entropy = ""
        self._id_entropy_at = 0

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        """Entry point for every request on the public port."""
        if request.path == "/feedback" and request.method == "POST":
            return await self.feedback(request)
        if self.in_flight >= self.max_in_flight:
            self.metrics.rejected.labels("overload").inc()
            return web.json_response(
                {"error": f"overloaded: {self.in_flight} requests in flight (max_in_flight)"},
                status=503, headers={"Retry-After": "1"},
            )
        self.in_flight += 1
        self._idle.clear()
        try:
            return await self._proxy(request)
        finally:
            self.in_flight -= 1
            if self.in_flight == 0:
                self._idle.set()

    def _new_request_id(self) -> str:
        """Process prefix + counter (ids sort by arrival, so the store appends) + 48 random bits.

        The random part makes ids unguessable, so nobody can post feedback for someone else's
        request; it is drawn from the OS 4,096 ids at a time to keep the syscall off the hot path.
        """
        at = self._id_entropy_at
        if at >= len(self._id_entropy):
            self._id_entropy = os.urandom(6 * 4096).hex()
            at = 0
        self._id_entropy_at = at + 12
        return f"{self._id_prefix}{next(self._id_counter):010x}{self._id_entropy[at:at + 12]}"

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until no request is in flight (graceful stop); False if the timeout passed first."""
        try:
            async with asyncio.timeout(timeout):
                await self._idle.wait()
        except TimeoutError:
            return False
        return True

    async def _proxy(self, request: web.BaseRequest) -> web.StreamResponse:
        started = time.perf_counter()
        arrived = time.time()
        active = self.runtime.active
        assert active is not None
        experiment = active.experiment
        request_id = request.headers.get("X-Request-ID")
        if request_id is None or REQUEST_ID_PATTERN.match(request_id) is None:
            request_id = self._new_request_id()
        try:
            content = request.content
            if not request.body_exists:
                body = b""
            elif content.is_eof():  # the usual case: the whole body arrived with the headers
                body = content.read_nowait()
                if len(body) > self.max_body_bytes:
                    raise ClientInputError(413, f"request body of {len(body)} bytes exceeds max_body_bytes = {self.max_body_bytes}")
            else:
                body = await self._read_body(request)
            variant, kind, unit_id = self._assign(request, body, active)
        except ClientInputError as exc:
            self.metrics.rejected.labels("bad_request").inc()
            response = json_error(exc.status, str(exc))
            response.headers["X-Request-ID"] = request_id
            return response

        served_variant = variant
        endpoint, upstream_response, error = await self._forward(request, body, request_id, variant, active)
        variant_down = upstream_response is None and (error is None or error.retryable)  # nothing accepted a connection
        if variant_down and experiment.upstream.on_variant_down == "fallback" and variant != experiment.control_name:
            served_variant = experiment.control_name
            kind = "fallback"
            active.variant_metrics[variant].fallbacks.inc()
            endpoint, upstream_response, error = await self._forward(request, body, request_id, served_variant, active)

        if upstream_response is not None:
            response = web.Response(status=upstream_response.status, body=upstream_response.body,
                                    headers=_returned_headers(upstream_response, served_variant, request_id))
        elif isinstance(error, UpstreamTimeoutError):
            response = json_error(504, f"variant {served_variant!r} did not answer in time: {error.reason}", variant=served_variant)
        elif error is None or error.retryable:
            response = json_error(503, f"variant {served_variant!r} is down: no upstream accepted a connection"
                                  + (f" (last: {error.reason})" if error else ""), variant=served_variant)
        else:
            response = json_error(502, f"variant {served_variant!r} failed: {error}", variant=served_variant)
        if upstream_response is None:
            response.headers["X-Variant"] = served_variant
            response.headers["X-Request-ID"] = request_id

        seconds = time.perf_counter() - started
        if self.export_metrics:
            active.variant_metrics[variant].observe(response.status, seconds)
        if self.record_outcomes:
            self.events.record_request((
                request_id, arrived, experiment.name, active.version, variant,
                endpoint.address if endpoint is not None else None, kind, unit_id,
                response.status, seconds * 1000.0, None if error is None or upstream_response is not None else str(error),
            ))
        if self.log_request_data:
            logger.info("%s %s %s -> %s %d %.1fms", request_id, request.method, request.path_qs, variant, response.status, seconds * 1000)
        return response

    async def _read_body(self, request: web.BaseRequest) -> bytes:
        """The body, at most max_body_bytes (else 413); one still arriving must end within client_body_timeout_s (else 408)."""
        if not request.body_exists:
            return b""
        length = request.content_length
        if length is not None and length > self.max_body_bytes:
            raise ClientInputError(413, f"request body of {length} bytes exceeds max_body_bytes = {self.max_body_bytes}")
        if request.content.is_eof():  # fully buffered: nothing can stall, no timer needed
            return await self._read_chunks(request)
        if request.version >= (1, 1) and request.headers.get("Expect", "").lower() == "100-continue":
            # The client waits for this before it sends the body (the low-level server does not send it).
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            request.writer.output_size = 0
        try:
            async with asyncio.timeout(self.client_body_timeout_s):
                return await self._read_chunks(request)
        except TimeoutError:
            raise ClientInputError(
                408, f"request body not received within client_body_timeout_s = {self.client_body_timeout_s:g}s"
            ) from None

    async def _read_chunks(self, request: web.BaseRequest) -> bytes:
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.content.iter_any():
            size += len(chunk)
            if size > self.max_body_bytes:
                raise ClientInputError(413, f"request body exceeds max_body_bytes = {self.max_body_bytes}")
            chunks.append(chunk)
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def _assign(self, request: web.BaseRequest, body: bytes, active: ActiveConfig) -> tuple[str, str, str | None]:
        """(variant, how it was assigned, unit id if sticky)."""
        forced = request.headers.get(OVERRIDE_HEADER)
        if forced is not None and self._override_allowed(request):
            if forced not in active.variant_metrics:
                raise ClientInputError(400, f"header {OVERRIDE_HEADER}: {forced!r} is not a variant; expected one of {list(active.variant_metrics)}")
            return forced, "forced", None
        assigner = active.assigner
        if assigner.sticky and assigner.override is None:
            unit_id = self._unit_id(request, body, active)
            variant, kind = assigner.choose(unit_id)
            return variant, kind, unit_id
        variant, kind = assigner.choose(None)
        return variant, kind, None

    def _override_allowed(self, request: web.BaseRequest) -> bool:
        if not self.allow_override:
            return False
        if not self.trusted_override_sources:
            return True
        try:
            remote = ipaddress.ip_address(request.remote or "")
        except ValueError:
            return False
        return any(remote in network for network in self.trusted_override_sources)

    @staticmethod
    def _unit_id(request: web.BaseRequest, body: bytes, active: ActiveConfig) -> str | None:
        kind, name = active.sticky_source
        if kind == "header":
            value = request.headers.get(name)
        elif kind == "cookie":
            value = request.cookies.get(name)
        else:
            try:
                document = json.loads(body) if body else None
            except (ValueError, UnicodeDecodeError):
                document = None
            value = document.get(name) if isinstance(document, dict) else None
            if value is not None and not isinstance(value, (str, int)):
                value = None
            value = None if value is None else str(value)
        return value[:256] if value else None

    async def _forward(
        self, request: web.BaseRequest, body: bytes, request_id: str, variant: str, active: ActiveConfig
    ) -> tuple[Endpoint | None, UpstreamResponse | None, UpstreamError | None]:
        """Try the variant's endpoints: one try, plus `retries` more on connect failures to other replicas."""
        settings = active.experiment.upstream
        upstreams = self.registry.variants.get(variant)
        endpoint = upstreams.pick() if upstreams is not None else None
        if endpoint is None:
            return None, None, None
        headers = _forwarded_headers(request, request_id)
        method = request.method
        deadline = time.monotonic() + settings.total_timeout_s
        tried: list[Endpoint] = []
        error: UpstreamError | None = None
        while endpoint is not None:
            payload = serialize_request(method, request.raw_path, endpoint.pool.authority, headers, body)
            timeout = min(settings.try_timeout_s, deadline - time.monotonic())
            try:
                response = await endpoint.pool.request(payload, timeout, head=method == "HEAD")
            except UpstreamError as exc:
                error = exc
                self.registry.record_failure(endpoint)
                self.metrics.upstream_errors.labels(variant, endpoint.address, type(exc).__name__).inc()
                tried.append(endpoint)
                if not exc.retryable or len(tried) > settings.retries or time.monotonic() >= deadline:
                    return endpoint, None, error
                endpoint = upstreams.pick(exclude=tried) if upstreams is not None else None
                continue
            self.registry.record_success(endpoint)
            return endpoint, response, None
        return (tried[-1] if tried else None), None, error

    async def feedback(self, request: web.BaseRequest) -> web.Response:
        """POST /feedback {"request_id": "...", "value": 1}: attach delayed ground truth."""
        try:
            # Bytes, not request.json(): that decodes with the client's charset (unknown ones raise).
            document = json.loads(await self._read_body(request))
        except ClientInputError as exc:
            return json_error(exc.status, str(exc))
        except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError; RecursionError: nested too deep
            return json_error(400, "body is not valid JSON")
        if not isinstance(document, dict):
            return json_error(400, "body must be a JSON object with 'request_id' and 'value'")
        request_id = document.get("request_id")
        value = document.get("value")
        if not isinstance(request_id, str) or REQUEST_ID_PATTERN.match(request_id) is None:
            return json_error(400, f"field 'request_id' must be a request id string, got {request_id!r}"[:300])
        number = _finite_number(value)
        if number is None:
            return json_error(400, f"field 'value' must be a finite number, got {value!r}"[:300])
        unknown = sorted(set(document) - {"request_id", "value"})
        if unknown:
            return json_error(400, f"unknown field(s) {unknown}; expected 'request_id' and 'value'")
        variant = self.events.recent_variant(request_id)
        if variant is None:
            variant = await asyncio.to_thread(self.events.variant_of, request_id)
        if variant is None:
            return json_error(404, f"request_id {request_id!r} is unknown")
        self.events.record_feedback(request_id, number)
        active = self.runtime.active
        assert active is not None
        children = active.variant_metrics.get(variant)
        if children is not None:
            children.feedback.inc()
            children.feedback_value.inc(number)
        return web.json_response({"status": "recorded", "request_id": request_id, "variant": variant}, status=202)


def _finite_number(value: object) -> float | None:
    """A JSON number (true/false count as 1/0) as a finite float, else None."""
    if not isinstance(value, (int, float)):  # bool is an int
        return None
    try:
        number = float(value)
    except OverflowError:  # an integer beyond the float range, e.g. 10**400
        return None
    return number if math.isfinite(number) else None


def _forwarded_headers(request: web.BaseRequest, request_id: str) -> bytes:
    """The header lines sent upstream: the client's minus hop-by-hop ones, plus X-Request-ID and X-Forwarded-*.

    Built once per request as bytes; `serialize_request` adds the request line, Host and framing.
    """
    connection_tokens: frozenset[bytes] = frozenset()
    forwarded_for = b""
    host = b""
    lines: list[bytes] = []
    for name, value in request.raw_headers:
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


def _returned_headers(response: UpstreamResponse, variant: str, request_id: str) -> CIMultiDict[str]:
    """The upstream's headers minus hop-by-hop and framing ones (the balancer re-frames the body),
    plus X-Variant and X-Request-ID."""
    pairs: list[tuple[str, str]] = []
    connection_tokens: set[str] = set()
    for name_bytes, value_bytes in response.headers:
        name = name_bytes.decode("latin-1")
        lower = name.lower()
        if lower == "connection":
            connection_tokens.update(token.strip().lower() for token in value_bytes.decode("latin-1").split(","))
        elif lower not in _NOT_RETURNED:
            pairs.append((name, value_bytes.decode("latin-1")))
    if connection_tokens:
        pairs = [(name, value) for name, value in pairs if name.lower() not in connection_tokens]
    pairs.append(("X-Variant", variant))
    pairs.append(("X-Request-ID", request_id))
    return CIMultiDict(pairs)
