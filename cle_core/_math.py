"""The CLE math: pure functions on NumPy arrays.

Nothing here knows the graph. Every function takes arrays (and a :class:`Layout` that
says which weight axis holds output and input channels) and returns new arrays; the
inputs are never modified. Scales and statistics are computed in float64; weights keep
their dtype.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from ._errors import NonFiniteError

__all__ = [
    "Layout",
    "grouped_view",
    "bn_affine",
    "fold_bn",
    "fold_bn_output",
    "fold_bn_input",
    "out_channel_ranges",
    "in_channel_ranges",
    "pair_scales",
    "triple_scales",
    "region_scales",
    "scale_layer",
    "scale_bounds",
    "scale_affine",
    "high_bias_amount",
    "absorb_high_bias",
    "shift_bounds",
    "classic_hba_error",
    "int8_sqnr_estimate",
    "weight_stats",
    "RangeSummary",
]


@dataclass(frozen=True)
class Layout:
    """Where the channels of a weight tensor live.

    ``out_axis`` and ``in_axis`` are 0 and 1 in some order. Axis 0 is the full-size
    axis that also carries the group index (PyTorch and ONNX both store grouped
    weights so): a Conv weight is ``(C_out, C_in / groups, *k)`` with ``out_axis=0``;
    a ConvTranspose weight is ``(C_in, C_out / groups, *k)`` with ``out_axis=1``; a
    Linear weight is ``(out, in)``, or ``(in, out)`` for an ONNX Gemm with
    ``transB=0``.
    """

    out_axis: int = 0
    in_axis: int = 1
    groups: int = 1

    def __post_init__(self) -> None:
        if {self.out_axis, self.in_axis} != {0, 1}:
            raise ValueError("out_axis and in_axis must be 0 and 1 in some order")
        if self.groups < 1:
            raise ValueError("groups must be >= 1")

    def out_channels(self, shape: tuple[int, ...]) -> int:
        return shape[self.out_axis] * (self.groups if self.out_axis == 1 else 1)

    def in_channels(self, shape: tuple[int, ...]) -> int:
        return shape[self.in_axis] * (self.groups if self.in_axis == 1 else 1)


def grouped_view(w: np.ndarray, layout: Layout) -> np.ndarray:
    """View ``w`` as ``(groups, out/groups, in/groups, kernel)``.

    Output channel ``o`` is ``[o // (out/groups), o % (out/groups)]`` and input channel
    ``i`` likewise, so one code path serves Conv, ConvTranspose, Linear and every
    grouping. The result is a view when ``w`` is C-contiguous.
    """
    g = layout.groups
    if w.ndim < 2:
        raise ValueError(f"weight must have at least 2 dimensions, got shape {w.shape}")
    if w.shape[0] % g:
        raise ValueError(f"axis 0 of weight {w.shape} is not divisible by groups={g}")
    k = int(np.prod(w.shape[2:], dtype=np.int64))
    v = w.reshape(g, w.shape[0] // g, w.shape[1], k)
    return v if layout.out_axis == 0 else v.swapaxes(1, 2)


def kernel_reduce(v: np.ndarray, op=np.maximum, tap=None, dtype=None) -> np.ndarray:
    """``op.reduce(tap(v), axis=-1)`` over the last axis of ``v`` (a layer's kernel, as
    :func:`grouped_view` gives it), in ``dtype`` (default: ``v``'s), ``tap`` an elementwise
    function (``np.abs``, ``np.square``) or None. Taken one kernel tap at a time: NumPy
    reduces a short trailing axis element by element, about 17 times slower on a 3x3
    convolution."""

    out = v[..., 0].astype(v.dtype if dtype is None else dtype)  # a copy, written in place
    if tap is not None:
        tap(out, out=out)
    # Each further tap goes through one buffer (converted as astype would): a new array
    # per tap costs more than the arithmetic (first touch of fresh memory).
    buffered = tap is not None or (dtype is not None and np.dtype(dtype) != v.dtype)
    x = np.empty_like(out) if buffered and v.shape[-1] > 1 else None
    for j in range(1, v.shape[-1]):
        if x is None:
            op(out, v[..., j], out=out)
            continue
        np.copyto(x, v[..., j])
        op(out, x if tap is None else tap(x, out=x), out=out)
    return out


def kernel_sums(v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``kernel_reduce(v, np.add, dtype=np.float64)`` and ``kernel_reduce(v, np.add,
    np.square, np.float64)`` (the weights and squared weights summed over the kernel, in
    float64) in one pass over the taps: each tap is gathered and converted once (the
    same operations in the same order: the same values)."""
    total = v[..., 0].astype(np.float64)
    squares = np.square(total)
    x = np.empty_like(total) if v.shape[-1] > 1 else None
    for j in range(1, v.shape[-1]):
        np.copyto(x, v[..., j])  # one buffer for every tap (see kernel_reduce)
        total += x
        squares += np.square(x, out=x)
    return total, squares


# A layer with more weights than this has its kernel sums taken a slice at a time (see
# LastKernelSums.slices): two float64 copies of a 25088 x 4096 Linear at once took 3.4 s,
# mostly the first touch of 1.6 GB of new memory (0.36 s where the memory was reused).
# Lite0's and ResNet-50's layers (at most 2.4 M weights) stay whole.
SLICED_SUMS = 1 << 22


class LastKernelSums:
    """:func:`kernel_sums` of a layer's grouped weights (read only), the last layer's
    remembered: in one estimate's set-up the statistics, walking forward, end with the
    head layer and the gains, walking backward, start with it (two float64 copies of its
    weights: ResNet-50's head took 0.1 s each time, mostly the first touch of new
    memory). One layer's sums are kept, so the memory stays one layer's. An instance
    lives for one set-up, in which nothing writes into the weights (passes replace
    parameter arrays, :meth:`cle_core.Graph.checkpoint` relies on it too)."""

    def __init__(self) -> None:
        self._weight: np.ndarray | None = None  # held: its identity names it
        self._layout: Layout | None = None
        self._sums: tuple[np.ndarray, np.ndarray] | None = None

    def __call__(self, w: np.ndarray, layout: Layout) -> tuple[np.ndarray, np.ndarray]:
        if self._sums is None or w is not self._weight or layout != self._layout:
            sums = kernel_sums(grouped_view(w, layout))
            for a in sums:
                a.flags.writeable = False
            self._weight, self._layout, self._sums = w, layout, sums
        return self._sums

    def slices(
        self, w: np.ndarray, layout: Layout, axis: int
    ) -> Iterator[tuple[slice, np.ndarray, np.ndarray]]:
        """``(part, ksum, ksq)``: the kernel sums (as :meth:`__call__` gives them, shape
        ``(groups, out/groups, in/groups)``) of slice ``part`` of ``axis`` (1: output
        channels, 2: input channels), covering it. One slice, the whole, for a layer of
        up to :data:`SLICED_SUMS` weights (remembered as :meth:`__call__` does); a
        larger one in slices of about ``SLICED_SUMS / 4`` weights, each taken and
        dropped in turn (the same values elementwise; a product summed slice by slice
        may round its last bits otherwise than summed whole)."""
        if w.size <= SLICED_SUMS:
            yield (slice(None), *self(w, layout))
            return
        v = grouped_view(w, layout)
        n = v.shape[axis]
        step = max(1, (SLICED_SUMS // 4) * n // v.size)
        for start in range(0, n, step):
            part = slice(start, min(n, start + step))
            yield (part, *kernel_sums(v[(slice(None),) * axis + (part,)]))


def _check_finite(name: str, *arrays: np.ndarray | None) -> None:
    for a in arrays:
        if a is not None and not np.all(np.isfinite(a)):
            raise NonFiniteError(f"{name}: NaN or Inf in input")


def _work_dtype(dtype: np.dtype) -> np.dtype:
    """float32 or float64: the precision weight arithmetic is done in. Half-precision
    weights are computed in float32 and cast back once, so a large factor cannot
    overflow a temporary (only a result that does not fit the dtype is Inf)."""
    dtype = np.dtype(dtype)
    return dtype if dtype in (np.float32, np.float64) else np.dtype(np.float32)


def _factor(values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Cast a float64 per-channel factor to the work dtype (keeps temporaries small)."""
    return np.asarray(values, dtype=np.float64).astype(_work_dtype(dtype))


def _rescale(w: np.ndarray, layout: Layout, out_factor=None, in_factor=None) -> np.ndarray:
    """New weight with output channel o multiplied by out_factor[o] and input channel i by
    in_factor[i] (either may be None), in the weight's own layout and dtype."""
    v = grouped_view(w, layout)
    g = layout.groups
    scaled = v.astype(_work_dtype(w.dtype), copy=out_factor is None and in_factor is None)
    if out_factor is not None:
        scaled = scaled * _factor(out_factor, w.dtype).reshape(g, -1)[:, :, None, None]
    if in_factor is not None:
        factor = _factor(in_factor, w.dtype).reshape(g, -1)[:, None, :, None]
        if scaled is v:
            scaled = scaled * factor
        else:  # already a new array: multiplied in place (no second full-size temporary)
            scaled *= factor
    back = scaled.swapaxes(1, 2) if layout.out_axis == 1 else scaled
    with np.errstate(over="ignore"):  # overflow is reported by the caller, with a name
        return np.ascontiguousarray(back, dtype=w.dtype if w.dtype.kind == "f" else None).reshape(
            w.shape
        )


def _bias_dtype(w: np.ndarray):
    return w.dtype if w.dtype.kind == "f" else np.float64


def bn_affine(mean, var, eps, gamma=None, beta=None) -> tuple[np.ndarray, np.ndarray]:
    """Batch norm as ``y = k * x + t`` per channel: ``k = gamma / sqrt(var + eps)``,
    ``t = beta - mean * k``. A BN without affine parameters has gamma 1 and beta 0."""
    mean = np.asarray(mean, dtype=np.float64)
    var = np.asarray(var, dtype=np.float64)
    gamma = np.ones_like(mean) if gamma is None else np.asarray(gamma, dtype=np.float64)
    beta = np.zeros_like(mean) if beta is None else np.asarray(beta, dtype=np.float64)
    _check_finite("batch norm statistics", mean, var, gamma, beta)
    denom = var + float(eps)
    if np.any(denom <= 0):
        raise NonFiniteError("batch norm: var + eps must be positive")
    k = gamma / np.sqrt(denom)
    return k, beta - mean * k


def fold_bn_output(w, b, layout: Layout, k, t) -> tuple[np.ndarray, np.ndarray]:
    """Fold ``y = k * layer(x) + t`` into the layer: ``W[o] *= k[o]``, ``b = b * k + t``."""
    w = np.asarray(w)
    b64 = np.zeros(len(k)) if b is None else np.asarray(b, dtype=np.float64)
    return _rescale(w, layout, out_factor=k), (b64 * k + t).astype(_bias_dtype(w))


def fold_bn(w, b, mean, var, eps, gamma=None, beta=None, layout: Layout = Layout()):
    """Fold a batch norm that follows a Conv / ConvTranspose / Linear into it."""
    k, t = bn_affine(mean, var, eps, gamma, beta)
    return fold_bn_output(w, b, layout, k, t)


def fold_bn_input(w, b, layout: Layout, k, t) -> tuple[np.ndarray, np.ndarray]:
    """Fold ``x' = k * x + t`` feeding the layer into its input channels.

    ``W[:, i] *= k[i]`` and ``b += sum_{i, kernel} W[:, i] * t[i]``. Exact only for a
    layer that does not zero-pad its input and maps a constant input to a constant
    output (so not a ConvTranspose); the caller checks that.
    """
    w = np.asarray(w)
    b64 = np.zeros(layout.out_channels(w.shape)) if b is None else np.asarray(b, np.float64)
    new_b = (b64 + _input_sum(w, layout, t)).astype(_bias_dtype(w))
    return _rescale(w, layout, in_factor=k), new_b


def _input_sum(w: np.ndarray, layout: Layout, c, repeat: int = 1) -> np.ndarray:
    """``sum_{i, kernel} W[o, i] * c[i // repeat]``: the layer's response to a constant
    per-channel input ``c``, before bias. float64."""
    v = grouped_view(w, layout)
    c_in = np.repeat(np.asarray(c, dtype=np.float64), repeat).reshape(layout.groups, -1)
    return np.einsum("goi,gi->go", v.sum(axis=3, dtype=np.float64), c_in).reshape(-1)


def out_channel_ranges(w, layout: Layout) -> np.ndarray:
    """``max |W|`` over everything but the output channel: one value per output channel."""
    v = grouped_view(np.asarray(w), layout)
    return np.abs(v).max(axis=(2, 3)).reshape(-1).astype(np.float64)


def in_channel_ranges(w, layout: Layout) -> np.ndarray:
    """``max |W|`` over everything but the input channel: one value per input channel."""
    v = grouped_view(np.asarray(w), layout)
    return np.abs(v).max(axis=(1, 3)).reshape(-1).astype(np.float64)


def _check_ranges(what: str, *ranges: np.ndarray) -> None:
    # One reduction per array: NaN or Inf makes the sum non-finite, a negative the min.
    for r in ranges:
        if r.size and not (np.isfinite(r.sum()) and r.min() >= 0):
            if not np.all(np.isfinite(r)):
                raise NonFiniteError(f"{what}: NaN or Inf in input")
            if np.any(r < 0):
                raise ValueError(f"{what}: ranges must be non-negative")


def _ratio_sqrt(num: np.ndarray, den: np.ndarray, what: str) -> np.ndarray:
    num = np.asarray(num, dtype=np.float64)
    den = np.asarray(den, dtype=np.float64)
    _check_ranges(what, num, den)
    ok = (num > 0) & (den > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(ok, np.sqrt(num / den), 1.0)


def pair_scales(r1, r2) -> np.ndarray:
    """Scales for layer 1 (output ranges ``r1``) feeding layer 2 (input ranges ``r2``).

    ``s = sqrt(r1 / r2)``: dividing layer 1's channel by ``s`` and multiplying layer 2's
    by ``s`` leaves both ranges at ``sqrt(r1 * r2)``. A zero range gives scale 1; NaN or
    Inf raises :class:`NonFiniteError`.
    """
    return _ratio_sqrt(r1, r2, "pair scales")


def triple_scales(r0, r1, r2) -> tuple[np.ndarray, np.ndarray]:
    """Closed form for Conv -> depthwise Conv -> Conv (channel multiplier 1).

    ``r0``: output ranges of the first layer, ``r1``: ranges of the depthwise filters,
    ``r2``: input ranges of the last layer. With ``g = cbrt(r0 * r1 * r2)`` the scales
    ``s12 = r0 / g`` and ``s23 = g / r2`` set all three ranges to ``g``. Where an outer
    range is zero the other pair is balanced alone (:func:`pair_scales`); where the
    depthwise range is zero both scales are 1.
    """
    r0, r1, r2 = (np.asarray(r, dtype=np.float64) for r in (r0, r1, r2))
    s12 = _ratio_sqrt(r0, r1, "triple scales")
    s23 = _ratio_sqrt(r1, r2, "triple scales")
    ok = (r0 > 0) & (r1 > 0) & (r2 > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        g = np.cbrt(r0 * r1 * r2)
        return np.where(ok, r0 / g, s12), np.where(ok, g / r2, s23)


def region_scales(source_ranges, sink_ranges) -> np.ndarray:
    """One shared scale per channel for several sources and sinks.

    ``source_ranges`` and ``sink_ranges`` are sequences of per-channel range vectors of
    equal length (use 0 where a layer does not touch a channel). The scale balances the
    largest source range against the largest sink range: ``sqrt(max src / max sink)``.
    With one source and one sink this is :func:`pair_scales`.
    """
    src = np.max(np.stack([np.asarray(r, dtype=np.float64) for r in source_ranges]), axis=0)
    snk = np.max(np.stack([np.asarray(r, dtype=np.float64) for r in sink_ranges]), axis=0)
    return _ratio_sqrt(src, snk, "region scales")


def scale_layer(w, b, layout: Layout, s_in=None, s_out=None):
    """Multiply input channel ``i`` by ``s_in[i]`` and divide output channel ``o`` (and
    its bias) by ``s_out[o]``. Either vector may be None. Returns new ``(w, b)``."""
    w = np.asarray(w)
    inv_out = None if s_out is None else 1.0 / np.asarray(s_out, np.float64)
    new_w = _rescale(w, layout, out_factor=inv_out, in_factor=s_in)
    new_b = None
    if b is not None:
        b = np.asarray(b)
        new_b = b.copy() if inv_out is None else (b * inv_out).astype(b.dtype)
    return new_w, new_b


def scale_bounds(lo, hi, s) -> tuple[np.ndarray, np.ndarray]:
    """Carry a scale through ``clip(x, lo, hi)``: ``clip(x, lo, hi) / s == clip(x / s,
    lo / s, hi / s)`` for ``s > 0``, so the bounds become per-channel."""
    s = np.asarray(s, dtype=np.float64)
    return np.asarray(lo, np.float64) / s, np.asarray(hi, np.float64) / s


def scale_affine(gamma, beta, s) -> tuple[np.ndarray, np.ndarray | None]:
    """Divide a per-channel affine ``gamma * z + beta`` (a norm's) by ``s``: its output
    channel ``c`` becomes ``y_c / s_c``. Each array keeps its dtype."""
    s = np.asarray(s, dtype=np.float64)
    out = []
    for a in (gamma, beta):
        if a is None:
            out.append(None)
            continue
        a = np.asarray(a)
        scaled = a.astype(np.float64) / s.reshape(a.shape)
        out.append(scaled.astype(a.dtype if a.dtype.kind == "f" else np.float64))
    return out[0], out[1]


def high_bias_amount(beta, gamma, lo=0.0, hi=np.inf, sigmas: float = 3.0) -> np.ndarray:
    """The shift ``c = max(lo, beta - sigmas * |gamma|)`` per channel, capped at ``hi``.

    ``beta`` and ``gamma`` are the (scaled) statistics of the folded BN that fed the
    activation: its pre-activations are roughly ``N(beta, gamma^2)``.
    """
    beta = np.asarray(beta, dtype=np.float64)
    gamma = np.asarray(gamma, dtype=np.float64)
    c = np.maximum(np.asarray(lo, np.float64), beta - sigmas * np.abs(gamma))
    return np.minimum(c, np.asarray(hi, np.float64))


def absorb_high_bias(b1, c, following) -> tuple[np.ndarray, list[np.ndarray]]:
    """Move ``c`` out of layer 1's bias into the layers that read its activation.

    ``b1 -= c`` and, for each following layer, ``b2 += sum_{i, kernel} W2[:, i] * c[i]``.
    ``following`` is a sequence of ``(w2, b2, layout2, repeat)``; ``repeat`` maps channel
    ``j`` to the input features ``j * repeat ... (j + 1) * repeat - 1`` (a Flatten before
    a Linear). Returns ``(new b1, [new b2, ...])``.
    """
    c = np.asarray(c, dtype=np.float64)
    b1 = np.asarray(b1)
    new_b1 = (b1.astype(np.float64) - c).astype(b1.dtype)
    new_b2 = []
    for w2, b2, layout2, repeat in following:
        w2 = np.asarray(w2)
        base = (
            np.zeros(layout2.out_channels(w2.shape)) if b2 is None else np.asarray(b2, np.float64)
        )
        new_b2.append((base + _input_sum(w2, layout2, c, repeat)).astype(_bias_dtype(w2)))
    return new_b1, new_b2


def shift_bounds(lo, hi, c, exact: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Bounds of the activation after its input is shifted down by ``c``.

    ``clip(x, lo, hi) == clip(x - c, lo - c, hi - c) + c``: the exact form moves both
    bounds. The classic form keeps the lower bound, so values below ``c`` change.
    """
    c = np.asarray(c, dtype=np.float64)
    lo = np.asarray(lo, dtype=np.float64)
    hi = np.asarray(hi, dtype=np.float64)
    return (lo - c if exact else lo + 0 * c), hi - c


_erf = np.frompyfunc(math.erf, 1, 1)


def _phi_cdf(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + _erf(z / math.sqrt(2.0)).astype(np.float64))


def _phi_pdf(z: np.ndarray) -> np.ndarray:
    return np.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi)


def classic_hba_error(beta, gamma, c) -> tuple[np.ndarray, np.ndarray]:
    """Expected FP32 error of classic high-bias absorption, per channel.

    Classic absorption computes ``relu(x - c) + c`` where the model had ``relu(x)``; they
    differ by ``c - relu(x)`` wherever ``x < c``. Under the BN model ``x ~ N(beta,
    gamma^2)`` returns ``(E[error], E[relu(x)])``.
    """
    beta = np.asarray(beta, dtype=np.float64)
    sd = np.abs(np.asarray(gamma, dtype=np.float64))
    c = np.asarray(c, dtype=np.float64)
    safe = np.where(sd > 0, sd, 1.0)
    z0 = -beta / safe
    zc = (c - beta) / safe
    p0, pc = _phi_cdf(z0), _phi_cdf(zc)
    # E[(c - x) 1{0 <= x < c}] = (c - beta)(P(c) - P(0)) + sd (pdf(zc) - pdf(z0))
    middle = (c - beta) * (pc - p0) + sd * (_phi_pdf(zc) - _phi_pdf(z0))
    err = c * p0 + middle
    mean_act = beta * (1.0 - p0) + sd * _phi_pdf(z0)
    # A zero-width distribution is deterministic: x == beta.
    det = sd == 0
    err = np.where(det, np.where(beta < c, c - np.maximum(beta, 0.0), 0.0), err)
    mean_act = np.where(det, np.maximum(beta, 0.0), mean_act)
    return np.maximum(err, 0.0), np.maximum(mean_act, 0.0)


def int8_sqnr_estimate(w) -> float:
    """Estimated SQNR in dB of one asymmetric 8-bit min/max grid over the whole tensor.

    The grid spans ``[min(w, 0), max(w, 0)]`` in 255 steps ``d``; the noise is taken as
    uniform, ``d^2 / 12``. Returns ``inf`` for an all-zero tensor.
    """
    w = np.asarray(w)
    if w.size == 0:
        return math.inf
    flat = w.reshape(-1)
    return _sqnr_from_stats(float(flat.min()), float(flat.max()), _sumsq(flat), flat.size)


def _sqnr_from_stats(lo: float, hi: float, sumsq: float, size: int) -> float:
    step = (max(hi, 0.0) - min(lo, 0.0)) / 255.0
    if step == 0.0:
        return math.inf
    power = sumsq / size
    if power == 0.0:
        return -math.inf
    return 10.0 * math.log10(power * 12.0 / (step * step))


def weight_stats(w, layout: Layout) -> tuple[np.ndarray, float]:
    """``(per-output-channel ranges, estimated INT8 SQNR)`` of a weight in three passes
    and no full-size temporary (what the report needs, before and after)."""
    w = np.asarray(w)
    v = grouped_view(w, layout)
    mx = v.max(axis=(2, 3))
    mn = v.min(axis=(2, 3))
    ranges = np.maximum(mx, -mn).reshape(-1).astype(np.float64)
    sqnr = _sqnr_from_stats(float(mn.min()), float(mx.max()), _sumsq(w.reshape(-1)), w.size)
    return ranges, sqnr


def _sumsq(flat: np.ndarray) -> float:
    """``sum(flat ** 2)``; half precision is widened first (its sum overflows)."""
    if flat.dtype.kind == "f" and flat.dtype.itemsize < 4:
        flat = flat.astype(np.float32)
    return float(np.dot(flat, flat))


class RangeSummary:
    """Per-(output, input) channel ``max |W|`` of one layer, for cheap iteration.

    The scale iteration never touches the weights: it asks this summary for the ranges
    the layer would have under given input and output scales. For kernels of size 1 the
    summary is a view of the weight itself, so it costs no memory; its absolute value is
    taken block by block. Products are formed in float32 (float64 for float64 weights):
    they only steer the scales, whose tolerance is far coarser.
    """

    _BLOCK = 1 << 16

    def __init__(self, w: np.ndarray, layout: Layout, magnitudes: np.ndarray | None = None):
        """``magnitudes``: the caller's ``kernel_reduce(grouped_view(w, layout),
        tap=np.abs)`` (in any float dtype that holds the weights' values exactly), if it
        has it: not taken again, nor block by block at every call."""
        v = grouped_view(np.asarray(w), layout)
        self._abs_needed = v.shape[3] == 1 and magnitudes is None
        if magnitudes is not None:
            self._m = magnitudes
        else:
            self._m = v[..., 0] if self._abs_needed else kernel_reduce(v, tap=np.abs)
        self._dtype = np.float64 if self._m.dtype == np.float64 else np.float32
        g, og, ig = self._m.shape
        raw_out = np.empty((g, og))
        raw_in = np.zeros((g, ig))
        for rows, block in self._blocks():
            raw_out[:, rows] = block.max(axis=2)
            np.maximum(raw_in, block.max(axis=1), out=raw_in)
        self.raw_out = raw_out.reshape(-1)
        self.raw_in = raw_in.reshape(-1)

    def _blocks(self):
        """``(row slice, |M| block)`` over blocks of output channels, in the work dtype."""
        g, og, ig = self._m.shape
        step = max(1, self._BLOCK // max(1, g * ig))
        for start in range(0, og, step):
            rows = slice(start, min(og, start + step))
            block = self._m[:, rows, :]
            block = np.abs(block) if self._abs_needed else block
            yield rows, block.astype(self._dtype, copy=False)

    def out_ranges(self, s_in=None, s_out=None) -> np.ndarray:
        """Output-channel ranges of ``W[o, i] * s_in[i] / s_out[o]``."""
        if s_in is None:
            r = self.raw_out
        else:
            g, og, ig = self._m.shape
            si = np.asarray(s_in, dtype=self._dtype).reshape(g, 1, ig)
            out = np.empty((g, og))
            for rows, block in self._blocks():
                out[:, rows] = np.multiply(block, si, out=block if self._abs_needed else None).max(
                    axis=2
                )
            r = out.reshape(-1)
        return r if s_out is None else r / np.asarray(s_out, np.float64)

    def in_ranges(self, s_in=None, s_out=None) -> np.ndarray:
        """Input-channel ranges of ``W[o, i] * s_in[i] / s_out[o]``."""
        if s_out is None:
            r = self.raw_in
        else:
            g, og, ig = self._m.shape
            inv = (1.0 / np.asarray(s_out, np.float64)).astype(self._dtype).reshape(g, og, 1)
            acc = np.zeros((g, ig), dtype=self._dtype)
            for rows, block in self._blocks():
                scaled = np.multiply(block, inv[:, rows], out=block if self._abs_needed else None)
                np.maximum(acc, scaled.max(axis=1), out=acc)
            r = acc.reshape(-1).astype(np.float64)
        return r if s_in is None else r * np.asarray(s_in, np.float64)


def fit_dtype(arr, dtype, what: str) -> np.ndarray:
    """``arr`` as a contiguous array of ``dtype`` (a model's own precision: the math ran
    in float64). A finite value that overflows ``dtype`` (float16 after folding a BN with
    a tiny variance, say) raises :class:`NonFiniteError` naming ``what`` instead of
    becoming Inf."""
    with np.errstate(over="ignore"):
        out = np.ascontiguousarray(arr, dtype=dtype)
    if isinstance(arr, np.ndarray) and arr.dtype == out.dtype:
        return out  # the same values: nothing can have overflowed (no pass to check)
    if out.dtype.kind == "f" and not np.all(np.isfinite(out)):
        if np.all(np.isfinite(np.asarray(arr))):
            raise NonFiniteError(
                f"{what}: the equalized values do not fit {out.dtype} (largest magnitude "
                f"{float(np.max(np.abs(arr))):.3g}); nothing was changed"
            )
    return out


# --- bias correction -----------------------------------------------------------------------


def tap_coverage(
    op: str,
    kernel: tuple[int, ...],
    size_in: tuple[int, ...] | None,
    stride: tuple[int, ...],
    pads: tuple[int, ...],
    dilation: tuple[int, ...],
) -> np.ndarray:
    """For each kernel tap (flattened, C order), how many input positions it reads per
    output position, averaged over the output: the weight ``E[x]`` gets in the mean of
    a layer's output. A Conv's tap that reads zero padding at some outputs reads less
    than 1 (zero padding is not ``E[x]``); a ConvTranspose's tap reads about
    ``1 / stride`` of the outputs. ``size_in`` None (unknown): the interior value (1
    for a Conv, ``1 / prod(stride)`` for a ConvTranspose).

    >>> tap_coverage("conv", (3,), (4,), (1,), (1, 1), (1,))  # the edge taps miss 1 of 4
    array([0.75, 1.  , 0.75])
    """
    nd = len(kernel)
    per_axis = []
    for a in range(nd):
        k = np.arange(kernel[a]) * dilation[a]
        if size_in is None:
            per_axis.append(np.full(kernel[a], 1.0 if op == "conv" else 1.0 / stride[a]))
            continue
        n_in, begin, end = size_in[a], pads[a], pads[nd + a]
        span = dilation[a] * (kernel[a] - 1) + 1
        if op == "conv":
            n_out = max(1, (n_in + begin + end - span) // stride[a] + 1)
            pos = np.arange(n_out)[:, None] * stride[a] - begin + k[None, :]
            inside = (pos >= 0) & (pos < n_in)
            per_axis.append(inside.sum(axis=0) / n_out)
        else:  # conv_transpose: input i, tap k write output i * stride + k - begin
            n_out = max(1, (n_in - 1) * stride[a] - begin - end + span)
            pos = np.arange(n_in)[:, None] * stride[a] - begin + k[None, :]
            inside = (pos >= 0) & (pos < n_out)
            per_axis.append(inside.sum(axis=0) / n_out)
    out = np.ones(1)
    for f in per_axis:
        out = np.multiply.outer(out, f).reshape(-1)
    return out


def bias_shift(
    w, w_quantized, layout: Layout, input_mean, coverage: np.ndarray | None = None
) -> np.ndarray:
    """``E[(Q(W) - W) x]`` per output channel (float64): the mean shift that rounding the
    weights to ``w_quantized`` adds to a layer's output, for inputs of per-channel mean
    ``input_mean``. ``coverage``: per kernel tap, the weight of ``E[x]``
    (:func:`tap_coverage`; 1 for every tap by default). Subtracting it from the bias
    makes the quantized layer's mean output the float layer's (bias correction, Nagel et
    al. 2019, section 4.2)."""
    dw = grouped_view(
        np.asarray(w_quantized, np.float64) - np.asarray(w, np.float64), layout
    )  # (g, out/g, in/g, k)
    g, og, ig, k = dw.shape
    mu = np.asarray(input_mean, np.float64).reshape(-1)
    if mu.size != g * ig:
        if mu.size == 0 or (g * ig) % mu.size:
            raise ValueError(f"input mean of {mu.size} channels for a layer of {g * ig}")
        mu = np.repeat(mu, g * ig // mu.size)  # a Flatten of (C, H, W): each C, H*W times
    cov = np.ones(k) if coverage is None else np.asarray(coverage, np.float64).reshape(-1)
    if cov.size != k:
        raise ValueError(f"coverage of {cov.size} taps for a kernel of {k}")
    return np.einsum("goik,gi,k->go", dw, mu.reshape(g, ig), cov).reshape(-1)
