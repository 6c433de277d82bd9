"""The workers' figures turned into checks: device, all-reduce, step, loader against step."""

from __future__ import annotations

from typing import Any

from raytrain_at.config import RunConfig
from raytrain_at.preflight.checks import Check, blocked, passed


def device_check(rows: list[dict[str, Any]], config: RunConfig) -> Check:
    """Every worker has the device the recipe asks for (GPU: CUDA available, a driver)."""
    missing = [r for r in rows if "error" in r]
    if missing:
        first = missing[0]
        return blocked("device", f"worker {first['rank']} on {first['node']}: {first['error']} "
                       f"(torch {first['torch']}, CUDA build {first['cuda_build']}): install "
                       "torch for the node's CUDA driver, or --set scaling.use_gpu=false")
    first = rows[0]
    if config.scaling.use_gpu:
        return passed("device", f"{len(rows)} x GPU",
                      f"{first.get('gpu')}; torch {first['torch']} CUDA {first['cuda_build']}, "
                      f"driver {first.get('driver')}")
    return passed("device", f"{len(rows)} x CPU", f"torch {first['torch']}")


def all_reduce_check(rows: list[dict[str, Any]]) -> Check:
    """The all-reduce summed correctly on every worker; the slowest rank's bus bandwidth."""
    wrong = [r["rank"] for r in rows if not r["all_reduce_correct"]]
    if wrong:
        return blocked("all-reduce", f"ranks {wrong} got a wrong all-reduce sum over "
                       f"{rows[0]['backend']}: check the NCCL / network settings")
    slowest = max(rows, key=lambda r: r["all_reduce_s"])
    bus = slowest["bus_gb_per_s"]
    figure = (f"{slowest['all_reduce_mib']:.0f} MiB in {slowest['all_reduce_s'] * 1e3:.1f} ms"
              + ("" if bus is None else f", bus {bus:.2f} GB/s"))
    return passed("all-reduce", f"{slowest['backend']} x {slowest['world_size']}", figure)


def step_check(rows: list[dict[str, Any]]) -> Check:
    """The real training step's rate (slowest worker) and peak memory (largest)."""
    slowest = min(rows, key=lambda r: r["step_images_per_s"])
    memory = max(rows, key=lambda r: r.get("peak_memory_mib", r.get("process_max_rss_mib", 0)))
    mib = memory.get("peak_memory_mib", memory.get("process_max_rss_mib"))
    kind = "peak GPU memory" if "peak_memory_mib" in memory else "max RSS"
    return passed("step", "ok", f"{slowest['step_images_per_s']:.1f} img/s per worker at "
                  f"batch {slowest['batch']} ({slowest['step_s_median'] * 1e3:.1f} ms); "
                  f"{kind} {mib:.0f} MiB")


def loader_check(rows: list[dict[str, Any]], config: RunConfig, margin: float = 1.0) -> Check:
    """A worker whose loader delivers fewer than ``margin`` x the images per second its step
    takes is a blocker: the GPU (or CPU) would wait on decoding for the whole run.

    Args:
        rows: the workers' rows (``loader_images_per_s``, ``step_images_per_s``).
        config: the run's config, for the settings the blocker names.
        margin: how many times the step's rate the loader must reach (1: as fast; above 1
            leaves room for what the preflight's loader pass does not share its CPUs with).
    """
    for row in rows:
        loader, step = row["loader_images_per_s"], row["step_images_per_s"]
        if loader < margin * step:
            than = ("slower than" if margin == 1 else
                    f"below --loader-margin {margin:g} x")
            return blocked("loader", f"worker {row['rank']}'s loader gives {loader:.1f} img/s "
                           f"with data.loader_workers={config.data.loader_workers}, {than} "
                           f"its step's {step:.1f} img/s: raise data.loader_workers (and "
                           f"scaling.cpus_per_worker={config.scaling.cpus_per_worker:g} with "
                           "it)")
    slowest = min(rows, key=lambda r: r["loader_images_per_s"])
    return passed("loader", "ok", f"{slowest['loader_images_per_s']:.1f} img/s per worker "
                  f"with data.loader_workers={config.data.loader_workers} "
                  f"({slowest['loader_images_per_s'] / slowest['step_images_per_s']:.1f}x the "
                  "step)")
