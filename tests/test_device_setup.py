"""A worker's device set-up (training/device_setup.py): a GPU run without CUDA stops in one line
before anything is built; on CUDA cuDNN's autotuner is on, elsewhere the flag is left alone."""

from __future__ import annotations

import pytest
import torch

from raytrain_at.errors import UserError
from raytrain_at.training.device_setup import prepare_worker_device


@pytest.fixture
def cudnn_benchmark():
    """Restore the process-wide flag whatever a test sets."""
    saved = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = False
    yield
    torch.backends.cudnn.benchmark = saved


def test_a_gpu_run_on_a_cpu_device_is_one_line_naming_the_setting(cudnn_benchmark) -> None:
    with pytest.raises(UserError) as info:
        prepare_worker_device(True, torch.device("cpu"))
    message = str(info.value)
    assert "\n" not in message
    assert "scaling.use_gpu" in message and f"torch {torch.__version__}" in message
    assert torch.backends.cudnn.benchmark is False


def test_cuda_turns_on_cudnn_autotuning_and_cpu_leaves_it(cudnn_benchmark) -> None:
    prepare_worker_device(False, torch.device("cpu"))
    assert torch.backends.cudnn.benchmark is False
    prepare_worker_device(True, torch.device("cuda", 3))  # the flag needs no device to set
    assert torch.backends.cudnn.benchmark is True
