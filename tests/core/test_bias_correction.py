"""Bias correction: the math on random layers, the pass on graphs, the options."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import cle_core
from cle_core import EqualizeOptions, Graph, Layout, run_graph
from cle_core._math import bias_shift, tap_coverage
from cle_core.quality import deployed_weights, quantize_array
from tests.helpers.ir_transformers import packed_projections


def _layer(op, w, b, layout, attrs):
    g = Graph("one")
    x = g.add_input("x", channels=layout.in_channels(w.shape))
    node = g.add_node(op, [x], name="L", params={"weight": w, "bias": b}, attrs=attrs)
    g.set_outputs([node.outputs[0]])
    return g


@st.composite
def layers(draw):
    """A Conv, ConvTranspose (1-D or 2-D, grouped, strided, padded) or Linear, with
    weights whose per-channel ranges differ by up to two decades, and inputs of random
    per-channel means."""
    op = draw(st.sampled_from(["conv", "conv_transpose", "linear"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    groups = draw(st.sampled_from([1, 2])) if op != "linear" else 1
    cin, cout = groups * draw(st.integers(1, 4)), groups * draw(st.integers(1, 4))
    nd = draw(st.integers(1, 2)) if op != "linear" else 0
    k = tuple(draw(st.integers(1, 3)) for _ in range(nd))
    size = tuple(draw(st.integers(3, 7)) for _ in range(nd))
    stride = tuple(draw(st.integers(1, 2)) for _ in range(nd))
    pads = tuple(draw(st.integers(0, k[i % nd] - 1)) for i in range(2 * nd)) if nd else ()
    if op == "conv":
        shape, layout = (cout, cin // groups, *k), Layout(0, 1, groups)
    elif op == "conv_transpose":
        shape, layout = (cin, cout // groups, *k), Layout(1, 0, groups)
    else:
        shape, layout = (cout, cin), Layout(0, 1)
    spread = 10.0 ** rng.uniform(-1, 1, size=shape[layout.out_axis])
    w = rng.normal(size=shape) * np.expand_dims(
        spread, [a for a in range(len(shape)) if a != layout.out_axis]
    )
    attrs = {"layout": layout}
    if nd:
        attrs.update(stride=stride, pads=pads, dilation=(1,) * nd)
    mean = rng.normal(scale=2.0, size=cin)
    # Noise of mean exactly 0 at every position: each position's mean is the channel's,
    # as the expectation the correction is for (a finite sample's positions differ).
    noise = rng.normal(size=(16, cin, *size))
    x = mean.reshape(1, cin, *(1,) * nd) + noise - noise.mean(axis=0, keepdims=True)
    per_channel = draw(st.booleans())
    symmetric = draw(st.booleans())
    return op, w, rng.normal(size=cout), layout, attrs, x, size, per_channel, symmetric


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(layers())
def test_corrected_layer_has_a_smaller_mean_output_error(case):
    """The mean error of the quantized layer's output (over examples and positions, per
    channel) against the float layer's: below the uncorrected one's, and zero up to
    float rounding when the shift uses the inputs' own means and the taps' coverage."""
    op, w, b, layout, attrs, x, size, per_channel, symmetric = case
    q = quantize_array(w, 8, symmetric, layout.out_axis if per_channel else None)
    if np.array_equal(q, w):
        return
    float_y = run_graph(_layer(op, w, b, layout, attrs), {"x": x})
    nd = len(size)
    coverage = (
        tap_coverage(op, w.shape[2:], size, attrs["stride"], attrs["pads"], attrs["dilation"])
        if nd
        else None
    )
    mean_in = x.mean(axis=(0, *range(2, x.ndim)))  # the channel means, as E[x]
    shift = bias_shift(w, q, layout, mean_in, coverage)
    axes = (0, *range(2, x.ndim))

    def mean_error(bias):
        y = run_graph(_layer(op, q, bias, layout, attrs), {"x": x})
        (name,) = y
        return (y[name] - float_y[name]).mean(axis=axes)

    before, after = mean_error(b), mean_error(b - shift)
    scale = np.abs(w).max() * np.abs(x).max() * 1e-9
    assert np.all(np.abs(after) <= np.abs(before) + scale)
    np.testing.assert_allclose(after, 0.0, atol=scale * max(1, w[0].size))


def test_tap_coverage_counts_the_padding_and_the_transposed_stride():
    # Conv, 5 inputs, kernel 3, pads 1: each edge tap reads the padding at 1 of 5 outputs.
    np.testing.assert_allclose(tap_coverage("conv", (3,), (5,), (1,), (1, 1), (1,)), [0.8, 1, 0.8])
    # No padding: every tap always reads an input.
    np.testing.assert_allclose(tap_coverage("conv", (3,), (5,), (1,), (0, 0), (1,)), [1, 1, 1])
    # ConvTranspose stride 2, kernel 2, 4 inputs -> 8 outputs: each output gets one tap.
    np.testing.assert_allclose(
        tap_coverage("conv_transpose", (2,), (4,), (2,), (0, 0), (1,)), [0.5, 0.5]
    )
    # Unknown sizes: the interior value.
    np.testing.assert_allclose(tap_coverage("conv", (2, 2), None, (1, 1), (0,) * 4, (1, 1)), 1)
    np.testing.assert_allclose(
        tap_coverage("conv_transpose", (2,), None, (2,), (0, 0), (1,)), [0.5, 0.5]
    )


def test_bias_shift_repeats_a_flattened_input_channel_by_channel():
    w = np.arange(12.0).reshape(2, 6)  # a Linear after Flatten of (3 channels, 2 positions)
    q = w + 1.0
    shift = bias_shift(w, q, Layout(0, 1), np.array([1.0, 2.0, 3.0]))
    np.testing.assert_allclose(shift, [1 + 1 + 2 + 2 + 3 + 3] * 2)


# --- the pass -------------------------------------------------------------------------------


def test_off_by_default_and_exact_without_it():
    assert EqualizeOptions().bias_correction is False
    g = _mlp()
    result = cle_core.equalize(g)
    assert result.report.bias_corrections == ()


def _mlp():
    rng = np.random.default_rng(0)
    g = Graph("mlp")
    x = g.add_input("x", channels=8)
    h = g.add_node(
        "linear",
        [x],
        name="fc1",
        params={"weight": rng.normal(size=(6, 8)) * 10.0 ** rng.uniform(-1, 1, (6, 1))},
        attrs={"layout": Layout(0, 1)},
    ).outputs[0]
    h = g.add_node(
        "batchnorm",
        [h],
        name="bn1",
        params={
            "mean": rng.normal(size=6),
            "var": rng.uniform(0.5, 2, 6),
            "gamma": rng.uniform(0.5, 2, 6),
            "beta": rng.normal(size=6) + 1.0,
        },
        attrs={"eps": 1e-5},
    ).outputs[0]
    h = g.add_node("relu", [h], name="relu1").outputs[0]
    y = g.add_node(
        "linear",
        [h],
        name="fc2",
        params={"weight": rng.normal(size=(3, 6)), "bias": np.zeros(3)},
        attrs={"layout": Layout(0, 1)},
    ).outputs[0]
    g.set_outputs([y])
    return g


@pytest.mark.parametrize("per_channel", [False, True])
def test_the_pass_corrects_every_layer_whose_input_mean_it_knows(per_channel):
    g = _mlp()
    options = EqualizeOptions(bias_correction=True, per_channel=per_channel)
    result = cle_core.equalize(g, options)
    records = {r.layer: r for r in result.report.bias_corrections}
    # fc1 reads the graph input (mean 0 by convention: nothing to correct); fc2 reads a
    # ReLU of a folded BN, whose mean is known.
    assert set(records) == {"fc2"} and "fc2" in result.changed
    r = records["fc2"]
    assert r.input_mean == "batch norms" and r.fp32_sqnr is not None and r.fp32_sqnr > 20
    fc2 = result.graph.node("fc2")
    assert fc2.bias.shape == (3,) and np.any(fc2.bias != 0)
    text = result.report.summary()
    assert "bias correction:    1 layers (input means from batch norms)" in text
    assert "bias_corrections" in result.report.to_json()


def test_measured_means_are_used_in_the_units_the_equalization_left():
    from cle_core._stats import ChannelStats

    g = _mlp()
    relu_out = g.node("relu1").outputs[0].name
    mean = np.full(6, 5.0)
    stats = {relu_out: ChannelStats.of(mean, mean**2 + 1.0)}
    options = EqualizeOptions(bias_correction=True, scale=False, high_bias=False)
    measured = cle_core.equalize(g, options, statistics=stats).report.bias_corrections
    assert measured[0].input_mean == "calibration"
    w = g.node("fc2").weight
    q = deployed_weights(w, 8, True)  # onnxruntime's grid, bit for bit
    np.testing.assert_allclose(measured[0].shift, (q - w) @ mean)
    # Scaled, the value is in other units: its measured mean is restated in them.
    g2 = _mlp()
    scaled = cle_core.equalize(
        g2, EqualizeOptions(bias_correction=True, objective="balance"), statistics=stats
    )
    [region] = [r for r in scaled.report.regions if np.any(r.scales != 1)]
    [record] = scaled.report.bias_corrections
    assert record.input_mean == "calibration"
    w2 = g2.node("fc2").weight
    np.testing.assert_allclose(
        record.shift, (deployed_weights(w2, 8, True) - w2) @ (mean / region.scales)
    )


def test_a_conv_transpose_output_mean_is_estimated_per_output_position():
    """Each output of a stride-2, kernel-2 ConvTranspose receives one of the 4 taps: its
    mean, as the bias correction estimates it, is a quarter of the taps' sum times the
    input mean (the whole sum, four times too much, made the correction after an
    upsampling wrong: a U-Net-style network lost 0.65 dB W8 with it)."""
    from cle_core._stats import ChannelStats, estimate

    rng = np.random.default_rng(3)
    g = Graph("up")
    x = g.add_input("x", channels=3)
    w = rng.normal(size=(3, 2, 2, 2))
    y = g.add_node(
        "conv_transpose",
        [x],
        name="up",
        params={"weight": w, "bias": np.zeros(2)},
        attrs={"layout": Layout(1, 0), "stride": (2, 2), "pads": (0,) * 4, "dilation": (1, 1)},
    ).outputs[0]
    g.set_outputs([y])
    mean = np.array([1.0, -2.0, 0.5])
    stats, _ = estimate(g, {"x": ChannelStats.of(mean, mean**2 + 1.0)}, transpose_taps=True)
    data = mean.reshape(1, 3, 1, 1) + rng.normal(size=(64, 3, 6, 6))
    measured = run_graph(g, {"x": data})[y.name].mean(axis=(0, 2, 3))
    np.testing.assert_allclose(stats[y.name].mean, measured, atol=0.05)


def test_verify_measures_against_the_original_without_correction():
    from cle_core.toolkit import folded_only

    options = EqualizeOptions(bias_correction="empirical", objective="balance")
    folded = folded_only(options)
    assert (folded.scale, folded.high_bias, folded.bias_correction) == (False, False, False)
    assert folded.fold_bn and folded.objective == "balance"


def test_the_summary_says_why_layers_were_not_corrected():
    g = _mlp()
    relu = g.node("relu1")
    relu.op, relu.attrs = "opaque", {"kind": "HardSwish", "why": "not translated"}
    result = cle_core.equalize(g, EqualizeOptions(bias_correction=True, scale=False))
    assert result.report.bias_corrections == ()
    line = next(x for x in result.report.summary().splitlines() if "bias correction" in x)
    assert line.endswith(
        "0 layers; 1 skipped (1 x the mean of its input is unknown): --calibration measures it"
    )


def _padded_conv(w, bias):
    """x (2 channels, 5 x 5) -> Pad (2, 1 before; 2, 1 after) -> Conv with pads of its own."""
    g = Graph("padded")
    x = g.add_input("x", channels=2)
    x.spatial = (5, 5)
    p = g.add_node("pad", [x], name="pad", attrs={"pads": (2, 1, 2, 1)}).outputs[0]
    y = g.add_node(
        "conv",
        [p],
        name="L",
        params={"weight": w, "bias": bias},
        attrs={"layout": Layout(0, 1), "stride": (1, 1), "pads": (0, 1, 0, 1), "dilation": (1, 1)},
    ).outputs[0]
    g.set_outputs([y])
    return g, p.name, y.name


@pytest.mark.parametrize("measured", ["input", "both", "padded"])
def test_a_pad_node_before_a_conv_is_the_conv_s_padding(measured):
    """A zero padding written as its own node (PyTorch's ZeroPad2d, an exported "same"
    padding) pads the layer's input like the layer's own pads: the correction removes
    the mean output error exactly. Read at the Pad's output instead, a measured mean
    counts every padded position once for every tap (on Lite0's 5 x 5 depthwise
    convolutions at 7 x 7, 0.41 of the input's mean where the taps read 0.51 to 1 of
    it); passed through the Pad unchanged, it counted no padding at all. Where only the
    Pad's output was measured (the ONNX backend measures no graph input), its mean is
    restated over the unpadded positions."""
    from cle_core._stats import ChannelStats

    rng = np.random.default_rng(5)
    w = rng.normal(size=(3, 2, 5, 3))
    g, padded, out = _padded_conv(w, np.zeros(3))
    mean = np.array([3.0, -2.0])
    noise = rng.normal(size=(16, 2, 5, 5))
    data = mean.reshape(1, 2, 1, 1) + noise - noise.mean(axis=0, keepdims=True)
    values = run_graph(g, {"x": data})
    stats = {}
    if measured != "padded":
        stats["x"] = ChannelStats.of(mean, mean**2 + 1.0)
    if measured != "input":  # as a backend measures every value a node computes
        z = np.pad(data, ((0, 0), (0, 0), (2, 2), (1, 1)))
        stats[padded] = ChannelStats.of(z.mean(axis=(0, 2, 3)), (z**2).mean(axis=(0, 2, 3)))
    options = EqualizeOptions(bias_correction=True, scale=False, high_bias=False)
    [record] = cle_core.equalize(g, options, statistics=stats).report.bias_corrections
    assert record.padding and record.input_mean == "calibration"
    quantized, _, _ = _padded_conv(deployed_weights(w, 8, True), -record.shift)
    error = run_graph(quantized, {"x": data})[out] - values[out]
    assert np.abs(error.mean(axis=(0, 2, 3))).max() < 1e-9


def _smooth_field(rng, n, channels, size, rho):
    """Gaussian images of mean 0 and variance 1 whose positions ``d`` apart (city-block)
    correlate ``rho^d``: white noise filtered by a stationary AR(1) along each axis."""
    x = rng.normal(size=(n, channels, *size))
    for axis in range(2, x.ndim):
        x = np.moveaxis(x, axis, -1)
        for t in range(1, x.shape[-1]):
            x[..., t] = rho * x[..., t - 1] + np.sqrt(1 - rho * rho) * x[..., t]
        x = np.moveaxis(x, -1, axis)
    return x


def test_correlated_estimate_matches_monte_carlo_on_smooth_images():
    """Natural images are smooth: neighbouring pixels correlate (0.97 on the calibration
    crops), and a convolution's output variance is ``sum_kl W_k W_l rho^|k - l| var``,
    not ``sum W^2 var``. On smooth images, a 3 x 3 Conv and a strided depthwise Conv
    after it: the bias correction's estimate (``correlated=True``, the correlation the
    first layer's output carries propagated to the second) is within 10 and 15 % of a
    Monte-Carlo variance per channel; the independent one is off by a factor 0.3 to 4."""
    from cle_core._stats import INPUT_CORRELATION, estimate

    rng = np.random.default_rng(0)
    g = Graph("chain")
    x = g.add_input("x", channels=3)
    x.spatial = (24, 24)
    attrs = {"stride": (1, 1), "pads": (0,) * 4, "dilation": (1, 1)}
    w1, w2 = rng.normal(size=(4, 3, 3, 3)), rng.normal(size=(4, 1, 3, 3))
    y1 = g.add_node(
        "conv", [x], name="c1", params={"weight": w1}, attrs={"layout": Layout(0, 1), **attrs}
    ).outputs[0]
    y2 = g.add_node(
        "conv",
        [y1],
        name="c2",
        params={"weight": w2},
        attrs={"layout": Layout(0, 1, 4), **attrs, "stride": (2, 2)},
    ).outputs[0]
    g.set_outputs([y1, y2])
    values = run_graph(g, {"x": _smooth_field(rng, 400, 3, (24, 24), INPUT_CORRELATION)})
    new, _ = estimate(g, correlated=True)
    old, _ = estimate(g)
    for y, tolerance in ((y1, 0.10), (y2, 0.15)):
        sampled = values[y.name].var(axis=(0, 2, 3))
        np.testing.assert_allclose(new[y.name].var, sampled, rtol=tolerance)
        assert np.abs(old[y.name].var / sampled - 1).max() > 0.5


def test_correlated_estimate_counts_the_padding_in_a_conv_mean():
    """The bias correction's estimate reads zeros where a Conv pads (a Pad node's
    padding included), as the correction does: the propagated mean is the mean over
    every output position."""
    from cle_core._stats import ChannelStats, estimate

    rng = np.random.default_rng(6)
    g, _, out = _padded_conv(rng.normal(size=(3, 2, 5, 3)), rng.normal(size=3))
    mean = np.array([3.0, -2.0])
    stats, _ = estimate(g, {"x": ChannelStats.of(mean, mean**2 + 1.0)}, correlated=True)
    data = np.broadcast_to(mean.reshape(1, 2, 1, 1), (1, 2, 5, 5))
    np.testing.assert_allclose(stats[out].mean, run_graph(g, {"x": data})[out].mean(axis=(0, 2, 3)))


@pytest.mark.parametrize("per_channel", [False, True])
def test_parts_of_a_packed_tensor_are_corrected_for_its_one_grid(per_channel):
    """q, k and v cut from one packed tensor (``weight_group``), v's rows 10 times wider:
    per tensor each part's shift is that of its rows on the packed tensor's grid (on a
    grid of its own, q's shift would be about ten times smaller); per channel each row's
    own grid."""
    from cle_core._stats import ChannelStats

    rng = np.random.default_rng(0)
    ws = [rng.normal(size=(4, 6)) * f for f in (1.0, 1.0, 10.0)]
    g = packed_projections(ws, bias=True)
    mean = rng.uniform(1.0, 2.0, 6)
    options = EqualizeOptions(bias_correction=True, scale=False, per_channel=per_channel)
    stats = {"x": ChannelStats.of(mean, mean**2 + 1.0)}
    records = {
        r.layer: r for r in cle_core.equalize(g, options, statistics=stats).report.bias_corrections
    }
    whole = np.concatenate(ws)
    q = deployed_weights(whole, 8, True, 0 if per_channel else None)
    for j, name in enumerate("qkv"):
        rows = slice(4 * j, 4 * j + 4)
        np.testing.assert_allclose(records[name].shift, (q[rows] - whole[rows]) @ mean)


def test_a_weight_group_of_weights_that_do_not_stack_is_refused():
    """Layers of one group whose weights are not row blocks of one tensor (here: 6 and
    5 input columns) are refused before anything is changed, naming the layer."""
    g = Graph("bad")
    for name, cin in (("q", 6), ("k", 5)):
        g.add_input(f"x{name}", channels=cin)
        g.add_node(
            "linear",
            [f"x{name}"],
            name=name,
            outputs=[f"y{name}"],
            params={"weight": np.ones((4, cin)), "bias": None},
            attrs={"layout": Layout(0, 1), "weight_group": "in_proj"},
        )
    g.set_outputs(["yq", "yk"])
    with pytest.raises(cle_core.InvalidGraphError, match="k: weight_group 'in_proj' joins it to q"):
        g.validate()
