"""Does the gain survive onnxruntime's own quantizer?

``cle evaluate`` and the demo measure W8A8 with our QDQ simulation, which quantizes the
input of every Conv / Gemm / MatMul. Users deploy with
``onnxruntime.quantization.quantize_static`` (QDQ, MinMax calibration), after its
recommended pre-processing (``quant_pre_process``: shape inference, batch norms fused),
which also quantizes the outputs of other ops. This prints, for the pretrained
EfficientNet-Lite0 exported with ``torch.onnx.export`` and equalized with the defaults,
the output SQNR (dB) and top-1 agreement on the 120 natural images both ways, per tensor
and per channel. Weights-only (W8) figures are the same both ways: onnxruntime has no
weights-only mode, so both replace each layer weight by its quantized values.

Run: ``python benchmarks/bench_ort_quantizer.py``.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper, version_converter
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process

from cle_core import CLEError
from cle_core._quality import natural_images, quantize_array, sqnr_db, top1_agreement
from cle_onnx._translate import default_opset, np_dtype

QDQ_OPSET = 13  # per-channel QDQ needs 13; an older model is evaluated as a converted copy
_TYPES = {  # bits -> (signed, unsigned) onnxruntime types
    4: (QuantType.QInt4, QuantType.QUInt4),
    8: (QuantType.QInt8, QuantType.QUInt8),
    16: (QuantType.QInt16, QuantType.QUInt16),
}
_LAYERS = {"Conv": 0, "ConvTranspose": 1, "Gemm": None, "MatMul": 1}  # op -> output axis


def _session(model: onnx.ModelProto | str) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    opts.log_severity_level = 3
    # Basic optimizations keep QuantizeLinear / DequantizeLinear as float simulation.
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    data = model if isinstance(model, str) else model.SerializeToString()
    return ort.InferenceSession(data, sess_options=opts, providers=["CPUExecutionProvider"])


def _data_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    inits = {t.name for t in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in inits]


def default_inputs(model: onnx.ModelProto) -> np.ndarray:
    """The 120 natural images at the size of the model's NCHW input (224 x 224 where
    dynamic), as grey images for a one-channel input."""
    graph_inputs = _data_inputs(model)
    if len(graph_inputs) != 1:
        raise CLEError("default inputs need a model with one input; pass inputs")
    dims = graph_inputs[0].type.tensor_type.shape.dim
    if len(dims) != 4:
        raise CLEError(f"default inputs are images; {graph_inputs[0].name!r} has rank {len(dims)}")
    hw = tuple(d.dim_value if d.dim_value > 0 else 224 for d in dims[2:])
    return fit_channels(natural_images(size=hw), model)


def fit_channels(images: np.ndarray, model: onnx.ModelProto) -> np.ndarray:
    """RGB ``images`` for the model's input: averaged to one channel for a grey input."""
    dims = _data_inputs(model)[0].type.tensor_type.shape.dim
    channels = dims[1].dim_value if len(dims) == 4 else 0
    if channels == 1 and images.ndim == 4 and images.shape[1] == 3:
        return images.mean(axis=1, keepdims=True).astype(images.dtype)
    if channels not in (0, 3) and images.ndim == 4 and images.shape[1] != channels:
        raise CLEError(f"the model takes {channels} channels; the images have {images.shape[1]}")
    return images


def _feeds(model: onnx.ModelProto, inputs) -> dict[str, np.ndarray]:
    graph_inputs = _data_inputs(model)
    if not isinstance(inputs, Mapping):
        if len(graph_inputs) != 1:
            raise CLEError(f"the model has {len(graph_inputs)} inputs; pass a dict of arrays")
        inputs = {graph_inputs[0].name: inputs}
    feeds = {}
    for gi in graph_inputs:
        if gi.name not in inputs:
            raise CLEError(f"no data for model input {gi.name!r}")
        dtype = np_dtype(gi.type.tensor_type.elem_type) or np.float32
        feeds[gi.name] = np.ascontiguousarray(inputs[gi.name], dtype=dtype)
    return feeds


def _batches(model: onnx.ModelProto, feeds: dict, batch: int) -> Iterator[tuple[dict, int]]:
    """Chunks of ``feeds`` and their real row counts; a fixed batch size is padded."""
    n = next(iter(feeds.values())).shape[0]
    first = _data_inputs(model)[0].type.tensor_type.shape.dim
    fixed = first[0].dim_value if first and first[0].dim_value > 0 else None
    step = fixed or batch
    for start in range(0, n, step):
        chunk = {k: v[start : start + step] for k, v in feeds.items()}
        real = next(iter(chunk.values())).shape[0]
        if fixed and real < fixed:
            chunk = {
                k: np.concatenate([v, np.repeat(v[-1:], fixed - real, 0)]) for k, v in chunk.items()
            }
        yield chunk, real


def run(model: onnx.ModelProto, inputs, batch: int = 16) -> np.ndarray:
    """The model's first output on ``inputs`` (an array, or a dict by input name)."""
    feeds = _feeds(model, inputs)
    sess = _session(model)
    name = sess.get_outputs()[0].name
    parts = [sess.run([name], chunk)[0][:real] for chunk, real in _batches(model, feeds, batch)]
    return np.concatenate(parts, axis=0)


def prepared(model: onnx.ModelProto) -> onnx.ModelProto:
    """What a deployment quantizes: ``model`` converted to opset 13 if older (QDQ needs
    it), then onnxruntime's recommended pre-processing (shape inference, graph
    optimization: batch norms fused into their convolutions). Both quantized variants
    start from it, so weights-only figures are those of the folded weights too."""
    if default_opset(model) < QDQ_OPSET:
        try:
            model = version_converter.convert_version(model, QDQ_OPSET)
        except Exception as exc:
            raise CLEError(
                f"cannot convert the opset-{default_opset(model)} model to 13: {exc}"
            ) from None
    with tempfile.TemporaryDirectory() as tmp:
        raw, out = Path(tmp) / "raw.onnx", Path(tmp) / "prepared.onnx"
        onnx.save(model, str(raw))
        quant_pre_process(str(raw), str(out), skip_symbolic_shape=True)
        return onnx.load(str(out))


def weights_quantized(model, bits=8, per_channel=False, symmetric=False) -> onnx.ModelProto:
    """A copy with every Conv / ConvTranspose / Gemm / MatMul weight initializer replaced
    by its quantized-and-dequantized values (weights only: activations stay float)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    inits = {t.name: t for t in out.graph.initializer}
    done = set()
    for node in out.graph.node:
        if node.op_type not in _LAYERS or len(node.input) < 2 or node.input[1] not in inits:
            continue
        name = node.input[1]
        if name in done:
            continue
        done.add(name)
        w = numpy_helper.to_array(inits[name])
        axis = _LAYERS[node.op_type]
        if node.op_type == "Gemm":
            trans_b = any(a.name == "transB" and a.i for a in node.attribute)
            axis = 0 if trans_b else 1
        q = quantize_array(w, bits, symmetric, axis if per_channel and w.ndim >= 2 else None)
        inits[name].CopyFrom(numpy_helper.from_array(q.astype(w.dtype), name))
    return out


class _Reader(CalibrationDataReader):
    def __init__(self, model: onnx.ModelProto, feeds: dict, batch: int):
        self.chunks = iter([chunk for chunk, _ in _batches(model, feeds, batch)])

    def get_next(self):
        return next(self.chunks, None)


def static_quantized(model, inputs, bits=8, per_channel=False, symmetric=False, batch=16):
    """``model`` (see :func:`prepared`) quantized by ``quantize_static``: QDQ format,
    MinMax calibration on ``inputs``, weights and activations on ``bits``-bit grids
    (4, 8 or 16), asymmetric unless ``symmetric``."""
    if bits not in _TYPES:
        raise CLEError(
            f"onnxruntime quantizes weights and activations to 4, 8 or 16 bits, not {bits} "
            "(use weights only for other widths)"
        )
    signed, unsigned = _TYPES[bits]
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "fp32.onnx", Path(tmp) / "qdq.onnx"
        onnx.save(model, str(src))
        quantize_static(
            str(src),
            str(dst),
            _Reader(model, _feeds(model, inputs), batch),
            quant_format=QuantFormat.QDQ,
            per_channel=per_channel,
            activation_type=signed if symmetric else unsigned,
            weight_type=signed,
            calibrate_method=CalibrationMethod.MinMax,
            extra_options={"ActivationSymmetric": symmetric, "WeightSymmetric": symmetric},
        )
        return onnx.load(str(dst))


def measure(
    reference,
    model,
    inputs,
    bits=8,
    per_channel=False,
    symmetric=False,
    activations=True,
    batch=16,
    is_reference=False,
) -> dict[str, float]:
    """FP32, W``bits`` and (with ``activations``) W``bits``A``bits`` SQNR and top-1
    agreement of ``model`` against the ``reference`` outputs on ``inputs``."""
    w, wa = f"w{bits}", f"w{bits}a{bits}"
    outs = {"fp32": reference if is_reference else run(model, inputs, batch)}
    ready = prepared(model)
    outs[w] = run(weights_quantized(ready, bits, per_channel, symmetric), inputs, batch)
    if activations:
        q = static_quantized(ready, inputs, bits, per_channel, symmetric, batch)
        outs[wa] = run(q, inputs, batch)
    result = {}
    for key, out in outs.items():
        result[f"{key}_sqnr"] = sqnr_db(reference, out)
        result[f"{key}_top1"] = top1_agreement(reference, out)
    return result


def evaluate(
    fp32_model,
    candidate_model=None,
    inputs=None,
    bits=8,
    per_channel=False,
    symmetric=False,
    activations=True,
    batch=16,
) -> dict[str, float]:
    """What quantization does to ``candidate_model`` (default: ``fp32_model`` itself),
    against ``fp32_model`` in FP32 on ``inputs`` (default :func:`default_inputs`).

    Returns ``fp32_sqnr`` / ``fp32_top1`` (the candidate unquantized), ``wN_sqnr`` /
    ``wN_top1`` (N-bit weights, float activations) and, with ``activations``,
    ``wNaN_sqnr`` / ``wNaN_top1`` (onnxruntime's static QDQ quantization)."""
    if inputs is None:
        inputs = default_inputs(fp32_model)
    reference = run(fp32_model, inputs, batch)
    candidate = fp32_model if candidate_model is None else candidate_model
    return measure(
        reference,
        candidate,
        inputs,
        bits,
        per_channel,
        symmetric,
        activations,
        batch,
        is_reference=candidate_model is None,
    )


def main() -> None:
    import logging
    import warnings

    import cle_onnx
    from cle_torch import export_onnx
    from cle_torch._examples import efficientnet_lite0

    logging.getLogger().setLevel(logging.ERROR)  # onnxruntime's pre-processing advice
    warnings.simplefilter("ignore")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "lite0.onnx"
        export_onnx(efficientnet_lite0(), path)
        original = onnx.load(str(path))
    equalized, _ = cle_onnx.equalize_model(original)
    images = natural_images(size=(224, 224))
    print(f"{'EfficientNet-Lite0':<60}{'W8 dB':>8}{'top1':>7}{'W8A8 dB':>9}{'top1':>7}")
    for per_channel in (False, True):
        grid = "per channel" if per_channel else "per tensor"
        for label, model in (("exporter-folded", None), ("cle equalize", equalized)):
            ours = cle_onnx.evaluate(original, model, images, per_channel=per_channel)
            ort_ = evaluate(original, model, images, per_channel=per_channel)
            for how, r in (("our QDQ simulation", ours), ("onnxruntime quantize_static", ort_)):
                print(
                    f"{label}, {grid}, {how}".ljust(60)
                    + f"{r['w8_sqnr']:8.2f}{r['w8_top1']:7.3f}"
                    + f"{r['w8a8_sqnr']:9.2f}{r['w8a8_top1']:7.3f}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
