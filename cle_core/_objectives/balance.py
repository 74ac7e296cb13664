"""The balance objective: the paper's and AIMET's rule, iterated to convergence.

Every region balances its sources' largest output range against its sinks' largest input
range, ``s = sqrt(r_source / r_sink)`` per channel, and Conv -> depthwise Conv -> Conv
chains take the paper's closed form for triples. The iteration works on per-(output,
input) channel ``max |W|`` summaries and never touches the weights. Regions are swept in
graph order (Gauss-Seidel, with Anderson acceleration over the last sweeps) until no
scale moves by more than the tolerance.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from .._ir import SCALABLE_ACTIVATIONS
from .._math import RangeSummary, region_scales, triple_scales
from .._regions import Region, gather_terms, tie
from .._report import SkipRecord
from .._scale import _Links, _names, _triples
from . import ScaleOutcome, ScaleProblem, register_objective

_HISTORY = 3
BALANCE_TOLERANCE = 1e-4


class BalanceObjective:
    """Equal weight ranges (the paper, AIMET), converged; ``activation_weight`` adds
    estimated activation ranges as sources (deprecated)."""

    name = "balance"
    description = "the paper's and AIMET's equal per-channel weight ranges, converged"
    uses_statistics = False  # weights only: calibration statistics change nothing
    uses_activation_weight = True

    def __init__(self, magnitudes: Mapping[int, np.ndarray] | None = None):
        # Per layer (by the id of its node), max |W| over its kernel where the caller
        # has it (the noise objective's estimate keeps it): not taken again.
        self.magnitudes = magnitudes

    def choose(self, problem: ScaleProblem) -> ScaleOutcome:
        options = problem.options
        tolerance = options.tolerance if options.tolerance is not None else BALANCE_TOLERANCE
        # A norm's affine is not quantized: its "weight range" says nothing, and the
        # balance would move every range onto it. Such regions keep scales of 1.
        normed = [r for r in problem.regions if any(n.op == "norm" for n, _ in r.sources)]
        outcome = scale_regions(
            [r for r in problem.regions if r not in normed],
            options.max_sweeps,
            tolerance,
            problem.on_sweep,
            options.activation_weight,
            self.magnitudes,
        )
        for r in normed:
            outcome.scales[r.id] = np.ones(r.size)
            outcome.skips.append(
                SkipRecord(
                    "scale",
                    r.describe(),
                    "the balance has no weight range for a norm's affine (it is not "
                    "quantized): objective='noise' equalizes this region",
                )
            )
        return outcome


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
    magnitudes: Mapping[int, np.ndarray] | None = None,
) -> ScaleOutcome:
    """The balanced scales of every region (the graph is not changed). ``magnitudes``:
    see :class:`cle_core._math.RangeSummary`, by the id of each layer's node."""
    links = _Links(regions)
    given = magnitudes or {}
    summaries = {
        key: RangeSummary(node.weight, node.layout, given.get(key))
        for key, node in links.nodes.items()
    }
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
            off, per_channel, _ = gather_terms(region.size, off, per_channel, per_channel)
            window = snk[off : off + len(per_channel)]
            np.maximum(window, per_channel, out=window)
        for node, at in region.rows:
            # q of a Q -> K pair: its rows are multiplied, as a sink's columns are
            out_r = summaries[id(node)].out_ranges(links.s_in(node, scales))
            at, out_r, _ = gather_terms(region.size, at, out_r, out_r)
            window = snk[at : at + len(out_r)]
            np.maximum(window, out_r, out=window)
        if region.id in floors:
            np.maximum(src, floors[region.id], out=src)
        s = tie(region_scales([src], [snk]), region.ties)  # a rotary's pairs: one scale
        if region.frozen is not None:
            s[region.frozen] = 1.0  # a part that cannot be scaled
        return s

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
    return ScaleOutcome(scales, sweeps, converged, max_change, _names(triples))


register_objective(BalanceObjective())
