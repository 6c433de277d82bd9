"""The torch.distributed environment variables a launcher sets, in one place.

DeepSpeed reads RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT even when the process
group already exists: a Ray Train worker sets them from its train context
(:func:`rank_environment`), and a run without Ray (``train --single-process``, the GPU check,
tests that drive a worker loop directly) sets those of a world of one with a free local port for
the rendezvous (:func:`single_rank_environment`).
"""

from __future__ import annotations

import os

from raytrain_at.runtime.ports import free_local_port


def rank_environment(rank: int, world_size: int, local_rank: int, master_port: int, *,
                     master_addr: str = "127.0.0.1", keep_existing: bool = False) -> None:
    """Set RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT for this process.

    Args:
        rank: the process's rank in the world.
        world_size: processes in the world.
        local_rank: its rank on this node.
        master_port: the rendezvous port on ``master_addr``.
        master_addr: the rendezvous host.
        keep_existing: leave variables that are already set alone (a launcher's own win).
    """
    values = {"RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(local_rank),
              "MASTER_ADDR": master_addr, "MASTER_PORT": str(master_port)}
    for key, value in values.items():
        if not (keep_existing and key in os.environ):
            os.environ[key] = value


def single_rank_environment(*, keep_existing: bool = False) -> None:
    """The environment of a world of one: rank 0 of 1, a free port on 127.0.0.1.

    Args:
        keep_existing: leave variables that are already set alone (a user's own launcher wins).
    """
    rank_environment(0, 1, 0, free_local_port(), keep_existing=keep_existing)
