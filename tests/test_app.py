"""balancer/app.py's start-up: what it leaves for the garbage collector."""

from __future__ import annotations

import gc

from balancer.app import freeze_start_up_objects


def test_objects_alive_at_start_up_are_frozen_out_of_every_collection() -> None:
    import aiohttp  # noqa: F401  (a balancer's start-up imports it; plenty of objects to freeze)

    tracked = len(gc.get_objects())
    try:
        freeze_start_up_objects()
        assert gc.get_freeze_count() > tracked * 0.5  # the start-up garbage was collected first, the rest frozen
        assert len(gc.get_objects()) < 100  # a full collection now traverses only what was made since
    finally:
        gc.unfreeze()
