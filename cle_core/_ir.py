"""The layer-graph IR: nodes over named values, kept in topological order.

Every value knows its producer and its uses. Node parameters are NumPy arrays; layer
weights keep the layout of the framework they came from and a :class:`Layout` says where
the channels are. Mutations go through a few methods on :class:`Graph` so the use lists
never go stale.

Tensors are channel-first (``N, C, *spatial``: the channel axis is axis 1) unless a
value says otherwise: ``Value.channel_axes`` lists the axes its channels lie on (one, such
as the last axis of a ``(B, T, C)`` token tensor, or several, where attention splits them
into heads; see :mod:`cle_core._layout`). A Linear layer reads and writes the last axis:
``(N, features)`` or ``(..., features)``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np

from ._errors import InvalidGraphError
from ._math import Layout

LAYER_OPS = frozenset({"conv", "conv_transpose", "linear"})
"""Weighted layers: attrs ``layout`` (:class:`Layout`), conv attrs ``stride``, ``pads``
(begins then ends, one per spatial axis), ``dilation``, ``output_padding``; params
``weight`` and ``bias`` (may be None). Optional attr ``weight_group``: a key shared by
the layers whose weights are row blocks (output channels) of one tensor of the model
(``nn.MultiheadAttention``'s packed in-projection cut into q, k and v): a quantizer
that rounds that tensor on one grid rounds all of them on it."""

SCALABLE_ACTIVATIONS = frozenset({"relu", "leaky_relu", "prelu", "clip"})
"""Activations ``f`` with ``f(x / s) == f(x) / s`` per channel for ``s > 0`` (Clip once
its bounds are carried). ``leaky_relu``: attr ``alpha``; ``prelu``: param ``slope``
(one value or one per channel); ``clip``: params ``lo`` and ``hi`` (scalars or one per
channel; ``hi`` may be +inf)."""

PASSTHROUGH_OPS = frozenset(
    {"identity", "dropout", "pad", "maxpool", "avgpool", "global_avgpool", "resize"}
)
"""Per-channel, positively homogeneous ops. ``pad``: padding of spatial axes, attr
``pads``, and ``mode``: ``constant`` (zeros; the default), or ``reflect``, ``edge`` or
``wrap``, which copy the channel's own values. Pools: attrs ``kernel``, ``stride``,
``pads``, and for ``avgpool`` ``count_include_pad``."""

STRUCTURAL_OPS = frozenset({"batchnorm", "add", "concat", "slice", "flatten", "mul", "opaque"})
"""``batchnorm``: params ``mean``, ``var``, ``gamma``/``beta`` (None without affine), attr
``eps``. ``add``: elementwise sum of its inputs. ``concat``: along the channel axis.
``slice``: channels ``offset`` to ``offset + channels`` of its input (attrs; a Split is
one ``slice`` per output).
``mul``: its first input times either param ``factor`` (a constant: one value or one per
channel; attr ``axis``, where given, is the axis the values lie along, which must be the
channels') or its second input (a gate such as squeeze-and-excitation's, broadcast over the
spatial axes or of the same shape): scaling the first input's channels scales the
output's, so a region passes through it; the second input must stay unscaled.
``flatten``: ``(N, C, *s) -> (N, C * prod(s))``, channel-major. ``opaque``: anything
else (attr ``kind`` names it; optional attr ``fn`` lets the executor run it); it blocks
equalization. A one-input opaque node may say what it computes, for the statistics and the
executor: attr ``activation`` ``hard_sigmoid`` (``clip(alpha x + beta, 0, 1)``, attrs
``alpha`` > 0 and ``beta``), ``hard_swish`` (``x`` times that) or ``sigmoid``, or attr
``shift`` (``x + shift``, one value or one per channel). An opaque node with attr
``scores`` (true) depends on its first two inputs, ``q`` ``(..., T, D)`` and ``k``
``(..., S, D)``, only through ``q k^T`` over their last axes (attention weights
``softmax(q k^T * scale + mask)``): a Q -> K region pairs their channels."""

LAYOUT_OPS = frozenset({"transpose", "reshape", "matmul", "select", "repeat"})
"""Ops that move channels between axes (:mod:`cle_core._layout`). ``transpose``: attr
``perm``. ``reshape``: attr ``shape``, the output's static shape (None for a dimension of
unknown size, such as the batch: one at most); it may merge another axis above the channels
of an axis while they lie on several axes (``Value.channel_outer``: the batch merged with
the heads, ``(T, B * H, D)``) and split it off again. ``matmul``: ``A @ B`` of two
activations (attention's ``softmax(Q K^T) @ V``); channels pass through the operand that is
not summed over, when the other operand stays unscaled. ``select``: positions of one axis:
attrs ``axis`` (of the input) and ``index``, an integer (the axis goes), a ``slice`` or a
tuple of integers (it stays). Along an axis that is not the channels' (``x[:, 0]``, a class
token) every channel is kept whole, so a per-channel scale commutes with it; along a
channel axis (q, k or v cut from a packed projection) some channels are kept whole, and
:meth:`Graph.validate` gives it a ``channel_map`` (see ``repeat``). ``repeat``: every
position of attr ``axis`` repeated attr ``repeats`` times in a row (``np.repeat``,
``repeat_interleave``; an expand or tile of a size-1 axis). Along a channel axis
(grouped-query attention's K / V heads) the output's channel ``j`` copies the input's
channel ``channel_map[j]``: an attr that :meth:`Graph.validate` sets, as it does on a
``reshape`` that merges such copies into the channel axis before them (``x[:, :,
None].expand(...).reshape(...)``). Scaling input channel ``c`` by ``s_c`` scales every copy
by ``s_c``: the region reads the output's channels through the map. Along another axis (not
the batch) every channel is kept whole."""

NORM_OPS = frozenset({"norm"})
"""A normalization followed by a per-channel affine: ``y = gamma * normalize(x) + beta``
on the channel axis ``axis`` (attr, non-negative). Params ``gamma`` and ``beta`` (one per
channel; ``beta`` may be None). Attrs ``kind``: ``layer`` (LayerNorm: mean and variance
over attr ``axes``), ``rms`` (RMSNorm: root mean square over ``axes``) or ``group``
(GroupNorm: attr ``groups`` over the channel axis 1 and the spatial axes); ``eps``. The
normalization of ``x`` does not commute with a per-channel scale, its affine does: a norm
is the source of a region (``gamma / s``, ``beta / s``), never a sink."""

ROTARY_OPS = frozenset({"rotary"})
"""A rotary position embedding ``y = x * cos + rotate(x) * sin`` on the last axis (of even
size ``D``). Params ``cos`` and ``sin``: tables that broadcast against ``x`` to its shape
(positions by ``D``, say). Attr ``interleaved``: False (the default: Hugging Face / LLaMA,
``rotate(x) = concat(-x[..., D/2:], x[..., :D/2])``, channel ``d`` paired with ``d + D/2``)
or True (GPT-J, ONNX ``interleaved=1``: ``(-x[..., 1::2], x[..., ::2])`` interleaved, ``2i``
paired with ``2i + 1``). Each pair is mixed by a 2 x 2 map per position, so a scale
commutes with it only where both channels of a pair take one scale: the Q -> K region it
lies in ties them (``Region.ties``). The last axis must be one of the input's channel
axes, else the output has no channels (attr ``layout_why``)."""

ALL_OPS = (
    LAYER_OPS
    | SCALABLE_ACTIVATIONS
    | PASSTHROUGH_OPS
    | STRUCTURAL_OPS
    | LAYOUT_OPS
    | NORM_OPS
    | ROTARY_OPS
)


def unique_name(base: str, taken: set[str], sep: str = "_") -> str:
    """``base``, or ``base{sep}1``, ``base{sep}2`` ... whichever is not in ``taken``; the
    name is added to ``taken``. For backends that add nodes or tensors to a model."""
    name, i = base, 1
    while name in taken:
        name = f"{base}{sep}{i}"
        i += 1
    taken.add(name)
    return name


class Value:
    """A tensor edge. ``producer`` is None for graph inputs."""

    __slots__ = (
        "name",
        "producer",
        "uses",
        "channels",
        "spatial",
        "shape",
        "channel_axes",
        "channel_outer",
    )

    def __init__(self, name: str, channels: int | None = None):
        self.name = name
        self.producer: Node | None = None
        self.uses: list[tuple[Node, int]] = []
        self.channels = channels
        # Sizes of the spatial axes (H, W ...), where the backend knows them: () for a
        # (N, features) tensor. The noise objective uses them; nothing else does.
        self.spatial: tuple[int, ...] | None = None
        # The full shape where the backend knows it (None for a dimension of unknown
        # size): Transpose, Reshape and MatMul need it to follow the channels.
        self.shape: tuple[int | None, ...] | None = None
        # Where the channels are (see the module); None: axis 1, or not known.
        self.channel_axes: tuple[int, ...] | None = None
        # Per channel axis, the size of another axis merged above its channels (the
        # batch merged with the heads, ``(T, B * H, D)``: ``(B, 1)``, None for a batch of
        # unknown size); None: none. See :func:`cle_core._layout.reshape_layout`.
        self.channel_outer: tuple[int | None, ...] | None = None

    @property
    def axes(self) -> tuple[int, ...]:
        """The channel axes: ``channel_axes``, or axis 1 (channel-first) when not set."""
        return self.channel_axes if self.channel_axes is not None else (1,)

    @property
    def rank(self) -> int | None:
        return None if self.shape is None else len(self.shape)

    @property
    def consumers(self) -> list[Node]:
        seen: list[Node] = []
        for node, _ in self.uses:
            if not any(node is s for s in seen):
                seen.append(node)
        return seen

    def __repr__(self) -> str:
        return f"Value({self.name!r}, channels={self.channels})"


class Node:
    """One operation. ``handle`` is the backend's stable reference to where the node
    came from (a module name, an ONNX node name ...). ``param_ids`` maps a param name to
    the backend's storage id; two nodes with the same id share that tensor."""

    __slots__ = ("name", "op", "inputs", "outputs", "params", "attrs", "handle", "param_ids")

    def __init__(
        self,
        name: str,
        op: str,
        params: dict[str, np.ndarray | None] | None = None,
        attrs: dict[str, Any] | None = None,
        handle: Any = None,
        param_ids: dict[str, str] | None = None,
    ):
        self.name = name
        self.op = op
        self.inputs: list[Value] = []
        self.outputs: list[Value] = []
        self.params = dict(params or {})
        self.attrs = dict(attrs or {})
        self.handle = handle
        self.param_ids = dict(param_ids or {})

    @property
    def is_layer(self) -> bool:
        return self.op in LAYER_OPS

    @property
    def layout(self) -> Layout:
        return self.attrs["layout"]

    @property
    def weight(self) -> np.ndarray:
        return self.params["weight"]

    @property
    def bias(self) -> np.ndarray | None:
        return self.params.get("bias")

    @property
    def out_channels(self) -> int:
        if self.op == "norm":
            return int(self.params["gamma"].size)
        return self.layout.out_channels(self.weight.shape)

    @property
    def in_channels(self) -> int:
        return self.layout.in_channels(self.weight.shape)

    def pads_input(self) -> bool:
        """True when the layer zero-pads its input (a Conv with non-zero pads)."""
        return self.op == "conv" and any(int(p) != 0 for p in self.attrs.get("pads", ()))

    def describe(self) -> str:
        """``name (op)`` for messages; an opaque node says what it is and, where the
        backend gave one, why it was not translated."""
        if self.op != "opaque":
            return f"{self.name} ({self.op})"
        kind = self.attrs.get("kind")
        why = self.attrs.get("why")
        what = f"opaque {kind}" if kind else "opaque"
        return f"{self.name} ({what}: {why})" if why else f"{self.name} ({what})"

    def __repr__(self) -> str:
        return f"Node({self.name!r}, {self.op})"


class Graph:
    """A topologically ordered graph of :class:`Node` over :class:`Value`."""

    def __init__(self, name: str = "graph"):
        self.name = name
        self.nodes: list[Node] = []
        self.inputs: list[Value] = []
        self.outputs: list[Value] = []
        self.values: dict[str, Value] = {}
        self.metadata: dict[str, Any] = {}

    # --- construction -------------------------------------------------------------
    def _value(self, ref: Value | str) -> Value:
        if isinstance(ref, Value):
            if self.values.get(ref.name) is not ref:
                raise InvalidGraphError(f"value {ref.name!r} does not belong to this graph")
            return ref
        if ref not in self.values:
            self.values[ref] = Value(ref)
        return self.values[ref]

    def add_input(self, name: str, channels: int | None = None) -> Value:
        value = self._value(name)
        if value.producer is not None or value in self.inputs:
            raise InvalidGraphError(f"value {name!r} is already produced")
        # -1 is how several formats write "unknown": not a size.
        value.channels = channels if channels is None or channels > 0 else None
        self.inputs.append(value)
        return value

    def add_node(
        self,
        op: str,
        inputs: Sequence[Value | str],
        *,
        name: str,
        outputs: Sequence[str] | int = 1,
        params: dict[str, np.ndarray | None] | None = None,
        attrs: dict[str, Any] | None = None,
        handle: Any = None,
        param_ids: dict[str, str] | None = None,
    ) -> Node:
        """Append a node. ``outputs`` is a list of value names or a count (names are
        derived from the node's). Inputs may name values produced later; call
        :meth:`toposort` once the graph is built."""
        if op not in ALL_OPS:
            raise InvalidGraphError(f"node {name!r}: unknown op {op!r}")
        if op in LAYER_OPS and "layout" not in (attrs or {}):
            attrs = {**(attrs or {}), "layout": Layout()}
        node = Node(name, op, params, attrs, handle, param_ids)
        for k, v in list(node.params.items()):
            if v is not None:
                node.params[k] = np.ascontiguousarray(v)
        names = [f"{name}:{i}" for i in range(outputs)] if isinstance(outputs, int) else outputs
        for i, ref in enumerate(inputs):
            value = self._value(ref)
            node.inputs.append(value)
            value.uses.append((node, i))
        for out_name in names:
            value = self._value(out_name)
            if value.producer is not None or value in self.inputs:
                raise InvalidGraphError(f"node {name!r}: value {out_name!r} has two producers")
            value.producer = node
            node.outputs.append(value)
        self.nodes.append(node)
        return node

    def set_outputs(self, outputs: Iterable[Value | str]) -> None:
        self.outputs = [self._value(v) for v in outputs]

    def node(self, name: str) -> Node:
        for node in self.nodes:
            if node.name == name:
                return node
        raise KeyError(name)

    # --- mutation -----------------------------------------------------------------
    def replace_all_uses(self, old: Value, new: Value) -> None:
        """Make every consumer of ``old`` (graph outputs included) read ``new``."""
        for node, i in old.uses:
            node.inputs[i] = new
            new.uses.append((node, i))
        old.uses = []
        self.outputs = [new if v is old else v for v in self.outputs]

    def remove_node(self, node: Node) -> None:
        """Remove a node whose outputs are no longer used."""
        for out in node.outputs:
            if out.uses or any(v is out for v in self.outputs):
                raise InvalidGraphError(f"cannot remove {node.name!r}: {out.name!r} still used")
        for value in node.inputs:
            value.uses = [(n, i) for n, i in value.uses if n is not node]
        for out in node.outputs:
            del self.values[out.name]
        self.nodes = [n for n in self.nodes if n is not node]

    def bypass_node(self, node: Node) -> None:
        """Remove a single-input, single-output node, wiring its consumers to its input."""
        self.replace_all_uses(node.outputs[0], node.inputs[0])
        self.remove_node(node)

    # --- checks -------------------------------------------------------------------
    def toposort(self) -> None:
        """Order the nodes topologically (stable); raise on a cycle or a dangling value."""
        available = {id(v) for v in self.inputs}
        pending = list(self.nodes)
        ordered: list[Node] = []
        for value in self.values.values():
            if value.producer is None and id(value) not in available and value.uses:
                users = ", ".join(n.name for n, _ in value.uses)
                raise InvalidGraphError(
                    f"value {value.name!r} (used by {users}) has no producer and is not a "
                    "graph input"
                )
        while pending:
            rest = []
            for node in pending:
                if all(id(v) in available for v in node.inputs):
                    ordered.append(node)
                    available.update(id(v) for v in node.outputs)
                else:
                    rest.append(node)
            if len(rest) == len(pending):
                names = ", ".join(n.name for n in rest[:5])
                raise InvalidGraphError(f"the graph has a cycle through: {names}")
            pending = rest
        self.nodes = ordered
        for value in self.outputs:
            if value.producer is None and id(value) not in {id(v) for v in self.inputs}:
                raise InvalidGraphError(f"graph output {value.name!r} is never produced")

    def validate(self) -> None:
        """Check order, wiring and channel counts; fill in ``Value.channels``.

        Raises :class:`InvalidGraphError` naming the node at fault.
        """
        self.toposort()
        for node in self.nodes:
            if node.op in LAYOUT_OPS:
                _infer_moved(node)
            else:
                _infer_channels(node)
                _infer_layout(node)
        _check_weight_groups(self.nodes)

    def checkpoint(self) -> Callable[[], None]:
        """Remember the structure and parameters; the returned function puts them back.

        Cheap (no array is copied): passes replace parameter arrays and attribute values
        instead of writing into them, so references are enough. ``equalize`` uses it to
        leave the graph unchanged when any step fails."""
        nodes, values = list(self.nodes), dict(self.values)
        inputs, outputs = list(self.inputs), list(self.outputs)
        value_state = [
            (v, v.producer, list(v.uses), v.channels, (v.channel_axes, v.channel_outer))
            for v in values.values()
        ]
        node_state = [
            (n, n.op, list(n.inputs), list(n.outputs), dict(n.params), dict(n.attrs)) for n in nodes
        ]

        def restore() -> None:
            self.nodes, self.values = list(nodes), dict(values)
            self.inputs, self.outputs = list(inputs), list(outputs)
            for v, producer, uses, channels, (axes, outer) in value_state:
                v.producer, v.uses, v.channels = producer, list(uses), channels
                v.channel_axes, v.channel_outer = axes, outer
            for n, op, ins, outs, params, attrs in node_state:
                n.op, n.inputs, n.outputs = op, list(ins), list(outs)
                n.params, n.attrs = dict(params), dict(attrs)

        return restore

    def clone(self) -> Graph:
        """A copy with copied arrays; handles are shared (they are references)."""
        g = Graph(self.name)
        g.metadata = dict(self.metadata)
        for v in self.inputs:
            g.add_input(v.name, v.channels)
        for n in self.nodes:
            g.add_node(
                n.op,
                [v.name for v in n.inputs],
                name=n.name,
                outputs=[v.name for v in n.outputs],
                params={k: (None if a is None else np.array(a)) for k, a in n.params.items()},
                attrs=dict(n.attrs),
                handle=n.handle,
                param_ids=n.param_ids,
            )
            for old, new in zip(n.outputs, g.nodes[-1].outputs, strict=True):
                _copy_value_info(old, new)
        for old, new in zip(self.inputs, g.inputs, strict=True):
            _copy_value_info(old, new)
        g.set_outputs(v.name for v in self.outputs)
        return g

    def __repr__(self) -> str:
        return f"Graph({self.name!r}, {len(self.nodes)} nodes)"


def _copy_value_info(old: Value, new: Value) -> None:
    new.channels, new.spatial = old.channels, old.spatial
    new.shape, new.channel_axes = old.shape, old.channel_axes
    new.channel_outer = old.channel_outer


def _per_channel_size(node: Node, key: str, channels: int | None) -> None:
    arr = node.params.get(key)
    if arr is None or arr.size == 1 or channels is None:
        return
    if arr.size != channels:
        raise InvalidGraphError(
            f"node {node.name!r} ({node.op}): {key} has {arr.size} values for {channels} channels"
        )


def _infer_channels(node: Node) -> None:
    ins = [v.channels for v in node.inputs]
    where = f"node {node.name!r} ({node.op})"
    if node.op in LAYER_OPS:
        if len(node.inputs) != 1:
            raise InvalidGraphError(f"{where}: a layer takes exactly one data input")
        w = node.params.get("weight")
        if w is None or w.ndim < 2:
            raise InvalidGraphError(f"{where}: missing or malformed weight")
        try:
            cin, cout = node.in_channels, node.out_channels
        except (ValueError, IndexError) as exc:
            raise InvalidGraphError(f"{where}: {exc}") from None
        if w.shape[0] % node.layout.groups:
            raise InvalidGraphError(f"{where}: weight {w.shape} does not split into groups")
        x = node.inputs[0]
        src = x.producer
        from_flatten = src is not None and src.op == "flatten"
        # A Linear reads the last axis: where the input's channels lie elsewhere (a
        # reshape kept them on axis 1), their count is not its features, and the
        # region finder refuses the pair.
        elsewhere = node.op == "linear" and x.rank is not None and x.axes != (x.rank - 1,)
        if ins[0] is not None and not from_flatten and not elsewhere and ins[0] != cin:
            raise InvalidGraphError(
                f"{where}: expects {cin} input channels but {node.inputs[0].name!r} has {ins[0]}"
            )
        bias = node.params.get("bias")
        if bias is not None and bias.size != cout:
            raise InvalidGraphError(f"{where}: bias has {bias.size} values for {cout} channels")
        out = cout
    elif node.op == "batchnorm":
        out = node.params["mean"].size
        for key in ("var", "gamma", "beta"):
            arr = node.params.get(key)
            if arr is not None and arr.size != out:
                raise InvalidGraphError(f"{where}: {key} has {arr.size} values, mean has {out}")
        if ins[0] is not None and ins[0] != out:
            raise InvalidGraphError(f"{where}: has {out} channels, its input {ins[0]}")
    elif node.op in SCALABLE_ACTIVATIONS or node.op in PASSTHROUGH_OPS:
        if len(node.inputs) != 1:
            raise InvalidGraphError(f"{where}: takes exactly one input")
        out = ins[0]
        for key in ("slope", "lo", "hi"):
            _per_channel_size(node, key, out)
    elif node.op == "add":
        known = {c for c in ins if c is not None}
        if len(known) > 1:
            raise InvalidGraphError(f"{where}: inputs have different channel counts {ins}")
        out = known.pop() if known else None
    elif node.op == "concat":
        out = None if any(c is None for c in ins) else sum(ins)
    elif node.op == "slice":
        off, out = int(node.attrs["offset"]), int(node.attrs["channels"])
        if len(node.inputs) != 1 or off < 0 or out < 1:
            raise InvalidGraphError(f"{where}: one input, a non-negative offset, channels")
        if ins[0] is not None and off + out > ins[0]:
            raise InvalidGraphError(f"{where}: channels {off}..{off + out} of {ins[0]}")
    elif node.op == "mul":
        factor = node.params.get("factor")
        if len(node.inputs) != (1 if factor is not None else 2):
            raise InvalidGraphError(f"{where}: takes one input and a factor, or two inputs")
        out = ins[0]
        axis, x = node.attrs.get("axis"), node.inputs[0]
        if factor is not None and axis is not None and x.rank is not None and x.axes != (axis,):
            # one value per position of another axis: not a per-channel factor
            node.attrs["layout_why"] = (
                f"its factor lies along axis {axis}, the channels along {x.axes}"
            )
            out = None
        elif factor is not None:
            _per_channel_size(node, "factor", out)
    elif node.op == "flatten":
        out = None
    elif node.op == "rotary":
        out = ins[0]
        _check_rotary(node, where)
    elif node.op == "norm":
        out = int(node.params["gamma"].size)
        beta = node.params.get("beta")
        if beta is not None and beta.size != out:
            raise InvalidGraphError(f"{where}: beta has {beta.size} values, gamma has {out}")
        # (the input's channels may lie on another axis than the one it normalizes)
        x = node.inputs[0]
        elsewhere = x.rank is not None and x.axes != (int(node.attrs.get("axis", 1)),)
        if (
            ins[0] is not None
            and ins[0] != out
            and node.attrs.get("kind") != "group"
            and not elsewhere
        ):
            raise InvalidGraphError(f"{where}: has {out} channels, its input {ins[0]}")
    else:
        out = node.attrs.get("channels")
    for value in node.outputs:
        if node.op != "opaque" or value.channels is None:
            value.channels = out


# Ops whose output has its input's channels on the same axes (same shape but for pools,
# pads and resizes, which change spatial sizes only).
_SAME_AXES = SCALABLE_ACTIVATIONS | {"identity", "dropout", "mul", "add", "rotary"}
_SAME_SHAPE = SCALABLE_ACTIVATIONS | {"identity", "dropout", "norm", "rotary"}


def _check_rotary(node: Node, where: str) -> None:
    """A ``rotary`` takes one input and two tables that broadcast to its shape, whose
    last axis has an even size."""
    x = node.inputs[0] if len(node.inputs) == 1 else None
    if x is None or node.params.get("cos") is None or node.params.get("sin") is None:
        raise InvalidGraphError(f"{where}: takes one input and params cos and sin")
    if x.shape is None or x.shape[-1] is None or x.shape[-1] % 2:
        raise InvalidGraphError(f"{where}: the last axis of {x.name!r} is not of a known even size")
    for key in ("cos", "sin"):
        misfit = rotary_table_misfit(key, np.shape(node.params[key]), x.shape)
        if misfit:
            raise InvalidGraphError(f"{where}: {misfit}")


def rotary_table_misfit(key: str, table: tuple[int, ...], shape) -> str | None:
    """Why a rotary embedding's table ``key`` (cos or sin) of shape ``table`` does not
    broadcast to its input's ``shape`` (None for a size not known, taken as any), or
    None where it does: what :meth:`Graph.validate` checks, for a backend to refuse the
    pattern before it makes a ``rotary`` node."""
    known = tuple(1 if d is None else d for d in shape)
    try:
        fits = len(table) <= len(known) and np.broadcast_shapes(tuple(table), known) == known
    except ValueError:
        fits = False
    return None if fits else f"{key} {tuple(table)} does not broadcast to {tuple(shape)}"


def _check_weight_groups(nodes: Sequence[Node]) -> None:
    """The layers of one ``weight_group`` must be row blocks of one tensor: the same
    layout, and weights that differ only in their output axis."""
    first: dict[str, Node] = {}
    for node in nodes:
        key = node.attrs.get("weight_group")
        if key is None:
            continue
        if not node.is_layer:
            raise InvalidGraphError(
                f"{node.name}: weight_group {key!r} on a {node.op}, not a layer"
            )
        ref = first.setdefault(key, node)
        a, b = ref.layout, node.layout
        shape = list(np.shape(node.weight))
        other = list(np.shape(ref.weight))
        if (
            a != b
            or len(shape) != len(other)
            or any(
                x != y for i, (x, y) in enumerate(zip(shape, other, strict=True)) if i != a.out_axis
            )
        ):
            raise InvalidGraphError(
                f"{node.name}: weight_group {key!r} joins it to {ref.name}, but their weights "
                f"{tuple(other)} and {tuple(shape)} are not row blocks of one tensor"
            )


def _infer_layout(node: Node) -> None:
    """Where the output's channels are (``Value.channel_axes``) and, where it follows,
    its shape; a value the backend already described keeps what it was given."""
    out = node.outputs[0] if node.outputs else None
    if out is None:
        return
    x = node.inputs[0] if node.inputs else None
    if node.op == "linear" and x is not None and x.rank is not None:
        if out.channel_axes is None:
            out.channel_axes = (x.rank - 1,)
        if out.shape is None and x.shape is not None:
            out.shape = (*x.shape[:-1], node.out_channels)
    elif node.op == "norm":
        if out.channel_axes is None:
            out.channel_axes = (int(node.attrs["axis"]),)
    elif node.op in _SAME_AXES and x is not None:
        if node.op == "add":  # the input whose layout is known
            x = next((v for v in node.inputs if v.channel_axes is not None), x)
        elif node.op == "mul":
            node.attrs["carrier"] = _carrier(node)
            x = node.inputs[node.attrs["carrier"]]
        if out.channel_axes is None:
            out.channel_axes, out.channel_outer = x.channel_axes, x.channel_outer
    elif node.op in PASSTHROUGH_OPS and x is not None and x.channels is not None:
        if x.axes != (1,):  # a pool, pad or resize works on the axes after 1
            node.attrs["layout_why"] = (
                f"it pools, pads or resizes the axes after 1 of {x.name!r}, which hold "
                f"its channels (axes {x.axes})"
            )
            for v in node.outputs:
                v.channels = None
    if node.op in _SAME_SHAPE and x is not None and out.shape is None:
        out.shape = x.shape
    if node.op == "rotary" and out.channels is not None:
        last = (x.rank or 0) - 1
        if last not in x.axes or x.channel_outer is not None:
            # (the pairs it rotates are then not pairs of channels the region can tie)
            node.attrs["layout_why"] = (
                f"it rotates the last axis of {x.name!r}, which does not hold its channels "
                f"alone (axes {x.axes})"
            )
            for v in node.outputs:
                v.channels = None
    if node.op == "add" and out.channels is not None:
        layouts = {(v.axes, v.channel_outer) for v in node.inputs if v.channels == out.channels}
        if len(layouts) > 1:
            node.attrs["layout_why"] = "its inputs have their channels on different axes"
            for v in node.outputs:
                v.channels = None


def _carrier(node: Node) -> int:
    """Which input of a two-input ``mul`` carries the channels (the other is a gate): the
    first, unless only the second comes from a translated op (``silu(gate) * up``)."""
    if node.op != "mul" or len(node.inputs) != 2:
        return 0
    a, b = node.inputs

    def translated(v: Value) -> bool:
        return v.channels is not None and (v.producer is None or v.producer.op != "opaque")

    return 1 if same_shape(a, b) and translated(b) and not translated(a) else 0


def same_shape(a: Value, b: Value) -> bool:
    """Whether two values are known to have one shape (every size but the batch's known
    and equal): an elementwise product, not a gate broadcast over positions."""
    return a.shape is not None and a.shape == b.shape and all(d is not None for d in a.shape[1:])


def _copied_axis(x: Value) -> int | None:
    """The axis of ``x`` whose positions are copies of one position: ``x`` is a repeat
    of an axis of size 1 (an expand or tile of an inserted axis), else None."""
    p = x.producer
    if p is None or p.op != "repeat" or p.inputs[0].shape is None:
        return None
    axis = int(p.attrs["axis"])
    return axis if p.inputs[0].shape[axis] == 1 and axis not in x.axes else None


def _infer_moved(node: Node) -> None:
    """Channels and layout of a Transpose, Reshape, MatMul or select output; where the
    channels cannot be followed, the output has none and attr ``layout_why`` says why."""
    from ._layout import (
        LayoutError,
        matmul_axes,
        merged_copies,
        repeat_map,
        reshape_layout,
        select_axes,
        select_map,
        select_shape,
        transpose_axes,
    )

    out = node.outputs[0]
    where = f"node {node.name!r} ({node.op})"
    node.attrs.pop("layout_why", None)
    node.attrs.pop("channel_map", None)
    outer = None  # the output's channel_outer
    try:
        merged = [v for v in node.inputs if v.channel_outer is not None]
        if merged and node.op in ("select", "repeat"):
            # (their channel maps count the merged positions as channels)
            raise LayoutError(f"the channels of {merged[0].name!r} are merged with another axis")
        if node.op == "transpose":
            x = node.inputs[0]
            perm = [int(p) for p in node.attrs["perm"]]
            if x.rank is not None and x.rank != len(perm):
                raise InvalidGraphError(f"{where}: perm {perm} for a rank-{x.rank} input")
            if x.shape is not None and out.shape is None:
                out.shape = tuple(x.shape[p] for p in perm)
            if x.channels is None:
                raise LayoutError(f"the channels of {x.name!r} are not known")
            axes = transpose_axes(x.axes, perm)
            channels, outer = x.channels, x.channel_outer
        elif node.op == "reshape":
            x = node.inputs[0]
            out.shape = tuple(node.attrs["shape"])
            if x.channels is None:
                raise LayoutError(f"the channels of {x.name!r} are not known")
            if x.shape is None:
                raise LayoutError(f"the shape of {x.name!r} is not known")
            copies = _copied_axis(x)
            if copies is None or x.channel_outer is not None:
                axes, outer = reshape_layout(
                    x.shape, x.axes, x.channel_outer, out.shape, x.channels
                )
                channels = x.channels
            else:
                axes, index = merged_copies(x.shape, x.axes, copies, out.shape)
                node.attrs["channel_map"] = index
                channels = index.size
        elif node.op == "repeat":
            x = node.inputs[0]
            axis, n = int(node.attrs["axis"]), int(node.attrs["repeats"])
            if len(node.inputs) != 1 or n < 1:
                raise InvalidGraphError(f"{where}: one input, repeats of at least 1")
            if x.shape is not None and out.shape is None and axis < len(x.shape):
                size = x.shape[axis]
                out.shape = (
                    *x.shape[:axis],
                    None if size is None else size * n,
                    *x.shape[axis + 1 :],
                )
            if x.channels is None:
                raise LayoutError(f"the channels of {x.name!r} are not known")
            if x.rank is None or not 0 < axis < x.rank:
                raise LayoutError("it repeats the batch, or an axis of a tensor of unknown rank")
            axes = x.axes
            channels = x.channels
            if axis in axes:
                if x.shape is None:
                    raise LayoutError(f"the shape of {x.name!r} is not known")
                node.attrs["channel_map"] = repeat_map(x.shape, axes, axis, n)
                channels = node.attrs["channel_map"].size
        elif node.op == "select":
            x = node.inputs[0]
            axis, index = int(node.attrs["axis"]), node.attrs["index"]
            if len(node.inputs) != 1 or not isinstance(index, (int, slice, tuple)):
                raise InvalidGraphError(f"{where}: one input, an integer, slice or tuple index")
            if x.shape is not None and out.shape is None and axis < len(x.shape):
                out.shape = select_shape(x.shape, axis, index)
            if x.channels is None:
                raise LayoutError(f"the channels of {x.name!r} are not known")
            if x.rank is None:
                raise LayoutError(f"the rank of {x.name!r} is not known")
            if axis in x.axes and x.shape is not None:
                # some channels kept whole: the output's, read through a map
                shape = list(x.shape)
                if len(x.axes) == 1:  # (where the backend gave no sizes)
                    shape[x.axes[0]] = x.channels
                axes, kept = select_map(shape, x.axes, axis, index)
                node.attrs["channel_map"] = kept
                channels = kept.size
            else:
                axes = select_axes(x.rank, x.axes, axis, index)
                channels = x.channels
            if out.spatial is None and out.shape is not None:
                # the positions left (none for a class token): what the estimate counts
                rest = [d for i, d in enumerate(out.shape) if i != 0 and i not in axes]
                if all(isinstance(d, int) for d in rest):
                    out.spatial = tuple(rest)
        else:
            if len(node.inputs) != 2:
                raise InvalidGraphError(f"{where}: takes two inputs")
            a, b = node.inputs
            if a.shape is not None and b.shape is not None and out.shape is None:
                batch = np.broadcast_shapes(
                    *(tuple(1 if d is None else d for d in v.shape[:-2]) for v in (a, b))
                )
                out.shape = (*batch, a.shape[-2], b.shape[-1])
            if a.rank is None or b.rank is None:
                raise LayoutError("the ranks of its inputs are not known")
            reasons, axes, channels = [], None, None
            for index in (1, 0):  # the second operand (attention's V) first
                v = node.inputs[index]
                if v.channels is None or (v.producer is not None and v.producer.op == "opaque"):
                    continue
                try:
                    axes = matmul_axes(a.rank, b.rank, v.axes, index)
                except LayoutError as e:
                    reasons.append(str(e))
                    continue
                channels, outer = v.channels, v.channel_outer
                node.attrs["carrier"] = index
                break
            if axes is None:
                raise LayoutError(reasons[0] if reasons else "neither input has known channels")
    except LayoutError as e:
        node.attrs["layout_why"] = str(e)
        node.attrs.pop("carrier", None)
        out.channels, out.channel_axes, out.channel_outer = None, None, None
        return
    out.channels, out.channel_axes, out.channel_outer = channels, axes, outer
