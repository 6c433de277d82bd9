"""The FFCV eval decoder reproduces the paper's PIL preprocessing (bicubic resize, centre crop).

Twelve smooth random images of varied sizes (portrait, landscape, square, one smaller than the
target so it is upsampled) go through an FFCV .beton and :class:`BicubicCenterCropDecoder`; each
output is compared with ``paper_eval_transform`` (torchvision Resize(BICUBIC) + CenterCrop on the
PIL image): at most 2 grey levels apart and under 0.5 on average, for raw storage and for JPEG
storage (there against the pixels FFCV's JPEG decoder yields; within 3 on average of the original
pixels), and closer than FFCV's own CenterCropRGBImageDecoder (OpenCV INTER_AREA resize).
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from raytrain_at.data.eval_decoder import BicubicCenterCropDecoder, paper_eval_transform

# (height, width): landscape, portrait, square, odd sizes, and 28 x 20, which is smaller than the
# resized short side at both resolutions below (so it is upsampled).
SIZES = [(37, 50), (50, 37), (64, 64), (120, 90), (90, 120), (300, 220), (220, 300),
         (151, 150), (201, 99), (99, 201), (256, 180), (28, 20)]
RESOLUTIONS = (32, 48)


def _smooth_image(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Low-frequency colour pattern plus mild noise: photo-like content, so that the JPEG and
    FFCV comparisons below are about realistic images rather than white noise."""
    y = np.linspace(0.0, 1.0, height)[:, None, None]
    x = np.linspace(0.0, 1.0, width)[None, :, None]
    freq = rng.uniform(0.5, 3.0, size=(2, 3))
    phase = rng.uniform(0.0, 2 * np.pi, size=(2, 3))
    pattern = (np.sin(2 * np.pi * freq[0] * y + phase[0])
               * np.cos(2 * np.pi * freq[1] * x + phase[1]))
    noise = rng.normal(0.0, 4.0, size=(height, width, 3))
    return np.clip(128 + 100 * pattern + noise, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def images() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [_smooth_image(rng, h, w) for h, w in SIZES]


def _write(path, images: list[np.ndarray], **field_args) -> str:
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    samples = [(img, i) for i, img in enumerate(images)]
    writer = DatasetWriter(str(path), {"image": RGBImageField(**field_args), "label": IntField()},
                           num_workers=1)
    writer.from_indexed_dataset(samples)
    return str(path)


@pytest.fixture(scope="module")
def raw_beton(tmp_path_factory, images) -> str:
    # Raw pixels, so that the comparison is about resampling, not JPEG.
    return _write(tmp_path_factory.mktemp("eval") / "raw.beton", images, write_mode="raw")


def _decode(path: str, decoder) -> list[np.ndarray]:
    """All images of a .beton through ``decoder``, in file order (checked through the labels)."""
    from ffcv.fields.decoders import IntDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.transforms import ToTensor

    loader = Loader(path, batch_size=4, num_workers=1, order=OrderOption.SEQUENTIAL,
                    drop_last=False,
                    pipelines={"image": [decoder, ToTensor()], "label": [IntDecoder(), ToTensor()]})
    out, labels = [], []
    for batch, label in loader:
        out.extend(batch.numpy().copy())  # copies: FFCV reuses its batch buffers
        labels.extend(int(v) for v in label.reshape(-1))
    assert labels == list(range(len(SIZES)))
    return out


@pytest.fixture(scope="module")
def ours_raw(raw_beton) -> dict[int, list[np.ndarray]]:
    # Decoded once per resolution and shared: each Loader compiles its pipeline (a few seconds).
    return {res: _decode(raw_beton, BicubicCenterCropDecoder(res)) for res in RESOLUTIONS}


def _reference(images: list[np.ndarray], res: int) -> list[np.ndarray]:
    transform = paper_eval_transform(res)
    return [np.asarray(transform(Image.fromarray(img))) for img in images]


def _abs_diffs(ours: list[np.ndarray], reference: list[np.ndarray]) -> np.ndarray:
    return np.stack([np.abs(a.astype(np.int16) - b.astype(np.int16))
                     for a, b in zip(ours, reference)])


@pytest.mark.parametrize("res", RESOLUTIONS)
def test_raw_images_match_pil_bicubic_resize_then_centre_crop(ours_raw, images, res) -> None:
    ours = ours_raw[res]
    reference = _reference(images, res)
    for (h, w), a, b in zip(SIZES, ours, reference):
        assert a.shape == b.shape == (res, res, 3), (h, w)
        diff = np.abs(a.astype(np.int16) - b.astype(np.int16))
        assert diff.max() <= 2, f"{h}x{w} at {res}: max diff {diff.max()}"
    assert _abs_diffs(ours, reference).mean() < 0.5


@pytest.mark.parametrize("res", RESOLUTIONS)
def test_decoder_is_closer_to_the_reference_than_ffcv_center_crop(raw_beton, ours_raw, images,
                                                                  res) -> None:
    from ffcv.fields.rgb_image import CenterCropRGBImageDecoder

    reference = _reference(images, res)
    ours = _abs_diffs(ours_raw[res], reference).mean()
    ffcv = _abs_diffs(_decode(raw_beton, CenterCropRGBImageDecoder((res, res), ratio=0.875)),
                      reference).mean()
    assert ours < ffcv, (ours, ffcv)


def _ffcv_jpeg_roundtrip(image: np.ndarray, quality: int) -> np.ndarray:
    """``image`` as FFCV stores it in 'jpg' mode and decodes it (FFCV's own libjpeg-turbo call)."""
    from ffcv.fields.rgb_image import encode_jpeg
    from ffcv.libffcv import imdecode

    height, width = image.shape[:2]
    out = np.zeros((height, width, 3), dtype=np.uint8)
    imdecode(encode_jpeg(image, quality), out, height, width, height, width, 0, 0, 1, 1,
             False, False)
    return out


def test_jpeg_records_decode_close_to_the_reference(tmp_path, images) -> None:
    path = _write(tmp_path / "jpg.beton", images, write_mode="jpg", jpeg_quality=95)
    res = 48
    ours = _decode(path, BicubicCenterCropDecoder(res))
    # Against the reference on the pixels FFCV's JPEG decoder yields: only resampling differs.
    # (FFCV's decoder itself is about 1 grey level from PIL's on the same bytes, so PIL-decoded
    # JPEGs would not isolate the resampler.)
    decoded = [_ffcv_jpeg_roundtrip(img, 95) for img in images]
    same_pixels = _abs_diffs(ours, _reference(decoded, res))
    assert same_pixels.max() <= 2 and same_pixels.mean() < 0.5
    # Against the original pixels: what is left is JPEG loss, smoothed by the resize.
    original = _abs_diffs(ours, _reference(images, res))
    assert original.mean() < 3, original.mean()


def test_invalid_settings_are_refused() -> None:
    with pytest.raises(ValueError):
        BicubicCenterCropDecoder(0)
    with pytest.raises(ValueError):
        BicubicCenterCropDecoder(224, crop_pct=1.2)
