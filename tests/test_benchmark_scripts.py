"""The benchmark scripts run end to end at tiny sizes and print the JSON fields BENCHMARKS.md uses
(speed itself is never asserted)."""

from __future__ import annotations

import json
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
