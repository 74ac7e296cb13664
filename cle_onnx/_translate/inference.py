"""Shape inference for the reader: onnx's, on the model as it is, or on a light copy
that knows more. Two things make the copy know more:

- input sizes the user gave (``--input-shape``, ``--dim``, ``input_shapes=``) for the
  dimensions the file leaves dynamic (the batch stays as declared: the IR takes axis 0
  for it);
- target shapes the reader folded itself where onnx's data propagation stops (a
  Reshape's target from ``Shape -> Slice -> Concat`` with Constant nodes, PaddlePaddle's
  flatten of the spatial axes before a transformer neck): given as initializers, they
  make the output's rank and sizes, and so every later value's, known.

The copy holds no weight bytes (a float initializer becomes an input of its type and
shape) and is used for the shapes only; the model itself is never changed. It is what
onnx infers on in every case: onnx serializes the model it is given and parses its
result back, weights and all (on a 531 MB VGG-11 export, 1.8 s and about 1 GB).
Only the shapes and types come back (see :func:`infer`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import onnx
from onnx import numpy_helper, shape_inference

from .constants import _Dim

# Node inputs (by op, from index 1 on) that hold shapes, sizes or axes: where a folded
# value tells the inference what it could not compute itself.
_SHAPE_READERS = frozenset(
    {"Reshape", "Expand", "Tile", "Slice", "Squeeze", "Unsqueeze", "ConstantOfShape", "Range"}
)
# Small initializers are kept in the copy (inference reads the values of shapes, axes,
# Resize's scales); a weight becomes an input of its type and shape.
_KEEP_ELEMENTS = 1 << 16
_KEEP_ANY = 64
_INTEGER_TYPES = frozenset(
    {onnx.TensorProto.INT64, onnx.TensorProto.INT32, onnx.TensorProto.INT16, onnx.TensorProto.INT8}
)


def infer(
    model: onnx.ModelProto,
    input_shapes: Mapping[str, Sequence[int | None]] | None = None,
    known: Mapping[str, np.ndarray] | None = None,
) -> onnx.ModelProto:
    """The shapes and types of ``model``'s values as onnx infers them (data propagation
    on, else off, else none), on a light copy with ``input_shapes`` (sizes by input
    name, None where not given) and ``known`` (folded integer values by name): a model
    whose inputs, outputs, value infos and initializers carry them, the initializers
    without their data (each weight is back under its own name and type)."""
    light = _light_copy(model, input_shapes or {}, known or {})
    inferred = light
    # Data propagation knows the shapes that exporters compute with Shape / Slice /
    # Concat (a Reshape's target); where it fails, the plain inference still runs.
    for data_prop in (True, False):
        try:
            inferred = shape_inference.infer_shapes(light, strict_mode=False, data_prop=data_prop)
            break
        except Exception:
            continue
    # The weights made inputs of the copy are initializers again (their type and shape,
    # no data), so that the copy reads as the model: its inputs are the model's.
    given = {vi.name for vi in model.graph.input}
    weights = {t.name: t for t in model.graph.initializer if t.name not in given}
    inputs = [vi for vi in inferred.graph.input if vi.name not in weights]
    moved = [weights[vi.name] for vi in inferred.graph.input if vi.name in weights]
    del inferred.graph.input[:]
    inferred.graph.input.extend(inputs)
    for t in moved:
        inferred.graph.initializer.add(name=t.name, data_type=t.data_type, dims=t.dims)
    return inferred


def _light_copy(model, input_shapes, known) -> onnx.ModelProto:
    g = model.graph
    graph = onnx.GraphProto(name=g.name)
    graph.node.extend(n for n in g.node if not (len(n.output) == 1 and n.output[0] in known))
    names = {vi.name for vi in g.input}
    for vi in g.input:
        copy = graph.input.add()
        copy.CopyFrom(vi)
        sizes = input_shapes.get(vi.name)
        dims = copy.type.tensor_type.shape.dim if copy.type.HasField("tensor_type") else []
        if sizes is not None and len(sizes) == len(dims):
            for i, (d, size) in enumerate(zip(dims, sizes, strict=True)):
                fixed = d.HasField("dim_value") and d.dim_value > 0
                if size is not None and not fixed and i > 0:
                    d.Clear()
                    d.dim_value = int(size)
    for t in g.initializer:
        if t.name in known:
            continue
        size = int(np.prod(t.dims))
        if size <= _KEEP_ANY or (t.data_type in _INTEGER_TYPES and size <= _KEEP_ELEMENTS):
            graph.initializer.add().CopyFrom(t)
        elif t.name not in names:
            graph.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, t.dims))
    for name, value in known.items():
        graph.initializer.append(numpy_helper.from_array(np.asarray(value, np.int64), name))
    graph.output.extend(g.output)
    graph.value_info.extend(g.value_info)
    copy = onnx.helper.make_model(graph, opset_imports=list(model.opset_import))
    copy.ir_version = max(int(model.ir_version or 0), 4)
    copy.functions.extend(model.functions)
    return copy


def shape_values(
    model: onnx.ModelProto,
    constants: Mapping[str, np.ndarray],
    dims: Mapping[str, tuple],
    given: set[str],
    batch_names: Mapping[str, str] | None = None,
) -> dict[str, np.ndarray]:
    """Folded values (``constants``) that a shape-taking input reads and that the
    inference does not know as values: computed by a node of one output (not given as
    an initializer or Constant, ``given``), integers, and read where an output's shape
    is still unknown. A dimension known only as a symbol (:class:`_Dim`, the batch read
    with Shape) is written as 0 where every reader is a Reshape of that very tensor,
    which copies it so (or of a tensor whose axis 0 inference named alike,
    ``batch_names``: the same size); else the value is left out."""
    producers = {o: n for n in model.graph.node for o in n.output if o}
    readers: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    for n in model.graph.node:
        for k, name in enumerate(n.input):
            if name:
                readers.setdefault(name, []).append((n, k))
    out: dict[str, np.ndarray] = {}
    for name, value in constants.items():
        p = producers.get(name)
        if name in given or p is None or len(p.output) != 1 or value.ndim > 1:
            continue
        uses = readers.get(name, [])
        # (a Reshape whose output has several unknown sizes learns from a value that
        # leaves it one: the batch beside known sizes)
        symbols = sum(isinstance(d, _Dim) for d in value.reshape(-1))
        wanted = any(
            n.op_type in _SHAPE_READERS
            and k >= 1
            and any(
                o
                and (
                    o not in dims
                    or (
                        n.op_type == "Reshape" and sum(d is None for d in dims[o]) > min(symbols, 1)
                    )
                )
                for o in n.output
            )
            for n, k in uses
        )
        if not wanted or value.dtype.kind not in "iuO":
            continue
        if value.dtype.kind == "O":
            value = _symbols_as_copies(value, uses, batch_names or {})
            if value is None:
                continue
        out[name] = np.asarray(value, np.int64)
    return out


def _symbols_as_copies(value: np.ndarray, uses, batch_names) -> np.ndarray | None:
    """``value`` with each symbolic dimension replaced by 0 (Reshape: copy the input's),
    where that is what every reader makes of it, and one other symbolic dimension (the
    batch times the heads, ``(T, B * H, D)``) by -1, which the number of elements fixes
    where no other size is unknown; else None."""
    flat = list(value.reshape(-1))
    other = set()
    for node, k in uses:
        if node.op_type != "Reshape" or k != 1:
            return None
        if any(a.name == "allowzero" and a.i for a in node.attribute):
            return None
        batch = batch_names.get(node.input[0])
        other |= {
            i
            for i, d in enumerate(flat)
            if isinstance(d, _Dim)
            and (d.value, d.index) != (node.input[0], i)
            # Hugging Face's attention reads the batch of the hidden states once
            # (``hidden_states.shape[:-1]``) for every head split and merge
            and not (i == d.index == 0 and batch and batch_names.get(d.value) == batch)
        }
    inferred = any(not isinstance(d, _Dim) and int(d) == -1 for d in flat)
    if len(other) > 1 or (other and inferred):
        return None
    return np.array(
        [-1 if i in other else 0 if isinstance(d, _Dim) else int(d) for i, d in enumerate(flat)],
        np.int64,
    )
