"""Q -> K through a rotary embedding (issue 21): the IR's ``rotary`` op mixes each pair of
channels it rotates, ``(d, d + D/2)`` or ``(2i, 2i + 1)``, by a 2 x 2 map per position.
With one scale on both channels of each pair the scale commutes with that map, so ``q
k^T`` is unchanged when q's channels are multiplied and K's divided; with a scale per
channel it is not. The region ties the pairs (``Region.ties``) and every objective's
scales keep the tie."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cle_core import EqualizeOptions, equalize, run_graph
from cle_core._regions import find_regions, tie
from cle_core._scale import apply_scales
from tests.helpers.ir_transformers import TokenBuilder, feed_tokens


def _rope(b: TokenBuilder, x: str, tables, interleaved: bool) -> str:
    cos, sin = tables
    node = b.g.add_node(
        "rotary",
        [x],
        name=b.name("rope"),
        params={"cos": cos, "sin": sin},
        attrs={"interleaved": interleaved},
    )
    return b.shaped(node.outputs[0].name, b.g.values[x].shape)


def _tables(rng, tokens: int, d: int, kind: str):
    """``rope``: the rotary embedding's cos / sin of angles ``m * theta_i``, each half (or
    each pair) equal; ``any``: any two tables (the tie keeps them exact too)."""
    if kind == "any":
        return rng.standard_normal((tokens, d)), rng.standard_normal((tokens, d))
    theta = rng.uniform(0.01, 1.0, d // 2)
    angles = np.outer(np.arange(tokens), theta)
    return np.cos(np.concatenate([angles, angles], -1)), np.sin(np.concatenate([angles] * 2, -1))


def _block(seed=0, h=2, kv=2, d=4, tokens=5, interleaved=False, tables="rope", how="interleave"):
    """Norm, attention with a rotary embedding on q and on k (before K's heads are
    repeated for grouped-query attention), a residual."""
    b = TokenBuilder(seed, tokens=tokens)
    c = h * d
    x = b.input(c)
    n = b.norm(x, c)
    t = _tables(np.random.default_rng(seed + 1), tokens, d, tables)
    q = _rope(b, b.heads(b.linear(n, c, c), h, d), t, interleaved)
    k = _rope(b, b.heads(b.linear(n, c, kv * d), kv, d), t, interleaved)
    v = b.heads(b.linear(n, c, kv * d), kv, d)
    if kv != h:
        k, v = (b.repeat_heads(z, h // kv, how) for z in (k, v))
    return b.build([b.add(x, b._attend(q, k, v, c, h))])


def _scores(g):
    names = [n.outputs[0].name for n in g.nodes if n.op == "matmul" and "carrier" not in n.attrs]
    g.set_outputs([*g.outputs, *names])
    return names


def _pairs(size: int, d: int, interleaved: bool) -> np.ndarray:
    """The channel each K channel (head-major: ``head * d + i``) is rotated with."""
    i = np.arange(size) % d
    partner = i ^ 1 if interleaved else (i + d // 2) % d
    return np.arange(size) - i + partner


def test_the_executor_computes_the_rotary_embedding():
    """``x * cos + rotate_half(x) * sin`` (halves) and GPT-J's rotate_every_two
    (interleaved), written out."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 5, 6))
    cos, sin = rng.standard_normal((5, 6)), rng.standard_normal((5, 6))
    for interleaved in (False, True):
        b = TokenBuilder(0)
        v = b.g.add_input("q", 18)
        v.shape, v.channel_axes = x.shape, (1, 3)
        y = _rope(b, "q", (cos, sin), interleaved)
        g = b.build([y])
        if interleaved:
            rot = np.stack([-x[..., 1::2], x[..., 0::2]], axis=-1).reshape(x.shape)
        else:
            rot = np.concatenate([-x[..., 3:], x[..., :3]], axis=-1)
        np.testing.assert_allclose(run_graph(g, {"q": x})[y], x * cos + rot * sin, rtol=1e-12)
        assert g.values[y].channels == 18


@settings(max_examples=40, deadline=None, derandomize=True)
@given(
    st.integers(0, 10_000),
    st.sampled_from([(1, 1), (2, 2), (4, 2), (6, 3), (4, 1)]),
    st.sampled_from([2, 4, 6]),  # even head sizes
    st.integers(2, 7),  # positions
    st.booleans(),
    st.sampled_from(["rope", "any"]),
    st.integers(0, 10_000),
)
def test_tied_scales_keep_q_k_t_through_the_rotary(
    seed, heads, d, tokens, interleaved, tables, scale_seed
):
    """Random heads, even head sizes, positions, layouts, tables and scales over four
    decades: tied on each rotated pair, Q K^T and the block's output do not change; the
    region ties exactly the rotated pairs of K's channels."""
    h, kv = heads
    g = _block(seed, h, kv, d, tokens, interleaved, tables)
    scores = _scores(g)
    x = feed_tokens(g)
    before = run_graph(g, x)
    regions, _ = find_regions(g, {})
    (qk,) = [r for r in regions if r.kind == "qk"]
    partner = _pairs(kv * d, d, interleaved)
    assert np.array_equal(qk.ties, np.minimum(np.arange(kv * d), partner))
    rng = np.random.default_rng(scale_seed)
    scales = {r.id: tie(10.0 ** rng.uniform(-2, 2, r.size), r.ties) for r in regions}
    assert np.array_equal(scales[qk.id], scales[qk.id][partner])
    apply_scales(regions, scales)
    after = run_graph(g, x)
    for name, ref in before.items():
        assert np.max(np.abs(after[name] - ref)) <= 1e-9 * np.max(np.abs(ref)), name
    for name in scores:
        np.testing.assert_allclose(after[name], before[name], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("interleaved", [False, True])
def test_untied_scales_change_q_k_t(interleaved):
    """The check above can fail: a scale per channel, the pairs not tied, changes the
    scores (so the exactness comes from the tie)."""
    g = _block(0, 2, 2, 4, interleaved=interleaved)
    (scores,) = _scores(g)
    x = feed_tokens(g)
    before = run_graph(g, x)
    regions, _ = find_regions(g, {})
    (qk,) = [r for r in regions if r.kind == "qk"]
    apply_scales([qk], {qk.id: np.linspace(0.5, 2, qk.size)})
    after = run_graph(g, x)
    assert np.max(np.abs(after[scores] - before[scores])) > 1e-3 * np.max(np.abs(before[scores]))


def test_tie_takes_the_geometric_mean_and_keeps_tied_scales_to_the_bit():
    ties = np.array([0, 1, 0, 1])
    np.testing.assert_allclose(tie(np.array([1.0, 2.0, 4.0, 8.0]), ties), [2.0, 4.0, 2.0, 4.0])
    np.testing.assert_allclose(
        tie(np.log([[1.0, 2.0, 4.0, 8.0]]), ties, log=True), np.log([[2.0, 4.0, 2.0, 4.0]])
    )
    tied = np.array([0.3, 7.0, 0.3, 7.0])
    assert tie(tied, ties) is tied
    assert tie(tied, None) is tied


@pytest.mark.parametrize("objective", ["noise", "balance"])
@pytest.mark.parametrize("how", ["interleave", "expand"])
def test_equalize_ties_the_rotated_pairs_and_stays_exact(monkeypatch, objective, how):
    from cle_core._objectives import noise

    monkeypatch.setattr(noise, "MIN_GAIN_DB", float("-inf"))
    g = _block(3, h=4, kv=2, d=4, how=how)
    regions, _ = find_regions(g, {})
    # K's rows over four decades (tied), q's the other way: the same function
    apply_scales(regions, {r.id: tie(10.0 ** np.linspace(-2, 2, r.size), r.ties) for r in regions})
    x = feed_tokens(g)
    before = run_graph(g, x)
    result = equalize(g, EqualizeOptions(objective=objective))
    (qk,) = [r for r in result.report.regions if r.kind == "qk"]
    assert qk.channels == 8 and qk.tied == 4
    assert np.any(qk.scales != 1)
    assert np.array_equal(qk.scales, qk.scales[_pairs(8, 4, False)])
    after = run_graph(g, x)
    for name, ref in before.items():
        assert np.max(np.abs(after[name] - ref)) <= 1e-9 * np.max(np.abs(ref))


def test_a_rotary_off_the_channels_has_none():
    """A rotary whose last axis does not hold the channels (they lie on axis 1 only):
    its output has none, and the reason is on the node."""
    b = TokenBuilder(0)
    v = b.g.add_input("q", 6)
    v.shape = (2, 6, 5, 4)
    y = _rope(b, "q", (np.ones((5, 4)), np.zeros((5, 4))), False)
    g = b.build([y])
    assert g.values[y].channels is None
    assert "does not hold its channels" in g.values[y].producer.attrs["layout_why"]


@given(st.integers(1, 10_000))
@settings(max_examples=8, deadline=None)
def test_a_scale_draw_keeps_the_rotated_pairs_tied_and_stays_exact(draw):
    """A redrawn equalization (``scale_draw``) multiplies every channel by its own
    ``exp(0.02 z)``; the pairs a rotary rotates together still share one scale, and
    the function is the same."""
    g = _block(3, h=4, kv=2, d=4, how="interleave")
    x = feed_tokens(g)
    before = run_graph(g, x)
    result = equalize(g, EqualizeOptions(objective="balance", scale_draw=draw))
    (qk,) = [r for r in result.report.regions if r.kind == "qk"]
    assert np.array_equal(qk.scales, qk.scales[_pairs(8, 4, False)])
    assert len(np.unique(qk.scales)) == 4  # drawn: no two pairs alike
    after = run_graph(g, x)
    for name, ref in before.items():
        assert np.max(np.abs(after[name] - ref)) <= 1e-9 * np.max(np.abs(ref))
