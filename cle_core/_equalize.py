"""The entry point: fold, scale, absorb, report."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping

import numpy as np

from ._bias import absorb_high_biases
from ._correct import correct_biases
from ._errors import NonFiniteError
from ._fold import fold_batch_norms, shared_param_owners
from ._ir import Graph
from ._math import weight_stats
from ._objectives import ScaleOutcome, ScaleProblem, get_objective
from ._regions import find_regions, tie
from ._report import (
    BiasCorrectionRecord,
    EqualizeOptions,
    EqualizeResult,
    FoldRecord,
    HighBiasRecord,
    LayerRecord,
    PassResult,
    RegionRecord,
    Report,
    SkipRecord,
)
from ._scale import apply_scales, drawn_scales, triple_names
from ._stats import ChannelStats

logger = logging.getLogger("cle_core")


def check_finite(graph: Graph) -> None:
    """Raise :class:`NonFiniteError` naming the node and parameter holding NaN or Inf.

    Clip bounds may be infinite (an unbounded side) but not NaN.
    """
    for node in graph.nodes:
        key, arr = _non_finite_param(node)
        if key is not None:
            where = "NaN" if np.any(np.isnan(arr)) else "Inf"
            raise NonFiniteError(f"node {node.name!r} ({node.op}): {where} in {key}")
        if node.op == "batchnorm":
            eps = float(node.attrs.get("eps", 0.0))
            if np.any(node.params["var"].astype(np.float64) + eps <= 0):
                raise NonFiniteError(f"node {node.name!r} (batchnorm): var + eps is not positive")


def equalize(
    graph: Graph,
    options: EqualizeOptions | None = None,
    progress: Callable[[str, float], None] | None = None,
    statistics: Mapping[str, ChannelStats] | None = None,
) -> EqualizeResult:
    """Run batch-norm folding, cross-layer scaling and high-bias absorption on ``graph``.

    The graph is modified in place and returned in the result, with the report and the
    names of the nodes a backend must write back. Inputs are checked (structure, channel
    counts, NaN / Inf) before the first change, and results (a folded or scaled
    parameter that overflows its dtype) before returning; on any error the graph is
    put back as it was.

    ``progress``, if given, is called with a stage name and the fraction of the work
    done (0 to 1), for a progress bar.

    Raises:
        InvalidGraphError: a cycle, a dangling value or a channel mismatch.
        NonFiniteError: NaN or Inf in a weight, bias or BN statistic, or a result that
            does not fit the parameter's dtype.
    """
    options = options or EqualizeOptions()

    def report_progress(stage: str, fraction: float) -> None:
        if progress is not None:
            progress(stage, fraction)

    report_progress("checking", 0.0)
    graph.validate()
    check_finite(graph)
    restore = graph.checkpoint()
    try:
        result = _passes(graph, options, report_progress, statistics)
        check_results_finite(graph, result.changed)
    except BaseException:
        restore()
        raise
    report_progress("done", 1.0)
    return result


def check_results_finite(graph: Graph, changed) -> None:
    """Raise :class:`NonFiniteError` naming the node whose new parameters overflowed
    their dtype (a BN with a tiny variance folded into float16 weights, say)."""
    by_name = {n.name: n for n in graph.nodes}
    for name in changed:
        node = by_name[name]
        key, arr = _non_finite_param(node)
        if key is not None:
            raise NonFiniteError(
                f"node {node.name!r} ({node.op}): the equalized {key} does not fit "
                f"{arr.dtype} (NaN or Inf after folding or scaling); nothing was changed"
            )


def _non_finite_param(node):
    """The first float parameter of ``node`` holding NaN or Inf, as ``(key, array)``, or
    ``(None, None)``. Clip bounds may be infinite (an unbounded side) but not NaN."""
    for key, arr in node.params.items():
        if arr is None or arr.dtype.kind not in "fc":
            continue
        if np.any(np.isnan(arr)) if node.op == "clip" else not np.isfinite(arr).all():
            return key, arr
    return None, None


def _passes(graph: Graph, options: EqualizeOptions, report_progress, statistics) -> EqualizeResult:
    shared = shared_param_owners(graph)
    # Nodes the backend could not translate, where it said why: a user whose model was
    # left alone needs to see these first ("weight 'w' is not a constant").
    skips = [
        SkipRecord("translate", n.name, f"{n.attrs.get('kind', 'op')} left out: {n.attrs['why']}")
        for n in graph.nodes
        if n.op == "opaque" and n.attrs.get("why")
    ]
    bn_values = {
        n.name: (n.inputs[0].name, n.outputs[0].name) for n in graph.nodes if n.op == "batchnorm"
    }
    passes: list[PassResult] = []
    if options.fold_bn:
        report_progress("folding batch norms", 0.05)
        passes.append(fold_batch_norms(graph, shared))
    folds = passes[0].records if passes else ()

    layers = [n for n in graph.nodes if n.is_layer]
    before = {id(n): weight_stats(n.weight, n.layout) for n in layers}

    # Calibrated statistics were measured on the model as given: after an output-side
    # fold the layer's output is what the BN's output was.
    measured = dict(statistics or {})
    for fold in folds:
        x, y = bn_values[fold.bn]
        if fold.side == "output" and y in measured:
            measured[x] = measured[y]

    outcome: ScaleOutcome | None = None
    if options.scale:
        scaling = scale_pass(graph, shared, options, measured, report_progress)
        passes.append(scaling)
        outcome = scaling.details

    if options.high_bias:
        report_progress("absorbing high biases", 0.85)
        passes.append(absorb_high_biases(graph, options, shared))

    if options.bias_correction_form == "analytic":
        report_progress("correcting biases", 0.9)
        now = _in_current_units(graph, passes, measured)
        passes.append(correct_biases(graph, options, shared, now))

    changed: set[str] = set()
    removed: list[str] = []
    for result in passes:
        skips += result.skips
        changed |= result.changed
        removed += result.removed

    report_progress("reporting", 0.95)
    layer_records = []
    for node in layers:
        ranges_before, sqnr_before = before[id(node)]
        ranges_after, sqnr_after = (
            weight_stats(node.weight, node.layout) if node.name in changed else before[id(node)]
        )
        layer_records.append(
            LayerRecord(node.name, ranges_before, ranges_after, sqnr_before, sqnr_after)
        )

    def records(kind) -> tuple:
        return tuple(r for p in passes for r in p.records if isinstance(r, kind))

    report = Report(
        bias_corrections=records(BiasCorrectionRecord),
        options=options,
        folds=records(FoldRecord),
        regions=records(RegionRecord),
        triples=tuple(outcome.triples) if outcome else (),
        high_bias=records(HighBiasRecord),
        skipped=tuple(skips),
        layers=tuple(layer_records),
        sweeps=outcome.sweeps if outcome else 0,
        converged=outcome.converged if outcome else True,
        max_change=outcome.max_change if outcome else 0.0,
        noise=outcome.estimate if outcome else None,
    )
    return EqualizeResult(graph, report, tuple(sorted(changed)), tuple(removed))


def _in_current_units(
    graph: Graph, passes: list[PassResult], measured: Mapping[str, ChannelStats]
) -> dict[str, ChannelStats]:
    """``measured`` (statistics of the model as given) in the units of the equalized
    graph: the outputs of a scaled region's sources and of the nodes it passes through
    divided by its scales, those of a layer that gave up a high bias and of its
    activation shifted down by it. A value whose channels do not line up with its
    region's (a concat's part) is left out, so that the estimate stands in for it."""
    out = dict(measured)
    producer = {n.name: n for n in graph.nodes}

    def values_of(names):
        return [v for name in names if name in producer for v in producer[name].outputs]

    for result in passes:
        for r in result.records:
            if isinstance(r, RegionRecord) and np.any(r.scales != 1):
                s = np.asarray(r.scales, np.float64)
                for v in values_of((*r.sources, *r.through)):
                    st = out.pop(v.name, None)
                    if st is not None and st.channels == s.size:
                        out[v.name] = ChannelStats(
                            st.mean / s, st.meansq / s**2, st.lo / s, st.hi / s, st.nonzero
                        )
            elif isinstance(r, HighBiasRecord):
                c = np.asarray(r.absorbed, np.float64)
                for v in values_of((r.layer, r.activation)):
                    st = out.pop(v.name, None)
                    if st is not None and st.channels == c.size:
                        out[v.name] = ChannelStats(
                            st.mean - c,
                            st.meansq - 2 * c * st.mean + c**2,
                            st.lo - c,
                            st.hi - c,
                            st.nonzero,
                        )
    return out


def scale_pass(
    graph: Graph,
    shared: dict[int, str],
    options: EqualizeOptions,
    statistics: Mapping[str, ChannelStats],
    report_progress: Callable[[str, float], None],
) -> PassResult:
    """Find the regions, let the objective choose their scales, write them into the
    graph. ``details`` is the objective's :class:`ScaleOutcome`."""
    regions, region_skips = find_regions(graph, shared)
    report_progress("scaling", 0.2)

    def on_sweep(sweep: int) -> None:
        report_progress("scaling", 0.2 + 0.6 * min(1.0, sweep / min(options.max_sweeps, 20)))

    problem = ScaleProblem(graph, regions, options, statistics, on_sweep)
    outcome = get_objective(options.objective).choose(problem)
    outcome.scales = drawn_scales(regions, outcome.scales, options.scale_draw)
    for r in regions:
        if r.frozen is not None:
            # whatever an objective (a plugin's too) chose: any other scale there is
            # not exact (the built-in objectives keep these channels at 1)
            outcome.scales[r.id] = np.where(r.frozen, 1.0, outcome.scales[r.id])
        # channels a rotary embedding rotates together: one scale each pair, whatever
        # the objective chose (the built-in ones tie them before they estimate)
        outcome.scales[r.id] = tie(outcome.scales[r.id], r.ties)
    if not outcome.triples:
        outcome.triples = triple_names(regions)
    changed = apply_scales(regions, outcome.scales)
    records = tuple(
        RegionRecord(
            id=r.id,
            kind=r.kind,
            sources=tuple(n.name for n, _ in r.sources),
            sinks=tuple(n.name for n, *_ in r.sinks) + tuple(n.name for n, _ in r.rows),
            through=tuple(n.name for n in r.through),
            channels=r.size,
            scales=outcome.scales[r.id],
            noise_before=outcome.region_before.get(r.id),
            noise_after=outcome.region_after.get(r.id),
            tied=0 if r.ties is None else int(r.size - np.unique(r.ties).size),
        )
        for r in regions
    )
    skips = tuple(region_skips) + tuple(outcome.skips)
    return PassResult(records, skips, frozenset(changed), (), outcome)
