"""ONNX -> IR translation, one module per purpose: ``proto`` (reading protos: tensors,
element types, shapes, subgraphs), ``constants`` (constant folding), ``shapes`` (shape
arithmetic of the handlers), ``layouts`` (which axis holds each value's channels),
``reader`` (the reader's state, lookups and dispatch, and :func:`to_ir`), and the op
handlers by kind in ``ops_layers``, ``ops_elementwise``, ``ops_spatial``,
``ops_channels``, ``ops_layout`` (Transpose, attention's MatMul, Softmax ...) and
``ops_norms`` (LayerNorm, RMSNorm, GroupNorm and their written-out forms)."""

from .proto import default_opset, has_subgraph, np_dtype, outer_reads, subgraphs
from .reader import Translation, restore, to_ir

__all__ = [
    "Translation",
    "default_opset",
    "has_subgraph",
    "np_dtype",
    "outer_reads",
    "restore",
    "subgraphs",
    "to_ir",
]
