"""Torch modules with a fused fast path, traced as the computation their documentation
gives: ``nn.TransformerEncoderLayer`` and ``nn.TransformerEncoder``; also
``nn.TransformerDecoderLayer`` and ``nn.TransformerDecoder`` (no fused path, but as
torch modules they were leaves, and the decoder's forward holds checks that tracing
cannot follow: ``is_nested``, a comparison with a causal mask).

Why. Traced whole, such a module is one opaque call, and a BERT-style encoder built
from them equalizes nothing inside its layers. Its slow path is documented and written
with submodules the translator knows (``nn.MultiheadAttention``, ``nn.Linear``,
``nn.LayerNorm``, dropout, the activation): traced as that, every pair inside is found,
and the write-back goes to those submodules' own parameters, which the fast path
(``torch._transformer_encoder_layer_fwd``, the encoder's nested tensors) reads too. So
the module tree is kept and the model's own ``forward`` keeps running, fast path and
all; only a GraphModule written back (where the result needs graph edits) runs the slow
path.

The forwards here are those of torch 2.x (``norm_first`` True: ``x + sa(norm1(x))``,
``x + ff(norm2(x))``; False: ``norm1(x + sa(x))``, ``norm2(x + ff(x))``; ``sa`` the
self-attention then ``dropout1``, ``ff`` = ``dropout2(linear2(dropout(act(linear1(x)))))``;
a decoder layer has the cross-attention on ``memory`` between them, after ``norm2``, and
``norm3`` / ``dropout3`` for ``ff``).
A subclass that overrides any of the methods they stand for is kept whole (a leaf: its
forward's fast-path checks are control flow that tracing cannot follow).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn


def _encoder_layer(m: nn.TransformerEncoderLayer, src, src_mask=None,
                   src_key_padding_mask=None, is_causal=False):  # fmt: skip
    def sa(x):
        x = m.self_attn(
            x,
            x,
            x,
            attn_mask=src_mask,
            key_padding_mask=src_key_padding_mask,
            need_weights=False,
            is_causal=is_causal,
        )[0]
        return m.dropout1(x)

    def ff(x):
        return m.dropout2(m.linear2(m.dropout(m.activation(m.linear1(x)))))

    x = src
    if m.norm_first:
        x = x + sa(m.norm1(x))
        return x + ff(m.norm2(x))
    x = m.norm1(x + sa(x))
    return m.norm2(x + ff(x))


def _encoder(m: nn.TransformerEncoder, src, mask=None, src_key_padding_mask=None,
             is_causal=None):  # fmt: skip
    # ``is_causal=None`` with a mask: torch compares the mask with a causal one to pass
    # the hint on; the mask itself gives the same attention, so it is passed as is.
    return _stack(
        m,
        src,
        lambda layer, x: layer(
            x, src_mask=mask, is_causal=bool(is_causal), src_key_padding_mask=src_key_padding_mask
        ),
    )


def _decoder_layer(m: nn.TransformerDecoderLayer, tgt, memory, tgt_mask=None,
                   memory_mask=None, tgt_key_padding_mask=None,
                   memory_key_padding_mask=None, tgt_is_causal=False,
                   memory_is_causal=False):  # fmt: skip
    def attend(attention, dropout, x, kv, mask, padding, causal):
        x = attention(
            x,
            kv,
            kv,
            attn_mask=mask,
            key_padding_mask=padding,
            is_causal=causal,
            need_weights=False,
        )[0]
        return dropout(x)

    def sa(x):
        return attend(m.self_attn, m.dropout1, x, x, tgt_mask, tgt_key_padding_mask,
                      tgt_is_causal)  # fmt: skip

    def mha(x):  # cross-attention: kept opaque by the translator, with the reason
        return attend(m.multihead_attn, m.dropout2, x, memory, memory_mask,
                      memory_key_padding_mask, memory_is_causal)  # fmt: skip

    def ff(x):
        return m.dropout3(m.linear2(m.dropout(m.activation(m.linear1(x)))))

    x = tgt
    if m.norm_first:
        x = x + sa(m.norm1(x))
        x = x + mha(m.norm2(x))
        return x + ff(m.norm3(x))
    x = m.norm1(x + sa(x))
    x = m.norm2(x + mha(x))
    return m.norm3(x + ff(x))


def _decoder(m: nn.TransformerDecoder, tgt, memory, tgt_mask=None, memory_mask=None,
             tgt_key_padding_mask=None, memory_key_padding_mask=None, tgt_is_causal=None,
             memory_is_causal=False):  # fmt: skip
    # tgt_is_causal=None: as in _encoder, the mask itself is passed on
    return _stack(
        m,
        tgt,
        lambda layer, x: layer(
            x,
            memory,
            tgt_mask=tgt_mask,
            memory_mask=memory_mask,
            tgt_key_padding_mask=tgt_key_padding_mask,
            memory_key_padding_mask=memory_key_padding_mask,
            tgt_is_causal=bool(tgt_is_causal),
            memory_is_causal=memory_is_causal,
        ),
    )


def _stack(m: nn.TransformerEncoder | nn.TransformerDecoder, x, call: Callable):
    """``m``'s layers one after the other (``call(layer, x)``), then its norm if any."""
    for layer in m.layers:
        x = call(layer, x)
    return x if m.norm is None else m.norm(x)


# type -> (the methods of torch's that the decomposition stands for, the decomposition)
_DECOMPOSED: dict[type, tuple[tuple[str, ...], Callable]] = {
    nn.TransformerEncoderLayer: (("forward", "_sa_block", "_ff_block"), _encoder_layer),
    nn.TransformerEncoder: (("forward",), _encoder),
    nn.TransformerDecoderLayer: (
        ("forward", "_sa_block", "_mha_block", "_ff_block"),
        _decoder_layer,
    ),
    nn.TransformerDecoder: (("forward",), _decoder),
}


def _function(m: nn.Module) -> Callable[..., Any] | None:
    """The decomposition of ``m`` (called with ``m`` first), or None where ``m`` is not
    such a module or its type overrides a method the decomposition stands for."""
    for cls, (methods, fn) in _DECOMPOSED.items():
        if isinstance(m, cls):
            if any(getattr(type(m), name) is not getattr(cls, name) for name in methods):
                return None
            return fn
    return None


def decomposition(m: nn.Module) -> Callable[..., Any] | None:
    """The documented computation of ``m`` as a function of its call's arguments, or
    None where ``m`` is not such a module or its type overrides a method of it."""
    fn = _function(m)
    return None if fn is None else lambda *args, **kwargs: fn(m, *args, **kwargs)


def root_forward(m: nn.Module) -> Callable[..., Any] | None:
    """For a model that is itself such a module: a ``forward(self, src)`` (a decoder's:
    ``forward(self, tgt, memory)``) that computes its decomposition without masks, for
    symbolic tracing, which makes a placeholder of every argument of the root's forward
    (masks and flags that tracing cannot branch on). The scales found are exact with any
    mask; a GraphModule written back takes no masks. None where ``m`` is not such a
    module."""
    fn = _function(m)
    if fn is None:
        return None
    if isinstance(m, (nn.TransformerDecoderLayer, nn.TransformerDecoder)):

        def decoder_forward(self, tgt, memory):
            return fn(self, tgt, memory)

        return decoder_forward

    def forward(self, src):
        return fn(self, src)

    return forward


def fused(m: nn.Module) -> bool:
    """Whether ``m`` is one of the modules with a fused fast path (decomposed or not)."""
    return isinstance(m, tuple(_DECOMPOSED))
