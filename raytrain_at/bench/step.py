"""``raytrain-at bench step``: images/second of the training step, ours against the paper's.

ours -- ``WorkerLoop.train_step`` (``raytrain_at.training.loop``), the step training runs, under
    the real DeepSpeed engine: a single-rank ``WorkerLoop`` (no Ray) built from the run config,
    so ZeRO stage, precision (bf16 on CUDA, fp32 on the CPU), channels_last, torch's fused AdamW,
    the fp32 EMA, the device augmentation, the attack and ``scaling.compile`` are what training
    uses. The config is RunConfig's defaults (the paper's ImageNet settings: 1,000 classes, heavy
    augmentation, l_inf 4/255 2-step APGD from the clean input, label smoothing 0.1, AdamW betas
    (0.9, 0.95), weight decay 0.05, EMA) or ``--recipe``, then ``--set``, then the model, batch
    and resolution asked for. Batches are synthetic uint8 images made on the device and converted
    as the FFCV loader delivers them (``uint8 / 255``, channels_last), with random labels; the
    decoding (``bench loader``) and the host-to-device copy of the bytes are not part of it. One
    timed step is one ``train_step`` call as ``train_epoch`` makes it: attack (model in eval
    mode), objective, DeepSpeed backward, the next batch's augmentation (the loop's lookahead),
    DeepSpeed step, EMA update.
reference -- the same step as the source paper's code writes it, in plain torch
    (:mod:`raytrain_at.bench.reference_step`: fp16 AMP + GradScaler, eager, plain AdamW, a host-side
    EMA, NCHW images), with the run config's hyperparameters.

Time: median over ``--steps`` timed steps after ``--warmup`` untimed ones, each timed between
device synchronisations; images/s = batch / median step time. With several ``--batch`` values the
step times of ours give ``t_step(B) = a + b * B`` (least squares) per model, the single-GPU input
of the scaling model in docs/benchmarking.md. On CUDA a batch that runs out of memory is halved.

FLOPs: ``raytrain_at.models.complexity`` (fvcore) counts multiply-adds of one forward of one
image; achieved FLOP/s = 2 FLOPs per multiply-add x forward-equivalents per image x images/s
(forward 1, backward to the input only 1, full backward 2; 8 for a 2-step APGD step from the
clean input, see ``reference_step.apgd_step_passes``). MFU = achieved / peak FLOP/s, the peak a
dense matmul measured on this device before and after the models (the larger kept; fp32 on the
CPU, labelled: a CPU MFU is not a GPU MFU). Memory: ``torch.cuda.max_memory_allocated`` per
variant on CUDA; on the CPU the process's max RSS, a high-water mark of the whole run.

Host syncs (ours, eager): the operators of one extra step that make the host wait for the device,
counted with ``raytrain_at.diagnostics.host_syncs``: project code (``host_syncs_per_step``: none
expected), DeepSpeed's step (its gradient checks) and the heavy augmentation's selection of images
per operation, which runs on CPU tensors by design (no device wait on a GPU; on a CPU run the
counter cannot tell them apart), each apart.
"""

from __future__ import annotations

import gc
import logging
import os
import statistics
import sys
import tempfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import numpy as np
import timm
import torch
import torch.distributed as dist
import torch.nn as nn

from raytrain_at.bench.common import (cpu_threads, default_device, device_name, is_out_of_memory,
                                      measure_peak_tflops, package_versions, peak_memory,
                                      reset_peak_memory, timed_calls, utc_now)
from raytrain_at.bench.reference_step import (Variant, apgd_step_passes, build_reference,
                                              forward_equivalents)
from raytrain_at.bench.settings import StepBenchSettings
from raytrain_at.config import RunConfig, load_config
from raytrain_at.data.ffcv_writer import WriteOptions, write_beton
from raytrain_at.data.sources import Sample
from raytrain_at.diagnostics.host_syncs import HostSyncCounter
from raytrain_at.errors import UserError
from raytrain_at.models import count_flops
from raytrain_at.training.loop import WorkerLoop, WorkerPlace, build_attack, build_model
from raytrain_at.training.single_rank import single_rank_environment

log = logging.getLogger(__name__)

PAPER_MODELS = ("convnext_tiny_cvst", "vit_small_cvst", "vit_base_cvst")
KINDS = ("ours", "reference")
# Where a host sync counted in ours' step comes from (see the module docstring).
_DEEPSPEED = f"{os.sep}deepspeed{os.sep}"
_AUGMENT_DRAWS = f"raytrain_at{os.sep}data{os.sep}device_augment.py"


# ------------------------------------------------------------------------------ ours' inputs
class SyntheticBatches(Iterator[tuple[torch.Tensor, torch.Tensor]]):
    """Endless batches as the FFCV train loader delivers them: uint8 pixels on the device seen
    channels_last (FFCV's ``ToTorchImage(channels_last=True)``), converted to float / 255 on the
    device each time (``DeviceBatches``), with random labels."""

    def __init__(self, batch: int, resolution: int, num_classes: int, device: torch.device,
                 seed: int = 1) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.pixels = torch.randint(0, 256, (batch, resolution, resolution, 3),
                                    dtype=torch.uint8, generator=generator).to(device)
        self.labels = torch.randint(0, num_classes, (batch,), generator=generator).to(device)

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.pixels.permute(0, 3, 1, 2).float().div_(255.0), self.labels.clone()


def write_placeholder_file(path: Path, samples: int) -> Path:
    """A tiny .beton of ``samples`` random 16x16 images: ``WorkerLoop`` builds its loader over a
    real file, which the benchmark never reads (its batches are synthetic)."""
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    return write_beton([Sample(label=i % 2, pixels=pixels) for i in range(samples)], path,
                       WriteOptions(max_resolution=None, write_mode="raw"))


def init_single_rank(device: torch.device) -> None:
    """A world of one for DeepSpeed, unless this process already belongs to one (a Ray worker)."""
    import deepspeed

    if not dist.is_initialized():
        single_rank_environment(keep_existing=True)
        deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")


def _torch_optimizer(optimizer: Any) -> torch.optim.Optimizer | None:
    """The torch optimizer inside DeepSpeed's wrappers (``.optimizer`` all the way down)."""
    for _ in range(5):
        if isinstance(optimizer, torch.optim.Optimizer):
            return optimizer
        optimizer = getattr(optimizer, "optimizer", None)
    return None


def step_passes(config: RunConfig) -> dict[str, int] | None:
    """Model passes per image of ours' step, where they are known (APGD adversarial training and
    clean training); None otherwise (no FLOP figures then)."""
    if config.objective.kind == "clean" or config.attack.kind == "none":
        return {"forward_only": 0, "forward_input_backward": 0, "forward_full_backward": 1}
    if config.objective.kind == "adversarial" and config.attack.kind == "apgd":
        return apgd_step_passes(config.attack.steps, config.attack.random_start)
    return None


def build_worker_step(config: RunConfig, place: WorkerPlace, train_path: str | Path
                      ) -> tuple[WorkerLoop, Variant]:
    """A ``WorkerLoop`` of ``config`` and a step function that runs its ``train_step`` once on
    synthetic batches (see the module docstring); DeepSpeed's process group must exist."""
    loop = WorkerLoop(config, place, str(train_path), None)
    model = cast(nn.Module, loop.engine.module)
    model.train(not config.model.linear_probe)  # as train_epoch
    attack = build_attack(model, config, config.attack.eps, seed=config.seed + place.rank)
    batches = SyntheticBatches(config.per_worker_batch_size, config.data.resolution,
                               config.model.num_classes, place.device)
    ahead = [loop.augment(*next(batches))]

    def step() -> None:
        images, targets = ahead[0]
        _, upcoming = loop.train_step(attack, images, targets, batches)
        ahead[0] = cast("tuple[torch.Tensor, torch.Tensor]", upcoming)  # batches never end

    optimizer = _torch_optimizer(loop.optimizer)
    fused = optimizer.defaults.get("fused") if optimizer is not None else None
    a = config.attack
    return loop, Variant(step=step, passes=step_passes(config) or {}, description={
        "step": "WorkerLoop.train_step (raytrain_at.training.loop)",
        "engine": f"DeepSpeed ZeRO-{config.optim.zero_stage}",
        "precision": {"bf16": "bf16 (DeepSpeed bf16 weights, bf16 autocast)",
                      "fp32": "fp32 (the project trains in fp32 on the CPU)"
                      if place.device.type == "cpu" else "fp32"}[loop.precision],
        "channels_last": config.scaling.channels_last and place.device.type == "cuda",
        "optimizer": f"torch {type(optimizer).__name__} fused={fused}" if optimizer else None,
        "ema": "timm ModelEmaV3 (fp32) on the device" if loop.ema is not None else None,
        "augmentation": f"{config.aug.preset} on the device (the next batch, in the step)",
        "compile": config.scaling.compile,
        "attack": f"raytrain_at {a.kind} {a.norm} eps={a.eps:.5f} n_iter={a.steps} "
                  f"({'random' if a.random_start else 'clean'} start)"
                  if a.kind != "none" else "none"})


def count_host_syncs(step: Variant) -> dict[str, Any]:
    """One extra, untimed step under :class:`HostSyncCounter`, split by where the syncs come
    from (see the module docstring)."""
    with HostSyncCounter(record_callers=True) as syncs:
        step.step()
    project: Counter[str] = Counter()
    deepspeed_syncs = augment_draws = 0
    for where, count in syncs.callers.items():
        if _DEEPSPEED in where:
            deepspeed_syncs += count
        elif _AUGMENT_DRAWS in where and where.endswith("aten::nonzero"):
            augment_draws += count
        else:
            project[where.rsplit(" ", 1)[1]] += count
    return {"host_syncs_per_step": dict(sorted(project.items())),
            "host_syncs_per_step_deepspeed": deepspeed_syncs,
            "host_syncs_per_step_augmentation_host_draws": augment_draws}


def measure_train_step(config: RunConfig, place: WorkerPlace, train_path: str | Path, *,
                       steps: int, warmup: int, count_syncs: bool = True,
                       threads: int | None = None) -> dict[str, Any]:
    """Time ``WorkerLoop.train_step`` of ``config`` at its per-worker batch on synthetic batches.

    ``bench step`` calls this; DeepSpeed's process group must exist (see
    :func:`init_single_rank`).

    Args:
        config: the run; ``train_path`` is any .beton the loop can open (it is not read).
        place: rank, world size and device of this worker.
        train_path: the file the loop's loader is built over.
        steps, warmup: timed steps, and untimed ones before them.
        count_syncs: count the host syncs of one more step (eager only; the counter slows every
            operator several times over).
        threads: torch's intra-op threads for the timed steps (None: as the loop leaves them;
            FFCV sets them to the loader's worker count).

    Returns:
        What the step is made of, its step times and images/s, the model passes per image, the
        host syncs of one more step (eager only) and peak memory.
    """
    _free(place.device)
    reset_peak_memory(place.device)
    loop, variant = build_worker_step(config, place, train_path)
    if threads is not None:
        torch.set_num_threads(threads)
    times = timed_calls(variant.step, place.device, runs=steps, warmup=warmup)
    if config.scaling.compile:  # a dispatch mode would make the compiled graphs recompile
        syncs: dict[str, Any] = {"host_syncs_per_step": "not counted with --compile"}
    elif not count_syncs:
        syncs = {"host_syncs_per_step": "not counted"}
    else:
        syncs = count_host_syncs(variant)
    row = {**variant.description, **_rates(times, config.per_worker_batch_size),
           "passes_per_image": variant.passes or None, **syncs, **peak_memory(place.device)}
    del loop, variant
    return row


# ----------------------------------------------------------------------------------- a row
def _rates(times: list[float], batch: int) -> dict[str, Any]:
    median = statistics.median(times)
    return {"images_per_s": round(batch / median, 3), "step_s_median": round(median, 4),
            "step_s": [round(t, 4) for t in times]}


def _flops(passes: dict[str, int], rate: float, macs: int | None, peak: float
           ) -> dict[str, Any]:
    if not passes:
        return {"passes_per_image": None, "forward_equivalents_per_image": None}
    fwd_eq = forward_equivalents(passes)
    out: dict[str, Any] = {"passes_per_image": passes, "forward_equivalents_per_image": fwd_eq}
    if macs is not None:
        tflops = 2 * macs * fwd_eq * rate / 1e12
        out.update(achieved_tflops=round(tflops, 6), mfu=round(tflops / peak, 4))
    return out


def _free(device: torch.device) -> None:
    gc.collect()  # the previous variant's model, optimizer state and EMA
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_ours(config: RunConfig, device: torch.device, train_path: Path, steps: int,
             warmup: int, macs: int | None, peak: float, count_syncs: bool) -> dict[str, Any]:
    """The ours row of one model and batch."""
    row = measure_train_step(config, WorkerPlace(0, 1, device), train_path, steps=steps,
                             warmup=warmup, count_syncs=count_syncs, threads=cpu_threads())
    return {**row, **_flops(row["passes_per_image"] or {}, row["images_per_s"], macs, peak)}


def run_reference(config: RunConfig, device: torch.device, attack_kind: str, steps: int,
                  warmup: int, macs: int | None, peak: float) -> dict[str, Any]:
    """The reference row of one model and batch (same initial weights as ours)."""
    _free(device)
    reset_peak_memory(device)
    torch.manual_seed(config.seed)
    model = build_model(config).to(device)
    variant = build_reference(model, config, config.per_worker_batch_size, device, attack_kind)
    torch.set_num_threads(cpu_threads())
    times = timed_calls(variant.step, device, runs=steps, warmup=warmup)
    rates = _rates(times, config.per_worker_batch_size)
    # Its non-fused AdamW reads each parameter's step counter with .item(): host tensors in a GPU
    # run (no wait) but indistinguishable from device reads on the CPU. Its GPU waits are
    # GradScaler's inf check and the copies of every weight to its host-side EMA.
    row = {**variant.description, **rates,
           **_flops(variant.passes, rates["images_per_s"], macs, peak),
           "host_syncs_per_step": "not counted (see raytrain_at.bench.step)",
           **peak_memory(device)}
    del model, variant
    return row


def forward_macs(config: RunConfig) -> int | None:
    """fvcore multiply-adds of one forward of one image, or None without fvcore (the rates are
    still measured; the FLOP figures are left out)."""
    try:
        torch.manual_seed(config.seed)
        return count_flops(build_model(config), config.data.resolution)
    except ImportError as exc:
        print(f"FLOPs not counted for {config.model.name}: {exc}", file=sys.stderr)
        return None


def t_step_fit(points: list[tuple[int, float]]) -> dict[str, Any]:
    """Least-squares ``t_step(B) = a + b * B``: fixed cost per step and cost per image."""
    xs, ys = zip(*points)
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    slope = sum((x - mx) * (y - my) for x, y in points) / sum((x - mx) ** 2 for x in xs)
    return {"fit": "t_step(B) = a + b * B (least squares, ours' median step times)",
            "points": [[b, round(t, 5)] for b, t in points],
            "a_s": round(my - slope * mx, 5), "b_s_per_image": round(slope, 7)}


# ------------------------------------------------------------------------------ the command
def bench_config(*, recipe: str | None = None, overrides: tuple[str, ...] = (),
                 model: str | None = None, batch: int | None = None,
                 resolution: int | None = None, device: torch.device,
                 train_path: Path | None = None, compile_model: bool = False) -> RunConfig:
    """The run config ours runs: ``recipe`` (None: RunConfig's defaults), then ``overrides``,
    then what the benchmark fixes (one worker with ``batch`` images, no held-out file, no
    starting weights, the device, the placeholder training file).

    Raises:
        UserError: an unknown recipe or key, or a bad value (one line naming it).
    """
    fixed = ["scaling.num_workers=1", f"scaling.use_gpu={str(device.type == 'cuda').lower()}",
             "data.heldout=null", "model.pretrained=null", "model.init=null"]
    if compile_model:
        fixed.append("scaling.compile=true")
    if model is not None:
        fixed.append(f"model.name={model}")
    if batch is not None:
        fixed.append(f"schedule.global_batch_size={batch}")
    if resolution is not None:
        fixed.append(f"data.resolution={resolution}")
    if train_path is not None:
        fixed.append(f"data.train={train_path}")
    return load_config(recipe, [*overrides, *fixed])


def _config(settings: StepBenchSettings, model: str | None, batch: int | None,
            device: torch.device, train_path: Path | None) -> RunConfig:
    return bench_config(recipe=settings.recipe, overrides=settings.overrides, model=model,
                        batch=batch, resolution=settings.resolution, device=device,
                        train_path=train_path, compile_model=settings.compile)


def _smaller(batch: int, config: RunConfig) -> int:
    """Half of ``batch`` (even with MixUp/CutMix, which pair images)."""
    half = batch // 2
    return half - half % 2 if config.aug.preset == "heavy" else half


def _model_rows(settings: StepBenchSettings, model: str, batches: tuple[int, ...],
                device: torch.device, steps: int, warmup: int, peak: float,
                folder: Path) -> list[dict[str, Any]]:
    """Rows of one model at every batch (each halved on CUDA out-of-memory)."""
    rows: list[dict[str, Any]] = []
    macs = forward_macs(_config(settings, model, batches[0], device, None))
    for requested in batches:
        batch = requested
        while True:
            config = _config(settings, model, batch, device, None)
            train_path = write_placeholder_file(folder / f"placeholder-{batch}.beton",
                                                config.per_worker_batch_size)
            config = _config(settings, model, batch, device, train_path)
            row: dict[str, Any] = {"model": config.model.name, "batch_requested": requested,
                                   "batch": batch, "forward_gmacs_per_image":
                                       None if macs is None else round(macs / 1e9, 4)}
            try:
                for kind in KINDS if settings.reference else KINDS[:1]:
                    print(f"{config.model.name} batch {batch}: {kind} ...", file=sys.stderr)
                    # Host syncs of a model's first batch: the same code at any batch.
                    row[kind] = (run_ours(config, device, train_path, steps, warmup, macs, peak,
                                          count_syncs=not rows)
                                 if kind == "ours" else
                                 run_reference(config, device, settings.reference_attack,
                                               steps, warmup, macs, peak))
                break
            except Exception as exc:  # noqa: BLE001 - only an out-of-memory is retried
                if device.type != "cuda" or not is_out_of_memory(exc) or _smaller(batch,
                                                                                  config) < 1:
                    raise
                log.warning("%s: out of memory at batch %d, halving", model, batch)
                batch = _smaller(batch, config)
                _free(device)
        if "reference" in row:
            row["ratio_ours_over_reference"] = round(
                row["ours"]["images_per_s"] / row["reference"]["images_per_s"], 3)
        rows.append(row)
    return rows


def run_step_bench(settings: StepBenchSettings) -> dict[str, Any]:
    """Measure ours (and the reference) for every model and batch; the JSON document.

    Raises:
        UserError: ``--device cuda`` on a machine without CUDA (one line).
    """
    device = torch.device(settings.device or default_device())
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: this machine has no CUDA device")
    cuda = device.type == "cuda"
    steps = settings.steps or (20 if cuda else 3)
    warmup = settings.warmup if settings.warmup is not None else (5 if cuda else 1)
    # The recipe as its run would have it (its per-worker batch over its own workers), which
    # also validates recipe and overrides before any work.
    base = load_config(settings.recipe, list(settings.overrides))
    models: tuple[str, ...] = settings.models or (
        (base.model.name,) if settings.recipe else PAPER_MODELS)
    batches = settings.batches or ((base.per_worker_batch_size,) if settings.recipe
                                   else (128 if cuda else 8,))
    for model in models:
        _config(settings, model, batches[0], device, None)  # an unknown key fails before work
    if cuda:
        torch.backends.cudnn.benchmark = True  # both variants: the paper's code sets it too
    init_single_rank(device)
    torch.set_num_threads(cpu_threads())  # the peak, ours and the reference alike
    # Before and after the models, the larger kept: on a shared machine one measurement can
    # catch a busy moment and inflate the MFU.
    peak = measure_peak_tflops(device)
    result: dict[str, Any] = {
        "benchmark": "2-step APGD adversarial training step: WorkerLoop.train_step under "
                     "DeepSpeed vs the paper-style reference (attack + train fwd/bwd + AdamW + "
                     "EMA)",
        "date": utc_now(), "device": device.type, "device_name": device_name(device),
        "torch_threads": torch.get_num_threads(),
        "versions": {**package_versions("torch", "deepspeed"), "timm": timm.__version__},
        "settings": {"recipe": settings.recipe, "overrides": list(settings.overrides),
                     "resolution": base.data.resolution if settings.resolution is None
                     else settings.resolution,
                     "batch": batches[0] if len(batches) == 1 else list(batches),
                     "steps": steps, "warmup": warmup, "eps": base.attack.eps,
                     "n_iter": base.attack.steps, "compile": settings.compile,
                     "reference": settings.reference,
                     "reference_attack": settings.reference_attack},
        "peak": peak,
        "flops": "2 x fvcore multiply-adds of one forward x forward-equivalents per image "
                 "(forward 1, input-only backward 1, full backward 2)",
        "models": [],
    }
    with tempfile.TemporaryDirectory(prefix="bench-step-") as folder:
        for model in models:
            rows = _model_rows(settings, model, batches, device, steps, warmup,
                               float(peak["tflops"]), Path(folder))
            result["models"].extend(rows)
            if len(rows) > 1:
                result.setdefault("t_step_fit", {})[rows[0]["model"]] = t_step_fit(
                    [(r["batch"], r["ours"]["step_s_median"]) for r in rows])
    torch.set_num_threads(cpu_threads())
    again = measure_peak_tflops(device)
    result["peak"]["tflops_before_after"] = [peak["tflops"], again["tflops"]]
    if float(again["tflops"]) > float(peak["tflops"]):
        result["peak"]["tflops"] = again["tflops"]
        for row in result["models"]:
            for kind in KINDS:
                if "achieved_tflops" in row.get(kind, {}):
                    row[kind]["mfu"] = round(row[kind]["achieved_tflops"]
                                             / float(again["tflops"]), 4)
    return result
