"""The estimated quantization noise at the outputs, for a deployment, at given scales.

Every grid the deployment puts into the model adds rounding noise: each layer's weight
grid (per tensor or per output channel) and each activation grid that the quantizer's
profile places (:mod:`cle_core._deployment`). Each is carried to the outputs by the gains
of :mod:`cle_core._gains` and divided by the output power: the sum is the estimated
noise-to-signal ratio of the quantized model; ``-10 log10`` of it is its output SQNR.

Terms are written in the original units of the graph (in which the FP32 function does not
change) as functions of the scales of the regions: a region's channel ``c`` is divided by
``s_c`` where its sources write it and multiplied back where its sinks read it. So one
object evaluates the model before scaling (all scales 1) and any candidate scales of a
region, without touching the graph. Candidates are evaluated many at a time
(:meth:`Estimate.region_values`): the solver asks for a handful per region and sweep.

Per term, with ``L = 2^bits - 1`` steps across a grid's span:

- a layer, per-tensor grid: ``span^2 / (12 L^2) * sum_g (sum_o gain_o s_out_o^2)
  (sum_i e_i / s_in_i^2)`` over its groups ``g``, with ``span = 2 max |W'|`` (symmetric)
  or ``max W' - min W'`` of the scaled weight ``W' = W s_in / s_out`` and ``e_i`` the
  input's energy per weight (kernel size times ``E[x_i^2]``);
- a layer, per-channel grids: row ``o`` has its own span, in which ``s_out_o`` cancels:
  ``sum_o gain_o span_o^2 / (12 L^2) * sum_i e_i / s_in_i^2``;
- an activation grid: ``span^2 / (12 L^2) * sum_c coef_c s_c^2`` with ``span`` of the
  scaled values (``max(0, max_c hi_c / s_c) - min(0, min_c lo_c / s_c)`` asymmetric) and
  ``coef_c`` the fraction of non-zero elements times the gain where the noise is added.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from ._deployment import (
    Deployment,
    Point,
    grid_levels,
    groups_share_row_grids,
    profile_for,
    quantizes_weight,
    shared_weight_grids,
)
from ._gains import Gains, floored
from ._ir import Graph, Node, Value
from ._math import _work_dtype, grouped_view, kernel_reduce
from ._noise import Terms
from ._regions import Place, Region, gather_terms, take, tie
from ._stats import ChannelStats

_TRANSPARENT = frozenset({"identity", "dropout", "flatten"})
_CHUNK = 1 << 22  # elements of a (candidates, rows, columns) block of per-channel spans
# Candidates x weights from which per-channel row maxima are taken from the columns that
# can hold them (_pruned_row_max): below, its extra passes cost more than they save.
_PRUNE_FROM = 1 << 15


def stats_of(value: Value, stats: Mapping[str, ChannelStats]) -> ChannelStats | None:
    """The statistics of ``value``, looking through Identity / Dropout / Flatten."""
    while True:
        got = stats.get(value.name)
        if got is not None:
            return got
        p = value.producer
        if p is None or p.op not in _TRANSPARENT:
            return None
        value = p.inputs[0]


class ScaleMap:
    """Which slice of which region's scales applies to each layer's input and output and
    to each value. Scales are a list with one array per region, in region order."""

    def __init__(self, regions: Sequence[Region]):
        self.regions = list(regions)
        self.value_at: dict[str, tuple[int, int]] = {}
        self.reads: dict[int, tuple[int, int, int]] = {}  # layer -> (region, offset, repeat)
        self.writes: dict[int, tuple[int, int]] = {}  # layer -> (region, offset)
        # A Q -> K region's q: its rows and values multiplied by the scales, not divided.
        self.rows: dict[int, tuple[int, Place]] = {}
        self.inverse_at: dict[str, tuple[int, Place]] = {}
        for k, region in enumerate(self.regions):
            for name, off in region.values.items():
                self.value_at[name] = (k, off)
            for name, at in region.inverse.items():
                self.inverse_at[name] = (k, at)
            for node, off in region.sources:
                self.writes[id(node)] = (k, off)
            for node, at in region.rows:
                self.rows[id(node)] = (k, at)
            for node, off, repeat in region.sinks:
                self.reads[id(node)] = (k, off, repeat)

    def ones(self) -> list[np.ndarray]:
        return [np.ones(r.size) for r in self.regions]

    def of_value(self, value: Value, scales: Sequence[np.ndarray]) -> np.ndarray | None:
        """The scales that divide ``value``'s channels (None: not scaled)."""
        at = self.value_at.get(value.name)
        if at is None:
            inverse = self.inverse_at.get(value.name)
            if inverse is None:
                return None
            return 1.0 / take(scales[inverse[0]], inverse[1], value.channels or 0)
        k, off = at
        return take(scales[k], off, value.channels or 0)

    def region_of_value(self, value: Value) -> int | None:
        at = self.value_at.get(value.name) or self.inverse_at.get(value.name)
        return None if at is None else at[0]

    def writer(self, node: Node) -> int | None:
        """The region whose scales ``node``'s output rows take (divided, or multiplied
        for a Q -> K's q), or None."""
        at = self.writes.get(id(node)) or self.rows.get(id(node))
        return None if at is None else at[0]

    def s_in(self, node: Node, scales: Sequence[np.ndarray]) -> np.ndarray | None:
        at = self.reads.get(id(node))
        if at is None:
            return None
        k, off, repeat = at
        s = take(scales[k], off, node.in_channels // repeat)
        return np.repeat(s, repeat, axis=-1) if repeat > 1 else s

    def s_out(self, node: Node, scales: Sequence[np.ndarray]) -> np.ndarray | None:
        at = self.writes.get(id(node))
        if at is None:
            rows = self.rows.get(id(node))
            if rows is None:
                return None
            return 1.0 / take(scales[rows[0]], rows[1], node.out_channels)
        k, off = at
        return scales[k][..., off : off + node.out_channels]


class WeightTerm:
    """The noise of one layer's weight grid as a function of its input and output scales."""

    def __init__(
        self,
        node: Node,
        stats: Mapping[str, ChannelStats],
        gains: Gains,
        deployment: Deployment,
    ):
        self.node = node
        if node.op == "norm":
            # The affine's gamma as a depthwise 1x1 layer on the normalized values
            # (mean square about 1): onnxruntime quantizes LayerNormalization's scale
            # as a per-tensor weight (a 1-D tensor has no per-channel axis).
            gamma = np.asarray(node.params["gamma"]).reshape(-1)
            v = gamma.reshape(gamma.size, 1, 1, 1)
            deployment = deployment.with_(per_channel=False)
        else:
            v = grouped_view(np.asarray(node.weight), node.layout)
        self.groups, self.og, self.ig, self.kernel = v.shape
        self.symmetric = deployment.weight_symmetric
        self.per_channel = deployment.per_channel
        # Per-channel grids that span one row of every group (onnxruntime's grouped
        # ConvTranspose): a row's span is the widest of its group-mates'.
        self.shared_rows = (
            self.per_channel
            and self.groups > 1
            and node.op != "norm"
            and groups_share_row_grids(profile_for(deployment), node)
        )
        # Per (group, out, in): the largest |W|, and for asymmetric grids the positive
        # and negative extremes. The weights are read here only: every span and range
        # below is taken over these maxima, in float32 for float32 weights (they steer
        # the scales; half the memory and bandwidth of float64).
        dtype = _work_dtype(v.dtype)
        self.abs = kernel_reduce(v, tap=np.abs, dtype=dtype)
        if not self.symmetric:
            self.pos = np.maximum(kernel_reduce(v, np.maximum, dtype=dtype), 0)
            self.neg = np.maximum(-kernel_reduce(v, np.minimum, dtype=dtype), 0)
        self.row_max = self.abs.max(axis=2)  # (g, og) at scales 1: which rows are live
        # The last reduction of each kind (rows or columns of abs / pos / neg at one
        # fixed scale vector): a sweep asks for the same one several times (the convex
        # model, the balance candidate, each candidate batch) while only the other side
        # of the layer changes.
        self._memo: dict[tuple[str, str], tuple[bytes, np.ndarray]] = {}
        cin = self.groups * self.ig
        x = None if node.op == "norm" else stats_of(node.inputs[0], stats)
        if x is None or (x.channels != cin and cin % x.channels):
            # no statistics, or not of this layer's inputs (a Linear reading another
            # axis than the one the channels are on)
            meansq = np.ones(cin)
        else:
            meansq = x.meansq if x.channels == cin else np.repeat(x.meansq, cin // x.channels)
        self.energy = (self.kernel * floored(meansq, gains.floor)).reshape(self.groups, self.ig)
        gain = gains.weight_gain(node.outputs[0].name, self.groups * self.og)
        self.gain = gain.reshape(self.groups, self.og)
        self.factor = 1.0 / (grid_levels(deployment.weight_bits) ** 2 * 12.0)

    # -- reductions at one fixed scale vector, remembered -----------------------------------
    def _reduced(self, which: str, axis: int, s: np.ndarray) -> np.ndarray:
        """``max_i m[g,o,i] * s[g,i]`` (``axis=2``: per row, ``s`` the input scales) or
        ``max_o m[g,o,i] / s[g,o]`` (``axis=1``: per column, ``s`` the output scales) of
        ``m = self.<which>``; the last one of each kind is kept."""
        key = s.tobytes()
        got = self._memo.get((which, str(axis)))
        if got is not None and got[0] == key:
            return got[1]
        m = getattr(self, which)
        s = s.astype(m.dtype)
        out = (m * s[:, None, :]).max(axis=2) if axis == 2 else (m / s[:, :, None]).max(axis=1)
        out = out.astype(np.float64)
        self._memo[(which, str(axis))] = (key, out)
        return out

    def _max_product(self, which: str, si: np.ndarray, so: np.ndarray, vary: str) -> np.ndarray:
        """``max_{g,o,i} m[g,o,i] * si[c,g,0,i] / so[c,g,o,0]`` per candidate ``c``,
        formed without the (C, g, og, ig) product where one side is the same for all
        candidates."""
        if vary == "out":
            row = self._reduced(which, 2, si[0, :, 0, :])  # (g, og): over the candidates' s_out
            return (row / so[..., 0]).max(axis=(1, 2))
        if vary == "in":
            col = self._reduced(which, 1, so[0, :, :, 0])  # (g, ig)
            return (col * si[:, :, 0, :]).max(axis=(1, 2))
        m = getattr(self, which)
        return np.array([float((m * si[c] / so[c]).max()) for c in range(si.shape[0])])

    def _row_max(self, which: str, si: np.ndarray, vary: str) -> np.ndarray:
        """``max_i m[g,o,i] * si[c,g,0,i]`` -> (C, g, og), in blocks of candidates."""
        count = si.shape[0]
        if vary == "out" or count == 1:  # one input scale vector: the remembered rows
            row = self._reduced(which, 2, si[0, :, 0, :])
            return np.broadcast_to(row, (count, self.groups, self.og))
        m = getattr(self, which)
        if count > 1 and m.size * count >= _PRUNE_FROM:
            got = _pruned_row_max(m, si[:, :, 0, :].astype(m.dtype))
            if got is not None:
                return got
        step = max(1, _CHUNK // max(1, m.size))
        out = np.empty((count, *m.shape[:2]))
        for a in range(0, count, step):
            out[a : a + step] = (m[None] * si[a : a + step].astype(m.dtype)).max(axis=3)
        return out

    # -- spans ---------------------------------------------------------------------------
    def _tensor_span(self, si: np.ndarray, so: np.ndarray, vary: str) -> np.ndarray:
        """Per candidate: the span of the whole scaled tensor. ``si`` (C, g, 1, ig),
        ``so`` (C, g, og, 1); ``vary``: which of them differ between candidates."""
        return self.span_of(self._extremes(si, so, vary))

    def _extremes(self, si: np.ndarray, so: np.ndarray, vary: str) -> np.ndarray:
        """Per candidate, the scaled tensor's largest ``|W|`` (symmetric grids) or its
        largest positive and negative parts: (1 or 2, C)."""
        if self.symmetric:
            return self._max_product("abs", si, so, vary)[None]
        return np.stack([self._max_product(w, si, so, vary) for w in ("pos", "neg")])

    def span_of(self, extremes: np.ndarray) -> np.ndarray:
        """The grid's span over weights with these ``extremes`` (C,)."""
        return 2.0 * extremes[0] if self.symmetric else extremes[0] + extremes[1]

    def extremes(
        self, s_in: np.ndarray | None, s_out: np.ndarray | None, vary: str = "both"
    ) -> np.ndarray:
        """:meth:`_extremes` at scales given as to :meth:`values`: the part of a grid
        shared with other layers' weights that this layer's weights span."""
        return self._extremes(*self._shaped(s_in, s_out), vary)

    def _shaped(self, s_in, s_out) -> tuple[np.ndarray, np.ndarray]:
        """``s_in`` (C, g, 1, ig) and ``s_out`` (C, g, og, 1), ones where None."""
        g, og, ig = self.groups, self.og, self.ig
        count = max((len(s) for s in (s_in, s_out) if s is not None), default=1)
        si = np.ones((1, g, 1, ig)) if s_in is None else s_in.reshape(-1, g, 1, ig)
        so = np.ones((1, g, og, 1)) if s_out is None else s_out.reshape(-1, g, og, 1)
        # (broadcast only where needed: np.broadcast_to costs more than the small
        # arrays' arithmetic, at every candidate batch)
        if si.shape[0] != count:
            si = np.broadcast_to(si, (count, g, 1, ig))
        if so.shape[0] != count:
            so = np.broadcast_to(so, (count, g, og, 1))
        return si, so

    def _row_spans(self, si: np.ndarray, so: np.ndarray, vary: str) -> np.ndarray:
        """Per candidate and row: the span of row ``o``'s grid over ``W * s_in``, in the
        row's own output units (its own scale cancels in its noise). ``si`` (C, g, 1,
        ig), ``so`` (C, g, og, 1) -> (C, g, og)."""
        if self.symmetric:
            spans = 2.0 * self._row_max("abs", si, vary)
        else:
            spans = self._row_max("pos", si, vary) + self._row_max("neg", si, vary)
        if self.shared_rows:
            # one grid over the scaled rows of every group, read back in each row's units
            out = so[..., 0]
            spans = (spans / out).max(axis=1, keepdims=True) * out
        return spans

    # -- values --------------------------------------------------------------------------
    def values(
        self,
        s_in: np.ndarray | None,
        s_out: np.ndarray | None,
        vary: str = "both",
        span: np.ndarray | None = None,
    ) -> np.ndarray:
        """The term for ``C`` candidate scales at once: ``s_in`` (C, in channels) and
        ``s_out`` (C, out channels), or None for scales 1. ``vary``: ``"in"``, ``"out"``
        or ``"both"``, which of them differ between the candidates (one row of the other
        may be given). ``span`` (C,) overrides a per-tensor grid's span (a grid shared
        with other layers' weights). Returns (C,)."""
        si, so = self._shaped(s_in, s_out)
        inv_sq = 1.0 / np.square(si[:, :, 0, :])  # (C, g, ig)
        energy = np.einsum("gi,cgi->cg", self.energy, inv_sq)  # (C, g)
        if self.per_channel:
            spans = self._row_spans(si, so, vary)
            return self.factor * np.einsum("cgo,go,cg->c", np.square(spans), self.gain, energy)
        out = np.einsum("go,cgo->cg", self.gain, np.square(so[..., 0]))
        span = self._tensor_span(si, so, vary) if span is None else span
        return self.factor * np.square(span) * np.einsum("cg,cg->c", out, energy)

    def value(self, s_in: np.ndarray | None, s_out: np.ndarray | None) -> float:
        si = None if s_in is None else np.asarray(s_in, np.float64)[None]
        so = None if s_out is None else np.asarray(s_out, np.float64)[None]
        return float(self.values(si, so, "out")[0])

    # -- the convex model of one region's solve --------------------------------------------
    def sink_ranges(
        self, s_out: np.ndarray | None, coefficients: bool = True
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Per input channel: the largest scaled ``|W|`` over the rows, and the noise
        coefficient at fixed output scales (the per-tensor form, which the per-channel
        grids are majorized by: a row's span is at most the tensor's); None for it
        unless ``coefficients`` (the balance needs the ranges only)."""
        so = np.ones((self.groups, self.og)) if s_out is None else s_out.reshape(self.groups, -1)
        ranges = self._reduced("abs", 1, so).reshape(-1)
        if not coefficients:
            return ranges, None
        c = (self.gain * np.square(so)).sum(axis=1)[:, None] * self.energy
        return ranges, c.reshape(-1)

    def source_ranges(
        self, s_in: np.ndarray | None, coefficients: bool = True
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Per output channel: the largest scaled ``|W|`` of the row and the noise
        coefficient at fixed input scales (None unless ``coefficients``)."""
        si = np.ones((self.groups, self.ig)) if s_in is None else s_in.reshape(self.groups, -1)
        ranges = self._reduced("abs", 2, si).reshape(-1)
        if not coefficients:
            return ranges, None
        c = self.gain * (self.energy / np.square(si)).sum(axis=1)[:, None]
        return ranges, c.reshape(-1)

    @property
    def log_factor(self) -> float:
        return math.log(self.factor * 4.0)  # the span is twice the largest |W|


@dataclass
class ActivationTerm:
    """The noise of one activation grid (a :class:`cle_core._deployment.Point`)."""

    point: Point
    lo: np.ndarray  # per channel, original units: the values the grid must span
    hi: np.ndarray
    coef: np.ndarray  # per channel: non-zero fraction times the gain where noise is added
    factor: float
    symmetric: bool
    cap_lo: np.ndarray | None = None  # pre_bound: the clip's bounds (original units)
    cap_hi: np.ndarray | None = None

    def spans(self, s: np.ndarray) -> np.ndarray:
        """The grid's span at channel scales ``s`` (C, channels) -> (C,), in units of the
        scaled model."""
        lo, hi = self.lo / s, self.hi / s
        if self.cap_hi is not None:
            # A scalar clip to the widest scaled bounds comes first.
            top = np.max(self.cap_hi / s, axis=1, keepdims=True)
            bottom = np.min(self.cap_lo / s, axis=1, keepdims=True)
            lo, hi = np.clip(lo, bottom, top), np.clip(hi, bottom, top)
        if self.symmetric:
            return 2.0 * np.max(np.maximum(np.abs(lo), np.abs(hi)), axis=1)
        return np.maximum(np.max(hi, axis=1), 0.0) - np.minimum(np.min(lo, axis=1), 0.0)

    def values(self, s: np.ndarray, spans: np.ndarray | None = None) -> np.ndarray:
        """The term for candidate scales ``s`` (C, channels); ``spans`` overrides the
        grid's span (a requantization on another tensor's grid)."""
        with np.errstate(over="ignore", invalid="ignore"):
            spans = self.spans(s) if spans is None else spans
            out = self.factor * np.square(spans) * (np.square(s) @ self.coef)
        if self.point.unless_uniform is not None:
            # One scalar clip where the scales are equal: no second grid.
            uniform = np.ptp(s, axis=1) <= 1e-9 * np.max(s, axis=1)
            out = np.where(uniform, 0.0, out)
        return out

    def cap_active(self, s: np.ndarray) -> bool:
        """Whether the scalar clip cuts this grid's span at scales ``s`` (a pre-bound
        term whose channels saturate beyond the widest bound)."""
        if self.cap_hi is None:
            return False
        with np.errstate(divide="ignore", invalid="ignore"):
            return float(np.max(self.cap_hi / s)) < float(np.max(self.hi / s))


class Estimate:
    """The estimated output noise-to-signal ratio of ``graph`` quantized as ``deployment``,
    as a function of the scales of ``regions`` (see the module)."""

    def __init__(
        self,
        graph: Graph,
        regions: Sequence[Region],
        deployment: Deployment,
        stats: Mapping[str, ChannelStats],
        gains: Gains,
        positions: Mapping[str, int],
    ):
        self.graph = graph
        self.deployment = deployment
        self.map = ScaleMap(regions)
        profile = profile_for(deployment)
        self.weights = [
            WeightTerm(n, stats, gains, deployment)
            for n in graph.nodes
            if quantizes_weight(profile, n, deployment)
        ]
        # Layers whose weights the quantizer rounds on one grid (parts of one packed
        # tensor): each term's span is the group's, whichever region scales a part.
        by_node = self._weight_of = {id(t.node): t for t in self.weights}
        self.grids: dict[int, list[WeightTerm]] = {}
        for group in shared_weight_grids(profile, [t.node for t in self.weights], deployment):
            terms = [by_node[id(n)] for n in group if id(n) in by_node]
            for t in terms if len(terms) > 1 and not deployment.per_channel else ():
                self.grids[id(t)] = terms
        self.activations: list[ActivationTerm] = []
        if not deployment.weights_only:
            factor = 1.0 / (grid_levels(deployment.activation_bits) ** 2 * 12.0)
            sym = deployment.activation_symmetric
            carried = frozenset(
                id(clip) for region in regions for clip, _ in region.clips if _bounded(clip)
            )
            by_value: dict[str, ActivationTerm] = {}
            for point in profile.points(graph, carried):
                if point.kind == "copy":
                    continue  # rounds nothing
                term = _activation_term(point, stats, gains, positions, factor, sym, by_value)
                if term is not None:
                    self.activations.append(term)
                    if point.kind != "requant":
                        by_value.setdefault(point.value.name, term)
        self._local = [self._terms_of(k) for k in range(len(self.map.regions))]
        self.live = [self._live(k) for k in range(len(self.map.regions))]
        self._ones: tuple[dict[int, float], float] | None = None  # see _at_ones

    # -- whole-graph values ------------------------------------------------------------
    def ones(self) -> list[np.ndarray]:
        return self.map.ones()

    def weight_values(self, scales: Sequence[np.ndarray]) -> list[float]:
        fixed = [s[None] for s in scales]
        return [float(self._weight_values(t, fixed, None)[0]) for t in self.weights]

    def activation_values(self, scales: Sequence[np.ndarray]) -> list[float]:
        out = []
        for t in self.activations:
            s, spans = self._activation_scales(t, scales, None, None)
            out.append(float(t.values(s, spans)[0]))
        return out

    def total(self, scales: Sequence[np.ndarray] | None = None) -> float:
        """The estimated output noise-to-signal ratio at ``scales`` (default: all 1)."""
        if scales is None or _all_ones(scales):
            return self._at_ones()[1]
        return float(sum(self.weight_values(scales)) + sum(self.activation_values(scales)))

    def _at_ones(self) -> tuple[dict[int, float], float]:
        """Each term's value at no scaling (by ``id`` of the term) and the total, taken
        once: the search starts there, and each region's part of it is reported. The
        terms do not change after ``__init__``; at scales 1 every way of forming a term
        (whichever side a region's candidates vary) gives the same value."""
        if self._ones is None:
            ones = self.ones()
            weights, acts = self.weight_values(ones), self.activation_values(ones)
            values = dict(zip(map(id, self.weights), weights, strict=True))
            values.update(zip(map(id, self.activations), acts, strict=True))
            self._ones = values, float(sum(weights) + sum(acts))
        return self._ones

    @staticmethod
    def sqnr_db(total: float) -> float:
        """``total`` as an SQNR in dB."""
        if total <= 0:
            return math.inf
        return -10.0 * math.log10(total) if math.isfinite(total) else -math.inf

    # -- one region ----------------------------------------------------------------------
    def _live(self, k: int) -> np.ndarray:
        """Channels of region ``k`` that some source writes (a row of weights, or a
        norm's affine, not all zero): a dead channel keeps its scale."""
        region = self.map.regions[k]
        live = np.zeros(region.size, bool)
        for node, off in region.sources:
            if node.op == "norm":
                rows = np.asarray(node.params["gamma"]).reshape(-1) != 0
                beta = node.params.get("beta")
                if beta is not None:
                    rows = rows | (np.asarray(beta).reshape(-1) != 0)
            elif id(node) in self._weight_of:  # its largest |W| per row, already taken
                rows = (self._weight_of[id(node)].row_max > 0).reshape(-1)
            else:
                w = grouped_view(np.asarray(node.weight), node.layout)
                rows = (np.abs(w).max(axis=(2, 3)) > 0).reshape(-1)
            live[off : off + rows.shape[0]] |= rows
        if region.frozen is not None:
            live &= ~region.frozen  # a part that cannot be scaled keeps scale 1
        if region.ties is not None:  # tied channels move together
            live = tie(live.astype(np.float64), region.ties, log=True) > 0
        return live

    def _terms_of(self, k: int) -> tuple[list[WeightTerm], list[ActivationTerm]]:
        touched = {
            id(t)
            for t in self.weights
            if self.map.reads.get(id(t.node), (None,))[0] == k or self.map.writer(t.node) == k
        }
        for i in list(touched):  # a shared grid's span changes every part's term
            touched.update(id(t) for t in self.grids.get(i, ()))
        weights = [t for t in self.weights if id(t) in touched]
        acts = []
        for t in self.activations:
            values = [t.point.value] + ([t.point.grid_of] if t.point.grid_of is not None else [])
            if any(self.map.region_of_value(v) == k for v in values):
                acts.append(t)
        return weights, acts

    def region_value(self, k: int, scales: Sequence[np.ndarray]) -> float:
        """The terms that region ``k``'s scales change, at ``scales``."""
        if _all_ones(scales, k):
            values, total = self._at_ones()[0], 0.0
            for t in (*self._local[k][0], *self._local[k][1]):  # region_values' order
                total += values[id(t)]
            return total
        return float(self.region_values(k, scales, scales[k][None])[0])

    def region_values(
        self, k: int, scales: Sequence[np.ndarray], candidates: np.ndarray
    ) -> np.ndarray:
        """The terms that region ``k``'s scales change, for each row of ``candidates``
        (C, region size) as region ``k``'s scales and ``scales`` for the others."""
        candidates = np.asarray(candidates, np.float64)
        trial = list(scales)
        trial[k] = candidates
        fixed = [s[None] if i != k else s for i, s in enumerate(trial)]
        total = np.zeros(candidates.shape[0])
        weights, acts = self._local[k]
        with np.errstate(over="ignore", invalid="ignore"):
            for t in weights:
                total += self._weight_values(t, fixed, k)
            for t in acts:
                s, spans = self._activation_scales(t, fixed, k, candidates.shape[0])
                total += t.values(s, spans)
        return total

    def _vary(self, t: WeightTerm, k: int | None) -> str:
        """Which of ``t``'s scales region ``k``'s candidates change (see
        :meth:`WeightTerm.values`); ``"out"`` where none (one candidate)."""
        reads = k is not None and self.map.reads.get(id(t.node), (None,))[0] == k
        writes = k is not None and self.map.writer(t.node) == k
        return "both" if reads and writes else ("in" if reads else "out")

    def _weight_values(self, t: WeightTerm, scales, k: int | None) -> np.ndarray:
        """``t`` at ``scales`` (one row per region, or candidates for region ``k``)."""
        s_in, s_out = self.map.s_in(t.node, scales), self.map.s_out(t.node, scales)
        group = self.grids.get(id(t))
        span = None if group is None else self._shared_span(group, scales, k)
        return t.values(s_in, s_out, self._vary(t, k), span)

    def _shared_span(self, group: list[WeightTerm], scales, k: int | None) -> np.ndarray:
        """The span of one grid over the weights of ``group`` at ``scales``: its largest
        values over every part, each part scaled by the regions it reads and writes."""
        parts = [
            t.extremes(
                self.map.s_in(t.node, scales), self.map.s_out(t.node, scales), self._vary(t, k)
            )
            for t in group
        ]
        return group[0].span_of(np.maximum.reduce(np.broadcast_arrays(*parts)))

    def _activation_scales(self, t: ActivationTerm, scales, k, count):
        """The scales of ``t``'s channels (C, c), and the spans of the grid it is
        requantized on (C,), or None."""
        c = t.lo.shape[0]

        def of(value: Value) -> np.ndarray:
            got = self.map.of_value(value, scales)
            if got is None:
                return np.ones((count or 1, c))
            got = np.atleast_2d(got)
            return np.broadcast_to(got, (count or got.shape[0], got.shape[-1]))

        s = of(t.point.value)
        spans = None
        if t.point.kind == "requant":
            spans = t.spans(of(t.point.grid_of))
        return s, spans

    def region_terms(self, k: int, scales: Sequence[np.ndarray]) -> Terms:
        """Region ``k``'s terms in the convex form of :mod:`cle_core._noise` at the
        other regions' ``scales``: per-tensor weight terms (per-channel grids are
        majorized by them), activation terms, a pre-bound grid on the smaller of its
        two maxima at the current scales (majorize-minimize), and a second grid after a
        clip's per-channel bounds counted as if the scales were not equal. A layer whose
        grid spans other layers' weights too (``weight_group``) counts its own weights
        and noise only: the wider grid and the other parts' noise do not fit this form
        (not a majorizer there); the objective judges every candidate by the estimate
        and moves it by one number to find the shared grid's gain."""
        region = self.map.regions[k]
        n = region.size
        live = self.live[k]
        rows: list[tuple[float, float, np.ndarray, np.ndarray]] = []

        def add(sign: float, logw: float, off, ranges: np.ndarray, c: np.ndarray) -> None:
            off, ranges, c = gather_terms(n, off, ranges, c)
            alpha, logc = np.full(n, -np.inf), np.full(n, -np.inf)
            sl = slice(off, off + ranges.shape[0])
            with np.errstate(divide="ignore"):
                alpha[sl] = np.log(ranges)
                logc[sl] = np.log(np.maximum(c, 0.0))
            rows.append((sign, logw, alpha, logc))

        weights, acts = self._local[k]
        for t in weights:
            rd, wr = self.map.reads.get(id(t.node)), self.map.writes.get(id(t.node))
            qrows = self.map.rows.get(id(t.node))
            if rd is not None and rd[0] == k:
                if self.map.writer(t.node) == k:
                    continue  # reads and writes this region: not of the convex form
                ranges, c = t.sink_ranges(self.map.s_out(t.node, scales))
                repeat = rd[2]
                if repeat > 1:
                    ranges = ranges.reshape(-1, repeat).max(axis=1)
                    c = c.reshape(-1, repeat).sum(axis=1)
                add(1.0, t.log_factor, rd[1], ranges, c)
            elif wr is not None and wr[0] == k:
                ranges, c = t.source_ranges(self.map.s_in(t.node, scales))
                add(-1.0, t.log_factor, wr[1], ranges, c)
            elif qrows is not None and qrows[0] == k:
                # a Q -> K's q: rows multiplied by the scales, a sink's exponents
                ranges, c = t.source_ranges(self.map.s_in(t.node, scales))
                add(1.0, t.log_factor, qrows[1], ranges, c)
        for t in acts:
            at = self.map.value_at.get(t.point.value.name)
            sign = -1.0
            if at is None:
                at, sign = self.map.inverse_at.get(t.point.value.name), 1.0
            if at is None or at[0] != k:
                continue  # a requantization of this region's grid elsewhere: left out
            off = at[1]
            s = take(scales[k], off, t.lo.shape[0]) ** -sign
            hi = t.cap_hi if t.cap_active(s) else t.hi
            span = np.maximum(hi, 0.0) - np.minimum(t.lo, 0.0)
            if t.symmetric:
                span = np.maximum(np.abs(t.lo), np.abs(hi))
            logw = math.log(t.factor * (4.0 if t.symmetric else 1.0))
            add(sign, logw, off, span, t.coef)
        if not rows:
            return Terms(np.zeros(0), np.zeros(0), np.zeros((0, n)), np.zeros((0, n)))
        sign, logw, alpha, logc = zip(*rows, strict=True)
        alpha = np.where(live, np.stack(alpha), -np.inf)
        logc = np.where(live, np.stack(logc), -np.inf)
        return Terms(np.array(sign), np.array(logw), alpha, logc)


def _all_ones(scales: Sequence[np.ndarray], first: int | None = None) -> bool:
    """Whether every scale is 1 (``scales[first]`` looked at first: the likeliest not)."""
    if first is not None and np.any(scales[first] != 1.0):
        return False
    return not len(scales) or bool(np.all(np.concatenate([np.ravel(s) for s in scales]) == 1.0))


def _pruned_row_max(m: np.ndarray, s: np.ndarray) -> np.ndarray | None:
    """``max_i m[g,o,i] * s[c,g,i]`` -> (C, g, og) in float64, for ``m >= 0`` and ``s``
    of one dtype: the same values as the full (C, g, og, ig) product, from the columns
    that can hold a row's maximum for some candidate only. A column whose product at the
    candidates' largest scale stays below the row's maximum at their smallest cannot
    (rounding is monotone, so the comparison is exact in the products' dtype). On
    Lite0's per-channel solve about 3 % of the entries are kept. None where that does
    not hold (a scale not finite and positive, a row of NaN): take the full product."""
    if not (np.all(s > 0) and np.all(np.isfinite(s))):
        return None
    floor = (m * s.min(axis=0)[:, None, :]).max(axis=2)  # (g, og): no row max is below
    keep = m * s.max(axis=0)[:, None, :] >= floor[:, :, None]
    counts = keep.sum(axis=2).reshape(-1)
    if not counts.all():  # (a row of NaN keeps nothing)
        return None
    g, o, i = np.nonzero(keep)  # row-major: each row's columns together
    starts = np.zeros(floor.size, np.intp)
    np.cumsum(counts[:-1], out=starts[1:])
    products = m[g, o, i] * s[:, g, i]  # (C, kept)
    out = np.maximum.reduceat(products, starts, axis=1)
    return out.reshape(s.shape[0], *floor.shape).astype(np.float64)


def _bounded(clip: Node) -> bool:
    """Whether scaling changes a clip's bounds (a ReLU's 0 and +inf stay as they are)."""
    return bool(np.any(np.isfinite(clip.params["hi"])) or np.any(clip.params["lo"] != 0))


def _activation_term(point, stats, gains, positions, factor, symmetric, by_value):
    v = point.value
    c = v.channels or 0
    if point.kind == "requant":
        grid = by_value.get(point.grid_of.name)
        out = stats_of(v, stats)
        if grid is None or out is None or out.channels != c or grid.lo.shape[0] != c:
            return None
        gain = gains.rounding_gain(v.name, c, positions.get(v.name, 1))
        return ActivationTerm(
            point, grid.lo, grid.hi, out.nonzero * gain, factor, symmetric, grid.cap_lo, grid.cap_hi
        )
    st = stats_of(v, stats)
    if st is None or st.channels != c or c == 0:
        return None
    gain = gains.rounding_gain(v.name, c, positions.get(v.name, 1))
    if point.kind == "pre_bound":
        clip = point.clip
        out = stats_of(clip.outputs[0], stats)
        if out is None or out.channels != c:
            return None
        lo = np.broadcast_to(np.asarray(clip.params["lo"], np.float64).reshape(-1), (c,))
        hi = np.broadcast_to(np.asarray(clip.params["hi"], np.float64).reshape(-1), (c,))
        return ActivationTerm(
            point, st.lo, st.hi, out.nonzero * gain, factor, symmetric, lo.copy(), hi.copy()
        )
    return ActivationTerm(point, st.lo, st.hi, st.nonzero * gain, factor, symmetric)
