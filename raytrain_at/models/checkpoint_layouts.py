"""The checkpoint layouts the recipes start from, translated to our key names, with the
normalisation each one's weights were trained with.

A clean or robust checkpoint is only half of a starting point: the other half is the mean and std
its network saw in training, which the project's models apply inside (``PixelSpaceClassifier``).
Each layout below says both:

* a project model file (safetensors with our spec): its own record;
* RobustBench's ``Singh2023Revisiting_*`` entries: their ConvStem one module deeper, ViT-S
  wrapped in RobustBench's ImageNet normaliser, the others on raw [0, 1] pixels
  (:mod:`raytrain_at.models.robustbench_layout`);
* the original ConvNeXt repository (Liu et al.): isotropic blocks as ``dwconv`` / ``norm`` /
  ``pwconv1`` / ``pwconv2`` (``gamma`` only with layer scale), hierarchical models as
  ``downsample_layers`` / ``stages`` (timm's own converter), ImageNet mean and std;
* the original DeiT repository: timm's ViT keys inside a ``model`` container (its training
  script's format), ImageNet mean and std;
* timm (``hub:NAME.TAG``, or a file): the tag's pretrained cfg; a local file only says so through
  a timm / Hugging Face ``config.json`` beside it, otherwise the model's own cfg is kept.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models.convnext import ConvNeXt
from timm.models.convnext import checkpoint_filter_fn as convnext_filter
from timm.models.vision_transformer import VisionTransformer

from raytrain_at.errors import UserError
from raytrain_at.models.isotropic import IsotropicConvNeXt
from raytrain_at.models.robustbench_layout import ENTRIES, renamed_state

Stats = tuple[float, ...]
IMAGENET = (tuple(IMAGENET_DEFAULT_MEAN), tuple(IMAGENET_DEFAULT_STD))
# The safetensors metadata key of a project model file's spec (:mod:`.model_files`). Defined
# here, below the model files, because reading one as a checkpoint must not build models.
SPEC_KEY = "raytrain_at.model_spec"

# The original ConvNeXt repository's isotropic block names -> timm's ConvNeXtBlock.
_ISO_BLOCK = re.compile(r"^blocks\.(\d+)\.(dwconv|pwconv1|pwconv2)\.")
_ISO_NAMES = {"dwconv": "conv_dw", "pwconv1": "mlp.fc1", "pwconv2": "mlp.fc2"}
_ROBUSTBENCH_STEMS = ("stem.stem.", "patch_embed.proj.stem.", "normalize.")


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint as read, before any translation.

    Attributes:
        state: its tensors (wrapper prefixes such as ``module.`` removed).
        source: what the user named.
        container: the key the tensors were found under (``model`` for the DeiT and ConvNeXt
            repositories' scripts), None for a plain state dict.
        metadata: a safetensors file's string metadata.
        path: the local file, None for ``hub:``.
        hub_name: the timm ``NAME.TAG`` of a ``hub:`` source.
    """

    state: dict[str, torch.Tensor]
    source: str
    container: str | None = None
    metadata: dict[str, str] | None = None
    path: Path | None = None
    hub_name: str | None = None


@dataclass(frozen=True)
class Translated:
    """A checkpoint in our key names, with where its weights come from.

    Attributes:
        state: tensors under the model's own key names.
        layout: the layout recognised (``timm``, ``deit``, ``convnext-isotropic``, ...).
        mean, std: the normalisation its weights were trained with; None when the checkpoint
            does not say (the model's timm cfg is kept).
        normalisation_from: where ``mean`` / ``std`` come from, for reports.
    """

    state: dict[str, torch.Tensor]
    layout: str
    mean: Stats | None
    std: Stats | None
    normalisation_from: str


def translate(checkpoint: Checkpoint, body: nn.Module, model_name: str) -> Translated:
    """``checkpoint`` in ``body``'s key names, and the normalisation it was trained with.

    Raises:
        UserError: a RobustBench checkpoint for an architecture it has no entry of, or one
        whose normaliser is not its entry's.
    """
    state = checkpoint.state
    meta = checkpoint.metadata or {}
    if SPEC_KEY in meta:
        name, mean, std = _model_file_record(meta[SPEC_KEY], checkpoint.source)
        mean, std = model_file_normalisation(name, mean, std)
        return Translated(state, "model-file", mean, std, f"model file ({name})")
    if any(k.startswith(_ROBUSTBENCH_STEMS) for k in _without_wrapper(state)):
        return _robustbench(checkpoint, model_name)
    if isinstance(body, IsotropicConvNeXt) and any(_ISO_BLOCK.match(k) for k in state):
        return Translated(_from_convnext_isotropic(state), "convnext-isotropic", *IMAGENET,
                          "ConvNeXt repository (ImageNet mean/std)")
    if isinstance(body, ConvNeXt) and "downsample_layers.0.0.weight" in state:
        return Translated(convnext_filter(state, body), "convnext-repository", *IMAGENET,
                          "ConvNeXt repository (ImageNet mean/std)")
    if checkpoint.hub_name is not None:
        cfg = timm.models.get_pretrained_cfg(checkpoint.hub_name)
        if cfg is not None:
            return Translated(state, "timm", tuple(cfg.mean), tuple(cfg.std),
                              f"timm cfg of {checkpoint.hub_name}")
    if (checkpoint.container == "model" and isinstance(body, VisionTransformer)
            and "cls_token" in state):
        return Translated(state, "deit", *IMAGENET, "DeiT repository (ImageNet mean/std)")
    side = _sidecar_normalisation(checkpoint.path)
    if side is not None:
        return Translated(state, "timm", side[0], side[1], "config.json beside the file")
    return Translated(state, "timm", None, None, f"timm cfg of {model_name} (the checkpoint "
                      "does not say)")


def model_file_normalisation(name: str, mean: Stats | None, std: Stats | None
                             ) -> tuple[Stats, Stats]:
    """The normalisation a model file's network ran with: its own record, or (older files) the
    default pretrained cfg of its timm name, which is what it was built with."""
    cfg = timm.models.get_pretrained_cfg(name)
    base = (tuple(cfg.mean), tuple(cfg.std)) if cfg is not None else IMAGENET
    return tuple(mean or base[0]), tuple(std or base[1])


def _model_file_record(text: str, source: str) -> tuple[str, Stats | None, Stats | None]:
    """(timm name, mean, std) of a model file's stored spec."""
    try:
        spec = json.loads(text)
        mean, std = spec.get("mean"), spec.get("std")
        return (str(spec["name"]), None if mean is None else tuple(float(v) for v in mean),
                None if std is None else tuple(float(v) for v in std))
    except (ValueError, KeyError, TypeError, AttributeError):
        raise UserError(f"{source}: malformed model spec {text[:200]}") from None


def _without_wrapper(state: dict[str, torch.Tensor]) -> list[str]:
    keys = list(state)
    for prefix in ("module.", "model."):
        if keys and all(k.startswith((prefix, "normalize.")) for k in keys):
            keys = [k.removeprefix(prefix) for k in keys]
    return keys


def _robustbench(checkpoint: Checkpoint, model_name: str) -> Translated:
    matches = [(name, entry) for name, entry in ENTRIES.items() if entry.model == model_name]
    if not matches:
        raise UserError(f"checkpoint {checkpoint.source!r} is in RobustBench's ConvStem layout, "
                        f"but no RobustBench entry has the architecture {model_name} (entries: "
                        f"{', '.join(sorted({e.model for e in ENTRIES.values()}))})")
    name, entry = matches[0]
    state = renamed_state(checkpoint.state, entry, name, checkpoint.source)
    mean, std = entry.normalisation
    return Translated(state, "robustbench", mean, std, f"RobustBench entry {name}")


def _from_convnext_isotropic(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Liu et al.'s isotropic keys -> ours (stem, norm and head are named alike)."""
    out = {}
    for key, value in state.items():
        match = _ISO_BLOCK.match(key)
        if match:
            key = (f"blocks.{match[1]}.{_ISO_NAMES[match[2]]}." + key[match.end():])
        out[key] = value
    return out


def _sidecar_normalisation(path: Path | None) -> tuple[Stats, Stats] | None:
    """mean / std of the timm (Hugging Face hub) ``config.json`` next to a weights file."""
    if path is None:
        return None
    config = path.with_name("config.json")
    if not config.is_file():
        return None
    try:
        cfg = json.loads(config.read_text()).get("pretrained_cfg") or {}
        mean, std = tuple(float(v) for v in cfg["mean"]), tuple(float(v) for v in cfg["std"])
    except (ValueError, KeyError, TypeError, AttributeError):
        raise UserError(f"{config}: not a timm config.json with pretrained_cfg mean and std "
                        "(it sits beside the checkpoint and would say its normalisation)"
                        ) from None
    return mean, std
