"""``cle evaluate`` on inputs and models it cannot measure: each is one line on stderr
naming the input or the model, exit 2, never an internal error; and its temporary
folders are removed on SIGTERM and reclaimed after a SIGKILL (issue 17)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from cle_core._cli import main  # noqa: E402


def _save(path, nodes, x_type, x_shape, y_shape, inits):
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", x_type, x_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape)],
        [numpy_helper.from_array(v, k) for k, v in inits.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return str(path)


def _weights(cout=4, seed=0):
    return np.random.default_rng(seed).normal(size=(cout, 3, 3, 3)).astype(np.float32)


def conv(path, hw=8, cout=4):
    """x (N, 3, hw, hw) -> Conv 3x3 -> y (N, cout, hw - 2, hw - 2)."""
    nodes = [helper.make_node("Conv", ["x", "w"], ["y"])]
    shape = ["N", cout, hw - 2, hw - 2]
    return _save(path, nodes, TensorProto.FLOAT, ["N", 3, hw, hw], shape, {"w": _weights(cout)})


def scalar_output(path, declared=True):
    """The sum of a Conv's outputs over the whole batch; ``declared``: as a scalar, else
    wrongly as a batch of numbers (found when it runs)."""
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"]),
        helper.make_node("ReduceSum", ["c"], ["y"], keepdims=0),
    ]
    shape = [] if declared else ["N"]
    return _save(path, nodes, TensorProto.FLOAT, ["N", 3, 8, 8], shape, {"w": _weights()})


def typed_input(path, elem_type):
    """An integer or boolean input cast to float before a Conv."""
    nodes = [
        helper.make_node("Cast", ["x"], ["xf"], to=TensorProto.FLOAT),
        helper.make_node("Conv", ["xf", "w"], ["y"]),
    ]
    return _save(path, nodes, elem_type, ["N", 3, 8, 8], ["N", 4, 6, 6], {"w": _weights()})


def array(path, shape, nan=False):
    x = np.random.default_rng(1).normal(size=shape).astype(np.float32)
    if nan:
        x[1, 0, 2, 2] = np.nan
    np.save(path, x)
    return str(path)


def images(folder):
    skimage_io = pytest.importorskip("skimage.io")
    folder.mkdir()
    rng = np.random.default_rng(2)
    for name in ("a.png", "b.png"):
        skimage_io.imsave(str(folder / name), rng.integers(0, 255, (12, 12, 3), dtype=np.uint8))
    return str(folder)


# Each case: the arguments after ``cle evaluate`` and what the one line must say (a tuple:
# one of its words).
CASES = {
    "input of another size": lambda d: (
        [conv(d / "m.onnx"), "--inputs", array(d / "big.npy", (4, 3, 16, 16))],
        ["big.npy", "'x'", "(4, 3, 16, 16)"],
    ),
    "input of other channels": lambda d: (
        [conv(d / "m.onnx"), "--inputs", array(d / "grey.npy", (4, 1, 8, 8))],
        ["grey.npy", "'x'"],
    ),
    "input of another rank": lambda d: (
        [conv(d / "m.onnx"), "--inputs", array(d / "flat.npy", (4, 192))],
        ["flat.npy", "'x'"],
    ),
    "NaN inputs": lambda d: (
        [conv(d / "m.onnx"), "--inputs", array(d / "bad.npy", (4, 3, 8, 8), nan=True)],
        [("'x'", "bad.npy"), "NaN"],
    ),
    "scalar output": lambda d: (
        [scalar_output(d / "s.onnx"), "--inputs", array(d / "x.npy", (4, 3, 8, 8))],
        ["s.onnx", "'y'"],
    ),
    "scalar output, undeclared": lambda d: (
        [scalar_output(d / "s.onnx", False), "--inputs", array(d / "x.npy", (4, 3, 8, 8))],
        ["s.onnx", "'y'"],
    ),
    "models of different input sizes": lambda d: (
        [
            conv(d / "m8.onnx"),
            conv(d / "m16.onnx", hw=16),
            "--inputs",
            array(d / "x.npy", (4, 3, 8, 8)),
        ],
        ["m16.onnx", "'x'"],
    ),
    "models of different output shapes": lambda d: (
        [
            conv(d / "m.onnx"),
            conv(d / "m5.onnx", cout=5),
            "--inputs",
            array(d / "x.npy", (4, 3, 8, 8)),
        ],
        ["m5.onnx", "'y'"],
    ),
    "int64 input, sample images": lambda d: (
        [typed_input(d / "i.onnx", TensorProto.INT64)],
        ["'x'", "int64", "--inputs"],
    ),
    "bool input, image folder": lambda d: (
        [typed_input(d / "b.onnx", TensorProto.BOOL), "--inputs", images(d / "imgs")],
        ["'x'", "bool", ".npy"],
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_evaluate_refuses_in_one_line(case, tmp_path, capsys):
    args, named = CASES[case](tmp_path)
    code = main(["evaluate", *args])
    out, err = capsys.readouterr()
    assert code == 2, out + err
    assert "internal error" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cle: error: "), err
    for words in named:
        words = words if isinstance(words, tuple) else (words,)
        assert any(w in lines[0] for w in words), lines[0]


# -- temporary folders ------------------------------------------------------------------

CHILD = textwrap.dedent(
    """
    import sys
    from cle_core._cli import main
    sys.exit(main(["evaluate", *sys.argv[1:]]))
    """
)


def _child(tmp, *args) -> subprocess.Popen:
    env = {**os.environ, "TMPDIR": str(tmp)}
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, *map(str, args)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _left(tmp) -> list:
    """What is in ``tmp``, but for the session file that onnxruntime's telemetry keeps in
    $TMPDIR from its import on (on purpose: not a temporary of the evaluation)."""
    return sorted(p.name for p in tmp.iterdir() if p.name != ".ses")


def _wait_for_work(tmp, proc, timeout=60.0):
    """Poll until a folder in ``tmp`` holds something: the evaluation is writing model
    copies (its imports are done: a signal during the import of a C extension surfaces
    as an ImportError, which is not what these tests are about)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if any(p.is_dir() and any(p.iterdir()) for p in tmp.iterdir()):
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.002)
    proc.kill()
    pytest.fail("the evaluation created no temporary folder")


@pytest.fixture
def evaluation(tmp_path):
    """A temp folder of its own, a model and enough inputs for an evaluation that runs
    for a moment after its temporary folder appears."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    model = conv(tmp_path / "m.onnx", hw=32, cout=16)
    inputs = array(tmp_path / "x.npy", (64, 3, 32, 32))
    return tmp, [model, "--inputs", inputs]


def test_a_killed_evaluation_leaves_its_folder_to_the_next_run(evaluation, monkeypatch, capsys):
    tmp, args = evaluation
    proc = _child(tmp, *args)
    _wait_for_work(tmp, proc)
    proc.kill()
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert _left(tmp)  # nothing could clean up after the SIGKILL
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))  # the next run, here: faster
    assert main(["evaluate", *args]) == 0
    assert _left(tmp) == []


def test_a_terminated_evaluation_removes_its_folder(evaluation):
    tmp, args = evaluation
    proc = _child(tmp, *args)
    _wait_for_work(tmp, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert "terminated" in err
    assert _left(tmp) == []


def test_the_folder_of_a_running_evaluation_is_left_alone(tmp_path, monkeypatch, capsys):
    """Stale means: its process is gone. Another evaluation's folder stays."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    alive = tmp / f"cle-eval-{os.getppid()}-abcd1234"
    alive.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    args = [conv(tmp_path / "m.onnx"), "--inputs", array(tmp_path / "x.npy", (4, 3, 8, 8))]
    assert main(["evaluate", *args]) == 0
    assert list(tmp.iterdir()) == [alive]
