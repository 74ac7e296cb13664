"""Simulated quantization of ONNX models (cle_onnx._quantsim), checked against NumPy."""

import math

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from cle_core._quality import quantization_grid, quantize_array  # noqa: E402
from cle_onnx._quantsim import (  # noqa: E402
    activation_quantized,
    activation_ranges,
    evaluate,
    run,
    weight_quantized,
)

# onnxruntime reads older IR versions than the newest onnx writes.
_IR = 8


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


_AXES = {"w1": 0, "w2": 0, "g1": 0, "g2": 1, "m": 1}


def _x(n=10, seed=1):
    return np.random.default_rng(seed).normal(size=(n, 3, 8, 8)).astype(np.float32)


def _with_inits(model, values):
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for t in out.graph.initializer:
        if t.name in values:
            t.CopyFrom(numpy_helper.from_array(values[t.name], t.name))
    return out


def _inits(model):
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def _ops(model, op):
    return [n for n in model.graph.node if n.op_type == op]


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("symmetric", [False, True])
def test_weight_qdq_equals_fake_quantized_initializers(per_channel, symmetric):
    model = _cnn()
    before = model.SerializeToString()
    wq = weight_quantized(model, per_channel=per_channel, symmetric=symmetric)
    assert model.SerializeToString() == before  # input untouched
    onnx.checker.check_model(wq)
    qs = _ops(wq, "QuantizeLinear")
    assert sorted(q.input[0] for q in qs) == sorted(_AXES)
    zp_type = TensorProto.INT8 if symmetric else TensorProto.UINT8
    inits = {t.name: t for t in wq.graph.initializer}
    for q in qs:
        assert inits[q.input[2]].data_type == zp_type
        axis = [a.i for a in q.attribute if a.name == "axis"]
        assert axis == ([_AXES[q.input[0]]] if per_channel else [])
    # biases are not quantized
    assert {q.input[0] for q in qs}.isdisjoint({"b1", "g1b"})

    fake = {
        k: quantize_array(v, 8, symmetric, _AXES[k] if per_channel else None)
        for k, v in _inits(model).items()
        if k in _AXES
    }
    x = _x()
    np.testing.assert_allclose(run(wq, x), run(_with_inits(model, fake), x), rtol=0, atol=1e-5)
    assert not np.allclose(run(wq, x), run(model, x), atol=1e-5)


def test_weight_other_bit_widths_fake_quantize_initializers():
    model = _cnn()
    wq = weight_quantized(model, bits=4, per_channel=True)
    onnx.checker.check_model(wq)
    assert not _ops(wq, "QuantizeLinear")
    got, orig = _inits(wq), _inits(model)
    for name, axis in _AXES.items():
        np.testing.assert_array_equal(got[name], quantize_array(orig[name], 4, False, axis))
    np.testing.assert_array_equal(got["b1"], orig["b1"])
    run(wq, _x())


def test_per_channel_needs_opset_13_else_fake_quantized():
    model = _cnn(opset=12)
    wq = weight_quantized(model, per_channel=True)
    onnx.checker.check_model(wq)
    assert not _ops(wq, "QuantizeLinear")
    assert len(_ops(weight_quantized(model, per_channel=False), "QuantizeLinear")) == 5
    fake = {
        k: quantize_array(v, 8, False, _AXES[k]) for k, v in _inits(model).items() if k in _AXES
    }
    x = _x()
    np.testing.assert_allclose(run(wq, x), run(_with_inits(model, fake), x), atol=1e-5)


def _shared_model():
    """x -> MatMul(w) -> Relu -> MatMul(w) and w also feeds an Add: shared weight."""
    w = np.random.default_rng(2).normal(size=(4, 4)).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["a"], name="mm1"),
        helper.make_node("Relu", ["a"], ["r"], name="relu"),
        helper.make_node("MatMul", ["r", "w"], ["b"], name="mm2"),
        helper.make_node("Add", ["b", "w"], ["y"], name="add"),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])
    return _model(nodes, [x], [y], {"w": w}), w


def test_shared_initializer_quantized_once():
    model, w = _shared_model()
    wq = weight_quantized(model, per_channel=True)
    onnx.checker.check_model(wq)
    (q,) = _ops(wq, "QuantizeLinear")
    (dq,) = _ops(wq, "DequantizeLinear")
    mm = _ops(wq, "MatMul")
    assert [n.input[1] for n in mm] == [dq.output[0]] * 2
    assert _ops(wq, "Add")[0].input[1] == "w"  # not a weight slot: keeps the float value

    x = np.random.default_rng(3).normal(size=(4, 4)).astype(np.float32)  # Add broadcasts w
    wf = quantize_array(w, axis=1)
    expected = np.maximum(x @ wf, 0) @ wf + w
    np.testing.assert_allclose(run(wq, x), expected, rtol=1e-5, atol=1e-5)

    # the fake-quantized path adds a new initializer since w has another reader
    w4 = weight_quantized(model, bits=4)
    inits = _inits(w4)
    np.testing.assert_array_equal(inits["w"], w)
    (new,) = {n.input[1] for n in _ops(w4, "MatMul")}
    np.testing.assert_array_equal(inits[new], quantize_array(w, 4))


def _gemm_model(batch="N", opset=13):
    """x -> Gemm(transB=1) -> Relu -> MatMul: layer inputs are x and the Relu output."""
    rng = np.random.default_rng(4)
    w1 = rng.normal(size=(5, 4)).astype(np.float32)
    b1 = rng.normal(size=5).astype(np.float32)
    w2 = rng.normal(size=(5, 3)).astype(np.float32)
    nodes = [
        helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], name="gemm", transB=1),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("MatMul", ["r", "w2"], ["y"], name="matmul"),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 3])
    model = _model(nodes, [x], [y], {"w1": w1, "b1": b1, "w2": w2}, opset)
    return model, (w1, b1, w2)


def _numpy_gemm(x, w1, b1, w2):
    r = np.maximum(x @ w1.T + b1, 0)
    return r, r @ w2


@pytest.mark.parametrize("batch_dim", ["N", 4])
def test_run_and_activation_ranges_match_numpy(batch_dim):
    model, (w1, b1, w2) = _gemm_model(batch_dim)
    x = np.random.default_rng(5).normal(size=(10, 4)).astype(np.float32)
    r, y = _numpy_gemm(x, w1, b1, w2)
    # batch 3 leaves a short last chunk; a fixed batch of 4 pads the last one
    np.testing.assert_allclose(run(model, x, batch=3), y, rtol=1e-5, atol=1e-5)
    ranges = activation_ranges(model, {"x": x}, batch=3)
    assert list(ranges) == ["x", "r"]
    np.testing.assert_allclose(ranges["x"], (x.min(), x.max()), rtol=1e-6)
    np.testing.assert_allclose(ranges["r"], (r.min(), r.max()), rtol=1e-5, atol=1e-6)


def _fake_quant_np(x, lo, hi, bits, symmetric):
    scale, zp, qmin, qmax = quantization_grid(lo, hi, bits, symmetric)
    s, z = np.float32(scale), np.float32(zp)
    return (np.clip(np.round(x / s) + z, qmin, qmax) - z) * s


@pytest.mark.parametrize(
    ("bits", "symmetric", "opset"),
    [(8, False, 13), (8, True, 13), (8, True, 10), (4, False, 13), (5, True, 11)],
)
def test_activation_quantized_matches_numpy(bits, symmetric, opset):
    # symmetric 8 bits clips at -127 steps (int8 alone would reach -128): a Clip with
    # inputs from opset 11, with attributes before
    model, (w1, b1, _) = _gemm_model(opset=opset)
    model.graph.node.pop()  # drop the MatMul: x is the only layer input
    del model.graph.output[:]
    model.graph.output.append(helper.make_tensor_value_info("h", TensorProto.FLOAT, ["N", 5]))
    del model.graph.initializer[2]
    onnx.checker.check_model(model)

    x = np.random.default_rng(6).normal(size=(12, 4)).astype(np.float32)
    lo, hi = 0.3, 1.2  # narrower than the data: clipping on both ends, range grows to 0
    aq = activation_quantized(model, {"x": (lo, hi)}, bits=bits, symmetric=symmetric)
    onnx.checker.check_model(aq)
    assert len(_ops(aq, "QuantizeLinear")) == (1 if bits == 8 else 0)
    expected = _fake_quant_np(x, lo, hi, bits, symmetric) @ w1.T + b1
    np.testing.assert_allclose(run(aq, x), expected, rtol=1e-5, atol=1e-5)


def test_activation_quantized_all_layers_and_missing_range():
    model = _cnn()
    x = _x()
    ranges = activation_ranges(model, x)
    assert list(ranges) == ["x", "r1", "f", "r2", "h2"]
    aq = activation_quantized(model, ranges)
    onnx.checker.check_model(aq)
    assert [q.input[0] for q in _ops(aq, "QuantizeLinear")] == list(ranges)
    # the layers read the quantized values, the Relu and GAP keep their float inputs
    dq_outputs = {n.output[0] for n in _ops(aq, "DequantizeLinear")}
    layer_inputs = [n.input[0] for n in aq.graph.node if n.op_type in ("Conv", "Gemm", "MatMul")]
    assert set(layer_inputs) <= dq_outputs
    assert _ops(aq, "GlobalAveragePool")[0].input[0] == "c2"
    assert np.all(np.isfinite(run(aq, x)))
    ranges.pop("r2")
    with pytest.raises(KeyError, match="r2"):
        activation_quantized(model, ranges)


def test_activation_quantized_after_weight_qdq():
    model = _cnn()
    wq = weight_quantized(model, per_channel=True)
    ranges = activation_ranges(wq, _x())
    # the MatMul weight now comes from a DequantizeLinear; it is still a layer
    assert list(ranges) == ["x", "r1", "f", "r2", "h2"]
    onnx.checker.check_model(activation_quantized(wq, ranges))


def test_evaluate_tiny_model():
    model = _cnn()
    x = _x(20)
    res = evaluate(model, inputs=x)
    assert set(res) == {"fp32_sqnr", "fp32_top1", "w8_sqnr", "w8_top1", "w8a8_sqnr", "w8a8_top1"}
    assert res["fp32_sqnr"] == math.inf and res["fp32_top1"] == 1.0
    for key in ("w8_sqnr", "w8a8_sqnr"):
        assert math.isfinite(res[key])
    for key in ("w8_top1", "w8a8_top1"):
        assert 0.0 <= res[key] <= 1.0

    # per channel serves the spread channel ranges better
    assert (
        evaluate(model, inputs=x, per_channel=True, activations=False)["w8_sqnr"] > (res["w8_sqnr"])
    )

    # a perturbed candidate is compared with the original in FP32, too
    perturbed = {k: v * 1.01 for k, v in _inits(model).items() if k == "m"}
    res4 = evaluate(model, _with_inits(model, perturbed), inputs=x, bits=4)
    assert set(res4) == {"fp32_sqnr", "fp32_top1", "w4_sqnr", "w4_top1", "w4a4_sqnr", "w4a4_top1"}
    assert res4["fp32_sqnr"] == pytest.approx(-20 * math.log10(0.01), rel=1e-3)
    assert res4["w4_sqnr"] < res["w8_sqnr"]


def test_evaluate_default_inputs_use_model_size():
    pytest.importorskip("skimage")
    model, _ = _shared_model()
    with pytest.raises(ValueError, match="NCHW"):
        evaluate(model)
    # natural_images at 32 x 32 (tiny sizes take longer: a wide anti-aliasing filter)
    cnn = _cnn(hw=(32, 32))
    res = evaluate(cnn, activations=False)
    assert math.isfinite(res["w8_sqnr"])
