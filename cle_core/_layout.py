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

import math
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


# The stand-in for the one unknown size of a reshape: a prime larger than any product of
# sizes, so that the atoms below never split it where a symbol could not be split.
_UNKNOWN = 2**61 - 1


def reshape_layout(
    in_shape: Shape,
    axes: Sequence[int],
    outer: Sequence[int | None] | None,
    out_shape: Shape,
    channels: int | None = None,
) -> tuple[tuple[int, ...], tuple[int | None, ...] | None]:
    """Channel axes and their outer factors (see below) after reshaping ``in_shape``
    (channels on ``axes``, ``channels`` of them) to ``out_shape``: :func:`reshape_axes`,
    and also a reshape that merges a non-channel axis into a channel axis as its most
    significant part.

    ``nn.MultiheadAttention`` as both ONNX exporters write it splits the heads of a
    ``(T, B, C)`` value as ``(T, B * H, D)``: position ``b * H + h`` of axis 1, the
    batch merged with the heads. A per-channel scale is then still one number per
    position of axes 1 and 2 (``s[h * D + d]``, the same for every ``b``), so it
    commutes with what moves whole positions, and the split back ``(B * H, T, D) -> (B,
    H, T, D)`` restores the plain layout. ``outer`` holds, for each channel axis, the
    size of the non-channel part merged above its channels (1: none; None: unknown, the
    batch; ``outer`` None: all 1). Such a merge is followed only while the channels lie
    on two axes or more, which no layer and no per-channel constant reads.

    One size may be unknown (None) on each side, the batch: the number of elements
    fixes the one from the other. It stands for a prime larger than every product of
    sizes, so that an answer never depends on how the batch would factor; what would
    need that raises."""
    outer = tuple(outer) if outer is not None else (1,) * len(axes)
    plain_error = None
    if all(o == 1 for o in outer):
        try:
            return reshape_axes(in_shape, axes, out_shape), None
        except LayoutError as e:
            plain_error = e
    merges = LayoutError(
        f"the reshape {tuple(in_shape)} -> {tuple(out_shape)} merges the channels with another axis"
    )
    try:
        in_sizes, out_sizes, outer = _stand_ins(in_shape, axes, outer, out_shape, channels)
    except LayoutError as e:
        raise plain_error or e from None
    # Each axis is cut into atoms (row-major digits) so that every input and output axis
    # is a run of atoms: a channel atom carries its place in the order of significance
    # (its axis's rank in ``axes``, then its digits within the axis), others carry None.
    atoms: list[tuple[int, tuple | None]] = []
    for a, size in enumerate(in_sizes):
        if a in axes:
            k = list(axes).index(a)
            atoms += [(outer[k], None), (size // outer[k], (k,))]
        else:
            atoms.append((size, None))
    atoms = [t for t in atoms if t[0] != 1]
    out_atoms: list[list[tuple[int, tuple | None]]] = []
    for need in out_sizes:
        mine = []
        while need > 1:
            if not atoms:
                raise plain_error or merges
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
                raise plain_error or merges
        out_atoms.append(mine)
    out_axes, out_outer, order = [], [], []
    for b, mine in enumerate(out_atoms):
        tags = [tag for _, tag in mine if tag is not None]
        if not tags:
            continue
        first = next(i for i, (_, tag) in enumerate(mine) if tag is not None)
        if any(tag is None for _, tag in mine[first:]):
            raise plain_error or merges  # positions below channels: a flatten
        if any(size % _UNKNOWN == 0 for size, tag in mine if tag is not None):
            raise LayoutError(
                f"the reshape {tuple(in_shape)} -> {tuple(out_shape)} gives the channels "
                "an unknown size"
            )
        above = int(np.prod([size for size, _ in mine[:first]], dtype=object))
        out_axes.append(b)
        out_outer.append(None if above % _UNKNOWN == 0 else above)
        order.append(tags)
    ranked = sorted(range(len(out_axes)), key=lambda i: order[i][0])
    flat = [t for i in ranked for t in order[i]]
    if flat != sorted(flat):
        raise plain_error or LayoutError(
            f"the reshape {tuple(in_shape)} -> {tuple(out_shape)} permutes the channels "
            "(it merges their axes out of order)"
        )
    new_axes = tuple(out_axes[i] for i in ranked)
    new_outer = tuple(out_outer[i] for i in ranked)
    if any(o != 1 for o in new_outer) and len(new_axes) < 2:
        raise plain_error or merges  # a layer would read the merged positions as channels
    return new_axes, (new_outer if any(o != 1 for o in new_outer) else None)


def _stand_ins(in_shape, axes, outer, out_shape, channels):
    """The sizes of both shapes and the outer factors, the one unknown size on each
    side (and an unknown outer factor) replaced by multiples of :data:`_UNKNOWN`."""
    unknown_in = [i for i, d in enumerate(in_shape) if d is None]
    unknown_out = [i for i, d in enumerate(out_shape) if d is None]
    if not unknown_in and not unknown_out and None not in outer:
        return [int(d) for d in in_shape], [int(d) for d in out_shape], outer
    if len(unknown_in) != 1 or len(unknown_out) != 1:
        raise LayoutError(
            f"the reshape {tuple(in_shape)} -> {tuple(out_shape)} has unknown sizes that "
            "the number of elements does not tell"
        )
    k_in = int(np.prod([d for d in in_shape if d is not None], dtype=object))
    k_out = int(np.prod([d for d in out_shape if d is not None], dtype=object))
    g = math.gcd(k_in, k_out)
    in_sizes = [_UNKNOWN * (k_out // g) if d is None else int(d) for d in in_shape]
    out_sizes = [_UNKNOWN * (k_in // g) if d is None else int(d) for d in out_shape]
    stood = []
    for a, o in zip(axes, outer, strict=True):
        if o is not None:
            if in_sizes[a] % o:
                raise LayoutError(f"axis {a} of size {in_sizes[a]} holds {o} merged positions")
            stood.append(o)
            continue
        # the batch merged with the heads: the channels' own extent on this axis is what
        # the other channel axes leave of the channel count
        rest = int(
            np.prod([in_sizes[b] // p for b, p in zip(axes, outer, strict=True) if p], dtype=object)
        )
        if (
            channels is None
            or a not in unknown_in
            or channels % rest
            or in_sizes[a] % (channels // rest)
        ):
            raise LayoutError(f"the positions merged into axis {a} are not known")
        stood.append(in_sizes[a] // (channels // rest))
    return in_sizes, out_sizes, tuple(stood)


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


def rotary_partners(shape: Shape, axes: Sequence[int], interleaved: bool) -> np.ndarray:
    """The channel each channel is rotated with by a rotary embedding on the last axis
    (one of the channel ``axes``, of even size ``D``): ``d`` with ``d + D / 2`` (mod ``D``),
    or ``2i`` with ``2i + 1`` where ``interleaved``. Computed on the channels' own numbers,
    as :func:`repeat_map`, so it holds for any order of significance of the axes."""
    last = len(shape) - 1
    if last not in axes:
        raise LayoutError(f"the last axis {last} holds no channels")
    sizes = [shape[a] for a in axes]
    if any(d is None for d in sizes) or shape[last] % 2:
        raise LayoutError("the channel axes' sizes are not known, or the last one is odd")
    numbers = np.arange(int(np.prod(sizes, dtype=np.int64))).reshape([int(d) for d in sizes])
    d = np.arange(int(shape[last]))
    partner = d ^ 1 if interleaved else (d + d.size // 2) % d.size
    return np.take(numbers, partner, axis=list(axes).index(last)).reshape(-1)


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
