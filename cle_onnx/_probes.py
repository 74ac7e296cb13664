"""Where ``--check`` measures an ONNX model: each graph output, or, for an output behind
a discontinuous operation, the values before it that are still continuous functions of
the model's inputs (see :func:`find_probes`)."""

from __future__ import annotations

import onnx
from onnx import TensorProto

# Input positions at which an op jumps: a change in the last bit there can change the
# output by a whole element (another index, another box, another integer). ``None``: at
# every input. Positions not listed are continuous (a Gather's data, a Where's branches).
DISCONTINUOUS: dict[str, tuple[int, ...] | None] = {
    "TopK": None,
    "NonMaxSuppression": None,
    "ArgMax": None,
    "ArgMin": None,
    "Gather": (1,),
    "GatherElements": (1,),
    "GatherND": (1,),
    "ScatterElements": (1,),
    "ScatterND": (1,),
    "OneHot": (0, 1),
    "Slice": (1, 2, 3, 4),
    "Less": None,
    "LessOrEqual": None,
    "Greater": None,
    "GreaterOrEqual": None,
    "Equal": None,
    "Where": (0,),
    "Round": None,
    "Floor": None,
    "Ceil": None,
    "Sign": None,
    "Mod": None,
    "NonZero": None,
    "Unique": None,
    "QuantizeLinear": (0,),
    "If": (0,),
    "Loop": (0, 1),
}

_FLOAT_TYPES = frozenset(
    {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.BFLOAT16}
)
# Outputs that depend on their input's shape only, not on its values.
_SHAPE_ONLY = frozenset({"Shape", "Size"})


def _jump_inputs(node: onnx.NodeProto) -> list[str]:
    """The values at which ``node`` is discontinuous: its inputs at the positions of
    :data:`DISCONTINUOUS`, and everything an If or Loop reads when its body holds a
    discontinuous op itself."""
    if node.op_type == "Cast":
        to = next((a.i for a in node.attribute if a.name == "to"), TensorProto.FLOAT)
        return [] if to in _FLOAT_TYPES else [node.input[0]]
    names = []
    if node.domain in ("", "ai.onnx") and node.op_type in DISCONTINUOUS:
        positions = DISCONTINUOUS[node.op_type]
        names = [u for i, u in enumerate(node.input) if u and (positions is None or i in positions)]
    if any(_jump_inputs(n) for g in _subgraphs(node) for n in g.node):
        names += _inputs(node)
    return names


def _outer_names(graph: onnx.GraphProto) -> list[str]:
    """The names that ``graph`` (the body of an If, Loop or Scan) reads from the graphs
    around it."""
    inner = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    names = []
    for node in graph.node:
        for u in [*node.input, *(n for g in _subgraphs(node) for n in _outer_names(g))]:
            if u and u not in inner:
                names.append(u)
        inner.update(node.output)
    return list(dict.fromkeys(names))


def _subgraphs(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    return [g for a in node.attribute for g in ([a.g] if a.HasField("g") else a.graphs)]


def _inputs(node: onnx.NodeProto) -> list[str]:
    """The values ``node`` reads: its inputs, then those its bodies read from around."""
    return [*node.input, *(n for g in _subgraphs(node) for n in _outer_names(g))]


def find_probes(graph: onnx.GraphProto) -> dict[str, list[tuple[str, str, str]]]:
    """For each graph output behind a discontinuous operation (see
    :data:`DISCONTINUOUS`; a Cast to an integer or bool type too): the values it is
    judged on, as ``(value, op, node)``, where ``value`` is an input of the node
    ``node`` (op type ``op``) met on the way back from the output. An output with no
    discontinuous operation among its ancestors is missing from the result (it is
    judged on itself).

    The values are the latest points that are still continuous functions of the model's
    inputs: walking back from the output through every value that has a discontinuous
    operation among its ancestors, the walk stops at the first values that have none.
    Constants (initializers, Constant nodes, values computed from constants or from
    shapes alone) and graph inputs (fed the same to both models) are never probes. The
    values that the body of an If or Loop reads from the graph count as its inputs."""
    constant = {t.name for t in graph.initializer} | {""}
    inputs = {i.name for i in graph.input} - constant
    producer: dict[str, onnx.NodeProto] = {}
    tainted: set[str] = set()
    for node in graph.node:
        for out in node.output:
            producer[out] = node
        ins = [u for u in _inputs(node) if u]
        if all(u in constant for u in ins) or (
            node.op_type in _SHAPE_ONLY and not any(u in tainted for u in ins)
        ):
            constant.update(node.output)
            continue
        jump = any(u not in constant for u in _jump_inputs(node))
        if jump or any(u in tainted for u in ins):
            tainted.update(node.output)
    probes = {}
    for out in graph.output:
        if out.name not in tainted:
            continue
        found: dict[str, tuple[str, str, str]] = {}
        seen = {out.name}
        stack = [out.name]
        while stack:
            node = producer[stack.pop()]
            label = node.name or node.output[0]
            deeper = []
            for u in _inputs(node):
                if u in seen or u in constant or u in inputs:
                    continue
                seen.add(u)
                if u in tainted:
                    deeper.append(u)
                elif u in producer:
                    found[u] = (u, node.op_type, label)
            stack.extend(reversed(deeper))  # the first input's ancestors first
        probes[out.name] = list(found.values())
    return probes
