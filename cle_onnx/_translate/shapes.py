"""Shape arithmetic the op handlers share: per-channel broadcasting, explicit pads from
``auto_pad``, the end padding of ceil-mode pooling."""

from __future__ import annotations


def _along_channels(shape, rank: int | None, channels: int | None) -> bool:
    """Whether a tensor of ``shape`` broadcasts against a rank-``rank`` value as one number
    per channel: all ones but axis 1, which is ``channels``, once padded to the rank."""
    if shape is None or rank is None or channels is None or rank < 2 or len(shape) > rank:
        return False
    padded = (1,) * (rank - len(shape)) + tuple(shape)
    return padded[1] == channels and all(d == 1 for i, d in enumerate(padded) if i != 1)


def _along_last(shape, rank: int | None, channels: int | None) -> bool:
    """Whether a tensor of ``shape`` broadcasts against a rank-``rank`` value as one number
    per channel of its last axis: ``(C,)``, ``(1, C)``, ``(1, 1, C)`` ..."""
    if shape is None or rank is None or channels is None or len(shape) > rank or not shape:
        return False
    return shape[-1] == channels and all(d == 1 for d in shape[:-1])


def _explicit_pads(a: dict, nd: int, dims, kernel, stride, dilation) -> tuple | None:
    """A Conv's or pool's pads as begin..., end... values: ``pads``, or what
    ``auto_pad`` computes from the input's spatial size (None if that is unknown)."""
    auto = a.get("auto_pad", b"NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else str(auto)
    if auto == "NOTSET":
        return tuple(int(p) for p in a.get("pads", (0,) * (2 * nd)))
    if auto == "VALID":
        return (0,) * (2 * nd)
    if dims is None or len(dims) != nd + 2 or not all(isinstance(d, int) for d in dims[2:]):
        return None
    begin, end = [], []
    for size, k, s, d in zip(dims[2:], kernel, stride, dilation, strict=True):
        total = max((-(-size // s) - 1) * s + (k - 1) * d + 1 - size, 0)
        small = total // 2
        begin.append(small if auto == "SAME_UPPER" else total - small)
        end.append(total - begin[-1])
    return tuple(begin + end)


def _ceil_extra(dims, nd, kernel, stride, dilation, pads) -> tuple | None:
    """The end padding that makes floor-mode pooling give ceil mode's output size."""
    if dims is None or len(dims) != nd + 2 or not all(isinstance(d, int) for d in dims[2:]):
        return None
    extra = []
    for i, (size, k, s, d) in enumerate(zip(dims[2:], kernel, stride, dilation, strict=True)):
        span = (k - 1) * d + 1
        padded = size + pads[i] + pads[nd + i]
        out = -(-(padded - span) // s) + 1
        if (out - 1) * s >= size + pads[i]:
            out -= 1  # ONNX drops a last window that would start inside the end padding
        extra.append(max((out - 1) * s + span - padded, 0))
    return tuple(extra)
