"""Pass: high-bias absorption.

For a layer whose output-side BN was folded and that feeds a ReLU-like activation, the
part ``c = max(0, beta - sigmas * |gamma|)`` of every channel is moved out of its bias
into the layers that read the activation. The exact form also lowers the activation's
lower bound by ``c`` (``clip(x, 0, u) = clip(x - c, -c, u - c) + c``); the classic form
keeps it at 0 and is inexact wherever a pre-activation falls below ``c``.
"""

from __future__ import annotations

import numpy as np

from ._ir import Graph, Node, Value
from ._math import absorb_high_bias, classic_hba_error, high_bias_amount, shift_bounds
from ._report import EqualizeOptions, HighBiasRecord, PassResult, SkipRecord

_TRANSPARENT = frozenset({"identity", "dropout"})
# Ops between the activation and the next layer that commute with a per-channel shift.
_SHIFT_COMMUTES = frozenset({"identity", "dropout", "maxpool", "global_avgpool"})


def _single_reader(graph: Graph, value: Value) -> Node | None:
    if any(v is value for v in graph.outputs) or len(value.uses) != 1:
        return None
    return value.uses[0][0]


def _activation_after(graph: Graph, layer: Node) -> tuple[Node | None, str]:
    value = layer.outputs[0]
    while True:
        reader = _single_reader(graph, value)
        if reader is None:
            return None, f"the output of {layer.name} has several readers"
        if reader.op in _TRANSPARENT:
            value = reader.outputs[0]
            continue
        if reader.op == "relu":
            return reader, ""
        if reader.op == "clip" and np.all(np.asarray(reader.params["lo"]) == 0):
            return reader, ""
        return None, f"{layer.name} feeds {reader.describe()}, not a ReLU-like activation"


def _following_layers(graph: Graph, act: Node, shared: dict[int, str]):
    """Layers that read the activation, as ``(layer, repeat)``, plus the reasons the
    absorption would be inexact, or a blocking reason."""
    found: list[tuple[Node, int]] = []
    inexact: list[str] = []
    channels = act.outputs[0].channels
    stack = [(act.outputs[0], 1)]
    while stack:
        value, repeat = stack.pop()
        if any(v is value for v in graph.outputs):
            return [], [], f"{value.name!r} is a graph output"
        for reader, index in value.uses:
            op = reader.op
            if reader.is_layer and index == 0:
                if id(reader) in shared:
                    return [], [], shared[id(reader)]
                if op == "conv_transpose":
                    return (
                        [],
                        [],
                        f"{reader.name} is a ConvTranspose (a constant input does "
                        "not give a constant output)",
                    )
                if op == "linear" and repeat == 1 and reader.in_channels != channels:
                    return [], [], f"{reader.name} does not read the channels one to one"
                if reader.pads_input():
                    inexact.append(f"{reader.name} zero-pads its input")
                found.append((reader, repeat))
            elif op in _SHIFT_COMMUTES:
                stack.append((reader.outputs[0], repeat))
            elif op == "avgpool":
                if reader.attrs.get("count_include_pad") and any(reader.attrs.get("pads", ())):
                    inexact.append(f"{reader.name} averages zero padding")
                stack.append((reader.outputs[0], repeat))
            elif op == "pad":
                inexact.append(f"{reader.name} zero-pads the activation")
                stack.append((reader.outputs[0], repeat))
            elif op == "flatten" and repeat == 1 and channels:
                stack.append((reader.outputs[0], -1))
            else:
                return [], [], f"the activation is read by {reader.describe()}"
    resolved = []
    for layer, repeat in found:
        if repeat == -1:  # behind a Flatten: channel c is in_features / channels features
            if layer.op != "linear" or layer.in_channels % channels:
                return [], [], f"{layer.name} does not read whole flattened channels"
            repeat = layer.in_channels // channels
        resolved.append((layer, repeat))
    if not resolved:
        return [], [], "no layer reads the activation"
    return resolved, inexact, None


def absorb_high_biases(
    graph: Graph, options: EqualizeOptions, shared: dict[int, str]
) -> PassResult:
    """Absorb high biases where allowed by ``options``."""
    records: list[HighBiasRecord] = []
    skips: list[SkipRecord] = []
    changed: set[str] = set()
    exact_form = options.high_bias_form == "exact"
    for layer in [n for n in graph.nodes if n.is_layer and "bn_stats" in n.attrs]:
        if id(layer) in shared:
            skips.append(SkipRecord("high_bias", layer.name, shared[id(layer)]))
            continue
        act, why = _activation_after(graph, layer)
        if act is None:
            skips.append(SkipRecord("high_bias", layer.name, why))
            continue
        following, inexact, blocker = _following_layers(graph, act, shared)
        if blocker is not None:
            skips.append(SkipRecord("high_bias", layer.name, blocker))
            continue
        if inexact and not options.high_bias_through_padding:
            skips.append(
                SkipRecord(
                    "high_bias",
                    layer.name,
                    f"inexact: {inexact[0]} (enable high_bias_through_padding to allow)",
                )
            )
            continue
        if exact_form and not options.deployment.weights_only:
            # The shift lowers each channel's bound by its own amount: the activation
            # grids, one per tensor, then span the union of the shifted ranges, wider
            # than before, and a bound that was one number becomes a Max that the
            # quantizer does not merge into the layer (a second grid). Measured on
            # EfficientNet-Lite0 with onnxruntime: W8A8 -0.6 dB, W8 +0.2 dB. With float
            # activations only the weight noise it saves counts.
            skips.append(
                SkipRecord(
                    "high_bias",
                    layer.name,
                    "the shift would widen the activation grids of the deployment "
                    "(absorbed for weights-only deployments)",
                )
            )
            continue
        channels = layer.out_channels
        if act.op == "relu":
            lo, hi = np.zeros(channels), np.full(channels, np.inf)
        else:
            lo = np.broadcast_to(np.asarray(act.params["lo"], np.float64), (channels,))
            hi = np.broadcast_to(np.asarray(act.params["hi"], np.float64), (channels,))
        stats = layer.attrs["bn_stats"]
        c = high_bias_amount(stats["beta"], stats["gamma"], lo, hi, options.high_bias_sigmas)
        if not np.any(c > 0):
            skips.append(SkipRecord("high_bias", layer.name, "no channel has a high bias"))
            continue
        new_b1, new_b2 = absorb_high_bias(
            layer.bias, c, [(n.weight, n.bias, n.layout, r) for n, r in following]
        )
        layer.params["bias"] = new_b1
        for (node, _), b2 in zip(following, new_b2, strict=True):
            node.params["bias"] = b2
            changed.add(node.name)
        new_lo, new_hi = shift_bounds(lo, hi, c, exact=exact_form)
        act.op = "clip"
        act.params["lo"], act.params["hi"] = new_lo, new_hi
        layer.attrs["bn_stats"] = {"gamma": stats["gamma"], "beta": stats["beta"] - c}
        changed.update((layer.name, act.name))
        reasons = list(inexact)
        err = rel = None
        if not exact_form:
            reasons.insert(0, "classic form: pre-activations below the shift change")
            e, mean_act = classic_hba_error(stats["beta"], stats["gamma"], c)
            err = float(e.mean())
            rel = float(e.sum() / mean_act.sum()) if mean_act.sum() > 0 else None
        records.append(
            HighBiasRecord(
                layer=layer.name,
                activation=act.name,
                into=tuple(n.name for n, _ in following),
                form=options.high_bias_form,
                exact=not reasons,
                inexact_because=tuple(reasons),
                absorbed=c,
                expected_error=err,
                relative_error=rel,
            )
        )
    return PassResult(tuple(records), tuple(skips), frozenset(changed))
