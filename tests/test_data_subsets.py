"""RobustBench 5k and heldout 4k selection on a generated ImageNet-shaped tree (the real 1,000
synset folder names, tiny images)."""

from __future__ import annotations

from collections import Counter

import pytest
from data_fixtures import make_imagenet_tree

from raytrain_at.data.imagenet_subsets import (heldout4k_samples, heldout_selection,
                                               imagenet_class_index, imagenet_train_samples,
                                               robustbench5k_samples, robustbench_5k_ids)
from raytrain_at.data.inspection import beton_labels
from raytrain_at.data.write import write_dataset
from raytrain_at.errors import UserError


@pytest.fixture(scope="module")
def imagenet_root(tmp_path_factory):
    return make_imagenet_tree(tmp_path_factory.mktemp("imagenet"))


def test_shipped_ids_and_class_map() -> None:
    ids = robustbench_5k_ids()
    index = imagenet_class_index()
    assert len(index) == 1000 and sorted(index.values()) == list(range(1000))
    assert index["n01440764"] == 0 and index["n15075141"] == 999
    # The shipped list has 4,999 lines: its last line has no newline and is counted too.
    assert len(ids) == 5000 and len(set(ids)) == 5000
    assert all(i.split("/")[0] in index for i in ids)


def test_robustbench5k_picks_exactly_the_listed_val_images(imagenet_root, tmp_path) -> None:
    samples = robustbench5k_samples(imagenet_root / "val")
    ids = robustbench_5k_ids()
    assert [f"{s.path.parent.name}/{s.path.name}" for s in samples] == list(ids)
    index = imagenet_class_index()
    assert [s.label for s in samples] == [index[i.split("/")[0]] for i in ids]
    out = write_dataset(str(imagenet_root), tmp_path / "rb5k.beton", subset="robustbench5k")
    assert beton_labels(out).tolist() == [s.label for s in samples]


def test_robustbench5k_reports_missing_images(imagenet_root, tmp_path) -> None:
    first = imagenet_root / "val" / robustbench_5k_ids()[0]
    moved = tmp_path / "moved.JPEG"
    first.rename(moved)
    try:
        with pytest.raises(UserError, match=r"1 RobustBench images are missing.*first: "
                           + robustbench_5k_ids()[0]):
            robustbench5k_samples(imagenet_root / "val")
    finally:
        moved.rename(first)


def test_heldout4k_is_balanced_seeded_and_excluded_from_train(imagenet_root, tmp_path) -> None:
    held = heldout_selection(imagenet_root / "train")
    assert len(held) == 4000 and len(set(held)) == 4000
    per_class = Counter(p.parent.name for p in held)
    assert len(per_class) == 1000 and set(per_class.values()) == {4}
    assert held == heldout_selection(imagenet_root / "train")  # fixed seed
    assert held != heldout_selection(imagenet_root / "train", seed=1)
    train = imagenet_train_samples(imagenet_root / "train", exclude_heldout=True)
    assert len(train) == 5000 - 4000
    assert not {s.path for s in train} & set(held)
    samples = heldout4k_samples(imagenet_root / "train")
    out = write_dataset(str(imagenet_root), tmp_path / "h.beton", subset="heldout4k")
    assert sorted(beton_labels(out).tolist()) == sorted(s.label for s in samples)


def test_heldout_balances_uneven_classes(tmp_path) -> None:
    from data_fixtures import make_image_folder

    root = make_image_folder(tmp_path / "train", {"a": 10, "b": 2, "c": 6}, side=4)
    held = heldout_selection(root, size=12)
    counts = Counter(p.parent.name for p in held)
    assert counts == {"a": 5, "b": 2, "c": 5}  # round-robin while classes have images
    with pytest.raises(UserError, match="fewer than the 40 held-out images"):
        heldout_selection(root, size=40)


def test_subset_on_a_non_imagenet_source_is_refused(tmp_path) -> None:
    with pytest.raises(UserError, match="apply to ImageNet folders"):
        write_dataset("digits", tmp_path / "x.beton", subset="heldout4k")
    with pytest.raises(UserError, match="--subset 'val5k'"):
        write_dataset("digits", tmp_path / "x.beton", subset="val5k")
