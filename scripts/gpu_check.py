"""GPU readiness check: every figure the project needs from a GPU, as one JSON document.

One command measures, part by part (each in its own process, with its own time budget, so a
crash, an out-of-memory or a slow compile in one part costs that part alone):

peak            dense bf16 matmul rate of this device (the MFU denominator; fp32 on CPU)
train_step      the 2-step APGD-AT step, ours (bf16, channels_last, fused AdamW, device EMA) vs
                the paper-style step (fp16 + GradScaler, eager), eager, at the paper's per-GPU
                batch (or the largest that fits): images/s, ratio, TFLOP/s, MFU, peak memory
train_compiled  the same step of ours with ``torch.compile`` (model and APGD step)
autoattack      AutoAttack images/s, ours with ``--kernels exact`` and ``fast`` vs one plain
                pyautoattack call on the same model and images, per-image results compared
deepspeed       a DeepSpeed bf16 ZeRO-1 run of ``WorkerLoop`` (the project's per-worker loop,
                no Ray) on the bundled digits: loss falls, the EMA stays fp32, channels_last
                survives the engine, host syncs per step
loader          FFCV train loader into the device and the heavy device augmentation
t_step          ours' step time at several per-GPU batches: t_step(B) of docs/benchmarking.md

The parts reuse the benchmark scripts (``bench_train_step``, ``bench_eval``, ``bench_loader``,
``bench_augment``) and the project's own modules; nothing here re-implements a step. A part whose
package is missing (no wheel travelled) is ``skipped`` with the import error; a part that fails
records ``error`` (one line; the traceback goes to stderr); a part out of time keeps the records
it finished. No figure is ever filled in for a part that did not measure it.

``--cpu-smoke`` runs the same parts at tiny sizes on the CPU (the test suite does, so the script
cannot rot between GPU sessions); its figures mean nothing for speed.

Usage: python scripts/gpu_check.py [--cpu-smoke] [--parts peak,train_step,...] [--budget-s 480]
           [--out FILE]
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import multiprocessing
import os
import platform
import signal
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

SCRIPTS = Path(__file__).resolve().parent
ROOT = SCRIPTS.parent
log = logging.getLogger("gpu_check")

Emit = Callable[[dict[str, Any]], None]


class Skip(Exception):
    """A part cannot run here (a package did not travel, no GPU for a GPU-only figure)."""


@dataclass(frozen=True)
class Sizes:
    """Everything a size preset decides; ``GPU`` is sized for one H100/H200 in under 8 minutes."""

    name: str
    device: str
    # (model, per-GPU batch): the paper's global batch over its 8 GPUs (1,392 / 8, 864 / 8).
    train_models: tuple[tuple[str, int], ...]
    resolution: int
    steps: int
    warmup: int
    compile_warmup: int
    aa_model: str
    aa_resolution: int
    aa_images: int
    aa_version: str
    ds_model: str
    ds_precision: str
    ds_resolution: int
    ds_batch: int
    ds_epochs: int
    ds_train_size: int | None
    loader_images: int
    loader_batch: int
    loader_workers: tuple[int, ...]
    aug_batch: int
    aug_resolution: int
    t_step_batches: dict[str, tuple[int, ...]]
    budgets_s: dict[str, float] = field(default_factory=dict)


GPU = Sizes(
    name="gpu", device="cuda",
    train_models=(("convnext_tiny_cvst", 174), ("vit_base_cvst", 108)),
    resolution=224, steps=8, warmup=3, compile_warmup=3,
    aa_model="convnext_tiny_cvst", aa_resolution=224, aa_images=128, aa_version="standard",
    ds_model="convnext_atto_cvst", ds_precision="bf16", ds_resolution=32, ds_batch=64,
    ds_epochs=14, ds_train_size=None,  # the digits' 1,500 training images: 23 steps an epoch
    loader_images=4096, loader_batch=256, loader_workers=(4, 12), aug_batch=256,
    aug_resolution=224,
    t_step_batches={"convnext_tiny_cvst": (27, 44, 87, 174), "vit_base_cvst": (27, 54, 108)},
    budgets_s={"peak": 20, "train_step": 95, "train_compiled": 140, "autoattack": 70,
               "deepspeed": 70, "loader": 45, "t_step": 40},
)
SMOKE = Sizes(
    name="cpu-smoke", device="cpu",
    train_models=(("test_vit", 2),),
    resolution=32, steps=1, warmup=1, compile_warmup=1,
    aa_model="test_vit", aa_resolution=32, aa_images=4, aa_version="fast",
    # fp32 as the project trains on CPU: bf16 there spends ~40 s warming up oneDNN's kernels
    # (tests/test_ema.py checks the bf16 case of the EMA on CPU).
    ds_model="test_convnext", ds_precision="fp32", ds_resolution=32, ds_batch=16, ds_epochs=3,
    ds_train_size=32,
    loader_images=32, loader_batch=16, loader_workers=(1,), aug_batch=4, aug_resolution=32,
    t_step_batches={"test_vit": (2, 4)},
    # Generous: a shared 2-core machine can be several times slower than a quiet one.
    budgets_s={"peak": 60, "train_step": 120, "train_compiled": 300, "autoattack": 120,
               "deepspeed": 180, "loader": 120, "t_step": 120},
)
PARTS = ("peak", "train_step", "train_compiled", "autoattack", "deepspeed", "loader", "t_step")


# ------------------------------------------------------------------------------------ helpers
def _scripts_on_path() -> None:
    for path in (str(SCRIPTS), str(ROOT)):
        if path not in sys.path:
            sys.path.insert(0, path)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".strip()


def _bench_args(sizes: Sizes, **extra: Any) -> argparse.Namespace:
    """The argument namespace the benchmark scripts' functions read."""
    base = dict(resolution=sizes.resolution, steps=sizes.steps, warmup=sizes.warmup,
                compile=False, reference_attack="paper")
    return argparse.Namespace(**{**base, **extra})


def _is_oom(exc: BaseException) -> bool:
    import torch

    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def _free_device() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# -------------------------------------------------------------------------------------- parts
def part_peak(sizes: Sizes, device, peak: float | None, emit: Emit) -> None:
    from bench_train_step import device_name, measure_peak_tflops

    emit({"device_name": device_name(device), **measure_peak_tflops(device)})


def _train_rows(sizes: Sizes, device, peak: float | None, emit: Emit, kinds: tuple[str, ...],
                compiled: bool) -> None:
    """One record per model: the variants ``kinds`` at the paper's batch, halved on OOM."""
    from bench_train_step import forward_macs, run_variant

    for name, batch in sizes.train_models:
        macs = forward_macs(name, sizes.resolution)
        requested = batch
        while True:
            args = _bench_args(sizes, batch=batch, compile=compiled,
                               warmup=sizes.compile_warmup if compiled else sizes.warmup)
            row: dict[str, Any] = {"model": name, "batch_requested": requested, "batch": batch,
                                   "forward_gmacs_per_image":
                                       None if macs is None else round(macs / 1e9, 4)}
            try:
                for kind in kinds:
                    row[kind] = run_variant(kind, name, args, device, macs, peak or 1.0)
                break
            except Exception as exc:  # noqa: BLE001 - only an OOM is retried
                if not _is_oom(exc) or batch <= 1:
                    raise
                log.warning("%s: out of memory at batch %d, halving", name, batch)
                batch //= 2
                _free_device()
        for kind in kinds:
            if peak is None:  # no measured peak: no MFU (never one against a made-up peak)
                row[kind].pop("mfu", None)
        if "ours" in row and "reference" in row:
            row["ratio_ours_over_reference"] = round(
                row["ours"]["images_per_s"] / row["reference"]["images_per_s"], 3)
        emit(row)
        _free_device()


def part_train_step(sizes: Sizes, device, peak: float | None, emit: Emit) -> None:
    _train_rows(sizes, device, peak, emit, ("ours", "reference"), compiled=False)


def part_train_compiled(sizes: Sizes, device, peak: float | None, emit: Emit) -> None:
    _train_rows(sizes, device, peak, emit, ("ours",), compiled=True)


def part_autoattack(sizes: Sizes, device, peak: float | None, emit: Emit) -> None:
    import pyautoattack  # noqa: F401 - a missing package skips the part
    import torch
    from bench_eval import NUM_CLASSES, make_data, run_ours, run_plain, warm_up

    from raytrain_at.evaluation.threats import PAPER_EPS, ThreatModel, scaled_eps
    from raytrain_at.models import create_robust_model

    n = sizes.aa_images
    threat = scaled_eps(ThreatModel("linf", PAPER_EPS["linf"]), sizes.aa_resolution, 224)
    torch.manual_seed(0)
    model = create_robust_model(sizes.aa_model, num_classes=NUM_CLASSES,
                                resolution=sizes.aa_resolution).to(device).eval()
    x, y = make_data(model, n, sizes.aa_resolution, n, device, seed=0)
    warm_up(model, x, y)
    settings = {"model": sizes.aa_model, "weights": "random init", "resolution":
                sizes.aa_resolution, "images": n, "batch": n, "threat": threat.label(),
                "version": sizes.aa_version,
                "data": "uniform random images labelled by the model's clean prediction"}
    plain_s, plain_robust = run_plain(model, x, y, argparse.Namespace(
        seed=0, version=sizes.aa_version, batch=n), threat, device)
    emit({"path": "plain pyautoattack", **settings, "seconds": round(plain_s, 3),
          "images_per_s": round(n / plain_s, 3),
          "robust_accuracy": sum(plain_robust) / n})
    for kernels in ("exact", "fast"):
        args = argparse.Namespace(seed=0, version=sizes.aa_version, batch=n, kernels=kernels)
        seconds, robust, broken, unconfirmed = run_ours(model, x, y, args, threat, device)
        emit({"path": f"ours --kernels {kernels}", **settings, "seconds": round(seconds, 3),
              "images_per_s": round(n / seconds, 3), "robust_accuracy": sum(robust) / n,
              "broken_by": broken, "unconfirmed_then_reattacked": unconfirmed,
              "ratio_over_plain": round(plain_s / seconds, 3),
              "identical_per_image_to_plain": robust == plain_robust})


def _conv_weights_channels_last(module) -> bool | None:
    """Whether every 4-D weight of ``module`` is channels_last (None: it has none)."""
    import torch

    weights = [p for p in module.parameters() if p.ndim == 4]
    if not weights:
        return None
    return all(w.is_contiguous(memory_format=torch.channels_last) for w in weights)


def part_deepspeed(sizes: Sizes, device, peak: float | None, emit: Emit) -> None:
    import deepspeed
    import ffcv  # noqa: F401 - the loop reads FFCV files: a missing package skips the part

    from raytrain_at.config import load_config
    from raytrain_at.diagnostics.host_syncs import HostSyncCounter
    from raytrain_at.training.launch import prepare_data
    from raytrain_at.training.loop import WorkerLoop, WorkerPlace

    cuda = device.type == "cuda"
    from raytrain_at.training.single_rank import single_rank_environment

    single_rank_environment()
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
    overrides = [f"model.name={sizes.ds_model}", f"data.resolution={sizes.ds_resolution}",
                 f"schedule.global_batch_size={sizes.ds_batch}", "scaling.num_workers=1",
                 f"scaling.use_gpu={str(cuda).lower()}",
                 f"scaling.precision={sizes.ds_precision}",
                 "scaling.channels_last=true", "optim.zero_stage=1", "optim.warmup_epochs=0",
                 f"schedule.epochs={sizes.ds_epochs}", "data.loader_workers=2"]
    if sizes.ds_train_size:
        overrides.append(f"data.train_size={sizes.ds_train_size}")
    config = load_config("quickstart", overrides)
    with tempfile.TemporaryDirectory() as storage:
        train_path, _ = prepare_data(config, Path(storage))
        loop = WorkerLoop(config, WorkerPlace(0, 1, device), train_path, None)
        steps_per_epoch = len(loop.train_data)
        losses, seconds = [], []
        for _ in range(sizes.ds_epochs - 1):
            metrics = loop.train_epoch()
            losses.append(round(metrics["train_loss"], 4))
            seconds.append(round(metrics["epoch_seconds"], 3))
        # The last epoch under the counter (it slows every operator, so it is not timed).
        with HostSyncCounter(record_callers=True) as syncs:
            metrics = loop.train_epoch()
        losses.append(round(metrics["train_loss"], 4))
    in_deepspeed = sum(n for where, n in syncs.callers.items()
                       if f"{os.sep}deepspeed{os.sep}" in where)
    elsewhere = {where: n for where, n in syncs.callers.items()
                 if f"{os.sep}deepspeed{os.sep}" not in where}
    ema_dtypes = sorted({str(v.dtype) for v in loop.ema.module.state_dict().values()
                         if v.is_floating_point()})
    live_dtypes = sorted({str(p.dtype) for p in loop.engine.module.parameters()})
    layout = _conv_weights_channels_last(loop.engine.module)
    emit({"model": sizes.ds_model, "resolution": sizes.ds_resolution, "batch": sizes.ds_batch,
          "zero_stage": 1, "precision": loop.precision,
          "bf16_engine": bool(loop.engine.bfloat16_enabled()),
          "steps": steps_per_epoch * sizes.ds_epochs, "epochs": sizes.ds_epochs,
          "train_loss_per_epoch": losses, "loss_falls": losses[-1] < losses[0],
          "epoch_seconds": seconds,
          "images_per_s_last_timed_epoch":
              round(steps_per_epoch * sizes.ds_batch / seconds[-1], 1) if seconds else None,
          "ema_dtypes": ema_dtypes, "ema_fp32": ema_dtypes == ["torch.float32"],
          "live_param_dtypes": live_dtypes,
          "channels_last_weights_after_training":
              layout if cuda else "not applied on CPU (the loop uses it on CUDA only)",
          "host_syncs_per_step_deepspeed": round(in_deepspeed / steps_per_epoch, 3),
          "host_syncs_per_step_project_code": round(sum(elsewhere.values()) / steps_per_epoch, 3),
          "host_syncs_outside_deepspeed": elsewhere})


def _epoch_rate(loader, device, augment=None) -> float:
    """Images/s of one pass over ``loader`` (with ``augment`` applied to each batch), timed to
    the completion of the device work."""
    import torch

    start, count = time.perf_counter(), 0
    for images, labels in loader:
        if augment is not None:
            augment(images, labels)
        count += images.shape[0]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return count / (time.perf_counter() - start)


def part_loader(sizes: Sizes, device, peak: float | None, emit: Emit) -> None:
    import torch
    from bench_augment import median_ms
    from bench_loader import photo_samples

    from raytrain_at.data.device_augment import DeviceAugment
    from raytrain_at.data.ffcv_loaders import train_loader
    from raytrain_at.data.ffcv_writer import WriteOptions, write_beton

    augment = DeviceAugment("heavy", num_classes=1000, seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        # bench_loader's file: 400 px JPEG-90 crops of scikit-learn's two bundled photographs.
        path = write_beton(photo_samples(sizes.loader_images), Path(tmp) / "photos400.beton",
                           WriteOptions(max_resolution=400, write_mode="jpg", jpeg_quality=90))
        for workers in sizes.loader_workers:
            loader = train_loader(path, batch_size=sizes.loader_batch, resolution=224,
                                  num_workers=workers, device=str(device), seed=0)
            _epoch_rate(loader, device)  # the first epoch compiles FFCV's pipeline (numba)
            alone = _epoch_rate(loader, device)
            with_augment = _epoch_rate(loader, device, augment)
            emit({"what": "FFCV train loader at 224 into the device (random-resized crop, flip)",
                  "device": str(device), "images": sizes.loader_images,
                  "batch": sizes.loader_batch, "workers": workers,
                  "images_per_s": round(alone, 1),
                  "images_per_s_per_worker": round(alone / workers, 1),
                  "images_per_s_with_heavy_augmentation": round(with_augment, 1)})
    gen = torch.Generator().manual_seed(0)
    r = sizes.aug_resolution
    images = torch.rand(sizes.aug_batch, 3, r, r, generator=gen).to(device)
    labels = torch.randint(0, 1000, (sizes.aug_batch,), generator=gen).to(device)
    ms = median_ms(lambda: augment(images, labels), device, runs=5, warmup=2)
    emit({"what": "heavy device augmentation alone (RandAugment + erasing + MixUp/CutMix)",
          "batch": sizes.aug_batch, "resolution": r, "ms_per_batch": round(ms, 2),
          "images_per_s": round(sizes.aug_batch / ms * 1000, 1)})


def part_t_step(sizes: Sizes, device, peak: float | None, emit: Emit) -> None:
    import statistics

    from bench_train_step import build_ours, time_steps

    for name, batches in sizes.t_step_batches.items():
        variant = build_ours(name, sizes.resolution, device, compile_model=False)
        points = []
        for batch in batches:
            times = time_steps(variant, batch, sizes.resolution, device, sizes.steps,
                               sizes.warmup)
            points.append((batch, statistics.median(times)))
            emit({"model": name, "batch": batch, "t_step_s": round(points[-1][1], 5)})
        if len(points) >= 2:  # t_step(B) ~ a + b * B: fixed cost per step and cost per image
            xs, ys = zip(*points)
            mx, my = statistics.fmean(xs), statistics.fmean(ys)
            slope = (sum((x - mx) * (y - my) for x, y in points)
                     / sum((x - mx) ** 2 for x in xs))
            emit({"model": name, "fit": "t_step(B) = a + b * B (least squares)",
                  "a_s": round(my - slope * mx, 5), "b_s_per_image": round(slope, 7)})
        del variant
        _free_device()


PART_FUNCTIONS = {"peak": part_peak, "train_step": part_train_step,
                  "train_compiled": part_train_compiled, "autoattack": part_autoattack,
                  "deepspeed": part_deepspeed, "loader": part_loader, "t_step": part_t_step}


def run_part(name: str, sizes: Sizes, records: Path, peak: float | None) -> None:
    """In the part's own process: run one part, one JSON line per record into ``records``, the
    last line its status (ok, skipped with the reason, or a one-line error)."""
    import torch

    with records.open("a") as out:
        def emit(record: dict[str, Any]) -> None:
            out.write(json.dumps(record) + "\n")
            out.flush()  # what a timed-out part finished is kept

        if sizes.device == "cuda" and not torch.cuda.is_available():
            status: dict[str, Any] = {"status": "skipped", "reason": "no CUDA device"}
        else:
            if sizes.device == "cuda":
                torch.backends.cudnn.benchmark = True  # as bench_train_step, both variants
            try:
                PART_FUNCTIONS[name](sizes, torch.device(sizes.device), peak, emit)
                status = {"status": "ok"}
            except ImportError as exc:
                status = {"status": "skipped",
                          "reason": f"a package did not travel: {_one_line(exc)}"}
            except Skip as exc:
                status = {"status": "skipped", "reason": str(exc)}
            except Exception as exc:  # noqa: BLE001 - recorded as the part's one-line error
                traceback.print_exc()
                status = {"status": "error", "error": _one_line(exc)}
        out.write(json.dumps({"_status": status}) + "\n")


def _part_process(name: str, sizes: Sizes, records: Path, peak: float | None) -> None:
    """Entry of a part's forked process: its own process group (so a timeout ends whatever it
    started, inductor's compile workers included) and stdout onto stderr (libraries print there;
    stdout carries only the JSON document)."""
    os.setsid()
    sys.stdout.flush()
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    run_part(name, sizes, records, peak)
    sys.stdout.flush()
    sys.stderr.flush()


# -------------------------------------------------------------------------------- orchestrator
def _read_records(path: Path) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    records, status = [], None
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                item = json.loads(line)
            except json.JSONDecodeError:  # a line cut by a kill
                continue
            if "_status" in item:
                status = item["_status"]
            else:
                records.append(item)
    return records, status


def spawn_part(name: str, sizes: Sizes, timeout: float, peak: float | None,
               workdir: Path) -> dict[str, Any]:
    """Run one part in a forked process within ``timeout`` seconds; its result for the JSON.

    Forked from a parent that imported torch, timm and the project but never touched CUDA, so
    each part starts in a second instead of paying the imports again, and initialises CUDA
    itself."""
    if timeout <= 1:
        return {"status": "skipped", "reason": "no time left in the overall budget"}
    records = workdir / f"{name}.jsonl"
    process = multiprocessing.get_context("fork").Process(
        target=_part_process, args=(name, sizes, records, peak), name=f"gpu_check-{name}")
    start = time.perf_counter()
    process.start()
    process.join(timeout)
    timed_out = process.is_alive()
    if timed_out:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.join()
    seconds = round(time.perf_counter() - start, 1)
    rows, status = _read_records(records)
    if timed_out:
        status = {"status": "timeout",
                  "error": f"stopped after its budget of {timeout:.0f} s; records kept"}
    elif status is None:
        status = {"status": "error",
                  "error": f"the part's process died (exit code {process.exitcode})"}
    return {**status, "seconds": seconds, "budget_s": round(timeout, 1), "records": rows}


def _preload() -> None:
    """Import what every part needs once, before the parts are forked (never CUDA)."""
    _scripts_on_path()
    try:
        import bench_train_step  # noqa: F401
        import timm  # noqa: F401
        import torch  # noqa: F401

        import raytrain_at.models  # noqa: F401
        import raytrain_at.training.objectives  # noqa: F401
    except ImportError as exc:  # each part then reports what it misses
        log.warning("preload incomplete: %s", _one_line(exc))


def _versions() -> dict[str, str | None]:
    """Versions of the stack, and of what the travelling wheels need from this machine (as
    ``.whl/MANIFEST.json`` lists it, when the check runs from a prepared folder): None where a
    package is missing."""
    from importlib.metadata import PackageNotFoundError, version

    names = ["torch", "torchvision", "timm", "deepspeed", "pyautoattack", "ffcv", "kornia",
             "pydantic", "fvcore", "numba", "numpy"]
    listing = ROOT / os.environ.get("GPU_CHECK_WHEELS", ".whl") / "MANIFEST.json"
    if listing.is_file():
        names += [n for n in json.loads(listing.read_text()).get("needs_from_the_machine", [])
                  if n not in names]
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in names:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def _goal(value: float | bool | None, target: float | bool) -> dict[str, Any]:
    if value is None:
        return {"value": None, "target": target, "met": None}
    met = value is True if isinstance(target, bool) else value >= target
    return {"value": value, "target": target, "met": met}


def summarise(parts: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The issue's goals against what was measured (None where a part did not measure it)."""
    goals: dict[str, Any] = {}
    targets = {"convnext_tiny_cvst": 0.30, "vit_base_cvst": 0.40}
    compiled = {r["model"]: r for r in parts.get("train_compiled", {}).get("records", [])}
    for row in parts.get("train_step", {}).get("records", []):
        name = row["model"]
        goals[f"{name}: ours / paper-style images/s (eager)"] = _goal(
            row.get("ratio_ours_over_reference"), 2.0)
        ours_compiled = compiled.get(name, {}).get("ours")
        if ours_compiled is not None:
            goals[f"{name}: ours compiled / paper-style images/s"] = _goal(
                round(ours_compiled["images_per_s"] / row["reference"]["images_per_s"], 3), 2.0)
        mfus = [m for m in (row["ours"].get("mfu"), (ours_compiled or {}).get("mfu"))
                if m is not None]
        mfu = max(mfus) if mfus else None
        if name in targets:
            goals[f"{name}: MFU of ours (best of eager and compiled)"] = _goal(mfu, targets[name])
    for row in parts.get("autoattack", {}).get("records", []):
        if row.get("path") == "ours --kernels fast":
            goals["AutoAttack ours (fast kernels) / plain images/s"] = _goal(
                row["ratio_over_plain"], 1.5)
            goals["AutoAttack identical per image (fast kernels)"] = _goal(
                row["identical_per_image_to_plain"], True)
    for row in parts.get("deepspeed", {}).get("records", []):
        goals["DeepSpeed run: loss falls"] = _goal(row["loss_falls"], True)
        goals["DeepSpeed run: EMA stays fp32"] = _goal(row["ema_fp32"], True)
        goals["DeepSpeed run: no host sync in project code"] = _goal(
            row["host_syncs_per_step_project_code"] == 0, True)
    return goals


def run_all(sizes: Sizes, parts: list[str], budget_s: float) -> dict[str, Any]:
    """Every part in turn, each within min(its budget, what is left of ``budget_s``)."""
    deadline = time.perf_counter() + budget_s
    result: dict[str, Any] = {
        "check": "raytrain_at GPU readiness (scripts/gpu_check.sh)",
        "sizes": sizes.name,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(), "cpu_count": os.cpu_count(), "versions": _versions(),
        "settings": {k: v for k, v in asdict(sizes).items() if k != "budgets_s"},
        "budget_s": budget_s, "parts": {},
    }
    peak: float | None = None
    _preload()
    with tempfile.TemporaryDirectory() as tmp:
        for name in parts:
            left = deadline - time.perf_counter()
            timeout = min(sizes.budgets_s[name], left)
            print(f"[gpu_check] {name} (up to {timeout:.0f} s) ...", file=sys.stderr, flush=True)
            outcome = spawn_part(name, sizes, timeout, peak, Path(tmp))
            result["parts"][name] = outcome
            print(f"[gpu_check] {name}: {outcome['status']} in {outcome.get('seconds', 0)} s",
                  file=sys.stderr, flush=True)
            if name == "peak" and outcome["status"] == "ok" and outcome["records"]:
                peak = outcome["records"][0]["tflops"]
    result["goals"] = summarise(result["parts"])
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="the same parts at tiny sizes on the CPU (figures mean nothing)")
    parser.add_argument("--parts", default=",".join(PARTS),
                        help=f"comma-separated subset of {','.join(PARTS)}")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="overall time budget in seconds (default 480 on GPU, 600 smoke)")
    parser.add_argument("--out", default=None,
                        help="also write the JSON here (default: $OUT/gpu_check.json when $OUT "
                             "is set)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = [p for p in parts if p not in PARTS]
    if unknown or not parts:
        print(f"gpu_check: unknown part(s) {', '.join(unknown) or '(none given)'}; "
              f"known: {', '.join(PARTS)}", file=sys.stderr)
        return 2
    sizes = SMOKE if args.cpu_smoke else GPU
    budget = args.budget_s if args.budget_s is not None else (600 if args.cpu_smoke else 480)
    if budget <= 0:
        print(f"gpu_check: --budget-s must be positive, got {budget}", file=sys.stderr)
        return 2
    out_path = args.out or (str(Path(os.environ["OUT"]) / "gpu_check.json")
                            if os.environ.get("OUT") else None)
    result = run_all(sizes, parts, budget)
    text = json.dumps(result, indent=2)
    if out_path:
        Path(out_path).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(out_path).with_suffix(".json.tmp")
        tmp.write_text(text + "\n")
        tmp.replace(out_path)  # never a half-written document
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
