"""``raytrain-at bench ...``: thin commands, each builds its settings (validated before anything
heavy loads), calls one function and prints its JSON document (progress goes to stderr)."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import typer

bench_app = typer.Typer(add_completion=False, no_args_is_help=True,
                        help="Measure this machine: training step, loader, attacks, evaluation "
                             "(one JSON document each, as BENCHMARKS.md records them).")

_DEVICE = typer.Option(None, help="cuda or cpu [CUDA when present]")


@contextmanager
def _stdout_on_stderr() -> Iterator[None]:
    """Whatever the work writes to stdout (DeepSpeed's log lines and op builds, down to the file
    descriptor) goes to stderr, so stdout holds the JSON document alone."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def _print(measure: Callable[[], dict[str, Any]]) -> None:
    with _stdout_on_stderr():
        document = measure()
    print(json.dumps(document, indent=2))


@bench_app.command("step")
def step(
    model: list[str] = typer.Option(None, help="timm name, repeatable [the recipe's model, else "
                                    "convnext_tiny_cvst, vit_small_cvst and vit_base_cvst]"),
    batch: list[int] = typer.Option(None, help="per-GPU batch, repeatable: several fit t_step(B) "
                                    "[the recipe's per-worker batch, else 128 on CUDA, 8 on CPU]"),
    resolution: int = typer.Option(None, help="input side [the recipe's, else 224]"),
    steps: int = typer.Option(None, help="timed steps [20 on CUDA, 3 on CPU]"),
    warmup: int = typer.Option(None, help="untimed steps first [5 on CUDA, 1 on CPU]"),
    compile_: bool = typer.Option(False, "--compile", help="scaling.compile: torch.compile the "
                                  "model and the APGD step (ours)"),
    reference: bool = typer.Option(True, help="also time the paper-style reference step"),
    reference_attack: str = typer.Option("paper", help="attack inside the reference: paper "
                                         "(its apgd_train passes) or ours"),
    recipe: str = typer.Option(None, help="recipe or YAML whose settings ours runs [RunConfig's "
                               "defaults: the paper's ImageNet step]"),
    set_: list[str] = typer.Option(None, "--set", help="override, e.g. --set optim.zero_stage=2"),
    device: str = _DEVICE,
) -> None:
    """Images/s of WorkerLoop.train_step under DeepSpeed against the paper-style reference step:
    TFLOP/s, MFU, peak memory, host syncs."""
    from raytrain_at.bench.settings import StepBenchSettings

    settings = StepBenchSettings(
        models=tuple(model) if model else None, batches=tuple(batch) if batch else None,
        resolution=resolution, steps=steps, warmup=warmup, compile=compile_,
        reference=reference, reference_attack=reference_attack, recipe=recipe,
        overrides=tuple(set_ or ()), device=device)
    # Only valid settings get this far: now the heavy imports (torch, timm, DeepSpeed ...).
    from raytrain_at.bench.step import run_step_bench

    _print(lambda: run_step_bench(settings))


@bench_app.command("loader")
def loader(
    images: int = typer.Option(1024, help="400 px JPEG-90 images in the file"),
    batch: int = typer.Option(64, help="loader batch"),
    workers: list[int] = typer.Option([1, 2], help="decoding workers, repeatable"),
    aug_batch: int = typer.Option(32, help="batch of the augmentation and step timings"),
    step_repeats: int = typer.Option(2, help="timed training steps beside the augmentation "
                                     "(0: none)"),
    device: str = _DEVICE,
) -> None:
    """FFCV train-loader images/s per decoding worker, and the heavy device augmentation against
    the training step."""
    from raytrain_at.bench.settings import LoaderBenchSettings

    settings = LoaderBenchSettings(
        images=images, batch=batch, workers=tuple(workers), aug_batch=aug_batch,
        step_repeats=step_repeats, device=device)
    # Only valid settings get this far: now the heavy imports (torch, timm, DeepSpeed ...).
    from raytrain_at.bench.loader import run_loader_bench

    _print(lambda: run_loader_bench(settings))


@bench_app.command("attack")
def attack(
    model_ref: str = typer.Argument(..., help="model file, runs:/ID/model or models:/NAME@ALIAS"),
    n: int = typer.Option(8, help="images in the chunk (one batch)"),
    norm: str = typer.Option("linf", help="linf, l2 or l1"),
    eps: str = typer.Option("8/255", help="radius in [0, 1] pixel scale"),
    version: str = typer.Option("standard", help="standard, fast or apgdt"),
    data: str = typer.Option("digits", help="a bundled dataset (its test split)"),
    tracking_uri: str = typer.Option(None, help="for runs:/ and models:/ references"),
    weights_grad: bool = typer.Option(False, help="leave the weights trainable, as a plain "
                                      "pyautoattack call does"),
    seed: int = typer.Option(0),
) -> None:
    """Seconds per attack of AutoAttack on one chunk, as an evaluation worker attacks it."""
    from raytrain_at.bench.settings import AttackBenchSettings

    settings = AttackBenchSettings(
        model_ref=model_ref, n=n, norm=norm, eps=eps, version=version, data=data,
        tracking_uri=tracking_uri, weights_grad=weights_grad, seed=seed)
    # Only valid settings get this far: now the heavy imports (torch, timm, DeepSpeed ...).
    from raytrain_at.bench.attack import run_attack_bench

    _print(lambda: run_attack_bench(settings))


@bench_app.command("eval")
def eval_(
    model: str = typer.Option("convnext_tiny_cvst", help="timm name"),
    weights: str = typer.Option(None, help="local checkpoint [random init]"),
    resolution: int = typer.Option(224, help="input side"),
    n: int = typer.Option(None, help="images [--batch]"),
    batch: int = typer.Option(None, help="attack batch = chunk [256 on CUDA, 8 on CPU]"),
    norm: str = typer.Option("linf", help="linf, l2 or l1"),
    eps: str = typer.Option(None, help="radius in [0, 1] pixel scale [the paper's radius for "
                            "the norm, scaled from 224 to --resolution]"),
    version: str = typer.Option("standard", help="standard or fast"),
    kernels: str = typer.Option("exact", help="ours: the evaluation's --kernels (fast: TF32 + "
                                "channels_last on GPU, breaks checked with exact kernels)"),
    seed: int = typer.Option(0),
    repeats: int = typer.Option(1, help="timed runs of each path, alternating (median)"),
    device: str = _DEVICE,
) -> None:
    """AutoAttack images/s: the project's evaluation path against a plain pyautoattack call on
    the same model and images, per-image results compared."""
    from raytrain_at.bench.settings import EvalBenchSettings

    settings = EvalBenchSettings(
        model=model, weights=weights, resolution=resolution, n=n, batch=batch, norm=norm,
        eps=eps, version=version, kernels=kernels, seed=seed, repeats=repeats, device=device)
    # Only valid settings get this far: now the heavy imports (torch, timm, DeepSpeed ...).
    from raytrain_at.bench.eval import run_eval_bench

    _print(lambda: run_eval_bench(settings))
