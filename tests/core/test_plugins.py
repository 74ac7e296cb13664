"""The plugin host: built-in registration, entry-point discovery, dispatch and errors."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import cle_core
from cle_core import UnsupportedModelError, equalize_model, get_plugin_manager
from cle_core._backend import get_backend_for_file
from cle_core._cli._common import Terminated
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
    # A missing framework is normal (the core alone has no torch): no warning.
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []
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
    # Scales were chosen: they spread over more than a factor of e, and the estimate
    # (which counts the second activation grid behind the per-channel bound) improves.
    assert np.ptp(np.log(report.regions[0].scales)) > 1.0
    assert report.noise.sqnr_after > report.noise.sqnr_before + 2


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
    assert main(["inspect", str(src), "-v"]) == 0
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
    err = capsys.readouterr().err
    assert "no CLE backend reads this file (the registered backends read " in err
    assert "; registered backends: " in err


# --- plugin isolation: a broken third-party plugin costs only itself ---------------------

ROOT = Path(__file__).resolve().parents[2]


class Installer:
    """Fake installed distributions: a dist-info folder declaring ``cle.backends`` entry
    points, with the plugin modules beside it, in a folder put first on sys.path."""

    def __init__(self, tmp_path: Path, monkeypatch):
        self.tmp_path = tmp_path
        self.monkeypatch = monkeypatch
        self.modules: list[str] = []

    def __call__(
        self,
        dist: str,
        entry_points: dict[str, str] | str,
        modules: dict[str, str] | None = None,
        folder: str = "site",
        on_path: bool = True,
    ) -> Path:
        where = self.tmp_path / folder
        info = where / f"{dist.replace('-', '_')}-0.1.dist-info"
        info.mkdir(parents=True)
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
        if isinstance(entry_points, dict):
            lines = "".join(f"{name} = {value}\n" for name, value in entry_points.items())
            entry_points = f"[cle.backends]\n{lines}"
        (info / "entry_points.txt").write_text(entry_points)
        for module, source in (modules or {}).items():
            (where / f"{module}.py").write_text(textwrap.dedent(source))
            self.modules.append(module)
        if on_path and str(where) not in sys.path:
            self.monkeypatch.syspath_prepend(str(where))
        return where


@pytest.fixture
def install(tmp_path, monkeypatch):
    installer = Installer(tmp_path, monkeypatch)
    yield installer
    monkeypatch.undo()
    for module in installer.modules:
        sys.modules.pop(module, None)
    get_plugin_manager(reload=True)


def names() -> list[str]:
    return sorted(name for name, _ in get_plugin_manager().list_name_plugin())


def warnings_of(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def claiming(name: str, suffix: str = "", tryfirst: bool = False) -> str:
    """Source of a plugin module whose backend (named ``name``) claims every dict model and
    every file ending in ``suffix`` (every file if empty)."""
    marker = "@cle_core.hookimpl(tryfirst=True)" if tryfirst else "@cle_core.hookimpl"
    return f"""
        import cle_core

        class Claimer(cle_core.FileBackend):
            name = {name!r}

            def to_ir(self, model, **options):
                raise cle_core.UnsupportedModelError("{name} translates nothing")

            def apply(self, model, result, **options):
                return model

        {marker}
        def cle_backend_for(model):
            return Claimer() if isinstance(model, dict) else None

        {marker}
        def cle_backend_for_file(path):
            return Claimer() if path.name.endswith({suffix!r}) else None
        """


HOOK = "from cle_core import hookimpl\n\n@hookimpl\n"
BROKEN = {
    "runtime-error": ("raise RuntimeError('the plugin is broken')\n", "RuntimeError: the plugin"),
    "import-error": (
        "from json import no_such_name\n",
        "ImportError: cannot import name 'no_such_name'",
    ),
    "misspelled-hook": (
        HOOK + "def cle_backend_fro(model):\n    return None\n",
        "unknown hook 'cle_backend_fro'",
    ),
    "wrong-argument": (
        HOOK + "def cle_backend_for(modle):\n    return None\n",
        "cle_backend_for(modle)",
    ),
    "exits": ("import sys\nsys.exit(3)\n", "SystemExit: 3"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_a_plugin_that_fails_to_load_is_skipped_with_one_warning(case, install, caplog):
    source, error = BROKEN[case]
    get_plugin_manager(reload=True)
    before = names()
    install("toy-cle-backend", {"toy": "tests.helpers.toy_backend"}, folder="toy")
    install("broken-plugin", {"broken": "cle_broken_plugin"}, {"cle_broken_plugin": source})
    with caplog.at_level("WARNING", logger="cle_core"):
        get_plugin_manager(reload=True)
    assert names() == sorted([*before, "toy"])  # the built-in backends and the toy: loaded
    [warning] = warnings_of(caplog)
    assert "'broken'" in warning and "broken-plugin" in warning and error in warning
    assert "\n" not in warning
    # The plugins that loaded work, and the broken one is named where nothing claims a model.
    new, report = equalize_model(make_mlp())
    assert len(report.regions) == 1
    with pytest.raises(UnsupportedModelError, match=r"not loaded: broken \(.*\)"):
        equalize_model({"not": "a model"})


def test_a_misspelled_hook_is_never_registered(install, caplog):
    install("typo", {"typo": "cle_typo_plugin"}, {"cle_typo_plugin": BROKEN["misspelled-hook"][0]})
    with caplog.at_level("WARNING", logger="cle_core"):
        pm = get_plugin_manager(reload=True)
    assert pm.get_plugin("typo") is None
    assert "cle_backend_fro" not in pm.hook.__dict__  # validated apart, nothing left behind
    assert "unknown hook 'cle_backend_fro'" in caplog.text


def test_unreadable_entry_points_cost_only_their_package(install, caplog):
    install("toy-cle-backend", {"toy": "tests.helpers.toy_backend"}, folder="toy")
    install("garbled", "[cle.backends]\nthis line has no equals sign\n")
    with caplog.at_level("WARNING", logger="cle_core"):
        get_plugin_manager(reload=True)
    assert "toy" in names()
    [warning] = warnings_of(caplog)
    assert "garbled" in warning and "entry points" in warning


def test_equalize_model_on_onnx_works_with_broken_plugins_installed(install, caplog):
    pytest.importorskip("onnx")
    import cle_onnx
    from tests.helpers.onnx_models import conv_pair

    install("broken-plugin", {"broken": "cle_broken_plugin"}, {"cle_broken_plugin": "1 / 0\n"})
    install(
        "flaky-plugin",
        {"aaa_flaky": "cle_flaky_plugin"},
        {
            "cle_flaky_plugin": """
                import cle_core

                @cle_core.hookimpl(tryfirst=True)
                def cle_backend_for(model):
                    raise RuntimeError("flaky")
                """
        },
    )
    with caplog.at_level("WARNING", logger="cle_core"):
        get_plugin_manager(reload=True)
        model = conv_pair("relu")
        assert isinstance(cle_core.get_backend(model), cle_onnx.OnnxBackend)
        new, report = cle_core.equalize_model(model)
    assert len(report.folds) == 1 and len(report.regions) == 1
    assert ["ZeroDivisionError" in w for w in warnings_of(caplog)] == [True]


def test_a_hook_that_raises_is_skipped_and_named(install, tmp_path, caplog, capsys):
    from cle_core._cli import main

    install("toy-cle-backend", {"toy": "tests.helpers.toy_backend"}, folder="toy")
    flaky = """
        import cle_core

        @cle_core.hookimpl
        def cle_backend_for(model):
            raise RuntimeError("flaky model hook")

        @cle_core.hookimpl
        def cle_backend_for_file(path):
            raise RuntimeError("flaky file hook")
        """
    # "flaky" sorts before "toy": it is asked first, fails, and the toy backend still answers.
    install("flaky-plugin", {"flaky": "cle_flaky_plugin"}, {"cle_flaky_plugin": flaky})
    get_plugin_manager(reload=True)
    with caplog.at_level("WARNING", logger="cle_core"):
        assert isinstance(cle_core.get_backend(make_mlp()), ToyBackend)
        assert isinstance(get_backend_for_file(tmp_path / "m.toy"), ToyBackend)
    [w1, w2] = warnings_of(caplog)
    assert "'flaky'" in w1 and "flaky-plugin" in w1 and "RuntimeError: flaky model hook" in w1
    assert "'flaky'" in w2 and "RuntimeError: flaky file hook" in w2
    with pytest.raises(UnsupportedModelError, match=r"failed: flaky \(RuntimeError: flaky"):
        get_backend_for_file(tmp_path / "m.xyz")
    with pytest.raises(UnsupportedModelError, match=r"failed: flaky \(RuntimeError: flaky"):
        equalize_model({"not": "a model"})
    # On the command line: one warning line, and the toy file is equalized.
    src = tmp_path / "m.toy"
    with open(src, "wb") as f:
        ToyBackend().save(make_mlp(), f)
    capsys.readouterr()
    assert main(["inspect", str(src)]) == 0
    err = capsys.readouterr().err
    assert err.splitlines() == [
        "cle: warning: plugin 'flaky' (package flaky-plugin 0.1) failed while asked about "
        f"{src}: RuntimeError: flaky file hook; skipped"
    ]


def test_a_hook_that_returns_no_backend_is_skipped(install, caplog):
    install("toy-cle-backend", {"toy": "tests.helpers.toy_backend"}, folder="toy")
    odd = "import cle_core\n\n@cle_core.hookimpl\ndef cle_backend_for(model):\n    return 'yes'\n"
    install("odd-plugin", {"odd": "cle_odd_plugin"}, {"cle_odd_plugin": odd})
    get_plugin_manager(reload=True)
    with caplog.at_level("WARNING", logger="cle_core"):
        assert isinstance(cle_core.get_backend(make_mlp()), ToyBackend)
    [warning] = warnings_of(caplog)
    assert "'odd'" in warning and "returned str, not a cle_core.Backend" in warning


def test_a_file_hook_must_return_a_backend_with_file_services(install, caplog, tmp_path):
    # The translation contract is all the Python API needs; the command line needs the
    # file services of a FileBackend too.
    install("toy-cle-backend", {"toy": "tests.helpers.toy_backend"}, folder="toy")
    bare = (
        "import cle_core\n\nclass Bare(cle_core.Backend):\n"
        "    def to_ir(self, model, **o):\n        raise NotImplementedError\n"
        "    def apply(self, model, result, **o):\n        return model\n\n"
        "@cle_core.hookimpl\ndef cle_backend_for_file(path):\n    return Bare()\n"
    )
    install("bare-plugin", {"bare": "cle_bare_plugin"}, {"cle_bare_plugin": bare})
    get_plugin_manager(reload=True)
    with caplog.at_level("WARNING", logger="cle_core"):
        assert isinstance(get_backend_for_file(tmp_path / "m.toy"), ToyBackend)
    [warning] = warnings_of(caplog)
    assert "'bare'" in warning and "returned Bare, not a cle_core.FileBackend" in warning


def test_a_cle_error_from_a_hook_reaches_the_user(install, tmp_path):
    # Raising a CLEError is how a plugin says "mine, but I cannot" (the ONNX backend
    # without onnx installed): that message is the answer, not a plugin failure.
    refuses = """
        import cle_core

        @cle_core.hookimpl
        def cle_backend_for_file(path):
            if path.suffix == ".ref":
                raise cle_core.UnsupportedModelError("the ref backend needs refs")
        """
    install("ref-plugin", {"ref": "cle_ref_plugin"}, {"cle_ref_plugin": refuses})
    get_plugin_manager(reload=True)
    with pytest.raises(UnsupportedModelError, match="^the ref backend needs refs$"):
        get_backend_for_file(tmp_path / "m.ref")


PRINTS_A_WARNING = "cle: warning: plugin 'broken' (package broken-plugin 0.1) skipped: "


def test_the_cli_runs_with_a_broken_plugin_installed(install, tmp_path, capsys):
    from cle_core._cli import main

    install("toy-cle-backend", {"toy": "tests.helpers.toy_backend"}, folder="toy")
    install(
        "broken-plugin",
        {"broken": "cle_broken_plugin"},
        {"cle_broken_plugin": "raise ImportError('half installed')\n"},
    )
    get_plugin_manager(reload=True)
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    assert "equalize" in capsys.readouterr().out
    src = tmp_path / "m.toy"
    with open(src, "wb") as f:
        ToyBackend().save(make_mlp(), f)
    assert main(["equalize", str(src), "-o", str(tmp_path / "o.toy"), "--quiet"]) == 0
    assert main(["inspect", str(src)]) == 0
    assert (tmp_path / "o.toy").exists()
    # Loaded once per process: the warning was printed once, before the first command.
    get_plugin_manager(reload=True)
    capsys.readouterr()
    assert main(["inspect", str(src)]) == 0
    assert main(["inspect", str(src)]) == 0
    assert capsys.readouterr().err == ""


def test_the_cli_prints_one_warning_line_and_no_traceback(install, tmp_path):
    site = install(
        "broken-plugin",
        {"broken": "cle_broken_plugin"},
        {"cle_broken_plugin": "raise RuntimeError('the plugin is broken')\n"},
        on_path=False,
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(ROOT)])}
    proc = subprocess.run(
        [sys.executable, "-m", "cle_core._cli", "--help"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    assert "equalize" in proc.stdout and "inspect" in proc.stdout
    assert proc.stderr == PRINTS_A_WARNING + "RuntimeError: the plugin is broken\n"
    # --debug shows where the plugin failed.
    proc = subprocess.run(
        [sys.executable, "-m", "cle_core._cli", "--debug", "--help"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.startswith(PRINTS_A_WARNING) and "Traceback" in proc.stderr


def test_a_plugin_whose_cle_add_commands_raises_adds_no_command(install, tmp_path, capsys):
    from cle_core._cli import main

    raises = """
        import cle_core

        @cle_core.hookimpl
        def cle_add_commands(subparsers):
            subparsers.add_parser("half", help="added before the failure").set_defaults(
                run=lambda args: 5
            )
            raise RuntimeError("no commands today")
        """
    install("toy-cle-backend", {"toy": "tests.helpers.toy_backend"}, folder="toy")
    install("cmd-plugin", {"cmd": "cle_cmd_plugin"}, {"cle_cmd_plugin": raises})
    get_plugin_manager(reload=True)
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    out, err = capsys.readouterr()
    assert "half" not in out and "inspect" in out
    assert err.splitlines() == [
        "cle: warning: plugin 'cmd' (package cmd-plugin 0.1): cle_add_commands failed, "
        "its commands are left out: RuntimeError: no commands today"
    ]
    with pytest.raises(SystemExit):
        main(["half"])
    assert "invalid choice: 'half'" in capsys.readouterr().err
    src = tmp_path / "m.toy"
    with open(src, "wb") as f:
        ToyBackend().save(make_mlp(), f)
    assert main(["inspect", str(src)]) == 0


def test_a_command_name_that_is_taken_is_refused(install, tmp_path, capsys):
    from cle_core._cli import main

    # One module, two commands: ``hello`` is new, ``equalize`` is the built-in one's.
    takes_equalize = """
        import cle_core

        @cle_core.hookimpl
        def cle_add_commands(subparsers):
            p = subparsers.add_parser("hello", help="says hello (first)")
            p.set_defaults(run=lambda args: 7)
            q = subparsers.add_parser("equalize", help="not the real one")
            q.add_argument("--fake")
            q.set_defaults(run=lambda args: 42)
        """
    also_hello = """
        import cle_core

        @cle_core.hookimpl
        def cle_add_commands(subparsers):
            subparsers.add_parser("hello", help="says hello (second)").set_defaults(
                run=lambda args: 8
            )
        """
    install("toy-cle-backend", {"toy": "tests.helpers.toy_backend"}, folder="toy")
    # Put on sys.path in both orders: "first" (sorted before "second") gets ``hello``.
    install("first", {"first": "cle_first_plugin"}, {"cle_first_plugin": takes_equalize}, "a")
    install("second", {"second": "cle_second_plugin"}, {"cle_second_plugin": also_hello}, "b")
    src = tmp_path / "m.toy"
    with open(src, "wb") as f:
        ToyBackend().save(make_mlp(), f)
    base = [p for p in sys.path if p not in {str(tmp_path / "a"), str(tmp_path / "b")}]
    for order in ("ab", "ba"):
        sys.path[:] = [str(tmp_path / d) for d in order] + base
        get_plugin_manager(reload=True)
        capsys.readouterr()
        out = tmp_path / f"o_{order}.toy"
        assert main(["equalize", str(src), "-o", str(out), "--quiet"]) == 0
        assert out.exists()  # the built-in command ran
        assert sorted(capsys.readouterr().err.splitlines()) == [
            "cle: warning: command 'equalize' of plugin 'first' (package first 0.1) refused: "
            "the name is taken by a built-in command",
            "cle: warning: command 'hello' of plugin 'second' (package second 0.1) refused: "
            "the name is taken by plugin 'first' (package first 0.1)",
        ]
        assert main(["hello"]) == 7


@pytest.mark.parametrize("builtin", ["onnx", "torch"])
def test_a_third_party_cannot_take_a_builtin_name(builtin, install, tmp_path, caplog):
    import cle_core._backend as host

    module = f"cle_impostor_{builtin}"
    install("impostor", {builtin: module}, {module: claiming("impostor")})
    with caplog.at_level("WARNING", logger="cle_core"):
        pm = get_plugin_manager(reload=True)
    [warning] = warnings_of(caplog)
    assert f"plugin '{builtin}' (package impostor 0.1) skipped" in warning
    assert "built-in backend of crosslayer-eq" in warning
    assert module not in sys.modules  # refused before it was imported
    assert pm.get_plugin(builtin) in (None, sys.modules.get(f"cle_{builtin}._plugin"))
    with pytest.raises(UnsupportedModelError, match="no CLE backend handles"):
        equalize_model({"not": "a model"})
    assert builtin in host.builtin_names()


def test_the_builtin_onnx_backend_keeps_its_files_and_models(install, tmp_path):
    pytest.importorskip("onnx")
    import cle_onnx
    from tests.helpers.onnx_models import conv_pair

    # A catch-all third party, named to sort first, marked tryfirst, first on sys.path.
    install("impostor", {"onnx": "cle_impostor_a"}, {"cle_impostor_a": claiming("a")}, "a")
    install("catch-all", {"aaa": "cle_catch_all"}, {"cle_catch_all": claiming("all", "", True)})
    get_plugin_manager(reload=True)
    import cle_onnx._plugin

    assert get_plugin_manager().get_plugin("onnx") is cle_onnx._plugin
    assert isinstance(get_backend_for_file(tmp_path / "m.onnx"), cle_onnx.OnnxBackend)
    assert isinstance(cle_core.get_backend(conv_pair("relu")), cle_onnx.OnnxBackend)
    # What no built-in claims goes to the third party.
    assert get_backend_for_file(tmp_path / "m.xyz").name == "all"


@pytest.mark.parametrize("tryfirst", [False, True], ids=["plain", "tryfirst"])
def test_the_claim_does_not_depend_on_the_order_of_site_packages(tryfirst, install, tmp_path):
    install("alpha-dist", {"alpha": "cle_alpha_plugin"}, {"cle_alpha_plugin": claiming("a")}, "a")
    # Both claim m.both; beta sorts after alpha (and may ask pluggy to be called first).
    install(
        "beta-dist",
        {"beta": "cle_beta_plugin"},
        {"cle_beta_plugin": claiming("b", ".both", tryfirst=tryfirst)},
        "b",
    )
    base = [p for p in sys.path if p not in {str(tmp_path / "a"), str(tmp_path / "b")}]
    answers = []
    for order in ("ab", "ba"):
        sys.path[:] = [str(tmp_path / d) for d in order] + base
        get_plugin_manager(reload=True)
        answers.append(
            (
                get_backend_for_file(tmp_path / "m.both").name,
                cle_core.get_backend({}).name,
            )
        )
    assert answers == [("a", "a"), ("a", "a")]


def test_the_claim_order_is_builtins_then_third_parties_by_name(install):
    import cle_core._backend as host

    install("zeta-dist", {"zeta": "cle_zeta_plugin"}, {"cle_zeta_plugin": claiming("z")}, "z")
    install("alpha-dist", {"alpha": "cle_alpha_plugin"}, {"cle_alpha_plugin": claiming("a")}, "a")
    get_plugin_manager(reload=True)
    order = [name for name, _ in host.plugins()]
    builtins = [name for name in order if name in host.builtin_names()]
    assert order == [*builtins, "alpha", "zeta"]
    assert builtins == sorted(builtins)


def _raise(exc):
    raise exc


def _wrapped(signal_exc: BaseException) -> ImportError:
    """What a signal landing while an extension module initializes looks like."""
    try:
        try:
            raise signal_exc
        except BaseException as inner:
            raise ImportError("initialization failed") from inner
    except ImportError as exc:
        return exc


@pytest.mark.parametrize(
    "make, code, word",
    [
        (lambda: _wrapped(KeyboardInterrupt()), 130, "interrupted"),
        (lambda: _wrapped(Terminated()), 143, "terminated"),
        (lambda: ImportError("a real bug"), 1, "internal error"),
    ],
    ids=["sigint-in-import", "sigterm-in-import", "import-bug"],
)
def test_a_signal_during_an_import_keeps_its_exit_code(make, code, word, capsys):
    import argparse

    from cle_core._cli import _main

    args = argparse.Namespace(command="x", debug=False, run=lambda a: _raise(make()))
    assert _main(argparse.ArgumentParser(), args) == code
    assert word in capsys.readouterr().err


def test_an_objective_a_plugin_registers_is_a_choice_of_the_command_line(install):
    """Plugins load before the built-in commands are built: the objective a plugin
    module registers when imported is one of ``--objective``'s choices."""
    install(
        "extra-objective",
        {"extra": "cle_extra_objective"},
        {
            "cle_extra_objective": """
                import numpy as np
                from cle_core import ScaleOutcome, objective_names, register_objective

                class Ones:
                    name = "ones-from-plugin"
                    description = "no scaling"

                    def choose(self, problem):
                        return ScaleOutcome(
                            {r.id: np.ones(r.size) for r in problem.regions}, 1, True, 0.0
                        )

                if "ones-from-plugin" not in objective_names():
                    register_objective(Ones())
            """
        },
    )
    get_plugin_manager(reload=True)
    from cle_core._cli import build_parser

    args = build_parser().parse_args(["inspect", "m.onnx", "--objective", "ones-from-plugin"])
    assert args.objective == "ones-from-plugin"


def test_measure_files_reads_a_backend_that_evaluates_two_files_at_a_time():
    """``--verify`` calls ``measure_files``; its default reads ``evaluate_files``, which
    a backend may answer for the original and one file only: the others are asked for
    one at a time beside the original."""
    from cle_core import Deployment

    class TwoAtATime(ToyBackend):
        def evaluate_files(self, paths, inputs, **quantization):
            assert quantization["calibration"] == "calib" and inputs == "measure"
            score = {"m.toy": 1.0, "a.toy": 2.0, "b.toy": 3.0, "c.toy": 4.0}
            rows = [(p.name, {"w8a8_sqnr": score[p.name]}) for p in paths[:2]]
            return rows, False, []

    paths = [Path(n) for n in ("m.toy", "a.toy", "b.toy", "c.toy")]
    got = TwoAtATime().measure_files(paths, [("calib", "measure")], Deployment())
    assert got == [1.0, 2.0, 3.0, 4.0]
