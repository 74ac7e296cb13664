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
``--quick`` measures per tensor only on the BN export.
"""

from __future__ import annotations

import argparse
import copy
import logging
import tempfile
import time
from pathlib import Path

import onnx

import cle_onnx
import cle_torch
from cle_core import Deployment
from cle_core.quality import calibration_images, natural_images, quality_table
from cle_torch._examples import efficientnet_lite0, export_onnx

CALIBRATION = 40


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="per tensor, BN export only")
    args = parser.parse_args()
    logging.getLogger("cle_torch").setLevel(logging.ERROR)
    started = time.monotonic()
    model = efficientnet_lite0()
    images, crops = natural_images(), calibration_images()
    deployments = [("per tensor", False)] + ([] if args.quick else [("per channel", True)])
    exports = [("BNs kept", True)] + ([] if args.quick else [("exporter-folded", False)])
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
                # calibration changes the scales too: the calibrated correction's baseline
                rows.append(
                    ("CLE, calibrated", cle_onnx.equalize_model(path, calibration=crops, **opts)[0])
                )
                rows.append(
                    (
                        "CLE + bias corr.",
                        cle_onnx.equalize_model(path, bias_correction=True, **opts)[0],
                    )
                )
                rows.append(
                    (
                        "CLE + bias corr., calibrated",
                        cle_onnx.equalize_model(
                            path, bias_correction=True, calibration=crops, **opts
                        )[0],
                    )
                )
                rows.append(
                    (
                        "CLE + bias corr., empirical",
                        cle_onnx.equalize_model(
                            path, bias_correction="empirical", calibration=crops, **opts
                        )[0],
                    )
                )
                if keep:
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


if __name__ == "__main__":
    main()
