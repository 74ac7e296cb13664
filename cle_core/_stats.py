"""Per-channel statistics of every value: measured on calibration data, or estimated
from the model alone.

The noise objective needs, per channel of a layer's input, its mean square (how much
weight noise it carries to the output) and, per channel of a quantized activation, its
range and how often it is exactly zero (zero is on every grid, so exact zeros carry no
rounding noise). It also needs, per activation, the mean and mean square of its
derivative (how noise passes backwards through it).

Data-free estimates come from the folded batch norms: a layer whose output BN was folded
has pre-activations of about ``N(beta, gamma^2)`` per channel, and a ReLU, ReLU6,
clip, hard-sigmoid or hard-swish of a normal variable has closed-form moments; an added
constant shifts the mean, and a product with a gate (squeeze-and-excitation) multiplies
the moments. Where no BN statistics exist (an
exporter folded them away) the moments are propagated through the layer from its
input: mean ``b + sum W mu``, variance ``sum W^2 var`` (inputs independent). Graph
inputs are taken to be normalized (mean 0, variance 1), the convention of image models.
Calibrated statistics replace the estimates value by value.

The bias correction's estimate (``correlated=True``) drops the independence of
neighbouring positions: natural images are smooth, and so are the features computed
from them. Each channel carries the correlation ``rho`` of horizontally neighbouring
positions, taken as separable and exponential (``rho^d`` between positions ``d`` apart,
city-block distance), :data:`INPUT_CORRELATION` at a graph input. A convolution's
output variance is then ``sum_kl W_k W_l rho^|k - l| var`` per input channel (inputs
of different channels still independent) and its output's ``rho`` the same sum at a lag
of one output position (``stride`` input positions), over the variance; a 1 x 1
layer averages its inputs' ``rho`` weighted by ``W^2 var``; activations, sums and the
ops that move channels keep it (measured on EfficientNet-Lite0's exporter-folded
export against the 40 calibration crops: neighbouring correlations of 0.3 to 0.9 at
every depth, tracked by this model within 0.2 on most values). Where the spatial sizes
are known, a convolution's taps that read zero padding count in its mean by their
coverage (:func:`cle_core._math.tap_coverage`), as they do in the correction.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from ._ir import SCALABLE_ACTIVATIONS, Graph, Node, Value
from ._layout import rotary_partners
from ._math import LastKernelSums, grouped_view, tap_coverage
from ._math import _phi_cdf as _cdf
from ._math import _phi_pdf as _phi

INPUT_CORRELATION = 0.95
"""The correlation of neighbouring pixels assumed at a graph input for
``correlated=True`` (:func:`estimate`): natural images, measured 0.97 on the 40
calibration crops, ImageNet-normalized; at two pixels 0.93 and at four 0.87, about
the ``rho^d`` the model takes."""

RANGE_SIGMAS = 4.0
"""A min/max calibration over a few dozen images sees about this many standard
deviations of a normal pre-activation (measured on EfficientNet-Lite0: 4 to 5)."""


@dataclass(frozen=True, eq=False)
class ChannelStats:
    """Statistics of one value, one entry per channel (units of the original model).

    ``mean`` and ``meansq``: ``E[x]`` and ``E[x^2]`` over examples and positions;
    ``lo`` and ``hi``: the smallest and largest value; ``nonzero``: the fraction of
    elements that are not exactly 0.
    """

    mean: np.ndarray
    meansq: np.ndarray
    lo: np.ndarray
    hi: np.ndarray
    nonzero: np.ndarray

    @property
    def channels(self) -> int:
        return int(self.mean.shape[0])

    @property
    def var(self) -> np.ndarray:
        return np.maximum(self.meansq - self.mean * self.mean, 0.0)

    def repeat(self, n: int) -> ChannelStats:
        """Each channel repeated ``n`` times (a Flatten before a Linear)."""
        return ChannelStats(*(np.repeat(a, n) for a in self._arrays()))

    def _arrays(self):
        return (self.mean, self.meansq, self.lo, self.hi, self.nonzero)

    @classmethod
    def of(cls, mean, meansq, lo=None, hi=None, nonzero=None) -> ChannelStats:
        mean = np.asarray(mean, np.float64).reshape(-1)
        meansq = np.asarray(meansq, np.float64).reshape(-1)
        sd = np.sqrt(np.maximum(meansq - mean * mean, 0.0))
        lo = mean - RANGE_SIGMAS * sd if lo is None else np.asarray(lo, np.float64).reshape(-1)
        hi = mean + RANGE_SIGMAS * sd if hi is None else np.asarray(hi, np.float64).reshape(-1)
        nonzero = np.ones_like(mean) if nonzero is None else np.asarray(nonzero, np.float64)
        return cls(mean, meansq, lo, hi, nonzero.reshape(-1))


@dataclass(frozen=True, eq=False)
class Derivative:
    """Mean and mean square of an activation's derivative, per channel."""

    mean: np.ndarray
    meansq: np.ndarray


def clipped_normal(m, sd, lo, hi) -> tuple[ChannelStats, np.ndarray]:
    """Statistics of ``clip(y, lo, hi)`` for ``y ~ N(m, sd^2)`` per channel (bounds may be
    infinite), and ``P(lo < y < hi)``, the mean of the clip's derivative."""
    m, sd = np.asarray(m, np.float64), np.maximum(np.asarray(sd, np.float64), 1e-12)
    lo = np.broadcast_to(np.asarray(lo, np.float64), m.shape)
    hi = np.broadcast_to(np.asarray(hi, np.float64), m.shape)
    a, b = (lo - m) / sd, (hi - m) / sd
    fa, fb = np.isfinite(a), np.isfinite(b)
    ca = np.where(fa, _cdf(np.where(fa, a, 0.0)), 0.0)
    cb = np.where(fb, _cdf(np.where(fb, b, 0.0)), 1.0)
    pa = np.where(fa, _phi(np.where(fa, a, 0.0)), 0.0)
    pb = np.where(fb, _phi(np.where(fb, b, 0.0)), 0.0)
    inside = np.maximum(cb - ca, 0.0)
    lo_f, hi_f = np.where(fa, lo, 0.0), np.where(fb, hi, 0.0)
    # E[y 1{lo<y<hi}] and E[y^2 1{lo<y<hi}] of a normal, plus the clipped tails
    e1 = m * inside + sd * (pa - pb)
    e2 = (m * m + sd * sd) * inside + sd * ((lo_f + m) * pa - (hi_f + m) * pb)
    mean = e1 + lo_f * ca + hi_f * (1.0 - cb)
    meansq = e2 + lo_f**2 * ca + hi_f**2 * (1.0 - cb)
    # exact zeros: the part clipped to a bound of 0, or (for a ReLU) y < 0
    zero = np.where(fa & (lo == 0), ca, 0.0) + np.where(fb & (hi == 0), 1.0 - cb, 0.0)
    low = np.maximum(lo, m - RANGE_SIGMAS * sd)
    high = np.minimum(hi, m + RANGE_SIGMAS * sd)
    stats = ChannelStats(mean, np.maximum(meansq, 0.0), low, np.maximum(high, low), 1.0 - zero)
    return stats, inside


def _partial_moments(m, sd, lo: float, hi: float, k: int) -> list[np.ndarray]:
    """``E[y^j 1{lo < y < hi}]`` for ``j = 0 .. k`` and ``y ~ N(m, sd^2)`` per channel
    (scalar bounds, possibly infinite), from the standard normal's partial moments
    ``I_j = (j - 1) I_{j-2} + a^{j-1} phi(a) - b^{j-1} phi(b)`` (by parts)."""
    a, b = (lo - m) / sd, (hi - m) / sd

    def edge(z, p):  # z^p phi(z), 0 at an infinite bound
        finite = np.isfinite(z)
        zf = np.where(finite, z, 0.0)
        return np.where(finite, zf**p * _phi(zf), 0.0)

    ca = np.where(np.isfinite(a), _cdf(np.where(np.isfinite(a), a, 0.0)), (a > 0) * 1.0)
    cb = np.where(np.isfinite(b), _cdf(np.where(np.isfinite(b), b, 0.0)), (b > 0) * 1.0)
    std = [np.maximum(cb - ca, 0.0), edge(a, 0) - edge(b, 0)]
    for j in range(2, k + 1):
        std.append((j - 1) * std[j - 2] + edge(a, j - 1) - edge(b, j - 1))
    # y = m + sd z: binomial expansion of y^j
    return [
        sum(math.comb(j, i) * m ** (j - i) * sd**i * std[i] for i in range(j + 1))
        for j in range(k + 1)
    ]


def hard_sigmoid_normal(m, sd, alpha: float, beta: float) -> tuple[ChannelStats, Derivative]:
    """Statistics of ``clip(alpha y + beta, 0, 1)`` for ``y ~ N(m, sd^2)`` per channel
    (``alpha > 0``; PyTorch's ``hardsigmoid`` has ``alpha = 1/6``, ``beta = 1/2``), and of
    its derivative ``alpha 1{0 < alpha y + beta < 1}``: a clip of a normal variable."""
    m, sd = np.asarray(m, np.float64), np.maximum(np.asarray(sd, np.float64), 1e-12)
    stats, inside = clipped_normal(alpha * m + beta, alpha * sd, 0.0, 1.0)
    return stats, Derivative(alpha * inside, alpha * alpha * inside)


def hard_swish_normal(m, sd, alpha: float, beta: float) -> tuple[ChannelStats, Derivative]:
    """Statistics of ``f(y) = y clip(alpha y + beta, 0, 1)`` for ``y ~ N(m, sd^2)`` per
    channel (``alpha > 0``; ``hardswish`` has ``1/6``, ``1/2``) and of its derivative.

    ``f`` is 0 below ``a = -beta / alpha``, ``alpha y^2 + beta y`` up to
    ``b = (1 - beta) / alpha`` and ``y`` above, so its moments and those of
    ``f' = 2 alpha y + beta`` (1 above ``b``) are sums of the normal's partial moments
    over the three pieces. The range is ``f`` over ``m +- RANGE_SIGMAS sd``: its
    endpoints, and the parabola's vertex ``-beta / (2 alpha)`` where that lies inside."""
    m, sd = np.asarray(m, np.float64), np.maximum(np.asarray(sd, np.float64), 1e-12)
    a, b = -beta / alpha, (1.0 - beta) / alpha
    mid = _partial_moments(m, sd, a, b, 4)
    top = _partial_moments(m, sd, b, np.inf, 2)
    mean = alpha * mid[2] + beta * mid[1] + top[1]
    meansq = alpha**2 * mid[4] + 2 * alpha * beta * mid[3] + beta**2 * mid[2] + top[2]
    d_mean = 2 * alpha * mid[1] + beta * mid[0] + top[0]
    d_meansq = 4 * alpha**2 * mid[2] + 4 * alpha * beta * mid[1] + beta**2 * mid[0] + top[0]

    def f(y):
        return y * np.clip(alpha * y + beta, 0.0, 1.0)

    low, high = m - RANGE_SIGMAS * sd, m + RANGE_SIGMAS * sd
    vertex = -beta / (2 * alpha)
    lo = np.minimum(f(low), f(high))
    lo = np.where((low < vertex) & (vertex < high) & (vertex > a), np.minimum(lo, f(vertex)), lo)
    hi = np.maximum(f(low), f(high))
    below = 1.0 - _partial_moments(m, sd, a, np.inf, 0)[0]  # exact zeros
    stats = ChannelStats(mean, np.maximum(meansq, 0.0), lo, np.maximum(hi, lo), 1.0 - below)
    return stats, Derivative(d_mean, np.maximum(d_meansq, 0.0))


def _logistic(x):
    return np.exp(-np.logaddexp(0.0, -x))  # no overflow for large |x|


def sigmoid_normal(m, sd) -> tuple[ChannelStats, Derivative]:
    """Statistics of ``sigmoid(y)`` for ``y ~ N(m, sd^2)`` per channel, and of its
    derivative ``sigmoid (1 - sigmoid)``: no closed form, so the normal density is
    integrated by the trapezoid rule on the union of a grid over ``m +- 8 sd`` and one
    over ``-20 .. 20``, where the sigmoid bends (a wide input saturates it: a grid in
    ``sd`` alone would step over the bend). ``E[s^2] = E[s] - E[s']``, as
    ``s' = s - s^2``."""
    m = np.asarray(m, np.float64).reshape(-1, 1)
    sd = np.maximum(np.asarray(sd, np.float64).reshape(-1, 1), 1e-12)
    bend = np.broadcast_to(np.linspace(-20.0, 20.0, 257), (m.size, 257))
    y = np.sort(np.concatenate([m + sd * np.linspace(-8.0, 8.0, 257), bend], axis=1), axis=1)
    density = _phi((y - m) / sd) / sd
    s = _logistic(y)
    ds = s * (1.0 - s)

    def integral(f):  # the trapezoid rule along each channel's grid
        return 0.5 * ((f[:, 1:] + f[:, :-1]) * np.diff(y, axis=1)).sum(axis=1)

    def expect(f):
        return integral(f * density) / integral(density)

    mean, d_mean = expect(s), expect(ds)
    m, sd = m.reshape(-1), sd.reshape(-1)
    stats = ChannelStats(
        mean,
        np.maximum(mean - d_mean, 0.0),
        _logistic(m - RANGE_SIGMAS * sd),
        _logistic(m + RANGE_SIGMAS * sd),
        np.ones_like(mean),
    )
    return stats, Derivative(d_mean, expect(ds * ds))


GATING_MOMENTS = {
    "hard_sigmoid": lambda m, sd, at: hard_sigmoid_normal(m, sd, at["alpha"], at["beta"]),
    "hard_swish": lambda m, sd, at: hard_swish_normal(m, sd, at["alpha"], at["beta"]),
    "sigmoid": lambda m, sd, at: sigmoid_normal(m, sd),
}
"""The moments of the activations an ``opaque`` node may name in attr ``activation``
(see :data:`cle_core._ir.STRUCTURAL_OPS`), from the input's mean, standard deviation and
the node's attrs."""


def estimate(
    graph: Graph,
    measured: Mapping[str, ChannelStats] | None = None,
    *,
    transpose_taps: bool = False,
    correlated: bool = False,
    kernel_sums: LastKernelSums | None = None,
) -> tuple[dict[str, ChannelStats], dict[str | tuple[str, int], Derivative]]:
    """Statistics of every value of ``graph`` (after BN folding) and the derivative
    statistics of every activation node (by node name) and of a product of two
    activations whose statistics are known, for each input (by ``(node name, input
    index)``). ``measured`` statistics, keyed
    by value name, replace the estimates for those values and feed the estimates of the
    values computed from them.

    ``transpose_taps``: a ConvTranspose output position receives ``1 / prod(stride)``
    of the taps, and its propagated moments are scaled so (the bias correction's
    means). Off, every tap counts, ``prod(stride)`` times too much: the noise
    objective's choices were measured so, and scaling its estimate alone lost 1.5 to
    2.7 dB W8 on the test suite's U-Net- and decoder-style networks (its weight terms
    count every tap too; see docs/benchmarks.rst).

    ``correlated``: the propagated moments take neighbouring positions as correlated
    and count zero padding in a convolution's mean (see the module's docstring), the
    bias correction's means; graphs whose layers have BN statistics are estimated
    from them either way.

    ``kernel_sums``: the layers' kernel sums, shared with :func:`cle_core._gains.propagate`
    by a caller that runs both."""
    measured = dict(measured or {})
    sums = kernel_sums or LastKernelSums()
    stats: dict[str, ChannelStats] = {}
    normal: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # value -> (mean, sd) if ~normal
    deriv: dict[str | tuple[str, int], Derivative] = {}
    corr: dict[str, np.ndarray] | None = {} if correlated else None
    sizes = spatial_sizes(graph) if correlated else None
    for v in graph.inputs:
        if v.channels:
            stats[v.name] = ChannelStats.of(np.zeros(v.channels), np.ones(v.channels))
            normal[v.name] = (np.zeros(v.channels), np.ones(v.channels))
            if corr is not None:
                corr[v.name] = np.full(v.channels, INPUT_CORRELATION)
    for v in graph.inputs:
        _take_measured(v, measured, stats, normal)
    for node in graph.nodes:
        if corr is not None:
            _pass_correlation(node, corr, stats)
        _estimate_node(node, stats, normal, deriv, sums, transpose_taps, corr, sizes)
        for v in node.outputs:
            _take_measured(v, measured, stats, normal)
    return stats, deriv


def _take_measured(v: Value, measured, stats, normal) -> None:
    got = measured.get(v.name)
    if got is not None and (v.channels is None or got.channels == v.channels):
        stats[v.name] = got
        normal[v.name] = (got.mean, np.sqrt(got.var))


def _pass_correlation(node: Node, corr: dict[str, np.ndarray], stats) -> None:
    """The neighbouring-position correlation of a node's outputs other than a layer's
    (:func:`_layer_output` computes those): kept by elementwise ops and by those that
    move channels, averaged by a sum weighted by the inputs' variances."""
    if node.is_layer or not node.outputs or not node.inputs:
        return
    out = node.outputs[0]
    got = [corr.get(v.name) for v in node.inputs]
    if node.op == "concat":
        if all(r is not None for r in got):
            corr[out.name] = np.concatenate(got)
    elif node.op == "add":
        ins = [stats.get(v.name) for v in node.inputs]
        if all(r is not None for r in got) and all(s is not None for s in ins):
            if len({r.size for r in got} | {s.channels for s in ins}) == 1:
                var = [s.var for s in ins]
                total = np.maximum(sum(var), 1e-30)
                corr[out.name] = sum(r * v for r, v in zip(got, var, strict=True)) / total
    elif node.op == "slice" and got[0] is not None and out.channels:
        start = int(node.attrs["offset"])
        corr[out.name] = got[0][start : start + out.channels]
    elif node.op == "global_avgpool":
        return  # one position: no neighbours
    else:
        carrier = int(node.attrs.get("carrier", 0)) if node.op in ("mul", "matmul") else 0
        r = got[carrier] if carrier < len(got) else None
        if r is not None and out.channels in (None, r.size):
            corr[out.name] = r


def _estimate_node(
    node: Node, stats, normal, deriv, sums, transpose_taps: bool = False, corr=None, sizes=None
) -> None:
    ins = [stats.get(v.name) for v in node.inputs]
    out = node.outputs[0] if node.outputs else None
    op = node.op
    if out is None:
        return
    if node.is_layer:
        m, sd = _layer_output(node, ins[0], sums, transpose_taps, corr, sizes)
        if m is not None:
            normal[out.name] = (m, sd)
            stats[out.name] = ChannelStats.of(m, m * m + sd * sd)
    elif op in SCALABLE_ACTIVATIONS:
        src = normal.get(node.inputs[0].name)
        if src is None:
            return
        m, sd = src
        if op in ("relu", "clip"):
            lo = 0.0 if op == "relu" else node.params["lo"]
            hi = np.inf if op == "relu" else node.params["hi"]
            st, inside = clipped_normal(m, sd, np.reshape(lo, -1), np.reshape(hi, -1))
            stats[out.name] = st
            deriv[node.name] = Derivative(inside, inside)
        else:
            slope = node.attrs.get("alpha", 0.01) if op == "leaky_relu" else node.params["slope"]
            slope = np.broadcast_to(np.asarray(slope, np.float64).reshape(-1), m.shape)
            pos, neg = clipped_normal(m, sd, 0.0, np.inf)[0], clipped_normal(m, sd, -np.inf, 0.0)[0]
            p = _cdf(m / np.maximum(sd, 1e-12))
            stats[out.name] = ChannelStats.of(
                pos.mean + slope * neg.mean,
                pos.meansq + slope**2 * neg.meansq,
                np.minimum(slope * (m - RANGE_SIGMAS * sd), 0.0),
                np.maximum(m + RANGE_SIGMAS * sd, 0.0),
            )
            deriv[node.name] = Derivative(p + slope * (1 - p), p + slope**2 * (1 - p))
    elif op == "opaque" and node.attrs.get("activation") in GATING_MOMENTS:
        src = normal.get(node.inputs[0].name) if node.inputs else None
        if src is None:
            return
        moments = GATING_MOMENTS[node.attrs["activation"]]
        st, d = moments(*src, node.attrs)
        stats[out.name], deriv[node.name] = st, d
        normal[out.name] = (st.mean, np.sqrt(st.var))
    elif op == "opaque" and node.attrs.get("shift") is not None and ins and ins[0] is not None:
        # x + c, a constant the graph keeps (an affine block's bias): the mean moves
        x = ins[0]
        c = np.broadcast_to(np.asarray(node.attrs["shift"], np.float64).reshape(-1), x.mean.shape)
        stats[out.name] = ChannelStats(
            x.mean + c,
            x.meansq + 2 * c * x.mean + c * c,
            x.lo + c,
            x.hi + c,
            np.where(c == 0, x.nonzero, 1.0),
        )
        if node.inputs[0].name in normal:
            m, sd = normal[node.inputs[0].name]
            normal[out.name] = (m + c, sd)
    elif op == "mul" and len(node.inputs) == 2 and node.inputs[0] is not node.inputs[1]:
        # x * gate (squeeze-and-excitation): taken as independent, so the moments
        # multiply, and noise on either input passes times the other (its derivative)
        carrier = int(node.attrs.get("carrier", 0))
        x, g = ins[carrier], ins[1 - carrier]
        maker = node.inputs[1 - carrier].producer
        if maker is not None and node.inputs[carrier] in maker.inputs:
            return  # x * sigmoid(x) (a SiLU): not independent
        if x is None or g is None or g.channels != x.channels:
            return
        corners = [x.lo * g.lo, x.lo * g.hi, x.hi * g.lo, x.hi * g.hi]
        st = ChannelStats(
            x.mean * g.mean,
            x.meansq * g.meansq,
            np.minimum.reduce(corners),
            np.maximum.reduce(corners),
            x.nonzero * g.nonzero,
        )
        stats[out.name], normal[out.name] = st, (st.mean, np.sqrt(st.var))
        deriv[(node.name, carrier)] = Derivative(g.mean, g.meansq)
        deriv[(node.name, 1 - carrier)] = Derivative(x.mean, x.meansq)
    elif op == "batchnorm":
        x = normal.get(node.inputs[0].name)
        if x is not None:
            p = node.params
            k = (1.0 if p.get("gamma") is None else p["gamma"]) / np.sqrt(
                p["var"] + node.attrs["eps"]
            )
            t = (0.0 if p.get("beta") is None else p["beta"]) - p["mean"] * k
            m, sd = x[0] * k + t, x[1] * np.abs(k)
            normal[out.name] = (m, sd)
            stats[out.name] = ChannelStats.of(m, m * m + sd * sd)
    elif op == "add" and all(s is not None for s in ins) and len({s.channels for s in ins}) == 1:
        # (an input of unknown channels may have been measured along another axis)
        mean = sum(s.mean for s in ins)
        meansq = sum(s.meansq for s in ins) + (mean * mean - sum(s.mean**2 for s in ins))
        st = ChannelStats.of(mean, meansq)
        normal[out.name] = (st.mean, np.sqrt(st.var))
        stats[out.name] = st
    elif op == "slice" and ins[0] is not None:
        part = slice(int(node.attrs["offset"]), int(node.attrs["offset"]) + out.channels)
        stats[out.name] = ChannelStats(*(a[part] for a in ins[0]._arrays()))
        if node.inputs[0].name in normal:
            m, sd = normal[node.inputs[0].name]
            normal[out.name] = (m[part], sd[part])
    elif op == "mul" and "factor" in node.params and ins[0] is not None and out.channels:
        a = np.asarray(node.params["factor"], np.float64).reshape(-1)
        x = ins[0]
        stats[out.name] = ChannelStats(
            x.mean * a,
            x.meansq * a * a,
            np.minimum(x.lo * a, x.hi * a),
            np.maximum(x.lo * a, x.hi * a),
            x.nonzero * (a != 0),
        )
        if node.inputs[0].name in normal:
            m, sd = normal[node.inputs[0].name]
            normal[out.name] = (m * a, sd * np.abs(a))
    elif op == "concat" and all(s is not None for s in ins):
        stats[out.name] = ChannelStats(
            *(np.concatenate(parts) for parts in zip(*(s._arrays() for s in ins), strict=True))
        )
    elif (
        op in ("identity", "dropout", "pad", "maxpool", "avgpool", "flatten", "resize")
        and ins[0] is not None
    ):
        stats[out.name] = ins[0]
        if node.inputs[0].name in normal:
            normal[out.name] = normal[node.inputs[0].name]
    elif op == "norm":
        # The normalized values have about mean 0 and variance 1 per channel: the affine
        # sets them. Backwards, channel c passes gamma_c / (the input's rms) to its input.
        gamma = np.asarray(node.params["gamma"], np.float64).reshape(-1)
        beta = node.params.get("beta")
        m = np.zeros_like(gamma) if beta is None else np.asarray(beta, np.float64).reshape(-1)
        normal[out.name] = (m, np.abs(gamma))
        stats[out.name] = ChannelStats.of(m, m * m + gamma * gamma)
        if ins[0] is not None and ins[0].channels == gamma.size:
            k = gamma / np.sqrt(max(float(ins[0].var.mean()), 1e-12))
            deriv[node.name] = Derivative(k, k * k)
    elif op in ("transpose", "reshape", "matmul", "select", "repeat") and out.channels is not None:
        # The channels move unchanged (an attention average keeps the mean of V).
        x = node.inputs[node.attrs.get("carrier", 0)]
        index = node.attrs.get("channel_map")  # copies of channels: theirs, gathered
        if index is not None and x.name in stats:
            stats[out.name] = ChannelStats(*(a[index] for a in stats[x.name]._arrays()))
            if x.name in normal:
                normal[out.name] = tuple(a[index] for a in normal[x.name])
        elif x.name in stats and stats[x.name].channels == out.channels:
            stats[out.name] = stats[x.name]
            if x.name in normal:
                normal[out.name] = normal[x.name]
    elif op == "rotary" and ins[0] is not None and out.channels == ins[0].channels:
        # Each pair is rotated by an angle that changes along the positions: its energy
        # is kept, shared out between its two channels, about evenly; the mean averages
        # out.
        x = node.inputs[0]
        partner = rotary_partners(x.shape, x.axes, bool(node.attrs.get("interleaved")))
        meansq = 0.5 * (ins[0].meansq + ins[0].meansq[partner])
        stats[out.name] = ChannelStats.of(np.zeros_like(meansq), meansq)
        normal[out.name] = (np.zeros_like(meansq), np.sqrt(meansq))
    elif op == "global_avgpool" and ins[0] is not None:
        # A spatial mean keeps the mean and a part of the variance (what varies between
        # examples rather than within one): a quarter, as measured on Lite0's head.
        s = ins[0]
        var = 0.25 * s.var
        stats[out.name] = ChannelStats.of(s.mean, s.mean**2 + var)
        normal[out.name] = (s.mean, np.sqrt(var))


def _layer_output(
    node: Node, x: ChannelStats | None, sums, transpose_taps: bool = False, corr=None, sizes=None
):
    """Mean and standard deviation of a layer's output channels: from its folded BN's
    statistics where it has them, else propagated from its input (``sums``: a
    :class:`LastKernelSums`; ``corr``: the
    neighbouring-position correlations by value, given for ``correlated=True``, and
    the output's set; ``sizes``: :func:`spatial_sizes`, for the padding's coverage)."""
    bn = node.attrs.get("bn_stats")
    if bn is not None:
        return np.asarray(bn["beta"], np.float64), np.abs(np.asarray(bn["gamma"], np.float64))
    if x is None:
        return None, None
    w = np.asarray(node.weight)
    v = grouped_view(w, node.layout)
    g, og, ig, _ = v.shape
    rep = 1
    if x.channels != g * ig:
        if (g * ig) % x.channels:
            return None, None
        rep = g * ig // x.channels
        x = x.repeat(rep)
    # A ConvTranspose output position receives 1 / prod(stride) of the taps on average
    # (each input writes every tap once, onto stride^n times as many outputs).
    share = 1.0
    if transpose_taps and node.op == "conv_transpose":
        share = 1.0 / float(np.prod(node.attrs.get("stride", (1,))))
    mean, var = np.empty((g, og)), np.empty((g, og))
    for rows, ksum, ksq in sums.slices(w, node.layout, axis=1):
        mean[:, rows] = np.einsum("goi,gi->go", ksum, x.mean.reshape(g, ig))
        var[:, rows] = np.einsum("goi,gi->go", ksq, x.var.reshape(g, ig))
    mean, var = share * mean, share * var
    if corr is not None:
        rho = corr.get(node.inputs[0].name)
        rho = np.zeros(g * ig) if rho is None else np.repeat(rho, rep)
        ksq = sums(w, node.layout)[1]  # whole: the bias correction's estimate only
        mean, var, out_rho = _correlated_moments(node, v, x, rho, sizes, mean, var, ksq)
        corr[node.outputs[0].name] = out_rho
    bias = 0.0 if node.bias is None else np.asarray(node.bias, np.float64)
    return mean.reshape(-1) + bias, np.sqrt(var.reshape(-1))


def _correlated_moments(node: Node, v, x: ChannelStats, rho, sizes, mean, var, ksq):
    """A layer's mean, variance (both ``(g, out/g)``) and output correlation with
    correlated neighbouring positions (``rho`` per input channel) and zero padding
    counted (see the module's docstring); ``mean``, ``var``: the independent ones,
    returned for what the model does not cover (a ConvTranspose, a 1 x 1 layer's
    variance); ``ksq``: the squared weights summed over the taps."""
    g, og, ig, k = v.shape
    rho = np.clip(rho, 0.0, 1.0).reshape(g, ig)
    if node.op != "conv" or k == 1:
        # no neighbours inside the kernel: the inputs' correlation, weighted by W^2 var
        weight = ksq * x.var.reshape(g, 1, ig)
        total = np.maximum(weight.sum(-1), 1e-30)
        return mean, var, ((weight * rho[:, None, :]).sum(-1) / total).reshape(-1)
    source, pads = _unpadded(node)
    coverage, _ = _coverage(node, None if sizes is None else sizes.get(source.name), pads)
    if coverage is not None:
        mean = np.einsum("goik,gi,k->go", v, x.mean.reshape(g, ig), coverage)
    kernel = tuple(node.weight.shape[2:])
    nd = len(kernel)
    dilation = tuple(node.attrs.get("dilation", (1,) * nd))
    stride = tuple(node.attrs.get("stride", (1,) * nd))
    grid = np.stack(
        np.meshgrid(
            *(np.arange(n) * d for n, d in zip(kernel, dilation, strict=True)), indexing="ij"
        ),
        -1,
    ).reshape(k, nd)
    lag = np.zeros(nd, np.int64)
    lag[-1] = stride[-1]  # the next output position along the last axis
    w = v.astype(np.float64).transpose(0, 2, 1, 3)  # (g, in/g, out/g, k)
    moments = []
    for shift in (np.zeros(nd, np.int64), lag):
        dist = np.abs(grid[:, None, :] - grid[None, :, :] + shift).sum(-1)  # (k, k)
        r = rho[..., None, None] ** dist  # (g, in/g, k, k); 0 ** 0 = 1: independent
        per_input = ((w @ r) * w).sum(-1)  # W_k W_l rho^d summed over the taps
        moments.append(np.einsum("gio,gi->go", per_input, x.var.reshape(g, ig)))
    var, lagged = moments
    return mean, var, (lagged / np.maximum(var, 1e-30)).reshape(-1).clip(0.0, 1.0)


def _unpadded(node):
    """The value a layer reads before any zero Pad nodes in front of it, and the layer's
    pads with theirs added (None: not a Conv).

    A zero padding written as its own node (PyTorch's ``ZeroPad2d``, "same" padding
    exported as a Pad) is the layer's padding: the mean of the padded tensor counts
    every padded position once, where a tap reads some of them at no output and others
    at many, so it is not the ``E[x]`` of any tap (measured on Lite0's 5 x 5 depthwise
    convolutions at 7 x 7: 0.41 of the input mean for every tap, where the taps read
    0.51 to 1 of it)."""
    v = node.inputs[0]
    if node.op != "conv" or node.weight is None or node.weight.ndim < 3:
        return v, None
    nd = node.weight.ndim - 2
    pads = np.asarray(node.attrs.get("pads", (0,) * (2 * nd)), np.int64)
    while v.producer is not None and v.producer.op == "pad" and "mode" not in v.producer.attrs:
        more = tuple(v.producer.attrs.get("pads", ()))
        if len(more) != 2 * nd:
            break
        pads = pads + np.asarray(more, np.int64)
        v = v.producer.inputs[0]
    return v, tuple(int(p) for p in pads)


def _coverage(node, size_in, pads) -> tuple[np.ndarray | None, bool]:
    """The tap weights of ``E[x]`` for a layer (None: 1 for every tap) and whether zero
    padding made them less than 1 somewhere. ``pads``: the layer's, with those of the
    Pad nodes before it (:func:`_unpadded`); ``size_in``: the size of what they pad."""
    if node.op not in ("conv", "conv_transpose") or node.weight.ndim < 3:
        return None, False
    kernel = tuple(node.weight.shape[2:])
    nd = len(kernel)
    stride = tuple(node.attrs.get("stride", (1,) * nd))
    if pads is None:
        pads = tuple(node.attrs.get("pads", (0,) * (2 * nd)))
    dilation = tuple(node.attrs.get("dilation", (1,) * nd))
    if size_in is not None and len(size_in) != nd:
        size_in = None
    cov = tap_coverage(node.op, kernel, size_in, stride, pads, dilation)
    return cov, bool(node.op == "conv" and any(pads) and size_in is not None)


DEFAULT_INPUT_SPATIAL = (224, 224)
"""Spatial size assumed for a graph input whose size the backend does not know."""


def positions(graph: Graph) -> dict[str, int]:
    """The number of spatial positions of every value (1 for ``(N, features)``), from
    :func:`spatial_sizes` (one position where unknown)."""
    return {k: int(np.prod(v)) if v is not None else 1 for k, v in spatial_sizes(graph).items()}


def spatial_sizes(graph: Graph) -> dict[str, tuple[int, ...] | None]:
    """The spatial size of every value (``()`` for ``(N, features)``, None where
    unknown), from the sizes the backend gave and the layers' strides, pads and
    kernels. Where the input size is unknown, :data:`DEFAULT_INPUT_SPATIAL` is assumed
    for an input that reaches a 2-D convolution through ops that keep the size
    (padding, activations), as an image does."""
    size: dict[str, tuple[int, ...] | None] = {}
    for v in graph.inputs:
        size[v.name] = v.spatial
        if v.spatial is None and _feeds_conv2d(v):
            size[v.name] = DEFAULT_INPUT_SPATIAL
    for node in graph.nodes:
        x = size.get(node.inputs[0].name) if node.inputs else None
        shape = _spatial_out(node, x)
        for v in node.outputs:
            size[v.name] = v.spatial if v.spatial is not None else _positions_of(v, shape)
    return size


def _positions_of(v: Value, inferred):
    """The axes other than the batch and the channels, from the value's shape where the
    backend gave it and the channels are not on axis 1 (a token tensor ``(B, T, C)``:
    ``(T,)``; heads ``(B, H, T, D)``: ``(T,)``; the batch merged with the heads
    ``(T, B * H, D)``: ``(T,)``); else what the ops say."""
    if v.channel_axes is None or v.shape is None or v.channel_axes == (1,):
        return inferred
    # The batch merged above the heads ((T, B * H, D)) leaves every other axis to positions.
    merged = v.channel_outer is not None and any(o != 1 for o in v.channel_outer)
    first = 0 if merged else 1
    rest = [v.shape[a] for a in range(first, len(v.shape)) if a not in v.channel_axes]
    return None if any(d is None for d in rest) else tuple(int(d) for d in rest)


def _feeds_conv2d(value) -> bool:
    """Whether ``value`` reaches a convolution with a 2-D kernel as its data input
    through single-input ops that keep the spatial size."""
    seen = 0
    todo = [value]
    while todo and seen < 64:  # the stem of a network, not a search of the whole graph
        v = todo.pop()
        seen += 1
        for node, slot in v.uses:
            if node.op in ("conv", "conv_transpose") and slot == 0:
                if node.weight is not None and node.weight.ndim == 4:
                    return True
            elif node.op in ("pad", "identity", "dropout", *SCALABLE_ACTIVATIONS) and slot == 0:
                todo.extend(node.outputs)
    return False


def _spatial_out(node: Node, x):
    op = node.op
    if op == "flatten" or (op == "linear" and (node.inputs[0].rank or 2) <= 2):
        return ()
    if op == "global_avgpool":
        return None if x is None else (1,) * len(x)
    if x is None:
        return None
    if op in ("conv", "maxpool", "avgpool", "conv_transpose"):
        nd = len(x)
        if op in ("conv", "conv_transpose"):
            kernel = node.weight.shape[2:]
        else:
            kernel = tuple(node.attrs.get("kernel", (1,) * nd))
        stride = tuple(node.attrs.get("stride", (1,) * nd))
        pads = tuple(node.attrs.get("pads", (0,) * (2 * nd)))
        dil = tuple(node.attrs.get("dilation", (1,) * nd))
        if len(kernel) != nd or len(stride) != nd or len(pads) != 2 * nd:
            return None
        out = []
        for i in range(nd):
            span = dil[i] * (kernel[i] - 1) + 1
            if op == "conv_transpose":
                extra = tuple(node.attrs.get("output_padding", (0,) * nd))[i]
                out.append((x[i] - 1) * stride[i] - pads[i] - pads[nd + i] + span + extra)
            else:
                out.append((x[i] + pads[i] + pads[nd + i] - span) // stride[i] + 1)
        return tuple(max(1, o) for o in out)
    if op == "resize":
        scales = node.attrs.get("scales")
        if scales is None or len(scales) != len(x):
            return None
        return tuple(max(1, int(d * f)) for d, f in zip(x, scales, strict=True))
    if op == "pad":
        pads = node.attrs.get("pads", ())
        nd = len(x)
        if len(pads) != 2 * nd:
            return None
        return tuple(x[i] + pads[i] + pads[nd + i] for i in range(nd))
    return x  # elementwise ops keep the size


def counts_known(graph: Graph) -> bool:
    """Whether the backend gave the spatial size of every graph input that needs one."""
    return all(v.spatial is not None for v in graph.inputs if v.uses)


def _split_outer(x, axes, outer, channels):
    """``x`` with each channel axis that holds another axis merged above its channels
    split in two, ``(outer, channels of the axis)``, and the channel axes where they
    are then (the outer parts are positions); ``(None, None)`` where the sizes do not
    agree with ``outer`` and ``channels``."""
    if axes is None or len(outer) != len(axes) or max(axes) >= x.ndim:
        return None, None
    sizes = [x.shape[a] for a in axes]
    inner = [s // o if o and s % o == 0 else None for s, o in zip(sizes, outer, strict=True)]
    unknown = [k for k, n in enumerate(inner) if n is None]
    if len(unknown) > 1 or (unknown and outer[unknown[0]] is not None):
        return None, None
    if unknown:  # the outer size not known (the batch): the rest of the channels are here
        known = int(np.prod([n for n in inner if n is not None]))
        k = unknown[0]
        if not channels or channels % known or sizes[k] % (channels // known):
            return None, None
        inner[k] = channels // known
    if channels is not None and int(np.prod(inner)) != channels:
        return None, None
    shape, where = [], {}
    for a, size in enumerate(x.shape):
        if a in axes:
            n = inner[axes.index(a)]
            shape.append(size // n)  # the merged positions, above the channels
            where[a] = len(shape)
            shape.append(n)
        else:
            shape.append(size)
    return x.reshape(shape), tuple(where[a] for a in axes)


def measured_layout(value: Value) -> dict:
    """Where ``value``'s channels lie, as :meth:`StatsAccumulator.add` takes it (its
    keyword arguments): what a backend passes with each tensor it measures."""
    return {
        "channel_axes": value.channel_axes,
        "channel_outer": value.channel_outer,
        "channels": value.channels,
    }


class StatsAccumulator:
    """Per-channel statistics of named tensors (channel axis 1, ``(N, C, ...)`` or
    ``(N, features)``, unless told where the channels are), accumulated batch by batch:
    what calibration measures."""

    def __init__(self) -> None:
        self._acc: dict[str, list] = {}
        self._scratch = np.empty(0)  # float64, reused by every tensor (see add)

    def _float64(self, x: np.ndarray) -> np.ndarray:
        """A float64 copy of C-contiguous ``x`` in the accumulator's scratch memory: the
        values and layout ``x.astype(np.float64)`` gives, without fresh memory per batch
        (its first touch cost more than the sums: a batch of Lite0's widest activation
        is 77 MB in float64)."""
        if self._scratch.size < x.size:
            self._scratch = np.empty(x.size)
        out = self._scratch[: x.size].reshape(x.shape)
        np.copyto(out, x)
        return out

    def add(
        self,
        name: str,
        x: np.ndarray,
        channel_axes: tuple[int, ...] | None = None,
        channel_outer: tuple[int | None, ...] | None = None,
        channels: int | None = None,
    ) -> None:
        """Add one batch of tensor ``name`` whose channels are on ``channel_axes``
        (default axis 1; see :attr:`cle_core.Value.channel_axes`); non-float and rank < 2
        tensors are ignored. ``channel_outer`` (:attr:`cle_core.Value.channel_outer`):
        per channel axis, the size of another axis merged above its channels (the batch
        merged with the heads, ``(T, B * H, D)``), split off as positions; None for the
        one of unknown size, found from ``channels``, the value's channel count."""
        x = np.asarray(x)
        if x.dtype.kind != "f" or x.ndim < 2 or x.size == 0:
            return
        plain = (
            x.flags.c_contiguous
            and channel_outer is None
            and (channel_axes is None or tuple(channel_axes) == (1,))
        )
        # the common layout: a copy in scratch memory, squared in place below
        x = self._float64(x) if plain else x.astype(np.float64, copy=False)
        if channel_outer is not None:
            x, channel_axes = _split_outer(x, channel_axes, channel_outer, channels)
            if x is None:
                return
        if channel_axes is not None and tuple(channel_axes) != (1,):
            if max(channel_axes) >= x.ndim:
                return
            rest = [a for a in range(x.ndim) if a not in channel_axes]
            x = np.transpose(x, [rest[0], *channel_axes, *rest[1:]])
            x = x.reshape(x.shape[0], -1, *x.shape[1 + len(channel_axes) :])
        axes = (0,) + tuple(range(2, x.ndim))
        total, lo, hi, nonzero = x.sum(axes), x.min(axes), x.max(axes), (x != 0).sum(axes)
        # x * x, in the scratch copy itself when x is one (the same values, the same order)
        squares = np.multiply(x, x, out=x if plain else None).sum(axes)
        parts = [total, squares, lo, hi, nonzero]
        n = x.size // x.shape[1]
        a = self._acc.get(name)
        if a is None:
            self._acc[name] = [*parts, n]
        elif a[0].shape == parts[0].shape:
            a[0] += parts[0]
            a[1] += parts[1]
            a[2] = np.minimum(a[2], parts[2])
            a[3] = np.maximum(a[3], parts[3])
            a[4] = a[4] + parts[4]
            a[5] += n

    def result(self) -> dict[str, ChannelStats]:
        return {
            name: ChannelStats(s / n, sq / n, lo, hi, np.asarray(nz, np.float64) / n)
            for name, (s, sq, lo, hi, nz, n) in self._acc.items()
        }
