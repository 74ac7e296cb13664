"""torch.fx graph -> IR.

Each FX node becomes one IR node (a mean that drops the spatial axes becomes two), named
after the module it calls or whose parameters it uses (``_blocks.0._depthwise_conv``),
with ``#k`` for the k-th further call of one module. ``Site`` records where it came
from, for the write-back. Anything not understood becomes an ``opaque`` node: it blocks
equalization around it, never fails it.

No forward pass is run. Ranks and channel counts are inferred from the layers; graph
inputs get theirs from ``dummy_input`` / ``input_shapes`` when given, else an input read
by a Conv / BN / pool / pad of a given dimension is taken to be batched
``(N, C, *spatial)``. A Linear whose input is not known to be ``(N, features)`` (the IR's
convention) is left opaque, so an MLP needs ``dummy_input`` or ``input_shapes``.

The package, one module a purpose: ``translator`` holds the walk over the FX graph, the
state, emission and the dispatch (and ``capture``); the handlers it dispatches to are
grouped by kind of op, in ``layers`` (Conv, ConvTranspose, Linear, batch norm),
``elementwise`` (activations, add, mul, cat), ``shape`` (flatten, reshape, identity,
dropout) and ``spatial`` (pad, pools, resize, mean). Which handler takes which module
type, function or tensor method is in the tables of ``cle_torch._optable``. A new op is a
signature and a table entry there and a handler in the module of its kind.
"""

from .translator import capture

__all__ = ["capture"]
