"""``cle equalize``: equalize a model file, check it, report and plot."""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

from .._backend import get_backend_for_file
from .._files import check_output_path, write_atomic
from .._report import Report
from .._verify import quality_key, split_inputs, verdict
from ._common import (
    EXIT_CHECK_FAILED,
    EXIT_OK,
    Progress,
    UsageError,
    add_cle_options,
    add_verbose_flag,
    cle_options,
    fmt_db,
    input_spec,
    parse_dims,
)
from .inspect import blocking_reasons, format_summary, nothing_done

CHECK_DB = {"float16": 30.0, "bfloat16": 20.0}
"""Default ``--check`` threshold per output dtype (SQNR in dB); 80 dB for every other
float type. Float32 rounding leaves 110-140 dB on real models; half precision rounds
every equalized weight to 11 bits."""
DEFAULT_CHECK_DB = 80.0


def add_parser(sub) -> None:
    eq = sub.add_parser(
        "equalize",
        help="equalize a model file (.onnx, or any format a backend plugin reads)",
        description="Equalize the model file IN and write the result to OUT "
        "(atomically). Prints a summary.",
    )
    eq.add_argument("input", metavar="IN")
    eq.add_argument(
        "-o",
        "--output",
        metavar="OUT",
        help="where to write the equalized model (required unless --in-place)",
    )
    eq.add_argument("--in-place", action="store_true", help="overwrite IN")
    eq.add_argument("--report", metavar="FILE", help="write the full JSON report to FILE")
    eq.add_argument(
        "--check",
        action="store_true",
        help="run original and result (onnxruntime for ONNX) on random inputs and print each "
        "output's SQNR (result against original); exit 1 if one is below the threshold",
    )
    eq.add_argument(
        "--check-db",
        type=float,
        metavar="DB",
        help=f"--check threshold in dB (default: {DEFAULT_CHECK_DB:g} for float32 outputs, "
        + ", ".join(f"{v:g} for {k}" for k, v in CHECK_DB.items())
        + ")",
    )
    eq.add_argument(
        "--dim",
        action="append",
        default=[],
        metavar="NAME=SIZE",
        help="size of a dynamic input dimension for --check (repeatable)",
    )
    eq.add_argument(
        "--plot",
        metavar="DIR",
        help="draw per-channel weight ranges (worst layers) and per-layer SQNR "
        "into DIR (needs matplotlib)",
    )
    eq.add_argument("--quiet", action="store_true", help="print only errors")
    add_verbose_flag(eq)
    eq.add_argument(
        "--calibration",
        metavar="DIR|FILE.npy",
        help="measure the noise objective's statistics on these inputs instead of "
        "estimating them from the batch norms; a few dozen are enough: a folder of images "
        "(at most 50 megapixels each; resized to the model's input) or a .npy array of "
        "finite numbers (floats for a float input, integers for an integer one)",
    )
    eq.add_argument(
        "--verify",
        action="store_true",
        help="with --calibration: quantize the original (batch norms folded) and the "
        "result as the deployment flags say (ONNX: onnxruntime's quantize_static, "
        "calibrated on half of the inputs, measured on the other half), print both and "
        "keep the better (a warning if that is the original)",
    )
    add_cle_options(eq)
    eq.set_defaults(run=run)


def run(args) -> int:
    # Everything that can be refused is refused before the first byte is written.
    src = Path(args.input)
    if args.in_place and args.output and Path(args.output).resolve() != src.resolve():
        raise UsageError("give either -o OUT or --in-place, not both")
    if not args.in_place:
        if not args.output:
            raise UsageError("missing -o OUT (or --in-place to overwrite the input)")
        if Path(args.output).resolve() == src.resolve():
            raise UsageError("the output is the input; pass --in-place to overwrite it")
    dst = src if args.in_place else Path(args.output)
    dims = parse_dims(args.dim)
    backend = get_backend_for_file(src)
    options = cle_options(args)
    if args.check and args.in_place:
        raise UsageError("--check compares with the input file, which --in-place overwrites")
    check_output_path(dst)
    if args.report:
        check_output_path(args.report, "report")
        if Path(args.report).resolve() in (src.resolve(), dst.resolve()):
            raise UsageError("--report would overwrite a model file")
    if args.plot and Path(args.plot).exists() and not Path(args.plot).is_dir():
        raise UsageError(f"--plot {args.plot} exists and is not a directory")
    if args.plot and not Path(args.plot).exists():
        check_output_path(args.plot, "--plot")  # created, but only where -o could write
    if args.calibration and options.objective == "balance" and not args.verify:
        raise UsageError(
            "--calibration measures statistics the balance objective does not use "
            "(give --objective noise, or --verify to measure on it)"
        )
    if args.verify and not args.calibration:
        raise UsageError("--verify needs --calibration: the inputs to measure on")
    if args.verify and args.in_place:
        raise UsageError("--verify compares with the input file, which --in-place overwrites")
    feeds = backend.check_feeds(src, dims) if args.check else None
    calibration = None
    if args.calibration:
        calibration = backend.read_inputs(input_spec(args.calibration, "--calibration"), src)
    with Progress() as progress:
        progress.update("loading", 0.0)
        report, files = backend.equalize_file(
            src,
            dst,
            options,
            progress=lambda s, f: progress.update(s, 0.1 + 0.8 * f),
            calibration=calibration,
        )
    if args.verify:
        report = _verify(backend, src, dst, options, calibration, report)
    if args.report:
        write_atomic(args.report, report.to_json(indent=1))
    plots = _plots(report, args.plot) if args.plot else []
    if nothing_done(report):
        print(
            "cle: warning: nothing was equalized (the output computes the same function "
            "with the same weights); what blocks it:\n  "
            + "\n  ".join(blocking_reasons(report, top=3)),
            file=sys.stderr,
        )
    if not args.quiet:
        print(format_summary(report, args.verbose))
        print(
            f"wrote {' and '.join(str(f) for f in files)}"
            + (f" and report {args.report}" if args.report else "")
        )
        for path in plots:
            print(f"wrote {path}")
        if args.plot and not plots:
            print(
                f"plots: nothing to plot (no layer was translated, nothing was equalized); "
                f"{args.plot} not written"
            )
        elif args.plot and not any(p.name == "channel_ranges.png" for p in plots):
            print("plots: no channel_ranges.png (no layer's weights changed)")
    if feeds is not None:
        failed = 0
        for name, sqnr, max_abs, max_rel, dtype, before in backend.compare(src, dst, feeds):
            threshold = _threshold(args.check_db, dtype)
            bad = check_failed(sqnr, before, threshold)
            failed += bad
            extra = "" if before is None else f"; before the final {before[0]}: "
            extra += "" if before is None else f"{fmt_db(before[1]).strip()} dB"
            print(
                f"check: output {name!r}: SQNR {fmt_db(sqnr).strip()} dB "
                f"(max abs error {max_abs:.3e}, relative {max_rel:.3e}{extra}; threshold "
                f"{threshold:g} dB) {'FAILED' if bad else 'ok'}"
            )
        if failed:
            print(
                f"cle: check failed: {failed} output(s) differ from the original beyond "
                f"the threshold; {dst} was written but does not compute the same function",
                file=sys.stderr,
            )
            return EXIT_CHECK_FAILED
    return EXIT_OK


def _verify(backend, src: Path, dst: Path, options, calibration, report: Report) -> Report:
    """Measure the original (batch norms folded) and ``dst`` in the deployment; where the
    original measures better, ``dst`` becomes the folded original (atomically again)."""
    deployment = options.deployment
    calibrate_on, measure_on, count = split_inputs(calibration)
    rows, _, _ = backend.evaluate_files(
        [src, dst], measure_on, deployment=deployment, calibration=calibrate_on
    )
    key = quality_key(deployment)
    report, keep = verdict(report, deployment, count, rows[0][1][key], rows[1][1][key])
    if not keep:
        backend.equalize_file(src, dst, replace(options, scale=False, high_bias=False))
    return report


def _threshold(given: float | None, dtype: str) -> float:
    return given if given is not None else CHECK_DB.get(dtype, DEFAULT_CHECK_DB)


def _plots(report: Report, directory: str) -> list[Path]:
    from .._plots import write_plots

    try:
        return write_plots(report, directory)
    except ImportError as exc:
        raise UsageError(str(exc)) from None


def check_failed(sqnr: float, before, threshold: float) -> bool:
    """An output fails ``--check`` below ``threshold`` dB, unless it comes out of a
    saturating activation whose input (``before``: ``(op, SQNR dB)``) agrees."""
    return sqnr < threshold and (before is None or before[1] < threshold)
