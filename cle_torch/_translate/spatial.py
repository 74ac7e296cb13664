"""Ops over the spatial axes, per channel: zero pad, max / average / adaptive average
pools, resize (upsample, interpolate), a mean over the spatial axes or over the tokens
of a channel-last value.

A mixin of ``_Translator`` (``translator.py``): its methods use the translator's state
and helpers.
"""

from __future__ import annotations

from .._optable import (
    _F_ADAPTIVE_AVG,
    _F_AVGPOOL,
    _F_MAXPOOL,
    _bind,
    _ints,
    _Opaque,
    _sig_adaptive,
    _sig_avgpool,
    _sig_interpolate,
    _sig_maxpool,
    _sig_mean,
    _sig_pad,
)
from .._trace import ADAPTIVE_AVG_MODULES, AVGPOOL_MODULES, MAXPOOL_MODULES


class Spatial:
    # --- module calls --------------------------------------------------------------------
    def m_maxpool(self, node, m, base, x) -> None:
        self.pool(
            node, x, "maxpool", MAXPOOL_MODULES[base], m.kernel_size, m.stride, m.padding,
            dilation=m.dilation, ceil_mode=m.ceil_mode, return_indices=m.return_indices,
        )  # fmt: skip

    def m_avgpool(self, node, m, base, x) -> None:
        self.pool(
            node, x, "avgpool", AVGPOOL_MODULES[base], m.kernel_size, m.stride, m.padding,
            ceil_mode=m.ceil_mode, count_include_pad=m.count_include_pad,
            divisor_override=getattr(m, "divisor_override", None),
        )  # fmt: skip

    def m_adaptive_avg(self, node, m, base, x) -> None:
        self.adaptive_avg(node, x, ADAPTIVE_AVG_MODULES[base], m.output_size)

    def m_upsample(self, node, m, base, x) -> None:
        self.resize(node, x, m.scale_factor, m.mode)

    def m_constant_pad(self, node, m, base, x) -> None:
        if float(m.value) != 0.0:
            raise _Opaque(f"value={m.value}: {_CONSTANT_PAD}")
        self.pad(node, x, list(m.padding), nd=len(m.padding) // 2)

    # --- pad and pools -------------------------------------------------------------------
    def pad(self, node, x, pad, nd: int | None) -> None:
        if not isinstance(pad, (list, tuple)) or not all(
            isinstance(p, int) and not isinstance(p, bool) for p in pad
        ):
            raise _Opaque("pads are not static ints")
        if len(pad) % 2 or any(p < 0 for p in pad):
            raise _Opaque("negative or odd pads")
        rank = self.rank.get(x.name)
        if rank is None and nd is None:
            raise _Opaque("input rank unknown")
        spatial = (rank if rank is not None else nd + 2) - 2
        if len(pad) // 2 > spatial:
            raise _Opaque("pads the batch or channel axis")
        begins, ends = [0] * spatial, [0] * spatial
        for i in range(len(pad) // 2):  # torch lists the last axis first
            begins[spatial - 1 - i], ends[spatial - 1 - i] = pad[2 * i], pad[2 * i + 1]
        self.unary(node, x, "pad", attrs={"pads": tuple(begins + ends)})

    def f_pad(self, node, fn, args, kwargs) -> None:
        b = _bind(_sig_pad, args, kwargs)
        if b["mode"] != "constant":
            # exact, but the IR's pad is a zero padding (high-bias absorption reads it so)
            raise _Opaque(f"mode={b['mode']!r}: only a zero padding is translated")
        if b["value"] not in (None, 0, 0.0):
            raise _Opaque(f"value={b['value']}: {_CONSTANT_PAD}")
        self.pad(node, self.data(b["input"]), b["pad"], nd=None)

    def pool(
        self,
        node,
        x,
        op,
        nd,
        kernel,
        stride,
        padding,
        *,
        dilation=1,
        ceil_mode=False,
        return_indices=False,
        count_include_pad=False,
        divisor_override=None,
    ) -> None:
        # ceil_mode: the IR's pools round down; divisor_override: a shift of the input
        # is no longer a shift of the output (high-bias absorption passes avgpools)
        for arg, value in (("ceil_mode", ceil_mode), ("return_indices", return_indices)):
            if value:
                raise _Opaque(f"{arg}={value}")
        if divisor_override is not None:
            raise _Opaque(f"divisor_override={divisor_override}")
        rank = self.rank.get(x.name)
        if rank is not None and rank != nd + 2:
            raise _Opaque(f"input of rank {rank}")
        k = _ints(kernel, nd, "kernel")
        no_stride = stride is None or (isinstance(stride, (list, tuple)) and not stride)
        s = k if no_stride else _ints(stride, nd, "stride")  # torch: no stride, the kernel's
        p = _ints(padding, nd, "padding")
        attrs = {"kernel": k, "stride": s, "pads": p + p, "dilation": _ints(dilation, nd, "")}
        if op == "avgpool":
            attrs["count_include_pad"] = bool(count_include_pad)
        self.unary(node, x, op, attrs=attrs)

    def f_maxpool(self, node, fn, args, kwargs) -> None:
        b = _bind(_sig_maxpool, args, kwargs)
        self.pool(
            node, self.data(b["input"]), "maxpool", _F_MAXPOOL[fn], b["kernel_size"], b["stride"],
            b["padding"], dilation=b["dilation"], ceil_mode=b["ceil_mode"],
            return_indices=b["return_indices"],
        )  # fmt: skip

    def f_avgpool(self, node, fn, args, kwargs) -> None:
        b = _bind(_sig_avgpool, args, kwargs)
        self.pool(
            node, self.data(b["input"]), "avgpool", _F_AVGPOOL[fn], b["kernel_size"], b["stride"],
            b["padding"], ceil_mode=b["ceil_mode"], count_include_pad=b["count_include_pad"],
            divisor_override=b["divisor_override"],
        )  # fmt: skip

    def adaptive_avg(self, node, x, nd, output_size) -> None:
        if any(s != 1 for s in _ints(output_size, nd, "output size")):
            raise _Opaque(f"output_size={output_size}: only 1 is a global pool")
        rank = self.rank.get(x.name)
        if rank is not None and rank != nd + 2:
            raise _Opaque(f"input of rank {rank}")
        self.unary(node, x, "global_avgpool")

    def resize(self, node, x, scale_factor, mode) -> None:
        """Upsampling or interpolation (any mode: each output is a fixed combination of
        one channel's inputs, so scaling a channel scales its output). The scales are
        kept where given (for the positions the noise objective counts)."""
        rank = self.rank.get(x.name)
        if rank is not None and rank < 3:
            raise _Opaque(f"input of rank {rank}")
        scales = None
        if scale_factor is not None and rank is not None:
            factors = _ints(scale_factor, rank - 2, "scale factor", (int, float))
            scales = tuple(float(f) for f in factors)
        self.unary(node, x, "resize", attrs={"mode": str(mode), "scales": scales})

    def f_interpolate(self, node, fn, args, kwargs) -> None:
        b = _bind(_sig_interpolate, args, kwargs)
        self.resize(node, self.data(b["input"]), b["scale_factor"], b["mode"])

    def f_adaptive_avg(self, node, fn, args, kwargs) -> None:
        b = _bind(_sig_adaptive, args, kwargs)
        self.adaptive_avg(node, self.data(b["input"]), _F_ADAPTIVE_AVG[fn], b["output_size"])

    def f_mean(self, node, fn, args, kwargs) -> None:
        b = _bind(_sig_mean, args, kwargs)
        x = self.data(b["input"])
        rank, dims = self.rank.get(x.name), b["dim"]
        dims = (dims,) if isinstance(dims, int) else dims
        if b["dtype"] is not None:
            raise _Opaque(f"dtype={b['dtype']}")
        if (
            rank is None
            or rank < 3
            or not isinstance(dims, (list, tuple))
            or not all(isinstance(d, int) for d in dims)
        ):
            raise _Opaque(f"dim={b['dim']}: not a mean over the spatial axes or the tokens")
        axes = sorted(d % rank for d in dims)
        if axes == list(range(1, rank - 1)) and x.name in self.moved:
            self.token_mean(node, x, rank, b["keepdim"])
            return
        if axes != list(range(2, rank)):
            over = "the channels (axis 1)" if 1 in axes and x.name not in self.moved else ""
            raise _Opaque(
                f"dim={b['dim']}: a mean over {over or f'axes {tuple(axes)}'}, not over the "
                "spatial axes (2, ...) nor the tokens (1, ..., rank - 2) of a channel-last value"
            )
        if b["keepdim"]:
            self.unary(node, x, "global_avgpool")
            return
        # (N, C, *s) -> (N, C): a global average pool, then a flatten of (N, C, 1, ...).
        pooled = self.pooled(node, x, x.name, 1)
        self.emit("flatten", node, [pooled], rank=2, channels=self.chan.get(x.name))
        self.point.add(node.name)

    def token_mean(self, node, x, rank: int, keepdim: bool) -> None:
        """The mean over the tokens (every axis but the batch and the last) of a value
        whose channels may lie last (``(B, T, C).mean(1)``, mean pooling before a head):
        in the IR, as the ONNX reader writes it, a transpose to channels first, a global
        average pool, then a flatten or (``keepdim``) the transpose back. Where the
        channels are not last, the core refuses the pool with the reason."""
        first = f"{node.name}:channels_first"
        perm = (0, rank - 1, *range(1, rank - 1))
        name = self.unique(f"{node.name}:transpose")
        self.ir.add_node("transpose", [x.name], name=name, outputs=[first], attrs={"perm": perm})
        self.cap.ir_names[name] = node.name
        pooled = self.pooled(node, x, first, -1)
        if keepdim:
            back = (0, *range(2, rank), 1)
            self.emit("transpose", node, [pooled], rank=rank, channels=None, attrs={"perm": back})
        else:
            self.emit("flatten", node, [pooled], rank=2, channels=None)

    def pooled(self, node, x, src: str, channel_axis: int) -> str:
        """A global average pool of ``src`` (an IR value of ``node``'s, with
        ``x``'s channels on ``channel_axis`` of ``x``'s shape); returns its output."""
        pooled, name = f"{node.name}:pooled", self.unique(f"{node.name}:pool")
        self.ir.add_node("global_avgpool", [src], name=name, outputs=[pooled])
        shape = self.fx_shapes.get(x.name)
        if shape is not None:
            rest = (1,) * (len(shape) - 2)
            self.ir.values[pooled].shape = (shape[0], shape[channel_axis], *rest)
        self.cap.ir_names[name] = node.name
        return pooled


_CONSTANT_PAD = "a constant pad is exact only with 0 (a constant does not scale)"
