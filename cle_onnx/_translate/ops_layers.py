"""Handlers of the layers with weights: Conv, ConvTranspose, Gemm, MatMul (a bias written
as a separate Add taken in), BatchNormalization."""

from __future__ import annotations

import numpy as np
import onnx

from cle_core import Layout

from .proto import _attrs, _text
from .shapes import _along_channels, _along_last, _explicit_pads


class _LayerOps:
    """Mixed into :class:`~.reader._Reader`, which dispatches to the ``op_*`` methods."""

    def _conv_attrs(self, a: dict, nd: int, x: str, kernel: tuple) -> dict | None:
        stride = tuple(a.get("strides", (1,) * nd))
        dilation = tuple(a.get("dilations", (1,) * nd))
        pads = _explicit_pads(a, nd, self.dims.get(x), kernel, stride, dilation)
        if pads is None:
            return None
        return {"stride": stride, "pads": pads, "dilation": dilation}

    def op_Conv(self, index, node, name):
        return self._conv_like(index, node, name, "conv")

    def op_ConvTranspose(self, index, node, name):
        return self._conv_like(index, node, name, "conv_transpose")

    def _conv_like(self, index, node, name, op: str):
        """Conv and ConvTranspose: weight (and bias) initializers, explicit pads."""
        has_bias = len(node.input) > 2 and bool(node.input[2])
        if len(node.input) < 2:
            return False
        blocker = self.first_blocker(node.input[1:3] if has_bias else node.input[1:2])
        if blocker:
            return blocker
        a = _attrs(node)
        transposed = op == "conv_transpose"
        if transposed and "output_shape" in a:
            return "output_shape is given (the IR needs explicit pads)"
        auto_pad = _text(a.get("auto_pad", "NOTSET"))
        if transposed and auto_pad not in ("NOTSET", "VALID"):
            return f"auto_pad={auto_pad} (the IR needs explicit pads)"
        if len(self.const_shape(node.input[1]) or ()) < 3:
            return "its weight is not of rank 3 or more"
        w = self.param(node.input[1])
        attrs = self._conv_attrs(a, w.ndim - 2, node.input[0], tuple(w.shape[2:]))
        if attrs is None:
            return "auto_pad needs the input's spatial size"
        if transposed:
            attrs["output_padding"] = tuple(a.get("output_padding", (0,) * (w.ndim - 2)))
        ids = {"weight": node.input[1]}
        bias = None
        if has_bias:
            bias, ids["bias"] = self.vector(node.input[2], index)
        group = int(a.get("group", 1))
        outputs, handle = list(node.output), index
        if not has_bias:
            out_channels = w.shape[1] * group if transposed else w.shape[0]
            fused = self.bias_add(index, node, out_channels, w.ndim)
            if fused is not None:
                bias, ids["bias"], outputs, handle = fused
        self.graph.add_node(
            op,
            [node.input[0]],
            name=name,
            outputs=outputs,
            params={"weight": w, "bias": bias},
            attrs={**attrs, "layout": Layout(1, 0, group) if transposed else Layout(0, 1, group)},
            handle=handle,
            param_ids=ids,
        )

    def op_Gemm(self, index, node, name):
        a = _attrs(node)
        if int(a.get("transA", 0)) != 0:
            return "transA=1: its input is (features, N), not (N, features)"
        has_c = len(node.input) > 2 and bool(node.input[2])
        blocker = self.first_blocker(node.input[1:3] if has_c else node.input[1:2])
        if blocker:
            return blocker
        shape = self.const_shape(node.input[1])
        if len(shape) != 2:
            return "its weight is not 2-D"
        trans_b = int(a.get("transB", 0))
        layout = Layout(0, 1) if trans_b else Layout(1, 0)
        out = shape[0] if trans_b else shape[1]
        if has_c:
            # C broadcasts to (N, out): one bias per output is (out,), (1, out) or a
            # single value; a C of shape (N, out) or (out, 1) adds a value per row.
            c_shape = tuple(self.const_shape(node.input[2]))
            if len(c_shape) > 2 or (len(c_shape) == 2 and c_shape[0] != 1):
                return f"its C of shape {c_shape} is not one bias per output"
            if int(np.prod(c_shape)) not in (1, out):
                return f"its C of shape {c_shape} is not one bias per output"
        w = self.param(node.input[1])
        alpha, beta = float(a.get("alpha", 1.0)), float(a.get("beta", 1.0))
        bias = None
        if has_c:
            c, c_id = self.vector(node.input[2], index)
            bias = np.broadcast_to(c.reshape(-1), (out,))
        # The IR holds the effective weight and bias; apply() writes them with alpha = beta = 1.
        if alpha != 1.0:
            w = w * np.asarray(alpha, w.dtype)
        if bias is not None and beta != 1.0:
            bias = bias * np.asarray(beta, bias.dtype)
        ids = {"weight": node.input[1]}
        if has_c:
            ids["bias"] = c_id
        self.add(
            "linear",
            [node.input[0]],
            name,
            index,
            params={"weight": w, "bias": bias},
            attrs={"layout": layout},
            param_ids=ids,
        )

    def op_MatMul(self, index, node, name):
        if not self.fixed.intersection(node.input[1:2]) and node.input[1] not in self.overridable:
            return self.matmul_activations(index, node, name)
        blocker = self.weight_blocker(node.input[1])
        if blocker:
            return blocker
        rank = self.rank(node.input[0])
        if rank is None:
            return "its input's rank is not known"
        if rank < 2:
            return "its input is a vector, not (..., features)"
        if len(self.const_shape(node.input[1])) != 2:
            return "its weight is not 2-D"
        w = self.param(node.input[1])
        ids = {"weight": node.input[1]}
        bias, outputs, handle = None, list(node.output), (index,)
        # a linear layer on the last axis: (N, features) or tokens (B, T, features)
        fused = self.bias_add(index, node, w.shape[1], rank, last=True)
        if fused is not None:
            bias, ids["bias"], outputs, handle = fused
        self.graph.add_node(
            "linear",
            [node.input[0]],
            name=name,
            outputs=outputs,
            params={"weight": w, "bias": bias},
            attrs={"layout": Layout(1, 0)},
            handle=handle,
            param_ids=ids,
        )

    def bias_add(
        self, index: int, node: onnx.NodeProto, channels: int, rank: int | None, last=False
    ):
        """A bias written as a separate ``Add`` of a per-channel constant to the only
        reader of the layer's output (MatMul + Add; PaddlePaddle's Conv + Add):
        ``(bias, constant's name, outputs, handle)`` to take it into the layer, or None.
        ``last``: the channels are the output's last axis (a MatMul's), else axis 1."""
        out = node.output[0]
        readers = self.users.get(out, [])
        if len(readers) != 1 or out in {o.name for o in self.model.graph.output}:
            return None
        add_index = readers[0]
        add = self.model.graph.node[add_index]
        other = [n for n in add.input if n != out]
        if add.op_type != "Add" or len(add.input) != 2 or len(other) != 1 or add_index <= index:
            return None
        # (C,) for a rank-2 output, (1, C, 1, 1) or (C, 1, 1) for a Conv's
        shape = self.const_shape(other[0])
        if last:
            if not _along_last(shape, rank, channels):
                return None
        elif not _along_channels(shape, rank, channels):
            return None
        self.consumed_adds.add(add_index)
        bias, ident = self.vector(other[0], add_index)
        return bias.reshape(-1), ident, list(add.output), (index, add_index)

    def op_BatchNormalization(self, index, node, name):
        a = _attrs(node)
        if int(a.get("training_mode", 0)):
            return "training_mode=1: it normalizes with the batch's own statistics"
        if len([o for o in node.output if o]) != 1:
            return "its running-statistics outputs are used (training)"
        if not int(a.get("spatial", 1)):
            return "spatial=0: its statistics are per position, not per channel"
        blocker = self.first_blocker(node.input[1:5])
        if blocker:
            return blocker
        channels = self.channels(node.input[0])
        for n in node.input[1:5]:
            shape = self.const_shape(n)
            if len(shape) != 1 or (channels is not None and shape[0] != channels):
                return f"its {n!r} of shape {shape} is not one value per channel"
        gamma, beta, mean, var = (self.param(n) for n in node.input[1:5])
        self.add(
            "batchnorm",
            [node.input[0]],
            name,
            index,
            params={"mean": mean, "var": var, "gamma": gamma, "beta": beta},
            attrs={"eps": float(a.get("epsilon", 1e-5))},
            param_ids={
                k: n for k, n in zip(("gamma", "beta", "mean", "var"), node.input[1:5], strict=True)
            },
        )
