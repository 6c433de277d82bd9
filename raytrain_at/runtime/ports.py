"""Free TCP ports on this machine: the one helper the package, its tests and rehearsals use.

``free_local_port`` asks the kernel for any port (bind to port 0), which suits one server that
binds it a moment later; ``free_ports`` picks ports and blocks of consecutive ports from a range
of its own, below Linux's ephemeral range and outside Ray's defaults, for a set of services that
must not collide with each other or with another Ray on the machine.
"""

from __future__ import annotations

import random
import socket

LOCALHOST = "127.0.0.1"
# Ray's defaults stay clear of this range: GCS 6379, dashboard 8265, worker ports 10002-19999,
# agent 52365; Linux hands out ephemeral ports from 32768.
PICKED_RANGE = (20000, 32000)


def free_local_port(host: str = LOCALHOST) -> int:
    """A TCP port on ``host`` that nothing listens on right now (the kernel's choice).

    A server started a moment later can still lose it to another process: callers that start a
    server retry with a new port when the bind fails.
    """
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def is_bindable(port: int, host: str = LOCALHOST) -> bool:
    """Whether a TCP socket can bind ``host:port`` now."""
    with socket.socket() as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def free_ports(count: int, blocks: int = 0, size: int = 1, host: str = LOCALHOST) -> list[int]:
    """``count`` distinct bindable ports, then the first port of each of ``blocks`` runs of
    ``size`` consecutive bindable ports, none shared, all in :data:`PICKED_RANGE`.

    Args:
        count: single ports wanted.
        blocks: runs of consecutive ports wanted (e.g. Ray's worker-port ranges).
        size: ports per run.
        host: the address they must be bindable on.
    """
    low, high = PICKED_RANGE
    rng = random.Random()
    taken: set[int] = set()
    starts: list[int] = []
    while len(starts) < blocks:
        start = rng.randrange(low, high - size)
        block = set(range(start, start + size))
        if not block & taken and all(is_bindable(p, host) for p in block):
            taken |= block
            starts.append(start)
    singles: list[int] = []
    while len(singles) < count:
        port = rng.randrange(low, high)
        if port not in taken and is_bindable(port, host):
            taken.add(port)
            singles.append(port)
    return singles + starts
