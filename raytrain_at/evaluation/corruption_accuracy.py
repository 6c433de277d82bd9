"""Accuracy under common corruptions, in two protocols, on the evaluation's device.

* ``mix`` (the robust fine-tuning benchmark's): each image gets one of the 15 ImageNet-C types,
  drawn from ``(seed, image id)``, at one severity.
* ``imagenet-c`` (RobustBench's ImageNet-C threat model): every image under every one of the 15
  types at every severity 1-5; the reported figure is the mean over the 75 (type, severity)
  accuracies, with per-type and per-severity means beside it.

The corruptions themselves are numpy code (:mod:`raytrain_at.evaluation.corruptions`); the model
runs on the device the evaluation runs on: with ``use_gpu`` (or a cluster address) the whole pass
is one Ray task holding a GPU, which loads the model by reference there.
"""

from __future__ import annotations

from typing import Literal

import torch
from tqdm import tqdm

from raytrain_at.evaluation.corruptions import COMMON_CORRUPTIONS, corrupt_batch
from raytrain_at.evaluation.result import CorruptionResult
from raytrain_at.runtime.ray_init import init_ray

Protocol = Literal["mix", "imagenet-c"]
PROTOCOLS: tuple[str, ...] = ("mix", "imagenet-c")
SEVERITIES = (1, 2, 3, 4, 5)


@torch.no_grad()
def corruption_accuracy(model: torch.nn.Module, data_path: str, ids: list[int], *,
                        resolution: int, crop_pct: float, severity: int, seed: int,
                        batch_size: int, device: torch.device,
                        protocol: Protocol = "mix") -> CorruptionResult:
    """Accuracy of ``model`` on corrupted copies of the images ``ids`` of ``data_path``."""
    from raytrain_at.evaluation.runner import load_images

    model = model.to(device).eval()
    settings = ([(severity, None)] if protocol == "mix" else
                [(s, (name,)) for s in SEVERITIES for name in COMMON_CORRUPTIONS])
    correct: dict[tuple[int, str], int] = {}
    counts: dict[tuple[int, str], int] = {}
    batches = [ids[i:i + batch_size] for i in range(0, len(ids), batch_size)]
    with tqdm(total=len(batches) * len(settings), desc=f"corruptions ({protocol})",
              unit="batch", dynamic_ncols=True) as bar:
        for chunk in batches:
            x, y = load_images(data_path, chunk, resolution=resolution, crop_pct=crop_pct,
                               batch_size=batch_size, device=device)
            for level, names in settings:
                corrupted, chosen = corrupt_batch(x, chunk, severity=level, seed=seed,
                                                  **({} if names is None else {"names": names}))
                hits = model(corrupted).argmax(1).eq(y).cpu().tolist()
                for name, hit in zip(chosen, hits):
                    counts[(level, name)] = counts.get((level, name), 0) + 1
                    correct[(level, name)] = correct.get((level, name), 0) + int(hit)
                bar.update()
    return _summarise(correct, counts, protocol, severity, seed)


def _summarise(correct: dict[tuple[int, str], int], counts: dict[tuple[int, str], int],
               protocol: Protocol, severity: int, seed: int) -> CorruptionResult:
    def mean(values: list[float]) -> float:
        return sum(values) / len(values)

    if protocol == "mix":
        by_type = {name: (sum(correct[k] for k in counts if k[1] == name),
                          sum(counts[k] for k in counts if k[1] == name))
                   for name in sorted({k[1] for k in counts})}
        return CorruptionResult(
            severity=severity, seed=seed, protocol="mix",
            accuracy=sum(correct.values()) / sum(counts.values()),
            per_corruption={name: c / n for name, (c, n) in by_type.items()},
            counts={name: n for name, (_, n) in by_type.items()})
    accuracy = {key: correct[key] / counts[key] for key in counts}
    names = sorted({name for _, name in counts})
    return CorruptionResult(
        severity=0, seed=seed, protocol="imagenet-c",
        # The mean over the 75 (type, severity) accuracies: RobustBench's ImageNet-C figure.
        accuracy=mean(list(accuracy.values())),
        per_corruption={name: mean([a for (s, n), a in accuracy.items() if n == name])
                        for name in names},
        per_severity={str(level): mean([a for (s, n), a in accuracy.items() if s == level])
                      for level in SEVERITIES},
        counts={name: sum(c for (s, n), c in counts.items() if n == name) for name in names})


def _remote_corruption_accuracy(model_ref: str, tracking_uri: str | None, resolution: int,
                                device: str, kwargs: dict) -> dict:
    """Ray task body: load the model where the task runs and measure there."""
    from raytrain_at.model_refs import resolve_model

    model = resolve_model(model_ref, resolution=resolution, device=device,
                          tracking_uri=tracking_uri).module
    result = corruption_accuracy(model, resolution=resolution, device=torch.device(device),
                                 **kwargs)
    return result.model_dump()


def corruption_accuracy_on_device(model: torch.nn.Module, model_ref: str, *,
                                  tracking_uri: str | None, use_gpu: bool,
                                  address: str | None, resolution: int,
                                  **kwargs) -> CorruptionResult:
    """:func:`corruption_accuracy` in this process on the CPU, or as one Ray task holding a GPU
    when the evaluation runs on GPUs (``use_gpu``) or on a cluster (``address``)."""
    if not use_gpu and address is None:
        return corruption_accuracy(model, resolution=resolution, device=torch.device("cpu"),
                                   **kwargs)
    import ray

    init_ray(address)
    # A pure function of the model and the images: a task lost with its node runs again.
    task = ray.remote(_remote_corruption_accuracy).options(
        num_cpus=1, num_gpus=1 if use_gpu else 0, max_retries=3)
    device = "cuda" if use_gpu else "cpu"
    return CorruptionResult.model_validate(ray.get(task.remote(
        model_ref, tracking_uri, resolution, device, kwargs)))
