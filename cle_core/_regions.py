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
from ._layout import rotary_partners
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


def tie(scales: np.ndarray, ties: np.ndarray | None, log: bool = False) -> np.ndarray:
    """``scales`` (last axis: a region's channels) with each group of ``ties`` (see
    :attr:`Region.ties`) at its geometric mean, or its mean where ``log`` (log-scales).
    Scales already tied are returned as they are, so tying is idempotent to the bit."""
    if ties is None:
        return scales
    x = np.asarray(scales, np.float64)
    if np.array_equal(x, x[..., ties]):
        return scales
    flat = x.reshape(-1, x.shape[-1])
    t = flat if log else np.log(flat)
    sums = np.zeros_like(t)
    np.add.at(sums, (slice(None), ties), t)
    mean = (sums / np.maximum(np.bincount(ties, minlength=t.shape[1]), 1))[:, ties]
    return (mean if log else np.exp(mean)).reshape(x.shape)


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
    # Channels kept at scale 1 whatever the objective chooses (None: none): a part of the
    # region that cannot be scaled, behind a channel slice or map (see find_regions).
    frozen: np.ndarray | None = None
    # A Q -> K region (kind "qk"): layers whose output rows are multiplied by the scales
    # (q, ``(layer, place)``), where the source (k) divides its rows, and the values
    # between q and ``Q K^T``, multiplied too (name -> place); see _qk_regions.
    rows: list[tuple[Node, Place]] = field(default_factory=list)
    inverse: dict[str, Place] = field(default_factory=dict)
    # Channels that must share one scale (None: none): per channel, the lowest channel
    # of its group. A rotary embedding between a projection and Q K^T mixes each pair of
    # channels it rotates, which a scale commutes with only where both take one scale
    # (see :func:`tie`).
    ties: np.ndarray | None = None

    def describe(self) -> str:
        readers = [n for n, *_ in self.sinks] + [n for n, _ in self.rows]
        return _describe([n for n, _ in self.sources], readers)


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
    # Parts: the values joined otherwise than through a channel slice or a channel map.
    # A part that holds no source and cannot be scaled keeps its channels at scale 1
    # (the q and k cut from a packed projection, which meet in Q K^T), the rest of its
    # region is equalized.
    parts = _OffsetUnionFind()

    def join(a: Value, b: Value, shift: int, part: bool = True) -> None:
        uf.union(id(a), id(b), shift)
        if part:
            parts.union(id(a), id(b), 0)

    values: dict[int, Value] = {id(v): v for v in graph.values.values()}
    copies: list[Node] = []  # nodes whose output's channels copy the input's by a map
    for node in graph.nodes:
        if "channel_map" in node.attrs:
            copies.append(node)
        elif node.op in _UNARY:
            join(node.inputs[0], node.outputs[0], 0)
        elif node.op == "add":
            for v in node.inputs:
                join(v, node.outputs[0], 0)
        elif node.op == "slice":  # channel j of the output is channel offset + j
            join(node.outputs[0], node.inputs[0], int(node.attrs["offset"]), part=False)
        elif node.op == "mul" or node.op in LAYOUT_OPS:
            # one input's channels carry to the output (a gate or attention's weights
            # stay unscaled; a reshape that mixes channels carries none)
            carried = _carried(node)
            if carried is not None:
                join(node.inputs[carried], node.outputs[0], 0)
        elif node.op == "batchnorm":  # one that could not be folded: a per-channel affine
            join(node.inputs[0], node.outputs[0], 0)
        elif node.op == "concat" and all(v.channels is not None for v in node.inputs):
            offset = 0
            for v in node.inputs:
                join(v, node.outputs[0], offset)
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
    regions, skips, claimed = _qk_regions(graph, shared, outputs)
    part_of = {key: parts.find(key)[0] for key in values}
    for root, members in components.items():
        if any(id(value) in claimed for value, _ in members):
            continue  # q's or k's values, up to Q K^T: a Q -> K region
        region, reason, kept = _build(members, outputs, shared, root in uf.conflict, part_of)
        if region is None:
            continue
        if reason is not None:
            skips.append(SkipRecord("scale", region.describe(), reason))
            continue
        for channels, why in kept:
            skips.append(SkipRecord("scale", f"{region.describe()} ({channels})", why))
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


def _build(members, outputs, shared, conflict, part_of):
    """Assemble one component: ``(region, reason it is refused or None, [(channels,
    reason)] of the parts kept at scale 1)``; ``(None, None, [])`` when it touches no
    layer."""
    base = min((off for _, off in members if isinstance(off, int)), default=0)
    region = Region(id=-1, size=0, kind="pair")
    reasons: list[tuple[int | None, str]] = []  # (part, why); part None: the region's
    placed: dict[int | None, list[tuple[Place, int]]] = {}  # part -> its values' places
    with_source: set[int | None] = set()
    part = None

    def note(why: str) -> None:
        reasons.append((part, why))

    seen_nodes: set[int] = set()
    touches_layer = False
    for value, off in members:
        copied = isinstance(off, np.ndarray)  # behind a repeat of channels
        part = part_of[id(value)]
        if off is None:
            reasons.append((None, f"{value.name!r} joins repeated channels with others"))
            continue
        off -= base
        if value.channels is None:
            part = None  # (not placed: its part cannot be kept at scale 1)
            p = value.producer
            why = p.attrs.get("layout_why") if p is not None else None
            if why:
                note(f"{p.describe()} moves the channels: {why}")
            else:
                note(f"the channel count of {value.name!r} is unknown")
            continue
        region.size = max(region.size, int(off.max()) + 1 if copied else off + value.channels)
        region.values[value.name] = off
        placed.setdefault(part, []).append((off, value.channels))
        producer = value.producer
        if producer is None:
            note(f"it reaches graph input {value.name!r}")
        elif copied and (producer.is_layer or producer.op in ("norm", "clip", "batchnorm")):
            note(f"{producer.describe()} writes into repeated channels")
        elif producer.is_layer or producer.op == "norm":
            touches_layer = True
            with_source.add(part)
            blocker = shared.get(id(producer))
            if blocker:
                note(blocker)
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
            note(f"it is produced by {producer.describe()}")
        if id(value) in outputs:
            note(f"{value.name!r} is a graph output")
        for reader, index in value.uses:
            if reader.op == "concat" and any(v.channels is None for v in reader.inputs):
                note(f"{reader.name} concatenates values of unknown width")
            elif reader.is_layer and index == 0:
                touches_layer = True
                blocker = shared.get(id(reader)) or _axis_blocker(reader, value)
                if blocker:
                    note(blocker)
                region.sinks.append((reader, off, 1))
            elif reader.op == "mul" or reader.op in LAYOUT_OPS:
                if _carried(reader) != index:
                    # a gate or attention's weights stay as they are; a reshape that
                    # mixes the channels ends the region
                    why = reader.attrs.get("layout_why")
                    note(
                        f"{value.name!r} is read by {reader.describe()}"
                        + (f": {why}" if why else ", which it does not carry")
                    )
            elif reader.op in _UNARY or reader.op in _CARRY:
                continue
            elif reader.op == "norm":
                note(
                    f"{value.name!r} is normalized by {reader.describe()} (a normalization "
                    "does not commute with per-channel scales)"
                )
            elif reader.op == "flatten" and copied:
                note(f"repeated channels are flattened by {reader.describe()}")
            elif reader.op == "flatten":
                touches_layer = True
                for why in _flatten_sinks(reader, value, off, region, shared):
                    note(why)
            else:
                note(f"{value.name!r} is read by {reader.describe()}")
    if not touches_layer:
        return None, None, []
    if conflict:
        reasons.append((None, "a value appears at two different channel offsets"))
    kept = _keep_parts(region, reasons, placed, with_source)
    if not reasons:
        reasons.extend((None, why) for why in _coverage_gaps(region))
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
        reasons.append((None, "no layer produces it"))
    if not region.sinks:
        reasons.append((None, "no layer reads it"))
    return region, (reasons[0][1] if reasons else None), kept


def _keep_parts(region: Region, reasons, placed, with_source) -> list[tuple[str, str]]:
    """Keep at scale 1 the channels of each part that holds no source and cannot be
    scaled (read by what does not commute with the scales): exact, as the channels are
    then not scaled at all. Their reasons leave ``reasons``; returned as ``(channels,
    reason)``. The sinks, clips and batch norms that touch only kept channels leave the
    region. Nothing is kept when a reason has no part, a source's part has one, or the
    channels left to scale would not each have a source and a sink."""
    if not reasons or any(p is None or p in with_source for p, _ in reasons):
        return []
    frozen = np.zeros(region.size, bool)
    for p in dict.fromkeys(p for p, _ in reasons):
        for off, n in placed[p]:
            frozen[off if isinstance(off, np.ndarray) else slice(off, off + n)] = True
    region.frozen = frozen
    if frozen.all() or _coverage_gaps(region):
        region.frozen = None
        return []
    kept = []
    for p, why in reasons:
        chans = np.concatenate([_channels(off, n) for off, n in placed[p]])
        kept.append((f"channels {chans.min()}-{chans.max()} kept at scale 1", why))
    reasons.clear()
    region.sinks = [s for s in region.sinks if not frozen[_channels(s[1], _sink_width(s))].all()]
    region.clips = [
        c for c in region.clips if not frozen[_channels(c[1], c[0].inputs[0].channels)].all()
    ]
    region.affines = [
        a for a in region.affines if not frozen[_channels(a[1], a[0].inputs[0].channels)].all()
    ]
    return kept


def _channels(off: Place, n: int) -> np.ndarray:
    """The region channels at ``off``: ``n`` from an offset, or an array's."""
    return off if isinstance(off, np.ndarray) else np.arange(off, off + n)


def _sink_width(sink) -> int:
    node, off, repeat = sink
    return len(off) if isinstance(off, np.ndarray) else node.in_channels // repeat


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
    kept = [False] * region.size if region.frozen is None else region.frozen.tolist()
    has_src = list(kept)
    has_sink = list(kept)
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


# Ops between a projection and Q K^T that keep each channel whole (a channel map where
# they copy or select channels): the chain of a Q -> K pair.
_QK_CHAIN = frozenset({"transpose", "reshape", "repeat", "identity", "dropout", "rotary"})


def _qk_regions(graph: Graph, shared: dict[int, str], outputs: set[int]):
    """Q -> K regions: where ``q k^T`` is computed (a MatMul of two activations that sums
    over both operands' channels, or an opaque node with attr ``scores``, whose output
    depends on q and k only through it) and each side comes from a Linear through ops
    that keep channels whole, read by nothing else. ``q k^T`` is unchanged when q's
    channel c is multiplied by ``s_c`` and the k channel it meets divided by it: k's
    layer is the source (its rows divided), q's layer takes ``rows`` (its rows
    multiplied, each by the scale of the k channel it meets: several q heads read one k
    head in grouped-query attention). Returns the regions, the skip records of the pairs
    refused, and the ids of the values the regions claim."""
    regions: list[Region] = []
    skips: list[SkipRecord] = []
    claimed: set[int] = set()
    for node in graph.nodes:
        sides = _scores_operands(node)
        if sides is None:
            continue
        where = f"{node.describe()} (Q K^T)"
        if isinstance(sides, str):
            skips.append(SkipRecord("scale", where, sides))
            continue
        traced = [_qk_trace(v, node, outputs) for v in sides]
        why = next((t for t in traced if isinstance(t, str)), None)
        if why is None:
            (q, q_idx, q_chain), (k, k_idx, k_chain) = traced
            where = f"{k.name} -> {q.name} (Q K^T)"
            why = shared.get(id(q)) or shared.get(id(k))
            if q is k:
                why = f"q and k are one projection, {q.name}"
        if why is None:
            met = _qk_meets(node, *sides)
            if isinstance(met, str):
                why = met
        if why is not None:
            skips.append(SkipRecord("scale", where, why))
            continue
        # q channel i (of q's layer) meets k channel qmap[i] (of k's layer)
        qmap = np.full(q.out_channels, -1, np.int64)
        for a, b in met:
            qa, kb = q_idx[a], k_idx[b]
            if qmap[qa] not in (-1, kb):
                why = (
                    f"{q.name}'s channel {qa} meets two channels of {k.name} in Q K^T "
                    f"({qmap[qa]} and {kb}): their scales would have to be tied"
                )
                break
            qmap[qa] = kb
        if why is None and (qmap < 0).any():
            why = f"{q.name}'s channel {int(np.argmax(qmap < 0))} meets no channel of {k.name}"
        if why is not None:
            skips.append(SkipRecord("scale", where, why))
            continue
        region = Region(id=-1, size=k.out_channels, kind="qk", sources=[(k, 0)])
        region.rows.append((q, qmap))
        region.ties = _rotary_ties(k.out_channels, (k_chain, k_idx, None), (q_chain, q_idx, qmap))
        for value, idx in k_chain:
            region.values[value.name] = _place(_back(idx, k_idx, value), k.out_channels)
            if value.producer is not k:
                region.through.append(value.producer)
        for value, idx in q_chain:
            region.inverse[value.name] = qmap[_back(idx, q_idx, value)]
        claimed.update(id(v) for v, _ in (*q_chain, *k_chain))
        regions.append(region)
    return regions, skips, claimed


def _rotary_ties(size: int, *sides) -> np.ndarray | None:
    """The ties (:attr:`Region.ties`) of a Q -> K region of ``size`` channels: the two
    channels of each pair that a rotary embedding on either side rotates, as region
    channels (each side: its chain, where the operand's channels lie in its layer's
    output, and the region channel each layer channel meets, None for k's own); None
    where no rotary lies on the way."""
    parent = np.arange(size)

    def root(c: int) -> int:
        while parent[c] != c:
            c = parent[c]
        return c

    found = False
    for chain, layer_idx, meets in sides:
        for value, idx in chain:
            p = value.producer
            if p is None or p.op != "rotary":
                continue
            found = True
            layer = _back(idx, layer_idx, value)  # the layer channel each channel copies
            region = layer if meets is None else meets[layer]
            partner = rotary_partners(value.shape, value.axes, bool(p.attrs.get("interleaved")))
            for a, b in zip(region.tolist(), region[partner].tolist(), strict=True):
                ra, rb = root(a), root(b)
                parent[max(ra, rb)] = min(ra, rb)
    return np.array([root(c) for c in range(size)]) if found else None


def _back(idx: np.ndarray, layer_idx: np.ndarray, value: Value) -> np.ndarray:
    """The layer channel each channel of ``value`` copies, from where the operand's
    channels lie in ``value`` (``idx``) and in the layer's output (``layer_idx``)."""
    out = np.zeros(value.channels, np.int64)
    out[idx] = layer_idx
    return out


def _place(idx: np.ndarray, size: int) -> Place:
    """An offset of 0 where ``idx`` is every channel in order, else the array."""
    return 0 if idx.size == size and np.array_equal(idx, np.arange(size)) else idx


def _scores_operands(node: Node) -> tuple[Value, Value] | str | None:
    """``(q, k)`` where ``node`` computes (a function of) ``q k^T`` over their channels: a
    MatMul of two activations that carries neither's channels, or an opaque node with
    attr ``scores`` (its first two inputs); why not, where an operand of such a node
    has no channels; else None."""
    if node.op == "opaque" and node.attrs.get("scores") and len(node.inputs) >= 2:
        q, k = node.inputs[:2]
    elif node.op == "matmul" and "carrier" not in node.attrs and len(node.inputs) == 2:
        q, k = node.inputs
    else:
        return None
    if q.channels is not None and k.channels is not None:
        return q, k
    if not (_from_projection(q) and _from_projection(k)):
        return None  # (attention's weights times V, say)
    v = q if q.channels is None else k
    p = _lost_at(v)
    why = p.attrs.get("layout_why")
    return (
        f"{v.name!r} has no channels the IR follows: {p.describe()} loses them"
        + (f" ({why})" if why else "")
        + _rotary_hint(p)
    )


def _rotary_hint(node: Node) -> str:
    """Where ``node`` may be a rotary embedding's product or sum, what it would take."""
    if node.op in _PRODUCTS or str(node.attrs.get("kind")).lower() in _PRODUCTS:
        return _ROTARY
    return ""


# where a rotary embedding's q * cos + rotate_half(q) * sin loses the channels
_PRODUCTS = frozenset({"mul", "add", "concat", "cat", "neg"})


def _lost_at(value: Value) -> Node:
    """The node before ``value`` (which has no channels) whose output lost them: the
    first, going back, that reads a value with channels (or reads nothing)."""
    while value.producer is not None:
        p = value.producer
        if not p.inputs or any(v.channels is not None for v in p.inputs):
            return p
        value = p.inputs[0]
    return value.uses[0][0]


def _from_projection(value: Value, budget: int = 24) -> bool:
    """Whether a Linear produces ``value`` or comes before it, not through another
    ``q k^T`` (a few nodes back at most): q or k of an attention, not its weights."""
    stack, seen = [value], set()
    while stack and len(seen) < budget:
        v = stack.pop()
        p = v.producer
        if p is None or id(p) in seen:
            continue
        seen.add(id(p))
        if p.op == "linear":
            return True
        if _is_scores(p):
            continue
        stack.extend(p.inputs)
    return False


def _is_scores(node: Node) -> bool:
    """Whether ``node`` computes ``q k^T`` (or attention's weights from it)."""
    return (node.op == "matmul" and "carrier" not in node.attrs) or bool(
        node.op == "opaque" and node.attrs.get("scores")
    )


_ROTARY = (
    " (a rotary embedding, q * cos + rotate_half(q) * sin, keeps Q K^T with equal scales on "
    "each rotated pair of channels, but this one was not translated as one: its cos and sin "
    "depend on the data it rotates, or it is written in another form)"
)


def _qk_trace(value: Value, meeting: Node, outputs: set[int]):
    """From an operand of Q K^T back to its Linear: ``(layer, idx, chain)``, where the
    operand's channel j is channel ``idx[j]`` of the layer's output and ``chain`` holds
    ``(value, idx)`` for every value on the way, the operand's channels located in it
    (the layer's output first); or the reason (a str) the way is not one of whole
    channels read by nothing else. Every op on the way copies each of its input's
    channels at least once, so each value's channels are all located."""
    idx = np.arange(value.channels)
    chain: list[tuple[Value, np.ndarray]] = []
    reader = meeting
    while True:
        others = [n for n, _ in value.uses if n is not reader]
        if others:
            return f"{value.name!r} is also read by {others[0].describe()}"
        if id(value) in outputs:
            return f"{value.name!r} is a graph output"
        chain.append((value, idx))
        p = value.producer
        if p is None:
            return f"{value.name!r} reaches graph input {value.name!r}, not a projection"
        if p.op == "linear" and value.rank is not None and value.axes == (value.rank - 1,):
            chain.reverse()
            return p, idx, chain
        scalar = p.op == "mul" and len(p.inputs) == 1 and np.size(p.params.get("factor")) == 1
        if not (p.op in _QK_CHAIN or scalar) or p.inputs[0].channels is None:
            return f"{meeting.describe()} reads {value.name!r} through {p.describe()}" + (
                _rotary_hint(p) or ", which does not keep each channel whole"
            )
        if "channel_map" in p.attrs:
            idx = np.asarray(p.attrs["channel_map"], np.int64)[idx]
        reader, value = p, p.inputs[0]


def _qk_meets(node: Node, q: Value, k: Value):
    """The pairs ``(q channel, k channel)`` (of the two operands) that ``node`` multiplies
    together in ``q k^T``, or why it is not that product of their channels. A MatMul
    sums over q's last axis and k's second to last; an opaque ``scores`` node over both
    operands' last axes. The other axes are positions and broadcast heads."""
    if q.shape is None or k.shape is None or min(q.rank, k.rank) < 2:
        return "the shapes of q and k are not known, or not of rank 2 or more"
    # (a MatMul reads k transposed: (..., D, S))
    k_sum, k_pos = (k.rank - 2, k.rank - 1) if node.op == "matmul" else (k.rank - 1, k.rank - 2)
    q_pos = q.rank - 2
    if q.rank - 1 not in q.axes or k_sum not in k.axes:
        return "it does not sum over the channels of both q and k"
    if q_pos in q.axes or k_pos in k.axes:
        return "q's or k's channels lie on their positions' axis"
    numbers = []
    for v, keep, drop in ((q, q.rank - 1, q_pos), (k, k_sum, k_pos)):
        sizes = [v.shape[a] for a in v.axes]
        if any(d is None for d in sizes):
            return f"the channel axes' sizes of {v.name!r} are not known"
        n = np.arange(int(np.prod(sizes))).reshape(sizes)
        full = [1] * v.rank
        for a in v.axes:
            full[a] = v.shape[a]
        n = np.transpose(n, np.argsort(v.axes)).reshape(full)
        n = np.moveaxis(n, keep, -1).take(0, axis=drop if drop < keep else drop - 1)
        numbers.append(n)
    try:
        a, b = np.broadcast_arrays(*numbers)
    except ValueError:
        return "q's and k's heads do not broadcast"
    return np.unique(np.stack([a.reshape(-1), b.reshape(-1)], axis=1), axis=0)
