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


# ------------------------------------------------------------------ the epoch thread's device
def _record_cuda_selection(monkeypatch) -> list[tuple[str, int, str]]:
    """Record torch.cuda.set_device / torch.cuda.device calls with the thread that made them,
    instead of making them (test only: this machine may have no GPU, and cuda:3 is a fake)."""
    import contextlib
    import threading

    calls: list[tuple[str, int, str]] = []

    def set_device(index) -> None:
        calls.append(("set_device", int(index), threading.current_thread().name))

    @contextlib.contextmanager
    def device(index):
        calls.append(("device", int(index), threading.current_thread().name))
        yield

    monkeypatch.setattr(torch.cuda, "set_device", set_device)
    monkeypatch.setattr(torch.cuda, "device", device)
    return calls


def _cpu_pipelines() -> dict:
    from ffcv.fields.decoders import IntDecoder
    from ffcv.fields.rgb_image import RandomResizedCropRGBImageDecoder
    from ffcv.transforms import ToTensor

    return {"image": [RandomResizedCropRGBImageDecoder((16, 16)), ToTensor()],
            "label": [IntDecoder(), ToTensor()]}


def test_epoch_thread_selects_the_loaders_cuda_device(indexed_beton, monkeypatch) -> None:
    """FFCV's epoch thread starts on CUDA device 0: the loader's thread selects its own device
    (cuda:3 here) before it decodes, and builds its streams under that device."""
    import threading

    from ffcv.loader.epoch_iterator import EpochIterator

    from raytrain_at.data.ffcv_loaders import device_loader

    calls = _record_cuda_selection(monkeypatch)
    loader = device_loader(str(indexed_beton), device=torch.device("cuda", 3), batch_size=40,
                           num_workers=1, pipelines=_cpu_pipelines())
    for epoch in range(2):
        epoch_iterator = iter(loader)
        assert isinstance(epoch_iterator, EpochIterator)
        labels = [int(i) for _, batch in epoch_iterator for i in batch.view(-1)]
        assert sorted(labels) == list(range(N))
        epoch_iterator.join(timeout=10)
        main = threading.current_thread().name
        assert calls == [("device", 3, main), ("set_device", 3, epoch_iterator.name)], calls
        assert epoch_iterator.name != main
        calls.clear()
    assert loader.next_epoch == 2


def test_cpu_loaders_select_no_cuda_device(indexed_beton, monkeypatch) -> None:
    calls = _record_cuda_selection(monkeypatch)
    for loader in (train_loader(indexed_beton, batch_size=10, resolution=16, num_workers=1),
                   eval_loader(indexed_beton, batch_size=16, resolution=16, num_workers=1)):
        assert len(_epoch_ids(loader)) > 0
    assert calls == []


def test_cuda_index_is_read_in_the_callers_thread(monkeypatch) -> None:
    from raytrain_at.data.ffcv_loaders import cuda_index

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 5)
    assert cuda_index(torch.device("cuda", 2)) == 2
    assert cuda_index(torch.device("cuda")) == 5  # the caller's current device
    assert cuda_index(torch.device("cpu")) is None
