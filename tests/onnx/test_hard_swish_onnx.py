"""Hard-swish and hard-sigmoid in ONNX models: each form exporters write is read as one
opaque activation that the data-free statistics follow (issue 18), and equalization
around it stays exact.

Forms: the ``HardSwish`` op (opset 14); ``HardSigmoid -> Mul(x, .)`` (the TorchScript
exporter before opset 14); ``Add(x, 3) -> Clip(0, 6) -> Mul(x, .) -> Div(6)`` or
``Mul(1/6)``, or with the division before the product (PaddlePaddle's exports, the
PyPI OCR models). A pattern is taken only when its constants are the pattern's and each
intermediate has no other reader; otherwise its nodes are read one by one, as before.
"""

from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
torch = pytest.importorskip("torch")

import cle_onnx  # noqa: E402
from cle_core import run_graph  # noqa: E402
from cle_core._quality import sqnr_db  # noqa: E402
from cle_core._stats import estimate  # noqa: E402
from cle_onnx._translate.reader import to_ir  # noqa: E402
from tests.helpers.onnx_corpus import quiet  # noqa: E402
from tests.helpers.onnx_models import OnnxBuilder  # noqa: E402

FORMS = ["op", "hardsigmoid", "div", "mul", "div_first", "opset10"]


def scalar(b: OnnxBuilder, value: float) -> str:
    return b.init(np.array(value), "k")


def hard_swish(b: OnnxBuilder, x: str, form: str, divisor: float = 6.0) -> str:
    """``x * clip(x + 3, 0, 6) / 6`` written as ``form``."""
    if form == "op":
        return b.node("HardSwish", [x])
    if form == "hardsigmoid":
        return b.node("Mul", [x, b.node("HardSigmoid", [x], alpha=1.0 / 6.0, beta=0.5)])
    shifted = b.node("Add", [x, scalar(b, 3.0)])
    if form == "opset10":
        gate = b.node("Clip", [shifted], min=0.0, max=6.0)
    else:
        gate = b.node("Clip", [shifted, scalar(b, 0.0), scalar(b, 6.0)])
    if form == "div_first":
        return b.node("Mul", [x, b.node("Div", [gate, scalar(b, divisor)])])
    product = b.node("Mul", [gate, x])  # either operand order is the same product
    if form == "mul":
        return b.node("Mul", [product, scalar(b, 1.0 / divisor)])
    return b.node("Div", [product, scalar(b, divisor)])


def se_block(b: OnnxBuilder, x: str, c: int) -> str:
    """Squeeze-and-excitation with a hard-sigmoid gate (MobileNetV3)."""
    pooled = b.node("GlobalAveragePool", [x])
    squeezed = b.node("Relu", [b.conv(pooled, c, 2)])
    gate = b.node("HardSigmoid", [b.conv(squeezed, 2, c)], alpha=0.2, beta=0.5)
    return b.node("Mul", [x, gate])


def model(form: str, **kw) -> onnx.ModelProto:
    """Conv -> BN -> hard-swish -> [Conv -> Relu -> Conv] (a region) -> hard-swish ->
    squeeze-and-excitation -> Conv."""
    b = OnnxBuilder(seed=3, opset=10 if form == "opset10" else 14)
    h = hard_swish(b, b.bn(b.conv("x", 3, 6, 3, pad=1), 6), form, **kw)
    h = b.conv(b.node("Relu", [b.conv(h, 6, 6)]), 6, 6)
    h = se_block(b, hard_swish(b, h, form, **kw), 6)
    b.conv(h, 6, 4)
    return b.model()


def run(m: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(m.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return np.asarray(sess.run(None, {"x": x})[0], np.float64)


def opaque(graph, activation: str) -> list:
    return [n for n in graph.nodes if n.op == "opaque" and n.attrs.get("activation") == activation]


@pytest.mark.parametrize("form", FORMS)
def test_each_form_is_one_activation_and_equalization_stays_exact(form):
    m = model(form)
    x = (np.random.default_rng(0).normal(size=(2, 3, 8, 8)) * 2).astype(np.float32)
    expected = run(m, x)
    graph, _ = to_ir(m)
    assert len(opaque(graph, "hard_swish")) == 2
    assert len(opaque(graph, "hard_sigmoid")) == 1
    # none of the pattern's nodes is left over: the only clip, Add or Div is gone
    assert not [n for n in graph.nodes if n.op == "clip" or n.attrs.get("kind") in ("Add", "Div")]
    graph.validate()
    # the IR computes what onnxruntime does (float64 against float32)
    ir_out = next(iter(run_graph(graph, {"x": x}).values()))
    assert sqnr_db(expected, ir_out) >= 100.0
    before = m.SerializeToString()
    for objective in ("balance", "noise"):
        eq, report = cle_onnx.equalize_model(m, objective=objective)
        assert m.SerializeToString() == before  # the caller's proto is not touched
        assert sqnr_db(expected, run(eq, x)) >= 100.0, report.summary()
        if objective == "balance":  # the region between the hard-swishes is scaled
            assert any(np.ptp(np.log10(r.scales)) > 0.2 for r in report.regions)
    # the data-free statistics reach every layer's input
    stats, _ = estimate(graph)
    assert all(n.inputs[0].name in stats for n in graph.nodes if n.is_layer)


def broken(kind: str) -> onnx.ModelProto:
    """A decomposed hard-swish with one thing wrong."""
    b = OnnxBuilder(seed=4, opset=13)
    x = b.conv("x", 3, 6, 3, pad=1)
    shifted = b.node("Add", [x, scalar(b, 3.0)])
    lo = -1.0 if kind == "clip_min" else 0.0
    gate = b.node("Clip", [shifted, scalar(b, lo), scalar(b, 6.0)])
    product = b.node("Mul", [x, gate])
    out = b.node("Div", [product, scalar(b, 5.0 if kind == "divisor" else 6.0)])
    outputs = [b.conv(out, 6, 4)]
    if kind == "second_reader":
        outputs.append(b.conv(gate, 6, 4))
    return b.model(outputs=outputs)


@pytest.mark.parametrize("kind", ["divisor", "clip_min", "second_reader"])
def test_a_pattern_with_other_constants_or_readers_is_read_node_by_node(kind):
    m = broken(kind)
    graph, _ = to_ir(m)
    assert not opaque(graph, "hard_swish")
    graph.validate()
    x = np.random.default_rng(1).normal(size=(2, 3, 8, 8)).astype(np.float32)
    expected = run(m, x)
    # the Add of a constant keeps its shift: the executor runs it, the statistics follow
    assert [n.attrs["shift"].tolist() for n in graph.nodes if "shift" in n.attrs] == [[3.0]]
    ir_out = run_graph(graph, {"x": x})
    assert sqnr_db(expected, ir_out[m.graph.output[0].name]) >= 100.0
    eq, report = cle_onnx.equalize_model(m, objective="balance")
    assert sqnr_db(expected, run(eq, x)) >= 100.0, report.summary()
    assert any(s.reason == "Add left out: adds a constant" for s in report.skipped)


class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Conv2d(3, 6, 3, padding=1)
        self.b = torch.nn.Conv2d(6, 4, 1)
        self.act = torch.nn.Hardswish()

    def forward(self, x):
        return self.b(self.act(self.a(x)))


@pytest.mark.parametrize("dynamo", [False, True])
def test_torch_exports_of_hardswish_are_read_as_one(tmp_path, dynamo):
    net = Block().eval()
    x = torch.randn(1, 3, 8, 8)
    path = tmp_path / "m.onnx"
    kw = {"dynamo": True} if dynamo else {"dynamo": False, "opset_version": 13}
    with quiet():
        torch.onnx.export(net, (x,), str(path), input_names=["x"], **kw)
    m = onnx.load(str(path))
    graph, _ = to_ir(m)
    assert len(opaque(graph, "hard_swish")) == 1
    assert [n.op for n in graph.nodes] == ["conv", "opaque", "conv"]
    ir_out = next(iter(run_graph(graph, {"x": x.numpy()}).values()))
    assert sqnr_db(net(x).detach().numpy().astype(np.float64), ir_out) >= 100.0


def test_hard_sigmoid_keeps_its_attributes_and_a_sigmoid_output_has_statistics():
    b = OnnxBuilder(seed=5, opset=13)
    gate = b.node("HardSigmoid", [b.conv("x", 3, 6)], alpha=0.3, beta=0.4)
    b.node("Sigmoid", [b.conv(gate, 6, 2)])
    graph, _ = to_ir(b.model())
    (gate,) = opaque(graph, "hard_sigmoid")
    assert gate.attrs["alpha"] == pytest.approx(0.3) and gate.attrs["beta"] == pytest.approx(0.4)
    assert len(opaque(graph, "sigmoid")) == 1
    graph.validate()
    # a detector's probability map: the noise estimate is relative to its power
    stats, _ = estimate(graph)
    assert graph.outputs[0].name in stats
