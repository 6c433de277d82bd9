"""The preflight's per-worker checks in this one process, without Ray (the GPU check's
``preflight`` part: Ray's wheel is too large to travel to a lent GPU): device, CUDA build
against the driver, the real train step at the recipe's micro-batch and the loader beside it,
with the same verdicts ``raytrain-at preflight`` gives."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

# DeepSpeed writes log lines and op builds to stdout: they go to stderr, the JSON alone stays.
from raytrain_at.bench.commands import _stdout_on_stderr as stdout_on_stderr
from raytrain_at.bench.step import bench_config, init_single_rank, write_placeholder_file
from raytrain_at.errors import UserError
from raytrain_at.preflight.checks import Check
from raytrain_at.preflight.gather import worker_rows
from raytrain_at.preflight.verdicts import (all_reduce_check, device_check, loader_check,
                                            step_check)
from raytrain_at.preflight.worker import device_row, measure_worker
from raytrain_at.training.loop import WorkerPlace


def run_in_process(*, model: str | None, batch: int | None, resolution: int | None,
                   device: torch.device, steps: int, warmup: int,
                   loader_batches: int, folder: Path) -> dict[str, Any]:
    """One worker's preflight row and its checks (``blocker`` set on a check that failed).

    The loader reads a placeholder file of ``loader_batches + 1`` batches (its first batch
    compiles the pipeline and is not timed), so its rate is the loader's, not the disk's.
    """
    config = bench_config(model=model, batch=batch, resolution=resolution, device=device)
    samples = config.per_worker_batch_size * (loader_batches + 1)
    train_path = write_placeholder_file(folder / "preflight.beton", samples)
    config = bench_config(model=model, batch=batch, resolution=resolution, device=device,
                          train_path=train_path)
    place = WorkerPlace(rank=0, world_size=1, device=device)
    init_single_rank(device)
    rows = worker_rows(device_row(config, place), 1,
                       lambda: measure_worker(config, place, str(train_path), steps=steps,
                                              warmup=warmup, loader_batches=loader_batches))
    checks: list[Check] = [device_check(rows, config)]
    if checks[0].passed:
        checks += [all_reduce_check(rows), step_check(rows), loader_check(rows, config)]
    return {"model": config.model.name, "batch": config.per_worker_batch_size,
            "resolution": config.data.resolution, "rows": rows,
            "checks": [c.as_dict() for c in checks],
            "blocker": next((c.blocker for c in checks if c.blocker is not None), None)}


def main(argv: list[str] | None = None) -> int:
    """Print the document as one JSON line; exit 1 when a check found a blocker."""
    parser = argparse.ArgumentParser(prog="python -m raytrain_at.preflight.in_process")
    parser.add_argument("--model")
    parser.add_argument("--batch", type=int, help="per-worker micro-batch (default: recipe's)")
    parser.add_argument("--resolution", type=int)
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--loader-batches", type=int, default=8)
    args = parser.parse_args(argv)
    try:
        with (stdout_on_stderr(),
              tempfile.TemporaryDirectory(prefix="preflight-in-process-") as folder):
            doc = run_in_process(model=args.model, batch=args.batch,
                                 resolution=args.resolution, device=torch.device(args.device),
                                 steps=args.steps, warmup=args.warmup,
                                 loader_batches=args.loader_batches, folder=Path(folder))
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(doc))
    return 1 if doc["blocker"] else 0


if __name__ == "__main__":
    sys.exit(main())
