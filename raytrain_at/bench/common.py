"""What every speed benchmark shares: device timing, the machine's description, versions.

GPU work is asynchronous, so every timing here waits for the device before reading the clock.
"""

from __future__ import annotations

import datetime
import os
import platform
import resource
import statistics
import time
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version

import torch


def utc_now() -> str:
    """The time of a measurement, as recorded in every benchmark's JSON."""
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def default_device() -> str:
    """CUDA when present, else the CPU."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def cpu_threads() -> int:
    """The intra-op threads a benchmark runs with: ``OMP_NUM_THREADS`` when set, else every core
    this process may use. FFCV sets torch's count process-wide (to 1 when it is imported, to a
    loader's worker count when one is built), so the benchmarks set it back before they time."""
    value = os.environ.get("OMP_NUM_THREADS", "")
    return int(value) if value.isdigit() and int(value) > 0 else len(os.sched_getaffinity(0))


def synchronize(device: torch.device) -> None:
    """Wait until the device has finished the work queued so far (no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model name."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def package_versions(*names: str) -> dict[str, str | None]:
    """Installed versions of ``names`` (None for a missing one) and Python's."""
    found: dict[str, str | None] = {}
    for name in names:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return {**found, "python": platform.python_version()}


def timed_calls(fn: Callable[[], object], device: torch.device, runs: int,
                warmup: int) -> list[float]:
    """Seconds of each of ``runs`` calls of ``fn`` after ``warmup`` untimed ones, each timed to
    the completion of its device work."""
    for _ in range(warmup):  # allocator growth, cuDNN autotuning, compilation
        fn()
    times = []
    for _ in range(runs):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return times


def median_ms(fn: Callable[[], object], device: torch.device, runs: int, warmup: int) -> float:
    """Median wall time of ``fn`` in milliseconds (see :func:`timed_calls`)."""
    return statistics.median(timed_calls(fn, device, runs, warmup)) * 1000


def measure_peak_tflops(device: torch.device) -> dict[str, float | str]:
    """Dense matmul throughput of this device: the denominator of MFU (best of several).

    A bf16 8192^3 matmul on CUDA, an fp32 2048^3 one on the CPU (labelled as such: a CPU MFU is
    not a GPU MFU).
    """
    cuda = device.type == "cuda"
    # An fp32 2048^3 matmul takes ~0.05-0.5 s on a CPU: fewer repeats there.
    n, dtype, reps, warmup = ((8192, torch.bfloat16, 30, 3) if cuda
                              else (2048, torch.float32, 5, 1))
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = min(timed_calls(lambda: a @ b, device, runs=reps, warmup=warmup))
    return {"tflops": round(2 * n ** 3 / best / 1e12, 3),
            "kind": f"measured dense {'bf16' if cuda else 'fp32'} matmul {n}x{n}x{n} "
                    f"({'CUDA' if cuda else 'CPU: not comparable with a GPU peak'})"}


def reset_peak_memory(device: torch.device) -> None:
    """Start a new high-water mark of device memory (CUDA only; the CPU's cannot be reset)."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> dict[str, float]:
    """``peak_memory_mib`` on CUDA since :func:`reset_peak_memory`; on the CPU the process's
    ``process_max_rss_mib``, a high-water mark of the whole run (later rows include earlier
    ones)."""
    if device.type == "cuda":
        return {"peak_memory_mib": round(torch.cuda.max_memory_allocated(device) / 2 ** 20, 1)}
    # ru_maxrss is in KiB on Linux
    return {"process_max_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                                         / 1024, 1)}


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is the device running out of memory."""
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()

