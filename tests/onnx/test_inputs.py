"""The inputs a user gives ``--check``, ``--calibration`` and ``cle evaluate``: a folder of
images, a ``.npy`` or a ``.npz`` by input name; ``--dim`` and ``--input-shape`` for
dynamic dimensions; integer and boolean inputs never made up; every missing size in one
error; the inputs used printed; onnxruntime refusing them in one line naming them."""

from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from cle_core import CLEError  # noqa: E402
from cle_core._cli import main  # noqa: E402
from tests.helpers.onnx_models import OnnxBuilder  # noqa: E402

N = 6  # examples in every file the tests give


def _model(b: OnnxBuilder, inputs: list, output: str, infer: bool = True) -> onnx.ModelProto:
    graph = helper.make_graph(
        b.nodes,
        "inputs",
        [helper.make_tensor_value_info(*i) for i in inputs],
        [helper.make_tensor_value_info(output, TensorProto.FLOAT, None)],
        b.inits,
    )
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", b.opset)])
    m.ir_version = 7
    if not infer:  # onnx's shape inference takes a declared -1 for a size
        m.graph.output[0].CopyFrom(
            helper.make_tensor_value_info(output, TensorProto.FLOAT, [None] * 4)
        )
        onnx.checker.check_model(m)
        return m
    m.graph.output[0].CopyFrom(onnx.shape_inference.infer_shapes(m).graph.output[0])
    onnx.checker.check_model(m, full_check=True)
    return m


def _block(b: OnnxBuilder, x: str) -> str:
    """Conv -> BN -> ReLU -> Conv: something to equalize."""
    h = b.node("Relu", [b.bn(b.conv(x, 3, 6, 3, pad=1), 6)])
    return b.conv(h, 6, 4, 1)


def _int64(b: OnnxBuilder, values, base: str) -> str:
    name = b.name(base)
    b.inits.append(numpy_helper.from_array(np.asarray(values, np.int64), name))
    return name


def vad() -> onnx.ModelProto:
    """As a voice-activity detector: data ``x``, a recurrent ``state`` with its batch in
    axis 1, and an int64 scalar sample rate ``sr`` that scales the output."""
    b = OnnxBuilder(3)
    h = _block(b, "x")
    s = b.node("Transpose", ["state"], perm=[1, 0, 2])
    s = b.node("ReduceMean", [s], axes=[1, 2], keepdims=1)
    s = b.node("Reshape", [s, _int64(b, [-1, 1, 1, 1], "shape")])
    h = b.node("Add", [h, s])
    r = b.node("Div", [b.node("Cast", ["sr"], to=TensorProto.FLOAT), b.init(16000.0, "hz")])
    out = b.node("Mul", [h, r])
    return _model(
        b,
        [
            ("x", TensorProto.FLOAT, ["batch", 3, 8, 8]),
            ("state", TensorProto.FLOAT, [2, "batch", 4]),
            ("sr", TensorProto.INT64, []),
        ],
        out,
    )


def vad_inputs(n: int = N) -> dict:
    rng = np.random.default_rng(5)
    return {
        "x": rng.normal(size=(n, 3, 8, 8)).astype(np.float32),
        "state": rng.normal(size=(2, n, 4)).astype(np.float32),
        "sr": np.array(16000, np.int64),
    }


def flagged() -> onnx.ModelProto:
    """A boolean input ``flag`` (per example) that gates the output."""
    b = OnnxBuilder(4)
    h = _block(b, "x")
    out = b.node("Mul", [h, b.node("Cast", ["flag"], to=TensorProto.FLOAT)])
    return _model(
        b,
        [
            ("x", TensorProto.FLOAT, ["batch", 3, 8, 8]),
            ("flag", TensorProto.BOOL, ["batch", 1, 1, 1]),
        ],
        out,
    )


def two_inputs() -> onnx.ModelProto:
    b = OnnxBuilder(5)
    h = b.node("Add", [b.conv("a", 3, 6, 3, pad=1), b.conv("b", 3, 6, 1)])
    out = b.conv(b.node("Relu", [h]), 6, 4, 1)
    shape = ["batch", 3, 8, 8]
    return _model(b, [("a", TensorProto.FLOAT, shape), ("b", TensorProto.FLOAT, shape)], out)


def unnamed() -> onnx.ModelProto:
    """As PaddlePaddle exports: the batch dimension is -1, with no name; the height and
    width are unnamed too, and the graph takes only 8 x 16 (an Add of a constant, as in
    a text recognizer: at 224 x 224 onnxruntime refuses it)."""
    b = OnnxBuilder(6)
    h = b.node("Relu", [b.bn(b.conv("x", 3, 6, 3, pad=1), 6)])
    h = b.node("Add", [h, b.init(np.ones((1, 6, 8, 16)), "side")])
    out = b.conv(h, 6, 4, 1)
    return _model(b, [("x", TensorProto.FLOAT, [-1, 3, -1, -1])], out, infer=False)


def fixed_one() -> onnx.ModelProto:
    """``unnamed`` with a batch of 1 written down."""
    m = unnamed()
    m.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1
    return m


@pytest.fixture
def save(tmp_path):
    def save(model, name="m.onnx"):
        path = tmp_path / name
        onnx.save(model, str(path))
        return path

    return save


@pytest.fixture
def images(tmp_path):
    skimage_data = pytest.importorskip("skimage.data")
    import skimage.io

    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, img in enumerate((skimage_data.astronaut(), skimage_data.coffee())):
        skimage.io.imsave(str(folder / f"{i}.png"), img[::8, ::8])
    return folder


def npz(tmp_path, arrays, name="in.npz"):
    path = tmp_path / name
    np.savez(path, **arrays)
    return path


def error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if not line.startswith("cle: warning:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("cle: error: "), err
    return lines[0]


def equalize(src, out, *extra) -> int:
    return main(["equalize", str(src), "-o", str(out), "--quiet", *extra])


# --- --check ------------------------------------------------------------------------------


def test_check_never_makes_up_an_int64_input(tmp_path, save, capsys):
    src, out = save(vad()), tmp_path / "o.onnx"
    assert equalize(src, out, "--check", "--dim", "batch=2") == 2
    err = error_line(capsys)
    assert "input 'sr' takes int64 values, which are never made up" in err
    assert "--inputs FILE.npz" in err
    assert not out.exists()


def test_check_int64_input_from_npz(tmp_path, save, capsys):
    src, out = save(vad()), tmp_path / "o.onnx"
    given = npz(tmp_path, vad_inputs())
    assert equalize(src, out, "--check", "--inputs", str(given)) == 0
    lines = capsys.readouterr().out.splitlines()
    assert (
        f"check: inputs from {given}: x (6, 3, 8, 8) float32, state (2, 6, 4) float32, "
        "sr () int64" in lines
    )
    assert any(line.startswith("check: output") and line.endswith(" ok") for line in lines)


def test_check_never_makes_up_a_boolean_input(tmp_path, save, capsys):
    src, out = save(flagged()), tmp_path / "o.onnx"
    assert equalize(src, out, "--check", "--dim", "batch=2") == 2
    err = error_line(capsys)
    assert "input 'flag' takes bool values, which are never made up" in err
    assert "--inputs FILE.npz" in err and not out.exists()
    rng = np.random.default_rng(0)
    given = npz(
        tmp_path,
        {
            "x": rng.normal(size=(3, 3, 8, 8)).astype(np.float32),
            "flag": np.array([True, False, True]).reshape(3, 1, 1, 1),
        },
    )
    assert equalize(src, out, "--check", "--inputs", str(given)) == 0
    assert "flag (3, 1, 1, 1) bool" in capsys.readouterr().out


def test_check_unnamed_dimension_needs_input_shape(tmp_path, save, capsys):
    src, out = save(unnamed()), tmp_path / "o.onnx"
    assert equalize(src, out, "--check") == 2
    err = error_line(capsys)
    # The first axis is the batch, 1 unless given; the height and width are the model's.
    assert "input 'x' (?, 3, ?, ?): dimensions 2, 3 have no size" in err
    assert "--input-shape x=1,3,D2,D3" in err and not out.exists()
    assert equalize(src, out, "--check", "--input-shape", "x=1,3,8,16") == 0
    assert "check: random inputs x (1, 3, 8, 16) float32" in capsys.readouterr().out.splitlines()


def test_check_one_line_per_input_and_question_marks_are_unnamed(tmp_path, save, capsys):
    # As a PaddlePaddle text recognizer declares it: two named dynamic axes and a "?",
    # which names nothing (several exporters write it for every unknown axis).
    m = unnamed()
    dims = m.graph.input[0].type.tensor_type.shape.dim
    params = ["p2o.DynamicDimension.0", "", "?", "p2o.DynamicDimension.1"]
    for d, param in zip(dims, params, strict=True):
        if param:
            d.dim_param = param
    src, out = save(m), tmp_path / "o.onnx"
    assert equalize(src, out, "--check") == 2
    err = error_line(capsys)
    assert err.count("input 'x'") == 1 and "--dim ?" not in err
    assert "dimensions 2, 3 have no size: --input-shape x=1,3,D2,D3" in err
    assert equalize(src, out, "--check", "--dim", "?=8") == 2
    assert "--dim ?=...: no input dimension is named '?'" in error_line(capsys)
    # All named: the --dim flags, each name once.
    dims[2].dim_param = "h"
    src = save(m)
    assert equalize(src, out, "--check") == 2
    err = error_line(capsys)
    assert "dimensions 2 ('h'), 3 ('p2o.DynamicDimension.1') are dynamic" in err
    assert "--dim h=SIZE --dim p2o.DynamicDimension.1=SIZE" in err
    assert equalize(src, out, "--check", "--dim", "h=8", "--dim", "p2o.DynamicDimension.1=16") == 0
    assert "check: random inputs x (1, 3, 8, 16) float32" in capsys.readouterr().out


def test_check_two_inputs_from_npz(tmp_path, save, capsys):
    src, out = save(two_inputs()), tmp_path / "o.onnx"
    rng = np.random.default_rng(1)
    arrays = {k: rng.normal(size=(2, 3, 8, 8)).astype(np.float32) for k in "ab"}
    assert equalize(src, out, "--check", "--inputs", str(npz(tmp_path, arrays))) == 0
    assert "a (2, 3, 8, 8) float32, b (2, 3, 8, 8) float32" in capsys.readouterr().out
    # One .npy feeds one input: refused, naming both and the .npz that would do.
    np.save(tmp_path / "a.npy", arrays["a"])
    assert equalize(src, tmp_path / "p.onnx", "--check", "--inputs", str(tmp_path / "a.npy")) == 2
    assert "the model has 2 inputs (a, b)" in error_line(capsys)
    assert not (tmp_path / "p.onnx").exists()


def test_check_reports_every_missing_size_and_input_in_one_error(tmp_path, save, capsys):
    m = vad()
    m.graph.input[0].type.tensor_type.shape.dim[2].dim_value = -1  # x: (batch, 3, ?, 8)
    src, out = save(m), tmp_path / "o.onnx"
    assert equalize(src, out, "--check") == 2
    err = error_line(capsys)
    # x's unnamed height needs --input-shape; sr its values: both in the one line.
    assert "input 'x' (batch, 3, ?, 8): dimension 2 has no size: " in err
    assert "--input-shape x=1,3,D2,8" in err
    # The batch, x's first axis, is 1 unless given, in state too.
    assert "'state'" not in err and "--dim batch" not in err
    assert "input 'sr' takes int64 values" in err
    assert not out.exists()


def test_check_prints_the_random_inputs_it_runs_on(tmp_path, save, capsys):
    src, out = save(two_inputs()), tmp_path / "o.onnx"
    assert main(["equalize", str(src), "-o", str(out), "--check", "--dim", "batch=2"]) == 0
    assert (
        "check: random inputs a (2, 3, 8, 8) float32, b (2, 3, 8, 8) float32"
        in capsys.readouterr().out.splitlines()
    )


def test_check_inputs_the_graph_refuses_are_one_line_naming_them(tmp_path, save, capsys):
    src, out = save(fixed_one()), tmp_path / "o.onnx"
    assert equalize(src, out, "--check", "--input-shape", "x=1,3,16,16") == 2
    err = error_line(capsys)
    assert "onnxruntime cannot run" in err and "x (1, 3, 16, 16) float32" in err
    assert "internal error" not in err and not out.exists()


def test_input_shape_that_the_model_refuses(tmp_path, save, capsys):
    src, out = save(two_inputs()), tmp_path / "o.onnx"
    assert equalize(src, out, "--check", "--input-shape", "a=2,4,8,8", "--dim", "batch=2") == 2
    assert "--input-shape a=2,4,8,8 does not fit input 'a' (batch, 3, 8, 8)" in error_line(capsys)
    assert equalize(src, out, "--check", "--input-shape", "a=2,3,x") == 2
    assert "--input-shape expects INPUT=D0,D1,..." in error_line(capsys)
    # A name the model does not have is a typo, not something to ignore.
    assert equalize(src, out, "--check", "--input-shape", "c=2,3,8,8", "--dim", "btch=2") == 2
    err = error_line(capsys)
    assert "--input-shape c=...: the model has no input 'c' (it has a, b)" in err
    assert "--dim btch=...: no input dimension is named 'btch' (named: batch)" in err
    assert not out.exists()


def test_inputs_without_check_is_a_usage_error(tmp_path, save, capsys):
    src, out = save(two_inputs()), tmp_path / "o.onnx"
    given = npz(tmp_path, {"a": np.zeros((1, 3, 8, 8), np.float32)})
    assert equalize(src, out, "--inputs", str(given)) == 2
    assert "--check" in error_line(capsys) and not out.exists()


# --- --calibration ------------------------------------------------------------------------


def test_calibration_int64_input(tmp_path, save, images, capsys):
    src, out = save(vad()), tmp_path / "o.onnx"
    assert equalize(src, out, "--calibration", str(images)) == 2
    err = error_line(capsys)
    assert "the model has 3 inputs (x, state, sr)" in err and "a .npz" in err
    assert not out.exists()
    given = npz(tmp_path, vad_inputs())
    assert main(["equalize", str(src), "-o", str(out), "--calibration", str(given)]) == 0
    assert (
        f"calibration: {given}: x (6, 3, 8, 8) float32, state (2, 6, 4) float32, sr () int64"
        in (capsys.readouterr().out.splitlines())
    )


def test_calibration_boolean_input(tmp_path, save, capsys):
    src, out = save(flagged()), tmp_path / "o.onnx"
    rng = np.random.default_rng(2)
    x = rng.normal(size=(N, 3, 8, 8)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    assert equalize(src, out, "--calibration", str(tmp_path / "x.npy")) == 2
    assert "the model has 2 inputs (x, flag)" in error_line(capsys)
    # Floats for the boolean input: refused, not cast.
    bad = npz(tmp_path, {"x": x, "flag": np.ones((N, 1, 1, 1), np.float32)}, "bad.npz")
    assert equalize(src, out, "--calibration", str(bad)) == 2
    assert "holds float32 values, but the input takes bool" in error_line(capsys)
    assert not out.exists()
    good = npz(tmp_path, {"x": x, "flag": rng.random((N, 1, 1, 1)) > 0.5})
    assert equalize(src, out, "--calibration", str(good)) == 0 and out.exists()


def test_calibration_unnamed_dimensions_sized_by_input_shape(tmp_path, save, images, capsys):
    src, out = save(unnamed()), tmp_path / "o.onnx"
    assert equalize(src, out, "--calibration", str(images)) == 2
    err = capsys.readouterr().err
    # The guess is said, with the flag that changes it; onnxruntime's refusal is one line
    # naming the inputs as fed.
    assert "input 'x' has a dynamic height and width: images are resized to 224 x 224" in err
    assert "--input-shape x=N,C,H,W" in err
    assert "x (2, 3, 224, 224) float32" in err and "internal error" not in err
    assert not out.exists()
    assert equalize(src, out, "--calibration", str(images), "--input-shape", "x=1,3,8,16") == 0


def test_calibration_two_inputs_from_npz(tmp_path, save):
    src, out = save(two_inputs()), tmp_path / "o.onnx"
    rng = np.random.default_rng(3)
    arrays = {k: rng.normal(size=(N, 3, 8, 8)).astype(np.float32) for k in "ab"}
    assert equalize(src, out, "--calibration", str(npz(tmp_path, arrays))) == 0
    # The statistics were measured: the result differs from the data-free one.
    assert equalize(src, tmp_path / "free.onnx") == 0
    assert out.read_bytes() != (tmp_path / "free.onnx").read_bytes()


# --- cle evaluate -------------------------------------------------------------------------


def evaluate(*args) -> int:
    return main(["evaluate", *map(str, args), "--weights-only"])


def test_evaluate_int64_input(tmp_path, save, capsys):
    src = save(vad())
    assert evaluate(src) == 2
    err = error_line(capsys)
    assert "the model has 3 inputs (x, state, sr)" in err and "--inputs FILE.npz" in err
    given = npz(tmp_path, vad_inputs())
    assert evaluate(src, "--inputs", given, "--batch", "4") == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == (
        f"evaluate: inputs from {given}: x (6, 3, 8, 8) float32, state (2, 6, 4) float32, "
        "sr () int64"
    )


def test_evaluate_boolean_input(tmp_path, save, capsys):
    src = save(flagged())
    assert evaluate(src) == 2
    assert "the model has 2 inputs (x, flag)" in error_line(capsys)
    rng = np.random.default_rng(4)
    given = npz(
        tmp_path,
        {
            "x": rng.normal(size=(N, 3, 8, 8)).astype(np.float32),
            "flag": rng.random((N, 1, 1, 1)) > 0.3,
        },
    )
    assert evaluate(src, "--inputs", given) == 0
    assert "flag (6, 1, 1, 1) bool" in capsys.readouterr().out


def test_evaluate_unnamed_dimensions_sized_by_input_shape(tmp_path, save, capsys):
    pytest.importorskip("skimage")
    src = save(unnamed())
    assert evaluate(src) == 2
    err = capsys.readouterr().err
    assert "input 'x' has a dynamic height and width: images are resized to 224 x 224" in err
    assert "--input-shape x=N,C,H,W" in err
    assert "onnxruntime cannot run" in err and "x (16, 3, 224, 224) float32" in err
    assert "internal error" not in err
    assert evaluate(src, "--input-shape", "x=1,3,8,16", "--batch", "1") == 0
    captured = capsys.readouterr()
    assert captured.out.splitlines()[0] == "evaluate: inputs (default): x (120, 3, 8, 16) float32"
    assert "dynamic" not in captured.err


def test_evaluate_two_inputs_from_npz(tmp_path, save, capsys):
    src = save(two_inputs())
    assert evaluate(src) == 2
    assert "the model has 2 inputs (a, b)" in error_line(capsys)
    rng = np.random.default_rng(6)
    arrays = {k: rng.normal(size=(N, 3, 8, 8)).astype(np.float32) for k in "ab"}
    given = npz(tmp_path, arrays)
    assert evaluate(src, "--inputs", given, "--calibration", given) == 0
    out = capsys.readouterr().out.splitlines()
    assert (
        out[1]
        == f"evaluate: calibration from {given}: a (6, 3, 8, 8) float32, b (6, 3, 8, 8) float32"
    )


def test_evaluate_names_dim_of_fixed_height(tmp_path, save, capsys):
    """A named dynamic width is sized by --dim, the declared height kept."""
    pytest.importorskip("skimage")
    m = unnamed()
    dims = m.graph.input[0].type.tensor_type.shape.dim
    dims[2].dim_value = 8
    dims[3].dim_param = "width"
    src = save(m)
    assert evaluate(src, "--dim", "width=16", "--batch", "1") == 0
    assert "x (120, 3, 8, 16) float32" in capsys.readouterr().out


# --- the reader and the Python API ----------------------------------------------------------


def test_npz_reader_refuses_what_it_cannot_use(tmp_path):
    from cle_core._quality import load_arrays

    np.savez(tmp_path / "obj.npz", x=np.array([{"a": 1}], dtype=object))
    with pytest.raises(CLEError, match=r"obj.npz: array 'x' holds Python objects"):
        load_arrays(tmp_path / "obj.npz")
    # A header that claims 4 TB for 16 bytes of data: refused before anything is loaded.
    import io
    import zipfile

    member = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        member, {"descr": "<f4", "fortran_order": False, "shape": (10**12,)}
    )
    member.write(np.zeros(4, np.float32).tobytes())
    with zipfile.ZipFile(tmp_path / "bomb.npz", "w") as archive:
        archive.writestr("x.npy", member.getvalue())
    with pytest.raises(CLEError, match=r"bomb.npz: array 'x': its header says float32 "):
        load_arrays(tmp_path / "bomb.npz")
    np.savez(tmp_path / "nan.npz", x=np.array([1.0, np.nan]))
    with pytest.raises(CLEError, match=r"nan.npz: array 'x' holds NaN at index 1"):
        load_arrays(tmp_path / "nan.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(CLEError, match=r"junk.npz: not a readable .npz file"):
        load_arrays(tmp_path / "junk.npz")
    np.savez(tmp_path / "empty.npz")
    with pytest.raises(CLEError, match="holds no arrays"):
        load_arrays(tmp_path / "empty.npz")


def test_python_api_takes_arrays_by_name(tmp_path):
    import cle_onnx

    model = vad()
    np.savez(tmp_path / "in.npz", **vad_inputs())
    with np.load(tmp_path / "in.npz") as data:  # an NpzFile is a mapping by name
        _, report = cle_onnx.equalize_model(model, calibration=data)
    assert report.regions
    figures = cle_onnx.evaluate(model, inputs=vad_inputs(), activations=False, batch=4)
    assert figures["fp32_sqnr"] == np.inf and np.isfinite(figures["w8_sqnr"])
    with pytest.raises(CLEError, match="the model has 3 inputs"):
        cle_onnx.evaluate(model, inputs=vad_inputs()["x"], activations=False)


def test_batch_axes_of_a_recurrent_state_and_a_scalar():
    """Silero's VAD as PyPI ships it declares input (?, ?), state (2, ?, 128), sr ():
    the examples of the state lie along its one dynamic axis, the sample rate goes whole
    to every batch, a table of fixed size too."""
    from cle_onnx._calibrate import batch_axes

    def model(*inputs):
        b = OnnxBuilder(7)
        out = b.node("Identity", [inputs[0][0]])
        return _model(b, list(inputs), out, infer=False)

    f, i = TensorProto.FLOAT, TensorProto.INT64
    silero = model(("input", f, [-1, -1]), ("state", f, [2, -1, 128]), ("sr", i, []))
    assert batch_axes(silero) == {"input": 0, "state": 1, "sr": None}
    named = model(("input", f, ["batch", "t"]), ("state", f, [2, "batch", "t2"]), ("sr", i, []))
    assert batch_axes(named) == {"input": 0, "state": 1, "sr": None}
    table = model(("x", f, ["n", 3]), ("table", f, [10, 4]))
    assert batch_axes(table) == {"x": 0, "table": None}
    fixed = model(("x", f, [1, 3]), ("y", f, [1, 4]))  # a fixed batch: axis 0 everywhere
    assert batch_axes(fixed) == {"x": 0, "y": 0}
