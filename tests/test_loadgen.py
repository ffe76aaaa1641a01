"""The load generator stops when cancelled (Ctrl-C), even when the HTTP client reports the cancellation as its own error."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from balancer.loadgen import run_load

ROWS, LABELS = [[0.0] * 3], [0]


async def _start_server(handler: Any) -> tuple[web.AppRunner, str]:
    app = web.Application()
    app.router.add_post("/predict", handler)
    runner = web.AppRunner(app, shutdown_timeout=0.1)  # the handlers still sleeping are not waited for
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    return runner, f"http://127.0.0.1:{port}"


async def _cancel_after(task: asyncio.Task[Any], seconds: float) -> None:
    await asyncio.sleep(seconds)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 3.0)  # a TimeoutError here means the load went on


async def test_cancelling_the_load_stops_it_promptly() -> None:
    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(30)
        return web.json_response({"predictions": [0]})

    runner, url = await _start_server(slow)
    try:
        task = asyncio.create_task(run_load(url, requests=1000, concurrency=4, users=10, rows=ROWS, labels=LABELS))
        await _cancel_after(task, 0.3)
    finally:
        await runner.cleanup()


async def test_a_cancellation_the_client_turns_into_its_own_error_still_stops_the_load(
        monkeypatch: pytest.MonkeyPatch) -> None:
    class ConvertingPost:  # what aiohttp can do when cancelled mid-request
        async def __aenter__(self) -> None:
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                raise aiohttp.ClientOSError("connection reset while cancelled") from None

        async def __aexit__(self, *exc_info: object) -> None:
            return None

    monkeypatch.setattr(aiohttp.ClientSession, "post", lambda self, *args, **kwargs: ConvertingPost())
    task = asyncio.create_task(run_load("http://127.0.0.1:9", requests=1000, concurrency=4, users=10,
                                        rows=ROWS, labels=LABELS))
    await _cancel_after(task, 0.2)
