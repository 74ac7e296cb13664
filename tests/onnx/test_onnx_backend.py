"""The ONNX backend on small models built with onnx.helper.

Tolerance: onnxruntime outputs before and after agree to an SQNR of 100 dB and a
relative error (max abs difference over max abs output) of 1e-4 (float32 models; float
rounding leaves 114-135 dB on these models).
"""

from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

import cle_core  # noqa: E402
import cle_onnx  # noqa: E402
from cle_core._quality import sqnr_db  # noqa: E402
from tests.helpers import onnx_models as om  # noqa: E402

RTOL = 1e-4
MIN_DB = 100.0


def run(model, x):
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})


def inputs(seed=0, shape=(2, 3, 8, 8)):
    return (np.random.default_rng(seed).normal(size=shape) * 2).astype(np.float32)


def check(model, **options):
    original = onnx.ModelProto()
    original.CopyFrom(model)
    eq, report = cle_onnx.equalize_model(model, **options)
    assert model == original, "the input model must not change"
    onnx.checker.check_model(eq, full_check=True)
    x = inputs()
    for a, b in zip(run(original, x), run(eq, x), strict=True):
        assert np.max(np.abs(a - b)) <= RTOL * np.max(np.abs(a)), report.summary()
        assert sqnr_db(a, b) >= MIN_DB, report.summary()
    assert [o.name for o in eq.graph.output] == [o.name for o in original.graph.output]
    assert [i.name for i in eq.graph.input] == [i.name for i in original.graph.input]
    assert eq.opset_import == original.opset_import
    assert eq.producer_name == original.producer_name
    assert list(eq.metadata_props) == list(original.metadata_props)
    return eq, report


def ops(model):
    return [n.op_type for n in model.graph.node]


@pytest.mark.parametrize("act", ["relu", "leaky", "prelu", "relu6", "relu6_const", "hardtanh"])
def test_conv_pair_with_every_scalable_activation(act):
    eq, report = check(om.conv_pair(act))
    assert len(report.regions) == 1 and len(report.folds) == 1
    assert "BatchNormalization" not in ops(eq)
    if act.startswith("relu6") or act == "hardtanh":
        assert "Min" in ops(eq)  # the bound is now per channel
        assert "Constant" not in ops(eq)  # the old bounds are pruned


def test_opset_10_clip_attributes():
    eq, report = check(om.conv_pair("relu6", opset=10))
    assert len(report.regions) == 1


def test_sigmoid_blocks_the_region():
    eq, report = check(om.conv_pair("sigmoid"))
    assert report.regions == ()
    assert any("Sigmoid" in s.reason for s in report.skipped)


def test_depthwise_triple():
    eq, report = check(om.depthwise_triple())
    assert len(report.triples) == 1
    assert len(report.folds) == 3


def test_residual_and_concat_regions():
    eq, report = check(om.residual_and_concat())
    kinds = {r.kind for r in report.regions}
    assert {"residual", "concat"} <= kinds


@pytest.mark.parametrize("trans_b", [0, 1])
def test_gemm_trans_b(trans_b):
    eq, report = check(om.gemm_head(trans_b))
    # conv -> relu -> flatten -> gemm (each channel is 36 features), gemm -> relu -> gemm
    assert [r.sinks[0][:4] for r in report.regions] == ["Gemm", "Gemm"]
    assert report.regions[0].sources[0].startswith("Conv") and report.regions[0].channels == 4


def test_gemm_alpha_beta_are_normalised():
    eq, report = check(om.gemm_head(1, alpha=0.5, beta=2.0))
    gemm = next(n for n in eq.graph.node if n.op_type == "Gemm")
    attrs = {a.name: a.f for a in gemm.attribute if a.name in ("alpha", "beta")}
    assert attrs == {"alpha": 1.0, "beta": 1.0}


def test_reshape_into_gemm_is_a_flatten():
    eq, report = check(om.gemm_head(1, reshape=True))
    assert len(report.regions) == 2


@pytest.mark.parametrize("with_add", [True, False])
def test_matmul_with_and_without_add(with_add):
    eq, report = check(om.matmul_mlp(with_add), high_bias=False)
    assert any(r.sources[0].startswith("MatMul") for r in report.regions)
    assert len(report.folds) == 1
    # with an Add, the bias lands there; without, folding created one and an Add carries it
    assert ops(eq).count("Add") == 1 and ops(eq).count("MatMul") == 2


def test_conv_without_group_attribute_is_equalized():
    eq, report = check(om.conv_without_group())
    assert len(report.regions) == 1


@pytest.mark.parametrize("depthwise", [False, True])
def test_conv_transpose(depthwise):
    eq, report = check(om.conv_transpose(depthwise))
    assert any("ConvTranspose" in s for r in report.regions for s in r.sources + r.sinks)
    assert len(report.folds) == 2


def test_bn_before_padded_conv_is_not_folded():
    eq, report = check(om.bn_before_padded_conv())
    assert report.folds == ()
    assert "BatchNormalization" in ops(eq)
    assert any("zero-pads" in s.reason for s in report.skipped)


def test_shared_initializer():
    model = om.shared_initializer()
    eq, report = check(model)
    # the conv pair sharing one weight is skipped and its weight unchanged
    reasons = " ".join(s.reason for s in report.skipped)
    assert "shares a parameter" in reasons
    orig = {t.name: t for t in model.graph.initializer}
    new = {t.name: t for t in eq.graph.initializer}
    shared = [n for n in model.graph.node if n.op_type == "Conv"][1].input[1]
    assert new[shared] == orig[shared]
    # the weight also read by Mul was cloned for the conv; Mul still reads the original
    mul = next(n for n in eq.graph.node if n.op_type == "Mul")
    conv3 = [n for n in eq.graph.node if n.op_type == "Conv"][3]
    assert mul.input[0] in orig and new[mul.input[0]] == orig[mul.input[0]]
    assert conv3.input[1] != mul.input[0]


def test_clip_whose_producer_has_a_second_consumer():
    model = om.clip_with_second_consumer()
    eq, report = check(model)
    clip = [n for n in eq.graph.node if n.op_type == "Clip"]
    assert len(clip) == 1, "the Clip must stay as it was"
    assert any("Sigmoid" in s.reason for s in report.skipped if s.stage == "scale")


def test_exact_high_bias_absorption_in_onnx():
    eq, report = check(om.high_bias_chain(), activation_bits=None)
    assert report.high_bias and all(h.exact for h in report.high_bias)
    assert "Max" in ops(eq)  # the lower bound is now per channel (-c)


def test_inplace_modifies_the_given_proto():
    model = om.conv_pair("relu")
    eq, _ = cle_onnx.equalize_model(model, inplace=True)
    assert eq is model
    assert "BatchNormalization" not in ops(model)


def test_core_dispatches_model_protos_here():
    model = om.conv_pair("relu6")
    eq, report = cle_core.equalize_model(model, max_sweeps=5)
    assert isinstance(eq, onnx.ModelProto) and eq is not model
    assert len(report.regions) == 1


def test_unknown_option_is_refused():
    with pytest.raises(TypeError, match="bogus"):
        cle_onnx.equalize_model(om.conv_pair("relu"), bogus=1)


def test_nan_weight_names_the_layer_and_changes_nothing():
    model = om.conv_pair("relu")
    t = model.graph.initializer[0]
    arr = onnx.numpy_helper.to_array(t).copy()
    arr.flat[0] = np.nan
    t.CopyFrom(onnx.numpy_helper.from_array(arr, t.name))
    before = model.SerializeToString()
    with pytest.raises(cle_core.NonFiniteError, match="Conv"):
        cle_onnx.equalize_model(model, inplace=True)
    assert model.SerializeToString() == before


def test_unsupported_opset_is_refused():
    model = om.conv_pair("relu")
    model.opset_import[0].version = 5
    with pytest.raises(cle_core.UnsupportedModelError, match="opset 5"):
        cle_onnx.equalize_model(model)


def test_path_roundtrip_with_external_data(tmp_path):
    model = om.depthwise_triple()
    src = tmp_path / "m.onnx"
    om.save_external(model, src, "m.onnx.data")
    dst = tmp_path / "out" / "eq.onnx"
    dst.parent.mkdir()
    report, files = cle_onnx.equalize_file(src, dst)
    assert files == [dst, dst.parent / "eq.onnx.data"]
    loaded = onnx.load(str(dst))  # loads external data next to the output
    onnx.checker.check_model(str(dst), full_check=True)
    x = inputs()
    a, b = run(model, x)[0], run(loaded, x)[0]
    assert np.max(np.abs(a - b)) <= RTOL * np.max(np.abs(a))
    assert len(report.triples) == 1
    # the source files are untouched
    assert onnx.load(str(src)) == onnx.load(str(src))
    # and the same through the Python API from a path
    eq, _ = cle_onnx.equalize_model(src)
    b2 = run(eq, x)[0]
    assert np.max(np.abs(a - b2)) <= RTOL * np.max(np.abs(a))


def test_taking_ownership_restores_on_error(tmp_path):
    model = om.conv_pair("relu")
    bn = next(t for t in model.graph.initializer if t.name.startswith("var"))
    arr = onnx.numpy_helper.to_array(bn).copy()
    arr[0] = np.inf
    bn.CopyFrom(onnx.numpy_helper.from_array(arr, bn.name))
    src = tmp_path / "bad.onnx"
    onnx.save(model, str(src))
    with pytest.raises(cle_core.NonFiniteError):
        cle_onnx.equalize_file(src, tmp_path / "out.onnx")
    assert not (tmp_path / "out.onnx").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.onnx"]


def test_rank_of_a_clip_input_comes_from_its_layer_when_shapes_are_unknown():
    from cle_onnx._apply import _rank_from_layer
    from cle_onnx._translate import to_ir

    graph, _ = to_ir(om.gemm_head(1))
    ranks = {n.name: _rank_from_layer(n) for n in graph.nodes if n.op == "relu"}
    assert sorted(ranks.values()) == [2, 4]  # behind the Conv, behind the Gemm


def test_a_huge_constant_of_shape_is_not_built():
    # A few bytes of model can describe gigabytes (ConstantOfShape of 2^30 elements):
    # translation folds no value larger than 16 M elements.
    import tracemalloc

    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.normal(size=(4, 3, 3, 3)).astype(np.float32), "w1"),
        numpy_helper.from_array(rng.normal(size=(4, 4, 1, 1)).astype(np.float32), "w2"),
        numpy_helper.from_array(np.array([1 << 15, 1 << 15], np.int64), "big"),
    ]
    zero = numpy_helper.from_array(np.array([0.0], np.float32))
    graph = helper.make_graph(
        [
            helper.make_node("ConstantOfShape", ["big"], ["z"], value=zero),
            helper.make_node("ReduceSum", ["z"], ["zs"], keepdims=0),
            helper.make_node("Conv", ["x", "w1"], ["h"], pads=[1, 1, 1, 1]),
            helper.make_node("Relu", ["h"], ["a"]),
            helper.make_node("Conv", ["a", "w2"], ["y0"]),
            helper.make_node("Add", ["y0", "zs"], ["y"]),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    tracemalloc.start()
    try:
        _, report = cle_onnx.equalize_model(model)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(report.regions) == 1
    assert peak < 200 << 20  # the constant alone would be 4 GiB


def test_nan_in_a_constant_node_weight_is_refused_and_the_input_kept():
    # Weights from Constant nodes (PaddlePaddle) are read like initializers, and checked
    # like them: one error naming the problem, the caller's proto byte-identical.
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w1 = rng.normal(size=(4, 3, 3, 3)).astype(np.float32)
    w1[0, 0, 0, 0] = np.nan
    w2 = rng.normal(size=(4, 4, 1, 1)).astype(np.float32)
    nodes = [
        helper.make_node("Constant", [], ["w1"], value=numpy_helper.from_array(w1, "v1")),
        helper.make_node("Constant", [], ["w2"], value=numpy_helper.from_array(w2, "v2")),
        helper.make_node("Conv", ["x", "w1"], ["h"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["h"], ["a"]),
        helper.make_node("Conv", ["a", "w2"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    before = model.SerializeToString()
    with pytest.raises(cle_core.NonFiniteError, match="Conv_2|w1"):
        cle_onnx.equalize_model(model, inplace=True)
    assert model.SerializeToString() == before


def test_dimensions_written_as_minus_one_are_unknown():
    """PaddlePaddle's exporter declares dynamic dimensions as -1 (a channel count of -1
    crashed the noise estimate: 'negative dimensions are not allowed')."""
    model = om.relu6_chain(13)
    for vi in [*model.graph.input, *model.graph.output]:
        for d in vi.type.tensor_type.shape.dim:
            d.Clear()
            d.dim_value = -1
    before = model.SerializeToString()
    eq, report = cle_onnx.equalize_model(model)
    assert model.SerializeToString() == before
    assert report.folds and report.regions and report.noise is not None
    assert sqnr_db(*(run(m, inputs())[0] for m in (model, eq))) >= MIN_DB


def test_the_reader_s_mixins_shadow_none_of_each_other_s_methods():
    # The reader finds op_X by name across its mixins (cle_onnx/_translate/ops_*.py): a
    # method of the same name in two of them, or in the reader itself, would silently
    # hide one (a handler never called, a helper replaced).
    from cle_onnx._translate.reader import _Reader

    seen: dict[str, str] = {}
    clash = []
    for cls in _Reader.__mro__[:-1]:  # the reader, then each mixin (not object)
        for name in vars(cls):
            if name.startswith("__"):
                continue
            if name in seen:
                clash.append(f"{name}: {seen[name]} and {cls.__name__}")
            seen.setdefault(name, cls.__name__)
    assert not clash, clash
    handlers = [n for n in seen if n.startswith("op_")]
    assert "op_Conv" in handlers and "op_Resize" in handlers and "op_Add" in handlers
