"""``nn.MultiheadAttention`` as the IR sees an attention: its packed in-projection as
three ``linear`` nodes (q, k, v: row blocks of ``in_proj_weight``), heads split with a
reshape and a transpose, the attention weights ``softmax(q k^T / sqrt(d))`` (opaque),
``matmul(P, v)``, heads merged, ``out_proj``. The module keeps its one call: the
write-back puts the scaled rows back into ``in_proj_weight`` / ``in_proj_bias`` and
``out_proj``'s parameters (``Site.rows``).

Only self-attention as ``nn.TransformerEncoderLayer`` and pre-LN blocks call it:
``batch_first=True``, one tensor for query, key and value, no masks, no ``bias_k`` /
``bias_v`` / ``add_zero_attn``, and the attention weights not read. Anything else stays
opaque with the reason.

A mixin of ``_Translator`` (``translator.py``): its methods use the translator's state
and helpers.
"""

from __future__ import annotations

import operator

import torch.fx as fx

from cle_core import Layout

from .._capture import Site
from .._optable import _numpy, _Opaque
from .layout import _attention_weights_fn

_MHA_KWARGS = {
    "need_weights": (True, False),
    "attn_mask": (None,),
    "key_padding_mask": (None,),
    "average_attn_weights": (True, False),
    "is_causal": (False,),
}


class Attention:
    def m_mha(self, node: fx.Node, m) -> None:
        q = node.target
        if len(node.args) != 3 or len({id(a) for a in node.args}) != 1:
            raise _Opaque("not self-attention with one tensor for query, key and value")
        for k, v in node.kwargs.items():
            if k not in _MHA_KWARGS or not any(v is a or v == a for a in _MHA_KWARGS[k]):
                raise _Opaque(f"called with {k}={v!r}")
        if not m.batch_first:
            raise _Opaque("batch_first=False: (T, B, E) inputs")
        if not m._qkv_same_embed_dim or m.bias_k is not None or m.add_zero_attn:
            raise _Opaque("separate q / k / v weights, bias_k / bias_v or add_zero_attn")
        for user in node.users:
            if not (user.op == "call_function" and user.target is operator.getitem):
                raise _Opaque("its output tuple is read whole")
            if user.args[1] != 0 and user.users:
                raise _Opaque("its attention weights are read")
        x = self.data(node.args[0])
        shape = self.fx_shapes.get(x.name)
        if shape is None or len(shape) != 3:
            raise _Opaque("an input of unknown shape or not (B, T, E): pass dummy_input")
        e, h = m.embed_dim, m.num_heads
        d, t = e // h, shape[1]
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
                node, "linear", [x.name], f"{q}.{part}", (None, t, e), params=params,
                attrs={"layout": Layout(0, 1)}, param_ids=ids,
                site=Site(
                    fx=node.name, kind="module", op="linear", target=node.target, module=q,
                    owner=q, weight=f"{q}.in_proj_weight",
                    bias=None if bias is None else f"{q}.in_proj_bias", input=x.name,
                    rank=3, scope=q, rows=rows,
                ),
            )  # fmt: skip
            split = self.mha_node(
                node, "reshape", [out], f"{q}.{part}:split", (None, t, h, d),
                attrs={"shape": (None, t, h, d)},
            )  # fmt: skip
            heads[part] = self.mha_node(
                node, "transpose", [split], f"{q}.{part}:heads", (None, h, t, d),
                attrs={"perm": (0, 2, 1, 3)},
            )  # fmt: skip
        p = self.mha_node(node, "opaque", [heads["q"], heads["k"]], f"{q}.weights",
                          (None, h, t, t), attrs={
                              "kind": "attention_weights",
                              "why": "softmax(q k^T): mixes positions",
                              "fn": _attention_weights_fn(None, False, None),
                              "channels": None,
                          })  # fmt: skip
        y = self.mha_node(node, "matmul", [p, heads["v"]], f"{q}.attention", (None, h, t, d))
        y = self.mha_node(node, "transpose", [y], f"{q}.merge", (None, t, h, d),
                          attrs={"perm": (0, 2, 1, 3)})  # fmt: skip
        y = self.mha_node(node, "reshape", [y], f"{q}.merged", (None, t, e),
                          attrs={"shape": (None, t, e)})  # fmt: skip
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
            node, "linear", [y], oq, (None, t, e), params=params,
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
