"""Loader and augmentation throughput (prints JSON; figures go to BENCHMARKS.md).

1. Train pipeline: images/second of the FFCV train loader (random-resized-crop decode at 224,
   flip, uint8 -> float on the device) per decoding worker, from a .beton of 400px JPEG-90 images
   cut from the real photos bundled with scikit-learn.
2. Heavy augmentation (RandAugment + MixUp/CutMix + erasing) per batch on the device, and the same
   batch's 2-step APGD adversarial training step of ConvNeXt-T + ConvStem, for the ratio.

Usage: python scripts/bench_loader.py [--images 1024] [--batch 64] [--workers 1 2] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def photo_samples(n: int, side: int = 400, seed: int = 0):
    """``n`` RGB crops (side x 3/4 side) from scikit-learn's two bundled photos."""
    from sklearn.datasets import load_sample_images

    from raytrain_at.data.sources import Sample

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


def bench_loader(path: Path, workers: int, batch: int, device: str, epochs: int = 3) -> dict:
    from raytrain_at.data.ffcv_loaders import train_loader

    loader = train_loader(path, batch_size=batch, resolution=224, num_workers=workers,
                          device=device, seed=0)
    for _ in loader:  # first epoch compiles the pipeline (numba)
        pass
    rates = []
    for _ in range(epochs):
        start = time.perf_counter()
        count = 0
        for images, _ in loader:
            count += images.shape[0]
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        rates.append(count / (time.perf_counter() - start))
    rate = statistics.median(rates)
    return {"workers": workers, "images_per_s": round(rate, 1),
            "images_per_s_per_worker": round(rate / workers, 1)}


def bench_augmentation(batch: int, device: str, repeats: int = 5) -> dict:
    from raytrain_at.attacks import APGD
    from raytrain_at.data.device_augment import DeviceAugment
    from raytrain_at.models import create_robust_model
    from raytrain_at.config import ObjectiveSection
    from raytrain_at.training.objectives import training_step_loss

    images = torch.rand(batch, 3, 224, 224, device=device)
    labels = torch.randint(0, 1000, (batch,), device=device)
    augment = DeviceAugment("heavy", num_classes=1000, seed=0)

    def timed(fn) -> float:
        fn()
        times = []
        for _ in range(repeats):
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        return statistics.median(times) * 1000

    aug_ms = timed(lambda: augment(images, labels))
    model = create_robust_model("convnext_tiny_cvst", num_classes=1000).to(device).train()
    attack = APGD.for_training(model, eps=4 / 255, n_iter=2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x_aug, soft = augment(images, labels)

    def step() -> None:
        out = training_step_loss(model, attack, x_aug, soft, ObjectiveSection())
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        optimizer.step()

    step_ms = timed(step) if repeats else float("nan")
    return {"batch": batch, "heavy_augment_ms": round(aug_ms, 1),
            "adv_step_2apgd_convnext_tiny_cvst_ms": round(step_ms, 1),
            "augment_share_of_step": round(aug_ms / (aug_ms + step_ms), 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--aug-batch", type=int, default=32)
    parser.add_argument("--step-repeats", type=int, default=2)
    args = parser.parse_args()

    from importlib.metadata import version

    from raytrain_at.data.ffcv_writer import WriteOptions, write_beton

    result = {"machine": platform.processor() or platform.machine(),
              "cpu_count": os.cpu_count(), "device": args.device,
              "device_name": torch.cuda.get_device_name() if args.device.startswith("cuda")
              else platform.machine(),
              "versions": {name: version(name) for name in ("torch", "ffcv", "kornia", "timm")}}
    with tempfile.TemporaryDirectory() as tmp:
        path = write_beton(photo_samples(args.images), Path(tmp) / "photos400.beton",
                           WriteOptions(max_resolution=400, write_mode="jpg", jpeg_quality=90))
        result["file"] = {"images": args.images, "max_side": 400, "jpeg_quality": 90,
                          "bytes": path.stat().st_size}
        result["train_loader_224"] = [bench_loader(path, w, args.batch, args.device)
                                      for w in args.workers]
    torch.manual_seed(0)
    result["augmentation_224"] = bench_augmentation(args.aug_batch, args.device,
                                                    repeats=args.step_repeats)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
