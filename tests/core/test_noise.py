"""The noise objective: the region solver, the statistics, the gains, the options and the
report.

Tolerances: the solver's result is a minimum to 1e-5 relative, its stopping gap (no
random perturbation of
it, at any of three step sizes, lowers the objective by more), on the examples
hypothesis draws; not on every region: see
``test_a_solve_stops_at_its_own_gauges_box``; data-free moments agree
with 200 000-sample Monte Carlo estimates to 2 %.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from cle_core import CLEError, EqualizeOptions, Graph, Layout, equalize, run_graph
from cle_core._cli import format_summary
from cle_core._gains import propagate
from cle_core._noise import Terms, _PrimalDual, _solve_blocks, objective, solve, solve_many
from cle_core._stats import ChannelStats, StatsAccumulator, clipped_normal, estimate, positions
from tests.helpers.strategies import build_graph, feed


@st.composite
def region_terms(draw, terms=(2, 4), channels=(1, 12)):
    """One region's terms: a sink (sign +1) and one to three sources or activations
    (more with ``terms``), log-ranges and log-coefficients over four decades, some
    channels untouched by a term."""
    n = draw(st.integers(*channels))
    k = draw(st.integers(*terms))
    seed = draw(st.integers(0, 2**16))
    return _region(np.random.default_rng(seed), k, n)


def _region(rng, k: int, n: int) -> tuple[Terms, np.ndarray]:
    """``k`` terms over ``n`` channels drawn from ``rng``, and a start."""
    alpha = rng.normal(size=(k, n)) * 2.0
    logc = rng.normal(size=(k, n)) * 2.0
    alpha[rng.random((k, n)) < 0.15] = -np.inf
    logc[rng.random((k, n)) < 0.1] = -np.inf
    sign = np.array([1.0] + [float(rng.choice([-1.0, 1.0])) for _ in range(k - 2)] + [-1.0])
    return Terms(sign, rng.normal(size=k), alpha, logc), rng.normal(size=n) * 0.5


# A residual stream over many blocks: more terms than channels (its Newton systems are
# reduced to the channels).
many_terms = region_terms(terms=(7, 14), channels=(1, 6))


@given(region_terms())
def test_solve_finds_the_minimum(problem):
    terms, t0 = problem
    assert_solves_to_the_minimum(terms, t0)


@given(many_terms)
def test_a_region_of_many_terms_is_solved_to_its_minimum(problem):
    assert_solves_to_the_minimum(*problem)


def _random_region(seed: int, k: int, n: int) -> tuple[Terms, np.ndarray]:
    """One region as :func:`region_terms` draws them, from a seed outside hypothesis."""
    return _region(np.random.default_rng(seed * 100 + k * 13 + n), k, n)


def test_a_stalled_solve_is_restarted_to_the_minimum():
    # Its slacks reach 0 before its dual residual does, after which the Newton system
    # gives no step (the step length falls to 0 at step 20): started afresh from there,
    # it ends 8e-9 above Nelder-Mead's minimum instead of 2.2e-3. The second one's
    # direction overflowed (NaN) where its slacks reached 0: refused, the solve is
    # restarted (7.2e-4 above the minimum before).
    assert_solves_to_the_minimum(*_random_region(2, 2, 3))
    assert_solves_to_the_minimum(*_random_region(264, 2, 2))


@pytest.mark.xfail(
    strict=True,
    reason="known: the solve's box (a factor 10^4 about t0) is taken in its own gauge "
    "(the first term's variable held), the result then shifted to t0's mean. Over 5378 "
    "random regions (300 seeds x 2-4 terms x 1-12 channels, as region_terms draws them) "
    "8 miss the 1e-5 of assert_solves_to_the_minimum (30 before stalls were restarted and "
    "non-finite steps refused): in 6 the minimum lies outside the box, in this one the "
    "solve stops at its own box edge (channel 0) 5.3e-4 above the minimum inside t0's",
)
def test_a_solve_stops_at_its_own_gauges_box():
    assert_solves_to_the_minimum(*_random_region(89, 2, 5))


def assert_solves_to_the_minimum(terms, t0):
    t = solve(terms, t0)
    f = objective(terms, t)
    assert f <= objective(terms, t0) * (1 + 1e-12)
    rng = np.random.default_rng(0)
    bound = math.log(1e4)  # a solve moves no scale by more than a factor 10^4
    for eps in (1e-3, 1e-2, 1e-1):
        for _ in range(20):
            moved = t + rng.normal(size=t.shape) * eps
            if np.all(np.abs(moved - t0) < bound):
                assert objective(terms, moved) >= f * (1 - 1e-5)


@given(many_terms)
def test_a_system_reduced_to_the_channels_gives_the_same_step(problem):
    # Eliminating the term variables instead of the channels solves the same Newton
    # system: the steps agree to rounding, predictor and corrector alike.
    terms, t0 = problem
    keep = np.any(np.isfinite(terms.alpha), axis=1) & np.any(np.isfinite(terms.logc), axis=1)
    active = np.any(np.isfinite(terms.alpha[keep]), axis=0) & np.any(
        np.isfinite(terms.logc[keep]), axis=0
    )
    sub = Terms(
        terms.sign[keep],
        terms.logw[keep],
        terms.alpha[keep][:, active],
        terms.logc[keep][:, active],
    )
    assume(sub.alpha.shape[0] > 6 and sub.alpha.shape[0] - 1 > sub.alpha.shape[1] > 0)
    ipm = _PrimalDual([sub], [t0[active]], [objective(sub, t0[active])])
    ipm.grad_t = -2.0 * (ipm.sk * ipm.e).sum(axis=0)  # as run() sets them at each step
    ipm.grad_mu = 2.0 * ipm.per_region(ipm.e)
    steps = []
    for to_channels in (False, True):
        with np.errstate(all="ignore"):  # as in solve_many: inf / inf where unsupported
            ipm.factor(to_channels)
            pred = ipm.direction()
            target = ipm.expand(np.array([1e-2]))
            steps.append((pred, ipm.direction(target, pred.ds * pred.dlam, 0.0, 0.0)))
        assert bool(ipm.by_channel[0]) is to_channels
    for full, reduced in zip(*steps, strict=True):
        for a, b in zip(full, reduced, strict=True):
            a, b = np.nan_to_num(a), np.nan_to_num(b)
            assert np.allclose(a, b, rtol=1e-7, atol=1e-9 * max(1.0, np.max(np.abs(a))))


@given(st.integers(100, 260), st.integers(1, 3), st.integers(0, 2**16))
def test_a_large_system_solved_by_blocks_is_solved(n, r, seed):
    # Systems of 100 rows or more (a wide residual stream's channels) are solved by
    # blocks under that size, where OpenBLAS stays on one thread: the same solution.
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(n, n)) * np.exp(rng.uniform(-3, 3, n))
    m = a @ a.T + np.diag(np.exp(rng.uniform(-2, 2, n)))  # positive definite, like the Schur
    y = rng.normal(size=(n, r))
    x = _solve_blocks(m, y)
    assert np.allclose(m @ x, y, rtol=0, atol=1e-8 * np.max(np.abs(m)) * np.max(np.abs(x)))
    assert np.allclose(x, np.linalg.solve(m, y), rtol=1e-6, atol=1e-9 * np.max(np.abs(x)))


@given(st.lists(region_terms(), min_size=1, max_size=5))
def test_solving_together_is_solving_each(problems):
    together = solve_many([p for p, _ in problems], [t0 for _, t0 in problems])
    for (terms, t0), t in zip(problems, together, strict=True):
        alone = solve(terms, t0)
        assert objective(terms, t) <= objective(terms, alone) * (1 + 1e-5)


def test_solve_keeps_the_gauge_and_untouched_channels():
    rng = np.random.default_rng(3)
    alpha = rng.normal(size=(2, 5))
    alpha[:, 4] = -np.inf  # channel 4: no term touches it
    logc = rng.normal(size=(2, 5))
    logc[:, 4] = -np.inf
    terms = Terms(np.array([1.0, -1.0]), np.zeros(2), alpha, logc)
    t0 = np.array([0.3, -0.2, 0.1, 0.0, 0.7])
    t = solve(terms, t0)
    assert t[4] == t0[4]
    assert np.isclose(t[:4].mean(), t0[:4].mean())
    assert objective(terms, t) < objective(terms, t0)


def test_a_pair_is_balanced_by_its_noise_weights():
    # source: step max(r1 / s), noise c1 * s^2; sink: step max(r2 * s), noise c2 / s^2.
    # With one channel dominating each max, the optimum spreads the other channels so
    # that each term's per-channel share matches: checked against a fine grid search.
    r1, r2 = np.array([4.0, 1.0]), np.array([1.0, 3.0])
    c1, c2 = np.array([1.0, 2.0]), np.array([0.5, 1.0])
    terms = Terms(
        np.array([1.0, -1.0]), np.zeros(2), np.log(np.stack([r2, r1])), np.log(np.stack([c2, c1]))
    )
    t = solve(terms, np.zeros(2))
    grid = np.linspace(-3, 3, 1201)
    best = min(objective(terms, np.array([0.0, g])) for g in grid)  # the gauge fixes t0
    assert objective(terms, t) <= best * (1 + 1e-4)


# --- statistics ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "m, sd, lo, hi", [(0.5, 1.0, 0.0, 6.0), (3.0, 2.0, 0.0, np.inf), (-1.0, 0.5, -1.0, 1.0)]
)
def test_clipped_normal_moments(m, sd, lo, hi):
    y = np.random.default_rng(0).normal(m, sd, 200_000)
    x = np.clip(y, lo, hi)
    stats, inside = clipped_normal(np.array([m]), np.array([sd]), lo, hi)
    assert np.isclose(stats.mean[0], x.mean(), rtol=0.02, atol=0.01)
    assert np.isclose(stats.meansq[0], (x * x).mean(), rtol=0.02)
    assert np.isclose(inside[0], np.mean((y > lo) & (y < hi)), atol=0.01)
    assert np.isclose(stats.nonzero[0], np.mean(x != 0), atol=0.01)


def conv_bn_relu6_chain():
    g = Graph()
    g.add_input("x", 3)
    rng = np.random.default_rng(0)
    g.add_node(
        "conv",
        ["x"],
        name="c1",
        outputs=["h"],
        params={"weight": rng.normal(size=(4, 3, 1, 1)), "bias": None},
    )
    g.add_node(
        "batchnorm",
        ["h"],
        name="bn",
        outputs=["hb"],
        params={
            "mean": np.zeros(4),
            "var": np.ones(4),
            "gamma": np.array([1.0, 2.0, 0.5, 3.0]),
            "beta": np.array([1.0, -1.0, 2.0, 7.0]),
        },
        attrs={"eps": 0.0},
    )
    g.add_node(
        "clip", ["hb"], name="act", outputs=["a"], params={"lo": np.array(0.0), "hi": np.array(6.0)}
    )
    g.add_node(
        "conv",
        ["a"],
        name="c2",
        outputs=["y"],
        params={"weight": rng.normal(size=(2, 4, 1, 1)), "bias": None},
    )
    g.set_outputs(["y"])
    return g


def test_estimates_come_from_the_folded_batch_norm():
    g = conv_bn_relu6_chain()
    equalize(g, EqualizeOptions(scale=False, high_bias=False))  # folds the BN
    stats, deriv = estimate(g)
    expected, inside = clipped_normal(
        np.array([1.0, -1.0, 2.0, 7.0]), np.array([1.0, 2.0, 0.5, 3.0]), 0.0, 6.0
    )
    np.testing.assert_allclose(stats["a"].meansq, expected.meansq)
    np.testing.assert_allclose(deriv["act"].mean, inside)


def test_without_batch_norm_statistics_moments_are_propagated():
    g = conv_bn_relu6_chain()
    measured = {"x": ChannelStats.of(np.zeros(3), np.full(3, 2.0))}
    no_bn = Graph()
    no_bn.add_input("x", 3)
    for n in g.nodes:
        if n.op != "batchnorm":
            ins = ["h" if v.name == "hb" else v.name for v in n.inputs]
            no_bn.add_node(
                n.op,
                ins,
                name=n.name,
                outputs=[v.name for v in n.outputs],
                params=n.params,
                attrs=n.attrs,
            )
    no_bn.set_outputs(["y"])
    no_bn.validate()
    stats, _ = estimate(no_bn, measured)
    w = no_bn.node("c1").weight[:, :, 0, 0]
    np.testing.assert_allclose(stats["h"].meansq, (w * w).sum(axis=1) * 2.0)  # zero-mean input


def test_accumulator_matches_numpy():
    rng = np.random.default_rng(1)
    batches = [rng.normal(size=(4, 3, 5, 5)) for _ in range(3)]
    acc = StatsAccumulator()
    for b in batches:
        acc.add("v", b)
    s = acc.result()["v"]
    x = np.concatenate(batches)
    np.testing.assert_allclose(s.mean, x.mean(axis=(0, 2, 3)))
    np.testing.assert_allclose(s.meansq, (x * x).mean(axis=(0, 2, 3)))
    np.testing.assert_allclose(s.hi, x.max(axis=(0, 2, 3)))


def _plain_parts(x, axes):
    """What StatsAccumulator.add summed before it kept a scratch copy (reference)."""
    x = x.astype(np.float64, copy=False)
    return [x.sum(axes), (x * x).sum(axes), x.min(axes), x.max(axes), (x != 0).sum(axes)]


def test_accumulator_sums_in_its_scratch_copy_are_the_plain_ones_bit_for_bit():
    """Tensors of several sizes and types through one accumulator (its scratch memory
    reused and grown): every statistic is what a fresh float64 copy gives, bit for bit,
    and the caller's arrays (float64 ones too, which need no conversion) are unchanged."""
    rng = np.random.default_rng(2)
    tensors = {
        "a": [rng.normal(size=(8, 6, 7, 7)).astype(np.float32) for _ in range(3)],
        "b": [rng.normal(size=(2, 5, 3)) for _ in range(2)],  # float64
        "c": [(rng.normal(size=(16, 4)) * (rng.random((16, 4)) < 0.5)).astype(np.float16)],
        "d": [np.asfortranarray(rng.normal(size=(3, 4, 5)))],  # not C-contiguous
    }
    acc = StatsAccumulator()
    for name, batches in tensors.items():
        for b in batches:
            before = b.copy()
            acc.add(name, b)
            np.testing.assert_array_equal(b, before)
    stats = acc.result()
    for name, batches in tensors.items():
        axes = (0,) + tuple(range(2, batches[0].ndim))
        parts = [_plain_parts(b, axes) for b in batches]
        n = sum(b.size // b.shape[1] for b in batches)
        total, squares = sum(p[0] for p in parts), sum(p[1] for p in parts)
        lo = np.minimum.reduce([p[2] for p in parts])
        hi = np.maximum.reduce([p[3] for p in parts])
        nonzero = sum(p[4] for p in parts)
        s = stats[name]
        for got, want in (
            (s.mean, total / n),
            (s.meansq, squares / n),
            (s.lo, lo),
            (s.hi, hi),
            (s.nonzero, np.asarray(nonzero, np.float64) / n),
        ):
            np.testing.assert_array_equal(got, want)


def test_positions_follow_strides_pads_and_pools():
    g = Graph()
    x = g.add_input("x", 3)
    x.spatial = (32, 32)
    w = np.ones((4, 3, 3, 3))
    g.add_node(
        "conv",
        ["x"],
        name="c",
        outputs=["h"],
        params={"weight": w, "bias": None},
        attrs={"layout": Layout(), "stride": (2, 2), "pads": (1, 1, 1, 1), "dilation": (1, 1)},
    )
    g.add_node(
        "maxpool",
        ["h"],
        name="p",
        outputs=["q"],
        attrs={"kernel": (2, 2), "stride": (2, 2), "pads": (0, 0, 0, 0)},
    )
    g.add_node("global_avgpool", ["q"], name="g", outputs=["z"])
    g.set_outputs(["z"])
    g.validate()
    assert positions(g) == {"x": 1024, "h": 256, "q": 64, "z": 1}


@pytest.mark.parametrize("stem", ["none", "pad", "relu"])
def test_an_image_input_of_unknown_size_is_taken_as_224_by_224(stem):
    # A traced PyTorch model without input_shapes knows no sizes; EfficientNet pads its
    # input before the first Conv. Without the assumption every position count would
    # be 1, which treats all activation rounding as if it were correlated.
    g = Graph()
    g.add_input("x", 3)
    src = "x"
    if stem != "none":
        attrs = {"pads": (1, 1, 1, 1)} if stem == "pad" else {}
        g.add_node(stem, ["x"], name="s", outputs=["xs"], attrs=attrs)
        src = "xs"
    g.add_node(
        "conv",
        [src],
        name="c",
        outputs=["h"],
        params={"weight": np.ones((4, 3, 3, 3)), "bias": None},
        attrs={"layout": Layout(), "stride": (1, 1), "pads": (0, 0, 0, 0), "dilation": (1, 1)},
    )
    g.set_outputs(["h"])
    g.validate()
    side = 226 if stem == "pad" else 224
    assert positions(g)["h"] == (side - 2) ** 2


def test_a_feature_input_of_unknown_size_has_one_position():
    g = Graph()
    g.add_input("x", 3)
    g.add_node(
        "linear",
        ["x"],
        name="l",
        outputs=["y"],
        params={"weight": np.ones((4, 3)), "bias": None},
        attrs={"layout": Layout()},
    )
    g.set_outputs(["y"])
    g.validate()
    assert positions(g) == {"x": 1, "y": 1}


# --- gains -------------------------------------------------------------------------------


def test_gains_of_a_linear_chain_are_the_squared_column_norms():
    g = Graph()
    g.add_input("x", 3)
    rng = np.random.default_rng(2)
    w1, w2 = rng.normal(size=(5, 3)), rng.normal(size=(2, 5))
    g.add_node(
        "linear",
        ["x"],
        name="a",
        outputs=["h"],
        params={"weight": w1, "bias": None},
        attrs={"layout": Layout()},
    )
    g.add_node(
        "linear",
        ["h"],
        name="b",
        outputs=["y"],
        params={"weight": w2, "bias": None},
        attrs={"layout": Layout()},
    )
    g.set_outputs(["y"])
    g.validate()
    gains = propagate(g, positions(g), {}, projections=20000)
    expected = (w2 * w2).sum(axis=0)  # d|y|^2 / dh: every output counts once
    np.testing.assert_allclose(
        gains.weight_gain("h", 5) - 0.1 * gains.uniform["h"].mean(), expected, rtol=0.05
    )


# --- options, report, the whole pass -------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"objective": "mse"},
        {"weight_bits": 1},
        {"weight_bits": 8.0},
        {"activation_bits": 17},
        {"tolerance": -1.0},
    ],
)
def test_bad_options_are_refused(kwargs):
    with pytest.raises(CLEError):
        EqualizeOptions(**kwargs)


def test_report_gives_the_noise_per_region_and_in_total():
    g = build_graph(4, [("chain", "relu6"), ("residual", "relu")], 4, head=False)
    report = equalize(g).report
    assert report.noise.after < report.noise.before
    assert report.noise.sqnr_after > report.noise.sqnr_before
    # a region's terms also change with its neighbours' scales: only the total must fall
    assert all(r.noise_before > 0 and r.noise_after > 0 for r in report.regions)
    data = json.loads(report.to_json())
    assert data["noise"]["before"] > data["noise"]["after"]
    assert "est. output SQNR (W8A8)" in report.summary()
    h = report.noise.history
    gain = 100 * (h[-2] - h[-1]) / h[-2]
    said = (
        f"the last sweep lowered the estimate by {gain:.1f} %"
        if gain >= 0.05
        else "the last sweep changed nothing"
    )
    assert said in format_summary(report)


def test_weights_only_deployment_ignores_activations():
    g1 = build_graph(4, [("chain", "relu6")], 4, head=False)
    g2 = build_graph(4, [("chain", "relu6")], 4, head=False)
    w8 = equalize(g1, EqualizeOptions(activation_bits=None)).report
    w8a8 = equalize(g2).report
    assert "W8)" in w8.summary() and "W8A8" in w8a8.summary()
    assert not all(
        np.allclose(a.scales, b.scales) for a, b in zip(w8.regions, w8a8.regions, strict=True)
    )


def test_calibrated_statistics_replace_the_estimates():
    g = build_graph(4, [("chain", "relu6")], 4, head=False)
    x = feed(g)
    before = run_graph(g, x)
    stats = {
        name: ChannelStats.of(np.zeros(v.channels), np.full(v.channels, 1e-6))
        for name, v in g.values.items()
        if v.channels
    }
    report = equalize(g, statistics=stats).report
    after = run_graph(g, x)
    for k in before:
        np.testing.assert_allclose(
            after[k], before[k], rtol=1e-9, atol=1e-9 * np.abs(before[k]).max()
        )
    assert math.isfinite(report.noise.after)


def huge_chain() -> Graph:
    """Twelve 1x1 layers, each growing the signal ~1e30-fold: the estimated output noise
    overflows float64, so it cannot rank scales."""
    g = Graph()
    g.add_input("x", 4)
    rng = np.random.default_rng(0)
    value = "x"
    for i in range(12):
        w = rng.normal(size=(4, 4, 1, 1)) * np.array([1e30, 1e29, 1e31, 1e30])[:, None, None, None]
        g.add_node(
            "conv", [value], name=f"c{i}", outputs=[f"h{i}"], params={"weight": w, "bias": None}
        )
        g.add_node("relu", [f"h{i}"], name=f"r{i}", outputs=[f"a{i}"])
        value = f"a{i}"
    g.set_outputs([value])
    return g


def test_an_estimate_that_overflows_falls_back_to_the_balance(caplog):
    with caplog.at_level("WARNING", logger="cle_core"):
        report = equalize(huge_chain()).report
    assert report.noise is None and len(report.regions) == 11
    assert any(s.candidate == "noise objective" and "overflows" in s.reason for s in report.skipped)
    assert "noise objective" in caplog.text
    assert "balance (the noise estimate is not finite" in format_summary(report)
    balance = equalize(huge_chain(), EqualizeOptions(objective="balance")).report
    assert report.sweeps == balance.sweeps > 1
    for a, b in zip(report.regions, balance.regions, strict=True):
        np.testing.assert_array_equal(a.scales, b.scales)
