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
