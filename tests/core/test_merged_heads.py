"""The batch merged with the heads (issue 21): ``nn.MultiheadAttention`` as both ONNX
exporters write it splits the heads of ``(T, B, C)`` as ``(T, B * H, D)``, transposes to
``(B * H, T, D)`` and splits the batch back, ``(B, H, T, D)``; after the attention the
heads are merged back, ``(T, B, H, D) -> (T * B, C)``. :func:`reshape_layout` follows the
channels through the merge (a channel axis with an outer, non-channel part); checked
element by element against a brute force."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cle_core._layout import LayoutError, reshape_layout, transpose_axes
from tests.helpers.strategies import channel_index


def _follow(shape, axes, outer, steps, x):
    """Apply ``steps`` (``("reshape", shape)`` / ``("transpose", perm)``) to ``x`` and to
    the layout; after each, the layout must give every element the channel it has."""
    for kind, arg in steps:
        if kind == "transpose":
            x, axes = np.transpose(x, arg), transpose_axes(axes, arg)
        else:
            x = x.reshape(arg)
            axes, outer = reshape_layout(shape, axes, outer, arg)
        shape = tuple(x.shape)
        assert np.array_equal(channel_index(shape, axes, outer), x), (kind, arg, axes, outer)
    return shape, axes, outer


@settings(max_examples=200, deadline=None, derandomize=True)
@given(
    st.integers(1, 4),
    st.integers(1, 3),
    st.sampled_from([1, 2, 3, 4]),
    st.sampled_from([2, 3, 4]),
    st.booleans(),
)
def test_the_exporters_heads_split_with_the_batch_keeps_every_channel(t, b, h, d, dynamo):
    """Both exporters' chain, for any T, B, H, D: the channels are followed through the
    merge with the batch and its undoing, and end on the last axis of ``(T * B, C)``
    with no merged part (the dynamo exporter merges back to ``(T * B, C)``, the
    TorchScript one too; they differ in the reshape of V that the heads start from)."""
    c = h * d
    steps = [
        ("reshape", (t, b * h, d)),
        ("transpose", (1, 0, 2)),
        ("reshape", (b, h, t, d)),
        ("transpose", (2, 0, 1, 3)),
        ("reshape", (t * b, c) if dynamo else (t, b, c)),
    ]
    shape, axes, outer = _follow((t, b, c), (2,), None, steps, channel_index((t, b, c), (2,)))
    assert (axes, outer) == ((len(shape) - 1,), None)
    if b > 1:
        # the batch unknown: the same layouts, with the merged part unknown (None)
        unknown = [(t, None, d), (1, 0, 2), (None, h, t, d), (2, 0, 1, 3)]
        unknown.append((None, c) if dynamo else (t, None, c))
        shape, axes, outer = (t, b, c), (2,), None
        blind, blind_axes, blind_outer = (t, None, c), (2,), None
        for (kind, arg), arg_blind in zip(steps, unknown, strict=True):
            if kind == "transpose":
                axes, blind_axes = transpose_axes(axes, arg), transpose_axes(blind_axes, arg)
                shape = tuple(shape[p] for p in arg)
                blind = tuple(blind[p] for p in arg)
                continue
            axes, outer = reshape_layout(shape, axes, outer, arg)
            blind_axes, blind_outer = reshape_layout(blind, blind_axes, blind_outer, arg_blind, c)
            assert blind_axes == axes, (blind, arg_blind)
            assert blind_outer == (
                None if outer is None else tuple(o if o == 1 else None for o in outer)
            )
            shape, blind = arg, arg_blind


@st.composite
def _merges(draw):
    """A shape with channels on one or two axes, some merged with an outer part, and a
    reshape of it to a random refinement-and-merge of its sizes."""
    t, b = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    h, d = draw(st.sampled_from([1, 2, 4])), draw(st.sampled_from([1, 2, 3]))
    shape, axes, outer = (t, b * h, d), (1, 2), (b, 1)
    # the target: the prime factors of the sizes, in order, grouped at random
    factors = []
    for n in shape:
        f, k = [], 2
        while n > 1:
            while n % k == 0:
                f.append(k)
                n //= k
            k += 1
        factors += f
    cuts = draw(st.lists(st.booleans(), min_size=len(factors), max_size=len(factors)))
    target, cur = [], 1
    for f, cut in zip(factors, cuts, strict=True):
        cur *= f
        if cut:
            target.append(cur)
            cur = 1
    target.append(cur)
    return shape, axes, outer, tuple(target)


@settings(max_examples=300, deadline=None, derandomize=True)
@given(_merges())
def test_a_merged_layout_is_followed_only_where_every_element_keeps_its_channel(case):
    """Any reshape of a value whose heads are merged with the batch: where
    :func:`reshape_layout` answers, the answer gives every element its channel; a merge
    whose channels would lie on a single axis (which a layer would read as features)
    is refused."""
    shape, axes, outer, target = case
    x = channel_index(shape, axes, outer).reshape(target)
    try:
        new_axes, new_outer = reshape_layout(shape, axes, outer, target)
    except LayoutError:
        return
    assert np.array_equal(channel_index(target, new_axes, new_outer), x)
    if new_outer is not None:
        assert len(new_axes) >= 2


def test_a_merge_that_a_layer_would_read_is_refused():
    """The batch merged into the channels of one axis: a Linear would read ``B * C``
    features; refused, as a flatten is."""
    with pytest.raises(LayoutError, match="merges the channels with another axis"):
        reshape_layout((5, 2, 16), (2,), None, (5, 32))
    with pytest.raises(LayoutError, match="merges the channels with another axis"):
        # the tokens between the heads and the head dimension
        reshape_layout((8, 5, 4), (0, 2), (2, 1), (2, 80))
    # the batch split off again, the heads merged back: (T, B, C)
    assert reshape_layout((5, 8, 4), (1, 2), (2, 1), (5, 2, 16)) == ((2,), None)
    # the plain rule is unchanged: (axes, no merged part)
    assert reshape_layout((2, 5, 16), (2,), None, (2, 5, 4, 4)) == ((2, 3), None)


def _mha_graph(seed: int, t: int, b: int, h: int, d: int, dynamic: bool):
    """``nn.MultiheadAttention`` as both exporters write it, in the IR: tokens ``(T, B,
    C)``, q / k / v projections, each split as ``(T, B * H, D)``, transposed to ``(B * H,
    T, D)`` and split back to ``(B, H, T, D)``; ``softmax(q k^T) @ v``; ``(T, B, H, D)``
    merged to ``(T * B, C)``; the out projection. ``dynamic``: the shapes hold None
    wherever the batch is a factor."""
    from tests.helpers.ir_transformers import TokenBuilder, _softmax

    c = h * d
    unknown = None if dynamic else b
    tb = TokenBuilder(seed, batch=t, tokens=b)  # (its "batch" first: here the tokens)
    x = tb.input(c)
    tb.g.values[x].shape = (t, unknown, c)

    def heads(z):
        bh = None if dynamic else b * h
        z = tb.op("reshape", [z], out_shape=(t, bh, d), shape=(t, bh, d))
        z = tb.op("transpose", [z], out_shape=(bh, t, d), perm=(1, 0, 2))
        return tb.op("reshape", [z], out_shape=(unknown, h, t, d), shape=(unknown, h, t, d))

    def project(z):
        out = tb.linear(z, c, c)
        return tb.shaped(out, (t, unknown, c))

    q, k, v = (heads(project(x)) for _ in range(3))
    kt = tb.op("transpose", [k], out_shape=(unknown, h, d, t), perm=(0, 1, 3, 2))
    scores = tb.op("matmul", [q, kt], out_shape=(unknown, h, t, t))
    p = tb.opaque([scores], _softmax, (unknown, h, t, t), "softmax")
    mixed = tb.op("matmul", [p, v], out_shape=(unknown, h, t, d))
    back = tb.op("transpose", [mixed], out_shape=(t, unknown, h, d), perm=(2, 0, 1, 3))
    tbn = None if dynamic else t * b
    merged = tb.op("reshape", [back], out_shape=(tbn, c), shape=(tbn, c))
    out = tb.linear(merged, c, c)
    graph = tb.build([tb.shaped(out, (tbn, c))])
    rng = np.random.default_rng(seed + 1)
    return graph, {"x": rng.standard_normal((t, b, c))}


@settings(max_examples=60, deadline=None, derandomize=True)
@given(
    st.integers(0, 1000),
    st.integers(1, 4),
    st.integers(1, 3),
    st.sampled_from([1, 2, 4]),
    st.sampled_from([2, 3]),
    st.booleans(),
    st.integers(0, 1000),
)
def test_v_to_o_through_the_batch_merged_with_the_heads_is_exact_for_any_scales(
    seed, t, b, h, d, dynamic, scale_seed
):
    """The graph above, run by the core's executor: V -> O is one attention region over
    V's channels (q and k meet in ``Q K^T`` and are not scaled), and any positive scales
    on it leave the output as it was, with the batch known or not."""
    from cle_core import run_graph
    from cle_core._regions import find_regions
    from cle_core._scale import apply_scales

    g, x = _mha_graph(seed, t, b, h, d, dynamic)
    before = run_graph(g, x)
    regions, skips = find_regions(g, {})
    attention = [r for r in regions if r.kind == "attention"]
    assert [r.size for r in attention] == [h * d], [s.reason for s in skips]
    rng = np.random.default_rng(scale_seed)
    apply_scales(attention, {r.id: 10.0 ** rng.uniform(-2, 2, r.size) for r in attention})
    after = run_graph(g, x)
    for name, ref in before.items():
        np.testing.assert_allclose(after[name], ref, rtol=1e-9, atol=1e-9 * np.abs(ref).max())


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_values_with_the_batch_merged_with_the_heads_count_the_tokens_as_positions(dynamic):
    """``(T, B * H, D)`` and ``(B * H, T, D)``: the batch is inside the channel axis, so
    every other axis, the first too, holds positions: T of them (the activation
    rounding's gain divides by it)."""
    from cle_core._stats import positions

    g, _ = _mha_graph(0, 5, 2, 2, 3, dynamic)
    g.validate()
    merged = [v for v in g.values.values() if v.channel_outer is not None]
    assert len(merged) >= 6  # q, k, v: after the split and after the transpose
    pos = positions(g)
    assert {pos[v.name] for v in merged} == {5}, [(v.name, v.shape, pos[v.name]) for v in merged]
