"""Handlers of the ops that move channels between axes or mix positions: Transpose,
Squeeze / Unsqueeze (a ``reshape``), MatMul of two activations (attention), Gather of
constant positions (a ``select``: the class token), Softmax (opaque, runnable by the
core's executor), Expand / Tile of one axis of size 1 (a ``repeat``: how exporters write
grouped-query attention's repeat of K / V heads, Unsqueeze + Expand or Tile + Reshape).
Reshape and Slice are in ``ops_channels``."""

from __future__ import annotations

import numpy as np

from .proto import _attrs


def _softmax(axis: int):
    def fn(x: np.ndarray) -> np.ndarray:
        e = np.exp(x - x.max(axis=axis, keepdims=True))
        return e / e.sum(axis=axis, keepdims=True)

    return fn


# Why other Expands and Tiles stay opaque: the IR's repeat copies each position of one
# axis in a row; a tile of a longer axis copies the whole axis, a broadcast of several
# axes is several repeats, and neither is what exporters write for K / V heads.
_REPEATS = "it repeats more than one axis, or an axis longer than 1, or of unknown size"


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
        first_known = isinstance(src[0], int) and isinstance(dst[0], int)
        if axes is None or (0 in [int(a) % rank for a in axes] and not first_known):
            # the IR takes axis 0 for the batch where its size is unknown: it stays axis 0.
            # (Where axis 0 has a size, it may go: nn.MultiheadAttention's exports
            # unsqueeze the packed q / k / v (T, B, 3, C) there, to move the 3 first.)
            return "it removes or inserts the batch axis (or its axes are not known)"
        unknown = [sum(not isinstance(d, int) for d in v) for v in (src, dst)]
        if unknown[0] != unknown[1] or unknown[0] > 1:
            return "its output's shape is not static (only the batch may be unknown)"
        if not first_known and (src[0] is None) != (dst[0] is None):
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
        return self._repeat(index, node, name)

    def op_Tile(self, index, node, name):
        return self._repeat(index, node, name)

    def _repeat(self, index, node, name):
        """An Expand or Tile that grows one axis of size 1 to ``n``: a ``repeat`` of that
        axis, which the core follows (a channel map where the axis holds channels, or
        where a Reshape merges the copies into the channel axis before them)."""
        if node.input[0] in self.fixed:
            return False  # a constant broadcast (a class token over the batch)
        src, dst = self.dims.get(node.input[0]), self.dims.get(node.output[0])
        if src is None or dst is None or len(src) != len(dst):
            return "its input's or output's shape is not known"
        grown = [i for i, (a, b) in enumerate(zip(src, dst, strict=True)) if a != b]
        if len(grown) != 1 or src[grown[0]] != 1:
            return _REPEATS
        axis = grown[0]
        n = dst[axis] if isinstance(dst[axis], int) else self._merged_copies(node, axis, src)
        if n is None:
            return _REPEATS
        # (what shape inference could not tell, the Reshape after it did)
        self.dims[node.output[0]] = (*dst[:axis], n, *dst[axis + 1 :])
        self.add("repeat", [node.input[0]], name, index, attrs={"axis": axis, "repeats": n})

    def _merged_copies(self, node, axis, src) -> int | None:
        """The copies an Expand makes of a size-1 axis, where shape inference does not
        know them (the TorchScript exporter computes the Expand's shape from the input's
        with a Where that is not folded): a Reshape of known shape after it keeps the
        number of elements, so the copies are its size over the input's."""
        readers = [self.model.graph.node[i] for i in self.users.get(node.output[0], [])]
        if len(readers) != 1 or readers[0].op_type != "Reshape":
            return None
        out = self.dims.get(readers[0].output[0])
        if out is None or not out or (out[0] is None) != (src[0] is None):
            return None  # (an unknown batch on both sides is one size)
        rest_in, rest_out = list(src[1:]), list(out[1:])
        if not all(isinstance(d, int) for d in (*rest_in, *rest_out)):
            return None
        n, single = int(np.prod(rest_out)), int(np.prod(rest_in))
        if src[0] is not None:
            n, single = n * out[0], single * src[0]
        return n // single if single and n % single == 0 else None

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
