"""Plugin module, registered through the ``cle.backends`` entry point in pyproject.toml."""

from __future__ import annotations

import sys
from typing import Any

from cle_core import hookimpl


@hookimpl
def cle_backend_for(model: Any):
    # A model can only be a ModelProto if onnx was imported already.
    onnx = sys.modules.get("onnx")
    if onnx is None or not isinstance(model, onnx.ModelProto):
        return None
    from ._backend import OnnxBackend

    return OnnxBackend()
