"""Handlers of the elementwise ops: activations, Clip, Mul, Div, Add, Sum.

Hard-sigmoid, hard-swish (the op, or the forms exporters write out) and the sigmoid are
not homogeneous: each is one ``opaque`` node that ends a region, with attr ``activation``
naming it so that the data-free statistics follow it (see :mod:`cle_core._ir`)."""

from __future__ import annotations

import numpy as np

from .proto import _attrs
from .shapes import _along_channels


def _silu(x: np.ndarray) -> np.ndarray:
    """``x * sigmoid(x)``, with the sigmoid written so that no exp overflows."""
    return x * 0.5 * (1.0 + np.tanh(0.5 * x))


# Ops an activation written out is made of (their other inputs constants, or the same x)
_ELEMENTWISE = frozenset(
    {"Add", "Sub", "Mul", "Div", "Pow", "Neg", "Erf", "Tanh", "Sigmoid", "Sqrt", "Exp", "Cast"}
)

_ACTIVATIONS = frozenset({"Erf", "Tanh", "Sigmoid", "Exp"})


class _ElementwiseOps:
    """Mixed into :class:`~.reader._Reader`, which dispatches to the ``op_*`` methods."""

    def op_Relu(self, index, node, name):
        self.add("relu", [node.input[0]], name, index)

    def op_LeakyRelu(self, index, node, name):
        self.add(
            "leaky_relu",
            [node.input[0]],
            name,
            index,
            attrs={"alpha": float(_attrs(node).get("alpha", 0.01))},
        )

    def op_PRelu(self, index, node, name):
        slope = self.const(node.input[1])
        if slope is None:
            return "its slope is not a constant"
        c, rank = self.channels(node.input[0]), self.rank(node.input[0])
        if slope.size != 1:
            # Per channel means broadcasting along axis 1 only: (1, C, 1, ..., 1) once
            # padded to the data's rank.
            if not _along_channels(slope.shape, rank, c):
                return f"its slope of shape {slope.shape} is not one value per channel"
        if not np.all(np.isfinite(slope)):
            return "its slope is not finite (Inf or NaN)"
        self.add("prelu", [node.input[0]], name, index, params={"slope": slope.reshape(-1)})

    def _clip_bounds(self, node) -> tuple[float, float] | str:
        """A Clip's ``(min, max)`` (infinite where absent), or why they are not scalar
        constants."""
        if self.opset < 11:
            a = _attrs(node)
            lo, hi = a.get("min", -np.inf), a.get("max", np.inf)
        else:
            lo = hi = None
            names = list(node.input) + ["", ""]
            for which, ref in (("lo", names[1]), ("hi", names[2])):
                if not ref:
                    value = -np.inf if which == "lo" else np.inf
                else:
                    value = self.const(ref)
                    if value is None:
                        return f"its {'min' if which == 'lo' else 'max'} is not a constant"
                    if value.size != 1:
                        return f"its {'min' if which == 'lo' else 'max'} is not one value"
                    value = float(value.reshape(-1)[0])
                if which == "lo":
                    lo = value
                else:
                    hi = value
        for which, value in (("min", lo), ("max", hi)):
            if np.isnan(value):
                return f"its {which} is NaN"
        return float(lo), float(hi)

    def op_Clip(self, index, node, name):
        bounds = self._clip_bounds(node)
        if isinstance(bounds, str):
            return bounds
        lo, hi = bounds
        self.add(
            "clip",
            [node.input[0]],
            name,
            index,
            params={"lo": np.array(lo), "hi": np.array(hi)},
        )

    # --- hard-sigmoid and hard-swish ---------------------------------------------------
    def _gating(self, name, handle, x: str, out: str, activation: str, alpha, beta, kind):
        """One opaque node computing ``activation`` (``hard_sigmoid`` or ``hard_swish``)
        of ``x``: not homogeneous, so it ends a region, but the statistics follow it."""
        channels = self.width(out)
        attrs = {"kind": kind, "why": "", "channels": channels, "activation": activation}
        attrs.update(alpha=float(alpha), beta=float(beta))
        self.graph.add_node("opaque", [x], name=name, outputs=[out], attrs=attrs, handle=handle)

    def _divides_by(self, op, value: str, u: float) -> bool:
        """Whether ``op`` is ``Div(value, u)`` or ``Mul(value, 1 / u)`` (the reciprocal
        rounded to the constant's float type)."""
        if op.op_type == "Div":
            return op.input[0] == value and op.input[1] != value and self._scalar(op.input[1]) == u
        factor = self._scalar(self._other(op, value) or "")
        return factor is not None and abs(factor * u - 1.0) <= 1e-6

    def op_HardSigmoid(self, index, node, name):
        """``clip(alpha x + beta, 0, 1)``; read by ``Mul(x, .)`` alone, a hard-swish (the
        TorchScript exporter's ``hardswish`` before opset 14)."""
        a = _attrs(node)
        alpha, beta = float(a.get("alpha", 0.2)), float(a.get("beta", 0.5))
        x = node.input[0]
        if x in self.fixed or not (alpha > 0 and np.isfinite(beta)):
            return False
        step = self._only_reader(node.output[0], ("Mul",))
        if step is not None and self._other(step[1], node.output[0]) == x:
            self.consumed_adds.add(step[0])
            out = step[1].output[0]
            self._gating(name, (index, step[0]), x, out, "hard_swish", alpha, beta, "HardSwish")
            return None
        self._gating(name, index, x, node.output[0], "hard_sigmoid", alpha, beta, "HardSigmoid")
        return None

    def op_Sigmoid(self, index, node, name):
        if node.input[0] in self.fixed:
            return False
        self.opaque(index, node, name)
        self.graph.nodes[-1].attrs["activation"] = "sigmoid"  # the statistics follow it
        return None

    def op_HardSwish(self, index, node, name):
        if node.input[0] in self.fixed:
            return False
        x, out = node.input[0], node.output[0]
        self._gating(name, index, x, out, "hard_swish", 1.0 / 6.0, 0.5, "HardSwish")
        return None

    def _decomposed_hard_swish(self, index, node, name) -> bool:
        """``Add(x, b) -> Clip(0, u) -> Mul(x, .) -> Div(u)`` (or ``Mul(1/u)``, or the
        division before the product): ``x * clip(x / u + b / u, 0, 1)``, a hard-swish
        (``b = 3``, ``u = 6`` as PaddlePaddle and hand-written MobileNetV3s export it).
        Taken whole when every intermediate has this pattern's node as its only reader
        and the constants are the pattern's; True once added."""
        if len(node.input) != 2:
            return False
        x = next((n for n in node.input if n not in self.fixed), None)
        b = self._scalar(self._other(node, x) or "") if x is not None else None
        if b is None or not np.isfinite(b):
            return False
        trail = [index]
        step = self._only_reader(node.output[0], ("Clip",))
        if step is None or step[1].input[0] != node.output[0]:
            return False
        bounds = self._clip_bounds(step[1])
        if isinstance(bounds, str) or bounds[0] != 0.0 or not 0.0 < bounds[1] < np.inf:
            return False
        u = bounds[1]
        trail.append(step[0])
        value = step[1].output[0]
        multiplied = divided = False
        for _ in range(2):  # the product with x and the division by u, in either order
            step = self._only_reader(value, ("Mul", "Div"))
            if step is None:
                return False
            i, op = step
            if op.op_type == "Mul" and self._other(op, value) == x and not multiplied:
                multiplied = True
            elif self._divides_by(op, value, u) and not divided:
                divided = True
            else:
                return False
            trail.append(i)
            value = op.output[0]
        self.consumed_adds.update(trail[1:])
        self._gating(name, tuple(trail), x, value, "hard_swish", 1.0 / u, b / u, "HardSwish")
        return True

    def _per_channel_const(self, name: str, data: str) -> np.ndarray | None:
        """The constant ``name`` as one value or one per channel of ``data``, if it
        broadcasts so against it (a scalar, (C, 1, 1), (1, C, 1, 1) ...), else None."""
        shape = self.const_shape(name)
        rank, channels = self.rank(data), self.channels(data)
        if shape is None or rank is None or len(shape) > rank:
            return None
        if int(np.prod(shape)) == 1:
            return self.const(name).reshape(1)
        axis = self.axis.get(data)
        if axis is None and rank > 2:
            # channels not on one known axis (attention heads split them over two):
            # a constant along axis 1 would not be one per channel
            return None
        if axis is not None and axis != 1:  # channels last: (C,), (1, 1, C) ...
            padded = (1,) * (rank - len(shape)) + tuple(shape)
            width = self.width(data)
            if padded[axis] != width or any(d != 1 for i, d in enumerate(padded) if i != axis):
                return None
        elif not _along_channels(shape, rank, channels):
            return None
        return self.const(name).reshape(-1)

    def op_Mul(self, index, node, name):
        """A product with a constant (one value or one per channel), or with a gate
        (squeeze-and-excitation): scaling the data's channels scales the product's."""
        a, b = node.input[0], node.input[1]
        for data, other in ((a, b), (b, a)):
            if data not in self.fixed and other in self.fixed:
                factor = self._per_channel_const(other, data)
                if factor is None:
                    return "multiplies by a constant that is not per channel"
                if not np.all(np.isfinite(factor)):
                    return "multiplies by a constant that is not finite (Inf or NaN)"
                self.add("mul", [data], name, index, params={"factor": factor})
                return
        for x, y in ((a, b), (b, a)):
            p = self.producer_of(y)
            if p is not None and p.op_type == "Sigmoid" and p.input[0] == x:
                # x * sigmoid(x): a SiLU (not homogeneous), which a gated MLP's product
                # must see as the gate, not as a second carrier of channels
                self.opaque(index, node, name, "x * sigmoid(x), a SiLU (not homogeneous)")
                self.graph.nodes[-1].attrs["fn"] = _silu
                return None
        if self._elementwise_sources(a) & self._elementwise_sources(b):
            # x * f(x) written out: GELU's ``x * (1 + erf(x / sqrt(2)))``, its tanh form
            # (Gemma's GeGLU gate) ... Not homogeneous, and a gated MLP's product must see
            # it as the gate, not as a second carrier of channels.
            why = "x * f(x), an activation that gates its own input (GELU ...): not homogeneous"
            self.opaque(index, node, name, why)
            self.graph.nodes[-1].attrs["fn"] = np.multiply
            return None
        out = self.dims.get(node.output[0])
        if out is None:
            return "its output's shape is not known"

        def match(value: str) -> int:
            """How many of the output's known dims ``value`` has, -1 if it cannot be of
            the output's shape (a symbolic dim, the batch say, fits any)."""
            dims = self.dims.get(value)
            if dims is None or len(dims) != len(out):
                return -1
            pairs = [(d, o) for d, o in zip(dims, out, strict=True) if isinstance(d, int)]
            if any(isinstance(o, int) and d != o for d, o in pairs):
                return -1
            return sum(isinstance(o, int) for _, o in pairs)

        # The data input is the one of the output's shape; the gate broadcasts (or was
        # expanded to it: then either would do, and the better-known one is taken).
        data, gate = (a, b) if match(a) >= match(b) else (b, a)
        if match(a) == match(b) and self._after_activation(a) and not self._after_activation(b):
            # ``0.5 * (x * (1 + tanh(...))) * up``: a GeGLU's gate, scaled by a constant
            # after its activation, is the gate; ``up`` carries the channels
            data, gate = b, a
        if match(data) < 0:
            return "neither input has the output's shape"
        self.add("mul", [data, gate], name, index)

    def _elementwise_sources(self, value: str, limit: int = 16) -> set[str]:
        """``value`` and the values it is computed from through elementwise ops alone (a
        few steps: an activation written out), not through layers or constants."""
        seen, todo = {value}, [value]
        while todo and len(seen) < limit:
            p = self.producer_of(todo.pop())
            if p is None or p.op_type not in _ELEMENTWISE:
                continue
            for n in p.input:
                if n and n not in self.fixed and n not in seen:
                    seen.add(n)
                    todo.append(n)
        return seen

    def _after_activation(self, value: str) -> bool:
        """Whether ``value`` is computed, through elementwise ops alone, from the output of
        an activation that is not homogeneous (erf, tanh, sigmoid, exp)."""
        producers = (self.producer_of(v) for v in self._elementwise_sources(value))
        return any(p is not None and p.op_type in _ACTIVATIONS for p in producers)

    def op_Div(self, index, node, name):
        x, d = node.input[0], node.input[1]
        if d not in self.fixed:
            return "its divisor is not a constant"
        divisor = self._per_channel_const(d, x)
        if divisor is None:
            return "divides by a constant that is not per channel"
        if np.any(np.isnan(divisor)):
            return "divides by NaN"
        if np.any(divisor == 0):
            return "divides by zero"
        factor = 1.0 / divisor.astype(np.float64)
        self.add("mul", [x], name, index, params={"factor": factor})

    def op_Sum(self, index, node, name):
        if len(node.input) == 1:
            self.add("identity", [node.input[0]], name, index)
            return
        return self.op_Add(index, node, name)

    def op_Add(self, index, node, name):
        """A residual sum of same-shape tensors (a region gives its inputs one scale); or
        the end of a rotary embedding (:mod:`.ops_rotary`)."""
        if index in self.rotaries:
            return self.rotary_at(index, name)
        if len(node.input) < 2:
            return "it has one input"
        if any(n in self.fixed for n in node.input):
            if self._decomposed_hard_swish(index, node, name):
                return None
            # x + c is an affine map, not a homogeneous one: the constant would have to
            # scale with the channel (not translated yet). The statistics follow it.
            x = next((n for n in node.input if n not in self.fixed), None)
            if x is not None and len(node.input) == 2:
                shift = self._per_channel_const(self._other(node, x) or "", x)
                if shift is not None and np.all(np.isfinite(shift)):
                    self.opaque(index, node, name, "adds a constant")
                    self.graph.nodes[-1].attrs["shift"] = shift.astype(np.float64)
                    return None
            return "adds a constant"
        ranks = {self.rank(n) for n in node.input}
        if None in ranks:
            return "the shapes of its inputs are not known"
        dims = [self.dims[n] for n in node.input]

        def same(a, b) -> bool:  # an unknown size (the batch) matches any
            return all(x is None or y is None or x == y for x, y in zip(a, b, strict=True))

        if len(ranks) != 1 or not all(same(d, dims[0]) for d in dims):
            return "it broadcasts (a residual Add sums tensors of one shape)"
        self.add("add", list(node.input), name, index)
