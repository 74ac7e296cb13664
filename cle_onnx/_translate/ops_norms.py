"""Handlers of the normalizations with a per-channel affine, each one IR ``norm`` (a
region source: equalization divides its gamma and beta by the scales):
``LayerNormalization``, ``GroupNormalization``, ``RMSNormalization``, and the decomposed
forms exporters write, matched as a whole:

- LayerNorm: ``ReduceMean -> Sub -> Pow(2) -> ReduceMean -> Add(eps) -> Sqrt -> Div ->
  Mul(gamma) [-> Add(beta)]`` (the TorchScript exporter before opset 17, channels-first
  LayerNorms written by hand);
- RMSNorm: ``Pow(2) -> ReduceMean -> Add(eps) -> Sqrt -> Reciprocal or Div(1, .) ->
  Mul(x) -> Mul(gamma)`` (LLaMA's ``x * rsqrt(mean(x^2) + eps) * weight``), or
  ``... Sqrt -> Div(x, .) -> Mul(gamma)``.

A Cast to the type a value already has may sit before ``Mul(gamma)`` (Hugging Face's
RMSNorm: ``weight * x.to(input_dtype)``, written by the TorchScript exporter as
``Cast(to=FLOAT)`` of float32 values): the identity, it is taken into the norm.

A decomposed form is taken only when each of its intermediate values has no reader
outside it (and none is a graph output) and its constants are what the pattern needs
(exponent 2, numerator 1, a scalar eps, gamma and beta one value per channel of the
normalized axis); its internal nodes are then not in the IR. The handle of a ``norm``
is the tuple of its ONNX node indices; ``param_ids`` name the initializers of gamma and
beta, which the write-back replaces in whichever of those nodes reads them."""

from __future__ import annotations

import numpy as np

from .proto import _attrs


class _NormOps:
    """Mixed into :class:`~.reader._Reader`, which dispatches to the ``op_*`` methods."""

    # --- the ONNX ops -------------------------------------------------------------------
    def op_LayerNormalization(self, index, node, name):
        return self._affine_norm(index, node, name, "layer")

    def op_RMSNormalization(self, index, node, name):
        return self._affine_norm(index, node, name, "rms")

    def _affine_norm(self, index, node, name, kind: str):
        """LayerNormalization / RMSNormalization: a norm over the last axis only (gamma
        of shape (C,)) is per channel; over several axes, gamma is per element."""
        if len([o for o in node.output if o]) != 1:
            return "its mean or inverse standard deviation output is used"
        x = node.input[0]
        rank = self.rank(x)
        if rank is None:
            return "its input's rank is not known"
        a = _attrs(node)
        axis = int(a.get("axis", -1)) % rank
        if axis != rank - 1:
            return f"it normalizes axes {axis}..{rank - 1}: its scale is per element"
        return self._add_norm(
            index,
            node,
            name,
            kind,
            x,
            axis,
            node.input[1],
            node.input[2] if len(node.input) > 2 and node.input[2] else None,
            float(a.get("epsilon", 1e-5)),
            (index,),
            node.output[0],
        )

    def op_GroupNormalization(self, index, node, name):
        """One scale and bias per channel from opset 21; opset 18 had one per group
        (per channel only when every group is one channel)."""
        if len(node.input) < 3:
            return "it has no scale and bias"
        x = node.input[0]
        a = _attrs(node)
        groups = int(a.get("num_groups", 0))
        channels = self.channels(x)
        if channels is None or self.rank(x) is None:
            return "its input's channel count is not known"
        shape = self.const_shape(node.input[1])
        if shape is not None and int(np.prod(shape)) != channels:
            return f"its scale of shape {tuple(shape)} is one value per group, not per channel"
        return self._add_norm(
            index,
            node,
            name,
            "group",
            x,
            1,
            node.input[1],
            node.input[2],
            float(a.get("epsilon", 1e-5)),
            (index,),
            node.output[0],
            groups=groups,
        )

    def _add_norm(self, index, node, name, kind, x, axis, gamma, beta, eps, handle, out, **extra):
        if x in self.fixed:
            return "it normalizes a constant"
        blocker = self.first_blocker([n for n in (gamma, beta) if n])
        if blocker:
            return blocker
        dims = self.dims.get(x)
        channels = dims[axis] if dims is not None and axis < len(dims) else None
        if not isinstance(channels, int):
            return "the size of its normalized axis is not known"
        rank = len(dims)
        for what, ref in (("scale", gamma), ("bias", beta)):
            shape = self.const_shape(ref) if ref else None
            if kind == "group":  # GroupNormalization's scale and bias are (C,)
                per_channel = shape is not None and tuple(shape) == (channels,)
            else:  # broadcast against the input: (C,), (C, 1, 1) ...
                per_channel = _along_axis(shape, rank, axis, channels)
            if ref and not per_channel:
                shape = tuple(self.const_shape(ref))
                return f"its {what} of shape {shape} is not one value per channel"
        ids, params = {}, {"beta": None}
        for key, ref in (("gamma", gamma), ("beta", beta)):
            if ref:
                arr, ids[key] = self.vector(ref, index)
                params[key] = arr.reshape(-1)
        # NaN or Inf in gamma / beta is bad input, not an op to leave out: the core refuses
        # it in one error naming the norm, as it refuses a layer's NaN weights.
        attrs = {"kind": kind, "axis": axis, "eps": eps, **extra}
        if kind != "group":
            attrs["axes"] = (axis,)
        self.graph.add_node(
            "norm",
            [x],
            name=name,
            outputs=[out],
            params=params,
            attrs=attrs,
            handle=handle,
            param_ids=ids,
        )
        return None

    # --- decomposed forms ---------------------------------------------------------------
    def _only_reader(self, value: str, op_types: tuple[str, ...]):
        """``(index, node)`` of the single reader of ``value`` if it is one of
        ``op_types`` (and ``value`` is no graph output), else None."""
        readers = self.users.get(value, [])
        if len(readers) != 1 or value in self.graph_outputs or value in self.fixed:
            return None
        i = readers[0]
        n = self.model.graph.node[i]
        if n.op_type not in op_types or n.domain not in ("", "ai.onnx"):
            return None
        return i, n

    def _scalar(self, name: str) -> float | None:
        value = self.const(name) if name in self.fixed else None
        if value is None or value.size != 1 or value.dtype.kind not in "fiu":
            return None
        return float(value.reshape(-1)[0])

    def _other(self, node, value: str) -> str | None:
        """The other input of a two-input node that reads ``value`` once."""
        if len(node.input) != 2 or list(node.input).count(value) != 1:
            return None
        return node.input[1] if node.input[0] == value else node.input[0]

    def _reduced_axis(self, node, x: str) -> int | None:
        """The single axis a ReduceMean with keepdims reduces, or None."""
        rank = self.rank(x)
        a = _attrs(node)
        if rank is None or not int(a.get("keepdims", 1)):
            return None
        axes = a.get("axes")
        if axes is None and len(node.input) > 1 and node.input[1]:
            value = self.const(node.input[1])
            axes = None if value is None else value.reshape(-1).tolist()
        if axes is None or len(axes) != 1:
            return None
        return int(axes[0]) % rank

    def _tail_affine(self, trail: list[int], value: str, need_beta: bool):
        """``Mul(gamma)`` and, for a LayerNorm, an optional ``Add(beta)`` after the
        normalized ``value``: ``(gamma, beta, output)`` or None."""
        while (step := self._only_reader(value, ("Cast",))) and self.keeps_type(step[1]):
            trail.append(step[0])
            value = step[1].output[0]
        step = self._only_reader(value, ("Mul",))
        if step is None:
            return None
        i, mul = step
        gamma = self._other(mul, value)
        if gamma is None or gamma not in self.fixed:
            return None
        trail.append(i)
        out, beta = mul.output[0], None
        if need_beta:
            step = self._only_reader(out, ("Add",))
            if step is not None:
                j, add = step
                other = self._other(add, out)
                if other is not None and other in self.fixed:
                    trail.append(j)
                    beta, out = other, add.output[0]
        return gamma, beta, out

    def _decomposed(self, index, node, name):
        """A LayerNorm (from its first ReduceMean) or an RMSNorm (from its Pow) written
        out in elementary ops: None once added, a reason if it is one that cannot be
        taken, False if the nodes from here on are not one."""
        if node.op_type == "ReduceMean":
            return self._decomposed_layer(index, node, name)
        return self._decomposed_rms(index, node, name)

    def _decomposed_layer(self, index, node, name):
        x = node.input[0]
        axis = self._reduced_axis(node, x)
        if axis is None or x in self.fixed:
            return False
        mean = node.output[0]
        readers = self.users.get(mean, [])
        if len(readers) != 1 or mean in self.graph_outputs:
            return False
        sub_i = readers[0]
        sub = self.model.graph.node[sub_i]
        if sub.op_type != "Sub" or list(sub.input) != [x, mean]:
            return False
        d = sub.output[0]
        readers = sorted(self.users.get(d, []))
        if len(readers) != 2 or d in self.graph_outputs:
            return False
        nodes = {i: self.model.graph.node[i] for i in readers}
        pow_i = next((i for i, n in nodes.items() if n.op_type == "Pow"), None)
        div_i = next((i for i, n in nodes.items() if n.op_type == "Div"), None)
        if pow_i is None or div_i is None:
            return False
        pw, div = nodes[pow_i], nodes[div_i]
        if pw.input[0] != d or self._scalar(pw.input[1]) != 2.0 or div.input[0] != d:
            return False
        trail = [index, sub_i, pow_i]
        got = self._variance(trail, pw.output[0], axis)
        if got is None:
            return False
        eps, root = got
        if div.input[1] != root or self.users.get(root) != [div_i]:
            return False
        trail.append(div_i)
        tail = self._tail_affine(trail, div.output[0], need_beta=True)
        if tail is None:
            return False
        gamma, beta, out = tail
        return self._finish(index, name, "layer", x, axis, gamma, beta, eps, trail, out)

    def _variance(self, trail: list[int], squared: str, axis: int):
        """``ReduceMean(squared) -> Add(eps) -> Sqrt``: ``(eps, the root's name)``."""
        step = self._only_reader(squared, ("ReduceMean",))
        if step is None or self._reduced_axis(step[1], squared) != axis:
            return None
        trail.append(step[0])
        mean = step[1].output[0]
        step = self._only_reader(mean, ("Add",))
        if step is None:
            return None
        add_i, add = step
        other = self._other(add, mean)
        eps = self._scalar(other) if other else None
        if eps is None or eps < 0:
            return None
        trail.append(add_i)
        step = self._only_reader(add.output[0], ("Sqrt",))
        if step is None:
            return None
        trail.append(step[0])
        return eps, step[1].output[0]

    def _decomposed_rms(self, index, node, name):
        x = node.input[0]
        if x in self.fixed or self._scalar(node.input[1]) != 2.0:
            return False
        step = self._only_reader(node.output[0], ("ReduceMean",))
        if step is None:
            return False
        axis = self._reduced_axis(step[1], node.output[0])
        if axis is None:
            return False
        trail = [index]
        got = self._variance(trail, node.output[0], axis)
        if got is None:
            return False
        eps, root = got
        step = self._only_reader(root, ("Reciprocal", "Div"))
        if step is None:
            return False
        i, op = step
        trail.append(i)
        if op.op_type == "Div" and op.input[0] == x and op.input[1] == root:
            normalized = op.output[0]  # x / sqrt(...)
        else:
            if op.op_type == "Div" and (op.input[1] != root or self._scalar(op.input[0]) != 1.0):
                return False
            step = self._only_reader(op.output[0], ("Mul",))
            if step is None or self._other(step[1], op.output[0]) != x:
                return False
            trail.append(step[0])
            normalized = step[1].output[0]
        tail = self._tail_affine(trail, normalized, need_beta=False)
        if tail is None:
            return False
        gamma, _, out = tail
        return self._finish(index, name, "rms", x, axis, gamma, None, eps, trail, out)

    def _finish(self, index, name, kind, x, axis, gamma, beta, eps, trail, out):
        """Add the matched form as one ``norm`` (or say why not, leaving it opaque)."""
        node = self.model.graph.node[index]
        why = self._add_norm(index, node, name, kind, x, axis, gamma, beta, eps, tuple(trail), out)
        if why is None:
            self.consumed_adds.update(trail[1:])  # the other nodes are in the norm
        return why

    def op_ReduceMean(self, index, node, name):
        outcome = self._decomposed(index, node, name)
        return self.reduce_mean_pool(index, node, name) if outcome is False else outcome

    def op_Pow(self, index, node, name):
        return self._decomposed(index, node, name)


def _along_axis(shape, rank: int, axis: int, channels: int) -> bool:
    """Whether a constant of ``shape`` broadcasts against a rank-``rank`` tensor as one
    value per channel of ``axis`` (``(C,)`` on the last axis, ``(C, 1, 1)`` on axis 1
    of an image ...)."""
    if shape is None or len(shape) > rank:
        return False
    padded = (1,) * (rank - len(shape)) + tuple(shape)
    return padded[axis] == channels and all(d == 1 for i, d in enumerate(padded) if i != axis)
