"""Property tests over random IR graphs (see tests/helpers/strategies.py).

Stated tolerances:
- exactness, for either objective: the executor's outputs before and after
  ``equalize`` agree to a relative error (max abs difference over max abs output) of
  1e-9 (float64 graphs);
- balance objective: after convergence at tolerance 1e-12, every channel of every
  region has its largest source range equal to its largest sink range within 1e-6,
  relatively; a second ``equalize`` moves no scale by more than 1e-6 and no weight by
  more than 1e-6 relatively;
- noise objective: the estimate never rises from one sweep to the next (monotone
  descent, up to 1e-12 relative rounding), and sweeping stops at the first sweep that
  gains less than the stated tolerance (or at max_sweeps);
- the region solver (test_noise.py) agrees with an independent optimizer.
"""

from __future__ import annotations

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from cle_core import EqualizeOptions, equalize, run_graph
from cle_core._fold import shared_param_owners
from cle_core._math import in_channel_ranges, out_channel_ranges
from cle_core._objectives.noise import _FIRST_SWEEP_DB
from cle_core._regions import find_regions
from tests.helpers.strategies import feed, graphs

TIGHT = EqualizeOptions(objective="balance", tolerance=1e-12, max_sweeps=5000)


def outputs(graph, x):
    return np.concatenate([v.ravel() for v in run_graph(graph, x).values()])


def rel_err(a, b):
    return float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(a))), 1e-300))


@given(graphs(), st.sampled_from(["exact", "none"]), st.sampled_from(["noise", "balance"]))
def test_equalize_preserves_the_function(graph, high_bias, objective):
    x = feed(graph)
    before = outputs(graph, x)
    options = EqualizeOptions(high_bias=high_bias == "exact", objective=objective)
    equalize(graph, options)
    assert rel_err(before, outputs(graph, x)) < 1e-9


@given(graphs(), st.sampled_from([8, 4]), st.sampled_from([8, None]), st.sampled_from([1e-3, 0.02]))
def test_noise_sweeps_descend_and_stop_at_the_tolerance(graph, wbits, abits, tol):
    x = feed(graph)
    before = outputs(graph, x)
    options = EqualizeOptions(
        weight_bits=wbits, activation_bits=abits, tolerance=tol, max_sweeps=50
    )
    report = equalize(graph, options).report
    assert rel_err(before, outputs(graph, x)) < 1e-9
    if not report.regions:
        return
    h = np.asarray(report.noise.history)
    assert np.all(np.diff(h) <= 1e-12 * h[:-1])  # never increases
    assert report.noise.after <= report.noise.before * (1 + 1e-12)
    gains = (h[:-1] - h[1:]) / np.maximum(h[:-1], 1e-300)
    if report.sweeps == 1 and gains[0] > tol:
        # the one early stop: a first sweep under _FIRST_SWEEP_DB, and nothing applied
        assert report.converged and 10 * np.log10(h[0] / h[1]) < _FIRST_SWEEP_DB + 1e-9
        assert report.noise.after == report.noise.before
        return
    # stops at the first sweep that gains less than the tolerance, not before
    assert np.all(gains[: report.sweeps - 1] > tol)
    assert report.converged == bool(gains[report.sweeps - 1] <= tol)
    assert report.converged or report.sweeps == 50


@given(graphs(), st.sampled_from([0.2, 1.0, 5.0]))
def test_activation_weight_keeps_the_function(graph, weight):
    x = feed(graph)
    before = outputs(graph, x)
    equalize(graph, EqualizeOptions(objective="balance", activation_weight=weight))
    assert rel_err(before, outputs(graph, x)) < 1e-9


@given(graphs())
def test_fold_and_carry_alone_are_exact(graph):
    x = feed(graph)
    before = outputs(graph, x)
    report = equalize(graph, EqualizeOptions(scale=False, high_bias=False)).report
    left = [n.name for n in graph.nodes if n.op == "batchnorm"]
    assert sorted(left) == sorted(s.candidate for s in report.skipped if s.stage == "fold")
    assert rel_err(before, outputs(graph, x)) < 1e-9


def region_balance(graph):
    """Largest source and sink range per channel of every region, computed from the
    weights with the plain math functions (not the iteration's summaries)."""
    regions, _ = find_regions(graph, shared_param_owners(graph))
    for region in regions:
        src = np.zeros(region.size)
        snk = np.zeros(region.size)
        for node, off in region.sources:
            r = out_channel_ranges(node.weight, node.layout)
            src[off : off + len(r)] = np.maximum(src[off : off + len(r)], r)
        for node, off, repeat in region.sinks:
            r = in_channel_ranges(node.weight, node.layout).reshape(-1, repeat).max(axis=1)
            snk[off : off + len(r)] = np.maximum(snk[off : off + len(r)], r)
        yield region, src, snk


@given(graphs())
def test_converged_regions_are_balanced(graph):
    report = equalize(
        graph,
        EqualizeOptions(objective="balance", tolerance=1e-12, max_sweeps=5000, high_bias=False),
    ).report
    assert report.converged
    for region, src, snk in region_balance(graph):
        live = (src > 0) & (snk > 0)
        np.testing.assert_allclose(src[live], snk[live], rtol=1e-6, err_msg=region.describe())


@given(graphs())
def test_second_equalize_changes_nothing(graph):
    equalize(graph, TIGHT)
    weights = {n.name: n.weight.copy() for n in graph.nodes if n.is_layer}
    again = equalize(graph, TIGHT).report
    assert again.folds == ()
    assert again.high_bias == ()
    for region in again.regions:
        np.testing.assert_allclose(region.scales, 1.0, rtol=1e-6)
    for node in graph.nodes:
        if node.is_layer:
            w0 = weights[node.name]
            scale = max(float(np.max(np.abs(w0))), 1e-300)
            assert np.max(np.abs(node.weight - w0)) <= 1e-6 * scale
