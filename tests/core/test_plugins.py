"""The plugin host: built-in registration, entry-point discovery, dispatch and errors."""

from __future__ import annotations

import sys

import numpy as np
import pytest

import cle_core
from cle_core import UnsupportedModelError, equalize_model, get_plugin_manager
from tests.helpers.toy_backend import ToyBackend, ToyMLP


@pytest.fixture
def toy_installed(tmp_path, monkeypatch):
    """Install the toy backend the way a third-party package would: a distribution on
    sys.path whose metadata declares an entry point in the ``cle.backends`` group."""
    dist = tmp_path / "toy_cle_backend-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: toy-cle-backend\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[cle.backends]\ntoy = tests.helpers.toy_backend\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    get_plugin_manager(reload=True)
    yield
    monkeypatch.undo()
    get_plugin_manager(reload=True)


def make_mlp(seed: int = 0) -> ToyMLP:
    rng = np.random.default_rng(seed)
    return ToyMLP(
        [
            {
                "op": "dense",
                "w": rng.normal(size=(6, 4)) * [[10], [1], [0.1], [1], [5], [0.01]],
                "b": rng.normal(size=6),
            },
            {
                "op": "bn",
                "mean": rng.normal(size=6),
                "var": rng.uniform(0.5, 2, 6),
                "gamma": rng.normal(size=6) * 3,
                "beta": rng.normal(size=6) + 4,
                "eps": 1e-5,
            },
            {"op": "clip", "lo": 0.0, "hi": 6.0},
            {"op": "dense", "w": rng.normal(size=(3, 6)), "b": rng.normal(size=3)},
        ]
    )


def test_builtin_backends_come_from_their_entry_points():
    pytest.importorskip("onnx")
    import cle_onnx._plugin
    import cle_torch._plugin

    pm = get_plugin_manager(reload=True)
    assert pm.get_plugin("onnx") is cle_onnx._plugin
    assert pm.get_plugin("torch") is cle_torch._plugin


def test_a_backend_whose_framework_is_missing_is_skipped(tmp_path, monkeypatch, caplog):
    dist = tmp_path / "needs_nothing-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: needs-nothing\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[cle.backends]\nmissing = cle_missing_framework\n")
    (tmp_path / "cle_missing_framework.py").write_text("import a_framework_nobody_installed\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with caplog.at_level("DEBUG", logger="cle_core"):
        pm = get_plugin_manager(reload=True)
    assert pm.get_plugin("missing") is None
    assert "a_framework_nobody_installed is not installed" in caplog.text
    monkeypatch.undo()
    get_plugin_manager(reload=True)


def test_a_misspelled_hook_fails_loudly(tmp_path, monkeypatch):
    import pluggy

    dist = tmp_path / "typo-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: typo\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[cle.backends]\ntypo = cle_typo_plugin\n")
    (tmp_path / "cle_typo_plugin.py").write_text(
        "from cle_core import hookimpl\n\n@hookimpl\ndef cle_backend_fro(model):\n    return None\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(pluggy.PluginValidationError, match="cle_backend_fro"):
        get_plugin_manager(reload=True)
    monkeypatch.undo()
    get_plugin_manager(reload=True)


def test_hook_names_are_prefixed():
    from cle_core import hookspecs

    hooks = [n for n in dir(hookspecs) if callable(getattr(hookspecs, n)) and n.startswith("cle_")]
    assert hooks == ["cle_add_commands", "cle_backend_for", "cle_backend_for_file"]
    assert all(n.startswith("cle_") for n in get_plugin_manager().hook.__dict__)


def test_unknown_model_names_its_type():
    with pytest.raises(UnsupportedModelError, match=r"builtins\.dict"):
        equalize_model({"not": "a model"})


def test_toy_model_not_claimed_without_its_plugin():
    get_plugin_manager(reload=True)
    with pytest.raises(UnsupportedModelError, match="toy_backend.ToyMLP"):
        equalize_model(make_mlp())


def test_entry_point_backend_dispatch(toy_installed):
    assert "toy" in {name for name, _ in get_plugin_manager().list_name_plugin()}
    model = make_mlp()
    original = [dict(s) for s in model.steps]
    x = np.random.default_rng(1).normal(size=(64, 4)) * 3
    y0 = model(x)
    new, report = equalize_model(model, max_sweeps=10)
    assert new is not model
    # The caller's model is untouched.
    assert all(a.keys() == b.keys() for a, b in zip(model.steps, original, strict=True))
    np.testing.assert_array_equal(model.steps[0]["w"], original[0]["w"])
    # BN folded away, ReLU6 carried as a per-channel clip, function unchanged.
    assert [s["op"] for s in new.steps] == ["dense", "clip", "dense"]
    assert np.asarray(new.steps[1]["hi"]).shape == (6,)
    np.testing.assert_allclose(new(x), y0, rtol=1e-9, atol=1e-9 * np.abs(y0).max())
    assert len(report.folds) == 1 and len(report.regions) == 1
    assert report.noise.sqnr_after > report.noise.sqnr_before + 3  # scales were chosen


def test_backend_options_reach_the_backend(toy_installed):
    with pytest.raises(TypeError, match="unexpected options"):
        equalize_model(make_mlp(), bogus=1)


def test_toy_backend_is_a_backend():
    assert isinstance(ToyBackend(), cle_core.Backend)
    assert "tests.helpers.toy_backend" in sys.modules


def test_the_core_names_no_backend():
    # Backends come in through entry points only: no module of the core imports one.
    import pathlib
    import re

    core = pathlib.Path(cle_core.__file__).parent
    pattern = re.compile(r"\b(import|from)\s+cle_(onnx|torch)\b")
    assert [p.name for p in core.glob("*.py") if pattern.search(p.read_text())] == []


def test_the_cli_equalizes_and_inspects_a_third_party_format(toy_installed, tmp_path, capsys):
    from cle_core._cli import main
    from tests.helpers.toy_backend import ToyBackend

    src, dst, rep = tmp_path / "m.toy", tmp_path / "out.toy", tmp_path / "r.json"
    model = make_mlp()
    with open(src, "wb") as f:
        ToyBackend().save(model, f)
    before = src.read_bytes()
    assert main(["equalize", str(src), "-o", str(dst), "--report", str(rep)]) == 0
    text = capsys.readouterr().out
    assert "batch norms folded: 1" in text and "regions equalized:  1" in text
    assert src.read_bytes() == before  # the input is untouched
    new = ToyBackend().load(dst)
    x = np.random.default_rng(1).normal(size=(64, 4)) * 3
    y0 = model(x)
    np.testing.assert_allclose(new(x), y0, rtol=1e-9, atol=1e-9 * np.abs(y0).max())
    assert [s["op"] for s in new.steps] == ["dense", "clip", "dense"]
    assert '"folds"' in rep.read_text()
    assert main(["inspect", str(src)]) == 0
    assert "1 regions would be equalized" in capsys.readouterr().out
    # What the toy backend does not offer is one clear error, and nothing is written.
    assert main(["equalize", str(src), "-o", str(tmp_path / "c.toy"), "--check"]) == 2
    assert "--check: the toy backend cannot run its models" in capsys.readouterr().err
    assert not (tmp_path / "c.toy").exists()
    assert main(["evaluate", str(src)]) == 2
    assert "no quantized evaluation" in capsys.readouterr().err


def test_a_file_no_backend_reads_is_one_clear_error(tmp_path, capsys):
    from cle_core._cli import main

    (tmp_path / "m.xyz").write_bytes(b"?")
    assert main(["inspect", str(tmp_path / "m.xyz")]) == 2
    assert "no CLE backend reads this file (registered backends: " in capsys.readouterr().err
