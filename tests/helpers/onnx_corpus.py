"""A corpus of small ONNX models in the shapes real exporters write.

Each builder returns a :class:`CorpusModel`: a valid model (it passes the full checker and
runs in onnxruntime) with random, channel-spread float32 weights from a seeded NumPy
generator, fully static shapes, and ``expect``: the counts a complete ONNX backend
*should* reach after equalization (``regions``: regions equalized, ``folds``: batch norms
folded). They are targets, not today's behaviour.

:func:`torch_exports` adds the architectures of ``tests/torch_models.py`` exported by the
TorchScript and the dynamo exporter; their ``expect`` is ``{"regions_min": k}``, ``k`` the
regions the PyTorch backend finds on the same module.

``python tests/onnx_corpus.py`` prints what the ONNX backend does with every model now.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import math
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .onnx_models import OnnxBuilder


@dataclass(frozen=True)
class CorpusModel:
    name: str
    model: onnx.ModelProto | None  # None when it could not be made (see ``skip``)
    expect: dict[str, int]
    pattern: str
    skip: str | None = None  # why the model is missing (a failed export)


class _Builder(OnnxBuilder):
    """Nodes and initializers of one graph (any dtype); names are unique within it."""

    def name(self, base: str) -> str:
        self.count += 1
        return f"{base}_{self.count}"

    def init(self, arr, base: str = "w", dtype=np.float32) -> str:
        name = self.name(base)
        self.inits.append(numpy_helper.from_array(np.asarray(arr, dtype), name))
        return name

    def ints(self, values, base: str = "shape") -> str:
        return self.init(values, base, np.int64)

    def constant(self, arr, dtype=np.float32) -> str:
        """A ``Constant`` node holding ``arr`` (the value attribute)."""
        tensor = numpy_helper.from_array(np.asarray(arr, dtype), self.name("const"))
        return self.node("Constant", [], value=tensor)

    def normal(self, *shape) -> np.ndarray:
        return self.rng.normal(size=shape)

    def untyped_model(self, shape, outputs=None, name: str = "graph") -> onnx.ModelProto:
        """The graph as a model with input ``x`` of ``shape`` and outputs (default: the
        last node's first) left untyped: no strict shape inference, which some function
        bodies (GroupNormalization's) do not pass."""
        outputs = outputs or [self.nodes[-1].output[0]]
        graph = helper.make_graph(
            self.nodes,
            name,
            [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, list(shape))],
            [helper.make_tensor_value_info(o, onnx.TensorProto.FLOAT, None) for o in outputs],
            self.inits,
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", self.opset)])
        model.ir_version = 10
        return model

    def node(self, op: str, inputs, n_out: int = 1, **attrs) -> str | list[str]:
        outs = [self.name(op.lower()) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op, list(inputs), outs, name=self.name(op), **attrs))
        return outs[0] if n_out == 1 else outs

    def conv(self, x, cin, cout, k=1, pad=None, stride=1, group=1, bias=True, **attrs) -> str:
        w = self.init(self.spread((cout, cin // group, k, k)), "weight")
        inputs = [x, w] + ([self.init(self.normal(cout), "bias")] if bias else [])
        attrs = {"kernel_shape": [k, k], "strides": [stride, stride], "group": group, **attrs}
        if "auto_pad" not in attrs:
            attrs["pads"] = [k // 2 if pad is None else pad] * 4
        return self.node("Conv", inputs, **attrs)

    def bn(self, x, c) -> str:
        ins = [
            self.init(self.normal(c) * 10.0 ** self.rng.uniform(-1, 1, c), "gamma"),
            self.init(self.normal(c) + 1.0, "beta"),
            self.init(self.normal(c), "mean"),
            self.init(self.rng.uniform(0.2, 2.0, c), "var"),
        ]
        return self.node("BatchNormalization", [x] + ins, epsilon=1e-5)

    def relu(self, x) -> str:
        return self.node("Relu", [x])

    def model(
        self,
        inputs: dict[str, tuple],
        outputs: list[str] | None = None,
        *,
        ir_version: int | None = None,
        producer: str = "onnx-corpus",
        elem_type: int = TensorProto.FLOAT,
    ) -> onnx.ModelProto:
        """The model, its outputs typed by shape inference, checked with full_check."""
        outputs = outputs or [self.nodes[-1].output[0]]
        graph = helper.make_graph(
            self.nodes,
            "corpus",
            [helper.make_tensor_value_info(n, elem_type, list(s)) for n, s in inputs.items()],
            [helper.make_tensor_value_info(o, elem_type, None) for o in outputs],
            self.inits,
        )
        m = helper.make_model(
            graph,
            opset_imports=[helper.make_opsetid("", self.opset)],
            producer_name=producer,
        )
        m.ir_version = ir_version or _IR_OF_OPSET[self.opset]
        if m.ir_version < 4:  # IR 3: every initializer is also a graph input
            for t in m.graph.initializer:
                m.graph.input.append(helper.make_tensor_value_info(t.name, t.data_type, t.dims))
        g = onnx.shape_inference.infer_shapes(m, strict_mode=True).graph
        inferred = {v.name: v for v in list(g.value_info) + list(g.output)}
        for out in m.graph.output:
            out.CopyFrom(inferred[out.name])
        onnx.checker.check_model(m, full_check=True)
        return m


_IR_OF_OPSET = {7: 3, 9: 4, 11: 6, 13: 7, 18: 8}


def _corpus(name: str, model: onnx.ModelProto, pattern: str, regions: int, folds: int = 0):
    return CorpusModel(name, model, {"regions": regions, "folds": folds}, pattern)


# --- exporter patterns --------------------------------------------------------------------


def paddle_constant_weights() -> CorpusModel:
    b = _Builder(101, opset=11)

    def conv(x, cin, cout, k):
        w = b.constant(b.spread((cout, cin, k, k)))
        bias = b.constant(b.normal(cout))
        return b.node("Conv", [x, w, bias], kernel_shape=[k, k], pads=[k // 2] * 4)

    h = b.relu(conv("x", 4, 8, 3))
    h = b.relu(conv(h, 8, 12, 1))
    conv(h, 12, 4, 3)
    m = b.model({"x": (1, 4, 12, 12)}, producer="PaddlePaddle")
    pattern = "Conv-Relu-Conv-Relu-Conv, weights and biases from Constant nodes (Paddle)"
    return _corpus("paddle_constant_weights", m, pattern, regions=2)


def paddle_bias_add() -> CorpusModel:
    b = _Builder(102, opset=11)
    h = b.conv("x", 4, 8, 3, bias=False)
    h = b.node("Add", [h, b.init(b.normal(1, 8, 1, 1), "bias")])
    h = b.conv(b.relu(h), 8, 6, 1, bias=False)
    b.node("Add", [h, b.init(b.normal(1, 6, 1, 1), "bias")])
    m = b.model({"x": (1, 4, 10, 10)}, producer="PaddlePaddle")
    pattern = "Conv(no bias) -> Add((1,C,1,1) bias) -> Relu -> Conv -> Add(bias)"
    return _corpus("paddle_bias_add", m, pattern, regions=1)


def torchscript_identity_bias() -> CorpusModel:
    b = _Builder(103)
    shared = b.init(b.normal(8), "bias")  # two equal biases, deduplicated by the exporter
    w1, w2 = b.init(b.spread((8, 4, 3, 3))), b.init(b.spread((8, 8, 1, 1)))
    h = b.node("Conv", ["x", w1, b.node("Identity", [shared])], kernel_shape=[3, 3], pads=[1] * 4)
    b.node("Conv", [b.relu(h), w2, b.node("Identity", [shared])], kernel_shape=[1, 1])
    m = b.model({"x": (2, 4, 8, 8)}, producer="pytorch")
    pattern = "Conv-Relu-Conv, both biases Identity outputs of one initializer (TorchScript)"
    return _corpus("torchscript_identity_bias", m, pattern, regions=1)


def reshape_constant_weight() -> CorpusModel:
    b = _Builder(104)
    w1 = b.init(b.spread((8, 4, 3, 3)).reshape(-1), "flat")
    w1 = b.node("Reshape", [w1, b.constant([8, 4, 3, 3], np.int64)])
    h = b.relu(b.node("Conv", ["x", w1, b.init(b.normal(8))], kernel_shape=[3, 3], pads=[1] * 4))
    w2 = b.init(b.spread((6, 8, 1, 1)).reshape(-1), "flat")
    w2 = b.node("Reshape", [w2, b.ints([6, 8, 1, 1])])
    b.node("Conv", [h, w2, b.init(b.normal(6))], kernel_shape=[1, 1])
    m = b.model({"x": (1, 4, 10, 10)})
    pattern = "Conv-Relu-Conv, weights Reshape(flat initializer, constant shape)"
    return _corpus("reshape_constant_weight", m, pattern, regions=1)


def constant_of_shape_weight() -> CorpusModel:
    b = _Builder(105)
    value = numpy_helper.from_array(np.array([0.1], np.float32))
    bias = b.node("ConstantOfShape", [b.constant([8], np.int64)], value=value)
    w = b.init(b.spread((8, 4, 3, 3)))
    h = b.relu(b.node("Conv", ["x", w, bias], kernel_shape=[3, 3], pads=[1] * 4))
    b.conv(h, 8, 4, 1)
    m = b.model({"x": (2, 4, 8, 8)})
    pattern = "Conv-Relu-Conv, first bias ConstantOfShape(constant shape, value 0.1)"
    return _corpus("constant_of_shape_weight", m, pattern, regions=1)


def _se_block(name: str, seed: int, opset: int, squeeze: str) -> CorpusModel:
    b = _Builder(seed, opset)
    x = b.relu(b.conv("x", 4, 16, 3))
    if squeeze == "gap":
        s = b.node("GlobalAveragePool", [x])
    elif opset >= 18:
        s = b.node("ReduceMean", [x, b.ints([2, 3], "axes")], keepdims=1)
    else:
        s = b.node("ReduceMean", [x], axes=[2, 3], keepdims=1)
    gate = b.node("Sigmoid", [b.conv(b.relu(b.conv(s, 16, 4, 1)), 4, 16, 1)])
    b.conv(b.node("Mul", [x, gate]), 16, 8, 1)
    m = b.model({"x": (2, 4, 10, 10)})
    how = "GlobalAveragePool" if squeeze == "gap" else f"ReduceMean opset {opset}"
    pattern = (
        f"squeeze-excitation ({how}): Conv-Relu=x, Mul(x, Sigmoid(Conv(Relu(Conv(pool x)))))"
        " -> Conv; regions: x's Conv -> {gate Conv, Conv after Mul}, gate Conv-Relu-Conv"
    )
    # 2: the main region (source: the Conv making x; sinks: the gate's first Conv and the
    # Conv after the Mul) and the Conv-Relu-Conv inside the gate.
    return _corpus(name, m, pattern, regions=2)


def se_block_opset13() -> CorpusModel:
    return _se_block("se_block_opset13", 106, 13, "reducemean")


def se_block_opset18() -> CorpusModel:
    return _se_block("se_block_opset18", 107, 18, "reducemean")


def se_block_gap() -> CorpusModel:
    return _se_block("se_block_gap", 108, 13, "gap")


def reducemean_head() -> CorpusModel:
    b = _Builder(109)
    h = b.node("ReduceMean", [b.relu(b.conv("x", 4, 12, 3))], axes=[2, 3], keepdims=0)
    b.node("Gemm", [h, b.init(b.spread((10, 12))), b.init(b.normal(10))], transB=1)
    m = b.model({"x": (2, 4, 8, 8)})
    pattern = "Conv -> Relu -> ReduceMean(axes [2,3], keepdims 0) -> Gemm"
    return _corpus("reducemean_head", m, pattern, regions=1)


def maxpool_ceil() -> CorpusModel:
    b = _Builder(110)
    h = b.relu(b.conv("x", 4, 8, 3))
    h = b.node("MaxPool", [h], kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1)
    b.conv(h, 8, 6, 3)
    m = b.model({"x": (1, 4, 11, 11)})
    return _corpus("maxpool_ceil", m, "Conv -> Relu -> MaxPool(ceil_mode=1) -> Conv", regions=1)


def _resize_decoder(name: str, seed: int, mode: str) -> CorpusModel:
    b = _Builder(seed)
    h = b.relu(b.conv("x", 4, 8, 3))
    attrs = {"mode": mode}
    if mode == "linear":
        attrs["coordinate_transformation_mode"] = "half_pixel"
    h = b.node("Resize", [h, "", b.init([1.0, 1.0, 2.0, 2.0], "scales")], **attrs)
    b.conv(h, 8, 4, 3)
    m = b.model({"x": (2, 4, 8, 8)})
    pattern = f"Conv -> Relu -> Resize({mode}, scales 2) -> Conv (U-Net decoder)"
    return _corpus(name, m, pattern, regions=1)


def resize_nearest() -> CorpusModel:
    return _resize_decoder("resize_nearest", 111, "nearest")


def resize_linear() -> CorpusModel:
    return _resize_decoder("resize_linear", 112, "linear")


def channel_split() -> CorpusModel:
    b = _Builder(113)
    h = b.relu(b.conv("x", 4, 16, 3))
    left, right = b.node("Split", [h, b.ints([8, 8], "split")], n_out=2, axis=1)
    outs = [b.conv(left, 8, 4, 1), b.conv(right, 8, 6, 3)]
    m = b.model({"x": (2, 4, 8, 8)}, outs)
    pattern = "Conv(16) -> Relu -> Split(axis 1, halves) -> a Conv on each half"
    return _corpus("channel_split", m, pattern, regions=1)


def channel_slice() -> CorpusModel:
    b = _Builder(114)
    h = b.relu(b.conv("x", 4, 16, 3))
    axes = b.ints([1], "axes")
    left = b.node("Slice", [h, b.ints([0], "starts"), b.ints([8], "ends"), axes])
    right = b.node("Slice", [h, b.ints([8], "starts"), b.ints([2**63 - 1], "ends"), axes])
    outs = [b.conv(left, 8, 4, 1), b.conv(right, 8, 6, 3)]
    m = b.model({"x": (2, 4, 8, 8)}, outs)
    pattern = "Conv(16) -> Relu -> Slice(axis 1) [:8] and [8:] -> a Conv on each"
    return _corpus("channel_slice", m, pattern, regions=1)


def auto_pad_same() -> CorpusModel:
    b = _Builder(115)
    h = b.relu(b.conv("x", 4, 8, 3, stride=2, auto_pad="SAME_UPPER"))
    b.conv(h, 8, 6, 3, auto_pad="SAME_UPPER")
    m = b.model({"x": (1, 4, 11, 11)}, producer="tf2onnx")
    pattern = "Conv(stride 2) -> Relu -> Conv, both auto_pad=SAME_UPPER (tf2onnx)"
    return _corpus("auto_pad_same", m, pattern, regions=1)


def sum_residual() -> CorpusModel:
    b = _Builder(116)
    h = b.relu(b.conv("x", 4, 8, 3))
    left = b.conv(b.relu(b.conv(h, 8, 6, 1)), 6, 8, 1)
    right = b.conv(b.relu(b.conv(h, 8, 4, 3)), 4, 8, 3)
    out = b.relu(b.node("Sum", [h, left, right]))
    b.conv(out, 8, 4, 1)
    m = b.model({"x": (2, 4, 8, 8)})
    # 3: the residual region (sources: the stem Conv and each branch's last Conv; sinks:
    # each branch's first Conv and the head Conv) and one Conv-Relu-Conv per branch.
    pattern = (
        "Relu(Conv) = h; Relu(Sum(h, branch1(h), branch2(h))) -> Conv; branches Conv-Relu-Conv"
    )
    return _corpus("sum_residual", m, pattern, regions=3)


def pad_axes() -> CorpusModel:
    b = _Builder(117, opset=18)
    h = b.relu(b.conv("x", 4, 8, 3))
    h = b.node("Pad", [h, b.ints([1, 1, 1, 1], "pads"), "", b.ints([2, 3], "axes")])
    b.conv(h, 8, 4, 3, pad=0)
    m = b.model({"x": (2, 4, 8, 8)})
    pattern = "Conv -> Relu -> Pad(opset 18, axes [2, 3], zeros) -> Conv"
    return _corpus("pad_axes", m, pattern, regions=1)


def matmul_rank3() -> CorpusModel:
    b = _Builder(118)
    h = b.node("MatMul", ["x", b.init(b.spread((12, 16), axis=1))])
    h = b.relu(b.node("Add", [h, b.init(b.normal(16), "bias")]))
    h = b.node("MatMul", [h, b.init(b.spread((16, 8), axis=1))])
    b.node("Add", [h, b.init(b.normal(8), "bias")])
    m = b.model({"x": (2, 10, 12)})
    pattern = "(N, T, F) -> MatMul -> Add(bias) -> Relu -> MatMul -> Add (transformer MLP)"
    return _corpus("matmul_rank3", m, pattern, regions=1)


def mul_scalar_carry() -> CorpusModel:
    b = _Builder(119)
    h = b.relu(b.conv("x", 4, 8, 3))
    h = b.node("Mul", [h, b.init(np.array(0.5), "half")])
    b.conv(h, 8, 4, 1)
    m = b.model({"x": (2, 4, 8, 8)})
    return _corpus("mul_scalar_carry", m, "Conv -> Relu -> Mul(scalar 0.5) -> Conv", regions=1)


def div_channel_carry() -> CorpusModel:
    b = _Builder(120)
    h = b.relu(b.conv("x", 4, 8, 3))
    h = b.node("Div", [h, b.init(b.rng.uniform(0.5, 2.0, (1, 8, 1, 1)), "divisor")])
    b.conv(h, 8, 4, 1)
    m = b.model({"x": (2, 4, 8, 8)})
    pattern = "Conv -> Relu -> Div(positive (1,C,1,1) constant) -> Conv"
    return _corpus("div_channel_carry", m, pattern, regions=1)


def unfoldable_bn() -> CorpusModel:
    b = _Builder(121)
    left = b.relu(b.conv("x", 4, 6, 1))
    right = b.relu(b.conv("x", 4, 10, 3))
    h = b.relu(b.bn(b.node("Concat", [left, right], axis=1), 16))
    b.conv(h, 16, 4, 1)
    m = b.model({"x": (2, 4, 8, 8)})
    pattern = "Concat(Relu(Conv), Relu(Conv)) -> BN -> Relu -> Conv; BN carried as an affine"
    return _corpus("unfoldable_bn", m, pattern, regions=1, folds=0)


def if_branch_lstm() -> CorpusModel:
    b = _Builder(122)
    seq_len, batch, feat, hidden = 5, 2, 6, 4
    h = b.relu(b.conv("x", 4, 8, 3))
    y = b.conv(h, 8, 4, 1)
    w = b.init(b.normal(1, 4 * hidden, feat) * 0.5, "lstm_w")
    r = b.init(b.normal(1, 4 * hidden, hidden) * 0.5, "lstm_r")
    bias = b.init(b.normal(1, 8 * hidden) * 0.1, "lstm_b")
    c0 = b.constant(np.zeros((1, batch, hidden)))  # an outer Constant read in a branch
    state = [1, batch, hidden]

    def branch(tag: str, use_outer_bias: bool) -> onnx.GraphProto:
        h0 = numpy_helper.from_array(b.normal(1, batch, hidden).astype(np.float32), f"{tag}_h0")
        nodes = [helper.make_node("Constant", [], [f"{tag}_h0"], value=h0)]
        if use_outer_bias:
            lstm_b = bias
        else:
            inner = numpy_helper.from_array(np.zeros((1, 8 * hidden), np.float32), f"{tag}_b")
            nodes.append(helper.make_node("Constant", [], [f"{tag}_b"], value=inner))
            lstm_b = f"{tag}_b"
        nodes.append(
            helper.make_node(
                "LSTM",
                ["seq", w, r, lstm_b, "", f"{tag}_h0", c0],
                [f"{tag}_y", f"{tag}_yh"],
                hidden_size=hidden,
            )
        )
        out = helper.make_tensor_value_info(f"{tag}_yh", TensorProto.FLOAT, state)
        return helper.make_graph(nodes, tag, [], [out])

    b.inits.append(numpy_helper.from_array(np.array(True), "use_then"))
    yh = b.node(
        "If", ["use_then"], then_branch=branch("then", True), else_branch=branch("else", False)
    )
    m = b.model({"x": (2, 4, 8, 8), "seq": (seq_len, batch, feat)}, [y, yh])
    pattern = "Conv-Relu-Conv beside an If whose branches run an LSTM on outer initializers"
    return _corpus("if_branch_lstm", m, pattern, regions=1)


def ir3_opset7() -> CorpusModel:
    b = _Builder(123, opset=7)
    h = b.relu(b.bn(b.conv("x", 4, 8, 3, bias=False), 8))
    b.conv(h, 8, 4, 1)
    m = b.model({"x": (2, 4, 8, 8)}, ir_version=3)
    pattern = "Conv-BN-Relu-Conv, IR 3 / opset 7, initializers listed as graph inputs"
    return _corpus("ir3_opset7", m, pattern, regions=1, folds=1)


def fp16() -> CorpusModel:
    b = _Builder(124)
    h = b.bn(b.conv("x", 4, 8, 3), 8)
    h = b.node("Clip", [h, b.init(np.array(0.0), "lo"), b.init(np.array(6.0), "hi")])
    b.conv(h, 8, 4, 1)
    f16 = np.float16
    for i, t in enumerate(b.inits):
        b.inits[i] = numpy_helper.from_array(numpy_helper.to_array(t).astype(f16), t.name)
    m = b.model({"x": (2, 4, 8, 8)}, elem_type=TensorProto.FLOAT16)
    return _corpus("fp16", m, "float16 Conv-BN-Clip(0, 6)-Conv", regions=1, folds=1)


ALL: list[Callable[[], CorpusModel]] = [
    paddle_constant_weights,
    paddle_bias_add,
    torchscript_identity_bias,
    reshape_constant_weight,
    constant_of_shape_weight,
    se_block_opset13,
    se_block_opset18,
    se_block_gap,
    reducemean_head,
    maxpool_ceil,
    resize_nearest,
    resize_linear,
    channel_split,
    channel_slice,
    auto_pad_same,
    sum_residual,
    pad_axes,
    matmul_rank3,
    mul_scalar_carry,
    div_channel_carry,
    unfoldable_bn,
    if_branch_lstm,
    ir3_opset7,
    fp16,
]

NAMES: list[str] = [f.__name__ for f in ALL]


def build_all() -> list[CorpusModel]:
    return [f() for f in ALL]


# --- exports of tests/torch_models.py -----------------------------------------------------

TORCH_ARCHITECTURES = (
    "mobilenet_v2",
    "resnet",
    "vgg",
    "unet",
    "decoder",
    "grouped",
    "concat",
    "functional",
)
EXPORTERS = ("torchscript", "dynamo")
TORCH_NAMES: list[str] = [f"torch_{a}_{e}" for a in TORCH_ARCHITECTURES for e in EXPORTERS]


@contextlib.contextmanager
def quiet(more_loggers: tuple[str, ...] = (), stderr: bool = True):
    """Silence the exporters' warnings, logs and prints (the dynamo exporter reports its
    fallback from opset 13 to 18 with a traceback on a logger), and ``more_loggers``;
    ``stderr=False`` leaves standard error alone."""
    names = ("torch.onnx", "onnxscript", "torch", *more_loggers)
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    sink = io.StringIO()
    errors = contextlib.redirect_stderr(sink) if stderr else contextlib.nullcontext()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(sink):
            warnings.simplefilter("ignore")
            with errors:
                yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def torch_exports(tmp_path) -> Iterator[CorpusModel]:
    """Every architecture of TORCH_ARCHITECTURES (seed 0, eval mode) exported by each
    exporter. A failed export yields a CorpusModel with ``model=None`` and ``skip`` set."""
    import torch

    import cle_torch

    from . import torch_models

    tmp_path = Path(tmp_path)
    for arch in TORCH_ARCHITECTURES:
        module, shape = getattr(torch_models, arch)(0)
        module.eval()
        with quiet():
            _, report = cle_torch.equalize_model(copy.deepcopy(module), input_shapes=shape)
        expect = {"regions_min": len(report.regions)}
        x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
        for exporter in EXPORTERS:
            name = f"torch_{arch}_{exporter}"
            path = tmp_path / f"{name}.onnx"
            pattern = f"tests/torch_models.py {arch}, {exporter} exporter, opset 13 asked"
            try:
                with quiet(), torch.no_grad():
                    torch.onnx.export(
                        module,
                        (x,),
                        str(path),
                        dynamo=exporter == "dynamo",
                        opset_version=13,
                        do_constant_folding=True,
                    )
                model = onnx.load(str(path))
            except Exception as e:  # noqa: BLE001 - recorded, the model is skipped
                why = f"{exporter} export failed: {type(e).__name__}: {e}".splitlines()[0]
                yield CorpusModel(name, None, expect, pattern, skip=why[:300])
                continue
            yield CorpusModel(name, model, expect, pattern)


# --- running models -----------------------------------------------------------------------


def feeds(model: onnx.ModelProto, seed: int) -> dict[str, np.ndarray]:
    """Random values (seeded) for every graph input that is not an initializer."""
    rng = np.random.default_rng(seed)
    inits = {t.name for t in model.graph.initializer}
    out = {}
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type
        dtype = helper.tensor_dtype_to_np_dtype(tt.elem_type)
        shape = [d.dim_value for d in tt.shape.dim]
        out[vi.name] = (rng.normal(size=shape) * 2).astype(dtype)
    return out


def session(model: onnx.ModelProto):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def run(model: onnx.ModelProto, seed: int) -> list[np.ndarray]:
    return session(model).run(None, feeds(model, seed))


def sqnr_db(ref, out) -> float:
    """10 log10(sum ref^2 / sum (ref - out)^2) in float64; inf when equal."""
    ref = np.asarray(ref, np.float64)
    noise = float(np.sum(np.square(ref - np.asarray(out, np.float64))))
    if noise == 0.0:
        return math.inf
    return 10.0 * math.log10(float(np.sum(np.square(ref))) / noise)


def is_float16(model: onnx.ModelProto) -> bool:
    return any(vi.type.tensor_type.elem_type == TensorProto.FLOAT16 for vi in model.graph.input)


def min_sqnr(original: onnx.ModelProto, equalized: onnx.ModelProto, seeds=(0, 1)) -> float:
    """The lowest SQNR over every output and input seed."""
    worst = math.inf
    for seed in seeds:
        for a, b in zip(run(original, seed), run(equalized, seed), strict=True):
            worst = min(worst, sqnr_db(a, b))
    return worst


def _row(cm: CorpusModel) -> list[str]:
    import cle_onnx

    if cm.model is None:
        return [cm.name, "-", "-", "-", f"skipped: {cm.skip}"]
    want_r = cm.expect.get("regions", cm.expect.get("regions_min"))
    sign = "" if "regions" in cm.expect else ">="
    try:
        eq, report = cle_onnx.equalize_model(cm.model)
    except Exception as e:  # noqa: BLE001 - reported in the table
        msg = f"{type(e).__name__}: {e}".splitlines()[0][:90]
        return [cm.name, f"? ({sign}{want_r})", "?", "?", f"error: {msg}"]
    regions = f"{len(report.regions)} ({sign}{want_r})"
    folds = f"{len(report.folds)}" + (f" ({cm.expect['folds']})" if "folds" in cm.expect else "")
    try:
        db = min_sqnr(cm.model, eq)
        quality = ("fp16 " if is_float16(cm.model) else "") + f"{db:.1f}"
    except Exception as e:  # noqa: BLE001
        quality = f"run error: {type(e).__name__}: {e}".splitlines()[0][:90]
    return [cm.name, regions, folds, str(len(report.high_bias)), quality]


def main() -> None:
    import tempfile

    logging.disable(logging.WARNING)  # the backends' warnings would break up the table
    with tempfile.TemporaryDirectory() as tmp:
        models = build_all() + list(torch_exports(tmp))
        rows = [["model", "regions (want)", "folds (want)", "high-bias", "SQNR dB"]]
        rows += [_row(cm) for cm in models]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r[:4], widths, strict=True)) + "  " + r[4])


if __name__ == "__main__":  # python -m tests.helpers.onnx_corpus
    main()
