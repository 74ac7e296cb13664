"""Plugin module, registered through the ``cle.backends`` entry point in pyproject.toml."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from cle_core import hookimpl


@hookimpl
def cle_backend_for(model: Any):
    # A model can only be an nn.Module if torch was imported already.
    torch = sys.modules.get("torch")
    if torch is None or not isinstance(model, torch.nn.Module):
        return None
    from ._backend import TorchBackend

    return TorchBackend()


@hookimpl
def cle_backend_for_file(path: Path):
    # A PyTorch file is ours to explain, not to read: a checkpoint holds weights without
    # the code that runs them (and unpickling it runs arbitrary code).
    if path.suffix.lower() not in (".pt", ".pth"):
        return None
    from cle_core import UnsupportedModelError

    raise UnsupportedModelError(
        f"{path}: cle reads no PyTorch files (a checkpoint holds no graph to equalize): "
        "equalize the model from Python with cle_torch.equalize_model(model), or export "
        "it to ONNX first (cle_torch.export_onnx or torch.onnx.export) and give cle the "
        ".onnx file"
    )


@hookimpl
def cle_add_commands(subparsers) -> None:
    # ``cle demo``: EfficientNet-Lite0 through both backends (torch imported when run).
    from ._demo import add_command

    add_command(subparsers)
