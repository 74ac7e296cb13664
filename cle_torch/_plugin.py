"""Plugin module, registered through the ``cle.backends`` entry point in pyproject.toml."""

from __future__ import annotations

import sys
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
def cle_add_commands(subparsers) -> None:
    # ``cle demo``: EfficientNet-Lite0 through both backends (torch imported when run).
    from ._demo import add_command

    add_command(subparsers)
