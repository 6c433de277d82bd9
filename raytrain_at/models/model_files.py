"""Model files: weights plus what rebuilds the model, in one safetensors file.

A robust model is stored as ``model.safetensors``: the backbone's tensors and, in the file's string
metadata, a :class:`ModelSpec` (timm name, stem spec, classes, input resolution, preprocessing).
Rebuilding goes through the timm registry by name, so loading never unpickles code; a file
without the spec is refused with a one-line error instead of guessing an architecture.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from raytrain_at.errors import UserError
from raytrain_at.models.backbones import set_test_resolution
from raytrain_at.models.locate import MODEL_FILE, local_model_file
from raytrain_at.models.pixel_space import PixelSpaceClassifier, unwrap

SPEC_KEY = "raytrain_at.model_spec"


@dataclass(frozen=True)
class ModelSpec:
    """Everything besides the weights that a model needs to run as trained.

    Attributes:
        name: timm model name (e.g. ``convnext_tiny_cvst``).
        num_classes: classifier outputs.
        stem: stem spec string, or None for the model's default stem.
        small_input: stride-1 stem and first downsampling (32x32 images, App. D.6).
        resolution: input side the model was trained at, in pixels.
        crop_pct: evaluation preprocessing: bicubic resize to ``resolution / crop_pct``, then a
            centre crop of ``resolution`` (the paper's App. A.4).
        mean, std: the per-channel normalisation inside the model, when it differs from the
            backbone's pretrained configuration (e.g. none at all, mean 0 and std 1, for
            RobustBench checkpoints trained on raw pixels); None for the configuration's.
    """

    name: str
    num_classes: int
    stem: str | None = None
    small_input: bool = False
    resolution: int = 224
    crop_pct: float = 0.875
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        # JSON gives lists; keep the spec hashable and comparable.
        for key in ("mean", "std"):
            value = getattr(self, key)
            if value is not None:
                object.__setattr__(self, key, tuple(float(v) for v in value))

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str, source: str) -> ModelSpec:
        """Parse a stored spec; ``source`` names the file in error messages."""
        try:
            data = json.loads(text)
            known = {f.name for f in fields(cls)}
            unknown = set(data) - known
            if unknown:
                raise ValueError(f"unknown fields {sorted(unknown)}")
            spec = cls(**data)
        except (ValueError, TypeError) as exc:
            raise UserError(f"{source}: malformed model spec ({exc})") from None
        if not isinstance(spec.name, str) or not isinstance(spec.num_classes, int) \
                or spec.num_classes < 1 or not isinstance(spec.resolution, int) \
                or spec.resolution < 1 or not 0 < float(spec.crop_pct) <= 1 \
                or any(v is not None and len(v) != 3 for v in (spec.mean, spec.std)) \
                or (spec.std is not None and min(spec.std) <= 0):
            raise UserError(f"{source}: malformed model spec {text}")
        return spec

    @classmethod
    def from_run_config(cls, config: Any) -> ModelSpec:
        """The spec of a training run (a :class:`raytrain_at.config.RunConfig`); a run that
        starts from a model file keeps that file's normalisation (an imported RobustBench model
        takes raw pixels)."""
        mean, std = init_normalisation(config.model.init) or (None, None)
        return cls(name=config.model.name, num_classes=config.model.num_classes,
                   stem=config.model.stem, small_input=config.model.small_input,
                   resolution=config.data.resolution, mean=mean, std=std,
                   crop_pct=config.data.evaluation_crop_pct)

    def build(self) -> PixelSpaceClassifier:
        """A freshly initialised model of this spec at its training resolution."""
        from raytrain_at.models import create_robust_model

        # Exactly as training builds it (training.loop.build_model): the positional-embedding
        # grid of a ViT is timm's default for the name, whatever side it was trained at, so the
        # stored tensors fit; another test side is set after loading (load_model_file).
        model = create_robust_model(self.name, num_classes=self.num_classes, stem=self.stem,
                                    small_input=self.small_input)
        if self.mean is not None or self.std is not None:
            model = PixelSpaceClassifier(model.backbone, mean=self.mean or model.mean.flatten(),
                                         std=self.std or model.std.flatten())
        record_preprocessing(model, self)
        return model


def init_normalisation(init: str | None
                       ) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """The normalisation a run's initial model file records, if it records one (None for
    clean checkpoints and for model files that use their backbone's configuration)."""
    if init is None or init.startswith("hub:"):
        return None
    if init.startswith(("runs:/", "models:/")):
        path = local_model_file(init)
    else:
        path = Path(init).expanduser()
        if path.is_dir():
            path = path / MODEL_FILE
    if path.suffix != ".safetensors" or not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as handle:
            text = (handle.metadata() or {}).get(SPEC_KEY)
    except (SafetensorError, OSError):
        return None
    if text is None:
        return None
    spec = ModelSpec.from_json(text, str(path))
    if spec.mean is None and spec.std is None:
        return None
    reference = spec.build()  # fills in whichever of the two the file left to the cfg
    return (tuple(float(v) for v in reference.mean.flatten()),
            tuple(float(v) for v in reference.std.flatten()))


def record_preprocessing(model: nn.Module, spec: ModelSpec) -> None:
    """Write the input side, crop and normalisation the model was trained with into timm's
    ``pretrained_cfg``, so ``timm.data.resolve_data_config(model=...)`` gives a transform that
    fits: the backbone's cfg names its normalisation; the [0, 1]-pixel wrapper's cfg has mean 0
    and std 1, because it normalises inside."""
    backbone = unwrap(model)
    base = dict(getattr(backbone, "pretrained_cfg", None) or {})
    shared = dict(input_size=(3, spec.resolution, spec.resolution), crop_pct=spec.crop_pct,
                  interpolation="bicubic", num_classes=spec.num_classes)
    # Attributes through nn.Module's __getattr__ (typed Tensor | Module); timm's cfg has a mean
    # and std.
    mean = ([float(v) for v in cast(torch.Tensor, model.mean).flatten()]
            if hasattr(model, "mean") else base.get("mean"))
    std = ([float(v) for v in cast(torch.Tensor, model.std).flatten()]
           if hasattr(model, "std") else base.get("std"))
    backbone.pretrained_cfg = backbone.default_cfg = dict(  # pyright: ignore[reportArgumentType]
        base, **shared, mean=tuple(mean), std=tuple(std))  # pyright: ignore[reportArgumentType]
    if model is not backbone:
        model.pretrained_cfg = model.default_cfg = dict(  # pyright: ignore[reportArgumentType]
            base, **shared, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))


def state_dict_for_file(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's tensors, detached, contiguous, on the CPU (what safetensors stores)."""
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}


def save_model_file(path: str | Path, model: nn.Module, spec: ModelSpec,
                    metadata: dict[str, str] | None = None) -> Path:
    """Write ``model``'s weights and ``spec`` to ``path`` atomically (no half-written file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = dict(metadata or {}, **{SPEC_KEY: spec.to_json()})
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        save_file(state_dict_for_file(model), tmp, metadata=meta)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes (the weights hash recorded with results and versions)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class LoadedModel:
    """A model ready for evaluation, with where it came from.

    Attributes:
        module: the model in eval mode, taking [0, 1] pixels.
        spec: its :class:`ModelSpec`.
        reference: what the user named (path, ``runs:/`` or ``models:/`` reference).
        weights_path: the local safetensors file the weights came from.
        weights_sha256: hash of that file.
        metadata: the file's other metadata (e.g. the source run).
    """

    module: nn.Module
    spec: ModelSpec
    reference: str
    weights_path: Path
    weights_sha256: str
    metadata: dict[str, str]


def read_model_spec(path: str | Path) -> tuple[ModelSpec, dict[str, str]]:
    """The spec and other metadata of a model file, without reading its tensors."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = dict(handle.metadata() or {})
    except (SafetensorError, OSError) as exc:
        raise UserError(f"{path}: not a readable safetensors model file ({exc})") from None
    if SPEC_KEY not in meta:
        raise UserError(f"{path}: no model metadata (timm name, stem, classes); save it with "
                        "raytrain_at.models.model_files.save_model_file or train it with "
                        "raytrain-at train")
    spec = ModelSpec.from_json(meta.pop(SPEC_KEY), str(path))
    return spec, meta


def load_model_file(path: str | Path, *, reference: str | None = None,
                    resolution: int | None = None,
                    device: str | torch.device = "cpu") -> LoadedModel:
    """Rebuild the model stored in ``path`` (a model file or a folder holding one)."""
    from safetensors.torch import load_file

    path = Path(path)
    if path.is_dir():
        path = path / MODEL_FILE
    if not path.is_file():
        raise UserError(f"model file {str(path)!r} does not exist")
    spec, meta = read_model_spec(path)
    module = spec.build()
    tensors = load_file(str(path))
    missing, unexpected = module.load_state_dict(tensors, strict=False)
    if missing or unexpected:
        raise UserError(f"{path}: weights do not fit {spec.name} (missing {len(missing)}, "
                        f"unexpected {len(unexpected)}, e.g. {(missing + unexpected)[:2]})")
    if resolution is not None and resolution != spec.resolution:
        # After loading: ViT positional embeddings are resampled from the stored grid to the
        # test side; at the training side the model runs exactly as it trained.
        set_test_resolution(unwrap(module), resolution)
    module.to(device).eval()
    return LoadedModel(module=module, spec=spec, reference=reference or str(path),
                       weights_path=path, weights_sha256=file_sha256(path), metadata=meta)
