"""Which axis of each value holds the channels, followed through the model before the
handlers run: axis 1 for NCHW tensors, the last axis after a MatMul with a weight or a
token embedding (``(B, T, C)``), moved by Transposes and the Reshapes that keep the
channel axis whole.

The core follows the channels of the translated ops itself (``Graph.validate``); the
reader needs them where the core cannot: the channel count of an opaque op's output
(GELU, Softmax, an embedding ...), which the core checks against the layer reading it,
and whether a graph input's channels are last. One axis or None (not known, or spread
over several axes, as between a heads split and its merge)."""

from __future__ import annotations

import numpy as np

from cle_core.toolkit import LayoutError, reshape_axes

from .proto import _attrs

# Ops whose output has its channels on axis 1 whatever the input's layout.
_CHANNEL_FIRST = frozenset(
    {
        "Conv",
        "ConvTranspose",
        "BatchNormalization",
        "InstanceNormalization",
        "GroupNormalization",
        "MaxPool",
        "AveragePool",
        "LpPool",
        "GlobalAveragePool",
        "GlobalMaxPool",
        "Gemm",
        "Flatten",
    }
)
_REDUCE = frozenset({"ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceL2"})


def _moved_axis(src, axis: int, dst) -> int | None:
    """Where axis ``axis`` of a tensor of shape ``src`` is after a reshape to ``dst``
    (:func:`cle_core.toolkit.reshape_axes`, the core's rule), or None if the reshape
    splits or merges it or a size is unknown."""
    if src is None or dst is None or not all(isinstance(d, int) for d in (*src, *dst)):
        return None
    try:
        moved = reshape_axes(src, (axis,), dst)
    except LayoutError:
        return None
    return moved[0] if len(moved) == 1 else None


class _ChannelAxes:
    """Mixed into :class:`~.reader._Reader`: ``self.axis`` maps value names to their
    channel axis (or None)."""

    def _follow_channel_axes(self) -> None:
        self.axis: dict[str, int | None] = {}
        for vi in self.model.graph.input:
            if vi.name not in self.inits:
                self.axis[vi.name] = self._input_axis(vi.name)
        for node in self.model.graph.node:
            outs = [o for o in node.output if o and o not in self.fixed]
            if not outs:
                continue
            axis = self._axis_after(node) if node.domain in ("", "ai.onnx") else None
            for o in outs:
                rank = self.rank(o)
                self.axis[o] = (
                    axis if rank is not None and axis is not None and axis < rank else None
                )

    def _input_axis(self, name: str) -> int | None:
        """Axis 1, but the last for a float token tensor ``(B, T, C)`` that a MatMul with a
        weight or a norm over its last axis (written out or not) reads."""
        rank = self.rank(name)
        if rank is None or rank < 2:
            return None
        if rank >= 3 and self.translation.dtypes.get(name, np.dtype(np.float32)).kind == "f":
            for i in self.users.get(name, []):
                r = self.model.graph.node[i]
                if r.input and r.input[0] != name:
                    continue
                if r.op_type == "MatMul" and len(self.const_shape(r.input[1]) or ()) == 2:
                    return rank - 1
                if r.op_type in ("LayerNormalization", "RMSNormalization"):
                    if int(_attrs(r).get("axis", -1)) % rank == rank - 1:
                        return rank - 1
                # a norm written out: the mean (of the squares) over the last axis
                if r.op_type == "Pow":
                    after = self.users.get(r.output[0], [])
                    r = self.model.graph.node[after[0]] if len(after) == 1 else r
                if r.op_type == "ReduceMean" and self._reduced_axis(r, r.input[0]) == rank - 1:
                    return rank - 1
        return 1

    def _axis_after(self, node) -> int | None:
        op, a = node.op_type, _attrs(node)
        out = node.output[0]
        rank = self.rank(out)
        data = [n for n in node.input if n and n not in self.fixed]
        x = data[0] if data else None
        ax = self.axis.get(x) if x is not None else None
        if rank is None:
            return None
        if op in _CHANNEL_FIRST:
            return 1
        if op == "MatMul":
            if len(data) == 1 and node.input[0] == x:  # x @ W: a linear layer
                return rank - 1
            if len(data) != 2:
                return None
            for k in (1, 0):  # attention's V carries: the second operand first
                v_axis, v_rank = self.axis.get(node.input[k]), self.rank(node.input[k])
                summed = None if v_rank is None else (v_rank - 1 if k == 0 else v_rank - 2)
                if v_axis is not None and v_rank is not None and v_axis != summed:
                    return v_axis + rank - v_rank
            return None
        if op == "Gather":
            if node.input[0] in self.fixed:  # an embedding: a constant table, data indices
                table = self.const_shape(node.input[0])
                return rank - 1 if table is not None and len(table) == 2 else None
            g = int(a.get("axis", 0)) % max(self.rank(x) or 1, 1)
            if ax is None or ax == g:
                return None
            return ax if ax < g else ax + (self.rank(node.input[1]) or 0) - 1
        if ax is None:
            return None
        if op == "Transpose":
            perm = list(a["perm"]) if "perm" in a else list(range(rank))[::-1]
            return perm.index(ax) if ax in perm else None
        if op in ("Reshape", "Squeeze", "Unsqueeze"):
            return _moved_axis(self.dims.get(x), ax, self.dims.get(out))
        if op in _REDUCE:
            keep = int(a.get("keepdims", 1))
            axes = a.get("axes")
            if axes is None and len(node.input) > 1 and node.input[1]:
                value = self.const(node.input[1])
                axes = None if value is None else value.reshape(-1).tolist()
            xr = self.rank(x) or 0
            axes = list(range(xr)) if axes is None else [int(v) % xr for v in axes]
            if ax in axes:
                return None
            return ax if keep else ax - sum(1 for v in axes if v < ax)
        if op in ("LayerNormalization", "RMSNormalization"):
            return int(a.get("axis", -1)) % rank
        # elementwise and the like: the layout of the first data input of the output's rank
        same = [n for n in data if self.rank(n) == rank]
        return self.axis.get(same[0]) if same else None

    def width(self, name: str) -> int | None:
        """The channel count of ``name`` along its channel axis, where known."""
        axis, dims = self.axis.get(name), self.dims.get(name)
        if axis is None or dims is None or axis >= len(dims) or not isinstance(dims[axis], int):
            return None
        return dims[axis]
