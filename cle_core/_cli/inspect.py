"""``cle inspect``: what equalizing would do, and the summaries both commands print."""

from __future__ import annotations

import re
from pathlib import Path

from .._backend import get_backend_for_file
from .._report import Report
from ._common import EXIT_OK, add_cle_options, cle_options, fmt_db


def add_parser(sub) -> None:
    ins = sub.add_parser(
        "inspect",
        help="show what CLE would do, write nothing",
        description="Print the regions CLE would equalize in the model file IN and the "
        "candidates it would skip, with reasons. Writes nothing.",
    )
    ins.add_argument("input", metavar="IN")
    add_cle_options(ins)
    ins.set_defaults(run=run)


def run(args) -> int:
    report = get_backend_for_file(args.input).inspect_file(Path(args.input), cle_options(args))
    print(format_inspection(report))
    return EXIT_OK


def _stop_reason(report: Report) -> str:
    history = report.noise.history if report.noise is not None else []
    if len(history) >= 2 and history[-2] > 0:
        gain = 100 * (history[-2] - history[-1]) / history[-2]
        state = "converged" if report.converged else "stopped at max_sweeps"
        if gain < 0.05:
            return f"{state}: the last sweep changed nothing"
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
            f" ({report.options.deployment.short()}): est. output SQNR "
            f"{fmt_db(report.noise.sqnr_before).strip()} dB -> "
            f"{fmt_db(report.noise.sqnr_after).strip()} dB"
        )
    lines = [
        f"batch norms folded: {len(report.folds)}",
        f"regions equalized:  {len(report.regions)}"
        + (f" ({', '.join(f'{n} {k}' for k, n in _kinds(report))})" if report.regions else ""),
        f"objective:          {objective}",
        f"deployment:         {report.options.deployment.describe()}",
        *(
            [f"verify:             {report.verification.summary().removeprefix('verified ')}"]
            if report.verification is not None
            else []
        ),
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
        lines.append(f"  {r.name:<{width}}  {fmt_db(r.sqnr_before)}  {fmt_db(r.sqnr_after)}")
    before, after = report.mean_sqnr()
    lines.append(f"  {'mean':<{width}}  {fmt_db(before)}  {fmt_db(after)}")
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
