"""Plugin module, registered through the ``cle.backends`` entry point in pyproject.toml."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from cle_core import hookimpl

suffixes = (".onnx",)
"""The model files the ONNX backend reads (the core lists them when none reads a file)."""


@hookimpl
def cle_backend_for(model: Any):
    # A model can only be a ModelProto if onnx was imported already.
    onnx = sys.modules.get("onnx")
    if onnx is None or not isinstance(model, onnx.ModelProto):
        return None
    from ._backend import OnnxBackend

    return OnnxBackend()


@hookimpl
def cle_backend_for_file(path: Path):
    if path.suffix.lower() not in suffixes:
        return None
    try:
        from ._backend import OnnxBackend
    except ModuleNotFoundError as exc:
        from cle_core import UnsupportedModelError

        raise UnsupportedModelError(
            f"the ONNX backend needs {exc.name}: pip install 'crosslayer-eq[onnx]'"
        ) from None
    return OnnxBackend()
