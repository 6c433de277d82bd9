"""Milliseconds per batch of the heavy device augmentation (prints JSON).

Times :class:`raytrain_at.data.device_augment.DeviceAugment` with preset ``heavy`` (RandAugment
rand-m9-mstd0.5-inc1 + random erasing + MixUp/CutMix) on a random float batch already on the device,
and its RandAugment stage alone, as the median over ``--runs`` calls after ``--warmup`` calls.

Usage: python scripts/bench_augment.py [--batch 64] [--size 224] [--runs 10] [--warmup 3] [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from typing import Callable

import torch


def median_ms(fn: Callable[[], object], device: torch.device, runs: int, warmup: int) -> float:
    """Median wall time of ``fn`` in milliseconds, synchronising the device around each call."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        sync()
        start = time.perf_counter()
        fn()
        sync()  # the work is asynchronous on a GPU: time it to completion
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    import kornia
    import timm

    from raytrain_at.data.device_augment import DeviceAugment

    device = torch.device(args.device)
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(args.batch, 3, args.size, args.size, generator=gen).to(device)
    labels = torch.randint(0, 1000, (args.batch,), generator=gen).to(device)
    augment = DeviceAugment("heavy", num_classes=1000, seed=0)
    rand_gen = torch.Generator().manual_seed(0)

    heavy_ms = median_ms(lambda: augment(images, labels), device, args.runs, args.warmup)
    randaug_ms = median_ms(lambda: augment.randaugment(images, rand_gen), device, args.runs, args.warmup)
    result = {
        "preset": "heavy",
        "batch": args.batch,
        "resolution": args.size,
        "runs": args.runs,
        "warmup": args.warmup,
        "heavy_ms_per_batch": round(heavy_ms, 2),
        "randaugment_only_ms_per_batch": round(randaug_ms, 2),
        "images_per_s": round(args.batch / heavy_ms * 1000, 1),
        "device": str(device),
        "device_name": (torch.cuda.get_device_name(device) if device.type == "cuda"
                        else platform.processor() or platform.machine()),
        "cpu_threads": torch.get_num_threads(),
        "versions": {"torch": torch.__version__, "kornia": kornia.__version__, "timm": timm.__version__},
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
