"""Handlers of the ops over spatial axes: Pad, pools, ReduceMean, Resize / Upsample."""

from __future__ import annotations

import numpy as np

from .proto import _attrs, _text
from .shapes import _ceil_extra, _explicit_pads

_RESIZE_MODES = frozenset({"nearest", "linear", "cubic", "bilinear"})  # bilinear: Upsample 7
_COORDINATE_MODES = frozenset(
    {
        "half_pixel",
        "half_pixel_symmetric",
        "pytorch_half_pixel",
        "align_corners",
        "asymmetric",
        "tf_half_pixel_for_nn",
        "tf_crop_and_resize",
    }
)


class _SpatialOps:
    """Mixed into :class:`~.reader._Reader`, which dispatches to the ``op_*`` methods."""

    def op_Pad(self, index, node, name):
        """Zero padding, and the modes that copy a channel's own values (reflect, edge,
        wrap), of spatial axes: homogeneous per channel. Padding with another constant
        is not (the constant does not scale with the channel)."""
        a = _attrs(node)
        mode = _text(a.get("mode", "constant"))
        if mode not in ("constant", "reflect", "edge", "wrap"):
            return f"mode={mode} is not known"
        if self.opset < 11:
            pads, value = list(a.get("pads", [])), float(a.get("value", 0.0))
        else:
            pads_arr = self.const(node.input[1]) if len(node.input) > 1 else None
            if pads_arr is None:
                return "its pads are not constant"
            pads = [int(p) for p in pads_arr.reshape(-1)]
            cv = self.const(node.input[2]) if len(node.input) > 2 and node.input[2] else None
            if len(node.input) > 2 and node.input[2] and cv is None and mode == "constant":
                return "its constant_value is not a constant"
            value = 0.0 if cv is None else float(np.asarray(cv).reshape(-1)[0])
            if len(node.input) > 3 and node.input[3]:
                # Opset 18's axes: pads for those axes only; the others get none.
                axes = self.const(node.input[3])
                rank = self.rank(node.input[0])
                if axes is None or rank is None:
                    return "its axes or its input's rank are not known"
                axes = [int(x) % rank for x in axes.reshape(-1)]
                full = [0] * (2 * rank)
                for k, ax in enumerate(axes):
                    full[ax], full[rank + ax] = pads[k], pads[len(axes) + k]
                pads = full
        rank = len(pads) // 2
        if mode == "constant" and value != 0.0:
            return f"mode=constant with value {value:g}: a constant does not scale with the channel"
        if rank < 3:
            return "its input has no spatial axes"
        if any(pads[i] for i in (0, 1, rank, rank + 1)):
            return "it pads the batch or channel axis"
        spatial = pads[2:rank] + pads[rank + 2 :]
        if any(p < 0 for p in spatial):
            return "it crops (negative pads)"
        attrs = {"pads": tuple(spatial)}
        if mode != "constant":
            attrs["mode"] = mode
        self.add("pad", [node.input[0]], name, index, attrs=attrs)

    def _pool_attrs(self, node, average: bool) -> dict | str:
        a = _attrs(node)
        if "kernel_shape" not in a:
            return "it has no kernel_shape"
        kernel = tuple(a["kernel_shape"])
        nd = len(kernel)
        stride = tuple(a.get("strides", (1,) * nd))
        dilation = tuple(a.get("dilations", (1,) * nd))
        dims = self.dims.get(node.input[0])
        pads = _explicit_pads(a, nd, dims, kernel, stride, dilation)
        if pads is None:
            return "auto_pad needs the input's spatial size"
        count_pad = bool(a.get("count_include_pad", 0))
        if int(a.get("ceil_mode", 0)):
            # Rounding the output size up adds windows that hang over the end: the same
            # as more end padding, which a max pool ignores, and so does an average that
            # does not count padding (one that does would count it, unlike ONNX).
            extra = _ceil_extra(dims, nd, kernel, stride, dilation, pads)
            if extra is None:
                return "ceil_mode=1 needs the input's spatial size"
            if any(extra) and average and count_pad:
                return "ceil_mode=1 with count_include_pad=1 is not translated"
            pads = pads[:nd] + tuple(p + e for p, e in zip(pads[nd:], extra, strict=True))
        return {
            "kernel": kernel,
            "stride": stride,
            "pads": pads,
            "dilation": dilation,
            "count_include_pad": count_pad,
        }

    def op_MaxPool(self, index, node, name):
        if len([o for o in node.output if o]) != 1:
            return "its Indices output is used"
        attrs = self._pool_attrs(node, average=False)
        if isinstance(attrs, str):
            return attrs
        self.add("maxpool", [node.input[0]], name, index, outputs=[node.output[0]], attrs=attrs)

    def op_AveragePool(self, index, node, name):
        attrs = self._pool_attrs(node, average=True)
        if isinstance(attrs, str):
            return attrs
        self.add("avgpool", [node.input[0]], name, index, attrs=attrs)

    def reduce_mean_pool(self, index, node, name):
        """ReduceMean (when it is no part of a decomposed norm, see ``ops_norms``): a
        mean over all spatial axes is a global average pool (the ``dynamo=True``
        exporter writes ``x.mean((2, 3))`` so); ``keepdims=0`` also flattens."""
        a = _attrs(node)
        rank = self.rank(node.input[0])
        if self.opset >= 18 and len(node.input) > 1 and node.input[1]:
            axes = self.const(node.input[1])
            if axes is None:
                return "its axes are not constant"
        else:
            axes = a.get("axes")
        if axes is None or np.asarray(axes).size == 0:
            if self.opset >= 18 and int(a.get("noop_with_empty_axes", 0)):
                self.add("identity", [node.input[0]], name, index)  # no axes: a no-op
                return
            return "it reduces every axis, the channels too (no axes given)"
        if rank is None:
            return "its input's rank is not known"
        axes = sorted(int(x) % rank for x in np.asarray(axes).reshape(-1))
        if (
            rank >= 3
            and self.axis.get(node.input[0]) == rank - 1
            and axes == list(range(1, rank - 1))
        ):
            return self._token_mean(index, node, name, rank, int(a.get("keepdims", 1)))
        if rank < 3 or axes != list(range(2, rank)):
            return f"it reduces axes {axes}, not exactly the spatial ones"
        out = node.output[0]
        if int(a.get("keepdims", 1)):
            self.add("global_avgpool", [node.input[0]], name, index)
            return
        pooled = f"{out}::pooled"  # an IR value only: the write-back never sees it
        self.add("global_avgpool", [node.input[0]], name, index, outputs=[pooled])
        self.add("flatten", [pooled], f"{name}::flatten", index, outputs=[out])

    def _token_mean(self, index, node, name, rank: int, keepdims: int):
        """The mean over the tokens (every axis but the batch and the channels, last) of
        a channel-last tensor: in the IR, a transpose to channels first, a global
        average pool, and a flatten or the transpose back (IR values only)."""
        x, out = node.input[0], node.output[0]
        dims = self.dims.get(x)
        first = f"{out}::channels_first"
        perm = (0, rank - 1, *range(1, rank - 1))
        self.add(
            "transpose", [x], f"{name}::transpose", index, outputs=[first], attrs={"perm": perm}
        )
        pooled = f"{out}::pooled"
        self.add("global_avgpool", [first], name, index, outputs=[pooled])
        if dims is not None:
            self.graph.values[pooled].shape = (dims[0], dims[-1], *(1,) * (rank - 2))
        if keepdims:
            back = (0, *range(2, rank), 1)
            self.add(
                "transpose", [pooled], f"{name}::back", index, outputs=[out], attrs={"perm": back}
            )
        else:
            self.add("flatten", [pooled], f"{name}::flatten", index, outputs=[out])

    def op_Resize(self, index, node, name):
        """Resize and Upsample compute each output value as a combination, with weights
        that depend on coordinates alone, of one channel's input values (nearest, linear,
        cubic; antialias, exclude_outside and cubic_coeff_a only change the weights): so
        scaling a channel scales its output. Exact where the batch and channel axes are
        read one to one and no constant is sampled (tf_crop_and_resize's
        extrapolation_value, unless 0)."""
        a = _attrs(node)
        mode = _text(a.get("mode", "nearest"))
        if mode not in _RESIZE_MODES:
            return f"mode={mode} is not known"
        resize11 = node.op_type == "Resize" and self.opset >= 11
        ctm = _text(a.get("coordinate_transformation_mode", "half_pixel"))
        ctm = ctm if resize11 else "asymmetric"  # Resize 10, Upsample
        if ctm not in _COORDINATE_MODES:
            return f"coordinate_transformation_mode={ctm} is not known"
        src, dst = self.dims.get(node.input[0]), self.dims.get(node.output[0])
        rank = len(src) if src is not None else None
        inputs = list(node.input) + [""] * 4
        scales = sizes = None
        if self.opset < 9 and node.op_type == "Upsample":
            scales = a.get("scales")
        elif not resize11:  # X, scales
            scales = self.const(inputs[1])
        else:  # X, roi, scales, sizes
            scales, sizes = self.const(inputs[2]), self.const(inputs[3])
        if scales is not None and np.asarray(scales).size == 0:
            scales = None
        # Opset 18's axes: roi, scales and sizes are given for these axes only.
        axes = a.get("axes") if resize11 else None
        if axes is not None:
            if rank is None:
                return "it has axes, but its input's rank is not known"
            axes = [int(x) % rank for x in axes]
        elif rank is not None:
            axes = list(range(rank))
        if scales is not None:
            scales = [float(f) for f in np.asarray(scales).reshape(-1)]
        elif sizes is not None:
            sizes = [int(n) for n in sizes.reshape(-1)]
            if (
                axes is None
                or len(sizes) != len(axes)
                or not all(isinstance(src[ax], int) and src[ax] > 0 for ax in axes)
            ):
                return "it is given sizes, but its input's size is not known"
            scales = [n / src[ax] for n, ax in zip(sizes, axes, strict=True)]
            policy = _text(a.get("keep_aspect_ratio_policy", "stretch"))
            if policy in ("not_larger", "not_smaller"):  # one scale for every axis listed
                scales = [(min if policy == "not_larger" else max)(scales)] * len(scales)
        elif (
            all(n in self.fixed for n in inputs[1:4] if n)
            and src is not None
            and dst is not None
            and len(src) == len(dst)
            and all(isinstance(d, int) and d > 0 for d in (*src, *dst))
        ):
            # Sizes computed from shapes: the output size shape inference found.
            scales, axes = [d / s for s, d in zip(src, dst, strict=True)], list(range(rank))
        else:
            return "its scales are not constant"
        if axes is None:
            axes = list(range(len(scales)))
        if len(scales) != len(axes):
            return f"it has {len(scales)} scales for {len(axes)} axes"
        scale_of = dict(zip(axes, scales, strict=True))
        read = [(ax, what) for ax, what in ((0, "batch"), (1, "channel")) if ax in scale_of]
        for ax, what in read:
            if scale_of[ax] != 1.0:
                return f"it resizes the {what} axis (scale {scale_of[ax]:g})"
        if ctm == "tf_crop_and_resize":
            extrapolation = float(a.get("extrapolation_value", 0.0))
            if extrapolation != 0.0:
                return (
                    "coordinate_transformation_mode=tf_crop_and_resize with "
                    f"extrapolation_value={extrapolation:g}: what it samples outside the "
                    "input is that constant, which does not scale with the channel"
                )
            roi = self.const(inputs[1])
            if roi is None:
                return "coordinate_transformation_mode=tf_crop_and_resize: its roi is not constant"
            roi = [float(r) for r in roi.reshape(-1)]
            if len(roi) != 2 * len(axes):
                return f"its roi has {len(roi)} values for {len(axes)} axes"
            for ax, what in read:
                k = axes.index(ax)
                if (roi[k], roi[len(axes) + k]) != (0.0, 1.0):
                    return (
                        "coordinate_transformation_mode=tf_crop_and_resize with roi "
                        f"({roi[k]:g}, {roi[len(axes) + k]:g}) on the {what} axis: it mixes "
                        "or crops that axis"
                    )
        if ctm == "tf_half_pixel_for_nn" and read:
            # It samples x + 1/2 on an axis of scale 1: only rounding down reads x itself.
            rounding = _text(a.get("nearest_mode", "round_prefer_floor"))
            if mode != "nearest" or rounding not in ("round_prefer_floor", "floor"):
                how = f"mode={mode}" if mode != "nearest" else f"nearest_mode={rounding}"
                return (
                    f"coordinate_transformation_mode=tf_half_pixel_for_nn with {how}: by the "
                    "spec it reads channel c + 1 or mixes c and c + 1"
                )
        last = rank if rank is not None else len(scales)
        spatial = tuple(scale_of.get(ax, 1.0) for ax in range(2, last))
        self.add("resize", [node.input[0]], name, index, attrs={"mode": mode, "scales": spatial})

    def op_Upsample(self, index, node, name):
        return self.op_Resize(index, node, name)

    def op_GlobalAveragePool(self, index, node, name):
        self.add("global_avgpool", [node.input[0]], name, index)
