"""What a captured model is: ``Site`` and ``Capture`` record where every IR node came
from, for the write-back (``_translate.capture`` traces a model with torch.fx and
translates its graph into one)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from cle_core import CLEError, Graph


def _param_names(model: nn.Module) -> dict[int, str]:
    """Canonical id of every parameter and buffer: its first qualified name, or one id
    for all tensors that share a storage (so the core treats them as shared)."""
    names: dict[int, str] = {}
    by_storage: dict[tuple, list[int]] = {}
    tensors = list(model.named_parameters(remove_duplicate=False))
    tensors += list(model.named_buffers(remove_duplicate=False))
    for name, t in tensors:
        if t is None or id(t) in names:
            continue
        names[id(t)] = name
        try:
            ptr = t.untyped_storage().data_ptr()
        except (RuntimeError, NotImplementedError):
            continue
        if ptr:
            by_storage.setdefault((t.device.type, t.device.index, ptr), []).append(id(t))
    for key, ids in by_storage.items():
        if len(ids) > 1:
            for i in ids:
                names[i] = f"storage:{key[0]}:{key[2]:x}"
    return names


def _is_shape(s: Any) -> bool:
    return isinstance(s, torch.Size) or (
        isinstance(s, (tuple, list))
        and len(s) > 0
        and all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in s)
    )


def _input_shapes(n: int, input_shapes: Any, dummy_input: Any) -> list[tuple | None]:
    """The shape of each graph input, where the caller gave one. Raises
    :class:`CLEError` for anything that is not a shape or a list of shapes."""
    shapes: list[tuple | None] = []
    if dummy_input is not None:
        items = dummy_input if isinstance(dummy_input, (tuple, list)) else (dummy_input,)
        shapes = [tuple(x.shape) if isinstance(x, torch.Tensor) else None for x in items]
    elif input_shapes is not None:
        s = input_shapes
        if _is_shape(s):
            shapes = [tuple(s)]
        elif isinstance(s, (tuple, list)) and all(x is None or _is_shape(x) for x in s):
            shapes = [None if x is None else tuple(x) for x in s]
        else:
            raise CLEError(
                f"input_shapes must be a shape such as (1, 3, 224, 224), or a list of shapes "
                f"for a model with several inputs; got {input_shapes!r}"
            )
    if len(shapes) > n:
        raise CLEError(
            f"{len(shapes)} input shapes given, but the model's forward takes {n} input(s)"
        )
    return (shapes + [None] * n)[:n]


# --- the capture ---------------------------------------------------------------------


@dataclass
class Site:
    """Where an IR node came from, for the write-back.

    ``kind`` is ``module`` (a call of ``module``), ``function`` or ``method``. Layers
    name their ``weight`` and ``bias`` by qualified name; ``owner`` is the module that
    holds them. ``bias_slot``: a bias created by folding can be given to the layer in
    place (a module layer, or a functional call whose bias argument reads
    ``owner.bias``); ``bias_is_new``: ``bias`` does not exist yet. ``input`` is the FX
    node of the data input, ``rank`` the output's rank, ``scope`` the module whose
    ``forward`` made the call. ``rows``: the layer's weight and bias are these rows of
    the parameters ``weight`` and ``bias`` (``nn.MultiheadAttention``'s packed
    in-projection, written back by rows); such a layer has no place for a new bias.
    """

    fx: str
    kind: str
    op: str
    target: Any
    module: str | None = None
    call_index: int = 0
    owner: str | None = None
    weight: str | None = None
    bias: str | None = None
    bias_slot: bool = False
    bias_is_new: bool = False
    input: str | None = None
    rank: int | None = None
    scope: str = ""
    rows: tuple[int, int] | None = None


@dataclass
class Capture:
    """The traced model and what the translation learned about it."""

    model: nn.Module
    fx_graph: fx.Graph
    ir: Graph
    sites: dict[str, Site] = field(default_factory=dict)  # FX node name -> site
    ir_names: dict[str, str] = field(default_factory=dict)  # IR node name -> FX node name
    module_calls: dict[str, list[str]] = field(default_factory=dict)  # module -> FX nodes
    temp_biases: dict[str, torch.Size] = field(default_factory=dict)  # qualname -> shape
    constants: dict[str, torch.Tensor] = field(default_factory=dict)
    opaque_layers: list[str] = field(default_factory=list)
    # FX nodes whose channels may lie on another axis than 1 (tokens (B, T, C) ...)
    moved: set[str] = field(default_factory=set)
    # the dtype of each FX node's tensor, from the shape run (a mask: bool or float)
    dtypes: dict[str, torch.dtype] = field(default_factory=dict)


def _resolve_attr(cap: Capture, target: str) -> Any:
    """What a ``get_attr`` node of the captured graph reads: a tensor constant the
    tracer made, a temporary zero bias (see ``_trace.trace``), or an attribute."""
    if target in cap.constants:
        return cap.constants[target]
    if target in cap.temp_biases:
        owner = cap.model.get_submodule(target.rpartition(".")[0])
        w = owner.weight
        return torch.zeros(cap.temp_biases[target], dtype=w.dtype, device=w.device)
    obj: Any = cap.model
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj
