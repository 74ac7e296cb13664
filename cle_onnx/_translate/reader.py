"""ONNX -> IR translation: the reader's state, lookups and dispatch. Reads the model;
never modifies it (unless told to take ownership of weight bytes, see :func:`to_ir`)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

from cle_core import Graph, UnsupportedModelError

from .constants import _constant_value, _ConstantFolding
from .inference import infer, shape_values
from .layouts import _ChannelAxes
from .ops_channels import _ChannelOps
from .ops_elementwise import _ElementwiseOps
from .ops_layers import _LayerOps
from .ops_layout import _LayoutOps
from .ops_norms import _NormOps
from .ops_rotary import _RotaryOps
from .ops_spatial import _SpatialOps
from .proto import (
    _batch_names,
    _dims,
    _dtypes,
    _tensor_array,
    default_opset,
    has_subgraph,
    node_reads,
)

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
    # the storage id of a vector parameter given its own copy -> its initializer's name
    untied: dict[str, str] = field(default_factory=dict)


class _Reader(
    _ConstantFolding,
    _ChannelAxes,
    _LayerOps,
    _LayoutOps,
    _NormOps,
    _RotaryOps,
    _ElementwiseOps,
    _SpatialOps,
    _ChannelOps,
):
    """Translates one node at a time; anything unsupported becomes ``opaque``.

    :meth:`translate` dispatches by name: ONNX op ``X`` is handled by the method
    ``op_X`` (the domain prefixed for other domains), which adds IR nodes and returns
    None, or returns False or a reason to leave the node opaque. The handlers live in
    the mixins of the ``ops_*`` modules, one module per kind of op; a new op is one more
    method there. This class holds the state and the lookups they share."""

    def __init__(
        self,
        model: onnx.ModelProto,
        take_ownership: bool,
        base_dir: str | None,
        input_shapes: dict | None = None,
    ):
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
        self.node_constants = dict(self.constants)  # before folding adds to them
        self.graph_outputs = {o.name for o in g.output}
        self.producers = {
            o: i for i, n in enumerate(g.node) if n.domain in ("", "ai.onnx") for o in n.output if o
        }
        self.users: dict[str, list[int]] = {}
        self.reads: list[list[str]] = []
        subgraph_reads: set[str] = set()
        for i, node in enumerate(g.node):
            names = node_reads(node)
            self.reads.append(names)
            subgraph_reads.update(names[len([n for n in node.input if n]) :])
            for name in names:
                self.users.setdefault(name, []).append(i)
        self.input_shapes = dict(input_shapes or {})
        inferred = infer(model, self.input_shapes)
        self.dims = _dims(inferred)
        self.batch_names = _batch_names(inferred)
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
        self._refine_shapes()
        self._follow_channel_axes()

    def _refine_shapes(self, rounds: int = 8) -> None:
        """Infer the shapes again with the values the folding found that onnx's own
        inference did not (see :mod:`.inference`), while that teaches it something: a
        later Reshape's target may read a shape learnt in the round before."""
        given = set(self.inits) | set(self.node_constants)
        known: dict[str, np.ndarray] = {}
        for _ in range(rounds):
            new = shape_values(
                self.model, self.constants, self.dims, given | set(known), self.batch_names
            )
            if not new:
                return
            known.update(new)
            inferred = infer(self.model, self.input_shapes, known)
            dims = _dims(inferred)
            if dims == self.dims:
                return
            self.dims = dims
            self.batch_names = _batch_names(inferred)
            self.translation.ranks = {k: len(v) for k, v in dims.items()}
            self.translation.dtypes = _dtypes(inferred)
            self.constants = dict(self.node_constants)
            self.unfolded = {}
            self._fold_constants()

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

    def vector(self, name: str, index: int) -> tuple[np.ndarray, str]:
        """A per-channel vector parameter (a bias, a norm's gamma or beta) of the node at
        ``index``, and its storage id. Where other nodes read the same initializer, the
        node gets a copy and an id of its own: exporters merge initializers of equal
        values (the dynamo exporter's optimizer: every zero bias and every LayerNorm's
        ones of an untrained model become one tensor), which ties nothing the model
        meant to share, and would leave each of those layers out. The write-back gives
        each its own initializer (``cle_onnx._apply._Writer.put`` clones a tensor
        another node reads). Weight matrices stay shared: tying them is meant."""
        arr = self.param(name)
        if len(set(self.users.get(name, []))) <= 1:
            return arr, name
        ident = f"{name}@{index}"
        self.translation.untied[ident] = name
        return np.array(arr), ident

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

    def producer_of(self, name: str) -> onnx.NodeProto | None:
        """The node of the default domain that computes ``name``, if any."""
        i = self.producers.get(name)
        return None if i is None else self.model.graph.node[i]

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
                self.graph.add_input(vi.name, self.width(vi.name))
        names_seen: set[str] = set()
        for i, node in enumerate(g.node):
            name = node.name if node.name and node.name not in names_seen else f"{node.op_type}_{i}"
            names_seen.add(name)
            self.translation.node_names[i] = name
        self.find_rotaries()
        for i, node in enumerate(g.node):
            if i in self.consumed_adds:
                continue
            self.translate(i, node, self.translation.node_names[i])
        # Outputs computed from constants alone are not in the IR (nothing changes them).
        self.graph.set_outputs([o.name for o in g.output if o.name not in self.fixed])
        for name, value in self.graph.values.items():  # shapes, where inferred
            dims = self.dims.get(name)
            if dims is None:
                continue
            value.shape = tuple(dims)
            axis = self.axis.get(name)
            if value.producer is None or value.producer.op == "opaque":
                # the core follows the translated ops' channels itself, not these
                value.channel_axes = None if axis in (None, 1) else (axis,)
            # spatial sizes: the axes besides the batch and the channels
            rest = tuple(d for i, d in enumerate(dims) if i not in (0, axis))
            if len(dims) >= 2 and axis is not None and all(isinstance(d, int) for d in rest):
                value.spatial = rest
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
        channels = self.width(outs[0]) if outs else None
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


def to_ir(
    model: onnx.ModelProto,
    take_ownership: bool = False,
    base_dir: str | None = None,
    input_shapes: dict | None = None,
) -> tuple[Graph, Translation]:
    """Translate ``model`` into an IR graph.

    With ``take_ownership`` the layer weights' bytes move from the proto into the
    graph's arrays (one copy in memory); :func:`cle_onnx._apply.apply` puts them back,
    and so does this function if the translation fails. ``input_shapes``: sizes by
    input name (None where not given) for the dimensions the model leaves dynamic, the
    batch aside: shapes are inferred with them (the model is not changed).
    """
    reader = _Reader(model, take_ownership, base_dir, input_shapes)
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
