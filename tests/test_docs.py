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
