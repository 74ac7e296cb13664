"""``verify``: the original and the equalized model measured in the named deployment on
calibration inputs; the better one is kept (issue 18)."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

import cle_onnx  # noqa: E402
from cle_core import CLEError, ScaleOutcome, objective_names, register_objective  # noqa: E402
from cle_core._cli import main  # noqa: E402
from tests.helpers import onnx_models as om  # noqa: E402


class _Spoiler:
    """Scales channel 0 of every region by 1e-4: exact in FP32, and a per-tensor grid
    that the channel then dominates; a test's way to make equalization lose."""

    name = "spoil-for-test"
    description = "one channel scaled by 1e-4"

    def choose(self, problem):
        scales = {}
        for r in problem.regions:
            s = np.ones(r.size)
            s[0] = 1e-4
            scales[r.id] = s
        return ScaleOutcome(scales, 1, True, 0.0)


if "spoil-for-test" not in objective_names():
    register_objective(_Spoiler())


def _data(n=16):
    return np.random.default_rng(0).normal(size=(n, 3, 8, 8)).astype(np.float32)


def test_verify_keeps_the_equalized_model_when_it_measures_better():
    model = om.relu6_chain(13)
    before = model.SerializeToString()
    eq, report = cle_onnx.equalize_model(model, calibration=_data(), verify=True)
    assert model.SerializeToString() == before
    v = report.verification
    # each half calibrates while the other measures: all 16 are measured
    assert v.kept == "equalized" and v.equalized_db > v.original_db and v.inputs == 16
    assert "Min" in {n.op_type for n in eq.graph.node}
    assert "verified" in report.summary()


def test_verify_keeps_the_original_when_equalization_measures_worse(caplog):
    model = om.relu6_chain(13)
    with caplog.at_level("WARNING", logger="cle_core"):
        kept, report = cle_onnx.equalize_model(
            model, calibration=_data(), verify=True, objective="spoil-for-test"
        )
    v = report.verification
    assert v.kept == "original" and v.original_db > v.equalized_db
    assert "kept the original" in caplog.text
    # the original with its batch norms folded: no per-channel bound, no BN
    ops = {n.op_type for n in kept.graph.node}
    assert "Min" not in ops and "BatchNormalization" not in ops


def test_verify_needs_calibration_and_one_array():
    with pytest.raises(CLEError, match="calibration"):
        cle_onnx.equalize_model(om.relu6_chain(13), verify=True)


@pytest.mark.parametrize(
    "bad, match",
    [
        (np.zeros((16, 3, 9, 8), np.float32), "input takes"),  # found while measuring a half
        (np.full((16, 3, 8, 8), np.nan, np.float32), "NaN"),
        ([1, 2], "one array"),
    ],
)
def test_a_failed_verify_leaves_the_model_byte_identical_even_in_place(bad, match):
    model = om.relu6_chain(13)
    before = model.SerializeToString()
    with pytest.raises(CLEError, match=match):
        cle_onnx.equalize_model(model, calibration=bad, verify=True, draws=2, inplace=True)
    assert model.SerializeToString() == before


def test_cle_equalize_verify(tmp_path, capsys):
    src, dst = tmp_path / "m.onnx", tmp_path / "out.onnx"
    onnx.save(om.relu6_chain(13), src)
    data = tmp_path / "calib.npy"
    np.save(data, _data())
    argv = ["equalize", str(src), "-o", str(dst), "--calibration", str(data), "--verify"]
    assert main([*argv, "--objective", "spoil-for-test"]) == 0
    out, err = capsys.readouterr()
    assert "kept the original" in out and "kept the original" in err
    assert "Min" not in {n.op_type for n in onnx.load(dst).graph.node}
    assert main(argv) == 0
    out, _ = capsys.readouterr()
    assert "kept the equalized" in out
    assert "Min" in {n.op_type for n in onnx.load(dst).graph.node}
    assert main(["equalize", str(src), "-o", str(dst), "--verify"]) == 2
    assert "--verify needs --calibration" in capsys.readouterr().err


def test_verify_with_draws_keeps_the_best_measured_equalization(monkeypatch):
    """``draws=3``: the objective's own scales and three redrawn ones, each measured as
    ``verify`` measures; with no margin the model kept is the draw that measured best,
    the same bytes as equalizing with that ``scale_draw`` alone, and the caller's proto
    is untouched; with the default margin, the objective's own scales (the best draw
    measures 0.03 dB above them)."""
    import cle_core._verify as verify
    from cle_onnx._evaluate import evaluate_all

    model = om.relu6_chain(13)
    data = _data()
    _, report = cle_onnx.equalize_model(model, calibration=data, verify=True, draws=3)
    v = report.verification
    assert v.draw == 0 and v.margin == verify.DRAW_MARGIN_DB == 0.5
    assert 0 < max(v.drawn) - v.equalized_db <= 0.5 and v.equalized_db > v.original_db
    monkeypatch.setattr(verify, "DRAW_MARGIN_DB", 0.0)
    before = model.SerializeToString()
    eq, report = cle_onnx.equalize_model(model, calibration=data, verify=True, draws=3)
    assert model.SerializeToString() == before
    v = report.verification
    assert len(v.drawn) == 3 and v.kept == "equalized"
    figures = [v.equalized_db, *v.drawn]
    assert figures[v.draw] == max(figures) > v.original_db
    assert len(set(figures)) == 4  # four roundings, four figures
    alone, alone_report = cle_onnx.equalize_model(model, calibration=data, scale_draw=v.draw)
    assert eq.SerializeToString() == alone.SerializeToString()
    assert report.options.scale_draw == alone_report.options.scale_draw == v.draw
    # each figure is the mean of what each half measures, the other calibrating
    drawn = [cle_onnx.equalize_model(model, calibration=data, scale_draw=k)[0] for k in range(4)]
    one = evaluate_all(model, drawn, data[8:], calibration=data[:8])
    other = evaluate_all(model, drawn, data[:8], calibration=data[8:])
    both = [(a["w8a8_sqnr"] + b["w8a8_sqnr"]) / 2 for a, b in zip(one, other, strict=True)]
    np.testing.assert_allclose(both, figures, rtol=1e-9)
    assert all(a["w8a8_sqnr"] != b["w8a8_sqnr"] for a, b in zip(one, other, strict=True))


def test_with_a_margin_no_draw_clears_the_model_is_what_verify_alone_keeps(monkeypatch):
    """A draw that measured best but not by the margin is not kept: the model returned is
    verify alone's (draw 0 equalized again, best_draw having held the best), the same
    bytes, and the report says which draw and margin."""
    import cle_core._verify as verify

    model, data = om.relu6_chain(13), _data()
    before = model.SerializeToString()
    _, free = cle_onnx.equalize_model(model, calibration=data, verify=True, draws=3)
    figures = [free.verification.equalized_db, *free.verification.drawn]
    assert max(figures[1:]) > figures[0]  # a redrawn one measured best: best_draw held it
    monkeypatch.setattr(verify, "DRAW_MARGIN_DB", 1e3)
    eq, report = cle_onnx.equalize_model(model, calibration=data, verify=True, draws=3)
    alone, alone_report = cle_onnx.equalize_model(model, calibration=data, verify=True)
    assert eq.SerializeToString() == alone.SerializeToString()
    v = report.verification
    assert v.draw == 0 and v.margin == 1e3 and [v.equalized_db, *v.drawn] == figures
    assert v.kept == alone_report.verification.kept and report.options.scale_draw == 0
    assert model.SerializeToString() == before


def test_weights_only_verify_measures_on_every_calibration_input():
    """No activation grid to calibrate: the figures are those of all 16 inputs."""
    from cle_core import Deployment
    from cle_onnx._evaluate import evaluate_all

    model, data, dep = om.relu6_chain(13), _data(), Deployment(activation_bits=None)
    eq, report = cle_onnx.equalize_model(model, calibration=data, verify=True, deployment=dep)
    v = report.verification
    assert v.inputs == 16
    folded, _ = cle_onnx.equalize_model(model, scale=False, high_bias=False, deployment=dep)
    original, equalized = evaluate_all(model, [folded, eq], data, deployment=dep)
    assert (original["w8_sqnr"], equalized["w8_sqnr"]) == pytest.approx(
        (v.original_db, max(v.original_db, v.equalized_db)), rel=1e-9
    )


def test_draws_need_verify():
    with pytest.raises(CLEError, match="draws needs verify"):
        cle_onnx.equalize_model(om.relu6_chain(13), calibration=_data(), draws=2)
    with pytest.raises(CLEError, match="draws must be"):
        cle_onnx.equalize_model(om.relu6_chain(13), calibration=_data(), verify=True, draws=-2)


def test_cle_equalize_verify_draws(tmp_path, capsys, monkeypatch):
    """``--verify --draws 3`` writes the draw that measured best (with no margin: a
    redrawn one here; the same bytes as ``--scale-draw K``), reports every figure,
    leaves the input as it was and no temporary file behind."""
    import cle_core._verify as verify

    monkeypatch.setattr(verify, "DRAW_MARGIN_DB", 0.0)
    src, dst = tmp_path / "m.onnx", tmp_path / "out.onnx"
    onnx.save(om.relu6_chain(13), src)
    data = tmp_path / "calib.npy"
    np.save(data, _data())
    before = src.read_bytes()
    leftovers = set(Path(tempfile.gettempdir()).glob("cle-draws-*"))
    report = tmp_path / "r.json"
    argv = ["equalize", str(src), "--calibration", str(data), "--verify"]
    assert main([*argv, "-o", str(dst), "--draws", "3", "--report", str(report)]) == 0
    out = capsys.readouterr().out
    assert src.read_bytes() == before
    assert set(Path(tempfile.gettempdir()).glob("cle-draws-*")) == leftovers
    saved = json.loads(report.read_text())
    v = saved["verification"]
    assert len(v["drawn"]) == 3 and v["kept"] == "equalized" and v["draw"] > 0
    assert saved["options"]["scale_draw"] == v["draw"] and v["margin"] == 0
    # measured as the API measures: both halves, each calibrating while the other measures
    _, api = cle_onnx.equalize_model(onnx.load(src), calibration=_data(), verify=True, draws=3)
    figures = [v["original_db"], v["equalized_db"], *v["drawn"]]
    a = api.verification
    assert v["inputs"] == a.inputs == 16
    assert figures == pytest.approx([a.original_db, a.equalized_db, *a.drawn], rel=1e-9)
    assert "3 redrawn" in out and "kept draw" in out
    same = tmp_path / "same.onnx"
    assert (
        main(
            [*argv[:2], "-o", str(same), "--calibration", str(data), "--scale-draw", str(v["draw"])]
        )
        == 0
    )
    assert same.read_bytes() == dst.read_bytes()
    capsys.readouterr()
    written = dst.read_bytes()  # refused flags write nothing and leave every file as it was
    assert main([*argv[:2], "-o", str(tmp_path / "new.onnx"), "--draws", "2"]) == 2
    assert not (tmp_path / "new.onnx").exists()
    assert main([*argv[:2], "-o", str(dst), "--draws", "2"]) == 2
    assert "--draws needs --verify" in capsys.readouterr().err
    assert main([*argv, "-o", str(dst), "--draws", "2", "--scale-draw", "1"]) == 2
    assert "not both" in capsys.readouterr().err
    assert main([*argv[:2], "-o", str(dst), "--scale-draw", "-1"]) == 2
    assert "--scale-draw" in capsys.readouterr().err
    assert main([*argv, "-o", str(dst), "--draws", "-1"]) == 2
    assert "--draws must be an integer >= 0" in capsys.readouterr().err
    assert dst.read_bytes() == written and src.read_bytes() == before


def _count_statistics(monkeypatch) -> list:
    """A list that grows by one at each measurement of calibration statistics."""
    from cle_onnx._backend import OnnxBackend

    calls = []
    measure = OnnxBackend.calibration_stats

    def counted(self, *args, **kwargs):
        calls.append(1)
        return measure(self, *args, **kwargs)

    monkeypatch.setattr(OnnxBackend, "calibration_stats", counted)
    return calls


def test_draws_measure_the_calibration_statistics_once(monkeypatch):
    """Every draw equalizes the same model with the same inputs: their statistics are
    measured once (most of a calibrated run's time), and outside ``verify`` again at
    every call."""
    calls = _count_statistics(monkeypatch)
    model, data = om.relu6_chain(13), _data()
    cle_onnx.equalize_model(model, calibration=data, verify=True, draws=3)
    assert len(calls) == 1
    cle_onnx.equalize_model(model, calibration=data)
    cle_onnx.equalize_model(model, calibration=data)
    assert len(calls) == 3


def test_cli_verify_measures_the_calibration_statistics_once(tmp_path, monkeypatch):
    """``cle equalize --verify --draws`` measures the statistics once for its first run,
    every draw and the draw it keeps (it measured them twice, or three times when a
    draw was kept)."""
    import cle_core._verify as verify

    monkeypatch.setattr(verify, "DRAW_MARGIN_DB", 0.0)  # a draw is kept: rewritten
    calls = _count_statistics(monkeypatch)
    src, dst, data = tmp_path / "m.onnx", tmp_path / "out.onnx", tmp_path / "calib.npy"
    onnx.save(om.relu6_chain(13), src)
    np.save(data, _data())
    argv = ["equalize", str(src), "-o", str(dst), "--calibration", str(data), "--verify"]
    assert main([*argv, "--draws", "2", "--report", str(tmp_path / "r.json")]) == 0
    assert json.loads((tmp_path / "r.json").read_text())["verification"]["draw"] > 0
    assert len(calls) == 1


@pytest.mark.parametrize("weights_only", [False, True])
def test_measure_files_gives_what_evaluate_files_gives(tmp_path, weights_only):
    """The ONNX backend's ``measure_files`` (the deployment's figure alone, what
    ``--verify`` reads) gives the figures that the default, read from ``cle
    evaluate``'s ``evaluate_files``, gives: the same quantization, fewer runs."""
    from cle_core import Deployment, FileBackend
    from cle_onnx._backend import OnnxBackend

    deployment = Deployment(activation_bits=None if weights_only else 8)
    src, dst = tmp_path / "m.onnx", tmp_path / "out.onnx"
    onnx.save(om.relu6_chain(13), src)
    cle_onnx.equalize_file(src, dst)
    data = _data()
    backend = OnnxBackend()
    args = ([src, dst], [(data[:8], data[8:])], deployment)
    fast = backend.measure_files(*args)
    assert fast == FileBackend.measure_files(backend, *args)
    assert len(fast) == 2 and fast[0] != fast[1]
