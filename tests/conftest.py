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


@pytest.fixture(scope="session")
def eval_home(tmp_path_factory) -> str:
    """A private RAYTRAIN_AT_HOME for evaluation tests (bundled test split written once)."""
    from raytrain_at.data.write import bundled_beton

    home = tmp_path_factory.mktemp("eval-home")
    old = os.environ.get("RAYTRAIN_AT_HOME")
    os.environ["RAYTRAIN_AT_HOME"] = str(home)
    bundled_beton("digits", "test", home)
    yield str(home)
    if old is None:
        os.environ.pop("RAYTRAIN_AT_HOME", None)
    else:
        os.environ["RAYTRAIN_AT_HOME"] = old


@pytest.fixture(scope="session")
def robust_model_file(eval_home, tmp_path_factory) -> str:
    """timm's ``test_resnet`` adversarially trained on digits at 16x16 (l_inf 8/255, 2-step
    APGD, about 10 s on CPU), saved as a model file with its spec (what `evaluate` reads)."""
    from pathlib import Path

    from raytrain_at.attacks import APGD
    from raytrain_at.data.write import bundled_beton
    from raytrain_at.evaluation.runner import load_images
    from raytrain_at.models.model_files import ModelSpec, save_model_file

    torch.manual_seed(0)
    train = bundled_beton("digits", "trainval", Path(eval_home))
    x, y = load_images(train, list(range(1500)), resolution=16, crop_pct=1.0, batch_size=500,
                       device=torch.device("cpu"))
    spec = ModelSpec(name="test_resnet", num_classes=10, resolution=16, crop_pct=1.0)
    model = spec.build()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for epoch in range(6):
        order = torch.randperm(len(x))
        for start in range(0, len(x), 100):
            xb, yb = x[order[start:start + 100]], y[order[start:start + 100]]
            if epoch >= 2:  # two clean epochs first, then adversarial training
                model.eval()
                xb = APGD.for_training(model, norm="linf", eps=8 / 255, n_iter=2,
                                       seed=epoch, random_start=True).perturb(xb, yb)
                model.train()
            loss = F.cross_entropy(model(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    path = tmp_path_factory.mktemp("robust-model") / "model.safetensors"
    save_model_file(path, model, spec)
    return str(path)


@pytest.fixture()
def store(tmp_path, monkeypatch) -> str:
    """An empty SQLite MLflow store as MLFLOW_TRACKING_URI, with the current folder elsewhere:
    artifacts must land beside the store, not in ./mlruns of wherever a process runs (as in a
    Ray worker)."""
    (tmp_path / "store").mkdir()
    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    return uri
