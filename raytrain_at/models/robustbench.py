"""The paper's published checkpoints, as RobustBench distributes them, imported as model files.

RobustBench's ImageNet zoo holds the paper's models as ``Singh2023Revisiting_*`` entries. Their
definitions have exactly our architectures (same tensors, same shapes) under other key names:
the ConvStem sits one module deeper (``stem.stem.N`` for ConvNeXt, ``patch_embed.proj.stem.N``
for ViT), and ViT-S is wrapped in a normalising ``Sequential`` (``normalize.mean`` /
``normalize.std`` buffers, the network under ``model.``). The other five take raw [0, 1] pixels
without any normalisation, so the imported spec records mean 0 and std 1 for them. Checkpoints
are read as RobustBench reads them: a plain state dict, or one inside ``state_dict``, with or
without a ``module.`` prefix; torch files are read with ``weights_only=True`` (no unpickling).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from raytrain_at.errors import UserError
from raytrain_at.models.model_files import ModelSpec, file_sha256, save_model_file

log = logging.getLogger(__name__)

PREFIX = "robustbench:"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RAW_PIXELS = ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))


@dataclass(frozen=True)
class RobustBenchEntry:
    """How one RobustBench entry maps onto our zoo.

    Attributes:
        model: our timm name with the same architecture.
        stem_from: RobustBench's key prefix of the ConvStem's layers.
        stem_to: ours.
        normalised: the entry wraps the network in RobustBench's ImageNet normaliser.
    """

    model: str
    stem_from: str
    stem_to: str
    normalised: bool = False

    def spec(self) -> ModelSpec:
        """The spec of the imported model: 1,000 classes, 224 px, bicubic 256 -> 224 crop (the
        entries' ``BicubicRes256Crop224`` preprocessing)."""
        mean, std = (IMAGENET_MEAN, IMAGENET_STD) if self.normalised else RAW_PIXELS
        return ModelSpec(name=self.model, num_classes=1000, resolution=224, crop_pct=0.875,
                         mean=mean, std=std)


_CONVNEXT = ("stem.stem.", "stem.")
_VIT = ("patch_embed.proj.stem.", "patch_embed.proj.")

ENTRIES: dict[str, RobustBenchEntry] = {
    "Singh2023Revisiting_ConvNeXt-T-ConvStem": RobustBenchEntry("convnext_tiny_cvst", *_CONVNEXT),
    "Singh2023Revisiting_ConvNeXt-S-ConvStem": RobustBenchEntry("convnext_small_cvst", *_CONVNEXT),
    "Singh2023Revisiting_ConvNeXt-B-ConvStem": RobustBenchEntry("convnext_base_cvst", *_CONVNEXT),
    "Singh2023Revisiting_ConvNeXt-L-ConvStem": RobustBenchEntry("convnext_large_cvst", *_CONVNEXT),
    "Singh2023Revisiting_ViT-S-ConvStem": RobustBenchEntry("vit_small_cvst", *_VIT,
                                                           normalised=True),
    "Singh2023Revisiting_ViT-B-ConvStem": RobustBenchEntry("vit_base_cvst", *_VIT),
}


def entry_for(source: str) -> tuple[str, RobustBenchEntry]:
    """The entry ``robustbench:NAME`` names.

    Raises:
        UserError: not a ``robustbench:`` source, or an entry we cannot import.
    """
    if not source.startswith(PREFIX):
        raise UserError(f"import source {source!r}: expected robustbench:NAME, e.g. "
                        f"{PREFIX}{next(iter(ENTRIES))}")
    name = source[len(PREFIX):]
    if name not in ENTRIES:
        raise UserError(f"unknown RobustBench model {name!r} (importable: "
                        f"{', '.join(ENTRIES)})")
    return name, ENTRIES[name]


def _renamed(state: dict[str, torch.Tensor], entry: RobustBenchEntry, name: str,
             checkpoint: str) -> dict[str, torch.Tensor]:
    """RobustBench's keys as our backbone's keys (normaliser dropped after checking it)."""
    for prefix in ("module.", "model."):
        if state and all(k.startswith((prefix, "normalize.")) for k in state):
            state = {k.removeprefix(prefix): v for k, v in state.items()}
    stats = {k: v for k, v in state.items() if k.startswith("normalize.")}
    if stats:
        expected = (IMAGENET_MEAN, IMAGENET_STD) if entry.normalised else None
        found = tuple(tuple(round(float(x), 6) for x in stats.get(f"normalize.{key}",
                                                                 torch.empty(0)).flatten())
                      for key in ("mean", "std"))
        if expected is None or found != expected:
            raise UserError(f"checkpoint {checkpoint!r}: its normalisation {found} is not that "
                            f"of {name} ({expected or 'none'})")
    out = {}
    for key, value in state.items():
        if key.startswith("normalize."):
            continue
        if key.startswith(entry.stem_from):
            key = entry.stem_to + key[len(entry.stem_from):]
        out[key] = value
    return out


def import_robustbench(source: str, checkpoint: str | Path, out: str | Path) -> Path:
    """Import a RobustBench checkpoint of the paper's models as a project model file.

    Args:
        source: ``robustbench:NAME``, e.g. ``robustbench:Singh2023Revisiting_ConvNeXt-T-ConvStem``.
        checkpoint: the downloaded checkpoint (``.pt`` / ``.pth`` / ``.safetensors``).
        out: the model file to write (atomically; nothing is written on an error).

    Returns:
        The written path.

    Raises:
        UserError: unknown name, unreadable checkpoint, or one of another architecture.
    """
    from raytrain_at.models.weights import read_state_dict

    name, entry = entry_for(source)
    out = Path(out)
    if out.suffix != ".safetensors":
        raise UserError(f"--out {str(out)!r}: a model file ends in .safetensors")
    state = _renamed(read_state_dict(str(checkpoint)), entry, name, str(checkpoint))
    spec = entry.spec()
    model = spec.build()
    try:
        missing, unexpected = model.backbone.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shapes that do not fit
        first = next((line.strip() for line in str(exc).splitlines()
                      if "size mismatch" in line), str(exc).splitlines()[0])
        raise UserError(f"checkpoint {str(checkpoint)!r} does not fit {name} ({entry.model}): "
                        f"{first[:240]}") from None
    if missing or unexpected:
        raise UserError(f"checkpoint {str(checkpoint)!r} does not fit {name} ({entry.model}): "
                        f"{len(missing)} tensors missing, {len(unexpected)} unexpected, e.g. "
                        f"{(list(missing) + list(unexpected))[:2]}")
    path = save_model_file(out, model.eval(), spec, {
        "raytrain_at.imported_from": source,
        "raytrain_at.checkpoint_sha256": file_sha256(checkpoint)})
    log.info("imported %s from %s into %s", name, checkpoint, path)
    return path
