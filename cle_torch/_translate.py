"""torch.fx graph -> IR.

Each FX node becomes one IR node (a mean that drops the spatial axes becomes two), named
after the module it calls or whose parameters it uses (``_blocks.0._depthwise_conv``),
with ``#k`` for the k-th further call of one module. ``Site`` records where it came
from, for the write-back. Anything not understood becomes an ``opaque`` node: it blocks
equalization around it, never fails it.

No forward pass is run. Ranks and channel counts are inferred from the layers; graph
inputs get theirs from ``dummy_input`` / ``input_shapes`` when given, else an input read
by a Conv / BN / pool / pad of a given dimension is taken to be batched
``(N, C, *spatial)``. A Linear whose input is not known to be ``(N, features)`` (the IR's
convention) is left opaque, so an MLP needs ``dummy_input`` or ``input_shapes``.
"""

from __future__ import annotations

import logging
import math
import operator
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.padding import _ConstantPadNd

from cle_core import CLEError, Graph, Layout, unique_name

from ._capture import Capture, Site, _input_shapes, _param_names
from ._modules import PerChannelClamp
from ._optable import (
    _F_ADAPTIVE_AVG,
    _F_AVGPOOL,
    _F_CONV,
    _F_CONVT,
    _F_DROPOUT,
    _F_MAXPOOL,
    _INPLACE_FUNCTIONS,
    _SCALAR_OPS,
    _SHAPE_ATTRS,
    _bind,
    _ints,
    _number,
    _numpy,
    _Opaque,
    _sig_adaptive,
    _sig_add,
    _sig_avgpool,
    _sig_cat,
    _sig_clamp,
    _sig_clamp_max,
    _sig_clamp_min,
    _sig_conv,
    _sig_convt,
    _sig_dropout,
    _sig_flatten,
    _sig_hardtanh,
    _sig_interpolate,
    _sig_leaky,
    _sig_linear,
    _sig_maxpool,
    _sig_mean,
    _sig_pad,
    _sig_prelu,
    _sig_reshape,
    _sig_self,
    _sig_unary,
    _sig_view,
)
from ._trace import (
    ADAPTIVE_AVG_MODULES,
    AVGPOOL_MODULES,
    BN_MODULES,
    CONV_MODULES,
    CONVT_MODULES,
    DROPOUT_MODULES,
    MAXPOOL_MODULES,
    check_eval,
    known_base,
    trace,
)

log = logging.getLogger("cle_torch")


class _Translator:
    def __init__(self, cap: Capture, shapes: tuple[Any, Any]):
        self.cap = cap
        self.model = cap.model
        self.ir = cap.ir
        self.modules = dict(cap.model.named_modules())
        self.pnames = _param_names(cap.model)
        self.shapes = shapes
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

    # --- helpers -------------------------------------------------------------------------
    def attr(self, target: str) -> Any:
        if target in self.cap.constants:
            return self.cap.constants[target]
        obj: Any = self.model
        for part in target.split("."):
            obj = getattr(obj, part)
        return obj

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
        self.rank[node.name] = rank
        self.chan[node.name] = channels
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
            for pname, t in list(m.named_parameters()) + list(m.named_buffers()):
                read(self.pnames.get(id(t), f"{node.target}.{pname}"))
        elif node.op == "call_function":
            kind = getattr(node.target, "__name__", str(node.target))
        else:
            kind = f"Tensor.{node.target}"
        # A gate's sigmoid keeps its input's shape, and its way back to a feature map's
        # rank ((N, C) -> (N, C, 1, 1), or expanded) keeps its channels.
        x = inputs[0] if len(inputs) == 1 else None
        rank = None
        if x is not None and _elementwise(node, self.modules):
            rank = self.rank.get(x.name)
        elif x is not None and x.name in self.point:
            rank = self.broadcast_rank(node, x)
        self.emit(
            "opaque",
            node,
            inputs,
            rank=rank,
            channels=None if rank is None else self.chan.get(x.name),
            params=params,
            attrs={"kind": kind, "why": why, "channels": None},
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
            if shape is not None:
                self.given[node.name] = shape
            value = self.ir.add_input(node.name, channels)
            if shape is not None and len(shape) >= 2:
                value.spatial = tuple(int(d) for d in shape[2:])
            self.values.add(node.name)
            self.rank[node.name] = len(shape) if shape is not None else self.batched_rank(node)
            self.chan[node.name] = channels
        outputs: list[str] = []
        for node in fx_graph.nodes:
            if node.op in ("placeholder", "get_attr"):
                continue
            if node.op == "output":
                fx.node.map_arg(node.args[0], lambda n: outputs.append(n.name))
            elif self.is_shape_only(node):
                self.shape_only.add(node.name)
            else:
                try:
                    self.translate(node)
                except _Opaque as why:
                    self.opaque(node, str(why))
        self.ir.set_outputs(dict.fromkeys(n for n in outputs if n in self.values))
        return self.cap

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
        if node.op == "call_module":
            m = self.modules[node.target]
            if m._forward_hooks or m._forward_pre_hooks:
                raise _Opaque("the module has forward hooks, which tracing does not see")
            if torch.nn.utils.parametrize.is_parametrized(m):
                raise _Opaque("parametrized module (its weight is computed)")
            base = known_base(type(m))
            if base is None:
                raise _Opaque(f"{type(m).__name__} is not understood")
            if len(node.args) != 1 or node.kwargs:
                raise _Opaque("called with extra arguments")
            self.module_call(node, m, base, self.data(node.args[0]))
        elif node.op == "call_function":
            handler = _FUNCTIONS.get(node.target)
            if handler is None:
                raise _Opaque("not understood")
            handler(self, node, node.target, node.args, dict(node.kwargs))
        elif node.op == "call_method":
            handler = _METHODS.get(node.target)
            if handler is None:
                raise _Opaque("not understood")
            handler(self, node, node.target, node.args, dict(node.kwargs))
        else:
            raise _Opaque(f"FX op {node.op}")

    # --- module calls --------------------------------------------------------------------
    def module_call(self, node: fx.Node, m: nn.Module, base: type, x: fx.Node) -> None:
        q = node.target
        if base in CONV_MODULES or base in CONVT_MODULES:
            transpose = base in CONVT_MODULES
            if transpose and m.padding_mode != "zeros":
                raise _Opaque(f"padding_mode={m.padding_mode!r} on a ConvTranspose")
            self.conv(
                node,
                x,
                (CONVT_MODULES if transpose else CONV_MODULES)[base],
                transpose,
                {
                    "stride": m.stride,
                    "padding": m.padding,
                    "dilation": m.dilation,
                    "groups": m.groups,
                    "output_padding": getattr(m, "output_padding", 0),
                },
                self.module_layer(q, m),
            )
        elif base is nn.Linear:
            self.linear(node, x, self.module_layer(q, m))
        elif base in BN_MODULES:
            self.batchnorm(node, x, m, BN_MODULES[base])
        elif base is nn.ReLU:
            self.activation(node, x, "relu", m.inplace)
        elif base in (nn.ReLU6, nn.Hardtanh):
            self.clip(node, x, float(m.min_val), float(m.max_val), m.inplace)
        elif base is nn.LeakyReLU:
            self.activation(node, x, "leaky_relu", m.inplace, {"alpha": float(m.negative_slope)})
        elif base is nn.PReLU:
            self.prelu(node, x, m.weight, f"{q}.weight")
        elif base is PerChannelClamp:
            if self.chan.get(x.name) not in (None, m.channels):
                raise _Opaque("channel count does not match")
            lo, hi = _numpy(m.lo).reshape(-1), _numpy(m.hi).reshape(-1)
            self.unary(node, x, "clip", params={"lo": lo, "hi": hi})
        elif base is nn.Identity:
            self.unary(node, x, "identity", alias=True)
        elif base in DROPOUT_MODULES:
            self.unary(node, x, "dropout", alias=True)
        elif base is nn.Flatten:
            self.flatten(node, x, m.start_dim, m.end_dim)
        elif base in MAXPOOL_MODULES:
            self.pool(
                node, x, "maxpool", MAXPOOL_MODULES[base], m.kernel_size, m.stride, m.padding,
                dilation=m.dilation, ceil_mode=m.ceil_mode, return_indices=m.return_indices,
            )  # fmt: skip
        elif base in AVGPOOL_MODULES:
            self.pool(
                node, x, "avgpool", AVGPOOL_MODULES[base], m.kernel_size, m.stride, m.padding,
                ceil_mode=m.ceil_mode, count_include_pad=m.count_include_pad,
                divisor_override=getattr(m, "divisor_override", None),
            )  # fmt: skip
        elif base in ADAPTIVE_AVG_MODULES:
            self.adaptive_avg(node, x, ADAPTIVE_AVG_MODULES[base], m.output_size)
        elif base is nn.Upsample:
            self.resize(node, x, m.scale_factor, m.mode)
        elif base is _ConstantPadNd:
            if float(m.value) != 0.0:
                raise _Opaque(f"value={m.value}: {_CONSTANT_PAD}")
            self.pad(node, x, list(m.padding), nd=len(m.padding) // 2)
        else:
            raise _Opaque(f"{type(m).__name__} is not understood")

    def module_layer(self, q: str, m: nn.Module) -> dict[str, Any]:
        return {
            "weight": m.weight,
            "bias": m.bias,
            "weight_q": f"{q}.weight",
            "bias_q": f"{q}.bias" if m.bias is not None else None,
            "owner": q,
            "bias_slot": True,  # torch's own forward passes self.bias
            "bias_is_new": False,
        }

    # --- layers --------------------------------------------------------------------------
    def layer_params(self, layer: dict) -> tuple[dict, dict]:
        weight, bias = layer["weight"], layer["bias"]
        params = {"weight": _numpy(weight), "bias": None if bias is None else _numpy(bias)}
        ids = {"weight": self.param_id(layer["weight_q"])}
        if bias is not None:
            ids["bias"] = self.param_id(layer["bias_q"])
        return params, ids

    def layer_name(self, node: fx.Node, layer: dict) -> str | None:
        if node.op == "call_module":
            return None
        owner, weight_q = layer["owner"], layer["weight_q"]
        return owner if owner and weight_q == f"{owner}.weight" else weight_q

    def emit_layer(self, op, node, x, layer, *, rank, channels, attrs) -> None:
        params, ids = self.layer_params(layer)
        self.emit(
            op,
            node,
            [x],
            rank=rank,
            channels=channels,
            params=params,
            attrs=attrs,
            param_ids=ids,
            name=self.layer_name(node, layer),
            owner=layer["owner"],
            weight=layer["weight_q"],
            bias=layer["bias_q"],
            bias_slot=layer["bias_slot"],
            bias_is_new=layer["bias_is_new"],
        )

    def conv(self, node, x, nd: int, transpose: bool, a: dict, layer: dict) -> None:
        weight = layer["weight"]
        if weight.dim() != nd + 2:
            raise _Opaque("unexpected weight")
        rank = self.rank.get(x.name)
        groups = a["groups"]
        if not isinstance(groups, int) or groups < 1:
            raise _Opaque("groups is not a static int")
        self.check_given(
            x, layer, nd + 2, weight.shape[0] if transpose else weight.shape[1] * groups
        )
        if rank is not None and rank != nd + 2:
            raise _Opaque(f"input of rank {rank} (the IR takes batched (N, C, ...) inputs)")
        stride, dilation = _ints(a["stride"], nd, "stride"), _ints(a["dilation"], nd, "dilation")
        padding = a["padding"]
        if padding == "valid":
            pads = (0,) * (2 * nd)
        elif padding == "same":  # torch puts the odd pixel at the end
            total = [d * (k - 1) for d, k in zip(dilation, weight.shape[2:], strict=True)]
            pads = tuple(t // 2 for t in total) + tuple(t - t // 2 for t in total)
        else:
            pads = _ints(padding, nd, "padding") * 2
        attrs: dict[str, Any] = {"stride": stride, "pads": pads, "dilation": dilation}
        if transpose:
            attrs["output_padding"] = _ints(a["output_padding"], nd, "output_padding")
            attrs["layout"] = Layout(1, 0, groups)
            cin, cout = weight.shape[0], weight.shape[1] * groups
        else:
            attrs["layout"] = Layout(0, 1, groups)
            cin, cout = weight.shape[1] * groups, weight.shape[0]
        if self.chan.get(x.name) not in (None, cin):
            raise _Opaque("input channels do not match the weight")
        op = "conv_transpose" if transpose else "conv"
        self.emit_layer(op, node, x, layer, rank=nd + 2, channels=cout, attrs=attrs)
        if (
            x.name in self.point
            and not transpose
            and set(weight.shape[2:]) <= {1}
            and not any(pads)
        ):
            self.point.add(node.name)

    def check_given(self, x: fx.Node, layer: dict, rank: int, channels: Any) -> None:
        """A layer that reads a graph input whose shape the caller gave must agree with
        it: a mismatch is the caller's mistake, not a layer to skip silently."""
        shape = self.given.get(x.name)
        if shape is None or not isinstance(channels, int):
            return
        where = f"layer {layer['owner'] or layer['weight_q']!r}"
        if len(shape) != rank:
            raise CLEError(
                f"input_shapes gives input {x.name!r} the shape {shape}, but {where} reads "
                f"it as a rank-{rank} tensor (batch first: (N, C, ...) or (N, features))"
            )
        if shape[1] != channels:
            raise CLEError(
                f"input_shapes gives input {x.name!r} {shape[1]} channels (shape {shape}), "
                f"but {where} expects {channels}"
            )

    def linear(self, node, x, layer: dict) -> None:
        weight = layer["weight"]
        if weight.dim() != 2:
            raise _Opaque("unexpected weight")
        self.check_given(x, layer, 2, weight.shape[1])
        rank = self.rank.get(x.name)
        if rank != 2:
            self.cap.opaque_layers.append(layer["owner"] or layer["weight_q"])
            raise _Opaque(
                f"Linear on an input of rank {rank or 'unknown'}; the IR takes (N, features): "
                "pass dummy_input or input_shapes"
            )
        if self.chan.get(x.name) not in (None, weight.shape[1]):
            raise _Opaque("input features do not match the weight")
        attrs = {"layout": Layout(0, 1)}
        self.emit_layer("linear", node, x, layer, rank=2, channels=weight.shape[0], attrs=attrs)
        if x.name in self.point:  # a gate's fully connected layer
            self.point.add(node.name)

    def functional_layer(self, node, fn, args, kwargs) -> None:
        transpose = fn in _F_CONVT
        nd = 0 if fn is F.linear else (_F_CONVT if transpose else _F_CONV)[fn]
        sig = _sig_linear if nd == 0 else (_sig_convt if transpose else _sig_conv)
        b = _bind(sig, args, kwargs)
        x = self.data(b["input"])
        weight, weight_q = self.param(b["weight"], "weight")
        layer = {
            "weight": weight,
            "bias": None,
            "weight_q": weight_q,
            "bias_q": None,
            "owner": weight_q.rpartition(".")[0],
            "bias_slot": False,
            "bias_is_new": False,
        }
        bias_arg = b["bias"]
        if isinstance(bias_arg, fx.Node) and bias_arg.target in self.cap.temp_biases:
            # the forward passes the (absent) self.bias on: a folded bias can go there
            layer.update(bias_q=bias_arg.target, bias_slot=True, bias_is_new=True)
        elif bias_arg is not None:
            bias, bias_q = self.param(bias_arg, "bias")
            layer.update(bias=bias, bias_q=bias_q, bias_slot=True)
        if nd == 0:
            self.linear(node, x, layer)
        else:
            self.conv(node, x, nd, transpose, b, layer)

    def batchnorm(self, node, x, m: nn.Module, want_rank: int | None) -> None:
        if m.running_mean is None or m.running_var is None:
            # it normalizes by the batch's own statistics, which scaling does not change
            raise _Opaque("track_running_stats=False: no running statistics")
        rank = self.rank.get(x.name)
        if rank is not None and (rank not in (2, 3) if want_rank is None else rank != want_rank):
            raise _Opaque(f"input of rank {rank}")
        if self.chan.get(x.name) not in (None, m.num_features):
            raise _Opaque("channel count does not match")
        q = node.target
        params = {
            "mean": _numpy(m.running_mean),
            "var": _numpy(m.running_var),
            "gamma": None if m.weight is None else _numpy(m.weight),
            "beta": None if m.bias is None else _numpy(m.bias),
        }
        ids = {"mean": self.param_id(f"{q}.running_mean"), "var": self.param_id(f"{q}.running_var")}
        if m.weight is not None:
            ids["gamma"] = self.param_id(f"{q}.weight")
        if m.bias is not None:
            ids["beta"] = self.param_id(f"{q}.bias")
        self.emit(
            "batchnorm",
            node,
            [x],
            rank=rank if want_rank is None else want_rank,
            channels=m.num_features,
            params=params,
            attrs={"eps": float(m.eps)},
            param_ids=ids,
        )

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
            # a parameter or constant factor: not known to be one number per channel
            raise _Opaque("a factor that is a tensor, not a number or a gate") from None
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

    def f_cat(self, node, fn, args, kwargs) -> None:
        b = _bind(_sig_cat, args, kwargs)
        if not isinstance(b["tensors"], (list, tuple)) or not b["tensors"]:
            raise _Opaque("not a list of tensors")
        xs = [self.data(t) for t in b["tensors"]]
        ranks = {self.rank.get(x.name) for x in xs}
        rank = ranks.pop() if len(ranks) == 1 else None
        dim = b["dim"]
        if not isinstance(dim, int) or (dim != 1 and not (rank and dim < 0 and dim + rank == 1)):
            raise _Opaque(f"dim={dim} is not the channel axis")
        chans = [self.chan.get(x.name) for x in xs]
        channels = None if None in chans else sum(chans)
        self.emit("concat", node, xs, rank=rank, channels=channels)

    def flatten(self, node, x, start_dim, end_dim) -> None:
        rank = self.rank.get(x.name)
        if start_dim != 1 or not (end_dim == -1 or (rank is not None and end_dim == rank - 1)):
            raise _Opaque(
                f"start_dim={start_dim}, end_dim={end_dim}: not a flatten from axis 1 to the end"
            )
        if rank is not None and rank < 2:
            raise _Opaque("input of rank < 2")
        pooled = x.name in self.point  # (N, C, 1, ...) -> (N, C): still one value per channel
        channels = self.chan.get(x.name) if pooled else None
        self.emit("flatten", node, [x], rank=2, channels=channels, alias=x)
        if pooled:
            self.point.add(node.name)

    def f_flatten(self, node, fn, args, kwargs) -> None:
        b = _bind(_sig_flatten, args, kwargs)
        self.flatten(node, self.data(b["input"]), b["start_dim"], b["end_dim"])

    def f_reshape(self, node, fn, args, kwargs) -> None:
        if fn in ("view", "reshape"):
            b = _bind(_sig_view, args, kwargs)
            shape = b["shape"]
            if len(shape) == 1 and isinstance(shape[0], (tuple, list, torch.Size)):
                shape = tuple(shape[0])
        else:
            b = _bind(_sig_reshape, args, kwargs)
            shape = b["shape"]
        x = self.data(b["input"])
        if not isinstance(shape, (tuple, list)) or len(shape) != 2:
            raise _Opaque("not a reshape to (N, -1)")
        # (N, C, 1, ...) -> (N, C), written with the channel count: a flatten as well
        pooled = x.name in self.point and (
            isinstance(shape[1], fx.Node) or shape[1] == self.chan.get(x.name)
        )
        if not (shape[1] == -1 or pooled) or not self.is_batch_size(shape[0]):
            raise _Opaque("not a reshape to (batch, -1)")
        self.flatten(node, x, 1, -1)

    def f_identity(self, node, fn, args, kwargs) -> None:
        self.unary(node, self.data(_bind(_sig_self, args, kwargs)["input"]), "identity", alias=True)

    def f_dropout(self, node, fn, args, kwargs) -> None:
        b = _bind(_sig_dropout, args, kwargs)
        if b["training"] is not False:
            raise _Opaque(f"training={b['training']}: a random mask")
        self.unary(node, self.data(b["input"]), "dropout", alias=True)

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
            or sorted(d % rank for d in dims) != list(range(2, rank))
        ):
            raise _Opaque(f"dim={b['dim']}: not a mean over the spatial axes")
        if b["keepdim"]:
            self.unary(node, x, "global_avgpool")
            return
        # (N, C, *s) -> (N, C): a global average pool, then a flatten of (N, C, 1, ...).
        pooled, name = f"{node.name}:pooled", self.unique(f"{node.name}:pool")
        self.ir.add_node("global_avgpool", [x.name], name=name, outputs=[pooled])
        self.cap.ir_names[name] = node.name
        self.emit("flatten", node, [pooled], rank=2, channels=self.chan.get(x.name))
        self.point.add(node.name)


_CONSTANT_PAD = "a constant pad is exact only with 0 (a constant does not scale)"
_SHAPE_OF = frozenset({"expand_as", "view_as", "reshape_as"})
_ELEMENTWISE_MODULES = (nn.Sigmoid, nn.Hardsigmoid, nn.SiLU, nn.Hardswish, nn.Tanh, nn.GELU)
_ELEMENTWISE_FUNCTIONS = (torch.sigmoid, F.sigmoid, F.hardsigmoid, F.silu, F.hardswish, torch.tanh)


def _elementwise(node: fx.Node, modules: dict) -> bool:
    """An elementwise op of one tensor that the IR does not translate (a gate's
    sigmoid, say): it keeps the spatial size of its input."""
    if node.op == "call_module":
        return isinstance(modules.get(node.target), _ELEMENTWISE_MODULES)
    if node.op == "call_function":
        return node.target in _ELEMENTWISE_FUNCTIONS
    return node.target in ("sigmoid", "sigmoid_", "tanh")


def _table(entries: dict[Any, Callable]) -> dict[Any, Callable]:
    out: dict[Any, Callable] = {}
    for keys, handler in entries.items():
        for key in keys if isinstance(keys, tuple) else (keys,):
            out[key] = handler
    return out


T = _Translator
_FUNCTIONS = _table(
    {
        (*_F_CONV, *_F_CONVT, F.linear): T.functional_layer,
        (F.relu, torch.relu, torch.relu_, F.relu_): T.f_relu,
        F.relu6: T.f_relu6,
        (F.hardtanh, F.hardtanh_): T.f_hardtanh,
        (F.leaky_relu, F.leaky_relu_): T.f_leaky_relu,
        (torch.clamp, torch.clip, torch.clamp_, torch.clip_): T.f_clamp,
        (torch.clamp_min, torch.clamp_max): T.f_clamp,
        (F.prelu, torch.prelu): T.f_prelu,
        (operator.add, operator.iadd, torch.add): T.f_add,
        (operator.mul, torch.mul): T.f_mul,
        (torch.cat, torch.concat, torch.concatenate): T.f_cat,
        torch.flatten: T.f_flatten,
        torch.reshape: T.f_reshape,
        F.pad: T.f_pad,
        tuple(_F_MAXPOOL): T.f_maxpool,
        tuple(_F_AVGPOOL): T.f_avgpool,
        tuple(_F_ADAPTIVE_AVG): T.f_adaptive_avg,
        (F.interpolate, F.upsample, F.upsample_nearest, F.upsample_bilinear): T.f_interpolate,
        _F_DROPOUT: T.f_dropout,
        torch.mean: T.f_mean,
    }
)
_METHODS = _table(
    {
        ("relu", "relu_"): T.f_relu,
        ("clamp", "clip", "clamp_", "clip_"): T.f_clamp,
        ("clamp_min", "clamp_min_", "clamp_max", "clamp_max_"): T.f_clamp,
        ("add", "add_"): T.f_add,
        ("mul", "mul_"): T.f_mul,
        "flatten": T.f_flatten,
        ("view", "reshape"): T.f_reshape,
        "contiguous": T.f_identity,
        "mean": T.f_mean,
    }
)
del T


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
    _Translator(cap, (input_shapes, dummy_input)).run()
    if cap.opaque_layers:
        log.info(
            "left %d Linear layer(s) opaque because their input rank is unknown (%s): pass "
            "dummy_input or input_shapes",
            len(cap.opaque_layers),
            ", ".join(cap.opaque_layers[:5]),
        )
    return cap
