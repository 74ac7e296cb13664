"""ONNX -> IR translation, one module per purpose: ``proto`` (reading protos: tensors,
element types, shapes, subgraphs), ``constants`` (constant folding), ``shapes`` (shape
arithmetic of the handlers), ``reader`` (the reader's state, lookups and dispatch, and
:func:`to_ir`), and the op handlers by kind in ``ops_layers``, ``ops_elementwise``,
``ops_spatial`` and ``ops_channels``."""

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
