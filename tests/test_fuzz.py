"""Property tests: the config loader, live reload and /feedback never fail in an unplanned way.

Each property runs a bounded number of hypothesis examples (`deadline=None`: the
machine is shared, timing says nothing here). The balancer parts run in-process on
one event loop owned by the test, with a tiny aiohttp app as the model upstream.
"""

from __future__ import annotations

import asyncio
import json
import math
import sqlite3
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import pytest
import yaml
from aiohttp import web
from aiohttp.test_utils import TestServer
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from balancer.app import assemble
from balancer.assignment import BUCKETS, Assigner, bucket_counts
from balancer.config import ConfigError, parse_experiment
from balancer.events import EventLog
from balancer.http_server import HttpServer
from balancer.runtime import Runtime
from balancer.upstreams import UpstreamRegistry

T = TypeVar("T")
_FUZZ = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None)


def fuzz(max_examples: int) -> settings:
    """Bounded, deadline-free hypothesis settings."""
    return settings(_FUZZ, max_examples=max_examples)

VALID_CONFIG = """\
name: fuzz-exp
strategy: sticky
sticky_key: header:X-User-ID
seed: 7
variants:
  - name: model_a
    weight: 50
    upstreams: ["http://127.0.0.1:{port}"]
  - name: model_b
    weight: 50
    upstreams: ["http://127.0.0.1:{port}"]
upstream:
  retries: 1
  health_check_interval_s: 0
server:
  flush_interval_s: 0.05
  store: {store}
"""


def assert_loads_or_names_the_error(body: str) -> None:
    """parse_experiment either validates into something the balancer can apply, or raises ConfigError."""
    try:
        loaded = parse_experiment(body, source="fuzz.yaml")
    except ConfigError as exc:
        assert str(exc).startswith("fuzz.yaml"), str(exc)
        return
    # Whatever validates must be appliable: the assigner's bucket table is built from the weights.
    experiment = loaded.experiment
    assert sum(bucket_counts(list(experiment.weights.values()))) == BUCKETS
    Assigner.for_experiment(experiment)
    # and a validated experiment survives a round trip through YAML unchanged
    again = parse_experiment(yaml.safe_dump(experiment.model_dump(mode="json")), source="again.yaml")
    assert again.experiment == experiment


# --- the config loader -------------------------------------------------------

YAML_TOKENS = [
    "name: x\n", "variants:\n", "  - name: a\n", "    weight: ", "    upstreams: [http://h:1]\n", "upstream:\n",
    "server:\n", "  retries: ", "analysis:\n", "seed: ", "2001-02-30", "2001-02-03", "1e400", "-1e400", ".nan",
    "1e308", "0x1F", "0o17", "!!binary aGk=", "!!python/object:os.system", "&a [1]", "*a", "<<: *a", "? [a]\n",
    "[", "]", "{", "}", "'", '"', "\t", "\x00", "\ufeff", "---\n", "...\n", "%YAML 1.1\n", "~", "true", "-", ": ",
    "\n", "  ", "#", "|\n", ">\n", "status: stopped\n", "winner: b\n", "control: z\n", "strategy: random\n",
    "sticky_key: json:user\n", "weight: 0\n", "2", "http://[::1]:99999", "\u00e9", "\ud7ff",
]


@fuzz(300)
@given(st.one_of(st.text(max_size=300), st.lists(st.sampled_from(YAML_TOKENS), max_size=40).map("".join)))
def test_config_loader_on_arbitrary_text(body: str) -> None:
    assert_loads_or_names_the_error(body)


@pytest.mark.parametrize("body", [
    "a: 2001-02-30",  # a YAML timestamp that is no date: PyYAML raises a bare ValueError
    "[" * 1500,  # nesting deeper than PyYAML's recursive composer
    "name: " + "[" * 400 + "]" * 400,  # deep but parseable: the error message must still render
], ids=["bad-date", "deep-nesting", "deep-value"])
def test_config_loader_on_known_hostile_text(body: str) -> None:
    assert_loads_or_names_the_error(body)


SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(10**30), max_value=10**30),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=20),
)
ANY_VALUE = st.recursive(SCALARS, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)), max_leaves=12)


def maybe(strategy: st.SearchStrategy[T]) -> st.SearchStrategy[T | Any]:
    """Mostly `strategy`, sometimes any YAML value, so validators deep inside get reached and attacked."""
    return st.one_of(strategy, strategy, strategy, ANY_VALUE)


UPSTREAM_URLS = st.one_of(
    st.builds("http://127.0.0.1:{}".format, st.integers(min_value=-5, max_value=70_000)),
    st.sampled_from(["http://model_a:8001", "http://[::1]:80/", "https://x:1", "http://a b:1", "http://h:0"]),
    st.text(max_size=20),
)
VARIANT = st.fixed_dictionaries(
    {"name": maybe(st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,70}", fullmatch=True)),
     "weight": maybe(st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(min_value=-1, max_value=10**400))),
     "upstreams": maybe(st.lists(UPSTREAM_URLS, max_size=3))},
    optional={"extra": ANY_VALUE},
)
SECTION_KEYS = {
    "upstream": ["connect_timeout_s", "try_timeout_s", "total_timeout_s", "retries", "eject_after_failures",
                 "eject_for_s", "on_variant_down", "health_check_interval_s", "dns_refresh_s"],
    "server": ["port", "flush_interval_s", "max_in_flight", "max_body_bytes", "client_body_timeout_s",
               "trusted_override_sources", "allow_override_header"],
    "analysis": ["alpha", "outcome", "min_sample", "sequential_tau", "timeline_points"],
}
SECTION_VALUES = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True), st.integers(min_value=-10, max_value=10**6),
    st.sampled_from(["fail", "fallback", "auto", "binary", "10.0.0.0/8", "nonsense"]), ANY_VALUE,
)
EXPERIMENT_DOCUMENTS = st.fixed_dictionaries(
    {"name": maybe(st.text(min_size=1, max_size=10)),
     "variants": maybe(st.lists(VARIANT, min_size=0, max_size=4))},
    optional={
        "strategy": maybe(st.sampled_from(["sticky", "random"])),
        "sticky_key": maybe(st.sampled_from(["header:X-User-ID", "cookie:uid", "json:user", "body:x", "header:"])),
        "seed": maybe(st.integers()),
        "status": maybe(st.sampled_from(["running", "paused", "stopped"])),
        "control": maybe(st.sampled_from(["a", "model_a", "b"])),
        "winner": maybe(st.sampled_from(["a", "model_b"])),
        **{section: st.dictionaries(st.sampled_from(keys + ["typo"]), SECTION_VALUES, max_size=4)
           for section, keys in SECTION_KEYS.items()},
    },
)


@fuzz(250)
@given(EXPERIMENT_DOCUMENTS)
def test_config_loader_on_arbitrary_documents(document: dict[str, Any]) -> None:
    assert_loads_or_names_the_error(yaml.safe_dump(document, allow_unicode=True))


# --- the running balancer, in-process --------------------------------------------

@dataclass
class InProcess:
    """A Runtime and Proxy over a real store, on a loop the test drives, with an aiohttp upstream."""

    loop: asyncio.AbstractEventLoop
    config: Path
    events: EventLog
    runtime: Runtime
    registry: UpstreamRegistry
    server: HttpServer
    client: aiohttp.ClientSession
    upstream: TestServer

    def run(self, awaitable: Any) -> Any:
        """Run one coroutine on the balancer's loop."""
        return self.loop.run_until_complete(awaitable)


async def _predict(request: web.Request) -> web.Response:
    await request.read()
    return web.json_response({"predictions": [1], "model": "tiny"})


@pytest.fixture
def in_process(tmp_path: Path) -> Iterator[InProcess]:
    loop = asyncio.new_event_loop()
    app = web.Application()
    app.router.add_post("/predict", _predict)
    upstream = TestServer(app, host="127.0.0.1")
    loop.run_until_complete(upstream.start_server())
    config = tmp_path / "exp.yaml"
    config.write_text(VALID_CONFIG.format(port=upstream.port, store=tmp_path / "outcomes.db"))

    async def start() -> InProcess:
        loaded = parse_experiment(config.read_text(), source=str(config))
        core = await assemble(config, loaded, tmp_path / "outcomes.db", flush_interval_s=0.05)
        server = HttpServer(core.proxy, max_body_bytes=1 << 20, body_timeout_s=5.0, keepalive_timeout_s=5.0)
        port = await server.start("127.0.0.1", 0)
        client = aiohttp.ClientSession(base_url=f"http://127.0.0.1:{port}")
        return InProcess(loop, config, core.events, core.runtime, core.registry, server, client, upstream)

    balancer = loop.run_until_complete(start())
    try:
        yield balancer
    finally:
        loop.run_until_complete(balancer.client.close())
        loop.run_until_complete(balancer.server.stop())
        loop.run_until_complete(balancer.registry.close())
        loop.run_until_complete(upstream.close())
        balancer.events.close()
        loop.close()


def mutate(body: str, draw: Callable[[st.SearchStrategy[Any]], Any]) -> str:
    """One random edit of a valid file: cut, insert garbage, replace or truncate a line."""
    edit = draw(st.sampled_from(["cut", "insert", "replace_line", "truncate", "whole"]))
    at = draw(st.integers(min_value=0, max_value=len(body)))
    garbage = draw(st.one_of(st.text(max_size=30), st.sampled_from(YAML_TOKENS)))
    if edit == "cut":
        return body[:at] + body[at + draw(st.integers(min_value=1, max_value=40)):]
    if edit == "insert":
        return body[:at] + garbage + body[at:]
    if edit == "replace_line":
        lines = body.splitlines(keepends=True)
        lines[draw(st.integers(min_value=0, max_value=len(lines) - 1))] = garbage + "\n"
        return "".join(lines)
    if edit == "truncate":
        return body[:at]
    return garbage


def test_reload_with_garbage_keeps_the_running_config(in_process: InProcess) -> None:
    original = in_process.config.read_text()
    runtime = in_process.runtime
    outcomes = {"rejected": 0, "unchanged": 0, "applied": 0}

    @fuzz(150)
    @given(st.data())
    def reload_garbage(data: st.DataObject) -> None:
        before = runtime.active
        assert before is not None
        body = mutate(original, data.draw)
        in_process.config.write_text(body)
        applied, message = in_process.run(runtime.reload("fuzz"))  # must not raise, whatever the file holds
        after = runtime.active
        assert after is not None
        try:
            expected = parse_experiment(body, source=str(in_process.config)).experiment
        except ConfigError:
            expected = None
        if not applied:
            outcomes["rejected"] += 1
            assert after is before and runtime.last_error == message, message
        elif after is before:
            outcomes["unchanged"] += 1
        else:
            outcomes["applied"] += 1
            assert expected is not None and after.experiment == expected
            assert after.version == before.version + 1
        # the upstream registry always matches the running config, never a rejected one
        assert set(in_process.registry.variants) == {variant.name for variant in after.experiment.variants}
        if after is not before:  # back to the original for the next example
            in_process.config.write_text(original)
            assert in_process.run(runtime.reload("reset"))[0]

    reload_garbage()
    print(f"reload fuzz: {outcomes}")
    assert outcomes["rejected"] > 50


JSON_VALUES = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(min_value=-(10**400), max_value=10**400),
              st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=20)),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)),
    max_leaves=8,
)


def test_feedback_answers_every_body_without_a_server_error(in_process: InProcess) -> None:
    client = in_process.client

    async def proxied(user: str) -> str:
        async with client.post("/predict", json={"instances": [[1.0]]}, headers={"X-User-ID": user}) as reply:
            assert reply.status == 200, await reply.text()
            return reply.headers["X-Request-ID"]

    known = [in_process.run(proxied(f"user-{i}")) for i in range(5)]
    request_ids = st.one_of(st.sampled_from(known), st.text(max_size=20), st.just("x" * 129), st.just(known[0] + "\n"))
    values = st.one_of(st.floats(allow_nan=False, allow_infinity=False), st.integers(min_value=-1000, max_value=1000),
                       st.booleans(), st.sampled_from([10**400, -(10**400), math.nan, math.inf]), JSON_VALUES)
    documents = st.one_of(
        st.fixed_dictionaries({"request_id": request_ids, "value": values}),
        st.fixed_dictionaries({"request_id": request_ids, "value": values}, optional={"extra": JSON_VALUES}),
        JSON_VALUES,
    )
    bodies = st.one_of(documents.map(lambda document: json.dumps(document).encode()),
                       st.binary(max_size=64), st.just(b"[" * 100_000), st.just(b"\xff\xfe{"))
    content_types = st.sampled_from(["application/json", "application/json; charset=utf-8", "text/plain",
                                     "application/json; charset=bogus", "application/json; charset=utf-16"])
    accepted: dict[str, float] = {}
    statuses: dict[int, int] = {}

    async def post(body: bytes, content_type: str) -> tuple[int, Any]:
        async with client.post("/feedback", data=body, headers={"Content-Type": content_type}) as reply:
            return reply.status, await reply.json(content_type=None)

    @fuzz(400)
    @given(bodies, content_types)
    @example(json.dumps({"request_id": known[0], "value": -0.5}).encode(), "application/json")  # a loss
    @example(json.dumps({"request_id": known[1], "value": 10**400}).encode(), "application/json")
    def post_feedback(body: bytes, content_type: str) -> None:
        status, answer = in_process.run(post(body, content_type))
        statuses[status] = statuses.get(status, 0) + 1
        assert status in (202, 400, 404), (status, answer, body[:80])
        if status == 202:
            assert answer["status"] == "recorded" and answer["request_id"] in known
            accepted[answer["request_id"]] = float(json.loads(body)["value"])
        else:
            assert isinstance(answer["error"], str) and answer["error"]

    post_feedback()
    print(f"feedback fuzz: statuses {statuses}, {len(accepted)} request ids got feedback")
    in_process.events.flush()
    with sqlite3.connect(in_process.events.path) as connection:
        rows = connection.execute("SELECT request_id, value, typeof(value) FROM feedback").fetchall()
        requests = connection.execute("SELECT COUNT(*) FROM requests").fetchone()[0]
    assert requests == len(known)  # feedback never creates or alters a request record
    assert {request_id: value for request_id, value, _ in rows} == accepted  # last accepted value wins
    assert all(kind == "real" and math.isfinite(value) for _, value, kind in rows)
