"""Under which attribute values each op the ONNX translator accepts is exact (issue 17).

Scaling channel ``i`` by ``1/s_i`` before an op ``f`` and by ``s_i`` after it keeps the
model's function when ``f(x / s) = f(x) / s`` per channel for positive ``s``
(docs/exactness.rst). Every case below builds a small model around one node named
``TEST``: mostly ``Conv(3 -> 6)`` (weights spread over three decades per output channel,
so that equalization really scales) ``-> TEST -> Conv``, or a layer variant as the
source or sink itself. It runs ``cle_onnx.equalize_model`` and checks one outcome:

- exact (``refused=None``): a region runs through ``TEST`` (it is among the region's
  sources, sinks or the nodes it passes; a batch norm may instead be folded), the
  region's scales are not all near 1, and onnxruntime's outputs of the original and the
  equalized model agree to an SQNR of at least 100 dB (float32 rounding leaves 120 dB
  or more);
- refused: ``TEST`` is left out of the IR with a skip record that names the op and,
  in ``refused``, why; no region runs through it; the outputs still agree to 100 dB.

The table is the written rule. A variant that is not homogeneous per channel (a Pad
with a constant other than 0, tf_crop_and_resize with an extrapolation value other than
0, a reduction over the channels ...) must be refused; one that is (a LeakyRelu with a
negative slope, a Mul by a negative constant, a reflect Pad ...) should be translated.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

import cle_onnx  # noqa: E402
from cle_core._quality import sqnr_db  # noqa: E402
from tests.helpers.onnx_models import OnnxBuilder  # noqa: E402

MIN_DB = 100.0
BIG = 2**62  # an "until the end" Slice bound
TEST = "TEST"
C = 6  # channels of the source Conv's output


@dataclass(frozen=True)
class Case:
    op: str
    variant: str
    build: Callable[[OnnxBuilder], list[str]]  # the model's outputs
    refused: str | None = None  # a part of the skip reason, when TEST must be refused
    opset: int = 13
    folded: bool = False  # exact by folding (a batch norm) rather than by a region


# --- building blocks ------------------------------------------------------------------


def t(b: OnnxBuilder, op: str, inputs, n_out: int = 1, **attrs):
    """The node under test (named TEST)."""
    outs = [b.name(f"{op.lower()}_out") for _ in range(n_out)]
    b.nodes.append(helper.make_node(op, list(inputs), outs, name=TEST, **attrs))
    return outs[0] if n_out == 1 else outs


def ints(b: OnnxBuilder, values, base: str = "ints") -> str:
    name = b.name(base)
    b.inits.append(numpy_helper.from_array(np.asarray(values, np.int64), name))
    return name


def floats(b: OnnxBuilder, values, base: str = "c") -> str:
    return b.init(np.asarray(values, np.float64), base)


def src(b: OnnxBuilder, x: str = "x", cout: int = C) -> str:
    """Conv(3 -> cout, 3x3, pad 1) on the 8x8 input: the source layer."""
    return b.conv(x, 3, cout, 3, pad=1)


def sink(b: OnnxBuilder, h: str, cin: int = C) -> str:
    return b.conv(h, cin, 4, 1)


def gemm(b: OnnxBuilder, h: str, features: int, out: int = 4) -> str:
    w, c = b.init(b.spread((out, features))), floats(b, b.rng.normal(size=out))
    return b.node("Gemm", [h, w, c], transB=1)


def between(op: str, **attrs) -> Callable[[OnnxBuilder], list[str]]:
    """Conv -> op(attrs) -> Conv."""
    return lambda b: [sink(b, t(b, op, [src(b)], **attrs))]


def with_inputs(op: str, *extra: Callable[[OnnxBuilder], str], cin: int = C, **attrs):
    """Conv -> op(h, extra inputs, attrs) -> Conv(cin -> 4); an extra input may be ""."""

    def build(b):
        h = src(b)
        names = [e(b) if callable(e) else e for e in extra]
        return [sink(b, t(b, op, [h, *names], **attrs), cin)]

    return build


def const(values) -> Callable[[OnnxBuilder], str]:
    """A float32 initializer holding ``values``, made when the model is built."""
    return lambda b: floats(b, values)


def data_scalar(b: OnnxBuilder) -> str:
    """A scalar computed from the model's input: not a constant."""
    return b.node("ReduceMax", ["x"], keepdims=0)


def head(b: OnnxBuilder, h: str, features: int) -> list[str]:
    return [gemm(b, h, features)]


# --- the cases ------------------------------------------------------------------------


def _resize(mode: str, ctm: str | None = None, opset: int = 13, refused=None, **attrs):
    """Conv -> Resize(scales 1, 1, 2, 2) -> Conv."""
    variant = ", ".join([mode] + ([ctm] if ctm else []) + [f"{k}={v}" for k, v in attrs.items()])
    if ctm is not None:
        attrs["coordinate_transformation_mode"] = ctm
    roi = attrs.pop("roi", None)
    scales = attrs.pop("scales", [1, 1, 2, 2])

    def build(b):
        h = src(b)
        if roi is None and opset < 13:  # roi is required before opset 13
            r = b.init(np.zeros(0), "roi")
        else:
            r = floats(b, roi, "roi") if roi is not None else ""
        cin = int(C * scales[1])
        return [
            sink(b, t(b, "Resize", [h, r, floats(b, scales, "scales")], mode=mode, **attrs), cin)
        ]

    return Case("Resize", variant, build, refused, opset)


def _resize18(variant, inputs, opset=18, refused=None, cin=C, **attrs):
    """Conv -> Resize(X, *inputs(b), attrs) -> Conv(cin -> 4)."""

    def build(b):
        return [sink(b, t(b, "Resize", [src(b), *inputs(b)], **attrs), cin)]

    return Case("Resize", variant, build, refused, opset)


def _split(variant, opset, refused=None, axis=1, split=None, num_outputs=None):
    def build(b):
        h = src(b)
        attrs = {"axis": axis}
        inputs = [h]
        if split is not None and opset >= 13:
            inputs.append(ints(b, split, "split"))
        elif split is not None:
            attrs["split"] = split
        if num_outputs is not None:
            attrs["num_outputs"] = num_outputs
        n = len(split) if split is not None else num_outputs
        parts = t(b, "Split", inputs, n_out=n, **attrs)
        widths = (split or [C // n] * n) if axis % 4 == 1 else [C] * n
        return [sink(b, p, w) for p, w in zip(parts, widths, strict=True)]

    return Case("Split", variant, build, refused, opset)


def _slice(variant, pieces, refused=None, opset=13):
    """Conv -> Slice(starts, ends, axes, steps) per piece -> a Conv on each; only the
    first Slice is TEST."""

    def build(b):
        h = src(b)
        outs = []
        for k, (starts, ends, axes, steps, width) in enumerate(pieces):
            if opset < 10:
                attrs = {"starts": starts, "ends": ends, "axes": axes}
                ins = [h]
            else:
                attrs = {}
                ins = [h, ints(b, starts), ints(b, ends), ints(b, axes)]
                if steps is not None:
                    ins.append(ints(b, steps))
            node = t(b, "Slice", ins, **attrs) if k == 0 else b.node("Slice", ins, **attrs)
            outs.append(sink(b, node, width))
        return outs

    return Case("Slice", variant, build, refused, opset)


def _conv_variant(variant, refused=None, opset=13, cin=3, cout=C, k=3, group=1, **attrs):
    """TEST = Conv(x) with these attributes -> Relu -> Conv."""

    def build(b):
        w = b.init(b.spread((cout, cin // group, k, k)))
        h = t(b, "Conv", ["x", w, floats(b, b.rng.normal(size=cout))], group=group, **attrs)
        return [sink(b, b.node("Relu", [h]), cout)]

    return Case("Conv", variant, build, refused, opset)


def _conv_transpose(variant, refused=None, group=1, k=2, **attrs):
    def build(b):
        w = b.init(b.spread((C, C // group, k, k), axis=1))
        h = b.node("Relu", [src(b)])
        h = t(b, "ConvTranspose", [h, w, floats(b, b.rng.normal(size=C))], group=group, **attrs)
        return [sink(b, b.node("Relu", [h]))]

    return Case("ConvTranspose", variant, build, refused)


def _gemm(variant, refused=None, c_shape=(5,), opset=13, trans_a=False, **attrs):
    """Conv -> GlobalAveragePool -> Flatten -> TEST Gemm(6 -> 5) -> Relu -> Gemm."""

    def build(b):
        h = b.node("Flatten", [b.node("GlobalAveragePool", [src(b)])], axis=1)
        trans_b = attrs.get("transB", 0)
        w = b.spread((5, C)) if trans_b else b.spread((C, 5), axis=1)
        inputs = [b.node("Transpose", [h], perm=[1, 0]) if trans_a else h, b.init(w)]
        if c_shape is not None:
            inputs.append(floats(b, b.rng.normal(size=c_shape)))
        g = t(b, "Gemm", inputs, **({"transA": 1} if trans_a else {}), **attrs)
        return [gemm(b, b.node("Relu", [g]), 5)]

    return Case("Gemm", variant, build, refused, opset)


def _bn(variant, refused=None, opset=13, folded=True, **attrs):
    def build(b):
        rng = b.rng
        stats = [
            rng.normal(size=C) * 10.0 ** rng.uniform(-1, 1, C),
            rng.normal(size=C),
            rng.normal(size=C),
            rng.uniform(0.2, 2.0, C),
        ]
        if attrs.get("spatial") == 0:
            stats = [np.broadcast_to(s[:, None, None], (C, 8, 8)) + 0.0 for s in stats]
            stats[3] = np.abs(stats[3])
        n_out = 3 if attrs.get("training_mode") else 1  # Y, running mean and var
        h = t(b, "BatchNormalization", [src(b)] + [floats(b, s) for s in stats], n_out, **attrs)
        return [sink(b, b.node("Relu", [h if n_out == 1 else h[0]]))]

    return Case("BatchNormalization", variant, build, refused, opset, folded=folded and not refused)


def _pool(op, variant, refused=None, opset=13, **attrs):
    return Case(op, variant, between(op, **attrs), refused, opset)


def _reduce_mean(variant, refused=None, opset=13, axes=None, keepdims=1, cin=C, **attrs):
    def build(b):
        ins = [src(b)]
        if opset >= 18 and axes is not None:
            ins.append(ints(b, axes, "axes"))
        elif axes is not None:
            attrs["axes"] = axes
        h = t(b, "ReduceMean", ins, keepdims=keepdims, **attrs)
        return head(b, h, C) if not keepdims else [sink(b, h, cin)]

    return Case("ReduceMean", variant, build, refused, opset)


def _pad(variant, pads, refused=None, opset=13, mode=None, value=None, axes=None, cin=C):
    def build(b):
        attrs = {} if mode is None else {"mode": mode}
        if opset < 11:
            attrs["pads"] = pads
            if value is not None:
                attrs["value"] = value
            return [sink(b, t(b, "Pad", [src(b)], **attrs), cin)]
        ins = [src(b), ints(b, pads, "pads")]
        if value is not None or axes is not None:
            ins.append("" if value is None else floats(b, value, "value"))
        if axes is not None:
            ins.append(ints(b, axes, "axes"))
        return [sink(b, t(b, "Pad", ins, **attrs), cin)]

    return Case("Pad", variant, build, refused, opset)


def _mul(op, variant, factor, refused=None, first=False):
    def build(b):
        h, f = src(b), b.init(np.asarray(factor, np.float64), "factor")
        return [sink(b, t(b, op, [f, h] if first else [h, f]))]

    return Case(op, variant, build, refused)


def _shared_bias_gemm(b):
    """Gemm(x, w1, bias) -> Relu -> Mul(., bias) -> Gemm: the bias is also a factor."""
    h = b.node("Flatten", [b.node("GlobalAveragePool", [src(b)])], axis=1)
    bias = floats(b, b.rng.uniform(0.5, 2.0, 16) * b.rng.choice([-1, 1], 16), "bias")
    g = t(b, "Gemm", [h, b.init(b.spread((16, C))), bias], transB=1)
    return [gemm(b, b.node("Mul", [b.node("Relu", [g]), bias]), 16)]


def _shared_bias_add(b):
    """Conv (no bias) -> Add(bias) -> Relu -> Mul(., bias) -> Conv: the bias-Add's
    constant is also the Mul's factor."""
    bias = floats(b, b.rng.uniform(0.5, 2.0, (1, C, 1, 1)), "bias")
    h = t(b, "Conv", ["x", b.init(b.spread((C, 3, 3, 3)))], pads=[1] * 4)
    h = b.node("Relu", [b.node("Add", [h, bias])])
    return [sink(b, b.node("Mul", [h, bias]))]


def _shared_bias_side(b):
    """Conv(x, w, bias) -> Relu -> Conv, and the bias read as data by a side Mul."""
    bias = floats(b, b.rng.normal(size=C), "bias")
    h = t(b, "Conv", ["x", b.init(b.spread((C, 3, 3, 3))), bias], pads=[1] * 4)
    side = b.node("Mul", [b.node("Relu", [h]), b.node("Unsqueeze", [bias, ints(b, [1, 2])])])
    return [sink(b, side)]


def _constant_weight_read_twice(b):
    """A Conv weight from a Constant node, also read by a side Mul (a graph output)."""
    w = b.spread((C, 3, 3, 3))
    value = numpy_helper.from_array(w.astype(np.float32))
    weight = b.node("Constant", [], value=value)
    h = t(b, "Conv", ["x", weight, floats(b, b.rng.normal(size=C))], pads=[1] * 4)
    return [sink(b, b.node("Relu", [h])), b.node("Mul", [weight, weight])]


def _identity_weight_read_twice(b):
    """A Conv weight through Identity, whose output another node also reads."""
    w = b.node("Identity", [b.init(b.spread((C, 3, 3, 3)))])
    h = t(b, "Conv", ["x", w, floats(b, b.rng.normal(size=C))], pads=[1] * 4)
    return [sink(b, b.node("Relu", [h])), b.node("ReduceSum", [w], keepdims=0)]


def _dequantized_weight(b):
    """A Conv weight computed by DequantizeLinear (216 elements)."""
    q = b.name("wq")
    b.inits.append(numpy_helper.from_array(b.rng.integers(-100, 100, (8, 3, 3, 3), np.int8), q))
    w = b.node("DequantizeLinear", [q, floats(b, 0.02, "scale")])
    h = t(b, "Conv", ["x", w, floats(b, b.rng.normal(size=8))], pads=[1] * 4)
    return [sink(b, b.node("Relu", [h]), 8)]


def _residual(op):
    def build(b):
        h = b.node("Relu", [src(b)])
        inner = b.conv(b.node("Relu", [b.conv(h, C, C, 1)]), C, C, 1)
        return [sink(b, b.node("Relu", [t(b, op, [h, inner])]))]

    return build


def _concat(axis, refused=None, constant=False):
    def build(b):
        widths = (2, 4) if axis % 4 == 1 else (3, 3)
        left = b.node("Relu", [b.conv("x", 3, widths[0], 3, pad=1)])
        right = b.node("Relu", [b.conv("x", 3, widths[1], 1)])
        if constant:
            right = floats(b, np.ones((2, widths[1], 8, 8)), "const")
        cat = t(b, "Concat", [left, right], axis=axis)
        return [sink(b, cat, sum(widths) if axis % 4 == 1 else widths[0])]

    return Case(
        "Concat", f"axis={axis}" + (", a constant input" if constant else ""), build, refused
    )


def _flatten(axis, refused=None):
    features = {1: C * 64, -3: C * 64, 2: 64, 0: 2 * C * 64}[axis]
    return Case(
        "Flatten",
        f"axis={axis}",
        lambda b: head(b, t(b, "Flatten", [src(b)], axis=axis), features),
        refused,
    )


def _reshape(variant, shape, features, refused=None):
    def build(b):
        h = t(b, "Reshape", [src(b), ints(b, shape, "shape")])
        if features is None:  # back to (N, C, H, W) for a Conv
            return [sink(b, b.node("Reshape", [h, ints(b, [2, C, 8, 8], "shape")]))]
        return head(b, h, features)

    return Case("Reshape", variant, build, refused)


def _dropout(variant, opset, refused=None, ratio=None, training=None, mask=False, **attrs):
    def build(b):
        ins = [src(b)]
        if ratio is not None or training is not None:
            ins.append("" if ratio is None else floats(b, ratio, "ratio"))
        if training is not None:
            name = b.name("training")
            b.inits.append(numpy_helper.from_array(np.array(training), name))
            ins.append(name)
        outs = t(b, "Dropout", ins, n_out=2 if mask else 1, **attrs)
        if mask == "read":
            return [sink(b, outs[0]), outs[1]]
        return [sink(b, outs[0] if mask else outs)]

    return Case("Dropout", variant, build, refused, opset)


def _clip(variant, lo, hi, refused=None, opset=13, how="init"):
    def bound(b, v):
        if v is None:
            return ""
        if v == "data":
            return data_scalar(b)
        if how == "constant":
            return b.node("Constant", [], value=numpy_helper.from_array(np.float32(v)))
        return floats(b, v, "bound")

    def build(b):
        h = src(b)
        if opset < 11:
            attrs = {k: v for k, v in (("min", lo), ("max", hi)) if v is not None}
            return [sink(b, t(b, "Clip", [h], **attrs))]
        ins = [h, bound(b, lo)] + ([bound(b, hi)] if hi is not None else [])
        return [sink(b, t(b, "Clip", ins))]

    return Case("Clip", variant, build, refused, opset)


def _prelu(variant, slope, refused=None):
    def build(b):
        h = src(b)
        s = data_scalar(b) if isinstance(slope, str) else floats(b, slope, "slope")
        if isinstance(slope, str):
            s = b.node("Reshape", [s, ints(b, [1, 1, 1, 1])])
        return [sink(b, t(b, "PRelu", [h, s]))]

    return Case("PRelu", variant, build, refused)


rng = np.random.default_rng(17)
CROP_ROI = [0, 0, -0.5, -0.5, 1, 1, 1.5, 1.5]  # the spatial box reaches outside the input

CASES: list[Case] = [
    # --- activations -------------------------------------------------------------------
    Case("Relu", "plain", between("Relu")),
    Case("LeakyRelu", "alpha default (0.01)", between("LeakyRelu")),
    Case("LeakyRelu", "alpha=0.2", between("LeakyRelu", alpha=0.2)),
    Case("LeakyRelu", "alpha=-0.5 (negative)", between("LeakyRelu", alpha=-0.5)),
    Case("LeakyRelu", "alpha=3.0", between("LeakyRelu", alpha=3.0)),
    _prelu("one slope", [0.25]),
    _prelu("a slope per channel (C, 1, 1), some negative", rng.normal(size=(C, 1, 1))),
    _prelu("a slope per channel (1, C, 1, 1)", rng.uniform(0, 0.5, (1, C, 1, 1))),
    _prelu(
        "a slope per position (1, 1, 8, 8)",
        rng.uniform(0, 0.5, (1, 1, 8, 8)),
        refused="not one value per channel",
    ),
    _prelu("a slope computed from the input", "data", refused="slope is not a constant"),
    _prelu("an infinite slope", [np.inf], refused="not finite"),
    _clip("min 0, max 6 (ReLU6)", 0.0, 6.0),
    _clip("min -1, max 1 (Hardtanh)", -1.0, 1.0),
    _clip("min -1, max 6", -1.0, 6.0),
    _clip("min 1, max 6 (min > 0)", 1.0, 6.0),
    _clip("min -3, max -1 (both negative)", -3.0, -1.0),
    _clip("min 5 > max 2", 5.0, 2.0),
    _clip("min only", 0.0, None),
    _clip("max only (min left out)", None, 6.0),
    _clip("bounds from Constant nodes", 0.0, 6.0, how="constant"),
    _clip("opset 7 attributes min 0, max 6", 0.0, 6.0, opset=7),
    _clip("opset 7 attribute max only", None, 6.0, opset=7),
    _clip("max computed from the input", 0.0, "data", refused="max is not a constant"),
    _clip("min NaN", np.nan, 6.0, refused="min is NaN"),
    # --- passthrough ------------------------------------------------------------------
    Case("Identity", "plain", between("Identity")),
    Case("Dropout", "opset 7, ratio attribute", between("Dropout", ratio=0.3), opset=7),
    _dropout("opset 13, ratio input", 13, ratio=0.3),
    _dropout("opset 13, training_mode=false", 13, ratio=0.3, training=False),
    _dropout(
        "opset 13, training_mode=true", 13, refused="training_mode=1", ratio=0.0, training=True
    ),
    _dropout("opset 13, a mask output nothing reads", 13, mask="unread"),
    _dropout("opset 13, its mask output read", 13, refused="mask output", mask="read"),
    _pad("constant, no value (zeros)", [0, 0, 1, 1, 0, 0, 1, 1]),
    _pad("constant, value 0", [0, 0, 1, 2, 0, 0, 2, 1], value=0.0),
    _pad("constant, value 1.5", [0, 0, 1, 1, 0, 0, 1, 1], refused="value 1.5", value=1.5),
    _pad(
        "constant, value -2 (opset 7 attribute)",
        [0, 0, 1, 1, 0, 0, 1, 1],
        opset=7,
        refused="value -2",
        value=-2.0,
    ),
    _pad("opset 7 attributes, value 0", [0, 0, 1, 1, 0, 0, 1, 1], opset=7),
    _pad("reflect", [0, 0, 2, 1, 0, 0, 1, 2], mode="reflect"),
    _pad("edge", [0, 0, 2, 1, 0, 0, 1, 2], mode="edge"),
    _pad("edge, constant_value 3 (ignored)", [0, 0, 1, 1, 0, 0, 1, 1], mode="edge", value=3.0),
    _pad("wrap (opset 19)", [0, 0, 2, 1, 0, 0, 1, 2], mode="wrap", opset=19),
    _pad("opset 18 axes [2, 3]", [1, 1, 1, 1], axes=[2, 3], opset=18),
    _pad("opset 18 axes [-1]", [2, 1], axes=[-1], opset=18),
    _pad("negative pads (a crop)", [0, 0, -1, 0, 0, 0, -1, 0], refused="negative pads"),
    _pad("pads on the channel axis", [0, 1, 0, 0, 0, 1, 0, 0], refused="channel axis", cin=C + 2),
    _pool("MaxPool", "3x3, pads 1", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
    _pool("MaxPool", "2x2 stride 2", kernel_shape=[2, 2], strides=[2, 2]),
    _pool("MaxPool", "ceil_mode=1", kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1),
    _pool("MaxPool", "dilations 2", kernel_shape=[2, 2], dilations=[2, 2]),
    _pool(
        "MaxPool", "auto_pad SAME_UPPER", kernel_shape=[3, 3], strides=[2, 2], auto_pad="SAME_UPPER"
    ),
    _pool("MaxPool", "storage_order=1", kernel_shape=[2, 2], storage_order=1),
    Case(
        "MaxPool",
        "its Indices output read",
        lambda b: (lambda o: [sink(b, o[0]), o[1]])(
            t(b, "MaxPool", [src(b)], n_out=2, kernel_shape=[2, 2])
        ),
        refused="Indices output",
    ),
    _pool("AveragePool", "count_include_pad=0, pads 1", kernel_shape=[3, 3], pads=[1] * 4),
    _pool(
        "AveragePool",
        "count_include_pad=1, pads 1",
        kernel_shape=[3, 3],
        pads=[1] * 4,
        count_include_pad=1,
    ),
    _pool("AveragePool", "ceil_mode=1", kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1),
    _pool(
        "AveragePool",
        "ceil_mode=1, count_include_pad=1",
        kernel_shape=[3, 3],
        strides=[2, 2],
        pads=[1] * 4,
        ceil_mode=1,
        count_include_pad=1,
        refused="ceil_mode=1",
    ),
    _pool(
        "AveragePool",
        "auto_pad SAME_LOWER",
        kernel_shape=[3, 3],
        strides=[2, 2],
        auto_pad="SAME_LOWER",
    ),
    _pool("AveragePool", "dilations 2 (opset 19)", kernel_shape=[2, 2], dilations=[2, 2], opset=19),
    Case("GlobalAveragePool", "plain", between("GlobalAveragePool")),
    _reduce_mean("axes [2, 3], keepdims 1", axes=[2, 3]),
    _reduce_mean("axes [-1, -2], keepdims 1", axes=[-1, -2]),
    _reduce_mean("axes [2, 3], keepdims 0", axes=[2, 3], keepdims=0),
    _reduce_mean("opset 18, axes input [2, 3]", axes=[2, 3], opset=18),
    _reduce_mean("opset 18, no axes, noop_with_empty_axes=1", opset=18, noop_with_empty_axes=1),
    _reduce_mean("axes [1] (the channels)", refused="reduces axes [1]", axes=[1], cin=1),
    _reduce_mean("axes [3] (part of the spatial axes)", refused="reduces axes [3]", axes=[3]),
    _reduce_mean("no axes (every axis)", refused="every axis", cin=1),
    _reduce_mean("opset 18, no axes (every axis)", refused="every axis", opset=18, cin=1),
    # --- Resize / Upsample ------------------------------------------------------------
    _resize("nearest", "asymmetric", nearest_mode="floor"),
    _resize("nearest", "half_pixel"),
    _resize("nearest", "half_pixel", nearest_mode="ceil"),
    _resize("nearest", "align_corners", nearest_mode="round_prefer_ceil"),
    _resize("nearest", "pytorch_half_pixel"),
    _resize("linear", "half_pixel"),
    _resize("linear", "align_corners"),
    _resize("linear", "asymmetric"),
    _resize("linear", "pytorch_half_pixel"),
    _resize("linear", "half_pixel_symmetric", opset=19),
    _resize("cubic", "half_pixel"),
    _resize("cubic", "half_pixel", cubic_coeff_a=-0.5, exclude_outside=1),
    _resize("linear", "half_pixel", opset=18, antialias=1, scales=[1, 1, 0.5, 0.5]),
    _resize("cubic", "half_pixel", opset=18, antialias=1, scales=[1, 1, 0.5, 0.5]),
    _resize("linear", "tf_crop_and_resize", roi=CROP_ROI),
    _resize("linear", "tf_crop_and_resize", roi=CROP_ROI, extrapolation_value=0.0),
    _resize("nearest", "tf_crop_and_resize", roi=[0, 0, 0.25, 0, 1, 1, 0.75, 1]),
    _resize(
        "linear",
        "tf_crop_and_resize",
        roi=CROP_ROI,
        extrapolation_value=5.0,
        refused="extrapolation_value=5",
    ),
    _resize(
        "nearest",
        "tf_crop_and_resize",
        roi=[0, 0, 0.25, 0.25, 1, 1, 0.75, 0.75],
        extrapolation_value=-1.0,
        refused="extrapolation_value=-1",
    ),
    _resize(
        "linear",
        "tf_crop_and_resize",
        roi=[0, 0.25, 0, 0, 1, 0.75, 1, 1],
        refused="on the channel axis",
    ),
    _resize("nearest", "tf_half_pixel_for_nn", opset=11),
    _resize("nearest", "tf_half_pixel_for_nn", opset=11, nearest_mode="floor"),
    _resize(
        "nearest",
        "tf_half_pixel_for_nn",
        opset=11,
        nearest_mode="ceil",
        refused="tf_half_pixel_for_nn with nearest_mode=ceil",
    ),
    _resize("nearest", "asymmetric", scales=[1, 2, 2, 2], refused="resizes the channel axis"),
    _resize18(
        "opset 18, axes [2, 3], scales [2, 2]",
        lambda b: ["", floats(b, [2, 2], "scales")],
        mode="linear",
        axes=[2, 3],
    ),
    _resize18(
        "opset 18, axes [-2, -1], sizes [16, 12], not_larger",
        lambda b: ["", "", ints(b, [16, 12], "sizes")],
        axes=[-2, -1],
        keep_aspect_ratio_policy="not_larger",
    ),
    _resize18(
        "opset 18, sizes [2, 6, 16, 16], stretch",
        lambda b: ["", "", ints(b, [2, C, 16, 16], "sizes")],
        mode="cubic",
    ),
    _resize18(
        "opset 18, axes [1, 2, 3], scales [1, 2, 2]",
        lambda b: ["", floats(b, [1, 2, 2], "scales")],
        mode="linear",
        axes=[1, 2, 3],
    ),
    _resize18(
        "opset 18, sizes [2, 6, 16, 16], not_smaller (one scale, 2, for every axis)",
        lambda b: ["", "", ints(b, [2, C, 16, 16], "sizes")],
        refused="resizes the batch axis (scale 2)",
        cin=2 * C,
        keep_aspect_ratio_policy="not_smaller",
    ),
    _resize18(
        "sizes [2, 6, 12, 16]",
        lambda b: ["", "", ints(b, [2, C, 12, 16], "sizes")],
        opset=13,
        mode="linear",
    ),
    Case(
        "Resize",
        "scales computed from the input",
        lambda b: [
            sink(
                b,
                t(
                    b,
                    "Resize",
                    [
                        src(b),
                        "",
                        b.node(
                            "Add",
                            [
                                floats(b, [1, 1, 2, 2]),
                                b.node("Mul", [data_scalar(b), floats(b, 0.0)]),
                            ],
                        ),
                    ],
                ),
            )
        ],
        refused="scales are not constant",
    ),
    Case(
        "Resize",
        "opset 10, linear",
        lambda b: [sink(b, t(b, "Resize", [src(b), floats(b, [1, 1, 2, 2])], mode="linear"))],
        opset=10,
    ),
    Case(
        "Upsample",
        "opset 9, nearest",
        lambda b: [sink(b, t(b, "Upsample", [src(b), floats(b, [1, 1, 2, 2])]))],
        opset=9,
    ),
    Case(
        "Upsample",
        "opset 7, linear, scales attribute",
        between("Upsample", mode="linear", scales=[1.0, 1.0, 2.0, 2.0]),
        opset=7,
    ),
    # --- products ---------------------------------------------------------------------
    _mul("Mul", "by 0.5", 0.5),
    _mul("Mul", "by -2 (negative)", -2.0),
    _mul("Mul", "by 0", 0.0),
    _mul("Mul", "by a (1, C, 1, 1) constant of both signs", rng.normal(size=(1, C, 1, 1))),
    _mul("Mul", "by a (C, 1, 1) constant, constant first", rng.normal(size=(C, 1, 1)), first=True),
    _mul(
        "Mul",
        "by a (1, 1, 8, 8) constant",
        rng.normal(size=(1, 1, 8, 8)),
        refused="not per channel",
    ),
    _mul("Mul", "by Inf", np.inf, refused="not finite"),
    _mul("Div", "by 2", 2.0),
    _mul("Div", "by a negative (1, C, 1, 1) constant", -rng.uniform(0.5, 2, (1, C, 1, 1))),
    _mul("Div", "by 0", 0.0, refused="divides by zero"),
    _mul("Div", "by NaN", np.nan, refused="divides by NaN"),
    _mul("Div", "by Inf", np.inf),
    _mul("Div", "a constant by the activation", 2.0, first=True, refused="divisor is not"),
    # --- channel plumbing -------------------------------------------------------------
    _split("opset 13, split input [2, 4]", 13, split=[2, 4]),
    _split("opset 11, split attribute [3, 3], axis -3", 11, split=[3, 3], axis=-3),
    _split("opset 18, num_outputs=2", 18, num_outputs=2),
    # positions of the spatial axis: every channel kept whole, exact
    _split("axis 2", 13, axis=2, split=[4, 4]),
    _split("axis 0 (the batch)", 13, refused="splits the batch axis", axis=0, split=[1, 1]),
    _slice(
        "channels [0:4] and [4:], axes [1]", [([0], [4], [1], None, 4), ([4], [BIG], [1], None, 2)]
    ),
    _slice(
        "negative axes and starts: [-2:] and [0:-2] of axis -3",
        [([-2], [BIG], [-3], [1], 2), ([0], [-2], [-3], [1], 4)],
    ),
    _slice("opset 9 attributes", [([0], [3], [1], None, 3), ([3], [6], [1], None, 3)], opset=9),
    _slice(
        "steps 2 on the channels",
        [([0], [BIG], [1], [2], 3), ([1], [BIG], [1], [2], 3)],
        refused="steps [2]",
    ),
    _slice("steps -1 (reversed channels)", [([-1], [-BIG], [1], [-1], C)], refused="steps [-1]"),
    # positions of a spatial axis: a select, every channel kept whole
    _slice("a spatial axis", [([1], [BIG], [2], None, C)]),
    _slice("steps 2 on a spatial axis", [([0], [BIG], [3], [2], C)]),
    _slice("steps -1 on a spatial axis", [([-1], [-BIG], [2], [-1], C)], refused="reverses"),
    _slice("two axes", [([1, 1], [BIG, BIG], [2, 3], None, C)], refused="cuts several axes"),
    _slice("nothing cut (an identity)", [([0, 0], [BIG, C], [2, 1], None, C)]),
    Case("Sum", "one input", between("Sum")),
    Case("Sum", "residual", _residual("Sum")),
    Case("Add", "residual", _residual("Add")),
    Case(
        "Add",
        "a per-channel constant",
        with_inputs("Add", const(rng.normal(size=(1, C, 1, 1)))),
        refused="adds a constant",
    ),
    Case(
        "Add",
        "broadcasting (N, C, 1, 1)",
        lambda b: (lambda h: [sink(b, t(b, "Add", [h, b.node("GlobalAveragePool", [h])]))])(
            b.node("Relu", [src(b)])
        ),
        refused="broadcasts",
    ),
    _concat(1),
    _concat(-3),
    _concat(1, refused="concatenates a constant", constant=True),
    _concat(2, refused="along axis 2"),
    _flatten(1),
    _flatten(-3),
    _flatten(2, refused="axis=2"),
    _flatten(0, refused="axis=0"),
    _reshape("(2, -1)", [2, -1], C * 64),
    _reshape("(0, -1)", [0, -1], C * 64),
    _reshape("(-1, C*H*W)", [-1, C * 64], C * 64),
    _reshape("(N, C, H*W) and back", [2, C, 64], None),
    # --- layers -----------------------------------------------------------------------
    _conv_variant("pads 1"),
    _conv_variant("auto_pad SAME_UPPER", auto_pad="SAME_UPPER"),
    _conv_variant("auto_pad SAME_LOWER, stride 2", auto_pad="SAME_LOWER", strides=[2, 2]),
    _conv_variant("auto_pad VALID", auto_pad="VALID"),
    _conv_variant("dilations 2", dilations=[2, 2], pads=[2] * 4),
    _conv_variant("group 3", group=3),
    Case(
        "Conv",
        "depthwise, as the sink",
        lambda b: [
            sink(
                b,
                b.node(
                    "Relu",
                    [
                        t(
                            b,
                            "Conv",
                            [
                                b.node("Relu", [src(b)]),
                                b.init(b.spread((C, 1, 3, 3))),
                                floats(b, b.rng.normal(size=C)),
                            ],
                            group=C,
                            pads=[1] * 4,
                        )
                    ],
                ),
            )
        ],
    ),
    Case(
        "Conv",
        "no bias, an Add of a (1, C, 1, 1) bias (Paddle)",
        lambda b: [
            sink(
                b,
                b.node(
                    "Relu",
                    [
                        b.node(
                            "Add",
                            [
                                t(b, "Conv", ["x", b.init(b.spread((C, 3, 3, 3)))], pads=[1] * 4),
                                floats(b, b.rng.normal(size=(1, C, 1, 1))),
                            ],
                        )
                    ],
                ),
            )
        ],
    ),
    Case("Conv", "its bias-Add constant also a Mul's factor", _shared_bias_add),
    Case("Conv", "its bias also read as data by another node", _shared_bias_side),
    Case("Conv", "its weight a Constant that another node also reads", _constant_weight_read_twice),
    Case(
        "Conv", "its weight an Identity that another node also reads", _identity_weight_read_twice
    ),
    Case(
        "Conv",
        "its weight from DequantizeLinear",
        _dequantized_weight,
        refused="DequantizeLinear from a quantized tensor",
    ),
    _conv_transpose("stride 2", strides=[2, 2]),
    _conv_transpose("group 2, dilations 2", group=2, dilations=[2, 2]),
    _conv_transpose("output_padding 1", k=3, strides=[2, 2], pads=[1] * 4, output_padding=[1, 1]),
    _conv_transpose("output_shape", strides=[2, 2], output_shape=[16, 16], refused="output_shape"),
    _conv_transpose(
        "auto_pad SAME_UPPER", strides=[2, 2], auto_pad="SAME_UPPER", refused="auto_pad=SAME_UPPER"
    ),
    _gemm("transB=1", transB=1),
    _gemm("transB=0"),
    _gemm("alpha 0.5, beta 2", alpha=0.5, beta=2.0, transB=1),
    _gemm("alpha -1.5, beta 0", alpha=-1.5, beta=0.0),
    _gemm("C of shape (1,)", c_shape=(1,)),
    _gemm("C of shape (1, 5)", c_shape=(1, 5)),
    _gemm("no C", c_shape=None),
    _gemm("transA=1", refused="transA=1", trans_a=True),
    _gemm("C of shape (2, 5): a bias per row", refused="not one bias per output", c_shape=(2, 5)),
    Case("Gemm", "its bias also a Mul's factor", _shared_bias_gemm),
    Case(
        "MatMul",
        "then an Add of a bias",
        lambda b: (lambda h: [gemm(b, b.node("Relu", [h]), 5)])(
            b.node(
                "Add",
                [
                    t(
                        b,
                        "MatMul",
                        [
                            b.node("Flatten", [b.node("GlobalAveragePool", [src(b)])]),
                            b.init(b.spread((C, 5), axis=1)),
                        ],
                    ),
                    floats(b, b.rng.normal(size=5)),
                ],
            )
        ),
    ),
    Case(
        "MatMul",
        "on a rank-3 input, channels last after a Transpose",
        lambda b: [
            t(
                b,
                "MatMul",
                [
                    b.node(
                        "Transpose",
                        [b.node("Reshape", [src(b), ints(b, [2, C, 64])])],
                        perm=[0, 2, 1],
                    ),
                    b.init(b.spread((C, 5), axis=1)),
                ],
            )
        ],
    ),
    _bn("inference, folded into the Conv"),
    _bn("opset 7, spatial=1", opset=7, spatial=1),
    _bn("opset 7, spatial=0", refused="spatial=0", opset=7, spatial=0),
    _bn("opset 15, training_mode=1", refused="training_mode=1", opset=15, training_mode=1),
]


def _id(case: Case) -> str:
    return f"{case.op}[{case.variant}]"


def _finish(b: OnnxBuilder, outputs: list[str], opset: int) -> onnx.ModelProto:
    graph = helper.make_graph(
        b.nodes,
        "exactness",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 8, 8])],
        [helper.make_tensor_value_info(o, TensorProto.UNDEFINED, None) for o in outputs],
        b.inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 7 if opset <= 13 else (8 if opset <= 18 else 9)
    inferred = onnx.shape_inference.infer_shapes(model).graph
    typed = {v.name: v for v in list(inferred.value_info) + list(inferred.output)}
    for out in model.graph.output:
        out.CopyFrom(typed[out.name])
    onnx.checker.check_model(model, full_check=True)
    return model


def build(case: Case) -> onnx.ModelProto:
    b = OnnxBuilder(seed=len(case.variant) + 7 * len(case.op), opset=case.opset)
    return _finish(b, case.build(b), case.opset)


def run(model: onnx.ModelProto, x: np.ndarray) -> list[np.ndarray]:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return [np.asarray(y, np.float64) for y in sess.run(None, {"x": x})]


def assert_agree(a: np.ndarray, b: np.ndarray, report) -> None:
    """``b`` matches ``a`` to MIN_DB where ``a`` is finite, and is non-finite where
    ``a`` is (a division by zero gives Inf or NaN in both)."""
    finite = np.isfinite(a)
    assert np.array_equal(finite, np.isfinite(b)), report.summary()
    assert np.array_equal(a[~finite], b[~finite], equal_nan=True), report.summary()
    if finite.any():
        assert sqnr_db(a[finite], b[finite]) >= MIN_DB, report.summary()


def _is_test(name: str) -> bool:
    return name == TEST or name.startswith(f"{TEST}:")


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_op_variant_is_exact_or_refused_with_a_reason(case: Case):
    model = build(case)
    before = model.SerializeToString()
    x = (np.random.default_rng(0).normal(size=(2, 3, 8, 8)) * 2).astype(np.float32)
    expected = run(model, x)
    # The default (noise) objective must not fail on the variant either; the balance
    # objective scales by the weight ranges, which spread over decades here.
    for objective in ("noise", "balance"):
        eq, report = cle_onnx.equalize_model(model, objective=objective)
        assert model.SerializeToString() == before, "the caller's proto must not change"
        onnx.checker.check_model(eq, full_check=True)
        for a, b in zip(expected, run(eq, x), strict=True):
            assert_agree(a, b, report)
    through = [r for r in report.regions if any(map(_is_test, r.sources + r.sinks + r.through))]
    skips = [s for s in report.skipped if s.stage == "translate" and _is_test(s.candidate)]
    if case.refused is not None:
        assert not through, report.summary()
        assert skips, f"no translate skip record for {TEST}\n{report.summary()}"
        reason = skips[0].reason
        assert reason.startswith(f"{case.op} left out: "), reason
        assert case.refused in reason, reason
        return
    assert not skips, skips[0].reason
    if case.folded:
        assert any(f.bn == TEST for f in report.folds), report.summary()
        through = report.regions
    assert through, f"no region through {TEST}\n{report.summary()}"
    spread = max(float(np.max(np.abs(np.log10(r.scales)))) for r in through)
    assert spread > 0.2, f"scales all near 1: equalization did not scale\n{report.summary()}"
