"""Small real image data that ships with a registry package, for CPU runs and tests.

scikit-learn's handwritten digits: 1,797 grey 8x8 images of 10 classes (0-16 intensities),
bundled with scikit-learn, so nothing is downloaded. They are upscaled (bilinear) to ``side`` x
``side`` and repeated to 3 channels so ImageNet architectures run on them unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

DIGITS_CLASSES = 10


def digits_tensors(side: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """All digits as float images (N, 3, side, side) in [0, 1] and int64 labels (N,)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0
    x = F.interpolate(x, size=(side, side), mode="bilinear", align_corners=False).clamp(0, 1)
    return x.repeat(1, 3, 1, 1), torch.tensor(digits.target, dtype=torch.long)
