"""A NumPy reference executor for the IR.

It runs a graph forward in float64 for every op kind, so the tests can prove that an
equalized graph computes the same function as the original. It is written for clarity,
not speed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from ._errors import ExecutionError
from ._ir import Graph, Node

__all__ = ["run_graph"]

_OPAQUE_KINDS = {
    # exp(-logaddexp(0, -x)) is the sigmoid without overflow for large |x|.
    "sigmoid": lambda x: np.exp(-np.logaddexp(0.0, -x)),
    "silu": lambda x: x * np.exp(-np.logaddexp(0.0, -x)),
    "tanh": np.tanh,
    "hardswish": lambda x: x * np.clip(x + 3.0, 0.0, 6.0) / 6.0,
    "gelu": lambda x: 0.5 * x * (1.0 + np.vectorize(math.erf)(x / math.sqrt(2.0))),
}


def run_graph(graph: Graph, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run ``graph`` on ``feeds`` (graph input name -> array) and return its outputs by
    name. Computation is in float64."""
    env: dict[int, np.ndarray] = {}
    for value in graph.inputs:
        if value.name not in feeds:
            raise ExecutionError(f"missing feed for graph input {value.name!r}")
        env[id(value)] = np.asarray(feeds[value.name], dtype=np.float64)
    for node in graph.nodes:
        args = [env[id(v)] for v in node.inputs]
        try:
            results = _run(node, args)
        except ExecutionError:
            raise
        except Exception as exc:  # a shape error deep in NumPy: say which node
            raise ExecutionError(f"node {node.name!r} ({node.op}): {exc}") from exc
        for value, result in zip(node.outputs, results, strict=True):
            env[id(value)] = result
    return {v.name: env[id(v)] for v in graph.outputs}


def _f64(a) -> np.ndarray:
    return np.asarray(a, dtype=np.float64)


def _per_channel(a, ndim: int) -> np.ndarray:
    """Broadcast a scalar or per-channel vector over ``(N, C, *spatial)``."""
    a = _f64(a)
    return a.reshape(-1) if a.size == 1 else a.reshape((1, -1) + (1,) * (ndim - 2))


def _run(node: Node, args: list[np.ndarray]) -> list[np.ndarray]:
    op, p, at = node.op, node.params, node.attrs
    x = args[0] if args else None
    axes = node.inputs[0].axes if node.inputs else (1,)

    def chan(a) -> np.ndarray:  # a per-channel parameter, along the input's channels
        return _along(a, x, axes)

    if op == "conv":
        return [_conv(x, node)]
    if op == "conv_transpose":
        return [_conv_transpose(x, node)]
    if op == "linear":
        if x.ndim < 2:
            raise ExecutionError(f"node {node.name!r}: linear expects (..., features)")
        w = _f64(p["weight"])
        y = x @ (w.T if node.layout.out_axis == 0 else w)
        return [y if p.get("bias") is None else y + _f64(p["bias"])]
    if op == "batchnorm":
        gamma = 1.0 if p.get("gamma") is None else chan(p["gamma"])
        beta = 0.0 if p.get("beta") is None else chan(p["beta"])
        mean, var = chan(p["mean"]), chan(p["var"])
        return [(x - mean) / np.sqrt(var + at["eps"]) * gamma + beta]
    if op == "relu":
        return [np.maximum(x, 0.0)]
    if op == "leaky_relu":
        return [np.where(x >= 0, x, x * at["alpha"])]
    if op == "prelu":
        return [np.where(x >= 0, x, x * chan(p["slope"]))]
    if op == "clip":
        return [np.minimum(np.maximum(x, chan(p["lo"])), chan(p["hi"]))]
    if op in ("identity", "dropout"):
        return [x]
    if op == "pad":
        return [_pad(x, at["pads"], 0.0, at.get("mode", "constant"))]
    if op == "maxpool":
        return [_pool(x, at, np.max, -np.inf)]
    if op == "avgpool":
        if at.get("count_include_pad", False):
            return [_pool(_pad(x, at.get("pads", ()), 0.0), {**at, "pads": ()}, np.mean, 0.0)]
        total = _pool(x, at, np.sum, 0.0)
        count = _pool(np.ones_like(x[:1, :1]), at, np.sum, 0.0)
        return [total / count]
    if op == "resize":
        # Nearest-neighbour upsampling by whole factors: what the IR can run itself.
        scales = at.get("scales")
        if at.get("mode") != "nearest" or scales is None or any(f != int(f) for f in scales):
            raise ExecutionError(f"node {node.name!r}: can only run nearest, integer resizes")
        for axis, f in enumerate(scales, start=2):
            x = np.repeat(x, int(f), axis=axis)
        return [x]
    if op == "global_avgpool":
        return [x.mean(axis=tuple(range(2, x.ndim)), keepdims=True)]
    if op == "add":
        out = args[0]
        for a in args[1:]:
            out = out + a
        return [out]
    if op == "concat":
        return [np.concatenate(args, axis=1)]
    if op == "slice":
        off = int(at["offset"])
        return [x[:, off : off + int(at["channels"])]]
    if op == "mul":
        if "factor" in p:
            along = (int(at["axis"]),) if at.get("axis") is not None else axes
            return [x * _along(p["factor"], x, along)]
        return [x * args[1]]
    if op == "flatten":
        return [x.reshape(x.shape[0], -1)]
    if op == "transpose":
        return [np.transpose(x, [int(i) for i in at["perm"]])]
    if op == "reshape":
        # One unknown size follows from the number of elements (it need not be the
        # input's batch: (B * H, T, D) -> (B, H, T, D)); of two, the first is the batch.
        one = list(at["shape"]).count(None) == 1
        shape = [
            x.shape[0] if d is None and i == 0 and not one else (-1 if d is None else d)
            for i, d in enumerate(at["shape"])
        ]
        return [x.reshape(shape)]
    if op == "matmul":
        return [np.matmul(args[0], args[1])]
    if op == "repeat":
        return [np.repeat(x, int(at["repeats"]), axis=int(at["axis"]))]
    if op == "select":
        index = at["index"]
        index = list(index) if isinstance(index, tuple) else index
        return [x[(slice(None),) * int(at["axis"]) + (index,)]]
    if op == "norm":
        return [_norm(x, node)]
    if op == "rotary":
        return [x * _f64(p["cos"]) + _rotate(x, bool(at.get("interleaved"))) * _f64(p["sin"])]
    if op == "opaque":
        if at.get("activation") in ("hard_sigmoid", "hard_swish"):
            gate = np.clip(float(at["alpha"]) * x + float(at["beta"]), 0.0, 1.0)
            return [gate if at["activation"] == "hard_sigmoid" else x * gate]
        if at.get("activation") == "sigmoid":
            return [_OPAQUE_KINDS["sigmoid"](x)]
        if at.get("shift") is not None:
            return [x + chan(at["shift"])]
        fn = at.get("fn") or _OPAQUE_KINDS.get(at.get("kind", ""))
        if fn is None:
            raise ExecutionError(f"node {node.name!r}: cannot execute opaque op {at.get('kind')!r}")
        out = fn(*args)
        return list(out) if isinstance(out, (tuple, list)) else [out]
    raise ExecutionError(f"node {node.name!r}: no executor for op {op!r}")


def _along(a, x: np.ndarray, axes) -> np.ndarray:
    """A scalar or per-channel vector broadcast over ``x`` whose channels lie on ``axes``
    (in order of significance)."""
    a = _f64(a)
    if a.size == 1:
        return a.reshape(-1)
    t = a.reshape([x.shape[ax] for ax in axes])
    t = np.transpose(t, np.argsort(axes))  # its dimensions in axis order
    shape = [1] * x.ndim
    for ax in axes:
        shape[ax] = x.shape[ax]
    return t.reshape(shape)


def _rotate(x: np.ndarray, interleaved: bool) -> np.ndarray:
    """The rotary embedding's ``rotate(x)`` on the last axis: ``(-x2, x1)`` of its halves,
    or of its odd and even positions interleaved."""
    if interleaved:
        out = np.empty_like(x)
        out[..., 0::2], out[..., 1::2] = -x[..., 1::2], x[..., 0::2]
        return out
    half = x.shape[-1] // 2
    return np.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def _norm(x: np.ndarray, node: Node) -> np.ndarray:
    at, p = node.attrs, node.params
    axis, eps, kind = int(at["axis"]), float(at.get("eps", 1e-5)), at.get("kind", "layer")
    if kind == "group":
        g = int(at["groups"])
        xg = x.reshape(x.shape[0], g, -1)
        z = (xg - xg.mean(axis=2, keepdims=True)) / np.sqrt(xg.var(axis=2, keepdims=True) + eps)
        z = z.reshape(x.shape)
    else:
        red = tuple(int(a) for a in at.get("axes", (axis,)))
        if kind == "rms":
            z = x / np.sqrt(np.mean(x * x, axis=red, keepdims=True) + eps)
        else:
            z = (x - x.mean(axis=red, keepdims=True)) / np.sqrt(
                x.var(axis=red, keepdims=True) + eps
            )
    y = z * _along(p["gamma"], x, (axis,))
    return y if p.get("beta") is None else y + _along(p["beta"], x, (axis,))


def _spatial(at: dict, key: str, nd: int, default: int) -> tuple[int, ...]:
    v = at.get(key)
    return (default,) * nd if v is None or len(v) == 0 else tuple(int(i) for i in v)


def _pad(x: np.ndarray, pads, value: float, mode: str = "constant") -> np.ndarray:
    nd = x.ndim - 2
    pads = tuple(int(p) for p in pads) if pads else (0,) * (2 * nd)
    width = [(0, 0), (0, 0)] + [(pads[i], pads[i + nd]) for i in range(nd)]
    if mode != "constant":  # NumPy's reflect, edge and wrap are ONNX's
        return np.pad(x, width, mode=mode)
    return np.pad(x, width, constant_values=value)


def _windows(x: np.ndarray, kernel, stride, dilation):
    """Yield ``(kernel index, strided slice of x)`` for every kernel position."""
    nd = x.ndim - 2
    outs = [
        (x.shape[2 + d] - dilation[d] * (kernel[d] - 1) - 1) // stride[d] + 1 for d in range(nd)
    ]
    if any(o <= 0 for o in outs):
        raise ExecutionError(f"kernel {kernel} does not fit input {x.shape}")
    for kidx in np.ndindex(*kernel):
        sl = tuple(
            slice(
                kidx[d] * dilation[d],
                kidx[d] * dilation[d] + (outs[d] - 1) * stride[d] + 1,
                stride[d],
            )
            for d in range(nd)
        )
        yield kidx, x[(slice(None), slice(None)) + sl]


def _pool(x, at, reduce, pad_value):
    nd = x.ndim - 2
    kernel = _spatial(at, "kernel", nd, 1)
    xp = _pad(x, at.get("pads", ()), pad_value)
    stride = _spatial(at, "stride", nd, 1)
    dil = _spatial(at, "dilation", nd, 1)
    stacked = np.stack([win for _, win in _windows(xp, kernel, stride, dil)], axis=0)
    return reduce(stacked, axis=0)


def _conv(x: np.ndarray, node: Node) -> np.ndarray:
    w = _f64(node.weight)
    nd = w.ndim - 2
    if x.ndim != nd + 2:
        raise ExecutionError(f"node {node.name!r}: input rank {x.ndim} for a {nd}-D conv")
    g = node.layout.groups
    at = node.attrs
    xp = _pad(x, at.get("pads", ()), 0.0)
    stride, dil = _spatial(at, "stride", nd, 1), _spatial(at, "dilation", nd, 1)
    cout, cin_g = w.shape[0], w.shape[1]
    wg = w.reshape((g, cout // g, cin_g) + w.shape[2:])
    y = None
    for kidx, win in _windows(xp, w.shape[2:], stride, dil):
        win = win.reshape((win.shape[0], g, cin_g) + win.shape[2:])
        term = np.einsum("ngc...,goc->ngo...", win, wg[(slice(None),) * 3 + kidx])
        y = term if y is None else y + term
    y = y.reshape((y.shape[0], cout) + y.shape[3:])
    b = node.bias
    return y if b is None else y + _per_channel(b, y.ndim)


def _conv_transpose(x: np.ndarray, node: Node) -> np.ndarray:
    w = _f64(node.weight)  # (C_in, C_out / g, *k)
    nd = w.ndim - 2
    if x.ndim != nd + 2:
        raise ExecutionError(f"node {node.name!r}: input rank {x.ndim} for a {nd}-D conv")
    g = node.layout.groups
    at = node.attrs
    stride, dil = _spatial(at, "stride", nd, 1), _spatial(at, "dilation", nd, 1)
    opad = _spatial(at, "output_padding", nd, 0)
    pads = tuple(int(p) for p in at.get("pads", ())) or (0,) * (2 * nd)
    cin, cout_g = w.shape[0], w.shape[1]
    kernel = w.shape[2:]
    n, spatial = x.shape[0], x.shape[2:]
    full = [
        (spatial[d] - 1) * stride[d] + dil[d] * (kernel[d] - 1) + 1 + opad[d] for d in range(nd)
    ]
    y = np.zeros((n, g, cout_g, *full))
    xg = x.reshape((n, g, cin // g) + spatial)
    wg = w.reshape((g, cin // g, cout_g) + kernel)
    for kidx in np.ndindex(*kernel):
        contrib = np.einsum("ngc...,gco->ngo...", xg, wg[(slice(None),) * 3 + kidx])
        sl = tuple(
            slice(kidx[d] * dil[d], kidx[d] * dil[d] + (spatial[d] - 1) * stride[d] + 1, stride[d])
            for d in range(nd)
        )
        y[(slice(None),) * 3 + sl] += contrib
    crop = tuple(slice(pads[d], full[d] - pads[d + nd]) for d in range(nd))
    y = y[(slice(None),) * 3 + crop].reshape(
        (n, g * cout_g) + tuple(full[d] - pads[d] - pads[d + nd] for d in range(nd))
    )
    b = node.bias
    return y if b is None else y + _per_channel(b, y.ndim)
