"""The GPU readiness check (issue 17) keeps working between GPU sessions.

* ``gpu_check.sh --cpu-smoke`` runs every part but the compiled one at tiny sizes on the CPU and
  prints (and writes) one JSON document whose fields BENCHMARKS.md and the goals read; the
  compiled part, 1-2 minutes of inductor compilation here, runs in a slow test.
* The orchestration: a part out of time is killed with what it started and keeps its finished
  records; a failing part is one line of error; a missing package is a skip; a bad part name is a
  usage error (exit 2, one line).
* ``gpu_check.sh --prepare`` (slow, needs the package registry): the cp312 folder stays under
  60 MiB, and a twin folder built for this machine's Python by the same code installs with
  ``pip --no-index`` into a fresh virtual environment that holds only torch, torchvision and timm
  (with what they depend on), where the check's packages then import.
Speed is never asserted.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"
# One thread per process: a busy 2-core machine otherwise makes OpenMP workers fight.
_ENV = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
        "PYTHONPATH": str(ROOT)}
FAST_PARTS = "peak,train_step,autoattack,deepspeed,loader,t_step"


def _smoke(tmp_path: Path, parts: str) -> dict:
    out = tmp_path / "out" / "gpu_check.json"
    done = subprocess.run(["bash", str(SCRIPT), "--cpu-smoke", "--parts", parts, "--out",
                           str(out)], capture_output=True, text=True, timeout=900, cwd=ROOT,
                          env=_ENV)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)  # stdout holds the JSON document and nothing else
    assert json.loads(out.read_text()) == result
    failed = {name: part for name, part in result["parts"].items() if part["status"] != "ok"}
    assert not failed, (failed, done.stderr[-3000:])
    return result


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> dict:
    return _smoke(tmp_path_factory.mktemp("smoke"), FAST_PARTS)


def test_cpu_smoke_runs_every_part(smoke) -> None:
    assert smoke["sizes"] == "cpu-smoke" and list(smoke["parts"]) == FAST_PARTS.split(",")
    assert smoke["versions"]["torch"] and smoke["versions"]["deepspeed"]
    (peak,) = smoke["parts"]["peak"]["records"]
    assert peak["tflops"] > 0 and "fp32" in peak["kind"]

    (row,) = smoke["parts"]["train_step"]["records"]
    assert row["model"] == "test_vit" and row["batch"] == row["batch_requested"] == 2
    for kind, passes in (("ours", 8), ("reference", 8)):
        assert row[kind]["images_per_s"] > 0
        assert row[kind]["forward_equivalents_per_image"] == passes
        assert 0 < row[kind]["mfu"]  # against the measured peak
    assert row["ours"]["host_syncs_per_step"] == {}
    assert row["ratio_ours_over_reference"] > 0


def test_cpu_smoke_autoattack_compares_each_image(smoke) -> None:
    rows = {r["path"]: r for r in smoke["parts"]["autoattack"]["records"]}
    assert set(rows) == {"plain pyautoattack", "ours --kernels exact", "ours --kernels fast"}
    for path in ("ours --kernels exact", "ours --kernels fast"):
        assert rows[path]["identical_per_image_to_plain"] is True
        assert rows[path]["ratio_over_plain"] > 0 and rows[path]["images_per_s"] > 0
    assert rows["ours --kernels fast"]["unconfirmed_then_reattacked"] == 0


def test_cpu_smoke_deepspeed_run_checks_the_loop(smoke) -> None:
    (run,) = smoke["parts"]["deepspeed"]["records"]
    assert run["steps"] == 6 and len(run["train_loss_per_epoch"]) == 3
    assert run["loss_falls"] is True and run["ema_fp32"] is True
    # As tests/test_finetune_protocols.py counts it: the project's code never waits for the
    # device; DeepSpeed's step does (gradient-norm and overflow checks).
    assert run["host_syncs_per_step_project_code"] == 0
    assert run["host_syncs_outside_deepspeed"] == {}
    assert run["host_syncs_per_step_deepspeed"] > 0


def test_cpu_smoke_loader_and_t_step(smoke) -> None:
    loader, augment = smoke["parts"]["loader"]["records"]
    assert loader["images_per_s"] > 0 and loader["images_per_s_with_heavy_augmentation"] > 0
    assert augment["ms_per_batch"] > 0
    *points, fit = smoke["parts"]["t_step"]["records"]
    assert [p["batch"] for p in points] == [2, 4] and all(p["t_step_s"] > 0 for p in points)
    assert "a_s" in fit and "b_s_per_image" in fit


def test_goals_are_read_from_the_figures(smoke) -> None:
    goals = smoke["goals"]
    ratio = goals["test_vit: ours / paper-style images/s (eager)"]
    assert ratio["value"] == smoke["parts"]["train_step"]["records"][0]["ratio_ours_over_reference"]
    assert ratio["met"] == (ratio["value"] >= 2.0)
    assert goals["DeepSpeed run: EMA stays fp32"]["met"] is True
    assert goals["AutoAttack identical per image (fast kernels)"]["met"] is True


@pytest.mark.slow
def test_cpu_smoke_compiled_step(tmp_path) -> None:
    result = _smoke(tmp_path, "peak,train_compiled")
    (row,) = result["parts"]["train_compiled"]["records"]
    assert row["ours"]["compile"] is True and row["ours"]["images_per_s"] > 0
    assert "reference" not in row


# ------------------------------------------------------------------------------ orchestration
def _module():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def _sleeping_part(sizes, device, peak, emit) -> None:
    # A grandchild in the part's process group, as inductor's compile workers are.
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    emit({"grandchild": child.pid})
    time.sleep(60)


def _running(pid: int) -> bool:
    """Whether ``pid`` is alive (a zombie waiting for its reaper is not)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in status


def _failing_part(sizes, device, peak, emit) -> None:
    emit({"before": True})
    raise RuntimeError("boom\nsecond line")


def _missing_package_part(sizes, device, peak, emit) -> None:
    import package_that_did_not_travel  # noqa: F401


def test_parts_out_of_time_fail_or_miss_packages_are_recorded(tmp_path, monkeypatch) -> None:
    gpu_check = _module()
    for name, function in (("peak", _sleeping_part), ("loader", _failing_part),
                           ("t_step", _missing_package_part)):
        monkeypatch.setitem(gpu_check.PART_FUNCTIONS, name, function)
    start = time.perf_counter()
    slow = gpu_check.spawn_part("peak", gpu_check.SMOKE, 3, None, tmp_path)
    assert time.perf_counter() - start < 20
    assert slow["status"] == "timeout"
    (record,) = slow["records"]  # what it emitted before the kill is kept
    time.sleep(0.5)
    assert not _running(record["grandchild"])  # the whole process group went
    failing = gpu_check.spawn_part("loader", gpu_check.SMOKE, 60, None, tmp_path)
    assert failing["status"] == "error" and failing["error"] == "RuntimeError: boom"
    assert failing["records"] == [{"before": True}]
    missing = gpu_check.spawn_part("t_step", gpu_check.SMOKE, 60, None, tmp_path)
    assert missing["status"] == "skipped" and "package_that_did_not_travel" in missing["reason"]
    assert gpu_check.spawn_part("t_step", gpu_check.SMOKE, 0.5, None, tmp_path)["status"] \
        == "skipped"


def test_unknown_part_is_a_usage_error(tmp_path) -> None:
    done = subprocess.run(["bash", str(SCRIPT), "--cpu-smoke", "--parts", "peak,warp_drive",
                           "--out", str(tmp_path / "x.json")], capture_output=True, text=True,
                          timeout=60, cwd=ROOT, env=_ENV)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        done.stderr.strip()] and "warp_drive" in done.stderr and "Traceback" not in done.stderr
    assert done.stdout == "" and not (tmp_path / "x.json").exists()


# -------------------------------------------------------------------------- wheels that travel
def _closure(names: list[str]) -> set[str]:
    """Distributions installed here that ``names`` need, transitively, extras followed (torch
    needs cuda-toolkit[cublas, ...], whose extras name the CUDA libraries)."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    seen: set[str] = set()
    todo: list[tuple[str, frozenset[str]]] = [(n, frozenset()) for n in names]
    done: set[tuple[str, frozenset[str]]] = set()
    while todo:
        name, extras = todo.pop()
        if (name, extras) in done:
            continue
        done.add((name, extras))
        try:
            dist = distribution(name)
        except PackageNotFoundError:
            continue  # an optional or platform-specific need not installed here
        seen.add(canonicalize_name(name))
        for text in dist.requires or []:
            requirement = Requirement(text)
            wanted = requirement.marker is None or any(
                requirement.marker.evaluate({"extra": extra}) for extra in (extras or {""}))
            if wanted:
                todo.append((canonicalize_name(requirement.name),
                             frozenset(requirement.extras)))
    return seen


def _top_level_paths(dist_name: str) -> list[Path]:
    """The files and folders a distribution installed at the top of site-packages."""
    dist = distribution(dist_name)
    tops = {Path(str(f)).parts[0] for f in dist.files or [] if not str(f).startswith("..")}
    base = Path(dist.locate_file(""))
    return [base / t for t in tops
            if (base / t).exists() and not t.endswith(".pth") and t != "__pycache__"]


@pytest.mark.slow
def test_prepared_wheels_fit_and_install_into_a_bare_torch_environment(tmp_path) -> None:
    # 1. The folder for the GPU machine (cp312): built as the device machine needs it.
    real = tmp_path / "whl312"
    done = subprocess.run(["bash", str(SCRIPT), "--prepare"], capture_output=True, text=True,
                          timeout=900, cwd=ROOT, env={**_ENV, "GPU_CHECK_WHEELS": str(real)})
    assert done.returncode == 0, done.stderr[-3000:]
    info = json.loads((real / "MANIFEST.json").read_text())
    assert info["total_mib"] < 60 and info["total_bytes"] == sum(
        w.stat().st_size for w in real.rglob("*.whl"))
    assert any("cp312" in name for name in info["wheels"])  # compiled for the GPU machine

    # 2. Its twin for this machine's Python, by the same code, installed with --no-index into a
    #    fresh venv that sees torch, torchvision and timm (and their own needs) and nothing else.
    version = "%d.%d" % sys.version_info[:2]
    twin = tmp_path / "twin"
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_wheels.py"), "--dest",
                           str(twin), "--python-version", version, "--python", sys.executable],
                          capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((twin / "MANIFEST.json").read_text())["notes"]["ffcv"].startswith("built")
    base = tmp_path / "base"
    base.mkdir()
    _link_distributions(base, _closure(["torch", "torchvision", "timm"]))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    (next(venv.glob("lib/python*/site-packages")) / "base.pth").write_text(f"{base}\n")
    # pip resolves every need of the core wheels against the folder and the bare environment.
    _pip(python, "--find-links", str(twin), *[r.split("==")[0] for r in info["core"]])
    _imports(python, "import deepspeed, fvcore.nn, kornia, pyautoattack, pydantic, timm, torch",
             "import raytrain_at.config, raytrain_at.evaluation.autoattack",
             "import raytrain_at.training.engine, raytrain_at.training.objectives")

    # 3. The ffcv wheels, installed as on the GPU machine (no dependencies), next to what that
    #    machine has and the folder leaves out: numba, opencv (too large to travel).
    _link_distributions(base, _closure(["numba", "opencv-python"]))
    _pip(python, "--no-deps", *map(str, (twin / "ffcv").glob("*.whl")))
    _imports(python, "from ffcv.libffcv import imdecode",  # loads the compiled library
             "from raytrain_at.data.ffcv_loaders import train_loader")


def _link_distributions(base: Path, names: set[str]) -> None:
    """Make ``names`` (installed here) importable from ``base`` through symbolic links."""
    for name in names:
        dist = distribution(name)
        for path in [*_top_level_paths(name), Path(dist._path)]:  # noqa: SLF001 - its folder
            if not (base / path.name).exists():
                (base / path.name).symlink_to(path)


def _pip(python: Path, *args: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-index",
         "--no-compile", *args], capture_output=True, text=True, timeout=600,
        # No configuration: this machine's pip settings add a local folder of wheels (torch
        # among them) that has no place here.
        env={**{k: v for k, v in os.environ.items() if not k.startswith("PIP_")},
             "PIP_CONFIG_FILE": os.devnull})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]


def _imports(python: Path, *lines: str) -> None:
    done = subprocess.run([str(python), "-c", "\n".join(lines)], capture_output=True, text=True,
                          timeout=300, env={**_ENV, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr[-3000:]


def test_goals_hold_the_best_mfu_and_leave_unmeasured_ones_open() -> None:
    gpu_check = _module()
    parts = {
        "train_step": {"records": [
            {"model": "vit_base_cvst", "ratio_ours_over_reference": 1.9,
             "ours": {"mfu": 0.35, "images_per_s": 19.0}, "reference": {"images_per_s": 10.0}},
            {"model": "convnext_tiny_cvst", "ratio_ours_over_reference": 2.2,
             "ours": {"images_per_s": 22.0}, "reference": {"images_per_s": 10.0}}]},  # no peak
        "train_compiled": {"records": [
            {"model": "vit_base_cvst", "ours": {"mfu": 0.41, "images_per_s": 21.0}}]},
        "autoattack": {"status": "timeout", "records": []},
    }
    goals = gpu_check.summarise(parts)
    assert goals["vit_base_cvst: ours / paper-style images/s (eager)"]["met"] is False
    assert goals["vit_base_cvst: ours compiled / paper-style images/s"] == {
        "value": 2.1, "target": 2.0, "met": True}
    assert goals["vit_base_cvst: MFU of ours (best of eager and compiled)"] == {
        "value": 0.41, "target": 0.40, "met": True}
    assert goals["convnext_tiny_cvst: ours / paper-style images/s (eager)"]["met"] is True
    assert goals["convnext_tiny_cvst: MFU of ours (best of eager and compiled)"] == {
        "value": None, "target": 0.30, "met": None}
    assert not any(name.startswith("AutoAttack") for name in goals)  # nothing measured
