"""Shared fixtures: small real data (scikit-learn digits) and a small model trained on it."""

from __future__ import annotations

import os
import warnings

# Tests never touch the network: make Hugging Face Hub calls fail fast instead of timing out.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from raytrain_at.data.sources import digits_tensors

warnings.filterwarnings("ignore", message=".*torch.jit.script.*", category=FutureWarning)


class TinyDigitsNet(nn.Module):
    """A small CNN for 3x16x16 digit images in [0, 1] (normalisation inside, like every model here)."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1, stride=2)
        self.bn = nn.BatchNorm2d(32)
        self.fc = nn.Linear(32 * 8 * 8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.conv1(x - 0.5))
        x = F.gelu(self.bn(self.conv2(x)))
        return self.fc(x.flatten(1))


@pytest.fixture(scope="session")
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    """All 1,797 digits at 3x16x16 in [0, 1] (the package's bundled-data reader)."""
    return digits_tensors(side=16)


@pytest.fixture(scope="session")
def trained_digits_net(digits) -> nn.Module:
    """TinyDigitsNet trained for a few epochs on the first 1,500 digits (about 2 s on CPU)."""
    torch.manual_seed(0)
    x, y = digits
    model = TinyDigitsNet()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = np.random.default_rng(0)
    for _ in range(8):
        order = torch.tensor(gen.permutation(1500))
        for start in range(0, 1500, 64):
            idx = order[start:start + 64]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    return model
