"""Describe a .beton file: sample count, fields, label histogram, image sizes."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from raytrain_at.data.ffcv_loaders import inspect_beton


def beton_labels(path: str | Path) -> np.ndarray:
    """All labels of a validated .beton, read from its metadata (no image decoding)."""
    from ffcv.reader import Reader

    info = inspect_beton(path)
    reader = Reader(str(info.path))
    return np.asarray(reader.metadata[_column(reader, "label")], dtype=np.int64)


def _column(reader, field: str) -> str:
    """FFCV names metadata columns f0, f1, ... in field order."""
    return f"f{reader.field_names.index(field)}"


def describe_beton(path: str | Path) -> dict[str, Any]:
    """Validate ``path`` and summarise it."""
    from ffcv.reader import Reader

    info = inspect_beton(path)
    reader = Reader(str(info.path))
    metadata = reader.metadata
    labels = np.asarray(metadata[_column(reader, "label")], dtype=np.int64)
    images = metadata[_column(reader, "image")]
    widths, heights = images["width"], images["height"]
    return {"path": str(info.path), "num_samples": info.num_samples, "fields": list(info.fields),
            "num_classes": int(len(set(labels.tolist()))),
            "label_counts": {int(k): int(v) for k, v in sorted(Counter(labels.tolist()).items())},
            "max_side": int(max(widths.max(), heights.max())),
            "min_side": int(min(widths.min(), heights.min()))}
