"""Calibration: statistics measured on a few inputs replace the data-free estimates, in
both backends and the CLI. The equalized model stays exact (relative error 1e-5 in
float32, as everywhere), and bad calibration input is one clear error with nothing
changed."""

from __future__ import annotations

import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

import cle_onnx  # noqa: E402
import cle_torch  # noqa: E402
from cle_core import CLEError  # noqa: E402
from cle_core._cli import main  # noqa: E402
from cle_core._quality import sqnr_db  # noqa: E402
from cle_torch._calibrate import calibration_stats  # noqa: E402
from cle_torch._capture import capture  # noqa: E402
from tests.helpers import onnx_models as om  # noqa: E402
from tests.helpers import torch_models as tm  # noqa: E402


def test_torch_statistics_are_measured_per_ir_value():
    model, shape = tm.mobilenet_v2()
    x = torch.randn(12, *shape[1:])
    cap = capture(model, shape)
    stats = calibration_stats(cap, x)
    first = next(n for n in cap.ir.nodes if n.is_layer)
    with torch.no_grad():
        out = model[0][0](x)  # the stem conv, before its BN
    got = stats[first.outputs[0].name]
    np.testing.assert_allclose(got.mean, out.mean(dim=(0, 2, 3)).numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got.hi, out.amax(dim=(0, 2, 3)).numpy(), rtol=1e-6)
    batches = [x[:5], x[5:]]  # an iterable of batches gives the same numbers
    again = calibration_stats(cap, batches)[first.outputs[0].name]
    np.testing.assert_allclose(again.meansq, got.meansq, rtol=1e-9)


def test_torch_equalize_with_calibration_is_exact():
    model, shape = tm.resnet()
    x = torch.randn(8, *shape[1:])
    with torch.no_grad():
        y0 = model(x)
    new, report = cle_torch.equalize_model(model, shape, calibration=torch.randn(16, *shape[1:]))
    with torch.no_grad():
        assert sqnr_db(y0.numpy(), new(x).numpy()) > 100
    assert report.noise is not None and report.regions


def test_torch_bad_calibration_changes_nothing():
    model, shape = tm.resnet()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(CLEError, match="calibration"):
        cle_torch.equalize_model(model, shape, calibration=torch.randn(4, 5, 16, 16))
    with pytest.raises(CLEError, match="calibration"):
        cle_torch.equalize_model(model, shape, calibration="images/")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_onnx_equalize_with_calibration(tmp_path):
    model = om.depthwise_triple()
    calib = np.random.default_rng(0).normal(size=(16, 3, 8, 8)).astype(np.float32)
    before = model.SerializeToString()
    eq, report = cle_onnx.equalize_model(model, calibration=calib)
    assert model.SerializeToString() == before and report.noise is not None
    x = np.random.default_rng(1).normal(size=(2, 3, 8, 8)).astype(np.float32)
    run = lambda m: ort.InferenceSession(m.SerializeToString()).run(None, {"x": x})[0]  # noqa: E731
    assert sqnr_db(run(model), run(eq)) > 100
    # file to file, external data included
    src = tmp_path / "m.onnx"
    om.save_external(model, src, "m.onnx.data")
    report2, files = cle_onnx.equalize_file(src, tmp_path / "o.onnx", calibration=calib)
    assert len(report2.regions) == len(report.regions)
    with pytest.raises(CLEError, match="no values for input 'x'"):
        cle_onnx.equalize_model(model, calibration={"nope": calib})


def test_cli_calibration_from_npy(tmp_path, capsys):
    src = tmp_path / "in.onnx"
    onnx.save(om.depthwise_triple(), str(src))
    npy = tmp_path / "calib.npy"
    np.save(npy, np.random.default_rng(0).normal(size=(8, 3, 8, 8)).astype(np.float32))
    assert (
        main(
            [
                "equalize",
                str(src),
                "-o",
                str(tmp_path / "o.onnx"),
                "--calibration",
                str(npy),
                "--check",
            ]
        )
        == 0
    )
    capsys.readouterr()
    bad = tmp_path / "bad.npy"
    np.save(bad, np.zeros((8, 5, 8, 8), np.float32))
    assert (
        main(["equalize", str(src), "-o", str(tmp_path / "o2.onnx"), "--calibration", str(bad)])
        == 2
    )
    assert "calibration" in capsys.readouterr().err
    assert not (tmp_path / "o2.onnx").exists()
    assert (
        main(
            [
                "equalize",
                str(src),
                "-o",
                str(tmp_path / "o3.onnx"),
                "--calibration",
                str(npy),
                "--objective",
                "balance",
            ]
        )
        == 2
    )
    assert not (tmp_path / "o3.onnx").exists()


def test_cli_calibration_from_an_image_folder(tmp_path, capsys):
    skio = pytest.importorskip("skimage.io")
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        skio.imsave(str(folder / f"{i}.png"), (rng.random((20, 24, 3)) * 255).astype(np.uint8))
    src = tmp_path / "in.onnx"
    onnx.save(om.depthwise_triple(), str(src))
    assert (
        main(
            [
                "equalize",
                str(src),
                "-o",
                str(tmp_path / "o.onnx"),
                "--calibration",
                str(folder),
                "--quiet",
            ]
        )
        == 0
    )


def test_onnx_calibration_with_fewer_inputs_than_a_batch_on_a_dynamic_batch():
    # A model without a fixed batch size runs calibration in batches of up to 4; two
    # inputs are one smaller batch, not an error.
    model = om.depthwise_triple()
    for v in list(model.graph.input) + list(model.graph.output):
        v.type.tensor_type.shape.dim[0].dim_param = "N"
    calib = np.random.default_rng(0).normal(size=(2, 3, 8, 8)).astype(np.float32)
    _, report = cle_onnx.equalize_model(model, calibration=calib)
    assert report.noise is not None and report.regions
