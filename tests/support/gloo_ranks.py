"""Several CPU ranks on this machine (gloo), as torch.multiprocessing processes: how the DeepSpeed
tests run a real multi-rank engine without Ray."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch.multiprocessing.spawn import ProcessException

from raytrain_at.runtime.ports import free_local_port


def rank_environment(rank: int, world_size: int, port: int) -> None:
    """What ``deepspeed.init_distributed`` reads, and one thread per rank (two ranks share two
    cores)."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)


def spawn_ranks(worker: Callable[[int, int, str], None], out: Path, world_size: int,
                timeout_s: float = 300.0) -> None:
    """Run ``worker(rank, port, str(out))`` on ``world_size`` processes and wait for them.

    A rank that fails should write its traceback to ``out/rank{r}.err``: the test then fails
    with every rank's traceback; ranks still running after ``timeout_s`` are killed.
    """
    ctx = mp.spawn(worker, args=(free_local_port(), str(out)), nprocs=world_size, join=False)
    deadline = time.monotonic() + timeout_s
    try:
        # join() returns False whenever one rank ends while another still runs.
        while not ctx.join(timeout=max(deadline - time.monotonic(), 0.1)):
            if time.monotonic() > deadline:
                for process in ctx.processes:
                    process.kill()
                pytest.fail(f"the ranks did not finish in {timeout_s:.0f} s")
    except ProcessException as exc:  # a rank failed: show its traceback
        errors = "\n".join(p.read_text() for p in sorted(out.glob("*.err")))
        pytest.fail(f"ranks failed: {exc}\n{errors}")


def tiny_convnext_cvst() -> torch.nn.Module:
    """ConvNeXt-T + ConvStem at one block per stage and narrow widths, seeded: the model the
    DeepSpeed rank tests train (the real architecture, small enough for two CPU ranks)."""
    from raytrain_at.models import create_robust_model

    torch.manual_seed(0)
    return create_robust_model("convnext_tiny_cvst", num_classes=10, depths=(1, 1, 1, 1),
                               dims=(16, 32, 64, 128))
