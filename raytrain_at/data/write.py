"""``raytrain-at data write-ffcv``: pick the samples of a source (and subset), then write them.

Sources: ``digits`` (bundled), a CIFAR-10/100 python-batches folder, a Flowers-102 folder, the
robust fine-tuning benchmark's datasets (:mod:`raytrain_at.data.finetune_datasets`), or an
ImageFolder tree (ImageNet ``train/`` / ``val/``, or any class-per-folder dataset). For an ImageNet
root (holding ``train/`` and ``val/``), subsets pick their split: ``robustbench5k`` reads ``val/``,
``heldout4k`` reads ``train/``. Class folders named by ImageNet synsets get the standard ImageNet
index; other trees are labelled in sorted folder order.
"""

from __future__ import annotations

import contextlib
import io
import logging
from pathlib import Path
from typing import Literal

from raytrain_at.data import imagenet_subsets as subsets
from raytrain_at.data.finetune_datasets import (READERS as FINETUNE_READERS,
                                                 detect_dataset_format)
from raytrain_at.data.ffcv_writer import FULL_QUALITY, WriteOptions, write_beton
from raytrain_at.data.provenance import read_provenance, write_provenance
from raytrain_at.data.sources import (Sample, cifar_samples, digits_samples, flowers102_samples,
                                      image_folder_samples, list_class_folders)
from raytrain_at.errors import UserError

log = logging.getLogger(__name__)

Subset = Literal["robustbench5k", "heldout4k"]
SUBSETS: tuple[str, ...] = ("robustbench5k", "heldout4k")


def detect_format(source: str) -> str:
    """Guess the layout of ``source``: digits, cifar, flowers102, one of the robust fine-tuning
    benchmark's datasets (see :mod:`raytrain_at.data.finetune_datasets`) or imagefolder."""
    if source == "digits":
        return "digits"
    root = Path(source)
    if (root / "data_batch_1").exists() \
            or ((root / "train").is_file() and (root / "meta").exists()):
        return "cifar"
    if (root / "imagelabels.mat").exists():
        return "flowers102"
    return detect_dataset_format(root) or "imagefolder"


def _split_dir(root: Path, split: str) -> Path:
    """``root/split`` for an ImageNet root, else ``root`` itself."""
    return root / split if (root / split).is_dir() else root


def _imagenet_index_if_synsets(root: Path) -> dict[str, int] | None:
    index = subsets.imagenet_class_index()
    names = [p.name for p in list_class_folders(root)]
    return index if all(name in index for name in names) else None


def collect_samples(source: str, *, split: str = "train", subset: str | None = None,
                    exclude_heldout: bool = False, digits_side: int = 32) -> list[Sample]:
    """The samples a write would store, validated (nothing is decoded yet)."""
    if subset is not None and subset not in SUBSETS:
        raise UserError(f"--subset {subset!r} is not one of {', '.join(SUBSETS)}")
    fmt = detect_format(source)
    if fmt != "imagefolder" and (subset or exclude_heldout):
        raise UserError(f"--subset / --exclude-heldout apply to ImageNet folders, not {fmt} "
                        f"source {source!r}")
    if fmt == "digits":
        return digits_samples(split, digits_side)
    if fmt == "cifar":
        return cifar_samples(source, split)
    if fmt == "flowers102":
        return flowers102_samples(source, split)
    if fmt in FINETUNE_READERS:
        return FINETUNE_READERS[fmt](source, split)
    root = Path(source)
    if subset == "robustbench5k":
        return subsets.robustbench5k_samples(_split_dir(root, "val"))
    if subset == "heldout4k":
        return subsets.heldout4k_samples(_split_dir(root, "train"))
    folder = _split_dir(root, split) if (root / "train").is_dir() else root
    if exclude_heldout:
        return subsets.imagenet_train_samples(folder, exclude_heldout=True)
    return image_folder_samples(folder, _imagenet_index_if_synsets(folder))


def default_options(subset: str | None) -> WriteOptions:
    """FFCV's ImageNet recipe; the RobustBench test set at full quality (original pixels)."""
    return FULL_QUALITY if subset == "robustbench5k" else WriteOptions()


def write_dataset(source: str, out: str | Path, *, split: str = "train",
                  subset: str | None = None, exclude_heldout: bool = False,
                  options: WriteOptions | None = None, digits_side: int = 32) -> Path:
    """Collect the samples of ``source`` (and ``subset``) and write them to ``out``."""
    out = Path(out)
    if out.suffix != ".beton":
        raise UserError(f"output {str(out)!r} must end in .beton")
    if not out.parent.exists():
        raise UserError(f"output folder {str(out.parent)!r} does not exist")
    samples = collect_samples(source, split=split, subset=subset,
                              exclude_heldout=exclude_heldout, digits_side=digits_side)
    written = write_beton(samples, out, options or default_options(subset))
    write_provenance(written, {"source": str(source), "split": None if subset else split,
                               "subset": subset, "exclude_heldout": exclude_heldout,
                               "samples": len(samples)})
    return written


BUNDLED: tuple[str, ...] = ("digits",)


def bundled_beton(name: str, split: str, storage: Path) -> str:
    """The bundled dataset ``name`` (split ``train``, ``val`` or ``test``) as a .beton under
    ``storage``,
    written once and then reused; quietly, as it takes a second and a progress bar would only
    clutter the output of the command that needs it.

    Written with original pixels: FFCV's 'proportion' mode JPEG-compresses a random half of the
    images in its writer processes, so two writes of the same data would hold different pixels
    (and a fresh machine would train and evaluate on other images than the last one did)."""
    if name not in BUNDLED:
        raise UserError(f"unknown bundled dataset {name!r} (bundled: {', '.join(BUNDLED)})")
    target = Path(storage) / "datasets" / f"{name}_{split}.beton"
    # Rewritten when its provenance is missing or predates checksums (a home from an older
    # version): the run start checks the file against it.
    if not target.exists() or "sha256" not in (read_provenance(target) or {}):
        target.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.redirect_stderr(io.StringIO()):
            write_dataset(name, target, split=split, options=FULL_QUALITY)
    return str(target)

