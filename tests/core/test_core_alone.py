"""The core works with torch, onnx and onnxruntime blocked from import: equalizing an
IR graph, the plugin host, the command line on the toy backend's files, and plots from
a report. (``nox -s core`` also runs the core's tests in an environment without them.)"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent(
    """
    import importlib.abc, json, sys
    from pathlib import Path

    BLOCKED = ("torch", "onnx", "onnxruntime", "onnxscript")

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None

    sys.meta_path.insert(0, Block())
    tmp = Path(sys.argv[1])
    sys.path.insert(0, str(tmp))  # the toy backend's distribution metadata

    import numpy as np
    import cle_core
    from cle_core import Graph, Layout, equalize, run_graph
    from cle_core._cli import main
    from tests.helpers.toy_backend import ToyBackend, ToyMLP

    # 1. the IR and the passes
    rng = np.random.default_rng(0)
    g = Graph()
    g.add_input("x", 3)
    w1 = rng.normal(size=(8, 3, 3, 3)) * np.logspace(-2, 1, 8)[:, None, None, None]
    g.add_node("conv", ["x"], name="c1", outputs=["h"],
               params={"weight": w1, "bias": rng.normal(size=8)},
               attrs={"layout": Layout(), "pads": (1, 1, 1, 1)})
    g.add_node("relu", ["h"], name="r", outputs=["a"])
    g.add_node("conv", ["a"], name="c2", outputs=["y"],
               params={"weight": rng.normal(size=(4, 8, 1, 1)), "bias": None},
               attrs={"layout": Layout()})
    g.set_outputs(["y"])
    x = {"x": rng.normal(size=(2, 3, 8, 8))}
    before = run_graph(g, x)["y"]
    report = equalize(g).report
    assert len(report.regions) == 1
    assert np.allclose(run_graph(g, x)["y"], before, rtol=1e-9, atol=1e-9)

    # 2. the plugin host: the ONNX backend is left out, nothing fails
    pm = cle_core.get_plugin_manager()
    assert pm.get_plugin("onnx") is None and pm.get_plugin("toy") is not None

    # 3. the command line on the toy backend's own files
    rng = np.random.default_rng(1)
    model = ToyMLP([
        {"op": "dense", "w": rng.normal(size=(6, 4)) * [[10], [1], [0.1], [1], [5], [0.01]],
         "b": rng.normal(size=6)},
        {"op": "relu"},
        {"op": "dense", "w": rng.normal(size=(3, 6)), "b": rng.normal(size=3)},
    ])
    with open(tmp / "m.toy", "wb") as f:
        ToyBackend().save(model, f)
    code = main(["equalize", str(tmp / "m.toy"), "-o", str(tmp / "o.toy"),
                 "--report", str(tmp / "r.json"), "--quiet"])
    assert code == 0, code
    assert main(["inspect", str(tmp / "m.toy")]) == 0
    assert json.loads((tmp / "r.json").read_text())["regions"]

    # 4. plots from a report, where matplotlib is installed
    from importlib.util import find_spec
    if find_spec("matplotlib") is not None:
        from cle_core._plots import write_plots
        assert write_plots(report, tmp / "plots")

    assert not [m for m in sys.modules if m.split(".")[0] in BLOCKED]
    print("core alone: ok")
    """
)


def test_the_core_runs_without_torch_onnx_or_onnxruntime(tmp_path):
    dist = tmp_path / "toy_cle_backend-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: toy-cle-backend\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[cle.backends]\ntoy = tests.helpers.toy_backend\n")
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "core alone: ok" in proc.stdout
