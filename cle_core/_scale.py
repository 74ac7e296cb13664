"""Pass: cross-layer scaling of every region, iterated to convergence.

The iteration works on per-(output, input) channel ``max |W|`` summaries and never
touches the weights; the accumulated scales are applied once at the end. Regions are
swept in graph order (Gauss-Seidel), each balancing its sources' largest output range
against its sinks' largest input range, until no scale moves by more than the tolerance.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ._ir import SCALABLE_ACTIVATIONS, Node
from ._math import RangeSummary, region_scales, scale_bounds, scale_layer, triple_scales
from ._regions import Region

_HISTORY = 3


@dataclass
class ScaleOutcome:
    scales: dict[int, np.ndarray]
    sweeps: int
    converged: bool
    max_change: float
    triples: list[tuple[str, str, str]]
    changed: set[str]


class _Links:
    """Which region (and where in it) each layer reads from and writes to."""

    def __init__(self, regions: list[Region]):
        self.reads: dict[int, tuple[Region, int, int]] = {}
        self.writes: dict[int, tuple[Region, int]] = {}
        self.nodes: dict[int, Node] = {}
        for region in regions:
            for node, off in region.sources:
                self.writes[id(node)] = (region, off)
                self.nodes[id(node)] = node
            for node, off, repeat in region.sinks:
                self.reads[id(node)] = (region, off, repeat)
                self.nodes[id(node)] = node

    def s_in(self, node: Node, scales) -> np.ndarray | None:
        link = self.reads.get(id(node))
        if link is None:
            return None
        region, off, repeat = link
        s = scales[region.id][off : off + node.in_channels // repeat]
        return np.repeat(s, repeat) if repeat > 1 else s

    def s_out(self, node: Node, scales) -> np.ndarray | None:
        link = self.writes.get(id(node))
        if link is None:
            return None
        region, off = link
        return scales[region.id][off : off + node.out_channels]


def _is_depthwise(node: Node) -> bool:
    return (
        node.op == "conv"
        and node.layout.groups > 1
        and node.layout.groups == node.in_channels == node.out_channels
    )


def _triples(regions: list[Region]) -> list[tuple[Region, Region]]:
    """Pairs of one-to-one regions around a depthwise conv with channel multiplier 1."""
    by_source = {id(r.sources[0][0]): r for r in regions if r.kind == "pair"}
    found = []
    for first in regions:
        if first.kind != "pair":
            continue
        middle = first.sinks[0][0]
        second = by_source.get(id(middle))
        if (
            second is not None
            and _is_depthwise(middle)
            and first.sinks[0][2] == 1
            and second.sinks[0][2] == 1
        ):
            found.append((first, second))
    return found


def triple_names(regions: list[Region]) -> list[tuple[str, str, str]]:
    """The Conv -> depthwise Conv -> Conv chains among ``regions``, by layer names."""
    return _names(_triples(regions))


def _names(triples) -> list[tuple[str, str, str]]:
    return [(a.sources[0][0].name, a.sinks[0][0].name, b.sinks[0][0].name) for a, b in triples]


def activation_floors(regions: list[Region], weight: float, summaries) -> dict:
    """Per region with an activation: ``weight * kappa * a`` per channel, where
    ``a`` estimates the activation's range (the clip bound, or ``|beta| + 3 |gamma|`` of
    the folded BN that feeds it if smaller) and ``kappa`` puts it on the scale of the
    sources' weight ranges (largest over largest, before scaling). The balance then
    treats a channel's activation like one more source: after scaling, a channel whose
    activation would dominate the per-tensor activation grid is held back."""
    floors: dict[int, np.ndarray] = {}
    if weight <= 0:
        return floors
    for region in regions:
        if not any(n.op in SCALABLE_ACTIVATIONS for n in region.through):
            continue
        a = np.full(region.size, np.inf)
        for clip, off in region.clips:
            n = clip.inputs[0].channels
            bound = np.maximum(np.abs(clip.params["lo"]), np.abs(clip.params["hi"]))
            a[off : off + n] = np.minimum(a[off : off + n], np.broadcast_to(bound, (n,)))
        src = np.zeros(region.size)
        for node, off in region.sources:
            raw = summaries[id(node)].raw_out
            src[off : off + len(raw)] = np.maximum(src[off : off + len(raw)], raw)
            stats = node.attrs.get("bn_stats")
            if stats is not None:
                estimate = np.abs(stats["beta"]) + 3.0 * np.abs(stats["gamma"])
                a[off : off + len(raw)] = np.minimum(a[off : off + len(raw)], estimate)
        a = np.where(np.isfinite(a), a, 0.0)
        if a.max() > 0 and src.max() > 0:
            floors[region.id] = weight * (src.max() / a.max()) * a
    return floors


def scale_regions(
    regions: list[Region],
    max_sweeps: int,
    tolerance: float,
    on_sweep=None,
    activation_weight: float = 0.0,
) -> ScaleOutcome:
    """Compute the scales of every region and apply them to the graph."""
    links = _Links(regions)
    summaries = {key: RangeSummary(node.weight, node.layout) for key, node in links.nodes.items()}
    scales = {r.id: np.ones(r.size) for r in regions}
    floors = activation_floors(regions, activation_weight, summaries)

    def balance(region: Region) -> np.ndarray:
        src = np.zeros(region.size)
        snk = np.zeros(region.size)
        for node, off in region.sources:
            out_r = summaries[id(node)].out_ranges(links.s_in(node, scales))
            window = src[off : off + len(out_r)]
            np.maximum(window, out_r, out=window)
        for node, off, repeat in region.sinks:
            in_r = summaries[id(node)].in_ranges(None, links.s_out(node, scales))
            per_channel = in_r.reshape(-1, repeat).max(axis=1)
            window = snk[off : off + len(per_channel)]
            np.maximum(window, per_channel, out=window)
        if region.id in floors:
            np.maximum(src, floors[region.id], out=src)
        return region_scales([src], [snk])

    def balance_triple(first: Region, second: Region) -> tuple[np.ndarray, np.ndarray]:
        # Both regions of a Conv -> depthwise -> Conv at once: a block step that the
        # pairwise sweep would need many rounds to reach.
        head, middle, tail = first.sources[0][0], first.sinks[0][0], second.sinks[0][0]
        r0 = summaries[id(head)].out_ranges(links.s_in(head, scales))
        r1 = summaries[id(middle)].raw_out
        r2 = summaries[id(tail)].in_ranges(None, links.s_out(tail, scales))
        return triple_scales(r0, r1, r2)

    # The closed form knows no activation floors: such triples are swept pairwise.
    triples = [t for t in _triples(regions) if t[0].id not in floors and t[1].id not in floors]
    partner = {first.id: second for first, second in triples}
    seconds = {second.id for _, second in triples}

    def sweep() -> None:
        for region in regions:
            if region.id in seconds:
                continue
            if region.id in partner:
                second = partner[region.id]
                updates = zip((region, second), balance_triple(region, second), strict=True)
            else:
                updates = ((region, balance(region)),)
            for target, new in updates:
                scales[target.id] = new

    ids = [r.id for r in regions]

    def pack() -> np.ndarray:
        return np.log(np.concatenate([scales[i] for i in ids])) if ids else np.zeros(0)

    def unpack(x: np.ndarray) -> None:
        pos = 0
        for i in ids:
            n = len(scales[i])
            scales[i] = np.exp(x[pos : pos + n])
            pos += n

    sweeps, max_change, converged = 0, 0.0, not regions
    xs: list[np.ndarray] = []
    gs: list[np.ndarray] = []
    while regions and sweeps < max_sweeps:
        sweeps += 1
        if on_sweep is not None:
            on_sweep(sweeps)
        x = pack()
        sweep()
        gx = pack()
        max_change = float(np.max(np.abs(np.expm1(gx - x))))
        if max_change <= tolerance:
            converged = True
            break
        xs.append(x)
        gs.append(gx)
        if len(xs) > _HISTORY + 1:
            xs.pop(0)
            gs.pop(0)
        if len(xs) > 1:
            res = [g - x for g, x in zip(gs, xs, strict=True)]
            d_res = np.stack([b - a for a, b in zip(res[:-1], res[1:], strict=True)], axis=1)
            d_g = np.stack([b - a for a, b in zip(gs[:-1], gs[1:], strict=True)], axis=1)
            gamma, *_ = np.linalg.lstsq(d_res, res[-1], rcond=None)
            unpack(gx - d_g @ gamma)
    summaries.clear()  # they may view the old weights; drop them before writing new ones
    changed = apply_scales(regions, scales, links)
    return ScaleOutcome(scales, sweeps, converged, max_change, _names(triples), changed)


def apply_scales(regions: list[Region], scales: dict[int, np.ndarray], links=None) -> set[str]:
    """Divide every source's output channels by its region's scales and multiply every
    sink's input channels; carry the scales into clip bounds, unfolded batch norms and
    folded-BN statistics.
    Returns the names of the nodes changed."""
    links = links or _Links(regions)
    changed: set[str] = set()
    for node in links.nodes.values():
        w, b = scale_layer(
            node.weight, node.bias, node.layout, links.s_in(node, scales), links.s_out(node, scales)
        )
        node.params["weight"], node.params["bias"] = w, b
        s_out = links.s_out(node, scales)
        stats = node.attrs.get("bn_stats")
        if stats is not None and s_out is not None:
            gamma, beta = scale_bounds(stats["gamma"], stats["beta"], s_out)
            node.attrs["bn_stats"] = {"gamma": gamma, "beta": beta}
        changed.add(node.name)
    for region in regions:
        for bn, off in region.affines:
            # BN(x / s) = BN(x) / s once its mean and its shift are divided by s.
            s = scales[region.id][off : off + bn.inputs[0].channels]
            for key in ("mean", "beta"):
                if bn.params.get(key) is not None:
                    bn.params[key] = np.asarray(bn.params[key], np.float64) / s
            changed.add(bn.name)
        for clip, off in region.clips:
            channels = clip.inputs[0].channels
            lo, hi = scale_bounds(
                clip.params["lo"], clip.params["hi"], scales[region.id][off : off + channels]
            )
            # ReLU's (0, inf) bounds survive any positive scale: leaving such a clip
            # unchanged lets a backend keep one module shared by calls of different widths.
            if not (_same_bounds(clip.params["lo"], lo) and _same_bounds(clip.params["hi"], hi)):
                clip.params["lo"], clip.params["hi"] = lo, hi
                changed.add(clip.name)
    return changed


def _same_bounds(old, new: np.ndarray) -> bool:
    return bool(np.all(np.asarray(old) == new))
