"""Write an equalization result back into an ONNX model (in place on the proto given)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from cle_core import EqualizeResult, Node, unique_name
from cle_core.toolkit import broadcast_shape, fit_dtype

from ._translate import Translation, has_subgraph, np_dtype, outer_reads, subgraphs


def _layer_upstream(node: Node) -> Node | None:
    """The layer that produces ``node``'s input through single-input ops."""
    value = node.inputs[0]
    while value.producer is not None:
        producer = value.producer
        if producer.is_layer:
            return producer
        value = producer.inputs[0]
    return None


def _rank_from_layer(node: Node) -> int:
    """The rank of an activation's input, from the layer that produces it (shape
    inference could not tell): a Conv's weight rank, 2 for a Linear. Per-channel bounds
    only arise inside regions, which start at a layer."""
    value = node.inputs[0]
    while value.producer is not None:
        producer = value.producer
        if producer.is_layer:
            return 2 if producer.op == "linear" else producer.weight.ndim
        value = producer.inputs[0]
    raise ValueError(f"cannot tell the rank of the input of {node.name!r}")


class _Writer:
    def __init__(self, model: onnx.ModelProto, tr: Translation, result: EqualizeResult):
        self.model = model
        self.g = model.graph
        self.tr = tr
        self.result = result
        self.nodes: list[onnx.NodeProto] = list(self.g.node)
        self.inits = {t.name: t for t in self.g.initializer}
        self.replacements: dict[int, list[onnx.NodeProto]] = {}
        self.removed: set[int] = set()
        self.reader_renames: dict[str, str] = {}
        self.output_renames: dict[str, str] = {}
        self.taken_names = {n for n in self.inits} | {o for n in self.nodes for o in n.output}
        self.taken_names |= {v.name for v in self.g.input} | {v.name for v in self.g.output}
        self.pending: dict[str, np.ndarray] = {}  # external tensors: written when saving
        self.read_before = set(self.tr.users) | {v.name for v in self.g.output}

    def fresh(self, base: str) -> str:
        return unique_name(base, self.taken_names)

    def put(self, name: str, arr: np.ndarray, owners: set[int], dims=None) -> str:
        """Store ``arr`` under initializer ``name``; clone it first when a node outside
        ``owners`` (a subgraph included) also reads it, so no other node's numbers
        change. Returns the name."""
        if name not in self.inits:  # computed from constants: the layer gets its own
            shape, dtype = self.tr.derived[name]
            return self.new_tensor(f"{name}_cle", np.reshape(arr, shape), dtype)
        dtype = np_dtype(self.inits[name].data_type) or arr.dtype
        arr = fit_dtype(arr, dtype, f"tensor {name!r}")
        if dims is not None:
            arr = arr.reshape(dims)
        if set(self.tr.users.get(name, [])) - owners:
            return self.new_tensor(f"{name}_cle", arr)
        tensor = self.inits[name]
        self.tr.owned.pop(name, None)
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            self.pending[name] = arr
            return name
        tensor.CopyFrom(numpy_helper.from_array(arr, name))
        return name

    def new_tensor(self, base: str, arr: np.ndarray, dtype=None) -> str:
        """Add an initializer (in ``dtype``, default ``arr``'s); declared as a graph input
        too where the model's IR version (< 4) requires it."""
        name = self.fresh(base)
        arr = fit_dtype(arr, dtype or np.asarray(arr).dtype, f"tensor {name!r}")
        tensor = numpy_helper.from_array(arr, name)
        self.g.initializer.append(tensor)
        self.inits[name] = self.g.initializer[-1]
        if self.tr.ir_version < 4:
            self.g.input.append(helper.make_tensor_value_info(name, tensor.data_type, arr.shape))
        return name

    # --- layers --------------------------------------------------------------------
    def layer(self, node: Node) -> None:
        handle = node.handle
        indices = set(handle) if isinstance(handle, tuple) else {handle}
        if isinstance(handle, tuple):  # a MatMul, or a layer whose bias is an Add
            self.fused(node, handle)
            return
        onnx_node = self.nodes[handle]
        onnx_node.input[1] = self.put(onnx_node.input[1], node.weight, indices)
        bias = node.bias
        if bias is None:
            return
        if len(onnx_node.input) > 2 and onnx_node.input[2]:
            onnx_node.input[2] = self.put(onnx_node.input[2], bias, indices, dims=(bias.size,))
        else:
            name = self.new_tensor(
                f"{onnx_node.name or node.name}_bias", bias, self.weight_dtype(onnx_node)
            )
            while len(onnx_node.input) < 2:
                onnx_node.input.append("")
            onnx_node.input.append(name)
        if onnx_node.op_type == "Gemm":
            for attr in onnx_node.attribute:  # the IR holds effective values
                if attr.name in ("alpha", "beta"):
                    attr.f = 1.0

    def fused(self, node: Node, handle: tuple) -> None:
        mm = self.nodes[handle[0]]
        indices = set(handle)
        mm.input[1] = self.put(mm.input[1], node.weight, indices)
        if node.bias is None:
            return
        if len(handle) == 2:
            add = self.nodes[handle[1]]
            slot = 1 if add.input[0] == mm.output[0] else 0
            name = add.input[slot]
            dims = tuple(self.inits[name].dims) if name in self.inits else None  # else derived
            add.input[slot] = self.put(name, node.bias, indices, dims=dims)
            return
        bias = self.new_tensor(f"{mm.name or node.name}_bias", node.bias, self.weight_dtype(mm))
        out = mm.output[0]
        mid = self.fresh(f"{out}_matmul")
        mm.output[0] = mid
        add = helper.make_node(
            "Add", [mid, bias], [out], name=self.fresh(f"{mm.name or node.name}_bias_add")
        )
        self.replacements[handle[0]] = [mm, add]

    def weight_dtype(self, onnx_node: onnx.NodeProto):
        return np_dtype(self.inits[onnx_node.input[1]].data_type) or np.float32

    # --- activations ----------------------------------------------------------------
    def clip(self, node: Node) -> None:
        index = node.handle
        old = self.nodes[index]
        x, out = old.input[0], old.output[0]
        lo = np.asarray(node.params["lo"], np.float64)
        hi = np.asarray(node.params["hi"], np.float64)
        dtype = self.float_type(x, node)
        base = old.name or node.name
        if lo.size == 1 and hi.size == 1:
            self.replacements[index] = [self.scalar_clip(old, float(lo), float(hi), dtype)]
            return
        rank = self.tr.ranks.get(x) or _rank_from_layer(node)
        channels = max(lo.size, hi.size)
        # along the channel axis, wherever it is: (1, C, 1, 1), or (1, 1, C) on tokens
        shape = broadcast_shape(rank, node.inputs[0].axes, channels)
        lo = np.broadcast_to(lo.reshape(-1), (channels,)).reshape(shape)
        hi = np.broadcast_to(hi.reshape(-1), (channels,)).reshape(shape)
        made: list[onnx.NodeProto] = []
        repeats = None
        if self.tr.opset < 8:
            # Max and Min do not broadcast before opset 8: tile each bound to the shape
            # of x (repeats = shape(x) / (1, C, 1, ...)), which keeps the clip exact.
            shape_name = self.fresh(f"{out}_shape")
            divisor = self.new_tensor(f"{base}_channels", np.array(lo.shape, np.int64))
            repeats = self.fresh(f"{out}_repeats")
            made.append(helper.make_node("Shape", [x], [shape_name], name=self.fresh(base)))
            made.append(
                helper.make_node("Div", [shape_name, divisor], [repeats], name=self.fresh(base))
            )

        def bound(arr: np.ndarray, tag: str) -> str:
            name = self.new_tensor(f"{base}_{tag}", arr, dtype)
            if repeats is None:
                return name
            tiled = self.fresh(f"{out}_{tag}_tiled")
            made.append(helper.make_node("Tile", [name, repeats], [tiled], name=self.fresh(base)))
            return tiled

        # A scalar clip to the widest bounds first, then the per-channel Max / Min that
        # remain. Exact (every channel's bounds lie inside the scalar ones), and it is the
        # form quantizers recognise: onnxruntime's quantize_static merges a Clip or Relu
        # into the layer before it and quantizes once at its output, so that point has the
        # bounded range [min lo, max hi] rather than the unbounded range of a bare Relu.
        lo_s, hi_s = float(lo.min()), float(hi.max())
        need_lo = bool(np.any(lo > lo_s))
        need_hi = bool(np.any(hi < hi_s))
        steps = [("max", lo, "lo")] * need_lo + [("min", hi, "hi")] * need_hi
        if lo_s == 0 and not np.isfinite(hi_s):
            first = helper.make_node("Relu", [x], [out], name=self.fresh(f"{base}_relu"))
        elif np.isfinite(lo_s) or np.isfinite(hi_s):
            first = self.scalar_clip(old, lo_s, hi_s, dtype, self.fresh(f"{base}_clip"))
        else:
            first = helper.make_node("Identity", [x], [out], name=self.fresh(base))
        if steps:
            first.output[0] = current = self.fresh(f"{out}_clip")
        made.insert(0, first)  # before the tiling nodes, which only read x's shape
        for i, (op, arr, tag) in enumerate(steps):
            nxt = out if i == len(steps) - 1 else self.fresh(f"{out}_{op}")
            made.append(
                helper.make_node(
                    op.capitalize(),
                    [current, bound(arr, tag)],
                    [nxt],
                    name=self.fresh(f"{base}_{op}"),
                )
            )
            current = nxt
        self.replacements[index] = made

    def scalar_clip(self, old: onnx.NodeProto, lo: float, hi: float, dtype, name=None):
        name = name or old.name or self.fresh("clip")
        if self.tr.opset < 11:
            # Attributes; an infinite bound is left to its default (the float extreme).
            bounds = {k: v for k, v in (("min", lo), ("max", hi)) if np.isfinite(v)}
            return helper.make_node("Clip", [old.input[0]], [old.output[0]], name=name, **bounds)
        inputs = [old.input[0]]
        inputs.append(
            self.new_tensor(f"{name}_min", np.array(lo), dtype) if np.isfinite(lo) else ""
        )
        if np.isfinite(hi):
            inputs.append(self.new_tensor(f"{name}_max", np.array(hi), dtype))
        return helper.make_node("Clip", inputs, [old.output[0]], name=name)

    def float_type(self, value: str, node: Node):
        """The element type of ``value``: from shape inference, else the weights of the
        layer that produces it (bounds must match the tensor they clip)."""
        if value in self.tr.dtypes:
            return self.tr.dtypes[value]
        layer = _layer_upstream(node)
        if layer is not None and layer.weight.dtype.kind == "f":
            return layer.weight.dtype
        return np.float32

    def batchnorm(self, node: Node) -> None:
        """A batch norm carried through a region: its mean and shift changed."""
        bn = self.nodes[node.handle]
        for slot, key in ((3, "mean"), (2, "beta")):
            bn.input[slot] = self.put(bn.input[slot], node.params[key], {node.handle})

    def norm(self, node: Node) -> None:
        """A norm's gamma and beta, divided by the scales: each replaces its tensor in
        the nodes of the norm that read it (a LayerNormalization's inputs 1 and 2, the
        Mul / Add of a decomposed form), in its own shape and dtype; copied where
        another node reads it too."""
        owners = set(node.handle)
        for key, ident in node.param_ids.items():
            arr = node.params.get(key)
            if arr is None:
                continue
            name = self.tr.untied.get(ident, ident)  # a merged initializer's copy
            dims = tuple(self.inits[name].dims) if name in self.inits else None
            new = self.put(name, arr, owners, dims=dims)
            for i in sorted(owners):
                onnx_node = self.nodes[i]
                for slot, ref in enumerate(onnx_node.input):
                    if ref == name:
                        onnx_node.input[slot] = new

    # --- folded batch norms -----------------------------------------------------------
    def remove_bn(self, index: int) -> None:
        bn = self.nodes[index]
        x, y = bn.input[0], bn.output[0]
        self.removed.add(index)
        if y in {o.name for o in self.g.output} or y in self.tr.subgraph_reads:
            # Keep the name that a graph output or a subgraph refers to: the layer's
            # output takes it (the layer's output had no other reader, or the BN could
            # not have been folded on its output side).
            self.output_renames[x] = y
        else:
            self.reader_renames[y] = x

    # --- driver -----------------------------------------------------------------------
    def run(self) -> None:
        graph = self.result.graph
        for name in self.result.changed:
            node = graph.node(name)
            if node.is_layer:
                self.layer(node)
            elif node.op == "clip":
                self.clip(node)
            elif node.op == "batchnorm":
                self.batchnorm(node)
            elif node.op == "norm":
                self.norm(node)
            else:
                raise ValueError(f"cannot write back node {name!r} ({node.op})")
        handles = self.tr.node_names
        by_name = {v: k for k, v in handles.items()}
        for name in self.result.removed:
            self.remove_bn(by_name[name])
        for name, arr in list(self.tr.owned.items()):  # owned but unchanged: put back
            self.inits[name].CopyFrom(numpy_helper.from_array(np.ascontiguousarray(arr), name))
        self.tr.owned.clear()
        final: list[onnx.NodeProto] = []
        for i, node in enumerate(self.nodes):
            if i in self.removed:
                continue
            final.extend(self.replacements.get(i, [node]))
        for node in final:
            for k, name in enumerate(node.input):
                name = self.reader_renames.get(name, name)
                node.input[k] = self.output_renames.get(name, name)
            for k, name in enumerate(node.output):
                node.output[k] = self.output_renames.get(name, name)
        del self.g.node[:]
        self.g.node.extend(final)
        self.prune()

    def _used(self) -> set[str]:
        used = {n for node in self.g.node for n in node.input} | {o.name for o in self.g.output}
        for node in self.g.node:  # what If / Loop bodies read from outside is live too
            for sub in subgraphs(node):
                used |= outer_reads(sub)
        return used

    def _dead(self, node: onnx.NodeProto, used: set[str]) -> bool:
        """Whether ``node`` only computed values that nothing reads any more: a Constant
        that fed a replaced Clip, the Identity or Reshape that made a weight the layer
        now holds as an initializer. Nodes that were dead in the model as given stay."""
        outs = [o for o in node.output if o]
        if any(o in used for o in outs) or node.domain not in ("", "ai.onnx"):
            return False
        if node.op_type == "Constant":
            return True
        return any(o in self.read_before for o in outs) and not has_subgraph(node)

    def prune(self) -> None:
        used = self._used()
        while True:
            live = [n for n in self.g.node if not self._dead(n, used)]
            if len(live) == len(self.g.node):
                break
            del self.g.node[:]
            self.g.node.extend(live)
            used = self._used()
        keep = [t for t in self.g.initializer if t.name in used]
        dropped = {t.name for t in self.g.initializer} - {t.name for t in keep}
        del self.g.initializer[:]
        self.g.initializer.extend(keep)
        inputs = [v for v in self.g.input if v.name not in dropped]
        del self.g.input[:]
        self.g.input.extend(inputs)
        alive = used | {o for node in self.g.node for o in node.output}
        infos = [v for v in self.g.value_info if v.name in alive]
        del self.g.value_info[:]
        self.g.value_info.extend(infos)
        for name in list(self.pending):
            if name in dropped:
                del self.pending[name]


def apply(model: onnx.ModelProto, tr: Translation, result: EqualizeResult) -> dict[str, np.ndarray]:
    """Write ``result`` into ``model`` (in place). Returns the arrays of externally stored
    tensors that changed; the saver streams them into the new external data file."""
    writer = _Writer(model, tr, result)
    writer.run()
    return writer.pending
