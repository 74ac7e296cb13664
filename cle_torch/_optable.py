"""The functions and methods the PyTorch translation recognises: their argument
signatures (so calls bind like Python binds them), the functional op tables, and small
argument converters. No translation logic."""

from __future__ import annotations

import inspect
import operator
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

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
def _sig_interpolate(input, size=None, scale_factor=None, mode="nearest", align_corners=None,
                     recompute_scale_factor=None, antialias=False): ...  # fmt: skip
def _sig_view(input, *shape): ...
def _sig_reshape(input, shape): ...
def _sig_self(input): ...


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
