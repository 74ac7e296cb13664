"""``deployed_weights`` is the weight onnxruntime's ``quantize_static`` deploys, bit for bit.

Each model holds one weight of every layout (Conv with and without bias, ConvTranspose,
Gemm with ``transB`` 1 and 0, MatMul with a constant weight). It is quantized by
``cle_onnx._evaluate.static_quantized`` (QDQ), and each weight's DequantizeLinear is
evaluated from the initializers it reads, ``(q - zero_point) * scale`` in float32: that
is the weight the deployed model multiplies with.
"""

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
import onnx  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from cle_core import Deployment  # noqa: E402
from cle_core.quality import deployed_weights  # noqa: E402
from cle_onnx._evaluate import static_quantized  # noqa: E402

_STEP = np.float32(2.0**-6)

# weight name -> (its layer, onnxruntime's per-channel axis for it)
_LAYERS = {
    "wc1": ("conv1", 0),
    "wc2": ("conv2", 0),
    "wt": ("convt", 1),
    "wg1": ("gemm1", 0),  # transB=1: (out, in)
    "wg2": ("gemm2", 1),  # transB=0: (in, out)
    "wm": ("matmul", 1),
}
_BIASES = {"wc1": "bc1", "wg1": "bg1"}
_SHAPES = {
    "wc1": (6, 3, 3, 3),
    "wc2": (5, 6, 1, 1),
    "wt": (5, 4, 2, 2),  # ConvTranspose: (in, out, kh, kw)
    "wg1": (7, 4),
    "wg2": (7, 6),
    "wm": (6, 5),
}


def _decades(rng, shape, axis):
    """Normal weights whose slices along ``axis`` have ranges from 1e-3 to 1e2, so one
    per-tensor grid rounds the small ones to few levels or to 0."""
    scale_shape = [1] * len(shape)
    scale_shape[axis] = shape[axis]
    spread = np.geomspace(1e-3, 1e2, shape[axis]).reshape(scale_shape)
    return (rng.normal(size=shape) * spread).astype(np.float32)


def _ties(rng, shape, axis, lowest):
    """Multiples of half a step of 2**-6: every slice along ``axis`` reaches
    ``lowest * 2**-6`` and ``127 * 2**-6``, so the grid's step is exactly 2**-6 (for
    ``lowest=-127`` symmetric int8, for ``lowest=-128`` asymmetric int8, zero point 0)
    and about half the values lie exactly halfway between two levels."""
    w = rng.integers(2 * lowest, 255, size=shape).astype(np.float32) / 2 * _STEP
    w = np.moveaxis(w, axis, 0)
    flat = w.reshape(w.shape[0], -1)
    flat[:, 0] = lowest * _STEP
    flat[:, 1] = 127 * _STEP
    return np.moveaxis(flat.reshape(w.shape), 0, axis)


def _weights(kind: str) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(20)
    out = {}
    for name, (_, axis) in _LAYERS.items():
        shape = _SHAPES[name]
        if kind == "decades":
            out[name] = _decades(rng, shape, axis)
        else:
            out[name] = _ties(rng, shape, axis, -127 if kind == "ties_symmetric" else -128)
    if kind == "decades":
        # an all-zero channel and one below the smallest normal float32's range: both
        # get scale 1 from onnxruntime, so they deploy as zeros
        out["wc2"][1] = 0.0
        out["wc2"][2] = np.float32(1e-39) * rng.normal(size=(6, 1, 1)).astype(np.float32)
    return out


def _biases() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    return {
        "bc1": (0.1 * rng.normal(size=6)).astype(np.float32),
        "bg1": (0.1 * rng.normal(size=7)).astype(np.float32),
    }


def _model(weights: dict[str, np.ndarray]) -> onnx.ModelProto:
    """x -> Conv(bias) -> Relu -> Conv -> ConvTranspose -> GAP -> Flatten ->
    Gemm(transB=1) -> Gemm(transB=0) -> MatMul."""
    inits = {**weights, **_biases()}
    # at 16 bits, onnxruntime widens the scales of wc1's small channels for these biases
    nodes = [
        helper.make_node("Conv", ["x", "wc1", "bc1"], ["c1"], name="conv1", pads=[1] * 4),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu"),
        helper.make_node("Conv", ["r1", "wc2"], ["c2"], name="conv2"),
        helper.make_node("ConvTranspose", ["c2", "wt"], ["t"], name="convt", strides=[2, 2]),
        helper.make_node("GlobalAveragePool", ["t"], ["p"], name="gap"),
        helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "wg1", "bg1"], ["g1"], name="gemm1", transB=1),
        helper.make_node("Gemm", ["g1", "wg2"], ["g2"], name="gemm2"),
        helper.make_node("MatMul", ["g2", "wm"], ["y"], name="matmul"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5])],
        [numpy_helper.from_array(v, k) for k, v in inits.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _deployed(quantized: onnx.ModelProto) -> dict[str, tuple[np.ndarray, int | None, float]]:
    """Each layer's weight as its DequantizeLinear computes it, the DQ's axis (None per
    tensor) and the scale of the layer's quantized input, by the original weight's name."""
    inits = {t.name: numpy_helper.to_array(t) for t in quantized.graph.initializer}
    producer = {out: n for n in quantized.graph.node for out in n.output}
    by_layer = {n.name: n for n in quantized.graph.node}
    out = {}
    for name, (layer, _) in _LAYERS.items():
        dq = producer[by_layer[layer].input[1]]
        assert dq.op_type == "DequantizeLinear"
        q = inits[dq.input[0]]
        assert q.dtype.kind in "iu" or "int" in q.dtype.name  # int4 comes as ml_dtypes
        scale = inits[dq.input[1]]
        zero_point = inits[dq.input[2]] if len(dq.input) > 2 else np.zeros_like(scale)
        assert scale.dtype == np.float32
        axis = next((a.i for a in dq.attribute if a.name == "axis"), None)
        if scale.ndim == 0:
            axis = None
        else:  # per channel: one scale per slice along axis
            shape = [1] * q.ndim
            shape[axis] = -1
            scale, zero_point = scale.reshape(shape), zero_point.reshape(shape)
        w = (q.astype(np.int32) - zero_point.astype(np.int32)).astype(np.float32) * scale
        assert w.dtype == np.float32
        input_scale = inits[producer[by_layer[layer].input[0]].input[1]]
        out[name] = (w, axis, input_scale)
    return out


def _quantize(weights, bits, per_channel, symmetric):
    dep = Deployment(
        weight_bits=bits,
        per_channel=per_channel,
        weight_symmetric=symmetric,
        activation_bits=bits,
    )
    x = np.random.default_rng(2).normal(size=(4, 3, 6, 6)).astype(np.float32)
    return _deployed(static_quantized(_model(weights), x, deployment=dep))


_CASES = [
    *[("decades", bits) for bits in (4, 8, 16)],
    ("ties_symmetric", 8),
    ("ties_asymmetric", 8),
]


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize(("kind", "bits"), _CASES)
def test_deployed_weights_equal_what_quantize_static_writes(kind, bits, per_channel, symmetric):
    weights = _weights(kind)
    got = _quantize(weights, bits, per_channel, symmetric)
    biases = _biases()
    for name, w in weights.items():
        deployed, axis, input_scale = got[name]
        want_axis = _LAYERS[name][1] if per_channel else None
        assert axis == want_axis, name
        # onnxruntime quantizes per-channel weights symmetric whatever WeightSymmetric says
        sym = symmetric or per_channel
        if name in _BIASES:
            bias = biases[_BIASES[name]]
            ours = deployed_weights(w, bits, sym, axis, bias=bias, input_scale=input_scale)
        else:
            ours = deployed_weights(w, bits, sym, axis)
        assert ours.dtype == np.float32
        np.testing.assert_array_equal(ours, deployed, err_msg=f"{name} ({kind}, W{bits})")


def test_the_cases_exercise_ties_clipping_and_zero_channels():
    # the comparison above could pass on data that never reaches the hard cases: these
    # weights do. Ties: halfway values round to the even level (numpy / QuantizeLinear),
    # not away from zero.
    w = _weights("ties_symmetric")["wc1"]
    on_grid = deployed_weights(w, 8, True) / _STEP
    ties = (w / _STEP) % 1 == 0.5
    assert ties.mean() > 0.3
    np.testing.assert_array_equal(on_grid[ties] % 2, 0)
    np.testing.assert_array_equal(on_grid, np.round(w / _STEP))
    # asymmetric int8 uses -128: step 2**-6 and zero point 0 over -128 .. 127 steps, while
    # the symmetric grid of the same weights has the step 128 / 127 * 2**-6
    w = _weights("ties_asymmetric")["wm"]
    np.testing.assert_array_equal(deployed_weights(w, 8, False) / _STEP, np.round(w / _STEP))
    assert np.any(deployed_weights(w, 8, True) / _STEP % 1 != 0)
    # symmetric int4 is onnxruntime's whole -8 .. 7: the top of the range is clipped
    w = np.array([-3.75, 3.75], np.float32)
    np.testing.assert_array_equal(deployed_weights(w, 4, True), [-4.0, 3.5])
    # the zero and subnormal channels deploy as zeros
    w = _weights("decades")["wc2"]
    assert np.any(w[2] != 0)
    np.testing.assert_array_equal(deployed_weights(w, 8, True, 0)[1:3], 0.0)


def test_sixteen_bit_scales_widened_for_the_bias_are_reproduced():
    # the case the bias and input_scale arguments exist for: without them, the W16 conv
    # weight differs from the deployed one
    weights = _weights("decades")
    deployed, axis, input_scale = _quantize(weights, 16, True, True)["wc1"]
    bias = _biases()["bc1"]
    widened = deployed_weights(weights["wc1"], 16, True, axis, bias=bias, input_scale=input_scale)
    np.testing.assert_array_equal(widened, deployed)
    assert np.any(deployed_weights(weights["wc1"], 16, True, axis) != deployed)
    # at 8 bits the same bias leaves the grid alone
    assert np.array_equal(
        deployed_weights(weights["wc1"], 8, True, axis, bias=bias, input_scale=input_scale),
        deployed_weights(weights["wc1"], 8, True, axis),
    )
