"""``cle inspect``: what equalizing would do, and the summaries both commands print."""

from __future__ import annotations

from pathlib import Path

from .._backend import get_backend_for_file
from .._report import Report
from ._common import (
    EXIT_OK,
    UsageError,
    add_cle_options,
    add_size_options,
    add_verbose_flag,
    cle_options,
    parse_dims,
    parse_shapes,
)


def add_parser(sub) -> None:
    ins = sub.add_parser(
        "inspect",
        help="show what CLE would do, write nothing",
        description="Print the regions CLE would equalize in the model file IN and the "
        "candidates it would skip, with reasons. Writes nothing.",
    )
    ins.add_argument("input", metavar="IN")
    add_verbose_flag(ins)
    add_size_options(ins, "for shape inference (a backend may use them)")
    add_cle_options(ins)
    ins.set_defaults(run=run)


def run(args) -> int:
    options = cle_options(args)
    if options.bias_correction_form == "empirical":
        raise UsageError(
            "--bias-correction empirical runs the model on calibration inputs, which "
            "inspect does not take: cle equalize --calibration ... does it"
        )
    dims, shapes = parse_dims(args.dim), parse_shapes(args.input_shape)
    sizes = {"dims": dims, "shapes": shapes} if dims or shapes else {}
    report = get_backend_for_file(args.input).inspect_file(Path(args.input), options, **sizes)
    print(format_inspection(report, args.verbose))
    return EXIT_OK


def format_summary(report: Report, verbose: bool = False) -> str:
    """The text ``cle equalize`` prints: :meth:`Report.summary`, so that the command
    line and Python word the same facts the same way."""
    return report.summary(verbose)


def nothing_done(report: Report) -> bool:
    """Whether equalization changed nothing: no fold, no region, no bias absorbed."""
    return not (report.folds or report.regions or report.high_bias)


def blocking_reasons(report: Report, top: int = 5) -> list[str]:
    """The skip reasons, grouped by pattern (names taken out) with their counts, most
    frequent first: one line per pattern for a user whose model was left alone."""
    lines = report.skip_reasons(top)
    if not lines:
        lines.append("no Conv, ConvTranspose, Gemm or MatMul with constant weights was found")
    return lines


def format_inspection(report: Report, verbose: bool = True) -> str:
    """The text ``cle inspect`` prints: by default the summary ``cle equalize`` would
    print; ``verbose`` lists every fold, region, absorbed bias and skipped candidate."""
    if not verbose:
        head = "what cle equalize would do (nothing was written; -v lists every candidate):"
        text = f"{head}\n{report.summary()}"
        if nothing_done(report):
            text += "\nnothing would be equalized (the skipped candidates above say why)"
        return text
    lines = [f"{len(report.folds)} batch norms would be folded:"]
    lines += [f"  {f.bn} into {', '.join(f.layers)} ({f.side} side)" for f in report.folds]
    lines.append(f"{len(report.regions)} regions would be equalized:")
    for r in report.regions:
        lines.append(
            f"  #{r.id} {r.kind}, {r.channels} channels: {', '.join(r.sources)} -> "
            f"{', '.join(r.sinks)}"
            + (f" ({r.tied} rotated pairs tied: one scale each)" if r.tied else "")
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
