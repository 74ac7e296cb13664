"""Pass: find equalization regions.

A region is a channel space shared by source layers (whose output channels get divided
by the scale) and sink layers (whose input channels get multiplied by it), connected only
through scalable activations, passthroughs, residual Adds and channel Concats, gates
(squeeze-and-excitation, gated MLPs), and the Transposes, Reshapes, attention MatMuls and
selections of positions (a class token) that move channels without mixing them. A norm's
affine is a source too. Values are joined with a union-find that records each value's
channel offset in its region, so a Concat places its inputs side by side and an Add lays
its inputs on top of each other.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ._ir import (
    LAYOUT_OPS,
    PASSTHROUGH_OPS,
    SCALABLE_ACTIVATIONS,
    Graph,
    Node,
    Value,
    same_shape,
)
from ._report import SkipRecord

_UNARY = SCALABLE_ACTIVATIONS | PASSTHROUGH_OPS
_TRANSPARENT = frozenset({"identity", "dropout"})
# Multi-input or channel-moving ops a region passes through (``mul`` by its first input).
_CARRY = frozenset({"add", "concat", "slice", "mul", "batchnorm"}) | LAYOUT_OPS


def _carried(node: Node) -> int | None:
    """Which input's channels a node passes to its output, for the ops whose other
    inputs must stay unscaled (a gate, attention's probabilities); None if none does."""
    if node.op in ("mul", "matmul"):
        return node.attrs.get("carrier", 0 if node.op == "mul" else None)
    if node.op in ("transpose", "reshape", "select", "repeat"):
        return 0 if node.outputs[0].channels is not None else None
    return 0


# Where a value's channels, or a sink's input columns, sit in their region: from an
# offset on, or (behind a repeat of channels, grouped-query attention's V heads) at the
# region channel each one copies.
Place = int | np.ndarray


def take(scales: np.ndarray, at: Place, n: int) -> np.ndarray:
    """The region's ``scales`` (last axis) of ``n`` channels placed at ``at``."""
    if isinstance(at, np.ndarray):
        return scales[..., at]
    return scales[..., at : at + n]


def gather_terms(size: int, at: Place, ranges: np.ndarray, c: np.ndarray):
    """Per-column ``ranges`` and weights ``c`` placed at ``at`` as ``(offset, ranges,
    c)`` over region channels: where several columns read one channel (copies behind a
    repeat), its largest range and the sum of their weights, since every copy is scaled
    as the channel is; an offset is kept as it is."""
    if not isinstance(at, np.ndarray):
        return at, ranges, c
    r, w = np.zeros(size), np.zeros(size)
    np.maximum.at(r, at, ranges)
    np.add.at(w, at, c)
    return 0, r, w


@dataclass
class Region:
    """Sources ``(layer, offset)``, sinks ``(layer, place, repeat)``, and the nodes in
    between; ``clips`` are bounded activations ``(node, offset)`` whose bounds must be
    carried, ``affines`` batch norms that could not be folded, carried the same way.
    A sink's place (and a value's, in ``values``) is an offset, or an array of the
    region channel each of its input columns reads (:data:`Place`)."""

    id: int
    size: int
    kind: str
    sources: list[tuple[Node, int]] = field(default_factory=list)
    sinks: list[tuple[Node, int, int]] = field(default_factory=list)
    clips: list[tuple[Node, int]] = field(default_factory=list)
    affines: list[tuple[Node, int]] = field(default_factory=list)
    through: list[Node] = field(default_factory=list)
    values: dict[str, Place] = field(default_factory=dict)  # value name -> channel place

    def describe(self) -> str:
        return _describe([n for n, _ in self.sources], [n for n, *_ in self.sinks])


def _describe(sources, sinks) -> str:
    def names(nodes):
        return ", ".join(n.name for n in nodes) or "?"

    return f"{names(sources)} -> {names(sinks)}"


class _OffsetUnionFind:
    """Union-find over values where each value sits at an offset within its root."""

    def __init__(self) -> None:
        self.parent: dict[int, int] = {}
        self.offset: dict[int, int] = {}
        self.conflict: set[int] = set()

    def find(self, key: int) -> tuple[int, int]:
        if key not in self.parent:
            self.parent[key], self.offset[key] = key, 0
            return key, 0
        path = []
        while self.parent[key] != key:
            path.append(key)
            key = self.parent[key]
        root, total = key, 0
        for k in reversed(path):  # compress, accumulating offsets from the root down
            total += self.offset[k]
            self.parent[k], self.offset[k] = root, total
        return root, (self.offset[path[0]] if path else 0)

    def union(self, a: int, b: int, shift: int) -> None:
        """Channel ``j`` of ``a`` is channel ``j + shift`` of ``b``."""
        ra, oa = self.find(a)
        rb, ob = self.find(b)
        if ra == rb:
            if oa != ob + shift:
                self.conflict.add(ra)
            return
        self.parent[ra], self.offset[ra] = rb, ob + shift - oa
        if ra in self.conflict:
            self.conflict.add(rb)


def find_regions(graph: Graph, shared: dict[int, str]) -> tuple[list[Region], list[SkipRecord]]:
    """All valid regions, and a skip record for every invalid candidate that touches a
    layer (with the reason that breaks it)."""
    uf = _OffsetUnionFind()
    values: dict[int, Value] = {id(v): v for v in graph.values.values()}
    copies: list[Node] = []  # nodes whose output's channels copy the input's by a map
    for node in graph.nodes:
        if "channel_map" in node.attrs:
            copies.append(node)
        elif node.op in _UNARY:
            uf.union(id(node.inputs[0]), id(node.outputs[0]), 0)
        elif node.op == "add":
            for v in node.inputs:
                uf.union(id(v), id(node.outputs[0]), 0)
        elif node.op == "slice":  # channel j of the output is channel offset + j
            uf.union(id(node.outputs[0]), id(node.inputs[0]), int(node.attrs["offset"]))
        elif node.op == "mul" or node.op in LAYOUT_OPS:
            # one input's channels carry to the output (a gate or attention's weights
            # stay unscaled; a reshape that mixes channels carries none)
            carried = _carried(node)
            if carried is not None:
                uf.union(id(node.inputs[carried]), id(node.outputs[0]), 0)
        elif node.op == "batchnorm":  # one that could not be folded: a per-channel affine
            uf.union(id(node.inputs[0]), id(node.outputs[0]), 0)
        elif node.op == "concat" and all(v.channels is not None for v in node.inputs):
            offset = 0
            for v in node.inputs:
                uf.union(id(v), id(node.outputs[0]), offset)
                offset += v.channels
    components: dict[int, list[tuple[Value, Place]]] = {}
    for key, value in values.items():
        root, off = uf.find(key)
        components.setdefault(root, []).append((value, off))
    # The channels behind a repeat are the input's, read through the map: their
    # component joins the input's, each value placed at the channels it copies.
    for node in reversed(copies):  # the last first: a repeat of a repeat joins in order
        src_root, src_off = uf.find(id(node.inputs[0]))
        root, off = uf.find(id(node.outputs[0]))
        if root == src_root or src_root not in components:
            uf.conflict.add(root)  # its channels reach back to the input otherwise too
            continue
        index = src_off + np.asarray(node.attrs["channel_map"], np.int64)
        for value, place in components.pop(root, []):
            components[src_root].append((value, _through(index, place, off, value)))

    outputs = {id(v) for v in graph.outputs}
    order = {id(n): i for i, n in enumerate(graph.nodes)}
    regions: list[Region] = []
    skips: list[SkipRecord] = []
    for root, members in components.items():
        region, reason = _build(members, outputs, shared, root in uf.conflict)
        if region is None:
            continue
        if reason is not None:
            skips.append(SkipRecord("scale", region.describe(), reason))
            continue
        regions.append(region)
    regions.sort(key=lambda r: min(order[id(n)] for n, _ in r.sources))
    for i, region in enumerate(regions):
        region.id = i
    return regions, skips


def _through(index: np.ndarray, place: Place, origin: int, value: Value) -> Place | None:
    """The place of ``value`` (at ``place`` in the component of a repeat's output, which
    sits at ``origin`` there) in the component of the repeat's input, reached through
    the repeat's ``index``; None where it is not within the repeat's output."""
    n = value.channels or 0
    if isinstance(place, np.ndarray):
        at = place - origin
        return index[at] if at.size and 0 <= at.min() and at.max() < len(index) else None
    start = place - origin
    return index[start : start + n] if 0 <= start and start + n <= len(index) else None


def _build(members, outputs, shared, conflict) -> tuple[Region | None, str | None]:
    """Assemble one component. Returns ``(None, None)`` when it touches no layer."""
    base = min((off for _, off in members if isinstance(off, int)), default=0)
    region = Region(id=-1, size=0, kind="pair")
    reasons: list[str] = []
    seen_nodes: set[int] = set()
    touches_layer = False
    for value, off in members:
        copied = isinstance(off, np.ndarray)  # behind a repeat of channels
        if off is None:
            reasons.append(f"{value.name!r} joins repeated channels with others")
            continue
        off -= base
        if value.channels is None:
            p = value.producer
            why = p.attrs.get("layout_why") if p is not None else None
            if why:
                reasons.append(f"{p.describe()} moves the channels: {why}")
            else:
                reasons.append(f"the channel count of {value.name!r} is unknown")
            continue
        region.size = max(region.size, int(off.max()) + 1 if copied else off + value.channels)
        region.values[value.name] = off
        producer = value.producer
        if producer is None:
            reasons.append(f"it reaches graph input {value.name!r}")
        elif copied and (producer.is_layer or producer.op in ("norm", "clip", "batchnorm")):
            reasons.append(f"{producer.describe()} writes into repeated channels")
        elif producer.is_layer or producer.op == "norm":
            touches_layer = True
            blocker = shared.get(id(producer))
            if blocker:
                reasons.append(blocker)
            region.sources.append((producer, off))
        elif producer.op in _UNARY or producer.op in _CARRY:
            if id(producer) not in seen_nodes:
                seen_nodes.add(id(producer))
                region.through.append(producer)
                if producer.op == "clip":
                    region.clips.append((producer, off))
                elif producer.op == "batchnorm":
                    region.affines.append((producer, off))
        else:
            reasons.append(f"it is produced by {producer.describe()}")
        if id(value) in outputs:
            reasons.append(f"{value.name!r} is a graph output")
        for reader, index in value.uses:
            if reader.op == "concat" and any(v.channels is None for v in reader.inputs):
                reasons.append(f"{reader.name} concatenates values of unknown width")
            elif reader.is_layer and index == 0:
                touches_layer = True
                blocker = shared.get(id(reader)) or _axis_blocker(reader, value)
                if blocker:
                    reasons.append(blocker)
                region.sinks.append((reader, off, 1))
            elif reader.op == "mul" or reader.op in LAYOUT_OPS:
                if _carried(reader) != index:
                    # a gate or attention's weights stay as they are; a reshape that
                    # mixes the channels ends the region
                    why = reader.attrs.get("layout_why")
                    reasons.append(
                        f"{value.name!r} is read by {reader.describe()}"
                        + (f": {why}" if why else ", which it does not carry")
                    )
            elif reader.op in _UNARY or reader.op in _CARRY:
                continue
            elif reader.op == "norm":
                reasons.append(
                    f"{value.name!r} is normalized by {reader.describe()} (a normalization "
                    "does not commute with per-channel scales)"
                )
            elif reader.op == "flatten" and copied:
                reasons.append(f"repeated channels are flattened by {reader.describe()}")
            elif reader.op == "flatten":
                touches_layer = True
                reasons.extend(_flatten_sinks(reader, value, off, region, shared))
            else:
                reasons.append(f"{value.name!r} is read by {reader.describe()}")
    if not touches_layer:
        return None, None
    if conflict:
        reasons.append("a value appears at two different channel offsets")
    if not reasons:
        reasons.extend(_coverage_gaps(region))
    ops = {n.op for n in region.through}
    if any(n.op == "norm" for n, _ in region.sources):
        region.kind = "norm"
    elif "matmul" in ops:
        region.kind = "attention"
    elif any(_elementwise_gate(n) for n in region.through):
        region.kind = "gated" if "add" not in ops else "residual"
    elif "concat" in ops:
        region.kind = "concat"
    elif "add" in ops:
        region.kind = "residual"
    elif len(region.sources) == 1 and len(region.sinks) == 1:
        region.kind = "pair"
    else:
        region.kind = "fan-out"
    if not region.sources:
        reasons.append("no layer produces it")
    if not region.sinks:
        reasons.append("no layer reads it")
    return region, (reasons[0] if reasons else None)


def _elementwise_gate(node: Node) -> bool:
    """A product of two activations of one shape (a gated MLP's ``up * act(gate)``)."""
    return node.op == "mul" and len(node.inputs) == 2 and same_shape(*node.inputs)


def _axis_blocker(layer: Node, value: Value) -> str | None:
    """Why ``layer`` does not read ``value``'s channels as its input channels (a Linear
    reads the last axis, a convolution axis 1), or None."""
    if value.rank is None:
        return None
    want = (value.rank - 1,) if layer.op == "linear" else (1,)
    if value.axes != want:
        return (
            f"{layer.name} reads axis {want[0]} of {value.name!r}, whose channels are on "
            f"axes {value.axes}"
        )
    return None


def _flatten_sinks(flatten: Node, value: Value, off: int, region: Region, shared) -> list[str]:
    """Linear layers behind a Flatten read channel ``c`` as ``repeat`` features."""
    reasons = []
    stack = [flatten.outputs[0]]
    while stack:
        v = stack.pop()
        if v.producer is not None and v.producer.op in _TRANSPARENT:
            region.through.append(v.producer)
        for reader, index in v.uses:
            if reader.op in _TRANSPARENT:
                stack.append(reader.outputs[0])
            elif reader.op == "linear" and index == 0:
                blocker = shared.get(id(reader))
                features = reader.in_channels
                if blocker:
                    reasons.append(blocker)
                elif features % value.channels:
                    reasons.append(
                        f"{reader.name} has {features} inputs, not a multiple of "
                        f"{value.channels} channels"
                    )
                else:
                    region.sinks.append((reader, off, features // value.channels))
            else:
                reasons.append(f"flattened {value.name!r} is read by {reader.describe()}")
    region.through.append(flatten)
    return reasons


def _coverage_gaps(region: Region) -> list[str]:
    has_src = [False] * region.size
    has_sink = [False] * region.size
    for node, off in region.sources:
        for i in range(off, off + node.out_channels):
            has_src[i] = True
    for node, off, repeat in region.sinks:
        if isinstance(off, np.ndarray):
            for i in off.tolist():
                has_sink[i] = True
            continue
        for i in range(off, off + node.in_channels // repeat):
            has_sink[i] = True
    if not all(has_src):
        return [f"channel {has_src.index(False)} has no source layer"]
    if not all(has_sink):
        return [f"channel {has_sink.index(False)} has no sink layer"]
    return []
