"""Writing .beton files: round trips (digits, an ImageFolder, CIFAR), atomic failure, bad input."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
from data_fixtures import make_cifar10, make_image_folder

from raytrain_at.data.ffcv_loaders import eval_loader, inspect_beton
from raytrain_at.data.ffcv_writer import WriteOptions, write_beton
from raytrain_at.data.inspection import beton_labels, describe_beton
from raytrain_at.data.sources import Sample, cifar_samples, digits_samples, digits_split_indices
from raytrain_at.data.write import write_dataset
from raytrain_at.errors import UserError
from tests.support.cli_runner import run_cli



def test_digits_round_trip(tmp_path) -> None:
    path = write_dataset("digits", tmp_path / "digits.beton", split="test")
    samples = digits_samples("test")
    assert np.array_equal(beton_labels(path), [s.label for s in samples])
    info = describe_beton(path)
    assert info["num_samples"] == 297 and info["num_classes"] == 10
    assert info["max_side"] == info["min_side"] == 32
    assert len(set(digits_split_indices("train")) & set(digits_split_indices("test"))) == 0


def test_bundled_data_holds_the_same_pixels_on_every_write(tmp_path) -> None:
    """Two fresh homes must train and evaluate on identical images (no random JPEG share)."""
    import torch

    from raytrain_at.data.write import bundled_beton
    from raytrain_at.evaluation.runner import load_images

    images = []
    for home in ("a", "b"):
        path = bundled_beton("digits", "test", tmp_path / home)
        x, _ = load_images(path, list(range(297)), resolution=32, crop_pct=1.0, batch_size=100,
                           device=torch.device("cpu"))
        images.append(x)
    assert torch.equal(images[0], images[1])
    expected = torch.from_numpy(np.stack([s.pixels for s in digits_samples("test")]))
    assert torch.equal((images[0] * 255).round().to(torch.uint8), expected.permute(0, 3, 1, 2))


def test_image_folder_round_trip_preserves_labels_and_pixels(tmp_path) -> None:
    root = make_image_folder(tmp_path / "flowers", {"daisy": 4, "rose": 3, "tulip": 5}, side=20)
    out = write_dataset(str(root), tmp_path / "f.beton",
                        options=WriteOptions(write_mode="raw", max_resolution=None))
    labels = beton_labels(out)
    assert sorted(labels.tolist()) == [0] * 4 + [1] * 3 + [2] * 5
    # Read the pixels back: each class has its own grey level (20 * class + 10, +-20 noise).
    batches = list(eval_loader(out, batch_size=4, resolution=16, crop_pct=1.0, num_workers=1))
    images = np.concatenate([b[0].numpy() for b in batches])
    read_labels = np.concatenate([b[1].numpy() for b in batches])
    assert np.array_equal(read_labels, labels)
    for label in range(3):
        mean = images[read_labels == label].mean() * 255
        assert abs(mean - (20 * label + 10)) < 12


def test_cifar_python_batches_round_trip(tmp_path) -> None:
    root = make_cifar10(tmp_path / "cifar-10-batches-py")
    samples = cifar_samples(root, "trainval")
    assert len(samples) == 30 and samples[0].pixels.shape == (32, 32, 3)
    assert len(cifar_samples(root, "train")) + len(cifar_samples(root, "val")) == 30
    out = write_dataset(str(root), tmp_path / "c.beton", split="test",
                        options=WriteOptions(write_mode="raw"))
    assert beton_labels(out).tolist() == [s.label for s in cifar_samples(root, "test")]


def test_cifar_batch_with_code_is_refused(tmp_path) -> None:
    root = make_cifar10(tmp_path / "cifar-10-batches-py")

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo hacked > " + str(tmp_path / "hacked"),))

    with open(root / "test_batch", "wb") as handle:
        pickle.dump({"data": Evil(), "labels": [0]}, handle)
    with pytest.raises(UserError, match="test_batch.*cannot be read"):
        cifar_samples(root, "test")
    assert not (tmp_path / "hacked").exists()


def test_corrupt_image_fails_and_leaves_nothing(tmp_path) -> None:
    root = make_image_folder(tmp_path / "src", {"a": 3, "b": 3})
    (root / "b" / "img_001.jpg").write_bytes(b"not a jpeg at all")
    out = tmp_path / "out.beton"
    with pytest.raises(UserError, match=r"img_001\.jpg.*cannot be decoded"):
        write_dataset(str(root), out)
    assert list(tmp_path.glob("*.beton*")) == []


def test_bad_sources_name_the_culprit(tmp_path) -> None:
    with pytest.raises(UserError, match="does not exist"):
        write_dataset(str(tmp_path / "nope"), tmp_path / "x.beton")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no class sub-folders"):
        write_dataset(str(tmp_path / "empty"), tmp_path / "x.beton")
    (tmp_path / "noimg" / "cls").mkdir(parents=True)
    with pytest.raises(UserError, match="contains no images"):
        write_dataset(str(tmp_path / "noimg"), tmp_path / "x.beton")
    with pytest.raises(UserError, match="must end in .beton"):
        write_dataset("digits", tmp_path / "x.ffcv")
    with pytest.raises(UserError, match="--jpeg-quality 0"):
        write_beton([Sample(0, pixels=np.zeros((4, 4, 3), np.uint8))], tmp_path / "x.beton",
                    WriteOptions(jpeg_quality=0))


def test_non_ffcv_and_truncated_files_are_refused(tmp_path) -> None:
    junk = tmp_path / "junk.beton"
    junk.write_bytes(b"\x00" * 10)
    with pytest.raises(UserError, match="not an FFCV .beton"):
        inspect_beton(junk)
    good = write_dataset("digits", tmp_path / "d.beton", split="test")
    data = good.read_bytes()
    truncated = tmp_path / "truncated.beton"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="truncated|not an FFCV"):
        inspect_beton(truncated)


def test_cli_write_and_errors(tmp_path) -> None:
    out = tmp_path / "d.beton"
    ok = run_cli(["data", "write-ffcv", "digits", str(out), "--split", "test"], timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert inspect_beton(out).num_samples == 297
    bad = run_cli(["data", "write-ffcv", str(tmp_path / "missing"), str(out)], timeout=120)
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0
    assert "does not exist" in bad.stderr and "Traceback" not in bad.stderr
    info = run_cli(["data", "info", str(tmp_path / "missing.beton")], timeout=120)
    assert info.returncode == 2 and "missing.beton" in info.stderr


def test_flowers102_layout(tmp_path) -> None:
    from data_fixtures import make_flowers102

    from raytrain_at.data.sources import flowers102_samples
    from raytrain_at.data.write import detect_format

    root = make_flowers102(tmp_path / "flowers-102")
    assert detect_format(str(root)) == "flowers102"
    test = flowers102_samples(root, "test")
    assert [s.path.name for s in test] == ["image_00007.jpg", "image_00008.jpg", "image_00009.jpg"]
    assert [s.label for s in test] == [0, 1, 2]  # labels 1..102 stored as 0..101
    out = write_dataset(str(root), tmp_path / "fl.beton", split="val")
    assert beton_labels(out).tolist() == [s.label for s in flowers102_samples(root, "val")]
    (root / "jpg" / "image_00008.jpg").unlink()
    with pytest.raises(UserError, match="image_00008.jpg' listed in setid.mat is missing"):
        flowers102_samples(root, "test")
