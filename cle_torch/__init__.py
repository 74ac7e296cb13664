"""The PyTorch backend for cross-layer equalization (a cle_core plugin).

``equalize_model`` and ``fold_all_batch_norms`` have AIMET's names and leading
arguments. The model's forward is captured with torch.fx symbolic tracing; the result is
written onto the model's own modules when possible, else returned as a rewritten
``torch.fx.GraphModule`` (see ``docs/torch.rst``). ``cle_core.equalize_model``
dispatches ``torch.nn.Module`` objects here.

The names below are imported on first use, so that ``cle_core`` can register this
package's plugin without importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._backend import TorchBackend, equalize_model, fold_all_batch_norms
    from ._examples import export_onnx
    from ._modules import (
        NotInPlaceError,
        PerChannelClamp,
        TrainingModeError,
        UntraceableModelError,
    )
    from ._quantsim import evaluate_torch, reference_outputs

_WHERE = {
    "TorchBackend": "._backend",
    "equalize_model": "._backend",
    "fold_all_batch_norms": "._backend",
    "NotInPlaceError": "._modules",
    "PerChannelClamp": "._modules",
    "TrainingModeError": "._modules",
    "UntraceableModelError": "._modules",
    "evaluate_torch": "._quantsim",
    "reference_outputs": "._quantsim",
    "export_onnx": "._examples",
}

__all__ = [
    "NotInPlaceError",
    "PerChannelClamp",
    "TorchBackend",
    "TrainingModeError",
    "UntraceableModelError",
    "equalize_model",
    "evaluate_torch",
    "export_onnx",
    "fold_all_batch_norms",
    "reference_outputs",
]


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        value = getattr(importlib.import_module(_WHERE[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
