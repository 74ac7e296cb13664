"""Empirical bias correction for ONNX models (``bias_correction="empirical"``), as AIMET
does it from data: layer by layer in graph order, with the layers before already on
their grids and corrected, the mean of each layer's output over the calibration inputs
is measured with its weights on the deployment's grid and subtracted from the float
model's, and the difference leaves the layer's bias. Unlike the analytic form
(``cle_core._correct``) it sees what the rounding of every earlier layer does to this
layer's input, at the price of one run of the model per layer.

The model returned has float weights (the deployed quantizer rounds them itself) and
the corrected biases."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from cle_core import CLEError, Deployment
from cle_core.quality import weights_on_grid
from cle_core.toolkit import StatsAccumulator

from ._calibrate import feeds
from ._evaluate import _batches, _session, weight_axis

_FLOATS = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE)
# A MatMul's bias is a separate Add: left to the analytic form.
_LAYERS = ("Conv", "ConvTranspose", "Gemm")


def _layers(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """The layers the deployed quantizer rounds, in graph order: a float weight
    initializer read by that node alone, and a bias initializer (or none, for Conv /
    ConvTranspose / Gemm, which then get one) read by it alone."""
    inits = {t.name: t for t in model.graph.initializer}
    readers: dict[str, int] = {}
    for n in model.graph.node:
        for name in n.input:
            readers[name] = readers.get(name, 0) + 1
    found = []
    for n in model.graph.node:
        if n.op_type not in _LAYERS or len(n.input) < 2 or n.input[1] not in inits:
            continue
        if readers[n.input[1]] != 1 or inits[n.input[1]].data_type not in _FLOATS:
            continue
        if (
            len(n.input) > 2
            and n.input[2]
            and (n.input[2] not in inits or readers[n.input[2]] != 1)
        ):
            continue
        found.append(n)
    return found


def _channel_means(model: onnx.ModelProto, names: list[str], fed: dict) -> dict:
    """Per-channel means (channels on axis 1: a Conv's or a Gemm's output) of the values
    ``names`` of ``model`` over ``fed``."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    known = {o.name for o in probe.graph.output}
    probe.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names if n not in known)
    session = _session(probe, "the model")
    acc = StatsAccumulator()
    for chunk, real in _batches(probe, fed, 16):
        for name, out in zip(names, session.run(names, chunk), strict=True):
            acc.add(name, np.asarray(out[:real]))
    stats = acc.result()
    return {name: stats[name].mean for name in names}


def correct_empirically(
    model: onnx.ModelProto, calibration, deployment: Deployment
) -> tuple[onnx.ModelProto, list[tuple[str, np.ndarray]]]:
    """``model`` (weights loaded) with each layer's bias corrected from data, as the
    module docstring says; returns the new proto and ``(layer, shift)`` per corrected
    layer. Raises :class:`CLEError` for calibration inputs the model cannot take."""
    fed = feeds(model, calibration, "calibration")
    layers = _layers(model)
    if not layers:
        return model, []
    reference = _channel_means(model, [n.output[0] for n in layers], fed)
    work = onnx.ModelProto()
    work.CopyFrom(model)
    inits = {t.name: t for t in work.graph.initializer}
    floats = {}
    shifts = []
    by_name = {n.name or n.output[0]: n for n in work.graph.node}
    for layer in layers:
        node = by_name[layer.name or layer.output[0]]
        w_init = inits[node.input[1]]
        w = numpy_helper.to_array(w_init)
        floats[w_init.name] = w
        axis = weight_axis(node) if deployment.per_channel else None
        dep = deployment
        rounded = weights_on_grid(w, dep.weight_bits, dep.weight_symmetric, axis, dep.quantizer)
        w_init.CopyFrom(numpy_helper.from_array(rounded.astype(w.dtype), w_init.name))
        out = node.output[0]
        measured = _channel_means(work, [out], fed)[out]
        shift = measured - reference[out]
        if not np.all(np.isfinite(shift)):
            raise CLEError(
                f"{node.name or out}: the output mean is not finite on the calibration inputs"
            )
        bias_name = node.input[2] if len(node.input) > 2 and node.input[2] else None
        if bias_name is None:
            bias_name = f"{node.name or out}_corrected_bias"
            while bias_name in inits:
                bias_name += "_"
            b = np.zeros(shift.shape, w.dtype)
            t = numpy_helper.from_array(b, bias_name)
            work.graph.initializer.append(t)
            inits[bias_name] = work.graph.initializer[-1]
            while len(node.input) < 3:
                node.input.append("")
            node.input[2] = bias_name
        b = numpy_helper.to_array(inits[bias_name]).astype(np.float64)
        if b.shape != shift.shape:
            continue  # a broadcast Gemm C: left alone
        new = (b - shift).astype(numpy_helper.to_array(inits[bias_name]).dtype)
        inits[bias_name].CopyFrom(numpy_helper.from_array(new, bias_name))
        shifts.append((node.name or out, shift))
    # The deployed quantizer rounds the weights itself: they go back to float.
    for name, w in floats.items():
        inits[name].CopyFrom(numpy_helper.from_array(w, name))
    return work, shifts
