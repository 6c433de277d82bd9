"""Stem designs as data: a compact spec string builds any stem of the paper's ablation tables.

Why a spec and not a class per design: Ray Tune searches over stems, MLflow records them as a
param, and the paper's tables describe stems as sequences of layers. A string such as
``k3s2c48LG-k3s2cDLG`` (the ConvNeXt-T ConvStem) round-trips through all three.

Grammar (layers joined by ``-``)::

    layer    := "k" KERNEL "s" STRIDE "c" CHANNELS [NORM] [ACT]
    CHANNELS := an integer, or "D" for the backbone's width (so one spec fits ViT-S/M/B)
    NORM     := "L" (LayerNorm over channels) | "B" (BatchNorm)
    ACT      := "G" (GELU) | "R" (ReLU)

Each layer is a convolution with bias and padding ``(kernel - stride + 1) // 2`` (so a 3x3 stride-2
layer exactly halves an even side, and a kxk stride-k layer is a patchifier), followed by the
optional norm and activation. A spec is also accepted by name: the paper's designs are in
:data:`NAMED_STEMS` (``table7:1`` .. ``table7:6``, ``table8:P1|C1|C2``, ``table9:P1|C1..C5``).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
import torch.nn as nn
from timm.layers.norm import LayerNorm2d

from raytrain_at.errors import UserError

_LAYER_RE = re.compile(r"^k(?P<k>\d+)s(?P<s>\d+)c(?P<c>\d+|D)(?P<norm>[LB]?)(?P<act>[GR]?)$")

# The paper's stem designs. Widths not printed in the tables are inferred from the tables' FLOPs
# (Table 7: the first of two layers has 48 channels; Table 8: N = 64; Table 9: N = 48). Every
# ConvStem of Table 9 ends with the 1x1 projection to the embedding width of Xiao et al. (2021);
# the parameter counts of Table 14 only add up with it. With these widths every design with a
# printed figure counts within 1% of it in fvcore FLOPs (tests/test_models_table14.py); the
# furthest is Table 9's C4 (4.80G against 4.84G, -0.9%), the nearest widths that the table's
# N..8N notation allows.
NAMED_STEMS: dict[str, str] = {
    # Table 7, ConvNeXt-T (D = 96). Row 1 is the PatchStem, row 6 the paper's ConvStem.
    "table7:1": "k4s4cDL",
    "table7:2": "k7s4cDLG",
    "table7:3": "k7s4c48LG-k3s1cDLG",
    "table7:4": "k7s2c48LG-k3s2cDLG",
    "table7:5": "k5s2c48LG-k3s2cDLG",
    "table7:6": "k3s2c48LG-k3s2cDLG",
    # Table 8, ConvNeXt-B (N = 64, D = 128). C2 is the paper's ConvStem for ConvNeXt-B.
    "table8:P1": "k4s4cDL",
    "table8:C1": "k3s2c64LG-k3s2cDLG",
    "table8:C2": "k3s2c64LG-k3s2c96LG-k3s1cDLG",
    # Table 9, ViT-S (N = 48, D = 384). "*" = 3x3 stride 2, "**" = 7x7 stride 4, none = 3x3 stride
    # 1.
    "table9:P1": "k16s16cD",
    "table9:C1": "k3s2c48LG-k3s2c96LG-k3s2c192LG-k3s2c384LG-k1s1cD",
    "table9:C2": "k3s2c48LG-k3s2c48LG-k3s2c48LG-k3s2c384LG-k1s1cD",
    "table9:C3": "k7s4c48LG-k7s4c384LG-k1s1cD",
    "table9:C4": "k7s4c48LG-k3s2c96LG-k3s2c192LG-k3s1c384LG-k1s1cD",
    "table9:C5": "k7s4c48LG-k7s4c96LG-k3s1c192LG-k3s1c384LG-k1s1cD",
}


@dataclass(frozen=True)
class StemLayer:
    """One convolution of a stem, with its optional norm and activation."""

    kernel: int
    stride: int
    channels: int | None  # None: the backbone's width ("D")
    norm: str  # "", "L" or "B"
    act: str  # "", "G" or "R"

    @property
    def padding(self) -> int:
        return (self.kernel - self.stride + 1) // 2


@dataclass(frozen=True)
class StemSpec:
    """A parsed stem spec. ``text`` is the canonical spec string (names resolved)."""

    text: str
    layers: tuple[StemLayer, ...]

    @property
    def total_stride(self) -> int:
        return math.prod(layer.stride for layer in self.layers)

    def out_channels(self, width: int) -> int:
        last = self.layers[-1].channels
        return width if last is None else last


def parse_stem(spec: str) -> StemSpec:
    """Parse a stem spec string or a named design (see the module docstring).

    Raises:
        UserError: naming the offending layer when the spec is malformed.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise UserError(f"stem spec {spec!r} is empty: give a design name (e.g. table7:6) or "
                        "a spec "
                        "like k3s2c48LG-k3s2cDLG")
    text = NAMED_STEMS.get(spec.strip(), spec.strip())
    if ":" in text:
        raise UserError(f"unknown stem design {spec!r}; known names: {', '.join(NAMED_STEMS)}")
    layers = []
    for index, token in enumerate(text.split("-"), start=1):
        match = _LAYER_RE.match(token)
        if match is None:
            raise UserError(
                f"stem spec {spec!r}: layer {index} {token!r} is not of the form "
                "k<kernel>s<stride>c<channels|D>[L|B][G|R], e.g. k3s2c48LG")
        kernel, stride = int(match["k"]), int(match["s"])
        channels = None if match["c"] == "D" else int(match["c"])
        if kernel < 1 or stride < 1 or channels == 0:
            raise UserError(f"stem spec {spec!r}: layer {index} {token!r} has a zero kernel, "
                            "stride "
                            "or width")
        if kernel < stride:
            raise UserError(f"stem spec {spec!r}: layer {index} {token!r} has kernel {kernel} "
                            f"smaller than stride {stride}, so it would skip pixels")
        layers.append(StemLayer(kernel, stride, channels, match["norm"], match["act"]))
    return StemSpec(text=text, layers=tuple(layers))


def design_name(spec: str | None) -> str | None:
    """The paper's name of a spec (e.g. ``table7:6``), the spec itself if unnamed, None for None."""
    if spec is None:
        return None
    return next((name for name, text in NAMED_STEMS.items() if text == spec), spec)


def validate_stem(spec: str | StemSpec, *, stride: int, width: int, model_name: str) -> StemSpec:
    """Check that a stem fits a backbone: total stride and output width must match.

    Args:
        spec: spec string, design name or parsed spec.
        stride: the downsampling the backbone expects from its stem (4 for ConvNeXt, 16 for ViT).
        width: the channel width the backbone's first block expects.
        model_name: used in the error message.

    Raises:
        UserError: naming the spec and the mismatch.
    """
    parsed = spec if isinstance(spec, StemSpec) else parse_stem(spec)
    if parsed.total_stride != stride:
        raise UserError(f"stem spec {parsed.text!r}: total stride {parsed.total_stride} does "
                        "not fit "
                        f"{model_name}, which needs {stride}")
    out = parsed.out_channels(width)
    if out != width:
        raise UserError(f"stem spec {parsed.text!r}: last layer outputs {out} channels but "
                        f"{model_name} needs {width} (write cD for the backbone width)")
    return parsed


class ConvStem(nn.Sequential):
    """A stem built from a :class:`StemSpec`; maps (B, in_chans, H, W) to (B, width, H/s, W/s).

    ``device`` and ``dtype`` are timm's factory arguments (e.g. a model created on the meta
    device gets its stem there too). The spec is kept as its text, which TorchScript can hold.
    """

    __jit_unused_properties__ = ["spec"]  # TorchScript compiles properties unless told

    def __init__(self, spec: StemSpec, width: int, in_chans: int = 3,
                 device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        dd = {"device": device, "dtype": dtype}
        modules: list[nn.Module] = []
        channels_in = in_chans
        for layer in spec.layers:
            channels_out = width if layer.channels is None else layer.channels
            modules.append(nn.Conv2d(channels_in, channels_out, layer.kernel, layer.stride,
                                     padding=layer.padding, bias=True, **dd))
            if layer.norm == "L":
                modules.append(LayerNorm2d(channels_out, eps=1e-6, **dd))
            elif layer.norm == "B":
                modules.append(nn.BatchNorm2d(channels_out, **dd))
            if layer.act == "G":
                modules.append(nn.GELU())
            elif layer.act == "R":
                modules.append(nn.ReLU(inplace=True))
            channels_in = channels_out
        super().__init__(*modules)
        self.spec_text = spec.text

    @property
    def spec(self) -> StemSpec:
        """The parsed spec this stem was built from."""
        return parse_stem(self.spec_text)

    def convs(self) -> list[nn.Conv2d]:
        """The stem's convolutions, in order."""
        return [m for m in self if isinstance(m, nn.Conv2d)]


def build_stem(spec: str | StemSpec, *, stride: int, width: int, model_name: str,
               in_chans: int = 3, device: torch.device | str | None = None,
               dtype: torch.dtype | None = None) -> ConvStem:
    """Validate ``spec`` against a backbone and build the stem module."""
    parsed = validate_stem(spec, stride=stride, width=width, model_name=model_name)
    return ConvStem(parsed, width=width, in_chans=in_chans, device=device, dtype=dtype)
