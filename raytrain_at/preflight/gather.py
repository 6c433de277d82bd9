"""How the workers' rows meet: device rows first, so a rank without its device cannot leave
the others waiting in a collective it never enters (kept apart from :mod:`.worker`, whose
imports take seconds, so a test can run it in two bare processes)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch.distributed as dist


def gather_rows(row: dict[str, Any], world_size: int) -> list[dict[str, Any]]:
    """Every rank's ``row``, in rank order, on every rank (one collective all ranks enter)."""
    rows: list[Any] = [None] * world_size
    dist.all_gather_object(rows, row)
    return rows


def worker_rows(device: dict[str, Any], world_size: int,
                measure: Callable[[], dict[str, Any]]) -> list[dict[str, Any]]:
    """Every worker's row on every rank: the device rows first, then the measured ones.

    The device rows are gathered before any other collective, and every rank decides on the
    same gathered list, so either all ranks go on to ``measure`` (all-reduce, DeepSpeed's
    set-up, the step) or none does. Were a rank without its GPU to skip straight to the final
    gather, the others would wait for it in an all-reduce it never enters, for as long as the
    backend's timeout (30 minutes by default, on rented GPUs).

    Args:
        device: this rank's device row; an ``error`` key marks a rank that cannot go on.
        world_size: the number of ranks in the process group.
        measure: this rank's measured figures (collectives inside are entered by all ranks).
    """
    devices = gather_rows(device, world_size)
    if any("error" in r for r in devices):
        return devices
    return gather_rows({**device, **measure()}, world_size)
