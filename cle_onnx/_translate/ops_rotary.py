"""Rotary position embeddings as one IR ``rotary`` node each: opset 23's
``RotaryEmbedding``, and the form both torch exporters write for ``x * cos +
rotate_half(x) * sin``: ``Mul(x, cos)``, the halves of ``x`` along its last axis
(``Slice`` twice, or a ``Split`` in two), ``Neg`` of the second, ``Concat((-x2, x1),
axis=-1)``, ``Mul`` of that by ``sin``, ``Add`` of the two products, with constant tables.
The core ties the two channels of each rotated pair to one scale, which keeps ``q k^T``.
Where an intermediate is read elsewhere, or a table is not constant, the ops are
translated one by one (and stay opaque)."""

from __future__ import annotations

import numpy as np

from .proto import _attrs


class _RotaryOps:
    """Mixed into :class:`~.reader._Reader`: :meth:`find_rotaries` runs before the walk
    (the Add that ends a rotary comes after its other nodes); the Add's handler adds the
    ``rotary`` (:meth:`rotary_at`)."""

    def find_rotaries(self) -> None:
        self.rotaries: dict[int, tuple[str, str, str]] = {}  # Add's index -> x, cos, sin
        for i, node in enumerate(self.model.graph.node):
            if node.op_type == "Add" and node.domain in ("", "ai.onnx"):
                found = self._rotary(node)
                if found is not None:
                    x, cos, sin, inner = found
                    self.rotaries[i] = (x, cos, sin)
                    self.consumed_adds.update(inner)  # translated as part of the rotary

    def rotary_at(self, index: int, name: str):
        """The ``rotary`` ending at the Add ``index``, or why not (the tables must
        broadcast to its input's shape)."""
        x, cos, sin = self.rotaries[index]
        dims = self.dims.get(x)
        if dims is None:
            return "its input's shape is not known"
        tables = {"cos": self.const(cos), "sin": self.const(sin)}
        return self._add_rotary(index, name, x, tables, False)

    def _add_rotary(self, index, name, x, tables, interleaved):
        known = tuple(d if isinstance(d, int) else 1 for d in self.dims[x])
        for key, table in tables.items():
            try:
                fits = table.ndim <= len(known) and np.broadcast_shapes(table.shape, known) == known
            except ValueError:
                fits = False
            if not fits:
                return f"its {key} {table.shape} does not broadcast to {tuple(self.dims[x])}"
        params = {k: np.asarray(t, np.float64) for k, t in tables.items()}
        self.add("rotary", [x], name, index, params=params, attrs={"interleaved": interleaved})
        return None

    def _rotary(self, add):
        """``(x, cos, sin, [indices of the other nodes])`` where ``add`` ends a rotary
        embedding, else None."""
        if len(add.input) != 2:
            return None
        for straight, rotated in (tuple(add.input), tuple(add.input)[::-1]):
            a = self._table_product(straight)
            b = self._table_product(rotated)
            if a is None or b is None:
                continue
            (x, cos, i_a), (cat, sin, i_b) = a, b
            rank = self.rank(x)
            c = self.producer_of(cat)
            if rank is None or c is None or c.op_type != "Concat" or len(c.input) != 2:
                continue
            if int(_attrs(c).get("axis", 0)) % rank != rank - 1:
                continue
            neg = self.producer_of(c.input[0])
            if neg is None or neg.op_type != "Neg":
                continue
            halves = self._halves(x, neg.input[0], c.input[1], rank)
            if halves is None:
                continue
            inner = [i_a, i_b, self.producers[cat], self.producers[c.input[0]], *halves]
            if not self._read_within(inner, {*inner, self.producers[add.output[0]]}):
                continue  # an intermediate is read elsewhere
            return x, cos, sin, inner
        return None

    def _read_within(self, nodes: list[int], readers: set[int]) -> bool:
        """Whether the outputs of ``nodes`` are read by ``readers`` alone."""
        for i in nodes:
            for out in self.model.graph.node[i].output:
                if out in self.graph_outputs or not set(self.users.get(out, ())) <= readers:
                    return False
        return True

    def _table_product(self, value: str):
        """``(data, table, index)`` where ``value`` is a Mul of data by a constant."""
        p = self.producer_of(value)
        if p is None or p.op_type != "Mul" or len(p.input) != 2:
            return None
        for data, table in (tuple(p.input), tuple(p.input)[::-1]):
            if table in self.fixed and data not in self.fixed and self.const(table) is not None:
                return data, table, self.producers[value]
        return None

    def _halves(self, x: str, second: str, first: str, rank: int):
        """The indices of the nodes that cut ``first`` and ``second``, the halves of ``x``
        along its last axis (a Split in two, or two Slices), or None."""
        size = (self.dims.get(x) or [None])[-1]
        if not isinstance(size, int) or size % 2:
            return None
        p, q = self.producer_of(first), self.producer_of(second)
        if p is None or q is None:
            return None
        if p is q and p.op_type == "Split" and list(p.output) == [first, second]:
            if int(_attrs(p).get("axis", 0)) % rank != rank - 1:
                return None
            if any((self.dims.get(o) or [None])[-1] != size // 2 for o in p.output):
                return None
            return [self.producers[first]]
        cuts = [self._last_axis_cut(n, rank) for n in (p, q)]
        if p.input[0] != x or q.input[0] != x or None in cuts:
            return None
        half = size // 2
        if cuts[0] != (0, half) or cuts[1] != (half, size):
            return None
        return [self.producers[first], self.producers[second]]

    def _last_axis_cut(self, node, rank: int) -> tuple[int, int] | None:
        """``(start, end)`` of a Slice (opset 10 or later) of the last axis in steps of 1,
        clamped to its size, or None."""
        if node.op_type != "Slice" or self.opset < 10 or len(node.input) < 3:
            return None
        names = list(node.input) + [""] * 2
        values = [self.const(n) if n else None for n in names[1:5]]
        if (
            values[0] is None
            or values[1] is None
            or any(n and v is None for n, v in zip(names[3:5], values[2:4], strict=True))
        ):
            return None
        starts, ends = (np.asarray(v).reshape(-1) for v in values[:2])
        axes = np.arange(len(starts)) if values[2] is None else np.asarray(values[2]).reshape(-1)
        steps = np.ones(len(starts)) if values[3] is None else np.asarray(values[3]).reshape(-1)
        size = (self.dims.get(node.input[0]) or [None])[-1]
        if len(starts) != 1 or int(axes[0]) % rank != rank - 1 or int(steps[0]) != 1:
            return None
        start, end = (int(v) + size if int(v) < 0 else int(v) for v in (starts[0], ends[0]))
        return min(max(start, 0), size), min(max(end, 0), size)

    def op_RotaryEmbedding(self, index, node, name):
        """Opset 23's rotary embedding of a 4-D input ``(B, H, S, D)`` rotated whole
        (``rotary_embedding_dim`` 0 or ``D``), with constant caches (``(B, S, D / 2)``, or
        gathered by constant ``position_ids``): its tables, written out to ``D``."""
        x = node.input[0]
        dims, a = self.dims.get(x), _attrs(node)
        if dims is None or len(dims) != 4:
            return "its input is not 4-D (B, H, S, D) of a known shape (3-D merges the heads)"
        size = dims[-1]
        if not isinstance(size, int) or int(a.get("rotary_embedding_dim", 0)) not in (0, size):
            return "it rotates a part of each head only (rotary_embedding_dim)"
        caches = [self.const(n) if n in self.fixed else None for n in node.input[1:3]]
        if any(c is None for c in caches):
            return "its cos or sin cache is not a constant"
        if len(node.input) > 3 and node.input[3]:
            positions = self.const(node.input[3]) if node.input[3] in self.fixed else None
            if positions is None:
                return "its position_ids are not constant"
            caches = [c[np.asarray(positions, np.int64)] for c in caches]
        interleaved = bool(int(a.get("interleaved", 0)))
        tables = {}
        for key, cache in zip(("cos", "sin"), caches, strict=True):
            if cache.ndim != 3 or cache.shape[-1] * 2 != size:
                return f"its {key} cache {cache.shape} is not (B, S, D / 2)"
            full = np.repeat(cache, 2, -1) if interleaved else np.concatenate([cache] * 2, -1)
            tables[key] = full[:, None]  # (B, 1, S, D): one table for every head
        return self._add_rotary(index, name, x, tables, interleaved)
