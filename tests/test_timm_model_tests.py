"""timm's own model tests accept every model of the zoo.

``tests/test_models.py`` of the installed timm version's source release (fetched from the package
registry with ``pip download --no-binary :all:`` and cached under ``~/.cache/raytrain_at``; no part
of it is committed here) runs in a subprocess with the zoo registered (``-p
raytrain_at.models.zoo``), filtered to our model names: forward, backward, default cfgs on the
meta device, TorchScript, ``features_only``, FX forward / backward and FX + TorchScript, at full
size. Which of timm's tests cannot reach our models, and why, is in docs/models.md.

Slow (about 10 minutes on 2 cores, the large ConvNeXt-L + ConvStem the longest): CI runs it in
its slow stage (.ci/run).
"""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
import tarfile
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

import raytrain_at.models  # noqa: F401 - registers the models
from raytrain_at.models import CONVSTEM_MODELS

VERSION = importlib.metadata.version("timm")
CACHE = Path.home() / ".cache" / "raytrain_at" / f"timm-{VERSION}"
ZOO = (*CONVSTEM_MODELS, "convnext_iso_small")
# The tests every model must pass (the ViTs take timm's non-standard cfg test and, as all of
# timm's ViTs, are not selected for the features_only test: tests/test_models_timm_api.py).
REQUIRED = {"test_model_forward", "test_model_backward", "test_model_forward_torchscript",
            "test_model_forward_fx", "test_model_backward_fx",
            "test_model_forward_fx_torchscript"}
REQUIRED_CNN = {"test_model_default_cfgs", "test_model_forward_features"}
REQUIRED_VIT = {"test_model_default_cfgs_non_std"}


def timm_model_tests() -> Path:
    """timm's tests/test_models.py of the installed version, downloaded once."""
    target = CACHE / "test_models.py"
    if target.is_file():
        return target
    CACHE.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                    "--quiet", f"timm=={VERSION}", "-d", str(CACHE)], check=True, timeout=600)
    with tarfile.open(CACHE / f"timm-{VERSION}.tar.gz") as sdist:
        member = sdist.extractfile(f"timm-{VERSION}/tests/test_models.py")
        assert member is not None
        target.write_bytes(member.read())
    return target


@pytest.mark.slow
def test_timm_model_tests_pass_on_every_zoo_model(tmp_path) -> None:
    # A folder of its own: no conftest or pytest config of this project applies.
    tests = tmp_path / "test_models.py"
    tests.write_bytes(timm_model_tests().read_bytes())
    report = tmp_path / "report.xml"
    result = subprocess.run(
        [sys.executable, "-m", "pytest", str(tests), "-q", "-p", "no:cacheprovider",
         "-p", "raytrain_at.models.zoo", "-k", " or ".join(ZOO), f"--junitxml={report}"],
        # TIMEOUT: timm's own per-test limit (120 s by default), raised for 2 busy cores.
        cwd=tmp_path, env=dict(os.environ, TIMEOUT="900"), capture_output=True, text=True,
        timeout=3600)
    cases = ET.parse(report).getroot().iter("testcase")
    outcomes: dict[tuple[str, str], str] = {}
    for case in cases:
        function, _, params = case.get("name", "").partition("[")
        model = next(m for m in sorted(ZOO, key=len, reverse=True) if m in params)
        failed = case.find("failure") is not None or case.find("error") is not None
        outcomes[(model, function)] = "failed" if failed else (
            "skipped" if case.find("skipped") is not None else "passed")
    failed = sorted(k for k, v in outcomes.items() if v == "failed")
    assert not failed and result.returncode == 0, (failed, result.stdout[-3000:])
    for model in ZOO:
        passed = {f for (m, f), v in outcomes.items() if m == model and v == "passed"}
        needed = REQUIRED | (REQUIRED_VIT if model.startswith("vit") else REQUIRED_CNN)
        assert needed <= passed, (model, sorted(needed - passed))
