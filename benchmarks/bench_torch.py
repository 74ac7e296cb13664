"""PyTorch pipeline benchmark on the pretrained EfficientNet-Lite0 and a ResNet-50.

Loads the model exactly as its packages ship it and prints:

- the wall time of ``cle_torch.equalize_model(model, input_shapes=(1, 3, 224, 224))``
  with the defaults (noise objective, W8A8; tracing included), median of ``--repeat``
  runs, each on a fresh copy of the model made before the clock starts (target: 0.25 s),
  with its CPU time (``time.process_time``: less sensitive to other load on the machine),
  and where it goes (capture, the core, the write-back);
- the same for a ResNet-50-sized test network (``tests/helpers/torch_models.resnet50``: random
  weights, 25.6 M parameters; target 0.35 s);
- on the 120 natural images (scikit-image samples, see docs/benchmarks.rst): the FP32
  logits SQNR of the equalized model against the original (target: >= 100 dB), and
  simulated per-tensor asymmetric W8 and W8A8 logits SQNR and top-1 agreement, for BN
  folding alone, the defaults, the defaults with 40 calibration images (distinct crops),
  the weights-only deployment, the weight-range balance and the defaults without
  high-bias absorption. Targets of the defaults: W8 >= 17 dB with top-1 >= 0.90, W8A8 >=
  13 dB with top-1 >= 0.85.

``--sweeps N [N ...]`` prints instead, for each most number of sweeps (``max_sweeps``),
the median time of both networks' ``equalize_model`` and the estimated gain it reaches.

Run: ``python benchmarks/bench_torch.py [--sweeps 1 2 3 4 200]``.
"""

from __future__ import annotations

import argparse
import copy
import logging
import statistics
import sys
import time
from pathlib import Path

import torch

import cle_torch
from cle_core import EqualizeOptions, equalize
from cle_core._quality import calibration_images, natural_images, quality_table
from cle_torch import evaluate_torch
from cle_torch._apply import apply
from cle_torch._examples import efficientnet_lite0
from cle_torch._translate import capture

SHAPE = (1, 3, 224, 224)


def median_time(model, shape, repeat: int, **options) -> tuple[float, float, float, object]:
    """Median and minimum wall time and median CPU time of ``equalize_model`` on fresh
    copies; the last result."""
    cle_torch.equalize_model(copy.deepcopy(model), input_shapes=shape, **options)  # warm-up
    times, cpu, result = [], [], None
    for _ in range(repeat):
        fresh = copy.deepcopy(model)
        t0, c0 = time.perf_counter(), time.process_time()
        result = cle_torch.equalize_model(fresh, input_shapes=shape, **options)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return statistics.median(times), min(times), statistics.median(cpu), result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--sweeps", type=int, nargs="+", help="time these max_sweeps only")
    args = ap.parse_args()
    # The write-back warns that it returns a GraphModule (one ReLU6 module per block is
    # called twice with different bounds); expected here, not news at every run.
    logging.getLogger("cle_torch").setLevel(logging.ERROR)

    model = efficientnet_lite0()
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the tests package
    from tests.helpers.torch_models import resnet50

    big, big_shape = resnet50()
    if args.sweeps:
        for label, net, shape in (
            ("EfficientNet-Lite0", model, SHAPE),
            ("ResNet-50", big, big_shape),
        ):
            for sweeps in args.sweeps:
                median, _, cpu, (_, report) = median_time(
                    net, shape, args.repeat, max_sweeps=sweeps
                )
                noise = report.noise
                print(
                    f"{label:<20} max_sweeps {sweeps:4d}: {report.sweeps} sweeps, median "
                    f"{median:.3f} s (CPU {cpu:.3f} s), estimated gain "
                    f"{noise.sqnr_after - noise.sqnr_before:.2f} dB",
                    flush=True,
                )
        return
    median, fastest, cpu, (equalized, report) = median_time(model, SHAPE, args.repeat)

    # Where the time goes: capture (trace + translate), the core, the write-back.
    parts: list[tuple[float, float, float]] = []
    for _ in range(args.repeat):
        fresh = copy.deepcopy(model)
        t0 = time.perf_counter()
        cap = capture(fresh, SHAPE)
        t1 = time.perf_counter()
        result = equalize(cap.ir, EqualizeOptions())
        t2 = time.perf_counter()
        apply(cap, result)
        parts.append((t1 - t0, t2 - t1, time.perf_counter() - t2))
    capture_s, core_s, write_s = (statistics.median(p) for p in zip(*parts, strict=True))

    r50_median, r50_fastest, r50_cpu, (_, r50_report) = median_time(big, big_shape, args.repeat)
    r50_balance, _, _, _ = median_time(big, big_shape, args.repeat, objective="balance")
    lite_balance, _, _, _ = median_time(model, SHAPE, args.repeat, objective="balance")

    images = natural_images()
    folded = copy.deepcopy(model)
    cle_torch.fold_all_batch_norms(folded, input_shapes=SHAPE)
    rows = [("BN folded, no CLE", evaluate_torch(model, folded, images))]
    rows.append(("defaults (noise, W8A8)", evaluate_torch(model, equalized, images)))
    for label, options in (
        ("  calibration=40 images", {"calibration": calibration_images()}),
        ("  activation_bits=None (W8)", {"activation_bits": None}),
        ("  objective='balance'", {"objective": "balance"}),
        ("  high_bias=False", {"high_bias": False}),
    ):
        other, _ = cle_torch.equalize_model(copy.deepcopy(model), input_shapes=SHAPE, **options)
        rows.append((label, evaluate_torch(model, other, images)))

    print(
        f"EfficientNet-Lite0: equalize_model median {median:.3f} s over {args.repeat} runs "
        f"(min {fastest:.3f} s, CPU {cpu:.3f} s; tracing included; target 0.25 s); "
        "objective='balance' "
        f"{lite_balance:.3f} s"
    )
    print(
        f"  of which capture (trace + translate) {capture_s:.3f} s, cle_core.equalize "
        f"{core_s:.3f} s, write-back {write_s:.3f} s (medians)"
    )
    print(
        f"  returned a {type(equalized).__name__}; {len(report.regions)} regions, "
        f"{len(report.folds)} BNs folded, {report.sweeps} sweeps, "
        f"{len(report.high_bias)} high biases absorbed; estimated output SQNR "
        f"{report.noise.sqnr_before:.2f} -> {report.noise.sqnr_after:.2f} dB"
    )
    print(
        f"ResNet-50-sized network: equalize_model median {r50_median:.3f} s (min "
        f"{r50_fastest:.3f} s, CPU {r50_cpu:.3f} s; target 0.35 s); objective='balance' "
        f"{r50_balance:.3f} s; "
        f"{len(r50_report.regions)} regions, {r50_report.sweeps} sweeps"
    )
    print(quality_table(rows, label="EfficientNet-Lite0, torch"))
    print(
        "targets (defaults): FP32 >= 100 dB, W8 >= 17 dB / top-1 >= 0.90, "
        "W8A8 >= 13 dB / top-1 >= 0.85"
    )
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")


if __name__ == "__main__":
    main()
