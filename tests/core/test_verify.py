"""``verify``'s choice among the original and several exact equalizations (issue 18):
the best measured is kept, NaN counts as the worst, equals go to the lowest draw."""

from __future__ import annotations

import numpy as np
import pytest

from cle_core import CLEError, Deployment, EqualizeOptions, equalize
from cle_core.toolkit import best_draw, check_draws, pick, verdict
from tests.helpers.strategies import build_graph


def _report():
    g = build_graph(0, [("pair", "relu")], 4, head=False)
    return equalize(g).report


def test_pick_keeps_the_best_draw():
    report, kept = pick(_report(), Deployment(), 8, 10.0, [12.0, 15.0, float("nan"), 15.0])
    v = report.verification
    assert kept == 1 and v.draw == 1 and v.kept == "equalized"
    assert v.equalized_db == 12.0 and np.isnan(v.drawn[1]) and len(v.drawn) == 3
    assert "3 redrawn" in v.summary() and "kept draw 1 (15.00 dB)" in v.summary()


def test_pick_keeps_the_original_when_it_measures_best(caplog):
    with caplog.at_level("WARNING", logger="cle_core"):
        report, kept = pick(_report(), Deployment(), 8, 20.0, [12.0, 15.0])
    assert kept is None and report.verification.kept == "original"
    assert report.verification.draw == 0
    assert "kept the original" in caplog.text and "15.00 dB" in caplog.text


def test_pick_takes_the_objectives_own_scales_among_equals_and_verdict_is_one_draw():
    report, kept = pick(_report(), Deployment(), 8, 10.0, [15.0, 15.0])
    assert kept == 0 and "kept the equalized" in report.verification.summary()
    report, keep = verdict(_report(), Deployment(), 8, 10.0, 9.0)
    assert keep is False and report.verification.drawn == ()


def test_best_draw_holds_the_best_and_measures_each():
    made = []

    def equalized(k):
        made.append(k)
        return f"model {k}", f"report {k}"

    measured = {"model 0": 3.0, "model 1": 5.0, "model 2": 4.0}
    figures, model, report = best_draw(equalized, measured.get, 2)
    assert made == [0, 1, 2] and figures == [3.0, 5.0, 4.0]
    assert (model, report) == ("model 1", "report 1")


@pytest.mark.parametrize("bad", [-1, 2.0, True, None])
def test_draws_must_be_a_natural_number(bad):
    with pytest.raises(CLEError, match="draws must be"):
        check_draws(bad, True, EqualizeOptions())


def test_draws_need_verify_and_no_scale_draw():
    assert check_draws(0, False, EqualizeOptions()) == 0
    with pytest.raises(CLEError, match="needs verify"):
        check_draws(3, False, EqualizeOptions())
    with pytest.raises(CLEError, match="not both"):
        check_draws(3, True, EqualizeOptions(scale_draw=2))
