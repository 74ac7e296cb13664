"""What the user will deploy: the grids a quantizer puts into the model.

A :class:`Deployment` names the weight and activation grids (bits, per tensor or per
output channel, symmetric or not, or no activation grids at all) and the quantizer whose
placement rules say *which* tensors get an activation grid (a :class:`QuantizerProfile`).
The scale objective, bias correction and evaluation read the same object, so that what
is optimized is what is measured and shipped.

Profiles describe a quantizer on the IR, as it will see the model once the backend has
written the result back (a clip with per-channel bounds becomes a scalar ``Clip`` to the
widest bounds and a per-channel ``Min``/``Max``, see the backends). They are plain
objects registered by name (:func:`register_profile`), so that a plugin can add another
quantizer's rules without touching the solver.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Literal, Protocol

import numpy as np

from ._errors import CLEError
from ._ir import Graph, Node, Value

PointKind = Literal["tensor", "pre_bound", "requant", "copy"]


@dataclass(frozen=True)
class Deployment:
    """The grids a model will be quantized with.

    The defaults are those of onnxruntime's ``quantize_static``: 8-bit symmetric weights
    per tensor, 8-bit asymmetric (uint8) activations, QDQ placement.

    Attributes:
        weight_bits: bits of the weight grids (2 to 16).
        per_channel: one weight grid per output channel instead of one per tensor.
        weight_symmetric: weight grids symmetric about 0 (``quantize_static``'s default
            for int8 weights); else they span ``min .. max``.
        activation_bits: bits of the activation grids, or None for a weights-only
            deployment (activations stay in float).
        activation_symmetric: activation grids symmetric about 0 (int8); else they span
            ``min(0, lo) .. max(0, hi)`` (uint8, the default).
        quantizer: the profile (:func:`register_profile`) that says which activations get
            a grid; ``"onnxruntime"`` by default.
    """

    weight_bits: int = 8
    per_channel: bool = False
    weight_symmetric: bool = True
    activation_bits: int | None = 8
    activation_symmetric: bool = False
    quantizer: str = "onnxruntime"

    def __post_init__(self) -> None:
        if not isinstance(self.weight_bits, int) or not 2 <= self.weight_bits <= 16:
            raise CLEError("weight_bits must be an integer from 2 to 16")
        if self.activation_bits is not None and (
            not isinstance(self.activation_bits, int) or not 2 <= self.activation_bits <= 16
        ):
            raise CLEError("activation_bits must be an integer from 2 to 16, or None")
        if self.quantizer not in _PROFILES:
            names = ", ".join(sorted(_PROFILES))
            raise CLEError(f"unknown quantizer profile {self.quantizer!r} (known: {names})")

    @property
    def weights_only(self) -> bool:
        return self.activation_bits is None

    def with_(self, **changes) -> Deployment:
        return replace(self, **changes)

    def describe(self) -> str:
        """One line, as the report and the command line print it: ``W8 per-channel
        symmetric, A8 asymmetric (onnxruntime)``."""
        grid = "per-channel" if self.per_channel else "per-tensor"
        w = f"W{self.weight_bits} {grid} {'symmetric' if self.weight_symmetric else 'asymmetric'}"
        if self.weights_only:
            return f"{w}, float activations"
        sym = "symmetric" if self.activation_symmetric else "asymmetric"
        return f"{w}, A{self.activation_bits} {sym} ({self.quantizer})"

    def short(self) -> str:
        """``W8A8`` or ``W8``, with ``/ch`` for per-channel weights."""
        a = "" if self.weights_only else f"A{self.activation_bits}"
        return f"W{self.weight_bits}{a}{'/ch' if self.per_channel else ''}"


def grid_levels(bits: int) -> float:
    """Steps of a ``bits``-bit grid across its span."""
    return 2.0**bits - 1.0


def deployment_of(
    deployment: Deployment | None = None,
    bits: int | None = None,
    per_channel: bool | None = None,
    symmetric: bool | None = None,
    activations: bool | None = None,
) -> Deployment:
    """``deployment`` (default: onnxruntime's defaults) changed by the evaluation
    functions' older keyword arguments: ``bits`` (weights and activations),
    ``per_channel``, ``symmetric`` (weights and activations), ``activations`` (False:
    weights only). None leaves a field as it is."""
    changes: dict = {}
    if bits is not None:
        changes["weight_bits"] = bits
        changes["activation_bits"] = bits
    if per_channel is not None:
        changes["per_channel"] = per_channel
    if symmetric is not None:
        changes["weight_symmetric"] = changes["activation_symmetric"] = symmetric
    base = deployment or Deployment()
    if activations is False or (activations is None and base.weights_only):
        changes["activation_bits"] = None
    elif activations and "activation_bits" not in changes and base.weights_only:
        changes["activation_bits"] = base.weight_bits
    return base.with_(**changes) if changes else base


@dataclass(frozen=True)
class Point:
    """One activation grid, on the IR.

    ``kind``:

    - ``"tensor"``: ``value`` is quantized as it is;
    - ``"pre_bound"``: ``value`` is the input of ``clip`` (a clip whose bounds differ
      between channels once scaled); the quantizer rounds it after a scalar clip to the
      widest bounds, before the per-channel ones;
    - ``"requant"``: ``value`` is rounded again on the grid of ``grid_of`` (an average
      pool or a resize whose output the quantizer puts on its input's grid);
    - ``"copy"``: ``value`` has the grid of ``grid_of`` and holds only values of it (a
      max pool, a flatten, a slice, a zero pad): a grid that rounds nothing.
    """

    value: Value
    kind: PointKind = "tensor"
    clip: Node | None = None
    grid_of: Value | None = None
    # The grid exists only once ``unless_uniform``'s bounds differ between channels (the
    # output of a clip whose bounds scaling will carry: with equal scales the backend
    # writes one scalar clip, merged into the grid before it).
    unless_uniform: Node | None = None


class QuantizerProfile(Protocol):
    """Which tensors a quantizer puts an activation grid on, read off the IR."""

    name: str

    def points(self, graph: Graph, carried: frozenset[int] = frozenset()) -> list[Point]:
        """Every activation grid of ``graph`` as the quantizer would place it.
        ``carried``: ids of the clip nodes whose bounds scaling may make per channel."""

    # Optional: ``quantizes_weight(node, deployment) -> bool``, whether the quantizer
    # rounds ``node``'s weights (default: every layer's; see :func:`quantizes_weight`);
    # ``groups_share_row_grids(node) -> bool``, whether a per-channel weight grid spans
    # the same row of every group (default: each output channel its own grid; see
    # :func:`groups_share_row_grids`);
    # ``shared_weight_grids(nodes, deployment) -> list[list[Node]]``, the layers whose
    # weights it rounds on one grid (default: :func:`shared_weight_grids`).


_PROFILES: dict[str, QuantizerProfile] = {}


def register_profile(profile: QuantizerProfile) -> QuantizerProfile:
    """Make ``profile`` available as ``Deployment(quantizer=profile.name)``."""
    _PROFILES[profile.name] = profile
    return profile


def get_profile(name: str) -> QuantizerProfile:
    try:
        return _PROFILES[name]
    except KeyError:
        raise CLEError(f"unknown quantizer profile {name!r}") from None


def profile_names() -> list[str]:
    return sorted(_PROFILES)


def quantizes_weight(profile: QuantizerProfile, node: Node, deployment: Deployment) -> bool:
    """Whether ``profile`` rounds ``node``'s weights in ``deployment``: its own
    ``quantizes_weight`` if it has one, else every layer's (Conv, ConvTranspose, Linear)."""
    own = getattr(profile, "quantizes_weight", None)
    if own is not None:
        return bool(own(node, deployment))
    return node.is_layer and node.weight is not None


def groups_share_row_grids(profile: QuantizerProfile, node: Node) -> bool:
    """Whether ``profile``'s per-channel weight grids of the grouped layer ``node`` are
    shared by output channel ``o`` of every group (one grid per row of a group, not per
    output channel): its own ``groups_share_row_grids`` if it has one, else False."""
    own = getattr(profile, "groups_share_row_grids", None)
    return bool(own(node)) if own is not None else False


def shared_weight_grids(
    profile: QuantizerProfile, nodes: list[Node], deployment: Deployment
) -> list[list[Node]]:
    """The groups of ``nodes`` whose weights ``profile`` rounds on one grid in
    ``deployment``: its own ``shared_weight_grids`` if it has one, else, with per-tensor
    grids, the layers of one ``weight_group`` (row blocks of one tensor: one grid over
    the whole tensor) and, with per-channel grids, none (each output row of the tensor
    has a grid of its own, as the layers' rows do)."""
    own = getattr(profile, "shared_weight_grids", None)
    if own is not None:
        return [list(g) for g in own(nodes, deployment)]
    if deployment.per_channel:
        return []
    groups: dict[str, list[Node]] = {}
    for node in nodes:
        key = node.attrs.get("weight_group")
        if key is not None:
            groups.setdefault(key, []).append(node)
    return [g for g in groups.values() if len(g) > 1]


def per_channel_bounds(clip: Node) -> bool:
    """Whether a clip's bounds differ between channels (after scaling): the backends then
    write it as a scalar clip to the widest bounds followed by per-channel ``Max`` /
    ``Min``, which quantizers do not fold into the layer."""
    return any(np.asarray(clip.params[k]).size > 1 for k in ("lo", "hi"))


class OnnxRuntimeQDQ:
    """onnxruntime's ``quantize_static`` in QDQ format with its default operator set,
    after ``quant_pre_process`` (read off ``onnxruntime/quantization``: ``registry.py``,
    ``qdq_quantizer.py`` and ``operators/``):

    - a Conv / ConvTranspose / Gemm / MatMul quantizes its data input and its output; so
      does every other quantized operator (Add, Mul, Concat, GlobalAveragePool,
      LeakyRelu, BatchNormalization ...) with each of its inputs;
    - a Relu or Clip with scalar bounds that is the only reader of a quantized tensor is
      removed (asymmetric activations): the tensor takes its range, one grid for both;
    - a per-channel clip is a scalar ``Clip`` (removed so, onto the layer's output: the
      *pre-bound* grid) then ``Min``/``Max``, which are not quantized: the next quantized
      reader rounds their output again;
    - a MatMul of two activations quantizes both; LayerNormalization its input, its
      output and its scale (as a per-tensor weight: a 1-D tensor has no channel axis);
    - a rotary embedding (its Mul, Slice, Neg, Concat, Mul, Add) is taken as one
      quantized operator: its input and its output (checked on the LLaMA export: QDQ
      before the Mul by cos, after the Add; the grids of its intermediates, about the
      input's, are not counted; opset 23's RotaryEmbedding assumed the same, not
      checked);
    - MaxPool, AveragePool, Resize, Flatten, Reshape, Transpose, Slice, Gather, Pad put
      their output on their input's grid when that input is quantized (a requantization
      that adds noise only where the output leaves that grid: averages and interpolation);
    - PRelu, ReduceMean, Min, Max and unknown operators are not quantized;
    - a weight tensor gets one grid per tensor, or per output channel (a MatMul's
      ``(in, out)`` weight along axis 1, a Gemm's along its output axis,
      ``operators/matmul.py``, ``gemm.py``; checked on a BERT export: 288 scales on
      axis 1 of its packed ``(96, 288)`` in-projection): layers cut from one packed
      tensor share its per-tensor grid, not a per-channel one (:func:`shared_weight_grids`).

    With symmetric activations nothing is removed: the Relu or Clip keeps grids on both
    sides.
    """

    name = "onnxruntime"

    _QUANTIZED = frozenset(
        {
            "conv",
            "conv_transpose",
            "linear",
            "add",
            "mul",
            "concat",
            "global_avgpool",
            "matmul",
            "norm",
            # a rotary embedding's Mul by cos rounds its input, its Add its output
            "rotary",
        }
    )
    _ON_INPUT_GRID = frozenset(
        {"maxpool", "avgpool", "resize", "flatten", "slice", "pad", "transpose", "reshape"}
        | {"select"}
    )
    _ADDS_NOISE = frozenset({"avgpool", "resize"})

    def __init__(self, symmetric_activations: bool = False):
        self.symmetric = symmetric_activations

    @staticmethod
    def quantizes_weight(node: Node, deployment: Deployment) -> bool:
        """Every layer's weights; a norm's scale where activations are quantized (QDQ
        LayerNormalization; a weights-only deployment leaves it in float, as
        ``cle evaluate --weights-only`` does)."""
        if node.is_layer:
            return node.weight is not None
        return node.op == "norm" and not deployment.weights_only

    @staticmethod
    def groups_share_row_grids(node: Node) -> bool:
        """A ConvTranspose weight ``(in, out / groups, kh, kw)`` is quantized per channel
        along axis 1 (``QDQConv``'s default axis for it): with groups, slice ``o`` holds
        row ``o`` of every group, so a depthwise ConvTranspose gets one grid in all."""
        return node.op == "conv_transpose" and node.layout.groups > 1

    def points(self, graph: Graph, carried: frozenset[int] = frozenset()) -> list[Point]:
        done: dict[str, Point] = {}
        order: list[Point] = []
        moved: dict[str, Value] = {}  # a quantized tensor -> the activation that took it

        source = _past_identities  # Identity and Dropout are gone after pre-processing

        def quantize(v: Value) -> None:
            v = source(v)
            v = moved.get(v.name, v)
            if v.name in done or v.channels is None:
                return
            point = Point(v)
            done[v.name] = point
            order.append(point)

        def removable(node: Node) -> bool:
            return node.op == "relu" or (
                node.op == "clip" and not per_channel_bounds(node) and id(node) not in carried
            )

        merged: set[int] = set()  # activations whose grid is their producer's

        def split(clip: Node, x: Value, into_x: bool) -> None:
            # A scalar Clip to the widest bounds (merged into the grid of ``x`` when it is
            # the only reader of ``x``); the per-channel Min / Max after it are not
            # quantized, so their reader rounds again.
            point = Point(x, "pre_bound", clip=clip)
            if into_x:
                done[x.name] = point
            order.append(point)
            if id(clip) in carried and not per_channel_bounds(clip):
                after = Point(clip.outputs[0], unless_uniform=clip)
                done[after.value.name] = after
                order.append(after)

        for node in graph.nodes:
            op = node.op
            if op in self._QUANTIZED or op == "leaky_relu" or op == "batchnorm":
                data = node.inputs[:1] if node.is_layer or op == "norm" else node.inputs
                if op == "mul" and "factor" in node.params:
                    data = node.inputs[:1]
                for v in data:
                    quantize(v)
                out = node.outputs[0]
                readers = out.consumers
                if (
                    not self.symmetric
                    and len(readers) == 1
                    and readers[0].op in ("relu", "clip")
                    and out not in graph.outputs
                ):
                    act = readers[0]
                    merged.add(id(act))
                    if removable(act):
                        moved[out.name] = act.outputs[0]
                        quantize(act.outputs[0])
                    else:
                        split(act, out, into_x=True)
                else:
                    quantize(out)
            elif op in ("relu", "clip"):
                x = source(node.inputs[0])
                if id(node) in merged or x.name not in done:
                    # Merged into its producer's grid above; or its input is not
                    # quantized, and then neither is its output.
                    continue
                if removable(node):
                    quantize(node.outputs[0])
                else:
                    split(node, x, into_x=False)  # ``x`` has other readers: its own grid
            elif op in self._ON_INPUT_GRID:
                x = source(node.inputs[0])
                x = moved.get(x.name, x)
                if x.name in done and op in self._ADDS_NOISE:
                    prior = done[x.name]
                    grid = prior.grid_of if prior.kind == "copy" else prior.value
                    point = Point(node.outputs[0], "requant", grid_of=grid)
                    done[node.outputs[0].name] = point
                    order.append(point)
                elif x.name in done:
                    point = Point(node.outputs[0], "copy", grid_of=x)
                    done[node.outputs[0].name] = point
                    order.append(point)
        return order


register_profile(OnnxRuntimeQDQ())


class TorchaoX86:
    """torchao's PT2E ``X86InductorQuantizer`` (``prepare_pt2e`` / ``convert_pt2e``, the
    deployment path of PyTorch models on x86), read off
    ``torchao/quantization/pt2e/quantizer/x86_inductor_quantizer.py`` and checked against
    the observers ``prepare_pt2e`` inserts (``tests/torch/test_pt2e_profile.py``):

    - a Conv2d, a Linear, and a Conv1d whose only reader is a ReLU quantize their data
      input and their weights; their output stays in float (a ReLU / ReLU6 / Hardtanh /
      Hardswish / SiLU after a Conv2d is fused into it), so an activation grid sits on a
      layer's *input*, after any bound, scalar or per channel: there is no grid before a
      per-channel bound (onnxruntime's second grid);
    - a MatMul of two activations and a Mul of two activations of the same shape quantize
      both inputs; a Conv2d whose only reader is an Add quantizes the Add's other input;
    - MaxPool2d, AvgPool2d, AdaptiveAvgPool2d, Flatten and Cat whose inputs are outputs
      of quantized operators (a layer, the bound fused into a Conv2d, one of these) put
      their inputs on a grid and their output on the same one (a Flatten gives its input
      a grid of its own, after the pool's; the inputs of a Cat share one grid, modelled
      here as one grid each);
    - ConvTranspose, Conv3d, other Conv1d, normalization layers (their affine included),
      Add, and every other operator stay in float;
    - per-channel weight grids are along axis 0 of a Linear's or Conv's weight (the
      output channels): the q / k / v rows of a packed in-projection, one ``linear``
      call in the exported program, share its per-tensor grid, not a per-channel one
      (:func:`shared_weight_grids`; checked: one ``MinMaxObserver`` or one
      ``PerChannelMinMaxObserver(ch_axis=0)`` on ``in_proj_weight``). The stock
      quantizer matches a linear by the source recorded at export, which for
      ``nn.MultiheadAttention``'s two calls is the attention module: they stay in float
      unless marked as ``F.linear`` (``benchmarks/bench_pt2e.py``'s ``mark_layers``),
      which this profile assumes.
    """

    name = "torchao-x86"

    @staticmethod
    def quantizes_weight(node: Node, deployment: Deployment | None = None) -> bool:
        """Conv2d and Linear weights, and those of a Conv1d whose only reader is a ReLU
        (its one fused pattern)."""
        if node.op == "linear":
            return node.weight is not None
        if node.op != "conv":
            return False
        if _conv2d(node):
            return True
        readers = _readers(node.outputs[0])
        return np.ndim(node.weight) == 3 and len(readers) == 1 and readers[0].op == "relu"

    def points(self, graph: Graph, carried: frozenset[int] = frozenset()) -> list[Point]:
        done: set[tuple[str, str]] = set()
        order: list[Point] = []
        quantized: set[str] = set()  # outputs of quantized operators (for the pools)

        def add(v: Value, kind: PointKind = "tensor", grid_of: Value | None = None) -> None:
            v = _past_identities(v)
            if v.channels is None or (v.name, kind) in done:
                return
            done.add((v.name, kind))
            order.append(Point(v, kind, grid_of=grid_of))

        for node in graph.nodes:
            op, out = node.op, node.outputs[0] if node.outputs else None
            if node.is_layer:
                if self.quantizes_weight(node):
                    add(node.inputs[0])
                    quantized.add(out.name)
                    readers = _readers(out)
                    bound = readers[0] if len(readers) == 1 else None
                    if _conv2d(node) and bound is not None and _scalar_bound(bound):
                        quantized.add(bound.outputs[0].name)  # fused into the Conv2d
            elif op == "matmul" or (
                op == "mul"
                and "factor" not in node.params
                and len(node.inputs) == 2
                and node.inputs[0].shape is not None
                and node.inputs[0].shape == node.inputs[1].shape
            ):
                for v in node.inputs:
                    add(v)
                quantized.add(out.name)
            elif op == "add" and len(node.inputs) == 2:
                for i, v in enumerate(node.inputs):
                    conv = _past_identities(v).producer
                    if conv is not None and _conv2d(conv) and len(_readers(conv.outputs[0])) == 1:
                        add(node.inputs[1 - i])
                        break
            elif op in ("maxpool", "avgpool", "global_avgpool", "flatten", "concat"):
                inputs = [_past_identities(v) for v in node.inputs]
                if not inputs or not all(v.name in quantized for v in inputs):
                    continue
                for v in inputs:
                    add(v)
                kind = "requant" if op in ("avgpool", "global_avgpool") else "copy"
                add(out, kind, grid_of=inputs[0])
                quantized.add(out.name)
        return order


def _conv2d(node: Node) -> bool:
    return node.op == "conv" and np.ndim(node.weight) == 4


def _scalar_bound(node: Node) -> bool:
    """A ReLU, or a clip whose bounds are the same for every channel."""
    return node.op == "relu" or (node.op == "clip" and not per_channel_bounds(node))


def _past_identities(v: Value) -> Value:
    """``v``, or the value an identity or dropout before it copies (both are gone from
    an exported eval-mode graph and after onnxruntime's pre-processing)."""
    while v.producer is not None and v.producer.op in ("identity", "dropout"):
        v = v.producer.inputs[0]
    return v


def _readers(v: Value) -> list[Node]:
    """The nodes that read ``v``, looking through identities and dropouts."""
    out = []
    for node in v.consumers:
        if node.op in ("identity", "dropout"):
            out += _readers(node.outputs[0])
        else:
            out.append(node)
    return out


register_profile(TorchaoX86())


def profile_for(deployment: Deployment) -> QuantizerProfile:
    """The profile of ``deployment``'s quantizer, set up for its activation symmetry."""
    profile = get_profile(deployment.quantizer)
    configure: Callable | None = getattr(profile, "configured", None)
    if configure is not None:
        return configure(deployment)
    if isinstance(profile, OnnxRuntimeQDQ) and deployment.activation_symmetric:
        return OnnxRuntimeQDQ(symmetric_activations=True)
    return profile
