"""Where images come from: ImageNet-style folder trees, CIFAR python batches, Flowers-102, and
scikit-learn's digits (the embedded default), all as a list of :class:`Sample`.

A sample is either a file path (decoded when written) or an in-memory uint8 HWC array, with an
integer label. Every reader validates its input up front and raises :class:`UserError` naming the
file or folder, before any writing starts.

Bundled data: scikit-learn's handwritten digits, 1,797 grey 8x8 images of 10 classes (0-16
intensities), shipped inside scikit-learn, so nothing is downloaded. They are upscaled (bilinear)
to ``side`` x ``side`` (32 by default: the smallest side every backbone here accepts) and repeated
to 3 channels. The split is fixed: a seeded permutation puts 1,500 images in ``trainval`` and 297
in ``test``; ``val`` is a seeded, class-balanced 10% of ``trainval`` (150 images) and ``train`` the
other 1,350.
"""

from __future__ import annotations

import io
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from raytrain_at.data.validation_split import CARVED_SPLITS, carve
from raytrain_at.errors import UserError

DIGITS_CLASSES = 10
DIGITS_TRAIN = 1500
IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png", ".bmp", ".ppm", ".webp", ".tif", ".tiff")


@dataclass(frozen=True)
class Sample:
    """One image: ``path`` to decode, or ``pixels`` (H, W, 3) uint8; and its class index."""

    label: int
    path: Path | None = None
    pixels: np.ndarray | None = None

    @property
    def name(self) -> str:
        return str(self.path) if self.path is not None else "<array>"


# --------------------------------------------------------------------------- digits
def digits_tensors(side: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """All digits as float images (N, 3, side, side) in [0, 1] and int64 labels (N,)."""
    from sklearn.datasets import load_digits

    digits: Any = load_digits()  # sklearn's stubs: a Bunch or a tuple, by return_X_y
    x = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0
    x = F.interpolate(x, size=(side, side), mode="bilinear", align_corners=False).clamp(0, 1)
    return x.repeat(1, 3, 1, 1), torch.tensor(digits.target, dtype=torch.long)


def digits_split_indices(split: str) -> np.ndarray:
    """The fixed trainval (1,500: train 1,350 + val 150) / test (297) split of the digits."""
    from sklearn.datasets import load_digits

    order = np.random.default_rng(0).permutation(1797)
    if split == "test":
        return np.sort(order[DIGITS_TRAIN:])
    if split not in CARVED_SPLITS:
        raise UserError(f"digits split {split!r} is not one of {', '.join(CARVED_SPLITS)}")
    trainval = np.sort(order[:DIGITS_TRAIN])
    # sklearn's stubs: a Bunch or a tuple, by return_X_y.
    return np.asarray(carve(list(trainval), load_digits().target[trainval], split, "digits"))  # pyright: ignore[reportAttributeAccessIssue]


def digits_samples(split: str = "train", side: int = 32) -> list[Sample]:
    """The digits of one split as RGB uint8 samples of ``side`` x ``side``."""
    if side < 8:
        raise UserError(f"digits side {side} is below the native 8 pixels")
    x, y = digits_tensors(side)
    idx = digits_split_indices(split)
    pixels = (x[idx].permute(0, 2, 3, 1) * 255).round().to(torch.uint8).numpy()
    return [Sample(label=int(label), pixels=np.ascontiguousarray(img))
            for img, label in zip(pixels, y[idx].tolist())]


# --------------------------------------------------------------------------- folders
def list_class_folders(root: Path) -> list[Path]:
    """Class sub-folders of an ImageFolder-style tree, sorted by name.

    Raises:
        UserError: if ``root`` is missing, not a folder, or has no class folders.
    """
    if not root.exists():
        raise UserError(f"source folder {str(root)!r} does not exist")
    if not root.is_dir():
        raise UserError(f"source {str(root)!r} is not a folder")
    classes = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise UserError(f"source folder {str(root)!r} has no class sub-folders")
    return classes


def images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def image_folder_samples(root: str | Path, class_index: dict[str, int] | None = None
                         ) -> list[Sample]:
    """Every image of a class-per-folder tree.

    Args:
        root: the tree (e.g. ImageNet ``train/`` or ``val/`` in class-folder layout).
        class_index: folder name -> label. ImageNet trees use the standard synset index; without
            it, labels follow the sorted folder names.

    Raises:
        UserError: missing/empty folder, a folder not in ``class_index``, or no images at all.
    """
    root = Path(root)
    classes = list_class_folders(root)
    if class_index is None:
        class_index = {folder.name: i for i, folder in enumerate(classes)}
    samples: list[Sample] = []
    for folder in classes:
        if folder.name not in class_index:
            raise UserError(f"class folder {str(folder)!r} is not in the class map")
        label = class_index[folder.name]
        samples.extend(Sample(label=label, path=path) for path in images_in(folder))
    if not samples:
        raise UserError(f"source folder {str(root)!r} contains no images "
                        f"({', '.join(IMAGE_SUFFIXES)})")
    return samples


# --------------------------------------------------------------------------- CIFAR
class _ArraysOnlyUnpickler(pickle.Unpickler):
    """CIFAR's python batches are pickles; allow only what they contain (dicts, lists, numpy
    arrays), so a tampered file cannot run code."""

    _ALLOWED = {("numpy.core.multiarray", "_reconstruct"),
                ("numpy._core.multiarray", "_reconstruct"),
                ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
                ("numpy._core.multiarray", "scalar")}

    def find_class(self, module: str, name: str):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a CIFAR batch")


def _load_cifar_batch(path: Path) -> dict:
    try:
        with open(path, "rb") as handle:
            batch = _ArraysOnlyUnpickler(io.BytesIO(handle.read()), encoding="latin1").load()
    except Exception as exc:  # noqa: BLE001 - any failure is the file's fault
        raise UserError(f"CIFAR batch {str(path)!r} cannot be read: {exc}") from None
    if not isinstance(batch, dict) or "data" not in batch:
        raise UserError(f"CIFAR batch {str(path)!r} has no 'data' array")
    return batch


def cifar_samples(root: str | Path, split: str = "train") -> list[Sample]:
    """CIFAR-10 (``cifar-10-batches-py``: data_batch_1..5, test_batch) or CIFAR-100
    (``cifar-100-python``: train, test) in the standard python batches layout, as 32x32 samples.
    ``trainval`` is the official training set, ``val`` a class-balanced 10% of it, ``train`` the
    rest.

    Raises:
        UserError: when the folder is not one of the two layouts or a batch is unreadable.
    """
    root = Path(root)
    if split not in CARVED_SPLITS:
        raise UserError(f"CIFAR split {split!r} is not one of {', '.join(CARVED_SPLITS)}")
    official = "test" if split == "test" else "train"
    if (root / "data_batch_1").exists():
        files = [root / f"data_batch_{i}" for i in range(1, 6)] if official == "train" else [
            root / "test_batch"]
        label_key = "labels"
    elif (root / "train").exists() and (root / "meta").exists():
        files, label_key = [root / official], "fine_labels"
    else:
        raise UserError(f"{str(root)!r} is not a CIFAR python-batches folder (expected "
                        "data_batch_1..5/test_batch or train/test/meta)")
    samples: list[Sample] = []
    for path in files:
        if not path.exists():
            raise UserError(f"CIFAR batch {str(path)!r} is missing")
        batch = _load_cifar_batch(path)
        data = np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        data = data.transpose(0, 2, 3, 1)
        labels = batch.get(label_key, batch.get("labels"))
        if labels is None or len(labels) != len(data):
            raise UserError(f"CIFAR batch {str(path)!r} has no matching {label_key!r}")
        samples.extend(Sample(label=int(label), pixels=np.ascontiguousarray(img))
                       for img, label in zip(data, labels))
    return samples if split == "test" else carve(samples, [s.label for s in samples], split,
                                                 "CIFAR")


# --------------------------------------------------------------------------- Flowers-102
FLOWERS_SPLITS = {"train": "trnid", "val": "valid", "test": "tstid"}


def flowers102_samples(root: str | Path, split: str = "train") -> list[Sample]:
    """Oxford Flowers-102 in its distributed layout: ``jpg/image_00001.jpg``, ``imagelabels.mat``
    (labels 1..102, stored here as 0..101) and ``setid.mat`` (trnid / valid / tstid)."""
    from scipy.io import loadmat

    root = Path(root)
    if split not in FLOWERS_SPLITS:
        raise UserError(f"Flowers-102 split {split!r} is not one of {list(FLOWERS_SPLITS)}")
    for required in ("jpg", "imagelabels.mat", "setid.mat"):
        if not (root / required).exists():
            raise UserError(f"{str(root)!r} is not a Flowers-102 folder: {required} is missing")
    labels = loadmat(root / "imagelabels.mat")["labels"].ravel()
    ids = loadmat(root / "setid.mat")[FLOWERS_SPLITS[split]].ravel()
    samples = []
    for image_id in sorted(int(i) for i in ids):
        path = root / "jpg" / f"image_{image_id:05d}.jpg"
        if not path.exists():
            raise UserError(f"Flowers-102 image {str(path)!r} listed in setid.mat is missing")
        samples.append(Sample(label=int(labels[image_id - 1]) - 1, path=path))
    return samples
