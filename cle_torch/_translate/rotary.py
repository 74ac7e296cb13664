"""Rotary position embeddings as one IR ``rotary`` node each: ``x * cos + rotate_half(x) *
sin`` as LLaMA and Hugging Face write it, with ``rotate_half(x) = torch.cat((-x2, x1),
dim=-1)`` of the halves ``x1, x2 = x.chunk(2, dim=-1)`` (or ``x[..., :h]``,
``x[..., h:]``), or GPT-J's ``rotate_every_two(x) = torch.stack((-x2, x1),
dim=-1).flatten(-2)`` of ``x1, x2 = x[..., ::2], x[..., 1::2]`` (pairs ``(2i, 2i +
1)``), the products in either order, and ``cos`` / ``sin`` tables of the model (buffers
or constants). The core ties the two channels of each rotated pair to one
scale, which keeps ``q k^T`` (see :mod:`cle_core._regions`).

Only that form becomes a ``rotary``, and only where no intermediate tensor is read
outside it; anything else is translated op by op (and stays opaque). A mixin of
``_Translator`` (``translator.py``); :func:`find_rotaries` is the matcher, run over the
FX graph before the walk, as :func:`.norms.find_norms` is.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.fx as fx

from .._optable import _Opaque

_MUL = (operator.mul, torch.mul)
_ADD = (operator.add, torch.add)
_NEG = (operator.neg, torch.neg)


@dataclass
class RotaryMatch:
    """A rotary embedding ending at an FX node: its input, its tables (``get_attr``
    nodes), and every node of it (the tables' aside)."""

    x: fx.Node
    cos: fx.Node
    sin: fx.Node
    nodes: set[fx.Node]
    interleaved: bool = False  # pairs (2i, 2i + 1), else (d, d + D/2)


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


def _product(n: Any) -> tuple[fx.Node, fx.Node]:
    """``(data, table)`` of ``data * table`` in either order."""
    args = _call(n, _MUL, "mul")
    if args is None or len(args) != 2:
        raise _NoMatch
    a, b = args
    if _table(b) and isinstance(a, fx.Node) and not _table(a):
        return a, b
    if _table(a) and isinstance(b, fx.Node) and not _table(b):
        return b, a
    raise _NoMatch


def _last_dim(dim: Any, rank: int | None) -> bool:
    return dim == -1 or (rank is not None and dim == rank - 1)


def _halves(first: fx.Node, second: fx.Node, shapes: dict) -> tuple[fx.Node, set]:
    """``x`` where ``first, second`` are its halves along the last axis: the two items of
    ``x.chunk(2, dim=-1)``, or ``x[..., :h]`` and ``x[..., h:]`` (``h`` a number, or
    computed from the shape as Hugging Face writes it, ``x.shape[-1] // 2``: the sizes of
    the example run say what it is); and their nodes."""
    for n in (first, second):
        if not (n.op == "call_function" and n.target is operator.getitem and not n.kwargs):
            raise _NoMatch
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
    size = (shapes.get(x.name) or (None,))[-1]
    ends = [(shapes.get(n.name) or (None,))[-1] for n in (first, second)]
    if not isinstance(size, int) or size % 2 or ends != [size // 2] * 2:
        raise _NoMatch
    return x, {first, second}


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
    for n in (first, second):
        if not (n.op == "call_function" and n.target is operator.getitem and not n.kwargs):
            raise _NoMatch
    x = first.args[0]
    if second.args[0] is not x or not isinstance(x, fx.Node):
        raise _NoMatch
    rank = _rank(shapes, x)
    even, odd = _last_slice(first.args[1], rank), _last_slice(second.args[1], rank)
    if even != slice(None, None, 2) or odd != slice(1, None, 2):
        raise _NoMatch
    size = (shapes.get(x.name) or (None,))[-1]
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
            x, cos = _product(straight)
            r, sin = _product(rotated)
            nodes, interleaved = _rotated(r, x, shapes)
        except _NoMatch:
            continue
        return RotaryMatch(x, cos, sin, {add, straight, rotated, *nodes}, interleaved)
    raise _NoMatch


def find_rotaries(graph: fx.Graph, shapes: dict) -> dict[str, RotaryMatch]:
    """The rotary embeddings of ``graph`` by the name of their last node (the Add), where
    no intermediate is read outside them. ``shapes``: the shape of each node's tensor in
    the example run, where known."""
    found: dict[str, RotaryMatch] = {}
    for node in graph.nodes:
        try:
            match = _match(node, shapes)
        except _NoMatch:
            continue
        if any(set(n.users) - match.nodes for n in match.nodes - {node}):
            continue  # an intermediate is read elsewhere
        found[node.name] = match
    return found


class Rotary:
    def rotary(self, node: fx.Node, match: RotaryMatch) -> None:
        """The rotary embedding that ``find_rotaries`` found ending at ``node``; where it
        cannot be one node, an opaque node of ``x`` (its intermediates are not
        translated)."""
        try:
            x = self.data(match.x)
            tables, ids = {}, {}
            for key, table in (("cos", match.cos), ("sin", match.sin)):
                value = self.attr(table.target)
                if not isinstance(value, torch.Tensor) or not value.is_floating_point():
                    raise _Opaque(f"its {key} is not a float tensor")
                tables[key] = value.detach().to(torch.float64).cpu().numpy()
                ids[key] = self.param_id(table.target)
            shape = self.fx_shapes.get(x.name)
            if shape is None:
                raise _Opaque("the shape of its input is not known: pass dummy_input")
            known = tuple(1 if d is None else d for d in shape)
            for key, table in tables.items():
                try:
                    fits = (
                        table.ndim <= len(known)
                        and np.broadcast_shapes(table.shape, known) == known
                    )
                except ValueError:
                    fits = False
                if not fits:
                    raise _Opaque(f"its {key} {table.shape} does not broadcast to {tuple(shape)}")
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
            inputs = [match.x] if match.x.name in self.values else []
            self.emit(
                "opaque",
                node,
                inputs,
                rank=None,
                channels=None,
                attrs={"kind": "rotary embedding", "why": str(why), "channels": None},
            )
