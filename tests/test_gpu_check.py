"""The GPU check (issues 17, 28) keeps working between GPU sessions.

* ``gpu_check.sh --cpu-smoke`` runs every part but the compiled one at tiny sizes on the CPU: the
  gpu tests (``pytest -m gpu``) and the ``raytrain-at bench`` commands, and prints (and writes)
  one JSON document whose fields BENCHMARKS.md and the goals read; the compiled part, 1-2 minutes
  of inductor compilation here, runs in a slow test.
* The runner: a part out of time is stopped with what it started and keeps its finished
  documents; a failing part is one line of error; a missing package is a skip; a part with no
  time left is a skip; a bad part name is a usage error (exit 2, one line).
* The wheel folder: derived from pyproject.toml's pins (a pin this environment does not have is
  refused), and ``verify`` tells a wrong version. Slow (needs the package registry): the cp312
  folder stays under 60 MiB, and a twin folder built for this machine's Python by the same code
  installs with ``pip --no-index`` into a fresh virtual environment that holds only torch,
  torchvision and timm (with what they depend on), where the check's packages then import at the
  versions ``verify`` expects.
Speed is never asserted.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from importlib.metadata import distribution
from pathlib import Path

import pytest

from tests.support import gpu_report
from tests.support.gpu_wheels import closure, project_pins, travelling, verify

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"
# One thread per process: a busy 2-core machine otherwise makes OpenMP workers fight.
_ENV = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
        "PYTHONPATH": str(ROOT)}
# The smoke's step part times two batches, so it gives t_step(B) too (its t_step part, more
# batches without the reference, is for the GPU).
FAST_PARTS = "versions,preflight,tests,step,eval,loader"
GPU_TESTS = {"test_worker_loop_loss_falls_under_deepspeed",
             "test_ema_stays_fp32_while_the_engine_runs_its_precision",
             "test_project_code_never_waits_for_the_device",
             "test_evaluation_path_equals_plain_pyautoattack[exact]",
             "test_evaluation_path_equals_plain_pyautoattack[fast]",
             # Needs two GPUs: skipped on the CPU (and on a one-GPU machine).
             "test_ffcv_loader_on_cuda_1_opens_no_context_on_another_gpu"}
SKIPPED_ON_CPU = {"test_ffcv_loader_on_cuda_1_opens_no_context_on_another_gpu"}


def _smoke(tmp_path: Path, parts: str) -> dict:
    out = tmp_path / "out" / "gpu_check.json"
    done = subprocess.run(["bash", str(SCRIPT), "--cpu-smoke", "--parts", parts, "--out",
                           str(out)], capture_output=True, text=True, timeout=1500, cwd=tmp_path,
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


@pytest.mark.slow  # the CPU smoke run behind them
def test_cpu_smoke_preflight_runs_the_worker_checks_without_ray(smoke) -> None:
    (doc,) = smoke["parts"]["preflight"]["records"]
    assert [c["name"] for c in doc["checks"]] == ["device", "all-reduce", "step", "loader"]
    (row,) = doc["rows"]
    assert row["step_images_per_s"] > 0 and row["loader_images_per_s"] > 0
    assert row["batch"] == doc["batch"] == 4 and doc["blocker"] is None
    assert smoke["goals"]["preflight: no blocker at the recipe's micro-batch"]["met"] is True


def _gpu_budgets() -> dict[str, int]:
    """Each part's budget on the GPU, as gpu_check.sh's GPU branch gives it."""
    text = SCRIPT.read_text()
    gpu = text[text.index('local gpu="'):text.index("esac", text.index('local gpu="'))]
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"run_part (\w+) (\d+) ", gpu)}


def test_gpu_part_budgets_fit_the_whole_check() -> None:
    budgets = _gpu_budgets()
    names = [p for p in re.search(r"PARTS_ALL=\(([^)]*)\)", SCRIPT.read_text()).group(1).split()]
    assert sorted(budgets) == sorted(names) and names[:2] == ["versions", "preflight"]
    assert budgets["versions"] <= 10 and budgets["preflight"] <= 60
    assert sum(budgets.values()) <= 480, budgets


@pytest.mark.slow  # the CPU smoke run behind them: 4-5 min on 2 cores (CI's slow list)
def test_cpu_smoke_runs_every_part(smoke) -> None:
    assert smoke["sizes"] == "cpu-smoke" and list(smoke["parts"]) == FAST_PARTS.split(",")
    assert smoke["versions"]["torch"] and smoke["versions"]["deepspeed"]
    (versions,) = smoke["parts"]["versions"]["records"]
    assert versions["mismatches"] == []

    (document,) = smoke["parts"]["step"]["records"]
    assert document["peak"]["tflops"] > 0 and "fp32" in document["peak"]["kind"]
    row, _ = document["models"]
    assert row["model"] == "test_vit" and row["batch"] == row["batch_requested"] == 2
    for kind, passes in (("ours", 8), ("reference", 8)):
        assert row[kind]["images_per_s"] > 0
        assert row[kind]["forward_equivalents_per_image"] == passes
        assert 0 < row[kind]["mfu"]  # against the measured peak
    assert row["ours"]["step"].startswith("WorkerLoop.train_step")
    assert row["ours"]["host_syncs_per_step"] == {}
    assert row["ratio_ours_over_reference"] > 0


@pytest.mark.slow  # the CPU smoke run behind them: 4-5 min on 2 cores (CI's slow list)
def test_cpu_smoke_runs_the_gpu_tests_on_the_cpu(smoke) -> None:
    records = {r["test"]: r for r in smoke["parts"]["tests"]["records"]}
    assert set(records) == GPU_TESTS
    assert {r["outcome"] for name, r in records.items() if name not in SKIPPED_ON_CPU} == {
        "passed"}
    assert {records[name]["outcome"] for name in SKIPPED_ON_CPU} == {"skipped"}
    loop = records["test_worker_loop_loss_falls_under_deepspeed"]["properties"]
    assert loop["steps_per_epoch"] == 2 and len(loop["train_loss_per_epoch"]) == 3
    assert loop["train_loss_per_epoch"][-1] < loop["train_loss_per_epoch"][0]
    syncs = records["test_project_code_never_waits_for_the_device"]["properties"]
    assert syncs["host_syncs_per_step_deepspeed"] > 0
    fast = records["test_evaluation_path_equals_plain_pyautoattack[fast]"]["properties"]
    assert fast["unconfirmed_then_reattacked"] == 0


@pytest.mark.slow  # the CPU smoke run behind them: 4-5 min on 2 cores (CI's slow list)
def test_cpu_smoke_autoattack_compares_each_image(smoke) -> None:
    (document,) = smoke["parts"]["eval"]["records"]
    assert document["settings"]["kernels"] == "fast"
    assert document["identical_per_image"] is True
    assert document["ratio_ours_over_plain"] > 0 and document["ours"]["images_per_s"] > 0
    assert document["ours"]["unconfirmed_then_reattacked"] == 0


@pytest.mark.slow  # the CPU smoke run behind them: 4-5 min on 2 cores (CI's slow list)
def test_cpu_smoke_loader_and_t_step(smoke) -> None:
    (loader,) = smoke["parts"]["loader"]["records"]
    (rate,) = loader["train_loader_224"]
    assert rate["images_per_s"] > 0 and rate["images_per_s_with_heavy_augmentation"] > 0
    assert loader["augmentation_224"]["heavy_augment_ms"] > 0
    (document,) = smoke["parts"]["step"]["records"]
    assert [row["batch"] for row in document["models"]] == [2, 4]
    fit = document["t_step_fit"]["test_vit"]
    assert [b for b, _ in fit["points"]] == [2, 4] and all(t > 0 for _, t in fit["points"])
    assert "a_s" in fit and "b_s_per_image" in fit


@pytest.mark.slow  # the CPU smoke run behind them: 4-5 min on 2 cores (CI's slow list)
def test_goals_are_read_from_the_figures(smoke) -> None:
    goals = smoke["goals"]
    ratio = goals["test_vit: ours / paper-style images/s (eager)"]
    (document,) = smoke["parts"]["step"]["records"]
    assert ratio["value"] == document["models"][0]["ratio_ours_over_reference"]
    assert ratio["met"] == (ratio["value"] >= 2.0)
    assert goals["DeepSpeed run: EMA stays fp32"]["met"] is True
    assert goals["AutoAttack identical per image (fast kernels)"]["met"] is True


@pytest.mark.slow
def test_cpu_smoke_compiled_step(tmp_path) -> None:
    result = _smoke(tmp_path, "compiled")
    (document,) = result["parts"]["compiled"]["records"]
    (row,) = document["models"]
    assert row["ours"]["compile"] is True and row["ours"]["images_per_s"] > 0
    assert "reference" not in row


# ------------------------------------------------------------------------------------- runner
def _running(pid: int) -> bool:
    """Whether ``pid`` is alive (a zombie waiting for its reaper is not)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in status


def test_parts_out_of_time_fail_or_miss_packages_are_recorded(tmp_path) -> None:
    """The script's own ``run_part`` (sourced) on commands of this test, read back by the
    report: what each part finished is kept, and what it started goes with it."""
    pid_file = tmp_path / "grandchild.pid"
    scripts = {
        "document.py": "import json; print(json.dumps({'before': True}))\n",
        # A grandchild in the command's process group, as inductor's compile workers are.
        "sleeper.py": ("import subprocess, sys, time\n"
                       "child = subprocess.Popen([sys.executable, '-c', "
                       "'import time; time.sleep(60)'])\n"
                       f"open({str(pid_file)!r}, 'w').write(str(child.pid))\n"
                       "time.sleep(60)\n"),
        "failing.py": "raise RuntimeError('boom\\nsecond line')\n",
        "missing.py": "import package_that_did_not_travel  # noqa: F401\n",
    }
    for name, text in scripts.items():
        (tmp_path / name).write_text(text)
    work = tmp_path / "work"
    work.mkdir()
    py = sys.executable
    commands = f"""
        source {SCRIPT}
        WORK={work}
        run_part slow 8 "{py} {tmp_path}/document.py" "{py} {tmp_path}/sleeper.py"
        run_part failing 60 "{py} {tmp_path}/document.py" "{py} {tmp_path}/failing.py"
        run_part missing 60 "{py} {tmp_path}/missing.py"
        DEADLINE=$(date +%s) run_part late 60 "{py} {tmp_path}/document.py"
    """
    start = time.perf_counter()
    done = subprocess.run(["bash", "-c", commands], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert time.perf_counter() - start < 40  # the sleeper did not run its 60 s
    slow = gpu_report.read_part(work, "slow")
    assert slow["status"] == "timeout" and slow["records"] == [{"before": True}]
    time.sleep(0.5)
    assert not _running(int(pid_file.read_text()))  # the whole process group went
    failing = gpu_report.read_part(work, "failing")
    assert failing["status"] == "error" and failing["error"] == "RuntimeError: boom"
    assert failing["records"] == [{"before": True}]
    missing = gpu_report.read_part(work, "missing")
    assert missing["status"] == "skipped" and "package_that_did_not_travel" in missing["reason"]
    late = gpu_report.read_part(work, "late")
    assert late["status"] == "skipped" and late["records"] == []


def test_a_stopped_check_stops_the_running_part(tmp_path) -> None:
    """Killing the script (as Ctrl-C or the device tool's limit would) ends the command it was
    waiting for and that command's children, and removes the work folder."""
    pid_file = tmp_path / "grandchild.pid"
    (tmp_path / "sleeper.py").write_text(
        "import subprocess, sys, time\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        f"open({str(pid_file)!r}, 'w').write(str(child.pid))\n"
        "time.sleep(60)\n")
    work = tmp_path / "work"
    work.mkdir()
    script = (f"source {SCRIPT}; WORK={work}; stop_on_exit; "
              f'run_part slow 60 "{sys.executable} {tmp_path}/sleeper.py"')
    check = subprocess.Popen(["bash", "-c", script], stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not pid_file.exists() or not pid_file.read_text():
        assert time.monotonic() < deadline and check.poll() is None, "the part never started"
        time.sleep(0.2)
    check.terminate()
    assert check.wait(timeout=30) != 0
    time.sleep(1)
    assert not _running(int(pid_file.read_text()))
    assert not work.exists()


def test_unknown_part_is_a_usage_error(tmp_path) -> None:
    done = subprocess.run(["bash", str(SCRIPT), "--cpu-smoke", "--parts", "step,warp_drive",
                           "--out", str(tmp_path / "x.json")], capture_output=True, text=True,
                          timeout=60, cwd=ROOT, env=_ENV)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        done.stderr.strip()] and "warp_drive" in done.stderr and "Traceback" not in done.stderr
    assert done.stdout == "" and not (tmp_path / "x.json").exists()


def test_goals_hold_the_best_mfu_and_leave_unmeasured_ones_open() -> None:
    parts = {
        "step": {"records": [{"models": [
            {"model": "vit_base_cvst", "ratio_ours_over_reference": 1.9,
             "ours": {"mfu": 0.35, "images_per_s": 19.0}, "reference": {"images_per_s": 10.0}},
            {"model": "convnext_tiny_cvst", "ratio_ours_over_reference": 2.2,
             "ours": {"images_per_s": 22.0}, "reference": {"images_per_s": 10.0}}]}]},  # no peak
        "compiled": {"records": [{"models": [
            {"model": "vit_base_cvst", "ours": {"mfu": 0.41, "images_per_s": 21.0}}]}]},
        "eval": {"status": "timeout", "records": []},
    }
    goals = gpu_report.summarise(parts)
    assert goals["vit_base_cvst: ours / paper-style images/s (eager)"]["met"] is False
    assert goals["vit_base_cvst: ours compiled / paper-style images/s"] == {
        "value": 2.1, "target": 2.0, "met": True}
    assert goals["vit_base_cvst: MFU of ours (best of eager and compiled)"] == {
        "value": 0.41, "target": 0.40, "met": True}
    assert goals["convnext_tiny_cvst: ours / paper-style images/s (eager)"]["met"] is True
    assert goals["convnext_tiny_cvst: MFU of ours (best of eager and compiled)"] == {
        "value": None, "target": 0.30, "met": None}
    assert not any(name.startswith("AutoAttack") for name in goals)  # nothing measured


# -------------------------------------------------------------------------- wheels that travel
def test_wheel_plan_follows_the_pins_of_pyproject(tmp_path) -> None:
    pins = project_pins()
    core, ffcv_part = travelling("3.12")
    for name, pin in pins.items():
        if pin is not None and name not in ("ray", "mlflow", "imagecorruptions"):
            assert {**core, **ffcv_part}[name] == pin, name  # timm included
    assert {"pydantic", "fvcore", "deepspeed", "kornia", "pyautoattack"} <= set(core)
    assert not {"ray", "mlflow", "torch", "torchvision", "numpy"} & {*core, *ffcv_part}
    assert ffcv_part["ffcv"] == pins["ffcv"] and "fastargs" in ffcv_part
    # A pin this environment does not hold is refused, naming it.
    moved = tmp_path / "pyproject.toml"
    moved.write_text((ROOT / "pyproject.toml").read_text().replace('"timm==1.0.31"',
                                                                   '"timm==9.9.9"'))
    with pytest.raises(ValueError, match="timm is installed here at 1.0.31, pyproject.toml pins "
                                         "9.9.9"):
        travelling("3.12", moved)


def test_verify_tells_a_wrong_version(tmp_path, capsys) -> None:
    assert verify(None) == 0  # this environment holds pyproject.toml's pins
    capsys.readouterr()
    listing = tmp_path / "MANIFEST.json"
    listing.write_text(json.dumps({"core": {"timm": "0.0.1", "pydantic": None}, "ffcv": {},
                                   "notes": {"ffcv": "left out"},
                                   "needs_from_the_machine": ["torch"]}))
    assert verify(listing) == 1
    printed = capsys.readouterr()
    mismatch = f"timm: {distribution('timm').version}, expected 0.0.1"
    assert json.loads(printed.out)["mismatches"] == [mismatch]
    assert printed.err.strip() == f"error: 1 package(s) not at the expected version: {mismatch}"


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
    assert info["core"]["timm"] == project_pins()["timm"]

    # 2. Its twin for this machine's Python, by the same code, installed with --no-index into a
    #    fresh venv that sees torch, torchvision and timm (and their own needs) and nothing else.
    version = "{}.{}".format(*sys.version_info[:2])
    twin = tmp_path / "twin"
    done = subprocess.run([sys.executable, "-m", "tests.support.gpu_wheels", "build", "--dest",
                           str(twin), "--python-version", version, "--python", sys.executable],
                          capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    twin_info = json.loads((twin / "MANIFEST.json").read_text())
    assert twin_info["notes"]["ffcv"].startswith("built")
    base = tmp_path / "base"
    base.mkdir()
    _link_distributions(base, set(closure(["torch", "torchvision", "timm"])))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    (next(venv.glob("lib/python*/site-packages")) / "base.pth").write_text(f"{base}\n")
    # pip resolves every need of the core wheels against the folder and the bare environment.
    _pip(python, "--find-links", str(twin), *twin_info["core"])
    _imports(python, "import deepspeed, fvcore.nn, kornia, pyautoattack, pydantic, timm, torch",
             "import raytrain_at.config, raytrain_at.evaluation.autoattack",
             "import raytrain_at.training.engine, raytrain_at.bench.settings")

    # 3. The ffcv wheels, installed as on the GPU machine (no dependencies), next to what that
    #    machine has and the folder leaves out: numba, opencv (too large to travel).
    _link_distributions(base, set(closure(["numba", "opencv-python"])))
    _pip(python, "--no-deps", *map(str, (twin / "ffcv").glob("*.whl")))
    _imports(python, "from ffcv.libffcv import imdecode",  # loads the compiled library
             "from raytrain_at.data.ffcv_loaders import train_loader")
    # 4. What the check's first part asks there: every version as the folder has it.
    done = subprocess.run([str(python), "-m", "tests.support.gpu_wheels", "verify", "--manifest",
                           str(twin / "MANIFEST.json")], capture_output=True, text=True,
                          timeout=120, cwd=ROOT, env={**_ENV, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]


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
