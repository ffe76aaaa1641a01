"""balancer/app.py's start-up: what it leaves for the garbage collector; the niceness it asks for."""

from __future__ import annotations

import gc
import logging
import os

import pytest

from balancer.app import apply_priority, freeze_start_up_objects


def test_objects_alive_at_start_up_are_frozen_out_of_every_collection() -> None:
    import aiohttp  # noqa: F401  (a balancer's start-up imports it; plenty of objects to freeze)

    tracked = len(gc.get_objects())
    try:
        freeze_start_up_objects()
        assert gc.get_freeze_count() > tracked * 0.5  # the start-up garbage was collected first, the rest frozen
        assert len(gc.get_objects()) < 100  # a full collection now traverses only what was made since
    finally:
        gc.unfreeze()


def test_a_refused_priority_is_logged_with_what_it_needs_and_serving_goes_on(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    def refuse(which: int, who: int, niceness: int) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(os, "setpriority", refuse)
    with caplog.at_level(logging.ERROR, logger="balancer.app"):
        apply_priority(-5, "exp.yaml")
    (record,) = caplog.records
    message = record.getMessage()
    assert message.startswith("exp.yaml: server.priority = -5: the OS refused it") and "CAP_SYS_NICE" in message
    assert f"serving at niceness {os.getpriority(os.PRIO_PROCESS, 0)}" in message


def test_no_priority_leaves_the_niceness_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    monkeypatch.setattr(os, "setpriority", lambda *arguments: calls.append(arguments))
    apply_priority(None, "exp.yaml")
    apply_priority(3, "exp.yaml")
    assert calls == [(os.PRIO_PROCESS, 0, 3)]
