"""``raytrain-at bench loader``: loader and augmentation throughput against the training step.

1. Train pipeline: images/second of the FFCV train loader (random-resized-crop decode at 224,
   flip, uint8 -> float on the device) per decoding worker, from a .beton of 400 px JPEG-90 images
   cut from the real photos bundled with scikit-learn; the median of 3 epochs after the epoch
   that compiles the pipeline (numba), then one epoch with the heavy augmentation applied to
   every batch (loader and augmentation together).
2. Heavy augmentation (RandAugment + MixUp/CutMix + erasing, ``DeviceAugment("heavy")``) per
   batch on the device, its RandAugment stage alone, and the training step of ConvNeXt-T +
   ConvStem at the same batch (``WorkerLoop.train_step`` under DeepSpeed at 224, 2-step APGD, as
   ``bench step`` times it; the step includes the next batch's augmentation, so the share is
   augmentation / step).
"""

from __future__ import annotations

import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.datasets import load_sample_images

from raytrain_at.bench.common import (cpu_threads, default_device, device_name, median_ms,
                                      package_versions, synchronize, utc_now)
from raytrain_at.bench.settings import LoaderBenchSettings
from raytrain_at.bench.step import bench_config, init_single_rank, measure_train_step
from raytrain_at.data.device_augment import DeviceAugment
from raytrain_at.data.ffcv_loaders import train_loader
from raytrain_at.data.ffcv_writer import WriteOptions, write_beton
from raytrain_at.data.sources import Sample
from raytrain_at.training.loop import WorkerPlace

STEP_MODEL = "convnext_tiny_cvst"
RESOLUTION = 224


def photo_samples(n: int, side: int = 400, seed: int = 0) -> list[Sample]:
    """``n`` RGB crops (side x 3/4 side) from scikit-learn's two bundled photos."""
    photos = load_sample_images().images  # two 427x640 photographs
    rng = np.random.default_rng(seed)
    height = side * 3 // 4
    samples = []
    for i in range(n):
        photo = photos[i % len(photos)]
        top = rng.integers(0, photo.shape[0] - height + 1)
        left = rng.integers(0, photo.shape[1] - side + 1)
        crop = np.ascontiguousarray(photo[top:top + height, left:left + side])
        samples.append(Sample(label=i % 10, pixels=crop))
    return samples


def write_photo_file(path: Path, images: int) -> Path:
    """The benchmark's file: ``images`` 400 px JPEG-90 crops of the bundled photographs."""
    return write_beton(photo_samples(images), path,
                       WriteOptions(max_resolution=400, write_mode="jpg", jpeg_quality=90))


def _epoch_rate(loader, device: torch.device, augment: DeviceAugment | None = None) -> float:
    """Images/s of one pass over ``loader`` (``augment`` applied to each batch), timed to the
    completion of the device work."""
    start, count = time.perf_counter(), 0
    for images, labels in loader:
        if augment is not None:
            augment(images, labels)
        count += images.shape[0]
    synchronize(device)
    return count / (time.perf_counter() - start)


def loader_rate(path: Path, workers: int, batch: int, device: torch.device,
                epochs: int = 3) -> dict[str, Any]:
    """Images/s of the train loader with ``workers`` decoding workers (median of ``epochs``),
    and of one more epoch with the heavy augmentation applied to every batch."""
    loader = train_loader(path, batch_size=batch, resolution=RESOLUTION, num_workers=workers,
                          device=device, seed=0)
    _epoch_rate(loader, device)  # the first epoch compiles the pipeline (numba)
    rate = statistics.median(_epoch_rate(loader, device) for _ in range(epochs))
    augmented = _epoch_rate(loader, device, DeviceAugment("heavy", num_classes=1000, seed=0))
    return {"workers": workers, "images_per_s": round(rate, 1),
            "images_per_s_per_worker": round(rate / workers, 1),
            "images_per_s_with_heavy_augmentation": round(augmented, 1)}


def augmentation_against_step(batch: int, device: torch.device, repeats: int,
                              train_path: Path) -> dict[str, Any]:
    """Milliseconds of the heavy augmentation (and of its RandAugment alone) per batch, and of
    the training step at the same batch."""
    torch.set_num_threads(cpu_threads())  # the loaders built before set it to their workers
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(batch, 3, RESOLUTION, RESOLUTION, generator=generator).to(device)
    labels = torch.randint(0, 1000, (batch,), generator=generator).to(device)
    augment = DeviceAugment("heavy", num_classes=1000, seed=0)
    choices = torch.Generator().manual_seed(0)
    runs = max(repeats, 1)
    aug_ms = median_ms(lambda: augment(images, labels), device, runs=runs, warmup=1)
    randaugment_ms = median_ms(lambda: augment.randaugment(images, choices), device, runs=runs,
                               warmup=1)
    out: dict[str, Any] = {"batch": batch, "heavy_augment_ms": round(aug_ms, 1),
                           "randaugment_only_ms": round(randaugment_ms, 1),
                           "heavy_augment_images_per_s": round(batch / aug_ms * 1000, 1)}
    if repeats:
        init_single_rank(device)
        config = bench_config(model=STEP_MODEL, batch=batch, resolution=RESOLUTION,
                              device=device, train_path=train_path)
        step = measure_train_step(config, WorkerPlace(0, 1, device), train_path, steps=repeats,
                                  warmup=1, threads=cpu_threads())
        step_ms = step["step_s_median"] * 1000
        out.update({f"adv_step_2apgd_{STEP_MODEL}_ms": round(step_ms, 1),
                    "augment_share_of_step": round(aug_ms / step_ms, 4)})
    return out


def run_loader_bench(settings: LoaderBenchSettings) -> dict[str, Any]:
    """The JSON document of ``bench loader``."""
    device = torch.device(settings.device or default_device())
    result: dict[str, Any] = {
        "date": utc_now(), "machine": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(), "device": str(device), "device_name": device_name(device),
        "torch_threads": cpu_threads(),
        "versions": package_versions("torch", "ffcv", "kornia", "timm", "deepspeed")}
    with tempfile.TemporaryDirectory(prefix="bench-loader-") as tmp:
        path = write_photo_file(Path(tmp) / "photos400.beton", settings.images)
        result["file"] = {"images": settings.images, "max_side": 400, "jpeg_quality": 90,
                          "bytes": path.stat().st_size}
        result["train_loader_224"] = [loader_rate(path, w, settings.batch, device)
                                      for w in settings.workers]
        torch.manual_seed(0)
        result["augmentation_224"] = augmentation_against_step(
            settings.aug_batch, device, settings.step_repeats, path)
    return result
