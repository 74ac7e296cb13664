"""``deployed_weights`` without onnxruntime: its grid's properties and its agreement with
``quantize_array`` (tests/onnx/test_deployed_grid.py compares it with onnxruntime itself).

Stated tolerances: every weight is within half a step of the grid (plus 1e-5 of a step
for float32 rounding); deploying deployed weights again moves none by more than 1e-4
of a step (the recomputed float32 scale may differ in its last bit), except symmetric
int4, whose clipped top shrinks the range each time."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from cle_core.quality import deployed_weights, quantize_array

_BITS = {4: (-8, 7), 8: (-127, 127), 16: (-32767, 32767)}  # symmetric ranges


@st.composite
def _weights(draw):
    """A float32 (channels, k) weight whose channels' ranges span up to six decades."""
    rows, cols = draw(st.integers(1, 6)), draw(st.integers(1, 12))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(rows, cols)) * 10.0 ** rng.uniform(-4, 2, size=(rows, 1))
    if draw(st.booleans()):  # one-signed channels: the asymmetric grid's zero point moves
        w = np.abs(w) * draw(st.sampled_from([1, -1]))
    if draw(st.booleans()):
        w[draw(st.integers(0, rows - 1))] = 0.0
    return w.astype(np.float32)


def _steps(w, bits, symmetric, axis):
    """The grid step of each element's slice, recomputed from the definition."""
    if axis is None:
        lo, hi = min(w.min(), 0.0), max(w.max(), 0.0)
    else:
        lo = np.minimum(w.min(axis=1, keepdims=True), 0.0)
        hi = np.maximum(w.max(axis=1, keepdims=True), 0.0)
    lo, hi = np.float64(lo), np.float64(hi)
    if symmetric:
        hi = np.maximum(-lo, hi)
        lo = -hi
    qmin, qmax = _BITS[bits] if symmetric else (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    return np.broadcast_to((hi - lo) / (qmax - qmin), w.shape)


@given(_weights(), st.sampled_from([4, 8, 16]), st.booleans(), st.sampled_from([None, 0]))
def test_within_half_a_step_and_stable(w, bits, symmetric, axis):
    d = deployed_weights(w, bits, symmetric, axis)
    assert d.dtype == np.float32 and d.shape == w.shape
    step = _steps(w, bits, symmetric, axis)
    live = step > 0
    # symmetric int4 clips +7.5 steps to +7: still half a step
    assert np.all(np.abs(d - w)[live] <= step[live] * (0.5 + 1e-5))
    np.testing.assert_array_equal(d[~live], 0.0)
    if bits == 4 and symmetric:
        # not stable: the largest weight is clipped to 7 of 7.5 steps, so deploying again
        # shrinks the range and the step (onnxruntime's own int4 behaviour)
        return
    again = deployed_weights(d, bits, symmetric, axis)
    assert np.all(np.abs(again - d) <= step * 1e-4)


@given(_weights(), st.sampled_from([4, 8, 16]), st.booleans(), st.sampled_from([None, 0]))
def test_equals_quantize_array_except_symmetric_int4(w, bits, symmetric, axis):
    d = deployed_weights(w, bits, symmetric, axis)
    q = quantize_array(w, bits, symmetric, axis)
    if bits == 4 and symmetric:
        # onnxruntime's -8 .. 7 at 2 m / 15 against the simulation's -7 .. 7 at m / 7
        return
    np.testing.assert_array_equal(d, q)


def test_symmetric_int4_is_onnxruntimes_whole_range():
    w = np.array([-3.75, -0.25, 0.75, 3.75], np.float32)  # m = 3.75, step 2 m / 15 = 0.5
    # -7.5 steps -> -8; 0.5 and 1.5 steps round half to even; +7.5 -> 8, clipped to 7
    np.testing.assert_array_equal(deployed_weights(w, 4, True), [-4.0, 0.0, 1.0, 3.5])
    # the simulation's symmetric grid: step m / 7
    np.testing.assert_allclose(quantize_array(w, 4, True), np.array([-7, 0, 1, 7]) * 3.75 / 7)


def test_dtypes():
    rng = np.random.default_rng(0)
    w64 = rng.normal(size=(3, 5))
    w32 = w64.astype(np.float32)
    # a deployment holds float32 weights: float64 ones are deployed from their float32
    # values and come back in float64, holding the same numbers
    d64 = deployed_weights(w64, 8, True, 0)
    assert d64.dtype == np.float64
    np.testing.assert_array_equal(d64, deployed_weights(w32, 8, True, 0))
    d16 = deployed_weights(w32.astype(np.float16), 8, False)
    assert d16.dtype == np.float16
    assert deployed_weights(np.zeros((0, 3), np.float32)).shape == (0, 3)


def test_refuses_what_onnxruntime_does_not_deploy():
    w = np.ones((2, 2), np.float32)
    with pytest.raises(ValueError, match="4, 8 or 16 bits"):
        deployed_weights(w, bits=6)
    with pytest.raises(TypeError, match="floating-point"):
        deployed_weights(np.arange(4))
    with pytest.raises(ValueError, match="both bias and input_scale"):
        deployed_weights(w, bias=np.zeros(2, np.float32))
    with pytest.raises(ValueError, match="3 bias values for 2 weight channels"):
        deployed_weights(w, 16, True, 0, bias=np.ones(3, np.float32), input_scale=1e-9)


def test_bias_widens_the_scale_as_onnxruntime_does():
    # step 1/32767; input scale 1e-6: the bias grid is ~3e-11, and int32 then reaches
    # only ~0.066, so a bias of 1 widens the scale to 1.0001 * 2 / (2**32 - 2) / 1e-6
    w = np.array([[-1.0, 0.5, 1.0]], np.float32)
    plain = deployed_weights(w, 16, True, 0)
    wide = deployed_weights(w, 16, True, 0, bias=np.ones(1, np.float32), input_scale=1e-6)
    # onnxruntime's expressions: the old scale times floor / (input_scale * old scale)
    old = np.float64(np.float32(2.0 / 65534))
    floor = np.float64(np.float32(1.0001) * np.float32(2.0)) / (2.0**32 - 2)
    step = np.float32(old * (floor / (np.float64(np.float32(1e-6)) * old)))
    np.testing.assert_array_equal(wide, np.round(w / step) * step)
    assert np.any(wide != plain)
    # a small bias, an asymmetric grid with a zero point, or int4 leave it alone
    small = deployed_weights(w, 16, True, 0, bias=np.full(1, 1e-3, np.float32), input_scale=1e-6)
    np.testing.assert_array_equal(small, plain)
    v = np.array([-1.0, 3.0], np.float32)  # zero point is not 0
    kw = {"bias": np.ones(1, np.float32), "input_scale": 1e-6}
    np.testing.assert_array_equal(
        deployed_weights(v, 16, False, **kw), deployed_weights(v, 16, False)
    )
    np.testing.assert_array_equal(deployed_weights(v, 4, True, **kw), deployed_weights(v, 4, True))
