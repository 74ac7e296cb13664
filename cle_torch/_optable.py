"""The module types, functions and methods the PyTorch translation recognises: which
handler of the translator takes each (``_MODULE_CALLS``, ``_FUNCTIONS``, ``_METHODS``),
their argument signatures (so calls bind like Python binds them), the functional op
tables by dimension, and small argument converters. No translation logic."""

from __future__ import annotations

import inspect
import operator
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.padding import _ConstantPadNd

from ._modules import PerChannelClamp
from ._trace import (
    ADAPTIVE_AVG_MODULES,
    AVGPOOL_MODULES,
    BN_MODULES,
    CONV_MODULES,
    CONVT_MODULES,
    DROPOUT_MODULES,
    MAXPOOL_MODULES,
)

_F_CONV = {F.conv1d: 1, F.conv2d: 2, F.conv3d: 3}
_F_CONVT = {F.conv_transpose1d: 1, F.conv_transpose2d: 2, F.conv_transpose3d: 3}
_F_MAXPOOL = {F.max_pool1d: 1, F.max_pool2d: 2, F.max_pool3d: 3}
_F_AVGPOOL = {torch.avg_pool1d: 1, torch._C._nn.avg_pool2d: 2, torch._C._nn.avg_pool3d: 3}
_F_ADAPTIVE_AVG = {F.adaptive_avg_pool1d: 1, F.adaptive_avg_pool2d: 2, F.adaptive_avg_pool3d: 3}
_F_DROPOUT = (F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout)
_INPLACE_FUNCTIONS = (torch.relu_, F.relu_, F.hardtanh_, F.leaky_relu_, torch.clamp_, torch.clip_)
_SHAPE_ATTRS = frozenset({"shape", "ndim", "dtype", "device", "is_cuda"})
_SCALAR_OPS = frozenset(
    {
        operator.add,
        operator.sub,
        operator.mul,
        operator.floordiv,
        operator.truediv,
        operator.mod,
        operator.neg,
        operator.getitem,
        operator.eq,
        operator.ne,
        operator.lt,
        operator.le,
        operator.gt,
        operator.ge,
    }
)


# Signatures the FX arguments are bound against (torch's own defaults).
def _sig_conv(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1): ...
def _sig_convt(input, weight, bias=None, stride=1, padding=0, output_padding=0, groups=1,
               dilation=1): ...  # fmt: skip
def _sig_linear(input, weight, bias=None): ...
def _sig_unary(input, inplace=False): ...
def _sig_hardtanh(input, min_val=-1.0, max_val=1.0, inplace=False): ...
def _sig_leaky(input, negative_slope=0.01, inplace=False): ...
def _sig_prelu(input, weight): ...
def _sig_clamp(input, min=None, max=None): ...
def _sig_clamp_min(input, min): ...
def _sig_clamp_max(input, max): ...
def _sig_add(input, other, alpha=1): ...
def _sig_cat(tensors, dim=0): ...
def _sig_flatten(input, start_dim=0, end_dim=-1): ...
def _sig_pad(input, pad, mode="constant", value=None): ...
def _sig_maxpool(input, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False,
                 return_indices=False): ...  # fmt: skip
def _sig_avgpool(input, kernel_size, stride=None, padding=0, ceil_mode=False,
                 count_include_pad=True, divisor_override=None): ...  # fmt: skip
def _sig_adaptive(input, output_size): ...
def _sig_dropout(input, p=0.5, training=True, inplace=False): ...
def _sig_mean(input, dim=None, keepdim=False, dtype=None): ...
def _sig_select(input, dim, index): ...
def _sig_interpolate(input, size=None, scale_factor=None, mode="nearest", align_corners=None,
                     recompute_scale_factor=None, antialias=False): ...  # fmt: skip
def _sig_view(input, *shape): ...
def _sig_reshape(input, shape): ...
def _sig_self(input): ...
def _sig_transpose(input, dim0, dim1): ...
def _sig_softmax(input, dim=None, _stacklevel=3, dtype=None): ...
def _sig_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
              enable_gqa=False): ...  # fmt: skip
def _sig_layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5): ...
def _sig_rms_norm(input, normalized_shape, weight=None, eps=None): ...
def _sig_group_norm(input, num_groups, weight=None, bias=None, eps=1e-5): ...
def _sig_div(input, other, rounding_mode=None): ...


_SIGNATURES: dict[Callable, inspect.Signature] = {}


class _Opaque(Exception):
    """Raised while translating a node that cannot be translated; the message says why."""


def _bind(sig: Callable, args: Sequence, kwargs: dict) -> dict[str, Any]:
    s = _SIGNATURES.get(sig)
    if s is None:
        s = _SIGNATURES[sig] = inspect.signature(sig)
    try:
        bound = s.bind(*args, **kwargs)
    except TypeError:
        raise _Opaque("unexpected arguments") from None
    bound.apply_defaults()
    return dict(bound.arguments)


def _ints(v: Any, n: int, what: str, types: tuple[type, ...] = (int,)) -> tuple:
    """An int or a sequence of ints (of ``types``: scale factors may be floats) as an
    n-tuple."""

    def ok(i: Any) -> bool:
        return isinstance(i, types) and not isinstance(i, bool)

    if ok(v):
        return (v,) * n
    if isinstance(v, (tuple, list, torch.Size)) and all(ok(i) for i in v):
        if len(v) == n:
            return tuple(v)
        if len(v) == 1:
            return (v[0],) * n
    raise _Opaque(f"{what} is not static")


def _number(v: Any, what: str) -> float:
    if isinstance(v, torch.fx.Node):
        raise _Opaque(f"{what} is a tensor, not a number")
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise _Opaque(f"{what} is not a number")
    return float(v)


def _numpy(t: torch.Tensor) -> np.ndarray:
    """A float copy on the CPU: float64 stays float64, every other float type is
    computed in float32."""
    x = t.detach()
    x = x.to(torch.float64 if x.dtype == torch.float64 else torch.float32).cpu()
    return np.array(x.numpy(), copy=True)


def _table(entries: dict[Any, str]) -> dict[Any, str]:
    """``entries`` with each tuple key spread into its members."""
    out: dict[Any, str] = {}
    for keys, handler in entries.items():
        for key in keys if isinstance(keys, tuple) else (keys,):
            out[key] = handler
    return out


# Which method of the translator (cle_torch._translate) takes each call, by name: the
# handlers import this module, so it cannot import them. A module is looked up by the
# known type it behaves as (_trace.known_base; the keys are _trace.KNOWN_MODULES), its
# handler called as (node, module, that type, input); a function by itself and a tensor
# method by its name, their handlers called as (node, target, args, kwargs).
_MODULE_CALLS = _table(
    {
        (*CONV_MODULES, *CONVT_MODULES): "m_conv",
        nn.Linear: "m_linear",
        tuple(BN_MODULES): "m_batchnorm",
        nn.ReLU: "m_relu",
        (nn.ReLU6, nn.Hardtanh): "m_clip",
        nn.LeakyReLU: "m_leaky_relu",
        nn.PReLU: "m_prelu",
        PerChannelClamp: "m_per_channel_clamp",
        nn.Identity: "m_identity",
        DROPOUT_MODULES: "m_dropout",
        nn.Flatten: "m_flatten",
        tuple(MAXPOOL_MODULES): "m_maxpool",
        tuple(AVGPOOL_MODULES): "m_avgpool",
        tuple(ADAPTIVE_AVG_MODULES): "m_adaptive_avg",
        nn.Upsample: "m_upsample",
        _ConstantPadNd: "m_constant_pad",
        nn.LayerNorm: "m_layer_norm",
        nn.RMSNorm: "m_rms_norm",
        nn.GroupNorm: "m_group_norm",
    }
)
_FUNCTIONS = _table(
    {
        (*_F_CONV, *_F_CONVT, F.linear): "functional_layer",
        (F.relu, torch.relu, torch.relu_, F.relu_): "f_relu",
        F.relu6: "f_relu6",
        (F.hardtanh, F.hardtanh_): "f_hardtanh",
        (F.leaky_relu, F.leaky_relu_): "f_leaky_relu",
        (torch.clamp, torch.clip, torch.clamp_, torch.clip_): "f_clamp",
        (torch.clamp_min, torch.clamp_max): "f_clamp",
        (F.prelu, torch.prelu): "f_prelu",
        (operator.add, operator.iadd, torch.add): "f_add",
        (operator.mul, torch.mul): "f_mul",
        (torch.cat, torch.concat, torch.concatenate): "f_cat",
        torch.flatten: "f_flatten",
        torch.reshape: "f_reshape",
        F.pad: "f_pad",
        tuple(_F_MAXPOOL): "f_maxpool",
        tuple(_F_AVGPOOL): "f_avgpool",
        tuple(_F_ADAPTIVE_AVG): "f_adaptive_avg",
        (F.interpolate, F.upsample, F.upsample_nearest, F.upsample_bilinear): "f_interpolate",
        _F_DROPOUT: "f_dropout",
        torch.mean: "f_mean",
        (operator.truediv, torch.div, torch.true_divide): "f_div",
        (torch.transpose, torch.swapaxes, torch.swapdims): "f_transpose",
        torch.permute: "f_permute",
        getattr: "f_getattr",
        operator.getitem: "f_getitem",
        torch.select: "f_select",
        torch.unflatten: "f_unflatten",
        (torch.matmul, operator.matmul, torch.bmm): "f_matmul",
        (F.softmax, torch.softmax): "f_softmax",
        F.scaled_dot_product_attention: "f_sdpa",
        torch.repeat_interleave: "f_repeat_heads",
        F.layer_norm: "f_layer_norm",
        F.rms_norm: "f_rms_norm",
        F.group_norm: "f_group_norm",
    }
)
_METHODS = _table(
    {
        ("relu", "relu_"): "f_relu",
        ("clamp", "clip", "clamp_", "clip_"): "f_clamp",
        ("clamp_min", "clamp_min_", "clamp_max", "clamp_max_"): "f_clamp",
        ("add", "add_"): "f_add",
        ("mul", "mul_"): "f_mul",
        "flatten": "f_flatten",
        ("view", "reshape"): "f_reshape",
        "contiguous": "f_identity",
        "mean": "f_mean",
        ("div", "true_divide"): "f_div",
        ("transpose", "swapaxes", "swapdims"): "f_transpose",
        "permute": "f_permute",
        "select": "f_select",
        "unflatten": "f_unflatten",
        ("matmul", "bmm"): "f_matmul",
        "softmax": "f_softmax",
        ("repeat_interleave", "expand"): "f_repeat_heads",
    }
)
