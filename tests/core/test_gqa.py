"""Grouped-query attention in the core: K / V heads repeated for several query heads
(``repeat_interleave``, or ``x[:, :, None].expand(...).reshape(...)``). The repeated
value's channel ``j`` copies V's channel ``map[j]``, so V -> O is one region over V's
channels whose O columns take the scale of the channel they read."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cle_core import EqualizeOptions, equalize, run_graph
from cle_core._layout import LayoutError, merged_copies, repeat_map
from cle_core._regions import find_regions
from cle_core._scale import apply_scales
from tests.helpers.ir_transformers import TokenBuilder, feed_tokens
from tests.helpers.strategies import channel_index


@st.composite
def _repeats(draw):
    """A rank-4 tensor with its channels on two of axes 1-3 (in either order of
    significance), one of them repeated ``n`` times."""
    shape = (draw(st.integers(1, 2)), *(draw(st.integers(1, 4)) for _ in range(3)))
    axes = tuple(draw(st.permutations([1, 2, 3]))[:2])
    axis = draw(st.sampled_from(axes))
    return shape, axes, axis, draw(st.integers(1, 4))


@settings(max_examples=200, deadline=None, derandomize=True)
@given(_repeats(), st.integers(0, 2**31))
def test_repeated_channels_copy_the_channels_the_map_names(case, seed):
    """Brute force: repeating the tensor of each element's channel number gives, at every
    element, the map's entry for the element's channel in the output; so scaling the
    input's channels by ``s`` then repeating equals repeating then scaling by
    ``s[map]``."""
    shape, axes, axis, n = case
    index = repeat_map(shape, axes, axis, n)
    out = np.repeat(channel_index(shape, axes), n, axis=axis)
    assert np.array_equal(index[channel_index(out.shape, axes)], out)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape)
    s = 10.0 ** rng.uniform(-2, 2, index.max() + 1)
    scaled_first = np.repeat(x / s[channel_index(shape, axes)], n, axis=axis)
    scaled_after = np.repeat(x, n, axis=axis) / s[index][channel_index(out.shape, axes)]
    np.testing.assert_allclose(scaled_first, scaled_after, rtol=1e-15)


@settings(max_examples=100, deadline=None, derandomize=True)
@given(
    st.integers(1, 2), st.integers(1, 4), st.integers(1, 4), st.integers(1, 3), st.integers(1, 5)
)
def test_expanded_heads_merged_back_are_a_repeat_of_the_heads(b, kv, n, t, d):
    """``x[:, :, None].expand(b, kv, n, t, d).reshape(b, kv * n, t, d)`` of heads ``(B, KV,
    T, D)`` (channels on axes 1 and 3): the same map as ``repeat_interleave(n, dim=1)``,
    and the channels on the same axes."""
    x = channel_index((b, kv, 1, t, d), (1, 4))
    out = np.broadcast_to(x, (b, kv, n, t, d)).reshape(b, kv * n, t, d)
    axes, index = merged_copies((b, kv, n, t, d), (1, 4), 2, (b, kv * n, t, d))
    assert axes == (1, 3)
    assert np.array_equal(index[channel_index(out.shape, axes)], out)
    assert np.array_equal(index, repeat_map((b, kv, t, d), (1, 3), 1, n))


def test_copies_merged_with_another_axis_are_refused():
    with pytest.raises(LayoutError, match="does more than merge repeated positions"):
        merged_copies((2, 3, 4, 5), (1, 3), 2, (2, 3, 20))


def _gqa_block(seed=0, c=8, h=4, kv=2, how="interleave"):
    b = TokenBuilder(seed)
    x = b.input(c)
    y = b.add(x, b.gqa_attention(b.norm(x, c), c, h, kv, how))
    return b.build([y])


@settings(max_examples=40, deadline=None, derandomize=True)
@given(
    st.integers(0, 10_000),
    st.sampled_from([(4, 2), (8, 2), (6, 3), (4, 4)]),
    st.sampled_from(["interleave", "expand"]),
    st.integers(0, 10_000),
)
def test_any_scales_keep_grouped_query_attention_exact(seed, heads, how, scale_seed):
    """V -> O is found through the repeat (each O column reads the V channel its head
    copies) and random positive scales on every region keep the block exact."""
    h, kv = heads
    g = _gqa_block(seed, c=2 * h, h=h, kv=kv, how=how)
    x = feed_tokens(g)
    before = run_graph(g, x)
    regions, skips = find_regions(g, {})
    assert sorted(r.kind for r in regions) == ["attention", "norm", "qk"]
    attention = next(r for r in regions if r.kind == "attention")
    assert attention.size == 2 * kv  # V's channels, not the repeated ones
    qk = next(r for r in regions if r.kind == "qk")
    assert qk.size == 2 * kv  # K's channels, each met by h / kv query heads
    rng = np.random.default_rng(scale_seed)
    apply_scales(regions, {r.id: 10.0 ** rng.uniform(-2, 2, r.size) for r in regions})
    after = run_graph(g, x)
    for k, ref in before.items():
        assert np.max(np.abs(after[k] - ref)) <= 1e-9 * np.max(np.abs(ref))


@pytest.mark.parametrize("objective", ["balance", "noise"])
@pytest.mark.parametrize("how", ["interleave", "expand"])
def test_equalize_scales_v_to_o_through_the_repeat(objective, how):
    """Both objectives scale V -> O (the balance reads each V channel's largest O column
    over its copies, the estimate the sum of their noise) and the block stays exact."""
    g = _gqa_block(3, c=16, h=4, kv=2, how=how)
    regions, _ = find_regions(g, {})
    # V's rows over four decades, O's columns the other way: the same function, with a
    # per-tensor grid on V that equalization has to fix
    apply_scales(regions, {r.id: 10.0 ** np.linspace(-2, 2, r.size) for r in regions})
    x = feed_tokens(g)
    before = run_graph(g, x)
    result = equalize(g, EqualizeOptions(objective=objective))
    attention = next(r for r in result.report.regions if r.kind == "attention")
    assert attention.channels == 8
    assert np.any(attention.scales != 1)
    after = run_graph(g, x)
    for k, ref in before.items():
        assert np.max(np.abs(after[k] - ref)) <= 1e-9 * np.max(np.abs(ref))
    # Q K^T: K's channels, each met by two query heads' channels, are a Q -> K region
    assert [r.channels for r in result.report.regions if r.kind == "qk"] == [8]


def test_the_balance_reads_the_largest_column_over_the_copies():
    """The balance of V channel c takes the largest O column among the copies of c."""
    g = _gqa_block(5, c=8, h=4, kv=2)
    regions, _ = find_regions(g, {})
    attention = next(r for r in regions if r.kind == "attention")
    ((source, _),), ((sink, cols, _),) = attention.sources, attention.sinks
    result = equalize(g, EqualizeOptions(objective="balance"))
    s = next(r for r in result.report.regions if r.kind == "attention").scales
    # after balancing, each channel's V row range equals its largest scaled O column range
    rows = np.abs(source.weight).max(axis=1)
    cols_r = np.abs(sink.weight).max(axis=0)
    largest = np.zeros(attention.size)
    np.maximum.at(largest, cols, cols_r)
    np.testing.assert_allclose(rows, largest, rtol=1e-9)
    assert np.any(s != 1)


@pytest.mark.parametrize("how", ["interleave", "expand"])
def test_one_kv_head_is_refused_with_the_reason(how):
    """Multi-query attention (one K / V head): the head axis of size 1 holds no channel,
    so its copies are positions, which the merge of the heads mixes with the channels."""
    g = _gqa_block(0, c=8, h=4, kv=1, how=how)
    regions, skips = find_regions(g, {})
    # (Q -> K is exact there: every query head meets the one K head's channels, where
    # the repeat of a size-1 head axis keeps them whole; the expand's reshape is refused)
    assert [r.kind for r in regions] == ["norm"] + (["qk"] if how == "interleave" else [])
    why = {
        "interleave": "merges the channels with another axis",
        "expand": "merges repeated positions with an axis that holds no channels",
    }[how]
    assert any(why in s.reason for s in skips)


def test_a_repeat_of_the_batch_is_refused_with_the_reason():
    b = TokenBuilder(0)
    x = b.input(8)
    h = b.linear(x, 8, 8)
    r = b.op("repeat", [h], out_shape=(4, 5, 8), axis=0, repeats=2)
    g = b.build([b.linear(r, 8, 4)])
    regions, skips = find_regions(g, {})
    assert not regions
    assert any("it repeats the batch" in s.reason for s in skips)


def test_a_repeat_of_positions_keeps_every_channel():
    """Tokens repeated (not the channels' axis): every channel is kept whole, so the pair
    across it is exact."""
    b = TokenBuilder(0)
    x = b.input(8)
    h = b.linear(x, 8, 8)
    r = b.op("repeat", [h], out_shape=(2, 15, 8), axis=1, repeats=3)
    g = b.build([b.linear(r, 8, 4)])
    xs = feed_tokens(g)
    before = run_graph(g, xs)
    regions, _ = find_regions(g, {})
    assert [r.kind for r in regions] == ["pair"]
    apply_scales(regions, {regions[0].id: np.linspace(0.1, 10, 8)})
    after = run_graph(g, xs)
    for k, ref in before.items():
        assert np.max(np.abs(after[k] - ref)) <= 1e-9 * np.max(np.abs(ref))


# --- q / k / v cut from one packed projection --------------------------------------------


def _packed_block(seed=0, c=8, h=2, cut="last"):
    b = TokenBuilder(seed)
    x = b.input(c)
    y = b.add(x, b.packed_attention(b.norm(x, c), c, h, cut))
    return b.build([y])


@settings(max_examples=30, deadline=None, derandomize=True)
@given(
    st.integers(0, 10_000),
    st.sampled_from([1, 2, 4]),
    st.sampled_from(["last", "front"]),
    st.integers(0, 10_000),
)
def test_v_cut_from_a_packed_projection_is_scaled_q_and_k_kept(seed, heads, cut, scale_seed):
    """q | k | v from one projection (GPT's split of the last axis, or a Gather of the
    axis that holds the three): one region over the packed output whose q and k
    channels, which meet in Q K^T, are kept at scale 1 (with the reason), and whose v
    channels reach O through the cut. Random scales on the other channels: exact."""
    c = 8
    g = _packed_block(seed, c=c, h=heads, cut=cut)
    x = feed_tokens(g)
    before = run_graph(g, x)
    regions, skips = find_regions(g, {})
    assert sorted(r.kind for r in regions) == ["attention", "norm"]
    attention = next(r for r in regions if r.kind == "attention")
    assert attention.size == 3 * c
    assert attention.frozen.tolist() == [True] * 2 * c + [False] * c
    ((sink, cols, _),) = attention.sinks
    assert cols.tolist() == list(range(2 * c, 3 * c))
    kept = [s for s in skips if "kept at scale 1" in s.candidate]
    assert sorted(s.candidate.split("(")[1] for s in kept) == [
        f"channels 0-{c - 1} kept at scale 1)",
        f"channels {c}-{2 * c - 1} kept at scale 1)",
    ]
    assert all("the MatMul sums over the channels" in s.reason for s in kept)
    rng = np.random.default_rng(scale_seed)
    apply_scales(
        regions,
        {
            r.id: np.where(r.frozen, 1.0, 10.0 ** rng.uniform(-2, 2, r.size))
            if r.frozen is not None
            else 10.0 ** rng.uniform(-2, 2, r.size)
            for r in regions
        },
    )
    after = run_graph(g, x)
    for k, ref in before.items():
        assert np.max(np.abs(after[k] - ref)) <= 1e-9 * np.max(np.abs(ref))


@pytest.mark.parametrize("objective", ["balance", "noise"])
@pytest.mark.parametrize("cut", ["last", "front"])
def test_both_objectives_keep_q_and_k_at_one(objective, cut):
    g = _packed_block(3, c=16, h=4, cut=cut)
    regions, _ = find_regions(g, {})
    attention = next(r for r in regions if r.kind == "attention")
    # v's rows over four decades, O's columns the other way: work for the objective
    s = np.ones(attention.size)
    s[~attention.frozen] = 10.0 ** np.linspace(-2, 2, int((~attention.frozen).sum()))
    apply_scales(regions, {r.id: s if r is attention else np.ones(r.size) for r in regions})
    x = feed_tokens(g)
    before = run_graph(g, x)
    result = equalize(g, EqualizeOptions(objective=objective))
    got = next(r for r in result.report.regions if r.kind == "attention").scales
    assert np.all(got[:32] == 1.0)  # q and k
    assert np.any(got[32:] != 1.0)  # v
    after = run_graph(g, x)
    for k, ref in before.items():
        assert np.max(np.abs(after[k] - ref)) <= 1e-9 * np.max(np.abs(ref))


def test_a_part_kept_at_one_needs_scalable_channels_left():
    """Every channel of K refused behind its repeat (a repeated K read by Q K^T, where q
    is no projection's, so no Q -> K region): no channel is left to scale, so the
    region is refused as before, with the reason."""
    b = TokenBuilder(0)
    x = b.input(8)
    h = b.norm(x, 8)
    k, v = (b.repeat_heads(b.heads(b.linear(h, 8, 4), 2, 2), 2) for _ in range(2))
    y = b._attend(b.input_like("q", (2, 4, 5, 2)), k, v, 8, 4)
    g = b.build([b.add(x, y)])
    regions, skips = find_regions(g, {})
    assert all(r.frozen is None for r in regions)
    assert any(
        "the MatMul sums over the channels" in s.reason and "kept" not in s.candidate for s in skips
    )


@st.composite
def _selections(draw):
    """A rank-4 tensor with its channels on two of axes 1-3, and positions of one of
    those axes: an integer, a slice or a tuple of integers."""
    shape = (draw(st.integers(1, 2)), *(draw(st.integers(1, 4)) for _ in range(3)))
    axes = tuple(draw(st.permutations([1, 2, 3]))[:2])
    axis = draw(st.sampled_from(axes))
    size = shape[axis]
    kind = draw(st.sampled_from(["int", "slice", "tuple"]))
    if kind == "int":
        index = draw(st.integers(0, size - 1))
    elif kind == "slice":
        start = draw(st.integers(0, size - 1))
        index = slice(start, draw(st.integers(start + 1, size)), draw(st.integers(1, 2)))
    else:
        index = tuple(draw(st.lists(st.integers(0, size - 1), min_size=1, max_size=5)))
    return shape, axes, axis, index


@settings(max_examples=200, deadline=None, derandomize=True)
@given(_selections())
def test_selected_channels_are_the_channels_the_map_names(case):
    """Brute force, as for the repeat: selecting positions of the tensor of each
    element's channel number gives, at every element, the map's entry for its channel
    in the output (channels on the axes the function gives)."""
    from cle_core._layout import select_map

    shape, axes, axis, index = case
    out_axes, kept = select_map(shape, axes, axis, index)
    key = list(index) if isinstance(index, tuple) else index
    out = channel_index(shape, axes)[(slice(None),) * axis + (key,)]
    assert np.array_equal(kept[channel_index(out.shape, out_axes)], out)


def test_a_scale_draw_keeps_q_and_k_at_one():
    """Channels a region must keep at 1 stay there under a redrawn equalization; the
    others are drawn, each its own way, and the function is the same."""
    g = _packed_block(3, c=16, h=4, cut="last")
    x = feed_tokens(g)
    before = run_graph(g, x)
    result = equalize(g, EqualizeOptions(objective="balance", scale_draw=7))
    got = next(r for r in result.report.regions if r.kind == "attention").scales
    assert np.all(got[:32] == 1.0)  # q and k
    assert len(np.unique(got[32:])) == 16  # v: drawn
    after = run_graph(g, x)
    for k, ref in before.items():
        assert np.max(np.abs(after[k] - ref)) <= 1e-9 * np.max(np.abs(ref))
