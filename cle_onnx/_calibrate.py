"""Calibration statistics for the ONNX backend: run the model in onnxruntime on a few
inputs with every IR value exposed as an output, and measure per channel what the
noise objective would otherwise estimate (see cle_core._stats)."""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx

from cle_core import CLEError
from cle_core._stats import ChannelStats, StatsAccumulator

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
    feeds = _feeds(model, inputs)
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
    n = next(iter(feeds.values())).shape[0]
    fixed = _fixed_batch(sess)
    if fixed and n < fixed:
        raise CLEError(f"the model takes batches of {fixed}; calibration holds only {n} inputs")
    size = fixed or BATCH
    # A fixed batch size drops the incomplete last batch; any other takes it as it is.
    for start in range(0, n - n % fixed if fixed else n, size):
        batch = {k: v[start : start + size] for k, v in feeds.items()}
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


def _feeds(model: onnx.ModelProto, inputs: Any) -> dict[str, np.ndarray]:
    constant = {t.name for t in model.graph.initializer}
    graph_inputs = [i for i in model.graph.input if i.name not in constant]
    if isinstance(inputs, dict):
        feeds = {k: np.asarray(v) for k, v in inputs.items()}
    else:
        if len(graph_inputs) != 1:
            raise CLEError(
                f"the model has {len(graph_inputs)} inputs: give calibration as a dict of "
                "arrays by input name"
            )
        feeds = {graph_inputs[0].name: np.asarray(inputs)}
    for vi in graph_inputs:
        if vi.name not in feeds:
            raise CLEError(f"calibration gives no values for input {vi.name!r}")
        elem = vi.type.tensor_type.elem_type
        dtype = onnx.helper.tensor_dtype_to_np_dtype(elem) if elem else np.float32
        feeds[vi.name] = np.ascontiguousarray(feeds[vi.name], dtype=dtype)
    sizes = {v.shape[0] if v.ndim else 0 for v in feeds.values()}
    if len(sizes) != 1 or 0 in sizes:
        raise CLEError("calibration inputs must hold the same number (> 0) of examples")
    return feeds
