"""Readers of the robust fine-tuning benchmark's datasets (raytrain_at/data/finetune_datasets.py)
on small fake copies of their distributed layouts: classes, labels, splits, format detection, a
write to FFCV and back, and one-line errors for broken layouts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from raytrain_at.data.finetune_datasets import (caltech101_samples, fgvc_aircraft_samples,
                                                 oxford_pet_samples, stanford_cars_samples,
                                                 uc_merced_samples)
from raytrain_at.data.inspection import beton_labels
from raytrain_at.data.write import detect_format
from raytrain_at.data.write import write_dataset
from raytrain_at.errors import UserError


def _image(path: Path, value: int, suffix_format: str = "JPEG") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((12, 10, 3), value, np.uint8)).save(path, format=suffix_format)


def _caltech(root: Path, per_class: int = 32) -> Path:
    for name in ("BACKGROUND_Google", "accordion", "Faces", "airplanes"):
        for i in range(per_class):
            _image(root / "101_ObjectCategories" / name / f"image_{i + 1:04d}.jpg", 10 + i)
    return root


def test_caltech101_classes_and_split(tmp_path) -> None:
    root = _caltech(tmp_path / "caltech")
    assert detect_format(str(root)) == "caltech101"
    train, test = caltech101_samples(root, "trainval"), caltech101_samples(root, "test")
    # BACKGROUND_Google is not a class; the rest in sorted order: Faces, accordion, airplanes.
    assert sorted({s.label for s in train}) == [0, 1, 2]
    assert all(("BACKGROUND" not in str(s.path)) for s in train + test)
    assert [sum(s.label == c for s in train) for c in range(3)] == [30, 30, 30]
    assert len(test) == 3 * 2 and not {s.path for s in train} & {s.path for s in test}
    assert [s.path for s in caltech101_samples(root, "trainval")] == [s.path for s in train]
    val = caltech101_samples(root, "val")
    assert [sum(s.label == c for s in val) for c in range(3)] == [3, 3, 3]
    assert {s.path.parent.name for s in train if s.label == 0} == {"Faces"}


def test_uc_merced_split_and_tif_round_trip(tmp_path) -> None:
    root = tmp_path / "ucm"
    for name in ("beach", "agricultural"):
        for i in range(82):
            _image(root / "UCMerced_LandUse" / "Images" / name / f"{name}{i:02d}.tif", i, "TIFF")
    assert detect_format(str(root)) == "uc_merced"
    train, test = uc_merced_samples(root, "trainval"), uc_merced_samples(root, "test")
    assert (len(train), len(test)) == (160, 4)
    assert (len(uc_merced_samples(root, "train")), len(uc_merced_samples(root, "val"))) == (144, 16)
    out = write_dataset(str(root), tmp_path / "ucm_test.beton", split="test")
    assert beton_labels(out).tolist() == [s.label for s in test]


def test_fgvc_aircraft_variants(tmp_path) -> None:
    data = tmp_path / "fgvc-aircraft-2013b" / "data"
    data.mkdir(parents=True)
    (data / "variants.txt").write_text("707-320\nA300B4\nF/A-18\n")
    splits = {"train": ["1000001 A300B4", "1000002 707-320"], "val": ["1000003 F/A-18"],
              "test": ["1000004 A300B4", "1000005 F/A-18"]}
    for split, lines in splits.items():
        (data / f"images_variant_{split}.txt").write_text("\n".join(lines) + "\n")
        for line in lines:
            _image(data / "images" / f"{line.split()[0]}.jpg", 50)
    root = tmp_path / "fgvc-aircraft-2013b"
    assert detect_format(str(root)) == "fgvc_aircraft"
    assert [s.label for s in fgvc_aircraft_samples(root, "trainval")] == [1, 0, 2]
    assert [s.label for s in fgvc_aircraft_samples(root, "test")] == [1, 2]
    out = write_dataset(str(root), tmp_path / "air.beton", split="trainval")
    assert beton_labels(out).tolist() == [1, 0, 2]
    (data / "images_variant_test.txt").write_text("1000004 Concorde\n")
    with pytest.raises(UserError, match="Concorde"):
        fgvc_aircraft_samples(root, "test")


def test_oxford_pet(tmp_path) -> None:
    root = tmp_path / "pets"
    (root / "annotations").mkdir(parents=True)
    (root / "annotations" / "trainval.txt").write_text(
        "#Image CLASS-ID SPECIES BREED ID\nAbyssinian_1 1 1 1\nyorkshire_terrier_9 37 2 25\n")
    (root / "annotations" / "test.txt").write_text("Abyssinian_2 1 1 1\n")
    for name in ("Abyssinian_1", "yorkshire_terrier_9", "Abyssinian_2"):
        _image(root / "images" / f"{name}.jpg", 80)
    assert detect_format(str(root)) == "oxford_pet"
    assert [s.label for s in oxford_pet_samples(root, "trainval")] == [0, 36]
    with pytest.raises(UserError, match="split 'dev' is not one of train, val, trainval, test"):
        oxford_pet_samples(root, "dev")
    (root / "images" / "Abyssinian_2.jpg").unlink()
    with pytest.raises(UserError, match="Abyssinian_2.jpg"):
        oxford_pet_samples(root, "test")


def test_stanford_cars_from_devkit_mat(tmp_path) -> None:
    from scipy.io import savemat

    root = tmp_path / "cars"
    rows = [("00001.jpg", 3), ("00002.jpg", 196)]
    table = np.zeros((1, len(rows)), dtype=[("fname", "O"), ("class", "O")])
    for i, (fname, label) in enumerate(rows):
        table[0, i] = (np.array([fname]), np.array([[label]], dtype=np.uint8))
        _image(root / "cars_train" / fname, 30)
    (root / "devkit").mkdir(parents=True)
    savemat(root / "devkit" / "cars_train_annos.mat", {"annotations": table})
    assert detect_format(str(root)) == "stanford_cars"
    assert [(s.path.name, s.label) for s in stanford_cars_samples(root, "trainval")] == [
        ("00001.jpg", 2), ("00002.jpg", 195)]
    with pytest.raises(UserError, match="cars_test_annos_withlabels.mat is missing"):
        stanford_cars_samples(root, "test")
    savemat(root / "cars_test_annos_withlabels.mat", {"other": np.zeros(2)})
    with pytest.raises(UserError, match="not a Stanford Cars annotation file"):
        stanford_cars_samples(root, "test")


def test_too_small_class_is_named(tmp_path) -> None:
    root = _caltech(tmp_path / "small", per_class=5)
    with pytest.raises(UserError, match="has 5 images"):
        caltech101_samples(root, "train")
