"""Calibration statistics for the ONNX backend: run the model in onnxruntime on a few
inputs with every IR value exposed as an output, and measure per channel what the
noise objective would otherwise estimate (see cle_core._stats)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import onnx

from cle_core import CLEError
from cle_core._stats import ChannelStats, StatsAccumulator

from ._translate import np_dtype

BATCH = 4  # every intermediate tensor of a batch is held at once


def calibration_stats(model: onnx.ModelProto, inputs: Any) -> dict[str, ChannelStats]:
    """Per-channel statistics of every float tensor that a node of ``model`` (with its
    weights loaded) computes, measured on ``inputs``: an array ``(N, ...)`` for a model
    with one input, or a dict of arrays by input name."""
    try:
        import onnxruntime as ort
    except ModuleNotFoundError:
        raise CLEError("calibration needs onnxruntime: pip install 'crosslayer-eq[onnx]'") from None
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    known = {o.name for o in probe.graph.output}
    wanted = list(
        dict.fromkeys(o for n in probe.graph.node for o in n.output if o and o not in known)
    )
    for name in wanted:
        probe.graph.output.append(onnx.ValueInfoProto(name=name))
    feeds_ = feeds(model, inputs, "calibration")
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    try:
        sess = ort.InferenceSession(
            probe.SerializeToString(), opts, providers=["CPUExecutionProvider"]
        )
    except Exception as exc:
        raise CLEError(f"onnxruntime cannot run the model for calibration: {exc}") from None
    names = [o.name for o in sess.get_outputs()]
    acc = StatsAccumulator()
    n = next(iter(feeds_.values())).shape[0]
    fixed = _fixed_batch(sess)
    if fixed and n < fixed:
        raise CLEError(f"the model takes batches of {fixed}; calibration holds only {n} inputs")
    size = fixed or BATCH
    # A fixed batch size drops the incomplete last batch; any other takes it as it is.
    for start in range(0, n - n % fixed if fixed else n, size):
        batch = {k: v[start : start + size] for k, v in feeds_.items()}
        try:
            outs = sess.run(None, batch)
        except Exception as exc:
            raise CLEError(f"the model does not run on the calibration inputs: {exc}") from None
        for name, out in zip(names, outs, strict=True):
            acc.add(name, out)
    return acc.result()


def _fixed_batch(sess) -> int | None:
    """The batch size every input requires, if the model fixes one."""
    sizes = {i.shape[0] for i in sess.get_inputs() if i.shape and isinstance(i.shape[0], int)}
    return sizes.pop() if len(sizes) == 1 else None


def data_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """The graph inputs that take data: every input but the initializers (which IR < 4
    lists as inputs too)."""
    constant = {t.name for t in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in constant]


def feeds(model: onnx.ModelProto, inputs: Any, what: str = "inputs") -> dict[str, np.ndarray]:
    """``inputs`` (an array for a model with one input, or a dict of arrays by input
    name) as onnxruntime feeds in each input's element type. ``what`` names them in the
    errors: a missing or unknown input, or arrays of different lengths."""
    graph_inputs = data_inputs(model)
    if isinstance(inputs, Mapping):
        given = {k: np.asarray(v) for k, v in inputs.items()}
    else:
        if len(graph_inputs) != 1:
            raise CLEError(
                f"the model has {len(graph_inputs)} inputs "
                f"({', '.join(i.name for i in graph_inputs)}); give the {what} as a dict of "
                "arrays by input name"
            )
        given = {graph_inputs[0].name: np.asarray(inputs)}
    out = {}
    for vi in graph_inputs:
        if vi.name not in given:
            name = repr(vi.name)
            raise CLEError(
                f"no data for model input {name}: the {what} has no values for input {name}"
            )
        dtype = np_dtype(vi.type.tensor_type.elem_type) or np.float32
        out[vi.name] = np.ascontiguousarray(given[vi.name], dtype=dtype)
    unknown = set(given) - set(out)
    if unknown:
        raise CLEError(f"the model has no input(s) named {sorted(unknown)} (in the {what})")
    sizes = {v.shape[0] if v.ndim else 0 for v in out.values()}
    if len(sizes) != 1 or 0 in sizes:
        raise CLEError(f"every array of the {what} needs the same number (> 0) of examples")
    return out
