"""``equalize`` on hand-built graphs: what it finds, skips, reports and refuses.

Exactness tolerance: relative error 1e-9 of the float64 executor outputs.
"""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from cle_core import (
    CLEError,
    EqualizeOptions,
    Graph,
    InvalidGraphError,
    Layout,
    NonFiniteError,
    equalize,
    run_graph,
)
from tests.helpers.strategies import Builder, build_graph, feed


def run(graph, x=None):
    x = feed(graph) if x is None else x
    return np.concatenate([v.ravel() for v in run_graph(graph, x).values()])


def assert_same_function(graph, before, x=None):
    after = run(graph, x)
    assert np.max(np.abs(after - before)) <= 1e-9 * np.max(np.abs(before))


def mobilenet_like(seed=0):
    return build_graph(
        seed, [("residual", "relu6"), ("residual", "relu6"), ("triple", "relu6")], 4, head=True
    )


def test_mobilenet_like_regions_and_report():
    g = mobilenet_like()
    before = run(g)
    result = equalize(g)
    report = result.report
    assert_same_function(g, before)
    kinds = sorted(r.kind for r in report.regions)
    assert "residual" in kinds and kinds.count("pair") >= 6
    assert len(report.triples) == 3
    assert report.converged and report.sweeps >= 1
    assert len(report.folds) == sum(1 for f in report.folds if f.side == "output") > 0
    assert not any(n.op == "batchnorm" for n in g.nodes)
    # ReLU6 is carried: its upper bound became one value per channel
    relu6 = [n for n in g.nodes if n.op == "clip" and n.params["hi"].size > 1]
    assert relu6
    # the report serialises and names every layer
    data = json.loads(report.to_json())
    assert {r["name"] for r in data["layers"]} == {n.name for n in g.nodes if n.is_layer}
    assert all(len(r["ranges_before"]) == len(r["ranges_after"]) for r in data["layers"])
    assert data["regions"][0]["scales"]
    assert "regions equalized" in report.summary()
    assert set(result.removed) == {f.bn for f in report.folds}


def test_equalize_is_deterministic():
    a, b = mobilenet_like(), mobilenet_like()
    ra, rb = equalize(a).report, equalize(b).report
    for x, y in zip(ra.regions, rb.regions, strict=True):
        np.testing.assert_array_equal(x.scales, y.scales)


def test_balancing_improves_the_worst_channel():
    g = mobilenet_like(3)
    report = equalize(g).report
    worst_before = min(
        r.ranges_before.min() / r.ranges_before.max()
        for r in report.layers
        if r.ranges_before.max() > 0 and r.ranges_before.min() > 0
    )
    worst_after = min(
        r.ranges_after.min() / r.ranges_after.max()
        for r in report.layers
        if r.ranges_after.max() > 0 and r.ranges_after.min() > 0
    )
    assert worst_after > worst_before


def snapshot(graph):
    return [
        (n.name, n.op, {k: None if v is None else v.copy() for k, v in n.params.items()})
        for n in graph.nodes
    ]


def assert_unchanged(graph, snap):
    assert [(n.name, n.op) for n in graph.nodes] == [(a, b) for a, b, _ in snap]
    for node, (_, _, params) in zip(graph.nodes, snap, strict=True):
        for k, v in params.items():
            if v is None:
                assert node.params[k] is None
            else:
                np.testing.assert_array_equal(node.params[k], v)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_weight_names_the_layer_and_changes_nothing(bad):
    g = mobilenet_like()
    layer = [n for n in g.nodes if n.is_layer][3]
    layer.params["weight"][0, 0, 0, 0] = bad
    snap = snapshot(g)
    with pytest.raises(NonFiniteError, match=f"{layer.name}.*weight"):
        equalize(g)
    assert_unchanged(g, snap)


def test_non_finite_bn_statistic_names_the_bn():
    g = mobilenet_like()
    bn = next(n for n in g.nodes if n.op == "batchnorm")
    bn.params["var"][1] = np.inf
    snap = snapshot(g)
    with pytest.raises(NonFiniteError, match=f"{bn.name}.*var"):
        equalize(g)
    assert_unchanged(g, snap)


def test_negative_variance_is_refused():
    g = mobilenet_like()
    bn = next(n for n in g.nodes if n.op == "batchnorm")
    bn.params["var"][0] = -1.0
    with pytest.raises(NonFiniteError, match=bn.name):
        equalize(g)


def test_invalid_graph_refused_before_any_change():
    g = mobilenet_like()
    conv = next(
        n for n in g.nodes if n.op == "conv" and n.layout.groups == 1 and n.inputs[0].name != "x"
    )
    snap = snapshot(g)
    conv.params["weight"] = np.ones((conv.out_channels, conv.in_channels + 1, 1, 1))
    with pytest.raises(InvalidGraphError, match=conv.name):
        equalize(g)
    conv.params["weight"] = snap[[s[0] for s in snap].index(conv.name)][2]["weight"]
    assert_unchanged(g, snap)


def two_layer_chain(act="relu", pad=0, k=1, bias=True):
    b = Builder(np.random.default_rng(5), zero_channels=False)
    b.g.add_input("x", 3)
    h = b.conv("x", 3, 4, 3, pad=1)
    h = b.act(b.bn(h, 4), act, 4)
    h = b.conv(h, 4, 4, k, pad=pad, bias=bias)
    h = b.conv(h, 4, 2)
    b.g.set_outputs([h])
    return b.g


def test_shared_weight_is_never_scaled():
    g = two_layer_chain()
    first, second = (n for n in g.nodes if n.is_layer and n.inputs[0].name != "x")
    second.param_ids["weight"] = "shared.w"
    first.param_ids["weight"] = "shared.w"
    w_second = second.weight.copy()
    report = equalize(g).report
    np.testing.assert_array_equal(second.weight, w_second)
    reasons = " ".join(s.reason for s in report.skipped)
    assert "shares a parameter" in reasons


def test_value_read_outside_the_region_breaks_it():
    g = two_layer_chain()
    relu = next(n for n in g.nodes if n.op == "relu")
    g.set_outputs(list(g.outputs) + [relu.outputs[0]])
    report = equalize(g).report
    assert any("graph output" in s.reason for s in report.skipped if s.stage == "scale")
    assert all(relu.outputs[0].name not in r.through for r in report.regions)


def test_opaque_activation_breaks_the_region():
    g = two_layer_chain(act="silu")
    report = equalize(g).report
    assert any("(opaque" in s.reason for s in report.skipped if s.stage == "scale")


def bn_before_layer(pad):
    b = Builder(np.random.default_rng(2), zero_channels=False)
    b.g.add_input("x", 3)
    h = b.bn("x", 3)
    h = b.conv(h, 3, 4, 3, pad=pad)
    b.g.set_outputs([h])
    return b.g


def test_input_side_bn_folds_into_unpadded_conv():
    g = bn_before_layer(pad=0)
    before = run(g)
    report = equalize(g).report
    assert [f.side for f in report.folds] == ["input"]
    assert_same_function(g, before)


def test_input_side_bn_before_padded_conv_is_not_folded():
    g = bn_before_layer(pad=1)
    before = run(g)
    report = equalize(g).report
    assert report.folds == ()
    skip = next(s for s in report.skipped if s.stage == "fold")
    assert "zero-pads its input" in skip.reason
    assert any(n.op == "batchnorm" for n in g.nodes)
    assert_same_function(g, before)


def test_bn_without_affine_parameters_folds():
    b = Builder(np.random.default_rng(2))
    b.g.add_input("x", 3)
    h = b.bn(b.conv("x", 3, 4, 3, pad=1), 4, affine=False)
    b.g.set_outputs([b.conv(b.act(h, "relu", 4), 4, 2)])
    before = run(b.g)
    report = equalize(b.g).report
    assert len(report.folds) == 1
    assert_same_function(b.g, before)


def high_bias_graph(pad=0, seed=7):
    """conv -> BN (large beta) -> ReLU -> conv(k, pad) -> output."""
    b = Builder(np.random.default_rng(seed), zero_channels=False)
    b.g.add_input("x", 3)
    h = b.conv("x", 3, 4, 3, pad=1)
    bn = b.g.node(b.bn(h, 4))
    bn.params["beta"] = np.array([10.0, 0.1, 20.0, 5.0])
    bn.params["gamma"] = np.array([1.0, 1.0, -2.0, 0.5])
    h = b.act(bn.outputs[0].name, "relu", 4)
    h = b.conv(h, 4, 4, 1 + 2 * pad, pad=pad)
    b.g.set_outputs([h])
    return b.g


W8 = {"activation_bits": None}  # weights-only: the deployment where high biases are absorbed


def test_exact_high_bias_absorption_moves_the_lower_bound():
    g = high_bias_graph()
    before = run(g)
    report = equalize(g, EqualizeOptions(scale=False, **W8)).report
    (rec,) = report.high_bias
    assert rec.exact and rec.form == "exact"
    np.testing.assert_allclose(rec.absorbed, [7.0, 0.0, 14.0, 3.5])
    act = g.node(rec.activation)
    assert act.op == "clip"
    np.testing.assert_allclose(act.params["lo"], -rec.absorbed)
    assert_same_function(g, before)


def test_classic_high_bias_absorption_is_opt_in_and_reports_its_error():
    g = high_bias_graph()
    report = equalize(g, EqualizeOptions(scale=False, high_bias_form="classic")).report
    (rec,) = report.high_bias
    assert not rec.exact and rec.form == "classic"
    assert rec.expected_error > 0 and 0 < rec.relative_error < 1
    np.testing.assert_allclose(g.node(rec.activation).params["lo"], 0.0)


def test_high_bias_across_zero_padding_is_off_by_default():
    g = high_bias_graph(pad=1)
    before = run(g)
    report = equalize(g, EqualizeOptions(scale=False, **W8)).report
    assert report.high_bias == ()
    assert any("zero-pads" in s.reason for s in report.skipped if s.stage == "high_bias")
    assert_same_function(g, before)
    g = high_bias_graph(pad=1)
    report = equalize(g, EqualizeOptions(scale=False, high_bias_through_padding=True, **W8)).report
    (rec,) = report.high_bias
    assert not rec.exact and "zero-pads" in rec.inexact_because[0]


def test_exact_high_bias_absorption_is_left_out_where_activations_are_quantized():
    """The shift lowers each channel's bound by its own amount: a per-tensor activation
    grid then spans the union of the shifted ranges (and a scalar bound becomes a Max the
    quantizer does not merge). The default deployment quantizes activations: skipped,
    with the reason; the classic form keeps the bound and is the user's call."""
    g = high_bias_graph()
    report = equalize(g, EqualizeOptions(scale=False)).report
    assert report.high_bias == ()
    (skip,) = [s for s in report.skipped if s.stage == "high_bias"]
    assert "widen the activation grids" in skip.reason
    classic = equalize(high_bias_graph(), EqualizeOptions(scale=False, high_bias_form="classic"))
    assert len(classic.report.high_bias) == 1


def test_zero_range_channel_gets_scale_one():
    g = two_layer_chain()
    first = [n for n in g.nodes if n.is_layer][0]
    first.params["weight"][2] = 0.0
    first.params["bias"][2] = 0.0
    report = equalize(g, EqualizeOptions(high_bias=False)).report
    region = next(r for r in report.regions if r.sources == (first.name,))
    assert region.scales[2] == 1.0


def test_concat_region_uses_channel_offsets():
    g = build_graph(4, [("concat", "relu")], 4, head=False)
    before = run(g)
    report = equalize(g).report
    concat = next(r for r in report.regions if r.kind == "concat")
    assert len(concat.sources) == 2 and concat.channels == 4 + 3
    assert_same_function(g, before)


def test_flatten_into_linear_repeats_the_scale():
    b = Builder(np.random.default_rng(1), zero_channels=False)
    b.g.add_input("x", 3)
    h = b.act(b.conv("x", 3, 2, 3, pad=0), "relu", 2)  # 6x6 -> 4x4
    h = b.op("flatten", [h])
    fc = b.g.node(b.linear(h, 32, 5))
    b.g.set_outputs([fc.outputs[0]])
    before = run(b.g)
    report = equalize(b.g).report
    (region,) = report.regions
    assert region.sinks == (fc.name,) and region.channels == 2
    assert_same_function(b.g, before)


def test_conv_transpose_regions_are_exact():
    g = build_graph(9, [("transpose", "relu"), ("transpose", "leaky_relu")], 3, head=False)
    before = run(g)
    report = equalize(g).report
    assert any(name.startswith("convT") for r in report.regions for name in r.sources)
    assert_same_function(g, before)


def test_activation_weight_holds_back_channels_with_large_activations():
    # conv -> BN -> ReLU6 -> conv: with a positive weight, a channel whose activation
    # range (BN statistics, capped by the clip) is large relative to its weight range
    # gets a larger scale than plain balance gives it, so its activation shrinks less.
    g_plain, g_act = high_bias_graph(), high_bias_graph()
    balance = EqualizeOptions(objective="balance", high_bias=False)
    plain = equalize(g_plain, balance).report.regions[0].scales
    act = equalize(g_act, replace(balance, activation_weight=1.0)).report
    scales = act.regions[0].scales
    assert np.all(scales >= plain * (1 - 1e-9)) and np.any(scales > plain * 1.01)
    assert act.options.activation_weight == 1.0


@pytest.mark.parametrize("objective", ["noise", "balance"])
def test_not_converged_is_reported(objective):
    g = mobilenet_like()
    options = EqualizeOptions(objective=objective, max_sweeps=1, tolerance=1e-12)
    report = equalize(g, options).report
    assert report.sweeps == 1 and not report.converged and report.max_change > 1e-12


def test_activation_weight_is_for_the_balance_objective():
    with pytest.raises(CLEError, match="objective='balance'"):
        EqualizeOptions(activation_weight=0.2)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_sweeps": 0},
        {"tolerance": 0},
        {"tolerance": float("nan")},
        {"high_bias_form": "magic"},
        {"high_bias_sigmas": -1},
    ],
)
def test_bad_options_are_refused(kwargs):
    with pytest.raises(CLEError):
        EqualizeOptions(**kwargs)


def test_options_split_from_backend_kwargs():
    opts, rest = EqualizeOptions.from_kwargs(max_sweeps=3, dummy_input=1)
    assert opts.max_sweeps == 3 and rest == {"dummy_input": 1}


def test_empty_graph():
    g = Graph()
    g.add_input("x", 1)
    g.add_node("relu", ["x"], name="r", outputs=["y"])
    g.set_outputs(["y"])
    report = equalize(g).report
    assert report.regions == () and report.converged


def test_float32_graph_stays_float32_and_close():
    g = mobilenet_like()
    for n in g.nodes:
        for k, v in n.params.items():
            if v is not None:
                n.params[k] = v.astype(np.float32)
    before = run(g)
    equalize(g)
    assert all(n.weight.dtype == np.float32 for n in g.nodes if n.is_layer)
    after = run(g)
    assert np.max(np.abs(after - before)) <= 1e-4 * np.max(np.abs(before))


def test_layout_attr_defaults_for_layers():
    g = Graph()
    g.add_input("x", 2)
    node = g.add_node("linear", ["x"], name="fc", params={"weight": np.ones((3, 2))})
    assert node.layout == Layout()


def _carry_graph(kind: str):
    """conv -> relu6 -> <kind> -> conv(s): a region must pass through ``kind``."""
    b = Builder(np.random.default_rng(3), zero_channels=False)
    b.g.add_input("x", 3)
    h = b.act(b.conv("x", 3, 8, 3, pad=1), "relu6", 8)
    outs = []
    if kind == "slice":  # a channel Split: two halves, one layer each
        for k in range(2):
            part = f"part{k}"
            b.g.add_node(
                "slice", [h], name=part, outputs=[part], attrs={"offset": 4 * k, "channels": 4}
            )
            outs.append(b.conv(part, 4, 5))
    else:
        if kind == "mul_factor":
            b.g.add_node(
                "mul", [h], name="m", outputs=["m"], params={"factor": np.linspace(-2, 3, 8)}
            )
        elif kind == "mul_gate":  # squeeze-and-excitation: the gate's first layer is a sink
            b.g.add_node("global_avgpool", [h], name="gap", outputs=["gap"])
            gate = b.act(b.conv(b.act(b.conv("gap", 8, 4), "relu", 4), 4, 8), "none", 8)
            b.g.add_node("mul", [h, gate], name="m", outputs=["m"])
        elif kind == "batchnorm":
            rng = np.random.default_rng(4)
            b.g.add_node(
                "batchnorm",
                [h],
                name="m",
                outputs=["m"],
                params={
                    "mean": rng.normal(size=8),
                    "var": rng.uniform(0.5, 2, 8),
                    "gamma": rng.normal(size=8),
                    "beta": rng.normal(size=8),
                },
                attrs={"eps": 1e-5},
            )
        elif kind == "resize":
            b.g.add_node(
                "resize", [h], name="m", outputs=["m"], attrs={"mode": "nearest", "scales": (2, 2)}
            )
        # 3x3 with zero padding: an input-side BN fold would not be exact there
        outs.append(b.conv("m", 8, 5, 3, pad=1))
    b.g.set_outputs(outs)
    b.g.validate()
    return b.g


@pytest.mark.parametrize("kind", ["slice", "mul_factor", "mul_gate", "batchnorm", "resize"])
@pytest.mark.parametrize("objective", ["noise", "balance"])
def test_regions_pass_through_channel_preserving_ops_exactly(kind, objective):
    # Split/Slice, Mul by a constant or a gate, an unfoldable BN and Resize carry the
    # scales of the layer before them: the region reaches the layers behind them.
    g = _carry_graph(kind)
    first = g.nodes[0].name
    before = run(g)
    result = equalize(g, EqualizeOptions(objective=objective, high_bias=False))
    region = next(r for r in result.report.regions if first in r.sources)
    assert len(region.sinks) == (2 if kind in ("slice", "mul_gate") else 1)
    assert not np.allclose(region.scales, 1.0)
    if kind == "batchnorm":
        assert "m" in result.changed
    assert_same_function(g, before)


def test_a_gate_read_by_the_region_is_not_scaled():
    # x * gate where the gate is computed from x through a layer: fine. But a value of
    # the region used as the gate (index 1) would scale the product twice: refused.
    b = Builder(np.random.default_rng(5), zero_channels=False)
    b.g.add_input("x", 3)
    h = b.act(b.conv("x", 3, 8, 3, pad=1), "relu", 8)
    b.g.add_node("mul", [h, h], name="sq", outputs=["sq"])
    b.g.set_outputs([b.conv("sq", 8, 5)])
    b.g.validate()
    report = equalize(b.g).report
    assert report.regions == ()
    assert any("is read by sq" in s.reason for s in report.skipped)


@pytest.mark.parametrize("objective", ["noise", "balance"])
def test_a_scale_draw_is_another_exact_equalization(objective):
    """``scale_draw=k``: the objective's scales times ``exp(0.02 z)`` per channel, ``z``
    drawn with seed ``k``: exact, the same for the same seed, another for another, and
    0 is the objective's own; the summary says so."""

    def scales(draw):
        g = mobilenet_like()
        before = run(g)
        result = equalize(g, EqualizeOptions(objective=objective, scale_draw=draw))
        assert_same_function(g, before)
        return result.report, np.concatenate([r.scales for r in result.report.regions])

    own_report, own = scales(0)
    first_report, first = scales(1)
    _, again = scales(1)
    _, other = scales(2)
    assert np.array_equal(first, again) and not np.array_equal(first, other)
    ratio = np.log(first / own)
    assert 0.005 < np.std(ratio) < 0.05  # the draw's spread, 0.02
    assert np.all(np.abs(ratio) < 0.15)  # 7.5 of its standard deviations
    assert "scales redrawn (scale_draw=1)" in first_report.summary()
    assert "redrawn" not in own_report.summary()
    assert json.loads(first_report.to_json())["options"]["scale_draw"] == 1


@pytest.mark.parametrize("bad", [-1, 1.5, True, "2"])
def test_a_scale_draw_is_a_natural_number(bad):
    with pytest.raises(CLEError, match="scale_draw"):
        EqualizeOptions(scale_draw=bad)
