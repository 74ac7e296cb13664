"""What ``cle equalize --check`` measures, as a backend's ``compare`` returns it.

Equalization is exact up to float rounding, so an output computed through continuous
operations matches the original to 100 dB or more. An output behind a discontinuous
operation (top-k, non-maximum suppression, arg-max, a gather by computed indices ...)
can turn the last bit of a score into a different box; such an output is judged on the
float values that feed those operations instead (its probes), and its own figures are
only reported."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Probe:
    """A value measured in both models instead of a graph output: ``value`` is an input
    of the discontinuous node ``node`` (op type ``op``), or another value the output
    depends on continuously beside it. ``before`` is ``(op, SQNR dB)`` of the input of
    the saturating activation that makes ``value``, or None."""

    value: str
    op: str
    node: str
    sqnr: float
    dtype: str
    before: tuple[str, float] | None = None


@dataclass(frozen=True)
class OutputCheck:
    """One graph output of the two models compared.

    ``sqnr`` (dB; ``-inf`` when the shapes differ), ``max_abs`` and ``max_rel`` (max
    error over max ``|original|``) measure the output itself; ``shapes`` is
    ``(original, result)`` when they differ; ``differing`` is ``(elements that differ,
    elements)`` for an integer or bool output of the original's shape. ``before`` is
    ``(op, SQNR dB)`` of the input of a saturating activation (Sigmoid, Softmax ...)
    that makes the output, or None. ``probes`` are the values the output is judged on
    when it lies behind a discontinuous operation; empty, it is judged on itself."""

    name: str
    sqnr: float
    max_abs: float
    max_rel: float
    dtype: str
    before: tuple[str, float] | None = None
    probes: tuple[Probe, ...] = ()
    shapes: tuple[tuple[int, ...], tuple[int, ...]] | None = None
    differing: tuple[int, int] | None = None


def figure_passes(sqnr: float, before: tuple[str, float] | None, threshold: float) -> bool:
    """A measured value passes at ``threshold`` dB, or when it comes out of a saturating
    activation whose input (``before``) does: near saturation such an activation turns
    the float rounding of its input into a large relative error."""
    return sqnr >= threshold or (before is not None and before[1] >= threshold)


def fmt_sqnr(x: float) -> str:
    return f"{x:.2f} dB" if math.isfinite(x) else ("inf dB" if x > 0 else "-inf dB")
