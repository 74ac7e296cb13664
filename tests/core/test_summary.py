"""The summary that ``Report.summary()`` and ``cle equalize`` print: one text, a few
lines by default, every record with ``verbose``."""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from cle_core import equalize
from cle_core._cli import format_summary
from cle_core._report import NoiseEstimate, SkipRecord
from tests.helpers.strategies import build_graph


def _report():
    return equalize(
        build_graph(4, [("chain", "relu6"), ("residual", "relu")], 4, head=False)
    ).report


def test_python_and_command_line_print_the_same_summary():
    report = _report()
    assert report.summary() == format_summary(report)
    assert report.summary(verbose=True) == format_summary(report, verbose=True)


def test_default_summary_is_short_and_verbose_lists_every_layer():
    report = _report()
    short, full = report.summary(), report.summary(verbose=True)
    assert "weight SQNR (est.): mean" in short and "per layer" not in short
    assert "estimated INT8 weight SQNR per layer (dB):" in full
    assert all(f"  {r.name} " in full for r in report.layers)
    assert len(full.splitlines()) > len(short.splitlines())


def test_many_skips_are_grouped_with_their_counts():
    report = _report()
    skips = tuple(
        SkipRecord("scale", f"conv{i} -> ?", f"'out{i}' is a graph output") for i in range(150)
    ) + (SkipRecord("fold", "bn7", "its layer is shared"),)
    report = replace(report, skipped=skips)
    lines = report.summary().splitlines()
    assert len(lines) <= 12
    assert "  150 x [scale] '...' is a graph output" in lines
    assert "  1 x [fold] bn7: its layer is shared" in lines
    assert "skipped:            151" in lines
    assert len(report.summary(verbose=True).splitlines()) > 151
    kinds = tuple(SkipRecord("fold", f"bn{i}", f"reason {'x' * i}") for i in range(1, 5))
    lines = replace(report, skipped=skips + kinds).summary().splitlines()
    assert lines[-1] == "  ... and 3 more kinds (-v lists every candidate)"


def test_an_estimate_below_0_db_is_explained_not_printed_as_a_figure():
    report = _report()
    # Noise 7e8 times the signal: what a detector's outputs gave (-88.45 dB).
    lost = replace(report, noise=NoiseEstimate(before=7e8, after=7e8, history=(7e8, 7e8)))
    line = next(x for x in lost.summary().splitlines() if x.startswith("objective:"))
    assert "not meaningful for this model (-88.45 dB -> -88.45 dB" in line
    assert "cle evaluate measures them" in line
    # the JSON keeps the figure
    assert lost.to_dict()["noise"]["before"] == 7e8
    # a plausible one is a plain figure
    fine = replace(report, noise=NoiseEstimate(before=0.1, after=0.01, history=(0.1, 0.01)))
    plain = next(x for x in fine.summary().splitlines() if x.startswith("objective:"))
    assert plain.endswith("noise: est. output SQNR (W8A8) 10.00 dB -> 20.00 dB")


def test_regions_left_at_scale_1_are_found_not_equalized():
    report = _report()
    n = len(report.regions)
    assert f"regions equalized:  {n} (" in report.summary()
    ones = tuple(replace(r, scales=np.ones_like(r.scales)) for r in report.regions)
    assert f"regions equalized:  0 of {n} found (" in replace(report, regions=ones).summary()


def test_what_the_search_decided_is_said_under_the_objective():
    """A reason about the whole search (nothing scaled under the gain floor) is printed
    under the objective line, not left among the per-candidate kinds past the top 3."""
    report = _report()
    ones = tuple(replace(r, scales=np.ones_like(r.scales)) for r in report.regions)
    why = "the estimated gain (0.30 dB) is below 1 dB: no region was scaled"
    others = [SkipRecord("scale", f"c{i}", f"reason {i % 5}") for i in range(20)]
    told = replace(
        report, regions=ones, skipped=[*others, SkipRecord("scale", "noise objective", why)]
    )
    lines = told.summary().splitlines()
    at = next(i for i, x in enumerate(lines) if x.startswith("objective:"))
    assert lines[at + 1].strip() == why
    # a reason about one candidate stays where it was
    assert not any(x.strip() == "reason 1" for x in lines[: at + 2])
