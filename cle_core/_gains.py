"""How much noise added at each channel of each value reaches the graph outputs,
estimated from the weights alone.

Noise added at a channel has two parts that travel differently. A part that is the same
at every position (what a weight error does to a layer's output: a per-channel offset
wherever the input is active) passes through pooling and the network like a signal; it
is tracked as the Jacobian of the outputs with respect to a uniform offset of the
channel, projected on ``R`` random output directions (``J``, an ``R x C`` matrix per
value, whose squared column norms estimate the gain). A part that changes from position
to position (rounding noise of activations, the gating of a ReLU) is tracked as a sum
of squared derivatives over positions (``G``), propagated as if independent. Both start
at the outputs, where every element counts once, and go backwards:

- a layer maps ``J`` through the kernel sums and ``G`` through the squared weights;
- an activation (hard-swish and hard-sigmoid too, and a product with a gate whose
  statistics are known) multiplies ``J`` by the mean of its derivative and ``G`` by its mean
  square, and turns the uniform part's fluctuating gating into ``G``
  (``d(1 - d) |J|^2 / positions`` for a 0/1 derivative);
- a global average pool divides ``G`` by the positions it averages;
- a residual Add sends both to every summand; a value read twice sums them.

The gain of channel ``c`` of value ``v`` is then ``|J_c|^2 / positions + G_c`` for noise
that is independent between positions and ``|J_c|^2 + G_c`` for a layer's weight noise
(uniform over positions).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from ._ir import PASSTHROUGH_OPS, SCALABLE_ACTIVATIONS, Graph
from ._math import LastKernelSums, grouped_view
from ._stats import Derivative

PROJECTIONS = 16
"""Random output directions of ``J``: gains are estimated to about ``1/sqrt(16)``."""


FLOOR = 0.1
"""Where activations are rounded, every channel keeps at least this fraction of its
tensor's mean gain (or energy) (:attr:`Gains.floor`). The estimates are linearizations: a
channel whose activation is saturated or dead passes no small noise, but 8-bit rounding
is not small for a channel scaled far below the rest, and such a channel must not be
given away. The noise objective sets no floor for weights-only deployments, which round
no activation: there the floor only made the estimate of one function depend on how its
weights are scaled (a tenth of the mean is not a tenth after rescaling: on
``bench_deployments.py``'s functional/2 the balanced scales were estimated 34.6 dB from
the original graph and 37.5 dB from the balanced one, 38.1 both ways without it).
Without it in W8A8 deployments too, the bias correction's gain over the scales fell
(Lite0 per tensor W8A8 +0.93 -> +0.20 dB; exporter-folded +0.62 -> -0.42): kept there."""


@dataclass(frozen=True, eq=False)
class Gains:
    """Per value name: ``uniform`` (``|J_c|^2``) and ``fluctuating`` (``G_c``) gains."""

    uniform: dict[str, np.ndarray]
    fluctuating: dict[str, np.ndarray]
    floor: float = FLOOR

    def weight_gain(self, name: str, channels: int) -> np.ndarray:
        """Gain of noise that is uniform over positions (a layer's weight noise)."""
        return self.rounding_gain(name, channels, 1)

    def rounding_gain(self, name: str, channels: int, positions: int) -> np.ndarray:
        """Gain of noise independent between positions (activation rounding). A value no
        gain reached (behind an op the gains do not pass, such as attention's ``Q K^T``)
        gets the mean gain of those reached: a neutral guess in the units of the rest (1
        would be in the units of the raw output, thousands of times the others on a
        transformer)."""
        u = self.uniform.get(name)
        if u is None or u.shape[0] != channels:
            return np.full(channels, self.typical)
        return floored(u / max(positions, 1) + self.fluctuating[name], self.floor)

    @cached_property
    def typical(self) -> float:
        """The mean over values of their mean uniform gain (1 where none is known)."""
        means = [float(u.mean()) for u in self.uniform.values() if u.size]
        return float(np.mean(means)) if means else 1.0


def floored(x: np.ndarray, floor: float = FLOOR) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return x + floor * float(x.mean()) if x.size and floor else x


def propagate(
    graph: Graph,
    positions: Mapping[str, int],
    derivatives: Mapping[str | tuple[str, int], Derivative],
    output_power: Mapping[str, float] | None = None,
    projections: int = PROJECTIONS,
    seed: int = 0,
    outputs: list | None = None,
    kernel_sums: LastKernelSums | None = None,
) -> Gains:
    """Gains of every value of ``graph`` (after BN folding). ``output_power`` weighs each
    output by ``1 / power`` (so that the total is a noise-to-signal ratio summed over
    outputs); default 1. ``outputs``: the values the gains are measured at (default: the
    graph outputs). ``kernel_sums``: shared with :func:`cle_core._stats.estimate` by a
    caller that runs both."""
    sums = kernel_sums or LastKernelSums()
    rng = np.random.default_rng(seed)
    jac: dict[str, np.ndarray] = {}
    fluct: dict[str, np.ndarray] = {}

    def add(name: str, j: np.ndarray, g: np.ndarray) -> None:
        if name in jac and jac[name].shape == j.shape:
            jac[name] = jac[name] + j
            fluct[name] = fluct[name] + g
        else:
            jac[name], fluct[name] = j, g

    for out in graph.outputs if outputs is None else outputs:
        c = out.channels
        if not c:
            continue
        p = positions.get(out.name, 1)
        w = 1.0 / max((output_power or {}).get(out.name, 1.0), 1e-300)
        # every output element counts once: a uniform offset moves p elements
        j = rng.standard_normal((projections, c)) * np.sqrt(w * p / projections)
        add(out.name, j, np.full(c, w * (p - 1.0)))

    for node in reversed(graph.nodes):
        out = node.outputs[0] if node.outputs else None
        if out is None or out.name not in jac or not node.inputs:
            continue
        j, g = jac[out.name], fluct[out.name]
        x = node.inputs[0]
        op = node.op
        if node.is_layer:
            w = np.asarray(node.weight)
            groups, og, ig, _ = grouped_view(w, node.layout).shape
            jin, gin = np.empty((j.shape[0], groups, ig)), np.empty((groups, ig))
            # einsum, not a BLAS product: multithreaded OpenBLAS was 1-6x slower than
            # einsum on a loaded 2-core machine (4x faster on one thread).
            for cols, ksum, ksq in sums.slices(w, node.layout, axis=2):
                jin[:, :, cols] = np.einsum("rgo,goi->rgi", j.reshape(-1, groups, og), ksum)
                gin[:, cols] = np.einsum("go,goi->gi", g.reshape(groups, og), ksq)
            add(x.name, jin.reshape(j.shape[0], -1), gin.reshape(-1))
        elif op == "mul" and (node.name, 0) in derivatives:
            # x * gate: noise on each input passes times the other
            for slot, v in enumerate(node.inputs):
                d = derivatives[(node.name, slot)]
                made = np.maximum(d.meansq - d.mean**2, 0.0) * (j * j).sum(axis=0)
                add(v.name, j * d.mean, g * d.meansq + made / max(positions.get(out.name, 1), 1))
        elif node.name in derivatives:
            d = derivatives[node.name]
            made = np.maximum(d.meansq - d.mean**2, 0.0) * (j * j).sum(axis=0)
            add(x.name, j * d.mean, g * d.meansq + made / max(positions.get(out.name, 1), 1))
        elif op in SCALABLE_ACTIVATIONS:
            add(x.name, j * 0.5, g * 0.5)  # nothing known: half the inputs pass
        elif op == "norm":
            # no statistics of its input (behind an op the estimate cannot follow): a
            # unit derivative, channel for channel, rather than no gain upstream at all
            add(x.name, j, g)
        elif op == "batchnorm":
            p = node.params
            k = (1.0 if p.get("gamma") is None else p["gamma"]) / np.sqrt(
                p["var"] + node.attrs["eps"]
            )
            add(x.name, j * k, g * k * k)
        elif op == "add":
            for v in node.inputs:
                add(v.name, j, g)
        elif op == "concat":
            off = 0
            for v in node.inputs:
                c = v.channels or 0
                add(v.name, j[:, off : off + c], g[off : off + c])
                off += c
        elif op == "slice" and x.channels:
            off = int(node.attrs["offset"])
            jin = np.zeros((j.shape[0], x.channels))
            gin = np.zeros(x.channels)
            jin[:, off : off + j.shape[1]] = j
            gin[off : off + len(g)] = g
            add(x.name, jin, gin)
        elif (
            node.attrs.get("channel_map") is not None
            and x.channels
            and j.shape[1] == len(node.attrs["channel_map"])
        ):
            # copies of channels: each input channel gets what reaches all its copies
            index = node.attrs["channel_map"]
            jin, gin = np.zeros((j.shape[0], x.channels)), np.zeros(x.channels)
            np.add.at(jin, (slice(None), index), j)
            np.add.at(gin, index, g)
            add(x.name, jin, gin)
        elif op == "mul" and "factor" in node.params and out.channels:
            a = np.asarray(node.params["factor"], np.float64).reshape(-1)
            add(x.name, j * a, g * a * a)
        elif op == "global_avgpool":
            add(x.name, j, g / max(positions.get(x.name, 1), 1))
        elif op == "avgpool":
            kernel = int(np.prod(node.attrs.get("kernel", (1,))))
            add(x.name, j, g / max(kernel, 1))
        elif op == "flatten" and x.channels and j.shape[1] % x.channels == 0:
            rep = j.shape[1] // x.channels  # channel-major: features to channels
            add(
                x.name,
                j.reshape(j.shape[0], x.channels, rep).sum(axis=2),
                g.reshape(x.channels, rep).sum(axis=1),
            )
        elif op in PASSTHROUGH_OPS or op == "flatten":
            add(x.name, j, g)
        else:  # opaque: assume it passes what it gets, channel for channel
            for v in node.inputs:
                if v.channels == j.shape[1]:
                    add(v.name, j, g)
    return Gains({k: (v * v).sum(axis=0) for k, v in jac.items()}, fluct)
