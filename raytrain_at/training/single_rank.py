"""The torch.distributed environment of a world of one on this machine.

DeepSpeed initialises torch.distributed even for one process, so a run without Ray (``train
--single-process``, the GPU check, tests that drive a worker loop directly) needs the variables a
launcher would set: rank 0 of 1 and a free local port for the rendezvous.
"""

from __future__ import annotations

import os

from raytrain_at.runtime.ports import free_local_port


def single_rank_environment(*, keep_existing: bool = False) -> None:
    """Set RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT for a world of one.

    Args:
        keep_existing: leave variables that are already set alone (a user's own launcher wins).
    """
    values = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
              "MASTER_PORT": str(free_local_port())}
    for key, value in values.items():
        if not (keep_existing and key in os.environ):
            os.environ[key] = value
