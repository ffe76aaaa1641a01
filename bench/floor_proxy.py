"""The floor under the balancer: an HTTP server plus the balancer's own upstream client, nothing else.

No assignment, no outcome log, no metrics, no header filtering: each request goes to the
next of the two upstreams in turn and comes back with `X-Variant` naming it. `make bench`
runs it beside the balancer, with either server:

- `--server balancer`: the balancer's own `balancer.http_server` answering from the upstream
  connection's callback, as the balancer's fast path does. The balancer minus this floor is
  the cost of the balancer's own logic.
- `--server aiohttp`: aiohttp's `web.Server` with a handler awaiting the upstream, which is
  what the public port ran on before; kept to show what that server costs.

    python -m bench.floor_proxy --server balancer --port 8090 --upstream model_a=127.0.0.1:8001 --upstream model_b=127.0.0.1:8002
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import signal
from collections.abc import Callable, Iterator

from aiohttp import web

from balancer.app import EVENT_LOOPS
from balancer.http_server import HttpRequest, HttpResponse, HttpServer
from balancer.upstream_client import ConnectionPool, UpstreamResponse, serialize_request
from balancer.upstream_errors import UpstreamError

Pools = Iterator[tuple[str, ConnectionPool]]


class FloorHandler:
    """A `balancer.http_server.RequestHandler` that only forwards: round-robin, no features."""

    def __init__(self, pools: Pools) -> None:
        self.pools = pools

    def admit(self, request: HttpRequest) -> HttpResponse | None:
        return None

    def finished(self, request: HttpRequest) -> None:
        pass

    def rejected(self, reason: str) -> None:
        pass

    def handle(self, request: HttpRequest, respond: Callable[[HttpResponse], None]) -> None:
        if request.target == "/healthz":
            respond(HttpResponse(200, b"Content-Type: text/plain\r\n", b"ok"))
            return
        name, pool = next(self.pools)
        payload = serialize_request(request.method, request.target, pool.authority, b"", request.body)
        tags = b"Content-Type: application/json\r\nX-Variant: %s\r\n" % name.encode()

        def answer(response: UpstreamResponse | None, error: UpstreamError | None) -> None:
            if response is None:
                respond(HttpResponse(502, b"Content-Type: text/plain\r\n", str(error).encode()))
            else:
                respond(HttpResponse(response.status, tags, response.body))

        connection = pool.take_idle()
        if connection is not None:
            pool.send(connection, payload, 10.0, False, answer)
            return

        async def connect_first() -> None:
            try:
                answer(await pool.request(payload, 10.0), None)
            except UpstreamError as exc:
                answer(None, exc)

        asyncio.get_running_loop().create_task(connect_first())


async def serve(port: int, upstreams: list[tuple[str, str]], server_kind: str) -> None:
    """Serve until SIGTERM/SIGINT."""
    pools = []
    for name, address in upstreams:
        host, _, upstream_port = address.rpartition(":")
        pools.append((name, ConnectionPool(host, int(upstream_port))))
    rotation = itertools.cycle(pools)
    stopped = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopped.set)
    if server_kind == "balancer":
        server = HttpServer(FloorHandler(rotation), max_body_bytes=1 << 20, body_timeout_s=10.0, keepalive_timeout_s=75.0)
        await server.start("127.0.0.1", port)
        await stopped.wait()
        await server.stop()
        return

    async def handle(request: web.BaseRequest) -> web.Response:
        if request.path == "/healthz":
            return web.Response(text="ok")
        body = await request.read()
        name, pool = next(rotation)
        answer = await pool.request(serialize_request(request.method, request.raw_path, pool.authority, b"", body), 10.0)
        return web.Response(status=answer.status, body=answer.body,
                            headers={"Content-Type": "application/json", "X-Variant": name})

    runner = web.ServerRunner(web.Server(handle, access_log=None), handle_signals=False)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port, backlog=1024).start()
    await stopped.wait()
    await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--server", choices=("balancer", "aiohttp"), default="balancer")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--event-loop", choices=tuple(EVENT_LOOPS), default="uvloop")
    parser.add_argument("--upstream", action="append", required=True, help="NAME=HOST:PORT (give two)")
    args = parser.parse_args()
    upstreams = [tuple(item.split("=", 1)) for item in args.upstream]
    with asyncio.Runner(loop_factory=EVENT_LOOPS[args.event_loop]) as runner:  # the balancer's default: uvloop
        runner.run(serve(args.port, upstreams, args.server))  # type: ignore[arg-type]


if __name__ == "__main__":
    main()
