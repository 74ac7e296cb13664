"""The ``cle`` command line.

Exit status: 0 on success; 2 on bad usage or bad input (one line on stderr, no
traceback unless ``--debug``, nothing written); 1 when ``--check`` finds that the output
does not compute what the input does, or on an internal error; 130 on Ctrl-C and 143 on
SIGTERM (temporary files removed, the destination untouched).
"""

from __future__ import annotations

import argparse
import math
import re
import signal
import sys
import threading
import time
from pathlib import Path

from ._backend import get_backend_for_file, get_plugin_manager
from ._errors import CLEError
from ._files import check_output_path, write_atomic
from ._quality import quality_table
from ._report import EqualizeOptions, Report, _deployment

EXIT_OK, EXIT_INTERNAL, EXIT_BAD_INPUT = 0, 1, 2
EXIT_CHECK_FAILED = 1
EXIT_INTERRUPTED, EXIT_TERMINATED = 130, 143

CHECK_DB = {"float16": 30.0, "bfloat16": 20.0}
"""Default ``--check`` threshold per output dtype (SQNR in dB); 80 dB for every other
float type. Float32 rounding leaves 110-140 dB on real models; half precision rounds
every equalized weight to 11 bits."""
DEFAULT_CHECK_DB = 80.0


class UsageError(CLEError):
    """Bad command-line usage that argparse cannot see."""


class Terminated(BaseException):
    """SIGTERM arrived; raised in the main thread so that clean-up runs as for Ctrl-C."""


def _on_sigterm(signum, frame) -> None:
    raise Terminated()


class Progress:
    """A progress bar on stderr, shown only on a terminal and only once the work has
    taken longer than ``delay`` seconds."""

    def __init__(self, enabled: bool | None = None, delay: float = 2.0, stream=None):
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.delay = delay
        self.stage, self.fraction = "starting", 0.0
        self.start = time.monotonic()
        self.shown = False
        self._stop = threading.Event()
        self._thread = None

    def __enter__(self) -> Progress:
        if self.enabled:
            self._thread = threading.Thread(target=self._loop, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.shown:
            self.stream.write("\r\x1b[K")
            self.stream.flush()

    def update(self, stage: str, fraction: float) -> None:
        self.stage, self.fraction = stage, max(self.fraction, min(1.0, fraction))

    def _loop(self) -> None:
        while not self._stop.wait(0.2):
            elapsed = time.monotonic() - self.start
            if elapsed < self.delay:
                continue
            width = 30
            filled = int(round(self.fraction * width))
            bar = "#" * filled + "-" * (width - filled)
            self.stream.write(
                f"\r[{bar}] {self.fraction * 100:3.0f}% {self.stage} ({elapsed:.0f} s)\x1b[K"
            )
            self.stream.flush()
            self.shown = True


def _add_cle_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("equalization")
    g.add_argument("--no-fold", action="store_true", help="do not fold batch norms")
    g.add_argument("--no-scale", action="store_true", help="do not run cross-layer scaling")
    g.add_argument("--no-high-bias", action="store_true", help="turn off high-bias absorption")
    g.add_argument(
        "--high-bias-form",
        choices=("exact", "classic"),
        default="exact",
        help="exact (default) moves the shift into the activation's lower bound; "
        "classic keeps it at 0 and changes FP32 outputs (the report says how much)",
    )
    g.add_argument(
        "--high-bias-through-padding",
        action="store_true",
        help="also absorb into layers that zero-pad the activation (inexact at borders)",
    )
    g.add_argument(
        "--objective",
        choices=("noise", "balance"),
        default="noise",
        help="noise (default): scales that minimize the estimated quantization noise of "
        "the deployment below; balance: the paper's and AIMET's equal weight ranges",
    )
    g.add_argument(
        "--weight-bits",
        type=int,
        default=EqualizeOptions.weight_bits,
        metavar="N",
        help="bits of the per-tensor weight grids you deploy with (default: %(default)s)",
    )
    g.add_argument(
        "--activation-bits",
        type=_bits_or_none,
        default=EqualizeOptions.activation_bits,
        metavar="N|none",
        help="bits of the per-tensor activation grids, or 'none' for weights-only "
        "quantization (default: %(default)s)",
    )
    g.add_argument(
        "--activation-weight",
        type=float,
        default=EqualizeOptions.activation_weight,
        metavar="W",
        help="--objective balance only (deprecated): weight of estimated activation ranges "
        "as extra sources (default: %(default)s)",
    )
    g.add_argument(
        "--max-sweeps",
        type=int,
        default=EqualizeOptions.max_sweeps,
        metavar="N",
        help="most sweeps over all regions (default: %(default)s)",
    )
    g.add_argument(
        "--tolerance",
        type=float,
        default=None,
        metavar="T",
        help="stop when a sweep lowers the noise estimate by less than the fraction T "
        "(default 0.003), or, with --objective balance, when no scale changes by more "
        "than T (default 1e-4)",
    )


def _options(args) -> EqualizeOptions:
    return EqualizeOptions(
        fold_bn=not args.no_fold,
        scale=not args.no_scale,
        high_bias=not args.no_high_bias,
        high_bias_form=args.high_bias_form,
        high_bias_through_padding=args.high_bias_through_padding,
        objective=args.objective,
        weight_bits=args.weight_bits,
        activation_bits=args.activation_bits,
        max_sweeps=args.max_sweeps,
        tolerance=args.tolerance,
        activation_weight=args.activation_weight,
    )


def _bits_or_none(text: str) -> int | None:
    if text.lower() == "none":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a number of bits or 'none', got {text!r}"
        ) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cle",
        description="Exact cross-layer equalization: fold batch norms, balance per-channel "
        "weight ranges across layers, absorb high biases, and report what was done.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

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
    eq.add_argument(
        "--calibration",
        metavar="DIR|FILE.npy",
        help="measure the noise objective's statistics on these inputs (a folder of "
        "images, resized to the model's input, or a .npy array) instead of estimating "
        "them from the batch norms; a few dozen are enough",
    )
    _add_cle_options(eq)

    ev = sub.add_parser(
        "evaluate",
        help="measure what quantization does to a model file",
        description="Quantize ORIGINAL (and EQUALIZED, if given) as its backend does "
        "(ONNX: onnxruntime's quantize_static, QDQ, MinMax calibration on the inputs; "
        "weights only: quantized weight values) and print the output SQNR and top-1 "
        "agreement against the FP32 ORIGINAL.",
    )
    ev.add_argument("original", metavar="ORIGINAL")
    ev.add_argument("equalized", metavar="EQUALIZED", nargs="?")
    ev.add_argument(
        "--inputs",
        metavar="DIR|FILE.npy",
        help="a folder of images or a .npy array of inputs (default: the 120 "
        "sample images of scikit-image at the model's input size)",
    )
    ev.add_argument(
        "--bits",
        type=int,
        default=8,
        help="bits for weights and activations: 4, 8 or 16 with activations (what "
        "onnxruntime offers), 2 to 16 with --weights-only (default: %(default)s)",
    )
    ev.add_argument(
        "--per-channel",
        action="store_true",
        help="one weight grid per output channel instead of per tensor",
    )
    ev.add_argument("--symmetric", action="store_true", help="symmetric grids (default asymmetric)")
    ev.add_argument("--weights-only", action="store_true", help="do not quantize activations")
    ev.add_argument("--batch", type=int, default=16, help="batch size (default: %(default)s)")

    ins = sub.add_parser(
        "inspect",
        help="show what CLE would do, write nothing",
        description="Print the regions CLE would equalize in the model file IN and the "
        "candidates it would skip, with reasons. Writes nothing.",
    )
    ins.add_argument("input", metavar="IN")
    _add_cle_options(ins)
    get_plugin_manager().hook.cle_add_commands(subparsers=sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return _main(parser, args)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _main(parser, args) -> int:
    try:
        if args.command == "equalize":
            return _equalize(args)
        if args.command == "inspect":
            return _inspect(args)
        if args.command == "evaluate":
            return _evaluate(args)
        if hasattr(args, "run"):  # a command a backend added
            return args.run(args)
        parser.error(f"unknown command {args.command}")
    except CLEError as exc:
        if args.debug:
            raise
        print(f"cle: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("cle: interrupted; the output was not changed", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Terminated:
        print("cle: terminated; the output was not changed", file=sys.stderr)
        return EXIT_TERMINATED
    except Exception as exc:  # a bug: say so in one line, traceback on request
        if args.debug:
            raise
        print(
            f"cle: internal error: {exc.__class__.__name__}: {exc} (rerun with --debug)",
            file=sys.stderr,
        )
        return EXIT_INTERNAL
    return EXIT_OK


def _equalize(args) -> int:
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
    dims = _parse_dims(args.dim)
    backend = get_backend_for_file(src)
    options = _options(args)
    if args.check and args.in_place:
        raise UsageError("--check compares with the input file, which --in-place overwrites")
    check_output_path(dst)
    if args.report:
        check_output_path(args.report, "report")
        if Path(args.report).resolve() in (src.resolve(), dst.resolve()):
            raise UsageError("--report would overwrite a model file")
    if args.plot and Path(args.plot).exists() and not Path(args.plot).is_dir():
        raise UsageError(f"--plot {args.plot} exists and is not a directory")
    if args.calibration and options.objective != "noise":
        raise UsageError("--calibration needs --objective noise")
    feeds = backend.check_feeds(src, dims) if args.check else None
    calibration = None
    if args.calibration:
        calibration = backend.read_inputs(_input_spec(args.calibration, "--calibration"), src)
    with Progress() as progress:
        progress.update("loading", 0.0)
        report, files = backend.equalize_file(
            src,
            dst,
            options,
            progress=lambda s, f: progress.update(s, 0.1 + 0.8 * f),
            calibration=calibration,
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
        print(format_summary(report))
        print(
            f"wrote {' and '.join(str(f) for f in files)}"
            + (f" and report {args.report}" if args.report else "")
        )
        for path in plots:
            print(f"wrote {path}")
    if feeds is not None:
        failed = 0
        for name, sqnr, max_abs, max_rel, dtype, before in backend.compare(src, dst, feeds):
            threshold = _threshold(args.check_db, dtype)
            bad = check_failed(sqnr, before, threshold)
            failed += bad
            extra = "" if before is None else f"; before the final {before[0]}: "
            extra += "" if before is None else f"{_fmt_db(before[1]).strip()} dB"
            print(
                f"check: output {name!r}: SQNR {_fmt_db(sqnr).strip()} dB "
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


def _threshold(given: float | None, dtype: str) -> float:
    return given if given is not None else CHECK_DB.get(dtype, DEFAULT_CHECK_DB)


def _plots(report: Report, directory: str) -> list[Path]:
    from ._plots import write_plots

    try:
        return write_plots(report, directory)
    except ImportError as exc:
        raise UsageError(str(exc)) from None


def _evaluate(args) -> int:
    if args.bits < 2 or args.bits > 16:
        raise UsageError("--bits must be between 2 and 16")
    paths = [Path(p) for p in (args.original, args.equalized) if p]
    backend = get_backend_for_file(paths[0])
    inputs = None
    if args.inputs:
        inputs = backend.read_inputs(_input_spec(args.inputs, "--inputs"), paths[0])
    rows, classifier, notes = backend.evaluate_files(
        paths,
        inputs,
        bits=args.bits,
        per_channel=args.per_channel,
        symmetric=args.symmetric,
        activations=not args.weights_only,
        batch=args.batch,
    )
    print(quality_table(rows, args.bits, classifier=classifier))
    for note in notes:
        print(note)
    return EXIT_OK


def _input_spec(spec: str, flag: str) -> Path:
    """``spec`` if it is a folder or a ``.npy`` file (what backends read inputs from)."""
    path = Path(spec)
    if path.is_dir() or (path.suffix == ".npy" and path.is_file()):
        return path
    raise UsageError(f"{path}: {flag} takes a folder of images or a .npy file")


def _inspect(args) -> int:
    report = get_backend_for_file(args.input).inspect_file(Path(args.input), _options(args))
    print(format_inspection(report))
    return EXIT_OK


def _parse_dims(items: list[str]) -> dict[str, int]:
    dims = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not value.isdigit() or int(value) < 1:
            raise UsageError(f"--dim expects NAME=SIZE with SIZE >= 1, got {item!r}")
        dims[name] = int(value)
    return dims


def check_failed(sqnr: float, before, threshold: float) -> bool:
    """An output fails ``--check`` below ``threshold`` dB, unless it comes out of a
    saturating activation whose input (``before``: ``(op, SQNR dB)``) agrees."""
    return sqnr < threshold and (before is None or before[1] < threshold)


def _fmt_db(x: float) -> str:
    return f"{x:7.2f}" if math.isfinite(x) else f"{'inf' if x > 0 else '-inf':>7}"


def _stop_reason(report: Report) -> str:
    history = report.noise.history if report.noise is not None else []
    if len(history) >= 2 and history[-2] > 0:
        gain = 100 * (history[-2] - history[-1]) / history[-2]
        state = "converged" if report.converged else "stopped at max_sweeps"
        return f"{state}: the last sweep lowered the estimate by {gain:.1f} %"
    state = "converged" if report.converged else "not converged"
    return f"{state}, max change {report.max_change:.1e}"


def format_summary(report: Report) -> str:
    """The text ``cle equalize`` prints."""
    objective = report.options.objective
    if objective == "noise" and report.noise is None and report.regions:
        objective = "balance (the noise estimate is not finite on this model, see skipped)"
    elif report.noise is not None and report.regions:
        objective += (
            f" ({_deployment(report.options)}): est. output SQNR "
            f"{_fmt_db(report.noise.sqnr_before).strip()} dB -> "
            f"{_fmt_db(report.noise.sqnr_after).strip()} dB"
        )
    lines = [
        f"batch norms folded: {len(report.folds)}",
        f"regions equalized:  {len(report.regions)}"
        + (f" ({', '.join(f'{n} {k}' for k, n in _kinds(report))})" if report.regions else ""),
        f"objective:          {objective}",
        f"sweeps:             {report.sweeps} ({_stop_reason(report)})",
        f"high-bias absorbed: {len(report.high_bias)} layers"
        + (
            ""
            if all(r.exact for r in report.high_bias)
            else f" ({sum(not r.exact for r in report.high_bias)} inexact, see the report)"
        ),
    ]
    lines.append(f"skipped:            {len(report.skipped)}")
    for s in report.skipped:
        lines.append(f"  [{s.stage}] {s.candidate}: {s.reason}")
    if not report.layers:
        lines.append("estimated INT8 weight SQNR per layer: no layer was translated")
        return "\n".join(lines)
    lines.append("estimated INT8 weight SQNR per layer (dB):")
    width = max([len(r.name) for r in report.layers] + [5])
    lines.append(f"  {'layer':<{width}}  {'before':>7}  {'after':>7}")
    for r in report.layers:
        lines.append(f"  {r.name:<{width}}  {_fmt_db(r.sqnr_before)}  {_fmt_db(r.sqnr_after)}")
    before, after = report.mean_sqnr()
    lines.append(f"  {'mean':<{width}}  {_fmt_db(before)}  {_fmt_db(after)}")
    return "\n".join(lines)


def _kinds(report: Report):
    counts: dict[str, int] = {}
    for r in report.regions:
        counts[r.kind] = counts.get(r.kind, 0) + 1
    return sorted(counts.items())


def nothing_done(report: Report) -> bool:
    """Whether equalization changed nothing: no fold, no region, no bias absorbed."""
    return not (report.folds or report.regions or report.high_bias)


def blocking_reasons(report: Report, top: int = 5) -> list[str]:
    """The skip reasons, grouped by pattern (names taken out) with their counts, most
    frequent first: one line per pattern for a user whose model was left alone."""
    counts: dict[str, int] = {}
    for s in report.skipped:
        pattern = re.sub(r"'[^']*'", "'...'", s.reason)
        pattern = re.sub(r"\b\d+\b", "N", pattern)
        key = f"[{s.stage}] {pattern}"
        counts[key] = counts.get(key, 0) + 1
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    lines = [f"{n} x {key}" for key, n in ranked[:top]]
    if len(ranked) > top:
        lines.append(f"... and {len(ranked) - top} more patterns (see the report)")
    if not lines:
        lines.append("no Conv, ConvTranspose, Gemm or MatMul with constant weights was found")
    return lines


def format_inspection(report: Report) -> str:
    """The text ``cle inspect`` prints."""
    lines = [f"{len(report.folds)} batch norms would be folded:"]
    lines += [f"  {f.bn} into {', '.join(f.layers)} ({f.side} side)" for f in report.folds]
    lines.append(f"{len(report.regions)} regions would be equalized:")
    for r in report.regions:
        lines.append(
            f"  #{r.id} {r.kind}, {r.channels} channels: {', '.join(r.sources)} -> "
            f"{', '.join(r.sinks)}"
        )
    if report.triples:
        lines.append(f"{len(report.triples)} Conv -> depthwise -> Conv triples:")
        lines += [f"  {a} -> {b} -> {c}" for a, b, c in report.triples]
    lines.append(f"{len(report.high_bias)} high biases would be absorbed:")
    lines += [
        f"  {h.layer} -> {', '.join(h.into)} ({'exact' if h.exact else 'inexact'})"
        for h in report.high_bias
    ]
    lines.append(f"{len(report.skipped)} candidates would be skipped:")
    lines += [f"  [{s.stage}] {s.candidate}: {s.reason}" for s in report.skipped]
    if nothing_done(report):
        lines.append("nothing would be equalized; what blocks it:")
        lines += [f"  {line}" for line in blocking_reasons(report)]
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
