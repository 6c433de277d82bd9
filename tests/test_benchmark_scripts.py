"""The benchmark scripts run end to end at tiny sizes and print the JSON fields BENCHMARKS.md uses
(speed itself is never asserted)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]


def _run(script: str, *args: str) -> dict:
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / script), *args],
                            capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout)


def test_bench_loader_prints_rates() -> None:
    out = _run("bench_loader.py", "--images", "96", "--batch", "16", "--workers", "1",
               "--aug-batch", "2", "--step-repeats", "1")
    assert out["train_loader_224"][0]["images_per_s"] > 0
    assert out["augmentation_224"]["heavy_augment_ms"] > 0
    assert 0 < out["augmentation_224"]["augment_share_of_step"] < 1
    assert out["versions"]["ffcv"] == "1.0.2"


def test_bench_augment_prints_timing() -> None:
    out = _run("bench_augment.py", "--batch", "4", "--size", "32", "--runs", "2", "--warmup", "1")
    text = json.dumps(out)
    assert "ms" in text and "kornia" in text


# Issue 9 (speed): one thread per script, so the timings of a busy 2-core machine cannot make the
# OpenMP workers of two processes fight (which slows tiny runs down by orders of magnitude).
_ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
# Not on the GPU machine: the training-step benchmark must run without them.
_ABSENT_ON_GPU_MACHINE = ("deepspeed", "ray", "ffcv", "mlflow", "pyautoattack")


def _run_without(script: str, absent: tuple[str, ...], *args: str) -> dict:
    """Run ``script`` with ``absent`` modules made unimportable (as on the bare GPU machine)."""
    code = ("import runpy, sys\n"
            f"for name in {absent!r}:\n"
            "    sys.modules[name] = None  # import raises ImportError\n"
            "sys.argv = sys.argv[1:]\n"
            "runpy.run_path(sys.argv[0], run_name='__main__')\n")
    env = {**os.environ, **_ONE_THREAD}
    result = subprocess.run([sys.executable, "-c", code, str(ROOT / "scripts" / script), *args],
                            capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout)


def test_bench_train_step_prints_rates_without_deepspeed_or_ray() -> None:
    out = _run_without("bench_train_step.py", _ABSENT_ON_GPU_MACHINE, "--models", "test_vit",
                       "--resolution", "32", "--batch", "2", "--steps", "1", "--warmup", "1",
                       "--device", "cpu")
    assert out["device"] == "cpu" and out["versions"]["timm"]
    assert out["peak"]["tflops"] > 0 and "fp32" in out["peak"]["kind"]
    (row,) = out["models"]
    assert row["model"] == "test_vit" and row["forward_gmacs_per_image"] > 0
    for kind, passes in (("ours", 8), ("reference", 8)):
        variant = row[kind]
        assert variant["images_per_s"] > 0 and variant["step_s_median"] > 0
        assert variant["forward_equivalents_per_image"] == passes
        assert variant["achieved_tflops"] > 0 and 0 < variant["mfu"]
        assert variant["process_max_rss_mib"] > 0
    # Ours never makes the host wait for the device within a step (as the training loop).
    assert row["ours"]["host_syncs_per_step"] == {}
    assert row["ours"]["optimizer"] == "torch AdamW fused=True"
    assert "fp32" in row["reference"]["precision"]  # fp16 + GradScaler is CUDA-only
    assert row["ratio_ours_over_reference"] > 0


def test_bench_eval_matches_plain_pyautoattack() -> None:
    """Ours in the fast kernel mode: on a CPU the same arithmetic as the plain call plus the exact
    checks (which confirm every break), so the robust points are identical."""
    out = _run_without("bench_eval.py", (), "--model", "test_vit", "--resolution", "32",
                       "--n", "4", "--batch", "4", "--version", "fast", "--device", "cpu",
                       "--kernels", "fast")
    assert out["settings"]["kernels"] == "fast"
    assert out["ours"]["unconfirmed_then_reattacked"] == 0
    assert out["ours"]["images_per_s"] > 0 and out["plain"]["images_per_s"] > 0
    assert out["ratio_ours_over_plain"] > 0
    assert out["ours"]["robust_accuracy"] == out["plain"]["robust_accuracy"]
    assert out["identical"] is True and out["identical_per_image"] is True
    assert set(out["ours"]["broken_by"]) == {"apgd-ce", "apgd-t"}
    assert out["settings"]["threat"] == "linf 4/255"


def test_bench_attacks_times_each_attack(tmp_path, monkeypatch) -> None:
    from raytrain_at.models.model_files import ModelSpec, save_model_file

    spec = ModelSpec(name="test_resnet", num_classes=10, resolution=16, crop_pct=1.0)
    save_model_file(tmp_path / "model.safetensors", spec.build(), spec)
    monkeypatch.setenv("RAYTRAIN_AT_HOME", str(tmp_path / "home"))
    out = _run("bench_attacks.py", str(tmp_path / "model.safetensors"), "--n", "4",
               "--version", "fast")
    assert list(out["attacks"]) == ["apgd-ce", "apgd-t"]
    assert out["attacks"]["apgd-ce"]["attacked"] == 4
    assert out["attacks"]["apgd-t"]["attacked"] == out["attacks"]["apgd-ce"]["robust_after"]
    assert out["settings"]["weights"] == "frozen" and out["total_seconds"] > 0
