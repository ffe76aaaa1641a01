"""The test helpers that start processes: ports handed out must not collide."""

from __future__ import annotations

import socket

from tests.processes import ephemeral_range, free_port


def test_free_ports_are_distinct_bindable_and_outside_the_ephemeral_range() -> None:
    low, _ = ephemeral_range()
    ports = [free_port() for _ in range(500)]
    assert len(set(ports)) == len(ports)
    assert all(1024 <= port < low for port in ports)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", ports[-1]))
