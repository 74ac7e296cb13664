"""Every math function against small hand-worked examples."""

from __future__ import annotations

import math

import numpy as np
import pytest

from cle_core import Layout, NonFiniteError
from cle_core._math import (
    RangeSummary,
    absorb_high_bias,
    bn_affine,
    classic_hba_error,
    fold_bn,
    fold_bn_input,
    grouped_view,
    high_bias_amount,
    in_channel_ranges,
    int8_sqnr_estimate,
    kernel_reduce,
    kernel_sums,
    out_channel_ranges,
    pair_scales,
    region_scales,
    scale_bounds,
    scale_layer,
    shift_bounds,
    triple_scales,
    weight_stats,
)


def test_layout_channel_counts():
    assert Layout(0, 1, 2).out_channels((6, 3, 3, 3)) == 6
    assert Layout(0, 1, 2).in_channels((6, 3, 3, 3)) == 6
    # ConvTranspose (C_in, C_out / g, k): 4 inputs, 2 * 3 outputs
    assert Layout(1, 0, 2).out_channels((4, 3, 2)) == 6
    assert Layout(1, 0, 2).in_channels((4, 3, 2)) == 4
    with pytest.raises(ValueError):
        Layout(0, 2)


def test_grouped_view_indexes_channels():
    w = np.arange(6 * 2 * 1).reshape(6, 2, 1).astype(float)  # conv, groups 3
    v = grouped_view(w, Layout(0, 1, 3))
    assert v.shape == (3, 2, 2, 1)
    assert v[1, 0, 1, 0] == w[2, 1, 0]  # group 1, its first output (2), its second input
    wt = np.arange(4 * 3).reshape(4, 3).astype(float)  # ConvTranspose-like (in 4, out/g 3), g 2
    vt = grouped_view(wt, Layout(1, 0, 2))
    assert vt.shape == (2, 3, 2, 1)
    assert vt[1, 2, 0, 0] == wt[2, 2]  # group 1: inputs 2..3, output 2 of the group
    assert np.shares_memory(vt, wt)


def test_bn_affine_hand_worked():
    k, t = bn_affine([1.0], [3.0], 1.0, [4.0], [0.5])
    # k = 4 / sqrt(4) = 2, t = 0.5 - 1 * 2
    assert k.tolist() == [2.0] and t.tolist() == [-1.5]
    k, t = bn_affine([2.0], [0.0], 0.25)  # no affine: gamma 1, beta 0
    assert k.tolist() == [2.0] and t.tolist() == [-4.0]
    with pytest.raises(NonFiniteError):
        bn_affine([0.0], [-1.0], 0.0)
    with pytest.raises(NonFiniteError):
        bn_affine([np.nan], [1.0], 0.0)


def test_fold_bn_output_hand_worked():
    w = np.array([[1.0, 2.0], [3.0, 4.0]])
    b = np.array([1.0, -1.0])
    # BN: mean [1, 0], var [3, 0], eps 1, gamma [2, 1], beta [0, 5] -> k [1, 1], t [-1, 5]
    nw, nb = fold_bn(w, b, [1.0, 0.0], [3.0, 0.0], 1.0, [2.0, 1.0], [0.0, 5.0])
    np.testing.assert_allclose(nw, w)
    np.testing.assert_allclose(nb, [0.0, 4.0])
    nw, nb = fold_bn(w, None, [0.0, 0.0], [0.0, 0.0], 0.25, [1.0, -1.0], [0.0, 0.0])
    np.testing.assert_allclose(nw, [[2.0, 4.0], [-6.0, -8.0]])  # k = [2, -2]
    np.testing.assert_allclose(nb, [0.0, 0.0])


def test_fold_bn_output_conv_transpose_scales_axis_one():
    w = np.ones((2, 3, 1))  # (C_in, C_out, k)
    nw, nb = fold_bn(
        w, None, np.zeros(3), np.ones(3) - 1e-3, 1e-3, [1.0, 2.0, 3.0], None, layout=Layout(1, 0)
    )
    np.testing.assert_allclose(nw[:, :, 0], [[1, 2, 3], [1, 2, 3]])
    assert nw.shape == w.shape


def test_fold_bn_input_hand_worked():
    w = np.array([[1.0, 2.0], [3.0, 4.0]])
    nw, nb = fold_bn_input(w, np.array([0.5, 0.0]), Layout(), [2.0, 0.5], [1.0, -1.0])
    np.testing.assert_allclose(nw, [[2.0, 1.0], [6.0, 2.0]])
    # b += W @ t = [1 - 2, 3 - 4]
    np.testing.assert_allclose(nb, [-0.5, -1.0])


def test_channel_ranges():
    w = np.array([[1.0, -5.0], [0.5, 2.0], [-3.0, 0.0]])
    assert out_channel_ranges(w, Layout()).tolist() == [5.0, 2.0, 3.0]
    assert in_channel_ranges(w, Layout()).tolist() == [3.0, 5.0]
    ranges, sqnr = weight_stats(w, Layout())
    assert ranges.tolist() == [5.0, 2.0, 3.0]
    assert sqnr == pytest.approx(int8_sqnr_estimate(w))


def test_pair_scales_balance_and_zero_range():
    s = pair_scales([4.0, 1.0, 0.0, 2.0], [1.0, 4.0, 3.0, 0.0])
    np.testing.assert_allclose(s, [2.0, 0.5, 1.0, 1.0])
    with pytest.raises(NonFiniteError):
        pair_scales([np.nan], [1.0])
    with pytest.raises(NonFiniteError):
        pair_scales([1.0], [np.inf])


def test_triple_scales_hand_worked():
    # r0 8, r1 1, r2 1: g = 2, s12 = 4, s23 = 2 -> ranges 8/4, 1*4/2, 1*2 all equal 2
    s12, s23 = triple_scales([8.0], [1.0], [1.0])
    np.testing.assert_allclose([s12[0], s23[0]], [4.0, 2.0])
    # a dead first layer: the second pair is balanced alone
    s12, s23 = triple_scales([0.0], [4.0], [1.0])
    np.testing.assert_allclose([s12[0], s23[0]], [1.0, 2.0])
    s12, s23 = triple_scales([2.0], [0.0], [5.0])
    np.testing.assert_allclose([s12[0], s23[0]], [1.0, 1.0])


def test_region_scales_share_one_scale():
    s = region_scales([[4.0, 1.0], [16.0, 0.0]], [[1.0, 1.0], [0.0, 4.0]])
    np.testing.assert_allclose(s, [4.0, 0.5])


def test_scale_layer_conv_and_grouped():
    w = np.ones((4, 1, 1, 1))  # depthwise: groups 4
    nw, nb = scale_layer(w, np.ones(4), Layout(0, 1, 4), s_in=[1, 2, 3, 4], s_out=[2, 2, 1, 1])
    np.testing.assert_allclose(nw.ravel(), [0.5, 1.0, 3.0, 4.0])
    np.testing.assert_allclose(nb, [0.5, 0.5, 1.0, 1.0])
    w = np.ones((2, 3))
    nw, nb = scale_layer(w, None, Layout(), s_in=[1, 2, 4])
    np.testing.assert_allclose(nw, [[1, 2, 4], [1, 2, 4]])
    assert nb is None
    assert w.tolist() == [[1, 1, 1], [1, 1, 1]]  # inputs untouched


def test_scale_layer_keeps_dtype():
    w = np.ones((3, 2), dtype=np.float32)
    nw, nb = scale_layer(w, np.ones(3, np.float32), Layout(), s_out=[1.0, 2.0, 4.0])
    assert nw.dtype == np.float32 and nb.dtype == np.float32


def test_scale_bounds_makes_bounds_per_channel():
    lo, hi = scale_bounds(0.0, 6.0, [1.0, 2.0, 3.0])
    np.testing.assert_allclose(lo, 0.0)
    np.testing.assert_allclose(hi, [6.0, 3.0, 2.0])
    x = np.array([-1.0, 2.0, 7.0, 20.0])
    s = 4.0
    lo, hi = scale_bounds(0.0, 6.0, s)
    np.testing.assert_allclose(np.clip(x, 0, 6) / s, np.clip(x / s, lo, hi))


def test_high_bias_amount_and_absorb():
    c = high_bias_amount([10.0, 1.0, 10.0], [1.0, 1.0, -2.0], hi=[np.inf, np.inf, 3.0])
    np.testing.assert_allclose(c, [7.0, 0.0, 3.0])  # third: 10 - 6 = 4, capped at hi 3
    w2 = np.array([[1.0, 2.0, 0.0], [0.0, 1.0, 1.0]])
    b1, (b2,) = absorb_high_bias(np.array([10.0, 1.0, 10.0]), c, [(w2, None, Layout(), 1)])
    np.testing.assert_allclose(b1, [3.0, 1.0, 7.0])
    np.testing.assert_allclose(b2, [7.0, 3.0])


def test_absorb_high_bias_through_flatten_repeat():
    w2 = np.arange(8.0).reshape(2, 4)  # 2 channels x 2 spatial positions
    _, (b2,) = absorb_high_bias(np.zeros(2), [1.0, 10.0], [(w2, np.ones(2), Layout(), 2)])
    np.testing.assert_allclose(b2, [1 + (0 + 1) + 10 * (2 + 3), 1 + (4 + 5) + 10 * (6 + 7)])


def test_shift_bounds_exact_identity():
    x = np.linspace(-5, 12, 101)
    c, u = 2.5, 6.0
    lo, hi = shift_bounds(0.0, u, c, exact=True)
    np.testing.assert_allclose(np.clip(x - c, lo, hi) + c, np.clip(x, 0, u))
    lo, hi = shift_bounds(0.0, u, c, exact=False)
    assert float(lo) == 0.0 and float(hi) == u - c


def test_classic_hba_error_matches_monte_carlo():
    rng = np.random.default_rng(0)
    beta, gamma, c = 2.0, 1.0, 0.5
    x = rng.normal(beta, gamma, 400_000)
    mc = np.mean(np.maximum(x - c, 0) + c - np.maximum(x, 0))
    err, mean_act = classic_hba_error([beta], [gamma], [c])
    assert err[0] == pytest.approx(mc, rel=0.02)
    assert mean_act[0] == pytest.approx(np.mean(np.maximum(x, 0)), rel=0.01)
    err, _ = classic_hba_error([2.0], [0.0], [0.5])  # deterministic: never below c
    assert err[0] == 0.0


def test_int8_sqnr_estimate():
    w = np.array([-1.0, 1.0])
    step = 2.0 / 255
    assert int8_sqnr_estimate(w) == pytest.approx(10 * math.log10(12 / step**2))
    assert int8_sqnr_estimate(np.zeros(3)) == math.inf


@pytest.mark.parametrize(
    "layout,shape",
    [(Layout(0, 1, 1), (5, 4, 3)), (Layout(1, 0, 2), (4, 3, 1)), (Layout(0, 1, 4), (8, 1, 3, 3))],
)
def test_range_summary_matches_scaled_weights(layout, shape):
    rng = np.random.default_rng(1)
    w = rng.normal(size=shape).astype(np.float32)
    s_in = rng.uniform(0.1, 10, layout.in_channels(shape))
    s_out = rng.uniform(0.1, 10, layout.out_channels(shape))
    summary = RangeSummary(w, layout)
    scaled, _ = scale_layer(w.astype(np.float64), None, layout, s_in, s_out)
    np.testing.assert_allclose(
        summary.out_ranges(s_in, s_out), out_channel_ranges(scaled, layout), rtol=1e-6
    )
    np.testing.assert_allclose(
        summary.in_ranges(s_in, s_out), in_channel_ranges(scaled, layout), rtol=1e-6
    )
    np.testing.assert_allclose(summary.raw_out, out_channel_ranges(w, layout))


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.float64])
@pytest.mark.parametrize(
    "layout,shape",
    [(Layout(0, 1, 1), (5, 4, 3)), (Layout(1, 0, 2), (4, 3, 1)), (Layout(0, 1, 4), (8, 1, 3, 3))],
)
def test_range_summary_from_given_magnitudes_is_the_same(layout, shape, dtype):
    # the noise objective hands the balance start its estimate's max |W| per kernel (in
    # the work dtype): every range must be the one the summary takes itself, bit for bit
    rng = np.random.default_rng(3)
    w = rng.normal(size=shape).astype(dtype)
    s_in = rng.uniform(0.1, 10, layout.in_channels(shape))
    s_out = rng.uniform(0.1, 10, layout.out_channels(shape))
    own = RangeSummary(w, layout)
    work = np.float64 if dtype == np.float64 else np.float32
    magnitudes = kernel_reduce(grouped_view(w, layout), tap=np.abs, dtype=work)
    given = RangeSummary(w, layout, magnitudes)
    for a, b in (
        (own.raw_out, given.raw_out),
        (own.raw_in, given.raw_in),
        (own.out_ranges(s_in, s_out), given.out_ranges(s_in, s_out)),
        (own.in_ranges(s_in, s_out), given.in_ranges(s_in, s_out)),
    ):
        np.testing.assert_array_equal(a, b)
    assert np.array_equal(
        magnitudes, kernel_reduce(grouped_view(w, layout), tap=np.abs, dtype=work)
    )


@pytest.mark.parametrize(
    "layout,shape",
    [(Layout(0, 1, 1), (5, 4, 3, 3)), (Layout(1, 0, 2), (4, 3, 1)), (Layout(0, 1, 4), (8, 1, 3))],
)
def test_kernel_reduce_is_numpys_reduction_over_the_kernel(layout, shape):
    # tap by tap, on a view that may not be contiguous (ConvTranspose swaps axes)
    w = np.random.default_rng(2).normal(size=shape).astype(np.float32)
    v = grouped_view(w, layout)
    np.testing.assert_array_equal(kernel_reduce(v, tap=np.abs), np.abs(v).max(axis=3))
    np.testing.assert_array_equal(kernel_reduce(v, np.minimum), v.min(axis=3))
    squares = kernel_reduce(v, np.add, np.square, np.float64)
    assert squares.dtype == np.float64
    np.testing.assert_allclose(squares, np.square(v, dtype=np.float64).sum(axis=3), rtol=1e-12)
    # both sums in one pass: bit for bit the two reductions the gains and statistics took
    total, both = kernel_sums(v)
    np.testing.assert_array_equal(total, kernel_reduce(v, np.add, dtype=np.float64))
    np.testing.assert_array_equal(both, squares)
    assert np.array_equal(w, np.random.default_rng(2).normal(size=shape).astype(np.float32))
