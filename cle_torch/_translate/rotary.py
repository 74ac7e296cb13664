"""Rotary position embeddings as one IR ``rotary`` node each: ``x * cos + rotate_half(x) *
sin`` as LLaMA and Hugging Face write it, with ``rotate_half(x) = torch.cat((-x2, x1),
dim=-1)`` of the halves ``x1, x2 = x.chunk(2, dim=-1)`` (or ``x[..., :h]``,
``x[..., h:]``), or GPT-J's ``rotate_every_two(x) = torch.stack((-x2, x1),
dim=-1).flatten(-2)`` of ``x1, x2 = x[..., ::2], x[..., 1::2]`` (pairs ``(2i, 2i +
1)``), the products in either order, and ``cos`` / ``sin`` tables of the model (buffers
or constants) or computed in forward from buffers, constants, shapes and integer inputs
alone (Hugging Face's ``LlamaRotaryEmbedding``: ``inv_freq`` times the positions,
``torch.arange(T)`` or a ``position_ids`` input). The core ties the two channels of each
rotated pair to one scale, which keeps ``q k^T`` (see :mod:`cle_core._regions`); with one
scale a pair, any per-position 2 x 2 map of the pair commutes with it, so the scales are
exact whatever the tables are: for every sequence length and positions. The IR's tables
(which the executor and the statistics read) are those of the example input's run.

Only that form becomes a ``rotary``, and only where no intermediate tensor is read
outside it; anything else is translated op by op (and stays opaque). A mixin of
``_Translator`` (``translator.py``); :func:`find_rotaries` is the matcher, run over the
FX graph before the walk, as :func:`.norms.find_norms` is.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.fx as fx
from torch import nn

from cle_core.toolkit import rotary_table_misfit

from .._optable import _SHAPE_ATTRS, _Opaque

_MUL = (operator.mul, torch.mul)
_ADD = (operator.add, torch.add)
_NEG = (operator.neg, torch.neg)


@dataclass
class RotaryMatch:
    """A rotary embedding ending at an FX node: its input, its tables (FX nodes that do
    not depend on the input), and every node of it (the tables' aside)."""

    x: fx.Node
    cos: fx.Node
    sin: fx.Node
    nodes: set[fx.Node]
    interleaved: bool = False  # pairs (2i, 2i + 1), else (d, d + D/2)
    # the nodes that compute the tables and are read by nothing else (not translated)
    inside: set[fx.Node] = field(default_factory=set)


class _NoMatch(Exception):
    pass


def _call(n: Any, functions, method: str) -> list | None:
    """The operands of ``n`` if it calls one of ``functions`` (or the tensor method
    ``method``) with positional operands only, else None."""
    if not isinstance(n, fx.Node) or n.kwargs:
        return None
    if n.op == "call_function" and n.target in functions:
        return list(n.args)
    if n.op == "call_method" and n.target == method:
        return list(n.args)
    return None


def _table(n: Any) -> bool:
    return isinstance(n, fx.Node) and n.op == "get_attr"


def _products(n: Any) -> list[tuple[fx.Node, fx.Node]]:
    """The ways to read ``n`` as ``data * table``: both orders of its operands, but a
    ``get_attr`` is never the data (which of the two is depends on what is rotated)."""
    args = _call(n, _MUL, "mul")
    if args is None or len(args) != 2 or not all(isinstance(a, fx.Node) for a in args):
        raise _NoMatch
    a, b = args
    return [(d, t) for d, t in ((a, b), (b, a)) if not _table(d)]


def _shape_read(n: fx.Node) -> bool:
    """``x.shape``, ``x.dtype``, ``x.device`` ..., ``x.size()``, ``x.dim()``: what they
    read of ``x`` is not its values."""
    if n.op == "call_function" and n.target is getattr:
        return len(n.args) > 1 and n.args[1] in _SHAPE_ATTRS
    return n.op == "call_method" and n.target in ("size", "dim")


def table_nodes(table: fx.Node) -> set[fx.Node]:
    """The nodes ``table`` is computed from, itself included; a shape read is one of
    them, not the tensor it reads."""
    seen, todo = {table}, [table]
    while todo:
        n = todo.pop()
        if _shape_read(n):
            continue
        for a in n.all_input_nodes:
            if a not in seen:
                seen.add(a)
                todo.append(a)
    return seen


def _last_dim(dim: Any, rank: int | None) -> bool:
    return dim == -1 or (rank is not None and dim == rank - 1)


def _halves(first: fx.Node, second: fx.Node, shapes: dict) -> tuple[fx.Node, set]:
    """``x`` where ``first, second`` are its halves along the last axis: the two items of
    ``x.chunk(2, dim=-1)``, or ``x[..., :h]`` and ``x[..., h:]`` (``h`` a number, or
    computed from the shape as Hugging Face writes it, ``x.shape[-1] // 2``: the sizes of
    the example run say what it is); and their nodes."""
    _items(first, second)
    a, b = first.args, second.args
    if a[0] is b[0] and a[1] == 0 and b[1] == 1:  # two items of one chunk
        chunk = a[0]
        if not (isinstance(chunk, fx.Node) and chunk.op in ("call_method", "call_function")):
            raise _NoMatch
        if chunk.target not in ("chunk", torch.chunk):
            raise _NoMatch
        args = list(chunk.args) + [
            chunk.kwargs.get(k) for k in ("chunks", "dim") if k in chunk.kwargs
        ]
        if len(args) != 3 or args[1] != 2 or not _last_dim(args[2], _rank(shapes, args[0])):
            raise _NoMatch
        return args[0], {first, second, chunk}
    x = a[0]
    if b[0] is not x or not isinstance(x, fx.Node):
        raise _NoMatch
    lo, hi = _last_slice(a[1]), _last_slice(b[1])
    if lo is None or hi is None or lo.start not in (None, 0) or hi.stop is not None:
        raise _NoMatch
    if lo.step not in (None, 1) or hi.step not in (None, 1):
        raise _NoMatch
    # a prefix and a suffix of the last axis, each half of it long
    size = _last_size(shapes, x)
    ends = [_last_size(shapes, n) for n in (first, second)]
    if not isinstance(size, int) or size % 2 or ends != [size // 2] * 2:
        raise _NoMatch
    return x, {first, second}


def _items(*nodes: fx.Node) -> None:
    """Each of ``nodes`` an index ``x[...]`` (with positional operands), else no match."""
    for n in nodes:
        if not (n.op == "call_function" and n.target is operator.getitem and not n.kwargs):
            raise _NoMatch


def _last_size(shapes: dict, n: fx.Node) -> int | None:
    """The size of the last axis of ``n``'s tensor in the example run, where known."""
    return (shapes.get(n.name) or (None,))[-1]


def _rank(shapes: dict, x: Any) -> int | None:
    shape = shapes.get(x.name) if isinstance(x, fx.Node) else None
    return None if shape is None else len(shape)


def _last_slice(index: Any, rank: int | None = None) -> slice | None:
    """The slice of ``x[..., s]`` (or ``x[:, :, :, s]``, every other axis whole, of a
    rank-``rank`` tensor), else None."""
    if not isinstance(index, tuple) or not index or not isinstance(index[-1], slice):
        return None
    whole = slice(None)
    if len(index) == 2 and index[0] is Ellipsis:
        return index[-1]
    if rank is not None and len(index) == rank and all(a == whole for a in index[:-1]):
        return index[-1]
    return None


def _every_two(first: fx.Node, second: fx.Node, shapes: dict) -> tuple[fx.Node, set]:
    """``x`` where ``first, second`` are ``x[..., ::2]`` and ``x[..., 1::2]`` (GPT-J's
    rotate_every_two); and their nodes."""
    _items(first, second)
    x = first.args[0]
    if second.args[0] is not x or not isinstance(x, fx.Node):
        raise _NoMatch
    rank = _rank(shapes, x)
    even, odd = _last_slice(first.args[1], rank), _last_slice(second.args[1], rank)
    if even != slice(None, None, 2) or odd != slice(1, None, 2):
        raise _NoMatch
    size = _last_size(shapes, x)
    if not isinstance(size, int) or size % 2:
        raise _NoMatch
    return x, {first, second}


def _pair(tensors: Any) -> tuple[fx.Node, fx.Node, fx.Node] | None:
    """``(neg, x2, x1)`` of ``(-x2, x1)``, else None."""
    if not isinstance(tensors, (tuple, list)) or len(tensors) != 2:
        return None
    neg, x1 = tensors
    args = _call(neg, _NEG, "neg")
    if args is None or len(args) != 1 or not isinstance(x1, fx.Node):
        return None
    return neg, args[0], x1


def _rotated(r: fx.Node, x: fx.Node, shapes: dict) -> tuple[set, bool]:
    """The nodes of ``rotate(x)`` ending at ``r`` and whether its pairs are interleaved:
    ``torch.cat((-x2, x1), dim=-1)`` of the halves, or ``torch.stack((-x2, x1),
    dim=-1).flatten(-2)`` of the even and odd positions."""
    interleaved, nodes = False, {r}
    flat = _call(r, (torch.flatten,), "flatten")
    if flat is not None:
        if len(flat) != 2 or flat[1] != -2 or not isinstance(flat[0], fx.Node):
            raise _NoMatch
        interleaved, r = True, flat[0]
        nodes.add(r)
        if not (r.op == "call_function" and r.target is torch.stack):
            raise _NoMatch
    elif not (r.op == "call_function" and r.target is torch.cat):
        raise _NoMatch
    args = list(r.args) + [r.kwargs[k] for k in ("tensors", "dim") if k in r.kwargs]
    found = _pair(args[0]) if args else None
    rank = _rank(shapes, x)
    if rank is not None and interleaved:
        rank += 1  # (the stack's new last axis)
    if found is None or len(args) != 2 or not _last_dim(args[1], rank):
        raise _NoMatch
    neg, x2, x1 = found
    source, parts = (_every_two if interleaved else _halves)(x1, x2, shapes)
    if source is not x:
        raise _NoMatch
    return {*nodes, neg, *parts}, interleaved


def _match(add: fx.Node, shapes: dict) -> RotaryMatch:
    args = _call(add, _ADD, "add")
    if args is None or len(args) != 2:
        raise _NoMatch
    for straight, rotated in (args, args[::-1]):
        try:
            ways = [(a, b) for a in _products(straight) for b in _products(rotated)]
        except _NoMatch:
            continue
        for (x, cos), (r, sin) in ways:
            try:
                nodes, interleaved = _rotated(r, x, shapes)
            except _NoMatch:
                continue
            # the tables must not depend on what they rotate (angles of the data)
            if any(x in table_nodes(t) for t in (cos, sin)):
                continue
            return RotaryMatch(x, cos, sin, {add, straight, rotated, *nodes}, interleaved)
    raise _NoMatch


def find_rotaries(
    graph: fx.Graph, shapes: dict, parameter: Callable[[str], bool] = lambda target: False
) -> dict[str, RotaryMatch]:
    """The rotary embeddings of ``graph`` by the name of their last node (the Add), where
    no intermediate is read outside them. ``shapes``: the shape of each node's tensor in
    the example run, where known; ``parameter``: whether a ``get_attr`` target is a
    parameter of the model."""
    found: dict[str, RotaryMatch] = {}
    for node in graph.nodes:
        try:
            match = _match(node, shapes)
        except _NoMatch:
            continue
        if any(set(n.users) - match.nodes for n in match.nodes - {node}):
            continue  # an intermediate is read elsewhere
        found[node.name] = match

    # The nodes that compute tables in forward and that nothing else reads are the
    # rotaries' own (their values are computed from the example run, see
    # Rotary.table): users first, so that a node whose users are all inside is too.
    # Not those of a table computed by a layer or from a parameter (refused): they are
    # translated, so that what they read stays read in the IR.
    def own(nodes: set[fx.Node]) -> bool:
        return not any(
            n.op == "call_module" or (n.op == "get_attr" and parameter(n.target)) for n in nodes
        )

    computed = {
        n
        for m in found.values()
        for t in (m.cos, m.sin)
        if not _table(t)
        for nodes in [table_nodes(t)]
        if own(nodes)
        for n in nodes
        if n.op in ("call_function", "call_method")
    }
    rotary_nodes = {n for m in found.values() for n in m.nodes}
    inside: set[fx.Node] = set()
    for n in reversed(graph.nodes):
        if n in computed and set(n.users) <= inside | rotary_nodes:
            inside.add(n)
    for m in found.values():
        m.inside = {n for t in (m.cos, m.sin) for n in table_nodes(t)} & inside
    return found


class Rotary:
    def rotary(self, node: fx.Node, match: RotaryMatch) -> None:
        """The rotary embedding that ``find_rotaries`` found ending at ``node``; where it
        cannot be one node, an opaque node of ``x`` (its intermediates are not
        translated)."""
        try:
            x = self.data(match.x)
            shape = self.fx_shapes.get(x.name)
            if shape is None:
                raise _Opaque("the shape of its input is not known: pass dummy_input")
            tables, ids = {}, {}
            for key, table in (("cos", match.cos), ("sin", match.sin)):
                if _table(table):
                    value = self.attr(table.target)
                    ids[key] = self.param_id(table.target)
                else:  # (one table is often every layer's: computed once)
                    if table.name not in self.table_values:
                        self.table_values[table.name] = self.table(key, table)
                    value = self.table_values[table.name]
                if not isinstance(value, torch.Tensor) or not value.is_floating_point():
                    raise _Opaque(f"its {key} is not a float tensor")
                tables[key] = _one_sample(key, value.detach().to(torch.float64).cpu(), shape)
            for key, table in tables.items():
                misfit = rotary_table_misfit(key, table.shape, shape)
                if misfit:
                    raise _Opaque(f"its {misfit}")
            self.emit(
                "rotary",
                node,
                [x],
                rank=self.rank.get(x.name),
                channels=self.chan.get(x.name),
                params=tables,
                attrs={"interleaved": match.interleaved},
                param_ids=ids,
            )
        except _Opaque as why:
            self.refused_match(node, match.x, "rotary embedding", why)

    def table(self, key: str, table: fx.Node) -> Any:
        """The value of a table computed in forward, as the example run computed it: its
        nodes run again on the model's buffers and constants, the integer inputs given
        in ``dummy_input`` and, for the shapes they read, stand-ins of the example run's
        shapes and dtypes. Refused where it depends on anything else: a float input, a
        parameter (equalization may scale it), a layer."""
        computed = table_nodes(table)
        nodes = [n for n in table.graph.nodes if n in computed]  # in graph order
        example = self.example.get("shapes") or {}
        inputs = self.example.get("inputs")
        placeholders = [n for n in table.graph.nodes if n.op == "placeholder"]
        env: dict[str, Any] = {}
        layer = next((n for n in nodes if n.op == "call_module"), None)
        if layer is not None:  # (what it reads is data: say so before the input it reaches)
            raise _Opaque(f"its {key} is computed by the layer {layer.target!r} ({layer.name})")
        for n in nodes:
            if n.op == "get_attr":
                value = self.attr(n.target)
                if isinstance(value, nn.Parameter):
                    raise _Opaque(
                        f"its {key} is computed from the parameter {n.target!r} ({n.name}), "
                        "which equalization may scale"
                    )
                env[n.name] = value
            elif n.op == "placeholder":
                dtype = self.cap.dtypes.get(n.name)
                if dtype is None or dtype.is_floating_point or dtype.is_complex:
                    raise _Opaque(
                        f"its {key} is computed from the input {n.name!r}, not an integer "
                        "one: only buffers, constants, shapes and integer positions are"
                    )
                if inputs is None:
                    raise _Opaque(
                        f"its {key} is computed from the input {n.name!r}: pass dummy_input"
                    )
                env[n.name] = inputs[placeholders.index(n)]
            elif _shape_read(n) and n.args[0].name not in env:
                # a stand-in of the example run's shape and dtype (no values, no memory)
                src = n.args[0]
                size, dtype = example.get(src.name), self.cap.dtypes.get(src.name)
                if size is None or dtype is None:
                    raise _Opaque(f"its {key} reads the shape of {src.name}, which is not known")
                device = next((t.device for t in self.model.parameters()), None)
                env[src.name] = torch.zeros((), dtype=dtype, device=device).expand(size)
        try:
            with torch.no_grad():
                for n in nodes:
                    if n.op not in ("call_function", "call_method"):
                        continue
                    args = fx.node.map_arg(n.args, lambda a: env[a.name])
                    kwargs = fx.node.map_arg(n.kwargs, lambda a: env[a.name])
                    if n.op == "call_function":
                        env[n.name] = n.target(*args, **kwargs)
                    else:
                        env[n.name] = getattr(args[0], n.target)(*args[1:], **kwargs)
        except Exception as exc:
            raise _Opaque(f"its {key} could not be computed again ({n.name}: {exc})") from exc
        return env[table.name]


def _one_sample(key: str, table: torch.Tensor, shape: tuple) -> np.ndarray:
    """``table`` with one entry on each axis of the input's that follows the batch
    (``position_ids`` of the example's batch give a table per sample): the IR holds
    one, which must be the same for every sample."""
    out = table
    for axis in range(1, min(table.dim(), len(shape)) + 1):
        if shape[-axis] is None and out.shape[-axis] > 1:
            first = out.narrow(-axis, 0, 1)
            if not torch.equal(out, first.expand_as(out)):
                raise _Opaque(
                    f"its {key} differs between the samples of the example batch (positions "
                    "per sample): the IR holds one table for them all"
                )
            out = first
    return out.numpy()
