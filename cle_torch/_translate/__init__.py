"""torch.fx graph -> IR.

Each FX node becomes one IR node (a mean that drops the spatial axes and a scaled
dot-product attention become two; the FX nodes of a hand-written norm one), named
after the module it calls or whose parameters it uses (``_blocks.0._depthwise_conv``),
with ``#k`` for the k-th further call of one module. ``Site`` records where it came
from, for the write-back. Anything not understood becomes an ``opaque`` node: it blocks
equalization around it, never fails it.

Shapes come from example runs of a copy of the model (``propagate``) where
``dummy_input`` or ``input_shapes`` is given; the model itself never runs. Without them,
ranks and channel counts are inferred from the layers: an input read by a Conv / BN /
pool / pad of a given dimension is taken to be batched ``(N, C, *spatial)``, and a
Linear whose input rank is not known is left opaque, so an MLP or a transformer needs
``dummy_input`` or ``input_shapes``.

The package, one module a purpose: ``translator`` holds the walk over the FX graph, the
state, emission and the dispatch (and ``capture``); the handlers it dispatches to are
grouped by kind of op, in ``layers`` (Conv, ConvTranspose, Linear, batch norm),
``elementwise`` (activations, add, mul, cat), ``shape`` (flatten, reshape, identity,
dropout), ``spatial`` (pad, pools, resize, mean), ``layout`` (transpose, reshape with
shapes, matmul, softmax, scaled dot-product attention) and ``norms`` (LayerNorm,
RMSNorm, GroupNorm and their hand-written forms). Which handler takes which module
type, function or tensor method is in the tables of ``cle_torch._optable``. A new op is a
signature and a table entry there and a handler in the module of its kind.
"""

from .translator import capture

__all__ = ["capture"]
