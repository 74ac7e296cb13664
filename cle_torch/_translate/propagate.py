"""The shape of every tensor of the traced graph, from example runs.

Where the caller gives ``dummy_input`` (or ``input_shapes``, from which inputs of the
model's float dtype are made), the captured graph runs twice (for real on a small
model, else on fake tensors: shapes and dtypes only, torch's ``FakeTensorMode``, no
arithmetic; see :data:`REAL_RUN_PARAMETERS`) over a copy of the model in eval mode
without the caller's hooks (see ``cle_torch._calibrate._eval_copy``): once on
the inputs and once with one more sample in the batch. A dimension that differs between the
two runs follows the batch and is recorded as None (unknown size), so that a reshape's
target shape holds for any batch. Transpose, Reshape and MatMul need the shapes to follow
the channels; a Linear on ``(B, T, C)`` needs the rank.

A model that cannot run so (data-dependent shapes, ops without a fake implementation) or
not on the larger batch keeps fewer shapes: the run is an aid, never a requirement.
"""

from __future__ import annotations

import contextlib
import io
import logging
from typing import Any

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata

from .._capture import Capture, _input_shapes

log = logging.getLogger("cle_torch")

Shapes = dict[str, tuple[int | None, ...]]


def _examples(placeholders: list, input_shapes: Any, dummy_input: Any, model) -> list[Any] | None:
    """Positional inputs for a run: the dummy input as given, or zeros of the given
    shapes in the model's float dtype on its device (token ids, for an input an
    embedding reads); None when an input is missing."""
    n = len(placeholders)
    if dummy_input is not None:
        items = list(dummy_input) if isinstance(dummy_input, (tuple, list)) else [dummy_input]
        return items if len(items) == n else None
    shapes = _input_shapes(n, input_shapes, None)
    if any(s is None for s in shapes):
        return None
    p = next((t for t in model.parameters() if t.is_floating_point()), None)
    dtype = p.dtype if p is not None else torch.float32
    device = p.device if p is not None else None
    modules = dict(model.named_modules())
    return [
        torch.zeros(s, dtype=torch.long if _indexes(x, modules) else dtype, device=device)
        for x, s in zip(placeholders, shapes, strict=True)
    ]


def _indexes(x: fx.Node, modules: dict) -> bool:
    """Whether an input is read as indices (an embedding's token ids)."""
    for user in x.users:
        if user.op == "call_module" and isinstance(modules.get(user.target), torch.nn.Embedding):
            return True
        if user.op == "call_function" and user.target is torch.nn.functional.embedding:
            return True
    return False


def _grown(x: Any) -> Any:
    """``x`` with its first sample repeated once more (batch + 1); other values as they
    are."""
    if isinstance(x, torch.Tensor) and x.dim() >= 1 and x.shape[0] >= 1:
        return torch.cat([x, x[:1]])
    return x


REAL_RUN_PARAMETERS = 4_000_000
"""Below this many parameters the shapes come from a real run on zeros (of the eval copy
without hooks, as calibration runs): fake tensors cost about 0.3 ms an op whatever the
sizes, which for a small transformer is several times its arithmetic (a 0.3 M-parameter
ViT: 0.16 s fake, a few ms real); above it, fake tensors (no arithmetic: a large model's
real run would cost seconds)."""


def _run(gm: fx.GraphModule, args: list[Any], dtypes: dict | None = None) -> Shapes:
    """The shape of every tensor of ``gm`` run on ``args``: for real on a small model,
    else with fake tensors (:data:`REAL_RUN_PARAMETERS`); nothing of the caller's model
    is written either way. ``dtypes``, where given, gets each tensor's dtype."""
    small = sum(p.numel() for p in gm.parameters()) <= REAL_RUN_PARAMETERS
    mode = None if small else FakeTensorMode(allow_non_fake_inputs=True)
    fakes = args
    if mode is not None:
        with mode:
            fakes = [
                torch.empty(a.shape, dtype=a.dtype, device=a.device)
                if isinstance(a, torch.Tensor)
                else a
                for a in args
            ]
    # ShapeProp prints a traceback before raising; a model that does not run so is
    # translated without shapes, which is not worth a page on the user's terminal.
    with contextlib.redirect_stderr(io.StringIO()), torch.no_grad():
        ShapeProp(gm, fake_mode=mode).propagate(*fakes)
    shapes: Shapes = {}
    for node in gm.graph.nodes:
        meta = node.meta.pop("tensor_meta", None)  # the graph is the capture's: no trace
        if isinstance(meta, TensorMetadata):
            shapes[node.name] = tuple(int(d) for d in meta.shape)
            if dtypes is not None:
                dtypes[node.name] = meta.dtype
    return shapes


# What only a model whose channels leave axis 1 calls (tokens, heads, NHWC): only then do
# the shapes pay for their run (0.3-0.7 s on a convolutional network at 224 x 224, whose
# spatial sizes follow from its layers without it).
_MOVING_CALLS = frozenset(
    {
        "transpose",
        "permute",
        "swapaxes",
        "swapdims",
        "matmul",
        "bmm",
        "__matmul__",
        "scaled_dot_product_attention",
        "softmax",
        "layer_norm",
        "rms_norm",
        "group_norm",
        "unflatten",
        "expand",
        "repeat_interleave",
        "rsqrt",
        "sqrt",
        "embedding",
    }
)
_MOVING_MODULES = (
    torch.nn.LayerNorm,
    torch.nn.GroupNorm,
    torch.nn.RMSNorm,
    torch.nn.MultiheadAttention,
    torch.nn.Embedding,
    torch.nn.Transformer,
    torch.nn.TransformerEncoderLayer,
    torch.nn.TransformerDecoderLayer,
)


def _call_name(node: fx.Node) -> str:
    """The name of what a call node calls (a method's name, a function's ``__name__``)."""
    return node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")


def needs_shapes(cap: Capture) -> bool:
    """Whether the traced graph calls anything that moves channels off axis 1 or works on
    tokens (a norm, an attention, a transpose, a reshape to other than ``(N, features)``):
    a plain convolutional network is translated without the shape run."""
    modules = dict(cap.model.named_modules())
    for node in cap.fx_graph.nodes:
        if node.op == "call_module":
            if isinstance(modules.get(node.target), _MOVING_MODULES):
                return True
            continue
        if node.op not in ("call_function", "call_method"):
            continue
        name = _call_name(node)
        if name in _MOVING_CALLS:
            return True
        if name == "getattr" and len(node.args) > 1 and node.args[1] in ("T", "mT"):
            return True
        if name in ("mul", "__mul__") and _two_maps(node, modules):
            return True
        if name in ("view", "reshape") and len(node.args) > 1:
            dims = node.args[1] if len(node.args) == 2 else node.args[1:]
            if not isinstance(dims, (tuple, list)) or len(dims) != 2:
                return True
    return False


_POOLS = frozenset({"adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d", "mean"})


def _two_maps(node: fx.Node, modules: dict) -> bool:
    """A product of two tensors neither of which is a squeeze-and-excitation gate (made
    from a pooled value a few ops up): a gated MLP's ``act(gate) * up`` or ``a * b``."""
    operands = [a for a in node.args[:2] if isinstance(a, fx.Node)]
    if len(operands) != 2:
        return False

    def pooled(x: fx.Node) -> bool:
        for _ in range(8):
            if x.op == "call_module":
                if isinstance(modules.get(x.target), torch.nn.AdaptiveAvgPool2d):
                    return True
            elif x.op in ("call_function", "call_method"):
                if _call_name(x) in _POOLS:
                    return True
            else:
                return False
            inputs = [a for a in x.args if isinstance(a, fx.Node)]
            if not inputs:
                return False
            x = inputs[0]
        return False

    return not any(pooled(x) for x in operands)


def propagate(
    cap: Capture, input_shapes: Any, dummy_input: Any, example: dict | None = None
) -> Shapes:
    """FX node name -> the shape of its tensor output (None for a dimension that follows
    the batch); empty where no example input is given, the model does not run on it, or
    it needs none (:func:`needs_shapes`). ``example``, where given, gets the first run's
    own shapes (``"shapes"``, the batch as it was) and the caller's ``dummy_input``
    (``"inputs"``, a list; None where the run's inputs were made from ``input_shapes``):
    what a rotary embedding's tables computed in forward are computed from (see
    :mod:`.rotary`)."""
    from .._calibrate import _eval_copy, _graph_module  # it imports the translator's users

    if not needs_shapes(cap):
        return {}
    placeholders = [n for n in cap.fx_graph.nodes if n.op == "placeholder"]
    try:
        args = _examples(placeholders, input_shapes, dummy_input, cap.model)
    except Exception:  # a malformed input_shapes: the translation says so itself
        return {}
    if args is None:
        return {}
    try:
        twin = _eval_copy(cap.model)
        for m in twin.modules():  # the copy's own dicts: the caller's hooks do not run
            m._forward_hooks.clear()
            m._forward_pre_hooks.clear()
        gm = _graph_module(cap, twin)
        first = _run(gm, args, cap.dtypes)
    except Exception as exc:
        log.debug("shapes unknown: the model does not run on the example input (%s)", exc)
        return {}
    if example is not None:
        example.update(shapes=first, inputs=args if dummy_input is not None else None)
    try:
        second = _run(gm, [_grown(a) for a in args])
    except Exception as exc:  # the batch size is fixed somewhere: keep it
        log.debug("batch axis unknown: the model does not run on a larger batch (%s)", exc)
        return first
    out: Shapes = {}
    for name, shape in first.items():
        other = second.get(name)
        if other is None or len(other) != len(shape):
            out[name] = shape
        else:
            out[name] = tuple(a if a == b else None for a, b in zip(shape, other, strict=True))
    return out
