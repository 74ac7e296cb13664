"""Calibration in the ONNX backend and ``cle equalize --calibration``: the model (proto or
file) and the calibration file are never changed, and every bad calibration input is one
:class:`CLEError` that names it (exit 2, one line, nothing written, on the command
line). ``feeds`` also checks the inputs of ``cle evaluate`` and ``--check``."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

import cle_onnx  # noqa: E402
from cle_core import CLEError, NonFiniteError  # noqa: E402
from cle_core._cli import main  # noqa: E402
from cle_core._quality import MAX_IMAGE_MEGAPIXELS, load_array  # noqa: E402
from cle_onnx._calibrate import feeds  # noqa: E402
from tests.helpers import onnx_models as om  # noqa: E402

RNG = np.random.default_rng(0)
X = RNG.normal(size=(8, 3, 8, 8)).astype(np.float32)


def _with(x: np.ndarray, index: tuple, value) -> np.ndarray:
    out = x.copy()
    out[index] = value
    return out


def _ragged():
    return [[0.1, 0.2], [0.3]]


def _generator():
    return (X[i : i + 2] for i in range(0, 8, 2))


# (id, calibration, exception, fragments of the message)
BAD_API = [
    ("strings", lambda: np.full((8, 3, 8, 8), "a"), CLEError, ["'x'", "strings"]),
    (
        "structured",
        lambda: np.zeros((8, 3, 8, 8), dtype=[("a", "f4"), ("b", "f4")]),
        CLEError,
        ["'x'", "structured records"],
    ),
    ("objects", lambda: X.astype(object), CLEError, ["'x'", "Python objects"]),
    ("complex", lambda: X.astype(np.complex64), CLEError, ["'x'", "complex numbers"]),
    ("uint8", lambda: (np.abs(X) * 40).astype(np.uint8), CLEError, ["'x'", "uint8", "float32"]),
    ("bool", lambda: X > 0, CLEError, ["'x'", "bool", "float32"]),
    ("nan", lambda: _with(X, (3, 1, 2, 5), np.nan), NonFiniteError, ["'x'", "NaN", "(3, 1, 2, 5)"]),
    (
        "inf",
        lambda: _with(X, (0, 2, 7, 1), -np.inf),
        NonFiniteError,
        ["'x'", "-Inf", "(0, 2, 7, 1)"],
    ),
    (
        "overflow",
        lambda: _with(X.astype(np.float64), (5, 0, 0, 3), 1e300),
        NonFiniteError,
        ["'x'", "1e+300", "(5, 0, 0, 3)", "overflows float32"],
    ),
    ("generator", _generator, CLEError, ["'x'", "generator", "array"]),
    ("path", lambda: "images/", CLEError, ["calibration", "'images/'", "path"]),
    ("ragged", _ragged, CLEError, ["'x'", "rectangular"]),
    ("dict_ragged", lambda: {"x": _ragged()}, CLEError, ["'x'", "rectangular"]),
    ("channels", lambda: X[:, :2], CLEError, ["'x'", "(8, 2, 8, 8)", "(N, 3, 8, 8)"]),
    ("scalar", lambda: 3.0, CLEError, ["'x'", "shape ()"]),
]


@pytest.mark.parametrize(
    "calibration, exc, fragments", [c[1:] for c in BAD_API], ids=[c[0] for c in BAD_API]
)
def test_bad_calibration_is_one_error_naming_the_input(calibration, exc, fragments):
    model = om.depthwise_triple()
    before = model.SerializeToString()
    with pytest.raises(exc) as info:
        cle_onnx.equalize_model(model, calibration=calibration())
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message
    assert model.SerializeToString() == before


def test_feeds_checks_evaluation_inputs_too():
    # cle evaluate and --check feed through the same function: the same checks, worded
    # for their inputs.
    model = om.depthwise_triple()
    with pytest.raises(NonFiniteError, match=r"the inputs for model input 'x' holds NaN"):
        feeds(model, _with(X, (1, 0, 0, 0), np.nan))
    fed = feeds(model, X.astype(np.float64))
    assert fed["x"].dtype == np.float32 and fed["x"].flags.c_contiguous


def _integer_input_model():
    """Token-like int64 ids, cast to float before the convolutions."""
    b = om.OnnxBuilder(4)
    h = b.node("Cast", ["x"], to=onnx.TensorProto.FLOAT)
    h = b.node("Relu", [b.bn(b.conv(h, 3, 6, 1), 6)])
    b.conv(h, 6, 4, 1)
    model = b.model()
    model.graph.input[0].type.tensor_type.elem_type = onnx.TensorProto.INT64
    onnx.checker.check_model(model, full_check=True)
    return model


def test_integer_input_takes_integers_only():
    model = _integer_input_model()
    ids = RNG.integers(0, 5, size=(8, 3, 8, 8))
    _, report = cle_onnx.equalize_model(model, calibration=ids.astype(np.int32))
    assert report.noise is not None
    with pytest.raises(CLEError, match=r"'x' holds float32 values, but the input takes int64"):
        cle_onnx.equalize_model(model, calibration=X)
    with pytest.raises(CLEError, match=r"'x' holds bool values"):
        cle_onnx.equalize_model(model, calibration=ids > 2)
    big = _integer_input_model()
    big.graph.input[0].type.tensor_type.elem_type = onnx.TensorProto.INT32
    with pytest.raises(CLEError, match=r"'x': the value 4294967296 does not fit int32"):
        feeds(big, _with(ids, (0, 0, 0, 0), 2**32), "calibration")


def test_float16_model_takes_float32_calibration_and_refuses_overflow():
    model = om.to_float16(om.depthwise_triple())
    _, report = cle_onnx.equalize_model(model, calibration=X)
    assert report.noise is not None
    with pytest.raises(
        NonFiniteError, match=r"'x': the value 100000 at index \(2, 0, 1, 1\) overflows float16"
    ):
        cle_onnx.equalize_model(model, calibration=_with(X, (2, 0, 1, 1), 1e5))


# --- the model is never changed -------------------------------------------------------


@pytest.mark.parametrize(
    "calibration",
    [X, {"x": X}, X.astype(np.float64), X.tolist()],
    ids=["array", "dict", "float64", "nested_lists"],
)
def test_calibration_leaves_the_proto_byte_identical(calibration):
    model = om.depthwise_triple()
    before = model.SerializeToString()
    eq, report = cle_onnx.equalize_model(model, calibration=calibration)
    assert report.noise is not None and eq is not model
    assert model.SerializeToString() == before


def test_calibration_leaves_an_external_data_proto_byte_identical(tmp_path):
    src = tmp_path / "m.onnx"
    om.save_external(om.depthwise_triple(), src, "m.onnx.data")
    model = cle_onnx.load(src)  # tensors still external
    before = model.SerializeToString()
    data = (tmp_path / "m.onnx.data").read_bytes()
    cle_onnx.equalize_model(model, base_dir=tmp_path, calibration=X)
    assert model.SerializeToString() == before
    assert (tmp_path / "m.onnx.data").read_bytes() == data


def test_failed_calibration_in_place_leaves_the_proto_byte_identical():
    model = om.depthwise_triple()
    before = model.SerializeToString()
    for bad in (X[:, :2], _with(X, (7, 0, 0, 0), np.nan)):
        with pytest.raises(CLEError):
            cle_onnx.equalize_model(model, calibration=bad, inplace=True)
    assert model.SerializeToString() == before


# --- the command line -------------------------------------------------------------------


def _chunk(tag: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(tag + data) & 0xFFFFFFFF
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", crc)


def _bilevel_png(width: int, height: int) -> bytes:
    """A valid black 1-bit PNG: a large image that is small on disk."""
    row = b"\0" + bytes((width + 7) // 8)
    z = zlib.compressobj(6)
    idat = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", header)
        + _chunk(b"IDAT", idat)
        + _chunk(b"IEND", b"")
    )


def _small_png() -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray((RNG.random((20, 24, 3)) * 255).astype(np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _npy(arr, **kw):
    def write(path):
        np.save(path, arr, **kw)

    return write


def _huge_header(path):
    # A valid header for 56 GiB of float32, and 16 bytes of data.
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(
            f, {"descr": "<f4", "fortran_order": False, "shape": (14 * 2**30, 1, 1, 1)}
        )
        f.write(bytes(16))


def _truncated(path):
    np.save(path, X)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])


def _images(*files):
    def write(folder):
        folder.mkdir()
        png = _small_png()
        (folder / "a.png").write_bytes(png)
        for name, content in files:
            (folder / name).write_bytes(content(png) if callable(content) else content)

    return write


# (id, writer of the --calibration path, name of that path, fragments of the message)
BAD_CLI = [
    ("strings", _npy(np.full((8, 3, 8, 8), "a")), "c.npy", ["c.npy", "strings"]),
    (
        "structured",
        _npy(np.zeros((8, 3, 8, 8), dtype=[("a", "f4")])),
        "c.npy",
        ["c.npy", "structured records"],
    ),
    ("pickled", _npy(X.astype(object), allow_pickle=True), "c.npy", ["c.npy", "Python objects"]),
    ("complex", _npy(X.astype(np.complex128)), "c.npy", ["c.npy", "complex numbers"]),
    ("uint8", _npy((np.abs(X) * 40).astype(np.uint8)), "c.npy", ["'x'", "uint8", "float32"]),
    ("nan", _npy(_with(X, (7, 2, 0, 4), np.nan)), "c.npy", ["c.npy", "NaN", "(7, 2, 0, 4)"]),
    ("inf", _npy(_with(X, (1, 1, 1, 1), np.inf)), "c.npy", ["c.npy", "Inf", "(1, 1, 1, 1)"]),
    ("huge_header", _huge_header, "c.npy", ["c.npy", "56.0 GiB", "truncated"]),
    ("truncated", _truncated, "c.npy", ["c.npy", "truncated"]),
    ("not_npy", lambda p: p.write_bytes(b"PK\x03\x04 a zip"), "c.npy", ["c.npy", "not a readable"]),
    ("channels", _npy(X[:, :2]), "c.npy", ["'x'", "(8, 2, 8, 8)", "(N, 3, 8, 8)"]),
    (
        "corrupt_png",
        _images(("b.png", b"\x89PNG\r\n\x1a\n garbage")),
        "imgs",
        ["b.png", "not a readable image"],
    ),
    (
        "truncated_png",
        _images(("b.png", lambda png: png[: len(png) // 2])),
        "imgs",
        ["b.png", "not a readable image"],
    ),
    (
        "bomb_png",
        _images(("b.png", _bilevel_png(20000, 20000))),
        "imgs",
        ["b.png", f"{MAX_IMAGE_MEGAPIXELS}-megapixel limit"],
    ),
    (
        "large_png",
        _images(("b.png", _bilevel_png(10000, 6000))),
        "imgs",
        ["b.png", "10000 x 6000 pixels", f"{MAX_IMAGE_MEGAPIXELS}-megapixel limit"],
    ),
]


@pytest.mark.parametrize(
    "write, name, fragments", [c[1:] for c in BAD_CLI], ids=[c[0] for c in BAD_CLI]
)
def test_cli_bad_calibration_exits_2_naming_it(tmp_path, capsys, write, name, fragments):
    src = tmp_path / "in.onnx"
    onnx.save(om.depthwise_triple(), str(src))
    calib = tmp_path / name
    write(calib)
    listing = sorted(p.name for p in tmp_path.iterdir())
    model_bytes = src.read_bytes()
    out = tmp_path / "out.onnx"
    assert main(["equalize", str(src), "-o", str(out), "--calibration", str(calib)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and "internal error" not in err
    for fragment in fragments:
        assert fragment in err
    # It names the file, or (for what only the model can refuse) the calibration.
    assert str(calib) in err or "the calibration for model input 'x'" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == listing
    assert src.read_bytes() == model_bytes


def test_cli_calibration_leaves_its_inputs_byte_identical(tmp_path, capsys):
    src = tmp_path / "in.onnx"
    om.save_external(om.depthwise_triple(), src, "in.onnx.data")
    npy = tmp_path / "c.npy"
    np.save(npy, X)
    folder = tmp_path / "imgs"
    _images(("b.png", _bilevel_png(30, 20)))(folder)
    before = {p: p.read_bytes() for p in (src, tmp_path / "in.onnx.data", npy, *folder.iterdir())}
    for i, calib in enumerate((npy, folder)):
        out = tmp_path / f"out{i}.onnx"
        assert (
            main(["equalize", str(src), "-o", str(out), "--calibration", str(calib), "--quiet"])
            == 0
        )
    assert {p: p.read_bytes() for p in before} == before


def test_16_bit_images_are_scaled_to_their_range(tmp_path):
    from PIL import Image

    from cle_core.quality import images_from_folder

    folder = tmp_path / "imgs"
    folder.mkdir()
    grey = (RNG.random((16, 16)) * 255).astype(np.uint8)
    Image.fromarray(grey).save(folder / "a8.png")
    Image.fromarray(grey.astype(np.uint16) * 257).save(folder / "b16.png")
    eight, sixteen = images_from_folder(folder, 16)
    np.testing.assert_allclose(eight, sixteen, atol=1e-5)


def test_load_array_maps_the_file_read_only(tmp_path):
    path = tmp_path / "c.npy"
    np.save(path, X)
    arr = load_array(path)
    assert isinstance(arr, np.memmap) and not arr.flags.writeable
    np.testing.assert_array_equal(arr, X)


class _NoStatistics:
    """A plugin's objective that reads no calibration statistics (no scaling)."""

    name = "no-statistics-for-test"
    description = "every scale 1"
    uses_statistics = False

    def choose(self, problem):
        from cle_core import ScaleOutcome

        return ScaleOutcome({r.id: np.ones(r.size) for r in problem.regions}, 1, True, 0.0)


@pytest.mark.parametrize("objective", ["balance", "no-statistics-for-test"])
def test_cli_calibration_for_an_objective_that_reads_no_statistics_is_refused(
    tmp_path, capsys, objective
):
    """The refusal asks the objective (``uses_statistics``), not its name: the balance
    and a plugin's objective alike; nothing is written."""
    from cle_core import objective_names, register_objective

    if "no-statistics-for-test" not in objective_names():
        register_objective(_NoStatistics())
    src = tmp_path / "in.onnx"
    onnx.save(om.depthwise_triple(), str(src))
    npy = tmp_path / "c.npy"
    np.save(npy, X)
    listing = sorted(p.name for p in tmp_path.iterdir())
    inputs = {p: p.read_bytes() for p in (src, npy)}
    out = tmp_path / "out.onnx"
    args = ["equalize", str(src), "-o", str(out), "--calibration", str(npy)]
    assert main([*args, "--objective", objective]) == 2
    err = capsys.readouterr().err
    assert f"statistics the {objective} objective does not use" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == listing
    assert {p: p.read_bytes() for p in inputs} == inputs
    # The same run with --verify measures on them: accepted.
    assert main([*args, "--objective", objective, "--verify", "--quiet"]) == 0
    assert main([*args, "--quiet"]) == 0  # the noise objective reads them
    assert {p: p.read_bytes() for p in inputs} == inputs  # and after success
