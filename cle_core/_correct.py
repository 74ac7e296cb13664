"""Pass: bias correction for the named deployment (the second half of data-free
quantization, Nagel et al. 2019, section 4.2).

Rounding a layer's weights to the deployment's grid shifts the mean of its output by
``E[(Q(W) - W) x]``, a bias error that adds up through the network and that scaling
does not remove. This pass subtracts that shift from each layer's bias, with ``Q`` the
grid the deployed quantizer computes (:func:`cle_core.quality.weights_on_grid`: bit
for bit as onnxruntime's ``quantize_static`` writes it, per tensor or per output
channel, the parts of one packed tensor (``weight_group``) per tensor on the grid of
the whole; the W16 scale onnxruntime widens for a large bias, which depends on the
activation grid, is not reproduced) and ``E[x]`` the per-channel mean of the layer's
input: estimated from the folded batch norms (clipped normals through ReLU / ReLU6,
moments propagated where no BN is left), or measured on calibration data (restated in
the units the equalization left the value in). Taps that read zero padding get ``0``
instead of ``E[x]`` (:func:`cle_core._math.tap_coverage`) where the input's size is
known, the padding of zero Pad nodes before the layer included.

It runs last, on the final weights, and changes the FP32 function by design.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from ._deployment import profile_for, shared_weight_grids
from ._ir import Graph, Node
from ._math import bias_shift, fit_dtype
from ._quality import weights_on_grid
from ._report import BiasCorrectionRecord, EqualizeOptions, PassResult, SkipRecord
from ._stats import ChannelStats, _coverage, _unpadded, estimate, spatial_sizes


def correct_biases(
    graph: Graph,
    options: EqualizeOptions,
    shared: dict[int, str],
    measured: Mapping[str, ChannelStats],
) -> PassResult:
    """Subtract the deployment's weight-rounding shift from every layer's bias.

    ``measured``: calibrated statistics by value name, in the units of the equalized
    graph (values the equalization rescaled or shifted restated, or left out: the
    estimate propagates from the measured values before them instead). ``shared``:
    nodes that share a parameter (:func:`cle_core._fold.shared_param_owners`, by node
    id); such a layer is skipped."""
    dep = options.deployment
    stats, _ = estimate(graph, measured, transpose_taps=True, correlated=True)
    sizes = spatial_sizes(graph)
    records, skips, changed = [], [], set()
    layers = [n for n in graph.nodes if n.is_layer and n.weight is not None]
    packed = {
        id(n): group for group in shared_weight_grids(profile_for(dep), layers, dep) for n in group
    }
    for node in graph.nodes:
        if not node.is_layer or node.weight is None:
            continue
        if node.weight.dtype.kind != "f":
            skips.append(SkipRecord("bias_correction", node.name, "its weight is not float"))
            continue
        if id(node) in shared:  # one bias cannot carry two layers' corrections
            skips.append(SkipRecord("bias_correction", node.name, shared[id(node)]))
            continue
        source, pads = _unpadded(node)
        x, origin = _input_stats(node.inputs[0], source, stats, measured, sizes)
        if x is None:
            skips.append(
                SkipRecord("bias_correction", node.name, "the mean of its input is unknown")
            )
            continue
        layout = node.layout
        w = node.weight
        axis = layout.out_axis if dep.per_channel else None
        if id(node) in packed:
            q = _on_shared_grid(node, packed[id(node)], dep)
        else:
            q = weights_on_grid(w, dep.weight_bits, dep.weight_symmetric, axis, dep.quantizer)
        coverage, padding = _coverage(node, sizes.get(source.name), pads)
        shift = bias_shift(w, q, layout, x.mean, coverage)
        if not np.any(shift):
            continue
        bias = np.zeros(shift.shape) if node.bias is None else np.asarray(node.bias, np.float64)
        dtype = w.dtype if node.bias is None else node.bias.dtype
        node.params["bias"] = fit_dtype(bias - shift, dtype, f"{node.name}: corrected bias")
        changed.add(node.name)
        out = stats.get(node.outputs[0].name)
        sqnr = None
        if out is not None and out.channels == shift.size:
            sqnr = float(10 * np.log10(np.sum(out.meansq) / np.sum(shift * shift)))
        records.append(BiasCorrectionRecord(node.name, shift, origin, sqnr, padding))
    return PassResult(tuple(records), tuple(skips), frozenset(changed), ())


def _on_shared_grid(node: Node, group: list[Node], dep) -> np.ndarray:
    """``node``'s weights rounded on the one grid of the tensor whose row blocks are
    ``group``'s weights (a packed q / k / v projection): the grid of them all stacked."""
    axis = node.layout.out_axis
    whole = np.concatenate([n.weight for n in group], axis=axis)
    q = weights_on_grid(whole, dep.weight_bits, dep.weight_symmetric, None, dep.quantizer)
    start = sum(n.weight.shape[axis] for n in group[: group.index(node)])
    return np.take(q, np.arange(start, start + node.weight.shape[axis]), axis=axis)


def _input_stats(padded, source, stats, measured, sizes):
    """The statistics of what a layer reads before its zero Pad nodes (``source``; the
    layer reads ``padded``), and where they came from. Where only the padded value was
    measured (a graph input, which a backend need not measure), its measured moments
    restated over the unpadded positions: the zeros add nothing to the sums."""
    origin = "calibration" if source.name in measured else "batch norms"
    if source is padded or source.name in measured or padded.name not in measured:
        return stats.get(source.name), origin
    size_in, size_padded = sizes.get(source.name), sizes.get(padded.name)
    if not size_in or not size_padded:
        return stats.get(source.name), origin
    m = measured[padded.name]
    r = float(np.prod(size_padded)) / float(np.prod(size_in))
    return ChannelStats.of(m.mean * r, m.meansq * r), "calibration"
