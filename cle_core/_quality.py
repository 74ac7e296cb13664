"""Quantization-quality measurements: SQNR, top-1 agreement, a fixed image set, fake quantization.

Pure measurement, shared by the backends' quantization simulators and the benchmarks. It
knows nothing about CLE. Only NumPy is needed at import time; scikit-image (for the image
set) is imported when the images are first asked for.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path

import numpy as np

__all__ = [
    "NATURAL_IMAGE_NAMES",
    "natural_images",
    "quantization_grid",
    "quantize_array",
    "deployed_weights",
    "sqnr_db",
    "top1_agreement",
]

# The sample images of ``skimage.data`` that load offline (no pooch download) and are a
# photograph or a grey or colour picture: 13 grey (2-D) and 7 colour (RGB, or RGBA for
# ``logo``). Left out: ``cat`` (the same picture as ``chelsea``), ``checkerboard`` (a
# synthetic pattern), the binary masks (``binary_blobs``, ``horse``), the float phantom
# (``shepp_logan_phantom``) and the stacks (``lfw_subset``, ``stereo_motorcycle``).
NATURAL_IMAGE_NAMES: tuple[str, ...] = (
    "astronaut",
    "chelsea",
    "coffee",
    "rocket",
    "camera",
    "coins",
    "brick",
    "cell",
    "clock",
    "colorwheel",
    "grass",
    "gravel",
    "hubble_deep_field",
    "immunohistochemistry",
    "logo",
    "microaneurysms",
    "moon",
    "page",
    "retina",
    "text",
)

# Centre squares, as fractions of the image's short side.
_CROP_FRACTIONS: tuple[float, ...] = (1.0, 0.8, 0.6)

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


def sqnr_db(reference, test) -> float:
    """Signal-to-quantization-noise ratio of ``test`` against ``reference``, in dB.

    ``10 * log10(sum(reference**2) / sum((reference - test)**2))`` over all elements,
    computed in float64. Returns ``+inf`` when the two are equal (no noise) and ``-inf``
    when the reference is all zeros but the test is not.

    >>> sqnr_db([3.0, 4.0], [3.0, 4.5])  # 25 / 0.25
    20.0
    """
    ref = np.asarray(reference, dtype=np.float64)
    tst = np.asarray(test, dtype=np.float64)
    if ref.shape != tst.shape:
        raise ValueError(f"sqnr_db: shapes differ: {ref.shape} vs {tst.shape}")
    noise = float(np.sum(np.square(ref - tst)))
    signal = float(np.sum(np.square(ref)))
    if noise == 0.0:
        return float("inf")
    if signal == 0.0:
        return float("-inf")
    return float(10.0 * np.log10(signal / noise))


def top1_agreement(reference, test) -> float:
    """Fraction of rows whose argmax agrees between ``reference`` and ``test``.

    Axis 0 is the batch; the logits are in axis 1 (any further axes are flattened into
    the class axis). A 1-D input is one row.

    >>> top1_agreement([[0, 1], [1, 0]], [[0, 2], [0, 1]])
    0.5
    """
    ref = np.asarray(reference)
    tst = np.asarray(test)
    if ref.shape != tst.shape:
        raise ValueError(f"top1_agreement: shapes differ: {ref.shape} vs {tst.shape}")
    if ref.ndim == 0:
        raise ValueError("top1_agreement: needs at least one axis of logits")
    if ref.ndim == 1:
        ref, tst = ref[None], tst[None]
    ref = ref.reshape(ref.shape[0], -1)
    tst = tst.reshape(tst.shape[0], -1)
    if ref.shape[0] == 0:
        raise ValueError("top1_agreement: empty batch")
    return float(np.mean(np.argmax(ref, axis=1) == np.argmax(tst, axis=1)))


def quantization_grid(
    lo,
    hi,
    bits: int = 8,
    symmetric: bool = False,
    *,
    qrange: tuple[int, int] | None = None,
    min_scale: float = 0.0,
):
    """The min/max quantization grid for the ranges ``[lo, hi]`` (arrays broadcast).

    Returns ``(scale, zero_point, qmin, qmax)``: float64 ``scale`` and integer-valued
    float64 ``zero_point`` arrays of the broadcast shape of ``lo`` and ``hi``, and the
    integer bounds. A value ``x`` maps to ``clip(round(x / scale) + zero_point, qmin,
    qmax)`` and back to ``(q - zero_point) * scale``.

    The range is widened to include 0; symmetric grids widen it further to ``[-m, m]``
    with ``m = max(|lo|, |hi|)``. The scale is ``(hi - lo) / (qmax - qmin)`` in float64
    and the zero point ``round(qmin - lo / scale)`` (asymmetric) or ``round((qmin + qmax)
    / 2)`` (symmetric), as onnxruntime's ``compute_scale_zp`` computes them.

    ``qrange=(qmin, qmax)`` gives the integer bounds; by default they are ``0, 2**bits -
    1`` when asymmetric (the uint8 grid for 8 bits; a signed range of the same width
    gives the same dequantized values) and ``-(2**(bits-1) - 1), 2**(bits-1) - 1`` when
    symmetric (int8 without -128), so 0 is always exactly representable.

    A scale below ``min_scale``, or zero (all-zero data), becomes 1 with zero point 0,
    which maps 0 to 0 (onnxruntime does this below the smallest normal float32).
    """
    if int(bits) != bits or bits < 2:
        raise ValueError(f"bits must be an integer >= 2, got {bits!r}")
    bits = int(bits)
    lo = np.minimum(np.asarray(lo, dtype=np.float64), 0.0)
    hi = np.maximum(np.asarray(hi, dtype=np.float64), 0.0)
    if not (np.all(np.isfinite(lo)) and np.all(np.isfinite(hi))):
        raise ValueError("quantization range is not finite (NaN or Inf in the data)")
    lo, hi = np.broadcast_arrays(lo, hi)
    if qrange is None:
        qmax = 2 ** (bits - 1) - 1 if symmetric else 2**bits - 1
        qmin = -qmax if symmetric else 0
    else:
        qmin, qmax = (int(q) for q in qrange)
        if not qmin <= 0 <= qmax or qmin == qmax:
            raise ValueError(f"qrange must hold 0 and more than one level, got {qrange!r}")
    if symmetric:
        hi = np.maximum(-lo, hi)
        lo = -hi
    scale = (hi - lo) / float(qmax - qmin)
    if symmetric:
        zero_point = np.full_like(scale, np.round((qmin + qmax) / 2.0))
    else:
        with np.errstate(divide="ignore", invalid="ignore"):
            zero_point = np.clip(np.round(qmin - lo / scale), qmin, qmax)
    empty = (scale == 0.0) | (scale < min_scale)
    scale = np.where(empty, 1.0, scale)
    zero_point = np.where(empty, 0.0, zero_point)
    return scale, zero_point, qmin, qmax


def _grid_of(x: np.ndarray, bits, symmetric, axis, qrange=None):
    """The grid of :func:`quantization_grid` for ``x`` per tensor or per slice along
    ``axis`` (kept as a broadcastable axis), scale and zero point in ``x``'s dtype."""
    if axis is None:
        lo, hi = x.min(), x.max()
    else:
        reduce = tuple(i for i in range(x.ndim) if i != axis % x.ndim)
        lo = x.min(axis=reduce, keepdims=True)
        hi = x.max(axis=reduce, keepdims=True)
    scale, zero_point, qmin, qmax = quantization_grid(
        lo, hi, bits, symmetric, qrange=qrange, min_scale=float(np.finfo(x.dtype).tiny)
    )
    return scale.astype(x.dtype), zero_point.astype(x.dtype), qmin, qmax


def _round_trip(x: np.ndarray, scale, zero_point, qmin, qmax) -> np.ndarray:
    """``(x / scale).round() + zero_point``, clipped, then ``(q - zero_point) * scale``,
    in ``x``'s dtype: onnxruntime's ``quantize_nparray`` and DequantizeLinear."""
    q = np.clip(np.round(x / scale) + zero_point, qmin, qmax)
    return (q - zero_point) * scale


def _check_float(arr: np.ndarray, what: str) -> None:
    if not np.issubdtype(arr.dtype, np.floating):
        raise TypeError(f"{what} needs a floating-point array, got {arr.dtype}")


def quantize_array(w, bits: int = 8, symmetric: bool = False, axis: int | None = None):
    """Fake-quantize ``w``: quantize to a ``bits``-bit min/max grid and dequantize.

    ``axis=None`` uses one grid for the whole tensor; an integer ``axis`` uses one grid
    per slice along that axis (per output channel for a weight). The grids are those of
    :func:`quantization_grid`: asymmetric over ``[min(w, 0), max(w, 0)]`` with
    ``2**bits - 1`` steps and an integer zero point, or symmetric over ``max|w|`` with
    ``2**(bits-1) - 1`` levels on each side. Rounding is half to even (as ONNX
    QuantizeLinear and ``torch.round``). Float64 data is computed in float64, any other
    float dtype in float32 with the scale rounded to float32 (as onnxruntime does).
    Returns a new array of the same shape and dtype; all-zero channels (zero range) stay
    zero.

    This is the simulation grid for any width. For float32 data it equals what
    onnxruntime deploys (:func:`deployed_weights`, without a bias that widens the scale),
    bit for bit, except symmetric at 4 bits: onnxruntime's int4 has no symmetric range
    and uses -8 .. 7, while one rule for every width keeps the simulated figures of
    neighbouring widths comparable.

    >>> quantize_array(np.array([-1.0, 0.1, 2.0]), bits=2)  # grid -1, 0, 1, 2
    array([-1.,  0.,  2.])
    """
    arr = np.asarray(w)
    _check_float(arr, "quantize_array")
    if arr.size == 0:
        return arr.copy()
    # float32 data is quantized in float32 with the scale rounded to float32, which is what
    # onnxruntime's QuantizeLinear/DequantizeLinear and a float32 torch model compute, so
    # the weights-only figures of both backends agree bit for bit.
    x = arr.astype(np.float64 if arr.dtype == np.float64 else np.float32)
    # Asymmetric grids over the signed range, as onnxruntime's: the same dequantized
    # values as over 0 .. 2**bits - 1, but the zero point is rounded from the same float64
    # expression, so even a value a hair from a half step agrees.
    qrange = None if symmetric else (-(2 ** (int(bits) - 1)), 2 ** (int(bits) - 1) - 1)
    grid = _grid_of(x, bits, symmetric, axis, qrange)
    return _round_trip(x, *grid).astype(arr.dtype)


# onnxruntime's integer ranges for weights (quant_utils.ONNX_INT_TYPE_RANGE and
# ONNX_INT_TYPE_SYMMETRIC_RANGE): int8 and int16 drop the most negative level when
# symmetric; int4 has no symmetric range, so a symmetric int4 grid is -8 .. 7 with the
# scale 2 m / 15.
_ORT_WEIGHT_RANGES = {
    (4, False): (-8, 7),
    (4, True): (-8, 7),
    (8, False): (-128, 127),
    (8, True): (-127, 127),
    (16, False): (-32768, 32767),
    (16, True): (-32767, 32767),
}


def weights_on_grid(
    w,
    bits: int = 8,
    symmetric: bool = True,
    axis: int | None = None,
    quantizer: str = "onnxruntime",
) -> np.ndarray:
    """``w`` on the weight grid a deployment gives it: per tensor, or per slice along
    ``axis`` (the output channels). For onnxruntime at the widths it offers (4, 8, 16
    bits), :func:`deployed_weights`, bit for bit, per-channel grids symmetric as
    ``quantize_static`` makes them whatever it is told; otherwise the min/max grid of
    :func:`quantize_array`. What bias correction and the weights-only evaluation round
    weights to."""
    if quantizer == "onnxruntime" and bits in (4, 8, 16):
        return deployed_weights(w, bits, symmetric or axis is not None, axis)
    return quantize_array(w, bits, symmetric, axis)


def deployed_weights(
    w,
    bits: int = 8,
    symmetric: bool = True,
    axis: int | None = None,
    *,
    bias=None,
    input_scale: float | None = None,
):
    """``w`` as onnxruntime's ``quantize_static`` deploys it: quantized, then dequantized
    by DequantizeLinear, bit for bit.

    The grid is per tensor (``axis=None``) or per slice along ``axis`` (onnxruntime's
    per-channel axes: 0 for Conv and Gemm with ``transB=1``, 1 for ConvTranspose, Gemm
    with ``transB=0`` and a MatMul's ``(in, out)`` weight); ``bits`` is 4, 8 or 16 (the
    signed weight types int4, int8, int16). Symmetric grids span ``[-m, m]``, ``m =
    max|w|``, over onnxruntime's symmetric range (-127 .. 127 for int8, -32767 .. 32767
    for int16, the whole -8 .. 7 for int4); asymmetric ones span ``[min(w, 0), max(w,
    0)]`` over the whole signed range with an integer zero point. The scale is computed
    in float64 and stored as float32; ``round(w / scale) + zero_point`` (half to even)
    and ``(q - zero_point) * scale`` are float32, as onnxruntime computes them. A scale
    below the smallest normal float32 (an all-zero channel) becomes 1, so those weights
    deploy as 0.

    ``bias`` and ``input_scale`` (the scale of the layer's quantized input): onnxruntime
    quantizes a bias to int32 on the grid ``input_scale * weight_scale`` and, where
    ``|b|`` would need more than the int32 range there, widens the weight's scale
    (int8 and int16 weights with zero point 0; per channel with each channel's bias).
    That is common at 16 bits; at 8 bits only for weights that are nearly zero against
    their bias. Give both for a layer with a bias to reproduce it; without them the
    scale is never widened.

    The model is computed as onnxruntime quantizes it, in float32 (the evaluation
    converts models to float32 first): the result is float32 for float32 input, and
    float64 input gets the same float32 values back in float64. Float16 input gets them
    rounded to float16.

    ``quantize_static`` quantizes per-channel weights symmetric whatever
    ``WeightSymmetric`` says: pass ``symmetric=True`` with an ``axis`` to match it.

    It is a separate function from :func:`quantize_array`, which shares its arithmetic,
    because only the symmetric 4-bit grid differs and the simulation keeps one rule for
    every width; this one takes only the widths onnxruntime deploys.

    >>> deployed_weights(np.array([-1.5, 0.75, 3.75], np.float32), bits=4)  # step 0.5
    array([-1.5,  1. ,  3.5], dtype=float32)
    """
    arr = np.asarray(w)
    _check_float(arr, "deployed_weights")
    if (bits, bool(symmetric)) not in _ORT_WEIGHT_RANGES:
        raise ValueError(f"onnxruntime quantizes weights to 4, 8 or 16 bits, not {bits!r}")
    if (bias is None) != (input_scale is None):
        raise ValueError("deployed_weights needs both bias and input_scale, or neither")
    if arr.size == 0:
        return arr.copy()
    x = arr.astype(np.float32)
    scale, zero_point, qmin, qmax = _grid_of(
        x, bits, symmetric, axis, _ORT_WEIGHT_RANGES[bits, bool(symmetric)]
    )
    if bias is not None and bits in (8, 16) and not zero_point.any():
        scale = _widened_for_int32_bias(scale, np.asarray(bias, np.float32), input_scale, axis)
    return _round_trip(x, scale, zero_point, qmin, qmax).astype(arr.dtype)


def _widened_for_int32_bias(scale: np.ndarray, bias: np.ndarray, input_scale, axis) -> np.ndarray:
    """The float32 weight ``scale`` as onnxruntime's QDQ quantizer widens it so that
    ``bias`` fits int32 on the grid ``input_scale * scale``
    (``_adjust_weight_scale_for_int32_bias``). The expressions and their dtypes are
    onnxruntime's own: per channel, the product ``1.0001 * 2 |b_i|`` is float32, per
    tensor it is float64, and that rounding decides the last bit of the scale."""
    int32 = np.iinfo(np.int32)
    qrange = np.array(int32.max, dtype=np.float64) - np.array(int32.min + 1, dtype=np.float64)
    epsilon = 1.0001
    input_fp64 = np.array(np.asarray(input_scale, np.float32).item(), dtype=np.float64)
    scale = scale.copy()
    if axis is None:
        rmin = np.minimum(bias.min(), np.array(0, dtype=np.float64))
        rmax = np.maximum(bias.max(), np.array(0, dtype=np.float64))
        smallest = [epsilon * (2.0 * np.maximum(np.abs(rmin), np.abs(rmax))) / qrange]
        flat = scale.reshape(1)
    else:
        smallest = [epsilon * (2.0 * np.abs(b)) / qrange for b in bias.reshape(-1)]
        flat = scale.reshape(-1)  # a view: one scale per channel
        if bias.size != flat.size:
            raise ValueError(f"{bias.size} bias values for {flat.size} weight channels")
    for i, floor in enumerate(smallest):
        old = np.array(flat[i].item(), dtype=np.float64)
        candidate = input_fp64 * old
        if candidate < floor and candidate > 0.0:
            flat[i] = (old * (floor / candidate)).astype(np.float32)
    return scale


def _load_skimage():
    try:
        import skimage.data
        import skimage.transform
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("natural_images() needs scikit-image: pip install scikit-image") from exc
    return skimage


def _as_rgb01(img: np.ndarray, name: str) -> np.ndarray:
    """A sample image as float64 RGB in [0, 1], shape (H, W, 3)."""
    if img.dtype == np.uint8:
        x = img.astype(np.float64) / 255.0
    elif img.dtype == np.bool_:
        x = img.astype(np.float64)
    else:
        x = np.clip(img.astype(np.float64), 0.0, 1.0)
    if x.ndim == 2:
        x = np.repeat(x[:, :, None], 3, axis=2)
    elif x.ndim == 3 and x.shape[2] == 4:
        x = x[:, :, :3]
    elif not (x.ndim == 3 and x.shape[2] == 3):
        raise ValueError(f"skimage.data.{name}() is not a grey, RGB or RGBA image: {img.shape}")
    return x


@functools.lru_cache(maxsize=4)
def _natural_images_cached(
    size: tuple[int, int],
    mean: tuple[float, ...],
    std: tuple[float, ...],
    fractions: tuple[float, ...] = _CROP_FRACTIONS,
) -> np.ndarray:
    skimage = _load_skimage()
    out = np.empty((len(NATURAL_IMAGE_NAMES) * len(fractions) * 2, 3, *size), np.float32)
    m = np.asarray(mean, dtype=np.float64)[:, None, None]
    s = np.asarray(std, dtype=np.float64)[:, None, None]
    k = 0
    for name in NATURAL_IMAGE_NAMES:
        img = _as_rgb01(getattr(skimage.data, name)(), name)
        h, w = img.shape[:2]
        short = min(h, w)
        for frac in fractions:
            c = max(1, int(round(frac * short)))
            top, left = (h - c) // 2, (w - c) // 2
            crop = img[top : top + c, left : left + c]
            resized = skimage.transform.resize(
                crop, size, order=1, mode="reflect", anti_aliasing=True
            )
            chw = (np.clip(resized, 0.0, 1.0).transpose(2, 0, 1) - m) / s
            out[k] = chw
            # Mirror after resizing so the pair are exact mirrors of each other.
            out[k + 1] = chw[:, :, ::-1]
            k += 2
    out.setflags(write=False)
    return out


def natural_images(
    size: int | tuple[int, int] = 224,
    mean: tuple[float, float, float] = _IMAGENET_MEAN,
    std: tuple[float, float, float] = _IMAGENET_STD,
) -> np.ndarray:
    """The fixed evaluation set: 120 natural images as a float32 NCHW batch.

    The 20 sample images of scikit-image listed in :data:`NATURAL_IMAGE_NAMES` (they
    ship with the package and load offline); grey images become three identical
    channels and RGBA drops alpha. From each, centre squares of 100 %, 80 % and 60 % of
    the short side are resized to ``size x size`` (``size`` may also be ``(height,
    width)``) with anti-aliasing, and each is followed by its horizontal mirror: image
    ``i``, crop ``j``, mirror ``m`` sits at index ``6 * i + 2 * j + m``. Pixels are
    scaled to [0, 1] and then normalized with ``mean`` and ``std`` per channel (ImageNet
    statistics by default).

    Returns an array of shape ``(120, 3, H, W)``. The result is computed once per
    argument set and cached; the cached array is read-only (``.copy()`` it to modify).

    Raises ImportError when scikit-image is not installed.
    """
    if isinstance(size, (int, np.integer)):
        hw = (int(size), int(size))
    else:
        hw = tuple(int(v) for v in size)
        if len(hw) != 2:
            raise ValueError(f"size must be an int or (height, width), got {size!r}")
    if min(hw) < 1:
        raise ValueError(f"size must be positive, got {size!r}")
    mean_t = tuple(float(v) for v in mean)
    std_t = tuple(float(v) for v in std)
    if len(mean_t) != 3 or len(std_t) != 3:
        raise ValueError("mean and std need three values (R, G, B)")
    if any(v == 0.0 for v in std_t):
        raise ValueError("std must not contain zeros")
    return _natural_images_cached(hw, mean_t, std_t)


def calibration_images(size: int | tuple[int, int] = 224) -> np.ndarray:
    """40 inputs for calibrating statistics that are not in :func:`natural_images`: the
    same 20 sample images, centre squares of 90 % and 70 % of the short side, not
    mirrored. Float32 NCHW, ImageNet normalization."""
    hw = (int(size), int(size)) if isinstance(size, (int, np.integer)) else tuple(size)
    both = _natural_images_cached(hw, _IMAGENET_MEAN, _IMAGENET_STD, (0.9, 0.7))
    return both[::2]


_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif", ".webp")

MAX_IMAGE_MEGAPIXELS = 50
"""Largest input image read from a folder, in megapixels (a 48-megapixel photo passes).
Each is decoded whole and cropped in float64 before resizing; a larger one, or a
decompression bomb, is refused before it is decoded."""


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _read_image(path: Path, skimage) -> np.ndarray:
    """Decode one image file; ValueError naming it when it is corrupt or too large."""
    from PIL import Image

    # The decoders raise many types (OSError, SyntaxError, struct.error, ValueError,
    # DecompressionBombError ...) for a corrupt file: each is this file's fault.
    try:
        with Image.open(path) as im:
            width, height = im.size
    except Image.DecompressionBombError as exc:
        raise ValueError(
            f"{path}: above the {MAX_IMAGE_MEGAPIXELS}-megapixel limit for input images "
            f"({_first_line(exc)})"
        ) from None
    except Exception as exc:
        raise ValueError(f"{path}: not a readable image ({_first_line(exc)})") from None
    if width * height > MAX_IMAGE_MEGAPIXELS * 10**6:
        raise ValueError(
            f"{path}: {width} x {height} pixels is above the {MAX_IMAGE_MEGAPIXELS}-megapixel "
            "limit for input images; downscale it"
        )
    try:
        img = np.asarray(skimage.io.imread(str(path)))
    except Exception as exc:
        raise ValueError(f"{path}: not a readable image ({_first_line(exc)})") from None
    if img.ndim == 3 and img.shape[2] == 2:  # grey and alpha
        img = img[:, :, 0]
    if not (img.ndim == 2 or (img.ndim == 3 and img.shape[2] in (3, 4))) or 0 in img.shape:
        raise ValueError(f"{path}: not a grey, RGB or RGBA image (array of shape {img.shape})")
    if img.dtype.kind in "iu" and img.dtype != np.uint8:  # 16-bit PNG or TIFF
        img = img.astype(np.float64) / np.iinfo(img.dtype).max
    return img


def images_from_folder(
    folder,
    size: int | tuple[int, int] = 224,
    mean: tuple[float, float, float] = _IMAGENET_MEAN,
    std: tuple[float, float, float] = _IMAGENET_STD,
) -> np.ndarray:
    """Every image file in ``folder`` (sorted by name) as a float32 NCHW batch: the
    centre square of the short side resized to ``size`` with anti-aliasing, scaled to
    [0, 1] (16-bit images by 65535) and normalized like :func:`natural_images`. Raises
    ValueError, naming the file, when the folder holds no image, or an image is corrupt,
    not grey / RGB / RGBA, or larger than :data:`MAX_IMAGE_MEGAPIXELS`."""

    _load_skimage()
    import skimage.io
    import skimage.transform

    hw = (int(size), int(size)) if isinstance(size, (int, np.integer)) else tuple(size)
    files = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"{folder}: no image files ({', '.join(_IMAGE_SUFFIXES)})")
    m = np.asarray(mean, dtype=np.float64)[:, None, None]
    s = np.asarray(std, dtype=np.float64)[:, None, None]
    out = np.empty((len(files), 3, *hw), np.float32)
    for k, path in enumerate(files):
        img = _read_image(path, skimage)
        h, w = img.shape[:2]
        c = min(h, w)
        # Cropped before the float64 conversion: a large photo costs less memory.
        crop = _as_rgb01(
            img[(h - c) // 2 : (h - c) // 2 + c, (w - c) // 2 : (w - c) // 2 + c], path.name
        )
        resized = skimage.transform.resize(crop, hw, order=1, mode="reflect", anti_aliasing=True)
        out[k] = (np.clip(resized, 0.0, 1.0).transpose(2, 0, 1) - m) / s
    return out


def compare_outputs(reference, outputs) -> dict[str, float]:
    """``{key}_sqnr`` (dB) and ``{key}_top1`` for each ``key: output`` of ``outputs``
    against ``reference``: the one comparison every evaluation (ONNX, PyTorch, demo,
    benchmarks) reports. ``outputs[key] is reference`` reads ``inf`` and 1.0 without
    computing them (the reference itself, unquantized)."""
    result: dict[str, float] = {}
    for key, out in outputs.items():
        same = out is reference
        result[f"{key}_sqnr"] = math.inf if same else sqnr_db(reference, out)
        result[f"{key}_top1"] = 1.0 if same else top1_agreement(reference, out)
    return result


def quality_table(
    rows, bits: int = 8, classifier: bool = True, label: str = "model", width: int = 10
) -> str:
    """``(name, result)`` rows as the table ``cle evaluate``, the demo and the benchmarks
    print: FP32, W``bits`` and (where every row has them) W``bits``A``bits`` SQNR in dB
    against the FP32 model, with top-1 agreement for a ``classifier``. An infinite SQNR
    reads ``exact``; the name column is at least ``width`` wide.

    >>> r = {"fp32_sqnr": float("inf"), "w8_sqnr": 6.18, "w8_top1": 0.558}
    >>> print(quality_table([("base", r)], classifier=False))
    model        FP32 dB    W8 dB
    base           exact     6.18
    """
    w, wa = f"w{bits}", f"w{bits}a{bits}"
    columns = [("FP32 dB", "fp32_sqnr", 9), (f"W{bits} dB", w + "_sqnr", 8)]
    if classifier:
        columns.append((f"W{bits} top1", w + "_top1", 9))
    if rows and all(wa + "_sqnr" in r for _, r in rows):
        columns.append((f"W{bits}A{bits} dB", wa + "_sqnr", 10))
        if classifier:
            columns.append((f"W{bits}A{bits} top1", wa + "_top1", 11))

    def cell(key: str, x: float) -> str:
        if key.endswith("_top1"):
            return f"{x:.3f}"
        if math.isinf(x):
            return "exact" if x > 0 else "-inf"
        return f"{x:.2f}"

    first = max([width, len(label)] + [len(name) for name, _ in rows])
    lines = [f"{label:<{first}}" + "".join(f" {title:>{n}}" for title, _, n in columns)]
    for name, r in rows:
        lines.append(f"{name:<{first}}" + "".join(f" {cell(k, r[k]):>{n}}" for _, k, n in columns))
    return "\n".join(lines)


_NOT_REAL = {
    "U": "strings",
    "S": "byte strings",
    "O": "Python objects",
    "V": "structured records",
    "c": "complex numbers",
    "M": "dates",
    "m": "time spans",
}


def check_real_dtype(dtype: np.dtype, what: str) -> None:
    """:class:`CLEError` unless ``dtype`` holds real numbers (bool, integer or float):
    an input of a model is a real tensor, and a complex one would lose its imaginary
    part in the cast."""
    from ._errors import CLEError

    dtype = np.dtype(dtype)
    if dtype.kind not in "biuf" and not is_float_dtype(dtype):
        kind = _NOT_REAL.get(dtype.kind, "values that are not numbers")
        raise CLEError(f"{what} holds {kind} ({dtype}); expected real numbers")


def first_non_finite(arr: np.ndarray) -> tuple[int, ...] | None:
    """The index of the first NaN or Inf of ``arr`` (a float array), or None. Reads it a
    block of rows at a time, so a memory-mapped array is never held whole."""
    if arr.ndim == 0:
        return None if np.isfinite(arr) else ()
    row = max(1, arr[:1].size)
    step = max(1, (1 << 22) // row)
    for start in range(0, arr.shape[0], step):
        bad = ~np.isfinite(arr[start : start + step])
        if bad.any():
            idx = np.unravel_index(int(np.argmax(bad)), bad.shape)
            return (start + int(idx[0]), *(int(i) for i in idx[1:]))
    return None


def check_finite(arr: np.ndarray, what: str, overflow_of=None) -> None:
    """:class:`NonFiniteError` naming ``what`` and the first index where the float array
    ``arr`` holds NaN or Inf; with ``overflow_of`` (the array before a cast to
    ``arr``'s dtype), the value that overflowed."""
    from ._errors import NonFiniteError

    if not is_float_dtype(arr.dtype):
        return
    idx = first_non_finite(arr)
    if idx is None:
        return
    where = f"index {idx}" if len(idx) != 1 else f"index {idx[0]}"
    if overflow_of is not None and np.isfinite(overflow_of[idx]):
        raise NonFiniteError(
            f"{what}: the value {float(overflow_of[idx]):g} at {where} overflows {arr.dtype}"
        )
    raise NonFiniteError(
        f"{what} holds {non_finite_name(arr[idx])} at {where}; inputs must be finite"
    )


def is_float_dtype(dtype: np.dtype) -> bool:
    """A NumPy float, or one of the float types of ``ml_dtypes`` (bfloat16, float8 ...)
    that ONNX inputs may have (NumPy files them as kind ``V``)."""
    dtype = np.dtype(dtype)
    return dtype.kind == "f" or (dtype.kind == "V" and dtype.name.startswith(("bfloat", "float")))


def non_finite_name(value) -> str:
    """``NaN``, ``Inf`` or ``-Inf``."""
    value = float(value)
    return "NaN" if value != value else ("Inf" if value > 0 else "-Inf")


_NPY_HEADERS = {
    (1, 0): np.lib.format.read_array_header_1_0,
    (2, 0): np.lib.format.read_array_header_2_0,
}


def _size(n: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return ""  # pragma: no cover


def load_array(path) -> np.ndarray:
    """A ``.npy`` array of inputs, memory-mapped read-only: real numbers (no strings,
    records, objects or complex numbers), finite, and as long as its header says (the
    header is checked against the file's size before anything is loaded, so a corrupt
    or hostile header cannot exhaust memory). :class:`CLEError` naming the file for
    anything else."""
    from ._errors import CLEError

    src = Path(path)
    if src.suffix != ".npy" or not src.is_file():
        raise CLEError(f"{src}: expected a .npy file of inputs")
    try:
        with open(src, "rb") as f:
            version = np.lib.format.read_magic(f)
            read_header = _NPY_HEADERS.get(version)
            if read_header is None:
                raise CLEError(
                    f"{src}: a .npy file of format version {version[0]}.{version[1]}; "
                    "versions 1.0 and 2.0 are read"
                )
            shape, _, dtype = read_header(f)
            offset = f.tell()
    except (ValueError, OSError) as exc:
        raise CLEError(f"{src}: not a readable .npy array ({_first_line(exc)})") from None
    if dtype.hasobject:
        raise CLEError(f"{src}: holds Python objects (a pickle), which are never loaded")
    check_real_dtype(dtype, str(src))
    needed = math.prod(shape) * dtype.itemsize
    held = src.stat().st_size - offset
    if held < needed:
        raise CLEError(
            f"{src}: its header says {dtype} {tuple(shape)} ({_size(needed)}), but the file "
            f"holds {_size(held)} of data (truncated or corrupt)"
        )
    try:
        arr = np.load(src, mmap_mode="r" if needed else None, allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise CLEError(f"{src}: not a readable .npy array ({_first_line(exc)})") from None
    check_finite(arr, str(src))
    return arr


def load_arrays(path) -> dict[str, np.ndarray]:
    """The arrays of an ``.npz`` file by name (one per model input): each real numbers
    and finite, as :func:`load_array` requires; never unpickled. :class:`CLEError`
    naming the file (and the array) for anything else."""
    import zipfile

    from ._errors import CLEError

    src = Path(path)
    if src.suffix != ".npz" or not src.is_file():
        raise CLEError(f"{src}: expected a .npz file of inputs")
    unreadable = (OSError, ValueError, zipfile.BadZipFile, EOFError)
    try:
        data = np.load(src, allow_pickle=False)
    except unreadable as exc:  # not a zip: np.load takes it for a pickle and refuses it
        raise CLEError(f"{src}: not a readable .npz file ({_first_line(exc)})") from None
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise CLEError(f"{src}: one array, not a .npz archive of arrays by input name")
    arrays = {}
    with data:
        for name in data.files:
            what = f"{src}: array {name!r}"
            _check_npz_member(data.zip, name, what)
            try:
                arr = data[name]
            except unreadable as exc:  # an object array (a pickle, never loaded); corrupt
                raise CLEError(f"{what} cannot be read ({_first_line(exc)})") from None
            except MemoryError:
                raise CLEError(f"{what} does not fit in memory") from None
            check_real_dtype(arr.dtype, what)
            check_finite(arr, what)
            arrays[name] = arr
    if not arrays:
        raise CLEError(f"{src}: holds no arrays")
    return arrays


def _check_npz_member(archive, name: str, what: str) -> None:
    """The header of the ``.npy`` member ``name`` against the size the archive declares
    for it, before it is loaded: a corrupt or hostile header (a shape of 10^12) is
    refused instead of exhausting memory, as :func:`load_array` does for a ``.npy``."""
    from ._errors import CLEError

    try:
        info = archive.getinfo(name + ".npy")
        with archive.open(info) as f:
            version = np.lib.format.read_magic(f)
            read_header = _NPY_HEADERS.get(version)
            if read_header is None:
                raise CLEError(f"{what}: .npy format version {version[0]}.{version[1]}")
            shape, _, dtype = read_header(f)
            offset = f.tell()
    except KeyError:
        return  # np.load names members without .npy too; it reads those itself
    except (ValueError, OSError, EOFError) as exc:
        raise CLEError(f"{what} cannot be read ({_first_line(exc)})") from None
    if dtype.hasobject:
        raise CLEError(f"{what} holds Python objects (a pickle), which are never loaded")
    needed = math.prod(shape) * dtype.itemsize
    held = info.file_size - offset
    if held < needed:
        raise CLEError(
            f"{what}: its header says {dtype} {tuple(shape)} ({_size(needed)}), but the "
            f"archive holds {_size(held)} of data for it (truncated or corrupt)"
        )


def load_inputs(path, size: tuple[int, int]) -> np.ndarray | dict[str, np.ndarray]:
    """Inputs from ``path``: a folder of images (centre squares resized to ``size``,
    ImageNet normalization, see :func:`images_from_folder`), a ``.npy`` array, or a
    ``.npz`` of arrays by input name (:func:`load_arrays`)."""
    from ._errors import CLEError

    src = Path(path)
    if src.is_dir():
        try:
            return images_from_folder(src, size)
        except (ValueError, ImportError, OSError) as exc:
            raise CLEError(str(exc)) from None
    if src.suffix == ".npy" and src.is_file():
        return load_array(src)
    if src.suffix == ".npz" and src.is_file():
        return load_arrays(src)
    raise CLEError(f"{src}: expected a folder of images, a .npy or a .npz file")


def describe_arrays(arrays) -> str:
    """``x (2, 3, 224, 224) float32, sr () int64``: the arrays fed to a model (one
    array, or a dict by input name), as the command line prints them."""
    if not isinstance(arrays, dict):
        arrays = {"": arrays}
    parts = []
    for name, value in arrays.items():
        arr = np.asarray(value)
        parts.append(f"{name} {tuple(arr.shape)} {arr.dtype}".strip())
    return ", ".join(parts)
