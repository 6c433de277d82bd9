"""ImageNet-C common corruptions for measuring accuracy under distribution shift.

Each image gets ONE of the 15 common corruption types at a chosen severity (ImageNet-C's protocol
samples one type per image). The type and the corruption's randomness are pure functions of
``(seed, image id)`` (:func:`choose_corruptions`, :func:`corruption_seed`), so a sharded
evaluation - any split of the ids over workers, in any order - corrupts every image exactly as a
single-process run does.

Twelve types come from the ``imagecorruptions`` package. Three are implemented here from the
published ImageNet-C definitions and severity parameters, on scipy.ndimage/numpy and a local
``np.random.default_rng``: the package's ``glass_blur`` and ``fog`` fail on the tested stack
(``glass_blur`` passes ``multichannel`` to scikit-image's ``gaussian``, which 0.26 rejects; ``fog``
uses ``np.float_``, which NumPy 2 removed), and its ``impulse_noise`` draws from scikit-image's own
unseeded generator, so no seed can make it repeatable. They match the reference in kind and
strength, not pixel for pixel.

``imagecorruptions`` draws from NumPy's global RNG: :func:`corrupt_image` seeds it for the call and
restores the caller's state afterwards. That makes it unsafe to call from several threads at once
when other threads also use ``np.random``; processes are fine.
"""

from __future__ import annotations

import operator
import warnings
from collections.abc import Callable, Sequence

import numpy as np
import torch
from scipy import ndimage

from raytrain_at.errors import UserError

# imagecorruptions imports scipy.ndimage.interpolation (deprecated) and pkg_resources (deprecated);
# neither affects the results, so silence them here only, not for the whole process.
with warnings.catch_warnings():
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", message="pkg_resources is deprecated", category=UserWarning)
    from imagecorruptions import corrupt as _library_corrupt

COMMON_CORRUPTIONS: tuple[str, ...] = (
    "gaussian_noise",
    "shot_noise",
    "impulse_noise",
    "defocus_blur",
    "glass_blur",
    "motion_blur",
    "zoom_blur",
    "snow",
    "frost",
    "fog",
    "brightness",
    "contrast",
    "elastic_transform",
    "pixelate",
    "jpeg_compression",
)

# ImageNet-C impulse noise per severity: the fraction of values set to 0 or 255.
_IMPULSE_AMOUNTS = (0.03, 0.06, 0.09, 0.17, 0.27)
# ImageNet-C glass blur per severity: (gaussian sigma, max pixel displacement, shuffle passes).
_GLASS_BLUR_PARAMS = ((0.7, 1, 2), (0.9, 2, 1), (1.0, 2, 3), (1.1, 3, 2), (1.5, 4, 2))
# ImageNet-C fog per severity: (fractal strength, wibble decay of the plasma fractal).
_FOG_PARAMS = ((1.5, 2.0), (2.0, 2.0), (2.5, 1.7), (2.5, 1.5), (3.0, 1.4))
# imagecorruptions rejects smaller images.
_MIN_SIDE = 32
# Separate streams of (seed, image id): one picks the type, one drives the corruption's noise.
_CHOICE_STREAM = 0
_NOISE_STREAM = 1


def _impulse_noise(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Salt and pepper: each channel value independently becomes 0 or 255 (even odds)."""
    out = image.astype(np.float64)
    hit = rng.random(out.shape) < _IMPULSE_AMOUNTS[severity - 1]
    salt = rng.random(out.shape) < 0.5
    out[hit] = np.where(salt[hit], 255.0, 0.0)
    return out


def _blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur over height and width only; edges repeat like scikit-image's default."""
    return ndimage.gaussian_filter(image, sigma=(sigma, sigma, 0), mode="nearest")


def _glass_blur(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Blur, swap each pixel with a random neighbour within ``max_delta`` (some passes), blur."""
    sigma, max_delta, passes = _GLASS_BLUR_PARAMS[severity - 1]
    height, width, _ = image.shape
    blurred = _blur(image / 255.0, sigma)
    # The swaps are sequential (a pixel can be carried along by later swaps), so they are applied
    # to a permutation of flat pixel indices in a plain list (fast) and gathered once at the end.
    order = list(range(height * width))
    rows, cols = np.mgrid[max_delta:height - max_delta, max_delta:width - max_delta]
    sources = (rows * width + cols).ravel().tolist()
    for _ in range(passes):
        dy, dx = rng.integers(-max_delta, max_delta + 1, size=(2, len(sources)))
        targets = (np.asarray(sources) + dy * width + dx).tolist()
        for source, target in zip(sources, targets):
            order[source], order[target] = order[target], order[source]
    shuffled = blurred.reshape(height * width, -1)[order].reshape(blurred.shape)
    return np.clip(_blur(shuffled, sigma), 0, 1) * 255


def _plasma_fractal(size: int, wibble_decay: float, rng: np.random.Generator) -> np.ndarray:
    """A wrapping diamond-square fractal on a ``size`` x ``size`` grid (power of two), in [0, 1]."""
    grid = np.zeros((size, size))
    step, wibble = size, 100.0

    def jitter(mean: np.ndarray) -> np.ndarray:
        # ImageNet-C's noise at each level is uniform in +-wibble**2 (wibble times a draw in
        # +-wibble), so detail shrinks by wibble_decay**2 per octave; kept for the same look.
        return mean + wibble * rng.uniform(-wibble, wibble, mean.shape)

    while step >= 2:
        half = step // 2
        corners = grid[0::step, 0::step]
        # Diamond step: the centre of each square is the mean of its four corners.
        square_sum = corners + np.roll(corners, -1, 0) + np.roll(corners, -1, 1)
        square_sum += np.roll(corners, (-1, -1), (0, 1))
        grid[half::step, half::step] = jitter(square_sum / 4)
        # Square step: each edge midpoint is the mean of the two corners on its edge and the two
        # centres on either side of it.
        centres = grid[half::step, half::step]
        top_edges = corners + np.roll(corners, -1, 1) + centres + np.roll(centres, 1, 0)
        grid[0::step, half::step] = jitter(top_edges / 4)
        left_edges = corners + np.roll(corners, -1, 0) + centres + np.roll(centres, 1, 1)
        grid[half::step, 0::step] = jitter(left_edges / 4)
        step, wibble = half, wibble / wibble_decay
    grid -= grid.min()
    return grid / grid.max()


def _fog(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Add ``strength`` times a plasma fractal, then rescale towards the image's brightest level."""
    strength, wibble_decay = _FOG_PARAMS[severity - 1]
    height, width, _ = image.shape
    x = image / 255.0
    max_val = x.max()
    size = 1 << (max(height, width) - 1).bit_length()  # smallest power of two >= the longer side
    x = x + strength * _plasma_fractal(size, wibble_decay, rng)[:height, :width, None]
    return np.clip(x * max_val / (max_val + strength), 0, 1) * 255


_OWN_CORRUPTIONS: dict[str, Callable[[np.ndarray, int, np.random.Generator], np.ndarray]] = {
    "impulse_noise": _impulse_noise,
    "glass_blur": _glass_blur,
    "fog": _fog,
}


def _check_names(names: Sequence[str]) -> None:
    if not names:
        raise UserError("corruption names: the list is empty")
    for name in names:
        if name not in COMMON_CORRUPTIONS:
            raise UserError(f"unknown corruption {name!r}; valid: {', '.join(COMMON_CORRUPTIONS)}")


def _as_seed(what: str, value: int) -> int:
    # SeedSequence (and np.random.seed) take non-negative Python ints; operator.index also accepts
    # NumPy integers and one-element integer tensors (ids straight from a data loader).
    try:
        number = operator.index(value)
    except TypeError:
        number = -1
    if isinstance(value, bool) or number < 0:
        raise UserError(f"{what} must be a non-negative integer, got {value!r}")
    return number


def corruption_seed(seed: int, image_id: int) -> int:
    """The seed for corrupting one image: a pure function of the run seed and the image id.

    Args:
        seed: The run's corruption seed (non-negative).
        image_id: The image's id in the dataset (non-negative).

    Returns:
        A 32-bit seed for :func:`corrupt_image`, independent of the one that picks the type.
    """
    entropy = [_as_seed("seed", seed), _as_seed("image id", image_id), _NOISE_STREAM]
    return int(np.random.SeedSequence(entropy).generate_state(1)[0])


def corrupt_image(image: np.ndarray, name: str, severity: int, seed: int) -> np.ndarray:
    """Apply one ImageNet-C corruption to one image.

    Args:
        image: ``uint8`` array of shape ``(H, W, 3)``, both sides at least 32.
        name: One of :data:`COMMON_CORRUPTIONS`.
        severity: 1 (mildest) to 5.
        seed: Non-negative seed below 2**32; equal seeds give equal outputs.

    Returns:
        The corrupted image, ``uint8`` with the input's shape.

    Raises:
        UserError: For an unknown name, a severity outside 1..5, a bad seed or a bad image.
    """
    _check_names([name])
    if isinstance(severity, bool) or severity not in (1, 2, 3, 4, 5):
        raise UserError(f"corruption severity must be 1..5, got {severity!r}")
    if _as_seed("corruption seed", seed) >= 2**32:
        raise UserError(f"corruption seed must be below 2**32, got {seed}")
    if not (isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3
            and image.shape[2] == 3):
        got = f"{image.dtype} {image.shape}" if isinstance(image, np.ndarray) else type(image)
        raise UserError(f"corrupt_image needs a uint8 HxWx3 array, got {got}")
    if min(image.shape[:2]) < _MIN_SIDE:
        raise UserError(
            f"corruptions need images of at least {_MIN_SIDE}x{_MIN_SIDE}, got {image.shape[:2]}"
        )

    if name in _OWN_CORRUPTIONS:
        out = _OWN_CORRUPTIONS[name](image, severity, np.random.default_rng(seed))
        return np.rint(out).astype(np.uint8)
    state = np.random.get_state()
    try:
        np.random.seed(seed)
        return _library_corrupt(image, severity=severity, corruption_name=name)
    finally:
        np.random.set_state(state)


def choose_corruptions(
    image_ids: Sequence[int], seed: int, names: Sequence[str] = COMMON_CORRUPTIONS
) -> list[str]:
    """Pick one corruption type per image, as a pure function of ``(seed, image id)``.

    Args:
        image_ids: Dataset ids of the images (non-negative); order and company do not matter.
        seed: The run's corruption seed (non-negative).
        names: The types to sample from, uniformly.

    Returns:
        The chosen type for each id, in the order of ``image_ids``.

    Raises:
        UserError: For an unknown or empty list of names, or a negative seed or id.
    """
    _check_names(names)
    seed = _as_seed("seed", seed)
    chosen = []
    for image_id in image_ids:
        rng = np.random.default_rng([seed, _as_seed("image id", image_id), _CHOICE_STREAM])
        chosen.append(names[int(rng.integers(len(names)))])
    return chosen


def corrupt_batch(
    images: torch.Tensor,
    image_ids: Sequence[int],
    *,
    severity: int = 3,
    seed: int = 0,
    names: Sequence[str] = COMMON_CORRUPTIONS,
) -> tuple[torch.Tensor, list[str]]:
    """Corrupt a batch with one sampled corruption type per image.

    Args:
        images: Float tensor ``(N, 3, H, W)`` in [0, 1], on any device.
        image_ids: The dataset id of each image; fixes its type and randomness.
        severity: 1 (mildest) to 5; ImageNet-C results are usually reported at 3 or averaged.
        seed: The run's corruption seed (non-negative).
        names: The types to sample from.

    Returns:
        The corrupted images (same shape, device and dtype, in [0, 1]) and each image's type.

    Raises:
        UserError: For a bad batch shape or dtype, a mismatched number of ids, or a bad name,
            severity or seed.
    """
    if images.dim() != 4 or images.shape[1] != 3 or not images.is_floating_point():
        raise UserError(
            "corrupt_batch needs float images shaped (N, 3, H, W), "
            f"got {images.dtype} {tuple(images.shape)}"
        )
    if len(image_ids) != images.shape[0]:
        raise UserError(
            f"corrupt_batch got {len(image_ids)} image ids for a batch of {images.shape[0]}"
        )
    chosen = choose_corruptions(image_ids, seed, names)
    pixels = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
    pixels = pixels.permute(0, 2, 3, 1).cpu().numpy()
    corrupted = np.stack([
        corrupt_image(pixel, name, severity, corruption_seed(seed, image_id))
        for pixel, name, image_id in zip(pixels, chosen, image_ids)
    ])
    out = torch.from_numpy(corrupted).permute(0, 3, 1, 2).float() / 255
    return out.to(device=images.device, dtype=images.dtype).contiguous(), chosen
