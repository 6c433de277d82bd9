"""The paper's evaluation preprocessing as an FFCV decoder: PIL bicubic resize, then centre crop.

FFCV's own centre-crop decoder resizes with OpenCV ``INTER_AREA``, not the PIL bicubic that the
paper, timm and RobustBench evaluate with, and no library offers Pillow's antialiased bicubic inside
a numba-compiled FFCV stage; so :class:`BicubicCenterCropDecoder` reimplements Pillow's resampler,
bit for bit (measured identical to torchvision's Resize + CenterCrop). docs/data.md has the details.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace

import PIL
import numpy as np
from ffcv.fields.rgb_image import IMAGE_MODES, SimpleRGBImageDecoder
from ffcv.libffcv import imdecode
from ffcv.pipeline.allocation_query import AllocationQuery
from ffcv.pipeline.compiler import Compiler
from ffcv.pipeline.state import State

# Pillow keeps 8 bits for the result and 2 for the overshoot of the negative-lobed kernel in a
# 32-bit accumulator; the remaining 22 bits are the fixed-point precision of the weights.
_PRECISION_BITS = 22
_ONE = 1 << _PRECISION_BITS
_HALF = 1 << (_PRECISION_BITS - 1)
_BICUBIC_SUPPORT = 2.0


def _pillow_major_version() -> int:
    """Major version of the installed Pillow (0 if it cannot be told)."""
    try:
        return int(PIL.__version__.split(".")[0])
    except (ImportError, ValueError, AttributeError):
        return 0


# Whether to reproduce Pillow 13's choice of the vertical pass first (docs/data.md).
_VERTICAL_FIRST_RULE = _pillow_major_version() >= 13


def _bicubic_weight(x: float) -> float:
    """Keys' cubic convolution kernel with a = -0.5 (PIL's BICUBIC)."""
    a = -0.5
    x = abs(x)
    if x < 1.0:
        return ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    if x < 2.0:
        return (((x - 5.0) * x + 8.0) * x - 4.0) * a
    return 0.0


def _round_half_even_half(d: int) -> int:
    """``int(round(d / 2.0))`` with Python's round-half-to-even (torchvision's crop offset)."""
    half = d // 2
    if d % 2 == 1 and half % 2 == 1:
        # d / 2 is an odd integer plus 0.5: Python rounds it up to the even neighbour.
        half += 1
    return half


def _max_taps(in_size: int, out_size: int) -> int:
    """Upper bound on the taps of one output pixel (Pillow's ``ksize``)."""
    scale = in_size / out_size
    filterscale = scale if scale > 1.0 else 1.0
    return int(math.ceil(_BICUBIC_SUPPORT * filterscale)) * 2 + 1


def _clip8(acc: int) -> int:
    """Fixed-point accumulator (already offset by one half) to a clipped 0..255 value."""
    v = acc >> _PRECISION_BITS  # arithmetic shift: floor, so negatives stay negative
    if v < 0:
        return 0
    if v > 255:
        return 255
    return v


def _build_resampler() -> Callable:
    """The resampler ``f(src, dst, scratch, scale_size)``, compiled the way FFCV compiles.

    ``src`` is a C-contiguous (H, W, 3) uint8 image; ``f`` resizes its shorter side to
    ``scale_size`` with Pillow's bicubic filter and writes the centred ``res x res`` window into
    ``dst`` ((res, res, 3) uint8). ``scratch`` is a flat uint8 buffer of at least
    ``max(H, W) * res * 3`` bytes for the result of the first pass. Compiled anew at each
    call, like FFCV builds its own decoders: a numba dispatcher shared between two compiled
    pipelines breaks once the first one is garbage-collected (numba then fails with a KeyError in
    the dispatcher's overloads and FFCV's loader thread dies silently). With FFCV's ``Compiler``
    disabled (for debugging) everything runs as plain Python.

    Returns:
        The (possibly numba-compiled) resampling function.
    """
    # numba freezes closure variables as constants, so the helpers are compiled first and bound
    # here; the functions below then call them directly from machine code.
    weight = Compiler.compile(_bicubic_weight)
    max_taps = Compiler.compile(_max_taps)
    clip8 = Compiler.compile(_clip8)
    half_round = Compiler.compile(_round_half_even_half)
    one = _ONE
    half = _HALF
    support_base = _BICUBIC_SUPPORT
    vertical_first_rule = _VERTICAL_FIRST_RULE

    def geometry(height, width, scale_size, resolution):
        # (new_h, new_w, top, left) as torchvision computes them. Integer arithmetic on purpose:
        # (s * long) // short equals torchvision's int(s * long / short) for every size FFCV's
        # uint16 metadata can hold, and stays exact under fastmath (which may turn a division
        # into a multiplication by a reciprocal).
        if width <= height:
            new_w = scale_size
            new_h = (scale_size * height) // width
        else:
            new_h = scale_size
            new_w = (scale_size * width) // height
        return new_h, new_w, half_round(new_h - resolution), half_round(new_w - resolution)

    def fixed_point_coeffs(in_size, out_size, first, count):
        # Taps of output pixels first .. first + count - 1 of an in_size -> out_size resize:
        # starts[i] is the first source index, ntaps[i] the number of source pixels,
        # coeffs[i, :ntaps[i]] the weights in 22-bit fixed point (summing to about 1 << 22).
        scale = in_size / out_size
        # Downsampling widens the kernel so that every source pixel contributes (antialiasing);
        # upsampling keeps the plain kernel.
        filterscale = scale if scale > 1.0 else 1.0
        support = support_base * filterscale
        inv_filterscale = 1.0 / filterscale
        ksize = max_taps(in_size, out_size)
        starts = np.empty(count, dtype=np.int64)
        ntaps = np.empty(count, dtype=np.int64)
        coeffs = np.zeros((count, ksize), dtype=np.int64)
        weights = np.empty(ksize, dtype=np.float64)
        for i in range(count):
            center = (first + i + 0.5) * scale
            # int() truncates toward zero like C's cast; the clip makes negatives irrelevant.
            lo = max(int(center - support + 0.5), 0)
            hi = min(int(center + support + 0.5), in_size)
            n = hi - lo
            total = 0.0
            for t in range(n):
                w = weight((t + lo - center + 0.5) * inv_filterscale)
                weights[t] = w
                total += w
            starts[i] = lo
            ntaps[i] = n
            for t in range(n):
                w = weights[t] / total if total != 0.0 else weights[t]
                # Round half away from zero, as Pillow converts its weights.
                if w < 0.0:
                    coeffs[i, t] = int(-0.5 + w * one)
                else:
                    coeffs[i, t] = int(0.5 + w * one)
        return starts, ntaps, coeffs

    def horizontal_pass(src, row0, col0, starts, ntaps, coeffs, out):
        # out[r, i] = filtered src[row0 + r] at output column i, whose taps start at source
        # column starts[i] - col0 (col0: first column src holds of the full image).
        for r in range(out.shape[0]):
            src_row = src[row0 + r]
            out_row = out[r]
            for i in range(out.shape[1]):
                s = starts[i] - col0
                acc0 = half
                acc1 = half
                acc2 = half
                for t in range(ntaps[i]):
                    w = coeffs[i, t]
                    acc0 += np.int64(src_row[s + t, 0]) * w
                    acc1 += np.int64(src_row[s + t, 1]) * w
                    acc2 += np.int64(src_row[s + t, 2]) * w
                out_row[i, 0] = clip8(acc0)
                out_row[i, 1] = clip8(acc1)
                out_row[i, 2] = clip8(acc2)

    def vertical_pass(src, row0, col0, starts, ntaps, coeffs, out):
        # out[j] = filtered columns col0 .. col0 + out.shape[1] - 1 of src at output row j, whose
        # taps start at source row starts[j] - row0. One output row at a time, so the inner loops
        # run over contiguous memory and vectorise.
        width3 = out.shape[1] * 3
        first = col0 * 3
        src_flat = src.reshape(src.shape[0], src.shape[1] * 3)
        acc = np.empty(width3, dtype=np.int64)
        for j in range(out.shape[0]):
            acc[:] = half
            base = starts[j] - row0
            for t in range(ntaps[j]):
                w = coeffs[j, t]
                line = src_flat[base + t]
                for q in range(width3):
                    acc[q] += np.int64(line[first + q]) * w
            out_row = out[j].reshape(width3)
            for q in range(width3):
                out_row[q] = clip8(acc[q])

    geometry_c = Compiler.compile(geometry)
    coeffs_c = Compiler.compile(fixed_point_coeffs)
    horizontal_c = Compiler.compile(horizontal_pass)
    vertical_c = Compiler.compile(vertical_pass)

    def bicubic_center_crop(src, dst, scratch, scale_size):
        height = src.shape[0]
        width = src.shape[1]
        res = dst.shape[0]
        new_h, new_w, top, left = geometry_c(height, width, scale_size, res)
        # Taps for the crop's columns of the new_w-wide resize and its rows of the new_h one.
        x_start, x_n, x_coef = coeffs_c(width, new_w, left, res)
        y_start, y_n, y_coef = coeffs_c(height, new_h, top, res)
        vertical_first = (vertical_first_rule and new_h < height
                          and height - new_h > 2 * (width - new_w))
        if vertical_first:
            # Only the source columns the horizontal taps read.
            col0 = x_start[0]
            ncols = x_start[res - 1] + x_n[res - 1] - col0
            mid = scratch[:res * ncols * 3].reshape(res, ncols, 3)
            vertical_c(src, 0, col0, y_start, y_n, y_coef, mid)
            horizontal_c(mid, 0, col0, x_start, x_n, x_coef, dst)
        else:
            # Only the source rows the vertical taps read (Pillow restricts its pass the same way).
            row0 = y_start[0]
            nrows = y_start[res - 1] + y_n[res - 1] - row0
            mid = scratch[:nrows * res * 3].reshape(nrows, res, 3)
            horizontal_c(src, row0, 0, x_start, x_n, x_coef, mid)
            vertical_c(mid, row0, 0, y_start, y_n, y_coef, dst)

    return Compiler.compile(bicubic_center_crop)


class BicubicCenterCropDecoder(SimpleRGBImageDecoder):
    """FFCV decoder for ``RGBImageField``: the paper's eval preprocessing, matching Pillow exactly.

    Decodes each stored image (JPEG through FFCV's libjpeg-turbo ``imdecode``, or raw pixels),
    resizes its shorter side to ``floor(resolution / crop_pct)`` with Pillow's antialiased bicubic
    filter and keeps the centred ``resolution x resolution`` window, as :func:`paper_eval_transform`
    does to a PIL image. Works for variable-size datasets and any mix of raw and JPEG records
    ('raw', 'jpg', 'smart' and 'proportion' write modes).

    Outputs (batch, resolution, resolution, 3) uint8, like FFCV's other RGB decoders.
    """

    def __init__(self, resolution: int, crop_pct: float = 0.875) -> None:
        """Set the output size and crop fraction.

        Args:
            resolution: side of the square output crop, in pixels.
            crop_pct: fraction of the resized shorter side kept by the crop (timm's ``crop_pct``);
                the shorter side is resized to ``floor(resolution / crop_pct)``.

        Raises:
            ValueError: a resolution below 1, or a crop_pct outside (0, 1] (the crop would then
                need padding, which the paper's pipeline never does).
        """
        if int(resolution) != resolution or resolution < 1:
            raise ValueError(f"resolution must be a positive integer, got {resolution!r}")
        if not 0.0 < crop_pct <= 1.0:
            raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct!r}")
        super().__init__()
        self.resolution = int(resolution)
        self.output_size = (self.resolution, self.resolution)
        self.crop_pct = float(crop_pct)
        self.scale_size = math.floor(self.resolution / self.crop_pct)

    def declare_state_and_memory(self, previous_state: State
                                 ) -> tuple[State, tuple[AllocationQuery, ...]]:
        """Output batch, JPEG decode buffer and first-pass buffer, sized for the largest image."""
        # uint64 so that products of uint16 metadata do not overflow.
        max_width = np.uint64(self.metadata["width"].max())
        max_height = np.uint64(self.metadata["height"].max())
        res = np.uint64(self.resolution)
        output_shape = (self.resolution, self.resolution, 3)
        u8 = np.dtype("<u1")
        # FFCV annotates shapes as tuples of int; numpy integers are what it sizes buffers with.
        return (
            replace(previous_state, jit_mode=True, shape=output_shape, dtype=u8),
            (AllocationQuery(output_shape, u8),
             AllocationQuery((max_height * max_width * np.uint64(3),), u8),  # pyright: ignore[reportArgumentType]
             # The first pass keeps at most every source row (or column), res pixels each.
             AllocationQuery((max(max_height, max_width) * res * np.uint64(3),),  # pyright: ignore[reportArgumentType]
                             u8)),
        )

    def generate_code(self) -> Callable:
        """The batch decoding function FFCV compiles (parallel over the images of a batch)."""
        jpg = IMAGE_MODES["jpg"]
        scale_size = self.scale_size
        mem_read = self.memory_read
        my_range = Compiler.get_iterator()
        imdecode_c = Compiler.compile(imdecode)
        resample_c = _build_resampler()

        def decode(batch_indices, my_storage, metadata, storage_state):
            destination, decode_storage, scratch_storage = my_storage
            for dst_ix in my_range(len(batch_indices)):
                source_ix = batch_indices[dst_ix]
                field = metadata[source_ix]
                # FFCV's memory_read is annotated as a bound method; compiled, it takes the state.
                image_data = mem_read(field["data_ptr"], storage_state)  # pyright: ignore[reportCallIssue]
                height = np.uint32(field["height"])
                width = np.uint32(field["width"])
                if field["mode"] == jpg:
                    buffer = decode_storage[dst_ix]
                    imdecode_c(image_data, buffer, height, width, height, width, 0, 0, 1, 1,
                               False, False)
                    image = buffer[:3 * height * width].reshape(height, width, 3)
                else:
                    image = image_data.reshape(height, width, 3)
                resample_c(image, destination[dst_ix], scratch_storage[dst_ix], scale_size)
            return destination[:len(batch_indices)]

        decode.is_parallel = True
        return decode


def paper_eval_transform(resolution: int, crop_pct: float = 0.875) -> Callable:
    """The reference preprocessing on PIL images: bicubic resize of the short side, centre crop.

    Args:
        resolution: side of the square output crop, in pixels.
        crop_pct: fraction of the resized shorter side kept by the crop.

    Returns:
        ``Compose([Resize(floor(resolution / crop_pct), BICUBIC), CenterCrop(resolution)])``
        from torchvision, mapping a PIL image to a PIL image (no ``ToTensor``).
    """
    from torchvision import transforms
    from torchvision.transforms import InterpolationMode

    scale_size = math.floor(resolution / crop_pct)
    return transforms.Compose([
        transforms.Resize(scale_size, interpolation=InterpolationMode.BICUBIC),
        transforms.CenterCrop(resolution),
    ])
