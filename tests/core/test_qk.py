"""Q -> K inside a head (issue 21): ``q k^T`` is unchanged when q's channel c is
multiplied by ``s_c`` and the k channel it meets divided by it. The region is over K's
channels (its layer the source, rows divided); q's layer has its rows multiplied by the
scale of the K channel each of its channels meets (grouped-query attention: several query
heads meet one K head). A rotary embedding between a projection and ``Q K^T`` is refused
with the reason."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cle_core import Deployment, EqualizeOptions, equalize, run_graph
from cle_core._estimate import Estimate
from cle_core._gains import propagate
from cle_core._noise import term_values
from cle_core._regions import find_regions
from cle_core._scale import apply_scales
from cle_core._stats import estimate, positions
from tests.helpers.ir_transformers import TokenBuilder, feed_tokens


def _block(seed=0, c=8, h=2, kv=None, how="interleave", scale=False):
    """Norm, then attention (grouped-query with ``kv`` K / V heads), a residual;
    ``scale``: q times ``1 / sqrt(d)`` before ``Q K^T`` (a scalar product in its way)."""
    b = TokenBuilder(seed)
    x = b.input(c)
    n = b.norm(x, c)
    d = c // h
    kv = kv or h
    q = b.heads(b.linear(n, c, c), h, d)
    if scale:
        node = b.g.add_node("mul", [q], name=b.name("mul"), params={"factor": np.array(d**-0.5)})
        q = b.shaped(node.outputs[0].name, b.g.values[q].shape)
    k = b.heads(b.linear(n, c, kv * d), kv, d)
    v = b.heads(b.linear(n, c, kv * d), kv, d)
    if kv != h:
        k, v = (b.repeat_heads(z, h // kv, how) for z in (k, v))
    return b.build([b.add(x, b._attend(q, k, v, c, h))])


def _heads_moved(seed=0, c=16, h=4, perm=(2, 0, 1, 3)):
    """Attention whose heads are moved by ``perm`` (``(H, B, T, D)``) before Q K^T."""
    b = TokenBuilder(seed)
    x = b.input(c)
    return b.build([b.add(x, b.attention(b.norm(x, c), c, h, perm))])


def _scores(g):
    """The values of every ``Q K^T`` MatMul (a matmul that carries no channels), made
    graph outputs so that the executor returns them."""
    names = [n.outputs[0].name for n in g.nodes if n.op == "matmul" and "carrier" not in n.attrs]
    g.set_outputs([*g.outputs, *names])
    return names


@settings(max_examples=60, deadline=None, derandomize=True)
@given(
    st.integers(0, 10_000),
    st.sampled_from([(1, 1), (2, 2), (4, 2), (4, 1), (6, 3), (8, 2)]),
    st.sampled_from([2, 3, 4]),  # (a head of one channel: its axis of size 1 holds none)
    st.booleans(),
    st.integers(0, 10_000),
)
def test_any_scales_keep_q_k_t_and_the_block(seed, heads, d, scale, scale_seed):
    """Random heads, head sizes, K / V heads and scales: Q K^T and the block's output do
    not change, and q's channel ``(head, i)`` takes the scale of K channel ``(head // (h /
    kv), i)`` (the grouped-query map, by brute force)."""
    h, kv = heads
    g = _block(seed, c=h * d, h=h, kv=kv, scale=scale)
    scores = _scores(g)
    x = feed_tokens(g)
    before = run_graph(g, x)
    regions, skips = find_regions(g, {})
    (qk,) = [r for r in regions if r.kind == "qk"]
    assert qk.size == kv * d
    ((q, at),) = qk.rows
    expected = np.array([(c // d) // (h // kv) * d + c % d for c in range(h * d)])
    assert np.array_equal(at, expected)
    rng = np.random.default_rng(scale_seed)
    weights = {n.name: n.weight.copy() for n in g.nodes if n.is_layer}
    apply_scales(regions, {r.id: 10.0 ** rng.uniform(-2, 2, r.size) for r in regions})
    assert not np.array_equal(q.weight, weights[q.name])
    after = run_graph(g, x)
    for name, ref in before.items():
        assert np.max(np.abs(after[name] - ref)) <= 1e-9 * np.max(np.abs(ref)), name
    for name in scores:
        np.testing.assert_allclose(after[name], before[name], rtol=1e-9, atol=0)


def test_one_sided_scales_change_q_k_t():
    """The check above can fail: K's rows divided without q's multiplied changes the
    scores (so the exactness comes from the pair)."""
    g = _block(0, c=8, h=2)
    (scores,) = _scores(g)
    x = feed_tokens(g)
    before = run_graph(g, x)
    regions, _ = find_regions(g, {})
    (qk,) = [r for r in regions if r.kind == "qk"]
    qk.rows.clear()
    apply_scales([qk], {qk.id: np.linspace(0.5, 2, qk.size)})
    after = run_graph(g, x)
    assert np.max(np.abs(after[scores] - before[scores])) > 1e-3 * np.max(np.abs(before[scores]))


@pytest.mark.parametrize("heads", ["grouped", "moved"])
@pytest.mark.parametrize("objective", ["noise", "balance"])
def test_equalize_scales_q_to_k_exactly(monkeypatch, objective, heads):
    from cle_core._objectives import noise

    monkeypatch.setattr(noise, "MIN_GAIN_DB", float("-inf"))
    g = _block(4, c=16, h=4, kv=2) if heads == "grouped" else _heads_moved(4, c=8)
    regions, _ = find_regions(g, {})
    # K's rows over four decades, q's the other way: the same function
    apply_scales(regions, {r.id: 10.0 ** np.linspace(-2, 2, r.size) for r in regions})
    x = feed_tokens(g)
    before = run_graph(g, x)
    result = equalize(g, EqualizeOptions(objective=objective))
    (qk,) = [r for r in result.report.regions if r.kind == "qk"]
    assert qk.channels == 8 and np.any(qk.scales != 1)  # (K: 2 heads of 4, or 2 of 4)
    after = run_graph(g, x)
    for name, ref in before.items():
        assert np.max(np.abs(after[name] - ref)) <= 1e-9 * np.max(np.abs(ref))


def test_the_balance_gives_q_and_k_rows_equal_ranges():
    """``s_c = sqrt(r_k / r_q)`` on K's scale (K's rows divided): after the balance,
    each K row's range equals the largest range of the q rows that meet it."""
    g = _block(5, c=8, h=4, kv=2)
    regions, _ = find_regions(g, {})
    (region,) = [r for r in regions if r.kind == "qk"]
    ((k, _),), ((q, at),) = region.sources, region.rows
    equalize(g, EqualizeOptions(objective="balance"))
    largest = np.zeros(region.size)
    np.maximum.at(largest, at, np.abs(q.weight).max(axis=1))
    np.testing.assert_allclose(np.abs(k.weight).max(axis=1), largest, rtol=1e-6)


@pytest.mark.parametrize("activations", [None, 8])
def test_the_convex_model_of_a_q_k_region_is_the_estimate(activations):
    """Per-tensor weight grids and symmetric activation grids: the convex model's terms
    of the Q -> K region equal the estimate's at random scales (q's rows and values,
    which the scales multiply, enter with a sink's exponents)."""
    g = _block(2, c=8, h=4, kv=2)
    regions, _ = find_regions(g, {})
    stats, derivatives = estimate(g)
    counts = positions(g)
    gains = propagate(g, counts, derivatives)
    k = next(i for i, r in enumerate(regions) if r.kind == "qk")
    deployment = Deployment(activation_bits=activations, activation_symmetric=True)
    est = Estimate(g, regions, deployment, stats, gains, counts)
    if activations:  # a grid on q's values, which the scales multiply
        assert any(t.point.value.name in est.map.inverse_at for t in est._local[k][1])
    rng = np.random.default_rng(0)
    for _ in range(5):
        scales = [10.0 ** rng.uniform(-1, 1, r.size) for r in regions]
        model = term_values(est.region_terms(k, scales), np.log(scales[k]))
        assert float(np.sum(model)) == pytest.approx(est.region_value(k, scales), rel=1e-9)


# -- refused ------------------------------------------------------------------------------


def _rotary_block():
    """q and k times a per-position table before Q K^T (a rotary embedding's product)."""
    b = TokenBuilder(0)
    x = b.input(8)
    n = b.norm(x, 8)
    table = np.random.default_rng(1).standard_normal((5, 1))  # per position
    heads = []
    for _ in range(3):
        heads.append(b.heads(b.linear(n, 8, 8), 2, 4))
    q, k, v = heads
    for i, z in enumerate((q, k)):
        node = b.g.add_node(
            "mul", [z], name=b.name("rope"), params={"factor": table}, attrs={"axis": 2}
        )
        heads[i] = b.shaped(node.outputs[0].name, b.g.values[z].shape)
    return b.build([b.add(x, b._attend(heads[0], heads[1], v, 8, 2))])


def test_a_rotary_product_is_refused_with_the_reason():
    g = _rotary_block()
    regions, skips = find_regions(g, {})
    assert "qk" not in [r.kind for r in regions]
    reasons = [s.reason for s in skips if "Q K^T" in s.candidate]
    assert any("rotary embedding" in r and "rope" in r for r in reasons), skips


@pytest.mark.parametrize("where", ["output", "layer"])
def test_q_read_elsewhere_too_is_refused_with_the_reason(where):
    """q's projection output also a graph output, or read by another layer: scaling its
    rows would change what that reads."""
    b = TokenBuilder(0)
    x = b.input(8)
    n = b.norm(x, 8)
    q_lin = b.linear(n, 8, 8)
    q, k, v = (b.heads(z, 2, 4) for z in (q_lin, b.linear(n, 8, 8), b.linear(n, 8, 8)))
    y = b.add(x, b._attend(q, k, v, 8, 2))
    g = b.build([y, q_lin] if where == "output" else [y, b.linear(q_lin, 8, 3)])
    regions, skips = find_regions(g, {})
    assert "qk" not in [r.kind for r in regions]
    why = f"{q_lin!r} is a graph output" if where == "output" else f"{q_lin!r} is also read by fc"
    assert any(why in s.reason and "(Q K^T)" in s.candidate for s in skips), skips
