"""``verify``: the original and the equalized model measured in the named deployment on
calibration inputs; the better one is kept (issue 18)."""

from __future__ import annotations

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
    assert v.kept == "equalized" and v.equalized_db > v.original_db and v.inputs == 8
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
