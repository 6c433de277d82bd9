"""Shared pieces of the tests that run a real single-rank ``WorkerLoop`` in a spawned process."""

from __future__ import annotations

import json
import multiprocessing
from pathlib import Path
from typing import Callable, Iterator

import torch

from raytrain_at.training.single_rank import single_rank_environment  # noqa: F401 (re-export)


def digit_batches(batch: int, count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The first ``count`` batches of the bundled digits at 32x32."""
    from raytrain_at.data.sources import digits_tensors

    x, y = digits_tensors(side=32)
    return [(x[i * batch:(i + 1) * batch].contiguous(), y[i * batch:(i + 1) * batch].contiguous())
            for i in range(count)]


class FixedBatches:
    """Stands in for the FFCV loader: the same batches every epoch (fresh copies each time)."""

    def __init__(self, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def set_epoch(self, epoch: int) -> None:
        pass

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for images, labels in self.batches:
            yield images.clone(), labels.clone()


def run_in_spawned_process(target: Callable[[str, str], None], storage: Path, out: Path,
                           timeout: float) -> dict:
    """Run ``target(storage, out)`` in a spawned process; it writes ``result.json`` (or
    ``error.txt``, whose text fails the test) into ``out``."""
    import pytest

    process = multiprocessing.get_context("spawn").Process(target=target,
                                                           args=(str(storage), str(out)))
    process.start()
    process.join(timeout=timeout)
    if process.is_alive():
        process.kill()
        pytest.fail(f"the training process did not finish in {timeout:.0f} s")
    error = out / "error.txt"
    assert not error.exists(), error.read_text()
    return json.loads((out / "result.json").read_text())
