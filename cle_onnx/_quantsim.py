"""Simulated quantization of ONNX models, measured with onnxruntime against the FP32 model.

Weights: every Conv, ConvTranspose, Gemm (input B) and MatMul whose second input is an
initializer gets a min/max grid per tensor or per output channel. For 8 bits the graph
gets real QuantizeLinear/DequantizeLinear pairs, so onnxruntime runs QDQ; other widths
are fake-quantized into the initializer values. Activations: input 0 of those layers gets
a per-tensor QuantizeLinear/DequantizeLinear pair with a range calibrated on data.

Only the main graph is rewritten (layers inside If/Loop bodies are left alone). Pure
measurement: nothing here knows about CLE.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from cle_core import unique_name
from cle_core._quality import (
    natural_images,
    quantization_grid,
    quantize_array,
    sqnr_db,
    top1_agreement,
)

__all__ = [
    "activation_quantized",
    "activation_ranges",
    "default_inputs",
    "evaluate",
    "run",
    "weight_quantized",
]

_WEIGHT_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
_DEFAULT_SIZE = 224


# -- graph helpers ------------------------------------------------------------------------


def _opset(model: onnx.ModelProto) -> int:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return int(imp.version)
    return 0


def _is_onnx_domain(node: onnx.NodeProto) -> bool:
    return node.domain in ("", "ai.onnx")


def _constant_values(graph: onnx.GraphProto) -> set[str]:
    """Initializers and values computed from constants only (Constant, DQ of weights)."""
    const = {t.name for t in graph.initializer}
    const |= {t.name for t in graph.sparse_initializer}
    for node in graph.node:
        if all(not name or name in const for name in node.input):
            const.update(o for o in node.output if o)
    return const


def _layer_nodes(graph: onnx.GraphProto) -> list[int]:
    """Indices of the layers whose input 0 is quantized: Conv, ConvTranspose, Gemm, and
    MatMul with a constant second input (an initializer, or one behind a DequantizeLinear).

    Indices, not node objects: protobuf hands out a new wrapper on each access, so the
    identity of a node object is not stable.
    """
    const = _constant_values(graph)
    out = []
    for k, node in enumerate(graph.node):
        if not _is_onnx_domain(node) or node.op_type not in _WEIGHT_OPS or not node.input:
            continue
        if node.op_type == "MatMul" and (len(node.input) < 2 or node.input[1] not in const):
            continue
        out.append(k)
    return out


def _attr(node: onnx.NodeProto, name: str, default):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _weight_axis(node: onnx.NodeProto, ndim: int) -> int | None:
    """The output-channel axis of the node's weight (input 1)."""
    if ndim < 1:
        return None
    if node.op_type == "Conv":
        return 0
    if node.op_type == "ConvTranspose":
        return 1 if ndim >= 2 else None
    if node.op_type == "Gemm":
        return 0 if _attr(node, "transB", 0) else 1
    return ndim - 1  # MatMul: (..., K, N)


def _subgraph_inputs(graph: onnx.GraphProto) -> set[str]:
    """Names read by nodes inside subgraphs (they may refer to outer-scope values)."""
    names: set[str] = set()
    for node in graph.node:
        for a in node.attribute:
            subs = list(a.graphs) + ([a.g] if a.HasField("g") else [])
            for sub in subs:
                for n in sub.node:
                    names.update(n.input)
                names |= _subgraph_inputs(sub)
    return names


class _Names:
    """Fresh value, node and initializer names for a graph."""

    def __init__(self, graph: onnx.GraphProto):
        used = {t.name for t in graph.initializer} | {i.name for i in graph.input}
        used |= {o.name for o in graph.output} | {v.name for v in graph.value_info}
        for node in graph.node:
            used.update(node.input)
            used.update(node.output)
            used.add(node.name)
        self._used = used

    def __call__(self, base: str) -> str:
        return unique_name(base, self._used)


def _add_initializer(model: onnx.ModelProto, array: np.ndarray, name: str) -> None:
    model.graph.initializer.append(numpy_helper.from_array(array, name))
    if model.ir_version < 4:  # before IR 4 every initializer must also be a graph input
        model.graph.input.append(
            helper.make_tensor_value_info(
                name, helper.np_dtype_to_tensor_dtype(array.dtype), list(array.shape)
            )
        )


def _qdq_nodes(
    model: onnx.ModelProto,
    names: _Names,
    value: str,
    lo,
    hi,
    bits: int,
    symmetric: bool,
    axis: int | None,
) -> tuple[list[onnx.NodeProto], str]:
    """QuantizeLinear -> DequantizeLinear on ``value`` (8 bits), returning the nodes and
    the name of the dequantized value."""
    scale, zero_point, _, _ = quantization_grid(lo, hi, bits, symmetric)
    zp_dtype = np.int8 if symmetric else np.uint8
    scale_name = names(f"{value}_scale")
    zp_name = names(f"{value}_zero_point")
    _add_initializer(model, np.asarray(scale, dtype=np.float32), scale_name)
    _add_initializer(model, np.asarray(zero_point).astype(zp_dtype), zp_name)
    q_name = names(f"{value}_quantized")
    dq_name = names(f"{value}_dequantized")
    kwargs = {} if axis is None else {"axis": axis}
    q = helper.make_node(
        "QuantizeLinear",
        [value, scale_name, zp_name],
        [q_name],
        name=names(f"{value}_QuantizeLinear"),
        **kwargs,
    )
    dq = helper.make_node(
        "DequantizeLinear",
        [q_name, scale_name, zp_name],
        [dq_name],
        name=names(f"{value}_DequantizeLinear"),
        **kwargs,
    )
    return [q, dq], dq_name


def _symmetric_clip(
    model: onnx.ModelProto, names: _Names, value: str, lo: float, hi: float, opset: int
) -> tuple[list[onnx.NodeProto], str]:
    """Clip to the symmetric 8-bit grid's ends, +-127 steps: int8 QuantizeLinear would
    saturate at -128 instead (only data outside the calibrated range gets there)."""
    scale, _, qmin, qmax = quantization_grid(lo, hi, 8, symmetric=True)
    s = np.float32(scale)
    lo_q, hi_q = np.float32(qmin * s), np.float32(qmax * s)
    out_name = names(f"{value}_clipped")
    node_name = names(f"{value}_Clip")
    if opset >= 11:
        lo_name, hi_name = names(f"{value}_clip_min"), names(f"{value}_clip_max")
        _add_initializer(model, np.asarray(lo_q), lo_name)
        _add_initializer(model, np.asarray(hi_q), hi_name)
        node = helper.make_node("Clip", [value, lo_name, hi_name], [out_name], name=node_name)
    else:
        node = helper.make_node(
            "Clip", [value], [out_name], name=node_name, min=float(lo_q), max=float(hi_q)
        )
    return [node], out_name


def _fake_quant_nodes(
    model: onnx.ModelProto,
    names: _Names,
    value: str,
    lo: float,
    hi: float,
    bits: int,
    symmetric: bool,
) -> tuple[list[onnx.NodeProto], str]:
    """``(clip(round(x / s) + z, qmin, qmax) - z) * s`` from elementary ops, for any width."""
    scale, zero_point, qmin, qmax = quantization_grid(lo, hi, bits, symmetric)
    consts = {
        "scale": np.float32(scale),
        "zero_point": np.float32(zero_point),
        "qmin": np.float32(qmin),
        "qmax": np.float32(qmax),
    }
    cname = {}
    for key, val in consts.items():
        cname[key] = names(f"{value}_{key}")
        _add_initializer(model, np.asarray(val, dtype=np.float32), cname[key])
    steps = [
        ("Div", [value, cname["scale"]]),
        ("Round", None),
        ("Add", [None, cname["zero_point"]]),
        ("Clip", [None, cname["qmin"], cname["qmax"]]),
        ("Sub", [None, cname["zero_point"]]),
        ("Mul", [None, cname["scale"]]),
    ]
    nodes, prev = [], value
    for op, ins in steps:
        ins = [prev] if ins is None else [prev if i is None else i for i in ins]
        out = names(f"{value}_fq_{op.lower()}")
        nodes.append(helper.make_node(op, ins, [out], name=names(f"{value}_fq_{op}")))
        prev = out
    return nodes, prev


def _finish(model: onnx.ModelProto) -> onnx.ModelProto:
    onnx.checker.check_model(model)
    return model


# -- weights ------------------------------------------------------------------------------


def weight_quantized(
    model: onnx.ModelProto, bits: int = 8, per_channel: bool = False, symmetric: bool = False
) -> onnx.ModelProto:
    """A copy of ``model`` with simulated ``bits``-bit weights.

    The weight (input 1) of every Conv, ConvTranspose, Gemm and MatMul whose second input
    is an initializer gets a min/max grid (see :func:`cle_core._quality.quantize_array`),
    one per tensor or, with ``per_channel``, one per output channel (axis 0 for Conv, 1 for
    ConvTranspose, 0 for Gemm with ``transB=1`` and 1 otherwise, the last axis for MatMul).
    Biases are untouched. An initializer shared by several such layers is quantized once,
    with the first layer's axis.

    For ``bits == 8`` and float32 weights the graph gets QuantizeLinear/DequantizeLinear
    pairs (uint8 asymmetric, or int8 with ``symmetric``) in front of the layers, so that
    onnxruntime runs QDQ; that needs opset 10, or 13 for ``per_channel``, and below that
    the weights are fake-quantized instead. Other widths (and other float dtypes) are
    fake-quantized in NumPy: the initializer holds the dequantized values (a new
    initializer is added when the original also feeds other nodes).

    The result passes ``onnx.checker.check_model``. The input model is not modified.
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    inits = {t.name: t for t in graph.initializer}
    # From IR 4 on, an initializer that is also a graph input is only a default value.
    inputs = {i.name for i in graph.input} if out.ir_version >= 4 else set()
    opset = _opset(out)
    use_qdq = bits == 8 and opset >= (13 if per_channel else 10)
    names = _Names(graph)

    # Which initializer each weight slot reads, and the axis of its first reader.
    slots: list[tuple[int, str]] = []
    axis_of: dict[str, int | None] = {}
    for k, node in enumerate(graph.node):
        if not _is_onnx_domain(node) or node.op_type not in _WEIGHT_OPS:
            continue
        if len(node.input) < 2 or node.input[1] not in inits or node.input[1] in inputs:
            continue
        tensor = inits[node.input[1]]
        if tensor.data_type not in (TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16):
            continue
        slots.append((k, node.input[1]))
        if node.input[1] not in axis_of:
            axis_of[node.input[1]] = _weight_axis(node, len(tensor.dims)) if per_channel else None
    if not slots:
        return _finish(out)

    # Readers of each initializer that are not weight slots keep the original values.
    slot_nodes = {k for k, _ in slots}
    other_readers = _subgraph_inputs(graph) | {o.name for o in graph.output}
    for k, node in enumerate(graph.node):
        for i, name in enumerate(node.input):
            if i != 1 or k not in slot_nodes:
                other_readers.add(name)

    replacement: dict[str, str] = {}
    new_nodes: list[onnx.NodeProto] = []
    for name, axis in axis_of.items():
        tensor = inits[name]
        w = numpy_helper.to_array(tensor)
        if use_qdq and w.dtype == np.float32:
            if axis is None:
                lo, hi = w.min(), w.max()
            else:
                reduce = tuple(i for i in range(w.ndim) if i != axis)
                lo, hi = w.min(axis=reduce), w.max(axis=reduce)
            nodes, dq_name = _qdq_nodes(out, names, name, lo, hi, bits, symmetric, axis)
            new_nodes.extend(nodes)
            replacement[name] = dq_name
            continue
        wq = quantize_array(w, bits=bits, symmetric=symmetric, axis=axis)
        if name in other_readers:
            fq_name = names(f"{name}_fake_quantized")
            _add_initializer(out, wq, fq_name)
            replacement[name] = fq_name
        else:
            tensor.CopyFrom(numpy_helper.from_array(wq, name))

    for k, name in slots:
        if name in replacement:
            graph.node[k].input[1] = replacement[name]
    if new_nodes:
        # Weight Q/DQ read only initializers, so they can lead the topological order.
        old = [onnx.NodeProto.FromString(n.SerializeToString()) for n in graph.node]
        del graph.node[:]
        graph.node.extend(new_nodes + old)
    return _finish(out)


# -- running ------------------------------------------------------------------------------


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    opts.log_severity_level = 3
    return ort.InferenceSession(
        model.SerializeToString(), sess_options=opts, providers=["CPUExecutionProvider"]
    )


def _data_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    inits = {t.name for t in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in inits]


def _feeds(
    model: onnx.ModelProto, inputs: Mapping[str, np.ndarray] | np.ndarray | None
) -> dict[str, np.ndarray]:
    """Map ``inputs`` to the model's data inputs, in their element types."""
    graph_inputs = _data_inputs(model)
    if inputs is None:
        inputs = _default_inputs(model)
    if not isinstance(inputs, Mapping):
        if len(graph_inputs) != 1:
            raise ValueError(
                f"the model has {len(graph_inputs)} inputs "
                f"({', '.join(i.name for i in graph_inputs)}); pass a dict of arrays"
            )
        inputs = {graph_inputs[0].name: inputs}
    feeds = {}
    for gi in graph_inputs:
        if gi.name not in inputs:
            raise ValueError(f"no data for model input {gi.name!r}")
        dtype = helper.tensor_dtype_to_np_dtype(gi.type.tensor_type.elem_type)
        feeds[gi.name] = np.ascontiguousarray(np.asarray(inputs[gi.name]), dtype=dtype)
    unknown = set(inputs) - set(feeds)
    if unknown:
        raise ValueError(f"the model has no input(s) named {sorted(unknown)}")
    lengths = {a.shape[0] if a.ndim else None for a in feeds.values()}
    if len(lengths) != 1 or None in lengths:
        raise ValueError("every input needs the same batch size in axis 0")
    return feeds


def _fixed_batch(model: onnx.ModelProto, names: Iterable[str]) -> int | None:
    wanted = set(names)
    for gi in _data_inputs(model):
        if gi.name not in wanted:
            continue
        dims = gi.type.tensor_type.shape.dim
        if dims and dims[0].HasField("dim_value") and dims[0].dim_value > 0:
            return int(dims[0].dim_value)
    return None


def _batches(
    model: onnx.ModelProto,
    session: ort.InferenceSession,
    feeds: dict[str, np.ndarray],
    output_names: list[str],
    batch: int,
) -> Iterator[tuple[list[np.ndarray], int]]:
    """Run ``feeds`` in chunks; yields (outputs, number of real rows)."""
    if batch < 1:
        raise ValueError(f"batch must be positive, got {batch}")
    n = next(iter(feeds.values())).shape[0]
    fixed = _fixed_batch(model, feeds)
    step = fixed or batch
    for start in range(0, n, step):
        chunk = {k: v[start : start + step] for k, v in feeds.items()}
        real = next(iter(chunk.values())).shape[0]
        if fixed and real < fixed:
            # A fixed batch dimension: repeat the last row; its results are dropped.
            chunk = {
                k: np.concatenate([v, np.repeat(v[-1:], fixed - real, axis=0)])
                for k, v in chunk.items()
            }
        yield session.run(output_names, chunk), real


def run(
    model: onnx.ModelProto,
    inputs: Mapping[str, np.ndarray] | np.ndarray | None = None,
    batch: int = 16,
) -> np.ndarray:
    """The model's first output on ``inputs``, run in batches with onnxruntime (CPU).

    ``inputs`` is a dict from input name to an array with the batch in axis 0, or one
    array for a single-input model (``None``: :func:`default_inputs`). A model with a
    fixed batch dimension is run in chunks of that size. Sessions use 2 intra-op threads
    and basic graph optimizations (which keep QuantizeLinear/DequantizeLinear as float
    simulation instead of fusing them into integer kernels).
    """
    feeds = _feeds(model, inputs)
    session = _session(model)
    first = session.get_outputs()[0].name
    parts = [outs[0][:real] for outs, real in _batches(model, session, feeds, [first], batch)]
    return np.concatenate(parts, axis=0)


# -- activations --------------------------------------------------------------------------


def _layer_inputs(graph: onnx.GraphProto) -> list[str]:
    seen: dict[str, None] = {}
    for k in _layer_nodes(graph):
        if graph.node[k].input[0]:
            seen.setdefault(graph.node[k].input[0], None)
    return list(seen)


def activation_ranges(
    model: onnx.ModelProto,
    inputs: Mapping[str, np.ndarray] | np.ndarray | None = None,
    batch: int = 16,
    with_output: bool = False,
):
    """Min and max of the data input (input 0) of every layer, over ``inputs``.

    The layers are Conv, ConvTranspose, Gemm, and MatMul with a constant second input. The
    values are read with onnxruntime from a copy of the model in which they are extra
    graph outputs, run in batches of ``batch``. Returns ``{value name: (min, max)}`` in
    graph order. ``inputs`` as for :func:`run`. With ``with_output`` returns ``(ranges,
    first graph output)`` from the same pass (saves a run when both are needed).
    """
    feeds = _feeds(model, inputs)
    wanted = _layer_inputs(model.graph)
    ranges: dict[str, tuple[float, float]] = {}
    inits = {t.name: t for t in model.graph.initializer}
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    existing_outputs = {o.name for o in probe.graph.output}
    try:
        inferred = onnx.shape_inference.infer_shapes(probe)
        elem_types = {
            v.name: v.type.tensor_type.elem_type
            for v in list(inferred.graph.value_info) + list(inferred.graph.output)
        }
    except Exception:  # shape inference is best effort; unknown types default to float
        elem_types = {}
    exposed = []
    for name in wanted:
        if name in feeds:
            ranges[name] = (float(np.min(feeds[name])), float(np.max(feeds[name])))
        elif name in inits and name not in existing_outputs:
            arr = numpy_helper.to_array(inits[name])
            ranges[name] = (float(arr.min()), float(arr.max()))
        else:
            exposed.append(name)
            if name not in existing_outputs:
                elem = elem_types.get(name) or TensorProto.FLOAT
                probe.graph.output.append(helper.make_tensor_value_info(name, elem, None))
    first = model.graph.output[0].name
    collected: list[np.ndarray] = []
    if exposed or with_output:
        session = _session(probe)
        lo = dict.fromkeys(exposed, np.inf)
        hi = dict.fromkeys(exposed, -np.inf)
        fetch = exposed + ([first] if with_output else [])
        for outs, real in _batches(probe, session, feeds, fetch, batch):
            for name, arr in zip(exposed, outs, strict=False):
                if arr.size:
                    lo[name] = min(lo[name], float(np.min(arr)))
                    hi[name] = max(hi[name], float(np.max(arr)))
            if with_output:
                collected.append(outs[-1][:real])
        for name in exposed:
            ranges[name] = (lo[name], hi[name]) if lo[name] <= hi[name] else (0.0, 0.0)
    ranges = {name: ranges[name] for name in wanted}
    return (ranges, np.concatenate(collected)) if with_output else ranges


def activation_quantized(
    model: onnx.ModelProto,
    ranges: Mapping[str, tuple[float, float]],
    bits: int = 8,
    symmetric: bool = False,
) -> onnx.ModelProto:
    """A copy of ``model`` that quantizes the data input (input 0) of every layer.

    Each such value gets one per-tensor grid from ``ranges[name] = (min, max)`` (as
    returned by :func:`activation_ranges`; the grid always includes 0). Only the layers
    read the quantized value; other consumers keep the float one. For 8 bits the grid is
    a QuantizeLinear/DequantizeLinear pair (uint8 asymmetric, or int8 with ``symmetric``
    behind a Clip to +-127 steps; opset >= 10); other widths use Div/Round/Add/Clip/Sub/Mul
    (opset >= 11). All give the values of :func:`cle_core._quality.quantize_array`'s
    grids, computed in float32.

    Raises KeyError when a layer input has no range. The result passes
    ``onnx.checker.check_model``.
    """
    opset = _opset(model)
    need = 10 if bits == 8 else 11
    if opset < need:
        raise ValueError(
            f"activation_quantized with {bits} bits needs opset >= {need}, the model has {opset}"
        )
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    names = _Names(graph)
    layers = set(_layer_nodes(graph))
    done: dict[str, str] = {}
    old = [onnx.NodeProto.FromString(n.SerializeToString()) for n in graph.node]
    del graph.node[:]
    for k, node in enumerate(old):
        if k in layers and node.input[0]:
            value = node.input[0]
            if value not in done:
                if value not in ranges:
                    raise KeyError(f"no activation range for {value!r} (input of {node.name!r})")
                lo, hi = (float(v) for v in ranges[value])
                if bits == 8:
                    nodes, source = [], value
                    if symmetric:
                        nodes, source = _symmetric_clip(out, names, value, lo, hi, opset)
                    qdq, q_value = _qdq_nodes(out, names, source, lo, hi, bits, symmetric, None)
                    nodes += qdq
                else:
                    nodes, q_value = _fake_quant_nodes(out, names, value, lo, hi, bits, symmetric)
                graph.node.extend(nodes)
                done[value] = q_value
            node.input[0] = done[value]
        graph.node.append(node)
    return _finish(out)


# -- evaluation ---------------------------------------------------------------------------


def _default_inputs(model: onnx.ModelProto) -> np.ndarray:
    """:func:`natural_images` at the spatial size of the model's (single) NCHW input."""
    graph_inputs = _data_inputs(model)
    if len(graph_inputs) != 1:
        raise ValueError("default inputs need a model with one input; pass inputs explicitly")
    dims = graph_inputs[0].type.tensor_type.shape.dim
    if len(dims) != 4:
        raise ValueError(
            f"default inputs need an NCHW image input, {graph_inputs[0].name!r} has rank "
            f"{len(dims)}; pass inputs explicitly"
        )
    if dims[1].HasField("dim_value") and dims[1].dim_value not in (0, 1, 3):
        raise ValueError(
            f"default inputs are RGB or grey images, {graph_inputs[0].name!r} has "
            f"{dims[1].dim_value} channels; pass inputs explicitly"
        )
    hw = tuple(
        int(d.dim_value) if d.HasField("dim_value") and d.dim_value > 0 else _DEFAULT_SIZE
        for d in dims[2:]
    )
    from ._commands import fit_channels

    return fit_channels(natural_images(size=hw), model)


def default_inputs(model: onnx.ModelProto) -> np.ndarray:
    """The default evaluation batch for ``model``: the 120 :func:`natural_images` at the
    height and width of its graph input (224 where those are dynamic)."""
    return _default_inputs(model)


def _compare(result: dict, prefix: str, reference: np.ndarray, test: np.ndarray) -> None:
    result[f"{prefix}_sqnr"] = sqnr_db(reference, test)
    result[f"{prefix}_top1"] = top1_agreement(reference, test)


def evaluate(
    fp32_model: onnx.ModelProto,
    candidate_model: onnx.ModelProto | None = None,
    inputs: Mapping[str, np.ndarray] | np.ndarray | None = None,
    bits: int = 8,
    per_channel: bool = False,
    symmetric: bool = False,
    activations: bool = True,
    batch: int = 16,
) -> dict[str, float]:
    """Measure what simulated quantization does to the logits, against the FP32 model.

    The candidate (``fp32_model`` itself when ``candidate_model`` is None, e.g. an
    equalized copy otherwise) is weight-quantized (:func:`weight_quantized`) and, with
    ``activations``, also activation-quantized (:func:`activation_quantized`, per tensor,
    ranges calibrated on the same ``inputs`` with the weights already quantized). Every
    variant's first output is compared with the FP32 ``fp32_model``'s. ``inputs`` default
    to :func:`default_inputs`.

    Returns, for ``bits = N``:

    - ``fp32_sqnr``, ``fp32_top1``: candidate in FP32 vs original (inf and 1.0 without a
      candidate);
    - ``wN_sqnr``, ``wN_top1``: SQNR in dB and top-1 agreement with N-bit weights;
    - ``wNaN_sqnr``, ``wNaN_top1``: the same with N-bit activations too (only when
      ``activations``).
    """
    if inputs is None:
        inputs = _default_inputs(fp32_model)
    reference = run(fp32_model, inputs, batch)
    result: dict[str, float] = {}
    if candidate_model is None:
        candidate = fp32_model
        result["fp32_sqnr"] = float("inf")
        result["fp32_top1"] = 1.0
    else:
        candidate = candidate_model
        _compare(result, "fp32", reference, run(candidate, inputs, batch))
    wq = weight_quantized(candidate, bits=bits, per_channel=per_channel, symmetric=symmetric)
    _compare(result, f"w{bits}", reference, run(wq, inputs, batch))
    if activations:
        ranges = activation_ranges(wq, inputs, batch)
        aq = activation_quantized(wq, ranges, bits=bits, symmetric=symmetric)
        _compare(result, f"w{bits}a{bits}", reference, run(aq, inputs, batch))
    return result
