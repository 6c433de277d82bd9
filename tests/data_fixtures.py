"""Generators of small on-disk datasets for the data tests (no network)."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
from PIL import Image

from raytrain_at.data.imagenet_subsets import imagenet_class_index, robustbench_5k_ids


def save_image(path: Path, side_h: int, side_w: int, value: int, fmt: str = "JPEG") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(value)
    pixels = np.clip(value + rng.integers(-20, 20, size=(side_h, side_w, 3)), 0, 255)
    Image.fromarray(pixels.astype(np.uint8)).save(path, format=fmt, quality=90)


def make_image_folder(root: Path, counts: dict[str, int], side: int = 12) -> Path:
    """class name -> number of images; each image's grey level encodes its class."""
    for c, (name, n) in enumerate(sorted(counts.items())):
        for i in range(n):
            save_image(root / name / f"img_{i:03d}.jpg", side + i % 3, side, 20 * c + 10)
    return root


def make_imagenet_tree(root: Path, train_per_class: int = 5) -> Path:
    """An ImageNet-shaped tree: train/ with every real synset, val/ with the RobustBench files.

    Images are 4x4 PNGs so the 10,000 files stay small and quick to write.
    """
    synsets = sorted(imagenet_class_index())
    tiny = Image.fromarray(np.full((4, 4, 3), 128, dtype=np.uint8))
    for synset in synsets:
        (root / "train" / synset).mkdir(parents=True, exist_ok=True)
        (root / "val" / synset).mkdir(parents=True, exist_ok=True)
        for i in range(train_per_class):
            tiny.save(root / "train" / synset / f"{synset}_{i}.JPEG", format="PNG")
    for image_id in robustbench_5k_ids():
        tiny.save(root / "val" / image_id, format="PNG")
    # A val image RobustBench does not use, to check it is left out.
    tiny.save(root / "val" / synsets[0] / "ILSVRC2012_val_99999999.JPEG", format="PNG")
    return root


def make_cifar10(root: Path, per_batch: int = 6) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {"data": rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8),
                 "labels": rng.integers(0, 10, size=per_batch).tolist()}
        with open(root / name, "wb") as handle:
            pickle.dump(batch, handle)
    return root


def make_flowers102(root: Path, n: int = 9) -> Path:
    """Flowers-102's distributed layout: jpg/image_XXXXX.jpg, imagelabels.mat, setid.mat."""
    from scipy.io import savemat

    for i in range(1, n + 1):
        save_image(root / "jpg" / f"image_{i:05d}.jpg", 10, 14, 10 * i)
    savemat(root / "imagelabels.mat", {"labels": np.array([[1 + i % 3 for i in range(n)]])})
    savemat(root / "setid.mat", {"trnid": np.array([[1, 2, 3]]), "valid": np.array([[4, 5, 6]]),
                                 "tstid": np.array([[7, 8, 9]])})
    return root
