"""AutoAttack images/second: the project's evaluation path vs a plain pyautoattack call (JSON).

Both attack the same model (eval mode) on the same images with the same seed and threat model:

ours -- what every evaluation worker of ``raytrain_at.evaluation.runner`` does, without Ray and the
    state files: the weights frozen (FAB then computes no weight gradients), ``build_autoattack``
    (pyautoattack's standard set-up restricted to the version's attacks) and ``attack_chunk`` on
    consecutive chunks of ``--batch`` images (a chunk is one attack batch), attack by attack,
    under ``capture_autoattack_warnings``.
plain -- ``AutoAttack(model, norm=..., eps=..., version='standard', seed=..., device=...)`` then
    ``run_standard_evaluation(x, y, batch_size=--batch)`` on all images at once. For ``--version
    fast`` the same standard set-up runs APGD-CE + APGD-T only (``attacks_to_run``), as
    ``build_autoattack`` configures it; ``apgdt`` is the project's 40-iteration APGD-T sweep
    protocol, which plain pyautoattack has no version for, so it is not offered here.

Robust accuracy: both are reported with a boolean ``identical`` (same accuracy) and
``identical_per_image`` (the same images survive). ``attack_chunk`` attacks a chunk exactly as
``run_standard_evaluation`` attacks one batch, so with ``--n`` <= ``--batch`` (one chunk, the
default) they must agree. With more images the plain call batches each later attack over the
survivors of all images, so random starts fall on other batch compositions and the accuracies
agree only statistically (``identical`` may then be False without anything being wrong).

Kernels: ``--kernels exact`` (default) runs ours with torch's defaults, like the plain call: the
same arithmetic, so the results must be identical image by image. ``--kernels fast`` is the
evaluation's fast mode (``raytrain_at.evaluation.kernels``): on a GPU, TF32 matrix multiplies and
channels_last weights for the attacks, with the clean pass and every break checked by the exact
model (breaks that do not hold are attacked again with exact kernels; their count is reported).
On a CPU both modes run the same kernels. The GPU target (ours >= 1.5x plain at equal robust
accuracy) is meant for ``--kernels fast`` and cannot be checked on a CPU.

Timing: wall time of each path including its set-up, after one untimed forward + backward; with
``--repeats`` > 1 the paths alternate and the medians are reported.

Data: uniform random images, labelled with the model's own clean prediction so that every point is
initially correct and the attacks have work to do. A randomly initialised model is broken almost at
once, so most time goes to APGD-CE; ``--weights`` (a local clean or robust checkpoint) gives a
realistic split over the attacks.

Usage: python scripts/bench_eval.py [--model convnext_tiny_cvst] [--resolution 224] [--n 256]
           [--batch 256] [--norm linf] [--eps 4/255] [--version standard|fast] [--weights FILE]
           [--kernels exact|fast] [--repeats 1]
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

# Share the device naming of the training benchmark (its folder is not on sys.path when the
# script runs through runpy, as in the tests).
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train_step import device_name  # noqa: E402

NUM_CLASSES = 1000


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_data(model: nn.Module, n: int, resolution: int, batch: int, device: torch.device,
              seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random images in [0, 1] and the model's own predictions as labels (all initially correct)."""
    from raytrain_at.evaluation.autoattack import predict

    generator = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, resolution, resolution, generator=generator).to(device)
    return x, predict(model, x, batch)


def warm_up(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    """One forward + input gradient before anything is timed: the first call pays one-time costs
    (kernel selection, allocator growth) that would otherwise land on whichever path runs first."""
    x = x.clone().requires_grad_(True)
    torch.nn.functional.cross_entropy(model(x), y).backward()
    model.zero_grad(set_to_none=True)


def run_ours(model: nn.Module, x: torch.Tensor, y: torch.Tensor, args: argparse.Namespace,
             threat, device: torch.device) -> tuple[float, list[bool], dict[str, int], int]:
    """(seconds, robust flag per image, images broken per attack, breaks re-attacked with exact
    kernels) through the project's path."""
    from raytrain_at.evaluation.autoattack import ROBUST, attack_chunk, build_autoattack
    from raytrain_at.evaluation.guards import capture_autoattack_warnings
    from raytrain_at.evaluation.kernels import attack_model

    # A frozen copy, as evaluate_units freezes the weights it attacks; the plain call gets the
    # model as a user would pass it, weights trainable.
    model = copy.deepcopy(model).requires_grad_(False)
    synchronize(device)
    start = time.perf_counter()
    # As evaluation.runner.evaluate_units builds them (the fast twin is part of the time).
    fast = attack_model(model, args.kernels, device)
    aa = build_autoattack(fast, threat, args.version, args.seed, device, NUM_CLASSES)
    exact_aa = aa if fast is model else build_autoattack(model, threat, args.version, args.seed,
                                                         device, NUM_CLASSES)
    status: list[str] = []
    unconfirmed = 0
    for first in range(0, len(x), args.batch):
        ids = list(range(first, min(first + args.batch, len(x))))
        with capture_autoattack_warnings() as seen:
            record = attack_chunk(fast, aa, x[ids[0]:ids[-1] + 1], y[ids[0]:ids[-1] + 1], ids,
                                  threat.norm, batch_size=args.batch, warnings=seen,
                                  kernels=args.kernels, exact_model=model, exact_aa=exact_aa)
        status.extend(record.status)
        unconfirmed += record.unconfirmed
    synchronize(device)
    seconds = time.perf_counter() - start
    broken = {attack: status.count(attack) for attack in aa.attacks_to_run}
    return seconds, [s == ROBUST for s in status], broken, unconfirmed


def run_plain(model: nn.Module, x: torch.Tensor, y: torch.Tensor, args: argparse.Namespace,
              threat, device: torch.device) -> tuple[float, list[bool]]:
    """(seconds, robust flag per image) of one plain pyautoattack call."""
    from pyautoattack import AutoAttack

    from raytrain_at.evaluation.autoattack import VERSIONS
    from raytrain_at.evaluation.threats import AUTOATTACK_NORMS

    synchronize(device)
    start = time.perf_counter()
    aa = AutoAttack(model, norm=AUTOATTACK_NORMS[threat.norm], eps=threat.eps,
                    version="standard", seed=args.seed, device=device)
    aa.verbose = False  # ours runs quiet too; verbose adds norm computations and log calls
    aa.attacks_to_run = list(VERSIONS[args.version])
    _, y_adv = aa.run_standard_evaluation(x, y, batch_size=args.batch)
    synchronize(device)
    return time.perf_counter() - start, y_adv.eq(y).cpu().tolist()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="convnext_tiny_cvst", help="timm name")
    parser.add_argument("--weights", default=None, help="local checkpoint (default: random init)")
    parser.add_argument("--resolution", type=int, default=224)
    parser.add_argument("--n", type=int, default=None, help="images (default: --batch)")
    parser.add_argument("--batch", type=int, default=None,
                        help="attack batch = chunk (default 256 on CUDA, 8 on CPU)")
    parser.add_argument("--norm", choices=("linf", "l2", "l1"), default="linf")
    parser.add_argument("--eps", default=None,
                        help="radius in [0, 1] pixel scale, e.g. 4/255 (default: the paper's "
                             "radius for the norm, scaled from 224 to --resolution)")
    parser.add_argument("--version", choices=("standard", "fast"), default="standard")
    parser.add_argument("--kernels", choices=("exact", "fast"), default="exact",
                        help="ours: the evaluation's --kernels (fast: TF32 + channels_last on "
                             "GPU, breaks checked with exact kernels)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=1,
                        help="timed runs of each path, alternating (median reported)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    args.batch = args.batch or (256 if device.type == "cuda" else 8)
    args.n = args.n or args.batch

    import timm

    from raytrain_at.evaluation.threats import PAPER_EPS, ThreatModel, parse_eps, scaled_eps
    from raytrain_at.models import create_robust_model

    if args.eps is None:
        threat = scaled_eps(ThreatModel(args.norm, PAPER_EPS[args.norm]), args.resolution, 224)
    else:
        threat = ThreatModel(args.norm, parse_eps(args.eps, "--eps"))
    torch.manual_seed(0)
    model = create_robust_model(args.model, num_classes=NUM_CLASSES, weights=args.weights,
                                resolution=args.resolution).to(device).eval()
    x, y = make_data(model, args.n, args.resolution, args.batch, device, args.seed)

    warm_up(model, x[:args.batch], y[:args.batch])
    ours_times, plain_times = [], []
    for repeat in range(args.repeats):  # alternate, so drifts of a shared machine hit both
        print(f"repeat {repeat}: ours ...", file=sys.stderr)
        seconds, ours_robust, broken, unconfirmed = run_ours(model, x, y, args, threat, device)
        ours_times.append(seconds)
        print(f"repeat {repeat}: plain pyautoattack ...", file=sys.stderr)
        seconds, plain_robust = run_plain(model, x, y, args, threat, device)
        plain_times.append(seconds)
    ours_s, plain_s = statistics.median(ours_times), statistics.median(plain_times)
    ours_acc = sum(ours_robust) / args.n
    plain_acc = sum(plain_robust) / args.n
    result = {
        "benchmark": "AutoAttack: raytrain_at evaluation path vs plain pyautoattack",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device.type,
        "device_name": device_name(device),
        "torch_threads": torch.get_num_threads(),
        "versions": {"torch": torch.__version__, "timm": timm.__version__,
                     "pyautoattack": _version("pyautoattack"), "python": platform.python_version()},
        "settings": {"model": args.model, "weights": args.weights or "random init",
                     "resolution": args.resolution, "n": args.n, "batch": args.batch,
                     "norm": args.norm, "eps": threat.eps, "threat": threat.label(),
                     "version": args.version, "seed": args.seed, "kernels": args.kernels,
                     "precision": ("fp32, channels-first (both)" if args.kernels == "exact"
                                   or device.type != "cuda" else
                                   "ours: fp32 with TF32 matmuls, channels_last weights, exact "
                                   "checks; plain: torch defaults"),
                     "data": "uniform random images labelled by the model's clean prediction"},
        "ours": {"seconds": round(ours_s, 3), "seconds_all": [round(t, 3) for t in ours_times],
                 "images_per_s": round(args.n / ours_s, 4), "robust_accuracy": ours_acc,
                 "broken_by": broken, "unconfirmed_then_reattacked": unconfirmed},
        "plain": {"seconds": round(plain_s, 3),
                  "seconds_all": [round(t, 3) for t in plain_times],
                  "images_per_s": round(args.n / plain_s, 4), "robust_accuracy": plain_acc},
        "ratio_ours_over_plain": round(plain_s / ours_s, 3),
        "identical": ours_acc == plain_acc,
        "identical_per_image": ours_robust == plain_robust,
    }
    print(json.dumps(result, indent=2))


def _version(name: str) -> str:
    from importlib.metadata import version

    return version(name)


if __name__ == "__main__":
    main()
