"""The estimate's shortcuts give the values of the plain computation, bit for bit: the
per-channel row maxima from the columns that can hold them, and the estimate at no
scaling taken once (issue 18's speed work must not move a scale)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cle_core import Deployment
from cle_core import _estimate as estimate_module
from cle_core._estimate import Estimate, _pruned_row_max
from cle_core._fold import fold_batch_norms, shared_param_owners
from cle_core._gains import propagate
from cle_core._regions import find_regions
from cle_core._stats import estimate, positions
from tests.helpers.strategies import build_graph


def _full_row_max(m: np.ndarray, s: np.ndarray) -> np.ndarray:
    return (m[None] * s[:, :, None, :]).max(axis=3).astype(np.float64)


@settings(max_examples=60, deadline=None)
@given(
    st.integers(0, 2**32 - 1),
    st.integers(1, 3),  # groups
    st.integers(1, 7),  # rows per group
    st.integers(1, 9),  # columns per group
    st.integers(2, 12),  # candidates
    st.floats(0.0, 9.0),  # spread of the candidates' log-scales
    st.sampled_from([np.float32, np.float64]),
)
def test_pruned_row_maxima_are_those_of_the_full_product(seed, g, og, ig, count, spread, dtype):
    rng = np.random.default_rng(seed)
    m = np.abs(rng.standard_normal((g, og, ig))) * np.exp(rng.normal(size=(g, og, ig)))
    m[rng.random((g, og, ig)) < 0.3] = 0.0  # zero weights and rows
    m[:, 0] = m[:, 0, :1]  # ties within a row
    m = m.astype(dtype)
    s = np.exp(rng.uniform(-spread, spread, (count, g, ig))).astype(dtype)
    s[-1] = s[0]  # equal candidates
    got = _pruned_row_max(m, s)
    assert got.dtype == np.float64
    np.testing.assert_array_equal(got, _full_row_max(m, s))


def test_row_maxima_the_pruning_cannot_take_are_left_to_the_full_product():
    m = np.ones((1, 2, 3), np.float32)
    s = np.ones((2, 1, 3), np.float32)
    for bad in (np.inf, 0.0, np.nan):
        t = s.copy()
        t[1, 0, 2] = bad
        assert _pruned_row_max(m, t) is None
    nan_row = m.copy()
    nan_row[0, 1] = np.nan
    assert _pruned_row_max(nan_row, s) is None
    np.testing.assert_array_equal(_pruned_row_max(m, s), _full_row_max(m, s))


def _estimate_of(seed: int, deployment: Deployment) -> Estimate:
    blocks = [("triple", "relu6"), ("residual", "relu"), ("chain", "relu6")]
    graph = build_graph(seed, blocks, 4, True)
    fold_batch_norms(graph, shared_param_owners(graph))
    regions, _ = find_regions(graph, {})
    stats, derivatives = estimate(graph)
    counts = positions(graph)
    gains = propagate(graph, counts, derivatives)
    return Estimate(graph, regions, deployment, stats, gains, counts)


@pytest.mark.parametrize(
    "deployment",
    [Deployment(), Deployment(per_channel=True), Deployment(weight_symmetric=False)],
)
def test_the_pruned_path_of_the_row_maxima_is_the_blockwise_one(monkeypatch, deployment):
    """Per-channel spans of every layer for a batch of candidates, with and without the
    pruning (its threshold at 0 and beyond any size): the same values."""
    est = _estimate_of(3, deployment.with_(per_channel=True))
    rng = np.random.default_rng(0)
    scales = [np.exp(rng.normal(size=r.size)) for r in est.map.regions]
    for k, region in enumerate(est.map.regions):
        cands = np.exp(rng.normal(scale=2.0, size=(9, region.size)))
        monkeypatch.setattr(estimate_module, "_PRUNE_FROM", 0)
        pruned = est.region_values(k, scales, cands)
        monkeypatch.setattr(estimate_module, "_PRUNE_FROM", 1 << 62)
        np.testing.assert_array_equal(pruned, est.region_values(k, scales, cands))
    # One candidate: the remembered rows of its input scales, the same maxima.
    monkeypatch.setattr(estimate_module, "_PRUNE_FROM", 0)
    for t in est.weights:
        si = np.exp(rng.normal(scale=2.0, size=(5, t.groups, 1, t.ig)))
        for which in ("abs",) if t.symmetric else ("pos", "neg"):
            batch = t._row_max(which, si, "in")
            for c in range(si.shape[0]):
                np.testing.assert_array_equal(t._row_max(which, si[c : c + 1], "in")[0], batch[c])


@pytest.mark.parametrize(
    "deployment",
    [Deployment(), Deployment(per_channel=True), Deployment(activation_bits=None)],
)
def test_the_estimate_at_no_scaling_is_taken_once_with_the_plain_values(deployment):
    est = _estimate_of(5, deployment)
    ones = est.ones()
    plain = float(sum(est.weight_values(ones)) + sum(est.activation_values(ones)))
    assert est.total() == plain and est.total(ones) == plain
    kept = est._ones
    for k in range(len(est.map.regions)):
        assert est.region_value(k, ones) == float(est.region_values(k, ones, ones[k][None])[0])
    assert est._ones is kept  # taken once
    # Other scales are computed, not read from it.
    rng = np.random.default_rng(1)
    for k, region in enumerate(est.map.regions):
        scales = est.ones()
        scales[k] = np.exp(rng.normal(size=region.size))
        got = est.region_value(k, scales)
        assert got == float(est.region_values(k, scales, scales[k][None])[0])
        assert got != est.region_value(k, ones)
        plain = float(sum(est.weight_values(scales)) + sum(est.activation_values(scales)))
        assert est.total(scales) == plain != est.total()


def test_fit_dtype_checks_only_what_a_conversion_can_overflow():
    from cle_core import NonFiniteError
    from cle_core.toolkit import fit_dtype

    big = np.array([1.0, 7e4], np.float32)
    with pytest.raises(NonFiniteError, match="do not fit float16"):
        fit_dtype(big, np.float16, "w")
    # the same dtype: the values as they are (an Inf already there is not news here)
    given = np.array([[1.0, np.inf]], np.float32)
    out = fit_dtype(given.T, np.float32, "w")
    assert out.flags.c_contiguous
    np.testing.assert_array_equal(out, given.T)
    np.testing.assert_array_equal(fit_dtype(big, np.float64, "w"), big.astype(np.float64))


def test_the_activation_balance_is_taken_once_per_region_and_search(monkeypatch):
    """Each region's activation balance (nothing a sweep changes) is taken once per
    search, however many sweeps visit the region, and the candidates use that value."""
    from cle_core import EqualizeOptions, equalize
    from cle_core._objectives import noise
    from tests.helpers.strategies import build_graph

    taken, used = [], []
    plain, candidates = noise._activation_balance, noise._candidates

    def counted(est, k, live):
        taken.append(k)
        return plain(est, k, live)

    def checked(est, k, scales, t_now, t_convex, t_act):
        np.testing.assert_array_equal(t_act, plain(est, k, est.live[k]))
        used.append(k)
        return candidates(est, k, scales, t_now, t_convex, t_act)

    monkeypatch.setattr(noise, "_activation_balance", counted)
    monkeypatch.setattr(noise, "_candidates", checked)
    g = build_graph(7, [("chain", "relu6"), ("triple", "relu6"), ("residual", "relu6")], 4, True)
    report = equalize(g, EqualizeOptions(tolerance=1e-9)).report
    assert report.sweeps > 1 and len(used) > len(set(used))  # regions visited again
    assert sorted(taken) == list(range(len(report.regions)))


def test_a_layers_kernel_sums_are_remembered_for_the_same_weight_only():
    from cle_core import Layout, _math

    rng = np.random.default_rng(3)
    layout = Layout(groups=2)
    w = rng.normal(size=(6, 3, 3, 3)).astype(np.float32)
    plain = _math.kernel_sums(_math.grouped_view(w, layout))
    sums = _math.LastKernelSums()  # as in one estimate's set-up
    got = sums(w, layout)
    for a, b in zip(got, plain, strict=True):
        np.testing.assert_array_equal(a, b)
        assert not a.flags.writeable
    assert sums(w, layout) is got  # the same weight: not taken again
    # Another layout, or another array with the same values (a pass replaced the
    # weight), is taken anew.
    assert sums(w, Layout()) is not got
    replaced = w * 2
    again = sums(replaced, layout)
    np.testing.assert_array_equal(again[0], 2 * plain[0])
    np.testing.assert_array_equal(again[1], 4 * plain[1])
    # Only the last layer's sums are kept: the first weight is taken again.
    assert sums(w, layout) is not got


def test_the_head_layers_kernel_sums_are_taken_once_per_estimate(monkeypatch):
    """The statistics (forward) end with the head layer, which has no batch norm; the
    gains (backward) start with it: its sums are taken once for both."""
    from cle_core import _math
    from cle_core._gains import propagate
    from cle_core._objectives import ScaleProblem
    from cle_core._objectives.noise import observed_outputs, problem_estimate
    from cle_core._stats import estimate, positions
    from tests.helpers.strategies import Builder

    b = Builder(np.random.default_rng(5), False)
    b.g.add_input("x", 3)
    h = b.act(b.bn(b.conv("x", 3, 8, 3, pad=1), 8), "relu", 8)
    b.g.set_outputs([b.conv(h, 8, 4, 1)])
    head = b.g.nodes[-1]
    b.g.validate()  # the channels, as equalize infers them
    from cle_core import EqualizeOptions
    from cle_core._fold import fold_batch_norms
    from cle_core._regions import find_regions

    fold_batch_norms(b.g, {})
    taken = []
    plain = _math.kernel_sums

    def counted(v):
        taken.append(v.shape)
        return plain(v)

    monkeypatch.setattr(_math, "kernel_sums", counted)
    head_shape = _math.grouped_view(np.asarray(head.weight), head.layout).shape
    problem = ScaleProblem(b.g, find_regions(b.g, {})[0], EqualizeOptions())
    problem_estimate(problem)
    assert taken.count(head_shape) == 1
    # Both walks take it: run apart, each takes its own.
    taken.clear()
    stats, derivatives = estimate(b.g)
    propagate(b.g, positions(b.g), derivatives, outputs=observed_outputs(b.g, stats))
    assert taken.count(head_shape) == 2


def test_equalize_sees_a_weight_changed_in_place_between_runs():
    """Runs on graphs that share the caller's first weight array (a layer without a batch
    norm, the last one whose kernel sums the gains take), changed in place between them:
    the run after the change estimates what a fresh copy of the changed weight gives
    (nothing remembered from the run before)."""
    from cle_core import equalize
    from tests.helpers.strategies import Builder

    def before(weight):
        b = Builder(np.random.default_rng(5), False)
        b.g.add_input("x", 3)
        h = b.act(b.conv("x", 3, 8, 3, pad=1), "relu", 8)
        first = b.g.nodes[0]
        h = b.act(b.bn(b.conv(h, 8, 8, 1), 8), "relu6", 8)
        b.g.set_outputs([b.conv(h, 8, 4, 1)])
        if weight is not None:
            first.params["weight"] = weight
        return equalize(b.g).report.noise.before, first

    _, first = before(None)
    shared = first.params["weight"].copy()
    start = before(shared)[0]
    shared[0] *= 10  # the caller's own array, in place
    changed = before(shared)[0]
    assert changed != start
    assert changed == before(shared.copy())[0]


@pytest.mark.parametrize(
    "shape, layout",
    [
        ((12, 40), None),  # a Linear
        ((6, 3, 3, 3), {"groups": 2}),  # a grouped conv
        ((8, 3, 2, 2), {"out_axis": 1, "in_axis": 0}),  # a ConvTranspose: (in, out, ...)
    ],
)
@pytest.mark.parametrize("axis", [1, 2])
def test_a_large_layers_kernel_sums_come_in_slices_of_the_same_values(
    monkeypatch, shape, layout, axis
):
    """Over :data:`SLICED_SUMS` weights a layer's sums come a slice at a time (its
    float64 copies taken whole cost mostly fresh memory); the slices cover the axis and
    hold the whole sums' values. At or under it, one slice: the remembered whole."""
    from cle_core import Layout, _math

    layout = Layout(**(layout or {}))
    w = np.random.default_rng(4).normal(size=shape).astype(np.float32)
    whole = _math.kernel_sums(_math.grouped_view(w, layout))
    sums = _math.LastKernelSums()
    (part, ksum, ksq), *rest = sums.slices(w, layout, axis)
    assert not rest and part == slice(None) and ksum is sums(w, layout)[0]
    monkeypatch.setattr(_math, "SLICED_SUMS", 8)
    parts = list(_math.LastKernelSums().slices(w, layout, axis))
    assert len(parts) > 1
    covered = []
    for part, ksum, ksq in parts:
        index = (slice(None),) * axis + (part,)
        np.testing.assert_array_equal(ksum, whole[0][index])
        np.testing.assert_array_equal(ksq, whole[1][index])
        covered += range(whole[0].shape[axis])[part]
    assert covered == list(range(whole[0].shape[axis]))


def test_an_estimate_with_its_sums_in_slices_is_the_whole_ones(monkeypatch):
    """The statistics and gains summed slice by slice (layers over SLICED_SUMS weights)
    are the whole computation's up to the last bits of a product's sum."""
    from cle_core import _math

    g = build_graph(3, [("chain", "relu6"), ("triple", "relu6"), ("residual", "relu6")], 6, True)
    fold_batch_norms(g, shared_param_owners(g))

    def walk():
        stats, derivatives = estimate(g)
        return stats, propagate(g, positions(g), derivatives)

    stats, gains = walk()
    monkeypatch.setattr(_math, "SLICED_SUMS", 16)
    sliced_stats, sliced_gains = walk()
    assert stats.keys() == sliced_stats.keys()
    for name, s in stats.items():
        np.testing.assert_allclose(sliced_stats[name].mean, s.mean, rtol=1e-12, atol=1e-300)
        np.testing.assert_allclose(sliced_stats[name].meansq, s.meansq, rtol=1e-12)
    for field in ("uniform", "fluctuating"):
        whole, sliced = getattr(gains, field), getattr(sliced_gains, field)
        assert whole.keys() == sliced.keys()
        for name, v in whole.items():
            np.testing.assert_allclose(sliced[name], v, rtol=1e-12, atol=1e-300)
