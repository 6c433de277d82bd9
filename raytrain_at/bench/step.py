"""Images/second of one 2-step APGD adversarial training step, ours vs the paper's way (JSON).

One step, for both variants: a batch of random [0, 1] images at ``--resolution`` with random labels
(1,000 classes); the inner maximisation with the model in eval mode (forwards + backwards to the
input); the training forward + backward on the attack's points (cross-entropy, label smoothing
0.1); the AdamW step; the EMA update. Loading and augmentation are not part of it
(``scripts/bench_loader.py`` measures those). The time of a step is taken between device
synchronisations; images/s = batch / median step time after ``--warmup`` untimed steps.

ours -- the project's step as ``raytrain_at.training.loop`` runs it, minus DeepSpeed, Ray and FFCV
    (none of them is imported, so the script runs on a bare GPU machine with torch + timm):
    ``training_step_loss`` with ``APGD.for_training(n_iter=2)`` under bf16 autocast (CUDA), model
    and images channels_last (CUDA; FFCV delivers channels_last images), torch AdamW ``fused=True``
    (CUDA and CPU, as ``engine.build_optimizer``) on ``engine.optimizer_groups``, timm
    ``ModelEmaV3`` on the device (``engine.build_ema``) and, with ``--compile`` (the recipes'
    ``scaling.compile``), ``torch.compile`` of the model (attack and training use the compiled
    graph; the EMA reads the uncompiled module, whose parameters are the same tensors) and of the
    APGD step (``compile_step``). Ours also reports ``host_syncs_per_step``: the operators of one
    extra step that make the host wait for the device. In a real
    run DeepSpeed owns backward and step; its single-GPU bookkeeping is not measured here. On CPU
    the project trains in fp32 (``engine.resolve_precision``), so ours is fp32 there too.

reference -- the same step written the way nmndeep/revisiting-at's ``main.py`` and
    ``autopgd_train_clean.py`` do it (read from the repository, not copied): fp16 autocast around
    attack and training forward with ``torch.cuda.amp.GradScaler``, eager, plain
    ``torch.optim.AdamW`` (not fused) with betas (0.9, 0.95), timm
    ``ModelEmaV2(decay=0.9999, device='cpu')`` (its EMA lives in host memory, so every update
    copies the weights off the GPU), model weights
    channels_last (its default ``misc.use_channel_last=1``) fed the contiguous NCHW images its torch
    DataLoader gives, and the pass structure of its ``apgd_train`` (l_inf, n_iter=2, no random
    start): forward + input gradient at the clean point, one step with forward + gradient, a last
    step with a forward only ("save one backward pass"), keeping the highest-loss point. The step
    size checkpoints of ``apgd_train`` are elementwise bookkeeping without model passes and are left
    out: an approximation that keeps the cost, not the exact iterates. ``--reference-attack ours``
    runs our ``APGD.for_training`` inside the reference step instead, which separates the effect of
    the attack's pass count from precision, layout, optimizer and EMA. On CPU the reference runs in
    fp32 (fp16 autocast and GradScaler need CUDA); the JSON says so.

FLOPs: ``raytrain_at.models.complexity`` (fvcore) counts multiply-adds of one forward pass of one
image; achieved FLOP/s = 2 FLOPs per multiply-add x forward-equivalents per image x images/s. A
forward counts 1, a backward to the input only (``torch.autograd.grad`` w.r.t. the image: activation
gradients, no weight gradients) 1, a full backward (activation and weight gradients) 2:

* ours (``attack.random_start`` false, the recipes' default): 2 input-gradient passes (the clean
  start and the first iteration, each 1 + 1) + the last iteration's forward without grad (1) +
  training forward and backward (1 + 2) = 8 (tests/test_attacks_contract.py counts these passes
  on a real model; a random start adds a clean forward: 9);
* reference: 2 input-gradient passes (2 x 2) + 1 forward-only step (1) + training (3) = 8.

MFU = achieved FLOP/s / peak FLOP/s, the peak measured on this device: a dense bf16 8192^3 matmul on
CUDA, an fp32 2048^3 matmul on CPU (labelled as such; a CPU MFU is not a GPU MFU), best time of
several, measured before and after the models and the larger rate kept. Memory:
``torch.cuda.max_memory_allocated`` per variant on CUDA; on CPU the process's max RSS, which is a
high-water mark over the whole run (later rows include earlier ones).

Usage: python scripts/bench_train_step.py [--models convnext_tiny_cvst,vit_small_cvst,vit_base_cvst]
           [--resolution 224] [--batch 128] [--steps 20] [--warmup 5] [--compile]
           [--reference-attack paper|ours] [--device cuda]
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import platform
import resource
import statistics
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, ContextManager

import torch
import torch.nn as nn
import torch.nn.functional as F

# The paper's training hyperparameters that change the work done per step (not the lr values).
EPS = 4 / 255  # l_inf radius in [0, 1] pixel scale
N_ITER = 2  # APGD iterations of the inner maximisation
LABEL_SMOOTHING = 0.1
WEIGHT_DECAY = 0.05
BETAS = (0.9, 0.95)
EMA_DECAY = 0.9999
NUM_CLASSES = 1000

# Forward-equivalents per image and step (see the module docstring).
PASSES = {
    "ours": {"forward_only": 1, "forward_input_backward": 2, "forward_full_backward": 1},
    "paper": {"forward_only": 1, "forward_input_backward": 2, "forward_full_backward": 1},
}


def forward_equivalents(passes: dict[str, int]) -> int:
    return (passes["forward_only"] + 2 * passes["forward_input_backward"]
            + 3 * passes["forward_full_backward"])


StepFn = Callable[[torch.Tensor, torch.Tensor], None]


@dataclass
class Variant:
    """A ready-to-run training step and what it is made of (recorded in the JSON)."""

    step: StepFn
    channels_last_input: bool
    attack_passes: str  # key of PASSES
    description: dict[str, str | bool]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast(device: torch.device, dtype: torch.dtype | None) -> ContextManager:
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


def build_model(name: str, resolution: int, device: torch.device) -> nn.Module:
    from raytrain_at.models import create_robust_model

    torch.manual_seed(0)  # both variants start from the same weights
    # ``resolution`` resamples ViT positional embeddings; convolutional models ignore it.
    return create_robust_model(name, num_classes=NUM_CLASSES, resolution=resolution).to(device)


# ---------------------------------------------------------------------------------------- ours
def build_ours(name: str, resolution: int, device: torch.device, compile_model: bool) -> Variant:
    from raytrain_at.attacks import APGD
    from raytrain_at.training.engine import build_ema, fused_adamw_supported, optimizer_groups
    from raytrain_at.config import ObjectiveSection
    from raytrain_at.training.objectives import training_step_loss

    cuda = device.type == "cuda"
    model = build_model(name, resolution, device).train()
    if cuda:
        model = model.to(memory_format=torch.channels_last)
    ema = build_ema(model, EMA_DECAY)
    fused = fused_adamw_supported(model)  # as engine.build_optimizer decides
    optimizer = torch.optim.AdamW(optimizer_groups(model, WEIGHT_DECAY), lr=1e-4, betas=BETAS,
                                  fused=fused)
    net = torch.compile(model) if compile_model else model
    # As training.loop.build_attack: the loader's images need no [0, 1] read-back.
    attack = APGD.for_training(net, eps=EPS, n_iter=N_ITER, check_range=False,
                               compile_step=compile_model)
    objective = ObjectiveSection(label_smoothing=LABEL_SMOOTHING)
    dtype = torch.bfloat16 if cuda else None

    def step(images: torch.Tensor, labels: torch.Tensor) -> None:
        with autocast(device, dtype):
            out = training_step_loss(net, attack, images, labels, objective)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        optimizer.step()
        ema.update(model)

    return Variant(step=step, channels_last_input=cuda, attack_passes="ours", description={
        "precision": "bf16 autocast" if cuda else "fp32 (the project trains in fp32 on CPU)",
        "channels_last": cuda, "optimizer": f"torch AdamW fused={fused}",
        "ema": "timm ModelEmaV3 on the device", "compile": compile_model,
        "attack": "raytrain_at APGD.for_training(n_iter=2, clean start)"})


# ----------------------------------------------------------------------------------- reference
def paper_apgd_linf(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float,
                    n_iter: int) -> torch.Tensor:
    """The pass structure of the source paper's ``apgd_train`` (l_inf, no random start).

    Forward + input gradient at ``x``, then ``n_iter`` momentum steps of size 2 * eps; every step
    but the last is followed by forward + input gradient, the last by a forward only. Returns the
    highest-loss point seen, the clean input included. Step-size checkpoints are omitted (see the
    module docstring). Runs in eval mode and restores the train flags, as the paper's wrapper does.
    """
    from raytrain_at.attacks import attack_mode

    def project(z: torch.Tensor) -> torch.Tensor:
        return torch.minimum(torch.maximum(z, x - eps), x + eps).clamp(0.0, 1.0)

    with attack_mode(model):
        x_cur = x.detach().clone().requires_grad_(True)
        loss = F.cross_entropy(model(x_cur), y, reduction="none")
        (grad,) = torch.autograd.grad(loss.sum(), [x_cur])
        best_loss, x_best = loss.detach(), x_cur.detach()
        x_cur = x_prev = x_cur.detach()
        for i in range(n_iter):
            momentum = 1.0 if i == 0 else 0.75
            with torch.no_grad():
                z = project(x_cur + 2 * eps * grad.sign())
                x_new = project(x_cur + momentum * (z - x_cur) + (1 - momentum) * (x_cur - x_prev))
            x_prev, x_cur = x_cur, x_new
            last = i == n_iter - 1
            # Like the reference, the forward-only last step still runs with autograd on (the
            # weights require grad), so it stores activations as the other forwards do.
            x_cur.requires_grad_(not last)
            loss = F.cross_entropy(model(x_cur), y, reduction="none")
            if not last:
                (grad,) = torch.autograd.grad(loss.sum(), [x_cur])
            loss, x_cur = loss.detach(), x_cur.detach()
            better = loss > best_loss
            x_best = torch.where(better.view(-1, 1, 1, 1), x_cur, x_best)
            best_loss = torch.where(better, loss, best_loss)
    return x_best


def build_reference(name: str, resolution: int, device: torch.device, attack_kind: str
                    ) -> Variant:
    from timm.utils import ModelEmaV2

    from raytrain_at.attacks import APGD

    cuda = device.type == "cuda"
    # The paper's default converts the weights to channels_last; its images stay NCHW.
    model = build_model(name, resolution, device).train().to(memory_format=torch.channels_last)
    decay, no_decay = [], []
    for param_name, param in model.named_parameters():
        (no_decay if param.ndim <= 1 or param_name.endswith(".bias") else decay).append(param)
    optimizer = torch.optim.AdamW([{"params": no_decay, "weight_decay": 0.0},
                                   {"params": decay, "weight_decay": WEIGHT_DECAY}],
                                  lr=1e-4, betas=BETAS)
    scaler = torch.amp.GradScaler(device.type, enabled=cuda)
    ema = ModelEmaV2(model, decay=EMA_DECAY, device="cpu")
    dtype = torch.float16 if cuda else None
    if attack_kind == "paper":
        def attack(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return paper_apgd_linf(model, x, y, EPS, N_ITER)
    else:
        attack = APGD.for_training(model, eps=EPS, n_iter=N_ITER).perturb

    def step(images: torch.Tensor, labels: torch.Tensor) -> None:
        optimizer.zero_grad(set_to_none=True)
        with autocast(device, dtype):
            x_adv = attack(images, labels)
            loss = F.cross_entropy(model(x_adv), labels, label_smoothing=LABEL_SMOOTHING)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        ema.update(model)

    return Variant(step=step, channels_last_input=False, attack_passes=attack_kind, description={
        "precision": "fp16 autocast + GradScaler" if cuda
        else "fp32 (fp16 autocast and GradScaler need CUDA: CPU fallback)",
        "channels_last": "weights only (paper default), NCHW images",
        "optimizer": "torch AdamW (not fused)", "ema": "timm ModelEmaV2 on the CPU (paper)",
        "compile": False,
        "attack": ("paper apgd_train pass structure (n_iter=2, no random start)"
                   if attack_kind == "paper" else
                   "raytrain_at APGD.for_training(n_iter=2), eager")})


# -------------------------------------------------------------------------------- measurement
def measure_peak_tflops(device: torch.device) -> dict:
    """Dense matmul throughput of this device: the denominator of MFU."""
    cuda = device.type == "cuda"
    n, dtype, reps = (8192, torch.bfloat16, 30) if cuda else (2048, torch.float32, 10)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(reps):
        synchronize(device)
        start = time.perf_counter()
        a @ b
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return {"tflops": round(2 * n ** 3 / best / 1e12, 3),
            "kind": f"measured dense {'bf16' if cuda else 'fp32'} matmul {n}x{n}x{n} "
                    f"({'CUDA' if cuda else 'CPU: not comparable with a GPU peak'})"}


def forward_macs(name: str, resolution: int) -> int | None:
    """fvcore multiply-adds of one forward of one image, or None when fvcore is missing (the bare
    GPU machine may lack it: rates are still measured, FLOP figures are left empty)."""
    try:
        from raytrain_at.models import count_flops
        return count_flops(build_model(name, resolution, torch.device("cpu")), resolution)
    except ImportError as exc:
        print(f"FLOPs not counted for {name}: {exc}", file=sys.stderr)
        return None


def time_steps(variant: Variant, batch: int, resolution: int, device: torch.device,
               steps: int, warmup: int) -> list[float]:
    generator = torch.Generator().manual_seed(1)
    images = torch.rand(batch, 3, resolution, resolution, generator=generator).to(device)
    labels = torch.randint(0, NUM_CLASSES, (batch,), generator=generator).to(device)
    if variant.channels_last_input:
        images = images.contiguous(memory_format=torch.channels_last)
    for _ in range(warmup):  # allocator, cuDNN autotuning, torch.compile
        variant.step(images, labels)
    times = []
    for _ in range(steps):
        synchronize(device)
        start = time.perf_counter()
        variant.step(images, labels)
        synchronize(device)  # GPU work is asynchronous: time it to completion
        times.append(time.perf_counter() - start)
    return times


def count_host_syncs(variant: Variant, batch: int, resolution: int, device: torch.device,
                     compiled: bool) -> dict[str, int] | str:
    """Operators of one extra, untimed step that make the host wait for the device (see
    ``raytrain_at.diagnostics.host_syncs``; on CPU they are counted all the same)."""
    if compiled:  # a dispatch mode would make the compiled graphs recompile or fall back
        return "not counted with --compile"
    from raytrain_at.diagnostics.host_syncs import HostSyncCounter

    generator = torch.Generator().manual_seed(2)
    images = torch.rand(batch, 3, resolution, resolution, generator=generator).to(device)
    labels = torch.randint(0, NUM_CLASSES, (batch,), generator=generator).to(device)
    if variant.channels_last_input:
        images = images.contiguous(memory_format=torch.channels_last)
    with HostSyncCounter() as syncs:
        variant.step(images, labels)
    return dict(sorted(syncs.by_op.items()))


def run_variant(kind: str, name: str, args: argparse.Namespace, device: torch.device,
                macs: int | None, peak_tflops: float) -> dict:
    cuda = device.type == "cuda"
    gc.collect()  # the previous variant's model, optimizer state and EMA
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    variant = (build_ours(name, args.resolution, device, args.compile) if kind == "ours"
               else build_reference(name, args.resolution, device, args.reference_attack))
    times = time_steps(variant, args.batch, args.resolution, device, args.steps, args.warmup)
    if kind == "ours":
        syncs = count_host_syncs(variant, args.batch, args.resolution, device, args.compile)
    else:
        # Its non-fused AdamW reads each parameter's step counter with .item(): host tensors in a
        # GPU run (no wait) but indistinguishable from device reads on CPU. Its GPU waits are
        # GradScaler's inf check and the copies of every weight to its host-side EMA.
        syncs = "not counted (see the script)"
    median = statistics.median(times)
    rate = args.batch / median
    passes = PASSES[variant.attack_passes]
    fwd_eq = forward_equivalents(passes)
    result: dict = {**variant.description, "images_per_s": round(rate, 3),
                    "step_s_median": round(median, 4), "step_s": [round(t, 4) for t in times],
                    "passes_per_image": passes, "forward_equivalents_per_image": fwd_eq,
                    "host_syncs_per_step": syncs}
    if macs is not None:
        tflops = 2 * macs * fwd_eq * rate / 1e12
        result.update(achieved_tflops=round(tflops, 4), mfu=round(tflops / peak_tflops, 4))
    if cuda:
        result["peak_memory_mib"] = round(torch.cuda.max_memory_allocated(device) / 2 ** 20, 1)
    else:  # ru_maxrss is in KiB on Linux
        result["process_max_rss_mib"] = round(
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    del variant
    return result


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="convnext_tiny_cvst,vit_small_cvst,vit_base_cvst",
                        help="comma-separated timm names")
    parser.add_argument("--resolution", type=int, default=224)
    parser.add_argument("--batch", type=int, default=None,
                        help="per-GPU batch (default 128 on CUDA, 8 on CPU)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (20 CUDA, 3 CPU)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps (5 CUDA, 1 CPU)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model (ours)")
    parser.add_argument("--reference-attack", choices=("paper", "ours"), default="paper",
                        help="pass structure of the reference's attack (see the docstring)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    args.batch = args.batch or (128 if cuda else 8)
    args.steps = args.steps or (20 if cuda else 3)
    args.warmup = args.warmup if args.warmup is not None else (5 if cuda else 1)
    if cuda:
        torch.backends.cudnn.benchmark = True  # both variants: the paper's code sets it too

    import timm

    # Measured before and after the models, the larger kept: on a shared machine a single
    # measurement can catch a busy moment and inflate the MFU.
    peak = measure_peak_tflops(device)
    result: dict = {
        "benchmark": "2-step APGD adversarial training step (attack + train fwd/bwd + AdamW + EMA)",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device.type, "device_name": device_name(device),
        "torch_threads": torch.get_num_threads(),
        "versions": {"torch": torch.__version__, "timm": timm.__version__,
                     "python": platform.python_version()},
        "settings": {"resolution": args.resolution, "batch": args.batch, "steps": args.steps,
                     "warmup": args.warmup, "eps": EPS, "n_iter": N_ITER,
                     "compile": args.compile, "reference_attack": args.reference_attack},
        "peak": peak,
        "flops": "2 x fvcore multiply-adds of one forward x forward-equivalents per image "
                 "(forward 1, input-only backward 1, full backward 2)",
        "models": [],
    }
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        macs = forward_macs(name, args.resolution)
        row: dict = {"model": name,
                     "forward_gmacs_per_image": None if macs is None else round(macs / 1e9, 4)}
        for kind in ("ours", "reference"):
            print(f"{name}: {kind} ...", file=sys.stderr)
            row[kind] = run_variant(kind, name, args, device, macs, peak["tflops"])
        row["ratio_ours_over_reference"] = round(
            row["ours"]["images_per_s"] / row["reference"]["images_per_s"], 3)
        result["models"].append(row)
    again = measure_peak_tflops(device)
    result["peak"]["tflops_before_after"] = [peak["tflops"], again["tflops"]]
    if again["tflops"] > peak["tflops"]:
        result["peak"]["tflops"] = again["tflops"]
        for row in result["models"]:
            for kind in ("ours", "reference"):
                if "achieved_tflops" in row[kind]:
                    row[kind]["mfu"] = round(row[kind]["achieved_tflops"] / again["tflops"], 4)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
