"""Calibration statistics: run the captured graph on a few inputs and measure, per IR
value, what the noise objective would otherwise estimate (see cle_core.toolkit.ChannelStats).

Calibration never changes the caller's model: the graph runs, without gradients, on a
copy of the module tree in eval mode (batch norms use and keep their running
statistics, dropout is off), whatever mode the model is in."""

from __future__ import annotations

import copy
import os
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import numpy as np
import torch
import torch.fx as fx
from torch import nn

from cle_core import CLEError, NonFiniteError
from cle_core.toolkit import (
    ChannelStats,
    StatsAccumulator,
    check_real_dtype,
    measured_layout,
    non_finite_name,
)

from ._capture import Capture, _resolve_attr
from ._quantsim import _device

BATCH = 16

ACCEPTED = (
    "a tensor or array of inputs (N, ...), or an iterable of batches (each a tensor or "
    "array, or a tuple or list of them for a model with several inputs)"
)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


# --- a copy to run ---------------------------------------------------------------------


def _eval_copy(model: nn.Module) -> nn.Module:
    """``model`` in eval mode, as a copy that shares its parameters (never written in
    eval mode without gradients, and the one thing too large to copy) and owns
    everything else: module objects and their training flags, buffers, hooks."""
    memo: dict[int, Any] = {id(p): p for p in model.parameters()}
    try:
        twin = copy.deepcopy(model, memo)
    except Exception:
        # A module holding something deepcopy refuses (a non-leaf tensor such as the
        # weight that torch.nn.utils.weight_norm computes, a lock): copy the module tree
        # and the buffers only.
        twin = _tree_copy(model)
    for m in twin.modules():
        m.training = False
    return twin


def _tree_copy(model: nn.Module) -> nn.Module:
    done: dict[int, nn.Module] = {}
    buffers: dict[int, torch.Tensor] = {}

    def tree(m: nn.Module, name: str) -> nn.Module:
        if id(m) in done:
            return done[id(m)]
        if isinstance(m, torch.jit.ScriptModule):
            # Its state lives in C++: a shallow copy would share the training flag.
            if m.training:
                raise CLEError(
                    f"cannot calibrate: {name or '(root)'} is a TorchScript module in "
                    "training mode and the model cannot be copied; call model.eval() first"
                )
            done[id(m)] = m
            return m
        twin = object.__new__(type(m))
        state = {
            k: copy.copy(v) if isinstance(v, (dict, list, set)) else v for k, v in vars(m).items()
        }
        twin.__dict__.update(state)
        done[id(m)] = twin
        for k, b in m._buffers.items():
            if b is not None:
                if id(b) not in buffers:
                    buffers[id(b)] = b.detach().clone()
                twin._buffers[k] = buffers[id(b)]
        for k, child in m._modules.items():
            if child is not None:
                twin._modules[k] = tree(child, f"{name}.{k}" if name else k)
        return twin

    return tree(model, "")


def _graph_module(cap: Capture, twin: nn.Module) -> fx.GraphModule:
    """The captured graph over ``twin``: every module it calls and attribute it reads is
    the copy's (tensor constants and temporary biases are the capture's own)."""
    root: dict[str, Any] = {}
    for n in cap.fx_graph.nodes:
        if n.op == "call_module":
            root[n.target] = twin.get_submodule(n.target)
        elif n.op == "get_attr":
            if n.target in cap.constants or n.target in cap.temp_biases:
                root[n.target] = _resolve_attr(cap, n.target)
            else:
                obj: Any = twin
                for part in n.target.split("."):
                    obj = getattr(obj, part)
                root[n.target] = obj
    return fx.GraphModule(root, cap.fx_graph)


# --- the inputs --------------------------------------------------------------------------


def _is_data(x: Any) -> bool:
    return isinstance(x, (np.ndarray, torch.Tensor))


def _float_dtype(model: nn.Module) -> torch.dtype | None:
    """The one floating dtype of the model's parameters, if they share one."""
    kinds = {p.dtype for p in model.parameters() if p.is_floating_point()}
    return kinds.pop() if len(kinds) == 1 else None


def _tensor(x: Any, what: str, dtype: torch.dtype | None) -> torch.Tensor:
    """``x`` (a tensor or array) checked: real numbers, finite; float inputs in the
    model's float dtype. Integer and bool inputs are passed as they are: the model
    decides (an embedding takes integers; a model that normalizes uint8 images itself
    takes those)."""
    if isinstance(x, np.ndarray):
        check_real_dtype(x.dtype, what)
        x = np.ascontiguousarray(x)
        if not x.flags.writeable:  # torch warns about tensors over read-only memory
            x = x.copy()
        try:
            x = torch.from_numpy(x)
        except TypeError as exc:  # a dtype torch has no type for (float128, uint64 ...)
            raise CLEError(f"{what}: {_first_line(exc)}") from None
    if x.is_complex():
        raise CLEError(f"{what} holds complex numbers ({x.dtype}); expected real numbers")
    if x.is_floating_point():
        _check_finite(x, what)
        if dtype is not None and x.dtype != dtype:
            wide = x
            x = x.to(dtype)
            _check_finite(x, what, wide)
    return x


def _check_finite(x: torch.Tensor, what: str, before: torch.Tensor | None = None) -> None:
    bad = ~torch.isfinite(x)
    if not bool(bad.any()):
        return
    first = int(torch.argmax(bad.reshape(-1).to(torch.uint8)))  # no index list of all
    idx = tuple(int(i) for i in np.unravel_index(first, tuple(bad.shape)))
    where = f"index {idx[0]}" if len(idx) == 1 else f"index {idx}"
    if before is not None:
        raise NonFiniteError(
            f"{what}: the value {before[idx].item():g} at {where} overflows {x.dtype}"
        )
    raise NonFiniteError(
        f"{what} holds {non_finite_name(x[idx].item())} at {where}; inputs must be finite"
    )


def _batches(calibration: Any, dtype: torch.dtype | None = None) -> Iterator[tuple[Any, ...]]:
    """The batches of ``calibration``, each a tuple of positional inputs, checked one by
    one as they are read (an iterable may be a generator, read once)."""
    if isinstance(calibration, (str, bytes, os.PathLike)):
        raise CLEError(
            f"calibration is a path ({os.fsdecode(calibration)!r}); the Python API takes "
            "data: load it first (numpy.load, or cle_core.quality.images_from_folder for a "
            "folder of images)"
        )
    if isinstance(calibration, (np.ndarray, torch.Tensor)):
        x = _tensor(calibration, "calibration", dtype)
        if x.dim() == 0 or x.shape[0] == 0:
            raise CLEError("calibration holds no inputs")
        for start in range(0, x.shape[0], BATCH):
            yield (x[start : start + BATCH],)
        return
    if isinstance(calibration, Mapping) or not isinstance(calibration, Iterable):
        raise CLEError(f"calibration must be {ACCEPTED}; got {type(calibration).__name__}")
    items = iter(calibration)
    k = 0
    while True:
        try:
            item = next(items)
        except StopIteration:
            return
        except Exception as exc:  # the caller's generator or data loader failed
            raise CLEError(f"reading calibration batch {k} failed: {_first_line(exc)}") from exc
        what = f"calibration batch {k}"
        if isinstance(item, (np.ndarray, torch.Tensor)):
            yield (_tensor(item, what, dtype),)
        elif isinstance(item, (tuple, list)) and any(_is_data(x) for x in item):
            # Positional inputs; a data loader yields them as a list. Other values (a
            # flag, None) are passed as they are.
            yield tuple(
                _tensor(x, f"{what}, input {i}", dtype) if _is_data(x) else x
                for i, x in enumerate(item)
            )
        else:
            hint = ""
            if isinstance(item, (tuple, list)):
                hint = " (for nested lists of numbers, pass torch.tensor(data))"
            raise CLEError(
                f"{what} is a {type(item).__name__}; calibration must be {ACCEPTED}{hint}"
            )
        k += 1


# --- running -------------------------------------------------------------------------------


def calibration_stats(cap: Capture, calibration: Any) -> dict[str, ChannelStats]:
    """Per-channel statistics of every IR value, measured by running the captured graph
    on ``calibration`` in eval mode, without gradients, on a copy of the model that
    shares its parameters (see :func:`_eval_copy`); ``cap.model`` is never written."""
    # validate() says where each value's channels lie (a token tensor (B, T, C): the
    # last axis): the statistics are per channel of that axis.
    # A value whose channels are not known and may not lie on axis 1 (an opaque op on
    # tokens) has no statistics per channel: none are recorded for it.
    cap.ir.validate()
    layouts = {
        name: measured_layout(v)
        for name, v in cap.ir.values.items()
        if v.channels is not None or name not in cap.moved
    }
    twin = _eval_copy(cap.model)
    gm = _graph_module(cap, twin)
    device = _device(cap.model)
    acc = StatsAccumulator()

    class Recorder(fx.Interpreter):
        def run_node(self, node):
            out = super().run_node(node)
            if node.name in layouts and isinstance(out, torch.Tensor) and out.is_floating_point():
                acc.add(node.name, out.detach().float().cpu().numpy(), **layouts[node.name])
            return out

    count = 0
    with torch.no_grad():
        for batch in _batches(calibration, _float_dtype(cap.model)):
            args = tuple(b.to(device) if isinstance(b, torch.Tensor) else b for b in batch)
            try:
                Recorder(gm).run(*args)
            except Exception as exc:
                raise CLEError(
                    f"the model does not run on calibration batch {count}: "
                    f"{_first_line(exc)}{_integer_hint(args)}"
                ) from None
            count += 1
    if not count:
        raise CLEError("calibration holds no inputs")
    return acc.result()


def _integer_hint(args: tuple) -> str:
    kinds = sorted(
        {str(a.dtype).removeprefix("torch.") for a in args if isinstance(a, torch.Tensor)}
        - {"float16", "bfloat16", "float32", "float64"}
    )
    if not kinds:
        return ""
    return (
        f" (the calibration holds {', '.join(kinds)} values: a model that takes floats "
        "needs them converted and normalized as in training)"
    )
