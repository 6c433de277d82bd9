"""RobustBench's own definitions of the paper's models, loaded at test time from its wheel.

The wheel is fetched with ``pip download --no-deps`` (the package registry is the one network
source tests may use) and cached under ``~/.cache/raytrain_at``; nothing of it is committed here.
RobustBench itself is not installed (it pins another timm and imports packages we do not
need): its architecture file and the normaliser it imports are executed as modules of an empty
stand-in package, against the timm installed here.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import types
import zipfile
from pathlib import Path

VERSION = "1.1.1"
CACHE = Path.home() / ".cache" / "raytrain_at" / f"robustbench-{VERSION}"
FILES = ("robustbench/model_zoo/architectures/utils_architectures.py",
         "robustbench/model_zoo/architectures/convstem_models.py",
         "robustbench/model_zoo/imagenet.py")

# RobustBench's model-name argument of get_convstem_models per zoo entry (its imagenet.py).
ZOO_ARGUMENT = {
    "Singh2023Revisiting_ConvNeXt-T-ConvStem": "convnext_t_cvst",
    "Singh2023Revisiting_ConvNeXt-S-ConvStem": "convnext_s_cvst",
    "Singh2023Revisiting_ConvNeXt-B-ConvStem": "convnext_b_cvst",
    "Singh2023Revisiting_ConvNeXt-L-ConvStem": "convnext_l_cvst",
    "Singh2023Revisiting_ViT-S-ConvStem": "vit_s_cvst",
    "Singh2023Revisiting_ViT-B-ConvStem": "vit_b_cvst",
}


def _extracted() -> Path:
    """The wheel's files we read, downloaded once."""
    if all((CACHE / f).is_file() for f in FILES):
        return CACHE
    CACHE.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
                    f"robustbench=={VERSION}", "-d", str(CACHE)], check=True, timeout=300)
    wheel = next(CACHE.glob(f"robustbench-{VERSION}-*.whl"))
    with zipfile.ZipFile(wheel) as archive:
        for name in FILES:
            archive.extract(name, CACHE)
    return CACHE


def _load(module: str, path: Path) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(module, path)
    loaded = importlib.util.module_from_spec(spec)
    sys.modules[module] = loaded
    spec.loader.exec_module(loaded)
    return loaded


def convstem_module() -> types.ModuleType:
    """RobustBench's ``convstem_models`` module (with ``get_convstem_models``)."""
    root = _extracted()
    for package in ("robustbench", "robustbench.model_zoo", "robustbench.model_zoo.architectures"):
        if package not in sys.modules:
            stand_in = types.ModuleType(package)
            stand_in.__path__ = []  # a package with nothing else in it
            sys.modules[package] = stand_in
    base = "robustbench.model_zoo.architectures"
    _load(f"{base}.utils_architectures", root / FILES[0])
    return _load(f"{base}.convstem_models", root / FILES[1])


def zoo_source() -> str:
    """RobustBench's ImageNet zoo file, to check the entry names we map still exist there."""
    return (_extracted() / FILES[2]).read_text()
