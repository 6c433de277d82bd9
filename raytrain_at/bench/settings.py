"""What each ``raytrain-at bench`` command measures, validated at construction.

Light on purpose (no torch): a bad value ends with one line naming it before any heavy package
loads or any work starts.
"""

from __future__ import annotations

from dataclasses import dataclass

from raytrain_at.config import load_config
from raytrain_at.errors import UserError
from raytrain_at.evaluation.threats import AUTOATTACK_NORMS, parse_eps

DEVICES = ("cuda", "cpu")


def check_norm(norm: str) -> str:
    """``norm`` if AutoAttack knows it (``linf``, ``l2``, ``l1``).

    Raises:
        UserError: another value (one line naming it).
    """
    if norm not in AUTOATTACK_NORMS:
        raise UserError(f"--norm {norm!r} is not one of {', '.join(AUTOATTACK_NORMS)}")
    return norm


def _at_least(name: str, value: int | None, least: int) -> None:
    if value is not None and value < least:
        raise UserError(f"{name} {value} must be >= {least}")


def _one_of(name: str, value: str | None, allowed: tuple[str, ...]) -> None:
    if value is not None and value not in allowed:
        raise UserError(f"{name} {value!r} is not one of {', '.join(allowed)}")


@dataclass(frozen=True)
class StepBenchSettings:
    """What ``bench step`` measures; None picks the default named on each field.

    Attributes:
        models: timm names (None: the recipe's model, else the paper's three).
        batches: per-GPU batches (None: the recipe's per-worker batch, else 128 on CUDA, 8 on
            the CPU).
        resolution: input side (None: the recipe's, else 224).
        steps: timed steps (None: 20 on CUDA, 3 on the CPU).
        warmup: untimed steps first (None: 5 on CUDA, 1 on the CPU).
        compile: ``scaling.compile`` for ours (torch.compile of the model and the APGD step).
        reference: also time the paper-style reference step.
        reference_attack: ``paper`` (its ``apgd_train`` passes) or ``ours`` inside the reference.
        recipe: a recipe name or YAML file whose settings ours runs (None: RunConfig's defaults).
        overrides: ``key=value`` overrides applied after the recipe.
        device: ``cuda`` or ``cpu`` (None: CUDA when present).

    Raises:
        UserError: a value out of range, an unknown recipe or override key.
    """

    models: tuple[str, ...] | None = None
    batches: tuple[int, ...] | None = None
    resolution: int | None = None
    steps: int | None = None
    warmup: int | None = None
    compile: bool = False
    reference: bool = True
    reference_attack: str = "paper"
    recipe: str | None = None
    overrides: tuple[str, ...] = ()
    device: str | None = None

    def __post_init__(self) -> None:
        _one_of("--reference-attack", self.reference_attack, ("paper", "ours"))
        _one_of("--device", self.device, DEVICES)
        _at_least("--steps", self.steps, 1)
        _at_least("--warmup", self.warmup, 0)
        for batch in self.batches or ():
            _at_least("--batch", batch, 1)
        load_config(self.recipe, list(self.overrides))  # recipe and overrides, before any work


@dataclass(frozen=True)
class LoaderBenchSettings:
    """What ``bench loader`` measures.

    Attributes:
        images: images in the file (400 x 300 JPEG-90 crops of the two bundled photographs).
        batch: loader batch.
        workers: decoding workers, one measurement each.
        aug_batch: batch of the augmentation and training-step timings (even: MixUp/CutMix
            pair images).
        step_repeats: timed training steps (0: no step, no share).
        device: ``cuda`` or ``cpu`` (None: CUDA when present).

    Raises:
        UserError: a value out of range.
    """

    images: int = 1024
    batch: int = 64
    workers: tuple[int, ...] = (1, 2)
    aug_batch: int = 32
    step_repeats: int = 2
    device: str | None = None

    def __post_init__(self) -> None:
        _at_least("--images", self.images, 1)
        _at_least("--batch", self.batch, 1)
        _at_least("--step-repeats", self.step_repeats, 0)
        _one_of("--device", self.device, DEVICES)
        if not self.workers:
            raise UserError("--workers names no count of decoding workers")
        for workers in self.workers:
            _at_least("--workers", workers, 1)
        if self.aug_batch < 2 or self.aug_batch % 2:
            raise UserError(f"--aug-batch {self.aug_batch} must be even and >= 2 (MixUp/CutMix "
                            "pair images)")


@dataclass(frozen=True)
class AttackBenchSettings:
    """What ``bench attack`` times.

    Attributes:
        model_ref: model file, ``runs:/ID/model`` or ``models:/NAME@ALIAS``.
        n: images in the chunk (one batch).
        norm: ``linf``, ``l2`` or ``l1``.
        eps: radius in [0, 1] pixel scale, e.g. ``8/255``.
        version: ``standard``, ``fast`` or ``apgdt``.
        data: a bundled dataset (its test split).
        tracking_uri: for ``runs:/`` and ``models:/`` references.
        weights_grad: leave the weights trainable (as a plain pyautoattack call).
        seed: the attacks' seed.

    Raises:
        UserError: a value out of range, an unknown norm or version, a bad radius.
    """

    model_ref: str
    n: int = 8
    norm: str = "linf"
    eps: str = "8/255"
    version: str = "standard"
    data: str = "digits"
    tracking_uri: str | None = None
    weights_grad: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        _at_least("--n", self.n, 1)
        check_norm(self.norm)
        parse_eps(self.eps, "--eps")
        _one_of("--version", self.version, ("standard", "fast", "apgdt"))


@dataclass(frozen=True)
class EvalBenchSettings:
    """What ``bench eval`` compares.

    Attributes:
        model: timm name.
        weights: a local checkpoint (None: random init).
        resolution: input side.
        n: images (None: ``batch``).
        batch: attack batch = chunk (None: 256 on CUDA, 8 on the CPU).
        norm: ``linf``, ``l2`` or ``l1``.
        eps: radius in [0, 1] pixel scale (None: the paper's for the norm, scaled from 224).
        version: ``standard`` or ``fast`` (plain pyautoattack has no ``apgdt``).
        kernels: ours' ``exact`` or ``fast`` kernels.
        seed: the attacks' seed and the images'.
        repeats: timed runs of each path, alternating (medians reported).
        device: ``cuda`` or ``cpu`` (None: CUDA when present).

    Raises:
        UserError: a value out of range, an unknown norm, version or kernel mode.
    """

    model: str = "convnext_tiny_cvst"
    weights: str | None = None
    resolution: int = 224
    n: int | None = None
    batch: int | None = None
    norm: str = "linf"
    eps: str | None = None
    version: str = "standard"
    kernels: str = "exact"
    seed: int = 0
    repeats: int = 1
    device: str | None = None

    def __post_init__(self) -> None:
        check_norm(self.norm)
        if self.eps is not None:
            parse_eps(self.eps, "--eps")
        _one_of("--version", self.version, ("standard", "fast"))
        _one_of("--kernels", self.kernels, ("exact", "fast"))
        _one_of("--device", self.device, DEVICES)
        _at_least("--resolution", self.resolution, 16)
        for name, value in (("--n", self.n), ("--batch", self.batch), ("--repeats", self.repeats)):
            _at_least(name, value, 1)
