"""Load starting weights into a model: all of them, or fail in one line before anything runs.

Sources: a local ``.safetensors`` file, a local PyTorch file (read with
``torch.load(weights_only=True)``: never unpickle code), ``hub:<timm name>.<tag>`` (timm
downloads it when the machine is online), or a model reference. Every layout the recipes name
is recognised and translated (:mod:`raytrain_at.models.checkpoint_layouts`), which also says
the normalisation the weights were trained with. Only the parts a model replaces stay freshly
initialised: a ConvStem in place of the checkpoint's stem (paper App. B: stems start random,
the body from timm's ImageNet-1k weights) and a new classifier. Any other tensor that is
missing, unexpected or of another shape stops the load with a message naming the first keys,
instead of training from half a model; the report says, per module, what matched.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import load_file

from raytrain_at.errors import UserError
from raytrain_at.models.backbones import adapter_for, patch_stem_spec, stem_spec_of
from raytrain_at.models.checkpoint_layouts import Checkpoint, translate
from raytrain_at.models.pixel_space import unwrap
from raytrain_at.models.stems import design_name, parse_stem

log = logging.getLogger(__name__)

# Containers that training scripts wrap state dicts in, most specific first.
_CONTAINER_KEYS = ("state_dict_ema", "model_ema", "state_dict", "model", "module")


@dataclass
class ModuleLoad:
    """One module's tensors in a load: taken from the checkpoint, left at their fresh
    initialisation (a replaced stem, a new head), or missing from the checkpoint."""

    matched: int = 0
    fresh: int = 0
    missing: int = 0
    unexpected: int = 0

    @property
    def total(self) -> int:
        return self.matched + self.fresh + self.missing


@dataclass
class LoadReport:
    """What a weight load did, per module and in total.

    Attributes:
        source: the checkpoint as named.
        layout: the checkpoint layout recognised (see :mod:`raytrain_at.models.checkpoint_layouts`).
        loaded: model tensors taken from the checkpoint (``init.matched`` of a run).
        total: the model's tensors (``init.total``).
        skipped_stem: checkpoint tensors of a stem the model replaces (left out).
        skipped_head: checkpoint tensors of a classifier the model replaces (left out).
        fresh: model tensors left at their initialisation (the replaced stem, a new head).
        missing: model tensors the checkpoint lacks (a load with any fails).
        unexpected: checkpoint tensors the model lacks (a load with any fails).
        modules: the same counts per module (``stem``, ``stages.0``, ``blocks.3``, ``head`` ...).
        mean, std: the normalisation the checkpoint's weights were trained with; None when it
            does not say (the model's timm cfg applies).
        normalisation_from: where ``mean`` / ``std`` come from.
    """

    source: str = ""
    layout: str = ""
    loaded: int = 0
    total: int = 0
    skipped_stem: list[str] = field(default_factory=list)
    skipped_head: list[str] = field(default_factory=list)
    fresh: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    modules: dict[str, ModuleLoad] = field(default_factory=dict)
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    normalisation_from: str = ""

    def summary(self) -> str:
        return (f"loaded {self.loaded}/{self.total} tensors ({self.layout} layout); "
                f"stem left fresh: {len(self.skipped_stem)}; "
                f"head skipped: {len(self.skipped_head)}; missing: {len(self.missing)}; "
                f"unexpected: {len(self.unexpected)}")

    def table(self) -> str:
        """One line per module: matched / fresh / missing / unexpected tensors."""
        lines = [f"{'module':<24} {'matched':>7} {'fresh':>5} {'missing':>7} {'unexpected':>10}"]
        for module, counts in self.modules.items():
            lines.append(f"{module:<24} {counts.matched:>7} {counts.fresh:>5} "
                         f"{counts.missing:>7} {counts.unexpected:>10}")
        return "\n".join(lines)

    def fresh_modules(self) -> list[str]:
        """The modules left (wholly or partly) at their initialisation."""
        return [m for m, counts in self.modules.items() if counts.fresh]

    def as_params(self) -> dict[str, str]:
        """The load as MLflow params of the run that starts from it."""
        params = {"init.matched": str(self.loaded), "init.total": str(self.total),
                  "init.layout": self.layout,
                  "init.fresh": ",".join(self.fresh_modules()) or "none",
                  "init.normalisation": self.normalisation_from}
        if self.mean is not None and self.std is not None:
            params.update({"init.mean": str(list(self.mean)), "init.std": str(list(self.std))})
        return params


def read_state_dict(source: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of :func:`read_checkpoint` ``(source)``."""
    return read_checkpoint(source).state


def read_checkpoint(source: str | Path) -> Checkpoint:
    """Read a state dict from a safetensors file, a torch file (weights only) or ``hub:NAME``,
    with what the file says about itself (container, metadata). An MLflow reference is resolved
    to its file first, above this package (:func:`raytrain_at.model_refs.local_weights`).

    Raises:
        UserError: for a missing or unreadable file, or a hub download that fails.
    """
    text = str(source)
    if text.startswith("hub:"):
        return Checkpoint(_hub_state_dict(text[4:]), source=text, hub_name=text[4:])
    path = Path(text)
    if not path.is_file():
        raise UserError(f"checkpoint {text!r} does not exist")
    metadata: dict[str, str] = {}
    try:
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt") as handle:
                metadata = dict(handle.metadata() or {})
            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any reader failure is the file's fault
        raise UserError(f"checkpoint {text!r} cannot be read as weights: "
                        f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}") from None
    container = None
    for key in _CONTAINER_KEYS:
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state, container = state[key], key
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"checkpoint {text!r} does not hold a state dict of tensors")
    # DDP / wrapper prefixes.
    for prefix in ("module.", "backbone."):
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return Checkpoint(state, source=str(source), container=container, metadata=metadata,
                      path=path)


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
    """Copy a checkpoint into ``model`` (in place): every tensor but those of the parts the
    model replaces, or fail without changing anything.

    The checkpoint is read in any layout of :mod:`raytrain_at.models.checkpoint_layouts` and
    translated to the model's key names. A ConvStem that replaces the checkpoint's stem stays
    freshly initialised (paper App. B), unless its tensors are the checkpoint's stem's: the
    backbone's own PatchStem design (Table 7 row 1, Tables 8 and 9 P1) or a checkpoint of the
    same ConvStem model loads its stem.

    Args:
        model: the model (a :class:`PixelSpaceClassifier` is unwrapped).
        source: local file, ``hub:name.tag`` or a model reference.
        model_name: for messages.
        skip_head: leave the classifier out (fine-tuning to a new label set); ``"if_mismatched"``
            keeps it when its shape fits (same label set) and leaves it out otherwise.
        include_stem: the checkpoint must hold this model's stem too (a checkpoint of the same
            ConvStem model, e.g. to continue from a clean or robust run).

    Returns:
        A :class:`LoadReport`, also logged per module.

    Raises:
        UserError: no source, an unreadable file, a tensor of another shape, model tensors the
        checkpoint lacks or checkpoint tensors the model lacks (outside a replaced stem or
        head), or nothing in common; one line naming the first keys and the checkpoint.
    """
    body = unwrap(model)
    name = model_name or (getattr(body, "pretrained_cfg", None) or {}).get(
        "architecture", type(body).__name__)
    if source is None:
        raise UserError(f"{name} has no downloadable clean weights: pass a local checkpoint "
                        "(pretrained_cfg_overlay=dict(file=PATH))")
    checkpoint = read_checkpoint(source)
    translated = translate(checkpoint, body, name)
    report = LoadReport(source=str(source), layout=translated.layout, mean=translated.mean,
                        std=translated.std, normalisation_from=translated.normalisation_from)
    own = body.state_dict()
    state = dict(translated.state)
    fresh = _leave_out_replaced_stem(body, own, state, report, include_stem, str(source), name)
    fresh |= _leave_out_replaced_head(body, own, state, report, skip_head)
    to_load = {k: v for k, v in state.items() if k in own}
    if not to_load:
        raise UserError(f"checkpoint {str(source)!r} has no parameters in common with {name}")
    for key, tensor in to_load.items():
        if tuple(own[key].shape) != tuple(tensor.shape):
            raise UserError(f"checkpoint {str(source)!r} does not fit {name}: {key} has shape "
                            f"{list(tensor.shape)} in the checkpoint, {list(own[key].shape)} in "
                            "the model")
    report.loaded, report.total = len(to_load), len(own)
    report.fresh = [k for k in own if k in fresh]
    report.missing = [k for k in own if k not in to_load and k not in fresh]
    report.unexpected = [k for k in state if k not in own]
    report.modules = _per_module(body, own, to_load, fresh, report.unexpected)
    if report.missing or report.unexpected:
        # The table is for the log (--verbose); the user's console gets the one-line error.
        log.info("%s from %s (%s layout) does not fit:\n%s", name, source, report.layout,
                 report.table())
        raise UserError(_misfit_message(str(source), name, report))
    body.load_state_dict(to_load, strict=False)
    log.info("%s from %s: %s; normalisation: %s\n%s", name, source, report.summary(),
             report.normalisation_from, report.table())
    return report


def _stem_prefix(body: nn.Module) -> str | None:
    """The stem's key prefix of a backbone whose stem is a ConvStem (None otherwise: its stem
    is an ordinary part of the model)."""
    if stem_spec_of(body) is None:
        return None
    return adapter_for(body).stem_prefix


def _leave_out_replaced_stem(body: nn.Module, own: dict[str, torch.Tensor],
                             state: dict[str, torch.Tensor], report: LoadReport,
                             include_stem: bool, source: str, name: str) -> set[str]:
    """Drop the checkpoint's stem from ``state`` unless it is exactly the model's; return the
    model keys left fresh."""
    prefix = _stem_prefix(body)
    if prefix is None:
        return set()
    spec = stem_spec_of(body)
    if spec == parse_stem(patch_stem_spec(body)).text:
        # The backbone's PatchStem as a one-convolution ConvStem: the checkpoint's bare
        # ``proj.weight`` (ViT) or ``stem.weight`` (isotropic) is its layer 0.
        for leaf in ("weight", "bias"):
            if prefix + leaf in state and prefix + "0." + leaf not in state:
                state[prefix + "0." + leaf] = state.pop(prefix + leaf)
    ours = {k for k in own if k.startswith(prefix)}
    theirs = {k for k in state if k.startswith(prefix)}
    if ours == theirs and all(tuple(own[k].shape) == tuple(state[k].shape) for k in ours):
        return set()
    if include_stem:
        first = sorted(ours ^ theirs) or sorted(
            k for k in ours if tuple(own[k].shape) != tuple(state[k].shape))
        raise UserError(f"checkpoint {source!r} does not fit {name}: its stem is not the model's "
                        f"{design_name(spec)} ({spec}), e.g. {first[0]}")
    report.skipped_stem = sorted(theirs)
    for key in theirs:
        del state[key]
    return ours


def _leave_out_replaced_head(body: nn.Module, own: dict[str, torch.Tensor],
                             state: dict[str, torch.Tensor], report: LoadReport,
                             skip_head: bool | str) -> set[str]:
    """Drop the checkpoint's classifier from ``state`` when the model gets a new one; return the
    model keys left fresh."""
    prefixes = _head_prefixes(body)
    theirs = [k for k in state if k.startswith(prefixes)]
    mismatched = any(k in own and tuple(own[k].shape) != tuple(state[k].shape) for k in theirs)
    if not (skip_head is True or (skip_head == "if_mismatched" and mismatched)):
        return set()
    report.skipped_head = sorted(theirs)
    for key in theirs:
        del state[key]
    return {k for k in own if k.startswith(prefixes)}


def _module_of(key: str, stem_prefix: str | None, head_prefixes: tuple[str, ...]) -> str:
    """The module a tensor belongs to, for reports: the stem, the head, a numbered block or
    stage (``blocks.3``, ``stages.0``), or the top-level name."""
    if stem_prefix and key.startswith(stem_prefix):
        return stem_prefix.rstrip(".")
    for prefix in head_prefixes:
        if key.startswith(prefix):
            return prefix.rstrip(".")
    parts = key.split(".")
    return ".".join(parts[:2]) if len(parts) > 2 and parts[1].isdigit() else parts[0]


def _per_module(body: nn.Module, own: dict[str, torch.Tensor], loaded: dict[str, torch.Tensor],
                fresh: set[str], unexpected: list[str]) -> dict[str, ModuleLoad]:
    stem_prefix, head_prefixes = _stem_prefix(body), _head_prefixes(body)
    modules: dict[str, ModuleLoad] = {}
    for key in own:
        counts = modules.setdefault(_module_of(key, stem_prefix, head_prefixes), ModuleLoad())
        if key in loaded:
            counts.matched += 1
        elif key in fresh:
            counts.fresh += 1
        else:
            counts.missing += 1
    for key in unexpected:
        modules.setdefault(_module_of(key, stem_prefix, head_prefixes),
                           ModuleLoad()).unexpected += 1
    return modules


def _misfit_message(source: str, name: str, report: LoadReport) -> str:
    parts = []
    if report.missing:
        parts.append(f"{len(report.missing)} model tensors are not in it "
                     f"({', '.join(report.missing[:3])})")
    if report.unexpected:
        hint = (" - layer scale? (model.layer_scale)"
                if any(k.endswith(".gamma") for k in report.unexpected) else "")
        parts.append(f"{len(report.unexpected)} of its tensors are not in the model "
                     f"({', '.join(report.unexpected[:3])}){hint}")
    return (f"checkpoint {source!r} ({report.layout} layout) does not fit {name}: "
            + "; ".join(parts))


def _head_prefixes(body: nn.Module) -> tuple[str, ...]:
    classifier = getattr(body, "pretrained_cfg", {}).get("classifier", "head")
    names = classifier if isinstance(classifier, (list, tuple)) else [classifier]
    return tuple(f"{n}." for n in names)
