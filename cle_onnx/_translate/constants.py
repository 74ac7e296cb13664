"""Constant folding: which values equalization cannot change (computed from constants
and shapes alone), and the values of the small ones."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from .proto import _attrs, has_subgraph

# Default-domain ops whose output is not a function of their inputs alone.
_NONDETERMINISTIC = frozenset(
    {
        "RandomNormal",
        "RandomUniform",
        "RandomNormalLike",
        "RandomUniformLike",
        "Multinomial",
        "Bernoulli",
        "Dropout",
    }
)


class _Dim:
    """An unknown dimension: ``index`` of value ``value``."""

    def __init__(self, value: str, index: int):
        self.value, self.index = value, index

    def __repr__(self) -> str:
        return f"{self.value}[{self.index}]"


_FOLDABLE = frozenset(
    {
        "Cast",
        "Concat",
        "ConstantOfShape",
        "Gather",
        "Reshape",
        "Slice",
        "Transpose",
        "Unsqueeze",
        "Squeeze",
        "Identity",
        "Add",
        "Sub",
        "Mul",
        "Div",
        "Mod",
        "Neg",
        "Range",
        "Expand",
        # the TorchScript exporter's scaled_dot_product_attention scales q and k by
        # sqrt(1 / sqrt(d)), computed from the head size: a scalar a Q -> K pair passes
        "Sqrt",
        # a rotary embedding's tables computed in forward (Hugging Face's
        # inv_freq @ positions, then cos and sin) on a static sequence length
        "MatMul",
        "Cos",
        "Sin",
    }
)
# Folding reads and writes whole tensors: a weight computed from constants is folded
# whatever its size, but no result may exceed this many elements (a ConstantOfShape or
# an Expand can describe gigabytes in a few bytes of model).
_FOLD_LIMIT = 1 << 24


def _fold_size(node: onnx.NodeProto, args: list) -> int | None:
    """An upper bound of the number of elements ``node`` produces from ``args``, or None
    if it cannot be told cheaply."""
    op = node.op_type
    sizes = [a.size for a in args if a is not None]
    try:
        if op == "ConstantOfShape":
            return int(np.prod([int(d) for d in args[0].reshape(-1)]))
        if op == "Expand":
            shape = tuple(int(d) for d in args[1].reshape(-1))
            return int(np.prod(np.broadcast_shapes(args[0].shape, shape)))
        if op == "Range":
            start, limit, delta = (float(a.reshape(-1)[0]) for a in args[:3])
            return max(int(np.ceil((limit - start) / delta)), 0) if delta else None
        if op in ("Add", "Sub", "Mul", "Div", "Mod"):
            return int(np.prod(np.broadcast_shapes(*(a.shape for a in args))))
        if op == "MatMul":  # (an outer product is larger than its operands)
            a, b = (x.shape for x in args[:2])
            rows, cols = a[-2:-1] if len(a) > 1 else (), b[-1:] if len(b) > 1 else ()
            return int(np.prod(np.broadcast_shapes(a[:-2], b[:-2]) + rows + cols))
    except (TypeError, ValueError, OverflowError):
        return None
    return sum(sizes)  # the other foldable ops rearrange, select or cast their inputs


def _evaluate(node: onnx.NodeProto, args: list, opset: int) -> list[np.ndarray]:
    """One node on constant inputs: object arrays (symbolic dims) for the few ops that
    just move them around, the ONNX reference implementation otherwise."""
    if any(a is not None and a.dtype == object for a in args):
        return [np.asarray(v, dtype=object) for v in _evaluate_symbolic(node, args, opset)]
    from onnx.reference import ReferenceEvaluator

    feeds = {n: v for n, v in zip(node.input, args, strict=True) if n}
    return ReferenceEvaluator(node).run(None, feeds)


def _evaluate_symbolic(node: onnx.NodeProto, args: list, opset: int) -> list:
    a = _attrs(node)
    op, data = node.op_type, args[0]
    if op in ("Cast", "Identity"):
        return [data]
    if op == "Gather":
        return [np.take(data, args[1].astype(np.int64), axis=int(a.get("axis", 0)))]
    if op in ("Unsqueeze", "Squeeze"):
        axes = a.get("axes") if opset < 13 else (None if len(args) < 2 else args[1])
        axes = tuple(int(x) for x in np.asarray(axes).reshape(-1))
        if op == "Unsqueeze":
            return [np.expand_dims(data, axes)]
        return [np.squeeze(data, axes)]
    if op == "Slice" and data.ndim == 1 and opset >= 10:
        # x.shape[1:]: one axis, constant starts / ends / steps
        starts, ends = (int(np.asarray(v).reshape(-1)[0]) for v in args[1:3])
        axes = args[3] if len(args) > 3 and args[3] is not None else None
        if axes is not None and int(np.asarray(axes).reshape(-1)[0]) not in (0, -1):
            raise ValueError("cannot fold a Slice of another axis")
        step = (
            int(np.asarray(args[4]).reshape(-1)[0]) if len(args) > 4 and args[4] is not None else 1
        )
        return [data[starts:ends:step]]
    if op == "Concat":
        return [
            np.concatenate([np.asarray(x, dtype=object) for x in args], axis=int(a.get("axis", 0)))
        ]
    if op in ("Mul", "Div") and len(args) == 2:
        # a size computed from an unknown one (the TorchScript exporter's B * H): unknown,
        # a symbol that is nobody's dimension, so that it is never taken for a copy
        def combine(x, y):
            if isinstance(x, _Dim) or isinstance(y, _Dim):
                return _Dim(node.output[0], -1)
            if op == "Mul":
                return int(x) * int(y)
            q = abs(int(x)) // abs(int(y))  # integer Div truncates towards zero
            return q if (int(x) < 0) == (int(y) < 0) else -q

        x, y = (np.asarray(v, dtype=object) for v in args)
        return [np.vectorize(combine, otypes=[object])(x, y)]
    raise ValueError(f"cannot fold {op} over symbolic dims")


def _constant_value(node: onnx.NodeProto) -> np.ndarray | None:
    """The value of a ``Constant`` node, whichever attribute holds it (None for a
    sparse or string value)."""
    for a in node.attribute:
        value = onnx.helper.get_attribute_value(a)
        if a.name == "value" and isinstance(value, onnx.TensorProto):
            return numpy_helper.to_array(value)
        if a.name in ("value_float", "value_floats"):
            return np.asarray(value, np.float32)
        if a.name in ("value_int", "value_ints"):
            return np.asarray(value, np.int64)
    return None


class _ConstantFolding:
    """The reader's constant folding (mixed into :class:`~.reader._Reader`)."""

    def _fold_constants(self) -> None:
        """Find the values equalization cannot change (``fixed``: computed from
        constants and shapes alone) and evaluate the small ones (exporters compute
        Pad's pads and Reshape's shape with chains of Concat / Slice / Cast ...).
        ``Shape`` yields the inferred dims, unknown ones as :class:`_Dim` symbols, so
        ``x.view(x.size(0), -1)`` is recognised. Only reads; the model is not changed."""
        self.fixed = set(self.inits) | set(self.constants)
        for i, node in enumerate(self.model.graph.node):
            if node.domain not in ("", "ai.onnx") or not node.output:
                continue
            op = node.op_type
            if op in ("Shape", "Size") or (
                op not in _NONDETERMINISTIC
                and not has_subgraph(node)
                and all(n in self.fixed for n in self.reads[i])
            ):
                self.fixed.update(o for o in node.output if o)
            else:
                continue
            if all(o in self.constants for o in node.output if o):
                continue  # a Constant node: read in __init__
            if op == "Shape":
                dims = self.dims.get(node.input[0])
                if dims is not None:
                    a = _attrs(node)
                    sym = [
                        d if isinstance(d, int) else _Dim(node.input[0], i)
                        for i, d in enumerate(dims)
                    ]
                    sym = sym[a.get("start", 0) : a.get("end", len(sym))]
                    known = all(isinstance(d, int) for d in sym)
                    # all known: plain integers, which every foldable op takes
                    self.constants[node.output[0]] = np.array(sym, np.int64 if known else object)
                    continue
            why = self._why_not_folded(node, op)
            if why is None:
                args = [self.const(n) if n else None for n in node.input]
                missing = [n for a, n in zip(args, node.input, strict=True) if n and a is None]
                if missing:
                    inner = self.unfolded.get(missing[0], "is not a numeric constant")
                    why = f"is computed by {op} from {missing[0]!r}, which {inner}"
            if why is not None:
                self.unfolded.update((o, why) for o in node.output if o)
                continue
            size = _fold_size(node, args)
            if size is None or size > _FOLD_LIMIT:
                what = "of unknown size" if size is None else f"of {size} elements"
                why = f"is computed by {op} from constants, but too large to fold ({what})"
                self.unfolded.update((o, why) for o in node.output if o)
                continue
            try:
                outs = _evaluate(node, args, self.opset)
            except Exception as exc:  # not foldable after all: the node stays opaque
                why = f"is computed by {op} from constants, which failed to fold: {exc}"
                self.unfolded.update((o, why.splitlines()[0]) for o in node.output if o)
                continue
            for name, value in zip(node.output, outs, strict=False):
                value = np.asarray(value)
                if value.dtype == object and not any(isinstance(v, _Dim) for v in value.flat):
                    value = value.astype(np.int64)  # the symbolic dims were sliced away
                self.constants[name] = value

    def _why_not_folded(self, node: onnx.NodeProto, op: str) -> str | None:
        """Why the outputs of ``node`` (computed from constants) get no folded value, or
        None if they are to be folded."""
        if op == "Shape":
            return "is a shape that shape inference does not know"
        if op == "Constant":
            return "is a Constant without a dense numeric value"
        if op == "DequantizeLinear":
            return (
                "is computed by DequantizeLinear from a quantized tensor, which is not folded "
                "(equalize the float model before quantizing it)"
            )
        if op not in _FOLDABLE:
            return f"is computed by {op} from constants, which is not folded"
        return None
