"""The documentation builds without warnings and its examples run (sphinx doctest)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("sphinx")
pytest.importorskip("torch")
pytest.importorskip("onnx")

DOCS = Path(__file__).resolve().parent.parent / "docs"


@pytest.mark.parametrize("builder", ["html", "doctest"])
def test_docs_build_cleanly(builder, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "-q", "-b", builder, str(DOCS), str(tmp_path)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _doc_figures():
    """benchmarks/doc_figures.py, which is a script, not a package module."""
    import importlib.util

    path = DOCS.parent / "benchmarks" / "doc_figures.py"
    spec = importlib.util.spec_from_file_location("doc_figures", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quoted_sessions_are_the_last_run_of_the_figures_script():
    """The ``cle`` sessions quoted in the docs are what ``benchmarks/doc_figures.py``
    last saved: a figure cannot change in the docs by hand, nor stay behind when the
    script is rerun (``--docs-only`` rewrites the docs from the saved run)."""
    import json

    script = _doc_figures()
    results = json.loads(script.RESULTS.read_text())
    assert set(results) == set(script.COMMANDS)
    marked = []
    for doc in script.DOCS:
        text = doc.read_text()
        marked += script.marked_names(text)
        assert script.rewrite(text, results) == text, f"{doc.name}: rerun doc_figures.py"
    assert sorted(marked) == sorted(script.COMMANDS)
