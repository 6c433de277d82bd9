"""RobustBench's layout of the paper's published checkpoints, and how it maps onto our zoo.

RobustBench's ImageNet zoo holds the paper's models as ``Singh2023Revisiting_*`` entries. Their
definitions have exactly our architectures (same tensors, same shapes) under other key names:
the ConvStem sits one module deeper (``stem.stem.N`` for ConvNeXt, ``patch_embed.proj.stem.N``
for ViT), and ViT-S is wrapped in a normalising ``Sequential`` (``normalize.mean`` /
``normalize.std`` buffers, the network under ``model.``). The other five take raw [0, 1] pixels
without any normalisation, so a model made from them records mean 0 and std 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from raytrain_at.errors import UserError

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

    @property
    def normalisation(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """The mean and std the entry's network sees: RobustBench's ImageNet normaliser, or raw
        [0, 1] pixels (mean 0, std 1)."""
        return (IMAGENET_MEAN, IMAGENET_STD) if self.normalised else RAW_PIXELS


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


def renamed_state(state: dict[str, torch.Tensor], entry: RobustBenchEntry, name: str,
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
