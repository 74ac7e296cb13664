"""ONNX -> IR translation. Reads the model; never modifies it (unless told to take
ownership of weight bytes, see :func:`to_ir`)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper, shape_inference

from cle_core import Graph, Layout, UnsupportedModelError

MIN_OPSET = 7


@dataclass
class Translation:
    """What :func:`to_ir` learned about the model, for writing results back."""

    users: dict[str, list[int]]  # value name -> indices of nodes reading it (subgraphs too)
    ranks: dict[str, int]
    opset: int
    ir_version: int = 8
    dtypes: dict[str, np.dtype] = field(default_factory=dict)  # element type of each value
    subgraph_reads: set[str] = field(default_factory=set)  # outer names read in subgraphs
    owned: dict[str, np.ndarray] = field(default_factory=dict)  # bytes taken out of the proto
    node_names: dict[int, str] = field(default_factory=dict)
    # parameters computed from constants (not initializers) -> (shape, dtype)
    derived: dict[str, tuple] = field(default_factory=dict)


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


# Default-domain ops whose output is not a function of their inputs alone.
_NONDETERMINISTIC = frozenset(
    {
        "RandomNormal",
        "RandomUniform",
        "RandomNormalLike",
        "RandomUniformLike",
        "Multinomial",
        "Bernoulli",
        "Dropout",
    }
)


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


class _Dim:
    """An unknown dimension: ``index`` of value ``value``."""

    def __init__(self, value: str, index: int):
        self.value, self.index = value, index

    def __repr__(self) -> str:
        return f"{self.value}[{self.index}]"


_FOLDABLE = frozenset(
    {
        "Cast",
        "Concat",
        "ConstantOfShape",
        "Gather",
        "Reshape",
        "Slice",
        "Transpose",
        "Unsqueeze",
        "Squeeze",
        "Identity",
        "Add",
        "Sub",
        "Mul",
        "Div",
        "Neg",
        "Range",
        "Expand",
    }
)
_RESIZE_MODES = frozenset({"nearest", "linear", "cubic", "bilinear"})  # bilinear: Upsample 7
_COORDINATE_MODES = frozenset(
    {
        "half_pixel",
        "half_pixel_symmetric",
        "pytorch_half_pixel",
        "align_corners",
        "asymmetric",
        "tf_half_pixel_for_nn",
        "tf_crop_and_resize",
    }
)
# Folding reads and writes whole tensors: a weight computed from constants is folded
# whatever its size, but no result may exceed this many elements (a ConstantOfShape or
# an Expand can describe gigabytes in a few bytes of model).
_FOLD_LIMIT = 1 << 24


def _fold_size(node: onnx.NodeProto, args: list) -> int | None:
    """An upper bound of the number of elements ``node`` produces from ``args``, or None
    if it cannot be told cheaply."""
    op = node.op_type
    sizes = [a.size for a in args if a is not None]
    try:
        if op == "ConstantOfShape":
            return int(np.prod([int(d) for d in args[0].reshape(-1)]))
        if op == "Expand":
            shape = tuple(int(d) for d in args[1].reshape(-1))
            return int(np.prod(np.broadcast_shapes(args[0].shape, shape)))
        if op == "Range":
            start, limit, delta = (float(a.reshape(-1)[0]) for a in args[:3])
            return max(int(np.ceil((limit - start) / delta)), 0) if delta else None
        if op in ("Add", "Sub", "Mul", "Div"):
            return int(np.prod(np.broadcast_shapes(*(a.shape for a in args))))
    except (TypeError, ValueError, OverflowError):
        return None
    return sum(sizes)  # the other foldable ops rearrange, select or cast their inputs


def _evaluate(node: onnx.NodeProto, args: list, opset: int) -> list[np.ndarray]:
    """One node on constant inputs: object arrays (symbolic dims) for the few ops that
    just move them around, the ONNX reference implementation otherwise."""
    if any(a is not None and a.dtype == object for a in args):
        return [np.asarray(v, dtype=object) for v in _evaluate_symbolic(node, args, opset)]
    from onnx.reference import ReferenceEvaluator

    feeds = {n: v for n, v in zip(node.input, args, strict=True) if n}
    return ReferenceEvaluator(node).run(None, feeds)


def _evaluate_symbolic(node: onnx.NodeProto, args: list, opset: int) -> list:
    a = _attrs(node)
    op, data = node.op_type, args[0]
    if op in ("Cast", "Identity"):
        return [data]
    if op == "Gather":
        return [np.take(data, args[1].astype(np.int64), axis=int(a.get("axis", 0)))]
    if op in ("Unsqueeze", "Squeeze"):
        axes = a.get("axes") if opset < 13 else (None if len(args) < 2 else args[1])
        axes = tuple(int(x) for x in np.asarray(axes).reshape(-1))
        if op == "Unsqueeze":
            return [np.expand_dims(data, axes)]
        return [np.squeeze(data, axes)]
    if op == "Concat":
        return [
            np.concatenate([np.asarray(x, dtype=object) for x in args], axis=int(a.get("axis", 0)))
        ]
    raise ValueError(f"cannot fold {op} over symbolic dims")


def _constant_value(node: onnx.NodeProto) -> np.ndarray | None:
    """The value of a ``Constant`` node, whichever attribute holds it (None for a
    sparse or string value)."""
    for a in node.attribute:
        value = onnx.helper.get_attribute_value(a)
        if a.name == "value" and isinstance(value, onnx.TensorProto):
            return numpy_helper.to_array(value)
        if a.name in ("value_float", "value_floats"):
            return np.asarray(value, np.float32)
        if a.name in ("value_int", "value_ints"):
            return np.asarray(value, np.int64)
    return None


def _along_channels(shape, rank: int | None, channels: int | None) -> bool:
    """Whether a tensor of ``shape`` broadcasts against a rank-``rank`` value as one number
    per channel: all ones but axis 1, which is ``channels``, once padded to the rank."""
    if shape is None or rank is None or channels is None or rank < 2 or len(shape) > rank:
        return False
    padded = (1,) * (rank - len(shape)) + tuple(shape)
    return padded[1] == channels and all(d == 1 for i, d in enumerate(padded) if i != 1)


def _explicit_pads(a: dict, nd: int, dims, kernel, stride, dilation) -> tuple | None:
    """A Conv's or pool's pads as begin..., end... values: ``pads``, or what
    ``auto_pad`` computes from the input's spatial size (None if that is unknown)."""
    auto = a.get("auto_pad", b"NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else str(auto)
    if auto == "NOTSET":
        return tuple(int(p) for p in a.get("pads", (0,) * (2 * nd)))
    if auto == "VALID":
        return (0,) * (2 * nd)
    if dims is None or len(dims) != nd + 2 or not all(isinstance(d, int) for d in dims[2:]):
        return None
    begin, end = [], []
    for size, k, s, d in zip(dims[2:], kernel, stride, dilation, strict=True):
        total = max((-(-size // s) - 1) * s + (k - 1) * d + 1 - size, 0)
        small = total // 2
        begin.append(small if auto == "SAME_UPPER" else total - small)
        end.append(total - begin[-1])
    return tuple(begin + end)


def _ceil_extra(dims, nd, kernel, stride, dilation, pads) -> tuple | None:
    """The end padding that makes floor-mode pooling give ceil mode's output size."""
    if dims is None or len(dims) != nd + 2 or not all(isinstance(d, int) for d in dims[2:]):
        return None
    extra = []
    for i, (size, k, s, d) in enumerate(zip(dims[2:], kernel, stride, dilation, strict=True)):
        span = (k - 1) * d + 1
        padded = size + pads[i] + pads[nd + i]
        out = -(-(padded - span) // s) + 1
        if (out - 1) * s >= size + pads[i]:
            out -= 1  # ONNX drops a last window that would start inside the end padding
        extra.append(max((out - 1) * s + span - padded, 0))
    return tuple(extra)


class _Reader:
    """Translates one node at a time; anything unsupported becomes ``opaque``."""

    def __init__(self, model: onnx.ModelProto, take_ownership: bool, base_dir: str | None):
        self.model = model
        g = model.graph
        self.opset = default_opset(model)
        if self.opset < MIN_OPSET or self.opset > onnx.defs.onnx_opset_version():
            raise UnsupportedModelError(
                f"unsupported opset {self.opset} (supported: {MIN_OPSET} to "
                f"{onnx.defs.onnx_opset_version()})"
            )
        self.take_ownership = take_ownership
        self.base_dir = base_dir
        ir_version = int(model.ir_version) if model.ir_version else 8
        graph_inputs = {v.name for v in g.input}
        # From IR 4 on, an initializer that is also a graph input is only a default: a
        # caller may feed another value, so it is not a constant. Before IR 4 every
        # initializer had to be listed as an input, and onnxruntime treats them as
        # constants.
        self.overridable = (
            {t.name for t in g.initializer} & graph_inputs if ir_version >= 4 else set()
        )
        self.inits = {t.name: t for t in g.initializer if t.name not in self.overridable}
        self.constants: dict[str, np.ndarray] = {}
        for node in g.node:
            if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
                value = _constant_value(node)
                if value is not None:
                    self.constants[node.output[0]] = value
        self.users: dict[str, list[int]] = {}
        self.reads: list[list[str]] = []
        subgraph_reads: set[str] = set()
        for i, node in enumerate(g.node):
            names = node_reads(node)
            self.reads.append(names)
            subgraph_reads.update(names[len([n for n in node.input if n]) :])
            for name in names:
                self.users.setdefault(name, []).append(i)
        try:
            inferred = shape_inference.infer_shapes(model, strict_mode=False)
        except Exception:
            inferred = model
        self.dims = _dims(inferred)
        self.translation = Translation(
            self.users,
            {k: len(v) for k, v in self.dims.items()},
            self.opset,
            ir_version,
            _dtypes(inferred),
            subgraph_reads,
        )
        self.graph = Graph(g.name or "onnx")
        self.consumed_adds: set[int] = set()
        self.params: dict[str, np.ndarray] = {}
        self.fixed: set[str] = set()
        # why a value computed from constants has no folded value (for skip reasons)
        self.unfolded: dict[str, str] = {}
        self._fold_constants()

    def _fold_constants(self) -> None:
        """Find the values equalization cannot change (``fixed``: computed from
        constants and shapes alone) and evaluate the small ones (exporters compute
        Pad's pads and Reshape's shape with chains of Concat / Slice / Cast ...).
        ``Shape`` yields the inferred dims, unknown ones as :class:`_Dim` symbols, so
        ``x.view(x.size(0), -1)`` is recognised. Only reads; the model is not changed."""
        self.fixed = set(self.inits) | set(self.constants)
        for i, node in enumerate(self.model.graph.node):
            if node.domain not in ("", "ai.onnx") or not node.output:
                continue
            op = node.op_type
            if op in ("Shape", "Size") or (
                op not in _NONDETERMINISTIC
                and not has_subgraph(node)
                and all(n in self.fixed for n in self.reads[i])
            ):
                self.fixed.update(o for o in node.output if o)
            else:
                continue
            if all(o in self.constants for o in node.output if o):
                continue  # a Constant node: read in __init__
            if op == "Shape":
                dims = self.dims.get(node.input[0])
                if dims is not None:
                    a = _attrs(node)
                    sym = [
                        d if isinstance(d, int) else _Dim(node.input[0], i)
                        for i, d in enumerate(dims)
                    ]
                    sym = sym[a.get("start", 0) : a.get("end", len(sym))]
                    self.constants[node.output[0]] = np.array(sym, dtype=object)
                    continue
            why = self._why_not_folded(node, op)
            if why is None:
                args = [self.const(n) if n else None for n in node.input]
                missing = [n for a, n in zip(args, node.input, strict=True) if n and a is None]
                if missing:
                    inner = self.unfolded.get(missing[0], "is not a numeric constant")
                    why = f"is computed by {op} from {missing[0]!r}, which {inner}"
            if why is not None:
                self.unfolded.update((o, why) for o in node.output if o)
                continue
            size = _fold_size(node, args)
            if size is None or size > _FOLD_LIMIT:
                what = "of unknown size" if size is None else f"of {size} elements"
                why = f"is computed by {op} from constants, but too large to fold ({what})"
                self.unfolded.update((o, why) for o in node.output if o)
                continue
            try:
                outs = _evaluate(node, args, self.opset)
            except Exception as exc:  # not foldable after all: the node stays opaque
                why = f"is computed by {op} from constants, which failed to fold: {exc}"
                self.unfolded.update((o, why.splitlines()[0]) for o in node.output if o)
                continue
            for name, value in zip(node.output, outs, strict=False):
                value = np.asarray(value)
                if value.dtype == object and not any(isinstance(v, _Dim) for v in value.flat):
                    value = value.astype(np.int64)  # the symbolic dims were sliced away
                self.constants[name] = value

    def _why_not_folded(self, node: onnx.NodeProto, op: str) -> str | None:
        """Why the outputs of ``node`` (computed from constants) get no folded value, or
        None if they are to be folded."""
        if op == "Shape":
            return "is a shape that shape inference does not know"
        if op == "Constant":
            return "is a Constant without a dense numeric value"
        if op == "DequantizeLinear":
            return (
                "is computed by DequantizeLinear from a quantized tensor, which is not folded "
                "(equalize the float model before quantizing it)"
            )
        if op not in _FOLDABLE:
            return f"is computed by {op} from constants, which is not folded"
        return None

    # --- helpers ----------------------------------------------------------------------
    def const(self, name: str) -> np.ndarray | None:
        if not name:
            return None
        if name in self.params:
            # A layer took this initializer's bytes (take_ownership): its array holds them.
            return np.array(self.params[name])
        if name in self.inits:
            return np.array(_tensor_array(self.inits[name], self.base_dir))
        return self.constants.get(name)

    def param(self, name: str) -> np.ndarray:
        """A layer parameter; with ``take_ownership`` the proto's copy is released. Read
        once per tensor: layers sharing an initializer get the same array. A parameter
        computed from constants (a ``Constant`` node, ``Identity`` or ``Reshape`` of an
        initializer ...) is written back as a new initializer."""
        if name in self.params:
            return self.params[name]
        if name not in self.inits:
            arr = np.array(self.constants[name])
            self.translation.derived[name] = (arr.shape, arr.dtype)
            self.params[name] = arr
            return arr
        t = self.inits[name]
        arr = _tensor_array(t, self.base_dir)
        if self.take_ownership and t.data_location != onnx.TensorProto.EXTERNAL:
            self.translation.owned[name] = arr
            t.ClearField("raw_data")
            for f in ("float_data", "double_data", "int32_data"):
                t.ClearField(f)
        self.params[name] = arr
        return arr

    def weight_blocker(self, name: str) -> str | None:
        """Why the tensor ``name`` cannot be a layer parameter, or None if it can."""
        if name in self.inits:
            return None
        if name in self.overridable:
            return f"{name!r} is a graph input a caller may override, not a constant"
        if self.is_const(name):
            return None
        if name in self.unfolded:
            return f"{name!r} {self.unfolded[name]}"
        if name in self.constants:
            return f"{name!r} is a constant of {self.constants[name].dtype}, not a float tensor"
        if name in self.fixed:
            return f"{name!r} is computed from constants but has no value here"
        return f"{name!r} is not a constant"

    def first_blocker(self, names) -> str | None:
        """The first of :meth:`weight_blocker`'s reasons among ``names``, or None."""
        return next(filter(None, map(self.weight_blocker, names)), None)

    def rank(self, name: str) -> int | None:
        d = self.dims.get(name)
        return None if d is None else len(d)

    def channels(self, name: str) -> int | None:
        d = self.dims.get(name)
        return d[1] if d is not None and len(d) >= 2 and isinstance(d[1], int) else None

    def const_shape(self, name: str) -> tuple | None:
        """The shape of a constant :meth:`is_const` accepts, without reading it."""
        if not self.is_const(name):
            return None
        if name in self.inits:
            return tuple(int(d) for d in self.inits[name].dims)
        return self.constants[name].shape

    def is_const(self, name: str) -> bool:
        """Whether ``name`` is a numeric constant a layer may take as a parameter: an
        initializer, or a value folded from constants."""
        if not name or name in self.overridable:
            return False
        if name in self.inits:
            return True
        value = self.constants.get(name)
        return value is not None and value.dtype.kind == "f"

    # --- translation ------------------------------------------------------------------
    def run(self) -> tuple[Graph, Translation]:
        g = self.model.graph
        init_names = set(self.inits)
        for vi in g.input:
            if vi.name not in init_names:
                self.graph.add_input(vi.name, self.channels(vi.name))
        names_seen: set[str] = set()
        for i, node in enumerate(g.node):
            name = node.name if node.name and node.name not in names_seen else f"{node.op_type}_{i}"
            names_seen.add(name)
            self.translation.node_names[i] = name
        for i, node in enumerate(g.node):
            if i in self.consumed_adds:
                continue
            self.translate(i, node, self.translation.node_names[i])
        # Outputs computed from constants alone are not in the IR (nothing changes them).
        self.graph.set_outputs([o.name for o in g.output if o.name not in self.fixed])
        for name, value in self.graph.values.items():  # spatial sizes, where inferred
            dims = self.dims.get(name)
            if dims is not None and len(dims) >= 2 and all(isinstance(d, int) for d in dims[2:]):
                value.spatial = tuple(dims[2:])
        return self.graph, self.translation

    def add(self, op, inputs, name, index, outputs=None, **kw):
        node = self.model.graph.node[index]
        outs = list(outputs if outputs is not None else [o for o in node.output])
        return self.graph.add_node(op, inputs, name=name, outputs=outs, handle=index, **kw)

    def opaque(self, index: int, node: onnx.NodeProto, name: str, why: str = "") -> None:
        # Values read inside If / Loop bodies are inputs too: scaling them would change
        # what the subgraph computes.
        data_inputs = list(dict.fromkeys(n for n in self.reads[index] if n not in self.fixed))
        outs = [o for o in node.output if o]
        channels = self.channels(outs[0]) if outs else None
        self.add(
            "opaque",
            data_inputs,
            name,
            index,
            outputs=outs,
            attrs={"kind": node.op_type, "channels": channels, "why": why},
        )

    def translate(self, index: int, node: onnx.NodeProto, name: str) -> None:
        outs = [o for o in node.output if o]
        if outs and all(o in self.fixed for o in outs):
            return  # computes constants or shapes: nothing equalization can change
        if has_subgraph(node):
            self.opaque(index, node, name, "holds a subgraph")
            return
        op = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"
        handler = getattr(self, f"op_{op}", None)
        outcome = False if handler is None else handler(index, node, name)
        if outcome is False or isinstance(outcome, str):
            self.opaque(index, node, name, outcome or "")

    def _conv_attrs(self, a: dict, nd: int, x: str, kernel: tuple) -> dict | None:
        stride = tuple(a.get("strides", (1,) * nd))
        dilation = tuple(a.get("dilations", (1,) * nd))
        pads = _explicit_pads(a, nd, self.dims.get(x), kernel, stride, dilation)
        if pads is None:
            return None
        return {"stride": stride, "pads": pads, "dilation": dilation}

    def op_Conv(self, index, node, name):
        return self._conv_like(index, node, name, "conv")

    def op_ConvTranspose(self, index, node, name):
        return self._conv_like(index, node, name, "conv_transpose")

    def _conv_like(self, index, node, name, op: str):
        """Conv and ConvTranspose: weight (and bias) initializers, explicit pads."""
        has_bias = len(node.input) > 2 and bool(node.input[2])
        if len(node.input) < 2:
            return False
        blocker = self.first_blocker(node.input[1:3] if has_bias else node.input[1:2])
        if blocker:
            return blocker
        a = _attrs(node)
        transposed = op == "conv_transpose"
        if transposed and "output_shape" in a:
            return "output_shape is given (the IR needs explicit pads)"
        auto_pad = _text(a.get("auto_pad", "NOTSET"))
        if transposed and auto_pad not in ("NOTSET", "VALID"):
            return f"auto_pad={auto_pad} (the IR needs explicit pads)"
        if len(self.const_shape(node.input[1]) or ()) < 3:
            return "its weight is not of rank 3 or more"
        w = self.param(node.input[1])
        attrs = self._conv_attrs(a, w.ndim - 2, node.input[0], tuple(w.shape[2:]))
        if attrs is None:
            return "auto_pad needs the input's spatial size"
        if transposed:
            attrs["output_padding"] = tuple(a.get("output_padding", (0,) * (w.ndim - 2)))
        ids = {"weight": node.input[1]}
        bias = self.param(node.input[2]) if has_bias else None
        if has_bias:
            ids["bias"] = node.input[2]
        group = int(a.get("group", 1))
        outputs, handle = list(node.output), index
        if not has_bias:
            out_channels = w.shape[1] * group if transposed else w.shape[0]
            fused = self.bias_add(index, node, out_channels, w.ndim)
            if fused is not None:
                bias, ids["bias"], outputs, handle = fused
        self.graph.add_node(
            op,
            [node.input[0]],
            name=name,
            outputs=outputs,
            params={"weight": w, "bias": bias},
            attrs={**attrs, "layout": Layout(1, 0, group) if transposed else Layout(0, 1, group)},
            handle=handle,
            param_ids=ids,
        )

    def op_Gemm(self, index, node, name):
        a = _attrs(node)
        if int(a.get("transA", 0)) != 0:
            return "transA=1: its input is (features, N), not (N, features)"
        has_c = len(node.input) > 2 and bool(node.input[2])
        blocker = self.first_blocker(node.input[1:3] if has_c else node.input[1:2])
        if blocker:
            return blocker
        shape = self.const_shape(node.input[1])
        if len(shape) != 2:
            return "its weight is not 2-D"
        trans_b = int(a.get("transB", 0))
        layout = Layout(0, 1) if trans_b else Layout(1, 0)
        out = shape[0] if trans_b else shape[1]
        if has_c:
            # C broadcasts to (N, out): one bias per output is (out,), (1, out) or a
            # single value; a C of shape (N, out) or (out, 1) adds a value per row.
            c_shape = tuple(self.const_shape(node.input[2]))
            if len(c_shape) > 2 or (len(c_shape) == 2 and c_shape[0] != 1):
                return f"its C of shape {c_shape} is not one bias per output"
            if int(np.prod(c_shape)) not in (1, out):
                return f"its C of shape {c_shape} is not one bias per output"
        w = self.param(node.input[1])
        alpha, beta = float(a.get("alpha", 1.0)), float(a.get("beta", 1.0))
        bias = None
        if has_c:
            c = self.param(node.input[2])
            bias = np.broadcast_to(c.reshape(-1), (out,))
        # The IR holds the effective weight and bias; apply() writes them with alpha = beta = 1.
        if alpha != 1.0:
            w = w * np.asarray(alpha, w.dtype)
        if bias is not None and beta != 1.0:
            bias = bias * np.asarray(beta, bias.dtype)
        ids = {"weight": node.input[1]}
        if has_c:
            ids["bias"] = node.input[2]
        self.add(
            "linear",
            [node.input[0]],
            name,
            index,
            params={"weight": w, "bias": bias},
            attrs={"layout": layout},
            param_ids=ids,
        )

    def op_MatMul(self, index, node, name):
        blocker = self.weight_blocker(node.input[1])
        if blocker:
            return blocker
        if self.rank(node.input[0]) != 2:
            return "its input is not of rank 2 (N, features)"
        if len(self.const_shape(node.input[1])) != 2:
            return "its weight is not 2-D"
        w = self.param(node.input[1])
        ids = {"weight": node.input[1]}
        bias, outputs, handle = None, list(node.output), (index,)
        fused = self.bias_add(index, node, w.shape[1], 2)
        if fused is not None:
            bias, ids["bias"], outputs, handle = fused
        self.graph.add_node(
            "linear",
            [node.input[0]],
            name=name,
            outputs=outputs,
            params={"weight": w, "bias": bias},
            attrs={"layout": Layout(1, 0)},
            handle=handle,
            param_ids=ids,
        )

    def bias_add(self, index: int, node: onnx.NodeProto, channels: int, rank: int | None):
        """A bias written as a separate ``Add`` of a per-channel constant to the only
        reader of the layer's output (MatMul + Add; PaddlePaddle's Conv + Add):
        ``(bias, constant's name, outputs, handle)`` to take it into the layer, or None."""
        out = node.output[0]
        readers = self.users.get(out, [])
        if len(readers) != 1 or out in {o.name for o in self.model.graph.output}:
            return None
        add_index = readers[0]
        add = self.model.graph.node[add_index]
        other = [n for n in add.input if n != out]
        if add.op_type != "Add" or len(add.input) != 2 or len(other) != 1 or add_index <= index:
            return None
        # (C,) for a rank-2 output, (1, C, 1, 1) or (C, 1, 1) for a Conv's
        if not _along_channels(self.const_shape(other[0]), rank, channels):
            return None
        self.consumed_adds.add(add_index)
        bias = self.param(other[0]).reshape(-1)
        return bias, other[0], list(add.output), (index, add_index)

    def op_BatchNormalization(self, index, node, name):
        a = _attrs(node)
        if int(a.get("training_mode", 0)):
            return "training_mode=1: it normalizes with the batch's own statistics"
        if len([o for o in node.output if o]) != 1:
            return "its running-statistics outputs are used (training)"
        if not int(a.get("spatial", 1)):
            return "spatial=0: its statistics are per position, not per channel"
        blocker = self.first_blocker(node.input[1:5])
        if blocker:
            return blocker
        channels = self.channels(node.input[0])
        for n in node.input[1:5]:
            shape = self.const_shape(n)
            if len(shape) != 1 or (channels is not None and shape[0] != channels):
                return f"its {n!r} of shape {shape} is not one value per channel"
        gamma, beta, mean, var = (self.param(n) for n in node.input[1:5])
        self.add(
            "batchnorm",
            [node.input[0]],
            name,
            index,
            params={"mean": mean, "var": var, "gamma": gamma, "beta": beta},
            attrs={"eps": float(a.get("epsilon", 1e-5))},
            param_ids={
                k: n for k, n in zip(("gamma", "beta", "mean", "var"), node.input[1:5], strict=True)
            },
        )

    def op_Relu(self, index, node, name):
        self.add("relu", [node.input[0]], name, index)

    def op_LeakyRelu(self, index, node, name):
        self.add(
            "leaky_relu",
            [node.input[0]],
            name,
            index,
            attrs={"alpha": float(_attrs(node).get("alpha", 0.01))},
        )

    def op_PRelu(self, index, node, name):
        slope = self.const(node.input[1])
        if slope is None:
            return "its slope is not a constant"
        c, rank = self.channels(node.input[0]), self.rank(node.input[0])
        if slope.size != 1:
            # Per channel means broadcasting along axis 1 only: (1, C, 1, ..., 1) once
            # padded to the data's rank.
            if not _along_channels(slope.shape, rank, c):
                return f"its slope of shape {slope.shape} is not one value per channel"
        if not np.all(np.isfinite(slope)):
            return "its slope is not finite (Inf or NaN)"
        self.add("prelu", [node.input[0]], name, index, params={"slope": slope.reshape(-1)})

    def op_Clip(self, index, node, name):
        if self.opset < 11:
            a = _attrs(node)
            lo, hi = a.get("min", -np.inf), a.get("max", np.inf)
        else:
            lo = hi = None
            names = list(node.input) + ["", ""]
            for which, ref in (("lo", names[1]), ("hi", names[2])):
                if not ref:
                    value = -np.inf if which == "lo" else np.inf
                else:
                    value = self.const(ref)
                    if value is None:
                        return f"its {'min' if which == 'lo' else 'max'} is not a constant"
                    if value.size != 1:
                        return f"its {'min' if which == 'lo' else 'max'} is not one value"
                    value = float(value.reshape(-1)[0])
                if which == "lo":
                    lo = value
                else:
                    hi = value
        for which, value in (("min", lo), ("max", hi)):
            if np.isnan(value):
                return f"its {which} is NaN"
        self.add(
            "clip",
            [node.input[0]],
            name,
            index,
            params={"lo": np.array(float(lo)), "hi": np.array(float(hi))},
        )

    def op_Identity(self, index, node, name):
        self.add("identity", [node.input[0]], name, index)

    def op_Dropout(self, index, node, name):
        """Inference: the identity. Training mode (opset 12's third input) drops
        random values."""
        if len(node.input) > 2 and node.input[2]:
            training = self.const(node.input[2])
            if training is None:
                return "its training_mode is not a constant"
            if bool(np.asarray(training).reshape(-1)[0]):
                return "training_mode=1: it drops random values"
        mask = node.output[1] if len(node.output) > 1 else ""
        if mask and (mask in self.users or mask in {o.name for o in self.model.graph.output}):
            return "its mask output is used"
        self.add("dropout", [node.input[0]], name, index, outputs=[node.output[0]])

    def op_Pad(self, index, node, name):
        """Zero padding, and the modes that copy a channel's own values (reflect, edge,
        wrap), of spatial axes: homogeneous per channel. Padding with another constant
        is not (the constant does not scale with the channel)."""
        a = _attrs(node)
        mode = _text(a.get("mode", "constant"))
        if mode not in ("constant", "reflect", "edge", "wrap"):
            return f"mode={mode} is not known"
        if self.opset < 11:
            pads, value = list(a.get("pads", [])), float(a.get("value", 0.0))
        else:
            pads_arr = self.const(node.input[1]) if len(node.input) > 1 else None
            if pads_arr is None:
                return "its pads are not constant"
            pads = [int(p) for p in pads_arr.reshape(-1)]
            cv = self.const(node.input[2]) if len(node.input) > 2 and node.input[2] else None
            if len(node.input) > 2 and node.input[2] and cv is None and mode == "constant":
                return "its constant_value is not a constant"
            value = 0.0 if cv is None else float(np.asarray(cv).reshape(-1)[0])
            if len(node.input) > 3 and node.input[3]:
                # Opset 18's axes: pads for those axes only; the others get none.
                axes = self.const(node.input[3])
                rank = self.rank(node.input[0])
                if axes is None or rank is None:
                    return "its axes or its input's rank are not known"
                axes = [int(x) % rank for x in axes.reshape(-1)]
                full = [0] * (2 * rank)
                for k, ax in enumerate(axes):
                    full[ax], full[rank + ax] = pads[k], pads[len(axes) + k]
                pads = full
        rank = len(pads) // 2
        if mode == "constant" and value != 0.0:
            return f"mode=constant with value {value:g}: a constant does not scale with the channel"
        if rank < 3:
            return "its input has no spatial axes"
        if any(pads[i] for i in (0, 1, rank, rank + 1)):
            return "it pads the batch or channel axis"
        spatial = pads[2:rank] + pads[rank + 2 :]
        if any(p < 0 for p in spatial):
            return "it crops (negative pads)"
        attrs = {"pads": tuple(spatial)}
        if mode != "constant":
            attrs["mode"] = mode
        self.add("pad", [node.input[0]], name, index, attrs=attrs)

    def _pool_attrs(self, node, average: bool) -> dict | str:
        a = _attrs(node)
        if "kernel_shape" not in a:
            return "it has no kernel_shape"
        kernel = tuple(a["kernel_shape"])
        nd = len(kernel)
        stride = tuple(a.get("strides", (1,) * nd))
        dilation = tuple(a.get("dilations", (1,) * nd))
        dims = self.dims.get(node.input[0])
        pads = _explicit_pads(a, nd, dims, kernel, stride, dilation)
        if pads is None:
            return "auto_pad needs the input's spatial size"
        count_pad = bool(a.get("count_include_pad", 0))
        if int(a.get("ceil_mode", 0)):
            # Rounding the output size up adds windows that hang over the end: the same
            # as more end padding, which a max pool ignores, and so does an average that
            # does not count padding (one that does would count it, unlike ONNX).
            extra = _ceil_extra(dims, nd, kernel, stride, dilation, pads)
            if extra is None:
                return "ceil_mode=1 needs the input's spatial size"
            if any(extra) and average and count_pad:
                return "ceil_mode=1 with count_include_pad=1 is not translated"
            pads = pads[:nd] + tuple(p + e for p, e in zip(pads[nd:], extra, strict=True))
        return {
            "kernel": kernel,
            "stride": stride,
            "pads": pads,
            "dilation": dilation,
            "count_include_pad": count_pad,
        }

    def op_MaxPool(self, index, node, name):
        if len([o for o in node.output if o]) != 1:
            return "its Indices output is used"
        attrs = self._pool_attrs(node, average=False)
        if isinstance(attrs, str):
            return attrs
        self.add("maxpool", [node.input[0]], name, index, outputs=[node.output[0]], attrs=attrs)

    def op_AveragePool(self, index, node, name):
        attrs = self._pool_attrs(node, average=True)
        if isinstance(attrs, str):
            return attrs
        self.add("avgpool", [node.input[0]], name, index, attrs=attrs)

    def op_ReduceMean(self, index, node, name):
        """A mean over all spatial axes is a global average pool (the ``dynamo=True``
        exporter writes ``x.mean((2, 3))`` so); ``keepdims=0`` also flattens."""
        a = _attrs(node)
        rank = self.rank(node.input[0])
        if self.opset >= 18 and len(node.input) > 1 and node.input[1]:
            axes = self.const(node.input[1])
            if axes is None:
                return "its axes are not constant"
        else:
            axes = a.get("axes")
        if axes is None or np.asarray(axes).size == 0:
            if self.opset >= 18 and int(a.get("noop_with_empty_axes", 0)):
                self.add("identity", [node.input[0]], name, index)  # no axes: a no-op
                return
            return "it reduces every axis, the channels too (no axes given)"
        if rank is None:
            return "its input's rank is not known"
        axes = sorted(int(x) % rank for x in np.asarray(axes).reshape(-1))
        if rank < 3 or axes != list(range(2, rank)):
            return f"it reduces axes {axes}, not exactly the spatial ones"
        out = node.output[0]
        if int(a.get("keepdims", 1)):
            self.add("global_avgpool", [node.input[0]], name, index)
            return
        pooled = f"{out}::pooled"  # an IR value only: the write-back never sees it
        self.add("global_avgpool", [node.input[0]], name, index, outputs=[pooled])
        self.add("flatten", [pooled], f"{name}::flatten", index, outputs=[out])

    def op_Resize(self, index, node, name):
        """Resize and Upsample compute each output value as a combination, with weights
        that depend on coordinates alone, of one channel's input values (nearest, linear,
        cubic; antialias, exclude_outside and cubic_coeff_a only change the weights): so
        scaling a channel scales its output. Exact where the batch and channel axes are
        read one to one and no constant is sampled (tf_crop_and_resize's
        extrapolation_value, unless 0)."""
        a = _attrs(node)
        mode = _text(a.get("mode", "nearest"))
        if mode not in _RESIZE_MODES:
            return f"mode={mode} is not known"
        resize11 = node.op_type == "Resize" and self.opset >= 11
        ctm = _text(a.get("coordinate_transformation_mode", "half_pixel"))
        ctm = ctm if resize11 else "asymmetric"  # Resize 10, Upsample
        if ctm not in _COORDINATE_MODES:
            return f"coordinate_transformation_mode={ctm} is not known"
        src, dst = self.dims.get(node.input[0]), self.dims.get(node.output[0])
        rank = len(src) if src is not None else None
        inputs = list(node.input) + [""] * 4
        scales = sizes = None
        if self.opset < 9 and node.op_type == "Upsample":
            scales = a.get("scales")
        elif not resize11:  # X, scales
            scales = self.const(inputs[1])
        else:  # X, roi, scales, sizes
            scales, sizes = self.const(inputs[2]), self.const(inputs[3])
        if scales is not None and np.asarray(scales).size == 0:
            scales = None
        # Opset 18's axes: roi, scales and sizes are given for these axes only.
        axes = a.get("axes") if resize11 else None
        if axes is not None:
            if rank is None:
                return "it has axes, but its input's rank is not known"
            axes = [int(x) % rank for x in axes]
        elif rank is not None:
            axes = list(range(rank))
        if scales is not None:
            scales = [float(f) for f in np.asarray(scales).reshape(-1)]
        elif sizes is not None:
            sizes = [int(n) for n in sizes.reshape(-1)]
            if (
                axes is None
                or len(sizes) != len(axes)
                or not all(isinstance(src[ax], int) and src[ax] > 0 for ax in axes)
            ):
                return "it is given sizes, but its input's size is not known"
            scales = [n / src[ax] for n, ax in zip(sizes, axes, strict=True)]
            policy = _text(a.get("keep_aspect_ratio_policy", "stretch"))
            if policy in ("not_larger", "not_smaller"):  # one scale for every axis listed
                scales = [(min if policy == "not_larger" else max)(scales)] * len(scales)
        elif (
            all(n in self.fixed for n in inputs[1:4] if n)
            and src is not None
            and dst is not None
            and len(src) == len(dst)
            and all(isinstance(d, int) and d > 0 for d in (*src, *dst))
        ):
            # Sizes computed from shapes: the output size shape inference found.
            scales, axes = [d / s for s, d in zip(src, dst, strict=True)], list(range(rank))
        else:
            return "its scales are not constant"
        if axes is None:
            axes = list(range(len(scales)))
        if len(scales) != len(axes):
            return f"it has {len(scales)} scales for {len(axes)} axes"
        scale_of = dict(zip(axes, scales, strict=True))
        read = [(ax, what) for ax, what in ((0, "batch"), (1, "channel")) if ax in scale_of]
        for ax, what in read:
            if scale_of[ax] != 1.0:
                return f"it resizes the {what} axis (scale {scale_of[ax]:g})"
        if ctm == "tf_crop_and_resize":
            extrapolation = float(a.get("extrapolation_value", 0.0))
            if extrapolation != 0.0:
                return (
                    "coordinate_transformation_mode=tf_crop_and_resize with "
                    f"extrapolation_value={extrapolation:g}: what it samples outside the "
                    "input is that constant, which does not scale with the channel"
                )
            roi = self.const(inputs[1])
            if roi is None:
                return "coordinate_transformation_mode=tf_crop_and_resize: its roi is not constant"
            roi = [float(r) for r in roi.reshape(-1)]
            if len(roi) != 2 * len(axes):
                return f"its roi has {len(roi)} values for {len(axes)} axes"
            for ax, what in read:
                k = axes.index(ax)
                if (roi[k], roi[len(axes) + k]) != (0.0, 1.0):
                    return (
                        "coordinate_transformation_mode=tf_crop_and_resize with roi "
                        f"({roi[k]:g}, {roi[len(axes) + k]:g}) on the {what} axis: it mixes "
                        "or crops that axis"
                    )
        if ctm == "tf_half_pixel_for_nn" and read:
            # It samples x + 1/2 on an axis of scale 1: only rounding down reads x itself.
            rounding = _text(a.get("nearest_mode", "round_prefer_floor"))
            if mode != "nearest" or rounding not in ("round_prefer_floor", "floor"):
                how = f"mode={mode}" if mode != "nearest" else f"nearest_mode={rounding}"
                return (
                    f"coordinate_transformation_mode=tf_half_pixel_for_nn with {how}: by the "
                    "spec it reads channel c + 1 or mixes c and c + 1"
                )
        last = rank if rank is not None else len(scales)
        spatial = tuple(scale_of.get(ax, 1.0) for ax in range(2, last))
        self.add("resize", [node.input[0]], name, index, attrs={"mode": mode, "scales": spatial})

    def op_Upsample(self, index, node, name):
        return self.op_Resize(index, node, name)

    def _per_channel_const(self, name: str, data: str) -> np.ndarray | None:
        """The constant ``name`` as one value or one per channel of ``data``, if it
        broadcasts so against it (a scalar, (C, 1, 1), (1, C, 1, 1) ...), else None."""
        shape = self.const_shape(name)
        rank, channels = self.rank(data), self.channels(data)
        if shape is None or rank is None or len(shape) > rank:
            return None
        if int(np.prod(shape)) == 1:
            return self.const(name).reshape(1)
        if not _along_channels(shape, rank, channels):
            return None
        return self.const(name).reshape(-1)

    def op_Mul(self, index, node, name):
        """A product with a constant (one value or one per channel), or with a gate
        (squeeze-and-excitation): scaling the data's channels scales the product's."""
        a, b = node.input[0], node.input[1]
        for data, other in ((a, b), (b, a)):
            if data not in self.fixed and other in self.fixed:
                factor = self._per_channel_const(other, data)
                if factor is None:
                    return "multiplies by a constant that is not per channel"
                if not np.all(np.isfinite(factor)):
                    return "multiplies by a constant that is not finite (Inf or NaN)"
                self.add("mul", [data], name, index, params={"factor": factor})
                return
        out = self.dims.get(node.output[0])
        if out is None:
            return "its output's shape is not known"

        def match(value: str) -> int:
            """How many of the output's known dims ``value`` has, -1 if it cannot be of
            the output's shape (a symbolic dim, the batch say, fits any)."""
            dims = self.dims.get(value)
            if dims is None or len(dims) != len(out):
                return -1
            pairs = [(d, o) for d, o in zip(dims, out, strict=True) if isinstance(d, int)]
            if any(isinstance(o, int) and d != o for d, o in pairs):
                return -1
            return sum(isinstance(o, int) for _, o in pairs)

        # The data input is the one of the output's shape; the gate broadcasts (or was
        # expanded to it: then either would do, and the better-known one is taken).
        data, gate = (a, b) if match(a) >= match(b) else (b, a)
        if match(data) < 0:
            return "neither input has the output's shape"
        self.add("mul", [data, gate], name, index)

    def op_Div(self, index, node, name):
        x, d = node.input[0], node.input[1]
        if d not in self.fixed:
            return "its divisor is not a constant"
        divisor = self._per_channel_const(d, x)
        if divisor is None:
            return "divides by a constant that is not per channel"
        if np.any(np.isnan(divisor)):
            return "divides by NaN"
        if np.any(divisor == 0):
            return "divides by zero"
        factor = 1.0 / divisor.astype(np.float64)
        self.add("mul", [x], name, index, params={"factor": factor})

    def op_Split(self, index, node, name):
        """A split along the channel axis: one IR ``slice`` per output, at the offsets
        the inferred output widths give."""
        rank = self.rank(node.input[0])
        if rank is None:
            return "its input's rank is not known"
        axis = int(_attrs(node).get("axis", 0))
        if axis % rank != 1:
            return f"it splits axis {axis}, not the channels"
        widths = [self.channels(o) if o else None for o in node.output]
        if any(w is None for w in widths) or sum(widths) != self.channels(node.input[0]):
            return "the widths of its outputs are unknown"
        offset = 0
        for k, (out, width) in enumerate(zip(node.output, widths, strict=True)):
            attrs = {"offset": offset, "channels": width}
            self.add("slice", [node.input[0]], f"{name}:{k}", index, outputs=[out], attrs=attrs)
            offset += width

    def op_Slice(self, index, node, name):
        """Channels ``start`` to ``end`` (step 1) and nothing cut on other axes."""
        src, dst = self.dims.get(node.input[0]), self.dims.get(node.output[0])
        if src is None or dst is None or len(src) != len(dst) or len(src) < 2:
            return "its input's or output's shape is not known"
        if any(a != b for i, (a, b) in enumerate(zip(src, dst, strict=True)) if i != 1):
            return "cuts an axis other than the channels"
        if self.opset < 10:
            a = _attrs(node)
            starts, axes, steps = a.get("starts"), a.get("axes"), None
        else:
            names = list(node.input) + [""] * 5
            args = [self.const(n) if n else None for n in names]
            if any(n and a is None for n, a in zip(names[1:5], args[1:5], strict=True)):
                return "its starts, ends, axes or steps are not constant"
            starts, axes, steps = args[1], args[3], args[4]
        if starts is None:
            return "its starts are not constant"
        if not isinstance(src[1], int) or not isinstance(dst[1], int) or dst[1] < 1:
            return "its channel counts are not known"
        starts = [int(v) for v in np.asarray(starts).reshape(-1)]
        axes = list(range(len(starts))) if axes is None else list(np.asarray(axes).reshape(-1))
        if steps is not None and any(int(v) != 1 for v in np.asarray(steps).reshape(-1)):
            return f"steps {[int(v) for v in np.asarray(steps).reshape(-1)]}: not a run of channels"
        found = [st for st, ax in zip(starts, axes, strict=True) if int(ax) % len(src) == 1]
        if len(found) != 1:
            return "it slices no channels"
        start = min(max(found[0] + src[1] if found[0] < 0 else found[0], 0), src[1])
        attrs = {"offset": start, "channels": dst[1]}
        self.add("slice", [node.input[0]], name, index, attrs=attrs)

    def op_Sum(self, index, node, name):
        if len(node.input) == 1:
            self.add("identity", [node.input[0]], name, index)
            return
        return self.op_Add(index, node, name)

    def op_GlobalAveragePool(self, index, node, name):
        self.add("global_avgpool", [node.input[0]], name, index)

    def op_Add(self, index, node, name):
        """A residual sum of same-shape tensors (a region gives its inputs one scale)."""
        if len(node.input) < 2:
            return "it has one input"
        if any(n in self.fixed for n in node.input):
            # x + c is an affine map, not a homogeneous one: the constant would have to
            # scale with the channel (not translated yet).
            return "adds a constant"
        ranks = {self.rank(n) for n in node.input}
        if None in ranks:
            return "the shapes of its inputs are not known"
        dims = [self.dims[n] for n in node.input]
        if len(ranks) != 1 or any(d != dims[0] for d in dims):
            return "it broadcasts (a residual Add sums tensors of one shape)"
        self.add("add", list(node.input), name, index)

    def op_Concat(self, index, node, name):
        axis = int(_attrs(node).get("axis", 0))
        rank = self.rank(node.output[0])
        if rank is None:
            return "its output's rank is not known"
        if axis % rank != 1:
            return f"it concatenates along axis {axis}, not the channels"
        if any(n in self.fixed for n in node.input):
            return "it concatenates a constant"
        self.add("concat", list(node.input), name, index)

    def op_Flatten(self, index, node, name):
        axis = int(_attrs(node).get("axis", 1))
        rank = self.rank(node.input[0])
        if rank is None:
            return "its input's rank is not known"
        if rank < 2 or axis % rank != 1:
            return f"axis={axis}: it does not keep the batch axis apart from the channels"
        self.add("flatten", [node.input[0]], name, index)

    def op_Reshape(self, index, node, name):
        src, dst = self.dims.get(node.input[0]), self.dims.get(node.output[0])
        if src is None or len(src) < 2 or not all(isinstance(d, int) for d in src[1:]):
            return "its input's shape is not known"
        not_flat = "it does not reshape (N, C, ...) to (N, C * ...)"
        features = int(np.prod(src[1:]))
        if dst is not None and len(dst) == 2 and isinstance(dst[1], int):
            flat = dst[1] == features
        else:
            shape = self.const(node.input[1])
            if shape is None or shape.size != 2:
                return not_flat
            first, second = shape.reshape(-1)
            if isinstance(second, _Dim):
                return not_flat
            if int(second) == features:  # (-1, C*H*W) or (N, C*H*W)
                flat = True
            else:
                # (x.size(0), -1): a flatten whenever every reader is a layer that takes
                # exactly C*H*W features, since only then can the model run at all.
                flat = int(second) == -1 and self._read_by_layers_of_width(node.output[0], features)
        if not flat:
            return not_flat
        self.add("flatten", [node.input[0]], name, index)

    def _read_by_layers_of_width(self, value: str, features: int) -> bool:
        readers = [self.model.graph.node[i] for i in self.users.get(value, [])]
        if not readers:
            return False
        for r in readers:
            if r.op_type not in ("Gemm", "MatMul") or r.input[0] != value:
                return False
            shape = self.const_shape(r.input[1])
            if shape is None or len(shape) != 2:
                return False
            trans_b = r.op_type == "Gemm" and int(_attrs(r).get("transB", 0))
            if (shape[1] if trans_b else shape[0]) != features:
                return False
        return True


def to_ir(
    model: onnx.ModelProto, take_ownership: bool = False, base_dir: str | None = None
) -> tuple[Graph, Translation]:
    """Translate ``model`` into an IR graph.

    With ``take_ownership`` the layer weights' bytes move from the proto into the
    graph's arrays (one copy in memory); :func:`cle_onnx._apply.apply` puts them back,
    and so does this function if the translation fails.
    """
    reader = _Reader(model, take_ownership, base_dir)
    try:
        return reader.run()
    except BaseException:
        restore(model, reader.translation)
        raise


def restore(model: onnx.ModelProto, tr: Translation) -> None:
    """Put back weight bytes taken by ``to_ir(take_ownership=True)`` (after a failure)."""
    inits = {t.name: t for t in model.graph.initializer}
    for name, arr in tr.owned.items():
        inits[name].CopyFrom(numpy_helper.from_array(np.ascontiguousarray(arr), name))
    tr.owned.clear()
