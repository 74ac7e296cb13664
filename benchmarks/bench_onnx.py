"""ONNX pipeline benchmark on the pretrained EfficientNet-Lite0.

Exports the model as its packages ship it (``torch.onnx.export``, opset 13; the exporter
folds the batch norms, so no BN statistics are left), equalizes the file with
``cle equalize`` in-process, and prints:

- the wall time of ``cle equalize IN -o OUT`` (file to file, imports done), median of
  ``--repeat`` runs (target: under 1 s);
- on the 120 natural images (scikit-image samples, see docs/benchmarks.rst): the FP32
  logits SQNR of the equalized model against the original (target: >= 100 dB), and
  asymmetric W8 and W8A8 logits SQNR and top-1 agreement as ``cle evaluate`` measures
  them (W8A8: onnxruntime's ``quantize_static``, QDQ, MinMax calibration on the same
  images; W8: quantized weights), per tensor (``--per-channel`` for per-channel
  weights): BN folded alone, the defaults (data-free; target W8A8 >= 11 dB), the
  defaults with 40 calibration images (``--calibration``; target W8A8 >= 13 dB) and the
  weight-range balance;
- the same on an export that keeps the BatchNormalization nodes, so that the backend
  folds them and keeps their statistics (targets: W8 >= 17 dB with top-1 >= 0.90, W8A8 >=
  13 dB with top-1 >= 0.85).

Run: ``python benchmarks/bench_onnx.py [--per-channel]``.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import onnx

import cle_onnx
from cle_core._cli import main as cle
from cle_core._quality import calibration_images, natural_images, quality_table
from cle_torch._examples import efficientnet_lite0, export_onnx


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--per-channel", action="store_true", help="per-channel weight grids")
    args = ap.parse_args()

    def evaluate(original, candidate, images):
        return cle_onnx.evaluate(original, candidate, images, per_channel=args.per_channel)

    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "effnet_lite0.onnx", Path(tmp) / "effnet_lite0_cle.onnx"
        export_onnx(efficientnet_lite0(), src)
        times = []
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            rc = cle(["equalize", str(src), "-o", str(dst), "--quiet"])
            times.append(time.perf_counter() - t0)
            assert rc == 0
        original, equalized = onnx.load(str(src)), onnx.load(str(dst))
        images = natural_images()
        calibration = calibration_images()
        rows = [
            ("BN folded, no CLE", evaluate(original, None, images)),
            ("cle equalize (defaults)", evaluate(original, equalized, images)),
        ]
        for label, kw in (
            ("  calibration=40 images", {"calibration": calibration}),
            ("  objective='balance'", {"objective": "balance"}),
        ):
            rows.append(
                (label, evaluate(original, cle_onnx.equalize_model(original, **kw)[0], images))
            )
        # The same model exported with its BatchNormalization nodes: the backend folds
        # them itself and keeps their statistics (high-bias absorption, the data-free
        # noise estimate). Compared against the same FP32 logits.
        with_bn = Path(tmp) / "effnet_lite0_bn.onnx"
        export_onnx(efficientnet_lite0(), with_bn, keep_batchnorm=True)
        bn_model = onnx.load(str(with_bn))
        bn_rows = [
            (name, evaluate(original, cle_onnx.equalize_model(bn_model, **kw)[0], images))
            for name, kw in (
                ("BN folded by cle, no CLE", {"scale": False, "high_bias": False}),
                ("cle defaults", {}),
                ("  calibration=40 images", {"calibration": calibration}),
                ("  activation_bits=None (W8)", {"activation_bits": None}),
                ("  objective='balance'", {"objective": "balance"}),
            )
        ]
    print(
        f"cle equalize, file to file: median {statistics.median(times):.3f} s "
        f"over {args.repeat} runs (target < 1 s)"
    )
    grid = "per channel" if args.per_channel else "per tensor"
    print(f"weights {grid}; W8A8: onnxruntime quantize_static (QDQ, MinMax)")
    print(quality_table(rows, label="EfficientNet-Lite0, ONNX"))
    print("exported with its BatchNormalization nodes (keep_batchnorm=True):")
    print(quality_table(bn_rows, label="EfficientNet-Lite0, ONNX + BN"))
    print(
        "targets: FP32 >= 100 dB; exporter-folded W8A8 >= 11 dB data-free, >= 13 dB "
        "calibrated; with BNs W8 >= 17 dB / top-1 >= 0.90, W8A8 >= 13 dB / top-1 >= 0.85"
    )


if __name__ == "__main__":
    main()
