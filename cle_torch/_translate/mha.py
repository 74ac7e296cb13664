"""``nn.MultiheadAttention`` as the IR sees an attention: its packed in-projection as
three ``linear`` nodes (q, k, v: row blocks of ``in_proj_weight``), heads split with a
reshape and a transpose, the attention weights ``softmax(q k^T / sqrt(d))`` (opaque),
``matmul(P, v)``, heads merged, ``out_proj``. The module keeps its one call: the
write-back puts the scaled rows back into ``in_proj_weight`` / ``in_proj_bias`` and
``out_proj``'s parameters (``Site.rows``). The three share attr ``weight_group``: a
deployment quantizes the packed tensor on one per-tensor grid (torch, the exporters and
PT2E call one linear on it).

Only self-attention as ``nn.TransformerEncoderLayer`` and pre-LN blocks call it: one
tensor for query, key and value, ``(B, T, E)`` or, with ``batch_first=False``, ``(T, B,
E)``; masks (``attn_mask``, ``key_padding_mask``: constants of the model or tensors of
the graph, which become inputs of the attention weights) and ``is_causal`` as torch
combines them; no ``bias_k`` / ``bias_v`` / ``add_zero_attn``, the attention weights not
read. Anything else stays opaque with the reason.

A mixin of ``_Translator`` (``translator.py``): its methods use the translator's state
and helpers.
"""

from __future__ import annotations

import math
import operator

import numpy as np
import torch
import torch.fx as fx

from cle_core import Layout

from .._capture import Site
from .._optable import _numpy, _Opaque
from .layout import _softmax_fn

_MHA_KWARGS = {
    "need_weights": (True, False),
    "average_attn_weights": (True, False),
    "is_causal": (True, False),
}
_MASKS = ("attn_mask", "key_padding_mask")


def _as_scores(mask: np.ndarray) -> np.ndarray:
    """A mask as torch's ``_canonical_mask`` makes it: a boolean one is -inf where True
    (not attended), a float one is added to the scores as it is."""
    if mask.dtype == bool:
        return np.where(mask, -np.inf, 0.0)
    return mask.astype(np.float64)


def _mha_weights_fn(heads: int, causal: bool, constants: dict, inputs: dict[str, bool]):
    """The attention weights of ``nn.MultiheadAttention``, ``softmax(q k^T / sqrt(d) +
    attn_mask + key_padding_mask)`` on ``q``, ``k`` of shape ``(B, H, T, D)``, in NumPy
    (for the core's executor). ``constants``: the masks that are constants of the model;
    ``inputs``: those that come as further inputs, in order, and whether each is boolean
    (the executor feeds every input as float64). ``causal``: torch took ``is_causal`` as
    the mask (it then drops ``attn_mask``)."""

    def weights(q: np.ndarray, k: np.ndarray, *given: np.ndarray) -> np.ndarray:
        masks = dict(constants)
        for (name, boolean), mask in zip(inputs.items(), given, strict=True):
            masks[name] = np.asarray(mask) != 0 if boolean else mask
        scores = np.matmul(q, np.swapaxes(k, -1, -2)) / math.sqrt(q.shape[-1])
        b, t, u = scores.shape[0], scores.shape[-2], scores.shape[-1]
        if causal:
            scores = np.where(np.tril(np.ones((t, u), bool)), scores, -np.inf)
        elif masks.get("attn_mask") is not None:
            m = _as_scores(np.asarray(masks["attn_mask"]))
            scores = scores + (m if m.ndim == 2 else m.reshape(b, heads, t, u))
        if masks.get("key_padding_mask") is not None:
            scores = scores + _as_scores(np.asarray(masks["key_padding_mask"]))[:, None, None, :]
        return _softmax_fn(-1)(scores)

    return weights


class Attention:
    def m_mha(self, node: fx.Node, m) -> None:
        q = node.target
        if len(node.args) != 3 or len({id(a) for a in node.args}) != 1:
            raise _Opaque("not self-attention with one tensor for query, key and value")
        for k, v in node.kwargs.items():
            if k not in (*_MHA_KWARGS, *_MASKS):
                raise _Opaque(f"called with {k}={v!r}")
            if k in _MHA_KWARGS and not any(v is a or v == a for a in _MHA_KWARGS[k]):
                raise _Opaque(f"called with {k}={v!r}")
        if not m._qkv_same_embed_dim or m.bias_k is not None or m.add_zero_attn:
            raise _Opaque("separate q / k / v weights, bias_k / bias_v or add_zero_attn")
        for user in node.users:
            if not (user.op == "call_function" and user.target is operator.getitem):
                raise _Opaque("its output tuple is read whole")
            if user.args[1] != 0 and user.users:
                raise _Opaque("its attention weights are read")
        constants, given = {}, []
        for k in _MASKS:
            mask = node.kwargs.get(k)
            if mask is None:
                continue
            if isinstance(mask, fx.Node) and mask.op == "get_attr":
                value = self.attr(mask.target)
                if not isinstance(value, torch.Tensor):
                    raise _Opaque(f"{k} is not a tensor")
                constants[k] = value.detach().cpu().numpy()
            elif isinstance(mask, fx.Node) and mask.name in self.values:
                given.append((k, mask))
            else:
                raise _Opaque(f"{k} is neither a constant of the model nor a tensor of the graph")
        masks = {**constants, **dict(given)}
        is_causal = node.kwargs.get("is_causal", False)
        if is_causal and masks.get("attn_mask") is None:
            raise _Opaque("is_causal=True without attn_mask (torch refuses it)")
        # torch's rule: the hint replaces attn_mask only without a key padding mask and
        # when the weights are not asked for
        causal = bool(is_causal) and "key_padding_mask" not in masks
        causal = causal and node.kwargs.get("need_weights", True) is False
        x = self.data(node.args[0])
        shape = self.fx_shapes.get(x.name)
        if shape is None or len(shape) != 3:
            what = "(B, T, E)" if m.batch_first else "(T, B, E)"
            raise _Opaque(f"an input of unknown shape or not {what}: pass dummy_input")
        e, h = m.embed_dim, m.num_heads
        d = e // h
        # batch_first=False: (T, B, E), its heads split in place and moved to (B, H, T, D)
        # as torch does, and merged back to (T, B, E)
        t, b = (shape[1], shape[0]) if m.batch_first else (shape[0], shape[1])
        lead = (b, t) if m.batch_first else (t, b)
        to_heads = (0, 2, 1, 3) if m.batch_first else (1, 2, 0, 3)
        from_heads = (0, 2, 1, 3) if m.batch_first else (2, 0, 1, 3)
        weight, bias = _numpy(m.in_proj_weight), m.in_proj_bias
        bias = None if bias is None else _numpy(bias)
        w_id = self.param_id(f"{q}.in_proj_weight")
        b_id = None if bias is None else self.param_id(f"{q}.in_proj_bias")
        heads = {}
        for i, part in enumerate("qkv"):
            rows = (i * e, (i + 1) * e)
            params = {
                "weight": weight[rows[0] : rows[1]],
                "bias": None if bias is None else bias[rows[0] : rows[1]],
            }
            ids = {"weight": f"{w_id}[{part}]"}
            if bias is not None:
                ids["bias"] = f"{b_id}[{part}]"
            out = self.mha_node(
                node, "linear", [x.name], f"{q}.{part}", (*lead, e), params=params,
                attrs={"layout": Layout(0, 1), "weight_group": w_id}, param_ids=ids,
                site=Site(
                    fx=node.name, kind="module", op="linear", target=node.target, module=q,
                    owner=q, weight=f"{q}.in_proj_weight",
                    bias=None if bias is None else f"{q}.in_proj_bias", input=x.name,
                    rank=3, scope=q, rows=rows,
                ),
            )  # fmt: skip
            split = self.mha_node(
                node, "reshape", [out], f"{q}.{part}:split", (*lead, h, d),
                attrs={"shape": (*lead, h, d)},
            )  # fmt: skip
            heads[part] = self.mha_node(
                node, "transpose", [split], f"{q}.{part}:heads", (b, h, t, d),
                attrs={"perm": to_heads},
            )  # fmt: skip
        booleans = {k: self.cap.dtypes.get(v.name) == torch.bool for k, v in given}
        fn = _mha_weights_fn(h, causal, constants, booleans)
        p = self.mha_node(node, "opaque", [heads["q"], heads["k"], *(v.name for _, v in given)],
                          f"{q}.weights", (b, h, t, t), attrs={
                              "kind": "attention_weights",
                              "why": "softmax(q k^T): mixes positions",
                              "fn": fn,
                              "channels": None,
                              "scores": True,  # of q and k through q k^T only: Q -> K
                          })  # fmt: skip
        y = self.mha_node(node, "matmul", [p, heads["v"]], f"{q}.attention", (b, h, t, d))
        y = self.mha_node(node, "transpose", [y], f"{q}.merge", (*lead, h, d),
                          attrs={"perm": from_heads})  # fmt: skip
        y = self.mha_node(node, "reshape", [y], f"{q}.merged", (*lead, e),
                          attrs={"shape": (*lead, e)})  # fmt: skip
        proj = m.out_proj
        oq = f"{q}.out_proj"
        params = {
            "weight": _numpy(proj.weight),
            "bias": None if proj.bias is None else _numpy(proj.bias),
        }
        ids = {"weight": self.param_id(f"{oq}.weight")}
        if proj.bias is not None:
            ids["bias"] = self.param_id(f"{oq}.bias")
        self.mha_node(
            node, "linear", [y], oq, (*lead, e), params=params,
            attrs={"layout": Layout(0, 1)}, param_ids=ids, output=node.name,
            site=Site(
                fx=node.name, kind="module", op="linear", target=node.target, module=oq,
                owner=oq, weight=f"{oq}.weight",
                bias=None if proj.bias is None else f"{oq}.bias", input=y, rank=3, scope=q,
                rows=(0, proj.weight.shape[0]),
            ),
        )  # fmt: skip
        self.values.add(node.name)
        self.rank[node.name] = 3
        self.chan[node.name] = e
        self.moved.add(node.name)
        self.mha.add(node.name)

    def mha_node(self, node, op, inputs, name, shape, *, params=None, attrs=None,
                 param_ids=None, site=None, output=None) -> str:  # fmt: skip
        """One IR node of the attention of ``node``; returns its output's name. A layer
        gets a handle of its own, the key of its ``site`` for the write-back."""
        ir_name = self.unique(name)
        out = output or f"{node.name}.{name.rpartition('.')[2]}"
        handle = out if site is not None else node.name
        self.ir.add_node(
            op, inputs, name=ir_name, outputs=[out], params=params, attrs=attrs,
            handle=handle, param_ids=param_ids,
        )  # fmt: skip
        self.ir.values[out].shape = shape
        if site is not None:
            self.cap.sites[handle] = site
        self.cap.ir_names[ir_name] = node.name
        return out

    def mha_output(self, node: fx.Node, src: fx.Node) -> None:
        """``attn(...)[0]``: the attention's output."""
        self.unary(node, src, "identity", alias=True)
