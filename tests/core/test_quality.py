"""Hand-worked examples for the quantization-quality measurements (cle_core._quality)."""

import math
import sys

import numpy as np
import pytest

from cle_core import _quality
from cle_core._quality import (
    NATURAL_IMAGE_NAMES,
    natural_images,
    quantization_grid,
    quantize_array,
    sqnr_db,
    top1_agreement,
)

# -- sqnr_db ------------------------------------------------------------------------------


def test_sqnr_hand_worked():
    # signal 9 + 16 = 25, noise 0.5**2 = 0.25: 10 * log10(100) = 20 dB
    assert sqnr_db([3.0, 4.0], [3.0, 4.5]) == pytest.approx(20.0)
    # signal 4, noise 1: 10 * log10(4)
    assert sqnr_db(np.ones((2, 2)), [[1, 1], [1, 0]]) == pytest.approx(10 * math.log10(4))
    # noise larger than the signal gives a negative ratio
    assert sqnr_db([1.0], [11.0]) == pytest.approx(-20.0)


def test_sqnr_equal_and_degenerate():
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    assert sqnr_db(x, x.copy()) == math.inf
    assert sqnr_db(np.zeros(3), np.zeros(3)) == math.inf
    assert sqnr_db(np.zeros(3), [0.0, 1.0, 0.0]) == -math.inf
    with pytest.raises(ValueError, match="shapes"):
        sqnr_db(np.zeros(3), np.zeros(4))


def test_sqnr_accumulates_in_float64():
    # float32 would lose the tiny noise next to the large signal
    ref = np.full(1000, 1e4, dtype=np.float32)
    test = ref.copy()
    test[0] += np.float32(1.0)
    expected = 10 * math.log10(1000 * 1e8 / 1.0)
    assert sqnr_db(ref, test) == pytest.approx(expected)


# -- top1_agreement -----------------------------------------------------------------------


def test_top1_hand_worked():
    ref = [[0, 1, 0], [5, 1, 0], [0, 0, 2]]
    test = [[0, 2, 1], [0, 9, 0], [1, 1, 3]]  # rows 0 and 2 agree
    assert top1_agreement(ref, test) == pytest.approx(2 / 3)
    assert top1_agreement(ref, ref) == 1.0
    assert top1_agreement([1, 3, 2], [0, 5, 1]) == 1.0  # 1-D is one row


def test_top1_shape_mismatch():
    with pytest.raises(ValueError, match="shapes"):
        top1_agreement(np.zeros((2, 3)), np.zeros((3, 2)))


# -- quantization_grid and quantize_array -------------------------------------------------


def test_grid_asymmetric_hand_worked():
    scale, zero_point, qmin, qmax = quantization_grid(-1.0, 2.0, bits=2)
    assert (float(scale), float(zero_point), qmin, qmax) == (1.0, 1.0, 0, 3)
    # a positive-only range is extended to 0
    scale, zero_point, _, _ = quantization_grid(0.5, 1.0, bits=2)
    assert float(scale) == pytest.approx(1 / 3) and float(zero_point) == 0.0


def test_grid_symmetric_hand_worked():
    scale, zero_point, qmin, qmax = quantization_grid(-0.9, 0.3, bits=3, symmetric=True)
    assert float(scale) == pytest.approx(0.3) and float(zero_point) == 0.0
    assert (qmin, qmax) == (-3, 3)
    _, _, qmin, qmax = quantization_grid(-1.0, 1.0, bits=8, symmetric=True)
    assert (qmin, qmax) == (-127, 127)


def test_grid_zero_range_and_bad_input():
    scale, zero_point, _, _ = quantization_grid(0.0, 0.0)
    assert float(scale) == 1.0 and float(zero_point) == 0.0
    with pytest.raises(ValueError, match="bits"):
        quantization_grid(-1.0, 1.0, bits=1)
    with pytest.raises(ValueError, match="finite"):
        quantization_grid(-1.0, np.nan)


def test_quantize_asymmetric_two_bits():
    # grid -1, 0, 1, 2 (scale 1, zero point 1); ties round half to even
    np.testing.assert_array_equal(quantize_array(np.array([-1.0, 0.1, 2.0]), bits=2), [-1, 0, 2])
    np.testing.assert_array_equal(
        quantize_array(np.array([-1.0, 0.5, 1.5, 2.0]), bits=2), [-1, 0, 2, 2]
    )
    # positive data: range [0, 1], scale 1/3; 0.5 -> 1.5 steps -> 2 steps
    np.testing.assert_allclose(quantize_array(np.array([0.5, 1.0]), bits=2), [2 / 3, 1.0])


def test_quantize_asymmetric_eight_bits_integer_zero_point():
    # [-1, 1]: scale 2/255, zero point round(127.5) = 128, so the grid is [-128, 127] steps
    out = quantize_array(np.array([-1.0, 0.0, 1.0]), bits=8)
    np.testing.assert_allclose(out, [-256 / 255, 0.0, 254 / 255])
    assert out[1] == 0.0  # zero is exact


def test_quantize_symmetric():
    # max|w| = 0.9, 3 levels per side: scale 0.3
    out = quantize_array(np.array([-0.9, 0.3, 0.6, 0.2]), bits=3, symmetric=True)
    np.testing.assert_allclose(out, [-0.9, 0.3, 0.6, 0.3])
    # 8 bits: 127 levels per side, both ends exact
    np.testing.assert_allclose(
        quantize_array(np.array([-1.0, 1.0]), bits=8, symmetric=True), [-1.0, 1.0]
    )


def test_quantize_per_channel_vs_per_tensor():
    w = np.array([[0.0, 1.0, 2.0, 3.0], [0.0, 10.0, 20.0, 30.0]])
    # per channel: scales 1 and 10, both rows exact
    np.testing.assert_array_equal(quantize_array(w, bits=2, axis=0), w)
    # per tensor: scale 10, the small row collapses to 0
    np.testing.assert_array_equal(quantize_array(w, bits=2), [[0, 0, 0, 0], [0, 10, 20, 30]])
    # negative axis is the same axis
    np.testing.assert_array_equal(quantize_array(w.T, bits=2, axis=-1), w.T)


def test_quantize_zero_channel_stays_and_dtype_kept():
    w = np.array([[0.0, 1.0], [0.0, -2.0]], dtype=np.float32)
    out = quantize_array(w, bits=2, axis=1)  # column 0 is all zero; column 1: [-2, 1]
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, w)
    assert quantize_array(np.zeros(3, np.float16)).dtype == np.float16
    assert quantize_array(np.zeros((0, 2))).shape == (0, 2)
    with pytest.raises(TypeError):
        quantize_array(np.arange(3))


def test_quantize_error_bound_and_idempotent():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(16, 9)).astype(np.float32)
    q = quantize_array(w, bits=8, axis=0)
    step = (np.maximum(w.max(1), 0) - np.minimum(w.min(1), 0)) / 255
    assert np.all(np.abs(q - w) <= step[:, None] / 2 * (1 + 1e-5))
    np.testing.assert_allclose(quantize_array(q, bits=8, axis=0), q, atol=1e-6)


# -- natural_images -----------------------------------------------------------------------

_SIZE = 32


@pytest.fixture(scope="module")
def images():
    pytest.importorskip("skimage")
    return natural_images(_SIZE)


def test_image_names_are_twenty_distinct():
    assert len(NATURAL_IMAGE_NAMES) == 20
    assert len(set(NATURAL_IMAGE_NAMES)) == 20


def test_natural_images_shape_dtype_readonly(images):
    assert images.shape == (120, 3, _SIZE, _SIZE)
    assert images.dtype == np.float32
    assert np.all(np.isfinite(images))
    assert not images.flags.writeable
    assert natural_images(_SIZE) is images  # cached


def test_natural_images_mirrors(images):
    np.testing.assert_array_equal(images[1::2], images[0::2][..., ::-1])


def test_natural_images_range_and_grey(images):
    mean = np.array([0.485, 0.456, 0.406], np.float32)[:, None, None]
    std = np.array([0.229, 0.224, 0.225], np.float32)[:, None, None]
    pixels = images * std + mean
    assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5
    grey = NATURAL_IMAGE_NAMES.index("camera")
    for k in range(6 * grey, 6 * grey + 6):
        np.testing.assert_allclose(pixels[k, 0], pixels[k, 1], atol=1e-5)
        np.testing.assert_allclose(pixels[k, 0], pixels[k, 2], atol=1e-5)
    # different crops of one image differ
    assert not np.allclose(images[0], images[2])


def test_natural_images_deterministic(images):
    _quality._natural_images_cached.cache_clear()
    again = natural_images(_SIZE)
    assert again is not images
    np.testing.assert_array_equal(again, images)


def test_natural_images_bad_arguments():
    with pytest.raises(ValueError):
        natural_images(0)
    with pytest.raises(ValueError):
        natural_images(8, std=(1.0, 0.0, 1.0))


def test_natural_images_without_skimage(monkeypatch):
    for mod in ("skimage", "skimage.data", "skimage.transform"):
        monkeypatch.setitem(sys.modules, mod, None)
    _quality._natural_images_cached.cache_clear()
    with pytest.raises(ImportError, match="pip install scikit-image"):
        natural_images(7)


def test_quality_table_formats_rows():
    from cle_core._quality import quality_table

    r = {
        "fp32_sqnr": float("inf"),
        "w8_sqnr": 6.18,
        "w8_top1": 0.558,
        "w8a8_sqnr": 5.74,
        "w8a8_top1": 0.533,
    }
    text = quality_table([("base", r), ("cle", {**r, "fp32_sqnr": 113.64})], width=6)
    assert text.splitlines() == [
        "model    FP32 dB    W8 dB   W8 top1    W8A8 dB   W8A8 top1",
        "base       exact     6.18     0.558       5.74       0.533",
        "cle       113.64     6.18     0.558       5.74       0.533",
    ]
    # Without activation figures in every row, or for a non-classifier, columns go.
    no_acts = {k: v for k, v in r.items() if not k.startswith("w8a8")}
    text = quality_table([("a", r), ("b", no_acts)], classifier=False, label="net")
    assert text.splitlines()[0].split() == ["net", "FP32", "dB", "W8", "dB"]
    assert quality_table([("x", {"fp32_sqnr": -math.inf, "w4_sqnr": 1.0, "w4_top1": 1.0})], 4)


def test_compare_outputs_names_each_variant():
    from cle_core._quality import compare_outputs

    ref = np.array([[1.0, 2.0], [3.0, 1.0]])
    got = compare_outputs(ref, {"fp32": ref, "w8": ref + 0.1, "w8a8": ref[:, ::-1]})
    assert got["fp32_sqnr"] == math.inf and got["fp32_top1"] == 1.0
    assert got["w8_sqnr"] == pytest.approx(sqnr_db(ref, ref + 0.1)) and got["w8_top1"] == 1.0
    assert got["w8a8_top1"] == 0.0


def test_the_public_quality_module_is_the_one_the_project_measures_with():
    import cle_core._quality as private
    import cle_core.quality as public

    assert public.sqnr_db is private.sqnr_db and public.quantize_array is private.quantize_array
    assert set(public.__all__) >= {"sqnr_db", "top1_agreement", "quantization_grid"}
