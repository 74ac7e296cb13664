"""The previous release's noise objective, kept for the benchmarks only (registered as
``noise-v1`` by :func:`register`): per-tensor weight grids and one activation grid before
each layer, solved exactly by the interior-point method. Not part of the library.

Pass: choose the scales that minimize the estimated quantization noise at the outputs.

The estimate (``docs/core.rst`` derives it) sums, over every layer, the noise its
per-tensor weight grid adds, and over every quantized activation, the noise its grid
adds, each carried to the outputs by the gains of :mod:`cle_core._gains`. In the
log-scales of one region it is a sum of log-convex terms (:mod:`cle_core._noise`), so
the total is convex. Regions are optimized one at a time, each exactly, in graph order
(block-coordinate descent); a sweep never increases the total, and sweeps stop when
one gains less than ``tolerance`` of it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np

from cle_core import _noise
from cle_core._gains import Gains, floored
from cle_core._ir import Graph, Node, Value
from cle_core._math import RangeSummary, grouped_view
from cle_core._regions import Region
from cle_core._scale import _Links
from cle_core._stats import ChannelStats

_TRANSPARENT = frozenset({"identity", "dropout", "flatten"})
_KEEPS_RANGE = _TRANSPARENT | {"pad"}  # a zero pad adds zeros: the grid's span is kept


def grid_factor(bits: int) -> float:
    """Variance of uniform rounding noise per squared range unit: ``(1 / (2^b - 1))^2 / 12``."""
    return 1.0 / ((2.0**bits - 1.0) ** 2 * 12.0)


class NoiseUnavailable(Exception):
    """The noise estimate cannot guide the scales on this graph (it is not finite)."""


@dataclass
class NoiseOutcome:
    """Scales per region; the estimated output noise-to-signal ratio before CLE (all
    scales 1) and after, noise no scale changes included; per region the noise of the
    terms that touch it before and after; the sweeps run and the objective after each
    (``history``, without the fixed part)."""

    scales: dict[int, np.ndarray]
    before: float
    after: float
    region_before: dict[int, float]
    region_after: dict[int, float]
    sweeps: int
    converged: bool
    max_change: float
    history: list[float] = field(default_factory=list)


class _Layer:
    """What one layer contributes: its weight summary and the statistics around it."""

    def __init__(self, node: Node, stats: Mapping[str, ChannelStats], gains: Gains, factor: float):
        self.node = node
        self.summary = RangeSummary(node.weight, node.layout)
        view = grouped_view(np.asarray(node.weight), node.layout)
        self.groups, self.og, self.ig, self.kernel = view.shape
        cin = self.groups * self.ig
        x = _stats_of(node.inputs[0], stats)
        if x is None:
            meansq = np.ones(cin)
        else:
            meansq = x.meansq if x.channels == cin else np.repeat(x.meansq, cin // x.channels)
        self.energy = self.kernel * floored(meansq)  # per input feature
        self.gain = gains.weight_gain(node.outputs[0].name, self.groups * self.og)
        self.logw = math.log(factor * 4.0)  # the grid spans -max|W| .. max|W|
        self._out_key: bytes | None = None
        self._out_ranges: np.ndarray | None = None

    def out_ranges(self, s_in: np.ndarray | None) -> np.ndarray:
        """The summary's output ranges at input scales ``s_in``: a pass over the weight,
        asked for by the region's solve and the sweep's refresh with the same scales."""
        key = b"" if s_in is None else np.asarray(s_in, np.float64).tobytes()
        if key != self._out_key:
            self._out_key, self._out_ranges = key, self.summary.out_ranges(s_in)
        return self._out_ranges

    def sink_term(self, s_out: np.ndarray | None, repeat: int):
        """(alpha, c) over the layer's input channels with fixed output scales."""
        ranges = self.summary.in_ranges(None, s_out)
        out_energy = self.gain if s_out is None else self.gain * np.square(s_out)
        per_group = out_energy.reshape(self.groups, self.og).sum(axis=1)
        c = self.energy.reshape(self.groups, self.ig) * per_group[:, None]
        c = c.reshape(-1)
        if repeat > 1:
            ranges = ranges.reshape(-1, repeat).max(axis=1)
            c = c.reshape(-1, repeat).sum(axis=1)
        return ranges, np.where(ranges > 0, c, 0.0)  # zeros are on the grid: no noise

    def source_term(self, s_in: np.ndarray | None):
        """(alpha, c) over the layer's output channels with fixed input scales."""
        ranges = self.out_ranges(s_in)
        energy = self.energy if s_in is None else self.energy / np.square(s_in)
        per_group = energy.reshape(self.groups, self.ig).sum(axis=1)
        c = self.gain.reshape(self.groups, self.og) * per_group[:, None]
        return ranges, np.where(ranges > 0, c.reshape(-1), 0.0)

    def value(self, s_in, s_out) -> float:
        """The layer's weight-noise term at the given scales."""
        ranges = self.out_ranges(s_in)
        top = float(np.max(ranges if s_out is None else ranges / s_out)) if ranges.size else 0.0
        energy = self.energy if s_in is None else self.energy / np.square(s_in)
        out_energy = self.gain if s_out is None else self.gain * np.square(s_out)
        total = float(
            np.sum(
                out_energy.reshape(self.groups, self.og).sum(axis=1)
                * energy.reshape(self.groups, self.ig).sum(axis=1)
            )
        )
        return math.exp(self.logw) * top * top * total


def _stats_of(value: Value, stats: Mapping[str, ChannelStats]) -> ChannelStats | None:
    """The statistics of ``value``, looking through Identity / Dropout / Flatten."""
    while True:
        got = stats.get(value.name)
        if got is not None:
            return got
        p = value.producer
        if p is None or p.op not in _TRANSPARENT:
            return None
        value = p.inputs[0]


@dataclass
class _Activation:
    """A quantized activation: a value of a region that a sink layer reads (``region``
    None: a layer's input outside every region, a fixed term). ``cap``: log of a second
    per-channel range; the grid then spans the smaller of the two maxima (see
    :func:`_before_bound`)."""

    value: Value
    region: Region
    offset: int
    log_range: np.ndarray
    coef: np.ndarray
    logw: float
    cap: np.ndarray | None = None

    def __post_init__(self) -> None:
        # Neither depends on the scales: computed once, not in every sweep.
        with np.errstate(over="ignore"):
            self.range, self.c = np.exp(self.log_range), np.exp(self.coef)
            self.cap_range = None if self.cap is None else np.exp(self.cap)
        n = self.log_range.shape[0] if self.region is None else self.region.size
        self.alpha, self.logc = np.full(n, -np.inf), np.full(n, -np.inf)
        self.sl = slice(self.offset, self.offset + self.log_range.shape[0])
        self.alpha[self.sl], self.logc[self.sl] = self.log_range, self.coef
        if self.cap is not None:
            self.cap_alpha = np.full(n, -np.inf)
            self.cap_alpha[self.sl] = self.cap

    def _tops(self, s: np.ndarray) -> tuple[float, float]:
        with np.errstate(over="ignore", invalid="ignore"):
            top = float(np.max(self.range / s))
            cap = math.inf if self.cap_range is None else float(np.max(self.cap_range / s))
        return top, cap

    def noise(self, s: np.ndarray) -> float:
        """The term at scales ``s`` (this activation's channels)."""
        top = min(self._tops(s))
        with np.errstate(over="ignore", invalid="ignore"):
            return math.exp(self.logw) * top * top * float(np.sum(self.c * s * s))

    def alpha_at(self, s_region: np.ndarray) -> np.ndarray:
        """The log-ranges of the region's solve at the current scales: the range whose
        maximum is the smaller there. The solve then minimizes a convex term that is
        never below the real one and equal to it at the current scales, so the real
        total cannot rise (majorize-minimize)."""
        if self.cap is None:
            return self.alpha
        top, cap = self._tops(s_region[self.sl])
        return self.cap_alpha if cap < top else self.alpha


def _activation(value, region, offset, stats, gains, positions, logw) -> _Activation | None:
    """The rounding-noise term of a quantized activation, or None without statistics."""
    st = _stats_of(value, stats)
    c = value.channels or 0
    if st is None or st.channels != c or c == 0:
        return None
    span = np.maximum(st.hi, 0.0) - np.minimum(st.lo, 0.0)
    gain = gains.rounding_gain(value.name, c, positions.get(value.name, 1))
    with np.errstate(divide="ignore"):
        return _Activation(value, region, offset, np.log(span), np.log(st.nonzero * gain), logw)


def _before_bound(value, region, offset, stats, gains, positions, logw) -> _Activation | None:
    """The quantization term of a bounded activation that scaling makes per channel, or
    None where ``value`` is not one (then :func:`_activation` is the term).

    A clip with an upper bound (ReLU6, Hardtanh) between scaled layers gets one bound
    per channel, which no quantizer folds into the layer: it merges a scalar clip (the
    widest bounds) into the layer and quantizes there, then again after the per-channel
    bound (onnxruntime's ``quantize_static`` does exactly this). The first grid is the
    coarser: it spans ``max_j min(m_j / s_j, B)``, each channel's unclipped maximum
    ``m_j`` cut at the scalar bound ``B = max_j hi_j / s_j``, where the second spans
    ``max_j min(m_j, hi_j) / s_j``. Where the two grids are equal, requantizing changes
    nothing, so the term is one point on the first grid. Its span is the smaller of
    ``max_j m_j / s_j`` and ``max_j hi_j / s_j``, both log-convex: the term keeps the two
    and each region solve takes the smaller at its start. The bound matters where
    channels saturate far beyond it (a trained ReLU6 network's first layers) and a
    channel with nothing to lose (a dead one) would otherwise take a tiny scale and lift
    ``B`` for all. The noise coefficient has the form of every activation term: the
    fraction of non-zero elements times the gain where the noise is added (before the
    clip, whose derivative the gain counts).
    """
    clip = value.producer
    while clip is not None and clip.op in _KEEPS_RANGE:
        clip = clip.inputs[0].producer
    if clip is None or clip.op != "clip" or not np.all(np.isfinite(clip.params["hi"])):
        return None
    pre, out = _stats_of(clip.inputs[0], stats), _stats_of(clip.outputs[0], stats)
    c = value.channels or 0
    if pre is None or out is None or pre.channels != c or out.channels != c or c == 0:
        return None
    hi = np.broadcast_to(np.asarray(clip.params["hi"], np.float64).reshape(-1), (c,))
    low = np.minimum(np.maximum(pre.lo, np.min(clip.params["lo"])), 0.0)
    name = clip.inputs[0].name
    gain = gains.rounding_gain(name, c, positions.get(name, positions.get(value.name, 1)))
    with np.errstate(divide="ignore"):
        return _Activation(
            value,
            region,
            offset,
            np.log(np.maximum(pre.hi, 0.0) - low),
            np.log(out.nonzero * gain),
            logw,
            cap=np.log(np.maximum(hi, 0.0) - low),
        )


def _region_value(value: Value) -> Value:
    """The value of a region that a sink reads (before a Flatten)."""
    while value.producer is not None and value.producer.op in _TRANSPARENT:
        value = value.producer.inputs[0]
    return value


def noise_scales(
    graph: Graph,
    regions: list[Region],
    stats: Mapping[str, ChannelStats],
    gains: Gains,
    positions: Mapping[str, int],
    weight_bits: int,
    activation_bits: int | None,
    max_sweeps: int,
    tolerance: float,
    on_sweep: Callable[[int], None] | None = None,
) -> NoiseOutcome:
    """Scales of every region minimizing the estimated output noise (see the module)."""
    links = _Links(regions)
    w_factor = grid_factor(weight_bits)
    layers = {key: _Layer(node, stats, gains, w_factor) for key, node in links.nodes.items()}
    acts: dict[int, list[_Activation]] = {r.id: [] for r in regions}
    in_regions: set[int] = set()
    fixed = 0.0  # noise that no scale changes: layers and activations outside regions
    if activation_bits is not None:
        a_factor = math.log(grid_factor(activation_bits))
        for region in regions:
            for node, off, _repeat in region.sinks:
                value = _region_value(node.inputs[0])
                if id(value) in in_regions:
                    continue
                in_regions.add(id(value))
                # A bounded activation with per-channel bounds: quantized before them.
                act = _before_bound(value, region, off, stats, gains, positions, a_factor)
                if act is None:
                    act = _activation(value, region, off, stats, gains, positions, a_factor)
                if act is not None:
                    acts[region.id].append(act)
        for node in graph.nodes:
            if node.is_layer:
                value = _region_value(node.inputs[0])
                if id(value) not in in_regions:
                    in_regions.add(id(value))
                    act = _activation(value, None, 0, stats, gains, positions, a_factor)
                    if act is not None:
                        fixed += act.noise(np.ones(act.log_range.shape[0]))
    for node in graph.nodes:
        if node.is_layer and id(node) not in links.nodes:
            fixed += _Layer(node, stats, gains, w_factor).value(None, None)

    scales = {r.id: np.ones(r.size) for r in regions}

    def layer_value(key) -> float:
        node = links.nodes[key]
        return layers[key].value(links.s_in(node, scales), links.s_out(node, scales))

    def act_value(a: _Activation) -> float:
        return a.noise(scales[a.region.id][a.offset : a.offset + a.log_range.shape[0]])

    touching: dict[int, set] = {r.id: set() for r in regions}
    for key in links.nodes:
        for link in (links.reads.get(key), links.writes.get(key)):
            if link is not None:
                touching[link[0].id].add(key)
    # Every term's value at the current scales; a region's update refreshes its own.
    layer_now = {key: layer_value(key) for key in layers}
    act_now = {r.id: [act_value(a) for a in acts[r.id]] for r in regions}

    def region_total(region: Region) -> float:
        return sum(layer_now[k] for k in touching[region.id]) + sum(act_now[region.id])

    def refresh(region: Region) -> None:
        for k in touching[region.id]:
            layer_now[k] = layer_value(k)
        act_now[region.id] = [act_value(a) for a in acts[region.id]]

    def total() -> float:
        return sum(layer_now.values()) + sum(sum(v) for v in act_now.values())

    colors = _colors(regions, links)
    before = total()
    if not math.isfinite(before):
        raise NoiseUnavailable(
            "the estimated output noise overflows float64 (activation statistics or "
            "their gains to the output grow beyond 1e308 through the network: untrained "
            "weights?)"
        )
    region_before = {r.id: region_total(r) for r in regions}
    history = [before]
    sweeps, converged, max_change = 0, not regions, 0.0
    while regions and sweeps < max_sweeps:
        sweeps += 1
        if on_sweep is not None:
            on_sweep(sweeps)
        max_change = 0.0
        # Regions of one color share no layer: they are solved together, exactly.
        for group in colors:
            problems = [_region_terms(r, links, layers, acts[r.id], scales) for r in group]
            t0s = [np.log(scales[r.id]) for r in group]
            solved = _noise.solve_many(problems, t0s)
            for region, t0, t in zip(group, t0s, solved, strict=True):
                old, previous = scales[region.id], region_total(region)
                scales[region.id] = np.exp(t)
                refresh(region)
                # The solve is exact for the region's terms; a layer that reads and
                # writes the same region is modelled with its outputs held, and a dead
                # channel with its scale held: the real total is what must not rise.
                if region_total(region) > previous:
                    scales[region.id] = old
                    refresh(region)
                elif t.size:
                    max_change = max(max_change, float(np.max(np.abs(np.expm1(t - t0)))))
        history.append(total())
        # A sweep that moved no scale leaves the next one nothing new to start from.
        if max_change == 0.0 or history[-2] - history[-1] <= tolerance * history[-2]:
            converged = True
            break
    return NoiseOutcome(
        scales,
        before + fixed,
        history[-1] + fixed,
        region_before,
        {r.id: region_total(r) for r in regions},
        sweeps,
        converged,
        max_change,
        history,
    )


def _colors(regions: list[Region], links: _Links) -> list[list[Region]]:
    """Regions grouped so that no two of a group touch the same layer (greedy coloring
    in graph order)."""
    neighbors: dict[int, set[int]] = {r.id: set() for r in regions}
    for key in links.nodes:
        ends = {link[0].id for link in (links.reads.get(key), links.writes.get(key)) if link}
        for a in ends:
            neighbors[a] |= ends - {a}
    color: dict[int, int] = {}
    for r in regions:
        used = {color[n] for n in neighbors[r.id] if n in color}
        color[r.id] = next(c for c in range(len(regions) + 1) if c not in used)
    groups: dict[int, list[Region]] = {}
    for r in regions:
        groups.setdefault(color[r.id], []).append(r)
    return [groups[c] for c in sorted(groups)]


def _region_terms(region, links, layers, activations, scales) -> _noise.Terms:
    n = region.size
    signs, logws, alphas, logcs = [], [], [], []
    live = np.zeros(n, bool)  # channels some source writes: a dead channel keeps its scale
    for node, off in region.sources:
        live[off : off + node.out_channels] |= layers[id(node)].summary.raw_out > 0

    def add(sign, logw, off, ranges, c):
        alpha = np.full(n, -np.inf)
        logc = np.full(n, -np.inf)
        sl = slice(off, off + ranges.shape[0])
        with np.errstate(divide="ignore"):
            alpha[sl] = np.where(live[sl], np.log(ranges), -np.inf)
            logc[sl] = np.where(live[sl], np.log(c), -np.inf)
        signs.append(sign)
        logws.append(logw)
        alphas.append(alpha)
        logcs.append(logc)

    sink_of = {id(node): (off, rep) for node, off, rep in region.sinks}
    for node, off, repeat in region.sinks:
        layer = layers[id(node)]
        s_out = links.s_out(node, scales)
        ranges, c = layer.sink_term(s_out, repeat)
        add(1.0, layer.logw, off, ranges, c)
    for node, off in region.sources:
        if id(node) in sink_of:
            continue  # reads and writes this region: its term is taken from the input side
        layer = layers[id(node)]
        ranges, c = layer.source_term(links.s_in(node, scales))
        add(-1.0, layer.logw, off, ranges, c)
    for a in activations:  # (alpha, logc) over the region
        signs.append(-1.0)
        logws.append(a.logw)
        alphas.append(np.where(live, a.alpha_at(scales[region.id]), -np.inf))
        logcs.append(np.where(live, a.logc, -np.inf))
    return _noise.Terms(np.array(signs), np.array(logws), np.stack(alphas), np.stack(logcs))


class NoiseV1:
    name = "noise-v1"
    description = "the previous release's noise objective (benchmarks only)"

    def choose(self, problem):
        from cle_core._gains import propagate
        from cle_core._objectives import ScaleOutcome
        from cle_core._stats import estimate, positions

        graph, options = problem.graph, problem.options
        stats, derivatives = estimate(graph, problem.statistics)
        counts = positions(graph)
        power = {
            v.name: float(stats[v.name].meansq.sum()) * counts.get(v.name, 1)
            for v in graph.outputs
            if v.name in stats
        }
        with np.errstate(over="ignore", invalid="ignore"):
            gains = propagate(graph, counts, derivatives, power)
            out = noise_scales(
                graph,
                problem.regions,
                stats,
                gains,
                counts,
                options.weight_bits,
                options.activation_bits,
                options.max_sweeps,
                0.003,
            )
        return ScaleOutcome(out.scales, out.sweeps, out.converged, out.max_change)


def register() -> None:
    from cle_core import objective_names, register_objective

    if "noise-v1" not in objective_names():
        register_objective(NoiseV1())
