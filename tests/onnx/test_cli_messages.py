"""What a newcomer reads: short usage errors, flags named as typed, a PyTorch file
explained, plot folders like output folders, summaries of a few lines (issue #19)."""

from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from cle_core._cli import main  # noqa: E402
from tests.helpers import onnx_models as om  # noqa: E402
from tests.onnx.test_cli import _weights_from_inputs  # noqa: E402


@pytest.fixture
def model_file(tmp_path):
    path = tmp_path / "in.onnx"
    onnx.save(om.depthwise_triple(), str(path))
    return path


@pytest.mark.parametrize(
    "argv",
    [
        ["equalize"],
        ["equalize", "m.onnx", "--weight-bits", "x"],
        ["nope"],
        [],
        ["evaluate"],
        ["inspect", "m.onnx", "--objective", "nope"],
    ],
)
def test_usage_errors_are_two_lines(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and ": error: " in err[0]
    prog = err[0].split(": error: ")[0]
    assert prog.startswith("cle") and err[1] == f"try '{prog} --help'"


@pytest.mark.parametrize(
    ("flags", "said"),
    [
        (["--weight-bits", "0"], "--weight-bits must be an integer from 2 to 16"),
        (
            ["--activation-bits", "1"],
            "--activation-bits must be an integer from 2 to 16, or 'none'",
        ),
        (["--max-sweeps", "0"], "--max-sweeps must be at least 1"),
        (["--tolerance", "0"], "--tolerance must be positive"),
        (
            ["--activation-weight", "1"],
            "--activation-weight applies to --objective balance; the noise objective weighs "
            "activations by --activation-bits (set --weights-only for a weights-only",
        ),
        (
            ["--activation-weight", "-1", "--objective", "balance"],
            "--activation-weight must be finite and >= 0",
        ),
        (["--weights-only", "--activation-bits", "4"], "give --weights-only or --activation-bits"),
    ],
)
@pytest.mark.parametrize("command", ["equalize", "inspect"])
def test_option_errors_name_the_flag(command, flags, said, model_file, tmp_path, capsys):
    out = ["-o", str(tmp_path / "o.onnx")] if command == "equalize" else []
    assert main([command, str(model_file), *out, *flags]) == 2
    err = capsys.readouterr().err
    assert err == f"cle: error: {err.removeprefix('cle: error: ')}" and said in err
    assert "_" not in err.replace("cle: error: ", "")  # no Python name left
    assert not (tmp_path / "o.onnx").exists()


def test_evaluate_names_its_bits_flag(model_file, capsys):
    assert main(["evaluate", str(model_file), "--bits", "1"]) == 2
    assert "--bits must be between 2 and 16" in capsys.readouterr().err


def test_weights_only_reaches_equalize_and_inspect(model_file, tmp_path, capsys):
    """It crashed with a TypeError (activation_bits given twice)."""
    assert (
        main(["equalize", str(model_file), "-o", str(tmp_path / "o.onnx"), "--weights-only"]) == 0
    )
    assert "est. output SQNR (W8) " in capsys.readouterr().out
    assert main(["inspect", str(model_file), "--weights-only"]) == 0
    assert "float activations" in capsys.readouterr().out


@pytest.mark.parametrize("name", ["model.pt", "model.pth", "model.PT"])
def test_a_pytorch_file_says_how_to_equalize_it(name, tmp_path, capsys):
    src = tmp_path / name
    src.write_bytes(b"PK")
    assert main(["equalize", str(src), "-o", str(tmp_path / "o.onnx")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cle_torch.equalize_model(model)" in err
    assert "export it to ONNX first" in err and "registered backends" not in err


def test_an_unread_suffix_lists_the_suffixes_that_are_read(tmp_path, capsys):
    (tmp_path / "m.tflite").write_bytes(b"?")
    assert main(["inspect", str(tmp_path / "m.tflite")]) == 2
    err = capsys.readouterr().err
    assert "no CLE backend reads this file (the registered backends read " in err
    read = err.split("backends read ")[1].split(";")[0].split(", ")
    assert ".onnx" in read and ".pt" not in read


def test_plot_folder_needs_its_parent_like_an_output(model_file, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    plots = tmp_path / "nodir" / "plots"
    argv = ["equalize", str(model_file), "-o", str(tmp_path / "o.onnx"), "--plot", str(plots)]
    assert main(argv) == 2
    assert f"directory {tmp_path / 'nodir'} does not exist" in capsys.readouterr().err
    assert not (tmp_path / "nodir").exists() and not (tmp_path / "o.onnx").exists()
    # as -o into a missing folder
    assert main(["equalize", str(model_file), "-o", str(tmp_path / "nodir" / "o.onnx")]) == 2
    (tmp_path / "nodir").mkdir()
    assert main(argv) == 0
    assert sorted(p.name for p in plots.iterdir()) == ["channel_ranges.png", "sqnr_per_layer.png"]


def test_plot_with_nothing_to_draw_says_so(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    src = _weights_from_inputs(tmp_path / "in.onnx")
    plots = tmp_path / "plots"
    assert main(["equalize", str(src), "-o", str(tmp_path / "o.onnx"), "--plot", str(plots)]) == 0
    out = capsys.readouterr().out
    assert (
        f"plots: nothing to plot (no layer was translated, nothing was equalized); {plots}" in out
    )
    assert not plots.exists()


def test_plot_without_changed_layers_says_which_plot_is_missing(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    src = tmp_path / "in.onnx"
    onnx.save(om.depthwise_triple(), str(src))
    argv = ["equalize", str(src), "-o", str(tmp_path / "o.onnx"), "--plot", str(tmp_path / "p")]
    assert main([*argv, "--no-scale", "--no-fold", "--no-high-bias"]) == 0
    assert "plots: no channel_ranges.png (no layer's weights changed)" in capsys.readouterr().out
    assert [p.name for p in (tmp_path / "p").iterdir()] == ["sqnr_per_layer.png"]


def test_default_output_is_a_summary_and_verbose_the_detail(model_file, tmp_path, capsys):
    out = ["-o", str(tmp_path / "o.onnx")]
    assert main(["equalize", str(model_file), *out]) == 0
    short = capsys.readouterr().out
    assert main(["equalize", str(model_file), *out, "-v"]) == 0
    full = capsys.readouterr().out
    assert "estimated INT8 weight SQNR per layer (dB):" in full
    assert "  Conv18 " in full and "  Conv18 " not in short
    assert "  [scale] Conv46 -> ?: 'conv_out45' is a graph output" in full
    assert "  1 x [scale] Conv46 -> ?: 'conv_out45' is a graph output" in short
    assert len(short.splitlines()) <= 14
    assert main(["equalize", str(model_file), *out, "-v", "--quiet"]) == 0
    assert capsys.readouterr().out == ""


def test_inspect_summary_by_default_every_candidate_with_verbose(model_file, capsys):
    import cle_onnx

    assert main(["inspect", str(model_file)]) == 0
    short = capsys.readouterr().out
    _, report = cle_onnx.equalize_model(onnx.load(str(model_file)))
    assert short.splitlines()[1:] == report.summary().splitlines()
    assert main(["inspect", str(model_file), "--verbose"]) == 0
    assert "3 regions would be equalized:" in capsys.readouterr().out


def test_long_layer_names_keep_both_ends():
    from cle_core._plots import _shorten

    name = "/model/backbone/features.12/block.3/conv_pw/Conv"
    short = _shorten(name, 32)
    assert len(short) == 32 and short.endswith("block.3/conv_pw/Conv")
    assert short.startswith("/model/bac") and _shorten("/a/Conv", 32) == "/a/Conv"


def test_plots_of_many_long_named_layers_are_written(model_file, tmp_path):
    pytest.importorskip("matplotlib")
    from dataclasses import replace

    import cle_onnx
    from cle_core._plots import write_plots
    from cle_core._report import LayerRecord

    _, report = cle_onnx.equalize_model(onnx.load(str(model_file)))
    rng = np.random.default_rng(0)
    layers = []
    for i in range(40):
        before = np.exp(3 * rng.normal(size=96))  # ranges over several decades
        name = f"/model/backbone/features.{i}/block/conv_pw/Conv"
        layers.append(LayerRecord(name, before, np.sqrt(before), 30.0 + i % 3, 38.0))
    written = write_plots(replace(report, layers=tuple(layers)), tmp_path / "plots")
    assert [p.name for p in written] == ["channel_ranges.png", "sqnr_per_layer.png"]
    for p in written:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 10_000


def test_a_scaled_relu6_is_a_scalar_clip_then_a_per_channel_min(model_file):
    """As docs/migrating.rst says."""
    import cle_onnx

    new, _ = cle_onnx.equalize_model(onnx.load(str(model_file)))
    ops = [n.op_type for n in new.graph.node]
    assert ops == ["Conv", "Clip", "Min"] * 3 + ["Conv"]


def test_a_reader_that_stops_early_is_no_error(model_file):
    """``cle inspect m.onnx | head -1`` printed "internal error: BrokenPipeError"."""
    import subprocess
    import sys

    proc = subprocess.Popen(
        [sys.executable, "-m", "cle_core._cli", "inspect", str(model_file), "-v"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    proc.stdout.close()  # before cle prints anything: every write meets a closed pipe
    err = proc.stderr.read().decode()
    assert proc.wait() == 141 and err == ""


@pytest.mark.parametrize(("low", "high"), [(0.02, 0.3), (1e-6, 30.0)])
def test_log_axes_of_channel_ranges_label_a_few_whole_decades(low, high):
    pytest.importorskip("matplotlib")
    from cle_core._plots import _few_log_ticks, _pyplot

    plt = _pyplot()
    fig, ax = plt.subplots()
    try:
        values = np.geomspace(low, high, 50)
        ax.plot(values)
        ax.set_yscale("log")
        _few_log_ticks(ax, values)
        fig.canvas.draw()
        lo, hi = ax.get_ylim()
        assert np.log10(lo) == np.floor(np.log10(low)) and np.log10(hi) == np.ceil(np.log10(high))
        shown = [t for t in ax.yaxis.get_majorticklabels() if t.get_text()]
        inside = [t for t in shown if lo <= t.get_position()[1] <= hi]
        assert 2 <= len(inside) <= 6
        assert not [t for t in ax.yaxis.get_minorticklabels() if t.get_text()]
    finally:
        plt.close(fig)
