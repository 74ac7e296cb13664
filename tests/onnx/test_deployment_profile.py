"""The onnxruntime profile places activation grids where ``quantize_static`` does.

For each model: the tensors onnxruntime's QDQ output quantizes (the inputs of its
activation QuantizeLinear nodes) against the points the profile reads off the IR, and
the same after equalization, where a ReLU6 whose scales differ becomes a scalar Clip
(merged into the layer's grid) and a per-channel Min (its reader rounds again).
"""

from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

import cle_onnx  # noqa: E402
from cle_core import Deployment, EqualizeOptions, equalize  # noqa: E402
from cle_core._deployment import get_profile  # noqa: E402
from cle_core._fold import shared_param_owners  # noqa: E402
from cle_core._regions import find_regions  # noqa: E402
from cle_onnx._evaluate import prepared, static_quantized  # noqa: E402
from cle_onnx._translate import to_ir  # noqa: E402
from tests.helpers import onnx_models as om  # noqa: E402
from tests.helpers.onnx_models import OnnxBuilder  # noqa: E402


def _quantized_tensors(model) -> set[str]:
    """What onnxruntime puts an activation grid on: the inputs of the QuantizeLinear
    nodes whose input is not an initializer (a weight or a bias). A graph output it
    quantizes is renamed ``<name>_QuantizeLinear_Input``: the name is taken back."""
    x = np.random.default_rng(0).normal(size=(4, 3, 8, 8)).astype(np.float32)
    q = static_quantized(prepared(model), x)
    inits = {t.name for t in q.graph.initializer}
    return {
        n.input[0].removesuffix("_QuantizeLinear_Input")
        for n in q.graph.node
        if n.op_type == "QuantizeLinear" and n.input[0] not in inits
    }


def _profile_points(model) -> set[str]:
    """The profile's grids on the IR after batch-norm folding (onnxruntime's
    pre-processing fuses them too; the fused layer writes the BN's output name)."""
    graph, _ = to_ir(model)
    alias = {n.inputs[0].name: n.outputs[0].name for n in graph.nodes if n.op == "batchnorm"}
    equalize(graph, EqualizeOptions(scale=False, high_bias=False))
    points = get_profile("onnxruntime").points(graph)
    return {alias.get(p.value.name, p.value.name) for p in points}


def _relu6_residual_pool():
    """Conv -> ReLU6 -> Conv (+ skip) -> Add -> AveragePool -> Conv -> Relu -> GAP ->
    Flatten -> Gemm: merged activations, a residual Add, a requantized pool."""
    b = OnnxBuilder(seed=3)
    h = b.relu6(b.conv("x", 3, 8, k=3, pad=1))
    a = b.conv(h, 8, 8)
    s = b.node("Add", [a, b.conv("x", 3, 8)])
    p = b.node("AveragePool", [s], kernel_shape=[2, 2], strides=[2, 2])
    r = b.node("Relu", [b.conv(p, 8, 6)])
    g = b.node("GlobalAveragePool", [r])
    f = b.node("Flatten", [g])
    y = b.node("Gemm", [f, b.init(b.spread((4, 6))), b.init(np.zeros(4))], transB=1)
    graph = onnx.helper.make_graph(
        b.nodes,
        "pool",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [4, 3, 8, 8])],
        [onnx.helper.make_tensor_value_info(y, onnx.TensorProto.FLOAT, [4, 4])],
        b.inits,
    )
    return onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 13)])


MODELS = {
    "relu6_chain": lambda: om.relu6_chain(13),
    "residual_and_concat": om.residual_and_concat,
    "relu6_residual_pool": _relu6_residual_pool,
    "conv_pair_relu": lambda: om.conv_pair("relu"),
}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_the_profile_places_the_grids_quantize_static_places(name):
    model = MODELS[name]()
    assert _profile_points(model) == _quantized_tensors(model)


def test_after_scaling_a_relu6_gets_a_second_grid_behind_its_bound():
    """Equalized with scales that differ, each ReLU6 is written as Clip, Min: onnxruntime
    quantizes the Clip's output (merged into the layer) and, at the next layer, the
    Min's. The profile, told which clips scaling carries, has both: the pre-bound grid on
    the layer's output and the conditional grid on the clip's output."""
    model = om.relu6_chain(13)
    eq, report = cle_onnx.equalize_model(model, objective="balance", high_bias=False)
    assert report.regions
    ort_points = _quantized_tensors(eq)
    mins = [n for n in eq.graph.node if n.op_type == "Min"]
    assert mins and {n.output[0] for n in mins} <= ort_points
    clips = [n for n in eq.graph.node if n.op_type == "Clip"]
    assert {n.output[0] for n in clips} <= ort_points
    graph, _ = to_ir(model)
    graph.validate()
    regions, _ = find_regions(graph, shared_param_owners(graph))
    carried = frozenset(id(c) for r in regions for c, _ in r.clips)
    points = get_profile("onnxruntime").points(graph, carried)
    kinds = {(p.kind, p.unless_uniform is not None) for p in points}
    assert ("pre_bound", False) in kinds and ("tensor", True) in kinds
    # One pre-bound and one conditional grid per carried clip: as many as onnxruntime's
    # Clip and Min grids.
    assert sum(p.kind == "pre_bound" for p in points) == len(clips)
    assert sum(p.unless_uniform is not None for p in points) == len(mins)


def test_equal_scales_leave_one_grid():
    """A region scaled by one number keeps a scalar clip: the conditional grid is 0."""
    from cle_core._estimate import Estimate
    from cle_core._gains import propagate
    from cle_core._stats import estimate, positions

    graph, _ = to_ir(om.relu6_chain(13))
    equalize(graph, EqualizeOptions(scale=False, high_bias=False))
    regions, _ = find_regions(graph, shared_param_owners(graph))
    stats, derivatives = estimate(graph)
    counts = positions(graph)
    gains = propagate(graph, counts, derivatives)
    est = Estimate(graph, regions, Deployment(), stats, gains, counts)
    conditional = [t for t in est.activations if t.point.unless_uniform is not None]
    assert conditional
    ones = est.ones()
    assert all(v == 0.0 for v in (t.values(np.ones((1, t.lo.size)))[0] for t in conditional))
    spread = [np.exp(np.linspace(-1, 1, r.size)) for r in regions]
    assert est.total(spread) > 0 and est.total(ones) > 0
    uneven = est.activation_values(spread)
    assert any(
        v > 0 for t, v in zip(est.activations, uneven, strict=True) if t.point.unless_uniform
    )


@pytest.mark.parametrize("groups", [1, 2, 4])
def test_per_channel_grids_of_a_grouped_conv_transpose_are_shared_as_the_profile_says(groups):
    """``quantize_static(per_channel=True)`` quantizes a ConvTranspose weight ``(in,
    out / groups, kh, kw)`` along axis 1: ``out / groups`` scales, each shared by that
    row of every group; the profile's ``groups_share_row_grids`` says the same, which
    the estimate's per-channel weight terms follow."""
    model = _deconv(groups)
    x = np.random.default_rng(0).normal(size=(4, 4, 8, 8)).astype(np.float32)
    q = static_quantized(prepared(model), x, deployment=Deployment(per_channel=True))
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in q.graph.initializer}
    (dq,) = [n for n in q.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits]
    assert inits[dq.input[1]].size == 4 // groups
    assert next(a.i for a in dq.attribute if a.name == "axis") == 1
    ir, _ = to_ir(model)
    (node,) = [n for n in ir.nodes if n.op == "conv_transpose"]
    profile = get_profile("onnxruntime")
    assert profile.groups_share_row_grids(node) == (groups > 1)


def _deconv(groups: int, then_conv: bool = False):
    """A ConvTranspose with ``groups`` (stride 2, 4 channels), optionally read by a
    Relu and a Conv (a region through it)."""
    b = OnnxBuilder(seed=5)
    w = b.init(b.spread((4, 4 // groups, 2, 2)))
    y = b.node("ConvTranspose", ["x", w], group=groups, strides=[2, 2])
    if then_conv:
        y = b.conv(b.node("Relu", [y]), 4, 4)
    graph = onnx.helper.make_graph(
        b.nodes,
        "deconv",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [4, 4, 8, 8])],
        [onnx.helper.make_tensor_value_info(y, onnx.TensorProto.FLOAT, [4, 4, 16, 16])],
        b.inits,
    )
    return onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 13)])


@pytest.mark.parametrize("per_channel", [False, True])
def test_weights_only_equalization_leaves_the_given_model_and_file_as_they_were(
    per_channel, tmp_path
):
    """The weights-only search (no gain floor, a start from the balance) and the grouped
    ConvTranspose's shared grids change the scales only: the caller's proto and the
    source file keep their bytes, the result computes what the model computed."""
    model = _deconv(4, then_conv=True)
    path = tmp_path / "deconv.onnx"
    onnx.save(model, str(path))
    before, file_before = model.SerializeToString(), path.read_bytes()
    dep = Deployment(activation_bits=None, per_channel=per_channel)
    x = np.random.default_rng(1).normal(size=(4, 4, 8, 8)).astype(np.float32)
    import onnxruntime as ort

    from tests.helpers.onnx_corpus import sqnr_db

    def run(m):
        session = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
        return session.run(None, {"x": x})[0]

    for given in (model, str(path)):
        eq, report = cle_onnx.equalize_model(given, deployment=dep)
        assert report.regions
        assert sqnr_db(run(model), run(eq)) >= 100
    assert model.SerializeToString() == before
    assert path.read_bytes() == file_before
