"""``cle evaluate``, ``--plot`` and the plot helpers."""

from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from onnx import numpy_helper  # noqa: E402

from cle_core._cli import main  # noqa: E402
from tests.helpers import onnx_models as om  # noqa: E402


@pytest.fixture
def files(tmp_path):
    src = tmp_path / "m.onnx"
    onnx.save(om.gemm_head(1), str(src))  # a classifier: (N, 3) logits
    dst = tmp_path / "m_cle.onnx"
    assert main(["equalize", str(src), "-o", str(dst), "--quiet"]) == 0
    x = np.random.default_rng(0).normal(size=(2, 3, 8, 8)).astype(np.float32)
    npy = tmp_path / "x.npy"
    np.save(npy, x)
    return src, dst, npy


def table(text):
    lines = text.strip().splitlines()
    notes = ("*", "evaluate:", "the input's own grid alone:")  # the lines around the table
    rows = [line.split() for line in lines if not line.startswith(notes)]
    value = {"exact": np.inf}  # an infinite SQNR: the same outputs
    return rows[0], {r[0]: [value.get(v) or float(v) for v in r[1:]] for r in rows[1:]}


def test_one_score_per_example_has_no_top1_column(tmp_path, capsys):
    # A detector's or a voice-activity model's single probability: top-1 agreement
    # over one class would always read 1.000.
    model = om.gemm_head(1)
    last = model.graph.node[-1]
    w = next(t for t in model.graph.initializer if t.name == last.input[1])
    c = next(t for t in model.graph.initializer if t.name == last.input[2])
    w.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(w)[:1], w.name))
    c.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(c)[:1], c.name))
    model.graph.output[0].type.tensor_type.shape.dim[1].dim_value = 1
    src = tmp_path / "one.onnx"
    onnx.save(model, str(src))
    np.save(
        tmp_path / "x.npy", np.random.default_rng(0).normal(size=(4, 3, 8, 8)).astype(np.float32)
    )
    assert main(["evaluate", str(src), "--inputs", str(tmp_path / "x.npy")]) == 0
    header, _ = table(capsys.readouterr().out)
    assert header == ["model", "FP32", "dB", "W8", "dB", "W8A8", "dB"]


def test_evaluate_original_and_equalized(files, capsys):
    src, dst, npy = files
    given = {p: p.read_bytes() for p in (src, dst, npy)}
    assert main(["evaluate", str(src), str(dst), "--inputs", str(npy)]) == 0
    assert {p: p.read_bytes() for p in given} == given  # it reads, never writes them
    out = capsys.readouterr().out
    header, rows = table(out)
    # The original is quantized with its batch norms folded, as a deployment would, and
    # the table says so: folding alone is neither a loss nor a gain of equalization.
    assert set(rows) == {"original*", "equalized"}
    assert "* with its 1 batch norms folded" in out
    assert rows["original*"][0] > 100  # FP32 folded original against the original, dB
    assert rows["equalized"][0] > 80  # FP32 equalized against original, dB
    assert all(np.isfinite(rows["equalized"][1:]))
    assert " ".join(header) == "model FP32 dB W8 dB W8 top1 W8A8 dB W8A8 top1"


def test_evaluate_weights_only_other_bits(files, capsys):
    src, _, npy = files
    assert (
        main(
            [
                "evaluate",
                str(src),
                "--inputs",
                str(npy),
                "--bits",
                "4",
                "--weights-only",
                "--per-channel",
                "--symmetric",
            ]
        )
        == 0
    )
    header, rows = table(capsys.readouterr().out)
    assert " ".join(header) == "model FP32 dB W4 dB W4 top1"
    assert list(rows) == ["original*"]


def test_evaluate_bad_inputs(files, capsys, tmp_path):
    src, _, _ = files
    assert main(["evaluate", str(src), "--inputs", str(tmp_path / "nope.txt")]) == 2
    assert "--inputs takes" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["evaluate", str(src), "--inputs", str(empty)]) == 2
    assert "no image files" in capsys.readouterr().err


def test_evaluate_image_folder(tmp_path, capsys):
    skimage_data = pytest.importorskip("skimage.data")
    import skimage.io

    folder = tmp_path / "imgs"
    folder.mkdir()
    skimage.io.imsave(str(folder / "a.png"), skimage_data.astronaut()[::8, ::8])
    skimage.io.imsave(str(folder / "b.png"), skimage_data.camera()[::8, ::8])
    src = tmp_path / "m.onnx"
    onnx.save(om.gemm_head(1), str(src))
    assert main(["evaluate", str(src), "--inputs", str(folder), "--weights-only"]) == 0
    _, rows = table(capsys.readouterr().out)
    assert np.isfinite(rows["original*"][1])


def test_equalize_plot(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    src = tmp_path / "m.onnx"
    onnx.save(om.depthwise_triple(), str(src))
    plots = tmp_path / "plots"
    assert main(["equalize", str(src), "-o", str(tmp_path / "o.onnx"), "--plot", str(plots)]) == 0
    names = sorted(p.name for p in plots.iterdir())
    assert names == ["channel_ranges.png", "sqnr_per_layer.png"]
    for p in plots.iterdir():
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 10_000
    assert "channel_ranges.png" in capsys.readouterr().out


def test_plots_skip_when_nothing_changed(tmp_path):
    pytest.importorskip("matplotlib")
    import cle_onnx
    from cle_core._plots import worst_layers, write_plots

    _, report = cle_onnx.equalize_model(om.conv_pair("sigmoid"), fold_bn=False)
    assert worst_layers(report, 8) == []
    assert [p.name for p in write_plots(report, tmp_path)] == ["sqnr_per_layer.png"]


def _small_classifier(path, opset: int, channels: int):
    """Conv -> Relu -> Flatten -> Gemm on ``channels`` x 8 x 8 inputs, no batch norm."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = rng.normal(size=(8, channels, 3, 3)) * np.logspace(-2, 1, 8)[:, None, None, None]
    inits = [
        numpy_helper.from_array(w.astype(np.float32), "w"),
        numpy_helper.from_array(rng.normal(size=8).astype(np.float32), "b"),
        numpy_helper.from_array(rng.normal(size=(10, 512)).astype(np.float32), "wf"),
        numpy_helper.from_array(np.zeros(10, np.float32), "c"),
    ]
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "w", "b"], ["h"], pads=[1, 1, 1, 1]),
            helper.make_node("Relu", ["h"], ["a"]),
            helper.make_node("Flatten", ["a"], ["f"]),
            helper.make_node("Gemm", ["f", "wf", "c"], ["y"], transB=1),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, channels, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 7
    onnx.save(model, str(path))
    return path


@pytest.mark.parametrize("opset, channels", [(9, 3), (13, 1)])
def test_evaluate_old_opsets_and_grey_inputs(tmp_path, capsys, opset, channels):
    # An opset-9 model is evaluated as a copy converted to opset 13 (QuantizeLinear
    # needs 10); a one-channel input gets the sample images in grey. Both used to end in
    # "internal error".
    pytest.importorskip("skimage")
    src = _small_classifier(tmp_path / "m.onnx", opset, channels)
    assert main(["evaluate", str(src)]) == 0
    _, rows = table(capsys.readouterr().out)
    assert list(rows) == ["original"]  # no batch norm: nothing to fold, no note
    assert all(np.isfinite(rows["original"][1:]))


def test_evaluate_with_activations_takes_what_onnxruntime_offers(files, capsys):
    src, dst, npy = files
    assert main(["evaluate", str(src), "--inputs", str(npy), "--bits", "6"]) == 2
    err = capsys.readouterr().err
    assert "4, 8 or 16 bits, not 6" in err and "weights only" in err
    args = ["evaluate", str(src), str(dst), "--inputs", str(npy), "--per-channel", "--symmetric"]
    assert main(args) == 0
    header, rows = table(capsys.readouterr().out)
    assert header[-2:] == ["W8A8", "top1"] and set(rows) == {"original*", "equalized"}
    assert all(np.isfinite(rows["equalized"]))
