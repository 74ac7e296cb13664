"""Shapes the reader folds itself where onnx's inference stops (issue 21: PP-OCRv4's
SVTR neck): a Reshape whose target is computed ``Shape -> Slice -> Concat`` with
Constant nodes (PaddlePaddle's flatten of the spatial axes, opset 12) leaves every later
value of unknown rank to onnx, so no LayerNorm, MatMul or attention after it was
translated. The folded target, given back to the inference, makes the ranks known; the
sizes the user gives for dynamic input dimensions (``input_shapes=``, ``--input-shape``)
make them static, which the Reshapes of attention heads need."""

from __future__ import annotations

import re

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

import cle_onnx  # noqa: E402
from cle_core._cli import main  # noqa: E402
from cle_onnx._translate import to_ir  # noqa: E402
from tests.helpers.onnx_corpus import _Builder, sqnr_db  # noqa: E402

C = 8


def _layer_norm(b: _Builder, x: str) -> str:
    """LayerNorm over the last axis, written out as exporters do before opset 17."""
    mean = b.node("ReduceMean", [x], axes=[-1], keepdims=1)
    d = b.node("Sub", [x, mean])
    var = b.node("ReduceMean", [b.node("Pow", [d, b.init(np.array(2.0), "two")])], axes=[-1])
    root = b.node("Sqrt", [b.node("Add", [var, b.init(np.array(1e-5), "eps")])])
    gamma = b.init(10.0 ** b.rng.uniform(-1, 1, C), "gamma")
    return b.node("Add", [b.node("Mul", [b.node("Div", [d, root]), gamma]), b.init(b.normal(C))])


def _linear(b: _Builder, x: str) -> str:
    h = b.node("MatMul", [x, b.init(b.spread((C, C), axis=1))])
    return b.node("Add", [h, b.init(b.normal(C), "bias")])


def _neck() -> onnx.ModelProto:
    """``(N, C, H, W)`` (H and W dynamic) -> Conv -> Reshape to ``(N, C, -1)`` with the
    target ``Concat(Slice(Shape(x), 0, 2), Constant(-1))`` -> Transpose -> LayerNorm ->
    v -> heads split ``(0, -1, 2, 4)`` and merged back ``(0, -1, C)`` -> out."""
    b = _Builder(11, 12)
    h = b.conv("x", C, C, 1)
    shape = b.node("Shape", [h])
    first = b.node(
        "Slice", [shape, b.constant([0], np.int64), b.constant([2], np.int64),
                  b.constant([0], np.int64)]
    )  # fmt: skip
    target = b.node("Concat", [first, b.constant([-1], np.int64)], axis=0)
    tokens = b.node("Transpose", [b.node("Reshape", [h, target])], perm=[0, 2, 1])
    v = _linear(b, _layer_norm(b, tokens))
    heads = b.node("Reshape", [v, b.constant([0, -1, 2, 4], np.int64)])
    merged = b.node("Reshape", [heads, b.constant([0, -1, C], np.int64)])
    out = _linear(b, merged)
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", C, "H", "W"])
    y = onnx.helper.make_tensor_value_info(out, onnx.TensorProto.FLOAT, None)
    graph = onnx.helper.make_graph(b.nodes, "neck", [x], [y], b.inits)
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 12)])
    model.ir_version = 7
    return model


def _run(model, x):
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def test_a_computed_reshape_target_makes_the_ranks_after_it_known():
    """Without sizes: the flatten's folded target ``(0, C, -1)`` gives the tokens their
    rank, so the norm -> v pair is found; the heads' Reshapes need static sizes."""
    graph, _ = to_ir(_neck())
    graph.validate()
    ops = [n.op for n in graph.nodes]
    assert ops.count("norm") == 1 and ops.count("linear") == 2, ops
    tokens = next(n for n in graph.nodes if n.op == "transpose").outputs[0]
    assert tokens.shape == (None, None, C)


def test_given_input_sizes_make_the_shapes_static_and_stay_exact(monkeypatch):
    monkeypatch.setattr("cle_core._objectives.noise.MIN_GAIN_DB", -np.inf)
    model = _neck()
    before = model.SerializeToString()
    _, plain = cle_onnx.equalize_model(model)
    eq, report = cle_onnx.equalize_model(model, input_shapes={"x": (1, C, 3, 4)})
    assert model.SerializeToString() == before
    assert [r.kind for r in plain.regions] == ["norm"]
    # v -> out through the heads split and merged back: static sizes needed
    assert [r.kind for r in report.regions] == ["norm", "pair"], report.summary(verbose=True)
    assert all(np.ptp(np.log10(r.scales)) > 0.05 for r in report.regions)
    # the file keeps its dynamic sizes: any size its ops accept stays exact
    rng = np.random.default_rng(0)
    for shape in ((1, C, 3, 4), (2, C, 5, 2)):
        x = rng.standard_normal(shape).astype(np.float32)
        assert sqnr_db(_run(model, x), _run(eq, x)) >= 90
    assert [d.dim_param for d in eq.graph.input[0].type.tensor_type.shape.dim] == [
        "N", "", "H", "W"
    ]  # fmt: skip


def test_the_command_line_takes_the_sizes(tmp_path, capsys):
    path = tmp_path / "neck.onnx"
    onnx.save(_neck(), str(path))
    listed = {}
    for flags in ([], ["--input-shape", f"x=1,{C},3,4"], ["--dim", "H=3", "--dim", "W=4"]):
        assert main(["inspect", str(path), "-v", *flags]) == 0
        out = capsys.readouterr().out
        listed[len(flags)] = re.findall(r"^  #\d+ ([\w-]+), \d+ channels:", out, flags=re.M)
    assert listed == {0: ["norm"], 2: ["norm", "pair"], 4: ["norm", "pair"]}
    assert main(["inspect", str(path), "--input-shape", "y=1,2"]) != 0
    assert "the model has no input 'y'" in capsys.readouterr().err
    out = tmp_path / "eq.onnx"
    source = path.read_bytes()
    bad = ["equalize", str(path), "-o", str(out), "--input-shape", "x=1,2"]
    assert main(bad) != 0  # a size of the wrong rank: refused, nothing written
    assert "x" in capsys.readouterr().err
    assert not out.exists() and path.read_bytes() == source
    args = ["equalize", str(path), "-o", str(out), "--check", "--input-shape", f"x=1,{C},3,4"]
    assert main(args) == 0
    assert "ok" in capsys.readouterr().out
    assert path.read_bytes() == source
