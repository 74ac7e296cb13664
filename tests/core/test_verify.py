"""``verify``'s choice among the original and several exact equalizations (issue 18):
the best measured is kept, NaN counts as the worst, equals go to the lowest draw."""

from __future__ import annotations

import numpy as np
import pytest

from cle_core import CLEError, Deployment, EqualizeOptions, equalize
from cle_core.toolkit import (
    best_draw,
    check_draws,
    keep_best,
    kept_draw,
    mean_db,
    measure_pairs,
    pick,
    split_inputs,
    verdict,
)
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
    assert "kept the original" in caplog.text and "redrawn 15.00 dB" in caplog.text
    assert "margin" not in caplog.text  # no redrawn one measured above the original


def test_pick_takes_the_objectives_own_scales_among_equals_and_verdict_is_one_draw():
    report, kept = pick(_report(), Deployment(), 8, 10.0, [15.0, 15.0])
    assert kept == 0 and "kept the equalized" in report.verification.summary()
    report, keep = verdict(_report(), Deployment(), 8, 10.0, 9.0)
    assert keep is False and report.verification.drawn == ()


def test_a_margin_keeps_what_verify_alone_keeps_unless_a_draw_beats_it_by_more():
    # the objective's scales measure 12, the original 10: a draw needs over 12.5
    for drawn, expected in (([12.0, 12.4, 12.5], 0), ([12.0, 12.4, 12.6], 2)):
        report, kept = pick(_report(), Deployment(), 8, 10.0, drawn, margin=0.5)
        assert kept == expected and report.verification.draw == expected
        assert report.verification.margin == 0.5
        assert "one is kept if over 0.5 dB better" in report.verification.summary()
    # the original measures best: a draw needs over 10.5 to replace it
    report, kept = pick(_report(), Deployment(), 8, 10.0, [9.0, 10.4], margin=0.5)
    assert kept is None and report.verification.kept == "original"
    report, kept = pick(_report(), Deployment(), 8, 10.0, [9.0, 10.6], margin=0.5)
    assert kept == 1
    # NaN measures worst, whatever the margin
    report, kept = pick(_report(), Deployment(), 8, float("nan"), [float("nan"), 3.0], margin=5)
    assert kept == 1


def test_the_warning_says_a_redrawn_one_measured_better_within_the_margin(caplog):
    with caplog.at_level("WARNING", logger="cle_core"):
        pick(_report(), Deployment(), 8, 10.0, [9.0, 10.4], margin=0.5)
    assert "the best of 1 redrawn 10.40 dB" in caplog.text
    assert "less than the 0.5 dB margin" in caplog.text and "kept the original" in caplog.text


def test_the_default_margin_is_read_when_pick_runs(monkeypatch):
    import cle_core._verify as verify

    monkeypatch.setattr(verify, "DRAW_MARGIN_DB", 1.0)
    assert pick(_report(), Deployment(), 8, 10.0, [12.0, 12.9])[1] == 0
    monkeypatch.setattr(verify, "DRAW_MARGIN_DB", 0.5)
    assert pick(_report(), Deployment(), 8, 10.0, [12.0, 12.9])[1] == 1


def test_kept_draw_reequalizes_a_draw_best_draw_did_not_hold():
    made = []

    def equalized(k):
        made.append(k)
        return f"model {k}", f"report {k}"

    held = ("model 2", "report 2")
    assert kept_draw(equalized, [3.0, 4.0, 5.0], 2, held) == held and made == []
    assert kept_draw(equalized, [3.0, float("nan"), 5.0], 0, held) == ("model 0", "report 0")
    assert made == [0]


def test_keep_best_returns_the_original_or_the_draw_kept_with_its_report():
    models = {k: (f"model {k}", _report()) for k in range(3)}
    measured = {"model 0": 12.0, "model 1": 12.4, "model 2": 14.0}
    model, report = keep_best("folded", 10.0, models.get, measured.get, 2, Deployment(), 8)
    assert model == "model 2" and report.verification.draw == 2
    model, report = keep_best("folded", 15.0, models.get, measured.get, 2, Deployment(), 8)
    assert model == "folded" and report.verification.kept == "original"


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


def test_split_inputs_halves_for_activation_grids_and_measures_on_all_weights_only():
    x = np.arange(20.0)[:, None]
    calib, measure, n = split_inputs(x, Deployment())
    assert n == 10 and calib[-1, 0] == 9.0 and measure[0, 0] == 10.0
    calib, measure, n = split_inputs({"x": x}, Deployment(activation_bits=None))
    assert n == 20 and measure["x"] is x and calib["x"] is x
    calib, measure, n = split_inputs(x[:6], Deployment())  # too few to split
    assert n == 6 and calib is measure


def test_measure_pairs_measure_every_input_once_on_grids_that_did_not_see_it():
    x = np.arange(20.0)[:, None]
    pairs, n = measure_pairs(x, Deployment())
    assert n == 20 and len(pairs) == 2
    (c1, m1), (c2, m2) = pairs
    assert c1[-1, 0] == 9.0 and m1[0, 0] == 10.0 and c2 is m1 and m2 is c1
    pairs, n = measure_pairs({"x": x[:15]}, Deployment())  # an odd count: 7 and 8
    assert n == 15 and len(pairs[0][0]["x"]) == 7 and pairs[1][0] is pairs[0][1]
    for weights_only in (x, x[:6]):  # no split: one pair, every input once
        pairs, n = measure_pairs(weights_only, Deployment(activation_bits=None))
        assert n == len(weights_only) and len(pairs) == 1
        assert pairs[0][0] is pairs[0][1] is weights_only
    pairs, n = measure_pairs(x[:6], Deployment())  # too few to split
    assert n == 6 and len(pairs) == 1
    assert mean_db([10.0, 13.0]) == 11.5 and np.isnan(mean_db([10.0, float("nan")]))
