"""Rotary position embeddings as one IR ``rotary`` node each: opset 23's
``RotaryEmbedding``, and the form both torch exporters write for ``x * cos +
rotate_half(x) * sin``: ``Mul(x, cos)``, the halves of ``x`` along its last axis
(``Slice`` twice, or a ``Split`` in two), ``Neg`` of the second, ``Concat((-x2, x1),
axis=-1)``, ``Mul`` of that by ``sin``, ``Add`` of the two products, with constant tables
(initializers, or computed from constants and static shapes and folded: the TorchScript
exporter writes Hugging Face's tables computed in forward as ``MatMul``, ``Transpose``,
``Concat``, ``Cos``, ``Sin`` of constants). GPT-J's interleaved form too
(``torch.stack((-x[..., 1::2], x[..., ::2]), -1).flatten(-2)``: strided ``Slice``,
``Neg``, ``Unsqueeze``, ``Concat``, ``Reshape``). The core ties the two channels of each
rotated pair to one scale, which keeps ``q k^T``. Tables computed at run time (from a
``position_ids`` input, or a sequence length left dynamic) have no value here: that
rotary is refused with the reason (an opaque node of its input). Where an intermediate is
read elsewhere, or a table depends on the data it rotates, the ops are translated one by
one (and stay opaque)."""

from __future__ import annotations

import numpy as np

from cle_core.toolkit import rotary_table_misfit

from .proto import _attrs


class _RotaryOps:
    """Mixed into :class:`~.reader._Reader`: :meth:`find_rotaries` runs before the walk
    (the Add that ends a rotary comes after its other nodes); the Add's handler adds the
    ``rotary`` (:meth:`rotary_at`)."""

    def find_rotaries(self) -> None:
        # Add's index -> x, cos, sin, interleaved
        self.rotaries: dict[int, tuple[str, str, str, bool]] = {}
        for i, node in enumerate(self.model.graph.node):
            if node.op_type == "Add" and node.domain in ("", "ai.onnx"):
                found = self._rotary(node)
                if found is not None:
                    x, cos, sin, inner, interleaved = found
                    self.rotaries[i] = (x, cos, sin, interleaved)
                    self.consumed_adds.update(inner)  # translated as part of the rotary

    def rotary_at(self, index: int, name: str):
        """The ``rotary`` ending at the Add ``index``; where it cannot be one (its tables
        have no constant value, or do not broadcast to its input's shape), an opaque node
        of its input saying why (its other nodes are not translated)."""
        x, cos, sin, interleaved = self.rotaries[index]
        why = None if self.dims.get(x) is not None else "its input's shape is not known"
        tables = {}
        for key, table in (("cos", cos), ("sin", sin)):
            tables[key] = self.const(table) if self.is_const(table) else None
            if why is None and tables[key] is None:
                why = self._no_table(key, table)
        if why is None:
            why = self._add_rotary(index, name, x, tables, interleaved)
        if why is not None:
            attrs = {"kind": "rotary embedding", "why": why, "channels": None}
            self.add("opaque", [x], name, index, attrs=attrs)
        return None

    def _no_table(self, key: str, table: str) -> str:
        """Why ``table`` has no constant value: computed at run time from a graph input,
        or from constants and shapes it was not folded from."""
        if table in self.fixed:  # (the end of the chain of why says what was not known)
            why = self.unfolded.get(table, "has no value")
            return (
                f"its {key} {table!r} is computed from constants and shapes, but has no "
                f"value here (a sequence length left dynamic?): {why.rsplit(', which ', 1)[-1]}"
            )
        source = self._input_of(table)
        return (
            f"its {key} {table!r} is computed at run time from the graph input {source!r} "
            "(position ids, say): only tables of constants and static shapes are taken, whose "
            "values are known here"
        )

    def _input_of(self, value: str, avoid: str | None = None) -> str | None:
        """The first graph input ``value`` is computed from (None if none), or ``avoid``
        where it is computed from that value."""
        seen, todo = {value}, [value]
        inputs = {v.name for v in self.model.graph.input}
        while todo:
            name = todo.pop()
            if name == avoid or (name in inputs and avoid is None):
                return name
            p = self.producer_of(name)
            for n in () if p is None else p.input:
                if n and n not in seen and n not in self.fixed:
                    seen.add(n)
                    todo.append(n)
        return None

    def _add_rotary(self, index, name, x, tables, interleaved):
        shape = tuple(d if isinstance(d, int) else None for d in self.dims[x])
        for key, table in tables.items():
            misfit = rotary_table_misfit(key, table.shape, shape)
            if misfit:
                return f"its {misfit}"
        params = {k: np.asarray(t, np.float64) for k, t in tables.items()}
        self.add("rotary", [x], name, index, params=params, attrs={"interleaved": interleaved})
        return None

    def _rotary(self, add):
        """``(x, cos, sin, [indices of the other nodes])`` where ``add`` ends a rotary
        embedding, else None."""
        if len(add.input) != 2:
            return None
        orders = (tuple(add.input), tuple(add.input)[::-1])
        ways = [
            (a, b)
            for straight, rotated in orders
            for a in self._table_products(straight)
            for b in self._table_products(rotated)
        ]
        for (x, cos, i_a), (rotated, sin, i_b) in ways:
            rank = self.rank(x)
            found = None if rank is None else self._rotated(rotated, x, rank)
            if found is None:
                continue
            inner = [i_a, i_b, *found[0]]
            if not self._read_within(inner, {*inner, self.producers[add.output[0]]}):
                continue  # an intermediate is read elsewhere
            if any(self._input_of(t, avoid=x) for t in (cos, sin)):
                continue  # angles of the data it rotates: not a rotary
            return x, cos, sin, inner, found[1]
        return None

    def _rotated(self, value: str, x: str, rank: int):
        """``([indices of its nodes], interleaved)`` where ``value`` is ``rotate(x)``:
        ``Concat((Neg(x2), x1), axis=-1)`` of the halves, or GPT-J's interleaved form;
        else None."""
        c = self.producer_of(value)
        if c is not None and c.op_type == "Reshape":
            return self._every_two(c, x, rank)
        if c is None or c.op_type != "Concat" or len(c.input) != 2:
            return None
        if int(_attrs(c).get("axis", 0)) % rank != rank - 1:
            return None
        neg = self.producer_of(c.input[0])
        if neg is None or neg.op_type != "Neg":
            return None
        halves = self._halves(x, neg.input[0], c.input[1], rank)
        if halves is None:
            return None
        return [self.producers[value], self.producers[c.input[0]], *halves], False

    def _every_two(self, reshape, x: str, rank: int):
        """GPT-J's ``torch.stack((-x[..., 1::2], x[..., ::2]), -1).flatten(-2)`` as both
        exporters write it: ``Slice`` of the odd and of the even positions of the last
        axis (steps of 2), ``Neg`` of the odd, ``Unsqueeze`` of each on a new last axis,
        ``Concat`` on it, ``Reshape`` back to the shape of ``x``. ``([indices],
        True)``, or None."""
        dims = self.dims.get(x)
        size = (dims or [None])[-1]
        if not isinstance(size, int) or size % 2 or self.dims.get(reshape.output[0]) != dims:
            return None
        c = self.producer_of(reshape.input[0])
        if c is None or c.op_type != "Concat" or len(c.input) != 2:
            return None
        if int(_attrs(c).get("axis", 0)) % (rank + 1) != rank:
            return None
        parts = [self._unsqueezed_last(n, rank) for n in c.input]
        if None in parts:
            return None
        neg = self.producer_of(parts[0])
        if neg is None or neg.op_type != "Neg":
            return None
        odd, even = self.producer_of(neg.input[0]), self.producer_of(parts[1])
        if odd is None or even is None or odd.input[0] != x or even.input[0] != x:
            return None
        cuts = [self._last_axis_cut(n, rank, step=2) for n in (odd, even)]
        if cuts != [(1, size), (0, size)]:
            return None
        names = [reshape.output[0], reshape.input[0], *c.input, parts[0], neg.input[0], parts[1]]
        return [self.producers[n] for n in names], True

    def _unsqueezed_last(self, value: str, rank: int) -> str | None:
        """The input of an ``Unsqueeze`` that adds a last axis to a rank-``rank`` value."""
        p = self.producer_of(value)
        if p is None or p.op_type != "Unsqueeze":
            return None
        axes = _attrs(p).get("axes") if self.opset < 13 else None
        if self.opset >= 13 and len(p.input) > 1:
            axes = self.const(p.input[1])
        if axes is None or [int(a) % (rank + 1) for a in np.reshape(axes, -1)] != [rank]:
            return None
        return p.input[0]

    def _read_within(self, nodes: list[int], readers: set[int]) -> bool:
        """Whether the outputs of ``nodes`` are read by ``readers`` alone (or by nodes
        that read only their shapes: whose outputs are all shapes or constants)."""
        for i in nodes:
            for out in self.model.graph.node[i].output:
                others = set(self.users.get(out, ())) - readers
                shapes = all(
                    all(o in self.fixed for o in self.model.graph.node[j].output if o)
                    for j in others
                )
                if out in self.graph_outputs or not shapes:
                    return False
        return True

    def _table_products(self, value: str) -> list:
        """The ways to read ``value`` as a Mul of data by a table, ``(data, table,
        index)``: both orders, the data never a constant (which operand is the data
        depends on what is rotated)."""
        p = self.producer_of(value)
        if p is None or p.op_type != "Mul" or len(p.input) != 2:
            return []
        pairs = (tuple(p.input), tuple(p.input)[::-1])
        return [(d, t, self.producers[value]) for d, t in pairs if d not in self.fixed]

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

    def _last_axis_cut(self, node, rank: int, step: int = 1) -> tuple[int, int] | None:
        """``(start, end)`` of a Slice (opset 10 or later) of the last axis in steps of
        ``step``, clamped to its size, or None."""
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
        if len(starts) != 1 or int(axes[0]) % rank != rank - 1 or int(steps[0]) != step:
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
