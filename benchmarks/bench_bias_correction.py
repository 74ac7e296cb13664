"""Bias correction on the pretrained EfficientNet-Lite0, measured as users deploy:
onnxruntime ``quantize_static`` (QDQ, MinMax calibration on 40 of the 120 natural
images, measured on all 120), symmetric int8 weights per tensor and per channel, W8
(weights only) and W8A8, logits SQNR against the FP32 model.

For each export (the TorchScript exporter's default, batch norms folded by it; and one
that keeps its BatchNormalization nodes) and each deployment, rows: no CLE (BNs folded),
CLE with the defaults, CLE with scales chosen from statistics measured on 40
calibration images (other crops: the baseline of the calibrated corrections, since
calibration changes the scales too), CLE + data-free bias correction, CLE + bias
correction with input means measured on the same crops, the empirical form on them
(layer by layer, measured), and, with BNs kept, the PyTorch backend on the module with
and without the correction. Every row is equalized for the deployment it is measured
in.

Run: ``python benchmarks/bench_bias_correction.py`` (about 10 minutes on 2 cores);
``--quick`` measures per tensor only on the BN export; ``--folded`` only the
exporter-folded export (per tensor and per channel); ``--data-free`` leaves out the
rows measured with calibration data. ``--issue-script`` reproduces
the quick script of issue #20 instead (the data-free equalization in PyTorch, input
means of every Conv / Linear measured with forward hooks on the 40 crops, ``b -=
sum_spatial(Q(W) - W) E[x]`` with the deployed per-tensor grid, then exported) beside
our pass on the same equalization with means measured on the same crops, and the
calibrated equalization without and with our correction. ``--stats`` compares, layer by
layer on the exporter-folded export, the data-free input statistics (positions taken as
independent, and as correlated: the bias correction's) with those measured on the 40
crops; ``--cnn`` measures the data-free correction on the trained CNN of
``bench_other_networks.py``, exporter-folded.
"""

from __future__ import annotations

import argparse
import copy
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

import cle_onnx
import cle_torch
from cle_core import Deployment
from cle_core._math import bias_shift
from cle_core.quality import calibration_images, natural_images, quality_table, weights_on_grid
from cle_torch._examples import efficientnet_lite0, export_onnx

CALIBRATION = 40


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="per tensor, BN export only")
    parser.add_argument(
        "--folded",
        action="store_true",
        help="the exporter-folded export only (no BN statistics left), both deployments",
    )
    parser.add_argument(
        "--data-free",
        action="store_true",
        help="only the rows without calibration (no CLE, CLE, CLE + bias corr.)",
    )
    parser.add_argument(
        "--issue-script", action="store_true", help="issue #20's quick script beside our pass"
    )
    parser.add_argument(
        "--cnn",
        action="store_true",
        help="the trained CNN of bench_other_networks.py, exporter-folded, data-free",
    )
    parser.add_argument(
        "--stats",
        action="store_true",
        help="the exporter-folded export's propagated input statistics against measured ones",
    )
    args = parser.parse_args()
    logging.getLogger("cle_torch").setLevel(logging.ERROR)
    started = time.monotonic()
    model = efficientnet_lite0()
    images, crops = natural_images(), calibration_images()
    if args.issue_script:
        issue_script(model, images, crops)
        print(f"\n{time.monotonic() - started:.0f} s")
        return
    if args.cnn:
        trained_cnn_folded()
        print(f"\n{time.monotonic() - started:.0f} s")
        return
    if args.stats:
        propagated_stats(model, crops)
        print(f"\n{time.monotonic() - started:.0f} s")
        return
    deployments = [("per tensor", False)] + ([] if args.quick else [("per channel", True)])
    exports = [("BNs kept", True)] + ([] if args.quick else [("exporter-folded", False)])
    if args.folded:
        exports = [("exporter-folded", False)]
    with tempfile.TemporaryDirectory() as tmp:
        for export_name, keep in exports:
            path = Path(tmp) / f"lite0_{keep}.onnx"
            export_onnx(model, path, keep_batchnorm=keep)
            original = onnx.load(str(path))
            for dep_name, per_channel in deployments:
                dep = Deployment(per_channel=per_channel)
                rows = [("no CLE (BNs folded)", None)]
                opts = {"deployment": dep}
                rows.append(("CLE", cle_onnx.equalize_model(path, **opts)[0]))
                rows.append(
                    (
                        "CLE + bias corr.",
                        cle_onnx.equalize_model(path, bias_correction=True, **opts)[0],
                    )
                )
                if not args.data_free:
                    _calibrated_rows(rows, path, crops, opts)
                if keep and not args.data_free:
                    torch_rows = (
                        ("PyTorch CLE", False),
                        ("PyTorch CLE + bias corr.", True),
                        ("PyTorch CLE + bias corr., empirical", "empirical"),
                    )
                    for name, bc in torch_rows:
                        calibration = {"calibration": crops} if bc == "empirical" else {}
                        eq, _ = cle_torch.equalize_model(
                            copy.deepcopy(model), bias_correction=bc, **opts, **calibration
                        )
                        out = Path(tmp) / "torch.onnx"
                        export_onnx(eq, out)
                        rows.append((name, onnx.load(str(out))))
                figures = cle_onnx.evaluate_all(
                    original,
                    [m for _, m in rows],
                    images,
                    deployment=dep,
                    calibration=images[:CALIBRATION],
                    names=["original", *(n for n, _ in rows)],
                )
                print(f"\nEfficientNet-Lite0, {export_name}, {dep_name} (symmetric int8 weights):")
                table = [(f"  {n}", f) for (n, _), f in zip(rows, figures, strict=True)]
                print(quality_table(table, label="  pipeline", width=32), flush=True)
    print(f"\n{time.monotonic() - started:.0f} s")


def _calibrated_rows(rows, path, crops, opts) -> None:
    """The rows measured with the 40 crops: the calibrated scales (calibration changes
    the scales too: the calibrated correction's baseline), the correction with means
    measured on them, and the empirical form."""
    rows.append(("CLE, calibrated", cle_onnx.equalize_model(path, calibration=crops, **opts)[0]))
    for name, bc in (("calibrated", True), ("empirical", "empirical")):
        eq = cle_onnx.equalize_model(path, bias_correction=bc, calibration=crops, **opts)[0]
        rows.append((f"CLE + bias corr., {name}", eq))


def trained_cnn_folded() -> None:
    """The small CNN trained in ``bench_other_networks.py`` (3 seeds), exported by the
    TorchScript exporter, which folds its batch norms (no statistics left), equalized
    by the ONNX backend without and with the data-free correction; mean W8 / W8A8 dB of
    the three, its held-out crops measured, 32 other crops calibrating."""
    import io
    import sys
    import warnings

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import bench_other_networks as other

    figures = []
    for seed in (0, 1, 2):
        net, x, _ = other.trained_cnn(seed=seed)
        calib = other.crops(32, seed=3 + 10 * seed)[0].numpy()
        buf = io.BytesIO()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                net,
                (x[:1],),
                buf,
                opset_version=13,
                input_names=["x"],
                dynamic_axes={"x": {0: "N"}},
                dynamo=False,
            )
        proto = onnx.load_from_string(buf.getvalue())
        row = []
        for per_channel in (False, True):
            dep = Deployment(per_channel=per_channel)
            models = [
                cle_onnx.equalize_model(proto, deployment=dep, bias_correction=bc)[0]
                for bc in (False, True)
            ]
            got = cle_onnx.evaluate_all(proto, models, x.numpy(), deployment=dep, calibration=calib)
            row.append([(f["w8_sqnr"], f["w8a8_sqnr"]) for f in got])
        figures.append(row)
    mean = np.mean(figures, axis=0)  # deployment, model, (W8, W8A8)
    print("Trained CNN (3 seeds), exporter-folded, W8 / W8A8 dB:")
    for d, name in enumerate(("per tensor", "per channel")):
        (a, b), (c, e) = mean[d]
        print(f"  {name:<12} CLE {a:.2f} / {b:.2f}   + bias corr. {c:.2f} / {e:.2f}")


def propagated_stats(model, crops) -> None:
    """Layer by layer on the exporter-folded export (no BN statistics: every input mean
    and variance propagated from the graph input), the data-free estimate of each
    layer's input against the statistics measured on the 40 crops, with positions taken
    as independent and as correlated (the bias correction's model): the mean's error
    in units of the measured standard deviation (root mean square over channels), the
    ratio of the summed standard deviations, and the per-channel deployment's bias
    shift left after a correction with the estimated means, relative to the shift."""
    from cle_core._stats import _coverage, _unpadded, estimate, spatial_sizes
    from cle_onnx._calibrate import calibration_stats
    from cle_onnx._translate import to_ir

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "lite0.onnx"
        export_onnx(model, path)
        proto = onnx.load(str(path))
    graph = to_ir(proto)[0]
    measured = calibration_stats(proto, crops)
    sizes = spatial_sizes(graph)
    models = {
        kind: estimate(graph, transpose_taps=True, correlated=kind == "correlated")[0]
        for kind in ("independent", "correlated")
    }
    print("EfficientNet-Lite0, exporter-folded: each layer's input, estimated / measured")
    print(f"  {'layer':<34}" + "".join(f"  {k:>12} mean err  sd ratio  left dB" for k in models))
    left = {k: [] for k in models}
    for node in graph.nodes:
        source, pads = _unpadded(node)
        m = measured.get(source.name)
        if not node.is_layer or m is None:
            continue  # the first layer reads the graph input, which is not measured
        q = weights_on_grid(node.weight, 8, True, node.layout.out_axis)
        coverage, _ = _coverage(node, sizes.get(source.name), pads)
        true_shift = bias_shift(node.weight, q, node.layout, m.mean, coverage)
        cells = ""
        for kind, stats in models.items():
            e = stats[source.name]
            err = np.sqrt(np.mean((e.mean - m.mean) ** 2) / max(float(np.mean(m.var)), 1e-30))
            ratio = np.sqrt(e.var).sum() / max(float(np.sqrt(m.var).sum()), 1e-30)
            shift = bias_shift(node.weight, q, node.layout, e.mean, coverage)
            rest = np.sum((shift - true_shift) ** 2) / max(float(np.sum(true_shift**2)), 1e-30)
            left[kind].append(10 * np.log10(max(rest, 1e-6)))
            cells += f"  {'':>12} {err:8.2f}  {ratio:8.2f}  {left[kind][-1]:7.1f}"
        print(f"  {node.name[-34:]:<34}{cells}")
    print("  mean shift left (dB): " + ", ".join(f"{k} {np.mean(v):.2f}" for k, v in left.items()))


def _layers(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def _input_means(model, data) -> dict:
    """Per-channel mean of each Conv / Linear module's input (what its forward gets: a
    module that pads inside its forward is measured before the padding)."""
    sums, counts, hooks = {}, {}, []
    for name, module in _layers(model):

        def hook(module, args, name=name):
            x = args[0].detach().double()
            dims = [d for d in range(x.dim()) if d != 1]
            sums[name] = sums.get(name, 0) + x.sum(dim=dims)
            counts[name] = counts.get(name, 0) + x.numel() // x.shape[1]

        hooks.append(module.register_forward_pre_hook(hook))
    with torch.no_grad():
        for i in range(0, len(data), 10):
            model(torch.from_numpy(np.ascontiguousarray(data[i : i + 10])))
    for h in hooks:
        h.remove()
    return {k: (sums[k] / counts[k]).numpy() for k in sums}


def _issue_corrected(model, means):
    """``b -= sum_spatial(Q(W) - W) E[x]``, ``Q`` the per-tensor int8 grid of
    ``quantize_static``, on a copy of ``model``."""
    model = copy.deepcopy(model)
    for name, m in _layers(model):
        w = m.weight.detach().numpy()
        dw = weights_on_grid(w).astype(np.float64) - w.astype(np.float64)
        mu = means[name]
        if isinstance(m, nn.Linear):
            shift = dw @ mu
        else:
            g, (out, per_group) = m.groups, dw.shape[:2]
            d = dw.reshape(g, out // g, per_group, -1).sum(-1)
            shift = np.einsum("goi,gi->go", d, mu.reshape(g, per_group)).reshape(-1)
        s = torch.from_numpy(shift).to(m.weight.dtype)
        if m.bias is None:
            m.bias = nn.Parameter(-s)
        else:
            m.bias.data -= s
    return model


def issue_script(model, images, crops) -> None:
    dep = Deployment()
    eq, _ = cle_torch.equalize_model(copy.deepcopy(model), deployment=dep)
    ours, _ = cle_torch.equalize_model(
        copy.deepcopy(eq),
        deployment=dep,
        scale=False,
        high_bias=False,
        bias_correction=True,
        calibration=crops,
    )
    calibrated, _ = cle_torch.equalize_model(
        copy.deepcopy(model), deployment=dep, calibration=crops
    )
    both, _ = cle_torch.equalize_model(
        copy.deepcopy(model), deployment=dep, calibration=crops, bias_correction=True
    )
    rows = [
        ("CLE (data-free scales)", eq),
        ("+ the issue's script", _issue_corrected(eq, _input_means(eq, crops))),
        ("+ ours, means measured", ours),
        ("CLE, calibrated scales", calibrated),
        ("+ ours, calibrated", both),
    ]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "original.onnx"
        export_onnx(model, path, keep_batchnorm=True)
        protos = []
        for i, (_, m) in enumerate(rows):
            export_onnx(m, Path(tmp) / f"{i}.onnx")
            protos.append(onnx.load(str(Path(tmp) / f"{i}.onnx")))
        figures = cle_onnx.evaluate_all(
            onnx.load(str(path)),
            protos,
            images,
            deployment=dep,
            calibration=images[:CALIBRATION],
            names=["original", *(n for n, _ in rows)],
        )
    print("EfficientNet-Lite0, per tensor, equalized in PyTorch, exported (BNs folded):")
    table = [(f"  {n}", f) for (n, _), f in zip(rows, figures, strict=True)]
    print(quality_table(table, label="  pipeline", width=32), flush=True)


if __name__ == "__main__":
    main()
