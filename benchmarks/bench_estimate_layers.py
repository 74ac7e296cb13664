"""The noise estimate term by term: each layer's weights and each activation grid,
estimated and measured.

``bench_deployments.py`` compares the estimate's total with onnxruntime's figure; this
benchmark opens the total up. For each network and deployment it takes the noise
objective's scales (``ours``) and no scaling (``none``: batch norms folded), and

- weights-only deployments (W8, W8/ch), for every layer the quantizer rounds: ``est``,
  the layer's weight term of the noise estimate (``Estimate.weight_values``), a
  noise-to-signal ratio of the graph output; ``meas``, that layer's weights alone put on
  the deployment's grid (``cle_core.quality.weights_on_grid``, onnxruntime's grid bit
  for bit), every other weight and activation in float, run by onnxruntime after
  ``quant_pre_process`` as ``cle evaluate`` does: the output's error power over its
  power on the evaluation inputs;
- W8A8 deployments, for every activation grid: ``est``, the grid's term
  (``Estimate.activation_values``); ``meas``, ``quantize_static``'s QDQ model
  (calibrated on the calibration images, as ``cle evaluate --calibration``) with that
  grid alone, the weights and every other grid in float (a grid that did a merged Relu's
  or Clip's job gives that node back). Grids are matched by ONNX tensor name; a grid on
  one side only counts 0 on the other. The measured error with every grid at once is
  printed too (the grids' errors need not add: two grids of one scale on one tensor
  round once).

Per network it prints the ratio ``meas / est`` (dB, median, range and interquartile
range, at no scaling; positive: the estimate is optimistic) and its median at ours,
the rank correlation of the two over the terms, how often the estimate calls the right
direction where the measured change from none to ours is larger than 1 dB, the sums,
and the median ratio per kind (layers: the first, depthwise, on one position such as a
squeeze-and-excitation FC, the rest; grids: input, pre_bound (before a clip's
per-channel bounds), tensor, output...). ``--layers`` prints every term.

Networks: ``lite0`` and ``lite0_bn`` (EfficientNet-Lite0, TorchScript export: batch norms
folded by the exporter, so without statistics, or kept), ``trained_cnn``
(``bench_other_networks.py``'s, seed 0), and every ``.onnx`` file of ``--folder`` (the
PyPI models of ``bench_pypi_models.py``: its input sizes and images).

``--by-image`` instead measures Lite0's W8A8 activation grids on all 120 images and prints
them per sample image, with the graph input's grid alone (see :func:`by_image`).

Run: ``python benchmarks/bench_estimate_layers.py [--networks lite0 trained_cnn]
[--folder DIR] [--images N] [--deployments W8 W8A8 ...] [--layers]``, or
``--by-image --networks lite0_bn``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the tests package
import bench_deployments as bd  # noqa: E402
import bench_pypi_models as pypi  # noqa: E402

import cle_onnx  # noqa: E402
from cle_core import Deployment, ScaleOutcome, objective_names, register_objective  # noqa: E402
from cle_core._objectives import get_objective  # noqa: E402
from cle_core._objectives.noise import problem_estimate  # noqa: E402
from cle_core._stats import positions  # noqa: E402
from cle_core.quality import weights_on_grid  # noqa: E402
from cle_onnx._calibrate import data_inputs  # noqa: E402
from cle_onnx._evaluate import (  # noqa: E402
    prepared,
    rounded_weights,
    run,
    static_quantized,
    weight_axis,
    weights_quantized,
)

DEPLOYMENTS = {
    "W8": Deployment(activation_bits=None),
    "W8/ch": Deployment(activation_bits=None, per_channel=True),
    "W8A8": Deployment(),
    "W8A8/ch": Deployment(per_channel=True),
}


class Recorded:
    """The noise objective's scales (or, with ``base`` None, no scaling), recording each
    layer's estimated weight noise at them, ``(name, weight shape, kind, value)``, and
    each activation grid's (see :func:`grid_name`)."""

    name = "layers-for-bench"
    description = "the noise objective's scales, recorded layer by layer"
    base: str | None = "noise"
    layers: list = []
    grids: list = []  # (ONNX tensor name, kind, estimated noise) per activation point

    def choose(self, problem):
        if self.base is None:
            out = ScaleOutcome({r.id: np.ones(r.size) for r in problem.regions}, 0, True, 0.0)
        else:
            out = get_objective(self.base).choose(problem)
        est = problem_estimate(problem)
        counts = positions(problem.graph)
        scales = [out.scales[r.id] for r in problem.regions]
        first = est.weights[0].node if est.weights else None
        self.layers = []
        for term, value in zip(est.weights, est.weight_values(scales), strict=True):
            node = term.node
            if node is first:
                kind = "first"
            elif counts.get(node.inputs[0].name, 1) == 1 and node.op == "conv":
                kind = "one position"
            elif term.groups > 1 and term.ig == 1:
                kind = "depthwise"
            else:
                kind = "other"
            self.layers.append((node.name, tuple(np.shape(node.weight)), kind, float(value)))
        self.grids = []
        ends = {v.name: "output" for v in problem.graph.outputs}
        ends.update({v.name: "input" for v in problem.graph.inputs})
        for term, value in zip(est.activations, est.activation_values(scales), strict=True):
            name, kind = grid_name(term.point)
            self.grids.append((name, ends.get(name, kind), float(value)))
        return out


def grid_name(point) -> tuple[str, str]:
    """The ONNX tensor ``quantize_static`` rounds for an estimate's activation point, and
    the point's kind. A grid before a clip's per-channel bounds is at the clip's output:
    onnxruntime merges the (scalar) clip into the layer before it (the written-back graph
    names that scalar clip's output ``<clip output>_clip`` where per-channel bounds
    follow: see :func:`grids_matched`); a requantized pool's point is named after its
    value."""
    if point.kind == "pre_bound":
        return point.clip.outputs[0].name, "pre_bound"
    return point.value.name.split("::")[0], point.kind


def grids_alone(
    model: onnx.ModelProto,
    images,
    calib,
    dep: Deployment,
    only=None,
    per_image: bool = False,
    quantized: onnx.ModelProto | None = None,
) -> tuple[dict, float]:
    """Per activation grid ``quantize_static`` puts in ``model`` (calibrated on
    ``calib``, MinMax, ``dep``'s activation grid): the output's error power over its
    power on ``images`` with that grid alone, weights in float; and with every grid.
    ``only``: the names of the grids to measure alone (default: all); ``per_image``:
    each figure per image (the error power of each image over the mean power), their
    mean being the figure. ``quantized``: ``static_quantized(prepared(model), calib,
    deployment=dep)`` where the caller has it (not changed)."""
    model = prepared(model)
    reference = run(model, images).astype(np.float64)
    power = float(np.mean(reference**2))
    q = onnx.ModelProto()
    q.CopyFrom(quantized or static_quantized(model, calib, deployment=dep))
    floats = {t.name: t for t in model.graph.initializer}
    have = {t.name for t in q.graph.initializer}
    kept = []
    for node in q.graph.node:  # weights and biases back in float
        if node.op_type == "DequantizeLinear" and node.input[0] in have:
            out = node.output[0]
            names = (out, out.removesuffix("_DequantizeLinear_Output"))
            src = next(floats[n] for n in names if n in floats)
            tensor = onnx.TensorProto()
            tensor.CopyFrom(src)
            tensor.name = out
            q.graph.initializer.append(tensor)
        else:
            kept.append(node)
    del q.graph.node[:]
    q.graph.node.extend(kept)
    nodes = list(q.graph.node)
    made = {o: i for i, n in enumerate(nodes) for o in n.output}
    pairs = [  # (rounded tensor, its grid's output, index of the Q node, of the DQ node)
        (nodes[made[n.input[0]]].input[0], n.output[0], made[n.input[0]], i)
        for i, n in enumerate(nodes)
        if n.op_type == "DequantizeLinear"
        and n.input[0] in made
        and nodes[made[n.input[0]]].op_type == "QuantizeLinear"
    ]
    # A grid turned off passes its tensor on; where onnxruntime let it do a merged Relu's
    # or Clip's job (that node is gone, the grid clips), the node is put back.
    was = {o: n for n in model.graph.node for o in n.output}
    bounds = {i for n in model.graph.node if n.op_type == "Clip" for i in n.input[1:]}
    bounds -= {t.name for t in q.graph.initializer}
    q.graph.initializer.extend(t for t in model.graph.initializer if t.name in bounds)

    def off(tensor: str, out: str) -> onnx.NodeProto:
        src = was.get(tensor)
        merged = tensor in made and nodes[made[tensor]].op_type != getattr(src, "op_type", None)
        if src is not None and src.op_type in ("Relu", "Clip") and merged:
            node = onnx.NodeProto()
            node.CopyFrom(src)
            node.input[0], node.output[0] = tensor, out
            return node
        return onnx.helper.make_node("Identity", [tensor], [out])

    def error(on: set[int]) -> float:
        variant = onnx.ModelProto()
        variant.CopyFrom(q)
        dropped = {p[2] for k, p in enumerate(pairs) if k not in on}
        turned_off = {p[3]: p for k, p in enumerate(pairs) if k not in on}
        kept = []
        for i, node in enumerate(variant.graph.node):
            if i in turned_off:
                kept.append(off(turned_off[i][0], node.output[0]))
            elif i not in dropped:
                kept.append(node)
        del variant.graph.node[:]
        variant.graph.node.extend(kept)
        # Optimizations off: a QDQ graph whose weights are float is a form no deployment
        # has, and even onnxruntime's basic level rewrites it so that its grids interact
        # (on Lite0 two consecutive grids together cost 20 to 100 times their errors
        # alone; every grid at once 7.9 dB where alone they add to 25.3, unoptimized
        # 25.3). On fully quantized graphs the levels agree (Lite0 W8A8 6.97 / 16.55 /
        # 17.27 dB none / ours / ours per channel, basic level and none).
        out = run(variant, images, optimized=False).astype(np.float64)
        each = ((out - reference) ** 2).reshape(len(out), -1).mean(axis=1) / power
        return each if per_image else float(each.mean())

    # the rounded tensor's name, or the output's where the quantizer renamed the tensor
    names = [t if not t.endswith("_QuantizeLinear_Input") else shown for t, shown, _, _ in pairs]
    wanted = [(k, n) for k, n in enumerate(names) if only is None or n in only]
    return {n: error({k}) for k, n in wanted}, error(set(range(len(pairs))))


def grids_matched(grids: dict, measured: dict) -> tuple[dict, dict]:
    """Rows for :func:`report` from the estimate's grids and the measured ones of none
    and ours (each a dict by key): (name, None, kind, value) and (name, None, value), by
    tensor name over all of them, 0 where a side has no such grid. A grid before
    per-channel bounds is measured at ``<clip output>_clip`` where the written-back graph
    has that scalar clip."""
    est: dict[str, dict[str, float]] = {key: {} for key in grids}
    kinds: dict[str, str] = {}
    for key, found in grids.items():
        for name, kind, value in found:
            if kind == "pre_bound" and f"{name}_clip" in measured[key]:
                name = f"{name}_clip"
            est[key][name] = est[key].get(name, 0.0) + value
            kinds.setdefault(name, kind)  # none's kind first (the keys in that order)
    names = sorted(set().union(*est.values(), *measured.values()))
    return (
        {
            k: [(n, None, kinds.get(n, "measured only"), v.get(n, 0.0)) for n in names]
            for k, v in est.items()
        },
        {k: [(n, None, v.get(n, 0.0)) for n in names] for k, v in measured.items()},
    )


RECORDED = Recorded()


def measured(model: onnx.ModelProto, images: np.ndarray, dep: Deployment) -> list:
    """``(node name, weight shape, noise-to-signal)`` per rounded weight of ``model``
    (graph order), each layer's weights alone on ``dep``'s grid."""
    model = prepared(model)
    reference = run(model, images).astype(np.float64)
    power = float(np.mean(reference**2))
    rows = []
    for node, tensor, w in list(rounded_weights(model.graph)):
        axis = weight_axis(node) if dep.per_channel else None
        q = weights_on_grid(w, dep.weight_bits, dep.weight_symmetric, axis).astype(w.dtype)
        saved = onnx.TensorProto()
        saved.CopyFrom(tensor)
        tensor.CopyFrom(numpy_helper.from_array(q, tensor.name))
        out = run(model, images).astype(np.float64)
        tensor.CopyFrom(saved)
        rows.append((node.name, tuple(w.shape), float(np.mean((out - reference) ** 2)) / power))
    return rows


def matched(layers: list, rows: list) -> list | None:
    """``rows`` (measured) in the order of ``layers`` (estimated): by node name where the
    ONNX nodes are named (the reader keeps their names), else in graph order where the
    weight shapes agree; None if neither matches."""
    by_name = {row[0]: row for row in rows}
    if len(rows) == len(layers) and all(layer[0] in by_name for layer in layers):
        ordered = [by_name[layer[0]] for layer in layers]
    else:
        ordered = rows
    shapes = [row[1] for row in ordered]
    return ordered if shapes == [layer[1] for layer in layers] else None


def equalized(model, sizes, dep: Deployment, base: str | None):
    RECORDED.base = base
    with contextlib.redirect_stdout(io.StringIO()):
        out, _ = cle_onnx.equalize_model(
            model, input_shapes=sizes, deployment=dep, objective=RECORDED.name
        )
    return out, list(RECORDED.layers)


def db(x: float) -> float:
    return 10.0 * np.log10(x) if x > 0 else -np.inf


def ranks(x: np.ndarray) -> np.ndarray:
    return np.argsort(np.argsort(x)).astype(np.float64)


def report(
    label: str, dep_label: str, est: dict, meas: dict, show: bool, together: dict | None = None
) -> None:
    """One network and deployment: ``est`` / ``meas`` map none / ours to per-layer (or
    per-grid) rows; ``together``: none / ours measured with every grid at once."""
    names = [row[0] for row in est["none"]]
    kinds = [row[2] for row in est["none"]]
    e = {k: np.array([row[3] for row in v]) for k, v in est.items()}
    m = {k: np.array([row[2] for row in v]) for k, v in meas.items()}
    live = (e["none"] > 0) & (m["none"] > 0)
    ratio = np.full(len(names), np.nan)
    ratio[live] = 10.0 * np.log10(m["none"][live] / e["none"][live])
    if show:
        print(
            f"  {'layer':<44}{'kind':<14}{'est none':>10}{'meas':>10}{'dB':>7}"
            f"{'est ours':>10}{'meas':>10}"
        )
        for i, name in enumerate(names):
            print(
                f"  {name[:43]:<44}{kinds[i]:<14}{e['none'][i]:10.2e}{m['none'][i]:10.2e}"
                f"{ratio[i]:+7.1f}{e['ours'][i]:10.2e}{m['ours'][i]:10.2e}"
            )
    r = ratio[np.isfinite(ratio)]
    iqr = float(np.subtract(*np.percentile(r, [75, 25])))
    rho = np.nan
    if live.sum() > 2:
        rho = np.corrcoef(ranks(e["none"][live]), ranks(m["none"][live]))[0, 1]
    moved = [
        (db(m["ours"][i] / m["none"][i]), db(e["ours"][i] / e["none"][i]))
        for i in range(len(names))
        if live[i] and m["ours"][i] > 0 and e["ours"][i] > 0
    ]
    moved = [(a, b) for a, b in moved if abs(a) > 1.0]
    agree = sum(1 for a, b in moved if a * b > 0)

    def median(x: np.ndarray) -> float:
        x = x[np.isfinite(x)]
        return float(np.median(x)) if x.size else np.nan

    of_kind = {k: ratio[[j for j, kk in enumerate(kinds) if kk == k]] for k in kinds}
    by_kind = "  ".join(  # the kinds in order of appearance, with their terms at none
        f"{k} {median(x):+.1f} ({np.isfinite(x).sum()})"
        for k, x in of_kind.items()
        if np.isfinite(x).any()
    )
    both = (e["ours"] > 0) & (m["ours"] > 0)
    ours = median(10.0 * np.log10(m["ours"][both] / e["ours"][both]))
    total_e = {k: db(1.0 / v.sum()) for k, v in e.items()}
    total_m = {k: db(1.0 / v.sum()) for k, v in m.items()}
    print(
        f"{label[:28]:<29}{dep_label:<7}{len(names):4d}  ratio dB median {np.median(r):+6.1f} "
        f"[{r.min():+6.1f}, {r.max():+6.1f}] IQR {iqr:4.1f}  rank corr {rho:5.2f}  "
        f"direction {agree}/{len(moved)}  sum est {total_e['none']:5.1f} -> {total_e['ours']:5.1f}"
        f" meas {total_m['none']:5.1f} -> {total_m['ours']:5.1f}"
        + (
            f" (all at once {db(1 / together['none']):5.1f} -> {db(1 / together['ours']):5.1f})"
            if together
            else ""
        )
        + "\n"
        f"{'':36}at ours: ratio dB median {ours:+6.1f}   by kind (none): {by_kind}",
        flush=True,
    )


def by_image(label: str, model, sizes, images, calib, dep: Deployment) -> None:
    """Where the activation grids' error is, image by image: for no scaling and ours,
    per sample image of :func:`cle_core._quality.natural_images` (its 6 crops, which must
    be ``images``), the SQNR of every grid at once (weights in float), its share of the
    error over all images, and the share of it that the graph input's grid alone makes
    (a grid no scale changes); then, for comparison, the whole deployment's SQNR (on all
    images, on the first 24, calibrated on the images measured) and W8's."""
    from cle_core._quality import NATURAL_IMAGE_NAMES

    first = data_inputs(model)[0].name
    rows, whole = {}, {}
    for key, base in (("none", None), ("ours", "noise")):
        out, _ = equalized(model, sizes, dep, base)
        ready = prepared(out)
        full = static_quantized(ready, calib, deployment=dep)
        alone, together = grids_alone(
            out, images, calib, dep, only={first}, per_image=True, quantized=full
        )
        rows[key] = (together, alone.get(first, np.zeros_like(together)))
        # the whole deployment, for comparison: fully quantized on all images and on the
        # first 24 (the four photos), weights alone, and calibrated on the images measured
        reference = run(ready, images).astype(np.float64)

        def sqnr(q, upto=None, reference=reference):
            return db(
                float(np.sum(reference[:upto] ** 2))
                / float(np.sum((run(q, images).astype(np.float64)[:upto] - reference[:upto]) ** 2))
            )

        w8 = weights_quantized(ready, dep.weight_bits, dep.per_channel, dep.weight_symmetric)
        inside = static_quantized(ready, images, deployment=dep)
        whole[key] = (sqnr(full), sqnr(full, 24), sqnr(w8), sqnr(inside))
    print(
        f"{label} {'':<15} every grid at once (dB), share of the error, input grid's part"
        " of it: none | ours"
    )
    for i, name in enumerate(NATURAL_IMAGE_NAMES):
        crops = slice(6 * i, 6 * i + 6)
        cells = []
        for together, inputs in rows.values():
            share = together[crops].sum() / together.sum()
            part = inputs[crops].sum() / together[crops].sum()
            cells.append(f"{db(1.0 / together[crops].mean()):6.2f} {share:6.3f} {part:6.2f}")
        print(f"  {name:<20}" + "   |".join(cells))
    for key, (together, inputs) in rows.items():
        full, photos, w8, inside = whole[key]
        print(
            f"  {key}: every grid at once {db(1.0 / together.mean()):.2f} dB, the input grid "
            f"alone {db(1.0 / inputs.mean()):.2f} dB; W8A8 {full:.2f} (first 24 images "
            f"{photos:.2f}, calibrated on the images measured {inside:.2f}), W8 {w8:.2f}"
        )


def networks(args):
    """``(label, ONNX model, input sizes, images, calibration images)`` per network."""
    for name in args.networks:
        if name in ("lite0", "lite0_bn"):
            # the pretrained network as its ONNX file: the exporter folds the batch norms
            # (no statistics left) unless they are kept
            from cle_core._quality import calibration_images, natural_images
            from cle_torch._examples import efficientnet_lite0, export_onnx

            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "lite0.onnx"
                export_onnx(efficientnet_lite0(), path, keep_batchnorm=name == "lite0_bn")
                model = onnx.load(str(path))
            images = np.ascontiguousarray(natural_images()[: args.images])
            calib = np.ascontiguousarray(calibration_images())
            yield name, model, {"input": (1, 3, 224, 224)}, images, calib
            continue
        for label, model, x, calib in bd.cases(name, 1):
            x = x[: args.images]
            with contextlib.redirect_stdout(io.StringIO()):
                onnx_model = bd.other.exported(model, x)
            first = data_inputs(onnx_model)[0].name
            yield label, onnx_model, {first: (1, *x.shape[1:])}, x.numpy(), calib
    if args.folder is not None:
        from cle_core._quality import calibration_images, natural_images

        for path in sorted(args.folder.glob("*.onnx")):
            model = onnx.load(str(path))
            hw = pypi.input_size(model, path.stem)
            images = np.ascontiguousarray(natural_images(hw)[: args.images])
            calib = np.ascontiguousarray(calibration_images(hw))
            first = data_inputs(model)[0].name
            yield path.stem, model, {first: (1, 3, *hw)}, images, calib


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--networks", nargs="*", default=["lite0", "lite0_bn", "trained_cnn"])
    ap.add_argument("--folder", type=Path, default=None)
    ap.add_argument("--images", type=int, default=48)
    ap.add_argument("--deployments", nargs="*", default=list(DEPLOYMENTS))
    ap.add_argument("--layers", action="store_true", help="print every layer")
    ap.add_argument(
        "--by-image",
        action="store_true",
        help="instead: W8A8's activation grids per sample image (lite0 networks, all 120 images)",
    )
    args = ap.parse_args()
    logging.getLogger("cle_core").setLevel(logging.ERROR)
    if RECORDED.name not in objective_names():
        register_objective(RECORDED)
    if args.by_image:
        args.images = 120
    for label, model, sizes, images, calib in networks(args):
        if args.by_image:
            if label.startswith("lite0"):
                by_image(label, model, sizes, images, calib, DEPLOYMENTS["W8A8"])
            continue
        for dep_label in args.deployments:
            dep = DEPLOYMENTS[dep_label]
            est, meas = {}, {}
            if not dep.weights_only:  # the activation grids, weights in float
                together = {}
                for key, base in (("none", None), ("ours", "noise")):
                    out, _ = equalized(model, sizes, dep, base)
                    est[key] = list(RECORDED.grids)
                    meas[key], together[key] = grids_alone(out, images, calib, dep)
                est, meas = grids_matched(est, meas)
                report(label, dep_label, est, meas, args.layers, together)
                continue
            for key, base in (("none", None), ("ours", "noise")):
                out, est[key] = equalized(model, sizes, dep, base)
                meas[key] = measured(out, images, dep)
            count = len(meas["none"])
            meas = {key: matched(est[key], rows) for key, rows in meas.items()}
            if any(rows is None for rows in meas.values()):
                print(
                    f"{label}: the quantized weights do not match the estimate's layers "
                    f"({count} vs {len(est['none'])}, by name or in order); skipped"
                )
                continue
            report(label, dep_label, est, meas, args.layers)


if __name__ == "__main__":
    main()
