"""The noise objective: the scales that minimize the estimated quantization noise of the
deployment the user names (:class:`cle_core.Deployment`).

The estimate (:mod:`cle_core._estimate`) counts every grid the deployment puts into the
model: each layer's weight grid (per tensor or per output channel) and each activation
grid where the quantizer's profile places it, including the second grid after a clip
whose bounds scaling makes per channel. It is minimized region by region (block
coordinate descent, regions that share no layer solved together), starting from no
scaling or, for weights-only deployments, from the weight-range balance (30 sweeps of
it), whichever the estimate calls better. Each region keeps the best of a few
candidates, measured by the estimate itself:

- its current scales (so the estimate can never rise: the result is never estimated
  worse than no equalization, which the start is at least as good as);
- no scaling of this region;
- the exact minimizer of the region's convex model (:mod:`cle_core._noise`): per-tensor
  weight grids and the activation grids (per-channel grids are majorized by the
  per-tensor ones; a second grid after a clip is counted as if the scales differ);
- the weight-range balance, the activation-range balance and blends of the two (what
  per-channel weight grids leave to gain: activation grids, at a bounded cost in the
  layers' columns), and half the convex minimizer's step.

Sweeps stop when one lowers the estimate by less than ``tolerance`` of it, or after the
first when it gained less than half of :data:`MIN_GAIN_DB` (nothing would be applied).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import replace

import numpy as np

from .. import _noise
from .._estimate import Estimate
from .._gains import propagate
from .._math import LastKernelSums
from .._regions import gather_terms, tie
from .._report import NOISE_TOLERANCE, NoiseEstimate, SkipRecord
from .._stats import counts_known, positions
from .._stats import estimate as estimate_stats
from . import ScaleOutcome, ScaleProblem, register_objective
from .balance import BalanceObjective

logger = logging.getLogger("cle_core")

# |log-scale| any candidate may reach: a factor of 10^4 either way, as the convex solve.
_T_BOUND = math.log(1e4)
_BLENDS = ((1.0, 0.0), (0.5, 0.0), (0.0, 1.0), (0.0, 0.5), (0.5, 0.5), (1.0, 1.0))
# Interior-point steps per convex solve. Fewer would be faster but are not safe: 4 steps
# gave higher estimates than 15 on bench_deployments' networks (Lite0 W8A8 18.37 against
# 17.98 dB) and lower measurements (Lite0 W8A8 11.44 against 12.43 dB, quantize_static).
_CONVEX_STEPS = 15
# The move of a region's scales by one number (_shifted): 3 levels of 17 moves, the
# last spaced 1 % apart.
_SHIFT_LEVELS, _SHIFT_STEPS = 3, 8
# Sweeps of the balance a weights-only search may start from (it need not be converged:
# it is a start; the balance objective takes about 110 on Lite0). 30 on
# bench_deployments.py (with no gain floor): the 27 cases' means +1.2 / +0.4 dB W8 /
# W8/ch, Lite0 W8 15.4 -> 18.8 dB.
_BALANCE_START_SWEEPS = 30
MIN_GAIN_DB = 1.0
"""Scales whose estimated gain is smaller are not applied (see :meth:`NoiseObjective.choose`)."""
_FIRST_SWEEP_DB = 0.5 * MIN_GAIN_DB  # less after the first sweep: stop, as nothing will be applied


class NoiseUnavailable(Exception):
    """The noise estimate cannot guide the scales on this graph (it is not finite)."""


class NoiseObjective:
    """Minimize the estimated output noise of the named deployment."""

    name = "noise"
    description = "the least estimated quantization noise for the deployment (default)"
    fallback = "balance"  # where the estimate is not finite (NoiseUnavailable)

    def choose(self, problem: ScaleProblem) -> ScaleOutcome:
        try:
            with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
                return self._choose(problem)
        except NoiseUnavailable as e:
            reason = f"{e}; the weight-range balance chose the scales instead"
            logger.warning("noise objective: %s", reason)
            outcome = BalanceObjective().choose(problem)
            outcome.skips.append(SkipRecord("scale", "noise objective", reason))
            return outcome

    def _choose(self, problem: ScaleProblem) -> ScaleOutcome:
        graph, regions, options = problem.graph, problem.regions, problem.options
        deployment = options.deployment
        est = problem_estimate(problem)
        scales = est.ones()
        before = est.total(scales)
        if not math.isfinite(before):
            raise NoiseUnavailable(
                "the estimated output noise overflows float64 (activation statistics or "
                "their gains to the output grow beyond 1e308 through the network: untrained "
                "weights?)"
            )
        region_before = {r.id: est.region_value(k, scales) for k, r in enumerate(regions)}
        # Weights only, the search starts from no scaling or from the weight-range
        # balance, whichever the estimate calls better: regions moved one at a time from
        # no scaling stopped short of scales the estimate itself preferred (functional/2
        # W8/ch: 36.2 dB where the balance is 38.1 estimated, 39.6 measured). Where
        # activations are rounded the balance, blind to them, is not tried as a start.
        start = _balance_start(problem, est, before) if deployment.weights_only else None
        history = [before]
        if start is not None:
            scales = start
            history = [est.total(scales)]
        tolerance = options.tolerance if options.tolerance is not None else NOISE_TOLERANCE
        groups, neighbors = _colors(est)
        # each region's activation balance depends on nothing a sweep changes
        act_balances = [_activation_balance(est, k, est.live[k]) for k in range(len(regions))]
        dirty = set(range(len(regions)))
        sweeps, converged, max_change = 0, not regions, 0.0
        while regions and sweeps < options.max_sweeps:
            sweeps += 1
            if problem.on_sweep is not None:
                problem.on_sweep(sweeps)
            max_change, gained = 0.0, 0.0
            for group in groups:
                # A region whose scales and neighbours' scales did not change since its
                # last visit would choose the same again: it is not visited.
                group = [k for k in group if k in dirty]
                dirty.difference_update(group)
                if not group:
                    continue
                # An inexact solve is enough: it is one candidate, and the estimate
                # itself decides. (Solving it in the first sweep only saves a third of
                # the time and cost 0.7 dB W8A8 on average over bench_deployments.py.)
                convex = _noise.solve_many(
                    [est.region_terms(k, scales) for k in group],
                    [np.log(scales[k]) for k in group],
                    tolerance=1e-3,
                    max_steps=_CONVEX_STEPS,
                )
                for k, t_convex in zip(group, convex, strict=True):
                    t_now = np.log(scales[k])
                    cands = _candidates(est, k, scales, t_now, t_convex, act_balances[k])
                    values = est.region_values(k, scales, np.exp(cands))
                    values = np.where(np.isfinite(values), values, np.inf)
                    now = values[0]  # row 0: the current scales
                    if _gauge_bound(est, k):
                        cands, values = _shifted(est, k, scales, cands, values)
                    best = int(np.argmin(values))
                    t_best, v_best = cands[best], values[best]
                    if v_best < now:
                        scales[k] = np.exp(t_best)
                        dirty.add(k)
                        dirty.update(neighbors[k])
                        gained += float(now - v_best)
                        change = float(np.max(np.abs(np.expm1(t_best - t_now))))
                        max_change = max(max_change, change)
            # Each step changes the total by exactly its region's change.
            history.append(history[-1] - gained)
            if max_change == 0.0 or history[-2] - history[-1] <= tolerance * history[-2]:
                converged = True
                break
            if (
                sweeps == 1
                and 0 < history[-1]
                and before < history[-1] * 10 ** (_FIRST_SWEEP_DB / 10)
            ):
                # The later sweeps never added more than a quarter of the first one's gain
                # (bench_deployments.py's networks, one seed, four deployments): this search
                # would end below MIN_GAIN_DB, and nothing would be applied (per-channel
                # grids, mostly).
                converged = True
                break
        history[-1] = est.total(scales)  # the sum of steps, recomputed without drift
        skips, after = [], history[-1]
        gain_db = 10.0 * math.log10(before / after) if after > 0 else math.inf
        if regions and gain_db < MIN_GAIN_DB:
            # The estimate's error, measured against onnxruntime over 27 networks and
            # four deployments, is larger than this: a smaller gain is as likely a loss
            # (benchmarks/bench_deployments.py, docs/benchmarks.rst).
            scales, after = est.ones(), before
            skips.append(
                SkipRecord(
                    "scale",
                    "noise objective",
                    f"the estimated gain ({gain_db:.2f} dB) is below {MIN_GAIN_DB:g} dB, within "
                    "the estimate's error: no region was scaled",
                )
            )
        return ScaleOutcome(
            scales={r.id: scales[k] for k, r in enumerate(regions)},
            sweeps=sweeps,
            converged=converged,
            max_change=max_change,
            estimate=NoiseEstimate(
                before, after, tuple(history), counts_known(graph), deployment.describe()
            ),
            region_before=region_before,
            region_after={r.id: est.region_value(k, scales) for k, r in enumerate(regions)},
            skips=skips,
        )


def problem_estimate(problem: ScaleProblem) -> Estimate:
    """The noise estimate of ``problem``'s deployment on its graph and regions (data-free
    statistics, or the measured ones ``problem`` carries); :class:`NoiseUnavailable` where
    no graph output can be followed."""
    graph = problem.graph
    sums = LastKernelSums()  # the head layer's, taken by both walks
    stats, derivatives = estimate_stats(graph, problem.statistics, kernel_sums=sums)
    counts = positions(graph)
    observed = observed_outputs(graph, stats)
    if not observed:
        raise NoiseUnavailable(
            "no output the estimate can follow: every graph output is behind an "
            "operation the IR does not translate"
        )
    power = {
        v.name: float(stats[v.name].meansq.sum()) * counts.get(v.name, 1)
        for v in observed
        if v.name in stats
    }
    gains = propagate(graph, counts, derivatives, power, outputs=observed, kernel_sums=sums)
    if problem.options.deployment.weights_only:
        gains = replace(gains, floor=0.0)  # no activation grid to guard (see FLOOR)
    return Estimate(graph, problem.regions, problem.options.deployment, stats, gains, counts)


def observed_outputs(graph, stats: Mapping | None = None) -> list:
    """The values the noise is measured at: each graph output whose channels the IR
    knows (and, given ``stats``, whose statistics the estimate has), or else the nearest
    value before it that has them (the logits before a final Softmax, the features
    before a final Reshape or MatMul it does not translate): the noise that reaches them
    reaches the output; without a channel count no gain reaches any layer, and without
    statistics the noise is not divided by any signal power."""

    def known(value) -> bool:
        return bool(value.channels) and (stats is None or value.name in stats)

    found, seen = [], set()
    for out in graph.outputs:
        value, steps = out, 0
        first = out if out.channels else None  # the nearest with channels, failing better
        while not known(value) and value.producer is not None and steps < 32:
            inputs = value.producer.inputs
            if not inputs:
                break
            value = next((v for v in inputs if known(v)), None) or next(
                (v for v in inputs if v.channels), inputs[0]
            )
            first = first or (value if value.channels else None)
            steps += 1
        if not known(value) and first is not None:
            value = first
        if value.channels and value.name not in seen:
            seen.add(value.name)
            found.append(value)
    return found


def _candidates(
    est: Estimate, k: int, scales, t_now: np.ndarray, t_convex: np.ndarray, t_act: np.ndarray
):
    """Candidate log-scales of region ``k`` (rows; row 0 the current ones); ``t_act``:
    its :func:`_activation_balance`."""
    live = est.live[k]
    n = t_now.shape[0]
    t_bal = _balance(est, k, scales, live)
    rows = [t_now, np.zeros(n), t_convex, 0.5 * (t_now + t_convex)]
    rows += [a * t_bal + b * t_act for a, b in _BLENDS]
    cands = np.stack(rows)
    # Dead channels keep their scale; every row in the current gauge (the estimate does
    # not change when a whole region is multiplied by one number).
    cands[:, ~live] = t_now[~live]
    if np.any(live):
        cands[:, live] += (t_now[live].mean() - cands[:, live].mean(axis=1))[:, None]
    cands = tie(cands, est.map.regions[k].ties, log=True)  # a rotary's pairs: one scale
    return np.clip(cands, -_T_BOUND, _T_BOUND)


def _balance_start(problem: ScaleProblem, est: Estimate, before: float) -> list[np.ndarray] | None:
    """The balance objective's scales after :data:`_BALANCE_START_SWEEPS` sweeps (it
    leaves regions with a norm's affine at 1; channels a region must keep are kept at 1
    here), if the estimate puts them below ``before``, its value at no scaling."""
    options = replace(problem.options, max_sweeps=_BALANCE_START_SWEEPS, tolerance=None)
    # the estimate's max |W| per kernel, the balance's summaries of the same weights
    magnitudes = {id(t.node): t.abs for t in est.weights if t.node.op != "norm"}
    balanced = BalanceObjective(magnitudes).choose(replace(problem, options=options, on_sweep=None))
    start = []
    for r in problem.regions:
        # within the candidates' bounds, so that a region's current scales are a candidate
        s = np.exp(np.clip(np.log(balanced.scales[r.id]), -_T_BOUND, _T_BOUND))
        start.append(s if r.frozen is None else np.where(r.frozen, 1.0, s))
    value = est.total(start)
    return start if math.isfinite(value) and value < before else None


def _gauge_bound(est: Estimate, k: int) -> bool:
    """Whether multiplying region ``k``'s scales by one number can change the estimate:
    a part of one of its layers' grid lies outside it (channels kept at scale 1, or a
    layer cut from a packed tensor whose other parts it does not scale)."""
    weights, _ = est._local[k]
    return est.map.regions[k].frozen is not None or any(id(t) in est.grids for t in weights)


def _shifted(est: Estimate, k: int, scales, cands: np.ndarray, values: np.ndarray):
    """Each candidate log-scales of region ``k`` (rows of ``cands``, estimated
    ``values``) moved by the one number on its live channels that lowers the estimate
    most: the candidates are all in the current gauge, but where a grid spans weights
    outside the region, moving the region's channels together narrows it until the
    outside weights set it (a packed q / k / v tensor whose v rows are the widest), and
    the candidates that reshape the region's channels do not know those weights. The
    estimate is convex along the move: a grid of moves, then finer grids about each
    candidate's best, all candidates in one batch per grid."""
    live = est.live[k].astype(np.float64)
    count, n = cands.shape
    best_t, best_v = cands.copy(), values.copy()
    center, width = np.zeros(count), _T_BOUND
    for _ in range(_SHIFT_LEVELS):
        deltas = center[:, None] + np.linspace(-width, width, 2 * _SHIFT_STEPS + 1)[None, :]
        moved = cands[:, None, :] + deltas[:, :, None] * live
        moved = np.clip(moved, -_T_BOUND, _T_BOUND).reshape(-1, n)
        got = est.region_values(k, scales, np.exp(moved)).reshape(count, -1)
        got = np.where(np.isfinite(got), got, np.inf)
        i = np.argmin(got, axis=1)
        v = got[np.arange(count), i]
        # A move that changes nothing but rounding (every part inside) is not taken.
        better = v < best_v * (1.0 - 1e-9)
        best_t[better] = moved.reshape(count, -1, n)[better, i[better]]
        best_v[better] = v[better]
        center, width = deltas[np.arange(count), i], width / _SHIFT_STEPS
    return best_t, best_v


def _balance(est: Estimate, k: int, scales, live: np.ndarray) -> np.ndarray:
    """The weight-range balance of region ``k`` at the other regions' scales:
    ``log sqrt(r_source / r_sink)`` per channel."""
    n = est.map.regions[k].size
    src, snk = np.zeros(n), np.zeros(n)
    weights, _ = est._local[k]
    for t in weights:
        rd, wr = est.map.reads.get(id(t.node)), est.map.writes.get(id(t.node))
        # (ranges only: the noise coefficients are not needed, gather_terms' second
        # array is a stand-in)
        if wr is not None and wr[0] == k:
            r, _ = t.source_ranges(est.map.s_in(t.node, scales), coefficients=False)
            np.maximum(src[wr[1] : wr[1] + r.shape[0]], r, out=src[wr[1] : wr[1] + r.shape[0]])
        if rd is not None and rd[0] == k:
            r, _ = t.sink_ranges(est.map.s_out(t.node, scales), coefficients=False)
            if rd[2] > 1:
                r = r.reshape(-1, rd[2]).max(axis=1)
            off, r, _ = gather_terms(n, rd[1], r, r)
            np.maximum(snk[off : off + r.shape[0]], r, out=snk[off : off + r.shape[0]])
        rows = est.map.rows.get(id(t.node))
        if rows is not None and rows[0] == k:  # a Q -> K's q: rows multiplied, as a sink's
            r, _ = t.source_ranges(est.map.s_in(t.node, scales), coefficients=False)
            off, r, _ = gather_terms(n, rows[1], r, r)
            np.maximum(snk[off : off + r.shape[0]], r, out=snk[off : off + r.shape[0]])
    ok = live & (src > 0) & (snk > 0)
    t = np.zeros(n)
    t[ok] = 0.5 * (np.log(src[ok]) - np.log(snk[ok]))
    return t


def _activation_balance(est: Estimate, k: int, live: np.ndarray) -> np.ndarray:
    """Log-scales that give every channel of region ``k``'s quantized activations the same
    range (the largest of its grids' per-channel spans)."""
    n = est.map.regions[k].size
    # spans of the values the scales divide, and of those they multiply (a Q -> K's q)
    span, times = np.zeros(n), np.zeros(n)
    _, acts = est._local[k]
    for t in acts:
        name = t.point.value.name
        at, into = est.map.value_at.get(name), span
        if at is None:
            at, into = est.map.inverse_at.get(name), times
        if at is None or at[0] != k:
            continue
        hi = t.hi if t.cap_hi is None else np.minimum(t.hi, t.cap_hi)
        s = np.maximum(hi, 0.0) - np.minimum(t.lo, 0.0)
        off, s, _ = gather_terms(n, at[1], s, s)
        sl = slice(off, off + s.shape[0])
        np.maximum(into[sl], s, out=into[sl])
    t = np.zeros(n)
    with np.errstate(divide="ignore"):
        lo, hi = np.log(span), np.log(times)
    both, one, other = live & (span > 0) & (times > 0), live & (span > 0), live & (times > 0)
    t[one] = lo[one]
    t[other] = -hi[other]
    t[both] = 0.5 * (lo[both] - hi[both])  # the geometric balance of the two
    return t


def _colors(est: Estimate) -> tuple[list[list[int]], dict[int, set[int]]]:
    """Regions grouped so that no two of a group change the same term (greedy coloring
    in graph order): a group's convex models are solved in one batch. Also each region's
    neighbours (the regions it shares a term with)."""
    n = len(est.map.regions)
    owners: dict[int, set[int]] = {}
    for k in range(n):
        weights, acts = est._local[k]
        for t in (*weights, *acts):
            owners.setdefault(id(t), set()).add(k)
    neighbors: dict[int, set[int]] = {k: set() for k in range(n)}
    for ks in owners.values():
        for a in ks:
            neighbors[a] |= ks - {a}
    color: dict[int, int] = {}
    for k in range(n):
        used = {color[m] for m in neighbors[k] if m in color}
        color[k] = next(c for c in range(n + 1) if c not in used)
    groups: dict[int, list[int]] = {}
    for k in range(n):
        groups.setdefault(color[k], []).append(k)
    return [groups[c] for c in sorted(groups)], neighbors


register_objective(NoiseObjective())
