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
import json
import logging
import os
import time
from collections.abc import Callable, Coroutine
from typing import Any, Final

from balancer.events import EventLog
from balancer.feedback import REQUEST_ID_PATTERN, record_feedback
from balancer.hop_headers import cookie_value, forwarded_headers, returned_answer
from balancer.http_server import HttpRequest, HttpResponse, json_error
from balancer.metrics import BalancerMetrics
from balancer.runtime import ActiveConfig, Runtime
from balancer.upstream_client import UpstreamResponse, serialize_request
from balancer.upstream_errors import UpstreamClosedError, UpstreamError, UpstreamTimeoutError
from balancer.upstreams import Endpoint, UpstreamRegistry

logger = logging.getLogger(__name__)

OVERRIDE_HEADER = "X-Variant"
_OVERLOAD_HEADERS = b"Retry-After: 1\r\n"
_IDS_PER_BLOCK: Final = 4096
_ENTROPY_BYTES_PER_ID: Final = 6
_ENTROPY_HEX_PER_ID: Final = 2 * _ENTROPY_BYTES_PER_ID
_LOW_COUNTER_DIGITS: Final = [f"{index:03x}" for index in range(_IDS_PER_BLOCK)]


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
        self.allow_override = server.allow_override_header
        self.trusted_override_sources = tuple(ipaddress.ip_network(s, strict=False) for s in server.trusted_override_sources)
        self.log_request_data = server.log_request_data
        self.record_outcomes = server.record_outcomes
        self.export_metrics = server.export_metrics
        self.in_flight = 0
        metrics.in_flight.set_function(lambda: float(self.in_flight))
        self._idle_waiters: list[asyncio.Future[None]] = []
        self._id_prefix = os.urandom(5).hex()
        self._id_block = ""  # the prefix and the counter's high digits, for the current 4,096 ids
        self._id_blocks = 0
        self._id_entropy = ""
        self._id_entropy_at = 0

    # --- balancer.http_server.RequestHandler -------------------------------------------------

    def admit(self, request: HttpRequest) -> HttpResponse | None:
        """Headers are in: take a slot, or refuse with 503 when max_in_flight are already in progress.

        Feedback is never refused for load: it is small, and losing ground truth costs more.
        """
        if _is_feedback(request):
            return None
        if self.in_flight >= self.max_in_flight:
            self.metrics.rejected.labels("overload").inc()
            return json_error(503, f"overloaded: {self.in_flight} requests in flight (max_in_flight)", _OVERLOAD_HEADERS)
        self.in_flight += 1
        request.counted = True
        return None

    def finished(self, request: HttpRequest) -> None:
        """An admitted request is over."""
        if not request.counted:
            return
        self.in_flight -= 1
        if self.in_flight == 0 and self._idle_waiters:
            for waiter in self._idle_waiters:
                if not waiter.done():
                    waiter.set_result(None)
            self._idle_waiters.clear()

    def rejected(self, reason: str) -> None:
        """The server refused a request itself (malformed, too large, too slow)."""
        self.metrics.rejected.labels(reason).inc()

    def handle(self, request: HttpRequest, respond: Callable[[HttpResponse], None]) -> None:
        """Answer one complete request: /feedback, or proxy it.

        The common case runs without a task: assignment, then the request goes out on an idle
        pooled connection whose response callback answers the client (`_Exchange`). Whatever
        needs waiting (a new connection, a retry, a fallback, feedback's store lookup) runs as a task.
        """
        if not request.counted:  # admitted without a slot: feedback
            _spawn(record_feedback(request, self.events, self.runtime), respond)
            return
        exchange = _Exchange(self, request, respond)
        try:
            exchange.variant, exchange.kind, exchange.unit_id = self._assign(request, exchange.active)
        except ClientInputError as exc:
            self.metrics.rejected.labels("bad_request").inc()
            respond(json_error(exc.status, str(exc), b"X-Request-ID: %s\r\n" % exchange.request_id.encode()))
            return
        upstreams = self.registry.variants.get(exchange.variant)
        endpoint = upstreams.pick() if upstreams is not None else None
        connection = endpoint.pool.take_idle() if endpoint is not None else None
        if endpoint is None or connection is None:
            _spawn(self._proxy(exchange, endpoint), respond)
            return
        exchange.endpoint = endpoint
        exchange.headers = headers = forwarded_headers(request, exchange.request_id)
        timeout = exchange.active.try_timeout_s
        payload = serialize_request(request.method, request.target, endpoint.pool.authority, headers, request.body)
        endpoint.pool.send(connection, payload, timeout, request.method == "HEAD", exchange.on_upstream)

    def _new_request_id(self) -> str:
        """Process prefix + 10 hex digits of a counter (ids sort by arrival, so the store appends) + 48 random bits.

        The random part makes ids unguessable, so nobody can post feedback for someone else's
        request; it is drawn from the OS 4,096 ids at a time to keep the syscall off the hot path.
        The counter's high 7 digits change with each such block and its low 3 come from a table:
        formatting an integer costs more than the rest of the id together.
        """
        at = self._id_entropy_at
        if at >= len(self._id_entropy):
            self._id_entropy = os.urandom(_ENTROPY_BYTES_PER_ID * _IDS_PER_BLOCK).hex()
            self._id_block = f"{self._id_prefix}{self._id_blocks:07x}"
            self._id_blocks += 1
            at = 0
        self._id_entropy_at = at + _ENTROPY_HEX_PER_ID
        return self._id_block + _LOW_COUNTER_DIGITS[at // _ENTROPY_HEX_PER_ID] + self._id_entropy[at:at + _ENTROPY_HEX_PER_ID]

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until no request is in flight (graceful stop); False if the timeout passed first."""
        if self.in_flight == 0:
            return True
        waiter = asyncio.get_running_loop().create_future()
        self._idle_waiters.append(waiter)
        try:
            async with asyncio.timeout(timeout):
                await waiter
        except TimeoutError:
            return False
        return True

    async def _proxy(self, exchange: _Exchange, endpoint: Endpoint | None,
                     failure: UpstreamError | None = None) -> HttpResponse:
        """The general path: forward (connecting, retrying), fall back to the control if configured, answer.

        `endpoint` is the replica already picked; with `failure`, the error its first try got.
        """
        active = exchange.active
        experiment = active.experiment
        variant = exchange.variant
        upstream_response, error = None, failure
        if endpoint is not None:
            endpoint, upstream_response, error = await self._forward(exchange, variant, endpoint, failure)
        variant_down = upstream_response is None and (error is None or error.retryable)  # nothing accepted a connection
        served_variant = variant
        if variant_down and experiment.upstream.on_variant_down == "fallback" and variant != experiment.control_name:
            served_variant = experiment.control_name
            exchange.kind = "fallback"
            active.variant_metrics[variant].fallbacks.inc()
            upstreams = self.registry.variants.get(served_variant)
            endpoint = upstreams.pick() if upstreams is not None else None
            upstream_response, error = None, None
            if endpoint is not None:
                endpoint, upstream_response, error = await self._forward(exchange, served_variant, endpoint, None)
        exchange.endpoint = endpoint
        return exchange.answer(upstream_response, error, served_variant)

    def _assign(self, request: HttpRequest, active: ActiveConfig) -> tuple[str, str, str | None]:
        """(variant, how it was assigned, unit id if sticky)."""
        forced = request.header(b"x-variant")
        if forced is not None and self._override_allowed(request):
            if forced not in active.variant_metrics:
                raise ClientInputError(400, f"header {OVERRIDE_HEADER}: {forced!r} is not a variant; expected one of {list(active.variant_metrics)}")
            return forced, "forced", None
        assigner = active.assigner
        if assigner.sticky and assigner.override is None:
            unit_id = self._unit_id(request, active)
            variant, kind = assigner.choose(unit_id)
            return variant, kind, unit_id
        variant, kind = assigner.choose(None)
        return variant, kind, None

    def _override_allowed(self, request: HttpRequest) -> bool:
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
    def _unit_id(request: HttpRequest, active: ActiveConfig) -> str | None:
        kind, name = active.sticky_source
        value: str | None
        if kind == "header":
            value = request.header(active.sticky_header)
        elif kind == "cookie":
            value = cookie_value(request.header(b"cookie"), name)
        else:
            body = request.body
            try:
                document = json.loads(body) if body else None
            except (ValueError, UnicodeDecodeError):
                document = None
            found = document.get(name) if isinstance(document, dict) else None
            value = str(found) if isinstance(found, (str, int)) else None
        return value[:256] if value else None

    async def _forward(
        self, exchange: _Exchange, variant: str, endpoint: Endpoint, failure: UpstreamError | None
    ) -> tuple[Endpoint | None, UpstreamResponse | None, UpstreamError | None]:
        """Try the variant's endpoints, starting with `endpoint`: one try, plus `retries` more on connect
        failures to other replicas. `failure`: the first try already happened (on an idle connection) and failed."""
        request = exchange.request
        settings = exchange.active.experiment.upstream
        upstreams = self.registry.variants.get(variant)
        if exchange.headers is None:
            exchange.headers = forwarded_headers(request, exchange.request_id)
        method = request.method
        deadline = time.monotonic() + settings.total_timeout_s
        tried: list[Endpoint] = []
        error: UpstreamError | None = None
        fresh = False
        current: Endpoint | None = endpoint
        while current is not None:
            try:
                if failure is not None:
                    exc, failure = failure, None
                    if not (isinstance(exc, UpstreamClosedError) and exc.retryable):
                        raise exc
                    fresh = True  # the idle connection had been closed by the upstream: once more on a new one
                payload = serialize_request(method, request.target, current.pool.authority, exchange.headers, request.body)
                timeout = min(settings.try_timeout_s, deadline - time.monotonic())
                response = await current.pool.request(payload, timeout, head=method == "HEAD", fresh=fresh)
            except UpstreamError as exc:
                fresh = False
                error = exc
                self._count_failure(variant, current, exc)
                tried.append(current)
                if not exc.retryable or len(tried) > settings.retries or time.monotonic() >= deadline:
                    return current, None, error
                current = upstreams.pick(exclude=tried) if upstreams is not None else None
                continue
            self.registry.record_success(current)
            return current, response, None
        return (tried[-1] if tried else None), None, error

    def _count_failure(self, variant: str, endpoint: Endpoint, error: UpstreamError) -> None:
        self.registry.record_failure(endpoint)
        self.metrics.upstream_errors.labels(variant, endpoint.address, type(error).__name__).inc()

class _Exchange:
    """One proxied request in progress: what was decided about it, and how it gets answered."""

    __slots__ = ("proxy", "request", "respond", "started", "arrived", "active", "request_id", "variant", "kind",
                 "unit_id", "endpoint", "headers")

    def __init__(self, proxy: Proxy, request: HttpRequest, respond: Callable[[HttpResponse], None]) -> None:
        self.proxy = proxy
        self.request = request
        self.respond = respond
        self.started = time.perf_counter()
        self.arrived = time.time()
        active = proxy.runtime.active
        assert active is not None
        self.active = active  # one config snapshot for the whole request, even across a reload
        request_id = request.header(b"x-request-id")
        if request_id is None or REQUEST_ID_PATTERN.match(request_id) is None:
            request_id = proxy._new_request_id()
        self.request_id = request_id
        self.variant = ""
        self.kind = ""
        self.unit_id: str | None = None
        self.endpoint: Endpoint | None = None
        self.headers: bytes | None = None  # the header lines sent upstream, built once

    def on_upstream(self, response: UpstreamResponse | None, error: UpstreamError | None) -> None:
        """The fast path's try came back (called by the upstream connection)."""
        endpoint = self.endpoint
        assert endpoint is not None
        if response is None:
            assert error is not None
            _spawn(self.proxy._proxy(self, endpoint, error), self.respond)  # retry, fallback or error answer
            return
        try:
            self.proxy.registry.record_success(endpoint)
            answer = self.answer(response, None, self.variant)
        except Exception:  # never leave the client without an answer
            logger.exception("answering request %s failed", self.request_id)
            answer = json_error(500, "internal error in the balancer")
        self.respond(answer)

    def answer(self, upstream_response: UpstreamResponse | None, error: UpstreamError | None, served_variant: str) -> HttpResponse:
        """The client's answer, counted in the metrics and queued for the outcome log."""
        proxy = self.proxy
        request_id = self.request_id
        if upstream_response is not None:
            response = returned_answer(upstream_response, served_variant, request_id)
        else:
            tags = b"X-Variant: %s\r\nX-Request-ID: %s\r\n" % (served_variant.encode(), request_id.encode())
            if isinstance(error, UpstreamTimeoutError):
                response = json_error(504, f"variant {served_variant!r} did not answer in time: {error.reason}", tags,
                                      variant=served_variant)
            elif error is None or error.retryable:
                response = json_error(503, f"variant {served_variant!r} is down: no upstream accepted a connection"
                                      + (f" (last: {error.reason})" if error else ""), tags, variant=served_variant)
            else:
                response = json_error(502, f"variant {served_variant!r} failed: {error}", tags, variant=served_variant)
        seconds = time.perf_counter() - self.started
        active = self.active
        if proxy.export_metrics:
            active.variant_metrics[self.variant].stats.observe(response.status, seconds)
        if proxy.record_outcomes:
            endpoint = self.endpoint
            proxy.events.record_request((
                request_id, self.arrived, active.experiment_name, active.version, self.variant,
                endpoint.pool.address if endpoint is not None else None, self.kind, self.unit_id,
                response.status, seconds * 1000.0, None if error is None or upstream_response is not None else str(error),
            ))
        if proxy.log_request_data:
            logger.info("%s %s %s -> %s %d %.1fms", request_id, self.request.method, self.request.target, self.variant,
                        response.status, seconds * 1000)
        return response


def _spawn(work: Coroutine[Any, Any, HttpResponse], respond: Callable[[HttpResponse], None]) -> None:
    """Run `work` as a task and answer with its result (a 500 if it raised)."""
    def done(task: asyncio.Task[HttpResponse]) -> None:
        try:
            response = task.result()
        except Exception:
            logger.exception("answering a request failed")
            response = json_error(500, "internal error in the balancer")
        respond(response)

    asyncio.get_running_loop().create_task(work).add_done_callback(done)


def _is_feedback(request: HttpRequest) -> bool:
    return request.method == "POST" and request.target.startswith("/feedback") and request.path == "/feedback"
