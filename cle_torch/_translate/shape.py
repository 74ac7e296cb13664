"""Ops that keep the values and change the shape or nothing: flatten, a reshape to
``(batch, -1)``, identity, dropout in eval mode.

A mixin of ``_Translator`` (``translator.py``): its methods use the translator's state
and helpers.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from .._optable import (
    _bind,
    _Opaque,
    _sig_dropout,
    _sig_flatten,
    _sig_reshape,
    _sig_self,
    _sig_view,
)


class Shape:
    # --- module calls --------------------------------------------------------------------
    def m_identity(self, node, m, base, x) -> None:
        self.unary(node, x, "identity", alias=True)

    def m_dropout(self, node, m, base, x) -> None:
        self.unary(node, x, "dropout", alias=True)

    def m_flatten(self, node, m, base, x) -> None:
        self.flatten(node, x, m.start_dim, m.end_dim)

    # --- flatten, reshape, identity, dropout ---------------------------------------------
    def flatten(self, node, x, start_dim, end_dim) -> None:
        rank = self.rank.get(x.name)
        if start_dim != 1 or not (end_dim == -1 or (rank is not None and end_dim == rank - 1)):
            raise _Opaque(
                f"start_dim={start_dim}, end_dim={end_dim}: not a flatten from axis 1 to the end"
            )
        if rank is not None and rank < 2:
            raise _Opaque("input of rank < 2")
        pooled = x.name in self.point  # (N, C, 1, ...) -> (N, C): still one value per channel
        channels = self.chan.get(x.name) if pooled else None
        self.emit("flatten", node, [x], rank=2, channels=channels, alias=x)
        if pooled:
            self.point.add(node.name)

    def f_flatten(self, node, fn, args, kwargs) -> None:
        b = _bind(_sig_flatten, args, kwargs)
        x = self.data(b["input"])
        try:
            self.flatten(node, x, b["start_dim"], b["end_dim"])
        except _Opaque as why:
            if b["start_dim"] in (0, -self.fx_rank(x)):
                raise  # the batch axis merged with others
            self.reshape(node, x, str(why))

    def fx_rank(self, x) -> int:
        shape = self.fx_shapes.get(x.name)
        return -1 if shape is None else len(shape)

    def f_reshape(self, node, fn, args, kwargs) -> None:
        if fn in ("view", "reshape"):
            b = _bind(_sig_view, args, kwargs)
            shape = b["shape"]
            if len(shape) == 1 and isinstance(shape[0], (tuple, list, torch.Size)):
                shape = tuple(shape[0])
        else:
            b = _bind(_sig_reshape, args, kwargs)
            shape = b["shape"]
        x = self.data(b["input"])
        try:
            self.flatten_reshape(node, x, shape)
        except _Opaque as why:
            if x.name in self.point:
                raise  # a gate's way back to a feature map's rank (see ``opaque``)
            self.reshape(node, x, str(why))

    def flatten_reshape(self, node, x, shape) -> None:
        if not isinstance(shape, (tuple, list)) or len(shape) != 2:
            raise _Opaque("not a reshape to (N, -1)")
        # (N, C, 1, ...) -> (N, C), written with the channel count: a flatten as well
        pooled = x.name in self.point and (
            isinstance(shape[1], fx.Node) or shape[1] == self.chan.get(x.name)
        )
        if not (shape[1] == -1 or pooled) or not self.is_batch_size(shape[0]):
            raise _Opaque("not a reshape to (batch, -1)")
        self.flatten(node, x, 1, -1)

    def f_identity(self, node, fn, args, kwargs) -> None:
        self.unary(node, self.data(_bind(_sig_self, args, kwargs)["input"]), "identity", alias=True)

    def f_dropout(self, node, fn, args, kwargs) -> None:
        b = _bind(_sig_dropout, args, kwargs)
        if b["training"] is not False:
            raise _Opaque(f"training={b['training']}: a random mask")
        self.unary(node, self.data(b["input"]), "dropout", alias=True)
