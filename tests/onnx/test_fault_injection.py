"""Fault injection: ``cle equalize --in-place`` on a model with external data, killed
with SIGKILL at every step of its file protocol and at seeded random moments. After
every kill the model must load and be either the old file or the new one (issue 9).

A child process runs the CLI with ``os.open``, ``os.fsync``, ``os.chmod``,
``os.replace`` and ``os.unlink`` wrapped: the wrapper counts calls and kills the
process (SIGKILL, no clean-up possible) just before call number N. A first run counts
the calls; then the child is killed before each of them in turn.
"""

from __future__ import annotations

import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from tests.helpers import onnx_models as om  # noqa: E402

CHILD = textwrap.dedent(
    """
    import os, signal, sys
    kill_at, counter = int(sys.argv[2]), [0]

    def wrap(fn):
        def wrapped(*args, **kwargs):
            counter[0] += 1
            if counter[0] == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            return fn(*args, **kwargs)
        return wrapped

    for name in ("open", "fsync", "chmod", "replace", "unlink"):
        setattr(os, name, wrap(getattr(os, name)))
    from cle_core._cli import main
    code = main(["equalize", sys.argv[1], "--in-place", "--quiet"])
    print(counter[0])
    sys.exit(code)
    """
)


def child(model_path, kill_at: int = 0) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, str(model_path), str(kill_at)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def outputs(path):
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).normal(size=(2, 3, 8, 8)).astype(np.float32)
    return sess.run(None, {"x": x})[0]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The original model (external data), what a complete run writes, and the number
    of file operations of a complete run."""
    base = tmp_path_factory.mktemp("fault")
    model = om.depthwise_triple()
    original = base / "original"
    original.mkdir()
    om.save_external(model, original / "m.onnx", "m.onnx.data")
    done = base / "done"
    shutil.copytree(original, done)
    proc = child(done / "m.onnx")
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    return (
        original,
        (done / "m.onnx").read_bytes(),
        int(out.split()[-1]),
        outputs(original / "m.onnx"),
    )


def check_loads_old_or_new(folder, setup):
    original, new_bytes, _, reference = setup
    path = folder / "m.onnx"
    data = path.read_bytes()
    assert data in ((original / "m.onnx").read_bytes(), new_bytes)
    onnx.checker.check_model(str(path), full_check=True)
    got = outputs(path)
    assert np.max(np.abs(got - reference)) <= 1e-5 * np.max(np.abs(reference))


def test_kill_before_every_file_operation(setup, tmp_path):
    original, _, count, _ = setup
    assert count >= 10  # open, fsync, chmod, replace of two files, the folder syncs, unlink
    for n in range(1, count + 1):
        folder = tmp_path / f"kill{n}"
        shutil.copytree(original, folder)
        proc = child(folder / "m.onnx", n)
        proc.communicate(timeout=120)
        assert proc.returncode == -signal.SIGKILL
        check_loads_old_or_new(folder, setup)


def test_kill_at_random_moments(setup, tmp_path):
    original = setup[0]
    rng = random.Random(9)
    for i in range(6):
        folder = tmp_path / f"random{i}"
        shutil.copytree(original, folder)
        proc = child(folder / "m.onnx")
        time.sleep(rng.uniform(0.2, 2.0))
        proc.kill()
        proc.communicate(timeout=120)
        check_loads_old_or_new(folder, setup)
