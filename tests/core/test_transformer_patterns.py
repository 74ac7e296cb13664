"""Transformer patterns in the core: channels followed through Transpose / Reshape /
MatMul (:mod:`cle_core._layout`), norm affines as sources, attention V -> O, gated MLPs.

Exactness tolerance: relative error 1e-9 of the float64 executor outputs (max absolute
difference over the largest output magnitude), for any positive scales.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cle_core import EqualizeOptions, equalize, run_graph
from cle_core._layout import (
    LayoutError,
    matmul_axes,
    reshape_axes,
    select_axes,
    select_shape,
    transpose_axes,
)
from cle_core._regions import find_regions
from cle_core._scale import apply_scales
from cle_core._stats import StatsAccumulator, positions
from tests.helpers.ir_transformers import TokenBuilder, feed_tokens, pre_ln_block
from tests.helpers.strategies import channel_index

# -- layout tracking -------------------------------------------------------------------


@st.composite
def _moves(draw):
    """A tensor shape with its channels on one axis, and a few random transposes and
    reshapes (splitting an axis into two factors, merging two neighbours)."""
    rank = draw(st.integers(2, 4))
    shape = [draw(st.sampled_from([1, 2, 3, 4, 6])) for _ in range(rank)]
    axis = draw(st.integers(1, rank - 1))
    ops = []
    cur = list(shape)
    for _ in range(draw(st.integers(1, 5))):
        kind = draw(st.sampled_from(["transpose", "split", "merge"]))
        if kind == "transpose":
            perm = draw(st.permutations(range(len(cur))))
            ops.append(("transpose", tuple(perm)))
            cur = [cur[p] for p in perm]
        elif kind == "split":
            i = draw(st.integers(0, len(cur) - 1))
            f = [d for d in (2, 3) if cur[i] % d == 0]
            if not f or len(cur) >= 6:
                continue
            d = draw(st.sampled_from(f))
            cur = cur[:i] + [cur[i] // d, d] + cur[i + 1 :]
            ops.append(("reshape", tuple(cur)))
        elif len(cur) > 2:
            i = draw(st.integers(0, len(cur) - 2))
            cur = cur[:i] + [cur[i] * cur[i + 1]] + cur[i + 2 :]
            ops.append(("reshape", tuple(cur)))
    return tuple(shape), (axis,), ops


@settings(max_examples=300, deadline=None, derandomize=True)
@given(_moves())
def test_followed_channels_are_where_the_values_went(case):
    """Whenever the functions say where the channels are, every element's channel index
    read from the moved tensor is the one it had: no channel mixed, none reordered. A
    move they refuse really mixes or reorders channels (checked the same way)."""
    shape, axes, ops = case
    x = channel_index(shape, axes)
    cur_shape, cur_axes, followed = shape, axes, True
    for kind, arg in ops:
        if kind == "transpose":
            x = np.transpose(x, arg)
            if followed:
                cur_axes = transpose_axes(cur_axes, arg)
            cur_shape = tuple(x.shape)
        else:
            x = x.reshape(arg)
            if followed:
                try:
                    cur_axes = reshape_axes(cur_shape, cur_axes, arg)
                except LayoutError:
                    followed = False
                    # refused: no layout of this result's axes gives every element its
                    # channel
                    assert not any(
                        np.array_equal(channel_index(arg, ax), x) for ax in _axis_orders(len(arg))
                    )
            cur_shape = tuple(arg)
        if followed:
            assert np.array_equal(channel_index(cur_shape, cur_axes), x)


def _axis_orders(rank: int):
    from itertools import permutations

    for n in range(1, rank + 1):
        yield from permutations(range(rank), n)


@settings(max_examples=200, deadline=None, derandomize=True)
@given(
    st.integers(1, 3),
    st.integers(1, 6),
    st.sampled_from([1, 2, 3, 4, 8]),
    st.sampled_from([2, 5, 8]),
    st.permutations([0, 1, 2]),
)
def test_heads_split_and_merged_back_keep_the_channels(b, t, h, d, perm3):
    """``(B, T, C) -> (B, T, H, D) -> any order of B, T, H with D last -> back ->
    (B, T, C)``: the channels are followed all the way and end where they started."""
    shape = (b, t, h * d)
    axes = reshape_axes(shape, (2,), (b, t, h, d))
    perm = (*perm3, 3)
    moved = transpose_axes(axes, perm)
    back = transpose_axes(moved, tuple(int(i) for i in np.argsort(perm)))
    assert reshape_axes((b, t, h, d), back, shape) == (2,)


@st.composite
def _selections(draw):
    """A shape, its channels on one or two axes (not the batch), and a selection of
    positions of one axis: an integer (negative too), a slice or a list of indices."""
    rank = draw(st.integers(2, 5))
    shape = tuple(draw(st.integers(1, 4)) for _ in range(rank))
    axes = tuple(draw(st.lists(st.integers(1, rank - 1), min_size=1, max_size=2, unique=True)))
    axis = draw(st.integers(0, rank - 1))
    n = shape[axis]
    kind = draw(st.sampled_from(["int", "slice", "list"]))
    if kind == "int":
        index = draw(st.integers(-n, n - 1))
    elif kind == "slice":
        index = slice(
            draw(st.one_of(st.none(), st.integers(-n, n))),
            draw(st.one_of(st.none(), st.integers(-n, n))),
            draw(st.one_of(st.none(), st.integers(1, 3))),
        )
    else:
        index = tuple(draw(st.lists(st.integers(0, n - 1), min_size=1, max_size=4)))
    return shape, axes, axis, index


@settings(max_examples=300, deadline=None, derandomize=True)
@given(_selections())
def test_selected_positions_keep_every_channel_where_the_functions_say(case):
    """Selecting positions of an axis that is not the channels' (a class token
    ``x[:, 0]``): the channel of every element of the result, brute force, is the one
    the layout says, and the shape is NumPy's. The batch axis and the channels' own axes
    are refused."""
    shape, axes, axis, index = case
    x = channel_index(shape, axes)
    y = x[(slice(None),) * axis + (list(index) if isinstance(index, tuple) else index,)]
    if axis == 0 or axis in axes:
        with pytest.raises(LayoutError, match="batch" if axis == 0 else "along the channels"):
            select_axes(len(shape), axes, axis, index)
        return
    assert select_shape(shape, axis, index) == y.shape
    assert np.array_equal(channel_index(y.shape, select_axes(len(shape), axes, axis, index)), y)


def test_refusals_name_what_breaks_the_channels():
    with pytest.raises(LayoutError, match="merges the channels with another axis"):
        reshape_axes((2, 8, 3, 3), (1,), (2, 72))  # a flatten
    with pytest.raises(LayoutError, match="permutes the channels"):
        reshape_axes((2, 4, 2, 3, 3), (2, 1), (2, 8, 3, 3))  # a channel shuffle
    with pytest.raises(LayoutError, match="sums over the channels"):
        matmul_axes(4, 4, (1, 3), 0)  # q @ k^T sums over q's head dimension
    assert matmul_axes(4, 4, (1, 3), 1) == (1, 3)  # softmax(...) @ v keeps v's channels
    assert matmul_axes(3, 4, (0, 1), 0) == (1, 2)  # broadcast batch axes shift


# -- regions and exactness ----------------------------------------------------------------


def _kinds(graph):
    regions, skips = find_regions(graph, {})
    return regions, skips


@settings(max_examples=60, deadline=None, derandomize=True)
@given(
    st.integers(0, 10_000),
    st.sampled_from([1, 2, 4]),
    st.sampled_from(["layer", "rms"]),
    st.sampled_from([(0, 2, 1, 3), (2, 0, 1, 3)]),
    st.integers(0, 10_000),
)
def test_any_scales_keep_the_block_exact(seed, heads, norm, perm, scale_seed):
    """Norm -> q/k/v and norm -> gate/up, V -> O through the heads, up -> down through
    the gate: random positive scales on every region leave the function unchanged."""
    g = pre_ln_block(seed, c=8, h=heads, norm=norm, perm=perm)
    x = feed_tokens(g)
    before = run_graph(g, x)
    regions, _ = _kinds(g)
    assert sorted(r.kind for r in regions) == ["attention", "gated", "norm", "norm", "qk"]
    rng = np.random.default_rng(scale_seed)
    apply_scales(regions, {r.id: 10.0 ** rng.uniform(-2, 2, r.size) for r in regions})
    after = run_graph(g, x)
    for k, ref in before.items():
        assert np.max(np.abs(after[k] - ref)) <= 1e-9 * np.max(np.abs(ref))


def test_equalize_finds_each_pair_and_stays_exact():
    g = pre_ln_block(3)
    x = feed_tokens(g)
    before = run_graph(g, x)["add25:0"]
    result = equalize(g)
    kinds = sorted(r.kind for r in result.report.regions)
    assert kinds == ["attention", "gated", "norm", "norm", "qk"]
    # (whether these random weights gain enough to be scaled is the objective's call;
    # any scales are exact, above)
    after = run_graph(g, x)["add25:0"]
    assert np.max(np.abs(after - before)) <= 1e-9 * np.max(np.abs(before))
    reasons = " | ".join(s.reason for s in result.report.skipped)
    # q and k meet in q @ k^T (a Q -> K region, not refused), the gate goes through
    # SiLU, the residual stream is an input
    assert "the MatMul sums over the channels" not in reasons
    assert "opaque silu" in reasons
    assert "it reaches graph input 'x'" in reasons


def test_norm_affine_takes_the_scale():
    """The norm's gamma and beta are divided by the region's scales; the projections'
    columns multiplied."""
    g = pre_ln_block(1)
    norm = g.node("layernorm1")
    gamma, beta = norm.params["gamma"].copy(), norm.params["beta"].copy()
    regions, _ = _kinds(g)
    region = next(r for r in regions if r.kind == "norm" and r.sources[0][0] is norm)
    s = np.linspace(0.5, 4.0, region.size)
    apply_scales(regions, {r.id: s if r is region else np.ones(r.size) for r in regions})
    np.testing.assert_allclose(norm.params["gamma"], gamma / s)
    np.testing.assert_allclose(norm.params["beta"], beta / s)


def test_balance_refuses_norm_regions_and_scales_the_rest():
    g = pre_ln_block(2)
    x = feed_tokens(g)
    before = run_graph(g, x)["add25:0"]
    result = equalize(g, EqualizeOptions(objective="balance"))
    by_kind = {r.kind: r for r in result.report.regions}
    assert np.all(by_kind["norm"].scales == 1)
    assert np.any(by_kind["attention"].scales != 1)
    assert any("no weight range for a norm's affine" in s.reason for s in result.report.skipped)
    after = run_graph(g, x)["add25:0"]
    assert np.max(np.abs(after - before)) <= 1e-9 * np.max(np.abs(before))


def test_heads_merged_out_of_order_are_refused():
    """V's heads merged back as ``(B, T, D, H)``: the channels come back permuted, so
    V -> O is refused with the reason (scaling it would not be exact)."""
    b = TokenBuilder(0)
    x = b.input(8)
    v = b.heads(b.linear(x, 8, 8), 2, 4)  # (B, H, T, D)
    p = b.input_like("p", (2, 2, 5, 5))
    mixed = b.op("matmul", [p, v], out_shape=(2, 2, 5, 4))
    swapped = b.op("transpose", [mixed], out_shape=(2, 5, 4, 2), perm=(0, 2, 3, 1))
    merged = b.op("reshape", [swapped], out_shape=(2, 5, 8), shape=(2, 5, 8))
    g = b.build([b.linear(merged, 8, 8)])
    regions, skips = _kinds(g)
    assert not regions
    assert any("permutes the channels" in s.reason for s in skips)


def _class_token_head(index, axis: int = 1, seed: int = 0):
    """Tokens -> LayerNorm -> positions ``index`` of ``axis`` -> a head Linear (a ViT's
    or BERT's classifier on the class token)."""
    b = TokenBuilder(seed)
    x = b.input(8)
    n = b.norm(x, 8)
    shape = select_shape(b.g.values[n].shape, axis, index)
    picked = b.op("select", [n], out_shape=shape, axis=axis, index=index)
    return b.build([b.linear(picked, 8, 3)])


@pytest.mark.parametrize("index", [0, -1, slice(0, 1), slice(1, None, 2), (4, 0, 0)])
def test_the_class_token_carries_the_norm_to_the_head_exactly(index):
    g = _class_token_head(index)
    x = feed_tokens(g)
    before = run_graph(g, x)
    regions, skips = _kinds(g)
    assert [
        (r.kind, [n.name for n, _ in r.sources], [n.name for n, *_ in r.sinks]) for r in regions
    ] == [("norm", ["layernorm1"], ["fc3"])], skips
    s = np.random.default_rng(0).uniform(0.01, 100, regions[0].size)
    apply_scales(regions, {regions[0].id: s})
    after = run_graph(g, x)
    for k, ref in before.items():
        assert np.max(np.abs(after[k] - ref)) <= 1e-9 * np.max(np.abs(ref))
    assert positions(g)[g.outputs[0].name] == int(np.prod(before[k].shape[1:-1]))


def test_a_selection_of_channels_or_of_the_batch_is_refused_with_the_reason():
    _, skips = _kinds(_class_token_head(0, axis=2))  # x[:, :, 0]: one channel
    assert any("it selects one channel (axis 2)" in s.reason for s in skips), skips
    _, skips = _kinds(_class_token_head(0, axis=0))
    assert any("selects along the batch axis" in s.reason for s in skips), skips


def test_post_ln_output_also_feeds_the_residual():
    """Post-LN: the norm's output is both the next projections' input and the residual,
    which is normalized again: no exact scaling, refused with that reason."""
    b = TokenBuilder(0)
    x = b.input(8)
    n1 = b.norm(b.add(x, b.linear(x, 8, 8)), 8)
    n2 = b.norm(b.add(n1, b.linear(n1, 8, 8)), 8)
    g = b.build([n2])
    regions, skips = _kinds(g)
    assert not [r for r in regions if r.kind == "norm"]
    assert any("is normalized by" in s.reason for s in skips)


def test_channel_last_layer_reading_another_axis_is_not_a_sink():
    """A Linear applied to the last axis of an NCHW tensor mixes positions, not
    channels: the region ends there, with the reason."""
    b = TokenBuilder(0)
    g = b.g
    xi = g.add_input("img", 3)
    xi.shape = (2, 3, 4, 4)
    conv = g.add_node(
        "conv",
        ["img"],
        name="conv",
        params={"weight": np.ones((4, 3, 1, 1)), "bias": None},
        attrs={"pads": (0, 0, 0, 0)},
    )
    conv.outputs[0].shape = (2, 4, 4, 4)
    fc = b.linear(conv.outputs[0].name, 4, 4)
    g = b.build([fc])
    _, skips = _kinds(g)
    assert any("reads axis 3" in s.reason for s in skips)


def test_calibration_statistics_on_the_channel_axes():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 5, 2, 4)) + np.arange(8).reshape(1, 1, 2, 4)  # (B, T, H, D)
    acc = StatsAccumulator()
    acc.add("heads", x, channel_axes=(2, 3))
    acc.add("tokens", x.reshape(3, 5, 8), channel_axes=(2,))
    got = acc.result()
    np.testing.assert_allclose(got["heads"].mean, x.reshape(15, 8).mean(axis=0))
    np.testing.assert_allclose(got["tokens"].mean, got["heads"].mean)
    np.testing.assert_allclose(got["tokens"].hi, x.reshape(15, 8).max(axis=0))


@pytest.mark.parametrize("outer", [(3, 1), (None, 1)], ids=["batch-known", "batch-unknown"])
def test_calibration_statistics_of_the_batch_merged_with_the_heads(outer):
    """``(T, B * H, D)`` (nn.MultiheadAttention's heads, as both exporters split them):
    the batch merged above the heads is positions; each of the H * D channels gets the
    statistics of that channel in the plain ``(B, T, H, D)`` layout, whatever the batch."""
    rng = np.random.default_rng(0)
    acc = StatsAccumulator()
    plain = []
    for b in (3, 2):  # a last, smaller batch
        x = rng.standard_normal((b, 5, 2, 4)) * np.arange(1, 9).reshape(2, 4) + np.arange(
            8
        ).reshape(2, 4)
        plain.append(x.reshape(-1, 8))
        merged = x.transpose(1, 0, 2, 3).reshape(5, b * 2, 4)  # (T, B * H, D)
        acc.add(
            "merged",
            merged,
            channel_axes=(1, 2),
            channel_outer=(b, 1) if outer[0] else outer,
            channels=8,
        )
    want = np.concatenate(plain)
    got = acc.result()["merged"]
    assert got.channels == 8
    np.testing.assert_allclose(got.mean, want.mean(axis=0))
    np.testing.assert_allclose(got.hi, want.max(axis=0))
    np.testing.assert_allclose(got.lo, want.min(axis=0))


def test_calibration_statistics_refuse_sizes_that_disagree_with_the_layout():
    """A merged axis whose size is not a multiple of its channels is not measured (no
    statistics with a wrong channel count)."""
    acc = StatsAccumulator()
    acc.add("odd", np.ones((5, 7, 4)), channel_axes=(1, 2), channel_outer=(None, 1), channels=8)
    assert "odd" not in acc.result()


def test_token_positions_count_the_tokens():
    g = pre_ln_block(0)
    pos = positions(g)
    assert pos["fc2:0"] == 5  # (B, T, C): T positions
    assert pos["transpose4:0"] == 5  # (B, H, T, D): the heads are channels
