"""Device-side augmentation presets (raytrain_at.data.device_augment), on CPU."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data import auto_augment as timm_aa

from raytrain_at.data.device_augment import (
    PRESETS,
    RAND_OPS,
    BatchRandAugment,
    DeviceAugment,
    level_to_arg,
)

NUM_CLASSES = 10


@pytest.fixture()
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1234)
    images = torch.rand(16, 3, 64, 64, generator=gen)
    labels = torch.randint(0, NUM_CLASSES, (16,), generator=gen)
    return images, labels


def _distinct_rows(x: torch.Tensor) -> int:
    return len({tuple(row.tolist()) for row in x.flatten(1)[:, ::97]})  # a strided sample of pixels suffices


# ----------------------------------------------------------------------------------------------- contract


@pytest.mark.parametrize("preset", PRESETS)
def test_output_contract(preset: str, batch: tuple[torch.Tensor, torch.Tensor]) -> None:
    images, labels = batch
    before = images.clone()
    out, targets = DeviceAugment(preset, NUM_CLASSES, seed=3)(images, labels)
    assert torch.equal(images, before), "the input batch must not be modified"
    assert out.shape == images.shape and out.dtype == torch.float32 and out.device == images.device
    assert torch.isfinite(out).all()
    assert out.min() >= 0.0 and out.max() <= 1.0
    if preset == "heavy":
        assert targets.shape == (16, NUM_CLASSES) and targets.dtype == torch.float32
        torch.testing.assert_close(targets.sum(1), torch.ones(16), atol=1e-5, rtol=0)
        assert (targets >= 0).all()
        # label smoothing 0.1 + mixing: no row is one-hot
        assert (targets.max(1).values < 0.99).sum() >= 12
    else:
        assert targets.dtype == torch.int64 and torch.equal(targets, labels)


def test_properties() -> None:
    assert DeviceAugment("heavy", NUM_CLASSES).soft_targets
    assert not DeviceAugment("basic", NUM_CLASSES).soft_targets
    assert not DeviceAugment("3aug", NUM_CLASSES).soft_targets


def test_basic_is_identity(batch: tuple[torch.Tensor, torch.Tensor]) -> None:
    images, labels = batch
    out, targets = DeviceAugment("basic", NUM_CLASSES)(images, labels)
    assert torch.equal(out, images) and torch.equal(targets, labels)


def test_3aug_changes_images_keeps_labels(batch: tuple[torch.Tensor, torch.Tensor]) -> None:
    images, labels = batch
    out, targets = DeviceAugment("3aug", NUM_CLASSES)(images, labels)
    assert torch.equal(targets, labels)
    changed = (out - images).abs().flatten(1).amax(1) > 1e-3
    assert changed.all()


def test_heavy_is_per_sample() -> None:
    images = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0)).expand(16, -1, -1, -1)
    labels = torch.arange(16) % NUM_CLASSES
    out, _ = DeviceAugment("heavy", NUM_CLASSES, seed=5)(images.contiguous(), labels)
    assert _distinct_rows(out) >= 8


# ------------------------------------------------------------------------------------------- reproducibility


@pytest.mark.parametrize("preset", ["3aug", "heavy"])
def test_seeded_reproducible(preset: str, batch: tuple[torch.Tensor, torch.Tensor]) -> None:
    images, labels = batch
    a, b = DeviceAugment(preset, NUM_CLASSES, seed=11), DeviceAugment(preset, NUM_CLASSES, seed=11)
    for _ in range(2):  # call by call
        (xa, ya), (xb, yb) = a(images, labels), b(images, labels)
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    xc, _ = DeviceAugment(preset, NUM_CLASSES, seed=12)(images, labels)
    assert not torch.equal(xc, DeviceAugment(preset, NUM_CLASSES, seed=11)(images, labels)[0])
    # successive calls of one object draw new augmentations
    assert not torch.equal(a(images, labels)[0], xa)


def test_global_rngs_untouched(batch: tuple[torch.Tensor, torch.Tensor]) -> None:
    images, labels = batch
    torch_state, np_state, py_state = torch.get_rng_state(), np.random.get_state(), random.getstate()
    DeviceAugment("heavy", NUM_CLASSES)(images, labels)
    DeviceAugment("3aug", NUM_CLASSES)(images, labels)
    assert torch.equal(torch.get_rng_state(), torch_state)
    assert random.getstate() == py_state
    new_np = np.random.get_state()
    assert new_np[0] == np_state[0] and np.array_equal(new_np[1], np_state[1]) and new_np[2:] == np_state[2:]


# ------------------------------------------------------------------------------------------------ RandAugment


def test_randaugment_alone_changes_most_images(batch: tuple[torch.Tensor, torch.Tensor]) -> None:
    images, _ = batch
    out = BatchRandAugment()(images, torch.Generator().manual_seed(0))
    assert out.min() >= 0.0 and out.max() <= 1.0 and torch.isfinite(out).all()
    changed = (out - images).abs().flatten(1).amax(1) > 1e-3
    # each of the 2 ops runs with p=0.5: about 3/4 of the images change
    assert changed.sum() >= 9


def test_randaugment_full_magnitude_changes_every_image(batch: tuple[torch.Tensor, torch.Tensor]) -> None:
    images = batch[0] * 0.5 + 0.2  # uniform [0, 1] noise is a fixed point of AutoContrast and Equalize
    out = BatchRandAugment(num_ops=2, magnitude=10.0, magnitude_std=0.0, prob=1.0)(
        images, torch.Generator().manual_seed(1))
    assert ((out - images).abs().flatten(1).amax(1) > 1e-3).all()


@pytest.mark.parametrize("name", [n for n in RAND_OPS if timm_aa.LEVEL_TO_ARG[n] is not None])
def test_level_to_arg_matches_timm(name: str) -> None:
    levels = [0.0, 0.5, 2.5, 4.99, 5.0, 7.5, 8.4, 9.0, 9.37, 9.99, 10.0]
    mine = level_to_arg(name, torch.tensor(levels, dtype=torch.float64), torch.ones(len(levels))).tolist()
    negated = level_to_arg(name, torch.tensor(levels, dtype=torch.float64), -torch.ones(len(levels))).tolist()
    for level, m, n in zip(levels, mine, negated):
        ref = timm_aa.LEVEL_TO_ARG[name](level, dict(timm_aa._HPARAMS_DEFAULT))[0]
        # timm negates at random: the reference is one of our two signs
        assert min(abs(m - ref), abs(n - ref)) < 1e-9, (name, level, m, n, ref)


def _uint8_image() -> np.ndarray:
    rng = np.random.default_rng(0)
    walk = np.cumsum(rng.integers(-12, 13, (32, 40, 3)), axis=1) + rng.integers(60, 180, (32, 1, 3))
    return walk.clip(20, 220).astype(np.uint8)  # not the full range, so AutoContrast has work to do


def _apply_one(name: str, x: torch.Tensor, level: float, sign: float, interpolation: str) -> torch.Tensor:
    aug = BatchRandAugment(1, level, 0.0, 1.0, interpolation=interpolation)
    return aug._apply_layer(x.clone(), torch.tensor([RAND_OPS.index(name)]), torch.tensor([True]),
                            torch.tensor([level], dtype=torch.float64), torch.tensor([sign]),
                            x.shape[-2], x.shape[-1])


_EXACT = {"Equalize", "Invert", "PosterizeIncreasing", "SolarizeIncreasing", "SolarizeAdd"}
_GEOMETRIC = {"Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel"}


@pytest.mark.parametrize("name", RAND_OPS)
def test_ops_match_timm_pil(name: str) -> None:
    """Each op against timm's PIL op (nearest sampling for the geometric ones: bicubic kernels differ)."""
    arr = _uint8_image()
    img = Image.fromarray(arr)
    x = torch.from_numpy(arr.copy()).permute(2, 0, 1)[None].float() / 255
    for level in (3.0, 9.0, 9.9):
        for sign in (1.0, -1.0):
            level_fn = timm_aa.LEVEL_TO_ARG[name]
            args = ()
            if level_fn is not None:
                args = (float(level_to_arg(name, torch.tensor([level]), torch.tensor([sign]))[0]),)
                if name in ("PosterizeIncreasing", "SolarizeIncreasing", "SolarizeAdd"):
                    args = (int(args[0]),)
            ref_img = timm_aa.NAME_TO_OP[name](img, *args, fillcolor=(0, 0, 0), resample=Image.NEAREST)
            ref = torch.from_numpy(np.asarray(ref_img).copy()).permute(2, 0, 1)[None].float() / 255
            out = _apply_one(name, x, level, sign, "nearest")
            diff = (out - ref).abs().max().item() * 255
            if name in _EXACT or name in _GEOMETRIC:
                assert diff < 1e-3, (name, level, sign, diff)
            else:  # float blends vs PIL's rounded uint8 ones
                assert diff <= 1.5, (name, level, sign, diff)


# --------------------------------------------------------------------------------------------- bad arguments


@pytest.mark.parametrize(("kwargs", "name"), [
    (dict(preset="strong"), "preset"),
    (dict(num_classes=1), "num_classes"),
    (dict(seed=-1), "seed"),
    (dict(label_smoothing=1.0), "label_smoothing"),
    (dict(randaug_prob=1.5), "randaug_prob"),
    (dict(switch_prob=-0.1), "switch_prob"),
    (dict(erase_prob=2.0), "erase_prob"),
    (dict(randaug_ops=-1), "randaug_ops"),
    (dict(randaug_magnitude=11.0), "randaug_magnitude"),
    (dict(randaug_magnitude_std=-1.0), "randaug_magnitude_std"),
    (dict(mixup_alpha=-0.5), "mixup_alpha"),
    (dict(cutmix_alpha=float("nan")), "cutmix_alpha"),
])
def test_bad_constructor_arguments(kwargs: dict, name: str) -> None:
    full = dict(preset="heavy", num_classes=NUM_CLASSES) | kwargs
    preset, num_classes = full.pop("preset"), full.pop("num_classes")
    with pytest.raises(ValueError, match=name):
        DeviceAugment(preset, num_classes, **full)


@pytest.mark.parametrize(("images", "labels", "name"), [
    (torch.rand(15, 3, 8, 8), torch.zeros(15, dtype=torch.long), "images"),  # odd batch for Mixup
    (torch.rand(16, 3, 8, 8) * 2, torch.zeros(16, dtype=torch.long), "images"),  # not in [0, 1]
    (torch.full((16, 3, 8, 8), float("nan")), torch.zeros(16, dtype=torch.long), "images"),
    (torch.rand(3, 8, 8), torch.zeros(3, dtype=torch.long), "images"),  # not 4-D
    (torch.randint(0, 255, (16, 3, 8, 8)), torch.zeros(16, dtype=torch.long), "images"),  # not float
    (torch.rand(16, 1, 8, 8), torch.zeros(16, dtype=torch.long), "images"),  # not RGB
    (torch.rand(16, 3, 8, 8), torch.zeros(8, dtype=torch.long), "labels"),
    (torch.rand(16, 3, 8, 8), torch.zeros(16), "labels"),  # float labels
])
def test_bad_batches(images: torch.Tensor, labels: torch.Tensor, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        DeviceAugment("heavy", NUM_CLASSES)(images, labels)


def test_odd_batch_is_fine_without_mixup() -> None:
    images, labels = torch.rand(5, 3, 8, 8), torch.zeros(5, dtype=torch.long)
    for preset in ("basic", "3aug"):
        out, _ = DeviceAugment(preset, NUM_CLASSES)(images, labels)
        assert out.shape == images.shape


def test_no_mixing_still_gives_smoothed_targets(batch: tuple[torch.Tensor, torch.Tensor]) -> None:
    images, labels = batch
    _, targets = DeviceAugment("heavy", NUM_CLASSES, mixup_alpha=0.0, cutmix_alpha=0.0)(images, labels)
    assert torch.equal(targets.argmax(1), labels)
    torch.testing.assert_close(targets.max(1).values, torch.full((16,), 0.9 + 0.1 / NUM_CLASSES))
