"""The translator's core: its state, the helpers every handler uses, emission, the walk
over the FX graph and the dispatch of each node to its handler, and ``capture``, the
entry point.

The handlers are methods of the mixins ``Layers``, ``Elementwise``, ``Shape`` and
``Spatial`` (one module each); ``translate`` finds a node's handler by name in the
tables of ``cle_torch._optable``.
"""

from __future__ import annotations

import logging
import operator
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.padding import _ConstantPadNd

from cle_core import CLEError, Graph, unique_name

from .._capture import Capture, Site, _input_shapes, _param_names
from .._decompose import decomposition, fused
from .._optable import (
    _F_CONV,
    _F_CONVT,
    _FUNCTIONS,
    _METHODS,
    _MODULE_CALLS,
    _SCALAR_OPS,
    _SHAPE_ATTRS,
    _Opaque,
)
from .._trace import (
    AVGPOOL_MODULES,
    BN_MODULES,
    CONV_MODULES,
    CONVT_MODULES,
    MAXPOOL_MODULES,
    check_eval,
    known_base,
    trace,
)
from .elementwise import Elementwise
from .layers import Layers
from .layout import Moves
from .mha import Attention
from .norms import Norms, find_norms
from .propagate import Shapes, propagate
from .rotary import Rotary, find_rotaries
from .shape import Shape
from .spatial import Spatial

log = logging.getLogger("cle_torch")


# Ops whose output may hold its channels on another axis than 1 (see ``moved``).
_MOVING = frozenset({"transpose", "reshape", "matmul", "norm", "linear"})


class _Translator(Layers, Elementwise, Shape, Spatial, Moves, Norms, Attention, Rotary):
    def __init__(
        self,
        cap: Capture,
        shapes: tuple[Any, Any],
        fx_shapes: Shapes | None = None,
        example: dict | None = None,
    ):
        self.cap = cap
        self.model = cap.model
        self.ir = cap.ir
        self.modules = dict(cap.model.named_modules())
        self.pnames = _param_names(cap.model)
        self.shapes = shapes
        # The shape of each FX node's tensor from the example runs (None: follows the
        # batch); empty without an example input.
        self.fx_shapes: Shapes = fx_shapes or {}
        # The first example run's own shapes and inputs (see propagate): what tables
        # computed in forward are computed from.
        self.example: dict = example or {}
        self.table_values: dict[str, Any] = {}  # FX node -> a rotary table it computes
        self.rank: dict[str, int | None] = {}
        self.chan: dict[str, int | None] = {}
        self.alias: dict[str, fx.Node] = {}  # node -> the node whose tensor it returns
        self.values: set[str] = set()  # FX nodes that have an IR value
        self.shape_only: set[str] = set()
        self.used_names: set[str] = set()
        self.given: dict[str, tuple] = {}  # graph inputs whose shape the caller gave
        # Values of spatial size 1 (a global pool, then 1x1 convolutions and elementwise
        # ops): a product of one of them with a feature map is a gate (squeeze-and-
        # excitation), broadcast over the map's positions.
        self.point: set[str] = set()
        # Values whose channels may lie on another axis than 1 (after a transpose, a
        # Linear on tokens ...): a concat along axis 1 of them is not one of channels.
        self.moved: set[str] = cap.moved
        self.mha: set[str] = set()  # nn.MultiheadAttention calls translated (mha.py)
        self.norms = find_norms(cap.fx_graph)
        self.inside_norms = {
            n.name for m in self.norms.values() for n in m.nodes if n.op != "get_attr"
        } - set(self.norms)
        self.rotaries = find_rotaries(cap.fx_graph, self.fx_shapes, self.is_parameter)
        inside = {n.name for m in self.rotaries.values() for n in m.nodes | m.inside}
        self.inside_rotaries = inside - set(self.rotaries)

    # --- helpers -------------------------------------------------------------------------
    def attr(self, target: str) -> Any:
        if target in self.cap.constants:
            return self.cap.constants[target]
        obj: Any = self.model
        for part in target.split("."):
            obj = getattr(obj, part)
        return obj

    def is_parameter(self, target: str) -> bool:
        try:
            return isinstance(self.attr(target), nn.Parameter)
        except AttributeError:
            return False

    def param_id(self, target: str) -> str:
        if target in self.cap.temp_biases:
            return target
        try:
            return self.pnames.get(id(self.attr(target)), target)
        except AttributeError:
            return target

    def param(self, a: Any, what: str) -> tuple[torch.Tensor, str]:
        """``a`` must be a ``get_attr`` of a parameter or buffer of the model."""
        if isinstance(a, fx.Node) and a.op == "get_attr" and a.target not in self.cap.constants:
            try:
                obj = self.attr(a.target)
            except AttributeError:
                obj = None
            if isinstance(obj, torch.Tensor) and id(obj) in self.pnames:
                return obj, a.target
        raise _Opaque(f"its {what} is not a parameter of the model")

    def data(self, a: Any) -> fx.Node:
        """``a`` must be a tensor of the graph (an FX node with an IR value)."""
        if isinstance(a, fx.Node) and a.name in self.values:
            return a
        raise _Opaque("its input is not a tensor of the graph")

    def unique(self, base: str) -> str:
        return unique_name(base, self.used_names, sep="#")

    def is_shape_only(self, node: fx.Node) -> bool:
        """Nodes that only read shapes (``x.size(0)``, ``x.shape[0] * 2``): scaling never
        changes them, so they are not data reads."""
        if node.op == "call_method" and node.target in ("size", "dim"):
            return True
        if node.op == "call_function" and node.target is getattr:
            return len(node.args) > 1 and node.args[1] in _SHAPE_ATTRS
        if node.op == "call_function" and node.target in _SCALAR_OPS:
            deps = node.all_input_nodes
            return bool(deps) and all(d.name in self.shape_only for d in deps)
        return False

    @staticmethod
    def is_batch_size(a: Any) -> bool:
        """``a`` is ``t.size(0)``, ``t.shape[0]`` or ``t.size()[0]`` of some tensor (the
        translation assumes every tensor keeps the batch axis first)."""
        if not isinstance(a, fx.Node):
            return False
        if a.op == "call_method" and a.target == "size":
            return (a.args[1] if len(a.args) > 1 else a.kwargs.get("dim")) == 0
        if a.op == "call_function" and a.target is operator.getitem and a.args[1] == 0:
            src = a.args[0]
            return isinstance(src, fx.Node) and (
                (src.op == "call_method" and src.target == "size" and len(src.args) == 1)
                or (src.op == "call_function" and src.target is getattr and src.args[1] == "shape")
            )
        return False

    def inplace_ok(self, x: fx.Node) -> bool:
        """An in-place op overwrites its input. The FX graph shows the data flow only if
        nothing else reads that tensor, through any alias of it."""
        cur = x
        while len(cur.users) == 1:
            nxt = self.alias.get(cur.name)
            if nxt is None or nxt is cur:
                return True
            cur = nxt
        return False

    # --- emission ------------------------------------------------------------------------
    def emit(
        self,
        op: str,
        node: fx.Node,
        inputs: Sequence[fx.Node | str],
        *,
        rank: int | None,
        channels: int | None,
        params: dict | None = None,
        attrs: dict | None = None,
        param_ids: dict | None = None,
        name: str | None = None,
        alias: fx.Node | None = None,
        **site: Any,
    ) -> None:
        kind = {"call_module": "module", "call_function": "function"}.get(node.op, "method")
        call_index, module = 0, None
        if node.op == "call_module":
            module = node.target
            calls = self.cap.module_calls.setdefault(module, [])
            call_index = len(calls)
            calls.append(node.name)
            if name is None:
                name = module if call_index == 0 else f"{module}#{call_index}"
        name = self.unique(name or node.name)
        input_names = [i if isinstance(i, str) else i.name for i in inputs]
        self.ir.add_node(
            op,
            input_names,
            name=name,
            outputs=[node.name],
            params=params,
            attrs=attrs,
            handle=node.name,
            param_ids=param_ids,
        )
        stack = node.meta.get("nn_module_stack") or {}
        scope = list(stack.values())[-1][0] if stack else ""
        self.cap.sites[node.name] = Site(
            fx=node.name,
            kind=kind,
            op=op,
            target=node.target,
            module=module,
            call_index=call_index,
            input=input_names[0] if input_names else None,
            rank=rank,
            scope=scope,
            **site,
        )
        self.cap.ir_names[name] = node.name
        self.values.add(node.name)
        shape = self.fx_shapes.get(node.name)
        if shape is not None:
            self.ir.values[node.name].shape = shape
            rank = len(shape)  # what the run saw beats what the handler inferred
        elif rank is not None:
            # No shape run (a convolutional network, see propagate.needs_shapes): the
            # rank alone tells the core which axis a Linear's channels are on.
            self.ir.values[node.name].shape = (None,) * rank
        self.rank[node.name] = rank
        self.chan[node.name] = channels
        moving = op in _MOVING and not (op in ("linear", "norm") and rank == 2)
        if moving or (op != "flatten" and any(i in self.moved for i in input_names)):
            self.moved.add(node.name)
        if alias is not None:
            self.alias[node.name] = alias

    def unary(self, node, x, op, *, params=None, attrs=None, param_ids=None, alias=False):
        """A channel-wise op: rank and channels as its input's."""
        if x.name in self.point or op == "global_avgpool":
            self.point.add(node.name)
        self.emit(
            op,
            node,
            [x],
            rank=self.rank.get(x.name),
            channels=self.chan.get(x.name),
            params=params,
            attrs=attrs,
            param_ids=param_ids,
            alias=x if alias else None,
        )

    def refused_match(self, node: fx.Node, x: fx.Node, kind: str, why: object) -> None:
        """A pattern matched as a whole (a decomposed norm, a rotary embedding) that
        cannot be translated: one opaque node for all of it, reading its input ``x``,
        with the reason."""
        self.emit(
            "opaque",
            node,
            [x] if x.name in self.values else [],
            rank=None,
            channels=None,
            attrs={"kind": kind, "why": str(why), "channels": None},
        )

    def opaque(self, node: fx.Node, why: str) -> None:
        inputs: list[fx.Node] = []
        params: dict[str, np.ndarray] = {}
        ids: dict[str, str] = {}

        def read(ident: str) -> None:  # only the id matters: it marks the tensor as read
            key = f"p{len(params)}"
            params[key], ids[key] = np.zeros(1), ident

        # x.expand_as(y), x.view_as(y): y gives only its shape, which scaling keeps
        shape_of = node.args[1] if node.op == "call_method" and node.target in _SHAPE_OF else None
        for a in node.all_input_nodes:
            if a.op == "get_attr":
                read(self.param_id(a.target))
            elif a.name in self.values and a not in inputs and a is not shape_of:
                inputs.append(a)
        if node.op == "call_module":
            m = self.modules.get(node.target)
            kind = type(m).__name__
            if isinstance(m, nn.Embedding):  # (..., features): channels last
                self.moved.add(node.name)
            for pname, t in list(m.named_parameters()) + list(m.named_buffers()):
                read(self.pnames.get(id(t), f"{node.target}.{pname}"))
        elif node.op == "call_function":
            kind = getattr(node.target, "__name__", str(node.target))
        else:
            kind = f"Tensor.{node.target}"
        # A gate's sigmoid keeps its input's shape, and its way back to a feature map's
        # rank ((N, C) -> (N, C, 1, 1), or expanded) keeps its channels.
        x = inputs[0] if len(inputs) == 1 else None
        rank, channels = None, None
        if x is not None and _elementwise(node, self.modules):
            # SiLU, GELU ... keep their input's channels (a gated MLP's silu(gate) is
            # multiplied by up: the product has up's channels).
            rank, channels = self.rank.get(x.name), self.chan.get(x.name)
        elif x is not None and x.name in self.point:
            rank = self.broadcast_rank(node, x)
        attrs = {"kind": kind, "why": why, "channels": channels}
        activation = _known_activation(node, self.modules) if x is not None else None
        if activation is not None:  # the statistics follow it (see cle_core._ir)
            attrs["activation"] = activation
            if activation != "sigmoid":
                attrs.update(alpha=1.0 / 6.0, beta=0.5)
        self.emit(
            "opaque",
            node,
            inputs,
            rank=rank,
            channels=None if rank is None else self.chan.get(x.name),
            params=params,
            attrs=attrs,
            param_ids=ids,
        )
        if rank is not None and x.name in self.point:
            self.point.add(node.name)

    def broadcast_rank(self, node: fx.Node, x: fx.Node) -> int | None:
        """The rank ``node`` gives the per-channel values ``x`` when it only adds unit
        axes or broadcasts them (``.view(n, c, 1, 1)``, ``.unsqueeze(-1)``,
        ``.expand_as(y)``), else None. Linear-based squeeze-and-excitation gates take
        this way back to a feature map's rank."""
        if node.op != "call_method" or not node.args or node.args[0] is not x:
            return None
        rest, rank = node.args[1:], self.rank.get(x.name)
        if node.target in ("view", "reshape"):
            shape = rest[0] if len(rest) == 1 and isinstance(rest[0], (tuple, list)) else rest
            if len(shape) >= 3 and all(isinstance(d, int) and d == 1 for d in shape[2:]):
                return len(shape)
        elif node.target == "unsqueeze" and len(rest) == 1 and rank is not None:
            return rank + 1 if rest[0] in (-1, rank) else None
        elif node.target == "expand_as" and len(rest) == 1 and isinstance(rest[0], fx.Node):
            return self.rank.get(rest[0].name)
        return None

    # --- the walk ------------------------------------------------------------------------
    def run(self) -> Capture:
        fx_graph = self.cap.fx_graph
        placeholders = [n for n in fx_graph.nodes if n.op == "placeholder"]
        for node, shape in zip(
            placeholders, _input_shapes(len(placeholders), *self.shapes), strict=True
        ):
            channels = shape[1] if shape is not None and len(shape) >= 2 else None
            last = shape is not None and len(shape) >= 3 and self.reads_last_axis(node)
            if last:
                channels = shape[-1]
            if shape is not None:
                self.given[node.name] = shape
            value = self.ir.add_input(node.name, channels)
            if last:
                value.channel_axes = (len(shape) - 1,)
            elif shape is not None and len(shape) >= 2:
                value.spatial = tuple(int(d) for d in shape[2:])
            self.values.add(node.name)
            self.rank[node.name] = len(shape) if shape is not None else self.batched_rank(node)
            self.chan[node.name] = channels
            if node.name in self.fx_shapes:
                value.shape = self.fx_shapes[node.name]
                self.rank[node.name] = len(value.shape)
            elif shape is not None:
                value.shape = tuple(None if i == 0 else int(d) for i, d in enumerate(shape))
        outputs: list[str] = []
        for node in fx_graph.nodes:
            if node.op in ("placeholder", "get_attr"):
                continue
            if node.op == "output":
                fx.node.map_arg(node.args[0], lambda n: outputs.append(n.name))
            elif node.name in self.inside_norms or node.name in self.inside_rotaries:
                continue  # a part of a decomposed norm or rotary, translated at its last node
            elif node.name in self.rotaries:
                self.rotary(node, self.rotaries[node.name])
            elif node.name in self.norms:
                self.decomposed_norm(node, self.norms[node.name])
            elif self.is_shape_only(node):
                self.shape_only.add(node.name)
            else:
                try:
                    self.translate(node)
                except _Opaque as why:
                    self.opaque(node, str(why))
        self.ir.set_outputs(dict.fromkeys(n for n in outputs if n in self.values))
        return self.cap

    def reads_last_axis(self, node: fx.Node) -> bool:
        """Whether a graph input is read by a Linear, a LayerNorm / RMSNorm or an
        attention (tokens ``(B, T, C)``: the channels are the last axis)."""
        for user in node.users:
            if user.op == "call_module":
                m = self.modules.get(user.target)
                if isinstance(m, (nn.Linear, nn.LayerNorm, nn.RMSNorm, nn.MultiheadAttention)):
                    return True
            elif user.op == "call_function" and user.target in (
                F.linear,
                F.layer_norm,
                F.rms_norm,
            ):
                return True
        return False

    def batched_rank(self, node: fx.Node) -> int | None:
        """A graph input read by an N-d Conv, BN, pool or pad is taken to be batched."""
        for user in node.users:
            if user.op == "call_module":
                m = self.modules.get(user.target)
                base = known_base(type(m))
                for table in (CONV_MODULES, CONVT_MODULES, MAXPOOL_MODULES, AVGPOOL_MODULES):
                    if base in table:
                        return table[base] + 2
                if base in (nn.BatchNorm2d, nn.BatchNorm3d):
                    return BN_MODULES[base]
                if isinstance(m, _ConstantPadNd):
                    return len(m.padding) // 2 + 2
            elif user.op == "call_function" and user.args and user.args[0] is node:
                nd = _F_CONV.get(user.target) or _F_CONVT.get(user.target)
                if nd:
                    return nd + 2
        return None

    def translate(self, node: fx.Node) -> None:
        """Hand ``node`` to its handler: the method that ``_MODULE_CALLS`` names for the
        module's known type, ``_FUNCTIONS`` for the function, ``_METHODS`` for the tensor
        method (tables in ``cle_torch._optable``). A handler raises ``_Opaque`` with the
        reason where the IR cannot express the call."""
        if node.op == "call_module":
            m = self.modules[node.target]
            if m._forward_hooks or m._forward_pre_hooks:
                raise _Opaque("the module has forward hooks, which tracing does not see")
            if torch.nn.utils.parametrize.is_parametrized(m):
                raise _Opaque("parametrized module (its weight is computed)")
            if isinstance(m, nn.MultiheadAttention) and (
                type(m).forward is nn.MultiheadAttention.forward
            ):
                self.m_mha(node, m)
                return
            base = known_base(type(m))
            handler = _MODULE_CALLS.get(base)
            if handler is None:
                raise _Opaque(_why_whole(m))
            if len(node.args) != 1 or node.kwargs:
                raise _Opaque("called with extra arguments")
            getattr(self, handler)(node, m, base, self.data(node.args[0]))
        elif node.op == "call_function":
            handler = _FUNCTIONS.get(node.target)
            if handler is None:
                raise _Opaque("not understood")
            getattr(self, handler)(node, node.target, node.args, dict(node.kwargs))
        elif node.op == "call_method":
            handler = _METHODS.get(node.target)
            if handler is None:
                raise _Opaque("not understood")
            getattr(self, handler)(node, node.target, node.args, dict(node.kwargs))
        else:
            raise _Opaque(f"FX op {node.op}")


def _why_whole(m: nn.Module) -> str:
    """Why the call of ``m``, traced as one node, is not translated. (torch's
    transformer modules are traced as their parts, see cle_torch._decompose, unless a
    subclass overrides the methods that stands for or the caller makes them leaves.)"""
    name = type(m).__name__
    if fused(m):
        if decomposition(m) is None:
            return (
                f"{name} overrides a method of torch's that tracing stands in for (forward, "
                "_sa_block, _mha_block, _ff_block): kept whole"
            )
        return f"{name} is a leaf module (leaf_modules): kept whole"
    return f"{name} is not understood"


_SHAPE_OF = frozenset({"expand_as", "view_as", "reshape_as"})
_ELEMENTWISE_MODULES = (nn.Sigmoid, nn.Hardsigmoid, nn.SiLU, nn.Hardswish, nn.Tanh, nn.GELU)
_ELEMENTWISE_FUNCTIONS = (
    torch.sigmoid,
    F.sigmoid,
    F.hardsigmoid,
    F.silu,
    F.hardswish,
    torch.tanh,
    F.gelu,
)


def _known_activation(node: fx.Node, modules: dict) -> str | None:
    """``hard_swish``, ``hard_sigmoid`` (torch's: ``relu6(x + 3) / 6``, times ``x`` for the
    swish) or ``sigmoid`` where ``node`` computes it, else None."""
    if node.op == "call_module":
        m = modules.get(node.target)
        kinds = ((nn.Hardswish, "hard_swish"), (nn.Hardsigmoid, "hard_sigmoid"))
        kinds += ((nn.Sigmoid, "sigmoid"),)
        return next((k for cls, k in kinds if isinstance(m, cls)), None)
    if node.op == "call_function":
        functions = {F.hardswish: "hard_swish", F.hardsigmoid: "hard_sigmoid"}
        functions.update({torch.sigmoid: "sigmoid", F.sigmoid: "sigmoid"})
        return functions.get(node.target)
    return "sigmoid" if node.target in ("sigmoid", "sigmoid_") else None


def _elementwise(node: fx.Node, modules: dict) -> bool:
    """An elementwise op of one tensor that the IR does not translate (a gate's
    sigmoid, say): it keeps the spatial size of its input."""
    if node.op == "call_module":
        return isinstance(modules.get(node.target), _ELEMENTWISE_MODULES)
    if node.op == "call_function":
        return node.target in _ELEMENTWISE_FUNCTIONS
    return node.target in ("sigmoid", "sigmoid_", "tanh")


def capture(
    model: nn.Module,
    input_shapes: Any = None,
    dummy_input: Any = None,
    leaf_modules: Iterable[type | str] = (),
    allow_training_mode: bool = False,
) -> Capture:
    """Trace ``model`` and translate it to the IR. Never modifies the model."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected a torch.nn.Module, got {type(model).__name__}")
    check_eval(model, allow_training_mode)
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.device.type == "meta":
            raise CLEError(
                f"{name} is on the meta device (it has a shape but no values); load the "
                "weights first, e.g. model.to_empty(device='cpu') and load_state_dict"
            )
    graph, constants, temps = trace(model, leaf_modules, allow_training_mode)
    cap = Capture(model, graph, Graph(type(model).__name__), temp_biases=temps, constants=constants)
    example: dict = {}
    fx_shapes = propagate(cap, input_shapes, dummy_input, example)
    _Translator(cap, (input_shapes, dummy_input), fx_shapes, example).run()
    if cap.opaque_layers:
        log.info(
            "left %d Linear layer(s) opaque because their input rank is unknown (%s): pass "
            "dummy_input or input_shapes",
            len(cap.opaque_layers),
            ", ".join(cap.opaque_layers[:5]),
        )
    return cap
