"""ImageNet-C corruptions: every common type runs and changes the image, results depend only on the
seed (and, in a batch, on each image's id), severity orders the damage, and the caller's global
NumPy RNG is left alone."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from raytrain_at.errors import UserError
from raytrain_at.evaluation.corruptions import (
    COMMON_CORRUPTIONS,
    choose_corruptions,
    corrupt_batch,
    corrupt_image,
    corruption_seed,
)

# The types whose output depends on the seed (noise, glass shuffling, fog fractal, elastic field).
SEEDED = ("gaussian_noise", "shot_noise", "impulse_noise", "glass_blur", "fog", "elastic_transform")


def structured_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    """Gradients, a checkerboard and mild noise: edges for blurs, mid-tones for noise and fog."""
    rows, cols = np.mgrid[0:height, 0:width]
    checker = ((rows // 4 + cols // 4) % 2) * 80.0
    flat = np.full((height, width), 60.0)
    base = np.stack([rows / height * 150, cols / width * 150, flat], axis=-1)
    noise = np.random.default_rng(seed).normal(0, 10, (height, width, 3))
    return np.clip(base + checker[..., None] + noise + 10, 0, 255).astype(np.uint8)


def mean_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


def test_common_corruptions_are_the_fifteen_in_order() -> None:
    assert COMMON_CORRUPTIONS == (
        "gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur",
        "motion_blur", "zoom_blur", "snow", "frost", "fog", "brightness", "contrast",
        "elastic_transform", "pixelate", "jpeg_compression",
    )


@pytest.mark.parametrize("shape", [(32, 32), (48, 64)])
@pytest.mark.parametrize("name", COMMON_CORRUPTIONS)
def test_every_type_keeps_shape_and_changes_image(name: str, shape: tuple[int, int]) -> None:
    image = structured_image(*shape)
    out = corrupt_image(image, name, 3, seed=0)
    assert out.dtype == np.uint8 and out.shape == image.shape
    assert mean_abs_diff(out, image) > 1.0


@pytest.mark.parametrize("name", COMMON_CORRUPTIONS)
def test_equal_seeds_give_equal_outputs(name: str) -> None:
    image = structured_image(32, 32)
    first, second = corrupt_image(image, name, 3, 7), corrupt_image(image, name, 3, 7)
    np.testing.assert_array_equal(first, second)


@pytest.mark.parametrize("name", SEEDED)
def test_different_seeds_give_different_outputs(name: str) -> None:
    image = structured_image(32, 32)
    assert not np.array_equal(corrupt_image(image, name, 3, 1), corrupt_image(image, name, 3, 2))


@pytest.mark.parametrize("name", ["gaussian_noise", "impulse_noise", "defocus_blur", "glass_blur",
                                  "fog", "contrast"])
def test_higher_severity_moves_further(name: str) -> None:
    image = structured_image(48, 64)
    mild = mean_abs_diff(corrupt_image(image, name, 1, 0), image)
    severe = mean_abs_diff(corrupt_image(image, name, 5, 0), image)
    assert mild < severe


def test_fog_keeps_the_brightest_level_and_brightens_dark_pixels() -> None:
    image = (structured_image(48, 64) * 0.75).astype(np.uint8)  # headroom: fog must not saturate
    out = corrupt_image(image, "fog", 3, 0)
    # The rescale by max/(max + strength) keeps fogged pixels at or below the image's maximum,
    # while the added fractal lifts the darkest ones.
    assert int(out.max()) <= int(image.max()) + 1
    assert int(out.min()) > int(image.min())


@pytest.mark.parametrize("name", ["gaussian_noise", "elastic_transform", "glass_blur", "fog"])
def test_global_numpy_rng_is_left_alone(name: str) -> None:
    np.random.seed(1234)
    expected = np.random.get_state()
    corrupt_image(structured_image(32, 32), name, 3, seed=5)
    state = np.random.get_state()
    assert state[0] == expected[0] and state[2:] == expected[2:]
    np.testing.assert_array_equal(state[1], expected[1])


def test_choice_depends_only_on_seed_and_id() -> None:
    ids = list(range(200))
    full = dict(zip(ids, choose_corruptions(ids, seed=3)))
    shuffled = list(np.random.default_rng(0).permutation(ids))
    assert dict(zip(shuffled, choose_corruptions(shuffled, seed=3))) == full
    shard = ids[150:] + ids[:10]
    assert choose_corruptions(shard, seed=3) == [full[i] for i in shard]
    for image_id in (0, 99, 199):
        assert choose_corruptions([image_id], seed=3) == [full[image_id]]
    assert len(set(full.values())) >= 12
    assert choose_corruptions(ids, seed=4) != [full[i] for i in ids]
    # Ids straight from a data loader (a tensor) pick the same types as Python ints.
    assert choose_corruptions(torch.tensor(ids[:20]), seed=3) == [full[i] for i in ids[:20]]


def test_choice_stays_within_given_names() -> None:
    names = ("fog", "glass_blur")
    chosen = choose_corruptions(range(50), seed=0, names=names)
    assert set(chosen) == set(names)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_batch_matches_per_image_corruption(dtype: torch.dtype) -> None:
    pixels = np.stack([structured_image(32, 32, seed=i) for i in range(4)])
    images = torch.from_numpy(pixels).permute(0, 3, 1, 2).to(dtype) / 255
    ids = [11, 3, 42, 7]
    out, names = corrupt_batch(images, ids, severity=2, seed=9)
    assert out.shape == images.shape and out.dtype == dtype and out.device == images.device
    assert out.min() >= 0 and out.max() <= 1
    assert names == choose_corruptions(ids, seed=9)
    for k, (image_id, name) in enumerate(zip(ids, names)):
        expected = corrupt_image(pixels[k], name, 2, corruption_seed(9, image_id))
        got = (out[k].permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
        np.testing.assert_array_equal(got, expected)


def test_batch_is_the_same_when_sharded() -> None:
    pixels = np.stack([structured_image(32, 32, seed=i) for i in range(6)])
    images = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255
    ids = [0, 1, 2, 3, 4, 5]
    whole, _ = corrupt_batch(images, ids, seed=1)
    order = [4, 0, 5]
    shard, _ = corrupt_batch(images[order], order, seed=1)
    torch.testing.assert_close(shard, whole[order], rtol=0, atol=0)


@pytest.mark.gpu
def test_batch_stays_on_gpu() -> None:
    images = torch.rand(2, 3, 32, 32, device="cuda", dtype=torch.float16)
    out, _ = corrupt_batch(images, [0, 1])
    assert out.device == images.device and out.dtype == torch.float16


def test_bad_inputs_raise_user_error() -> None:
    image = structured_image(32, 32)
    with pytest.raises(UserError, match="'blurry'.*gaussian_noise"):
        corrupt_image(image, "blurry", 3, 0)
    for severity in (0, 6):
        with pytest.raises(UserError, match="severity"):
            corrupt_image(image, "fog", severity, 0)
    with pytest.raises(UserError, match="uint8"):
        corrupt_image(image.astype(np.float32), "fog", 3, 0)
    with pytest.raises(UserError, match="at least 32"):
        corrupt_image(image[:16], "fog", 3, 0)
    with pytest.raises(UserError, match="'blurry'"):
        choose_corruptions([0], seed=0, names=["fog", "blurry"])
    with pytest.raises(UserError, match="image id"):
        choose_corruptions([-1], seed=0)
    batch = torch.rand(2, 3, 32, 32)
    with pytest.raises(UserError, match="N, 3, H, W"):
        corrupt_batch(batch[0], [0])
    with pytest.raises(UserError, match="N, 3, H, W"):
        corrupt_batch(batch[:, :1], [0, 1])
    with pytest.raises(UserError, match="3 image ids for a batch of 2"):
        corrupt_batch(batch, [0, 1, 2])
    with pytest.raises(UserError, match="severity"):
        corrupt_batch(batch, [0, 1], severity=9)


def test_imagenet_c_protocol_is_the_mean_over_15_types_and_5_severities(tmp_path) -> None:
    """Every image under every (type, severity): 75 accuracies, whose mean is the reported one
    (RobustBench's ImageNet-C figure); checked against a direct count with corrupt_batch."""
    from raytrain_at.data.write import bundled_beton
    from raytrain_at.evaluation.corruption_accuracy import corruption_accuracy
    from raytrain_at.evaluation.runner import load_images

    data = bundled_beton("digits", "test", tmp_path)
    ids = [0, 1]
    torch.manual_seed(0)
    # Predicts from the image's mean brightness: corruptions move it, so accuracies vary.
    model = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                torch.nn.Linear(3, 10))
    result = corruption_accuracy(model, data, ids, resolution=32, crop_pct=1.0, severity=3,
                                 seed=5, batch_size=2, device=torch.device("cpu"),
                                 protocol="imagenet-c")
    assert result.protocol == "imagenet-c" and set(result.per_severity) == {"1", "2", "3", "4",
                                                                            "5"}
    assert result.counts == {name: 5 * len(ids) for name in sorted(COMMON_CORRUPTIONS)}
    x, y = load_images(data, ids, resolution=32, crop_pct=1.0, batch_size=2,
                       device=torch.device("cpu"))
    direct = []
    with torch.no_grad():
        for severity in range(1, 6):
            for name in COMMON_CORRUPTIONS:
                corrupted, _ = corrupt_batch(x, ids, severity=severity, seed=5, names=(name,))
                direct.append(model(corrupted).argmax(1).eq(y).float().mean().item())
    assert result.accuracy == pytest.approx(sum(direct) / 75)
    assert result.per_severity["5"] == pytest.approx(sum(direct[60:]) / 15)
    mix = corruption_accuracy(model, data, ids, resolution=32, crop_pct=1.0, severity=3, seed=5,
                              batch_size=2, device=torch.device("cpu"), protocol="mix")
    assert mix.protocol == "mix" and sum(mix.counts.values()) == len(ids)
