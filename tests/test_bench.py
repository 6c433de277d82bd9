"""``raytrain-at bench step|loader|attack|eval`` run end to end at tiny sizes and print the JSON
fields BENCHMARKS.md uses, alone on stdout (speed itself is never asserted)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.cli_runner import run_cli

ROOT = Path(__file__).resolve().parents[1]
CLI = str(Path(sys.executable).with_name("raytrain-at"))
# Issue 9 (speed): one thread per command, so the timings of a busy 2-core machine cannot make
# the OpenMP workers of two processes fight (which slows tiny runs down by orders of magnitude).
_ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
# Not on the GPU machine (their wheels do not travel there): the benchmarks must run without them.
_ABSENT_ON_GPU_MACHINE = ("ray", "mlflow")


def _bench(*args: str, absent: tuple[str, ...] = (), env: dict | None = None) -> dict:
    """``raytrain-at bench ARGS`` with ``absent`` modules made unimportable; its JSON (stdout
    holds nothing else)."""
    code = ("import sys\n"
            f"for name in {absent!r}:\n"
            "    sys.modules[name] = None  # import raises ImportError\n"
            "from raytrain_at.cli import main\n"
            "main(['bench', *sys.argv[1:]])\n")
    result = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                            timeout=600, cwd=ROOT, env={**os.environ, **_ONE_THREAD, **(env or {})})
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout)


@pytest.mark.slow  # 80 s on 2 cores: heavy augmentation and a ConvNeXt step at 224 px (CI's slow list)
def test_bench_loader_prints_rates() -> None:
    """The loader's rate and, as scripts/bench_augment.py printed, the heavy augmentation and its
    RandAugment stage; the share is against the real training step at the same batch."""
    out = _bench("loader", "--images", "96", "--batch", "16", "--workers", "1", "--aug-batch",
                 "2", "--step-repeats", "1", "--device", "cpu")
    assert out["train_loader_224"][0]["images_per_s"] > 0
    augmentation = out["augmentation_224"]
    assert augmentation["heavy_augment_ms"] > 0 and augmentation["randaugment_only_ms"] > 0
    assert augmentation["adv_step_2apgd_convnext_tiny_cvst_ms"] > augmentation["heavy_augment_ms"]
    assert 0 < augmentation["augment_share_of_step"] < 1
    assert out["versions"]["ffcv"] == "1.0.2" and out["versions"]["kornia"]


@pytest.mark.slow  # 58 s on 2 cores: in CI's end-to-end stage
def test_bench_step_times_the_worker_loop_without_ray_or_mlflow() -> None:
    out = _bench("step", "--model", "test_vit", "--resolution", "32", "--batch", "2", "--steps",
                 "1", "--warmup", "1", "--device", "cpu", absent=_ABSENT_ON_GPU_MACHINE)
    assert out["device"] == "cpu" and out["versions"]["timm"] and out["versions"]["deepspeed"]
    assert out["peak"]["tflops"] > 0 and "fp32" in out["peak"]["kind"]
    (row,) = out["models"]
    assert row["model"] == "test_vit" and row["forward_gmacs_per_image"] > 0
    assert row["batch"] == row["batch_requested"] == 2
    for kind, passes in (("ours", 8), ("reference", 8)):
        variant = row[kind]
        assert variant["images_per_s"] > 0 and variant["step_s_median"] > 0
        assert variant["forward_equivalents_per_image"] == passes
        assert variant["achieved_tflops"] > 0 and 0 < variant["mfu"]
        assert variant["process_max_rss_mib"] > 0
    ours = row["ours"]
    assert ours["step"].startswith("WorkerLoop.train_step") and ours["engine"] == "DeepSpeed ZeRO-1"
    # Ours never makes the host wait for the device in project code (as the training loop);
    # DeepSpeed's own step does (its gradient checks), which shows the engine ran the step.
    assert ours["host_syncs_per_step"] == {}
    assert ours["host_syncs_per_step_deepspeed"] > 0
    assert ours["optimizer"] == "torch AdamW fused=True"
    assert "fp32" in row["reference"]["precision"]  # fp16 + GradScaler is CUDA-only
    assert row["ratio_ours_over_reference"] > 0


def test_bench_eval_matches_plain_pyautoattack() -> None:
    """Ours in the fast kernel mode: on a CPU the same arithmetic as the plain call plus the exact
    checks (which confirm every break), so the robust points are identical."""
    out = _bench("eval", "--model", "test_vit", "--resolution", "32", "--n", "4", "--batch", "4",
                 "--version", "fast", "--device", "cpu", "--kernels", "fast")
    assert out["settings"]["kernels"] == "fast"
    assert out["ours"]["unconfirmed_then_reattacked"] == 0
    assert out["ours"]["images_per_s"] > 0 and out["plain"]["images_per_s"] > 0
    assert out["ratio_ours_over_plain"] > 0
    assert out["ours"]["robust_accuracy"] == out["plain"]["robust_accuracy"]
    assert out["identical"] is True and out["identical_per_image"] is True
    assert set(out["ours"]["broken_by"]) == {"apgd-ce", "apgd-t"}
    assert out["settings"]["threat"] == "linf 4/255"


def test_bench_attack_times_each_attack(tmp_path) -> None:
    from raytrain_at.models.model_files import ModelSpec, save_model_file

    spec = ModelSpec(name="test_resnet", num_classes=10, resolution=16, crop_pct=1.0)
    save_model_file(tmp_path / "model.safetensors", spec.build(), spec)
    out = _bench("attack", str(tmp_path / "model.safetensors"), "--n", "4", "--version", "fast",
                 env={"RAYTRAIN_AT_HOME": str(tmp_path / "home")})
    assert list(out["attacks"]) == ["apgd-ce", "apgd-t"]
    assert out["attacks"]["apgd-ce"]["attacked"] == 4
    assert out["attacks"]["apgd-t"]["attacked"] == out["attacks"]["apgd-ce"]["robust_after"]
    assert out["settings"]["weights"] == "frozen" and out["total_seconds"] > 0


def test_bad_bench_settings_are_one_line_before_any_work() -> None:
    for args, fragment in ((("step", "--reference-attack", "nope"), "--reference-attack 'nope'"),
                           (("step", "--set", "optim.no_such_key=1"), "optim.no_such_key"),
                           (("step", "--batch", "0"), "--batch 0"),
                           (("eval", "--norm", "l3"), "--norm 'l3'"),
                           (("loader", "--aug-batch", "3"), "--aug-batch 3")):
        result = run_cli(["bench", *args], timeout=120, cwd=ROOT)
        assert result.returncode == 2, (args, result.stderr)
        assert result.stderr.strip().splitlines() == [result.stderr.strip()], result.stderr
        assert result.stderr.startswith("error: ") and fragment in result.stderr, result.stderr
        assert result.stdout == ""
