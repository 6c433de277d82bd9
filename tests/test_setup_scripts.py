"""The set-up scripts a node runs at its first boot wait for dpkg's lock (unattended-upgrades
holds it there for minutes) instead of failing the node, and the cluster's nodes install a torch
CUDA build their image's driver runs (scripts/cluster/gpu_stack.sh), refusing an older driver
in one line before installing anything."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).parents[1] / "scripts"


def test_every_apt_get_call_waits_for_the_package_lock() -> None:
    calls = [(path.name, line.strip()) for path in sorted(SCRIPTS.rglob("*.sh"))
             for line in path.read_text().splitlines()
             if re.search(r"\bapt-get\b", line) and not line.lstrip().startswith("#")]
    assert len(calls) >= 8, calls  # setup.sh, the cluster's Python, PostgreSQL, cron, browser
    for name, line in calls:
        assert "-o DPkg::Lock::Timeout=" in line, (name, line)


# ------------------------------------------------------------------ the cluster's GPU stack
ROOT = SCRIPTS.parent
GPU_STACK = SCRIPTS / "cluster" / "gpu_stack.sh"
# The oldest Linux driver each CUDA release runs on (NVIDIA's CUDA Toolkit release notes, "CUDA
# Toolkit and Corresponding Driver Versions"): an independent copy of what gpu_stack.sh claims.
CUDA_MIN_DRIVER = {"12.6": "560.28.03", "12.8": "570.26", "12.9": "575.51.03",
                   "13.0": "580.65.06"}


def _stack() -> dict[str, str]:
    """The variables gpu_stack.sh sets, as bash sources it."""
    names = re.findall(r"^(RAYTRAIN_AT_\w+)=", GPU_STACK.read_text(), flags=re.M)
    printed = subprocess.run(
        ["bash", "-c", f'source "{GPU_STACK}"; for n in {" ".join(names)}; do '
                       'printf "%s=%s\\n" "$n" "${!n}"; done'],
        capture_output=True, text=True, check=True, timeout=30).stdout
    return dict(line.split("=", 1) for line in printed.splitlines())


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split("."))


def test_gpu_stack_pins_a_torch_cuda_build_the_images_driver_runs() -> None:
    stack = _stack()
    cuda = stack["RAYTRAIN_AT_TORCH_CUDA"]
    assert stack["RAYTRAIN_AT_TORCH_INDEX"] == (
        "https://download.pytorch.org/whl/cu" + cuda.replace(".", ""))
    assert stack["RAYTRAIN_AT_TORCH_MIN_DRIVER"] == CUDA_MIN_DRIVER[cuda]
    assert _version(stack["RAYTRAIN_AT_DLAMI_DRIVER"]) >= _version(CUDA_MIN_DRIVER[cuda])
    assert re.fullmatch(r"\d+\.\d+\.\d+", stack["RAYTRAIN_AT_TORCH_VERSION"])
    assert re.fullmatch(r"\d{8}", stack["RAYTRAIN_AT_DLAMI_RELEASE"])
    # The same pair in docs/cluster.md's table and in cluster.yaml's ImageId comment.
    docs = (ROOT / "docs" / "cluster.md").read_text()
    row = next(line for line in docs.splitlines() if stack["RAYTRAIN_AT_DLAMI_RELEASE"] in line
               and line.startswith("|"))
    for key in ("RAYTRAIN_AT_DLAMI_DRIVER", "RAYTRAIN_AT_TORCH_INDEX",
                "RAYTRAIN_AT_TORCH_MIN_DRIVER", "RAYTRAIN_AT_TORCH_VERSION",
                "RAYTRAIN_AT_TORCHVISION_VERSION"):
        assert stack[key] in row, (key, row)
    cluster = (ROOT / "cluster.yaml").read_text()
    for key in ("RAYTRAIN_AT_DLAMI_RELEASE", "RAYTRAIN_AT_DLAMI_DRIVER", "RAYTRAIN_AT_TORCH_INDEX",
                "RAYTRAIN_AT_TORCH_MIN_DRIVER", "RAYTRAIN_AT_TORCH_VERSION"):
        assert stack[key] in cluster, key


def test_only_the_cluster_setup_installs_the_gpu_stack() -> None:
    import yaml

    cluster = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    (setup,) = [c for c in cluster["setup_commands"] if "scripts/setup.sh" in c]
    assert "RAYTRAIN_AT_GPU_STACK=scripts/cluster/gpu_stack.sh" in setup
    # One image for every node type (the &dlami anchor the pinned pair's comment sits on).
    images = {t["node_config"]["ImageId"] for t in cluster["available_node_types"].values()}
    assert len(images) == 1 and "base-oss-nvidia-driver-gpu-ubuntu-22.04" in images.pop()
    twin = yaml.safe_load((ROOT / "cluster_local.yaml").read_text())
    assert any("scripts/setup.sh" in c for c in twin["setup_commands"])
    assert not any("GPU_STACK" in c for c in twin["setup_commands"])
    assert "GPU_STACK" not in (ROOT / "Makefile").read_text()


def _fake_smi(tmp_path, driver: str | None):
    import os

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    if driver is not None:
        smi = bin_dir / "nvidia-smi"
        smi.write_text(f'#!/bin/sh\necho "{driver}"\n')
        smi.chmod(0o755)
    return {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(tmp_path), "LANG": "C.UTF-8",
            "TMPDIR": os.environ.get("TMPDIR", "/tmp")}


def _check_driver(env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPTS / "cluster" / "check_driver.sh"), str(GPU_STACK)],
                          env=env, capture_output=True, text=True, timeout=30)


@pytest.mark.parametrize("driver,ok", [("595.91.07", True), ("580.65.06", True),
                                       ("580.65.5", False), ("570.86.15", False), (None, True)])
def test_check_driver_refuses_a_driver_older_than_the_pinned_build(tmp_path, driver, ok) -> None:
    result = _check_driver(_fake_smi(tmp_path, driver))
    assert (result.returncode == 0) == ok, result.stderr
    if not ok:
        (line,) = result.stderr.splitlines()
        assert f"NVIDIA driver {driver} is older than 580.65.06" in line and "torch" in line


def test_setup_stops_at_an_old_driver_before_installing_anything(tmp_path) -> None:
    env = dict(_fake_smi(tmp_path, "570.86.15"), VENV=str(tmp_path / "venv"),
               RAYTRAIN_AT_GPU_STACK="scripts/cluster/gpu_stack.sh")
    result = subprocess.run(["bash", str(SCRIPTS / "setup.sh")], env=env, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 1 and "older than 580.65.06" in result.stderr
    assert not (tmp_path / "venv").exists()


# ------------------------------------------------------------- the image frozen at the pin
PIN_AMI = SCRIPTS / "cluster" / "pin_ami.sh"


def _fake_aws(tmp_path, answer: str) -> dict:
    """An ``aws`` on PATH that records its arguments and prints ``answer`` (EC2's text output)."""
    import os

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    aws = bin_dir / "aws"
    aws.write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > "{tmp_path}/aws-args"\n'
                   f'printf "%s\\n" "{answer}"\n')
    aws.chmod(0o755)
    return {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(tmp_path), "LANG": "C.UTF-8",
            "TMPDIR": os.environ.get("TMPDIR", "/tmp")}


def _pin(tmp_path, answer: str, *args: str) -> tuple[subprocess.CompletedProcess, Path]:
    config = tmp_path / "cluster.yaml"
    config.write_text((ROOT / "cluster.yaml").read_text())
    done = subprocess.run(["bash", str(PIN_AMI), "--config", str(config), *args],
                          env=_fake_aws(tmp_path, answer), capture_output=True, text=True,
                          timeout=30)
    return done, config


def test_pin_ami_writes_the_releases_id_into_every_node_type(tmp_path) -> None:
    import yaml

    done, config = _pin(tmp_path, "ami-0123456789abcdef0")
    assert done.returncode == 0, done.stderr
    images = {t["node_config"]["ImageId"]
              for t in yaml.safe_load(config.read_text())["available_node_types"].values()}
    assert images == {"ami-0123456789abcdef0"}
    # Looked up by the pinned release's name, in the config's region.
    asked = (tmp_path / "aws-args").read_text().splitlines()
    stack = _stack()
    assert stack["RAYTRAIN_AT_DLAMI_RELEASE"] in stack["RAYTRAIN_AT_DLAMI_NAME"]
    assert f"Name=name,Values={stack['RAYTRAIN_AT_DLAMI_NAME']}" in asked
    assert asked[asked.index("--region") + 1] == "us-west-2" and "amazon" in asked
    # Only the ImageId line changed.
    before = (ROOT / "cluster.yaml").read_text().splitlines()
    after = config.read_text().splitlines()
    assert [i for i, (a, b) in enumerate(zip(before, after)) if a != b] == [
        next(i for i, line in enumerate(before) if "ImageId: &dlami" in line)]


@pytest.mark.parametrize("answer", ["None", "ami-0aaa ami-0bbb", ""])
def test_pin_ami_leaves_the_config_alone_unless_one_image_is_found(tmp_path, answer) -> None:
    done, config = _pin(tmp_path, answer, "--region", "eu-west-1")
    assert done.returncode == 1
    (line,) = done.stderr.splitlines()
    assert "eu-west-1" in line and "unchanged" in line
    assert config.read_text() == (ROOT / "cluster.yaml").read_text()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("cluster.yaml")] == [
        "cluster.yaml"]
