"""``verify`` with ``draws``: exact equalizations measured on calibration inputs, the
best kept, then measured on inputs it never saw.

One quantized figure is one draw of the rounding (``bench_draws.py``): the same
network's scales times ``exp(0.02 z)`` per channel are another exact equalization that
measures up to 12.6 dB apart. ``cle_onnx.equalize_model(..., verify=True, draws=N)``
(``cle equalize --verify --draws N``) measures the objective's own scales and ``N``
redrawn ones with onnxruntime's ``quantize_static`` on the calibration inputs (each
half calibrating the grids while the other is measured, the mean of the two) and keeps
the best, or the original (batch norms
folded) where it measured better. This benchmark runs that path as a user does, on ONNX
files, and measures what it returns on the evaluation inputs (calibrated on all the
calibration inputs, as ``bench_deployments.py``). Columns, output SQNR in dB:

- ``none``: batch norms folded, no scaling;
- ``default``: the defaults (data-free, no verify);
- ``calib``: ``calibration=`` the calibration inputs (the noise objective's statistics
  measured on them), no verify;
- ``verify``: ``verify=True`` with them (the original or ``calib`` kept);
- ``draws``: ``verify=True, draws=N`` and the draw it kept (``-``: the original);
- ``best``: the best of ``calib`` and its ``N`` draws on the evaluation inputs (what a
  perfect choice would give; ``--best`` only, it costs ``N`` more quantizations).

With ``--best``, a second line per row gives the figures the choice was made on (``split``:
the original, then draws ``0 .. N``, as ``verify`` measures them on the calibration
inputs) and the same candidates on the evaluation inputs (``eval``), and the summary
gives, for each margin of ``--margins``, what ``cle_core``'s ``pick(..., margin=)``
keeps with that margin, measured on the evaluation inputs, against ``verify`` alone.
``--one-half`` (with ``--best``) also measures every candidate one way only (the first
half of the calibration inputs calibrating, the second measuring), as ``verify`` did
before it measured both ways round, and prints what ``pick`` would keep on those
figures. (The outputs ``results/*swap*`` came from the earlier ``--swap``, which added
the other way round to a one-half ``verify``: the same two choices.)

Networks: the pretrained EfficientNet-Lite0 in both exports (BNs kept, and folded by
the exporter; the 120 natural images measured, 40 other crops of the same 20 source
images calibrating, so the draw is chosen on crops 10 of whose sources are among the
measured images: ``--by-source`` measures on the 60 images of the sources the choice
did not see), and ``bench_deployments.py``'s trained CNN and random networks (3 seeds).
``--bias-correction`` adds ``bias_correction=True`` to every equalization (the columns
then compare corrected models; ``none`` stays the uncorrected original).

Run: ``python benchmarks/bench_verify_draws.py [--networks lite0 trained_cnn resnet ...]
[--draws 8] [--deployments W8A8 W8 ...] [--best [--margins 0 0.5 ...] [--one-half]]
[--by-source] [--bias-correction]``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the tests package
import bench_deployments as bd  # noqa: E402
import bench_other_networks as other  # noqa: E402

import cle_onnx  # noqa: E402
from cle_core.toolkit import pick  # noqa: E402
from cle_torch._examples import export_onnx  # noqa: E402


def onnx_cases(name: str, seeds: int, tmp: Path):
    """``(label, ONNX model, eval inputs, calibration inputs)``."""
    import onnx

    for label, model, x, calib in bd.cases(name, seeds):
        if name == "lite0":
            for keep, tag in ((True, "lite0 (BNs)"), (False, "lite0 (folded)")):
                path = tmp / f"lite0_{keep}.onnx"
                export_onnx(model, path, keep_batchnorm=keep)
                yield tag, onnx.load(str(path)), x.numpy(), np.asarray(calib)
            continue
        with contextlib.redirect_stdout(io.StringIO()):
            proto = other.exported(model, x)
        yield label, proto, x.numpy(), np.asarray(calib)


MARGINS = (0.0, 0.25, 0.5, 1.0)


def margin_rows(report, dep, split: list[float], evals: list[float], margins) -> str:
    """The ``split`` / ``eval`` line of one row, and, per margin, the evaluation figure
    of what ``pick`` keeps (``split`` and ``evals``: the original, then draws ``0 .. N``)."""
    v = report.verification
    chosen = []
    for margin in margins:
        _, kept = pick(report, dep, v.inputs, split[0], split[1:], margin=margin)
        chosen.append(evals[0] if kept is None else evals[1 + kept])
    line = "split " + " ".join(f"{x:.2f}" for x in split)
    line += " | eval " + " ".join(f"{x:.2f}" for x in evals)
    return line, chosen


def one_half(proto, dep, calib, drawn: list, split: list[float], **options) -> list[float]:
    """The figures of the original (batch norms folded) and ``drawn`` (draws ``0 .. N``)
    measured one way only, the first half of the calibration inputs calibrating and the
    second measuring, as ``verify`` did before it measured both ways round
    (weights-only: ``split``, measured on all the inputs either way). ``options``: more
    options of ``equalize_model`` (``input_shapes``)."""
    from cle_core.toolkit import split_inputs

    if dep.weights_only:
        return split
    first, second, _ = split_inputs(calib, dep)
    # the original as verify measures it (cle_core.toolkit.folded_only's options)
    folded, _ = cle_onnx.equalize_model(
        proto, deployment=dep, scale=False, high_bias=False, bias_correction=False, **options
    )
    return [
        r["w8a8_sqnr"]
        for r in cle_onnx.evaluate_all(
            proto, [folded, *drawn], second, deployment=dep, calibration=first
        )
    ]


def margin_summary(by_margin: dict[str, list[tuple[list[float], float]]], margins) -> None:
    """Per deployment and margin: the mean and worst of (kept with the margin - verify
    alone), and how many rows lost more than 0.1 dB."""
    print("pick's margin: what it keeps minus verify alone, mean (worst; rows below -0.1 dB)")
    for dep_name, rows in by_margin.items():
        if not rows:
            continue
        cells = []
        for i, margin in enumerate(margins):
            d = [chosen[i] - ver for chosen, ver in rows]
            cells.append(
                f"{margin:g} dB: {statistics.mean(d):+.2f} ({min(d):+.2f}; "
                f"{sum(x < -0.1 for x in d)})"
            )
        print(f"  {dep_name:<8}{len(rows):3d} rows  " + "   ".join(cells))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--networks", nargs="+", default=["lite0", "trained_cnn", *other.RANDOM])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--draws", type=int, default=8)
    ap.add_argument("--deployments", nargs="+", default=list(bd.DEPLOYMENTS))
    ap.add_argument("--best", action="store_true", help="also the best draw on the eval inputs")
    ap.add_argument("--margins", type=float, nargs="+", default=list(MARGINS))
    ap.add_argument(
        "--one-half",
        action="store_true",
        help="with --best: also choose on one half measured (as verify did before it "
        "measured both ways round)",
    )
    ap.add_argument(
        "--bias-correction",
        action="store_true",
        help="every equalization also corrects the biases (bias_correction=True: it "
        "changes the FP32 function by design; the input means measured where calibrated)",
    )
    ap.add_argument(
        "--by-source",
        action="store_true",
        help="Lite0: also measure on the 60 images of the sources the choice did not see",
    )
    args = ap.parse_args()
    logging.getLogger("cle_core").setLevel(logging.ERROR)
    logging.getLogger("cle_onnx").setLevel(logging.ERROR)
    import tempfile

    gains: dict[str, list[tuple[float, float]]] = {d: [] for d in args.deployments}
    by_margin: dict[str, list] = {d: [] for d in args.deployments}
    by_half: dict[str, list] = {d: [] for d in args.deployments}
    print(
        f"{'network':<17}{'deploy':<9}{'none':>7}{'default':>8}{'calib':>7}{'verify':>8}"
        f"{'draws':>8}"
        f"{'kept':>6}{'-def':>7}{'-ver':>7}" + (f"{'best':>8}" if args.best else "") + "   s"
    )
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.networks:
            for label, proto, x, calib in onnx_cases(name, args.seeds, Path(tmp)):
                for dep_name in args.deployments:
                    dep = bd.DEPLOYMENTS[dep_name]
                    kind = "W8" if dep.weights_only else "W8A8"
                    key = "w8_sqnr" if dep.weights_only else "w8a8_sqnr"
                    opts = {"deployment": dep, "bias_correction": args.bias_correction}
                    default, _ = cle_onnx.equalize_model(proto, **opts)
                    calibrated, _ = cle_onnx.equalize_model(proto, calibration=calib, **opts)
                    verified, _ = cle_onnx.equalize_model(
                        proto, calibration=calib, verify=True, **opts
                    )
                    t0 = time.perf_counter()
                    drawn, report = cle_onnx.equalize_model(
                        proto, calibration=calib, verify=True, draws=args.draws, **opts
                    )
                    seconds = time.perf_counter() - t0
                    v = report.verification
                    kept = str(v.draw) if v.kept == "equalized" else "-"
                    cands = [None, default, calibrated, verified, drawn]
                    if args.best:
                        cands += [
                            cle_onnx.equalize_model(proto, calibration=calib, scale_draw=k, **opts)[
                                0
                            ]
                            for k in range(1, args.draws + 1)
                        ]
                    figures = [
                        r[key]
                        for r in cle_onnx.evaluate_all(
                            proto, cands, x, deployment=dep, calibration=calib
                        )
                    ]
                    none, dflt, cal, ver, drw = figures[:5]
                    gains[dep_name].append((drw - dflt, drw - ver))
                    best = f"{max([cal, *figures[5:]]):8.2f}" if args.best else ""
                    print(
                        f"{label:<17}{dep_name:<9}{none:7.2f}{dflt:8.2f}{cal:7.2f}{ver:8.2f}"
                        f"{drw:8.2f}"
                        f"{kept:>6}{drw - dflt:+7.2f}{drw - ver:+7.2f}{best}   {seconds:.0f}",
                        flush=True,
                    )
                    if args.best:
                        split = [v.original_db, v.equalized_db, *v.drawn]
                        line, chosen = margin_rows(
                            report, dep, split, [none, cal, *figures[5:]], args.margins
                        )
                        by_margin[dep_name].append((chosen, ver))
                        print(f"{'':17}{line}", flush=True)
                        if args.one_half:
                            half = one_half(proto, dep, calib, [calibrated, *cands[5:]], split)
                            line, chosen = margin_rows(
                                report, dep, half, [none, cal, *figures[5:]], args.margins
                            )
                            by_half[dep_name].append((chosen, ver))
                            print(f"{'':17}one half: {line}", flush=True)
                    if args.by_source and label.startswith("lite0"):
                        # the choice measured crops of sources 10-19: sources 0-9 are
                        # images 0-59 (six per source)
                        unseen = [
                            r[key]
                            for r in cle_onnx.evaluate_all(
                                proto, cands[1:5], x[:60], deployment=dep, calibration=calib
                            )
                        ]
                        print(
                            f"{'':17}{'':9}on the 60 images of unseen sources: default "
                            f"{unseen[0]:.2f}, calib {unseen[1]:.2f}, verify {unseen[2]:.2f}, "
                            f"draws {unseen[3]:.2f}"
                            f" ({kind})",
                            flush=True,
                        )
    print(f"means over the cases ({args.draws} draws): draws - default, draws - verify, worst")
    for dep_name, g in gains.items():
        if g:
            a, b = [x[0] for x in g], [x[1] for x in g]
            print(
                f"  {dep_name:<8}{len(g):3d} cases  {statistics.mean(a):+.2f} "
                f"(worst {min(a):+.2f}, best {max(a):+.2f})   {statistics.mean(b):+.2f} "
                f"(worst {min(b):+.2f})"
            )
    if args.best:
        margin_summary(by_margin, args.margins)
    if args.one_half:
        print("chosen on one half (the first calibrating, the second measured):")
        margin_summary(by_half, args.margins)


if __name__ == "__main__":
    main()
