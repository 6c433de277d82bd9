"""Batched training augmentation on the device, after the FFCV loader's random-resized-crop.

Presets ``basic`` (nothing), ``3aug`` (colour jitter) and ``heavy`` (per-image RandAugment
``rand-m9-mstd0.5-inc1``, random erasing, MixUp/CutMix with label smoothing) as in the paper's
recipes (App. A.2 / D.2), on float ``(B, 3, H, W)`` batches in ``[0, 1]`` on any device. RandAugment
is sampled here per image because kornia's picks one set of ops per batch; docs/augmentation.md
gives the op-by-op comparison with timm and kornia, the choices and the seeding.
"""

from __future__ import annotations

import contextlib
import math
import random
from collections.abc import Callable, Iterator
from typing import Literal

import numpy as np
import torch
from kornia.augmentation import ColorJitter
from kornia.enhance import (
    adjust_brightness_accumulative,
    adjust_contrast_with_mean_subtraction,
    adjust_saturation_with_gray_subtraction,
    equalize,
    invert,
    normalize_min_max,
    posterize,
    sharpness,
    solarize,
)
from kornia.geometry.transform import invert_affine_transform, warp_affine
from timm.data.mixup import Mixup
from timm.data.random_erasing import RandomErasing

__all__ = ["PRESETS", "RAND_OPS", "BatchRandAugment", "DeviceAugment", "Preset", "level_to_arg"]

Preset = Literal["basic", "3aug", "heavy"]
PRESETS: tuple[str, ...] = ("basic", "3aug", "heavy")

# timm's ``_RAND_INCREASING_TRANSFORMS`` ('inc1'), in timm's order.
RAND_OPS: tuple[str, ...] = (
    "AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing", "SolarizeIncreasing",
    "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing",
    "SharpnessIncreasing", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel",
)
_GEOMETRIC: tuple[str, ...] = ("Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")
_ARG_OPS = frozenset(RAND_OPS) - {"AutoContrast", "Equalize", "Invert"}
_LEVEL_DENOM = 10.0  # timm's _LEVEL_DENOM: magnitude M means level M / 10 of each op's range
# timm's default 'translate_pct' for TranslateXRel/YRel (create_transform does not set it).
_TRANSLATE_PCT = 0.45


def level_to_arg(name: str, level: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    """timm's ``LEVEL_TO_ARG`` for the 'inc1' ops, vectorised.

    Computed in float64 like timm's Python floats, so ``int(...)`` truncations agree exactly.

    Args:
        name: an op of :data:`RAND_OPS` that takes an argument.
        level: per-sample magnitude, already clipped to ``[0, 10]``.
        sign: per-sample ``+1`` / ``-1`` (timm's ``_randomly_negate``); ignored by unsigned ops.

    Returns:
        Per-sample argument in timm's units: degrees (Rotate), bits kept (Posterize), the
        0..256 threshold (Solarize), the 0..128 addend (SolarizeAdd), the enhance factor, the
        shear factor or the translate
        fraction of the image size.

    Raises:
        ValueError: ``name`` is not an op with an argument.
    """
    frac = level.to(torch.float64) / _LEVEL_DENOM
    sign = sign.to(torch.float64)
    if name == "Rotate":
        return frac * 30.0 * sign
    if name == "PosterizeIncreasing":
        return 4 - torch.floor(frac * 4).long()  # level >= 0, so floor == Python's int()
    if name == "SolarizeIncreasing":
        return 256 - torch.clamp(torch.floor(frac * 256), max=256).long()
    if name == "SolarizeAdd":
        return torch.clamp(torch.floor(frac * 110), max=128).long()
    if name in ("ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing",
                "SharpnessIncreasing"):
        return torch.clamp(1.0 + frac * 0.9 * sign, min=0.1)
    if name in ("ShearX", "ShearY"):
        return frac * 0.3 * sign
    if name in ("TranslateXRel", "TranslateYRel"):
        return frac * _TRANSLATE_PCT * sign
    raise ValueError(f"name: {name!r} is not a RandAugment op with an argument")


def _auto_contrast(x: torch.Tensor, _: torch.Tensor) -> torch.Tensor:
    # kornia maps a constant channel to 0; PIL's autocontrast leaves it as it is.
    flat = x.flatten(2)
    constant = (flat.amax(-1) == flat.amin(-1))[..., None, None]
    return torch.where(constant, x, normalize_min_max(x))


def _solarize_add(x: torch.Tensor, add: torch.Tensor) -> torch.Tensor:
    # PIL/timm: add to pixels below 128 only, saturate at 255, no inversion (kornia's differs).
    add = (add.to(x.dtype) / 255.0).view(-1, 1, 1, 1)
    return torch.where(x < 128.0 / 255.0, (x + add).clamp(max=1.0), x)


def _per_sample(x: torch.Tensor, arg: torch.Tensor) -> torch.Tensor:
    return arg.to(device=x.device, dtype=x.dtype, non_blocking=True)


# Non-geometric ops: (images on device, per-sample timm argument on CPU) -> images.
_PIXEL_OPS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "AutoContrast": _auto_contrast,
    "Equalize": lambda x, _: equalize(x),
    "Invert": lambda x, _: invert(x),
    "PosterizeIncreasing": lambda x, bits: posterize(x, bits.to(x.device, non_blocking=True)),
    # PIL inverts pixel values i >= t, i.e. x = i / 255 >= t / 255; kornia inverts x >= threshold.
    "SolarizeIncreasing": lambda x, t: solarize(x, _per_sample(x, t) / 255.0),
    "SolarizeAdd": _solarize_add,
    "ColorIncreasing": lambda x, f: adjust_saturation_with_gray_subtraction(x, _per_sample(x, f)),
    "ContrastIncreasing": lambda x, f: adjust_contrast_with_mean_subtraction(x, _per_sample(x, f)),
    "BrightnessIncreasing": lambda x, f: adjust_brightness_accumulative(x, _per_sample(x, f)),
    "SharpnessIncreasing": lambda x, f: sharpness(x, _per_sample(x, f)),
}


def _pil_inverse_matrix(name: str, arg: float, height: int, width: int) -> list[float]:
    """PIL's output -> input affine ``(a, b, c, d, e, f)`` for one geometric op (as timm calls
    PIL)."""
    if name == "ShearX":
        return [1.0, arg, 0.0, 0.0, 1.0, 0.0]
    if name == "ShearY":
        return [1.0, 0.0, 0.0, arg, 1.0, 0.0]
    if name == "TranslateXRel":
        return [1.0, 0.0, arg * width, 0.0, 1.0, 0.0]
    if name == "TranslateYRel":
        return [1.0, 0.0, 0.0, 0.0, 1.0, arg * height]
    # Rotate: Image.rotate(deg) about the centre (w/2, h/2), counter-clockwise.
    a = -math.radians(arg)
    c, s = math.cos(a), math.sin(a)
    cx, cy = width / 2.0, height / 2.0
    return [c, s, cx - c * cx - s * cy, -s, c, cy + s * cx - c * cy]


def _forward_matrices(inv: torch.Tensor) -> torch.Tensor:
    """PIL output -> input matrices (N, 2, 3) to kornia's source -> destination pixel matrices.

    PIL puts pixel centres at ``i + 0.5``, kornia at ``i``: ``i_in = A i_out + (t + A 0.5 - 0.5)``.
    """
    lin = inv[:, :, :2]
    shift = inv[:, :, 2] + 0.5 * lin.sum(-1) - 0.5
    return invert_affine_transform(torch.cat([lin, shift[..., None]], -1))


class BatchRandAugment:
    """timm's RandAugment (``rand-m{M}-n{N}-p{P}-mstd{S}-inc1``) per sample on a float batch,
    with kornia ops.

    See docs/augmentation.md for the op table and the differences to timm.

    Args:
        num_ops: ops per image (timm's ``n``), each chosen uniformly with replacement.
        magnitude: timm's ``m`` in ``[0, 10]``.
        magnitude_std: std of the per-application magnitude noise (timm's ``mstd``); ``inf`` samples
            uniformly in ``[0, magnitude]`` as timm does.
        prob: probability that a chosen op is applied (timm's ``p``).
        interpolation: ``'bicubic'`` (the paper's ``train_interpolation``), ``'bilinear'`` or
        ``'nearest'``.
        fill: value for pixels a geometric op moves in from outside (the paper's ``img_mean`` is 0).

    Raises:
        ValueError: an argument out of range.
    """

    def __init__(self, num_ops: int = 2, magnitude: float = 9.0, magnitude_std: float = 0.5,
                 prob: float = 0.5, *, interpolation: str = "bicubic", fill: float = 0.0) -> None:
        if isinstance(num_ops, bool) or not isinstance(num_ops, int) or num_ops < 0:
            raise ValueError(f"randaug_ops must be a non-negative int, got {num_ops!r}")
        if not 0.0 <= magnitude <= _LEVEL_DENOM:
            raise ValueError(f"randaug_magnitude must be in [0, 10], got {magnitude!r}")
        if not magnitude_std >= 0.0:
            raise ValueError(f"randaug_magnitude_std must be >= 0, got {magnitude_std!r}")
        if not 0.0 <= prob <= 1.0:
            raise ValueError(f"randaug_prob must be in [0, 1], got {prob!r}")
        if interpolation not in ("bicubic", "bilinear", "nearest"):
            raise ValueError("interpolation must be 'bicubic', 'bilinear' or 'nearest', "
                             f"got {interpolation!r}")
        if not 0.0 <= fill <= 1.0:
            raise ValueError(f"fill must be in [0, 1], got {fill!r}")
        self.num_ops = num_ops
        self.magnitude = float(magnitude)
        self.magnitude_std = float(magnitude_std)
        self.prob = float(prob)
        self.interpolation = interpolation
        self.fill = float(fill)

    def _sample_levels(self, n: int, generator: torch.Generator | None) -> torch.Tensor:
        if self.magnitude_std == 0.0:
            level = torch.full((n,), self.magnitude, dtype=torch.float64)
        elif math.isinf(self.magnitude_std):
            level = torch.rand(n, generator=generator, dtype=torch.float64) * self.magnitude
        else:
            level = self.magnitude + self.magnitude_std * torch.randn(n, generator=generator,
                                                                      dtype=torch.float64)
        return level.clamp(0.0, _LEVEL_DENOM)

    def __call__(self, images: torch.Tensor,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Augment each image of the batch independently.

        Args:
            images: float ``(B, 3, H, W)`` in ``[0, 1]`` (not checked here; :class:`DeviceAugment`
                checks), any device; not modified.
            generator: CPU generator for all random choices (the global CPU RNG when None).

        Returns:
            A new float tensor like ``images``, in ``[0, 1]``.
        """
        out = images.clone()
        batch, _, height, width = images.shape
        if batch == 0:
            return out
        for _ in range(self.num_ops):
            # Per image, as timm draws them: op (with replacement), gate, magnitude, sign.
            op_index = torch.randint(len(RAND_OPS), (batch,), generator=generator)
            applied = torch.rand(batch, generator=generator) < self.prob
            level = self._sample_levels(batch, generator)
            sign = torch.where(torch.rand(batch, generator=generator) < 0.5, -1.0, 1.0)
            out = self._apply_layer(out, op_index, applied, level, sign, height, width)
        return out

    def _apply_layer(self, out: torch.Tensor, op_index: torch.Tensor, applied: torch.Tensor,
                     level: torch.Tensor, sign: torch.Tensor, height: int,
                     width: int) -> torch.Tensor:
        # The choices live on the CPU, so selecting each op's images costs no device sync.
        rows_of = {name: torch.nonzero(applied & (op_index == k)).flatten()
                   for k, name in enumerate(RAND_OPS)}
        for name, op in _PIXEL_OPS.items():
            rows = rows_of[name]
            if rows.numel() == 0:
                continue
            arg = level_to_arg(name, level[rows], sign[rows]) if name in _ARG_OPS else level[rows]
            dev_rows = rows.to(out.device, non_blocking=True)
            out.index_copy_(0, dev_rows, op(out.index_select(0, dev_rows), arg))
        # All geometric ops of the layer in one warp: one matrix per image.
        geo_rows = [rows_of[name] for name in _GEOMETRIC]
        rows = torch.cat(geo_rows)
        if rows.numel():
            inv = torch.tensor([
                _pil_inverse_matrix(name, float(a), height, width)
                for name, r in zip(_GEOMETRIC, geo_rows)
                for a in level_to_arg(name, level[r], sign[r]).tolist()
            ], dtype=torch.float64).view(-1, 2, 3)
            matrices = _forward_matrices(inv).to(out.device, out.dtype, non_blocking=True)
            dev_rows = rows.to(out.device, non_blocking=True)
            warped = warp_affine(out.index_select(0, dev_rows), matrices, (height, width),
                                 mode=self.interpolation, padding_mode="fill", align_corners=False,
                                 fill_value=torch.full((3,), self.fill, device=out.device,
                                                       dtype=out.dtype))
            out.index_copy_(0, dev_rows, warped.clamp_(0.0, 1.0))  # bicubic overshoots
        return out


def _check_prob(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value!r}")


@contextlib.contextmanager
def _seeded_global_rngs(states: np.ndarray, device: torch.device) -> Iterator[None]:
    """Seed torch (CPU + the images' CUDA device), numpy and python RNGs; restore them on exit."""
    torch_seed = int(states[0]) << 32 | int(states[1])
    cuda_devices = []
    if device.type == "cuda":
        cuda_devices = [device.index if device.index is not None else torch.cuda.current_device()]
    np_state, py_state = np.random.get_state(), random.getstate()
    with torch.random.fork_rng(devices=cuda_devices, device_type="cuda"):
        torch.default_generator.manual_seed(torch_seed)
        for index in cuda_devices:
            torch.cuda.default_generators[index].manual_seed(torch_seed)
        np.random.seed(int(states[2]))
        random.seed(int(states[3]))
        try:
            yield
        finally:
            np.random.set_state(np_state)
            random.setstate(py_state)


class DeviceAugment:
    """The paper's augmentation presets on device batches (docs/augmentation.md).

    Args:
        preset: ``'basic'``, ``'3aug'`` or ``'heavy'``.
        num_classes: number of classes (for heavy's soft targets); at least 2.
        seed: base seed; outputs depend only on (seed, call index, inputs).
        label_smoothing: heavy only, folded into the soft targets (``[0, 1)``). For basic/3aug
        the loss
            applies it.
        randaug_ops: RandAugment ops per image.
        randaug_magnitude: RandAugment magnitude in ``[0, 10]``.
        randaug_magnitude_std: std of the magnitude noise (``inf``: uniform in ``[0, magnitude]``).
        randaug_prob: probability of applying each chosen op.
        mixup_alpha: MixUp Beta parameter (0 disables MixUp).
        cutmix_alpha: CutMix Beta parameter (0 disables CutMix).
        switch_prob: probability of CutMix instead of MixUp for a batch when both are on.
        erase_prob: per-image probability of random erasing.
        check_range: check that each batch is in [0, 1] (one read from the device per call; the
            training loop turns it off for its loader's images, uint8 / 255 by construction).

    Raises:
        ValueError: an argument out of range, naming it.
    """

    def __init__(self, preset: Preset, num_classes: int, *, seed: int = 0,
                 label_smoothing: float = 0.1,
                 randaug_ops: int = 2, randaug_magnitude: float = 9.0,
                 randaug_magnitude_std: float = 0.5,
                 randaug_prob: float = 0.5, mixup_alpha: float = 0.8, cutmix_alpha: float = 1.0,
                 switch_prob: float = 0.5, erase_prob: float = 0.25,
                 check_range: bool = True) -> None:
        if preset not in PRESETS:
            raise ValueError(f"preset must be one of {PRESETS}, got {preset!r}")
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {seed!r}")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing!r}")
        for name, value in (("randaug_prob", randaug_prob), ("switch_prob", switch_prob),
                            ("erase_prob", erase_prob)):
            _check_prob(name, value)
        for name, value in (("mixup_alpha", mixup_alpha), ("cutmix_alpha", cutmix_alpha)):
            if not (value >= 0.0 and math.isfinite(value)):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        self.preset: Preset = preset
        self.num_classes = num_classes
        self.seed = seed
        self.label_smoothing = float(label_smoothing)
        self.check_range = check_range
        self._calls = 0
        # Built for every preset so that bad RandAugment arguments are rejected whatever the preset.
        self.randaugment = BatchRandAugment(randaug_ops, randaug_magnitude, randaug_magnitude_std,
                                            randaug_prob)
        self.erase_prob = float(erase_prob)
        mixing = mixup_alpha > 0.0 or cutmix_alpha > 0.0
        # prob=0 with both alphas 0: timm's Mixup would assert; then it only smooths the one-hot
        # targets.
        self.mixup = Mixup(mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha,
                           prob=1.0 if mixing else 0.0,
                           switch_prob=switch_prob, mode="batch", correct_lam=True,
                           label_smoothing=self.label_smoothing, num_classes=num_classes)
        # DeiT-III's torchvision ColorJitter(0.3, 0.3, 0.3) (hue 0), on every image.
        self.color_jitter = ColorJitter(brightness=0.3, contrast=0.3, saturation=0.3, hue=0.0,
                                        p=1.0)

    @property
    def calls(self) -> int:
        """Calls made so far: each call's randomness derives from (seed, call index), so a
        resumed run restores this to continue the same augmentation stream."""
        return self._calls

    @calls.setter
    def calls(self, value: int) -> None:
        if value < 0:
            raise ValueError(f"calls must be >= 0, got {value}")
        self._calls = int(value)

    @property
    def soft_targets(self) -> bool:
        """True when targets are ``(B, num_classes)`` probabilities (heavy), not class indices."""
        return self.preset == "heavy"

    def _check_batch(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        if not isinstance(images, torch.Tensor) or images.ndim != 4 \
                or not images.is_floating_point():
            raise ValueError("images must be a 4-D floating-point tensor (B, 3, H, W), got "
                             f"{getattr(images, 'dtype', type(images))} of shape "
                             f"{tuple(getattr(images, 'shape', ()))}")
        if images.shape[1] != 3:
            raise ValueError(f"images must have 3 channels, got shape {tuple(images.shape)}")
        if images.device.type not in ("cpu", "cuda"):
            raise ValueError(f"images must be on a cpu or cuda device, got {images.device}")
        if (not isinstance(labels, torch.Tensor) or labels.shape != images.shape[:1]
                or labels.is_floating_point() or labels.dtype == torch.bool or labels.is_complex()):
            raise ValueError(f"labels must be an integer tensor of shape ({images.shape[0]},), got "
                             f"{getattr(labels, 'dtype', type(labels))} of shape "
                             f"{tuple(getattr(labels, 'shape', ()))}")
        if self.preset == "heavy" and images.shape[0] % 2:
            raise ValueError("images: the heavy preset (timm Mixup) needs an even batch size, "
                             f"got {images.shape[0]}")
        if self.check_range and images.numel():
            # One reduction and one sync; NaN fails both comparisons.
            low, high = torch.aminmax(images)
            low, high = float(low), float(high)
            if not (low >= 0.0 and high <= 1.0):
                raise ValueError(f"images must be in [0, 1], got values in [{low}, {high}]")

    def __call__(self, images: torch.Tensor,
                 labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Augment one batch.

        Args:
            images: float ``(B, 3, H, W)`` in ``[0, 1]`` on cpu or cuda; not modified.
            labels: integer ``(B,)`` class indices in ``[0, num_classes)`` (not range-checked:
                that would cost a device sync).

        Returns:
            ``(images, targets)``: float32 images in ``[0, 1]``, same shape and device; targets
            ``(B,)`` int64 (on the labels' device) for basic/3aug, ``(B, num_classes)`` float32
            rows summing to 1 on the images' device for heavy. basic returns float32 images and
            int64 labels as they came, without a copy.

        Raises:
            ValueError: bad images or labels (shape, dtype, range, odd batch for heavy).
        """
        self._check_batch(images, labels)
        images, labels = images.float(), labels.long()
        call = self._calls
        self._calls += 1
        if self.preset == "basic":
            return images, labels
        seeds = np.random.SeedSequence(entropy=self.seed, spawn_key=(call,))
        states = seeds.generate_state(5, dtype=np.uint32)
        with _seeded_global_rngs(states, images.device):
            if self.preset == "3aug":
                return self.color_jitter(images).clamp_(0.0, 1.0), labels
            # heavy: a private CPU generator for RandAugment's choices (device-independent).
            generator = torch.Generator().manual_seed(int(states[4]))
            # A new tensor: the in-place steps below are safe.
            out = self.randaugment(images, generator)
            if self.erase_prob > 0.0:
                # timm annotates device as str; it passes it on to torch, which takes either.
                out = RandomErasing(probability=self.erase_prob, mode="pixel", max_count=1,
                                    device=out.device)(out)  # pyright: ignore[reportArgumentType]
            out, targets = self.mixup(out, labels.to(out.device))
        # Erased N(0, 1) noise, clamped as the reference's attack clamps its inputs
        # (docs/augmentation.md).
        return out.clamp_(0.0, 1.0), targets
