"""Load clean pretrained weights into every non-stem parameter of a model.

Sources: a local ``.safetensors`` file (timm / Hugging Face layout), a local PyTorch state dict
(read with ``torch.load(weights_only=True)``: never unpickle code), or ``hub:<timm name>.<tag>``
which asks timm to download when the machine is online. The ConvStem is left freshly initialised
(paper App. B: stems start random, the body from timm's ImageNet-1k weights). Shapes must match
key for key, so a checkpoint of another architecture fails with a message naming the first
mismatching key instead of loading half a model.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from raytrain_at.errors import UserError
from raytrain_at.models.backbones import adapter_for, stem_spec_of
from raytrain_at.models.pixel_space import unwrap

log = logging.getLogger(__name__)

# Containers that training scripts wrap state dicts in, most specific first.
_CONTAINER_KEYS = ("state_dict_ema", "model_ema", "state_dict", "model", "module")


@dataclass
class LoadReport:
    """What a weight load did: counts and the names left out."""

    loaded: int = 0
    skipped_stem: list[str] = field(default_factory=list)
    skipped_head: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return (f"loaded {self.loaded} tensors; stem left fresh: {len(self.skipped_stem)}; "
                f"head skipped: {len(self.skipped_head)}; missing: {len(self.missing)}; "
                f"unexpected: {len(self.unexpected)}")


def read_state_dict(source: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from a safetensors file, a torch file (weights only) or ``hub:NAME``
    (an MLflow reference is resolved to its file first, above this package:
    :func:`raytrain_at.model_refs.local_weights`).

    Raises:
        UserError: for a missing or unreadable file, or a hub download that fails.
    """
    text = str(source)
    if text.startswith("hub:"):
        return _hub_state_dict(text[4:])
    path = Path(text)
    if not path.is_file():
        raise UserError(f"checkpoint {text!r} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any reader failure is the file's fault
        raise UserError(f"checkpoint {text!r} cannot be read as weights: "
                        f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}") from None
    for key in _CONTAINER_KEYS:
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"checkpoint {text!r} does not hold a state dict of tensors")
    # DDP / wrapper prefixes.
    for prefix in ("module.", "backbone."):
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def _hub_state_dict(name: str) -> dict[str, torch.Tensor]:
    import timm

    try:
        return timm.create_model(name, pretrained=True).state_dict()
    except Exception as exc:  # noqa: BLE001 - offline, unknown tag, ...
        raise UserError(f"cannot download pretrained weights {name!r} ({type(exc).__name__}); "
                        "offline machines must pass a local file "
                        "(pretrained_cfg_overlay=dict(file=PATH))") from None


def load_backbone_weights(model: nn.Module, source: str | Path | None, *, model_name: str = "",
                          skip_head: bool | str = False, include_stem: bool = False) -> LoadReport:
    """Copy matching tensors from ``source`` into ``model`` (in place).

    Args:
        model: the model (a :class:`PixelSpaceClassifier` is unwrapped).
        source: local file or ``hub:name.tag``.
        model_name: for messages.
        skip_head: leave the classifier out (fine-tuning to a new label set); ``"if_mismatched"``
            keeps it when its shape fits (same label set) and leaves it out otherwise.
        include_stem: load the stem too (a checkpoint of the same ConvStem model, e.g. to continue
            from a clean or robust run), instead of keeping it freshly initialised.

    Returns:
        A :class:`LoadReport`; missing and unexpected keys are also logged.

    Raises:
        UserError: no source, an unreadable file, a shape mismatch, or nothing in common.
    """
    body = unwrap(model)
    name = model_name or (getattr(body, "pretrained_cfg", None) or {}).get(
        "architecture", type(body).__name__)
    if source is None:
        raise UserError(f"{name} has no downloadable clean weights: pass a local checkpoint "
                        "(pretrained_cfg_overlay=dict(file=PATH))")
    # Only a model with a ConvStem whose stem is kept fresh needs its family's stem prefix; any
    # other timm model (e.g. a ResNet backbone of the fine-tuning benchmark) loads as it is.
    has_conv_stem = not include_stem and stem_spec_of(body) is not None
    adapter = adapter_for(body) if has_conv_stem else None
    state = read_state_dict(source)
    own = body.state_dict()
    head_prefixes = _head_prefixes(body)
    report = LoadReport()
    to_load: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        # The checkpoint's PatchStem lives under the same prefix as our ConvStem.
        if has_conv_stem and key.startswith(adapter.stem_prefix):  # pyright: ignore[reportOptionalMemberAccess]  # set when has_conv_stem
            report.skipped_stem.append(key)
            continue
        if key.startswith(head_prefixes) and (skip_head is True or (
                skip_head == "if_mismatched" and key in own
                and tuple(own[key].shape) != tuple(tensor.shape))):
            report.skipped_head.append(key)
            continue
        if key not in own:
            report.unexpected.append(key)
            continue
        if tuple(own[key].shape) != tuple(tensor.shape):
            raise UserError(f"checkpoint {str(source)!r} does not fit {name}: {key} has shape "
                            f"{list(tensor.shape)} in the checkpoint, "
                            f"{list(own[key].shape)} in the "
                            "model")
        to_load[key] = tensor
    if not to_load:
        raise UserError(f"checkpoint {str(source)!r} has no parameters in common with {name}")
    missing = [k for k in own if k not in to_load and not (
        has_conv_stem and k.startswith(adapter.stem_prefix))  # pyright: ignore[reportOptionalMemberAccess]  # set when has_conv_stem
        and k not in report.skipped_head]
    body.load_state_dict(to_load, strict=False)
    report.loaded = len(to_load)
    report.missing = missing
    if report.missing or report.unexpected:
        log.warning("%s from %s: missing %s; unexpected %s", name, source, report.missing[:8],
                    report.unexpected[:8])
    log.info("%s from %s: %s", name, source, report.summary())
    return report


def _head_prefixes(body: nn.Module) -> tuple[str, ...]:
    classifier = getattr(body, "pretrained_cfg", {}).get("classifier", "head")
    names = classifier if isinstance(classifier, (list, tuple)) else [classifier]
    return tuple(f"{n}." for n in names)
