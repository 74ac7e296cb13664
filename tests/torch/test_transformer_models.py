"""The test architectures of ``tests/helpers/transformer_models.py`` build, run, export
with both ONNX exporters, and onnxruntime agrees with PyTorch on them.

Both exporters handle every variant with torch 2.13 but those in EXPORT_FAILS, where the
test expects the failure (so that it notices when an exporter learns the op).
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from tests.helpers import transformer_models as tm

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

#: (variant, exporter) -> why the export fails (torch 2.13).
EXPORT_FAILS: dict[tuple[str, str], str] = {
    ("llama_nn_rmsnorm", "torchscript"): "aten::rms_norm has no TorchScript symbolic, any opset",
}


def _sqnr_db(ref: np.ndarray, out: np.ndarray) -> float:
    noise = np.sum((ref.astype(np.float64) - out) ** 2)
    return float(10 * np.log10(np.sum(ref.astype(np.float64) ** 2) / max(noise, 1e-300)))


def _export(model, x, dynamo: bool) -> bytes:
    # Not under torch.no_grad(): there nn.TransformerEncoderLayer and
    # nn.MultiheadAttention take their fused fast path (aten::_transformer_encoder_layer_fwd,
    # aten::_native_multi_head_attention), which the TorchScript exporter cannot write.
    if dynamo:
        program = torch.onnx.export(model, (x,), dynamo=True, verbose=False)
        return program.model_proto.SerializeToString()
    buf = io.BytesIO()
    torch.onnx.export(model, (x,), buf, dynamo=False, opset_version=17)
    return buf.getvalue()


@pytest.mark.parametrize("name", sorted(tm.VARIANTS))
def test_builds_and_runs(name):
    model = tm.VARIANTS[name](0)
    x = model.example_input(2)
    with torch.no_grad():
        y = model(x)
        y2 = tm.VARIANTS[name](0)(x)
    assert torch.isfinite(y).all()
    assert y.shape[0] == 2
    assert torch.equal(y, y2), "the builder is not deterministic"
    assert not model.training


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
@pytest.mark.parametrize("name", sorted(tm.VARIANTS))
def test_export_matches_onnxruntime(name, dynamo):
    model = tm.VARIANTS[name](0)
    x = model.example_input(2)
    if (name, "dynamo" if dynamo else "torchscript") in EXPORT_FAILS:
        with pytest.raises(torch.onnx.errors.UnsupportedOperatorError):
            _export(model, x, dynamo)
        return
    proto = _export(model, x, dynamo)
    sess = ort.InferenceSession(proto, providers=["CPUExecutionProvider"])
    (out,) = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        ref = model(x).numpy()
    assert out.shape == ref.shape
    assert _sqnr_db(ref, out) > 90


#: variant -> why equalize_model with calibration fails on it today (bert did: the
#: statistics of token tensors were measured along axis 1, see cle_torch._calibrate).
EQUALIZE_FAILS: dict[str, str] = {}


@pytest.mark.parametrize(
    "name",
    [
        pytest.param(
            n, marks=pytest.mark.xfail(strict=True, raises=ValueError, reason=EQUALIZE_FAILS[n])
        )
        if n in EQUALIZE_FAILS
        else n
        for n in sorted(tm.VARIANTS)
    ],
)
def test_equalize_model_traces_and_keeps_the_function(name):
    """cle_torch traces each variant (torch.fx) and keeps its FP32 function, whatever
    number of regions it equalizes."""
    import cle_torch

    model = tm.VARIANTS[name](0)
    x = model.example_input(2)
    with torch.no_grad():
        ref = model(x).numpy()
    shapes = tuple(x.shape) if x.dtype.is_floating_point else None
    equalized, _ = cle_torch.equalize_model(model, input_shapes=shapes, calibration=[x])
    with torch.no_grad():
        out = equalized(x).numpy()
    assert _sqnr_db(ref, out) > 90
