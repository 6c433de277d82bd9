"""Write samples to an FFCV ``.beton`` file: atomically, with a progress bar, failing cleanly.

Options default to FFCV's ImageNet recipe (max side 500, 'proportion' mode, half the images JPEG
at quality 90). The file is written under a temporary name in the destination folder and renamed
on success, so an interrupted or failed write never leaves a ``.beton`` behind.

FFCV's writer waits forever when a worker process raises, so the dataset handed to it never
raises: an image that cannot be decoded is recorded as a marker file and replaced by a
placeholder, and after the write the file is discarded with an error naming the first bad image.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image

from raytrain_at.data.sources import Sample
from raytrain_at.errors import UserError

log = logging.getLogger(__name__)

WriteMode = Literal["raw", "jpg", "smart", "proportion"]
WRITE_MODES: tuple[str, ...] = ("raw", "jpg", "smart", "proportion")


@dataclass(frozen=True)
class WriteOptions:
    """How images are stored.

    Attributes:
        max_resolution: longest side after resizing (None keeps the original size).
        write_mode: 'raw' pixels, 'jpg', 'smart' (JPEG when raw is large) or 'proportion' (a random
            ``compress_probability`` share as JPEG): FFCV's modes.
        jpeg_quality: JPEG quality 1..100 for compressed images.
        compress_probability: share of JPEG images in 'proportion' mode.
        num_workers: writer processes.
    """

    max_resolution: int | None = 500
    write_mode: WriteMode = "proportion"
    jpeg_quality: int = 90
    compress_probability: float = 0.5
    num_workers: int = 2

    def validate(self) -> None:
        if self.write_mode not in WRITE_MODES:
            raise UserError(f"--write-mode {self.write_mode!r} is not one of "
                            f"{', '.join(WRITE_MODES)}")
        if self.max_resolution is not None and self.max_resolution < 8:
            raise UserError(f"--max-res {self.max_resolution} is below 8 pixels")
        if not 1 <= self.jpeg_quality <= 100:
            raise UserError(f"--jpeg-quality {self.jpeg_quality} is not in 1..100")
        if not 0.0 <= self.compress_probability <= 1.0:
            raise UserError(f"--compress-probability {self.compress_probability} is not in [0, 1]")
        if self.num_workers < 1:
            raise UserError(f"--num-workers {self.num_workers} must be >= 1")


# Full-quality evaluation files: original pixels, no resizing (the paper's preprocessing is then
# applied exactly at load time, at any resolution).
FULL_QUALITY = WriteOptions(max_resolution=None, write_mode="raw")


class _SafeImages:
    """Indexable (image, label) view of samples for FFCV's writer that never raises."""

    def __init__(self, samples: Sequence[Sample], failure_dir: Path) -> None:
        self.samples = samples
        self.failure_dir = failure_dir

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        sample = self.samples[index]
        try:
            return _pixels(sample), int(sample.label)
        except Exception as exc:  # noqa: BLE001 - recorded and reported after the write
            marker = self.failure_dir / f"{index:09d}.txt"
            marker.write_text(f"{sample.name}\t{type(exc).__name__}: {exc}".replace("\n", " "))
            return np.zeros((8, 8, 3), dtype=np.uint8), int(sample.label)


def _pixels(sample: Sample) -> np.ndarray:
    if sample.pixels is not None:
        pixels = sample.pixels
    else:
        with Image.open(sample.path) as image:  # pyright: ignore[reportArgumentType]  # no pixels: a path
            pixels = np.asarray(image.convert("RGB"))
    if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] != 3:
        raise ValueError(f"expected uint8 HxWx3 pixels, got {pixels.dtype} {pixels.shape}")
    if max(pixels.shape[:2]) > 65535:
        raise ValueError(f"image side {max(pixels.shape[:2])} exceeds FFCV's 65535 limit")
    return np.ascontiguousarray(pixels)


def write_beton(samples: Sequence[Sample], out_path: str | Path,
                options: WriteOptions = WriteOptions()
                ) -> Path:
    """Write ``samples`` (image + label) to ``out_path`` in FFCV format.

    Fields: ``image`` (``RGBImageField`` with ``options``) and ``label`` (``IntField``).

    Returns:
        The path written.

    Raises:
        UserError: bad options, no samples, an existing destination folder problem, or an image
            that cannot be decoded (nothing is left behind in that case).
    """
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    options.validate()
    out = Path(out_path)
    if out.suffix != ".beton":
        raise UserError(f"output {str(out)!r} must end in .beton")
    if not out.parent.exists():
        raise UserError(f"output folder {str(out.parent)!r} does not exist")
    if not samples:
        raise UserError("no images to write")
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.stem}.", suffix=".beton.partial", dir=out.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    with tempfile.TemporaryDirectory(prefix="raytrain-at-failures-") as failure_dir:
        try:
            fields = {
                "image": RGBImageField(write_mode=options.write_mode,
                                       # FFCV annotates int; its default is None.
                                       max_resolution=options.max_resolution,  # pyright: ignore[reportArgumentType]
                                       jpeg_quality=options.jpeg_quality,
                                       compress_probability=options.compress_probability),
                "label": IntField(),
            }
            writer = DatasetWriter(str(tmp), fields, num_workers=options.num_workers)
            writer.from_indexed_dataset(_SafeImages(samples, Path(failure_dir)),
                                        chunksize=max(1, min(100, len(samples)
                                                             // (4 * options.num_workers) or 1)))
            failures = sorted(Path(failure_dir).glob("*.txt"))
            if failures:
                first = failures[0].read_text().split("\t", 1)
                raise UserError(f"image {first[0]!r} cannot be decoded ({first[1][:120]}); "
                                f"{len(failures)} bad image(s), nothing written")
            os.replace(tmp, out)
        finally:
            if tmp.exists():
                tmp.unlink()
    log.info("wrote %d samples to %s", len(samples), out)
    return out
