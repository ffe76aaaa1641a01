"""The floor under the balancer: aiohttp's `web.Server` plus the balancer's own upstream client, nothing else.

No assignment, no outcome log, no metrics, no header filtering: each request goes to the
next of the two upstreams in turn and comes back with `X-Variant` naming it. `make bench`
runs it beside the balancer so the difference between the two is the cost of the
balancer's own logic, and this process's cost is what aiohttp and asyncio take.

    python -m bench.floor_proxy --port 8090 --upstream model_a=127.0.0.1:8001 --upstream model_b=127.0.0.1:8002
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import signal

from aiohttp import web

from balancer.upstream_client import ConnectionPool, serialize_request


async def serve(port: int, upstreams: list[tuple[str, str]]) -> None:
    """Serve until SIGTERM/SIGINT."""
    pools = []
    for name, address in upstreams:
        host, _, upstream_port = address.rpartition(":")
        pools.append((name, ConnectionPool(host, int(upstream_port))))
    rotation = itertools.cycle(pools)

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
    stopped = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopped.set)
    await stopped.wait()
    await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", action="append", required=True, help="NAME=HOST:PORT (give two)")
    args = parser.parse_args()
    asyncio.run(serve(args.port, [tuple(item.split("=", 1)) for item in args.upstream]))  # type: ignore[misc]


if __name__ == "__main__":
    main()
