"""No test-set selection: every dataset reader's validation split is carved from its training
data, class-balanced and seeded, and disjoint from train and test; a held-out file written from a
test split is refused by every command that trains; shipped recipes, spaces and the benchmark
select on validation data."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from raytrain_at.config import available_recipes, load_config
from raytrain_at.data.finetune_datasets import (caltech101_samples, fgvc_aircraft_samples,
                                                 oxford_pet_samples, stanford_cars_samples,
                                                 uc_merced_samples)
from raytrain_at.data.sources import cifar_samples, digits_samples, flowers102_samples
from raytrain_at.data.validation_split import validation_mask
from raytrain_at.data.write import write_dataset
from raytrain_at.errors import UserError
from raytrain_at.finetune_benchmark.spec import load_benchmark
from tests.data_fixtures import make_cifar10, make_flowers102

ROOT = Path(__file__).resolve().parents[1]


def _image(path: Path, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((12, 10, 3), value % 256, np.uint8)).save(path, format="JPEG")


def _caltech(root: Path) -> Path:
    for name in ("accordion", "Faces"):
        for i in range(34):
            _image(root / "101_ObjectCategories" / name / f"image_{i + 1:04d}.jpg", i)
    return root


def _uc_merced(root: Path) -> Path:
    for name in ("beach", "forest"):
        for i in range(84):
            _image(root / "UCMerced_LandUse" / "Images" / name / f"{name}{i:02d}.jpg", i)
    return root


def _pets(root: Path) -> Path:
    (root / "annotations").mkdir(parents=True)
    lines = {"trainval": [f"Abyssinian_{i} 1 1 1" for i in range(10)]
             + [f"boxer_{i} 2 2 1" for i in range(10)],
             "test": ["Abyssinian_90 1 1 1", "boxer_90 2 2 1"]}
    for split, rows in lines.items():
        (root / "annotations" / f"{split}.txt").write_text("\n".join(rows) + "\n")
        for row in rows:
            _image(root / "images" / f"{row.split()[0]}.jpg", 7)
    return root


def _aircraft(root: Path) -> Path:
    data = root / "data"
    data.mkdir(parents=True)
    (data / "variants.txt").write_text("707-320\nA300B4\n")
    splits = {"train": ["1 A300B4", "2 707-320", "3 A300B4"], "val": ["4 707-320", "5 A300B4"],
              "test": ["6 A300B4"]}
    for split, rows in splits.items():
        (data / f"images_variant_{split}.txt").write_text("\n".join(rows) + "\n")
        for row in rows:
            _image(data / "images" / f"{row.split()[0]}.jpg", 9)
    return root


def _cars(root: Path) -> Path:
    from scipy.io import savemat

    for split, count in (("train", 20), ("test", 4)):
        table = np.zeros((1, count), dtype=[("fname", "O"), ("class", "O")])
        for i in range(count):
            name = f"{i:05d}.jpg"
            table[0, i] = (np.array([name]), np.array([[1 + i % 2]], dtype=np.uint8))
            _image(root / f"cars_{split}" / name, i)
        target = "cars_train_annos.mat" if split == "train" else "cars_test_annos_withlabels.mat"
        (root / "devkit").mkdir(parents=True, exist_ok=True)
        savemat(root / "devkit" / target, {"annotations": table})
    return root


def _digits(root: Path) -> str:
    return "digits"


READERS = {
    "digits": (lambda src, split: digits_samples(split), _digits),
    "cifar": (cifar_samples, lambda root: make_cifar10(root, per_batch=12)),
    "flowers102": (flowers102_samples, make_flowers102),
    "caltech101": (caltech101_samples, _caltech),
    "uc_merced": (uc_merced_samples, _uc_merced),
    "oxford_pet": (oxford_pet_samples, _pets),
    "fgvc_aircraft": (fgvc_aircraft_samples, _aircraft),
    "stanford_cars": (stanford_cars_samples, _cars),
}


def _identity(sample) -> str:
    if sample.path is not None:
        return str(sample.path)
    return hashlib.sha1(sample.pixels.tobytes() + bytes([sample.label])).hexdigest()


@pytest.mark.parametrize("name", list(READERS))
def test_validation_split_is_disjoint_from_train_and_test(name: str, tmp_path: Path) -> None:
    read, build = READERS[name]
    source = build(tmp_path / name)
    parts = {split: [_identity(s) for s in read(source, split)]
             for split in ("train", "val", "test")}
    sets = {split: set(ids) for split, ids in parts.items()}
    assert all(sets.values()), f"{name}: an empty split {[k for k, v in sets.items() if not v]}"
    assert not sets["train"] & sets["val"], f"{name}: validation images are trained on"
    assert not sets["test"] & (sets["train"] | sets["val"]), f"{name}: test images leak"
    assert [_identity(s) for s in read(source, "val")] == parts["val"]  # seeded: the same draw
    val_labels = {s.label for s in read(source, "val")}
    assert val_labels == {s.label for s in read(source, "train")}, "val is not class-balanced"


def test_validation_mask_is_a_seeded_tenth_of_each_class() -> None:
    labels = np.repeat(np.arange(4), [100, 50, 20, 2])
    mask = validation_mask(labels)
    assert [int(mask[labels == c].sum()) for c in range(4)] == [10, 5, 2, 1]
    assert np.array_equal(mask, validation_mask(labels))
    assert not np.array_equal(mask, validation_mask(labels, seed=1))


def test_digits_split_sizes() -> None:
    sizes = {split: len(digits_samples(split)) for split in ("train", "val", "trainval", "test")}
    assert sizes == {"train": 1350, "val": 150, "trainval": 1500, "test": 297}


def _heldout_from_test(tmp_path: Path) -> Path:
    out = write_dataset("digits", tmp_path / "digits_test.beton", split="test")
    return out


def test_training_refuses_held_out_data_written_from_a_test_split(tmp_path: Path) -> None:
    from raytrain_at.training.launch import prepare_run

    test_file = _heldout_from_test(tmp_path)
    config = load_config("quickstart", [f"data.heldout={test_file}"])
    with pytest.raises(UserError, match="written from a test split"):
        prepare_run(config, storage_path=str(tmp_path / "home"))
    val_file = write_dataset("digits", tmp_path / "digits_val.beton", split="val")
    prepare_run(load_config("quickstart", [f"data.heldout={val_file}"]),
                storage_path=str(tmp_path / "home"))


def test_tune_and_benchmark_refuse_test_data_for_selection(tmp_path: Path, monkeypatch) -> None:
    """The benchmark's input check (and Tune's trials) go through the same driver check."""
    from raytrain_at.finetune_benchmark.runner import check_inputs
    from raytrain_at.finetune_benchmark.spec import configurations

    import timm
    from safetensors.torch import save_file

    test_file = _heldout_from_test(tmp_path)
    weights = tmp_path / "atto.safetensors"
    save_file(timm.create_model("convnext_atto", num_classes=10).state_dict(), str(weights))
    spec_path = tmp_path / "bench.yaml"
    spec = yaml.safe_load((ROOT / "finetune_benchmarks" / "robust_finetune.yaml").read_text())
    spec["backbones"] = {"atto": {"model": "convnext_atto", "weights": str(weights)}}
    spec["datasets"] = {"digits": {"train": "digits", "val": str(test_file), "test": "digits",
                                   "num_classes": 10, "resolution": 32}}
    spec["fixed"] = {"scaling.use_gpu": False, "scaling.num_workers": 1,
                     "schedule.global_batch_size": 8}
    spec_path.write_text(yaml.safe_dump(spec))
    loaded, source = load_benchmark(spec_path)
    configs = configurations(loaded, "bench", source)
    with pytest.raises(UserError, match="written from a test split"):
        check_inputs(configs[:1], str(tmp_path / "home"))


def test_shipped_files_select_on_validation_data() -> None:
    for name in available_recipes():
        heldout = load_config(name).data.heldout
        assert heldout is None or heldout == "digits" or "heldout4k" in heldout \
            or heldout.endswith("_val.beton"), f"recipe {name} selects on {heldout}"
    spec, _ = load_benchmark(ROOT / "finetune_benchmarks" / "robust_finetune.yaml")
    for name, dataset in spec.datasets.items():
        assert dataset.val.endswith("_val.beton") and dataset.test.endswith("_test.beton"), name


def test_a_tune_space_must_name_its_test_data(tmp_path: Path) -> None:
    """A study ranks trials on data.heldout; its best trials are reported on evaluation.data,
    which a space training on its own files must name (bundled digits: their test split)."""
    from raytrain_at.tuning.spaces import evaluation_data, load_space

    space = yaml.safe_load((ROOT / "tune_spaces" / "table7_convnext_tiny_stems.yaml").read_text())
    assert "robustbench5k" in space["evaluation"]["data"]
    del space["evaluation"]
    path = tmp_path / "no_test_data.yaml"
    path.write_text(yaml.safe_dump(space))
    with pytest.raises(UserError, match="evaluation.data is not set"):
        load_space(path)
    quick = load_space("quick_stems_cpu")
    assert evaluation_data(quick.evaluation, load_config("quickstart")) == "digits"
