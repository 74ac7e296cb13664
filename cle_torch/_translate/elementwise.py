"""Activations (ReLU, ReLU6 / Hardtanh / clamp, LeakyReLU, PReLU, a per-channel
clamp) and the ops that combine tensors: add, mul (by a number or a gate), cat.

A mixin of ``_Translator`` (``translator.py``): its methods use the translator's state
and helpers.
"""

from __future__ import annotations

import math
import operator

import numpy as np
import torch

from .._optable import (
    _INPLACE_FUNCTIONS,
    _bind,
    _number,
    _numpy,
    _Opaque,
    _sig_add,
    _sig_cat,
    _sig_clamp,
    _sig_clamp_max,
    _sig_clamp_min,
    _sig_div,
    _sig_hardtanh,
    _sig_leaky,
    _sig_prelu,
    _sig_unary,
)


class Elementwise:
    # --- module calls --------------------------------------------------------------------
    def m_relu(self, node, m, base, x) -> None:
        self.activation(node, x, "relu", m.inplace)

    def m_clip(self, node, m, base, x) -> None:  # ReLU6, Hardtanh
        self.clip(node, x, float(m.min_val), float(m.max_val), m.inplace)

    def m_leaky_relu(self, node, m, base, x) -> None:
        self.activation(node, x, "leaky_relu", m.inplace, {"alpha": float(m.negative_slope)})

    def m_prelu(self, node, m, base, x) -> None:
        self.prelu(node, x, m.weight, f"{node.target}.weight")

    def m_per_channel_clamp(self, node, m, base, x) -> None:
        if self.chan.get(x.name) not in (None, m.channels):
            raise _Opaque("channel count does not match")
        lo, hi = _numpy(m.lo).reshape(-1), _numpy(m.hi).reshape(-1)
        self.unary(node, x, "clip", params={"lo": lo, "hi": hi})

    # --- activations ---------------------------------------------------------------------
    def activation(self, node, x, op, inplace, attrs=None) -> None:
        x = self.data(x)
        if inplace and not self.inplace_ok(x):
            raise _Opaque("in place, and its input is also read elsewhere")
        self.unary(node, x, op, attrs=attrs, alias=inplace)

    def clip(self, node, x, lo: float, hi: float, inplace: bool) -> None:
        if np.isnan(lo) or np.isnan(hi) or lo > hi:
            raise _Opaque(f"invalid bounds min={lo}, max={hi}")
        x = self.data(x)
        if inplace and not self.inplace_ok(x):
            raise _Opaque("in place, and its input is also read elsewhere")
        self.unary(node, x, "clip", params={"lo": np.array(lo), "hi": np.array(hi)}, alias=inplace)

    def prelu(self, node, x, weight: torch.Tensor, weight_q: str) -> None:
        slope = _numpy(weight).reshape(-1)
        if slope.size > 1:
            rank = self.rank.get(x.name)
            if rank is not None and rank < 2:
                raise _Opaque("per-channel slope on an unbatched 1-D input")
            if self.chan.get(x.name) not in (None, slope.size):
                raise _Opaque("slope count does not match the channels")
        ids = {"slope": self.param_id(weight_q)}
        self.unary(node, x, "prelu", params={"slope": slope}, param_ids=ids)

    def f_relu(self, node, fn, args, kwargs) -> None:
        b = _bind(_sig_unary, args, kwargs)
        inplace = fn in _INPLACE_FUNCTIONS or fn == "relu_" or bool(b["inplace"])
        self.activation(node, b["input"], "relu", inplace)

    def f_relu6(self, node, fn, args, kwargs) -> None:
        b = _bind(_sig_unary, args, kwargs)
        self.clip(node, b["input"], 0.0, 6.0, bool(b["inplace"]))

    def f_hardtanh(self, node, fn, args, kwargs) -> None:
        b = _bind(_sig_hardtanh, args, kwargs)
        lo, hi = _number(b["min_val"], "min_val"), _number(b["max_val"], "max_val")
        self.clip(node, b["input"], lo, hi, fn in _INPLACE_FUNCTIONS or bool(b["inplace"]))

    def f_leaky_relu(self, node, fn, args, kwargs) -> None:
        b = _bind(_sig_leaky, args, kwargs)
        alpha = _number(b["negative_slope"], "negative_slope")
        inplace = fn in _INPLACE_FUNCTIONS or bool(b["inplace"])
        self.activation(node, b["input"], "leaky_relu", inplace, {"alpha": alpha})

    def f_clamp(self, node, fn, args, kwargs) -> None:
        name = fn if isinstance(fn, str) else fn.__name__
        sig = {"clamp_min": _sig_clamp_min, "clamp_max": _sig_clamp_max}.get(
            name.rstrip("_"), _sig_clamp
        )
        b = _bind(sig, args, kwargs)
        lo, hi = b.get("min"), b.get("max")
        if lo is None and hi is None:
            raise _Opaque("no bounds")
        lo = -np.inf if lo is None else _number(lo, "min")
        hi = np.inf if hi is None else _number(hi, "max")
        self.clip(node, b["input"], lo, hi, name.endswith("_"))

    def f_prelu(self, node, fn, args, kwargs) -> None:
        b = _bind(_sig_prelu, args, kwargs)
        weight, weight_q = self.param(b["weight"], "slope")
        self.prelu(node, self.data(b["input"]), weight, weight_q)

    # --- structure -----------------------------------------------------------------------
    def f_add(self, node, fn, args, kwargs) -> None:
        b = _bind(_sig_add, args, kwargs)
        for other in (b["input"], b["other"]):
            if isinstance(other, (int, float)):
                raise _Opaque(f"adds the number {other}, which does not scale with the channel")
        try:
            a, c = self.data(b["input"]), self.data(b["other"])
        except _Opaque:
            raise _Opaque("not a sum of two tensors of the graph") from None
        if b["alpha"] != 1:
            raise _Opaque(f"alpha={b['alpha']}: the IR's add has no factor")
        inplace = fn in (operator.iadd, "add_")
        if inplace and not self.inplace_ok(a):
            raise _Opaque("in place, and its input is also read elsewhere")
        ra, rc = self.rank.get(a.name), self.rank.get(c.name)
        if ra is not None and rc is not None and ra != rc:
            raise _Opaque("operands of different rank (broadcasting)")
        ca, cc = self.chan.get(a.name), self.chan.get(c.name)
        if ca is not None and cc is not None and ca != cc:
            raise _Opaque("operands with different channel counts (broadcasting)")
        rank, channels = (ra if ra is not None else rc), (ca if ca is not None else cc)
        self.emit("add", node, [a, c], rank=rank, channels=channels, alias=a if inplace else None)

    def f_mul(self, node, fn, args, kwargs) -> None:
        """A product with a number (a constant factor), or with a gate: a tensor of
        spatial size 1 (squeeze-and-excitation's, after a global pool). Scaling the
        feature map's channels scales the product's; the gate stays unscaled."""
        if fn == "mul_":
            raise _Opaque("in place")
        if len(args) != 2 or kwargs:
            raise _Opaque("not a product of two operands")
        a, c = args
        for x, f in ((a, c), (c, a)):
            if isinstance(f, (int, float)) and not isinstance(f, bool):
                if not math.isfinite(f):
                    raise _Opaque("a factor that is not finite")
                self.unary(node, self.data(x), "mul", params={"factor": np.array([float(f)])})
                return
        try:
            x, g = self.data(a), self.data(c)
        except _Opaque:
            self.channel_factor(node, a, c)
            return
        shape = self.fx_shapes.get(x.name)
        if (
            shape is not None
            and shape == self.fx_shapes.get(g.name)
            and not (x.name in self.point or g.name in self.point)
        ):
            # Two tensors of one shape (a gated MLP's silu(gate) * up): the core decides
            # which one carries the channels.
            self.emit("mul", node, [x, g], rank=len(shape), channels=None)
            return
        if (x.name in self.point) == (g.name in self.point):
            raise _Opaque("not a gate: neither operand (or both) is known to be pooled")
        if x.name in self.point:
            x, g = g, x
        rank, channels = self.rank.get(x.name), self.chan.get(x.name)
        if rank is None or channels is None or self.rank.get(g.name) != rank:
            raise _Opaque("a gate of unknown or different rank")
        if self.chan.get(g.name) not in (channels, 1):
            raise _Opaque("the gate's channels do not match")
        self.emit("mul", node, [x, g], rank=rank, channels=channels)

    def channel_factor(self, node, a, c) -> None:
        """A product with a parameter of one value per channel along one axis (ConvNeXt's
        layer scale ``gamma * x`` on ``(B, H, W, C)``): a constant factor, which a
        region passes through. The axis it lies along goes with it; the core checks that
        it is the channels' axis."""
        for x, f in ((a, c), (c, a)):
            try:
                data = self.data(x)
                factor, _ = self.param(f, "factor")
            except _Opaque:
                continue
            rank = self.rank.get(data.name)
            shape = tuple(factor.shape)
            while shape and shape[0] == 1:  # leading ones broadcast away
                shape = shape[1:]
            sizes = [d for d in shape if d != 1]
            if rank is None or len(sizes) != 1 or len(shape) > rank:
                break
            axis = rank - len(shape) + shape.index(sizes[0])
            values = factor.detach().cpu().double().numpy().reshape(-1)
            if not np.all(np.isfinite(values)):
                raise _Opaque("a factor that is not finite")
            self.unary(node, data, "mul", params={"factor": values}, attrs={"axis": axis})
            return
        # a tensor factor of another shape: not known to be one number per channel
        raise _Opaque("a factor that is a tensor, not a number, a gate or one value per channel")

    def f_div(self, node, fn, args, kwargs) -> None:
        """A division by a number: a product with its inverse."""
        b = _bind(_sig_div, args, kwargs)
        f = b["other"]
        if b["rounding_mode"] is not None or isinstance(f, bool) or not isinstance(f, (int, float)):
            raise _Opaque("not a division by a number")
        if f == 0 or not math.isfinite(f):
            raise _Opaque(f"a division by {f}")
        self.unary(node, self.data(b["input"]), "mul", params={"factor": np.array([1.0 / f])})

    def f_cat(self, node, fn, args, kwargs) -> None:
        b = _bind(_sig_cat, args, kwargs)
        if not isinstance(b["tensors"], (list, tuple)) or not b["tensors"]:
            raise _Opaque("not a list of tensors")
        xs = [self.data(t) for t in b["tensors"]]
        if any(x.name in self.moved for x in xs):
            raise _Opaque("its inputs may hold their channels on another axis than 1")
        ranks = {self.rank.get(x.name) for x in xs}
        rank = ranks.pop() if len(ranks) == 1 else None
        dim = b["dim"]
        if not isinstance(dim, int) or (dim != 1 and not (rank and dim < 0 and dim + rank == 1)):
            raise _Opaque(f"dim={dim} is not the channel axis")
        chans = [self.chan.get(x.name) for x in xs]
        channels = None if None in chans else sum(chans)
        self.emit("concat", node, xs, rank=rank, channels=channels)
