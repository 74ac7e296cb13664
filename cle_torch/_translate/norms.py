"""Normalizations with a per-channel affine, as one IR ``norm`` each: ``nn.LayerNorm`` /
``F.layer_norm`` (a 1-D normalized shape: the last axis), ``nn.GroupNorm`` /
``F.group_norm`` (channel axis 1), ``nn.RMSNorm`` / ``F.rms_norm``, and the hand-written
forms that tracing decomposes:

- RMSNorm (LLaMA's reference code): ``x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) +
  eps) * weight``, also with ``x / torch.sqrt(...)``, ``x * x`` for the square, the
  weight on either side, and computed as ``norm(x.float()).type_as(x) * weight``;
- LayerNorm over one axis (ConvNeXt's channels-first ``LayerNorm2d``): ``u = x.mean(d,
  keepdim=True)``, ``(x - u) / torch.sqrt((x - u).pow(2).mean(d, keepdim=True) + eps)``,
  then ``weight[:, None, None] * . + bias[:, None, None]``.

A decomposed norm becomes one node only where every intermediate tensor has no reader
outside it (else scaling the affine would change what that reader sees); otherwise its
ops are translated one by one (and stay opaque).

A mixin of ``_Translator`` (``translator.py``): its methods use the translator's state
and helpers; :func:`find_norms` is the matcher, run over the FX graph before the walk.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from .._optable import (
    _bind,
    _number,
    _numpy,
    _Opaque,
    _sig_group_norm,
    _sig_layer_norm,
    _sig_rms_norm,
)

_ARITH = {
    operator.mul: "mul",
    torch.mul: "mul",
    operator.add: "add",
    torch.add: "add",
    operator.sub: "sub",
    torch.sub: "sub",
    operator.truediv: "div",
    torch.div: "div",
    torch.rsqrt: "rsqrt",
    torch.sqrt: "sqrt",
    operator.pow: "pow",
    torch.pow: "pow",
    torch.mean: "mean",
}
_METHOD_OPS = frozenset(_ARITH.values())


def _op(n: Any) -> str | None:
    if not isinstance(n, fx.Node):
        return None
    if n.op == "call_function":
        return _ARITH.get(n.target)
    if n.op == "call_method" and n.target in _METHOD_OPS:
        return n.target
    return None


@dataclass
class NormMatch:
    """A decomposed norm ending at one FX node: its input, affine, reduced axis."""

    kind: str  # "layer" or "rms"
    x: fx.Node
    dim: int  # the reduced axis as written (may be negative)
    eps: float
    gamma: fx.Node  # get_attr
    beta: fx.Node | None
    trailing: int  # unit axes the affine is indexed with (weight[:, None, None]: 2)
    nodes: set[fx.Node] = field(default_factory=set)  # every node of the match but x


class _NoMatch(Exception):
    pass


def _need(cond: bool) -> None:
    if not cond:
        raise _NoMatch


def _affine_term(n: Any, nodes: set) -> tuple[fx.Node, int]:
    """``w`` or ``w[:, None, ...]`` of a ``get_attr`` ``w``: (the get_attr, unit axes)."""
    _need(isinstance(n, fx.Node))
    if n.op == "get_attr":
        return n, 0
    _need(n.op == "call_function" and n.target is operator.getitem)
    src, idx = n.args
    _need(isinstance(src, fx.Node) and src.op == "get_attr" and isinstance(idx, tuple))
    _need(len(idx) >= 1 and idx[0] == slice(None) and all(i is None for i in idx[1:]))
    nodes.add(n)
    return src, len(idx) - 1


def _binary(n: Any, op: str) -> tuple[Any, Any]:
    _need(_op(n) == op and not n.kwargs and len(n.args) == 2)
    return n.args


def _mean(n: Any) -> tuple[fx.Node, int]:
    _need(_op(n) == "mean")
    args = dict(zip(("input", "dim", "keepdim"), n.args, strict=False)) | dict(n.kwargs)
    dim = args.get("dim")
    if isinstance(dim, (tuple, list)) and len(dim) == 1:
        dim = dim[0]
    _need(isinstance(dim, int) and args.get("keepdim") is True and args.get("dtype") is None)
    return args["input"], dim


def _square_of(n: Any) -> fx.Node:
    if _op(n) == "pow":
        base, e = _binary(n, "pow")
        _need(e == 2)
        return base
    a, b = _binary(n, "mul")
    _need(a is b)
    return a


def _root_of_mean_square(n: Any, nodes: set, inverse: bool) -> tuple[fx.Node, int, float]:
    """``rsqrt(mean(t^2, d) + eps)`` (``inverse``) or ``sqrt(...)``: (t, d, eps)."""
    _need(_op(n) == ("rsqrt" if inverse else "sqrt") and len(n.args) == 1 and not n.kwargs)
    nodes.add(n)
    a, b = _binary(n.args[0], "add")
    nodes.add(n.args[0])
    m, eps = (a, b) if isinstance(b, (int, float)) else (b, a)
    _need(isinstance(eps, (int, float)) and not isinstance(eps, bool) and eps >= 0)
    sq, d = _mean(m)
    nodes.add(m)
    t = _square_of(sq)
    nodes.add(sq)
    return t, d, float(eps)


def _normalized(z: Any, nodes: set) -> tuple[str, fx.Node, int, float]:
    """``z`` as ``(kind, x, dim, eps)``."""
    nodes.add(z)
    if _op(z) == "mul":  # x * rsqrt(mean(x^2) + eps)
        a, b = _binary(z, "mul")
        for x, r in ((a, b), (b, a)):
            try:
                t, d, eps = _root_of_mean_square(r, nodes, inverse=True)
            except _NoMatch:
                continue
            _need(t is x)
            return "rms", x, d, eps
        raise _NoMatch
    num, den = _binary(z, "div")
    t, d, eps = _root_of_mean_square(den, nodes, inverse=False)
    if t is num:  # x / sqrt(mean(x^2) + eps)
        return "rms", num, d, eps
    # (x - u) / sqrt(mean((x - u)^2) + eps), u = mean(x): the two x - u may be one node
    x1, u1 = _binary(num, "sub")
    x2, u2 = _binary(t, "sub")
    _need(x1 is x2 and u1 is u2)
    x, d0 = _mean(u1)
    _need(x is x1 and d0 == d)
    nodes.update((num, t, u1))
    return "layer", x, d, eps


def _normalized_any(z: Any, nodes: set) -> tuple[str, fx.Node, int, float]:
    """:func:`_normalized`, also computed in float32 and cast back as LLaMA's code
    writes it: ``norm(x.float()).type_as(x)``."""
    if isinstance(z, fx.Node) and z.op == "call_method" and z.target == "type_as":
        inner, like = z.args
        nodes.add(z)
        kind, x, d, eps = _normalized(inner, nodes)
        if x is not like:
            _need(x.op == "call_method" and x.target == "float" and x.args[0] is like)
            nodes.add(x)
        return kind, like, d, eps
    return _normalized(z, nodes)


def _match(end: fx.Node) -> NormMatch:
    nodes: set[fx.Node] = {end}
    beta, b_trailing = None, None
    m = end
    if _op(end) == "add":
        a, b = _binary(end, "add")
        for mm, bb in ((a, b), (b, a)):
            try:
                beta, b_trailing = _affine_term(bb, nodes)
            except _NoMatch:
                continue
            m = mm
            break
        _need(beta is not None)
        nodes.add(m)
    a, b = _binary(m, "mul")
    for w, z in ((a, b), (b, a)):
        try:
            gamma, trailing = _affine_term(w, nodes)
        except _NoMatch:
            continue
        kind, x, d, eps = _normalized_any(z, nodes)
        _need(b_trailing is None or b_trailing == trailing)
        nodes.update(n for n in (gamma, beta) if n is not None)
        return NormMatch(kind, x, d, eps, gamma, beta, trailing, nodes)
    raise _NoMatch


def find_norms(graph: fx.Graph) -> dict[str, NormMatch]:
    """The decomposed norms of ``graph`` by the name of their last node. Later nodes
    are tried first, so a norm with a bias is found whole, not as its scaled part."""
    found: dict[str, NormMatch] = {}
    taken: set[fx.Node] = set()
    for node in reversed(list(graph.nodes)):
        if node in taken or _op(node) not in ("add", "mul"):
            continue
        try:
            match = _match(node)
        except _NoMatch:
            continue
        inner = match.nodes - {node}
        if any(n.op != "get_attr" and set(n.users) - match.nodes for n in inner):
            continue  # an intermediate is read elsewhere
        if match.nodes & taken:
            continue
        taken |= match.nodes
        found[node.name] = match
    return found


class Norms:
    # --- module calls --------------------------------------------------------------------
    def m_layer_norm(self, node, m, base, x) -> None:
        self.layer_norm(node, x, m.normalized_shape, m.weight, m.bias, m.eps, node.target)

    def m_rms_norm(self, node, m, base, x) -> None:
        self.rms_norm(node, x, m.normalized_shape, m.weight, m.eps, node.target)

    def m_group_norm(self, node, m, base, x) -> None:
        self.group_norm(node, x, m.num_groups, m.weight, m.bias, m.eps, node.target)

    # --- functions -----------------------------------------------------------------------
    def f_layer_norm(self, node, fn, args, kwargs) -> None:
        b = _bind(_sig_layer_norm, args, kwargs)
        w, wq = self.param(b["weight"], "weight") if b["weight"] is not None else (None, None)
        bias, bq = self.param(b["bias"], "bias") if b["bias"] is not None else (None, None)
        eps = _number(b["eps"], "eps")
        self.layer_norm(
            node, self.data(b["input"]), b["normalized_shape"], w, bias, eps, None, (wq, bq)
        )

    def f_rms_norm(self, node, fn, args, kwargs) -> None:
        b = _bind(_sig_rms_norm, args, kwargs)
        w, wq = self.param(b["weight"], "weight") if b["weight"] is not None else (None, None)
        eps = None if b["eps"] is None else _number(b["eps"], "eps")
        self.rms_norm(node, self.data(b["input"]), b["normalized_shape"], w, eps, None, wq)

    def f_group_norm(self, node, fn, args, kwargs) -> None:
        b = _bind(_sig_group_norm, args, kwargs)
        w, wq = self.param(b["weight"], "weight") if b["weight"] is not None else (None, None)
        bias, bq = self.param(b["bias"], "bias") if b["bias"] is not None else (None, None)
        eps = _number(b["eps"], "eps")
        groups = b["num_groups"]
        if not isinstance(groups, int):
            raise _Opaque("num_groups is not static")
        self.group_norm(node, self.data(b["input"]), groups, w, bias, eps, None, (wq, bq))

    # --- the norms -----------------------------------------------------------------------
    def layer_norm(self, node, x, shape, weight, bias, eps, module, names=(None, None)) -> None:
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        if len(shape) != 1:
            raise _Opaque(
                f"normalized_shape {shape} spans several axes: its affine is not one value "
                "per channel of one axis"
            )
        rank = self.norm_rank(x)
        self.emit_norm(
            node, x, "layer", rank - 1, (rank - 1,), weight, bias, float(eps), module, names
        )

    def rms_norm(self, node, x, shape, weight, eps, module, weight_q=None) -> None:
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        if len(shape) != 1:
            raise _Opaque(
                f"normalized_shape {shape} spans several axes: its affine is not one value "
                "per channel of one axis"
            )
        if eps is None:  # torch's default: the machine epsilon of the input's dtype
            eps = torch.finfo(weight.dtype if weight is not None else torch.float32).eps
        rank = self.norm_rank(x)
        self.emit_norm(
            node,
            x,
            "rms",
            rank - 1,
            (rank - 1,),
            weight,
            None,
            float(eps),
            module,
            (weight_q, None),
        )

    def group_norm(self, node, x, groups, weight, bias, eps, module, names=(None, None)) -> None:
        rank = self.norm_rank(x)
        if rank < 2:
            raise _Opaque("a group norm of an input of rank < 2")
        self.emit_norm(
            node, x, "group", 1, None, weight, bias, float(eps), module, names, groups=groups
        )

    def norm_rank(self, x: fx.Node) -> int:
        rank = self.rank.get(x.name)
        if rank is None:
            raise _Opaque("a norm of an input of unknown rank: pass dummy_input or input_shapes")
        return rank

    def emit_norm(
        self, node, x, kind, axis, axes, weight, bias, eps, module, names, groups=None
    ) -> None:
        """One ``norm`` node; ``module`` holds ``weight`` and ``bias`` as attributes of
        those names, else ``names`` gives their qualified names."""
        if weight is None:
            raise _Opaque("no affine (elementwise_affine=False): nothing per channel to scale")
        gamma_q = f"{module}.weight" if module else names[0]
        beta_q = None if bias is None else (f"{module}.bias" if module else names[1])
        params = {"gamma": _numpy(weight).reshape(-1), "beta": None}
        ids = {"gamma": self.param_id(gamma_q)}
        if bias is not None:
            params["beta"] = _numpy(bias).reshape(-1)
            ids["beta"] = self.param_id(beta_q)
        attrs = {"kind": kind, "axis": axis, "eps": eps}
        if axes is not None:
            attrs["axes"] = axes
        if groups is not None:
            attrs["groups"] = groups
        owner = module or gamma_q.rpartition(".")[0]
        name = (
            None
            if node.op == "call_module"
            else (owner if gamma_q == f"{owner}.weight" else gamma_q)
        )
        self.emit(
            "norm",
            node,
            [x],
            rank=self.rank.get(x.name),
            channels=weight.numel(),
            params=params,
            attrs=attrs,
            param_ids=ids,
            name=name,
            owner=owner,
            weight=gamma_q,
            bias=beta_q,
        )

    def decomposed_norm(self, node: fx.Node, match: NormMatch) -> None:
        """The norm that ``find_norms`` found ending at ``node``; where it cannot be one
        node, an opaque node of ``x`` (its intermediates are not translated)."""
        try:
            x = self.data(match.x)
            rank = self.norm_rank(x)
            axis = rank - 1 - match.trailing
            if match.dim % rank != axis:
                raise _Opaque(
                    f"normalizes over axis {match.dim % rank} but its affine is on axis {axis}"
                )
            weight, gamma_q = self.param(match.gamma, "weight")
            bias, beta_q = (None, None)
            if match.beta is not None:
                bias, beta_q = self.param(match.beta, "bias")
            if weight.dim() != 1 or (bias is not None and bias.shape != weight.shape):
                raise _Opaque("its affine is not one value per channel")
            self.emit_norm(
                node, x, match.kind, axis, (axis,), weight, bias, match.eps, None, (gamma_q, beta_q)
            )
        except _Opaque as why:
            kind = "RMSNorm" if match.kind == "rms" else "LayerNorm"
            self.refused_match(node, match.x, f"{kind} (decomposed)", why)
