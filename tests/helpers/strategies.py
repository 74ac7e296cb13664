"""Shared hypothesis strategies: random IR graphs for the property tests.

Every graph starts with a stem conv (so the first region is not fed by a graph input)
and is made of random blocks: plain chains with every scalable activation, depthwise
triples, residual blocks, concat blocks, grouped convs, ConvTranspose, pools and an MLP
head behind a Flatten. Weights span several decades per channel, some channels are zero,
BN statistics span decades and gammas may be negative. Everything is float64, so the
executor proves exactness to ~1e-9.
"""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st

from cle_core import Graph, Layout

SPATIAL = 6


class Builder:
    """Adds layers with random parameters drawn from one seeded generator."""

    def __init__(self, rng: np.random.Generator, zero_channels: bool = True):
        self.rng = rng
        self.g = Graph("random")
        self.count = 0
        self.zero_channels = zero_channels

    def name(self, kind: str) -> str:
        self.count += 1
        return f"{kind}{self.count}"

    def decades(self, n: int, spread: float = 2.0) -> np.ndarray:
        return 10.0 ** self.rng.uniform(-spread, spread, n)

    def weight(self, shape, out_axis: int, layout: Layout) -> np.ndarray:
        w = self.rng.normal(size=shape)
        per_out = layout.out_channels(shape)
        scale = self.decades(per_out)
        g = layout.groups
        view = w.reshape(g, shape[0] // g, shape[1], -1)
        if out_axis == 0:
            view *= scale.reshape(g, -1)[:, :, None, None]
        else:
            view *= scale.reshape(g, -1)[:, None, :, None]
        if self.zero_channels and per_out > 2 and self.rng.random() < 0.3:
            dead = int(self.rng.integers(per_out))
            gi, oi = divmod(dead, per_out // g)
            if out_axis == 0:
                view[gi, oi] = 0.0
            else:
                view[gi, :, oi] = 0.0
        return view.reshape(shape)

    def conv(
        self,
        x: str,
        cin: int,
        cout: int,
        k: int = 1,
        groups: int = 1,
        pad: int = 0,
        bias: bool = True,
    ) -> str:
        name = self.name("conv")
        layout = Layout(0, 1, groups)
        w = self.weight((cout, cin // groups, k, k), 0, layout)
        b = self.rng.normal(size=cout) if bias else None
        self.g.add_node(
            "conv",
            [x],
            name=name,
            outputs=[name],
            params={"weight": w, "bias": b},
            attrs={"layout": layout, "pads": (pad,) * 4},
        )
        return name

    def conv_transpose(self, x: str, cin: int, cout: int, groups: int = 1) -> str:
        name = self.name("convT")
        layout = Layout(1, 0, groups)
        w = self.weight((cin, cout // groups, 2, 2), 1, layout)
        self.g.add_node(
            "conv_transpose",
            [x],
            name=name,
            outputs=[name],
            params={"weight": w, "bias": self.rng.normal(size=cout)},
            attrs={"layout": layout, "stride": (2, 2), "pads": (1, 1, 1, 1)},
        )
        return name

    def linear(self, x: str, fin: int, fout: int) -> str:
        name = self.name("fc")
        transposed = bool(self.rng.integers(2))
        layout = Layout(1, 0) if transposed else Layout(0, 1)
        shape = (fin, fout) if transposed else (fout, fin)
        w = self.weight(shape, layout.out_axis, layout)
        self.g.add_node(
            "linear",
            [x],
            name=name,
            outputs=[name],
            params={"weight": w, "bias": self.rng.normal(size=fout)},
            attrs={"layout": layout},
        )
        return name

    def bn(self, x: str, c: int, affine: bool = True) -> str:
        name = self.name("bn")
        rng = self.rng
        gamma = rng.choice([-1.0, 1.0], c) * self.decades(c) if affine else None
        beta = rng.normal(size=c) * self.decades(c, 1.0) if affine else None
        self.g.add_node(
            "batchnorm",
            [x],
            name=name,
            outputs=[name],
            params={
                "mean": rng.normal(size=c) * self.decades(c, 1.0),
                "var": self.decades(c, 2.0),
                "gamma": gamma,
                "beta": beta,
            },
            attrs={"eps": 1e-5},
        )
        return name

    def act(self, x: str, kind: str, c: int) -> str:
        if kind == "none":
            return x
        name = self.name(kind)
        g = self.g
        if kind == "relu":
            g.add_node("relu", [x], name=name, outputs=[name])
        elif kind == "relu6":
            g.add_node(
                "clip",
                [x],
                name=name,
                outputs=[name],
                params={"lo": np.array(0.0), "hi": np.array(6.0)},
            )
        elif kind == "hardtanh":
            g.add_node(
                "clip",
                [x],
                name=name,
                outputs=[name],
                params={"lo": np.array(-1.0), "hi": np.array(1.0)},
            )
        elif kind == "leaky_relu":
            g.add_node("leaky_relu", [x], name=name, outputs=[name], attrs={"alpha": 0.1})
        elif kind == "prelu":
            g.add_node(
                "prelu",
                [x],
                name=name,
                outputs=[name],
                params={"slope": self.rng.uniform(0.0, 0.5, c)},
            )
        elif kind == "silu":
            g.add_node("opaque", [x], name=name, outputs=[name], attrs={"kind": "silu"})
        else:
            raise ValueError(kind)
        return name

    def op(self, op: str, inputs: list[str], **attrs) -> str:
        name = self.name(op)
        self.g.add_node(op, inputs, name=name, outputs=[name], attrs=attrs)
        return name


ACTS = ("relu", "relu6", "hardtanh", "leaky_relu", "prelu", "none", "silu")
BLOCKS = ("chain", "triple", "residual", "residual_conv", "concat", "grouped", "pool", "transpose")


def build_graph(
    seed: int, blocks: list[tuple[str, str]], width: int, head: bool, zero_channels: bool = True
) -> Graph:
    """Assemble a graph from ``(block kind, activation)`` pairs."""
    rng = np.random.default_rng(seed)
    b = Builder(rng, zero_channels)
    b.g.add_input("x", 3)
    h = b.act(b.bn(b.conv("x", 3, width, 3, pad=1), width), "relu", width)
    c = width
    for kind, act in blocks:
        if kind == "chain":
            k = int(rng.choice([1, 3]))
            h = b.act(b.bn(b.conv(h, c, c, k, pad=k // 2, bias=False), c), act, c)
        elif kind == "triple":
            e = 2 * c
            t = b.act(b.bn(b.conv(h, c, e), e), act, e)
            t = b.act(b.bn(b.conv(t, e, e, 3, groups=e, pad=1), e), act, e)
            h = b.bn(b.conv(t, e, c), c)
        elif kind == "residual":
            e = 2 * c
            t = b.act(b.bn(b.conv(h, c, e), e), act, e)
            t = b.act(b.bn(b.conv(t, e, e, 3, groups=e, pad=1), e), act, e)
            t = b.bn(b.conv(t, e, c), c)
            h = b.op("add", [h, t])
        elif kind == "residual_conv":
            t = b.act(b.conv(h, c, c), act, c)
            h = b.op("add", [t, b.conv(t, c, c)])
        elif kind == "concat":
            left = b.act(b.bn(b.conv(h, c, c), c), act, c)
            right = b.act(b.conv(h, c, c // 2 + 1, 3, pad=1), act, c // 2 + 1)
            h = b.op("concat", [left, right])
            h = b.act(b.bn(b.conv(h, c + c // 2 + 1, c), c), act, c)
        elif kind == "grouped":
            h = b.act(b.bn(b.conv(h, c, 2 * c, 3, groups=c, pad=1), 2 * c), act, 2 * c)
            h = b.act(b.conv(h, 2 * c, c, 1, groups=2 if c % 2 == 0 else 1), act, c)
        elif kind == "pool":
            which = rng.choice(["maxpool", "avgpool", "pad"])
            if which == "pad":
                h = b.op("pad", [h], pads=(1, 0, 0, 1))
            else:
                h = b.op(
                    str(which),
                    [h],
                    kernel=(2, 2),
                    stride=(1, 1),
                    pads=(1, 1, 0, 0),
                    count_include_pad=bool(rng.integers(2)),
                )
            h = b.act(b.conv(h, c, c), act, c)
        elif kind == "transpose":
            h = b.act(b.bn(b.conv_transpose(h, c, c, groups=int(rng.choice([1, c]))), c), act, c)
            h = b.act(b.conv(h, c, c, 3, pad=1), act, c)
    if head:
        h = b.op("global_avgpool", [h])
        h = b.op("flatten", [h])
        h = b.act(b.bn(b.linear(h, c, 2 * c), 2 * c), "relu", 2 * c)
        h = b.linear(h, 2 * c, 3)
    else:
        h = b.conv(h, c, 2)
    b.g.set_outputs([h])
    b.g.validate()
    return b.g


@st.composite
def graphs(draw, max_blocks: int = 3, zero_channels: bool = True, acts=ACTS, kinds=BLOCKS):
    """A random graph; its draw is its seed and block list, so failures shrink."""
    seed = draw(st.integers(0, 2**32 - 1))
    n = draw(st.integers(1, max_blocks))
    blocks = draw(
        st.lists(st.tuples(st.sampled_from(kinds), st.sampled_from(acts)), min_size=n, max_size=n)
    )
    width = draw(st.sampled_from([2, 3, 4]))
    head = draw(st.booleans())
    return build_graph(seed, blocks, width, head, zero_channels)


def feed(graph: Graph, seed: int = 0, batch: int = 2) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"x": rng.normal(size=(batch, 3, SPATIAL, SPATIAL)) * 3.0}


# --- random ONNX model specs (built by onnx_models.from_spec) ------------------------------

_CONV = {
    "k": st.sampled_from([1, 3]),
    "out": st.integers(2, 6),
    "depthwise": st.booleans(),
    "bias": st.booleans(),
    "bn": st.booleans(),
    "act": st.sampled_from(["relu", "relu6", "hardtanh", "leaky", "none"]),
    "weight": st.sampled_from(["init", "init", "identity", "shared"]),
}

ONNX_BLOCKS = st.one_of(
    st.fixed_dictionaries({"kind": st.just("conv"), **_CONV}),
    st.fixed_dictionaries({"kind": st.just("residual"), **_CONV}),
    st.fixed_dictionaries(
        {"kind": st.just("concat"), "outs": st.tuples(st.integers(1, 4), st.integers(1, 4))}
    ),
    st.fixed_dictionaries({"kind": st.sampled_from(["maxpool", "avgpool"])}),
)


@st.composite
def onnx_specs(draw):
    """What :func:`onnx_models.from_spec` builds: opset 7 to 21 (IR 3 for some old ones),
    float32 or float16, a stem conv and 1 to 5 random blocks (conv with optional BN and
    every carried activation, residual, concat, pools; weights as initializers, through
    Identity, or shared), an optional Gemm head, optionally a subgraph (If / Loop) that
    reads an activation or a weight from outside, optionally a weight that is also a
    graph input."""
    opset = draw(st.integers(7, 21))
    return {
        "opset": opset,
        "ir3": opset < 9 and draw(st.booleans()),
        "dtype": draw(st.sampled_from(["float32", "float16"])),
        "blocks": draw(st.lists(ONNX_BLOCKS, min_size=1, max_size=5)),
        "head": draw(st.sampled_from(["none", "gemm", "gemm2"])),
        "subgraph": draw(st.sampled_from([None, None, "if_activation", "if_weight", "loop"])),
        "reads": draw(st.integers(0, 100)),  # which value the subgraph reads
        "overridable": draw(st.sampled_from([False, False, False, True])),
        "seed": draw(st.integers(0, 2**16)),
    }


# --- idioms spliced into the random ONNX models (tests/onnx/test_fuzz_onnx.py) -------------

_RESIZE_IDIOM = st.fixed_dictionaries(
    {
        "kind": st.just("resize"),
        "at": st.integers(0, 100),  # which activation it resizes
        # to 16x16 and back to 8x8 (an average pool, or from opset 18 a Resize by 0.5 with
        # antialias); "up": by scales, sizes or opset 18's axes; "crop": tf_crop_and_resize
        # of a box inside the input or reaching outside it. The values that can break
        # exactness come first: hypothesis draws the first value of a list more often.
        "how": st.sampled_from(["crop", "up"]),
        "mode": st.sampled_from(["nearest", "linear", "cubic"]),
        "coordinates": st.sampled_from(
            [
                "half_pixel",
                "pytorch_half_pixel",
                "align_corners",
                "asymmetric",
                "half_pixel_symmetric",
                "tf_half_pixel_for_nn",
            ]
        ),
        "nearest_mode": st.sampled_from(
            ["round_prefer_floor", "round_prefer_ceil", "floor", "ceil"]
        ),
        "given": st.sampled_from(["scales", "sizes", "axes"]),
        "extrapolation": st.sampled_from([5.0, 0.0, -1.5]),
        "outside": st.sampled_from([True, False]),  # the crop box reaches outside the input
        "antialias": st.booleans(),
    }
)

_BIAS_IDIOM = st.fixed_dictionaries(
    {
        "kind": st.just("bias"),
        "at": st.integers(0, 100),  # which Conv (or the head's Gemm)
        # "factor": the bias becomes an Add's (1, C, 1, 1) constant that a Mul after it
        # also multiplies by; "data": a side output reads the bias; "gemm": the head
        # Gemm's C is also a Mul's factor
        "how": st.sampled_from(["factor", "data", "gemm"]),
    }
)

_WEIGHT_IDIOM = st.fixed_dictionaries(
    {
        "kind": st.just("weight"),
        "at": st.integers(0, 100),  # which Conv
        "how": st.sampled_from(["constant", "identity"]),  # the weight, read twice
    }
)


@st.composite
def onnx_idiom_specs(draw):
    """:func:`onnx_specs` in float32 plus 1 or 2 idioms that
    ``test_fuzz_onnx.with_idioms`` splices into the model: a Resize (modes, coordinate
    transformations, extrapolation values), a bias initializer that another node also
    reads, a Constant or Identity weight that another node also reads."""
    spec = draw(onnx_specs())
    idioms = st.one_of(_RESIZE_IDIOM, _BIAS_IDIOM, _WEIGHT_IDIOM)
    return {**spec, "dtype": "float32", "idioms": draw(st.lists(idioms, min_size=1, max_size=2))}


def channel_index(shape, axes, outer=None) -> np.ndarray:
    """Per element of a tensor of ``shape``: the index of its channel when the channels
    lie on ``axes`` (row-major over them, in that order): a brute force to check layout
    tracking against. ``outer``: per channel axis, the size of a non-channel part merged
    above the channels (position ``p`` of the axis holds channel digit ``p % (size /
    outer)``)."""
    outer = outer or (1,) * len(axes)
    grids = np.indices(shape)
    index = np.zeros(shape, np.int64)
    for a, o in zip(axes, outer, strict=True):
        inner = shape[a] // o
        index = index * inner + grids[a] % inner
    return index
