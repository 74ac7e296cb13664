"""Where a tensor's channels are: pure functions that follow them through Transpose,
Reshape, MatMul and the selection of positions (a class token).

A value's channels may lie on one axis (``(N, C, H, W)``: axis 1; ``(B, T, C)``: axis 2)
or on several, as when attention splits them into heads (``(B, H, T, D)``: channel
``c = h * D + d`` lies on axes 1 and 3). ``axes`` lists them from the most significant
to the least, so that channel ``c`` is the row-major index over those axes in that order.
A scale per channel commutes with an op when the op moves whole channels without mixing
them with anything else and keeps their order; these functions say where the channels
are after the op, or why they cannot be followed (:class:`LayoutError`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

Shape = Sequence[int | None]


class LayoutError(ValueError):
    """The channels cannot be followed through an op; the message says why."""


def transpose_axes(axes: Sequence[int], perm: Sequence[int]) -> tuple[int, ...]:
    """Channel axes after ``transpose(perm)`` (output axis ``k`` is input axis
    ``perm[k]``): each channel axis moves, their order of significance does not."""
    perm = list(perm)
    if sorted(perm) != list(range(len(perm))):
        raise LayoutError(f"{tuple(perm)} is not a permutation")
    return tuple(perm.index(a) for a in axes)


def _groups(in_shape: Shape, out_shape: Shape) -> list[tuple[list[int], list[int]]]:
    """Pair runs of input axes with the runs of output axes they become (equal products,
    row-major), e.g. ``(B, T, C) -> (B, T, H, D)``: ``[0]-[0], [1]-[1], [2]-[2, 3]``.
    An unknown size (None) must stand alone on both sides, at matching places."""
    groups: list[tuple[list[int], list[int]]] = []
    i = j = 0
    n_in, n_out = len(in_shape), len(out_shape)
    while i < n_in or j < n_out:
        if i == n_in or j == n_out:
            # Only ones may be left over: they join the last group.
            rest_in, rest_out = list(range(i, n_in)), list(range(j, n_out))
            if any(in_shape[a] != 1 for a in rest_in) or any(out_shape[b] != 1 for b in rest_out):
                raise LayoutError(f"{tuple(in_shape)} does not reshape to {tuple(out_shape)}")
            if groups:
                groups[-1][0].extend(rest_in)
                groups[-1][1].extend(rest_out)
            else:
                groups.append((rest_in, rest_out))
            break
        if in_shape[i] is None or out_shape[j] is None:
            if in_shape[i] is not None or out_shape[j] is not None:
                raise LayoutError(
                    f"a dimension of unknown size in {tuple(in_shape)} -> {tuple(out_shape)} "
                    "does not map to one dimension"
                )
            groups.append(([i], [j]))
            i, j = i + 1, j + 1
            continue
        gi, gj = [i], [j]
        pi, pj = int(in_shape[i]), int(out_shape[j])
        i, j = i + 1, j + 1
        while pi != pj:
            if pi < pj:
                if i == n_in or in_shape[i] is None:
                    raise LayoutError(f"{tuple(in_shape)} does not reshape to {tuple(out_shape)}")
                gi.append(i)
                pi *= int(in_shape[i])
                i += 1
            else:
                if j == n_out or out_shape[j] is None:
                    raise LayoutError(f"{tuple(in_shape)} does not reshape to {tuple(out_shape)}")
                gj.append(j)
                pj *= int(out_shape[j])
                j += 1
        groups.append((gi, gj))
    return groups


def reshape_axes(in_shape: Shape, axes: Sequence[int], out_shape: Shape) -> tuple[int, ...]:
    """Channel axes after reshaping ``in_shape`` (channels on ``axes``) to ``out_shape``.

    The channels survive when every run of axes the reshape merges or splits holds only
    channel axes (of size > 1), in their order of significance: heads split
    ``(B, T, C) -> (B, T, H, D)`` and merged back, spatial axes merged beside them
    ``(B, C, H, W) -> (B, C, H * W)``. Merging a channel axis with another axis (a
    flatten) or merging channel axes out of order (a channel shuffle) raises."""
    significant = [a for a in axes if in_shape[a] != 1]
    runs: dict[int, tuple[int, list[int]]] = {}  # first axis of a run -> (length, out axes)
    for gi, gj in _groups(in_shape, out_shape):
        chan = [a for a in gi if a in significant]
        other = [a for a in gi if a not in axes and in_shape[a] != 1]
        if not chan:
            continue
        if other:
            raise LayoutError(
                f"the reshape {tuple(in_shape)} -> {tuple(out_shape)} merges the channels "
                "with another axis"
            )
        start = significant.index(chan[0])
        if significant[start : start + len(chan)] != chan:
            raise LayoutError(
                f"the reshape {tuple(in_shape)} -> {tuple(out_shape)} permutes the channels "
                "(it merges their axes out of order)"
            )
        runs[chan[0]] = (len(chan), [b for b in gj if out_shape[b] != 1] or gj[-1:])
    out: list[int] = []
    k = 0
    while k < len(significant):
        length, outs = runs[significant[k]]
        out.extend(outs)
        k += length
    return tuple(out)


def reshape_layout(
    in_shape: Shape,
    axes: Sequence[int],
    outer: Sequence[int] | None,
    out_shape: Shape,
) -> tuple[tuple[int, ...], tuple[int, ...] | None]:
    """Channel axes and their outer factors (see below) after reshaping ``in_shape``
    (channels on ``axes``) to ``out_shape``: :func:`reshape_axes`, and also a reshape
    that merges a non-channel axis into a channel axis as its most significant part.

    ``nn.MultiheadAttention`` as both ONNX exporters write it splits the heads of a
    ``(T, B, C)`` value as ``(T, B * H, D)``: position ``b * H + h`` of axis 1, the
    batch merged with the heads. A per-channel scale is then still one number per
    position of axes 1 and 2 (``s[h * D + d]``, the same for every ``b``), so it
    commutes with what moves whole positions, and the split back ``(B * H, T, D) -> (B,
    H, T, D)`` restores the plain layout. ``outer`` holds, for each channel axis, the
    size of the non-channel part merged above its channels (1: none; None: all 1).
    Such a merge is followed only while the channels lie on two axes or more, which no
    layer and no per-channel constant reads, and only where every size involved is
    known; what would mix the merged part with the channels otherwise raises."""
    outer = tuple(outer) if outer is not None else (1,) * len(axes)
    if all(o == 1 for o in outer):
        try:
            return reshape_axes(in_shape, axes, out_shape), None
        except LayoutError as e:
            if "merges the channels with another axis" not in str(e):
                raise
            plain_error = e
    else:
        plain_error = None
    merges = LayoutError(
        f"the reshape {tuple(in_shape)} -> {tuple(out_shape)} merges the channels with another axis"
    )
    # Each axis is cut into atoms (row-major digits) so that every input and output axis
    # is a run of atoms: a channel atom carries its place in the order of significance
    # (its axis's rank in ``axes``, then its digits within the axis), others carry None.
    out_atoms: dict[int, list[tuple[int, tuple | None]]] = {}
    for gi, gj in _groups(in_shape, out_shape):
        if any(in_shape[a] is None for a in gi) or any(out_shape[b] is None for b in gj):
            if any(a in axes for a in gi):
                raise plain_error or merges
            continue
        atoms: list[tuple[int, tuple | None]] = []
        for a in gi:
            size = int(in_shape[a])
            if a in axes:
                k = list(axes).index(a)
                if size % outer[k]:
                    raise LayoutError(f"axis {a} of size {size} holds {outer[k]} merged positions")
                atoms += [(outer[k], None), (size // outer[k], (k,))]
            else:
                atoms.append((size, None))
        atoms = [t for t in atoms if t[0] != 1]
        if not any(tag is not None for _, tag in atoms):
            continue
        for b in gj:
            need, mine = int(out_shape[b]), []
            while need > 1:
                if not atoms:
                    raise merges
                size, tag = atoms.pop(0)
                if need % size == 0:
                    mine.append((size, tag))
                    need //= size
                elif size % need == 0:  # the atom splits: its upper digits stay here
                    hi, lo = (None, None) if tag is None else ((*tag, 0), (*tag, 1))
                    mine.append((need, hi))
                    atoms.insert(0, (size // need, lo))
                    need = 1
                else:
                    raise merges
            out_atoms[b] = mine
    out_axes, out_outer, order = [], [], []
    for b, mine in out_atoms.items():
        tags = [tag for _, tag in mine if tag is not None]
        if not tags:
            continue
        first = next(i for i, (_, tag) in enumerate(mine) if tag is not None)
        if any(tag is None for _, tag in mine[first:]):
            raise merges  # positions below channels: a flatten
        out_axes.append(b)
        out_outer.append(int(np.prod([size for size, _ in mine[:first]], dtype=np.int64)))
        order.append(tags)
    ranked = sorted(range(len(out_axes)), key=lambda i: order[i][0])
    flat = [t for i in ranked for t in order[i]]
    if flat != sorted(flat):
        raise LayoutError(
            f"the reshape {tuple(in_shape)} -> {tuple(out_shape)} permutes the channels "
            "(it merges their axes out of order)"
        )
    new_axes = tuple(out_axes[i] for i in ranked)
    new_outer = tuple(out_outer[i] for i in ranked)
    if any(o != 1 for o in new_outer) and len(new_axes) < 2:
        raise plain_error or merges  # a layer would read the merged positions as channels
    return new_axes, (new_outer if any(o != 1 for o in new_outer) else None)


def matmul_axes(a_rank: int, b_rank: int, axes: Sequence[int], operand: int) -> tuple[int, ...]:
    """Channel axes of ``A @ B`` when the channels are on ``axes`` of operand ``operand``
    (0 for A, 1 for B) and the other operand is not scaled: the product is linear in
    each operand, so a per-channel scale passes through unless the channels are the
    axis the product sums over (A's last, B's second to last)."""
    if a_rank < 2 or b_rank < 2:
        raise LayoutError("a MatMul of a vector")
    rank = max(a_rank, b_rank)
    own = a_rank if operand == 0 else b_rank
    summed = own - 1 if operand == 0 else own - 2
    if summed in axes:
        raise LayoutError("the MatMul sums over the channels")
    return tuple(a + rank - own for a in axes)


Index = int | slice | tuple[int, ...]


def select_axes(rank: int, axes: Sequence[int], axis: int, index: Index) -> tuple[int, ...]:
    """Channel axes after selecting positions ``index`` of ``axis`` (``x[:, 0]``: an
    integer, the axis goes; a slice or a list of indices: the axis stays, shorter). Every
    channel is kept whole when the axis is not one of theirs, so a per-channel scale
    commutes with it; the axes after a removed one move down by one. The batch (axis 0)
    and the channels' own axes are refused."""
    if not 0 <= axis < rank:
        raise LayoutError(f"axis {axis} of a rank-{rank} tensor")
    if axis == 0:
        raise LayoutError("it selects along the batch axis")
    if axis in axes:
        raise LayoutError(f"it selects along the channels (axis {axis})")
    if not isinstance(index, int):
        return tuple(axes)
    return tuple(a - (a > axis) for a in axes)


def select_map(
    shape: Shape, axes: Sequence[int], axis: int, index: Index
) -> tuple[tuple[int, ...], np.ndarray]:
    """Channel axes and channel map (output channel ``j`` is input channel ``map[j]``)
    after selecting positions ``index`` of ``axis``, one of the channel ``axes``: some
    channels kept whole (q, k or v cut from a packed projection). An integer index
    removes the axis."""
    if isinstance(index, int) and len(axes) == 1:
        raise LayoutError(f"it selects one channel (axis {axis}): no channel axis is left")
    sizes = [shape[a] for a in axes]
    if any(d is None for d in sizes):
        raise LayoutError("the channel axes' sizes are not known")
    numbers = np.arange(int(np.prod(sizes, dtype=np.int64))).reshape([int(d) for d in sizes])
    key = list(index) if isinstance(index, tuple) else index
    kept = numbers[(slice(None),) * list(axes).index(axis) + (key,)]
    if isinstance(index, int):
        return tuple(a - (a > axis) for a in axes if a != axis), kept.reshape(-1)
    return tuple(axes), kept.reshape(-1)


def select_shape(shape: Shape, axis: int, index: Index) -> tuple[int | None, ...]:
    """The shape after selecting positions ``index`` of ``axis`` (see :func:`select_axes`);
    None for a size that is not known."""
    size = shape[axis]
    if isinstance(index, int):
        return (*shape[:axis], *shape[axis + 1 :])
    if isinstance(index, slice):
        kept = None if size is None else len(range(*index.indices(int(size))))
    else:
        kept = len(index)
    return (*shape[:axis], kept, *shape[axis + 1 :])


def repeat_map(shape: Shape, axes: Sequence[int], axis: int, repeats: int) -> np.ndarray:
    """Which input channel each output channel copies when every position of ``axis`` (one
    of the channel ``axes``) is repeated ``repeats`` times in a row (``repeat_interleave``,
    as grouped-query attention repeats each K / V head for several query heads): output
    channel ``j`` is input channel ``map[j]``. Computed by repeating the channels' own
    numbers, so it holds for any order of significance of the axes."""
    if axis not in axes:
        raise LayoutError(f"axis {axis} holds no channels")
    sizes = [shape[a] for a in axes]
    if any(d is None for d in sizes):
        raise LayoutError("the channel axes' sizes are not known")
    numbers = np.arange(int(np.prod(sizes, dtype=np.int64))).reshape([int(d) for d in sizes])
    return np.repeat(numbers, repeats, axis=list(axes).index(axis)).reshape(-1)


def merged_copies(
    in_shape: Shape, axes: Sequence[int], copies: int, out_shape: Shape
) -> tuple[tuple[int, ...], np.ndarray]:
    """Channel axes and channel map (see :func:`repeat_map`) of a reshape that merges the
    channel axis before axis ``copies``, whose positions are copies of one another (a
    size-1 axis expanded or tiled), into one axis: ``x[:, :, None].expand(b, h, n, t,
    d).reshape(b, h * n, t, d)``, how LLaMA code and ONNX exporters repeat K / V heads.
    It is a ``repeat_interleave`` of that channel axis by ``n``."""
    n, size = in_shape[copies], in_shape[copies - 1]
    merged = (*in_shape[: copies - 1], None, *in_shape[copies + 1 :])
    if (
        n is None
        or size is None
        or tuple(out_shape) != (*merged[: copies - 1], size * n, *merged[copies:])
    ):
        raise LayoutError(
            f"the reshape {tuple(in_shape)} -> {tuple(out_shape)} does more than merge "
            "repeated positions into the axis before them"
        )
    if copies - 1 not in axes:
        raise LayoutError("it merges repeated positions with an axis that holds no channels")
    out_axes = tuple(a if a < copies else a - 1 for a in axes)
    single = (*in_shape[:copies], *in_shape[copies + 1 :])  # before the copies
    return out_axes, repeat_map(single, out_axes, copies - 1, int(n))


def channel_count(shape: Shape, axes: Sequence[int]) -> int | None:
    """The number of channels: the product of the sizes of ``axes`` (None if unknown)."""
    n = 1
    for a in axes:
        if shape[a] is None:
            return None
        n *= int(shape[a])
    return n


def broadcast_shape(rank: int, axes: Sequence[int], channels: int) -> tuple[int, ...]:
    """The shape a per-channel vector takes to broadcast over a tensor of ``rank`` whose
    channels are on ``axes`` (a single axis: ``(1, C, 1, 1)`` or ``(1, 1, C)``)."""
    if len(axes) != 1:
        raise LayoutError("a per-channel constant over channels spread on several axes")
    shape = [1] * rank
    shape[axes[0]] = channels
    return tuple(shape)
