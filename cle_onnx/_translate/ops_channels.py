"""Handlers of the ops that pass, cut or join the channels: Identity, Cast to the
input's own type, Dropout, Split,
Slice (of the channels, or a ``select`` of positions), Concat, Flatten, Reshape (a
flatten, or a ``reshape`` to a static shape)."""

from __future__ import annotations

import numpy as np

from cle_core.toolkit import LAYOUT_OPS

from .constants import _Dim
from .proto import _attrs, np_dtype


class _ChannelOps:
    """Mixed into :class:`~.reader._Reader`, which dispatches to the ``op_*`` methods."""

    def op_Identity(self, index, node, name):
        self.add("identity", [node.input[0]], name, index)

    def op_Cast(self, index, node, name):
        """A Cast to the type its input already has is the identity: Hugging Face's
        RMSNorm computes in float32 (``x.to(torch.float32)``, ``.to(input_dtype)``) and
        its softmax is cast back to the query's type, which the TorchScript exporter
        writes as ``Cast(to=FLOAT)`` of float32 values. A Cast to another type rounds or
        truncates: not homogeneous, left out."""
        if not self.keeps_type(node):
            return "it converts to another element type"
        self.add("identity", [node.input[0]], name, index)

    def keeps_type(self, node) -> bool:
        """Whether ``node`` is a Cast of a float tensor to its own element type."""
        if node.op_type != "Cast" or node.domain not in ("", "ai.onnx"):
            return False
        source = self.translation.dtypes.get(node.input[0])
        target = np_dtype(int(_attrs(node).get("to", 0)))
        return source is not None and source.kind == "f" and source == target

    def op_Dropout(self, index, node, name):
        """Inference: the identity. Training mode (opset 12's third input) drops
        random values."""
        if len(node.input) > 2 and node.input[2]:
            training = self.const(node.input[2])
            if training is None:
                return "its training_mode is not a constant"
            if bool(np.asarray(training).reshape(-1)[0]):
                return "training_mode=1: it drops random values"
        mask = node.output[1] if len(node.output) > 1 else ""
        if mask and (mask in self.users or mask in {o.name for o in self.model.graph.output}):
            return "its mask output is used"
        self.add("dropout", [node.input[0]], name, index, outputs=[node.output[0]])

    def op_Split(self, index, node, name):
        """A split along the channel axis: one IR ``slice`` per output, at the offsets
        the inferred output widths give. Along another axis (not the batch): one
        ``select`` of consecutive positions per output, which the core follows (the
        channels of a packed q / k / v projection, GPT's ``c_attn(x).split(C, dim=2)``:
        each output keeps some channels whole; or positions)."""
        rank = self.rank(node.input[0])
        if rank is None:
            return "its input's rank is not known"
        axis = int(_attrs(node).get("axis", 0)) % rank
        if axis == 0:
            return "it splits the batch axis"
        if axis != 1:
            return self._split_positions(index, node, name, axis)
        widths = [self.channels(o) if o else None for o in node.output]
        if any(w is None for w in widths) or sum(widths) != self.channels(node.input[0]):
            return "the widths of its outputs are unknown"
        offset = 0
        for k, (out, width) in enumerate(zip(node.output, widths, strict=True)):
            attrs = {"offset": offset, "channels": width}
            self.add("slice", [node.input[0]], f"{name}:{k}", index, outputs=[out], attrs=attrs)
            offset += width

    def _split_positions(self, index, node, name, axis):
        sizes = [
            (self.dims.get(o) or (None,) * (axis + 1))[axis] if o else None for o in node.output
        ]
        total = (self.dims.get(node.input[0]) or (None,) * (axis + 1))[axis]
        if any(not isinstance(w, int) for w in sizes) or sum(sizes) != total:
            return "the sizes of its outputs along the split axis are unknown"
        start = 0
        for k, (out, width) in enumerate(zip(node.output, sizes, strict=True)):
            attrs = {"axis": axis, "index": slice(start, start + width)}
            self.add("select", [node.input[0]], f"{name}:{k}", index, outputs=[out], attrs=attrs)
            start += width

    def op_Slice(self, index, node, name):
        """One axis cut with constant starts, ends and steps: channels ``start`` to
        ``end`` (step 1) of channel-first data (a ``slice``), or positions of another axis
        (a ``select``: ``x[:, 1:]`` of tokens), which the core follows where the axis is
        not the channels'."""
        src, dst = self.dims.get(node.input[0]), self.dims.get(node.output[0])
        if src is None or dst is None or len(src) != len(dst) or len(src) < 2:
            return "its input's or output's shape is not known"
        if self.opset < 10:
            a = _attrs(node)
            args = [None, a.get("starts"), a.get("ends"), a.get("axes"), None]
        else:
            names = list(node.input) + [""] * 5
            args = [self.const(n) if n else None for n in names[:5]]
            if any(n and a is None for n, a in zip(names[1:5], args[1:5], strict=True)):
                return "its starts, ends, axes or steps are not constant"
        if args[1] is None or args[2] is None:
            return "its starts or ends are not given"
        starts, ends = ([int(v) for v in np.asarray(a).reshape(-1)] for a in args[1:3])
        rank = len(src)
        axes = range(len(starts)) if args[3] is None else np.asarray(args[3]).reshape(-1)
        axes = [int(v) % rank for v in axes]
        steps = [1] * len(starts) if args[4] is None else np.asarray(args[4]).reshape(-1)
        steps = [int(v) for v in steps]
        cuts = [
            k
            for k, ax in enumerate(axes)
            if not (
                starts[k] == 0
                and steps[k] == 1
                and ends[k] >= (src[ax] if isinstance(src[ax], int) else 1 << 62)
            )
        ]
        if not cuts:  # every axis kept whole
            self.add("identity", [node.input[0]], name, index)
            return None
        if len(cuts) != 1:
            return "it cuts several axes"
        k = cuts[0]
        ax, step = axes[k], steps[k]
        if ax == 1 and self.axis.get(node.input[0]) in (1, None):
            if step != 1:
                return f"steps {steps}: not a run of channels"
            if not isinstance(src[1], int) or not isinstance(dst[1], int) or dst[1] < 1:
                return "its channel counts are not known"
            start = min(max(starts[k] + src[1] if starts[k] < 0 else starts[k], 0), src[1])
            attrs = {"offset": start, "channels": dst[1]}
            self.add("slice", [node.input[0]], name, index, attrs=attrs)
            return None
        if step < 1:
            return f"step {step}: it reverses the positions"
        cut = slice(starts[k], ends[k], step)
        self.add("select", [node.input[0]], name, index, attrs={"axis": ax, "index": cut})
        return None

    def op_Concat(self, index, node, name):
        axis = int(_attrs(node).get("axis", 0))
        rank = self.rank(node.output[0])
        if rank is None:
            return "its output's rank is not known"
        if axis % rank != 1:
            return f"it concatenates along axis {axis}, not the channels"
        if any(n in self.fixed for n in node.input):
            return "it concatenates a constant"
        self.add("concat", list(node.input), name, index)

    def op_Flatten(self, index, node, name):
        axis = int(_attrs(node).get("axis", 1))
        rank = self.rank(node.input[0])
        if rank is None:
            return "its input's rank is not known"
        if rank < 2 or axis % rank != 1:
            return f"axis={axis}: it does not keep the batch axis apart from the channels"
        self.add("flatten", [node.input[0]], name, index)

    def op_Reshape(self, index, node, name):
        """A flatten of channel-first data ``(N, C, ...) -> (N, C * ...)``, else a
        ``reshape`` to the static shape it makes (the core follows the channels)."""
        src = self.dims.get(node.input[0])
        if src is None or len(src) < 2:
            return "its input's shape is not known"
        if not all(isinstance(d, int) for d in src[1:]):
            # the batch after the tokens ((T, B, C), nn.MultiheadAttention's layout)
            if not isinstance(src[0], int) or sum(not isinstance(d, int) for d in src) > 1:
                return _dynamic(src)
            shape = self._shape_beside_the_batch(node, src)
            if shape is None:
                return "its output's shape is not known (one size may be unknown, the batch)"
            self.add("reshape", [node.input[0]], name, index, attrs={"shape": shape})
            return None
        why = None
        axis = self.axis.get(node.input[0])
        if axis == 1 or (axis is None and not self._heads(node.input[0])):
            why = self._flatten(index, node, name, src)
            if why is None:
                return None
        shape = self._static_shape(node, src)
        if shape is None:
            return why or "its output's shape is not static (only the batch may be unknown)"
        self.add("reshape", [node.input[0]], name, index, attrs={"shape": shape})

    def _heads(self, value: str) -> bool:
        """Whether ``value`` comes from an op that moves channels between axes (the core
        follows them there, spread over several axes as between a heads split and its
        merge), so that a Reshape of it is the core's ``reshape``, not a flatten of
        channel-first data: ``(T, 1, H, D) -> (T, H * D)`` merges the heads of a batch
        of one."""
        v = self.graph.values.get(value)
        return v is not None and v.producer is not None and v.producer.op in LAYOUT_OPS

    def _shape_beside_the_batch(self, node, src) -> tuple | None:
        """The output shape of a Reshape whose input has one unknown size (the batch)
        on another axis than the first: from shape inference or its shape input, with
        one unknown size (None) on the output too, which the number of elements then
        fixes (the core follows the channels so, :func:`cle_core._layout.reshape_layout`)."""
        dst = self.dims.get(node.output[0])
        if dst is not None and sum(not isinstance(d, int) for d in dst) == 1:
            return tuple(d if isinstance(d, int) else None for d in dst)
        target = self.const(node.input[1])
        if target is None:
            return None
        zero_copies = not int(_attrs(node).get("allowzero", 0))
        out: list = []
        for i, d in enumerate(target.reshape(-1)):
            if isinstance(d, _Dim) or int(d) == -1:
                out.append(None)  # a size read with Shape (a product of it) or inferred
            elif int(d) == 0 and zero_copies:
                out.append(src[i] if i < len(src) else "?")
            else:
                out.append(int(d))
        if "?" in out or out.count(None) != 1:
            return None
        return tuple(out)

    def _static_shape(self, node, src) -> tuple | None:
        """The output shape of a Reshape, from shape inference or its shape input with 0
        and -1 resolved; None at axis 0 only, for an unknown batch kept as it is."""
        dst = self.dims.get(node.output[0])
        if dst is not None and all(isinstance(d, int) for d in dst[1:]):
            if dst[0] is None and src[0] is not None:
                return None
            if src[0] is None and dst[0] is not None:
                # an exporter that fixed the batch in the shape, which inference did
                # not know on the input: the batch is kept if the rest matches
                if int(np.prod(dst[1:], dtype=np.int64)) != int(np.prod(src[1:], dtype=np.int64)):
                    return None
                return (None, *dst[1:])
            return tuple(dst)
        target = self.const(node.input[1])
        if target is None:
            return None
        if int(_attrs(node).get("allowzero", 0)) and any(
            not isinstance(d, _Dim) and int(d) == 0 for d in target.reshape(-1)
        ):
            return None  # a 0 that is a size, not "copy the input's"
        out: list = []
        other_batch = False  # the batch of another value, read with Shape
        for i, d in enumerate(target.reshape(-1)):
            if isinstance(d, _Dim):  # a dim read with Shape: the batch, kept
                copy = (d.value, d.index) == (node.input[0], 0) and i == 0
                other_batch |= not copy and i == 0 and d.index == 0 and src[0] is None
                out.append(None if copy or other_batch else "?")
            elif int(d) == 0:
                out.append(src[i] if i < len(src) else "?")
            else:
                out.append(int(d))
        if "?" in out or out.count(-1) > 1 or (None in out[1:]):
            return None
        if -1 in out:
            known = int(np.prod([d for d in out if d not in (None, -1)], dtype=np.int64))
            total = int(np.prod(src[1:], dtype=np.int64))
            if out[0] is None and src[0] is None:
                if known == 0 or total % known:
                    return None
                last = out.index(-1) == len(out) - 1
                out[out.index(-1)] = total // known
                # Another value's batch (LLaMA's heads merged back, reshape(b, t, -1), after
                # a Tile whose output's batch shape inference no longer ties to the input's)
                # is this one's where the layers reading the result take exactly the
                # features this gives them: with any other batch the model cannot run.
                if other_batch and not (
                    last and self._read_by_layers_of_width(node.output[0], out[-1])
                ):
                    return None
            elif src[0] is not None and out[0] is not None:
                whole = total * src[0]
                if known == 0 or whole % known:
                    return None
                out[out.index(-1)] = whole // known
            else:
                return None
        if out[0] is None and src[0] is not None:
            return None
        return tuple(out)

    def _flatten(self, index, node, name, src) -> str | None:
        """Add a ``flatten`` if the Reshape is one; else why not."""
        dst = self.dims.get(node.output[0])
        not_flat = "it does not reshape (N, C, ...) to (N, C * ...)"
        features = int(np.prod(src[1:]))
        if dst is not None and len(dst) == 2 and isinstance(dst[1], int):
            flat = dst[1] == features
        else:
            shape = self.const(node.input[1])
            if shape is None or shape.size != 2:
                return not_flat
            first, second = shape.reshape(-1)
            if isinstance(second, _Dim):
                return not_flat
            if int(second) == features:  # (-1, C*H*W) or (N, C*H*W)
                flat = True
            else:
                # (x.size(0), -1): a flatten whenever every reader is a layer that takes
                # exactly C*H*W features, since only then can the model run at all.
                flat = int(second) == -1 and self._read_by_layers_of_width(node.output[0], features)
        if not flat:
            return not_flat
        self.add("flatten", [node.input[0]], name, index)
        return None

    def _read_by_layers_of_width(self, value: str, features: int) -> bool:
        readers = [self.model.graph.node[i] for i in self.users.get(value, [])]
        if not readers:
            return False
        for r in readers:
            if r.op_type not in ("Gemm", "MatMul") or r.input[0] != value:
                return False
            shape = self.const_shape(r.input[1])
            if shape is None or len(shape) != 2:
                return False
            trans_b = r.op_type == "Gemm" and int(_attrs(r).get("transB", 0))
            if (shape[1] if trans_b else shape[0]) != features:
                return False
        return True


def _dynamic(src) -> str:
    """Why a Reshape of a tensor of shape ``src`` (None: a dynamic size) is left out."""
    unknown = [i for i, d in enumerate(src) if not isinstance(d, int)]
    if unknown[:1] == [0] and len(unknown) > 1:
        # (a dynamic sequence length: the sizes a user can give, the batch aside)
        axes = ", ".join(map(str, unknown[1:]))
        return (
            f"its input's size on axis {axes} is dynamic besides the batch: give it with "
            "input_shapes= (--dim NAME=SIZE on the command line) or fix it at export"
        )
    return "its input's shape is not known"
