"""Small ONNX models built with onnx.helper, one per pattern the backend must handle."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


class OnnxBuilder:
    """Collects nodes and float32 initializers with random, channel-spread values."""

    def __init__(self, seed: int = 0, opset: int = 13):
        self.rng = np.random.default_rng(seed)
        self.opset = opset
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.count = 0

    def name(self, base: str) -> str:
        self.count += 1
        return f"{base}{self.count}"

    def init(self, arr, base: str = "w") -> str:
        name = self.name(base)
        self.inits.append(numpy_helper.from_array(np.asarray(arr, np.float32), name))
        return name

    def spread(self, shape, axis: int = 0) -> np.ndarray:
        w = self.rng.normal(size=shape)
        scale = 10.0 ** self.rng.uniform(-1.5, 1.5, shape[axis])
        return w * np.expand_dims(scale, tuple(i for i in range(len(shape)) if i != axis))

    def node(self, op: str, inputs, n_out: int = 1, **attrs) -> str | list[str]:
        outs = [self.name(f"{op.lower()}_out") for _ in range(n_out)]
        self.nodes.append(helper.make_node(op, list(inputs), outs, name=self.name(op), **attrs))
        return outs[0] if n_out == 1 else outs

    def conv(self, x, cin, cout, k=1, group=1, pad=0, bias=True, stride=1, set_group=True):
        w = self.init(self.spread((cout, cin // group, k, k)))
        inputs = [x, w] + ([self.init(self.rng.normal(size=cout), "b")] if bias else [])
        attrs = {"kernel_shape": [k, k], "pads": [pad] * 4, "strides": [stride, stride]}
        if set_group:
            attrs["group"] = group
        return self.node("Conv", inputs, **attrs)

    def bn(self, x, c, beta_shift=0.0):
        rng = self.rng
        ins = [
            self.init(rng.normal(size=c) * 10.0 ** rng.uniform(-1, 1, c), "gamma"),
            self.init(rng.normal(size=c) + beta_shift, "beta"),
            self.init(rng.normal(size=c), "mean"),
            self.init(rng.uniform(0.2, 2.0, c), "var"),
        ]
        return self.node("BatchNormalization", [x] + ins, epsilon=1e-5)

    def relu6(self, x, how: str = "init"):
        if self.opset < 11:
            return self.node("Clip", [x], min=0.0, max=6.0)
        if how == "init":
            return self.node(
                "Clip", [x, self.init(np.array(0.0), "lo"), self.init(np.array(6.0), "hi")]
            )
        lo = self.node("Constant", [], value=numpy_helper.from_array(np.array(0.0, np.float32)))
        hi = self.node("Constant", [], value=numpy_helper.from_array(np.array(6.0, np.float32)))
        return self.node("Clip", [x, lo, hi])

    def act(self, x, kind: str, c: int):
        if kind == "relu":
            return self.node("Relu", [x])
        if kind == "leaky":
            return self.node("LeakyRelu", [x], alpha=0.1)
        if kind == "prelu":
            return self.node("PRelu", [x, self.init(self.rng.uniform(0, 0.3, (c, 1, 1)), "slope")])
        if kind == "relu6":
            return self.relu6(x)
        if kind == "relu6_const":
            return self.relu6(x, how="const")
        if kind == "hardtanh":
            if self.opset < 11:
                return self.node("Clip", [x], min=-1.0, max=1.0)
            return self.node(
                "Clip", [x, self.init(np.array(-1.0), "lo"), self.init(np.array(1.0), "hi")]
            )
        if kind == "sigmoid":
            return self.node("Sigmoid", [x])
        raise ValueError(kind)

    def model(self, x_shape=(2, 3, 8, 8), outputs=None) -> onnx.ModelProto:
        outputs = outputs or [self.nodes[-1].output[0]]
        graph = helper.make_graph(
            self.nodes,
            "test",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))],
            [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs],
            self.inits,
        )
        m = helper.make_model(
            graph,
            opset_imports=[helper.make_opsetid("", self.opset)],
            producer_name="tests",
            producer_version="1",
        )
        m.ir_version = 7 if self.opset < 15 else 8
        m.metadata_props.add(key="origin", value="unit test")
        g = onnx.shape_inference.infer_shapes(m).graph
        inferred = {v.name: v for v in list(g.value_info) + list(g.output)}
        for out in m.graph.output:
            out.CopyFrom(inferred[out.name])
        onnx.checker.check_model(m, full_check=True)
        return m


def conv_pair(act: str, opset: int = 13) -> onnx.ModelProto:
    b = OnnxBuilder(1, opset)
    h = b.bn(b.conv("x", 3, 6, 3, pad=1), 6)
    h = b.act(h, act, 6)
    b.conv(h, 6, 4, 1)
    return b.model()


def depthwise_triple() -> onnx.ModelProto:
    b = OnnxBuilder(2)
    h = b.relu6(b.bn(b.conv("x", 3, 4, 3, pad=1), 4))
    h = b.relu6(b.bn(b.conv(h, 4, 12, 1), 12))
    h = b.relu6(b.bn(b.conv(h, 12, 12, 3, group=12, pad=1), 12))
    b.conv(h, 12, 5, 1)
    return b.model()


def residual_and_concat() -> onnx.ModelProto:
    b = OnnxBuilder(3)
    h = b.node("Relu", [b.bn(b.conv("x", 3, 6, 3, pad=1), 6)])
    t = b.node("Relu", [b.bn(b.conv(h, 6, 6, 1), 6)])
    t = b.bn(b.conv(t, 6, 6, 1), 6)
    h = b.node("Add", [h, t])
    left = b.node("Relu", [b.conv(h, 6, 4, 1)])
    right = b.node("Relu", [b.conv(h, 6, 3, 3, pad=1)])
    cat = b.node("Concat", [left, right], axis=1)
    b.conv(cat, 7, 2, 1)
    return b.model()


def gemm_head(trans_b: int, alpha: float = 1.0, beta: float = 1.0, reshape: bool = False):
    b = OnnxBuilder(4)
    h = b.node("Relu", [b.bn(b.conv("x", 3, 4, 3), 4)])  # 8x8 -> 6x6
    if reshape:
        shape = b.init(np.array([0, -1]), "shape")
        b.inits[-1] = numpy_helper.from_array(np.array([0, -1], np.int64), shape)
        flat = b.node("Reshape", [h, shape])
    else:
        flat = b.node("Flatten", [h], axis=1)
    w = b.spread((5, 4 * 36), axis=0)
    w = w if trans_b else w.T
    g = b.node(
        "Gemm",
        [flat, b.init(w), b.init(b.rng.normal(size=5), "c")],
        transB=trans_b,
        alpha=alpha,
        beta=beta,
    )
    g = b.node("Relu", [g])
    b.node("Gemm", [g, b.init(b.spread((3, 5))), b.init(np.zeros(3), "c")], transB=1)
    return b.model()


def matmul_mlp(with_add: bool = True) -> onnx.ModelProto:
    b = OnnxBuilder(5)
    h = b.node("Flatten", [b.node("GlobalAveragePool", [b.conv("x", 3, 6, 3, pad=1)])], axis=1)
    h = b.node("MatMul", [h, b.init(b.spread((6, 8), axis=1))])
    if with_add:
        h = b.node("Add", [h, b.init(b.rng.normal(size=8), "bias")])
    h = b.node("Relu", [b.bn(h, 8)])  # folding gives a bare MatMul a bias
    b.node("MatMul", [h, b.init(b.spread((8, 3), axis=1))])
    return b.model()


def conv_without_group() -> onnx.ModelProto:
    b = OnnxBuilder(6)
    h = b.node("Relu", [b.conv("x", 3, 5, 3, pad=1, set_group=False)])
    b.conv(h, 5, 2, 1, set_group=False)
    return b.model()


def conv_transpose(depthwise: bool) -> onnx.ModelProto:
    b = OnnxBuilder(7)
    h = b.node("Relu", [b.bn(b.conv("x", 3, 4, 3, pad=1), 4)])
    group, cout = (4, 4) if depthwise else (2, 6)
    w = b.init(b.spread((4, cout // group, 2, 2), axis=1))
    h = b.node(
        "ConvTranspose",
        [h, w, b.init(b.rng.normal(size=cout), "b")],
        group=group,
        strides=[2, 2],
        kernel_shape=[2, 2],
    )
    h = b.node("Relu", [b.bn(h, cout)])
    b.conv(h, cout, 2, 3, pad=1)
    return b.model()


def bn_before_padded_conv() -> onnx.ModelProto:
    b = OnnxBuilder(8)
    h = b.bn("x", 3)
    b.conv(h, 3, 4, 3, pad=1)
    return b.model()


def shared_initializer() -> onnx.ModelProto:
    """Two convs share one weight; a third conv's weight is also read by a Mul."""
    b = OnnxBuilder(9)
    h = b.node("Relu", [b.conv("x", 3, 4, 3, pad=1)])
    w = b.init(b.spread((4, 4, 1, 1)))
    h1 = b.node("Relu", [b.node("Conv", [h, w], kernel_shape=[1, 1])])
    h2 = b.node("Conv", [h1, w], kernel_shape=[1, 1])
    w3 = b.init(b.spread((4, 4, 1, 1)))
    h3 = b.node("Relu", [b.node("Conv", [b.node("Relu", [h2]), w3], kernel_shape=[1, 1])])
    out = b.conv(h3, 4, 2, 1)
    side = b.node("Mul", [w3, w3])
    return b.model(outputs=[out, side])


def clip_with_second_consumer() -> onnx.ModelProto:
    b = OnnxBuilder(10)
    h = b.bn(b.conv("x", 3, 4, 3, pad=1), 4)
    act = b.relu6(h)
    out = b.conv(act, 4, 2, 1)
    side = b.node("Sigmoid", [h])  # the conv output is read outside the region too
    return b.model(outputs=[out, side])


def high_bias_chain() -> onnx.ModelProto:
    b = OnnxBuilder(11)
    h = b.relu6(b.bn(b.conv("x", 3, 6, 3, pad=1), 6, beta_shift=8.0))
    b.conv(h, 6, 3, 1)
    return b.model()


# --- models for the safety tests ----------------------------------------------------------


def _finish(b: OnnxBuilder, outputs, ir_version: int = 7, x_shape=(2, 3, 8, 8)):
    """A model whose outputs are rank-4 float tensors of unknown size (shape inference
    cannot see through every subgraph)."""
    graph = helper.make_graph(
        b.nodes,
        "test",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))],
        [
            helper.make_tensor_value_info(o, TensorProto.FLOAT, ["n", "c", "h", "w"])
            for o in outputs
        ],
        b.inits,
    )
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", b.opset)])
    m.ir_version = ir_version
    if ir_version < 4:  # IR 3 lists every initializer as a graph input
        for t in m.graph.initializer:
            m.graph.input.append(helper.make_tensor_value_info(t.name, t.data_type, t.dims))
    onnx.checker.check_model(m, full_check=True)
    return m


def _any_shape(name: str) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, ["n", "c", "h", "w"])


def loop_reads_activation() -> onnx.ModelProto:
    """Conv -> BN -> ReLU -> Conv, and a Loop whose body adds the ReLU output (read from
    the outer scope) to an accumulator twice."""
    b = OnnxBuilder(21)
    h = b.node("Relu", [b.bn(b.conv("x", 3, 6, 3, pad=1), 6)])
    y = b.conv(h, 6, 4, 1)
    return _finish(b, [y, _read_in_subgraph(b, "loop", h)])


def save_external(model: onnx.ModelProto, path, location: str) -> None:
    """Save ``model`` (left unchanged) with every tensor in the data file ``location``."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    onnx.save_model(
        copy,
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=location,
        size_threshold=0,
    )


def if_reads_bn_output() -> onnx.ModelProto:
    """An If whose branches read a BN output (the BN is folded on its output side), a
    Constant and an initializer that nothing outside the branches reads, and the weight
    of an equalized Conv."""
    b = OnnxBuilder(22)
    w = b.init(b.spread((6, 3, 3, 3)))
    bn = b.bn(b.node("Conv", ["x", w], pads=[1, 1, 1, 1]), 6)
    y = b.conv(b.node("Relu", [bn]), 6, 4, 1)
    only_in_branch = b.init(np.full((1, 6, 1, 1), 0.5), "only_in_branch")
    const = b.node("Constant", [], value=numpy_helper.from_array(np.float32(2.0), "two"))
    then = helper.make_graph(
        [
            helper.make_node("Mul", [bn, only_in_branch], ["t_mul"]),
            helper.make_node("Mul", ["t_mul", const], ["t_out"]),
        ],
        "then",
        [],
        [_any_shape("t_out")],
    )
    # The else branch reads the first Conv's weight as data (through a ReduceSum).
    els = helper.make_graph(
        [
            helper.make_node("ReduceSum", [w], ["w_sum"], keepdims=1),
            helper.make_node("Add", [bn, "w_sum"], ["e_out"]),
        ],
        "else",
        [],
        [_any_shape("e_out")],
    )
    b.inits.append(numpy_helper.from_array(np.array(True), "cond_then"))
    b.inits.append(numpy_helper.from_array(np.array(False), "cond_else"))
    t_out = b.node("If", ["cond_then"], then_branch=then, else_branch=els)
    e_out = b.node("If", ["cond_else"], then_branch=then, else_branch=els)
    return _finish(b, [y, t_out, e_out])


def relu6_chain(opset: int, ir_version: int = 7) -> onnx.ModelProto:
    """Conv -> BN -> ReLU6 -> Conv, in any opset from 7 (Clip bounds as attributes below
    11): equalizing it needs per-channel clip bounds."""
    b = OnnxBuilder(23, opset)
    h = b.relu6(b.bn(b.conv("x", 3, 6, 3, pad=1), 6, beta_shift=4.0))
    h = b.relu6(b.bn(b.conv(h, 6, 6, 1), 6))
    return _finish(b, [b.conv(h, 6, 4, 1)], ir_version)


def to_float16(model: onnx.ModelProto) -> onnx.ModelProto:
    """The same model in float16: every float32 initializer, Constant and value type,
    in subgraphs too."""
    out = onnx.ModelProto()
    out.CopyFrom(model)

    def half(t: onnx.TensorProto) -> None:
        if t.data_type == TensorProto.FLOAT:
            arr = numpy_helper.to_array(t).astype(np.float16)
            t.CopyFrom(numpy_helper.from_array(arr, t.name))

    def convert(g: onnx.GraphProto) -> None:
        for t in g.initializer:
            half(t)
        for vi in list(g.input) + list(g.output) + list(g.value_info):
            if vi.type.tensor_type.elem_type == TensorProto.FLOAT:
                vi.type.tensor_type.elem_type = TensorProto.FLOAT16
        for n in g.node:
            for a in n.attribute:
                if a.type == onnx.AttributeProto.TENSOR:
                    half(a.t)
                elif a.type == onnx.AttributeProto.GRAPH:
                    convert(a.g)

    convert(out.graph)
    return out


_IR_OF_OPSET = {7: 3, 8: 3, 9: 4, 10: 5, 11: 6, 12: 7, 13: 7, 14: 7, 15: 8, 16: 8, 17: 8, 18: 8}


def from_spec(spec: dict) -> onnx.ModelProto:
    """The model a spec of ``strategies.onnx_specs`` describes (valid: it passes the
    full checker). Activations keep the 8 x 8 spatial size; the batch is 2."""
    opset = spec["opset"]
    b = OnnxBuilder(spec["seed"], opset)
    weights: dict[tuple, str] = {}  # shape -> a weight initializer, for sharing
    values: list[str] = []  # activations a subgraph may read
    conv_weights: list[str] = []

    def weight(shape, how: str) -> str:
        if how == "shared" and tuple(shape) in weights:
            return weights[tuple(shape)]
        name = b.init(b.spread(shape))
        weights.setdefault(tuple(shape), name)
        if how == "identity":
            return b.node("Identity", [name])
        conv_weights.append(name)
        return name

    def conv(x, cin, p) -> tuple[str, int]:
        k, group = p["k"], (cin if p["depthwise"] else 1)
        cout = cin if p["depthwise"] else p["out"]
        inputs = [x, weight((cout, cin // group, k, k), p["weight"])]
        if p["bias"]:
            inputs.append(b.init(b.rng.normal(size=cout), "b"))
        pads = [k // 2] * 4
        h = b.node("Conv", inputs, kernel_shape=[k, k], pads=pads, group=group)
        if p["bn"]:
            h = b.bn(h, cout, beta_shift=float(b.rng.uniform(-1, 3)))
        if p["act"] != "none":
            h = b.act(h, p["act"], cout)
        values.append(h)
        return h, cout

    stem = {"k": 3, "out": 4, "depthwise": False, "bias": True, "bn": True, "act": "relu"}
    h, c = conv("x", 3, {**stem, "weight": "init"})
    for block in spec["blocks"]:
        kind = block["kind"]
        if kind == "conv":
            h, c = conv(h, c, block)
        elif kind == "residual":
            t, _ = conv(h, c, {**block, "depthwise": False, "out": c})
            h = b.node("Add", [h, t])
        elif kind == "concat":
            left, cl = conv(h, c, {**stem, "k": 1, "out": block["outs"][0], "weight": "init"})
            right, cr = conv(h, c, {**stem, "k": 3, "out": block["outs"][1], "weight": "init"})
            h, c = b.node("Concat", [left, right], axis=1), cl + cr
        else:
            attrs = {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1]}
            h = b.node("MaxPool" if kind == "maxpool" else "AveragePool", [h], **attrs)
        values.append(h)
    outputs = []
    if spec["head"] != "none":
        flat = b.node("Flatten", [b.node("GlobalAveragePool", [h])], axis=1)
        h = b.node("Gemm", [flat, b.init(b.spread((5, c))), b.init(b.rng.normal(size=5))], transB=1)
        if spec["head"] == "gemm2":
            h = b.node(
                "Gemm",
                [b.node("Relu", [h]), b.init(b.spread((3, 5))), b.init(np.zeros(3))],
                transB=1,
            )
        graph_out = helper.make_tensor_value_info(h, TensorProto.FLOAT, [2, None])
    else:
        graph_out = _any_shape(h)
    outputs.append(graph_out)
    if spec["subgraph"]:
        read = conv_weights if spec["subgraph"] == "if_weight" else values
        read = read[spec["reads"] % len(read)] if read else values[0]
        outputs.append(_any_shape(_read_in_subgraph(b, spec["subgraph"], read)))
    graph = helper.make_graph(
        b.nodes,
        "fuzz",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 8, 8])],
        outputs,
        b.inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    ir = _IR_OF_OPSET.get(opset, 10 if opset >= 21 else 9)
    model.ir_version = 3 if spec["ir3"] else max(4, ir)
    if spec["dtype"] == "float16":
        model = to_float16(model)
    g = model.graph
    if spec["ir3"]:
        for t in g.initializer:
            g.input.append(helper.make_tensor_value_info(t.name, t.data_type, t.dims))
    elif spec["overridable"] and conv_weights:
        t = next(t for t in g.initializer if t.name == conv_weights[-1])
        g.input.append(helper.make_tensor_value_info(t.name, t.data_type, t.dims))
    onnx.checker.check_model(model, full_check=True)
    return model


def _read_in_subgraph(b: OnnxBuilder, kind: str, outer: str) -> str:
    """An If or a Loop whose body reads ``outer`` from the enclosing graph."""
    if kind == "loop":
        body = helper.make_graph(
            [
                helper.make_node("Add", ["acc_in", outer], ["acc_out"]),
                helper.make_node("Identity", ["cond_in"], ["cond_out"]),
            ],
            "body",
            [
                helper.make_tensor_value_info("i", TensorProto.INT64, []),
                helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
                _any_shape("acc_in"),
            ],
            [
                helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
                _any_shape("acc_out"),
            ],
        )
        trip = b.name("trip")
        b.inits.append(numpy_helper.from_array(np.array(2, np.int64), trip))
        cond = b.name("cond")
        b.inits.append(numpy_helper.from_array(np.array(True), cond))
        if b.opset >= 9:  # zeros of the right shape and type, without reading the values
            zero_value = numpy_helper.from_array(np.zeros(1, np.float32))
            zero = b.node("ConstantOfShape", [b.node("Shape", [outer])], value=zero_value)
        else:
            zero = b.node("Sub", [outer, outer])
        return b.node("Loop", [trip, cond, zero], body=body)
    then = helper.make_graph(
        [helper.make_node("Identity", [outer], ["t_out"])], "then", [], [_any_shape("t_out")]
    )
    other = helper.make_graph(
        [helper.make_node("Neg", [outer], ["e_out"])], "else", [], [_any_shape("e_out")]
    )
    cond = b.name("cond")
    b.inits.append(numpy_helper.from_array(np.array(bool(b.rng.integers(2))), cond))
    return b.node("If", [cond], then_branch=then, else_branch=other)
