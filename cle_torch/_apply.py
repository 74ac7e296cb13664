"""Write an equalization result back into a torch model.

In place on the user's module tree when every change can live there: parameters are
updated (their device, dtype, ``requires_grad`` and identity kept), a bias created by BN
folding becomes a new ``nn.Parameter`` on the layer's module, folded BNs are replaced
by ``nn.Identity`` and a bounded activation module that needs per-channel bounds by a
:class:`~cle_torch.PerChannelClamp`. Otherwise (a bounded activation that is a function
call, one module instance called at places that need different bounds, a folded BN
module that is also called where it was not folded, a layer whose ``forward`` passes no
bias to its convolution) a rewritten ``torch.fx.GraphModule`` is built from the traced
graph and copies of the parameters; the user's model is not touched.

Everything is planned and checked (shapes, module paths) before the first write; the
in-place writes keep an undo log and are rolled back if anything fails midway.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.fx as fx
from torch import nn

from cle_core import CLEError, EqualizeResult, Node, NonFiniteError, unique_name
from cle_core.toolkit import LayoutError, broadcast_shape, fit_dtype

from ._capture import Capture, Site
from ._modules import NotInPlaceError, PerChannelClamp

log = logging.getLogger("cle_torch")


@dataclass
class Plan:
    """What the write-back does; ``reasons`` say why it cannot be in place."""

    params: list[tuple[str, np.ndarray]] = field(default_factory=list)
    new_biases: list[tuple[Site, np.ndarray]] = field(default_factory=list)
    bn_sites: list[Site] = field(default_factory=list)
    clips: list[tuple[Site, np.ndarray, np.ndarray, str]] = field(default_factory=list)
    # batch norms carried through a region: new running_mean / bias per call site
    affines: list[tuple[Site, dict[str, np.ndarray]]] = field(default_factory=list)
    per_call: set[str] = field(default_factory=set)  # modules whose calls need different ones
    like: dict[str, str] = field(default_factory=dict)  # clip fx node -> a nearby weight
    # clip fx node -> the axes its channels are on, where not axis 1 (tokens: the last)
    axes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    reasons: list[str] = field(default_factory=list)


def _resolve(model: nn.Module, target: str) -> Any:
    obj: Any = model
    for part in target.split(".") if target else ():
        obj = getattr(obj, part)
    return obj


def _fn_name(site: Site) -> str:
    if site.kind == "method":
        return f"Tensor.{site.target}"
    return getattr(site.target, "__name__", str(site.target))


def _nearby_weight(cap: Capture, node: Node) -> str | None:
    """The weight of the closest layer upstream of ``node``: new modules take its dtype
    and device."""
    seen: set[int] = set()
    stack = [v.producer for v in node.inputs if v.producer is not None]
    while stack:
        n = stack.pop()
        if id(n) in seen:
            continue
        seen.add(id(n))
        if n.is_layer:
            return cap.sites[n.handle].weight
        stack.extend(v.producer for v in n.inputs if v.producer is not None)
    return None


def _put_rows(cap: Capture, packed: dict, q: str, rows: tuple[int, int], arr) -> None:
    """Write ``arr`` into ``rows`` of parameter ``q``'s new value (its current value
    where no other layer wrote): the q, k and v of a packed in-projection are three
    layers of one parameter."""
    if q not in packed:
        t = _resolve(cap.model, q).detach()
        t = t.to(torch.float64 if t.dtype == torch.float64 else torch.float32).cpu()
        # a copy: a float32 CPU parameter's numpy() shares its memory, and the model
        # must stay as it was until the plan is written (never where it is refused or
        # a GraphModule is returned)
        packed[q] = t.numpy().copy()
    part = packed[q][rows[0] : rows[1]]
    if part.size != np.size(arr):
        raise CLEError(f"{q}[{rows[0]}:{rows[1]}]: new value has shape {np.shape(arr)}")
    packed[q][rows[0] : rows[1]] = np.reshape(arr, part.shape)


def make_plan(cap: Capture, result: EqualizeResult) -> Plan:
    plan = Plan()
    packed: dict[str, np.ndarray] = {}  # parameters written by rows (_put_rows)
    nodes = {n.name: n for n in result.graph.nodes}
    for name in result.changed:
        node = nodes.get(name)
        if node is None or node.handle not in cap.sites:
            raise CLEError(f"node {name!r} was changed but does not come from the model")
        site = cap.sites[node.handle]
        if node.is_layer and site.rows is not None:
            _put_rows(cap, packed, site.weight, site.rows, node.weight)
            if node.bias is not None:
                if site.bias is None:
                    raise CLEError(
                        f"{name}: the equalization gives it a bias, which "
                        f"{site.module or site.owner} has no place for; nothing was changed"
                    )
                _put_rows(cap, packed, site.bias, site.rows, node.bias)
        elif node.is_layer:
            plan.params.append((site.weight, node.weight))
            if node.bias is None:
                continue
            if site.bias is not None and not site.bias_is_new:
                plan.params.append((site.bias, node.bias))
                continue
            plan.new_biases.append((site, node.bias))
            if not site.bias_slot:
                plan.reasons.append(
                    f"BN folding gives {name} a bias, but its forward passes no bias to "
                    f"{_fn_name(site)}"
                )
        elif node.op == "clip":
            lo = np.asarray(node.params["lo"], np.float64)
            hi = np.asarray(node.params["hi"], np.float64)
            plan.clips.append((site, lo, hi, name))
            plan.like[site.fx] = _nearby_weight(cap, node) or ""
            axes = node.outputs[0].channel_axes
            if axes is not None and tuple(axes) != (1,) and max(lo.size, hi.size) > 1:
                plan.axes[site.fx] = tuple(axes)
        elif node.op == "norm":
            # gamma and beta were divided by the scale; they keep the parameters' shape
            # (one value per channel), whatever axis the channels are on.
            plan.params.append((site.weight, node.params["gamma"]))
            if node.params.get("beta") is not None and site.bias is not None:
                plan.params.append((site.bias, node.params["beta"]))
        elif node.op == "batchnorm" and site.kind == "module":
            # Carried through a region: running_mean and bias were divided by the scale.
            values = {"running_mean": node.params["mean"]}
            if node.params.get("beta") is not None:
                values["bias"] = node.params["beta"]
            plan.affines.append((site, values))
        else:
            raise CLEError(f"cannot write back node {name!r} ({node.op})")
    plan.params.extend(packed.items())
    for name in result.removed:
        fx_name = cap.ir_names.get(name)
        site = cap.sites.get(fx_name) if fx_name else None
        if site is None or site.op != "batchnorm":
            raise CLEError(f"node {name!r} was removed but is not a batch norm of the model")
        plan.bn_sites.append(site)
    _check_in_place(cap, plan)
    return plan


def _check_in_place(cap: Capture, plan: Plan) -> None:
    removed = {s.fx for s in plan.bn_sites}
    for module in dict.fromkeys(s.module for s in plan.bn_sites):
        calls = cap.module_calls[module]
        if not set(calls) <= removed:
            plan.reasons.append(
                f"batch norm {module} is called at {len(calls)} places and only "
                f"{len(set(calls) & removed)} of them were folded"
            )
    # The module's statistics are written for the call that was carried: every other
    # call of it would read them too.
    carried: dict[str, list[dict[str, np.ndarray]]] = {}
    for site, values in plan.affines:
        carried.setdefault(site.module, []).append(values)
    for module, values in carried.items():
        calls = cap.module_calls[module]
        if not (len(values) == len(calls) and all(_same(v, values[0]) for v in values)):
            plan.per_call.add(module)
            plan.reasons.append(
                f"batch norm {module} is called at {len(calls)} places that need different "
                "statistics"
            )
    by_module: dict[str, list[tuple[Site, np.ndarray, np.ndarray]]] = {}
    for site, lo, hi, name in plan.clips:
        if site.kind != "module":
            plan.reasons.append(
                f"{name} is a function call ({_fn_name(site)}) and needs per-channel bounds"
            )
            continue
        by_module.setdefault(site.module, []).append((site, lo, hi))
    for module, sites in by_module.items():
        calls = cap.module_calls[module]
        first = sites[0]
        same = len(sites) == len(calls) and all(
            np.array_equal(lo, first[1]) and np.array_equal(hi, first[2]) for _, lo, hi in sites
        )
        if not same:
            plan.reasons.append(
                f"activation module {module} is called at {len(calls)} places that need "
                "different bounds"
            )


def _same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def _affine_params(plan: Plan) -> list[tuple[str, np.ndarray]]:
    """The new statistics of carried batch norms that every call of the module shares,
    as parameter writes (one per module)."""
    out: list[tuple[str, np.ndarray]] = []
    seen: set[str] = set(plan.per_call)
    for site, values in plan.affines:
        if site.module not in seen:
            seen.add(site.module)
            out += [(f"{site.module}.{key}", arr) for key, arr in values.items()]
    return out


# --- helpers shared by both ways of writing ----------------------------------------------


def _like_tensor(model: nn.Module, qualname: str | None) -> torch.Tensor | None:
    if qualname:
        try:
            t = _resolve(model, qualname)
        except AttributeError:
            t = None
        if isinstance(t, torch.Tensor):
            return t
    for t in model.parameters():
        return t
    return None


_NUMPY_DTYPES = {torch.float32: np.float32, torch.float64: np.float64, torch.float16: np.float16}


def _new_tensor(arr: np.ndarray, like: torch.Tensor, what: str) -> torch.Tensor:
    """``arr`` as a tensor with ``like``'s shape, dtype, device and memory format
    (computed in float32 / float64, cast back here)."""
    arr = np.asarray(arr)
    if arr.size != like.numel():
        raise CLEError(f"{what}: new value has shape {arr.shape}, not {tuple(like.shape)}")
    t = _cast(arr.reshape(tuple(like.shape)), like.dtype, what)
    if (
        like.dim() == 4
        and not like.is_contiguous()
        and like.is_contiguous(memory_format=torch.channels_last)
    ):
        t = t.contiguous(memory_format=torch.channels_last)
    return t.to(like.device) if like.device.type != "cpu" else t


def _cast(arr: np.ndarray, dtype: torch.dtype, what: str) -> torch.Tensor:
    """A CPU tensor of ``dtype`` (see :func:`cle_core.toolkit.fit_dtype`); bfloat16, which
    NumPy lacks, goes through float32 and is checked after the conversion."""
    np_dtype = _NUMPY_DTYPES.get(dtype)
    if np_dtype is not None:
        return torch.from_numpy(fit_dtype(arr, np_dtype, what))
    t = torch.from_numpy(fit_dtype(arr, np.float32, what)).to(dtype)
    if not bool(torch.isfinite(t).all()) and np.all(np.isfinite(arr)):
        raise NonFiniteError(
            f"{what}: the equalized values do not fit {t.dtype} (largest magnitude "
            f"{float(np.max(np.abs(arr))):.3g}); nothing was changed"
        )
    return t


def _host_view(t: torch.Tensor) -> np.ndarray | None:
    """A NumPy view of a CPU tensor's storage. Writes go through NumPy: torch's
    parallel copy is far slower for many small tensors on a busy machine."""
    if t.device.type != "cpu" or t.dtype not in _NUMPY_DTYPES:
        return None
    return t.detach().numpy()


def _new_param(arr: np.ndarray, weight: torch.Tensor, what: str) -> nn.Parameter:
    """A new bias for the layer of ``weight``: its dtype, device and ``requires_grad``."""
    t = _cast(np.asarray(arr).reshape(-1), weight.dtype, what)
    return nn.Parameter(t.to(weight.device), requires_grad=weight.requires_grad)


def _clamp_module(
    model: nn.Module,
    site: Site,
    lo: np.ndarray,
    hi: np.ndarray,
    like_q: str | None,
    axes: tuple[int, ...] | None = None,
) -> PerChannelClamp:
    like = _like_tensor(model, like_q)
    shape = None
    if axes is not None:  # channels not on axis 1: the bounds broadcast along them
        if site.rank is None:
            raise CLEError(f"{site.fx}: per-channel bounds on an input of unknown rank")
        try:
            shape = broadcast_shape(site.rank, axes, max(np.size(lo), np.size(hi)))
        except LayoutError as e:
            raise CLEError(f"{site.fx}: {e}") from None
    source = (
        type(model.get_submodule(site.module)).__name__ if site.kind == "module" else _fn_name(site)
    )
    return PerChannelClamp.from_bounds(
        lo,
        hi,
        spatial_dims=(site.rank - 2) if site.rank is not None else 0,
        dtype=like.dtype if like is not None and like.is_floating_point() else torch.float32,
        device=like.device if like is not None else None,
        source=source,
        shape=shape,
    )


def _carried_bn(model: nn.Module, module: str, values: dict[str, np.ndarray]) -> nn.Module:
    """A copy of batch norm ``module`` with the statistics that one of its calls needs."""
    bn = copy.deepcopy(model.get_submodule(module))
    for key, arr in values.items():
        old = getattr(bn, key)
        new = _new_tensor(arr, old, f"{module}.{key}")
        if isinstance(old, nn.Parameter):
            new = nn.Parameter(new, requires_grad=old.requires_grad)
        setattr(bn, key, new)
    return bn


def _module_paths(model: nn.Module) -> dict[int, list[str]]:
    paths: dict[int, list[str]] = {}
    for name, m in model.named_modules(remove_duplicate=False):
        paths.setdefault(id(m), []).append(name)
    return paths


# --- in place ------------------------------------------------------------------------------


def write_in_place(cap: Capture, plan: Plan) -> dict[str, int]:
    model = cap.model
    # Prepare every new tensor and module first: a failure here changes nothing.
    updates: list[tuple[torch.Tensor, torch.Tensor]] = []
    for q, arr in plan.params + _affine_params(plan):
        p = _resolve(model, q)
        updates.append((p, _new_tensor(arr, p, q)))
    biases: list[tuple[nn.Module, nn.Parameter]] = []
    for site, arr in plan.new_biases:
        owner = model.get_submodule(site.module or site.owner or "")
        what = f"{site.module or site.owner}.bias"
        biases.append((owner, _new_param(arr, _resolve(model, site.weight), what)))
    paths = _module_paths(model)
    swaps: list[tuple[nn.Module, str, nn.Module]] = []

    def swap_everywhere(old: nn.Module, new: nn.Module) -> None:
        new.train(old.training)
        for path in paths[id(old)]:
            parent, _, attr = path.rpartition(".")
            swaps.append((model.get_submodule(parent), attr, new))

    for module in dict.fromkeys(s.module for s in plan.bn_sites):
        swap_everywhere(model.get_submodule(module), nn.Identity())
    done: set[str] = set()
    for site, lo, hi, _ in plan.clips:
        if site.module in done:
            continue
        done.add(site.module)
        new = _clamp_module(model, site, lo, hi, plan.like.get(site.fx), plan.axes.get(site.fx))
        swap_everywhere(model.get_submodule(site.module), new)

    undo: list = []
    try:
        with torch.no_grad():
            for p, new in updates:
                view = _host_view(p)
                if view is not None:
                    undo.append(("numpy", view, view.copy()))
                    view[...] = new.numpy()
                    # what p.copy_ would do: autograd then notices the change
                    torch.autograd.graph.increment_version(p)
                else:
                    undo.append(("copy", p, p.detach().clone()))
                    p.copy_(new)
        for owner, param in biases:
            undo.append(("bias", owner, owner._parameters.get("bias")))
            owner.bias = param
        for parent, attr, new in swaps:
            undo.append(("module", parent, attr, getattr(parent, attr)))
            setattr(parent, attr, new)
    except BaseException:
        for entry in reversed(undo):
            if entry[0] == "numpy":
                entry[1][...] = entry[2]
            elif entry[0] == "copy":
                with torch.no_grad():
                    entry[1].copy_(entry[2])
            elif entry[0] == "bias":
                entry[1]._parameters["bias"] = entry[2]
            else:
                setattr(entry[1], entry[2], entry[3])
        raise
    return {
        "parameters": len(updates),
        "new biases": len(biases),
        "batch norms -> Identity": len({s.module for s in plan.bn_sites}),
        "activations -> PerChannelClamp": len(done),
    }


# --- as a GraphModule ---------------------------------------------------------------------


_BIAS_POSITION = 2  # F.conv*d, F.conv_transpose*d and F.linear take (input, weight, bias, ...)


def _set_bias_arg(node: fx.Node, value: Any) -> None:
    pos = _BIAS_POSITION
    if len(node.args) > pos:
        args = list(node.args)
        args[pos] = value
        node.args = tuple(args)
    else:
        node.kwargs = {**node.kwargs, "bias": value}


def _reads_as_bias(user: fx.Node, attr: fx.Node) -> bool:
    pos = _BIAS_POSITION
    in_args = len(user.args) > pos and user.args[pos] is attr
    others = [a for i, a in enumerate(user.args) if i != pos and a is attr]
    return (in_args or user.kwargs.get("bias") is attr) and not others


def _scopes(node: fx.Node) -> list[str]:
    stack = node.meta.get("nn_module_stack") or {}
    return [v[0] if isinstance(v, tuple) else str(v) for v in stack.values()]


def _collapse_layer_modules(
    g: fx.Graph, cap: Capture, plan: Plan
) -> tuple[set[str], dict[str, fx.Node]]:
    """Put the calls of traced-through layer modules back.

    Tracing inlines a custom Conv's forward (pad, then ``F.conv2d`` on ``get_attr``
    weights). Where nothing inside such a call is edited, the GraphModule calls (a copy
    of) the module itself instead, so that module-based tools (quantization simulators,
    hooks) still find a Conv2d there. Returns the modules collapsed, and the module call
    that replaces each erased region's output."""
    edited = {s.fx for s in plan.bn_sites} | {s.fx for s, *_ in plan.clips}
    edited |= {s.fx for s, _ in plan.new_biases if not s.bias_slot}
    edited |= {s.fx for s, _ in plan.affines}
    order = {n: i for i, n in enumerate(g.nodes)}
    nodes = list(g.nodes)
    collapsed: set[str] = set()
    replaced: dict[str, fx.Node] = {}
    for site in cap.sites.values():
        owner = site.owner
        if (
            site.kind == "module"
            or site.op not in ("conv", "conv_transpose", "linear")
            or not owner
        ):
            continue
        n = next((x for x in g.nodes if x.name == site.fx), None)
        if n is None or site.scope != owner:
            continue  # the call did not come from the owner's own forward
        start = end = order[n]
        while start > 0 and owner in _scopes(nodes[start - 1]):
            start -= 1
        while end + 1 < len(nodes) and owner in _scopes(nodes[end + 1]):
            end += 1
        region = nodes[start : end + 1]
        inside = set(region)
        if any(x.name in edited or x.op in ("placeholder", "output") for x in region):
            continue
        inputs = {a for x in region for a in x.all_input_nodes if a not in inside}
        outputs = [x for x in region if any(u not in inside for u in x.users)]
        if len(inputs) != 1 or len(outputs) != 1 or next(iter(inputs)).op == "get_attr":
            continue
        (inp,), (out,) = inputs, outputs
        with g.inserting_after(out):
            call = g.call_module(owner, (inp,))
        call.meta["nn_module_stack"] = out.meta.get("nn_module_stack", {})
        out.replace_all_uses_with(call)
        for x in reversed(region):
            g.erase_node(x)
        collapsed.add(owner)
        replaced[out.name] = call
        order = {x: i for i, x in enumerate(g.nodes)}
        nodes = list(g.nodes)
    return collapsed, replaced


def build_graph_module(cap: Capture, plan: Plan) -> fx.GraphModule:
    model = cap.model
    g = copy.deepcopy(cap.fx_graph)
    collapsed, redirect = _collapse_layer_modules(g, cap, plan)
    nodes = {n.name: n for n in g.nodes}
    taken = {name for name, _ in model.named_modules()}
    taken |= {name for name, _ in model.named_parameters(remove_duplicate=False)}
    taken |= {name for name, _ in model.named_buffers(remove_duplicate=False)}
    taken |= {n.target for n in g.nodes if n.op in ("get_attr", "call_module")}
    new_attrs: dict[str, Any] = {}

    def live(name: str) -> fx.Node:
        while name in redirect:
            name = redirect[name].name
        return nodes[name]

    for site in plan.bn_sites:
        n = nodes[site.fx]
        redirect[n.name] = n.args[0]
        n.replace_all_uses_with(n.args[0])
        g.erase_node(n)

    for site, lo, hi, _ in plan.clips:
        n = nodes[site.fx]
        if site.kind == "module":
            base = f"{site.module}_cle{site.call_index}"
        else:
            base = f"{site.scope}.{site.fx}_clamp" if site.scope else f"{site.fx}_clamp"
        target = unique_name(base, taken)
        new_attrs[target] = _clamp_module(
            model, site, lo, hi, plan.like.get(site.fx), plan.axes.get(site.fx)
        )
        with g.inserting_before(n):
            new = g.call_module(target, (live(site.input),))
        n.replace_all_uses_with(new)
        g.erase_node(n)

    for site, values in plan.affines:
        if site.module in plan.per_call:  # else written with the parameters below
            target = unique_name(f"{site.module}_cle{site.call_index}", taken)
            new_attrs[target] = _carried_bn(model, site.module, values)
            nodes[site.fx].target = target

    module_biases: dict[str, nn.Parameter] = {}
    for site, arr in plan.new_biases:
        param = _new_param(arr, _resolve(model, site.weight), f"{site.weight} (new bias)")
        if site.kind == "module":
            module_biases[site.module] = param
        elif site.owner in collapsed:
            module_biases[site.owner] = param
        elif site.bias_slot:
            new_attrs[site.bias] = param
        else:
            target = unique_name(f"{site.owner}.bias" if site.owner else "bias", taken)
            new_attrs[target] = param
            n = nodes[site.fx]
            with g.inserting_before(n):
                _set_bias_arg(n, g.get_attr(target))

    # Temporary zero biases (see _translate.trace) that nothing filled: drop them.
    for n in list(g.nodes):
        if n.op != "get_attr" or n.target not in cap.temp_biases or n.target in new_attrs:
            continue
        if all(_reads_as_bias(u, n) for u in n.users):
            for u in list(n.users):
                _set_bias_arg(u, None)
            g.erase_node(n)
        else:
            owner = n.target.rpartition(".")[0]
            like = _like_tensor(model, f"{owner}.weight" if owner else "weight")
            new_attrs[n.target] = nn.Parameter(
                torch.zeros(
                    cap.temp_biases[n.target],
                    dtype=like.dtype if like is not None else torch.float32,
                    device=like.device if like is not None else None,
                ),
                requires_grad=False,
            )

    # Changed parameters are made anew (not copied, then overwritten): pre-seeding the
    # deepcopy memo puts them wherever the copies would have gone, ties included.
    memo: dict[int, Any] = {}
    for q, arr in plan.params + _affine_params(plan):
        orig = _resolve(model, q)
        if id(orig) not in memo:
            new = _new_tensor(arr, orig, q)
            memo[id(orig)] = (
                nn.Parameter(new, requires_grad=orig.requires_grad)
                if isinstance(orig, nn.Parameter)
                else new
            )
    root: dict[str, Any] = {}
    for n in g.nodes:
        if n.op == "call_module" and n.target not in root:
            if n.target in new_attrs:
                root[n.target] = new_attrs[n.target]
            else:
                root[n.target] = copy.deepcopy(model.get_submodule(n.target), memo)
    for n in g.nodes:
        if n.op != "get_attr" or n.target in root:
            continue
        if n.target in new_attrs:
            root[n.target] = new_attrs[n.target]
        elif n.target in cap.constants:
            root[n.target] = copy.deepcopy(cap.constants[n.target], memo)
        else:
            root[n.target] = copy.deepcopy(_resolve(model, n.target), memo)

    for module, param in module_biases.items():
        root[module].bias = param

    g.lint()
    gm = fx.GraphModule(root, g, class_name=f"{type(model).__name__}Equalized")
    originals = dict(model.named_modules())
    for name, m in gm.named_modules():
        probe = name
        while probe not in originals:  # a new module: its parent's flag
            probe = probe.rpartition(".")[0]
        m.training = originals[probe].training
    return gm


# --- entry point ---------------------------------------------------------------------------


def apply(cap: Capture, result: EqualizeResult, allow_graph_module: bool = True) -> nn.Module:
    """Write ``result`` back; returns ``cap.model`` (in place) or a new GraphModule."""
    plan = make_plan(cap, result)
    what = type(cap.model).__name__
    if not plan.reasons:
        counts = write_in_place(cap, plan)
        log.info(
            "equalized %s in place: %s",
            what,
            ", ".join(f"{v} {k}" for k, v in counts.items()),
        )
        return cap.model
    shown = "; ".join(plan.reasons[:3])
    more = f" (and {len(plan.reasons) - 3} more)" if len(plan.reasons) > 3 else ""
    if not allow_graph_module:
        raise NotInPlaceError(
            f"the result cannot be written onto {what}'s module tree: {shown}{more}. Nothing "
            "was changed; allow a rewritten torch.fx.GraphModule (allow_graph_module=True) "
            "to get it."
        )
    gm = build_graph_module(cap, plan)
    log.warning(
        "the result cannot be written onto %s's module tree (%s%s); returning a rewritten "
        "torch.fx.GraphModule and leaving the model unchanged: use the returned model",
        what,
        shown,
        more,
    )
    return gm
