"""A fast no-op HTTP/1.1 backend (asyncio.Protocol + httptools) for tests and benchmarks.

`python tests/noop_backend.py --port 9001 --name model_a [--delay-ms 0] [--event-loop uvloop]`
answers every request with a small JSON prediction naming itself, keeps connections alive,
and serves `/healthz`. It costs little CPU, so a benchmark measures the proxy, not it: on
uvloop (the default, as the balancer's) a request at a fixed rate costs it about a quarter
less than on asyncio's own loop (`python -m bench.backend_cost` measures both).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal

import httptools
import uvloop


EVENT_LOOPS = {"uvloop": uvloop.new_event_loop, "asyncio": asyncio.new_event_loop}


class NoopProtocol(asyncio.Protocol):
    """Parses requests and answers each with a fixed body."""

    def __init__(self, body: bytes, delay_s: float) -> None:
        self.body = body
        self.delay_s = delay_s
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.url = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            assert self.transport is not None
            self.transport.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            self.transport.close()

    def on_url(self, url: bytes) -> None:
        self.url = url

    def on_message_complete(self) -> None:
        keep_alive = self.parser.should_keep_alive()
        body = b'{"status": "ok"}' if self.url == b"/healthz" else self.body
        response = (
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n%s\r\n%s"
            % (len(body), b"" if keep_alive else b"Connection: close\r\n", body)
        )
        if self.delay_s and self.url != b"/healthz":
            asyncio.get_running_loop().call_later(self.delay_s, self._send, response, keep_alive)
        else:
            self._send(response, keep_alive)

    def _send(self, response: bytes, keep_alive: bool) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        self.transport.write(response)
        if not keep_alive:
            self.transport.close()


async def serve(host: str, port: int, name: str, delay_ms: float) -> None:
    """Serve until SIGTERM/SIGINT."""
    body = json.dumps({"predictions": [1], "probabilities": [0.75], "model": name, "version": "noop"}).encode()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: NoopProtocol(body, delay_ms / 1000), host, port, backlog=1024)
    stopped = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopped.set)
    async with server:
        await stopped.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--name", default="noop")
    parser.add_argument("--delay-ms", type=float, default=0.0)
    parser.add_argument("--event-loop", choices=sorted(EVENT_LOOPS), default="uvloop")
    args = parser.parse_args()
    with asyncio.Runner(loop_factory=EVENT_LOOPS[args.event_loop]) as runner:
        runner.run(serve(args.host, args.port, args.name, args.delay_ms))


if __name__ == "__main__":
    main()
