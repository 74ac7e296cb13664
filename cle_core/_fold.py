"""Pass: fold batch norms into adjacent layers."""

from __future__ import annotations

import numpy as np

from ._ir import Graph, Node
from ._math import bn_affine, fold_bn_input, fold_bn_output
from ._report import FoldRecord, PassResult, SkipRecord


def shared_param_owners(graph: Graph) -> dict[int, str]:
    """Nodes whose parameters are shared with another node, mapped to a description.

    Sharing is declared by equal ``param_ids`` or seen as the same array object. Such
    nodes are never modified: scaling a shared tensor for one user changes the other.
    """
    owners: dict[object, list[Node]] = {}
    for node in graph.nodes:
        for key, arr in node.params.items():
            if arr is None:
                continue
            ident = node.param_ids.get(key)
            for k in ((("id", ident),) if ident is not None else ()) + (("obj", id(arr)),):
                owners.setdefault(k, []).append(node)
    shared: dict[int, str] = {}
    for group in owners.values():
        distinct = {id(n): n for n in group}
        if len(distinct) > 1:
            names = sorted(n.name for n in distinct.values())
            for n in distinct.values():
                others = ", ".join(x for x in names if x != n.name)
                shared[id(n)] = f"{n.name} shares a parameter with {others}"
    return shared


def fold_batch_norms(graph: Graph, shared: dict[int, str]) -> PassResult:
    """Fold every batch norm that can be folded exactly.

    Output side first (``layer -> BN``, the layer's output read only by the BN); else
    input side (``BN -> layers``, every reader a Conv without zero padding or a Linear,
    reading the BN output directly). Output-side folds leave the BN's gamma and beta on
    the layer (``attrs["bn_stats"]``) for high-bias absorption.

    Returns the :class:`FoldRecord` of each fold, the BNs left alone and why, the layers
    changed and the BNs removed.
    """
    folds: list[FoldRecord] = []
    skips: list[SkipRecord] = []
    changed: set[str] = set()
    removed: list[str] = []
    for bn in [n for n in graph.nodes if n.op == "batchnorm"]:
        p = bn.params
        k, t = bn_affine(p["mean"], p["var"], bn.attrs["eps"], p.get("gamma"), p.get("beta"))
        src = bn.inputs[0]
        producer = src.producer
        why_not_output = _output_side_blocker(graph, bn, shared)
        if why_not_output is None:
            w, b = fold_bn_output(producer.weight, producer.bias, producer.layout, k, t)
            producer.params["weight"], producer.params["bias"] = w, b
            gamma = np.ones_like(k) if p.get("gamma") is None else p["gamma"].astype(np.float64)
            beta = np.zeros_like(k) if p.get("beta") is None else p["beta"].astype(np.float64)
            producer.attrs["bn_stats"] = {"gamma": gamma, "beta": beta}
            folds.append(FoldRecord(bn.name, (producer.name,), "output"))
            changed.add(producer.name)
        else:
            why_not_input = _input_side_blocker(graph, bn, shared)
            if why_not_input is not None:
                skips.append(SkipRecord("fold", bn.name, f"{why_not_output}; and {why_not_input}"))
                continue
            readers = bn.outputs[0].consumers
            for layer in readers:
                w, b = fold_bn_input(layer.weight, layer.bias, layer.layout, k, t)
                layer.params["weight"], layer.params["bias"] = w, b
                changed.add(layer.name)
            folds.append(FoldRecord(bn.name, tuple(n.name for n in readers), "input"))
        graph.bypass_node(bn)
        removed.append(bn.name)
    return PassResult(tuple(folds), tuple(skips), frozenset(changed), tuple(removed))


def _is_graph_output(graph: Graph, value) -> bool:
    return any(v is value for v in graph.outputs)


def _output_side_blocker(graph: Graph, bn: Node, shared: dict[int, str]) -> str | None:
    src = bn.inputs[0]
    producer = src.producer
    if producer is None or not producer.is_layer:
        what = "a graph input" if producer is None else f"{producer.describe()}"
        return f"its input comes from {what}, not a layer"
    if id(producer) in shared:
        return shared[id(producer)]
    if len(src.consumers) > 1 or _is_graph_output(graph, src):
        return f"the output of {producer.name} is also read elsewhere"
    return None


def _input_side_blocker(graph: Graph, bn: Node, shared: dict[int, str]) -> str | None:
    out = bn.outputs[0]
    if _is_graph_output(graph, out) or not out.uses:
        return "its output is a graph output"
    for reader, index in out.uses:
        if not reader.is_layer or index != 0:
            return f"it feeds {reader.describe()}, not a layer"
        if id(reader) in shared:
            return shared[id(reader)]
        if reader.op == "conv_transpose":
            return f"{reader.name} is a ConvTranspose (a shifted input is not a shifted output)"
        if reader.pads_input():
            return f"{reader.name} zero-pads its input (padding of a shifted input is not shifted)"
        if reader.in_channels != bn.params["mean"].size:
            return f"{reader.name} does not read the BN's channels one to one"
    return None
