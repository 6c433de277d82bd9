"""The checks each Ray Train worker makes, placed as ``train`` places its workers: the device,
an all-reduce across the workers, the loader's rate and the real training step's."""

from __future__ import annotations

import json
import os
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from raytrain_at.bench.common import peak_memory, reset_peak_memory, synchronize, timed_calls
from raytrain_at.bench.step import build_worker_step
from raytrain_at.config import RunConfig
from raytrain_at.preflight.gather import worker_rows
from raytrain_at.training.loop import WorkerPlace
from raytrain_at.training.single_rank import rank_environment

# Bytes all-reduced per timed call: large enough for NCCL to reach its bus bandwidth, small
# enough for a CPU worker's gloo in well under a second.
ROWS_FILE = "preflight-rows.json"
ALL_REDUCE_BYTES = {"cuda": 256 * 2**20, "cpu": 8 * 2**20}


def device_facts(device: torch.device, want_gpu: bool) -> dict[str, Any]:
    """The worker's device, torch's CUDA build and the driver's version (where there is one)."""
    facts: dict[str, Any] = {"device": str(device), "torch": torch.__version__,
                             "cuda_build": torch.version.cuda,
                             "cuda_available": torch.cuda.is_available()}
    if want_gpu and torch.cuda.is_available():
        facts["gpu"] = torch.cuda.get_device_name(device)
        facts["driver"] = _driver_version()
    return facts


def _driver_version() -> str | None:
    """The NVIDIA driver's version, as nvidia-smi reports it (None without nvidia-smi)."""
    if shutil.which("nvidia-smi") is None:
        return None
    out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                         capture_output=True, text=True, timeout=20, check=False)
    return out.stdout.splitlines()[0].strip() if out.returncode == 0 and out.stdout else None


def all_reduce_bandwidth(device: torch.device, runs: int = 5) -> dict[str, Any]:
    """Median seconds of an all-reduce of a float32 buffer over the job's process group, and
    its bus bandwidth (nccl-tests' convention: 2 (n - 1) / n x bytes / time)."""
    world = dist.get_world_size()
    size = ALL_REDUCE_BYTES["cuda" if device.type == "cuda" else "cpu"]
    buffer = torch.ones(size // 4, dtype=torch.float32, device=device)
    times = timed_calls(lambda: dist.all_reduce(buffer), device, runs=runs, warmup=1)
    # Every rank added ones: a wrong reduction (or none) shows here rather than in training.
    expected = float(world) ** (runs + 1)
    correct = bool(torch.isclose(buffer[:1], torch.tensor(expected, device=device)).item())
    seconds = statistics.median(times)
    bus = 2 * (world - 1) / world * size / seconds / 1e9 if world > 1 else None
    return {"backend": dist.get_backend(), "world_size": world,
            "all_reduce_mib": size / 2**20, "all_reduce_s": round(seconds, 5),
            "bus_gb_per_s": None if bus is None else round(bus, 3),
            "all_reduce_correct": correct}


def loader_rate(loader, batches: int) -> dict[str, Any]:
    """Images/s of this worker's FFCV train loader over ``batches`` batches (whole epochs as
    needed), after its first batch (which compiles the pipeline)."""
    device_batches = 0
    images = 0
    start = None
    device = None
    while device_batches < batches:
        for pixels, _ in loader:
            if start is None:  # the first batch: numba compiles the pipeline
                start, device = time.perf_counter(), pixels.device
                continue
            images += pixels.shape[0]
            device_batches += 1
            if device_batches >= batches:
                break
        if start is None:
            break  # an empty loader (the launch's own validation refuses it)
    if device is not None:
        synchronize(device)
    seconds = time.perf_counter() - start if start is not None else 0.0
    return {"loader_batches": device_batches,
            "loader_images_per_s": round(images / seconds, 1) if seconds > 0 else 0.0}


def measure_worker(config: RunConfig, place: WorkerPlace, train_path: str, *, steps: int,
                   warmup: int, loader_batches: int) -> dict[str, Any]:
    """The measured figures of one worker beside its device row: all-reduce, loader, step
    (its process group must exist; every rank calls it, or none)."""
    row: dict[str, Any] = dict(all_reduce_bandwidth(place.device))
    reset_peak_memory(place.device)
    loop, variant = build_worker_step(config, place, train_path)
    row.update(loader_rate(loop.train_data, loader_batches))
    threads = torch.get_num_threads()
    times = timed_calls(variant.step, place.device, runs=steps, warmup=warmup)
    median = statistics.median(times)
    row.update({"batch": config.per_worker_batch_size, "step_s_median": round(median, 5),
                "step_images_per_s": round(config.per_worker_batch_size / median, 1),
                "torch_threads": threads, "loader_workers": config.data.loader_workers,
                **peak_memory(place.device)})
    return row


def device_row(config: RunConfig, place: WorkerPlace) -> dict[str, Any]:
    """This worker's device facts, with an ``error`` where it lacks the device the recipe asks
    for (no collective here: a failing rank must still reach :func:`.gather.worker_rows`)."""
    row: dict[str, Any] = {"rank": place.rank, "node": socket.gethostname(),
                           "torch": torch.__version__, "cuda_build": torch.version.cuda}
    try:
        row.update(device_facts(place.device, config.scaling.use_gpu))
    except Exception as exc:  # noqa: BLE001 - a broken driver raises whatever CUDA says
        lines = str(exc).strip().splitlines()
        row["error"] = f"the device check raised {type(exc).__name__}" + (
            f": {lines[0][:160]}" if lines else "")
        return row
    if config.scaling.use_gpu and place.device.type != "cuda":
        row["error"] = "no CUDA device on this worker"
    return row


def preflight_worker(payload: dict[str, Any]) -> None:
    """Ray Train worker entry: check this worker's device, measure it where every worker has
    its device, gather every worker's row on each rank, and report them (rank 0's report is
    the one the driver reads)."""
    import ray.train
    import ray.train.torch

    context = ray.train.get_context()
    place = WorkerPlace(rank=context.get_world_rank(), world_size=context.get_world_size(),
                        device=ray.train.torch.get_device())
    rank_environment(place.rank, place.world_size, context.get_local_rank(), 29500,
                     keep_existing=True)
    os.environ.setdefault("MLFLOW_TRACKING_URI", payload["tracking_uri"])
    config = RunConfig.model_validate(payload["run"])
    rows = worker_rows(
        device_row(config, place), place.world_size,
        lambda: measure_worker(config, place, payload["train_path"], steps=payload["steps"],
                               warmup=payload["warmup"],
                               loader_batches=payload["loader_batches"]))
    # Ray Train V2 keeps a report's metrics only with a checkpoint: rank 0 writes the rows as
    # one (the driver reads it from the result), the others report none. The report copies
    # the folder to the run's storage before it returns, so the local one can go.
    if place.rank == 0:
        with tempfile.TemporaryDirectory(prefix="preflight-rows-") as folder:
            (Path(folder) / ROWS_FILE).write_text(json.dumps(rows))
            ray.train.report({"workers": len(rows)},
                             checkpoint=ray.train.Checkpoint.from_directory(folder))
    else:
        ray.train.report({"workers": len(rows)})
