"""``raytrain-at preflight`` end to end through the CLI, on the embedded Ray (slow: each test
starts Ray and runs the real step on Ray Train workers; CI's slow list in .ci/run runs them).

What each must show: exit 0 and the step, loader and estimate figures on a passing run; exit 1
and one ``error: preflight loader:`` line on a forced loader blocker; and after either, no
``preflight-*`` folder left in the storage root's runs/ or in the temporary folder.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pytest

from raytrain_at.data.ffcv_writer import WriteOptions, write_beton
from raytrain_at.data.provenance import write_provenance
from raytrain_at.data.sources import Sample
from tests.support.cli_runner import run_cli

pytestmark = pytest.mark.slow

# The rows a passing preflight prints, with the figures the issue asks for.
STEP = re.compile(r"│ step\s+│ ok\s+│ [\d.]+ img/s per worker at batch (\d+)")
LOADER = re.compile(r"│ loader\s+│ ok\s+│ [\d.]+ img/s per worker")
ESTIMATE = re.compile(r"│ estimate\s+│ ok\s+│ \d+ ep x \d+ steps = [\d.]+ h; .*\$[\d,.]+ "
                      r"on-demand, \$[\d,.]+ spot")


def _env(tmp_path: Path) -> dict[str, str]:
    """A home, an MLflow store and a temporary folder of the test's own (Ray's own temporary
    folder stays where it was: its socket paths must stay short)."""
    temp = tmp_path / "tmp"
    temp.mkdir()
    return {**os.environ, "RAYTRAIN_AT_HOME": str(tmp_path / "home"),
            "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db", "TMPDIR": str(temp),
            "RAY_TMPDIR": os.environ.get("RAY_TMPDIR") or os.environ.get("TMPDIR") or "/tmp"}


def _assert_no_leftovers(tmp_path: Path) -> None:
    """No preflight-* folder under the storage root (Ray's run folder) or the temporary folder
    (rank 0's rows)."""
    left = sorted(str(p) for p in [*tmp_path.glob("runs/runs/preflight-*"),
                                   *tmp_path.glob("tmp/preflight-*")])
    assert left == []
    assert (tmp_path / "runs" / "runs").is_dir()  # the root the run folder was made in


def _assert_passed(out, batch: int) -> None:
    assert out.returncode == 0, out.stderr[-3000:]
    step = STEP.search(out.stdout)
    assert step is not None, out.stdout
    assert int(step.group(1)) == batch
    assert LOADER.search(out.stdout) is not None, out.stdout
    assert ESTIMATE.search(out.stdout) is not None, out.stdout


def test_preflight_quickstart_passes_with_step_loader_and_cost(tmp_path: Path):
    out = run_cli(["preflight", "quickstart", "--storage-path", str(tmp_path / "runs")],
                  env=_env(tmp_path), cwd=tmp_path, timeout=600)
    _assert_passed(out, batch=32)
    assert "│ device     │ 2 x CPU" in out.stdout  # both of the recipe's workers
    _assert_no_leftovers(tmp_path)


def _imagenet_shaped(folder: Path) -> tuple[Path, Path]:
    """A train and a held-out file as ImageNet's: 256 px JPEG images, labels over all 1,000
    classes (999 included), provenance of a train and a val split."""
    rng = np.random.default_rng(0)
    paths = []
    for name, split, count in (("train", "train", 48), ("heldout4k", "val", 8)):
        labels = [999] + [(i * 379) % 1000 for i in range(1, count)]
        samples = [Sample(label=label, pixels=rng.integers(0, 256, (256, 256, 3), np.uint8))
                   for label in labels]
        path = write_beton(samples, folder / f"imagenet_{name}.beton",
                           WriteOptions(max_resolution=256, write_mode="jpg", num_workers=1))
        write_provenance(path, {"source": "synthetic ImageNet-shaped", "split": split,
                                "subset": None, "samples": count})
        paths.append(path)
    return paths[0], paths[1]


def test_preflight_of_an_imagenet_shaped_recipe_passes(tmp_path: Path):
    """Table 1's ConvNeXt-T + CvSt recipe as it is (224 px, 1,000 classes, 2-step APGD, EMA)
    on one CPU worker at a micro-batch of 2."""
    train, heldout = _imagenet_shaped(tmp_path)
    args = ["preflight", "table1_convnext_tiny_cvst_random_basic",
            "--storage-path", str(tmp_path / "runs"),
            "--set", "scaling.use_gpu=false", "--set", "scaling.num_workers=1",
            "--set", "scaling.cpus_per_worker=1", "--set", "data.loader_workers=1",
            "--set", "schedule.global_batch_size=2",
            "--set", f"data.train={train}", "--set", f"data.heldout={heldout}"]
    out = run_cli(args, env=_env(tmp_path), cwd=tmp_path, timeout=600)
    _assert_passed(out, batch=2)
    # (the data row folds at spaces: one word each)
    assert "imagenet_train.beton" in out.stdout and "ImageNet-shaped" in out.stdout
    assert "convnext_tiny_cvst" in out.stdout
    _assert_no_leftovers(tmp_path)


def test_a_loader_of_one_worker_below_the_margin_is_a_one_line_blocker(tmp_path: Path):
    """The measured loader / step comparison cannot be made to fail reliably on a CPU (the
    loader outruns a CPU step by orders of magnitude, test_preflight.py checks the verdict on
    measured figures): --loader-margin forces it through the same code."""
    args = ["preflight", "quickstart", "--storage-path", str(tmp_path / "runs"),
            "--set", "data.loader_workers=1", "--set", "scaling.num_workers=1",
            "--loader-margin", "1000000"]
    out = run_cli(args, env=_env(tmp_path), cwd=tmp_path, timeout=600)
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert out.returncode == 1, out.stderr[-3000:]
    assert len(errors) == 1, out.stderr[-3000:]
    assert errors[0].startswith("error: preflight loader: worker 0's loader gives ")
    assert "data.loader_workers=1" in errors[0] and "--loader-margin 1e+06 x" in errors[0]
    assert "Traceback" not in out.stderr
    _assert_no_leftovers(tmp_path)
