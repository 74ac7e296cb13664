"""Ops that move channels between axes, and attention: transpose / permute / ``.T`` /
swapaxes, a reshape / view / flatten / unflatten with static shapes, matmul / bmm / ``@``
of two activations, softmax, ``F.scaled_dot_product_attention``, positions of one axis
(``x[:, 0]``, ``x[:, 1:]``, ``torch.select``), the repeats of K / V heads of
grouped-query attention (``repeat_interleave``, ``x[:, :, None].expand(...)``: a
``repeat``, whose channel map is the core's).

The IR's ``transpose`` and ``reshape`` take the shapes of the example run (see
``propagate``): without ``dummy_input`` or ``input_shapes`` a reshape other than a
flatten stays opaque. Where the channels go is the core's business
(``cle_core._layout``): the backend only says what the op does.

A mixin of ``_Translator`` (``translator.py``): its methods use the translator's state
and helpers.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.fx as fx

from .._optable import (
    _bind,
    _number,
    _Opaque,
    _sig_sdpa,
    _sig_select,
    _sig_softmax,
    _sig_transpose,
)

# Why SDPA's own repeat of K / V heads is not translated: it happens inside the call,
# where the IR has no value for the repeated V.
GQA_WHY = (
    "enable_gqa repeats K / V heads inside the call: repeat them before it "
    "(repeat_interleave) for V -> O to be equalized"
)


def _softmax_fn(dim: int):
    def softmax(x: np.ndarray) -> np.ndarray:
        e = np.exp(x - np.max(x, axis=dim, keepdims=True))
        return e / np.sum(e, axis=dim, keepdims=True)

    return softmax


def _attention_weights_fn(scale: float | None, causal: bool, mask: np.ndarray | None):
    """``softmax(q k^T * scale + mask)`` as ``F.scaled_dot_product_attention`` computes
    it, in NumPy (for the core's executor)."""

    def weights(q: np.ndarray, k: np.ndarray) -> np.ndarray:
        s = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
        scores = np.matmul(q, np.swapaxes(k, -1, -2)) * s
        if causal:
            t, u = scores.shape[-2:]
            scores = np.where(np.tril(np.ones((t, u), bool)), scores, -np.inf)
        if mask is not None:
            scores = np.where(mask, scores, -np.inf) if mask.dtype == bool else scores + mask
        return _softmax_fn(-1)(scores)

    return weights


class Moves:
    def moves(self, node: fx.Node, x: fx.Node, perm: tuple[int, ...]) -> None:
        rank = self.rank.get(x.name)
        if rank is None:
            raise _Opaque("a transpose of an input of unknown rank: pass dummy_input")
        perm = tuple(p % rank if isinstance(p, int) else p for p in perm)
        if sorted(perm) != list(range(rank)):
            raise _Opaque(f"dims {perm} are not a permutation of a rank-{rank} tensor")
        self.emit("transpose", node, [x], rank=rank, channels=None, attrs={"perm": perm})

    def f_transpose(self, node, fn, args, kwargs) -> None:
        b = _bind(_sig_transpose, args, kwargs)
        x = self.data(b["input"])
        rank = self.rank.get(x.name)
        d0, d1 = b["dim0"], b["dim1"]
        if rank is None or not all(isinstance(d, int) for d in (d0, d1)):
            raise _Opaque("dims or rank not static: pass dummy_input")
        perm = list(range(rank))
        perm[d0 % rank], perm[d1 % rank] = perm[d1 % rank], perm[d0 % rank]
        self.moves(node, x, tuple(perm))

    def f_permute(self, node, fn, args, kwargs) -> None:
        if kwargs.keys() - {"dims"} or not args:
            raise _Opaque("unexpected arguments")
        dims = kwargs["dims"] if "dims" in kwargs else args[1:]
        if len(dims) == 1 and isinstance(dims[0], (tuple, list)):
            dims = dims[0]
        if not all(isinstance(d, int) for d in dims):
            raise _Opaque("dims are not static")
        self.moves(node, self.data(args[0]), tuple(dims))

    def f_getattr(self, node, fn, args, kwargs) -> None:
        """``x.T`` (every axis reversed) and ``x.mT`` (the last two swapped)."""
        if len(args) != 2 or args[1] not in ("T", "mT"):
            raise _Opaque("not understood")
        x = self.data(args[0])
        rank = self.rank.get(x.name)
        if rank is None:
            raise _Opaque("a transpose of an input of unknown rank: pass dummy_input")
        perm = list(range(rank))[::-1] if args[1] == "T" else [*range(rank - 2), rank - 1, rank - 2]
        self.moves(node, x, tuple(perm))

    def reshape(self, node: fx.Node, x: fx.Node, why: str) -> None:
        """A reshape to the static shape the example run saw (None for the batch); ``why``
        is the reason given where that shape is not known."""
        shape = self.fx_shapes.get(node.name)
        if shape is None or x.name not in self.fx_shapes:
            raise _Opaque(f"{why}; with dummy_input or input_shapes it would be a reshape")
        self.emit("reshape", node, [x], rank=len(shape), channels=None, attrs={"shape": shape})

    def f_unflatten(self, node, fn, args, kwargs) -> None:
        self.reshape(node, self.data(args[0] if args else kwargs.get("input")), "unflatten")

    def f_matmul(self, node, fn, args, kwargs) -> None:
        if len(args) != 2 or kwargs:
            raise _Opaque("unexpected arguments")
        try:
            a, b = self.data(args[0]), self.data(args[1])
        except _Opaque:
            raise _Opaque("a product with a constant: not a Linear the IR knows") from None
        if self.rank.get(a.name) is None or self.rank.get(b.name) is None:
            raise _Opaque("operands of unknown rank: pass dummy_input or input_shapes")
        if min(self.rank[a.name], self.rank[b.name]) < 2:
            raise _Opaque("a product with a vector")
        rank = len(self.fx_shapes[node.name]) if node.name in self.fx_shapes else None
        self.emit("matmul", node, [a, b], rank=rank, channels=None)

    def f_softmax(self, node, fn, args, kwargs) -> None:
        b = _bind(_sig_softmax, args, kwargs)
        x, dim = self.data(b["input"]), b["dim"]
        if not isinstance(dim, int):
            raise _Opaque("dim is not static")
        self.opaque_fn(node, [x], "softmax", _softmax_fn(dim), "mixes the positions it normalizes")

    def opaque_fn(
        self, node, inputs, kind: str, fn, why: str, name=None, output=None, scores=False
    ) -> None:
        """An opaque node the core's executor can run (``fn`` in NumPy). ``name`` and
        ``output`` give a node of its own to a part of one call (the attention weights of
        an SDPA call), which never changes and maps to no site of the write-back.
        ``scores``: its output depends on its first two inputs only through ``q k^T``."""
        attrs = {"kind": kind, "why": why, "fn": fn, "channels": None, "scores": scores}
        if output is None:
            self.emit("opaque", node, inputs, rank=None, channels=None, attrs=attrs)
            return
        self.ir.add_node(
            "opaque",
            [i.name for i in inputs],
            name=self.unique(name),
            outputs=[output],
            attrs=attrs,
            handle=node.name,
        )

    def f_sdpa(self, node, fn, args, kwargs) -> None:
        """``F.scaled_dot_product_attention(q, k, v)`` becomes the attention weights
        ``P = softmax(q k^T * scale + mask)`` (opaque, run by its ``fn``) and
        ``matmul(P, v)``, which carries V's channels to the output. Nothing of it is
        written back: the model keeps its own call."""
        b = _bind(_sig_sdpa, args, kwargs)
        q, k, v = (self.data(b[n]) for n in ("query", "key", "value"))
        if b["dropout_p"] not in (0, 0.0):
            raise _Opaque(f"dropout_p={b['dropout_p']}: a random mask")
        if b["enable_gqa"] is not False:
            raise _Opaque(GQA_WHY)
        causal = b["is_causal"]
        if not isinstance(causal, bool):
            raise _Opaque("is_causal is not static")
        scale = None if b["scale"] is None else _number(b["scale"], "scale")
        mask, m = None, b["attn_mask"]
        if m is not None:
            if not (isinstance(m, fx.Node) and m.op == "get_attr"):
                raise _Opaque("attn_mask is computed, not a constant of the model")
            t = self.attr(m.target)
            if not isinstance(t, torch.Tensor):
                raise _Opaque("attn_mask is not a tensor")
            mask = t.detach().cpu().numpy()
            mask = mask.astype(np.float64) if mask.dtype != bool else mask
        ranks = {self.rank.get(t.name) for t in (q, k, v)}
        if None in ranks or len(ranks) != 1:
            raise _Opaque("q, k, v of unknown or different ranks: pass dummy_input")
        weights = f"{node.name}.weights"
        self.opaque_fn(
            node,
            [q, k],
            "attention_weights",
            _attention_weights_fn(scale, causal, mask),
            "softmax(q k^T): mixes positions",
            name=weights,
            output=weights,
            scores=True,  # a Q -> K pair where q and k come from projections
        )
        qs, ks = self.fx_shapes.get(q.name), self.fx_shapes.get(k.name)
        if qs is not None and ks is not None:  # (..., T_q, T_k)
            self.ir.values[weights].shape = (*qs[:-1], ks[-2])
        self.emit("matmul", node, [weights, v], rank=ranks.pop(), channels=None)

    def f_getitem(self, node, fn, args, kwargs) -> None:
        """``x[:, 0]``, ``x[:, 1:]``: positions of one axis (:meth:`select`); ``x[:, :,
        None]``: an axis inserted (a reshape; grouped-query attention expands it to repeat
        K / V heads); other indexing is not translated."""
        src = args[0] if args else None
        if isinstance(src, fx.Node) and src.name in self.mha and len(args) == 2:
            if args[1] == 0:
                self.mha_output(node, src)
                return
            raise _Opaque("the attention weights of nn.MultiheadAttention")
        # a tuple key: a tensor's index (``t[0]`` of a tuple of outputs is an int)
        if len(args) != 2 or not isinstance(args[1], tuple):
            raise _Opaque("not understood")
        x = self.data(src)
        rank = self.rank.get(x.name)
        if rank is None:
            raise _Opaque("an index of a tensor of unknown rank: pass dummy_input")
        key = list(args[1])
        if any(k is None for k in key):
            if not all(k is None or k is Ellipsis or k == slice(None) for k in key):
                raise _Opaque("it inserts an axis and selects positions")
            self.reshape(node, x, "it inserts an axis")
            return
        dots = [i for i, k in enumerate(key) if k is Ellipsis]
        if len(dots) > 1 or len(key) - len(dots) > rank:
            raise _Opaque("not understood")
        if dots:
            key[dots[0] : dots[0] + 1] = [slice(None)] * (rank - len(key) + 1)
        cut = [(a, k) for a, k in enumerate(key) if not (isinstance(k, slice) and k == slice(None))]
        if len(cut) != 1:
            raise _Opaque("it indexes several axes" if cut else "it indexes nothing")
        self.select(node, x, *cut[0])

    def f_select(self, node, fn, args, kwargs) -> None:
        """``torch.select(x, dim, index)``, ``x.select(dim, index)``."""
        b = _bind(_sig_select, args, kwargs)
        x = self.data(b["input"])
        rank = self.rank.get(x.name)
        if rank is None or not isinstance(b["dim"], int):
            raise _Opaque("dim or rank not static: pass dummy_input")
        self.select(node, x, b["dim"] % rank, b["index"])

    def select(self, node: fx.Node, x: fx.Node, axis: int, index) -> None:
        """Positions ``index`` (an integer or a slice of constants) of ``axis``: the core
        follows the channels through it where the axis is not theirs, and refuses it with
        the reason where it is."""
        parts = (index.start, index.stop, index.step) if isinstance(index, slice) else (index,)
        if not all(p is None or (isinstance(p, int) and not isinstance(p, bool)) for p in parts):
            raise _Opaque("its index is not a constant integer or slice")
        if isinstance(index, slice) and (index.step or 1) < 1:
            raise _Opaque("a slice with a step below 1")
        rank = self.rank[x.name] - (1 if isinstance(index, int) else 0)
        attrs = {"axis": axis, "index": index}
        self.emit("select", node, [x], rank=rank, channels=self.chan.get(x.name), attrs=attrs)

    def f_repeat_heads(self, node, fn, args, kwargs) -> None:
        """``x.repeat_interleave(n, dim)`` and ``x.expand(...)`` of one axis of size 1 (of
        an activation): a ``repeat`` of that axis, as grouped-query attention repeats its
        K / V heads (``x[:, :, None].expand(b, h, n, t, d).reshape(b, h * n, t, d)``).
        The core follows the channels through it (a channel map where it repeats them)."""
        x = args[0] if args else kwargs.get("input")
        if not isinstance(x, fx.Node) or x.name not in self.values or x.name in self.point:
            raise _Opaque("not understood")
        rank = self.rank.get(x.name)
        if fn in (torch.repeat_interleave, "repeat_interleave"):
            repeats = args[1] if len(args) > 1 else kwargs.get("repeats")
            dim = args[2] if len(args) > 2 else kwargs.get("dim")
            if kwargs.keys() - {"repeats", "dim"} or len(args) > 3:
                raise _Opaque("unexpected arguments")
            if not isinstance(repeats, int) or not isinstance(dim, int) or rank is None:
                raise _Opaque("repeats, dim or rank not static (or no dim: it flattens)")
            axis, n = dim % rank, repeats
        else:
            before, after = self.fx_shapes.get(x.name), self.fx_shapes.get(node.name)
            if before is None or after is None or len(before) != len(after):
                raise _Opaque("an expand of unknown or other rank: pass dummy_input")
            grown = [i for i, (a, b) in enumerate(zip(before, after, strict=True)) if a != b]
            if len(grown) != 1 or before[grown[0]] != 1:
                raise _Opaque("it expands other than one axis of size 1")
            axis, n = grown[0], int(after[grown[0]])
        self.emit("repeat", node, [x], rank=rank, channels=None, attrs={"axis": axis, "repeats": n})
