"""``cle equalize``: equalize a model file, check it, report and plot."""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

from .._backend import get_backend_for_file
from .._check import OutputCheck, Probe, figure_passes, fmt_sqnr
from .._errors import CLEError
from .._files import check_output_path, temp_folder, write_atomic
from .._objectives import objective_trait
from .._quality import describe_arrays
from .._report import EqualizeOptions, Report
from .._verify import check_draws, folded_only, measure_pairs, pick
from ._common import (
    EXIT_CHECK_FAILED,
    EXIT_OK,
    INPUTS_METAVAR,
    Progress,
    UsageError,
    add_cle_options,
    add_size_options,
    add_verbose_flag,
    cle_options,
    flag_names,
    input_spec,
    parse_dims,
    parse_shapes,
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
        "output's SQNR (result against original), judging an output behind a discontinuous "
        "op (TopK, NMS, ArgMax ...) on the values before it; exit 1 if one is below the "
        "threshold",
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
        "--inputs",
        metavar=INPUTS_METAVAR,
        help="the inputs --check runs both models on, instead of random ones: a folder of "
        "images, a .npy array (a model with one input) or a .npz of arrays by input name "
        "(integer and boolean inputs need their real values here)",
    )
    add_size_options(eq, "for --check's random inputs, images and shape inference")
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
        metavar=INPUTS_METAVAR,
        help="measure the noise objective's statistics on these inputs instead of "
        "estimating them from the batch norms; a few dozen are enough: a folder of images "
        "(at most 50 megapixels each; resized to the model's input), a .npy array of "
        "finite numbers (floats for a float input, integers for an integer one) or a .npz "
        "of such arrays by input name",
    )
    eq.add_argument(
        "--verify",
        action="store_true",
        help="with --calibration: quantize the original (batch norms folded) and the "
        "result as the deployment flags say (ONNX: onnxruntime's quantize_static, "
        "each half of the inputs calibrating while the other is measured, the mean of the "
        "two), print both and keep the better (a warning if that is the original)",
    )
    eq.add_argument(
        "--draws",
        type=int,
        default=0,
        metavar="N",
        help="with --verify: also measure N redrawn equalizations (--scale-draw 1 to N, "
        "each exact) and keep the best of all; one quantized figure is one draw of the "
        "rounding, and draws spread by several dB (costs N more equalizations and N more "
        "quantizations per half measured; the N + 2 models are held in memory while "
        "measured)",
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
    dims, shapes = parse_dims(args.dim), parse_shapes(args.input_shape)
    if args.inputs and not args.check:
        raise UsageError("--inputs are what --check runs on; give --check too")
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
    if (
        args.calibration
        and not objective_trait(options.objective, "uses_statistics")
        and not (args.verify or options.bias_correction)
    ):
        raise UsageError(
            f"--calibration measures statistics the {options.objective} objective does not use "
            "(give --objective noise, --bias-correction, or --verify to measure on it)"
        )
    if options.bias_correction_form == "empirical" and not args.calibration:
        raise UsageError("--bias-correction empirical measures on the --calibration inputs")
    if args.verify and not args.calibration:
        raise UsageError("--verify needs --calibration: the inputs to measure on")
    if args.verify and args.in_place:
        raise UsageError("--verify compares with the input file, which --in-place overwrites")
    try:
        check_draws(args.draws, args.verify, options)
    except CLEError as exc:  # the library's rules, in the flags' words
        raise UsageError(flag_names(str(exc), _DRAW_FLAGS)) from None
    feeds = None
    if args.check:
        given = None
        if args.inputs:
            given = backend.read_inputs(input_spec(args.inputs, "--inputs"), src, dims, shapes)
        feeds = backend.check_feeds(src, dims, shapes, given)
    calibration = None
    if args.calibration:
        spec = input_spec(args.calibration, "--calibration")
        calibration = backend.read_inputs(spec, src, dims, shapes)
    # The calibration statistics measured for the first run serve --verify's draws and
    # the draw it keeps (measuring them is most of a calibrated run's time).
    with backend.statistics_reused():
        with Progress() as progress:
            progress.update("loading", 0.0)
            sizes = {"dims": dims, "shapes": shapes} if dims or shapes else {}
            report, files = backend.equalize_file(
                src,
                dst,
                options,
                progress=lambda s, f: progress.update(s, 0.1 + 0.8 * f),
                calibration=calibration,
                **sizes,
            )
        if args.verify:
            report, options = _verify(
                backend, src, dst, options, calibration, report, args.draws, sizes
            )
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
        if calibration is not None:
            print(f"calibration: {args.calibration}: {describe_arrays(calibration)}")
    if feeds is not None:
        source = f"inputs from {args.inputs}:" if args.inputs else "random inputs"
        print(f"check: {source} {describe_arrays(feeds)}")
        with temp_folder("check") as tmp:
            exact = dst
            if options.bias_correction:
                # The correction changes FP32 outputs by design: the check judges the
                # equalization without it (the same scales, the biases before the last
                # pass) and reports the correction's change beside it.
                exact = tmp / f"uncorrected{src.suffix}"
                backend.equalize_file(src, exact, replace(options, bias_correction=False))
                print("check: the equalization, before the bias correction:")
            failed = 0
            for check in backend.compare(src, exact, feeds):
                bad = check_failed(check, args.check_db)
                failed += bad
                print("\n".join(format_check(check, args.check_db, bad)))
            if options.bias_correction:
                for check in backend.compare(src, dst, feeds):
                    print(
                        f"check: with the bias correction, output {check.name!r} against "
                        f"the original: SQNR {fmt_sqnr(check.sqnr)} (changed by design, "
                        "not judged)"
                    )
        if failed:
            print(
                f"cle: check failed: {failed} output(s) differ from the original beyond "
                f"the threshold; {dst} was written but does not compute the same function",
                file=sys.stderr,
            )
            return EXIT_CHECK_FAILED
    return EXIT_OK


# check_draws' Python spellings, as the flags spell them
_DRAW_FLAGS = {
    "verify=True": "--verify",
    "scale_draw=": "--scale-draw",
    "draws=": "--draws",
    "draws": "--draws",
}


def _verify(
    backend, src: Path, dst: Path, options, calibration, report: Report, draws: int, sizes
) -> tuple[Report, EqualizeOptions]:
    """Measure the original (batch norms folded), ``dst`` and ``draws`` redrawn
    equalizations in the deployment; ``dst`` becomes the best measured (atomically
    again: the folded original, or the equalization of the draw kept). Returns the
    report of what ``dst`` holds and the options that made it."""
    deployment = options.deployment
    pairs, count = measure_pairs(calibration, deployment)

    def equalized(k: int, path: Path) -> Report:
        drawn = replace(options, scale_draw=k)
        return backend.equalize_file(src, path, drawn, calibration=calibration, **sizes)[0]

    with temp_folder("draws") as tmp:  # (within the caller's statistics_reused block)
        paths = [src, dst]
        for k in range(1, draws + 1):
            paths.append(tmp / f"draw{k}{src.suffix}")
            equalized(k, paths[-1])
        original, *figures = backend.measure_files(paths, pairs, deployment)
    verified, kept = pick(report, deployment, count, original, figures)
    if kept is None:
        backend.equalize_file(src, dst, folded_only(options))
        return verified, options
    if kept:
        options = replace(options, scale_draw=kept)
        report = equalized(kept, dst)  # the same as the draw measured: a deterministic run
    return replace(report, verification=verified.verification), options


def _threshold(given: float | None, dtype: str) -> float:
    return given if given is not None else CHECK_DB.get(dtype, DEFAULT_CHECK_DB)


def _plots(report: Report, directory: str) -> list[Path]:
    from .._plots import write_plots

    try:
        return write_plots(report, directory)
    except ImportError as exc:
        raise UsageError(str(exc)) from None


def check_failed(check: OutputCheck, check_db: float | None = None) -> bool:
    """Whether an output fails ``--check``: one of its probes (or, without probes, the
    output itself) is below its threshold (``check_db``, or the default for its dtype)
    and is not made by a saturating activation whose input reaches it. An integer or
    bool output without probes is computed from exact values only: it must be equal."""
    if check.probes:
        return not all(
            figure_passes(p.sqnr, p.before, _threshold(check_db, p.dtype)) for p in check.probes
        )
    if check.differing is not None:
        return check.differing[0] > 0
    return not figure_passes(check.sqnr, check.before, _threshold(check_db, check.dtype))


def format_check(check: OutputCheck, check_db: float | None, bad: bool) -> list[str]:
    """The ``--check`` lines of one output: its own figures, then, behind a
    discontinuous operation, one indented line per value it is judged on."""
    verdict = "FAILED" if bad else "ok"
    head = f"check: output {check.name!r}: "
    if check.shapes is not None:
        own, notes = f"shape {check.shapes[1]}", [f"the original's shape {check.shapes[0]}"]
    elif check.differing is not None:
        # An SQNR of indices or labels means nothing: say how many changed.
        own, notes = f"{check.differing[0]} of {check.differing[1]} elements differ", []
    else:
        own = f"SQNR {fmt_sqnr(check.sqnr)}"
        notes = [f"max abs error {check.max_abs:.3e}, relative {check.max_rel:.3e}"]
    if check.probes:
        detail = f" ({'; '.join(notes)})" if notes else ""
        lines = [
            f"{head}{own}{detail}, behind discontinuous ops; judged on the values before "
            f"them: {verdict}"
        ]
        for p in check.probes:
            label = f"{p.value!r}, input of {p.op} {p.node!r}"
            lines.append("  " + _figure(label, p, _threshold(check_db, p.dtype)))
        return lines
    if check.differing is not None:
        return [f"{head}{own} {verdict}"]
    threshold = _threshold(check_db, check.dtype)
    before = check.before
    if check.sqnr < threshold and before is not None and before[1] >= threshold:
        # Say which figure passed: "33 dB ... ok" would read as passing an 80 dB threshold.
        notes.append("saturation turns float rounding into relative error")
        return [
            f"{head}judged on the input of the final {before[0]}: {fmt_sqnr(before[1])} >= "
            f"{threshold:g} dB ok; the output itself: {own} ({'; '.join(notes)})"
        ]
    if before is not None and check.sqnr < threshold:
        notes.append(f"the input of the final {before[0]}: {fmt_sqnr(before[1])}")
    notes.append(f"threshold {threshold:g} dB")
    return [f"{head}{own} ({'; '.join(notes)}) {verdict}"]


def _figure(label: str, probe: Probe, threshold: float) -> str:
    """One judged value against ``threshold``, naming the figure that decides."""
    if probe.sqnr >= threshold:
        return f"{label}: SQNR {fmt_sqnr(probe.sqnr)} >= {threshold:g} dB ok"
    if probe.before is not None and probe.before[1] >= threshold:
        return (
            f"{label}: judged on the input of the {probe.before[0]} making it: "
            f"{fmt_sqnr(probe.before[1])} >= {threshold:g} dB ok; the value itself: "
            f"{fmt_sqnr(probe.sqnr)} (saturation turns float rounding into relative error)"
        )
    text = f"{label}: SQNR {fmt_sqnr(probe.sqnr)} < {threshold:g} dB"
    if probe.before is not None:
        text += f", the input of the {probe.before[0]} making it: {fmt_sqnr(probe.before[1])}"
    return text + " FAILED"
