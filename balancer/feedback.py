"""POST /feedback: delayed ground truth for a request the balancer answered, keyed by its request id.

The body is `{"request_id": "...", "value": <finite number>}`; anything else gets a 400 naming
the field. The request must be known (recently answered by this process, or in the store),
else 404. With several worker processes, feedback may reach another worker than the one that
answered the request, before that one committed it: an id found nowhere is looked up in the
store again until `events.peer_commit_s` has passed, and only then refused. The value is
queued for the outcome log (last value wins) and counted per variant.
"""

from __future__ import annotations

import asyncio
import json
import math
import re

from balancer.events import EventLog
from balancer.http_server import HttpRequest, HttpResponse, json_error, json_response
from balancer.runtime import Runtime

REQUEST_ID_PATTERN = re.compile(r"^[A-Za-z0-9._:\-]{1,128}\Z")  # \Z: `$` would let a trailing newline in


async def record_feedback(request: HttpRequest, events: EventLog, runtime: Runtime) -> HttpResponse:
    """POST /feedback {"request_id": "...", "value": 1}: attach delayed ground truth."""
    try:
        document = json.loads(request.body)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError; RecursionError: nested too deep
        return json_error(400, "body is not valid JSON")
    if not isinstance(document, dict):
        return json_error(400, "body must be a JSON object with 'request_id' and 'value'")
    request_id = document.get("request_id")
    value = document.get("value")
    if not isinstance(request_id, str) or REQUEST_ID_PATTERN.match(request_id) is None:
        return json_error(400, f"field 'request_id' must be a request id string, got {request_id!r}"[:300])
    number = finite_number(value)
    if number is None:
        return json_error(400, f"field 'value' must be a finite number, got {value!r}"[:300])
    unknown = sorted(set(document) - {"request_id", "value"})
    if unknown:
        return json_error(400, f"unknown field(s) {unknown}; expected 'request_id' and 'value'")
    variant = events.recent_variant(request_id)
    if variant is None:
        variant = await asyncio.to_thread(events.variant_of, request_id)
    if variant is None and events.peer_commit_s > 0:
        variant = await _await_peer_commit(events, request_id)
    if variant is None:
        return json_error(404, f"request_id {request_id!r} is unknown")
    events.record_feedback(request_id, number)
    active = runtime.active
    assert active is not None
    children = active.variant_metrics.get(variant)
    if children is not None:
        children.feedback.inc()
        children.feedback_value.inc(number)
    return json_response(202, {"status": "recorded", "request_id": request_id, "variant": variant})


async def _await_peer_commit(events: EventLog, request_id: str) -> str | None:
    """The variant of `request_id` once a sibling worker commits it, or None after `events.peer_commit_s`."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + events.peer_commit_s
    while loop.time() < deadline:
        await asyncio.sleep(min(events.flush_interval_s / 2, max(0.0, deadline - loop.time())))
        variant = await asyncio.to_thread(events.variant_of, request_id)
        if variant is not None:
            return variant
    return None


def finite_number(value: object) -> float | None:
    """A JSON number (true/false count as 1/0) as a finite float, else None."""
    if not isinstance(value, (int, float)):  # bool is an int
        return None
    try:
        number = float(value)
    except OverflowError:  # an integer beyond the float range, e.g. 10**400
        return None
    return number if math.isfinite(number) else None
