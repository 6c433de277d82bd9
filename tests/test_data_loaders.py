"""Loaders: rank sharding covers every sample exactly once per epoch and reshuffles; batches are
float [0, 1] on the device; bad files and settings are refused before decoding."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from raytrain_at.data.ffcv_loaders import eval_loader, train_loader
from raytrain_at.data.ffcv_writer import WriteOptions, write_beton
from raytrain_at.data.sharding import eval_shard, train_shard
from raytrain_at.data.sources import Sample
from raytrain_at.errors import UserError

N = 120


@pytest.fixture(scope="module")
def indexed_beton(tmp_path_factory):
    """120 images whose label is their own index, so shards can be checked sample by sample."""
    rng = np.random.default_rng(0)
    samples = [Sample(label=i, pixels=rng.integers(0, 256, (20 + i % 7, 24, 3), dtype=np.uint8))
               for i in range(N)]
    path = tmp_path_factory.mktemp("idx") / "indexed.beton"
    return write_beton(samples, path, WriteOptions(write_mode="raw", max_resolution=None,
                                                   num_workers=1))


def _epoch_ids(loader) -> list[int]:
    return [int(i) for _, labels in loader for i in labels]


def test_two_rank_train_shards_cover_each_sample_once_per_epoch(indexed_beton) -> None:
    loaders = [train_loader(indexed_beton, batch_size=10, resolution=16, rank=r, world_size=2,
                            seed=7, num_workers=1) for r in range(2)]
    epochs = []
    for _ in range(2):
        ranks = [_epoch_ids(loader) for loader in loaders]
        assert len(ranks[0]) == len(ranks[1]) == N // 2
        assert not set(ranks[0]) & set(ranks[1])
        assert sorted(ranks[0] + ranks[1]) == list(range(N))
        epochs.append(ranks)
    assert epochs[0][0] != epochs[1][0]  # reshuffled per epoch
    # Resuming at epoch 1 replays epoch 1's order.
    again = train_loader(indexed_beton, batch_size=10, resolution=16, rank=0, world_size=2,
                         seed=7, num_workers=1)
    again.set_epoch(1)
    assert _epoch_ids(again) == epochs[1][0]


def test_train_batches_are_float_unit_range(indexed_beton) -> None:
    loader = train_loader(indexed_beton, batch_size=8, resolution=24, num_workers=1)
    images, labels = next(iter(loader))
    assert images.shape == (8, 3, 24, 24) and images.dtype == torch.float32
    assert 0 <= images.min() and images.max() <= 1 and labels.dtype == torch.int64
    assert len(loader) == N // 8


def test_train_shards_are_equal_sized_when_n_is_not_divisible() -> None:
    shards = [train_shard(np.arange(11), r, 3, seed=0, epoch=0) for r in range(3)]
    assert [len(s) for s in shards] == [3, 3, 3]
    assert len(set(np.concatenate(shards))) == 9


def test_eval_shards_cover_in_order(indexed_beton) -> None:
    ids = []
    for rank in range(3):
        loader = eval_loader(indexed_beton, batch_size=16, resolution=16, rank=rank,
                             world_size=3, num_workers=1)
        got = _epoch_ids(loader)
        assert got == eval_shard(np.arange(N), rank, 3).tolist()
        ids += got
    assert ids == list(range(N))
    assert np.concatenate([eval_shard(np.arange(10), r, 4) for r in range(4)]).tolist() == list(
        range(10))


def test_eval_subset_indices(indexed_beton) -> None:
    loader = eval_loader(indexed_beton, batch_size=7, resolution=16, indices=np.arange(30),
                         num_workers=1)
    assert _epoch_ids(loader) == list(range(30))
    with pytest.raises(UserError, match="do not fit"):
        eval_loader(indexed_beton, batch_size=7, indices=np.arange(200))


@pytest.mark.parametrize("kwargs,fragment", [
    (dict(resolution=8), "resolution 8"),
    (dict(batch_size=0), "batch size 0"),
    (dict(batch_size=100, world_size=2, rank=1), "no full batch"),
])
def test_bad_loader_settings(indexed_beton, kwargs, fragment) -> None:
    args = dict(batch_size=10, resolution=16)
    args.update(kwargs)
    with pytest.raises(UserError, match=fragment):
        train_loader(indexed_beton, **args)


def test_missing_file(tmp_path) -> None:
    with pytest.raises(UserError, match="nothing.beton' does not exist"):
        train_loader(tmp_path / "nothing.beton", batch_size=4)
