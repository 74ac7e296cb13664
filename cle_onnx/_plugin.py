"""Plugin module registered by cle_core under its module name."""

from __future__ import annotations

from typing import Any

from cle_core import hookimpl


@hookimpl
def cle_backend_for(model: Any):
    # The onnx translation is not implemented yet: claim nothing.
    return None
