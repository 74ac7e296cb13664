"""Data-free statistics through hard-sigmoid, hard-swish, an added constant and a gated
product (issue 18): the closed-form moments against Monte Carlo, and the estimate and
gains following a graph of them.

Tolerance: a moment agrees with the mean of 400 000 samples to six of its standard
errors, plus ``1e-5`` of the largest sample (what events rarer than the samples can see
contribute, where every sample is the same); a fraction of non-zero outputs to 0.005.
"""

from __future__ import annotations

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from cle_core import Graph, run_graph
from cle_core._gains import propagate
from cle_core._stats import (
    estimate,
    hard_sigmoid_normal,
    hard_swish_normal,
    positions,
    sigmoid_normal,
)

SAMPLES = 400_000


def assert_moment(estimated: float, samples: np.ndarray) -> None:
    se = samples.std() / np.sqrt(samples.size)
    slack = 6 * se + 1e-5 * (1.0 + np.abs(samples).max())
    assert abs(estimated - samples.mean()) <= slack, (estimated, samples.mean(), se)


def hard_swish(y, alpha, beta):
    return y * np.clip(alpha * y + beta, 0.0, 1.0)


def hard_swish_slope(y, alpha, beta):
    z = alpha * y + beta
    return np.where(z <= 0, 0.0, np.where(z >= 1, 1.0, 2 * alpha * y + beta))


moments = dict(
    m=st.floats(-8.0, 8.0),
    sd=st.floats(0.05, 5.0),
    alpha=st.floats(0.05, 1.0),
    beta=st.floats(-0.5, 1.5),
)


def assert_moments(stats, deriv, f, d) -> None:
    """The closed-form moments of f and of its slope d against their samples."""
    assert_moment(stats.mean[0], f)
    assert_moment(stats.meansq[0], f * f)
    assert_moment(deriv.mean[0], d)
    assert_moment(deriv.meansq[0], d * d)
    assert abs(stats.nonzero[0] - np.mean(f != 0)) <= 0.005


@given(**moments)
def test_hard_swish_moments_match_monte_carlo(m, sd, alpha, beta):
    y = np.random.default_rng(0).normal(m, sd, SAMPLES)
    f, d = hard_swish(y, alpha, beta), hard_swish_slope(y, alpha, beta)
    stats, deriv = hard_swish_normal(np.array([m]), np.array([sd]), alpha, beta)
    assert_moments(stats, deriv, f, d)
    # the range is f over m +- 4 sd: no sample there falls outside it
    near = f[np.abs(y - m) <= 4 * sd]
    assert stats.lo[0] <= near.min() + 1e-12 and near.max() <= stats.hi[0] + 1e-12


@given(**moments)
def test_hard_sigmoid_moments_match_monte_carlo(m, sd, alpha, beta):
    y = np.random.default_rng(1).normal(m, sd, SAMPLES)
    z = alpha * y + beta
    f, d = np.clip(z, 0.0, 1.0), np.where((z > 0) & (z < 1), alpha, 0.0)
    stats, deriv = hard_sigmoid_normal(np.array([m]), np.array([sd]), alpha, beta)
    assert_moments(stats, deriv, f, d)


@given(m=st.floats(-30.0, 30.0), sd=st.floats(0.01, 50.0))
def test_sigmoid_moments_match_monte_carlo(m, sd):
    y = np.random.default_rng(2).normal(m, sd, SAMPLES)
    f = np.exp(-np.logaddexp(0.0, -y))
    d = f * (1.0 - f)
    stats, deriv = sigmoid_normal(np.array([m]), np.array([sd]))
    assert_moment(stats.mean[0], f)
    assert_moment(stats.meansq[0], f * f)
    assert_moment(deriv.mean[0], d)
    assert_moment(deriv.meansq[0], d * d)


def gated_graph() -> Graph:
    """conv (BN statistics) -> hard-swish -> + c -> conv -> x * hard_sigmoid(conv(pool))
    -> conv."""
    rng = np.random.default_rng(0)
    g = Graph()
    g.add_input("x", 3)
    conv = g.add_node(
        "conv", ["x"], name="c1", outputs=["h"], params={"weight": rng.normal(size=(4, 3, 1, 1))}
    )
    conv.attrs["bn_stats"] = {"beta": np.array([1.0, -1.0, 2.0, -4.0]), "gamma": np.ones(4) * 2}
    g.add_node(
        "opaque",
        ["h"],
        name="hs",
        outputs=["a"],
        attrs={"activation": "hard_swish", "alpha": 1 / 6, "beta": 0.5, "channels": 4},
    )
    g.add_node(
        "opaque", ["a"], name="shift", outputs=["b"], attrs={"shift": np.arange(4.0), "channels": 4}
    )
    g.add_node(
        "conv", ["b"], name="c2", outputs=["y"], params={"weight": rng.normal(size=(4, 4, 1, 1))}
    )
    g.add_node("global_avgpool", ["y"], name="pool", outputs=["p"])
    g.add_node(
        "conv", ["p"], name="fc", outputs=["q"], params={"weight": rng.normal(size=(4, 4, 1, 1))}
    )
    g.add_node(
        "opaque",
        ["q"],
        name="hsig",
        outputs=["gate"],
        attrs={"activation": "hard_sigmoid", "alpha": 0.2, "beta": 0.5, "channels": 4},
    )
    g.add_node("mul", ["y", "gate"], name="se", outputs=["z"])
    g.add_node(
        "conv", ["z"], name="c3", outputs=["out"], params={"weight": rng.normal(size=(2, 4, 1, 1))}
    )
    g.set_outputs(["out"])
    for v in g.values.values():
        v.spatial = (1, 1) if v.name in ("p", "q", "gate") else (5, 5)
    g.validate()
    return g


def test_the_estimate_follows_hard_swish_a_shift_and_a_gate():
    g = gated_graph()
    stats, deriv = estimate(g)
    hs, d = hard_swish_normal(np.array([1.0, -1.0, 2.0, -4.0]), np.full(4, 2.0), 1 / 6, 0.5)
    np.testing.assert_allclose(stats["a"].meansq, hs.meansq)
    np.testing.assert_allclose(deriv["hs"].mean, d.mean)
    np.testing.assert_allclose(stats["b"].mean, hs.mean + np.arange(4.0))
    y, gate = stats["y"], stats["gate"]
    np.testing.assert_allclose(stats["z"].mean, y.mean * gate.mean)
    np.testing.assert_allclose(stats["z"].meansq, y.meansq * gate.meansq)
    # noise on each input of the product passes times the other
    np.testing.assert_allclose(deriv[("se", 0)].meansq, gate.meansq)
    np.testing.assert_allclose(deriv[("se", 1)].mean, y.mean)
    counts = positions(g)
    gains = propagate(g, counts, deriv)
    assert "h" in gains.uniform and np.all(np.isfinite(gains.weight_gain("h", 4)))
    # a channel behind a hard-swish that is (almost) always off passes (almost) nothing
    u = gains.uniform["h"] / gains.uniform["a"]
    assert u[3] < 0.1 * u[2]


def test_the_executor_runs_them():
    g = gated_graph()
    x = np.random.default_rng(2).normal(size=(2, 3, 5, 5))
    got = run_graph(g, {"x": x})["out"]

    def conv(name, v):
        return np.einsum("oi,ni...->no...", g.node(name).weight[:, :, 0, 0], v)

    b = hard_swish(conv("c1", x), 1 / 6, 0.5) + np.arange(4.0)[None, :, None, None]
    y = conv("c2", b)
    gate = np.clip(0.2 * conv("fc", y.mean(axis=(2, 3), keepdims=True)) + 0.5, 0, 1)
    np.testing.assert_allclose(got, conv("c3", y * gate), rtol=1e-12)


def test_the_noise_is_observed_before_a_final_op_without_statistics():
    """A classifier's final Softmax has channels but no statistics (an opaque op the
    estimate cannot follow): the noise is measured at the logits before it, so that it is
    divided by a signal power (a recognizer's estimate read -54 to -80 dB otherwise)."""
    from cle_core._objectives.noise import observed_outputs
    from cle_core._stats import estimate

    rng = np.random.default_rng(0)
    g = Graph()
    g.add_input("x", 3)
    g.add_node(
        "conv", ["x"], name="c1", outputs=["h"], params={"weight": rng.normal(size=(4, 3, 1, 1))}
    )
    g.add_node("opaque", ["h"], name="softmax", outputs=["p"], attrs={"channels": 4})
    g.set_outputs(["p"])
    for v in g.values.values():
        v.spatial = (5, 5)
    g.validate()
    stats, _ = estimate(g)
    assert "h" in stats and "p" not in stats
    assert [v.name for v in observed_outputs(g, stats)] == ["h"]
    # without statistics to go by, the output itself (it has channels), as before
    assert [v.name for v in observed_outputs(g)] == ["p"]
