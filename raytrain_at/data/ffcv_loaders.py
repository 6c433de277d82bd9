"""FFCV loaders that yield float [0, 1] image batches on the training device.

* train: random-resized-crop decoding at ``resolution`` (scale (0.08, 1), ratio (3/4, 4/3)),
  optional horizontal flip, uint8 batches moved to the device and turned into floats there;
  sharded by rank / world size and reshuffled per epoch (see :mod:`raytrain_at.data.sharding`).
* eval: the paper's preprocessing at any resolution (bicubic resize of the short side to
  ``floor(res / 0.875)``, centre crop ``res``), sequential order, optionally sharded.

Every loader first checks the file (exists, is FFCV, not truncated, has ``image`` and ``label``)
and raises :class:`UserError` naming it, before any decoding starts.

Every batch is awaited at most ``timeout_s`` (:mod:`raytrain_at.data.watchdog`).

Every loader comes from :func:`device_loader`: FFCV 1.0.2 runs each epoch in a thread of its own
(``EpochIterator``), and a new thread's current CUDA device is 0 whatever the rank's is, so on an
8-GPU node every rank would open a context (a few hundred MB) on GPU 0 and FFCV's streams could
sit on the wrong device. A CUDA loader builds its epoch thread under its own device and the thread
selects that device before it decodes anything; a CPU loader selects no device at all.
"""

from __future__ import annotations

import os
from contextlib import nullcontext
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from raytrain_at.data.sharding import ShardedOrder
from raytrain_at.data.watchdog import DEFAULT_LOADER_TIMEOUT_S, watched_batches
from raytrain_at.errors import UserError

REQUIRED_FIELDS = ("image", "label")


@dataclass(frozen=True)
class BetonInfo:
    """What a .beton holds."""

    path: Path
    num_samples: int
    fields: tuple[str, ...]


def inspect_beton(path: str | Path) -> BetonInfo:
    """Validate an FFCV file and describe it.

    Raises:
        UserError: missing file, not an FFCV file, truncated, or without image/label fields.
    """
    from ffcv.reader import Reader

    path = Path(path)
    if not path.is_file():
        raise UserError(f"dataset file {str(path)!r} does not exist")
    try:
        reader = Reader(str(path))
        fields = tuple(reader.field_names)
        num_samples = int(reader.num_samples)
        table = reader.alloc_table
        data_end = int((table["ptr"] + table["size"]).max()) if len(table) else 0
    except Exception:  # noqa: BLE001 - FFCV raises assorted errors on foreign files
        raise UserError(f"dataset file {str(path)!r} is not an FFCV .beton file "
                        "(or its header is damaged)") from None
    if data_end > os.path.getsize(path):
        raise UserError(f"dataset file {str(path)!r} is truncated: its data runs to byte "
                        f"{data_end}, the file has {os.path.getsize(path)}")
    missing = [f for f in REQUIRED_FIELDS if f not in fields]
    if missing:
        raise UserError(f"dataset file {str(path)!r} has fields {list(fields)}, missing "
                        f"{', '.join(missing)}")
    if num_samples == 0:
        raise UserError(f"dataset file {str(path)!r} holds no samples")
    return BetonInfo(path=path, num_samples=num_samples, fields=fields)


def _check_indices(indices: np.ndarray | None, info: BetonInfo) -> None:
    if indices is not None and (len(indices) == 0 or np.max(indices) >= info.num_samples):
        raise UserError(f"sample indices do not fit {str(info.path)!r} with {info.num_samples} "
                        "samples")


def _check_resolution(resolution: int) -> None:
    if not isinstance(resolution, int) or resolution < 16 or resolution > 2048:
        raise UserError(f"resolution {resolution!r} is not an integer in [16, 2048]")


def cuda_index(device: torch.device) -> int | None:
    """The CUDA device index a loader for ``device`` binds its epoch thread to; None off CUDA.

    ``cuda`` without an index means the caller's current device, read here in the caller's
    thread (the epoch thread would read 0).
    """
    if device.type != "cuda":
        return None
    return torch.cuda.current_device() if device.index is None else int(device.index)


@cache
def _loader_class() -> type:
    """FFCV's ``Loader`` whose epoch threads run on the loader's CUDA device (built on first use:
    importing FFCV is slow, and every FFCV import here is lazy)."""
    from ffcv.loader import Loader
    from ffcv.loader.epoch_iterator import EpochIterator
    from ffcv.pipeline.compiler import Compiler

    class DeviceEpochIterator(EpochIterator):
        def __init__(self, loader: Any, order: Any, device_index: int | None) -> None:
            # Set before FFCV's constructor, which starts the thread (run() reads it).
            self.device_index = device_index
            # FFCV creates its CUDA streams and takes the consumer's current stream here: on
            # the loader's device, not on whatever device the caller's thread has current.
            on_device = (nullcontext() if device_index is None
                         else torch.cuda.device(device_index))
            with on_device:
                super().__init__(loader, order)

        def run(self) -> None:
            if self.device_index is not None:
                torch.cuda.set_device(self.device_index)
            super().run()

    class DeviceLoader(Loader):
        device_index: int | None = None

        def __iter__(self):
            # FFCV 1.0.2's Loader.__iter__ (ffcv is pinned) with the bound iterator: the next
            # epoch's order, truncated to whole batches, compiled on first use.
            Compiler.set_num_threads(self.num_workers)
            order = self.next_traversal_order()[:len(self) * self.batch_size]
            self.next_epoch += 1
            if self.code is None or self.recompile:
                self.generate_code()
            return DeviceEpochIterator(self, order, self.device_index)

    return DeviceLoader


def device_loader(path: str, *, device: torch.device, **loader_args: Any):
    """An FFCV ``Loader`` whose epoch threads run on ``device`` (see the module docstring).

    Args:
        path: the .beton file.
        device: where the pipelines put the batches; its CUDA index (if any) is the threads'.
        loader_args: FFCV ``Loader`` arguments.
    """
    loader = _loader_class()(path, **loader_args)
    loader.device_index = cuda_index(device)
    return loader


class DeviceBatches:
    """Iterate an FFCV loader as (images float32 [0, 1] (B, 3, H, W) on ``device``, labels int64).

    The uint8 -> float conversion happens on the device, so only bytes cross the bus.
    ``set_epoch`` fixes the data order of the next epoch (used when resuming). Each batch is
    awaited at most ``timeout_s`` seconds (see the module docstring).
    """

    def __init__(self, loader, device: torch.device, info: BetonInfo,
                 timeout_s: float = DEFAULT_LOADER_TIMEOUT_S) -> None:
        self.loader = loader
        self.device = device
        self.info = info
        self.timeout_s = timeout_s

    def __len__(self) -> int:
        return len(self.loader)

    @property
    def epoch(self) -> int:
        return int(self.loader.next_epoch)

    def set_epoch(self, epoch: int) -> None:
        self.loader.next_epoch = int(epoch)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for images, labels in watched_batches(iter(self.loader), self.timeout_s, self.info.path):
            images = images.to(self.device, non_blocking=True)
            labels = labels.to(self.device, non_blocking=True)
            # FFCV reuses a batch's buffers a few batches later, so what is yielded must own
            # its memory (an evaluation keeps every batch): the float conversion copies the
            # images; the labels, already int64, would otherwise be views into that buffer.
            yield images.float().div_(255.0), labels.view(-1).to(torch.long, copy=True)


def _label_pipeline(device: torch.device) -> list:
    from ffcv.fields.decoders import IntDecoder
    from ffcv.transforms import Squeeze, ToDevice, ToTensor

    ops = [IntDecoder(), ToTensor(), Squeeze(1)]
    if device.type != "cpu":
        ops.append(ToDevice(device, non_blocking=True))
    return ops


def _image_tail(device: torch.device) -> list:
    from ffcv.transforms import ToDevice, ToTensor, ToTorchImage

    ops: list = [ToTensor()]
    if device.type != "cpu":
        ops.append(ToDevice(device, non_blocking=True))
    ops.append(ToTorchImage(channels_last=True))
    return ops


def train_loader(path: str | Path, *, batch_size: int, resolution: int = 224, rank: int = 0,
                 world_size: int = 1, seed: int = 0, num_workers: int = 2, flip: bool = True,
                 scale: tuple[float, float] = (0.08, 1.0), device: str | torch.device = "cpu",
                 drop_last: bool = True, os_cache: bool = True,
                 indices: np.ndarray | None = None,
                 timeout_s: float = DEFAULT_LOADER_TIMEOUT_S) -> DeviceBatches:
    """The training loader of one rank.

    Args:
        path: the .beton file.
        batch_size: per-rank batch size.
        resolution: output side of the random-resized crop.
        rank, world_size: this worker's place in the job (Ray Train's world rank / size).
        seed: data-order seed; epoch e uses seed + e.
        num_workers: decoding threads.
        flip: random horizontal flip (off for the paper's 'basic' augmentation).
        scale: area range of the random-resized crop.
        device: where batches go.
        drop_last: drop the last incomplete batch (keeps ranks in step).
        os_cache: keep the file in the page cache (FFCV's RANDOM order needs RAM for the file).
        indices: restrict training to these samples (e.g. the first n).
        timeout_s: longest wait for one batch (``data.loader_timeout_s``).
    """
    from ffcv.fields.rgb_image import RandomResizedCropRGBImageDecoder
    from ffcv.transforms import RandomHorizontalFlip

    info = inspect_beton(path)
    _check_resolution(resolution)
    if batch_size < 1:
        raise UserError(f"batch size {batch_size} must be >= 1")
    device = torch.device(device)
    _check_indices(indices, info)
    image_ops: list = [RandomResizedCropRGBImageDecoder((resolution, resolution), scale=scale,
                                                  ratio=(3 / 4, 4 / 3))]
    if flip:
        image_ops.append(RandomHorizontalFlip())
    loader = device_loader(str(info.path), device=device, batch_size=batch_size,
                           num_workers=num_workers,
                           order=ShardedOrder(rank, world_size, shuffle=True), seed=seed,
                           os_cache=os_cache, drop_last=drop_last,
                           indices=indices,  # pyright: ignore[reportArgumentType]  # any sequence
                           pipelines={"image": image_ops + _image_tail(device),
                                      "label": _label_pipeline(device)})
    if len(loader) == 0:
        raise UserError(f"dataset file {str(info.path)!r}: {info.num_samples} samples over "
                        f"{world_size} workers give no full batch of {batch_size}")
    return DeviceBatches(loader, device, info, timeout_s)


def eval_loader(path: str | Path, *, batch_size: int, resolution: int = 224,
                crop_pct: float = 0.875, rank: int = 0, world_size: int = 1,
                num_workers: int = 2, device: str | torch.device = "cpu",
                indices: np.ndarray | None = None,
                timeout_s: float = DEFAULT_LOADER_TIMEOUT_S) -> DeviceBatches:
    """The evaluation loader (paper preprocessing, sequential, optionally one shard of it).

    ``indices`` restricts the file to a subset (e.g. the first n images) before sharding;
    ``timeout_s`` bounds the wait for one batch (see the module docstring).
    """
    from raytrain_at.data.eval_decoder import BicubicCenterCropDecoder

    info = inspect_beton(path)
    _check_resolution(resolution)
    if not 0.0 < crop_pct <= 1.0:
        raise UserError(f"crop_pct {crop_pct} is not in (0, 1]")
    device = torch.device(device)
    _check_indices(indices, info)
    loader = device_loader(str(info.path), device=device, batch_size=batch_size,
                           num_workers=num_workers,
                           order=ShardedOrder(rank, world_size, shuffle=False), drop_last=False,
                           indices=indices,  # pyright: ignore[reportArgumentType]  # any sequence
                           pipelines={"image": [BicubicCenterCropDecoder(resolution, crop_pct)]
                                      + _image_tail(device),
                                      "label": _label_pipeline(device)})
    return DeviceBatches(loader, device, info, timeout_s)

