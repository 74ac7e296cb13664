"""Regression tests for the data-safety faults of issue 9, ONNX backend and CLI.

Each test reproduces one fault and fails on the code before the fix. Tolerances: float32
models agree with the original to a relative error (max abs difference over max abs
output) of 1e-4 in onnxruntime and an SQNR of 100 dB; float16 models to 1e-2 (every
equalized weight is rounded to 11 significant bits).
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import textwrap

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from onnx import numpy_helper  # noqa: E402

import cle_core  # noqa: E402
import cle_onnx  # noqa: E402
from cle_core._cli import main  # noqa: E402
from cle_core._files import TEMP_MARK  # noqa: E402
from tests.helpers import onnx_models as om  # noqa: E402

RTOL = {np.float32: 1e-4, np.float16: 1e-2}


def session(model_or_path, **overrides):
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    src = model_or_path if isinstance(model_or_path, str) else model_or_path.SerializeToString()
    return ort.InferenceSession(src, opts, providers=["CPUExecutionProvider"])


def x_like(dtype=np.float32, seed=0):
    return (np.random.default_rng(seed).normal(size=(2, 3, 8, 8)) * 2).astype(dtype)


def assert_same_function(original, equalized, dtype=np.float32, feeds=None):
    feeds = feeds or {"x": x_like(dtype)}
    ref = session(original).run(None, feeds)
    got = session(equalized).run(None, feeds)
    for a, b in zip(ref, got, strict=True):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        assert np.max(np.abs(a - b)) <= RTOL[dtype] * np.max(np.abs(a))


def equalize_checked(model, dtype=np.float32, **options):
    before = model.SerializeToString()
    eq, report = cle_onnx.equalize_model(model, **options)
    assert model.SerializeToString() == before, "the caller's proto must not change"
    onnx.checker.check_model(eq, full_check=True)
    assert_same_function(model, eq, dtype)
    return eq, report


def temps(folder):
    return [p for p in os.listdir(folder) if TEMP_MARK in p]


# --- 1. values read inside subgraphs ----------------------------------------------------


def test_a_loop_body_reading_an_activation_blocks_its_region():
    eq, report = equalize_checked(om.loop_reads_activation())
    assert len(report.folds) == 1  # the BN still folds: its output is not rescaled
    assert not report.regions
    assert any("Loop" in s.reason and "subgraph" in s.reason for s in report.skipped)


def test_if_branches_reading_a_folded_bn_output_a_weight_and_branch_only_constants():
    model = om.if_reads_bn_output()
    eq, report = equalize_checked(model)
    assert len(report.folds) == 1 and report.folds[0].side == "output"
    names = {t.name for t in eq.graph.initializer}
    assert any(n.startswith("only_in_branch") for n in names)  # read only in a branch
    assert any(n.op_type == "Constant" for n in eq.graph.node)
    # the first Conv's weight was rescaled by folding; the branch must see the original
    conv = next(n for n in eq.graph.node if n.op_type == "Conv")
    assert conv.input[1] != "w1" and "w1" in names


def test_check_fails_with_exit_1_when_the_output_differs(tmp_path, monkeypatch, capsys):
    src, dst = tmp_path / "in.onnx", tmp_path / "out.onnx"
    onnx.save(om.conv_pair("relu"), str(src))
    import cle_onnx._backend as onnx_backend

    real = onnx_backend.OnnxBackend.equalize_file

    def wrong(self, src_, dst_, options=None, *args, **kwargs):
        report, files = real(self, src_, dst_, options, *args, **kwargs)
        model = onnx.load(str(dst_))
        w = model.graph.initializer[0]
        w.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(w) * 1.5, w.name))
        onnx.save(model, str(dst_))
        return report, files

    monkeypatch.setattr(onnx_backend.OnnxBackend, "equalize_file", wrong)  # what the CLI calls
    assert main(["equalize", str(src), "-o", str(dst), "--check"]) == 1
    out, err = capsys.readouterr()
    assert "FAILED" in out and "check failed" in err


# --- 2. float16 ---------------------------------------------------------------------------


def test_float16_model_gets_float16_bounds():
    model = om.to_float16(om.relu6_chain(13))
    eq, report = equalize_checked(model, np.float16)
    assert report.regions
    added = [
        t for t in eq.graph.initializer if t.name not in {i.name for i in model.graph.initializer}
    ]
    assert added and all(t.data_type == onnx.TensorProto.FLOAT16 for t in added)


# --- 3. old opsets and IR versions -----------------------------------------------------------


@pytest.mark.parametrize("opset", [7, 8, 9, 10, 11, 12])
def test_old_opsets_get_clips_they_can_run(opset):
    ir = 3 if opset < 9 else 7
    eq, report = equalize_checked(om.relu6_chain(opset, ir))
    assert len(report.regions) >= 2
    if ir < 4:
        inputs = {i.name for i in eq.graph.input}
        assert all(t.name in inputs for t in eq.graph.initializer)


# --- 4. initializers that are graph inputs -------------------------------------------------


def test_an_overridable_initializer_is_not_a_constant():
    model = om.conv_pair("relu")
    w = model.graph.initializer[0]
    model.graph.input.append(onnx.helper.make_tensor_value_info(w.name, w.data_type, w.dims))
    eq, report = equalize_checked(model)
    assert not report.folds and not report.regions
    assert any("a caller may override" in s.reason for s in report.skipped)
    other = numpy_helper.to_array(w) * -0.5  # feeding another weight: still the same
    feeds = {"x": x_like(), w.name: other}
    assert_same_function(model, eq, feeds=feeds)


# --- 5. shared initializers ----------------------------------------------------------------


def tied_convs():
    b = om.OnnxBuilder(24)
    w = b.init(b.spread((6, 3, 3, 3)))
    h1 = b.node("Relu", [b.node("Conv", ["x", w], pads=[1, 1, 1, 1])])
    h2 = b.node("Conv", ["x", w], pads=[1, 1, 1, 1])
    return b.model(outputs=[b.conv(b.node("Add", [h1, h2]), 6, 4, 1)])


def test_shared_weights_through_the_api_and_the_cli(tmp_path, capsys):
    model = tied_convs()
    eq, report = equalize_checked(model)
    assert any("shares a parameter" in s.reason for s in report.skipped)
    src = tmp_path / "tied.onnx"
    onnx.save(model, str(src))
    eq2, _ = cle_onnx.equalize_model(src)
    assert_same_function(model, eq2)
    assert main(["equalize", str(src), "-o", str(tmp_path / "o.onnx"), "--check"]) == 0


def test_a_failing_in_place_run_leaves_the_proto_byte_identical():
    model = tied_convs()
    last = model.graph.initializer[-2]  # the last Conv's weight
    bad = numpy_helper.to_array(last).copy()
    bad.flat[0] = np.nan
    last.CopyFrom(numpy_helper.from_array(bad, last.name))
    before = model.SerializeToString()
    with pytest.raises(cle_core.NonFiniteError):
        cle_onnx.equalize_model(model, inplace=True)
    assert model.SerializeToString() == before


def test_torch_export_of_tied_conv_weights(tmp_path):
    torch = pytest.importorskip("torch")

    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Conv2d(4, 4, 1)
            self.b = torch.nn.Conv2d(4, 4, 1)
            self.b.weight = self.a.weight

        def forward(self, x):
            return self.b(torch.relu(self.a(x)))

    torch.manual_seed(0)
    path = tmp_path / "tied.onnx"
    with pytest.warns(DeprecationWarning):  # the TorchScript exporter announces its end
        torch.onnx.export(Tied().eval(), torch.randn(1, 4, 5, 5), str(path), dynamo=False)
    model = onnx.load(str(path))
    before = model.SerializeToString()
    eq, _ = cle_onnx.equalize_model(model)
    assert model.SerializeToString() == before
    feeds = {
        model.graph.input[0].name: np.random.default_rng(0)
        .normal(size=(1, 4, 5, 5))
        .astype(np.float32)
    }
    assert_same_function(model, eq, feeds=feeds)
    eq, _ = cle_onnx.equalize_model(path)  # through the file (the path that crashed)
    assert_same_function(model, eq, feeds=feeds)


# --- 6-8, 10. external data --------------------------------------------------------------


def test_output_data_file_never_overwrites_the_inputs_data(tmp_path, capsys):
    # backup.onnx keeps its weights in model.onnx.data: the name model.onnx's data
    # would get by default.
    model = om.depthwise_triple()
    om.save_external(model, tmp_path / "backup.onnx", "model.onnx.data")
    data_before = (tmp_path / "model.onnx.data").read_bytes()
    assert (
        main(["equalize", str(tmp_path / "backup.onnx"), "-o", str(tmp_path / "model.onnx")]) == 0
    )
    assert (tmp_path / "model.onnx.data").read_bytes() == data_before
    assert_same_function(model, str(tmp_path / "backup.onnx"))
    assert_same_function(model, str(tmp_path / "model.onnx"))


def test_output_onto_the_inputs_data_file_is_refused(tmp_path, capsys):
    om.save_external(om.depthwise_triple(), tmp_path / "m.onnx", "m.data")
    before = (tmp_path / "m.data").read_bytes()
    assert main(["equalize", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "m.data")]) == 2
    assert "external data file" in capsys.readouterr().err
    assert (tmp_path / "m.data").read_bytes() == before


def test_in_place_with_external_data_switches_data_files(tmp_path, capsys):
    model = om.depthwise_triple()
    src = tmp_path / "m.onnx"
    om.save_external(model, src, "m.onnx.data")
    for expected in ("m.onnx.1.data", "m.onnx.data", "m.onnx.1.data"):
        assert main(["equalize", str(src), "--in-place", "--quiet"]) == 0
        assert sorted(os.listdir(tmp_path)) == sorted(["m.onnx", expected])
        assert_same_function(model, str(src))


def test_an_output_replaced_is_parsed_only_where_a_data_file_of_its_name_exists(
    tmp_path, monkeypatch
):
    """Replacing an output, the saver learns which data files the old one reads only
    where a file with a name it gives data files is beside it (the only ones it may
    take or delete): a large inline output is not parsed again for nothing. Its stale
    data file is still removed when the new output is inline."""
    from cle_onnx import _io

    src, dst = tmp_path / "m.onnx", tmp_path / "out.onnx"
    onnx.save(om.depthwise_triple(), src)
    before = src.read_bytes()
    loads = []
    plain = onnx.load

    def counted(path, *args, **kwargs):
        loads.append(os.path.basename(str(path)))
        return plain(path, *args, **kwargs)

    monkeypatch.setattr(_io.onnx, "load", counted)
    assert main(["equalize", str(src), "-o", str(dst), "--quiet"]) == 0
    assert main(["equalize", str(src), "-o", str(dst), "--quiet"]) == 0  # replaces it
    assert "out.onnx" not in loads
    om.save_external(om.depthwise_triple(), dst, "out.onnx.data")  # an output with data
    assert main(["equalize", str(src), "-o", str(dst), "--quiet"]) == 0
    assert "out.onnx" in loads
    assert sorted(os.listdir(tmp_path)) == ["m.onnx", "out.onnx"]  # its data: stale, gone
    assert src.read_bytes() == before


@pytest.mark.parametrize("how", ["dotdot", "absolute", "symlink"])
def test_external_data_outside_the_model_folder_is_refused(tmp_path, capsys, how):
    secret = tmp_path / "secret.bin"
    secret.write_bytes(np.arange(1000, dtype=np.float32).tobytes())
    sub = tmp_path / "sub"
    sub.mkdir()
    om.save_external(om.depthwise_triple(), sub / "m.onnx", "m.data")
    model = onnx.load(str(sub / "m.onnx"), load_external_data=False)
    t = model.graph.initializer[0]
    for e in t.external_data:
        if e.key == "location":
            if how == "symlink":
                os.symlink(secret, sub / "link.bin")
                e.value = "link.bin"
            else:
                e.value = "../secret.bin" if how == "dotdot" else str(secret)
        elif e.key == "offset":
            e.value = "0"
    onnx.save(model, str(sub / "evil.onnx"))
    listing = sorted(os.listdir(sub))
    assert main(["equalize", str(sub / "evil.onnx"), "-o", str(sub / "out.onnx")]) == 2
    err = capsys.readouterr().err
    assert "outside the model's folder" in err or "absolute path" in err
    assert sorted(os.listdir(sub)) == listing
    with pytest.raises(cle_onnx.ModelFileError):
        cle_onnx.equalize_model(sub / "evil.onnx")


@pytest.mark.parametrize("damage", ["missing", "truncated"])
def test_missing_or_truncated_external_data(tmp_path, capsys, damage):
    src = tmp_path / "ext.onnx"
    om.save_external(om.depthwise_triple(), src, "ext.data")
    data = tmp_path / "ext.data"
    if damage == "missing":
        data.unlink()
    else:
        data.write_bytes(data.read_bytes()[:100])
    assert main(["equalize", str(src), "-o", str(tmp_path / "o.onnx")]) == 2
    assert ("not found" if damage == "missing" else "truncated") in error_line(capsys)
    assert not (tmp_path / "o.onnx").exists()
    with pytest.raises(cle_onnx.ModelFileError):
        cle_onnx.equalize_model(src)


def test_external_data_resolves_next_to_the_model_not_the_working_directory(tmp_path, monkeypatch):
    model = om.depthwise_triple()
    (tmp_path / "models").mkdir()
    src = tmp_path / "models" / "ext.onnx"
    om.save_external(model, src, "ext.data")
    monkeypatch.chdir(tmp_path)
    eq, _ = cle_onnx.equalize_model(src)
    assert_same_function(model, eq)
    proto = cle_onnx.load(src)  # external data not loaded
    with pytest.raises(cle_onnx.ModelFileError, match="base_dir"):
        cle_onnx.equalize_model(proto)
    eq, _ = cle_onnx.equalize_model(proto, base_dir=src.parent)
    assert_same_function(model, eq)


# --- 9, 11. everything is validated before writing ------------------------------------------


def error_line(capsys):
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


@pytest.fixture
def plain(tmp_path):
    path = tmp_path / "in.onnx"
    onnx.save(om.depthwise_triple(), str(path))
    return path


def test_report_path_that_is_a_directory(plain, tmp_path, capsys):
    (tmp_path / "rep").mkdir()
    assert (
        main(
            [
                "equalize",
                str(plain),
                "-o",
                str(tmp_path / "o.onnx"),
                "--report",
                str(tmp_path / "rep"),
            ]
        )
        == 2
    )
    assert "is a directory" in error_line(capsys)
    assert sorted(os.listdir(tmp_path)) == ["in.onnx", "rep"]


def test_output_path_that_is_a_directory(plain, tmp_path, capsys):
    (tmp_path / "out").mkdir()
    assert main(["equalize", str(plain), "-o", str(tmp_path / "out")]) == 2
    assert "is a directory" in error_line(capsys)
    assert sorted(os.listdir(tmp_path)) == ["in.onnx", "out"] and not os.listdir(tmp_path / "out")


def test_check_problems_are_found_before_writing(tmp_path, capsys):
    dynamic = om.depthwise_triple()
    dynamic.graph.input[0].type.tensor_type.shape.dim[2].dim_param = "height"
    onnx.save(dynamic, str(tmp_path / "dyn.onnx"))
    assert (
        main(["equalize", str(tmp_path / "dyn.onnx"), "-o", str(tmp_path / "o.onnx"), "--check"])
        == 2
    )
    assert "--dim height=SIZE" in error_line(capsys)
    flag = om.depthwise_triple()
    flag.graph.input.append(onnx.helper.make_tensor_value_info("flag", onnx.TensorProto.BOOL, [1]))
    onnx.save(flag, str(tmp_path / "flag.onnx"))
    assert (
        main(["equalize", str(tmp_path / "flag.onnx"), "-o", str(tmp_path / "o.onnx"), "--check"])
        == 2
    )
    assert "'flag' takes bool values, which are never made up" in error_line(capsys)
    assert sorted(os.listdir(tmp_path)) == ["dyn.onnx", "flag.onnx"]


# --- 12. file modes ---------------------------------------------------------------------------


def mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_new_files_follow_the_umask_and_in_place_keeps_the_mode(plain, tmp_path, capsys, umask):
    old = os.umask(umask)
    try:
        out = tmp_path / "o.onnx"
        assert (
            main(
                [
                    "equalize",
                    str(plain),
                    "-o",
                    str(out),
                    "--report",
                    str(tmp_path / "r.json"),
                    "--quiet",
                ]
            )
            == 0
        )
        assert mode(out) == mode(tmp_path / "r.json") == 0o666 & ~umask
        os.chmod(plain, 0o640)
        assert main(["equalize", str(plain), "--in-place", "--quiet"]) == 0
        assert mode(plain) == 0o640
    finally:
        os.umask(old)


# --- 13. temporary files and signals ---------------------------------------------------------


def test_stale_temporaries_of_dead_processes_are_removed(plain, tmp_path, capsys):
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    dead_pid = int(dead.stdout)
    stale = tmp_path / f".o.onnx{TEMP_MARK}{dead_pid}-abcd1234"
    alive = tmp_path / f".o.onnx{TEMP_MARK}{os.getppid()}-abcd1234"
    stale.write_bytes(b"left by a killed run")
    alive.write_bytes(b"a running process's file")
    assert main(["equalize", str(plain), "-o", str(tmp_path / "o.onnx"), "--quiet"]) == 0
    assert not stale.exists() and alive.exists()


# A child that equalizes in place and sends itself SIGTERM in the middle of writing.
_SIGTERM_CHILD = textwrap.dedent(
    """
    import os, signal, sys
    import cle_core._files as files
    real_commit = files.commit
    def commit(tmp, final):
        os.kill(os.getpid(), signal.SIGTERM)  # arrives before the rename
        real_commit(tmp, final)
    files.commit = commit
    import cle_onnx._io
    cle_onnx._io.commit = commit
    from cle_core._cli import main
    sys.exit(main(["equalize", sys.argv[1], "--in-place", "--quiet"]))
    """
)


def test_sigterm_cleans_up_and_exits_143(tmp_path):
    src = tmp_path / "m.onnx"
    om.save_external(om.depthwise_triple(), src, "m.onnx.data")
    before = {p: (tmp_path / p).read_bytes() for p in os.listdir(tmp_path)}
    proc = subprocess.run(
        [sys.executable, "-c", _SIGTERM_CHILD, str(src)], capture_output=True, text=True
    )
    assert proc.returncode == 143, proc.stderr
    assert "terminated" in proc.stderr
    assert {p: (tmp_path / p).read_bytes() for p in os.listdir(tmp_path)} == before


# --- issue 17: Resize that samples a constant, biases read by a second node ----------------


def resize_crop(extrapolation: float) -> onnx.ModelProto:
    """Conv -> Relu -> Resize(tf_crop_and_resize, a box reaching outside the input,
    linear, scales 2) -> Conv: outside the input the Resize puts ``extrapolation``."""
    b = om.OnnxBuilder(31)
    h = b.node("Relu", [b.conv("x", 3, 6, 3, pad=1)])
    roi = b.init(np.array([0, 0, -0.5, -0.5, 1, 1, 1.5, 1.5]), "roi")
    scales = b.init(np.array([1.0, 1.0, 2.0, 2.0]), "scales")
    h = b.node(
        "Resize",
        [h, roi, scales],
        mode="linear",
        coordinate_transformation_mode="tf_crop_and_resize",
        extrapolation_value=extrapolation,
    )
    b.conv(h, 6, 4, 1)
    return b.model()


def cli_equalize_checked(model, tmp_path) -> onnx.ModelProto:
    """``cle equalize --check`` on ``model`` saved to a file: exit 0, the input file
    byte-identical, the output FP32 exact (SQNR >= 100 dB against the input)."""
    from cle_core._quality import sqnr_db

    src, dst = tmp_path / "in.onnx", tmp_path / "out.onnx"
    onnx.save(model, str(src))
    data = src.read_bytes()
    assert main(["equalize", str(src), "-o", str(dst), "--check", "--quiet"]) == 0
    assert src.read_bytes() == data
    out = onnx.load(str(dst))
    feeds = {"x": x_like()}
    for a, b in zip(session(model).run(None, feeds), session(out).run(None, feeds), strict=True):
        assert sqnr_db(a, b) >= 100.0
    return out


def test_resize_extrapolating_a_constant_ends_the_region(tmp_path, capsys):
    # Scaling a channel by 1/s before the Resize scales its interpolated pixels, not the
    # constant 5 put where the box leaves the input: the region must stop there.
    eq, report = equalize_checked(resize_crop(5.0))
    assert not report.regions
    (skip,) = [s for s in report.skipped if s.stage == "translate"]
    assert skip.reason.startswith("Resize left out: ")
    assert "extrapolation_value=5" in skip.reason
    cli_equalize_checked(resize_crop(5.0), tmp_path)
    # with the default extrapolation value, 0, the region runs through it
    eq, report = equalize_checked(resize_crop(0.0))
    assert len(report.regions) == 1
    assert not [s for s in report.skipped if s.stage == "translate"]


def gemm_bias_also_a_factor() -> tuple[onnx.ModelProto, str]:
    """Gemm(x, w1, b) -> Relu -> Mul(., b) -> Gemm: the first Gemm's bias initializer is
    also the Mul's factor."""
    b = om.OnnxBuilder(32)
    h = b.node("Relu", [b.conv("x", 3, 6, 3, pad=1)])
    h = b.node("Flatten", [b.node("GlobalAveragePool", [h])], axis=1)
    bias = b.init(b.rng.uniform(0.5, 2.0, 16), "bias")
    g = b.node("Gemm", [h, b.init(b.spread((16, 6))), bias], transB=1)
    g = b.node("Mul", [b.node("Relu", [g]), bias])
    b.node("Gemm", [g, b.init(b.spread((4, 16))), b.init(np.zeros(4), "c")], transB=1)
    return b.model(), bias


def conv_bias_add_also_a_factor() -> tuple[onnx.ModelProto, str]:
    """Conv (no bias) -> Add(b) -> Relu -> Mul(., b) -> Conv: the constant of the Conv's
    bias-Add is also the Mul's factor."""
    b = om.OnnxBuilder(33)
    bias = b.init(b.rng.uniform(0.5, 2.0, (1, 6, 1, 1)), "bias")
    h = b.node("Add", [b.conv("x", 3, 6, 3, pad=1, bias=False), bias])
    h = b.node("Mul", [b.node("Relu", [h]), bias])
    b.conv(h, 6, 4, 1)
    return b.model(), bias


def initializer(model: onnx.ModelProto, name: str) -> np.ndarray:
    (t,) = [t for t in model.graph.initializer if t.name == name]
    return numpy_helper.to_array(t)


@pytest.mark.parametrize("build", [gemm_bias_also_a_factor, conv_bias_add_also_a_factor])
def test_a_bias_also_read_by_another_node(build, tmp_path, capsys):
    # Translation used to take the initializer's bytes for the layer, and the Mul's
    # reading of it found them gone (ValueError: cannot reshape array of size 0).
    model, bias = build()
    for eq in (equalize_checked(model)[0], cli_equalize_checked(model, tmp_path)):
        # The layer was scaled: it got its own copy of the bias; the Mul reads the
        # original values.
        (mul,) = [n for n in eq.graph.node if n.op_type == "Mul"]
        assert bias in mul.input
        np.testing.assert_array_equal(initializer(eq, bias), initializer(model, bias))
        readers = [n for n in eq.graph.node if n.op_type != "Mul" and bias in n.input]
        assert not readers, "the scaled bias must be a clone"
    _, report = cle_onnx.equalize_model(model)
    owner = next(n.name for n in model.graph.node if n.op_type in ("Gemm", "Conv"))
    assert any(owner in r.sources for r in report.regions), report.summary()


def test_a_dequantized_weight_is_refused_for_what_it_is():
    # 216 weights computed by DequantizeLinear were said to be "too large to fold".
    b = om.OnnxBuilder(34)
    q = b.name("wq")
    b.inits.append(numpy_helper.from_array(b.rng.integers(-100, 100, (8, 3, 3, 3), np.int8), q))
    w = b.node("DequantizeLinear", [q, b.init(np.array(0.02), "scale")])
    h = b.node("Relu", [b.node("Conv", ["x", w, b.init(np.zeros(8), "b")], pads=[1] * 4)])
    b.conv(h, 8, 4, 1)
    _, report = equalize_checked(b.model())
    reasons = [s.reason for s in report.skipped if s.stage == "translate"]
    assert len(reasons) == 1 and "too large" not in reasons[0]
    assert "DequantizeLinear from a quantized tensor" in reasons[0]


def test_opset18_resize_with_axes_scales_only_those_axes():
    # scales = [2, 2] for axes [2, 3] was read as a scale of 2 on the batch and channels.
    b = om.OnnxBuilder(35, opset=18)
    h = b.node("Relu", [b.conv("x", 3, 6, 3, pad=1)])
    scales = b.init(np.array([2.0, 2.0]), "scales")
    b.conv(b.node("Resize", [h, "", scales], mode="linear", axes=[2, 3]), 6, 4, 1)
    _, report = equalize_checked(b.model())
    assert len(report.regions) == 1
    assert not [s for s in report.skipped if s.stage == "translate"]
