"""Readers for the robust fine-tuning benchmark's datasets, from their distributed layouts.

Each reader returns the :class:`~raytrain_at.data.sources.Sample` list of one split (image path
and 0-based class index) for ``raytrain-at data write-ffcv SRC OUT.beton --split S``. Where a
dataset has no official split, the split is a seeded, class-balanced one, so every machine writes
the same files. docs/data.md lists each dataset's layout and splits.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from raytrain_at.data.sources import Sample, images_in, list_class_folders
from raytrain_at.data.validation_split import CARVED_SPLITS, carve
from raytrain_at.errors import UserError

SPLIT_SEED = 0
CALTECH_TRAIN_PER_CLASS = 30  # the usual Caltech-101 protocol
UC_MERCED_TRAIN_PER_CLASS = 80  # 80 / 20 of the 100 images of each class


def _check_split(name: str, split: str, allowed: tuple[str, ...]) -> None:
    if split not in allowed:
        raise UserError(f"{name} split {split!r} is not one of {', '.join(allowed)}")


def _carved(samples: list[Sample], split: str, name: str) -> list[Sample]:
    """``train`` / ``val`` / ``trainval`` of an official training split (see
    :mod:`raytrain_at.data.validation_split`)."""
    return carve(samples, [s.label for s in samples], split, name)


def _per_class_split(folders: list[Path], split: str, train_per_class: int,
                     name: str) -> list[Sample]:
    """The first ``train_per_class`` images of a seeded shuffle of each class are the training
    split (``train`` / ``val`` / ``trainval`` carved from it), the rest test (the shuffle depends
    only on the sorted file names and :data:`SPLIT_SEED`)."""
    samples = []
    for label, folder in enumerate(folders):
        files = sorted(images_in(folder))
        if len(files) <= train_per_class:
            raise UserError(f"{name} class folder {str(folder)!r} has {len(files)} images: "
                            f"needs more than {train_per_class} for its train / test split")
        order = np.random.default_rng([SPLIT_SEED, label]).permutation(len(files))
        chosen = order[train_per_class:] if split == "test" else order[:train_per_class]
        samples.extend(Sample(label=label, path=files[i]) for i in sorted(chosen))
    return samples if split == "test" else _carved(samples, split, name)


def caltech101_samples(root: str | Path, split: str = "train") -> list[Sample]:
    """Caltech-101 (see the module table)."""
    _check_split("Caltech-101", split, CARVED_SPLITS)
    root = Path(root)
    folder = root if root.name == "101_ObjectCategories" else root / "101_ObjectCategories"
    classes = [f for f in list_class_folders(folder) if f.name != "BACKGROUND_Google"]
    return _per_class_split(classes, split, CALTECH_TRAIN_PER_CLASS, "Caltech-101")


def uc_merced_samples(root: str | Path, split: str = "train") -> list[Sample]:
    """UC Merced Land Use (see the module table)."""
    _check_split("UC Merced", split, CARVED_SPLITS)
    root = Path(root)
    for candidate in (root / "UCMerced_LandUse" / "Images", root / "Images", root):
        if candidate.name == "Images" and candidate.is_dir():
            return _per_class_split(list_class_folders(candidate), split,
                                    UC_MERCED_TRAIN_PER_CLASS, "UC Merced")
    raise UserError(f"{str(root)!r} is not a UC Merced folder: no UCMerced_LandUse/Images")


def _lines(path: Path) -> list[str]:
    if not path.is_file():
        raise UserError(f"annotation file {str(path)!r} is missing")
    return [line.strip() for line in path.read_text().splitlines()
            if line.strip() and not line.startswith("#")]


def _existing(path: Path, listed_in: Path) -> Path:
    if not path.is_file():
        raise UserError(f"image {str(path)!r} listed in {str(listed_in)!r} is missing")
    return path


def fgvc_aircraft_samples(root: str | Path, split: str = "trainval") -> list[Sample]:
    """FGVC-Aircraft at the variant level, 100 classes (see the module table)."""
    _check_split("FGVC-Aircraft", split, ("train", "val", "trainval", "test"))
    data = Path(root) / "data" if (Path(root) / "data").is_dir() else Path(root)
    variants = _lines(data / "variants.txt")
    index = {name: i for i, name in enumerate(variants)}
    samples = []
    for part in (("train", "val") if split == "trainval" else (split,)):
        listing = data / f"images_variant_{part}.txt"
        for line in _lines(listing):
            image_id, _, variant = line.partition(" ")
            if variant not in index:
                raise UserError(f"{str(listing)!r}: variant {variant!r} of image {image_id} is "
                                "not in variants.txt")
            samples.append(Sample(label=index[variant], path=_existing(
                data / "images" / f"{image_id}.jpg", listing)))
    return samples


def oxford_pet_samples(root: str | Path, split: str = "trainval") -> list[Sample]:
    """Oxford-IIIT Pet, 37 breeds (see the module table)."""
    _check_split("Oxford-IIIT Pet", split, CARVED_SPLITS)
    root = Path(root)
    listing = root / "annotations" / ("test.txt" if split == "test" else "trainval.txt")
    samples = []
    for line in _lines(listing):
        fields = line.split()
        try:
            name, class_id = fields[0], int(fields[1])
        except (IndexError, ValueError):
            raise UserError(f"{str(listing)!r}: malformed line {line!r}") from None
        if not 1 <= class_id <= 37:
            raise UserError(f"{str(listing)!r}: class {class_id} of {name} is not in 1..37")
        samples.append(Sample(label=class_id - 1,
                              path=_existing(root / "images" / f"{name}.jpg", listing)))
    return samples if split == "test" else _carved(samples, split, "Oxford-IIIT Pet")


def _mat_annotations(path: Path) -> list[tuple[str, int]]:
    """(file name, class 1..196) pairs from a Stanford Cars annotation .mat file."""
    from scipy.io import loadmat

    try:
        table = loadmat(path)["annotations"].ravel()
        return [(str(np.asarray(row["fname"]).ravel()[0]),
                 int(np.asarray(row["class"]).ravel()[0])) for row in table]
    except (KeyError, ValueError, IndexError, TypeError) as exc:
        raise UserError(f"{str(path)!r} is not a Stanford Cars annotation file "
                        f"({type(exc).__name__}: {exc})") from None


def stanford_cars_samples(root: str | Path, split: str = "train") -> list[Sample]:
    """Stanford Cars, 196 classes (see the module table)."""
    _check_split("Stanford Cars", split, CARVED_SPLITS)
    root = Path(root)
    official = "test" if split == "test" else "train"
    name = "cars_train_annos.mat" if official == "train" else "cars_test_annos_withlabels.mat"
    found = [p for p in (root / name, root / "devkit" / name) if p.is_file()]
    if not found:
        raise UserError(f"{str(root)!r} is not a Stanford Cars folder: {name} is missing "
                        "(in it or in devkit/)")
    images = root / f"cars_{official}"
    samples = [Sample(label=label - 1, path=_existing(images / fname, found[0]))
               for fname, label in _mat_annotations(found[0])]
    return samples if split == "test" else _carved(samples, split, "Stanford Cars")


READERS = {
    "caltech101": caltech101_samples,
    "fgvc_aircraft": fgvc_aircraft_samples,
    "oxford_pet": oxford_pet_samples,
    "stanford_cars": stanford_cars_samples,
    "uc_merced": uc_merced_samples,
}


def detect_dataset_format(root: Path) -> str | None:
    """The benchmark dataset whose layout ``root`` has, or None."""
    if root.name == "101_ObjectCategories" or (root / "101_ObjectCategories").is_dir():
        return "caltech101"
    data = root / "data" if (root / "data").is_dir() else root
    if (data / "variants.txt").is_file() and (data / "images_variant_test.txt").is_file():
        return "fgvc_aircraft"
    if (root / "annotations" / "trainval.txt").is_file():
        return "oxford_pet"
    if (root / "cars_train").is_dir() or (root / "devkit" / "cars_train_annos.mat").is_file():
        return "stanford_cars"
    if (root / "UCMerced_LandUse" / "Images").is_dir() or (
            root.name.startswith("UCMerced") and (root / "Images").is_dir()):
        return "uc_merced"
    return None
