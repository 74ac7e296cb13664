"""The entry point: fold, scale, absorb, report."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping

import numpy as np

from ._bias import absorb_high_biases
from ._errors import NonFiniteError
from ._fold import fold_batch_norms, shared_param_owners
from ._gains import propagate as propagate_gains
from ._ir import Graph
from ._math import weight_stats
from ._objective import NoiseUnavailable, noise_scales
from ._regions import find_regions
from ._report import (
    BALANCE_TOLERANCE,
    EqualizeOptions,
    EqualizeResult,
    LayerRecord,
    NoiseEstimate,
    RegionRecord,
    Report,
    SkipRecord,
)
from ._scale import apply_scales, scale_regions, triple_names
from ._stats import ChannelStats, counts_known, positions
from ._stats import estimate as estimate_stats

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
        if np.any(np.isnan(arr) if node.op == "clip" else ~np.isfinite(arr)):
            return key, arr
    return None, None


def _passes(graph: Graph, options: EqualizeOptions, report_progress, statistics) -> EqualizeResult:
    shared = shared_param_owners(graph)
    folds, skips, changed, removed = [], [], set(), []
    # Nodes the backend could not translate, where it said why: a user whose model was
    # left alone needs to see these first ("weight 'w' is not a constant").
    skips += [
        SkipRecord("translate", n.name, f"{n.attrs.get('kind', 'op')} left out: {n.attrs['why']}")
        for n in graph.nodes
        if n.op == "opaque" and n.attrs.get("why")
    ]
    bn_values = {
        n.name: (n.inputs[0].name, n.outputs[0].name) for n in graph.nodes if n.op == "batchnorm"
    }
    if options.fold_bn:
        report_progress("folding batch norms", 0.05)
        folds, fold_skips, fold_changed, removed = fold_batch_norms(graph, shared)
        skips += fold_skips
        changed |= fold_changed

    layers = [n for n in graph.nodes if n.is_layer]
    before = {id(n): weight_stats(n.weight, n.layout) for n in layers}

    region_records: list[RegionRecord] = []
    estimate: NoiseEstimate | None = None
    triples: list[tuple[str, str, str]] = []
    sweeps, converged, max_change = 0, True, 0.0
    if options.scale:
        regions, region_skips = find_regions(graph, shared)
        skips += region_skips
        report_progress("scaling", 0.2)
        on_sweep = lambda sweep: report_progress(  # noqa: E731
            "scaling", 0.2 + 0.6 * sweep / options.max_sweeps
        )
        noise = None
        if options.objective == "noise":
            # Calibrated statistics were measured on the model as given: after an
            # output-side fold the layer's output is what the BN's output was.
            measured = dict(statistics or {})
            for fold in folds:
                x, y = bn_values[fold.bn]
                if fold.side == "output" and y in measured:
                    measured[x] = measured[y]
            try:
                # Overflow is caught as a non-finite estimate, not warned about.
                with np.errstate(over="ignore", invalid="ignore"):
                    stats, derivatives = estimate_stats(graph, measured)
                    counts = positions(graph)
                    power = {
                        v.name: float(stats[v.name].meansq.sum()) * counts.get(v.name, 1)
                        for v in graph.outputs
                        if v.name in stats
                    }
                    gains = propagate_gains(graph, counts, derivatives, power)
                    noise = noise_scales(
                        graph,
                        regions,
                        stats,
                        gains,
                        counts,
                        options.weight_bits,
                        options.activation_bits,
                        options.max_sweeps,
                        options.stop_tolerance,
                        on_sweep,
                    )
            except NoiseUnavailable as e:
                reason = f"{e}; the weight-range balance chose the scales instead"
                logger.warning("noise objective: %s", reason)
                skips.append(SkipRecord("scale", "noise objective", reason))
        if noise is None:
            outcome = scale_regions(
                regions,
                options.max_sweeps,
                options.tolerance if options.tolerance is not None else BALANCE_TOLERANCE,
                on_sweep,
                options.activation_weight,
            )
            changed |= outcome.changed
            sweeps, converged, max_change = outcome.sweeps, outcome.converged, outcome.max_change
            triples = outcome.triples
        else:
            changed |= apply_scales(regions, noise.scales)
            sweeps, converged, max_change = noise.sweeps, noise.converged, noise.max_change
            triples = triple_names(regions)
            outcome = noise
            estimate = NoiseEstimate(noise.before, noise.after, noise.history, counts_known(graph))
        region_records = [
            RegionRecord(
                id=r.id,
                kind=r.kind,
                sources=tuple(n.name for n, _ in r.sources),
                sinks=tuple(n.name for n, *_ in r.sinks),
                through=tuple(n.name for n in r.through),
                channels=r.size,
                scales=outcome.scales[r.id],
                noise_before=None if estimate is None else outcome.region_before[r.id],
                noise_after=None if estimate is None else outcome.region_after[r.id],
            )
            for r in regions
        ]

    bias_records = []
    if options.high_bias:
        report_progress("absorbing high biases", 0.85)
        bias_records, bias_skips, bias_changed = absorb_high_biases(graph, options, shared)
        skips += bias_skips
        changed |= bias_changed

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

    report = Report(
        options=options,
        folds=tuple(folds),
        regions=tuple(region_records),
        triples=tuple(triples),
        high_bias=tuple(bias_records),
        skipped=tuple(skips),
        layers=tuple(layer_records),
        sweeps=sweeps,
        converged=converged,
        max_change=max_change,
        noise=estimate,
    )
    return EqualizeResult(graph, report, tuple(sorted(changed)), tuple(removed))
