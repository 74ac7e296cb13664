"""Reading ONNX protos: subgraphs and what they read, the default opset, node
attributes, tensor values, element types and inferred shapes."""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from cle_core import UnsupportedModelError


def subgraphs(node: onnx.NodeProto):
    """The graphs held in ``node``'s attributes (If branches, Loop and Scan bodies)."""
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            yield attr.g
        elif attr.type == onnx.AttributeProto.GRAPHS:
            yield from attr.graphs


def has_subgraph(node: onnx.NodeProto) -> bool:
    return any(True for _ in subgraphs(node))


def outer_reads(graph: onnx.GraphProto) -> set[str]:
    """Names that ``graph`` (a subgraph) reads from enclosing scopes, nested ones too."""
    defined = {v.name for v in graph.input} | {t.name for t in graph.initializer}
    defined |= {t.values.name for t in graph.sparse_initializer}
    defined |= {o for n in graph.node for o in n.output if o}
    reads: set[str] = set()
    for n in graph.node:
        reads.update(name for name in n.input if name)
        for sub in subgraphs(n):
            reads |= outer_reads(sub)
    return reads - defined


def node_reads(node: onnx.NodeProto) -> list[str]:
    """Every name ``node`` reads: its inputs, then what its subgraphs read from outside."""
    names = [n for n in node.input if n]
    for sub in subgraphs(node):
        names += sorted(outer_reads(sub) - set(names))
    return names


def default_opset(model: onnx.ModelProto) -> int:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return int(imp.version)
    raise UnsupportedModelError("the model imports no default-domain (ai.onnx) opset")


def _attrs(node: onnx.NodeProto) -> dict[str, Any]:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _text(value) -> str:
    """A string attribute's value (onnx gives bytes)."""
    return value.decode() if isinstance(value, bytes) else str(value)


def _tensor_array(t: onnx.TensorProto, base_dir: str | None) -> np.ndarray:
    """The tensor's values, without copying where possible: external data is memory-
    mapped, raw data viewed (read-only; the core never writes into its arrays)."""
    if t.data_location == onnx.TensorProto.EXTERNAL:
        info = {e.key: e.value for e in t.external_data}
        path = os.path.join(base_dir or "", info["location"])
        dtype = onnx.helper.tensor_dtype_to_np_dtype(t.data_type)
        shape = tuple(t.dims)
        offset = int(info.get("offset", 0))
        if int(np.prod(shape, dtype=np.int64)) == 0:
            return np.zeros(shape, dtype)
        return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape)
    if t.HasField("raw_data") and t.data_type in (
        onnx.TensorProto.FLOAT,
        onnx.TensorProto.DOUBLE,
        onnx.TensorProto.FLOAT16,
    ):
        dtype = onnx.helper.tensor_dtype_to_np_dtype(t.data_type)
        return np.frombuffer(t.raw_data, dtype=dtype).reshape(tuple(t.dims))
    return numpy_helper.to_array(t)


def _dtypes(model: onnx.ModelProto) -> dict[str, np.dtype]:
    g = model.graph
    out: dict[str, np.dtype] = {}
    for t in g.initializer:
        out[t.name] = np_dtype(t.data_type)
    for vi in list(g.input) + list(g.output) + list(g.value_info):
        elem = vi.type.tensor_type.elem_type
        if elem:
            out[vi.name] = np_dtype(elem)
    return {k: v for k, v in out.items() if v is not None}


def np_dtype(elem: int) -> np.dtype | None:
    """The NumPy dtype of an ONNX element type; None if it has none."""
    try:
        return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem))
    except (KeyError, TypeError, ValueError):
        return None


def _batch_names(model: onnx.ModelProto) -> dict[str, str]:
    """The symbolic name of axis 0 of each value where it has one (``dim_param``): the
    name a dynamic axis was given, carried by shape inference, or one it made up
    (``unk__6``) for a size it knows equal on the values that bear it."""
    g = model.graph
    out = {}
    for vi in list(g.input) + list(g.output) + list(g.value_info):
        t = vi.type.tensor_type
        if t.HasField("shape") and t.shape.dim and t.shape.dim[0].dim_param:
            out[vi.name] = t.shape.dim[0].dim_param
    return out


def _dims(model: onnx.ModelProto) -> dict[str, tuple]:
    g = model.graph
    out = {}
    for vi in list(g.input) + list(g.output) + list(g.value_info):
        t = vi.type.tensor_type
        if t.HasField("shape"):
            # Exporters (PaddlePaddle's) write -1 for a dynamic dimension: unknown, as a
            # symbolic one; never a size (a channel count of -1 crashed the estimate).
            out[vi.name] = tuple(
                d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None
                for d in t.shape.dim
            )
    return out
