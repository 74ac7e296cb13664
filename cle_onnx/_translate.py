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


def subgraphs(node: onnx.NodeProto):
    """The graphs held in ``node``'s attributes (If branches, Loop and Scan bodies)."""
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            yield attr.g
        elif attr.type == onnx.AttributeProto.GRAPHS:
            yield from attr.graphs


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
            out[vi.name] = tuple(
                d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim
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
_FOLD_LIMIT = 1 << 16


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
                value = _attrs(node).get("value")
                if isinstance(value, onnx.TensorProto):
                    self.constants[node.output[0]] = numpy_helper.to_array(value)
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
                and not any(True for _ in subgraphs(node))
                and all(n in self.fixed for n in self.reads[i])
            ):
                self.fixed.update(o for o in node.output if o)
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
            if op not in _FOLDABLE:
                continue
            args = [self.const(n) if n else None for n in node.input]
            if any(a is None for a, n in zip(args, node.input, strict=True) if n):
                continue
            if any(a is not None and a.size > _FOLD_LIMIT for a in args):
                continue
            try:
                outs = _evaluate(node, args, self.opset)
            except Exception:  # not foldable after all: the node stays opaque
                continue
            for name, value in zip(node.output, outs, strict=False):
                value = np.asarray(value)
                if value.dtype == object and not any(isinstance(v, _Dim) for v in value.flat):
                    value = value.astype(np.int64)  # the symbolic dims were sliced away
                self.constants[name] = value

    # --- helpers ----------------------------------------------------------------------
    def const(self, name: str) -> np.ndarray | None:
        if not name:
            return None
        if name in self.inits:
            return np.array(_tensor_array(self.inits[name], self.base_dir))
        return self.constants.get(name)

    def param(self, name: str) -> np.ndarray:
        """A layer parameter; with ``take_ownership`` the proto's copy is released. Read
        once per tensor: layers sharing an initializer get the same array."""
        if name in self.params:
            return self.params[name]
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
        return f"{name!r} is not an initializer"

    def rank(self, name: str) -> int | None:
        d = self.dims.get(name)
        return None if d is None else len(d)

    def channels(self, name: str) -> int | None:
        d = self.dims.get(name)
        return d[1] if d is not None and len(d) >= 2 and isinstance(d[1], int) else None

    def is_init(self, name: str) -> bool:
        return bool(name) and name in self.inits

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
        if any(True for _ in subgraphs(node)):
            self.opaque(index, node, name, "holds a subgraph")
            return
        op = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"
        handler = getattr(self, f"op_{op}", None)
        outcome = False if handler is None else handler(index, node, name)
        if outcome is False or isinstance(outcome, str):
            self.opaque(index, node, name, outcome or "")

    def _conv_attrs(self, a: dict, nd: int) -> dict | None:
        if a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
            return None
        return {
            "stride": tuple(a.get("strides", (1,) * nd)),
            "pads": tuple(a.get("pads", (0,) * (2 * nd))),
            "dilation": tuple(a.get("dilations", (1,) * nd)),
        }

    def op_Conv(self, index, node, name):
        return self._conv_like(index, node, name, "conv")

    def op_ConvTranspose(self, index, node, name):
        return self._conv_like(index, node, name, "conv_transpose")

    def _conv_like(self, index, node, name, op: str):
        """Conv and ConvTranspose: weight (and bias) initializers, explicit pads."""
        has_bias = len(node.input) > 2 and bool(node.input[2])
        if len(node.input) < 2:
            return False
        for ref in node.input[1:3] if has_bias else node.input[1:2]:
            blocker = self.weight_blocker(ref)
            if blocker:
                return blocker
        a = _attrs(node)
        transposed = op == "conv_transpose"
        if transposed and "output_shape" in a:
            return False
        w = self.param(node.input[1])
        attrs = self._conv_attrs(a, w.ndim - 2)
        if attrs is None or w.ndim < 3:
            return False
        if transposed:
            attrs["output_padding"] = tuple(a.get("output_padding", (0,) * (w.ndim - 2)))
        ids = {"weight": node.input[1]}
        if has_bias:
            ids["bias"] = node.input[2]
        group = int(a.get("group", 1))
        self.add(
            op,
            [node.input[0]],
            name,
            index,
            params={"weight": w, "bias": self.param(node.input[2]) if has_bias else None},
            attrs={**attrs, "layout": Layout(1, 0, group) if transposed else Layout(0, 1, group)},
            param_ids=ids,
        )

    def op_Gemm(self, index, node, name):
        a = _attrs(node)
        if int(a.get("transA", 0)) != 0:
            return False
        has_c = len(node.input) > 2 and bool(node.input[2])
        for ref in node.input[1:3] if has_c else node.input[1:2]:
            blocker = self.weight_blocker(ref)
            if blocker:
                return blocker
        w = self.param(node.input[1])
        if w.ndim != 2:
            return False
        trans_b = int(a.get("transB", 0))
        layout = Layout(0, 1) if trans_b else Layout(1, 0)
        out = w.shape[0] if trans_b else w.shape[1]
        alpha, beta = float(a.get("alpha", 1.0)), float(a.get("beta", 1.0))
        bias = None
        if has_c:
            c = self.param(node.input[2])
            if c.size not in (1, out):
                return False
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
            return False
        w = self.param(node.input[1])
        if w.ndim != 2:
            return False
        bias, outputs, ids = None, list(node.output), {"weight": node.input[1]}
        readers = self.users.get(node.output[0], [])
        graph_outputs = {o.name for o in self.model.graph.output}
        if len(readers) == 1 and node.output[0] not in graph_outputs:
            add_index = readers[0]
            add = self.model.graph.node[add_index]
            other = [n for n in add.input if n != node.output[0]]
            if (
                add.op_type == "Add"
                and len(other) == 1
                and self.is_init(other[0])
                and add_index > index
            ):
                b = self.const(other[0])
                if b is not None and b.size == w.shape[1] and b.ndim <= 2:
                    bias = self.param(other[0]).reshape(-1)
                    outputs = list(add.output)
                    ids["bias"] = other[0]
                    self.consumed_adds.add(add_index)
                    index = (index, add_index)
        node_index = index if isinstance(index, tuple) else (index,)
        self.graph.add_node(
            "linear",
            [node.input[0]],
            name=name,
            outputs=outputs,
            params={"weight": w, "bias": bias},
            attrs={"layout": Layout(1, 0)},
            handle=node_index,
            param_ids=ids,
        )

    def op_BatchNormalization(self, index, node, name):
        a = _attrs(node)
        if int(a.get("training_mode", 0)) or len([o for o in node.output if o]) != 1:
            return False
        for ref in node.input[1:5]:
            blocker = self.weight_blocker(ref)
            if blocker:
                return blocker
        gamma, beta, mean, var = (self.const(n) for n in node.input[1:5])
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
            return False
        c, rank = self.channels(node.input[0]), self.rank(node.input[0])
        if slope.size != 1:
            # Per channel means broadcasting along axis 1 only: (1, C, 1, ..., 1) once
            # padded to the data's rank.
            if c is None or rank is None or slope.ndim > rank:
                return False
            padded = (1,) * (rank - slope.ndim) + slope.shape
            if padded[1] != c or any(d != 1 for i, d in enumerate(padded) if i != 1):
                return False
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
                    if value is None or value.size != 1:
                        return False
                    value = float(value.reshape(-1)[0])
                if which == "lo":
                    lo = value
                else:
                    hi = value
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
        if len([o for o in node.output if o]) != 1:
            return False
        self.add("dropout", [node.input[0]], name, index, outputs=[node.output[0]])

    def op_Pad(self, index, node, name):
        a = _attrs(node)
        mode = a.get("mode", b"constant")
        if mode not in (b"constant", "constant"):
            return False
        if self.opset < 11:
            pads, value = list(a.get("pads", [])), float(a.get("value", 0.0))
        else:
            pads_arr = self.const(node.input[1]) if len(node.input) > 1 else None
            if pads_arr is None:
                return False
            pads = [int(p) for p in pads_arr.reshape(-1)]
            cv = self.const(node.input[2]) if len(node.input) > 2 and node.input[2] else None
            value = 0.0 if cv is None else float(np.asarray(cv).reshape(-1)[0])
            if len(node.input) > 2 and node.input[2] and cv is None:
                return False
            if len(node.input) > 3 and node.input[3]:
                return False  # explicit axes (opset 18): left opaque
        rank = len(pads) // 2
        if value != 0.0 or rank < 3 or any(pads[i] for i in (0, 1, rank, rank + 1)):
            return False
        spatial = pads[2:rank] + pads[rank + 2 :]
        if any(p < 0 for p in spatial):
            return False
        self.add("pad", [node.input[0]], name, index, attrs={"pads": tuple(spatial)})

    def _pool_attrs(self, node) -> dict | None:
        a = _attrs(node)
        if int(a.get("ceil_mode", 0)) or a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
            return None
        kernel = tuple(a["kernel_shape"])
        nd = len(kernel)
        return {
            "kernel": kernel,
            "stride": tuple(a.get("strides", (1,) * nd)),
            "pads": tuple(a.get("pads", (0,) * (2 * nd))),
            "dilation": tuple(a.get("dilations", (1,) * nd)),
            "count_include_pad": bool(a.get("count_include_pad", 0)),
        }

    def op_MaxPool(self, index, node, name):
        attrs = self._pool_attrs(node)
        if attrs is None or len([o for o in node.output if o]) != 1:
            return False
        self.add("maxpool", [node.input[0]], name, index, outputs=[node.output[0]], attrs=attrs)

    def op_AveragePool(self, index, node, name):
        attrs = self._pool_attrs(node)
        if attrs is None:
            return False
        self.add("avgpool", [node.input[0]], name, index, attrs=attrs)

    def op_GlobalAveragePool(self, index, node, name):
        self.add("global_avgpool", [node.input[0]], name, index)

    def op_Add(self, index, node, name):
        if len(node.input) != 2 or any(n in self.fixed for n in node.input):
            return False
        ranks = {self.rank(n) for n in node.input}
        if None in ranks or len(ranks) != 1:
            return False  # broadcasting adds are not residual adds
        dims = [self.dims[n] for n in node.input]
        if dims[0] != dims[1]:
            return False
        self.add("add", list(node.input), name, index)

    def op_Concat(self, index, node, name):
        axis = int(_attrs(node).get("axis", 0))
        rank = self.rank(node.output[0])
        if rank is None or axis % rank != 1 or any(n in self.fixed for n in node.input):
            return False
        self.add("concat", list(node.input), name, index)

    def op_Flatten(self, index, node, name):
        axis = int(_attrs(node).get("axis", 1))
        rank = self.rank(node.input[0])
        if rank is None or rank < 2 or axis % rank != 1:
            return False
        self.add("flatten", [node.input[0]], name, index)

    def op_Reshape(self, index, node, name):
        src, dst = self.dims.get(node.input[0]), self.dims.get(node.output[0])
        if src is None or len(src) < 2 or not all(isinstance(d, int) for d in src[1:]):
            return False
        features = int(np.prod(src[1:]))
        if dst is not None and len(dst) == 2 and isinstance(dst[1], int):
            flat = dst[1] == features
        else:
            shape = self.const(node.input[1])
            if shape is None or shape.size != 2:
                return False
            first, second = shape.reshape(-1)
            if isinstance(second, _Dim):
                return False
            if int(second) == features:  # (-1, C*H*W) or (N, C*H*W)
                flat = True
            else:
                # (x.size(0), -1): a flatten whenever every reader is a layer that takes
                # exactly C*H*W features, since only then can the model run at all.
                flat = int(second) == -1 and self._read_by_layers_of_width(node.output[0], features)
        if not flat:
            return False
        self.add("flatten", [node.input[0]], name, index)

    def _read_by_layers_of_width(self, value: str, features: int) -> bool:
        readers = [self.model.graph.node[i] for i in self.users.get(value, [])]
        if not readers:
            return False
        for r in readers:
            if r.op_type not in ("Gemm", "MatMul") or r.input[0] != value:
                return False
            w = self.inits.get(r.input[1])
            if w is None or len(w.dims) != 2:
                return False
            trans_b = r.op_type == "Gemm" and int(_attrs(r).get("transB", 0))
            if (w.dims[1] if trans_b else w.dims[0]) != features:
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
