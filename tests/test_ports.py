"""The one free-port helper (raytrain_at.runtime.ports): what it hands out can be bound, and a port
in use is never handed out."""

from __future__ import annotations

import socket

from raytrain_at.runtime.ports import PICKED_RANGE, free_local_port, free_ports, is_bindable


def test_a_port_in_use_is_not_bindable_and_a_free_one_is() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert not is_bindable(port)
    assert is_bindable(free_local_port())


def test_free_ports_and_blocks_are_distinct_bindable_and_in_range() -> None:
    singles_and_starts = free_ports(5, blocks=2, size=10)
    singles, starts = singles_and_starts[:5], singles_and_starts[5:]
    assert len(starts) == 2
    ports = set(singles) | {s + i for s in starts for i in range(10)}
    assert len(ports) == 5 + 2 * 10  # no port handed out twice, blocks included
    low, high = PICKED_RANGE
    assert all(low <= p < high and is_bindable(p) for p in ports)
