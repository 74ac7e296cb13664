"""Layers with weights: Conv / ConvTranspose, Linear (as modules or as ``F.conv*`` /
``F.linear`` on a parameter of the model) and batch norm.

A mixin of ``_Translator`` (``translator.py``): its methods use the translator's state
and helpers.
"""

from __future__ import annotations

from typing import Any

import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from cle_core import CLEError, Layout

from .._optable import (
    _F_CONV,
    _F_CONVT,
    _bind,
    _ints,
    _numpy,
    _Opaque,
    _sig_conv,
    _sig_convt,
    _sig_linear,
)
from .._trace import BN_MODULES, CONV_MODULES, CONVT_MODULES


class Layers:
    # --- module calls --------------------------------------------------------------------
    def m_conv(self, node, m, base, x) -> None:
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
            self.module_layer(node.target, m),
        )

    def m_linear(self, node, m, base, x) -> None:
        self.linear(node, x, self.module_layer(node.target, m))

    def m_batchnorm(self, node, m, base, x) -> None:
        self.batchnorm(node, x, m, BN_MODULES[base])

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

    def check_given(
        self, x: fx.Node, layer: dict, rank: int, channels: Any, last: bool = False
    ) -> None:
        """A layer that reads a graph input whose shape the caller gave must agree with
        it: a mismatch is the caller's mistake, not a layer to skip silently. ``last``:
        the layer reads the channels on the last axis (a Linear)."""
        shape = self.given.get(x.name)
        if shape is None or not isinstance(channels, int):
            return
        where = f"layer {layer['owner'] or layer['weight_q']!r}"
        if len(shape) != rank:
            raise CLEError(
                f"input_shapes gives input {x.name!r} the shape {shape}, but {where} reads "
                f"it as a rank-{rank} tensor (batch first: (N, C, ...) or (N, features))"
            )
        axis = len(shape) - 1 if last else 1
        if shape[axis] != channels:
            raise CLEError(
                f"input_shapes gives input {x.name!r} {shape[axis]} channels (shape {shape}), "
                f"but {where} expects {channels}"
            )

    def linear(self, node, x, layer: dict) -> None:
        """``(..., in) -> (..., out)``: a Linear reads and writes the last axis, of a
        ``(N, features)`` input or a channel-last one such as tokens ``(B, T, C)``."""
        weight = layer["weight"]
        if weight.dim() != 2:
            raise _Opaque("unexpected weight")
        given = self.given.get(x.name)
        self.check_given(x, layer, max(2, len(given or ())), weight.shape[1], last=True)
        rank = self.rank.get(x.name)
        if rank is None or rank < 2:
            self.cap.opaque_layers.append(layer["owner"] or layer["weight_q"])
            raise _Opaque(
                f"Linear on an input of rank {rank or 'unknown'}; the IR takes (..., features) "
                "of rank >= 2: pass dummy_input or input_shapes"
            )
        features = self.chan.get(x.name) if rank == 2 else None
        shape = self.fx_shapes.get(x.name)
        if shape is not None:
            features = shape[-1]
        if features not in (None, weight.shape[1]):
            raise _Opaque("input features do not match the weight")
        attrs = {"layout": Layout(0, 1)}
        self.emit_layer("linear", node, x, layer, rank=rank, channels=weight.shape[0], attrs=attrs)
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
