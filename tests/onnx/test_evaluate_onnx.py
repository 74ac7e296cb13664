"""Quality of ONNX models under onnxruntime's own quantizer (cle_onnx._evaluate)."""

import math

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
import onnx  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

import cle_onnx  # noqa: E402
from cle_core import CLEError  # noqa: E402
from cle_core._quality import deployed_weights, sqnr_db  # noqa: E402
from cle_onnx._evaluate import (  # noqa: E402
    evaluate,
    evaluate_all,
    input_grid_only,
    prepared,
    run,
    static_quantized,
    weights_quantized,
)

_IR = 8  # onnxruntime reads older IR versions than the newest onnx writes


def _model(nodes, inputs, outputs, inits, opset=13):
    graph = helper.make_graph(
        nodes, "g", inputs, outputs, [numpy_helper.from_array(v, k) for k, v in inits.items()]
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = _IR
    onnx.checker.check_model(model)
    return model


def _spread(rng, shape, axis):
    """Random weights whose channels along ``axis`` have ranges 0.01 .. 10."""
    w = rng.normal(size=shape)
    scale_shape = [1] * len(shape)
    scale_shape[axis] = shape[axis]
    return (w * np.geomspace(0.01, 10, shape[axis]).reshape(scale_shape)).astype(np.float32)


def _cnn(opset=13, batch="N", hw=(8, 8)):
    """x -> Conv -> Relu -> Conv -> GAP -> Flatten -> Gemm(transB=1) -> Relu
    -> Gemm(transB=0) -> MatMul: one of each weight layout."""
    rng = np.random.default_rng(0)
    inits = {
        "w1": _spread(rng, (4, 3, 3, 3), 0),
        "b1": rng.normal(size=4).astype(np.float32),
        "w2": _spread(rng, (6, 4, 1, 1), 0),
        "g1": _spread(rng, (5, 6), 0),  # transB=1: (out, in)
        "g1b": rng.normal(size=5).astype(np.float32),
        "g2": _spread(rng, (5, 7), 1),  # transB=0: (in, out)
        "m": _spread(rng, (7, 4), 1),
    }
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], name="conv2"),
        helper.make_node("GlobalAveragePool", ["c2"], ["p"], name="gap"),
        helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "g1", "g1b"], ["h1"], name="gemm1", transB=1),
        helper.make_node("Relu", ["h1"], ["r2"], name="relu2"),
        helper.make_node("Gemm", ["r2", "g2"], ["h2"], name="gemm2", transB=0),
        helper.make_node("MatMul", ["h2", "m"], ["y"], name="matmul"),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, *hw])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 4])
    return _model(nodes, [x], [y], inits, opset)


_AXES = {"w1": 0, "w2": 0, "g1": 0, "g2": 1, "m": 1}  # output-channel axis of each weight


def _spread_pair():
    """x -> Conv (channel ranges 0.01 .. 10) -> Relu -> Conv 1x1: an output that follows
    the weights' rounding smoothly (``_cnn``'s output, through three more layers of
    spread random weights, swings by 15 dB between grids of equal weight SQNR), for
    comparing grids."""
    rng = np.random.default_rng(0)
    inits = {
        "w1": _spread(rng, (8, 3, 3, 3), 0),
        "b1": rng.normal(size=8).astype(np.float32),
        "w2": rng.normal(size=(6, 8, 1, 1)).astype(np.float32),
    }
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2"], ["y"], name="conv2"),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 6, 8, 8])
    return _model(nodes, [x], [y], inits, 13)


def _x(n=10, seed=1, hw=(8, 8)):
    return np.random.default_rng(seed).normal(size=(n, 3, *hw)).astype(np.float32)


def _inits(model):
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def _numpy_cnn(model, x):
    """The reference forward pass of :func:`_cnn` in NumPy (float64)."""
    w = _inits(model)
    pad = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    n, _, h, wd = x.shape
    c1 = np.zeros((n, 4, h, wd))
    for i in range(3):
        for j in range(3):
            c1 += np.einsum("nchw,oc->nohw", pad[:, :, i : i + h, j : j + wd], w["w1"][:, :, i, j])
    r1 = np.maximum(c1 + w["b1"][None, :, None, None], 0)
    f = np.einsum("nchw,oc->no", r1, w["w2"][:, :, 0, 0]) / (h * wd)
    r2 = np.maximum(f @ w["g1"].T + w["g1b"], 0)
    return r2 @ w["g2"] @ w["m"]


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("symmetric", [False, True])
def test_weights_only_replaces_each_weight_by_its_grid_values(per_channel, symmetric):
    model = _cnn()
    before = model.SerializeToString()
    got = _inits(weights_quantized(model, 8, per_channel, symmetric))
    assert model.SerializeToString() == before  # a copy is rounded, not the caller's model
    for name, w in _inits(model).items():
        if name in _AXES:
            # quantize_static's grid: per channel always symmetric, whatever it is told.
            axis = _AXES[name] if per_channel else None
            want = deployed_weights(w, 8, symmetric or per_channel, axis)
            np.testing.assert_array_equal(got[name], want)
        else:  # biases are not layer weights
            np.testing.assert_array_equal(got[name], w)


@pytest.mark.parametrize("batch_dim", ["N", 4])
def test_run_matches_numpy_in_short_and_padded_batches(batch_dim):
    model = _cnn(batch=batch_dim)
    x = _x(10)
    # batch 3 leaves a short last chunk; a fixed batch of 4 pads the last one
    np.testing.assert_allclose(run(model, x, batch=3), _numpy_cnn(model, x), rtol=1e-4, atol=1e-4)


def test_feeds_that_do_not_fit_are_one_clear_error():
    model = _cnn()
    with pytest.raises(CLEError, match="no data for model input 'x'"):
        run(model, {"z": _x()})
    with pytest.raises(CLEError, match="no input"):
        run(model, {"x": _x(), "z": _x()})
    with pytest.raises(CLEError, match="batch must be positive"):
        run(model, _x(), batch=0)


def _qdq_scales(q):
    inits = _inits(q)
    return {n.input[0]: inits[n.input[1]] for n in q.graph.node if n.op_type == "QuantizeLinear"}


@pytest.mark.parametrize("per_channel", [False, True])
def test_static_quantization_is_onnxruntimes_qdq_with_minmax_ranges(per_channel):
    model = _cnn()
    x = _x(12)
    q = static_quantized(prepared(model), x, per_channel=per_channel)
    ops = [n.op_type for n in q.graph.node]
    assert ops.count("QuantizeLinear") >= 3 and "DequantizeLinear" in ops
    # MinMax on the calibration inputs: the graph input's range is the data's.
    scale = float(_qdq_scales(q)["x"])
    assert scale == pytest.approx((x.max() - x.min()) / 255, rel=1e-5)
    weight_scales = [
        numpy_helper.to_array(t)
        for t in q.graph.initializer
        if t.name.endswith("_scale") and "w1" in t.name
    ]
    assert weight_scales and weight_scales[0].size == (4 if per_channel else 1)


def test_the_input_grid_alone_rounds_only_the_inputs_as_the_deployed_model_does():
    model = _cnn()
    x = _x(12)
    ready = prepared(model)
    before = ready.SerializeToString()
    q = static_quantized(ready, x)
    floor = input_grid_only(ready, q)
    assert ready.SerializeToString() == before  # a copy is rounded, not the caller's
    ops = [n.op_type for n in floor.graph.node]
    assert ops.count("QuantizeLinear") == ops.count("DequantizeLinear") == 1
    # the deployed model's own grid for x (uint8, MinMax with 0 inside), nothing else
    q_node = next(n for n in q.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == "x")
    scale, zero = (float(_inits(q)[a]) for a in q_node.input[1:3])
    rounded = (np.clip(np.round(x / scale) + zero, 0, 255) - zero) * scale
    got, want = run(floor, x), run(model, rounded.astype(np.float32))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
    assert not np.allclose(got, run(model, x), rtol=1e-3, atol=1e-3)  # it does round


def test_the_input_grid_alone_is_what_no_equalization_changes():
    """Only with activations rounded, and the same figure for the model and an
    equalized copy whose weight figure differs."""
    model = _cnn()
    x = _x(16)
    eq, report = cle_onnx.equalize_model(model, objective="balance", high_bias=False)
    assert report.regions and any(np.any(r.scales != 1) for r in report.regions)
    res = evaluate_all(model, [None, eq], x, input_grid=True)
    assert all(math.isfinite(r["input_grid_sqnr"]) for r in res)
    assert res[1]["input_grid_sqnr"] == pytest.approx(res[0]["input_grid_sqnr"], abs=1e-3)
    assert abs(res[1]["w8_sqnr"] - res[0]["w8_sqnr"]) > 1.0
    assert "input_grid_sqnr" not in evaluate_all(model, [None], x)[0]  # asked for only
    weights_only = evaluate_all(model, [None], x, activations=False, input_grid=True)
    assert "input_grid_sqnr" not in weights_only[0]


def test_a_model_run_unoptimized_computes_the_same_outputs():
    """``optimized=False`` turns onnxruntime's graph rewrites off, not the arithmetic: a
    float model and its QDQ form give the same outputs (to float rounding) either way."""
    model = _cnn()
    x = _x(8)
    np.testing.assert_allclose(run(model, x, optimized=False), run(model, x), rtol=1e-4, atol=1e-5)
    q = static_quantized(prepared(model), x)
    np.testing.assert_allclose(run(q, x, optimized=False), run(q, x), rtol=1e-4, atol=1e-4)


def test_evaluate_reports_each_variant_against_fp32():
    model = _cnn()
    x = _x(20)
    before = model.SerializeToString()
    res = evaluate(model, inputs=x)
    assert model.SerializeToString() == before  # the caller's model is not touched
    assert set(res) == {"fp32_sqnr", "fp32_top1", "w8_sqnr", "w8_top1", "w8a8_sqnr", "w8a8_top1"}
    assert res["fp32_sqnr"] == math.inf and res["fp32_top1"] == 1.0
    assert math.isfinite(res["w8a8_sqnr"]) and res["w8a8_sqnr"] < res["w8_sqnr"] < 60
    # per channel serves spread channel ranges better, symmetric or not
    pair = _spread_pair()
    for symmetric in (True, False):
        tensor = evaluate(pair, inputs=x, symmetric=symmetric, activations=False)
        channel = evaluate(pair, inputs=x, symmetric=symmetric, per_channel=True, activations=False)
        assert channel["w8_sqnr"] > tensor["w8_sqnr"] + 3

    # W8: exactly the weight-quantized model's figure
    want = sqnr_db(run(model, x), run(weights_quantized(prepared(model)), x))
    assert res["w8_sqnr"] == pytest.approx(want, abs=1e-6)

    # a perturbed candidate is compared with the original in FP32, too
    perturbed = onnx.ModelProto()
    perturbed.CopyFrom(model)
    for t in perturbed.graph.initializer:
        if t.name == "m":
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t) * 1.01, "m"))
    res4 = evaluate(model, perturbed, inputs=x, bits=4)
    assert set(res4) == {"fp32_sqnr", "fp32_top1", "w4_sqnr", "w4_top1", "w4a4_sqnr", "w4a4_top1"}
    assert res4["fp32_sqnr"] == pytest.approx(40.0, rel=1e-3)
    assert res4["w4_sqnr"] < res["w8_sqnr"]


def test_widths_onnxruntime_does_not_offer_are_weights_only():
    model = _cnn()
    with pytest.raises(CLEError, match="4, 8 or 16 bits, not 6"):
        evaluate(model, inputs=_x(), bits=6)
    res = evaluate(model, inputs=_x(), bits=6, activations=False)
    assert set(res) == {"fp32_sqnr", "fp32_top1", "w6_sqnr", "w6_top1"}


def test_an_old_opset_is_quantized_as_a_converted_copy():
    model = _cnn(opset=11)  # QuantizeLinear per channel needs 13
    res = evaluate(model, inputs=_x(12), per_channel=True)
    assert math.isfinite(res["w8a8_sqnr"]) and model.opset_import[0].version == 11


def test_default_inputs_use_the_model_size():
    pytest.importorskip("skimage")
    res = evaluate(_cnn(hw=(32, 32)), activations=False)
    assert math.isfinite(res["w8_sqnr"])
    one_input = _model(
        [helper.make_node("Relu", ["x"], ["y"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
        {},
    )
    with pytest.raises(CLEError, match="NCHW"):
        evaluate(one_input)


def _relu6_pair():
    """x -> Conv(3->8) -> Clip(0, 6) -> Conv(8->4): output channels with very different
    weight ranges, so equalization scales them and the clip bound becomes per channel."""
    rng = np.random.default_rng(3)
    inits = {
        "w1": (_spread(rng, (8, 3, 1, 1), 0) * 2).astype(np.float32),
        "w2": rng.normal(size=(4, 8, 1, 1)).astype(np.float32),
        "lo": np.array(0.0, np.float32),
        "hi": np.array(6.0, np.float32),
    }
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1"),
        helper.make_node("Clip", ["c1", "lo", "hi"], ["r1"], name="relu6"),
        helper.make_node("Conv", ["r1", "w2"], ["y"], name="conv2"),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 8, 8])
    return _model(nodes, [x], [y], inits)


def test_a_scaled_relu6_is_quantized_at_its_bounded_output():
    """The per-channel bound is written as a scalar Clip (the widest bound) and a Min;
    onnxruntime merges the Clip into the convolution and quantizes its output with a
    range that the scalar bound limits, instead of the unbounded range of a bare Relu."""
    model = _relu6_pair()
    x = _x(16) * 4  # pre-activations far beyond the bounds: the clip is active
    equalized, report = cle_onnx.equalize_model(model, objective="balance")
    assert report.regions
    assert sqnr_db(run(model, x), run(equalized, x)) > 100
    ops = [n.op_type for n in equalized.graph.node]
    assert ops == ["Conv", "Clip", "Min", "Conv"]
    bounds = _inits(equalized)[equalized.graph.node[2].input[1]].reshape(-1)
    assert np.ptp(bounds) > 0  # the bound really is per channel
    q = static_quantized(prepared(equalized), x)
    assert "Clip" not in [n.op_type for n in q.graph.node]  # merged into the Conv
    conv_out = next(n for n in q.graph.node if n.op_type == "Conv").output[0]
    scale = float(_qdq_scales(q)[conv_out])
    assert scale * 255 <= bounds.max() * (1 + 1e-5)


def test_a_model_the_preprocessing_refuses_is_quantized_as_it_is(monkeypatch, caplog):
    import cle_onnx._evaluate as ev

    def refuse(*args, **kwargs):
        raise RuntimeError("unsupported op")

    monkeypatch.setattr(ev, "quant_pre_process", refuse)
    model = _cnn()
    with caplog.at_level("WARNING", logger="cle_onnx._evaluate"):
        ready = prepared(model)
    assert "quant_pre_process failed (unsupported op)" in caplog.text
    assert ready.SerializeToString() == model.SerializeToString()
    assert math.isfinite(evaluate(model, inputs=_x(12))["w8a8_sqnr"])


def test_a_float16_model_is_quantized_as_its_float32_copy():
    """onnxruntime's optimizer runs float16 layers behind Casts, which its quantizer
    takes for activations: W8 used to quantize nothing (W8 = FP32) and per-channel
    weights were per-tensor activation grids. Every float16 value is exact in float32,
    so the float16 model's figures are the float32 model's, near enough."""
    from tests.helpers.onnx_models import to_float16

    model = _cnn()
    half = to_float16(model)
    x = _x(12)
    res32, res16 = (evaluate(m, inputs=x) for m in (model, half))
    assert res16["w8_sqnr"] < 50
    assert res16["w8_sqnr"] == pytest.approx(res32["w8_sqnr"], abs=1)
    assert res16["w8a8_sqnr"] == pytest.approx(res32["w8a8_sqnr"], abs=1.5)
    pair = to_float16(_spread_pair())
    tensor = evaluate(pair, inputs=x, activations=False)
    per_channel = evaluate(pair, inputs=x, per_channel=True, activations=False)
    assert per_channel["w8_sqnr"] > tensor["w8_sqnr"] + 3
    q = static_quantized(prepared(half), x, per_channel=True)
    weight_scales = [
        numpy_helper.to_array(t)
        for t in q.graph.initializer
        if t.name.endswith("_scale") and "w1" in t.name
    ]
    assert [s.size for s in weight_scales] == [4]  # w1's own grid, one per output channel
    assert "Cast" not in [n.op_type for n in q.graph.node]


def test_cle_evaluate_quantizes_the_weights_of_a_float16_model(tmp_path, capsys):
    from cle_core._cli import main
    from tests.helpers.onnx_models import gemm_head, to_float16

    src = tmp_path / "half.onnx"
    onnx.save(to_float16(gemm_head(1)), str(src))
    npy = tmp_path / "x.npy"
    np.save(npy, _x(4))
    for extra in ([], ["--weights-only"]):
        assert main(["evaluate", str(src), "--inputs", str(npy), *extra]) == 0
        out = capsys.readouterr().out.splitlines()
        assert out[0].startswith(f"evaluate: inputs from {npy}: x (4, 3, 8, 8) float32")
        row = out[2].split()
        fp32, w8 = float(row[1]), float(row[2])
        assert w8 < fp32 - 20, row
        # the floor no equalization lowers, where activations are rounded
        floor = [line for line in out if line.startswith("the input's own grid alone: ")]
        assert len(floor) == (0 if extra else 1), out


def test_what_cannot_be_measured_is_one_clear_error(monkeypatch):
    """The Python API refuses what ``cle evaluate`` refuses (see test_evaluate_errors),
    naming the model and its input or output."""
    model, x = _cnn(), _x(8)
    log = _model(
        [helper.make_node("Log", ["x"], ["y"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
        {},
    )
    with pytest.raises(CLEError, match="the FP32 model: output 'y' is NaN or Inf"):
        evaluate(log, inputs=-np.ones((4, 3), np.float32))  # finite inputs, NaN outputs
    with pytest.raises(CLEError, match=r"the candidate does not fit the FP32 model: its input 'x'"):
        evaluate(model, _cnn(hw=(16, 16)), inputs=x)
    with pytest.raises(CLEError, match=r"'x'.* \(8, 3, 8, 8\)"):
        evaluate(_cnn(hw=(16, 16)), inputs=x)
    ints = _model(
        [helper.make_node("Cast", ["x"], ["y"], to=TensorProto.FLOAT)],
        [helper.make_tensor_value_info("x", TensorProto.INT64, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3, 8, 8])],
        {},
    )
    with pytest.raises(CLEError, match="'x' takes int64 values, which images cannot"):
        evaluate(ints)

    import cle_onnx._evaluate as ev

    def calibrator_fails(*args, **kwargs):
        raise AssertionError("scale issue")

    monkeypatch.setattr(ev, "quantize_static", calibrator_fails)
    with pytest.raises(CLEError, match="the FP32 model: onnxruntime's quantize_static failed"):
        evaluate(model, inputs=x)


@pytest.mark.parametrize("activations", [True, False])
def test_deployed_only_gives_the_deployments_figure_alone(activations):
    """``deployed_only``: only the deployment's figure, equal to the full evaluation's,
    and a candidate whose output does not fit is still refused."""
    from cle_core import Deployment

    model, x = _cnn(), _x(12)
    eq, _ = cle_onnx.equalize_model(model, objective="balance", high_bias=False)
    dep = Deployment(activation_bits=8 if activations else None)
    key = "w8a8" if activations else "w8"
    full = evaluate_all(model, [None, eq], x, deployment=dep, calibration=x[:6])
    alone = evaluate_all(
        model, [None, eq], x, deployment=dep, calibration=x[:6], deployed_only=True
    )
    for f, a in zip(full, alone, strict=True):
        assert set(a) == {f"{key}_sqnr", f"{key}_top1"}
        assert a == {k: f[k] for k in a}
    assert alone[0] != alone[1]
    # declared (N, c) but computing (N, 8): found when it runs
    wider = _cnn()
    wider.graph.node[-1].output[0] = "y0"
    wider.graph.node.append(helper.make_node("Concat", ["y0", "y0"], ["y"], axis=1))
    wider.graph.output[0].type.tensor_type.shape.dim[1].dim_param = "c"
    with pytest.raises(CLEError, match=r"does not fit the FP32 model: its output has shape"):
        evaluate_all(model, [wider], x, deployment=dep, calibration=x[:6], deployed_only=True)
