"""The GPU check's correctness parts (``pytest -m gpu``; ``scripts/gpu_check.sh`` runs them first).

On the device:
* the project's per-worker loop (``WorkerLoop``, no Ray) trains under DeepSpeed bf16 ZeRO-1 on
  NCCL: its loss falls, the EMA stays fp32 while the engine runs bf16, and in project code the
  step never waits for the device (DeepSpeed's own gradient checks do);
* the evaluation path (``attack_chunk`` over frozen weights, exact and fast kernels) finds the
  same robust images as one plain pyautoattack call on the same model and images.

``RAYTRAIN_AT_GPU_CHECK=cpu-smoke`` runs the same tests at tiny sizes on the CPU (what
``gpu_check.sh --cpu-smoke`` and so ``tests/test_gpu_check.py`` do, so they cannot rot between GPU
sessions); without it a machine without CUDA fails them rather than skipping them. Figures a
later GPU run should compare (losses, host syncs, layouts, re-attacked breaks) are attached to
each test's JUnit record (``record_property``); speed belongs to ``raytrain-at bench``.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from raytrain_at.bench.eval import make_data, run_ours, run_plain, warm_up
from raytrain_at.bench.step import init_single_rank
from raytrain_at.config import load_config
from raytrain_at.data.write import bundled_beton
from raytrain_at.diagnostics.host_syncs import HostSyncCounter
from raytrain_at.evaluation.threats import PAPER_EPS, ThreatModel, scaled_eps
from raytrain_at.models import create_robust_model
from raytrain_at.training.loop import WorkerLoop, WorkerPlace

pytestmark = pytest.mark.gpu

SIZES_ENV = "RAYTRAIN_AT_GPU_CHECK"
_DEEPSPEED = f"{os.sep}deepspeed{os.sep}"


@dataclass(frozen=True)
class Sizes:
    """What one size preset decides; ``GPU`` fits one H100/H200 in about 2 minutes."""

    name: str
    device: str
    loop_model: str
    loop_precision: str
    loop_resolution: int
    loop_batch: int
    loop_epochs: int
    loop_train_size: int | None  # None: the digits' 1,350 training images
    aa_model: str
    aa_resolution: int
    aa_images: int
    aa_version: str


GPU = Sizes(name="gpu", device="cuda", loop_model="convnext_atto_cvst", loop_precision="bf16",
            loop_resolution=32, loop_batch=64, loop_epochs=14, loop_train_size=None,
            aa_model="convnext_tiny_cvst", aa_resolution=224, aa_images=128,
            aa_version="standard")
# fp32 as the project trains on CPU: bf16 there spends ~40 s warming up oneDNN's kernels
# (tests/test_ema.py checks the bf16 case of the EMA on CPU).
CPU_SMOKE = Sizes(name="cpu-smoke", device="cpu", loop_model="test_convnext",
                  loop_precision="fp32", loop_resolution=32, loop_batch=16, loop_epochs=3,
                  loop_train_size=32, aa_model="test_vit", aa_resolution=32, aa_images=4,
                  aa_version="fast")
SIZES = {s.name: s for s in (GPU, CPU_SMOKE)}


def _record(record_property, **figures) -> None:
    """Attach ``figures`` to the test's JUnit record, as JSON (tests/support/gpu_report.py)."""
    for name, value in figures.items():
        record_property(name, json.dumps(value))


@pytest.fixture(scope="module")
def sizes() -> Sizes:
    name = os.environ.get(SIZES_ENV, "gpu")
    if name not in SIZES:
        pytest.fail(f"{SIZES_ENV}={name!r} is not one of {', '.join(SIZES)}")
    chosen = SIZES[name]
    if chosen.device == "cuda" and not torch.cuda.is_available():
        pytest.fail(f"no CUDA device: these checks need one ({SIZES_ENV}=cpu-smoke runs them on "
                    "the CPU at tiny sizes)")
    return chosen


@pytest.fixture(scope="module")
def device(sizes: Sizes) -> torch.device:
    if sizes.device == "cuda":
        torch.backends.cudnn.benchmark = True  # as training sets it on CUDA (training/device_setup.py)
    return torch.device(sizes.device)


# ------------------------------------------------------------------ the worker loop, DeepSpeed
@pytest.fixture(scope="module")
def loop_run(sizes: Sizes, device: torch.device) -> dict:
    """A DeepSpeed bf16 (fp32 on the CPU) ZeRO-1 run of ``WorkerLoop`` on the bundled digits;
    the last epoch under the host-sync counter (it slows every operator, so it is not timed)."""
    init_single_rank(device)
    cuda = device.type == "cuda"
    overrides = [f"model.name={sizes.loop_model}", f"data.resolution={sizes.loop_resolution}",
                 f"schedule.global_batch_size={sizes.loop_batch}", "scaling.num_workers=1",
                 f"scaling.use_gpu={str(cuda).lower()}",
                 f"scaling.precision={sizes.loop_precision}", "scaling.channels_last=true",
                 "optim.zero_stage=1", "optim.warmup_epochs=0",
                 f"schedule.epochs={sizes.loop_epochs}", "data.loader_workers=2"]
    if sizes.loop_train_size:
        overrides.append(f"data.train_size={sizes.loop_train_size}")
    config = load_config("quickstart", overrides)
    with tempfile.TemporaryDirectory() as storage:
        train_path = bundled_beton("digits", "train", Path(storage))
        loop = WorkerLoop(config, WorkerPlace(0, 1, device), train_path, None)
        losses, seconds = [], []
        for _ in range(sizes.loop_epochs - 1):
            metrics = loop.train_epoch()
            losses.append(metrics["train_loss"])
            seconds.append(metrics["epoch_seconds"])
        with HostSyncCounter(record_callers=True) as syncs:
            losses.append(loop.train_epoch()["train_loss"])
    conv_weights = [p for p in loop.engine.module.parameters() if p.ndim == 4]
    return {"loop": loop, "losses": losses, "epoch_seconds": seconds,
            "steps_per_epoch": len(loop.train_data), "callers": dict(syncs.callers),
            "channels_last_weights": bool(conv_weights) and all(
                w.is_contiguous(memory_format=torch.channels_last) for w in conv_weights)}


def test_worker_loop_loss_falls_under_deepspeed(loop_run, sizes, record_property) -> None:
    losses = loop_run["losses"]
    # channels_last is recorded, not asserted: issue 30 keeps the weights so under ZeRO.
    _record(record_property, train_loss_per_epoch=[round(v, 4) for v in losses],
            epoch_seconds=[round(v, 3) for v in loop_run["epoch_seconds"]],
            steps_per_epoch=loop_run["steps_per_epoch"],
            channels_last_weights_after_training=loop_run["channels_last_weights"])
    assert len(losses) == sizes.loop_epochs
    if sizes.loop_train_size:
        assert loop_run["steps_per_epoch"] == sizes.loop_train_size // sizes.loop_batch
    assert losses[-1] < losses[0], losses


def test_ema_stays_fp32_while_the_engine_runs_its_precision(loop_run, sizes) -> None:
    loop = loop_run["loop"]
    ema = {str(v.dtype) for v in loop.ema.module.state_dict().values() if v.is_floating_point()}
    assert ema == {"torch.float32"}
    live = {p.dtype for p in loop.engine.module.parameters()}
    if sizes.loop_precision == "bf16":
        assert loop.engine.bfloat16_enabled() and live == {torch.bfloat16}
    else:
        assert live == {torch.float32}


def test_project_code_never_waits_for_the_device(loop_run, record_property) -> None:
    """As tests/test_finetune_protocols.py counts it on CPU: the loop's augmentation, attack,
    objective, EMA and bookkeeping only queue work; DeepSpeed's step reads its gradient checks."""
    callers = loop_run["callers"]
    steps = loop_run["steps_per_epoch"]
    in_deepspeed = sum(n for where, n in callers.items() if _DEEPSPEED in where)
    elsewhere = {where: n for where, n in callers.items() if _DEEPSPEED not in where}
    _record(record_property, host_syncs_per_step_deepspeed=round(in_deepspeed / steps, 3))
    assert elsewhere == {}
    assert in_deepspeed > 0, "DeepSpeed's step reads its gradient checks: the counter saw nothing"


# ------------------------------------------------------------------ evaluation against pyautoattack
@pytest.fixture(scope="module")
def attacked(sizes: Sizes, device: torch.device) -> dict:
    """A model, images all initially correct, and one plain pyautoattack call's robust flags."""
    n = sizes.aa_images
    threat = scaled_eps(ThreatModel("linf", PAPER_EPS["linf"]), sizes.aa_resolution, 224)
    torch.manual_seed(0)
    model = create_robust_model(sizes.aa_model, num_classes=1000,
                                resolution=sizes.aa_resolution).to(device).eval()
    x, y = make_data(model, n, sizes.aa_resolution, n, device, seed=0)
    warm_up(model, x, y)
    _, plain = run_plain(model, x, y, threat, version=sizes.aa_version, batch=n, seed=0,
                         device=device)
    return {"model": model, "x": x, "y": y, "threat": threat, "plain": plain}


@pytest.mark.parametrize("kernels", ["exact", "fast"])
def test_evaluation_path_equals_plain_pyautoattack(attacked, sizes, device, kernels,
                                                   record_property) -> None:
    ours = run_ours(attacked["model"], attacked["x"], attacked["y"], attacked["threat"],
                    version=sizes.aa_version, batch=sizes.aa_images, kernels=kernels, seed=0,
                    device=device)
    _record(record_property, robust_accuracy=sum(ours.robust) / len(ours.robust),
            broken_by=ours.broken_by, unconfirmed_then_reattacked=ours.unconfirmed)
    assert ours.robust == attacked["plain"]
    if device.type == "cpu":  # the same kernels either way: every break holds
        assert ours.unconfirmed == 0


# ------------------------------------------------------------------ FFCV's thread, on its rank's GPU
_CONTEXTS_PROBE = r"""
import ctypes, json, sys
import torch
from raytrain_at.data.ffcv_loaders import train_loader

torch.cuda.set_device(1)  # as Ray Train does for the rank whose device is cuda:1
loader = train_loader(sys.argv[1], batch_size=16, resolution=32, device="cuda:1", num_workers=1)
for epoch in range(2):
    for images, labels in loader:
        assert images.device == torch.device("cuda", 1)
torch.cuda.synchronize(1)
# The driver's own answer: is a primary context active on each device (no torch call creates one).
cuda = ctypes.CDLL("libcuda.so.1")
active = []
for ordinal in range(torch.cuda.device_count()):
    dev, flags, on = ctypes.c_int(), ctypes.c_uint(), ctypes.c_int()
    assert cuda.cuDeviceGet(ctypes.byref(dev), ordinal) == 0
    assert cuda.cuDevicePrimaryCtxGetState(dev, ctypes.byref(flags), ctypes.byref(on)) == 0
    active.append(bool(on.value))
print(json.dumps(active))
"""


def test_ffcv_loader_on_cuda_1_opens_no_context_on_another_gpu(tmp_path, record_property) -> None:
    """A rank's loader for cuda:1 iterates two epochs in a fresh process: the driver then holds a
    context on GPU 1 only (FFCV's epoch thread, left alone, would open one on GPU 0)."""
    import subprocess
    import sys

    import numpy as np

    from raytrain_at.data.ffcv_writer import WriteOptions, write_beton
    from raytrain_at.data.sources import Sample

    if os.environ.get(SIZES_ENV) == "cpu-smoke" or torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices")
    rng = np.random.default_rng(0)
    samples = [Sample(label=i % 10, pixels=rng.integers(0, 256, (40, 40, 3), dtype=np.uint8))
               for i in range(64)]
    beton = write_beton(samples, tmp_path / "small.beton",
                        WriteOptions(write_mode="raw", max_resolution=None, num_workers=1))
    probe = subprocess.run([sys.executable, "-c", _CONTEXTS_PROBE, str(beton)],
                           capture_output=True, text=True, timeout=300)
    assert probe.returncode == 0, probe.stderr[-3000:]
    active = json.loads(probe.stdout.strip().splitlines()[-1])
    _record(record_property, contexts_active=active)
    assert active[1], active
    assert not any(on for ordinal, on in enumerate(active) if ordinal != 1), active
