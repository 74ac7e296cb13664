"""The ``cle`` command: exit codes, messages, atomic writes."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

import cle_onnx  # noqa: E402
from cle_core._cli import main  # noqa: E402
from tests.helpers import onnx_models as om  # noqa: E402


@pytest.fixture
def model_file(tmp_path):
    path = tmp_path / "in.onnx"
    onnx.save(om.depthwise_triple(), str(path))
    return path


def test_equalize_writes_model_report_and_summary(model_file, tmp_path, capsys):
    out, rep = tmp_path / "out.onnx", tmp_path / "report.json"
    assert main(["equalize", str(model_file), "-o", str(out), "--report", str(rep), "--check"]) == 0
    text = capsys.readouterr().out
    assert "batch norms folded: 3" in text and "regions equalized:" in text
    assert "weight SQNR (est.): mean" in text
    assert "check: output 'conv_out45': SQNR" in text and text.rstrip().endswith("ok")
    onnx.checker.check_model(str(out), full_check=True)
    data = json.loads(rep.read_text())
    assert len(data["folds"]) == 3 and data["regions"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.onnx", "out.onnx", "report.json"]


def test_check_reports_small_error(model_file, tmp_path, capsys):
    main(["equalize", str(model_file), "-o", str(tmp_path / "o.onnx"), "--check", "--quiet"])
    line = capsys.readouterr().out.strip()
    sqnr = float(line.split("SQNR ")[1].split(" dB")[0])
    rel = float(line.split("relative ")[1].split(";")[0])
    assert sqnr > 100 and rel < 1e-5


def test_options_reach_the_core(model_file, tmp_path, capsys):
    rep = tmp_path / "r.json"
    main(
        [
            "equalize",
            str(model_file),
            "-o",
            str(tmp_path / "o.onnx"),
            "--no-high-bias",
            "--max-sweeps",
            "1",
            "--report",
            str(rep),
            "--quiet",
        ]
    )
    data = json.loads(rep.read_text())
    assert data["options"]["high_bias"] is False and data["sweeps"] == 1


def test_the_quantizer_flag_picks_the_profile_the_scales_are_chosen_for(
    model_file, tmp_path, capsys
):
    rep, before = tmp_path / "r.json", model_file.read_bytes()
    args = ["equalize", str(model_file), "-o", str(tmp_path / "o.onnx"), "--report", str(rep)]
    assert main([*args, "--quantizer", "torchao-x86"]) == 0
    assert model_file.read_bytes() == before
    assert "A8 asymmetric (torchao-x86)" in capsys.readouterr().out
    assert json.loads(rep.read_text())["options"]["quantizer"] == "torchao-x86"
    with pytest.raises(SystemExit) as exc:  # not a registered profile: argparse's exit 2
        main([*args, "--quantizer", "tensorrt"])
    assert exc.value.code == 2
    assert "invalid choice: 'tensorrt'" in capsys.readouterr().err
    assert model_file.read_bytes() == before


def test_dynamic_batch_is_one_and_other_dimensions_need_a_flag(tmp_path, capsys):
    model = om.depthwise_triple()
    dims = model.graph.input[0].type.tensor_type.shape.dim
    dims[0].dim_param = "batch"
    src, out = tmp_path / "dyn.onnx", tmp_path / "o.onnx"
    onnx.save(model, str(src))
    # The first axis is the batch: one example compares the two models as well as any.
    assert main(["equalize", str(src), "-o", str(out), "--check"]) == 0
    shape = tuple(d.dim_value for d in dims[1:])
    assert f"check: random inputs x {(1, *shape)} float32" in capsys.readouterr().out
    assert main(["equalize", str(src), "-o", str(out), "--check", "--dim", "batch=3"]) == 0
    assert f"check: random inputs x {(3, *shape)} float32" in capsys.readouterr().out
    # Any other dynamic size is the model's to say: refused, with the flag.
    dims[2].dim_param = "height"
    onnx.save(model, str(src))
    out.unlink()
    assert main(["equalize", str(src), "-o", str(out), "--check"]) == 2
    err = capsys.readouterr().err
    assert "dimension 2 ('height') is dynamic: --dim height=SIZE" in err
    assert "--dim batch" not in err and not out.exists()


def error_of(capsys):
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    return err


def test_missing_file(tmp_path, capsys):
    assert main(["equalize", str(tmp_path / "nope.onnx"), "-o", str(tmp_path / "o.onnx")]) == 2
    assert "no such file" in error_of(capsys)
    assert not (tmp_path / "o.onnx").exists()


@pytest.mark.parametrize("content", [b"not a model at all", b"\x08\x07\x12\x03abc\xff\xff"])
def test_corrupt_file_writes_nothing(tmp_path, capsys, content):
    src = tmp_path / "bad.onnx"
    src.write_bytes(content)
    assert main(["equalize", str(src), "-o", str(tmp_path / "o.onnx")]) == 2
    assert "not" in error_of(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.onnx"]


def test_unsupported_opset(tmp_path, capsys):
    model = om.conv_pair("relu")
    model.opset_import[0].version = 3
    src = tmp_path / "old.onnx"
    onnx.save(model, str(src))
    assert main(["equalize", str(src), "-o", str(tmp_path / "o.onnx")]) == 2
    assert "opset 3" in error_of(capsys)


def test_never_overwrites_the_input_without_in_place(model_file, capsys):
    before = model_file.read_bytes()
    assert main(["equalize", str(model_file), "-o", str(model_file)]) == 2
    assert "--in-place" in error_of(capsys)
    assert model_file.read_bytes() == before
    assert main(["equalize", str(model_file)]) == 2
    assert "missing -o" in error_of(capsys)


def test_in_place(model_file, capsys):
    before = model_file.read_bytes()
    assert main(["equalize", str(model_file), "--in-place", "--quiet"]) == 0
    assert model_file.read_bytes() != before
    onnx.checker.check_model(str(model_file), full_check=True)


def test_write_is_atomic(model_file, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out.onnx"
    out.write_bytes(b"previous contents")
    import cle_onnx._io as io

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(io.os, "replace", broken_replace)
    assert main(["equalize", str(model_file), "-o", str(out)]) == 1
    assert out.read_bytes() == b"previous contents"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.onnx", "out.onnx"]


def test_inspect_writes_nothing(model_file, tmp_path, capsys):
    assert main(["inspect", str(model_file)]) == 0
    assert "regions equalized:  3 (3 pair)" in capsys.readouterr().out
    assert main(["inspect", str(model_file), "-v"]) == 0
    text = capsys.readouterr().out
    assert "regions would be equalized" in text and "triples" in text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.onnx"]


def test_help_lists_every_option(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["equalize", "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for flag in (
        "--output",
        "--in-place",
        "--report",
        "--check",
        "--dim",
        "--no-high-bias",
        "--high-bias-form",
        "--high-bias-through-padding",
        "--max-sweeps",
        "--tolerance",
        "--no-fold",
        "--no-scale",
        "--quiet",
    ):
        assert flag in text


def test_bad_usage_exits_2(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["equalize"])
    assert exc.value.code == 2


def test_debug_shows_the_traceback(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "cle_core._cli",
            "--debug",
            "equalize",
            str(tmp_path / "nope.onnx"),
            "-o",
            str(tmp_path / "o.onnx"),
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode != 0 and "Traceback" in proc.stderr


def test_console_script_runs(model_file, tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "cle_core._cli",
            "equalize",
            str(model_file),
            "-o",
            str(tmp_path / "o.onnx"),
            "--quiet",
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""  # no progress bar when stderr is not a terminal


def _weights_from_inputs(path):
    """Conv weights fed as graph inputs: not constants, so nothing can be equalized."""
    from onnx import TensorProto, helper

    info = helper.make_tensor_value_info
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "w"], ["h"]),
            helper.make_node("Relu", ["h"], ["a"]),
            helper.make_node("Conv", ["a", "w2"], ["y"]),
        ],
        "g",
        [
            info("x", TensorProto.FLOAT, [1, 4, 8, 8]),
            info("w", TensorProto.FLOAT, [4, 4, 1, 1]),
            info("w2", TensorProto.FLOAT, [4, 4, 1, 1]),
        ],
        [info("y", TensorProto.FLOAT, [1, 4, 8, 8])],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(path))
    return path


def test_inspect_says_why_nothing_would_be_equalized(tmp_path, capsys):
    src = _weights_from_inputs(tmp_path / "in.onnx")
    assert main(["inspect", str(src), "--verbose"]) == 0
    text = capsys.readouterr().out
    assert "[translate] Conv_0: Conv left out: 'w' is not a constant" in text
    assert text.rstrip().endswith(
        "nothing would be equalized; what blocks it:\n"
        "  2 x [translate] Conv left out: '...' is not a constant"
    )


def test_equalize_warns_when_nothing_was_equalized(tmp_path, capsys):
    src = _weights_from_inputs(tmp_path / "in.onnx")
    assert main(["equalize", str(src), "-o", str(tmp_path / "out.onnx")]) == 0
    captured = capsys.readouterr()
    assert "cle: warning: nothing was equalized" in captured.err
    assert "2 x [translate] Conv left out: '...' is not a constant" in captured.err
    assert "no layer was translated" in captured.out and "-inf" not in captured.out


def test_no_warning_when_something_was_equalized(model_file, tmp_path, capsys):
    main(["equalize", str(model_file), "-o", str(tmp_path / "o.onnx"), "--quiet"])
    assert "warning" not in capsys.readouterr().err


def test_python_summary_of_a_model_left_alone_has_no_nan(tmp_path):
    import cle_onnx

    _, report = cle_onnx.equalize_model(str(_weights_from_inputs(tmp_path / "in.onnx")))
    text = report.summary()
    assert "nan" not in text and "inf" not in text and "regions equalized:  0" in text


def _sigmoid_head(path, bias):
    from onnx import TensorProto, helper, numpy_helper

    w = np.random.default_rng(0).normal(size=(2, 4, 1, 1)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "w", "b"], ["logits"]),
            helper.make_node("Sigmoid", ["logits"], ["p"]),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])],
        [helper.make_tensor_value_info("p", TensorProto.FLOAT, [1, 2, 8, 8])],
        [
            numpy_helper.from_array(w, "w"),
            numpy_helper.from_array(np.full(2, bias, np.float32), "b"),
        ],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(path))
    return path


def test_check_judges_a_saturated_sigmoid_on_its_input(tmp_path):
    # Logits near -8 that differ by 2e-4: about 92 dB before the Sigmoid, but the
    # saturated outputs (about 3e-4) carry that absolute error as a relative one: 74 dB.
    from cle_core._cli import check_failed
    from cle_onnx._check import check_outputs

    a = _sigmoid_head(tmp_path / "a.onnx", -8.0)
    b = _sigmoid_head(tmp_path / "b.onnx", -8.0002)
    x = np.random.default_rng(1).normal(size=(1, 4, 8, 8)).astype(np.float32)
    from dataclasses import replace

    [check] = check_outputs(a, b, {"x": x})
    assert check.name == "p" and check.dtype == "float32" and not check.probes
    assert check.sqnr < 80 and check.before[0] == "Sigmoid" and check.before[1] > 90
    assert not check_failed(check, 80.0)
    assert check_failed(replace(check, before=None), 80.0)
    assert check_failed(replace(check, before=("Sigmoid", 79.0)), 80.0)


def test_check_line_names_the_figure_it_judges(tmp_path):
    # A passing saturated output must not read as "33 dB ... threshold 80 dB ok".
    from cle_core import OutputCheck
    from cle_core._cli.equalize import format_check

    check = OutputCheck("p", 33.36, 1e-4, 3e-1, "float32", before=("Sigmoid", 131.5))
    [line] = format_check(check, None, False)
    assert line.startswith(
        "check: output 'p': judged on the input of the final Sigmoid: 131.50 dB >= 80 dB ok; "
        "the output itself: SQNR 33.36 dB"
    )
    assert "saturation" in line


def test_check_with_bias_correction_judges_the_equalization_and_shows_the_change(tmp_path, capsys):
    src, out = tmp_path / "m.onnx", tmp_path / "o.onnx"
    onnx.save(om.conv_pair("relu"), str(src))
    assert main(["equalize", str(src), "-o", str(out), "--check", "--bias-correction"]) == 0
    text = capsys.readouterr().out
    assert "bias correction:    1 layers (input means from batch norms)" in text
    judged, shown = text.split("check: the equalization, before the bias correction:\n")[1].split(
        "check: with the bias correction"
    )
    assert "ok" in judged and float(judged.split("SQNR ")[1].split(" dB")[0]) > 100
    # The corrected model differs from the original by design: shown, not judged.
    assert float(shown.split("SQNR ")[1].split(" dB")[0]) < 80 and "not judged" in shown
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "o.onnx"]
    assert src.read_bytes() == om.conv_pair("relu").SerializeToString()  # input untouched


def test_empirical_bias_correction_measures_on_the_calibration_inputs(tmp_path, capsys):
    src, out = tmp_path / "m.onnx", tmp_path / "o.onnx"
    onnx.save(om.conv_pair("relu"), str(src))
    assert main(["equalize", str(src), "-o", str(out), "--bias-correction", "empirical"]) == 2
    assert "--calibration" in capsys.readouterr().err and not out.exists()
    x = np.random.default_rng(0).normal(size=(16, 3, 8, 8)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    args = ["--calibration", str(tmp_path / "x.npy"), "--report", str(tmp_path / "r.json")]
    assert (
        main(["equalize", str(src), "-o", str(out), "--bias-correction", "empirical", *args]) == 0
    )
    assert "input means from calibration (empirical)" in capsys.readouterr().out
    # On the inputs it measured, the weight-rounded model's mean output error is smaller.
    from cle_onnx._evaluate import run, weights_quantized

    original = onnx.load(str(src))
    reference = run(original, x)
    errors = []
    for model in (cle_onnx.equalize_model(original)[0], onnx.load(str(out))):
        rounded = weights_quantized(model, 8, False, True)
        errors.append(np.abs((run(rounded, x) - reference).mean(axis=(0, 2, 3))).mean())
    assert errors[1] < errors[0] / 2


def test_inspect_shows_the_analytic_correction_and_refuses_the_empirical(tmp_path, capsys):
    src = tmp_path / "m.onnx"
    onnx.save(om.conv_pair("relu"), str(src))
    assert main(["inspect", str(src), "--bias-correction"]) == 0
    assert "bias correction:    1 layers" in capsys.readouterr().out
    assert main(["inspect", str(src), "--bias-correction", "empirical"]) == 2
    assert "cle equalize --calibration" in capsys.readouterr().err


def test_empirical_correction_leaves_the_callers_proto_alone_until_it_succeeds(monkeypatch):
    from cle_onnx import _empirical

    model = om.conv_pair("relu")
    given = model.SerializeToString()
    x = np.random.default_rng(0).normal(size=(8, 3, 8, 8)).astype(np.float32)
    # Not in place: the input is untouched after success.
    new, _ = cle_onnx.equalize_model(model, bias_correction="empirical", calibration=x)
    assert model.SerializeToString() == given and new is not model
    # In place, failing half-way through the layers: untouched too.
    real, calls = _empirical.weights_on_grid, []

    def fails_second(*args):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("disk on fire")
        return real(*args)

    monkeypatch.setattr(_empirical, "weights_on_grid", fails_second)
    with pytest.raises(RuntimeError, match="disk on fire"):
        cle_onnx.equalize_model(model, bias_correction="empirical", calibration=x, inplace=True)
    assert model.SerializeToString() == given
    # In place and successful: the caller's proto is the corrected model.
    monkeypatch.setattr(_empirical, "weights_on_grid", real)
    out, report = cle_onnx.equalize_model(
        model, bias_correction="empirical", calibration=x, inplace=True
    )
    assert out is model and report.bias_corrections
    assert model.SerializeToString() == new.SerializeToString()
