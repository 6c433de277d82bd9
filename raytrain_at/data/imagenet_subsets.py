"""ImageNet's class index and the two evaluation subsets of the paper.

* ``robustbench5k``: the 5,000 ImageNet *validation* images RobustBench evaluates on (ids shipped
  with the package, as ``<synset>/<file>`` under the class-folder ``val/`` layout); the paper's test
  set for every AutoAttack figure.
* ``heldout4k``: 4,000 images from ImageNet *train*, chosen with a fixed seed and balanced over
  classes (4 per class on ImageNet-1k; as even as the tree allows otherwise), used for checkpoint
  selection (paper App. A.1: a selection set disjoint from the test set). The train writer can
  exclude exactly these images.
"""

from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources
from pathlib import Path

import numpy as np

from raytrain_at.data.sources import Sample, images_in, list_class_folders
from raytrain_at.errors import UserError

HELDOUT_SIZE = 4000
HELDOUT_SEED = 0


@lru_cache(maxsize=1)
def imagenet_class_index() -> dict[str, int]:
    """Synset (e.g. ``n01440764``) -> standard ImageNet-1k class index 0..999."""
    text = resources.files("raytrain_at.data").joinpath("imagenet_class_to_id_map.json").read_text()
    return {k: int(v) for k, v in json.loads(text).items()}


@lru_cache(maxsize=1)
def robustbench_5k_ids() -> tuple[str, ...]:
    """The RobustBench ImageNet ids, ``<synset>/<file name>``, in RobustBench's order."""
    ids = resources.files("raytrain_at.data").joinpath("robustbench_imagenet_5k_ids.txt")
    text = ids.read_text()
    return tuple(line.strip() for line in text.splitlines() if line.strip())


def robustbench5k_samples(val_root: str | Path) -> list[Sample]:
    """The RobustBench images of an ImageNet ``val/`` tree in class-folder layout.

    Raises:
        UserError: naming the first listed image that is missing (and how many are).
    """
    root = Path(val_root)
    list_class_folders(root)  # validates the folder
    index = imagenet_class_index()
    samples, missing = [], []
    for image_id in robustbench_5k_ids():
        path = root / image_id
        if not path.is_file():
            missing.append(image_id)
            continue
        samples.append(Sample(label=index[image_id.split("/")[0]], path=path))
    if missing:
        raise UserError(f"{len(missing)} RobustBench images are missing from {str(root)!r}, first: "
                        f"{missing[0]} (the ids are ImageNet val files in class-folder layout)")
    return samples


def heldout_selection(train_root: str | Path, size: int = HELDOUT_SIZE,
                      seed: int = HELDOUT_SEED) -> list[Path]:
    """The held-out images of an ImageNet ``train/`` tree: ``size`` images spread over classes.

    Classes are filled round-robin (so every class gets ``size // n_classes`` or one more while it
    has images), each class's files in a seeded permutation of their sorted names. The result only
    depends on the file names, the size and the seed.
    """
    classes = list_class_folders(Path(train_root))
    rng = np.random.default_rng(seed)
    per_class = []
    for folder in classes:
        files = images_in(folder)
        per_class.append([files[i] for i in rng.permutation(len(files))])
    total = sum(len(files) for files in per_class)
    if total < size:
        raise UserError(f"train folder {str(train_root)!r} has {total} images, fewer than the "
                        f"{size} held-out images requested")
    chosen: list[Path] = []
    depth = 0
    while len(chosen) < size:
        for files in per_class:
            if depth < len(files) and len(chosen) < size:
                chosen.append(files[depth])
        depth += 1
    return sorted(chosen)


def heldout4k_samples(train_root: str | Path, size: int = HELDOUT_SIZE,
                      seed: int = HELDOUT_SEED) -> list[Sample]:
    index = imagenet_class_index()
    return [Sample(label=_label(index, path), path=path)
            for path in heldout_selection(train_root, size, seed)]


def imagenet_train_samples(train_root: str | Path, exclude_heldout: bool = False,
                           heldout_size: int = HELDOUT_SIZE, seed: int = HELDOUT_SEED
                           ) -> list[Sample]:
    """Every ImageNet train image, optionally without the held-out selection."""
    from raytrain_at.data.sources import image_folder_samples

    samples = image_folder_samples(train_root, imagenet_class_index())
    if not exclude_heldout:
        return samples
    held = set(heldout_selection(train_root, heldout_size, seed))
    return [s for s in samples if s.path not in held]


def _label(index: dict[str, int], path: Path) -> int:
    synset = path.parent.name
    if synset not in index:
        raise UserError(f"class folder {str(path.parent)!r} is not an ImageNet synset")
    return index[synset]
