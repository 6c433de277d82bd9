"""``raytrain-at bench eval``: AutoAttack images/second, the project's evaluation path against a
plain pyautoattack call (JSON).

Both attack the same model (eval mode) on the same images with the same seed and threat model:

ours -- what every evaluation worker of ``raytrain_at.evaluation.runner`` does, without Ray and the
    state files: the weights frozen (FAB then computes no weight gradients), ``build_autoattack``
    (pyautoattack's standard set-up restricted to the version's attacks) and ``attack_chunk`` on
    consecutive chunks of ``batch`` images (a chunk is one attack batch), attack by attack,
    under ``capture_autoattack_warnings``.
plain -- ``AutoAttack(model, norm=..., eps=..., version='standard', seed=..., device=...)`` then
    ``run_standard_evaluation(x, y, batch_size=batch)`` on all images at once. For version
    ``fast`` the same standard set-up runs APGD-CE + APGD-T only (``attacks_to_run``), as
    ``build_autoattack`` configures it; ``apgdt`` is the project's 40-iteration APGD-T sweep
    protocol, which plain pyautoattack has no version for, so it is not offered here.

Robust accuracy: both are reported with a boolean ``identical`` (same accuracy) and
``identical_per_image`` (the same images survive). ``attack_chunk`` attacks a chunk exactly as
``run_standard_evaluation`` attacks one batch, so with ``n`` <= ``batch`` (one chunk, the default)
they must agree. With more images the plain call batches each later attack over the survivors of
all images, so random starts fall on other batch compositions and the accuracies agree only
statistically (``identical`` may then be False without anything being wrong).

Kernels: ``exact`` (default) runs ours with torch's defaults, like the plain call: the same
arithmetic, so the results must be identical image by image. ``fast`` is the evaluation's fast
mode (``raytrain_at.evaluation.kernels``): on a GPU, TF32 matrix multiplies and channels_last
weights for the attacks, with the clean pass and every break checked by the exact model (breaks
that do not hold are attacked again with exact kernels; their count is reported). On a CPU both
modes run the same kernels. The GPU target (ours >= 1.5x plain at equal robust accuracy) is meant
for ``fast`` and cannot be checked on a CPU.

Timing: wall time of each path including its set-up, after one untimed forward + backward; with
``repeats`` > 1 the paths alternate and the medians are reported.

Data: uniform random images, labelled with the model's own clean prediction so that every point is
initially correct and the attacks have work to do. A randomly initialised model is broken almost at
once, so most time goes to APGD-CE; ``weights`` (a local clean or robust checkpoint) gives a
realistic split over the attacks.
"""

from __future__ import annotations

import copy
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Any, cast

import timm
import torch
import torch.nn as nn
from pyautoattack import AutoAttack

from raytrain_at.bench.common import (cpu_threads, default_device, device_name, package_versions,
                                      synchronize, utc_now)
from raytrain_at.bench.settings import EvalBenchSettings
from raytrain_at.evaluation.autoattack import (ROBUST, VERSIONS, attack_chunk, build_autoattack,
                                               predict)
from raytrain_at.evaluation.guards import capture_autoattack_warnings
from raytrain_at.evaluation.kernels import attack_model
from raytrain_at.evaluation.threats import (AUTOATTACK_NORMS, PAPER_EPS, Norm, ThreatModel,
                                            parse_eps, scaled_eps)
from raytrain_at.models import create_robust_model

NUM_CLASSES = 1000


@dataclass(frozen=True)
class OursOutcome:
    """The project's path on the images: time, survivors, what broke them."""

    seconds: float
    robust: list[bool]  # per image
    broken_by: dict[str, int]  # images broken per attack
    unconfirmed: int  # breaks re-attacked with exact kernels


def make_data(model: nn.Module, n: int, resolution: int, batch: int, device: torch.device,
              seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random images in [0, 1] and the model's own predictions as labels (all initially correct)."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, resolution, resolution, generator=generator).to(device)
    return x, predict(model, x, batch)


def warm_up(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    """One forward + input gradient before anything is timed: the first call pays one-time costs
    (kernel selection, allocator growth) that would otherwise land on whichever path runs first."""
    x = x.clone().requires_grad_(True)
    torch.nn.functional.cross_entropy(model(x), y).backward()
    model.zero_grad(set_to_none=True)


def run_ours(model: nn.Module, x: torch.Tensor, y: torch.Tensor, threat: ThreatModel, *,
             version: str, batch: int, kernels: str, seed: int,
             device: torch.device) -> OursOutcome:
    """The project's evaluation path over consecutive chunks of ``batch`` images."""
    # A frozen copy, as evaluate_units freezes the weights it attacks; the plain call gets the
    # model as a user would pass it, weights trainable.
    model = copy.deepcopy(model).requires_grad_(False)
    synchronize(device)
    start = time.perf_counter()
    # As evaluation.runner.evaluate_units builds them (the fast twin is part of the time).
    fast = attack_model(model, kernels, device)
    aa = build_autoattack(fast, threat, version, seed, device, NUM_CLASSES)
    exact_aa = aa if fast is model else build_autoattack(model, threat, version, seed, device,
                                                         NUM_CLASSES)
    status: list[str] = []
    unconfirmed = 0
    for first in range(0, len(x), batch):
        ids = list(range(first, min(first + batch, len(x))))
        with capture_autoattack_warnings() as seen:
            record = attack_chunk(fast, aa, x[ids[0]:ids[-1] + 1], y[ids[0]:ids[-1] + 1], ids,
                                  threat.norm, batch_size=batch, warnings=seen, kernels=kernels,
                                  exact_model=model, exact_aa=exact_aa)
        status.extend(record.status)
        unconfirmed += record.unconfirmed
    synchronize(device)
    return OursOutcome(seconds=time.perf_counter() - start,
                       robust=[s == ROBUST for s in status],
                       broken_by={attack: status.count(attack) for attack in VERSIONS[version]},
                       unconfirmed=unconfirmed)


def run_plain(model: nn.Module, x: torch.Tensor, y: torch.Tensor, threat: ThreatModel, *,
              version: str, batch: int, seed: int, device: torch.device
              ) -> tuple[float, list[bool]]:
    """(seconds, robust flag per image) of one plain pyautoattack call."""
    synchronize(device)
    start = time.perf_counter()
    aa = AutoAttack(model, norm=AUTOATTACK_NORMS[threat.norm], eps=threat.eps,
                    version="standard", seed=seed, device=device)
    aa.verbose = False  # ours runs quiet too; verbose adds norm computations and log calls
    aa.attacks_to_run = list(VERSIONS[version])
    _, y_adv = aa.run_standard_evaluation(x, y, batch_size=batch)
    synchronize(device)
    return time.perf_counter() - start, y_adv.eq(y).cpu().tolist()


def run_eval_bench(settings: EvalBenchSettings) -> dict[str, Any]:
    """The JSON document of ``bench eval``.

    Raises:
        UserError: an unknown model name or a checkpoint that does not fit (one line naming it).
    """
    device = torch.device(settings.device or default_device())
    torch.set_num_threads(cpu_threads())  # FFCV, if imported, set it to 1
    batch = settings.batch or (256 if device.type == "cuda" else 8)
    n = settings.n or batch
    norm = cast(Norm, settings.norm)  # checked by EvalBenchSettings
    if settings.eps is None:
        threat = scaled_eps(ThreatModel(norm, PAPER_EPS[norm]), settings.resolution, 224)
    else:
        threat = ThreatModel(norm, parse_eps(settings.eps, "--eps"))
    torch.manual_seed(0)
    model = create_robust_model(settings.model, num_classes=NUM_CLASSES, weights=settings.weights,
                                resolution=settings.resolution).to(device).eval()
    x, y = make_data(model, n, settings.resolution, batch, device, settings.seed)

    warm_up(model, x[:batch], y[:batch])
    ours_runs: list[OursOutcome] = []
    plain_times: list[float] = []
    plain_robust: list[bool] = []
    for repeat in range(settings.repeats):  # alternate, so drifts of a shared machine hit both
        print(f"repeat {repeat}: ours ...", file=sys.stderr)
        ours_runs.append(run_ours(model, x, y, threat, version=settings.version, batch=batch,
                                  kernels=settings.kernels, seed=settings.seed, device=device))
        print(f"repeat {repeat}: plain pyautoattack ...", file=sys.stderr)
        seconds, plain_robust = run_plain(model, x, y, threat, version=settings.version,
                                          batch=batch, seed=settings.seed, device=device)
        plain_times.append(seconds)
    ours = ours_runs[-1]
    ours_s = statistics.median(r.seconds for r in ours_runs)
    plain_s = statistics.median(plain_times)
    ours_acc, plain_acc = sum(ours.robust) / n, sum(plain_robust) / n
    exact = settings.kernels == "exact" or device.type != "cuda"
    return {
        "benchmark": "AutoAttack: raytrain_at evaluation path vs plain pyautoattack",
        "date": utc_now(), "device": device.type, "device_name": device_name(device),
        "torch_threads": torch.get_num_threads(),
        "versions": {**package_versions("torch", "pyautoattack"), "timm": timm.__version__},
        "settings": {"model": settings.model, "weights": settings.weights or "random init",
                     "resolution": settings.resolution, "n": n, "batch": batch, "norm": norm,
                     "eps": threat.eps, "threat": threat.label(), "version": settings.version,
                     "seed": settings.seed, "kernels": settings.kernels,
                     "precision": ("fp32, channels-first (both)" if exact else
                                   "ours: fp32 with TF32 matmuls, channels_last weights, exact "
                                   "checks; plain: torch defaults"),
                     "data": "uniform random images labelled by the model's clean prediction"},
        "ours": {"seconds": round(ours_s, 3),
                 "seconds_all": [round(r.seconds, 3) for r in ours_runs],
                 "images_per_s": round(n / ours_s, 4), "robust_accuracy": ours_acc,
                 "broken_by": ours.broken_by, "unconfirmed_then_reattacked": ours.unconfirmed},
        "plain": {"seconds": round(plain_s, 3), "seconds_all": [round(t, 3) for t in plain_times],
                  "images_per_s": round(n / plain_s, 4), "robust_accuracy": plain_acc},
        "ratio_ours_over_plain": round(plain_s / ours_s, 3),
        "identical": ours_acc == plain_acc,
        "identical_per_image": ours.robust == plain_robust,
    }
