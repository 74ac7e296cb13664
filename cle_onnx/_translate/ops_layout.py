"""Handlers of the ops that move channels between axes or mix positions: Transpose,
Squeeze / Unsqueeze (a ``reshape``), MatMul of two activations (attention), Gather of
constant positions (a ``select``: the class token), Softmax (opaque, runnable by the
core's executor), Expand / Tile (opaque, with the reason). Reshape and Slice are in
``ops_channels``."""

from __future__ import annotations

import numpy as np

from .proto import _attrs


def _softmax(axis: int):
    def fn(x: np.ndarray) -> np.ndarray:
        e = np.exp(x - x.max(axis=axis, keepdims=True))
        return e / e.sum(axis=axis, keepdims=True)

    return fn


# Why Expand and Tile stay opaque: grouped-query attention repeats each K / V head for
# several query heads this way, and one V channel feeding several O columns is a pair
# the core does not equalize.
_REPEATS = (
    "it repeats values (as grouped-query attention repeats its K / V heads): one "
    "channel would feed several"
)


class _LayoutOps:
    """Mixed into :class:`~.reader._Reader`, which dispatches to the ``op_*`` methods."""

    def op_Transpose(self, index, node, name):
        rank = self.rank(node.input[0])
        a = _attrs(node)
        if "perm" in a:
            perm = tuple(int(p) for p in a["perm"])
        elif rank is None:
            return "its input's rank is not known (no perm given)"
        else:
            perm = tuple(range(rank))[::-1]  # the default: the axes reversed
        self.add("transpose", [node.input[0]], name, index, attrs={"perm": perm})

    def matmul_activations(self, index, node, name):
        """``A @ B`` of two activations (attention's ``Q K^T`` and ``P V``): the core
        tells which operand carries channels, if any."""
        a, b = node.input[0], node.input[1]
        if a in self.fixed:
            return "a constant times an activation (W @ x) is not a layer on the last axis"
        if self.rank(a) is None or self.rank(b) is None:
            return "the ranks of its inputs are not known"
        if min(self.rank(a), self.rank(b)) < 2:
            return "a MatMul of a vector"
        self.add("matmul", [a, b], name, index)

    def op_Unsqueeze(self, index, node, name):
        """An axis of size 1 inserted (or removed): a reshape to the static output
        shape, where shape inference knows it."""
        return self._static_reshape(index, node, name)

    def op_Squeeze(self, index, node, name):
        return self._static_reshape(index, node, name)

    def _static_reshape(self, index, node, name):
        src, dst = self.dims.get(node.input[0]), self.dims.get(node.output[0])
        if src is None or dst is None:
            return "its input's or output's shape is not known"
        axes = _attrs(node).get("axes")
        if axes is None and len(node.input) > 1 and node.input[1]:
            value = self.const(node.input[1])
            axes = None if value is None else value.reshape(-1).tolist()
        rank = len(dst) if node.op_type == "Unsqueeze" else len(src)
        if axes is None or 0 in [int(a) % rank for a in axes]:
            # the IR takes axis 0 for the batch (statistics, sizes): it stays axis 0
            return "it removes or inserts the batch axis (or its axes are not known)"
        if not all(isinstance(d, int) for d in (*src[1:], *dst[1:])):
            return "its output's shape is not static (only the batch may be unknown)"
        if (src[0] is None) != (dst[0] is None):
            return "its batch size is not kept"
        self.add("reshape", [node.input[0]], name, index, attrs={"shape": tuple(dst)})

    def op_Gather(self, index, node, name):
        """Constant positions of an activation's axis (``x[:, 0]``: the class token): a
        ``select``, which the core follows where the axis is not the channels' and
        refuses with the reason where it is. An embedding (a constant table read at data
        positions) stays opaque."""
        data, where = node.input[0], node.input[1]
        if data in self.fixed:
            return False
        rank = self.rank(data)
        if rank is None:
            return "its input's rank is not known"
        positions = self.const(where)
        if positions is None or positions.dtype.kind not in "iu":
            return "its indices are not constant: it selects by computed positions"
        if positions.ndim > 1:
            return f"its indices have rank {positions.ndim}: they reshape the axis"
        chosen = (
            int(positions) if positions.ndim == 0 else tuple(int(i) for i in positions.reshape(-1))
        )
        axis = int(_attrs(node).get("axis", 0)) % rank
        self.add("select", [data], name, index, attrs={"axis": axis, "index": chosen})

    def op_Expand(self, index, node, name):
        return _REPEATS

    def op_Tile(self, index, node, name):
        return _REPEATS

    def op_Softmax(self, index, node, name):
        """Opaque (not homogeneous); given the function where its axis is known, so the
        core's executor can run a graph through it."""
        rank = self.rank(node.input[0])
        default = -1 if self.opset >= 13 else 1
        axis = int(_attrs(node).get("axis", default))
        if rank is None or (self.opset < 13 and axis % rank != rank - 1):
            return "a softmax (not homogeneous)"
        self.opaque(index, node, name, "a softmax (not homogeneous)")
        self.graph.nodes[-1].attrs["fn"] = _softmax(axis % rank)
        return None
