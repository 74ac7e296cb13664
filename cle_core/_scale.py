"""Scales, once chosen (by an objective of :mod:`cle_core._objectives`), written into the
graph: layers, clip bounds and carried batch norms; and which regions form the
Conv -> depthwise Conv -> Conv chains of the paper."""

from __future__ import annotations

import numpy as np

from ._ir import Node
from ._math import scale_affine, scale_bounds, scale_layer
from ._regions import Place, Region, take

DRAW_SPREAD = 0.02
"""The spread of a scale draw (:attr:`EqualizeOptions.scale_draw`): each log-scale moves
by ``DRAW_SPREAD * z``. Small enough that the noise estimate hardly moves (within 0.1 dB
on the test networks, 0.55 dB on EfficientNet-Lite0's weights-only scales:
``benchmarks/bench_draws.py``), large enough to redraw how every channel's weights fall
on their grid (a 2 % move of a weight that spans a hundred grid steps moves it by two)."""


def drawn_scales(
    regions: list[Region], scales: dict[int, np.ndarray], draw: int, spread: float = DRAW_SPREAD
):
    """``scales`` (by region id) times ``exp(spread * z)`` per channel, ``z`` standard
    normal drawn with seed ``draw``, region by region in ``regions``' order (the same
    graph and seed give the same draw); ``draw`` 0 returns ``scales`` as they are.
    Any positive scales are an exact equalization; channels a region must keep at 1 or
    tie are set afterwards, as for any objective's scales."""
    if draw == 0:
        return scales
    rng = np.random.default_rng(draw)
    out = dict(scales)
    for r in regions:
        out[r.id] = np.asarray(scales[r.id], np.float64) * np.exp(spread * rng.normal(size=r.size))
    return out


class _Links:
    """Which region (and where in it) each layer reads from and writes to."""

    def __init__(self, regions: list[Region]):
        self.reads: dict[int, tuple[Region, int, int]] = {}
        self.writes: dict[int, tuple[Region, int]] = {}
        self.rows: dict[int, tuple[Region, Place]] = {}  # rows multiplied (a Q -> K's q)
        self.nodes: dict[int, Node] = {}
        for region in regions:
            for node, off in region.sources:
                self.writes[id(node)] = (region, off)
                self.nodes[id(node)] = node
            for node, at in region.rows:
                self.rows[id(node)] = (region, at)
                self.nodes[id(node)] = node
            for node, off, repeat in region.sinks:
                self.reads[id(node)] = (region, off, repeat)
                self.nodes[id(node)] = node

    def s_in(self, node: Node, scales) -> np.ndarray | None:
        link = self.reads.get(id(node))
        if link is None:
            return None
        region, off, repeat = link
        s = take(scales[region.id], off, node.in_channels // repeat)
        return np.repeat(s, repeat) if repeat > 1 else s

    def s_out(self, node: Node, scales) -> np.ndarray | None:
        link = self.writes.get(id(node))
        if link is None:
            rows = self.rows.get(id(node))
            if rows is None:
                return None
            # q of a Q -> K pair: its rows multiplied by the scale of the k channel each meets
            return 1.0 / take(scales[rows[0].id], rows[1], node.out_channels)
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
    pairs = [r for r in regions if r.kind == "pair" and r.frozen is None]
    by_source = {id(r.sources[0][0]): r for r in pairs}
    found = []
    for first in pairs:
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


def apply_scales(regions: list[Region], scales: dict[int, np.ndarray], links=None) -> set[str]:
    """Divide every source's output channels (a norm's affine) by its region's scales
    and multiply every sink's input channels (and a Q -> K region's q rows); carry the
    scales into clip bounds, unfolded batch norms and folded-BN statistics.
    Returns the names of the nodes changed."""
    links = links or _Links(regions)
    changed: set[str] = set()
    for node in links.nodes.values():
        if node.op == "norm":  # a source only: its affine takes the scale
            gamma, beta = scale_affine(
                node.params["gamma"], node.params.get("beta"), links.s_out(node, scales)
            )
            node.params["gamma"], node.params["beta"] = gamma, beta
            changed.add(node.name)
            continue
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
