"""What a worker settles about its device before it builds anything.

A GPU run whose worker sees no CUDA device (a torch build for a newer CUDA than the node's driver,
a node without its GPUs) would otherwise go on to fail much later and less clearly, in NCCL's
first collective or as a run crawling on CPU threads; here it is one line before the model, the
data or DeepSpeed exist. On CUDA, cuDNN's autotuner is turned on: every step of a run has the same
shapes, so the one-time search for the fastest convolution algorithms pays for itself in the
first few steps.
"""

from __future__ import annotations

import torch

from raytrain_at.errors import UserError


def cuda_summary() -> str:
    """torch's CUDA build and what the driver offers, as one phrase for an error line."""
    built = torch.version.cuda or "none (a CPU build)"
    return (f"torch {torch.__version__} built for CUDA {built}, "
            f"{torch.cuda.device_count()} CUDA device(s) visible")


def prepare_worker_device(use_gpu: bool, device: torch.device) -> None:
    """Check that a GPU run got CUDA and set the device's backend flags.

    Args:
        use_gpu: ``scaling.use_gpu`` of the run.
        device: the device Ray Train gave this worker.

    Raises:
        UserError: ``use_gpu`` is set but ``device`` is not a CUDA device.
    """
    if use_gpu and device.type != "cuda":
        raise UserError(f"scaling.use_gpu is true but this worker has no usable GPU "
                        f"({cuda_summary()}): check that the node's driver supports torch's "
                        "CUDA build (docs/cluster.md), or --set scaling.use_gpu=false")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
